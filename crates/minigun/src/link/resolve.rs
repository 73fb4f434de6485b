//! Name resolution and the declared graph: every reference of the definition (edges,
//! dead-letter targets, route targets) resolved to a stage or sub-pipeline index, and the
//! edges collected for [`graph`](super::graph) to wire.

use super::graph::{Declared, Port};
use crate::define::record::{Def, Ref};
use crate::error::DefinitionError;

/// The declared graph with its side edges.
pub(crate) struct Edges {
    /// What [`Declared::wire`] wires.
    pub(crate) declared: Declared,
    /// Dead-letter edges (stage, its dead-letter target).
    pub(crate) dead: Vec<(usize, usize)>,
    /// Route edges (stage, target, index of the route in the stage's declarations).
    pub(crate) routes: Vec<(usize, usize, usize)>,
}

/// Resolves every reference of `def` and collects the declared graph.
pub(crate) fn edges(def: &Def) -> Result<Edges, DefinitionError> {
    let n = def.stages.len();
    let stage_only = |stage: &str, p: Port, what: &'static str| match p {
        Port::Stage(i) => Ok(i),
        Port::Sub(g) => Err(DefinitionError::TargetIsSubPipeline {
            stage: stage.to_string(),
            what,
            target: def.subs[g].name.clone(),
        }),
    };
    let mut dead: Vec<(usize, usize)> = Vec::new();
    let mut routes: Vec<(usize, usize, usize)> = Vec::new();
    let mut declared = Declared {
        names: def.stages.iter().map(|s| s.name.clone()).collect(),
        kinds: def.stages.iter().map(|s| s.node.kind()).collect(),
        from: vec![Vec::new(); n],
        to: vec![Vec::new(); n],
        sub_of: def.stages.iter().map(|s| s.sub).collect(),
        sub_parent: def.subs.iter().map(|g| g.parent).collect(),
        entry: def.stages.iter().map(|s| s.entry).collect(),
        ..Declared::default()
    };
    let link = |a: Port, b: Port, declared: &mut Declared| match (a, b) {
        (Port::Stage(u), Port::Stage(v)) => declared.to[u].push(v),
        _ => declared.port_edges.push((a, b)),
    };
    for (v, s) in def.stages.iter().enumerate() {
        for r in &s.from {
            link(resolve(def, &s.name, r)?, Port::Stage(v), &mut declared);
        }
        for r in &s.to {
            link(Port::Stage(v), resolve(def, &s.name, r)?, &mut declared);
        }
        if let Some(r) = &s.dead_letter {
            let t = stage_only(&s.name, resolve(def, &s.name, r)?, "dead-letter target")?;
            dead.push((v, t));
        }
        for (k, (r, _)) in s.routes.iter().enumerate() {
            let t = stage_only(&s.name, resolve(def, &s.name, r)?, "route target")?;
            routes.push((v, t, k));
        }
        if s.rerouted && s.to.is_empty() {
            // A rerouted stage with no new edge feeds nothing (not the next stage by default).
            declared.sealed.push(v);
        }
    }
    for (g, sub) in def.subs.iter().enumerate() {
        if sub.rerouted && sub.to.is_empty() {
            declared.sealed_subs.push(g);
        }
        for r in &sub.from {
            link(resolve(def, &sub.name, r)?, Port::Sub(g), &mut declared);
        }
        for r in &sub.to {
            link(Port::Sub(g), resolve(def, &sub.name, r)?, &mut declared);
        }
    }
    declared.side = dead.clone();
    for &(u, v, _) in &routes {
        if !declared.side.contains(&(u, v)) {
            declared.side.push((u, v));
        }
        declared.routes.push((u, v));
    }
    Ok(Edges {
        declared,
        dead,
        routes,
    })
}

/// Resolves a reference to a stage or a sub-pipeline. Names match a qualified name
/// (`sub/stage`) exactly, or else a unique last part.
pub(crate) fn resolve(def: &Def, stage: &str, r: &Ref) -> Result<Port, DefinitionError> {
    match r {
        Ref::Id(i) => Ok(Port::Stage(*i)),
        Ref::Sub(g) => Ok(Port::Sub(*g)),
        Ref::Foreign(name) => Err(DefinitionError::UnknownReference {
            stage: stage.to_string(),
            what: "stage of this pipeline (it belongs to another pipeline)",
            reference: name.clone(),
        }),
        Ref::Name(name) => {
            let all = def
                .stages
                .iter()
                .enumerate()
                .map(|(i, s)| (Port::Stage(i), &s.name))
                .chain(
                    def.subs
                        .iter()
                        .enumerate()
                        .map(|(g, s)| (Port::Sub(g), &s.name)),
                );
            let exact: Vec<Port> = all
                .clone()
                .filter(|(_, n)| *n == name)
                .map(|(p, _)| p)
                .collect();
            if let [p] = exact[..] {
                return Ok(p);
            }
            let suffix = format!("/{name}");
            let found: Vec<(Port, &String)> = all.filter(|(_, n)| n.ends_with(&suffix)).collect();
            match &found[..] {
                [(p, _)] => Ok(*p),
                [] => Err(DefinitionError::UnknownReference {
                    stage: stage.to_string(),
                    what: "stage",
                    reference: name.clone(),
                }),
                many => Err(DefinitionError::AmbiguousReference {
                    stage: stage.to_string(),
                    reference: name.clone(),
                    candidates: many.iter().map(|(_, n)| n.to_string()).collect(),
                }),
            }
        }
    }
}
