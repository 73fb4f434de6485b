//! The linker: turns a definition ([`Def`]) into a [`Runnable`], or a [`DefinitionError`]
//! naming the stage and the reference at fault.
//!
//! [`build`] is a sequence of named passes; from the planning pass on, each stage has one
//! [`StagePlan`] record that the later passes fill in:
//!
//! 1. `misuse`: settings applied to a handle they do not fit;
//! 2. [`resolve::edges`]: every reference resolved, the declared graph collected;
//! 3. [`graph::Declared::wire`]: default (sequential) wiring, validation, topological order,
//!    routing loops, sub-pipeline entries and exits (pure, tested exhaustively there);
//! 4. `check_types`: every edge's item types, by `TypeId`;
//! 5. `plan`: each stage's executor ([`exec::plan`](crate::exec::plan)) and own settings;
//! 6. [`chain`]: which stages run chained to their upstreams (a pure rule, tested
//!    exhaustively there);
//! 7. [`connect`]: queues, routing loops' work counters, one sender per edge (a chained
//!    stage has no queue: its edge is its upstream's router calling it);
//! 8. `tasks`: each node becomes its task, in reverse topological order so that a chained
//!    stage is ready for its upstream, with the edges live views draw.

pub(crate) mod chain;
mod collect;
mod connect;
pub(crate) mod graph;
mod resolve;

use crate::ctx::StageCtx;
use crate::define::record::{Def, ExecChoice, Ref, StageDef, SubDef};
use crate::erased::Erased;
use crate::error::DefinitionError;
use crate::exec::plan::{self, Block};
use crate::exec::runner::{self, ForkHooks};
use crate::exec::Exec;
use crate::hooks::ForkHook;
use crate::loops::Loop;
use crate::node::{ChainedTask, ServeWiring, Wiring};
use crate::remote::worker::Served;
use crate::route::{RouteEntry, Routes};
use crate::run::{PlannedStage, Runnable};
use crate::shared::RunShared;
use crate::stage::{StageKind, TypeInfo};
use crate::stats::StageStats;
use graph::Wired;
use resolve::Edges;
use std::sync::Arc;

/// One stage on its way from definition to task.
pub(crate) struct StagePlan {
    def: StageDef,
    /// The executor it runs under (after [`plan::fit`]).
    exec: Exec,
    stats: Arc<StageStats>,
    /// Its input queue (none for producers).
    queue: Option<connect::Queue>,
    /// The routing loop it is a member of.
    lp: Option<Arc<Loop>>,
    /// Senders to its downstreams, in edge order.
    outputs: Vec<Erased>,
    dead_letter: Option<Erased>,
    routes: Vec<RouteEntry>,
    /// Under `threads(n)`, emit in input order (see [`collect::keep_order`]).
    in_order: bool,
    /// The upstream it runs chained to (see [`chain`]).
    chained_to: Option<usize>,
}

/// Checks the definition and links it into something that runs.
pub(crate) fn build(mut def: Def) -> Result<Runnable, DefinitionError> {
    misuse(&def)?;
    let edges = resolve::edges(&def)?;
    let wired = edges.declared.wire(&def.name)?;
    check_types(&def, &wired, &edges)?;
    let mut plans = plan(&mut def)?;
    if let Some(sink) = def.keep_order {
        collect::keep_order(&mut plans, &wired, &edges, sink)?;
    }
    chaining(&def, &mut plans, &wired, &edges);
    let closers = connect::queues(&mut plans, &wired, def.default_capacity);
    let loops = connect::loops(&mut plans, &wired, closers);
    connect::senders(&mut plans, &wired, &edges);
    // A loop nothing can enter is finished before it starts.
    for lp in &loops {
        lp.close_if_idle();
    }
    let mut run = RunShared::named(&def.name, def.no_signals);
    run.keep_failures = def.keep_failures.unwrap_or(crate::shared::KEEP_FAILURES);
    run.huge = crate::huge::RunHuge::new(def.huge_pages);
    let run = Arc::new(run);
    let stages = tasks(&def, plans, &wired, &edges, &run);
    let view_edges = view_edges(&wired, &edges);
    Ok(Runnable::new(
        def.name,
        stages,
        run,
        def.before_run,
        def.after_run,
        view_edges,
    ))
}

/// Links a definition whose last stage collects the items of the final stage: that sink is
/// connected to the one stage that emits items and has no downstream (see
/// [`collect::final_stage`]); with `ordered`, every stage upstream of it keeps the order.
pub(crate) fn collecting(mut def: Def, ordered: bool) -> Result<Runnable, DefinitionError> {
    let mut sink = def
        .stages
        .pop()
        .expect("the collecting sink is the last stage");
    misuse(&def)?;
    let edges = resolve::edges(&def)?;
    let wired = edges.declared.wire(&def.name)?;
    let last = collect::final_stage(&def, &wired, &sink)?;
    sink.from.push(Ref::Id(last));
    def.stages.push(sink);
    def.keep_order = ordered.then_some(def.stages.len() - 1);
    build(def)
}

/// Links the definition as a worker does: checks it exactly as [`build`] does, and returns
/// its remote stages, ready to serve.
pub(crate) fn served(mut def: Def) -> Result<Vec<Box<dyn Served>>, DefinitionError> {
    misuse(&def)?;
    let edges = resolve::edges(&def)?;
    let wired = edges.declared.wire(&def.name)?;
    check_types(&def, &wired, &edges)?;
    let plans = plan(&mut def)?;
    let mut served = Vec::new();
    for p in plans {
        let StagePlan {
            def: mut s, exec, ..
        } = p;
        let Exec::Remote(remote) = exec else { continue };
        let hooks = stage_fork_hooks(&def, &s);
        let w = ServeWiring {
            pipeline: def.name.clone(),
            name: s.name.clone(),
            remote,
            policy: s.policy.clone(),
            hooks,
            crossing: s.crossing.take().map(|c| c.typed),
        };
        served.extend(s.node.into_served(w));
    }
    Ok(served)
}

/// The first setting applied to a handle it does not fit.
fn misuse(def: &Def) -> Result<(), DefinitionError> {
    match def.misuse.first() {
        Some(e) => Err(e.clone()),
        None => Ok(()),
    }
}

/// Every edge joins an output to an input of the same type: static edges, sub-pipeline
/// entries and exits, dead-letter edges (which carry `Failed<I>`) and declared routes.
fn check_types(def: &Def, wired: &Wired, edges: &Edges) -> Result<(), DefinitionError> {
    let stage = |v: usize| &def.stages[v];
    for (g, sub) in def.subs.iter().enumerate() {
        for &e in &wired.subs[g].entries {
            check_edge(
                (&sub.name, Some(sub.input)),
                (&stage(e).name, stage(e).node.input()),
            )?;
        }
        for &x in &wired.subs[g].exits {
            check_edge(
                (&stage(x).name, stage(x).node.output()),
                (&sub.name, Some(sub.output)),
            )?;
        }
    }
    for &(u, v) in &wired.edges {
        let (a, b) = (stage(u), stage(v));
        let checked = check_edge((&a.name, a.node.output()), (&b.name, b.node.input()));
        match checked {
            // An edge of the default wiring: the message says how to wire otherwise.
            Err(DefinitionError::TypeMismatch {
                from,
                to,
                output,
                input,
            }) if wired.defaults.contains(&(u, v)) => {
                return Err(DefinitionError::DefaultEdgeMismatch {
                    from,
                    to,
                    output,
                    input,
                })
            }
            other => other?,
        }
    }
    for &(u, v) in &edges.dead {
        let (a, b) = (stage(u), stage(v));
        check_edge((&a.name, a.node.failed_type()), (&b.name, b.node.input()))?;
    }
    for &(u, v, k) in &edges.routes {
        let (a, b) = (stage(u), stage(v));
        let decl = &a.routes[k].1;
        check_edge((&a.name, Some(decl.ty)), (&b.name, b.node.input()))?;
    }
    Ok(())
}

/// Checks one edge's types.
fn check_edge(
    from: (&str, Option<TypeInfo>),
    to: (&str, Option<TypeInfo>),
) -> Result<(), DefinitionError> {
    match (from.1, to.1) {
        (Some(o), Some(i)) if o.id == i.id => Ok(()),
        (o, i) => Err(DefinitionError::TypeMismatch {
            from: from.0.to_string(),
            to: to.0.to_string(),
            output: o.map_or("nothing", |t| t.name),
            input: i.map_or("nothing", |t| t.name),
        }),
    }
}

/// Each stage's plan: its executor, checked settings and statistics. Takes the stages out of
/// `def`.
fn plan(def: &mut Def) -> Result<Vec<StagePlan>, DefinitionError> {
    let stages = std::mem::take(&mut def.stages);
    let mut plans = Vec::with_capacity(stages.len());
    for s in stages {
        let exec = executor(def, &s)?;
        s.node.validate(&s.name)?;
        settings_fit_the_kind(&s)?;
        let stats = Arc::new(StageStats::default());
        if let Some(total) = s.declared_total {
            let _ = stats.declared_total.set(total);
        }
        plans.push(StagePlan {
            def: s,
            exec,
            stats,
            queue: None,
            lp: None,
            outputs: Vec::new(),
            dead_letter: None,
            routes: Vec::new(),
            in_order: false,
            chained_to: None,
        });
    }
    Ok(plans)
}

/// Which stages run chained to their upstreams ([`chain::decide`] on each stage's facts).
fn chaining(def: &Def, plans: &mut [StagePlan], wired: &Wired, edges: &Edges) {
    let facts: Vec<chain::Facts> = (plans.iter().enumerate())
        .map(|(v, p)| chain::Facts {
            kind: p.def.node.kind(),
            threads: chain::Facts::threads_of(&p.exec),
            in_order: p.in_order,
            own_capacity: p.def.capacity.is_some(),
            opted_out: p.def.no_chain,
            in_loop: wired.loops.iter().any(|m| m.contains(&v)),
            routes_out: !p.def.routes.is_empty(),
            side_in: edges.routes.iter().any(|&(_, b, _)| b == v)
                || edges.dead.iter().any(|&(_, b)| b == v),
        })
        .collect();
    let on = !def.no_chaining && chain::enabled_by_env();
    for (p, to) in plans
        .iter_mut()
        .zip(chain::decide(on, &facts, &wired.edges))
    {
        p.chained_to = to;
    }
}

/// The stage's own settings that are not executors fit its kind: `max_wait` on accumulators
/// only; no input capacity on a producer; fork hooks not on producers and accumulators
/// (which never fork).
fn settings_fit_the_kind(s: &StageDef) -> Result<(), DefinitionError> {
    let kind = s.node.kind();
    let refuse = |setting: &str, applies_to: &'static str| {
        Err(DefinitionError::NotForThisKind {
            stage: s.name.clone(),
            kind,
            setting: setting.to_string(),
            applies_to,
        })
    };
    let forks = !matches!(kind, StageKind::Producer | StageKind::Accumulator);
    if s.max_wait.is_some() && kind != StageKind::Accumulator {
        return refuse("max_wait", "accumulators");
    }
    if s.capacity.is_some() && kind == StageKind::Producer {
        return refuse(
            "a capacity",
            "stages with an input queue (a producer has none)",
        );
    }
    if !forks && !s.hooks.before_fork.is_empty() {
        return refuse("a before_fork hook", "stages that can fork");
    }
    if !forks && !s.hooks.after_fork.is_empty() {
        return refuse("an after_fork hook", "stages that can fork");
    }
    Ok(())
}

/// The executor a stage runs under: the setting that applies ([`plan::precedence`]), fitted
/// to the stage ([`plan::fit`]).
fn executor(def: &Def, s: &StageDef) -> Result<Exec, DefinitionError> {
    let own = match &s.exec {
        None => None,
        Some(ExecChoice::Exec(e)) => Some(e),
        Some(ExecChoice::Context(c)) => Some(
            def.contexts
                .iter()
                .rev()
                .find(|(name, _)| name == c)
                .map(|(_, e)| e)
                .ok_or_else(|| DefinitionError::UnknownReference {
                    stage: s.name.clone(),
                    what: "execution context",
                    reference: c.clone(),
                })?,
        ),
    };
    let chain = enclosing(def, s.sub);
    let block: Option<Block<'_>> = s.group.as_ref().map(|(e, scope)| {
        let level = scope
            .and_then(|x| chain.iter().position(|&c| c == x))
            .unwrap_or(chain.len());
        (e, level)
    });
    let subs: Vec<Option<&Exec>> = chain.iter().map(|&g| def.subs[g].exec.as_ref()).collect();
    let applies = plan::precedence(own, block, &subs, &def.default_exec);
    let stage = plan::Stage {
        name: &s.name,
        kind: s.node.kind(),
        explicit: own.is_some(),
        crosses: s.crosses(),
        local_routes: s.routes.iter().any(|(_, d)| d.codec.is_none()),
        routes: !s.routes.is_empty(),
        is_async: s.node.is_async(),
    };
    let env = plan::Env {
        fork: runner::fork_available(),
        remote: runner::remote_enabled(),
    };
    plan::fit(stage, applies, env)
}

/// The sub-pipelines around a stage of sub-pipeline `sub`, innermost first.
fn enclosing(def: &Def, sub: Option<usize>) -> Vec<usize> {
    let mut chain = Vec::new();
    let mut g = sub;
    while let Some(x) = g {
        chain.push(x);
        g = def.subs[x].parent;
    }
    chain
}

/// A stage's fork hooks in order: pipeline, enclosing sub-pipelines (outermost first), stage.
fn fork_hooks(
    def: &Def,
    sub: Option<usize>,
    of: impl Fn(&SubDef) -> &Vec<ForkHook>,
    pipeline: &[ForkHook],
    stage: &[ForkHook],
) -> Vec<ForkHook> {
    let chain = enclosing(def, sub);
    let subs = chain.iter().rev().flat_map(|&x| of(&def.subs[x]).iter());
    pipeline.iter().chain(subs).chain(stage).cloned().collect()
}

/// A stage's fork hooks, before and after.
fn stage_fork_hooks(def: &Def, s: &StageDef) -> ForkHooks {
    ForkHooks {
        before_fork: fork_hooks(
            def,
            s.sub,
            |g| &g.before_fork,
            &def.before_fork,
            &s.hooks.before_fork,
        ),
        after_fork: fork_hooks(
            def,
            s.sub,
            |g| &g.after_fork,
            &def.after_fork,
            &s.hooks.after_fork,
        ),
    }
}

/// Each plan becomes its stage's task, in topological order. A stage chained to its
/// upstream becomes what the upstream's router calls instead, so the nodes are turned in
/// reverse topological order: a chained stage (and what is chained to it) is ready before
/// its upstream's router is made.
fn tasks(
    def: &Def,
    plans: Vec<StagePlan>,
    wired: &Wired,
    edges: &Edges,
    run: &Arc<RunShared>,
) -> Vec<PlannedStage> {
    let mut pos = vec![0; wired.order.len()];
    for (k, &v) in wired.order.iter().enumerate() {
        pos[v] = k;
    }
    let ups: Vec<Option<usize>> = plans.iter().map(|p| p.chained_to).collect();
    let names: Vec<String> = plans.iter().map(|p| p.def.name.clone()).collect();
    // The first stage of the chain a stage is in, as a position in the planned order.
    let head = |mut v: usize| {
        while let Some(u) = ups[v] {
            v = u;
        }
        pos[v]
    };
    let mut parts: Vec<Option<(StageDef, Wiring)>> = Vec::with_capacity(plans.len());
    let mut slots: Vec<Option<PlannedStage>> = Vec::with_capacity(plans.len());
    for (v, p) in plans.into_iter().enumerate() {
        let StagePlan {
            def: mut s,
            exec,
            stats,
            queue,
            lp,
            outputs,
            dead_letter,
            routes,
            in_order,
            chained_to,
        } = p;
        let ctx = Arc::new(StageCtx {
            name: s.name.clone(),
            exec,
            policy: s.policy.clone(),
            stats,
            run: run.clone(),
            lp,
        });
        let hooks = stage_fork_hooks(def, &s);
        let (input, capacity) = match queue {
            Some(q) => (q.rx, Some(q.capacity)),
            None => (None, None),
        };
        let wiring = Wiring {
            routes: Routes {
                stage: s.name.as_str().into(),
                entries: routes.into(),
            },
            ctx: ctx.clone(),
            input,
            outputs,
            fanout: s.fanout,
            dead_letter,
            hooks,
            crossing: s.crossing.take().map(|c| c.typed),
            max_wait: s.max_wait,
            in_order,
            chain: None,
        };
        // A sink: where items end (not a dead-letter stage, which takes failed items, and
        // not a stage that routes items on).
        let sink = !wired.edges.iter().any(|&(a, _)| a == v)
            && !edges.routes.iter().any(|&(a, _, _)| a == v)
            && !edges.dead.iter().any(|&(_, b)| b == v);
        slots.push(Some(PlannedStage {
            ctx,
            kind: s.node.kind(),
            capacity,
            sink,
            before: std::mem::take(&mut s.hooks.before),
            after: std::mem::take(&mut s.hooks.after),
            chained_to: chained_to.map(|u| names[u].clone()),
            chain_head: chained_to.map(|_| head(v)),
            task: Box::new(ChainedTask),
        }));
        parts.push(Some((s, wiring)));
    }
    let mut links: Vec<Option<Erased>> = (0..parts.len()).map(|_| None).collect();
    for &v in wired.order.iter().rev() {
        let (s, mut wiring) = parts[v].take().expect("each stage turned once");
        wiring.chain = links[v].take();
        let slot = slots[v].as_mut().expect("each stage planned once");
        match ups[v] {
            Some(u) => {
                let link = s.node.into_link(wiring);
                links[u] = Some(link.expect("the rule chains processors only"));
            }
            None => slot.task = s.node.into_task(wiring),
        }
    }
    let order = wired.order.iter();
    order
        .map(|&v| slots[v].take().expect("each stage planned once"))
        .collect()
}

/// Edges for live views, as positions in the planned (topological) order.
fn view_edges(wired: &Wired, edges: &Edges) -> Vec<(usize, usize)> {
    let mut pos = vec![0; wired.order.len()];
    for (k, &v) in wired.order.iter().enumerate() {
        pos[v] = k;
    }
    let mut view = Vec::new();
    for &(u, v) in wired.edges.iter().chain(&edges.declared.side) {
        if !view.contains(&(pos[u], pos[v])) {
            view.push((pos[u], pos[v]));
        }
    }
    view
}
