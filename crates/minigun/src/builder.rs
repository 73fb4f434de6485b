//! The pipeline builder: stages, typed handles, wiring, executors, hooks.
//!
//! Handles ([`StageRef`]) share the definition through an `Rc`, so a stage can be configured
//! and wired after later stages exist (forward references), and so the builder reads as a
//! sequence of `let` statements. Nothing here runs anything: `build()` checks the whole
//! definition and returns a [`Runnable`](crate::Runnable) or a [`DefinitionError`].

use crate::error::{DefinitionError, StageResult};
use crate::exec::local::Parts;
use crate::graph::{Declared, StageKind};
use crate::hooks::{ForkHook, OnceHook, StageHooks};
use crate::loops::{Loop, Membership, Unit};
use crate::node::{
    self, AccumulatorNode, ForkHooks, Node, PreparedRun, ProcessorNode, ProducerNode,
};
use crate::policy::{Final, OnError, StageCtx};
use crate::queue::{Capacity, FanOut};
use crate::route::{self, RouteCodec, RouteDecl};
use crate::run::{PlannedStage, RunShared, Runnable};
use crate::stage::TypeInfo;
use crate::stage::{Factory, Failed, FnStage, Item, Output, Stage, Wire};
use crate::stats::StageStats;
use crate::{Exec, ForkOptions};
use std::cell::RefCell;
use std::marker::PhantomData;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone)]
enum Ref {
    Id(usize),
    Name(String),
    Foreign(String),
}

#[derive(Debug, Clone)]
enum ExecChoice {
    Exec(Exec),
    Context(String),
}

struct StageDef {
    name: String,
    node: Box<dyn Node>,
    from: Vec<Ref>,
    to: Vec<Ref>,
    exec: Option<ExecChoice>,
    group: Option<Exec>,
    capacity: Option<Capacity>,
    fanout: FanOut,
    policy: OnError,
    dead_letter: Option<Ref>,
    hooks: StageHooks,
    misplaced_max_wait: bool,
    routes: Vec<(Ref, RouteDecl)>,
}

#[derive(Default)]
struct Def {
    name: String,
    stages: Vec<StageDef>,
    default_exec: Exec,
    default_capacity: Capacity,
    contexts: Vec<(String, Exec)>,
    group: Vec<Exec>,
    before_run: Vec<OnceHook>,
    after_run: Vec<OnceHook>,
    before_fork: Vec<ForkHook>,
    after_fork: Vec<ForkHook>,
}

/// A pipeline definition: a DAG of named stages.
///
/// ```
/// use minigun::{Exec, Pipeline};
/// let p = Pipeline::new("squares");
/// p.producer("numbers", |out| { for i in 0..10u64 { out.emit(i)?; } Ok(()) });
/// p.map("square", |x: u64| Ok(x * x)).executor(Exec::threads(2));
/// p.batch::<u64>("batch", 4);
/// p.consumer("print", |batch: Vec<u64>| { println!("{batch:?}"); Ok(()) });
/// let report = p.run().unwrap();
/// assert_eq!(report.stage("square").unwrap().items_out, 10);
/// ```
pub struct Pipeline {
    def: Rc<RefCell<Def>>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = self.def.borrow();
        f.debug_struct("Pipeline")
            .field("name", &d.name)
            .field(
                "stages",
                &d.stages.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// A typed handle to a stage that takes `I` and emits `O`.
///
/// Wiring through handles is checked by the compiler:
///
/// ```compile_fail
/// use minigun::Pipeline;
/// let p = Pipeline::new("typed");
/// let words = p.producer("words", |out| out.emit(String::from("hi")).map_err(Into::into));
/// // A stage taking u64 cannot be fed from a stage emitting String:
/// p.map("double", |x: u64| Ok(x * 2)).from(&words);
/// ```
pub struct StageRef<I, O> {
    id: usize,
    def: Rc<RefCell<Def>>,
    _t: PhantomData<fn(I) -> O>,
}

impl<I, O> Clone for StageRef<I, O> {
    fn clone(&self) -> Self {
        StageRef {
            id: self.id,
            def: self.def.clone(),
            _t: PhantomData,
        }
    }
}

impl<I, O> std::fmt::Debug for StageRef<I, O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StageRef({:?})", self.name())
    }
}

impl Pipeline {
    /// A new, empty pipeline definition.
    pub fn new(name: impl Into<String>) -> Self {
        let def = Def {
            name: name.into(),
            ..Def::default()
        };
        Pipeline {
            def: Rc::new(RefCell::new(def)),
        }
    }

    /// The executor of every stage that sets none (and is in no group). Default: inline.
    pub fn default_executor(&self, exec: Exec) -> &Self {
        self.def.borrow_mut().default_exec = exec;
        self
    }

    /// The input queue capacity of every stage that sets none. Default: bounded, 1000.
    pub fn default_capacity(&self, cap: Capacity) -> &Self {
        self.def.borrow_mut().default_capacity = cap;
        self
    }

    /// Declares a named execution context, which stages join with [`StageRef::context`].
    pub fn context(&self, name: impl Into<String>, exec: Exec) -> &Self {
        self.def.borrow_mut().contexts.push((name.into(), exec));
        self
    }

    /// An execution block: stages defined inside `f` run under `exec` unless they set their own
    /// executor. Blocks nest; the innermost wins.
    ///
    /// ```
    /// # use minigun::{Exec, Pipeline};
    /// let p = Pipeline::new("io");
    /// p.producer("ids", |out| out.emit_all(0..4u32).map_err(Into::into));
    /// p.with_executor(Exec::threads(4), |p| {
    ///     p.map("fetch", |id: u32| Ok(id + 1));
    ///     p.map("parse", |x: u32| Ok(x * 10));
    /// });
    /// assert_eq!(p.run().unwrap().stage("parse").unwrap().executor, "threads(4)");
    /// ```
    pub fn with_executor<R>(&self, exec: Exec, f: impl FnOnce(&Self) -> R) -> R {
        self.def.borrow_mut().group.push(exec);
        let r = f(self);
        self.def.borrow_mut().group.pop();
        r
    }

    /// Runs once before anything else in the run.
    pub fn before_run(&self, hook: impl FnOnce() -> StageResult + Send + 'static) -> &Self {
        self.def.borrow_mut().before_run.push(Box::new(hook));
        self
    }

    /// Runs once after every stage has ended (also when the run was aborted).
    pub fn after_run(&self, hook: impl FnOnce() -> StageResult + Send + 'static) -> &Self {
        self.def.borrow_mut().after_run.push(Box::new(hook));
        self
    }

    /// Runs in the parent once per fork stage, before its first fork (before stage-level
    /// `before_fork` hooks).
    pub fn before_fork(&self, hook: impl Fn() -> StageResult + Send + Sync + 'static) -> &Self {
        self.def.borrow_mut().before_fork.push(Arc::new(hook));
        self
    }

    /// Runs in every forked child before it handles items (per item for cow_fork, per worker
    /// for ipc_fork), before stage-level `after_fork` hooks. Reconnect sockets here.
    pub fn after_fork(&self, hook: impl Fn() -> StageResult + Send + Sync + 'static) -> &Self {
        self.def.borrow_mut().after_fork.push(Arc::new(hook));
        self
    }

    fn add<I, O>(&self, name: String, node: Box<dyn Node>) -> StageRef<I, O> {
        let mut d = self.def.borrow_mut();
        let group = d.group.last().cloned();
        d.stages.push(StageDef {
            name,
            node,
            from: Vec::new(),
            to: Vec::new(),
            exec: None,
            group,
            capacity: None,
            fanout: FanOut::Broadcast,
            policy: OnError::default(),
            dead_letter: None,
            hooks: StageHooks::default(),
            misplaced_max_wait: false,
            routes: Vec::new(),
        });
        StageRef {
            id: d.stages.len() - 1,
            def: self.def.clone(),
            _t: PhantomData,
        }
    }

    /// A producer: runs once, emits any number of items. When the run stops, `emit` returns
    /// [`EmitError::Stopped`](crate::EmitError::Stopped); return it with `?`.
    pub fn producer<O: Item>(
        &self,
        name: impl Into<String>,
        f: impl FnOnce(&mut Output<'_, O>) -> StageResult + Send + 'static,
    ) -> StageRef<(), O> {
        self.add(name.into(), Box::new(ProducerNode { f: Box::new(f) }))
    }

    /// A processor: called once per item, emits 0..n items.
    pub fn processor<I: Item, O: Item>(
        &self,
        name: impl Into<String>,
        f: impl Fn(I, &mut Output<'_, O>) -> StageResult + Send + Sync + 'static,
    ) -> StageRef<I, O> {
        let f = Arc::new(f);
        let factory: Factory<I, O> = Arc::new(move || Box::new(FnStage(f.clone())));
        self.add(name.into(), processor_node(StageKind::Processor, factory))
    }

    /// A processor that emits exactly one item per input.
    pub fn map<I: Item, O: Item>(
        &self,
        name: impl Into<String>,
        f: impl Fn(I) -> StageResult<O> + Send + Sync + 'static,
    ) -> StageRef<I, O> {
        self.processor(name, move |i, out: &mut Output<'_, O>| Ok(out.emit(f(i)?)?))
    }

    /// A consumer: called once per item, emits nothing.
    pub fn consumer<I: Item>(
        &self,
        name: impl Into<String>,
        f: impl Fn(I) -> StageResult + Send + Sync + 'static,
    ) -> StageRef<I, ()> {
        let f = Arc::new(move |i, _: &mut Output<'_, ()>| f(i));
        let factory: Factory<I, ()> = Arc::new(move || Box::new(FnStage(f.clone())));
        self.add(name.into(), processor_node(StageKind::Consumer, factory))
    }

    /// A user-defined stage type with state; `factory` makes one instance per worker
    /// (in the child, after fork, for the fork executors).
    pub fn stage<I: Item, O: Item, S: Stage<I, O>>(
        &self,
        name: impl Into<String>,
        factory: impl Fn() -> S + Send + Sync + 'static,
    ) -> StageRef<I, O> {
        let factory: Factory<I, O> = Arc::new(move || Box::new(factory()));
        self.add(name.into(), processor_node(StageKind::Custom, factory))
    }

    /// An accumulator: emits batches of `size` items, the last partial batch at end of stream,
    /// and (with [`StageRef::max_wait`]) a partial batch when its first item waited that long.
    pub fn accumulator<I: Item>(
        &self,
        name: impl Into<String>,
        size: usize,
    ) -> StageRef<I, Vec<I>> {
        let node = AccumulatorNode::<I> {
            size,
            max_wait: None,
            _t: PhantomData,
        };
        self.add(name.into(), Box::new(node))
    }

    /// Shorthand for [`Pipeline::accumulator`].
    pub fn batch<I: Item>(&self, name: impl Into<String>, size: usize) -> StageRef<I, Vec<I>> {
        self.accumulator(name, size)
    }

    /// Checks the definition and turns it into something that runs.
    pub fn build(self) -> Result<Runnable, DefinitionError> {
        let def = std::mem::take(&mut *self.def.borrow_mut());
        build(def)
    }

    /// Builds and runs the pipeline, blocking until it ends.
    pub fn run(self) -> Result<crate::RunReport, crate::RunError> {
        self.build()?.run()
    }

    /// Builds the pipeline and runs it on a background thread.
    pub fn spawn(self) -> Result<crate::RunHandle, DefinitionError> {
        Ok(self.build()?.spawn())
    }
}

fn processor_node<I: Item, O: Item>(kind: StageKind, factory: Factory<I, O>) -> Box<dyn Node> {
    Box::new(ProcessorNode {
        kind,
        factory,
        cow: None,
        ipc: None,
    })
}

impl<I, O> StageRef<I, O> {
    fn with<R>(&self, f: impl FnOnce(&mut StageDef) -> R) -> R {
        f(&mut self.def.borrow_mut().stages[self.id])
    }

    fn this(&self) -> Self {
        self.clone()
    }

    /// The stage's name.
    pub fn name(&self) -> String {
        self.def
            .borrow()
            .stages
            .get(self.id)
            .map(|s| s.name.clone())
            .unwrap_or_default()
    }

    fn reference<A, B>(&self, other: &StageRef<A, B>) -> Ref {
        if Rc::ptr_eq(&self.def, &other.def) {
            Ref::Id(other.id)
        } else {
            Ref::Foreign(other.name())
        }
    }

    /// Takes items from `upstream` (which must emit this stage's input type).
    pub fn from<X>(&self, upstream: &StageRef<X, I>) -> Self {
        let r = self.reference(upstream);
        self.with(|s| s.from.push(r));
        self.this()
    }

    /// Takes items from the stage named `upstream` (types checked by `build()`; the stage may
    /// be defined later).
    pub fn from_name(&self, upstream: impl Into<String>) -> Self {
        let r = Ref::Name(upstream.into());
        self.with(|s| s.from.push(r));
        self.this()
    }

    /// Sends items to `downstream` (which must take this stage's output type).
    pub fn to<Y>(&self, downstream: &StageRef<O, Y>) -> Self {
        let r = self.reference(downstream);
        self.with(|s| s.to.push(r));
        self.this()
    }

    /// Sends items to the stage named `downstream` (types checked by `build()`; forward
    /// references allowed).
    pub fn to_name(&self, downstream: impl Into<String>) -> Self {
        let r = Ref::Name(downstream.into());
        self.with(|s| s.to.push(r));
        self.this()
    }

    /// With several downstreams: send each item to one of them in turn instead of to all.
    pub fn round_robin(&self) -> Self {
        self.with(|s| s.fanout = FanOut::RoundRobin);
        self.this()
    }

    /// With several downstreams: send every item to each of them (the default).
    pub fn broadcast(&self) -> Self {
        self.with(|s| s.fanout = FanOut::Broadcast);
        self.this()
    }

    /// Runs this stage under `exec`. Fork executors need serde on the stage's types: use
    /// [`StageRef::cow_fork`] / [`StageRef::ipc_fork`], or [`StageRef::wire`] first.
    pub fn executor(&self, exec: Exec) -> Self {
        self.with(|s| s.exec = Some(ExecChoice::Exec(exec)));
        self.this()
    }

    /// Runs this stage in the named execution context (see [`Pipeline::context`]).
    pub fn context(&self, name: impl Into<String>) -> Self {
        let c = ExecChoice::Context(name.into());
        self.with(|s| s.exec = Some(c));
        self.this()
    }

    /// This stage's input queue capacity.
    pub fn capacity(&self, cap: Capacity) -> Self {
        self.with(|s| s.capacity = Some(cap));
        self.this()
    }

    /// This stage's error policy.
    pub fn on_error(&self, policy: OnError) -> Self {
        self.with(|s| {
            let dead_letter = s.policy.then == Final::DeadLetter;
            s.policy = policy;
            if dead_letter {
                s.policy.then = Final::DeadLetter;
            }
        });
        self.this()
    }

    /// Sends each item that finally fails (after any retries) to `target`, with its failure.
    pub fn dead_letter<Y>(&self, target: &StageRef<Failed<I>, Y>) -> Self {
        let r = self.reference(target);
        self.with(|s| {
            s.dead_letter = Some(r);
            s.policy.then = Final::DeadLetter;
        });
        self.this()
    }

    /// Declares that this stage may send items to `target` with
    /// [`Output::to`](crate::Output::to) (dynamic routing), from any executor. The target
    /// stays open until this stage has ended, so nothing routed is lost.
    pub fn routes_to<T: Wire, Y>(&self, target: &StageRef<T, Y>) -> Self {
        let r = self.reference(target);
        self.declare_route::<T>(r, Some(RouteCodec::of::<T>()))
    }

    /// Like [`StageRef::routes_to`], by name (the target may be defined later; its type is
    /// checked by `build()`).
    pub fn routes_to_name<T: Wire>(&self, target: impl Into<String>) -> Self {
        self.declare_route::<T>(Ref::Name(target.into()), Some(RouteCodec::of::<T>()))
    }

    /// Like [`StageRef::routes_to`] for item types that are not serialisable: the routing
    /// stage must then run in-process (inline or threads).
    pub fn routes_to_local<T: Item, Y>(&self, target: &StageRef<T, Y>) -> Self {
        let r = self.reference(target);
        self.declare_route::<T>(r, None)
    }

    fn declare_route<T: Item>(&self, target: Ref, codec: Option<RouteCodec>) -> Self {
        let decl = RouteDecl {
            ty: TypeInfo::of::<T>(),
            make: route::make_sender::<T>,
            codec,
        };
        self.with(|s| s.routes.push((target, decl)));
        self.this()
    }

    /// Runs once on the stage's thread before it handles its first item.
    pub fn before(&self, hook: impl FnOnce() -> StageResult + Send + 'static) -> Self {
        self.with(|s| s.hooks.before.push(Box::new(hook)));
        self.this()
    }

    /// Runs once after the stage handled its last item.
    pub fn after(&self, hook: impl FnOnce() -> StageResult + Send + 'static) -> Self {
        self.with(|s| s.hooks.after.push(Box::new(hook)));
        self.this()
    }

    /// Runs in the parent before this fork stage first forks.
    pub fn before_fork(&self, hook: impl Fn() -> StageResult + Send + Sync + 'static) -> Self {
        self.with(|s| s.hooks.before_fork.push(Arc::new(hook)));
        self.this()
    }

    /// Runs in each child of this fork stage (per item for cow_fork, per worker for ipc_fork).
    pub fn after_fork(&self, hook: impl Fn() -> StageResult + Send + Sync + 'static) -> Self {
        self.with(|s| s.hooks.after_fork.push(Arc::new(hook)));
        self.this()
    }
}

impl<I: Item> StageRef<I, Vec<I>> {
    /// For an accumulator: emit a partial batch once its first item has waited `wait`.
    pub fn max_wait(&self, wait: Duration) -> Self {
        self.with(
            |s| match s.node.as_any().downcast_mut::<AccumulatorNode<I>>() {
                Some(acc) => acc.max_wait = Some(wait),
                None => s.misplaced_max_wait = true,
            },
        );
        self.this()
    }
}

impl<I: Item, O: Wire> StageRef<I, O> {
    fn set_cow(&self) {
        self.with(|s| {
            if let Some(n) = s.node.as_any().downcast_mut::<ProcessorNode<I, O>>() {
                n.cow = Some(cow_runner::<I, O>);
            }
        });
    }

    /// Runs this stage in one forked child per item, at most `n` at once. The child reads the
    /// item through copy-on-write memory: only the output crosses the pipe.
    pub fn cow_fork(&self, n: usize) -> Self {
        self.set_cow();
        self.executor(Exec::cow_fork(n))
    }
}

impl<I: Wire, O: Wire> StageRef<I, O> {
    /// Runs this stage on `n` persistent forked workers fed over pipes.
    pub fn ipc_fork(&self, n: usize) -> Self {
        self.wire();
        self.executor(Exec::ipc_fork(n))
    }

    /// Declares that this stage's items can cross a process, so a pipeline-wide, group or
    /// context fork executor can apply to it.
    pub fn wire(&self) -> Self {
        self.set_cow();
        self.with(|s| {
            if let Some(n) = s.node.as_any().downcast_mut::<ProcessorNode<I, O>>() {
                n.ipc = Some(ipc_runner::<I, O>);
            }
        });
        self.this()
    }
}

#[cfg(target_os = "linux")]
fn cow_runner<I: Item, O: Wire>(p: Parts<I, O>, o: ForkOptions, h: ForkHooks) -> PreparedRun {
    crate::exec::fork::cow(p, o, h)
}

#[cfg(target_os = "linux")]
fn ipc_runner<I: Wire, O: Wire>(p: Parts<I, O>, o: ForkOptions, h: ForkHooks) -> PreparedRun {
    crate::exec::fork::ipc(p, o, h)
}

// Without fork, `build()` runs fork stages inline; these are never called.
#[cfg(not(target_os = "linux"))]
fn cow_runner<I: Item, O: Wire>(p: Parts<I, O>, _: ForkOptions, _: ForkHooks) -> PreparedRun {
    Box::new(move || crate::exec::local::run(p, 1))
}

#[cfg(not(target_os = "linux"))]
fn ipc_runner<I: Wire, O: Wire>(p: Parts<I, O>, _: ForkOptions, _: ForkHooks) -> PreparedRun {
    Box::new(move || crate::exec::local::run(p, 1))
}

fn build(mut def: Def) -> Result<Runnable, DefinitionError> {
    let names: Vec<String> = def.stages.iter().map(|s| s.name.clone()).collect();
    let n = names.len();
    let lookup = |stage: &str, r: &Ref| -> Result<usize, DefinitionError> {
        match r {
            Ref::Id(i) => Ok(*i),
            Ref::Name(name) => names.iter().position(|x| x == name).ok_or_else(|| {
                DefinitionError::UnknownReference {
                    stage: stage.to_string(),
                    what: "stage",
                    reference: name.clone(),
                }
            }),
            Ref::Foreign(name) => Err(DefinitionError::UnknownReference {
                stage: stage.to_string(),
                what: "stage of this pipeline (it belongs to another pipeline)",
                reference: name.clone(),
            }),
        }
    };
    let mut dead_edges: Vec<(usize, usize)> = Vec::new();
    let mut route_edges: Vec<(usize, usize, usize)> = Vec::new();
    let mut declared = Declared {
        names: names.clone(),
        kinds: def.stages.iter().map(|s| s.node.kind()).collect(),
        from: vec![Vec::new(); n],
        to: vec![Vec::new(); n],
        side: Vec::new(),
        routes: Vec::new(),
    };
    for (v, s) in def.stages.iter().enumerate() {
        for r in &s.from {
            declared.from[v].push(lookup(&s.name, r)?);
        }
        for r in &s.to {
            declared.to[v].push(lookup(&s.name, r)?);
        }
        if let Some(r) = &s.dead_letter {
            dead_edges.push((v, lookup(&s.name, r)?));
        }
        for (k, (r, _)) in s.routes.iter().enumerate() {
            route_edges.push((v, lookup(&s.name, r)?, k));
        }
    }
    declared.side = dead_edges.clone();
    for &(u, v, _) in &route_edges {
        if !declared.side.contains(&(u, v)) {
            declared.side.push((u, v));
        }
        declared.routes.push((u, v));
    }
    let wired = declared.wire(&def.name)?;
    for &(u, v) in &wired.edges {
        let (a, b) = (&def.stages[u], &def.stages[v]);
        node::check_edge((&a.name, a.node.output()), (&b.name, b.node.input()))?;
    }
    for &(u, v) in &dead_edges {
        let (a, b) = (&def.stages[u], &def.stages[v]);
        node::check_edge((&a.name, a.node.failed_type()), (&b.name, b.node.input()))?;
    }
    for &(u, v, k) in &route_edges {
        let (a, b) = (&def.stages[u], &def.stages[v]);
        let decl = &a.routes[k].1;
        node::check_edge((&a.name, Some(decl.ty)), (&b.name, b.node.input()))?;
    }

    // Executors: stage (explicit or context) > innermost group > pipeline default.
    let mut execs = Vec::with_capacity(n);
    for s in &def.stages {
        let exec = match &s.exec {
            Some(ExecChoice::Exec(e)) => e.clone(),
            Some(ExecChoice::Context(c)) => def
                .contexts
                .iter()
                .rev()
                .find(|(name, _)| name == c)
                .map(|(_, e)| e.clone())
                .ok_or_else(|| DefinitionError::UnknownReference {
                    stage: s.name.clone(),
                    what: "execution context",
                    reference: c.clone(),
                })?,
            None => s.group.clone().unwrap_or_else(|| def.default_exec.clone()),
        };
        if exec.concurrency() == 0 {
            return Err(DefinitionError::InvalidConfig {
                stage: s.name.clone(),
                message: format!("{exec} needs at least one worker"),
            });
        }
        let kind = s.node.kind();
        let exec = match kind {
            // Producers and accumulators always run on their driver thread.
            StageKind::Producer | StageKind::Accumulator => Exec::Inline,
            _ if !s.node.supports(&exec) => {
                if s.exec.is_some() {
                    return Err(DefinitionError::NotSerialisable {
                        stage: s.name.clone(),
                        executor: exec.to_string(),
                    });
                }
                // An inherited fork default does not apply to stages that cannot cross a
                // process; they keep the in-process default.
                tracing::debug!(stage = %s.name, %exec, "stage is not serialisable; runs inline");
                Exec::Inline
            }
            _ => exec,
        };
        if exec.is_fork() && s.routes.iter().any(|(_, d)| d.codec.is_none()) {
            return Err(DefinitionError::NotSerialisable {
                stage: s.name.clone(),
                executor: format!("{exec} (a route declared with routes_to_local)"),
            });
        }
        let exec = if exec.is_fork() && !crate::exec::fork_available() {
            tracing::warn!(stage = %s.name, %exec, "fork is not available here: the stage runs inline");
            Exec::Inline
        } else {
            exec
        };
        if let Err(message) = s.node.validate() {
            return Err(DefinitionError::InvalidConfig {
                stage: s.name.clone(),
                message,
            });
        }
        if s.misplaced_max_wait {
            return Err(DefinitionError::InvalidConfig {
                stage: s.name.clone(),
                message: "max_wait applies to accumulators only".into(),
            });
        }
        execs.push(exec);
    }

    let run = Arc::new(RunShared::default());
    let stats: Vec<Arc<StageStats>> = (0..n).map(|_| Arc::new(StageStats::default())).collect();
    let mut makers = Vec::with_capacity(n);
    let mut inputs = Vec::with_capacity(n);
    let mut capacities = Vec::with_capacity(n);
    for (v, s) in def.stages.iter().enumerate() {
        let cap = s.capacity.unwrap_or(def.default_capacity);
        match s.node.make_queue(cap, stats[v].clone()) {
            Some((maker, rx)) => {
                makers.push(Some(maker));
                inputs.push(Some(rx));
                capacities.push(Some(cap));
            }
            None => {
                makers.push(None);
                inputs.push(None);
                capacities.push(None);
            }
        }
    }
    // Routing loops: one work counter each, with a unit per edge entering the loop.
    let mut loop_of: Vec<Option<Arc<Loop>>> = (0..n).map(|_| None).collect();
    let all_edges: Vec<(usize, usize)> =
        wired.edges.iter().chain(&declared.side).copied().collect();
    for members in &wired.loops {
        let entering = all_edges
            .iter()
            .filter(|&&(u, v)| members.contains(&v) && !members.contains(&u))
            .count();
        let lp = Loop::new(entering as u64);
        for &m in members {
            loop_of[m] = Some(lp.clone());
        }
    }
    let membership = |u: usize, v: usize| match &loop_of[v] {
        None => Membership::default(),
        Some(lp) => Membership {
            lp: Some(lp.clone()),
            unit: match &loop_of[u] {
                Some(own) if Arc::ptr_eq(own, lp) => None,
                _ => Some(Arc::new(Unit(lp.clone()))),
            },
        },
    };
    let mut outputs: Vec<Vec<node::AnyBox>> = (0..n).map(|_| Vec::new()).collect();
    for &(u, v) in &wired.edges {
        outputs[u].push(makers[v].as_ref().expect("downstream has a queue")(
            membership(u, v),
        ));
    }
    let mut dead: Vec<Option<node::AnyBox>> = (0..n).map(|_| None).collect();
    for &(u, v) in &dead_edges {
        let tx = makers[v].as_ref().expect("dead-letter stage has a queue")(membership(u, v));
        dead[u] = Some(tx);
    }
    let mut routes: Vec<Vec<route::RouteEntry>> = (0..n).map(|_| Vec::new()).collect();
    for &(u, v, k) in &route_edges {
        let decl = &def.stages[u].routes[k].1;
        let tx = makers[v].as_ref().expect("route target has a queue")(membership(u, v));
        routes[u].push(route::RouteEntry {
            name: def.stages[v].name.clone(),
            send: (decl.make)(tx),
            codec: decl.codec,
        });
    }
    drop(makers);

    let mut planned = Vec::with_capacity(n);
    let stages = std::mem::take(&mut def.stages);
    let mut slots: Vec<Option<PlannedStage>> = (0..n).map(|_| None).collect();
    for (v, mut s) in stages.into_iter().enumerate() {
        let ctx = Arc::new(StageCtx {
            name: s.name.clone(),
            exec: execs[v].clone(),
            policy: s.policy.clone(),
            stats: stats[v].clone(),
            run: run.clone(),
            lp: loop_of[v].clone(),
        });
        let kind = s.node.kind();
        let wiring = node::Wiring {
            routes: route::Routes {
                stage: s.name.as_str().into(),
                entries: std::mem::take(&mut routes[v]).into(),
            },
            ctx: ctx.clone(),
            input: inputs[v].take(),
            outputs: std::mem::take(&mut outputs[v]),
            fanout: s.fanout,
            dead_letter: dead[v].take(),
            before_fork: def
                .before_fork
                .iter()
                .chain(&s.hooks.before_fork)
                .cloned()
                .collect(),
            after_fork: def
                .after_fork
                .iter()
                .chain(&s.hooks.after_fork)
                .cloned()
                .collect(),
        };
        let downstreams = wired.edges.iter().filter(|&&(a, _)| a == v).count();
        slots[v] = Some(PlannedStage {
            ctx,
            kind,
            capacity: capacities[v],
            terminal: downstreams == 0,
            before: std::mem::take(&mut s.hooks.before),
            after: std::mem::take(&mut s.hooks.after),
            task: s.node.into_task(wiring),
        });
    }
    for v in wired.order {
        planned.push(slots[v].take().expect("each stage planned once"));
    }
    Ok(Runnable::new(
        def.name,
        planned,
        run,
        def.before_run,
        def.after_run,
    ))
}
