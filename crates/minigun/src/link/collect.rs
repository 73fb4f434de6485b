//! Linking a pipeline whose final stage's items are collected
//! ([`Pipeline::collect`](crate::Pipeline::collect) and its kin): which stage is final, and,
//! for results in input order, that every stage on the way keeps the order.

use super::graph::Wired;
use super::resolve::Edges;
use super::StagePlan;
use crate::define::record::{Def, StageDef};
use crate::error::DefinitionError;
use crate::exec::Exec;
use crate::stage::{StageKind, TypeInfo};

/// The stage whose items `sink` collects: the one stage that emits items and has no
/// downstream once the pipeline (without `sink`) is wired.
pub(super) fn final_stage(
    def: &Def,
    wired: &Wired,
    sink: &StageDef,
) -> Result<usize, DefinitionError> {
    let unit = TypeInfo::of::<()>().id;
    let finals: Vec<usize> = (0..def.stages.len())
        .filter(|&v| {
            let s = &def.stages[v];
            s.node.kind() != StageKind::Consumer
                && s.node.output().is_some_and(|t| t.id != unit)
                && !wired.edges.iter().any(|&(u, _)| u == v)
        })
        .collect();
    let last = match finals.as_slice() {
        [] => {
            return Err(DefinitionError::NothingToCollect {
                pipeline: def.name.clone(),
            })
        }
        [v] => *v,
        several => {
            return Err(DefinitionError::SeveralFinalStages {
                pipeline: def.name.clone(),
                stages: several
                    .iter()
                    .map(|&v| def.stages[v].name.clone())
                    .collect(),
            })
        }
    };
    let (emits, wanted) = (def.stages[last].node.output(), sink.node.input());
    match (emits, wanted) {
        (Some(e), Some(w)) if e.id == w.id => Ok(last),
        (e, w) => Err(DefinitionError::CollectTypeMismatch {
            stage: def.stages[last].name.clone(),
            emits: e.map_or("nothing", |t| t.name),
            wanted: w.map_or("nothing", |t| t.name),
        }),
    }
}

/// Makes every stage upstream of `sink` keep its input order, or says which cannot: a fork
/// or remote stage is set to emit in input order, and so is a stage under `threads(n)`; a
/// stage with several upstreams (fan-in, a dead-letter or route edge into it) is an error.
pub(super) fn keep_order(
    plans: &mut [StagePlan],
    wired: &Wired,
    edges: &Edges,
    sink: usize,
) -> Result<(), DefinitionError> {
    let all: Vec<(usize, usize)> = wired
        .edges
        .iter()
        .chain(&edges.declared.side)
        .copied()
        .collect();
    let mut upstream_of_sink = vec![false; plans.len()];
    let mut todo = vec![sink];
    while let Some(v) = todo.pop() {
        let ups: Vec<usize> = all.iter().filter(|e| e.1 == v).map(|e| e.0).collect();
        if ups.len() > 1 {
            return Err(DefinitionError::OrderLostByFanIn {
                stage: plans[v].def.name.clone(),
                upstreams: ups.iter().map(|&u| plans[u].def.name.clone()).collect(),
            });
        }
        for u in ups {
            if !upstream_of_sink[u] {
                upstream_of_sink[u] = true;
                todo.push(u);
            }
        }
    }
    for (v, plan) in plans.iter_mut().enumerate() {
        if !upstream_of_sink[v] {
            continue;
        }
        match &mut plan.exec {
            Exec::Threads(_) => plan.in_order = true,
            Exec::CowFork(o) | Exec::IpcFork(o) => o.ordered = true,
            Exec::Remote(r) => r.ordered = true,
            #[cfg(feature = "async")]
            Exec::Tasks(o) => o.ordered = true,
            Exec::Inline | Exec::Misapplied { .. } => {}
        }
    }
    Ok(())
}
