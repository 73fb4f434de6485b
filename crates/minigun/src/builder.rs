//! The pipeline builder: stages, typed handles, wiring, executors, hooks.
//!
//! Handles ([`StageRef`]) share the definition through an `Rc`, so a stage can be configured
//! and wired after later stages exist (forward references), and so the builder reads as a
//! sequence of `let` statements. Nothing here runs anything: `build()` checks the whole
//! definition and returns a [`Runnable`] or a [`DefinitionError`].

use crate::error::{DefinitionError, StageResult};
use crate::exec::local::Parts;
use crate::graph::{Declared, Port, StageKind};
use crate::hooks::{ForkHook, OnceHook, StageHooks};
use crate::ipc::protocol::{Codec, Postcard, WireFns};
use crate::loops::{Loop, Membership, Unit};
use crate::node::{
    self, AccumulatorNode, ForkHooks, Node, PreparedRun, ProcessorNode, ProducerNode,
};
use crate::policy::{Final, OnError, StageCtx};
use crate::queue::{Capacity, FanOut};
use crate::route::{self, RouteCodec, RouteDecl};
use crate::run::{PlannedStage, Runnable};
use crate::shared::RunShared;
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
    Sub(usize),
    Name(String),
    Foreign(String),
}

/// A sub-pipeline: a named group of stages that acts as one stage of its parent.
struct SubDef {
    name: String,
    parent: Option<usize>,
    from: Vec<Ref>,
    to: Vec<Ref>,
    exec: Option<Exec>,
    input: TypeInfo,
    output: TypeInfo,
    before_fork: Vec<ForkHook>,
    after_fork: Vec<ForkHook>,
    rerouted: bool,
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
    /// The innermost execution block around the stage, and the sub-pipeline it was opened in.
    group: Option<(Exec, Option<usize>)>,
    capacity: Option<Capacity>,
    fanout: FanOut,
    policy: OnError,
    dead_letter: Option<Ref>,
    hooks: StageHooks,
    misplaced_max_wait: bool,
    routes: Vec<(Ref, RouteDecl)>,
    sub: Option<usize>,
    entry: bool,
    rerouted: bool,
    declared_total: Option<u64>,
}

#[derive(Default)]
struct Def {
    name: String,
    stages: Vec<StageDef>,
    default_exec: Exec,
    default_capacity: Capacity,
    contexts: Vec<(String, Exec)>,
    group: Vec<(Exec, Option<usize>)>,
    before_run: Vec<OnceHook>,
    after_run: Vec<OnceHook>,
    before_fork: Vec<ForkHook>,
    after_fork: Vec<ForkHook>,
    subs: Vec<SubDef>,
    /// Settings that were applied to a handle they do not fit (reported by `build()`).
    misuse: Vec<(String, String)>,
    /// Leave SIGINT / SIGTERM to the host program.
    no_signals: bool,
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
    /// The sub-pipeline this handle defines stages in (None: the pipeline itself).
    scope: Option<usize>,
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
    /// The handle names a sub-pipeline (`id` indexes the sub-pipelines), not a stage.
    sub: bool,
    def: Rc<RefCell<Def>>,
    _t: PhantomData<fn(I) -> O>,
}

impl<I, O> Clone for StageRef<I, O> {
    fn clone(&self) -> Self {
        StageRef {
            id: self.id,
            sub: self.sub,
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
            scope: None,
        }
    }

    /// The executor of every stage that sets none (and is in no group). Default: inline.
    pub fn default_executor(&self, exec: Exec) -> &Self {
        let mut d = self.def.borrow_mut();
        match self.scope {
            Some(g) => d.subs[g].exec = Some(exec),
            None => d.default_exec = exec,
        }
        drop(d);
        self
    }

    /// The input queue capacity of every stage that sets none. Default: bounded, 1000.
    pub fn default_capacity(&self, cap: Capacity) -> &Self {
        self.def.borrow_mut().default_capacity = cap;
        self
    }

    /// Whether a run takes over SIGINT and SIGTERM (default: yes). While it runs, either
    /// signal stops the producers, cancels queued items, terminates and reaps every child,
    /// and the report names the signal; the previous handlers are restored afterwards. Turn
    /// it off when the host program handles signals itself (it can still call
    /// [`RunHandle::stop`](crate::RunHandle::stop)).
    pub fn handle_signals(&self, on: bool) -> &Self {
        self.def.borrow_mut().no_signals = !on;
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
        self.def.borrow_mut().group.push((exec, self.scope));
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
        let mut d = self.def.borrow_mut();
        match self.scope {
            Some(g) => d.subs[g].before_fork.push(Arc::new(hook)),
            None => d.before_fork.push(Arc::new(hook)),
        }
        drop(d);
        self
    }

    /// Runs in every forked child before it handles items (per item for cow_fork, per worker
    /// for ipc_fork), before stage-level `after_fork` hooks. Reconnect sockets here.
    pub fn after_fork(&self, hook: impl Fn() -> StageResult + Send + Sync + 'static) -> &Self {
        let mut d = self.def.borrow_mut();
        match self.scope {
            Some(g) => d.subs[g].after_fork.push(Arc::new(hook)),
            None => d.after_fork.push(Arc::new(hook)),
        }
        drop(d);
        self
    }

    /// A nested pipeline named `name`, used as one stage taking `I` and emitting `O`: what
    /// flows into it goes to its entry stages (its stages without an upstream inside it, and
    /// those marked with [`StageRef::entry`]), what its exit stages emit flows on. Its stages
    /// are named `name/stage`; a stage can be referred to by its bare name when that is
    /// unambiguous. Sub-pipelines nest to any depth; their hooks run like the pipeline's.
    ///
    /// ```
    /// use minigun::Pipeline;
    /// let p = Pipeline::new("etl");
    /// p.producer("rows", |out| out.emit_all(1..=3u64).map_err(Into::into));
    /// p.pipeline::<u64, u64>("clean", |s| {
    ///     s.map("trim", |x: u64| Ok(x * 10));
    ///     s.map("check", |x: u64| Ok(x + 1));
    /// });
    /// p.consumer("load", |_: u64| Ok(()));
    /// let report = p.run().unwrap();
    /// assert_eq!(report.stage("clean/check").unwrap().items_out, 3);
    /// ```
    pub fn pipeline<I: Item, O: Item>(
        &self,
        name: impl Into<String>,
        define: impl FnOnce(&Pipeline),
    ) -> StageRef<I, O> {
        let id = {
            let mut d = self.def.borrow_mut();
            let name = self.qualify(&d, name.into());
            d.subs.push(SubDef {
                name,
                parent: self.scope,
                from: Vec::new(),
                to: Vec::new(),
                exec: None,
                input: TypeInfo::of::<I>(),
                output: TypeInfo::of::<O>(),
                before_fork: Vec::new(),
                after_fork: Vec::new(),
                rerouted: false,
            });
            d.subs.len() - 1
        };
        define(&Pipeline {
            def: self.def.clone(),
            scope: Some(id),
        });
        StageRef {
            id,
            sub: true,
            def: self.def.clone(),
            _t: PhantomData,
        }
    }

    /// A handle to the stage named `name` (for definitions that extend another one, e.g. to
    /// [`StageRef::reroute`] it). `None` if there is no such stage or its types differ.
    pub fn find<I: Item, O: Item>(&self, name: &str) -> Option<StageRef<I, O>> {
        let d = self.def.borrow();
        // The exact (qualified) name, else a unique last part; an ambiguous name finds nothing.
        let suffix = format!("/{name}");
        let id = d.stages.iter().position(|s| s.name == name).or_else(|| {
            let mut found = d
                .stages
                .iter()
                .enumerate()
                .filter(|(_, s)| s.name.ends_with(&suffix));
            match (found.next(), found.next()) {
                (Some((i, _)), None) => Some(i),
                _ => None,
            }
        })?;
        let node = &d.stages[id].node;
        let fits = |t: Option<TypeInfo>, want: TypeInfo| t.is_none_or(|t| t.id == want.id);
        let ok =
            fits(node.input(), TypeInfo::of::<I>()) && fits(node.output(), TypeInfo::of::<O>());
        ok.then(|| StageRef {
            id,
            sub: false,
            def: self.def.clone(),
            _t: PhantomData,
        })
    }

    fn qualify(&self, d: &Def, name: String) -> String {
        match self.scope {
            Some(g) => format!("{}/{name}", d.subs[g].name),
            None => name,
        }
    }

    fn add<I, O>(&self, name: String, node: Box<dyn Node>) -> StageRef<I, O> {
        let mut d = self.def.borrow_mut();
        let group = d.group.last().cloned();
        let name = self.qualify(&d, name);
        d.stages.push(StageDef {
            sub: self.scope,
            entry: false,
            rerouted: false,
            declared_total: None,
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
            sub: false,
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
        wire: None,
        codec_chosen: false,
    })
}

impl<I, O> StageRef<I, O> {
    /// Applies a stage setting; on a sub-pipeline handle it is recorded as a misuse that
    /// `build()` reports.
    fn with<R: Default>(&self, f: impl FnOnce(&mut StageDef) -> R) -> R {
        let mut d = self.def.borrow_mut();
        if self.sub {
            let name = d.subs[self.id].name.clone();
            d.misuse.push((
                name,
                "this setting applies to stages, not to a sub-pipeline".into(),
            ));
            return R::default();
        }
        f(&mut d.stages[self.id])
    }

    /// Adds an edge reference on either kind of handle.
    fn link(&self, r: Ref, upstream: bool) {
        let mut d = self.def.borrow_mut();
        let (from, to) = if self.sub {
            let s = &mut d.subs[self.id];
            (&mut s.from, &mut s.to)
        } else {
            let s = &mut d.stages[self.id];
            (&mut s.from, &mut s.to)
        };
        if upstream {
            from.push(r);
        } else {
            to.push(r);
        }
    }

    fn this(&self) -> Self {
        self.clone()
    }

    /// The stage's name.
    pub fn name(&self) -> String {
        let d = self.def.borrow();
        if self.sub {
            return d
                .subs
                .get(self.id)
                .map(|s| s.name.clone())
                .unwrap_or_default();
        }
        d.stages
            .get(self.id)
            .map(|s| s.name.clone())
            .unwrap_or_default()
    }

    fn reference<A, B>(&self, other: &StageRef<A, B>) -> Ref {
        if Rc::ptr_eq(&self.def, &other.def) {
            if other.sub {
                Ref::Sub(other.id)
            } else {
                Ref::Id(other.id)
            }
        } else {
            Ref::Foreign(other.name())
        }
    }

    /// Takes items from `upstream` (which must emit this stage's input type).
    pub fn from<X>(&self, upstream: &StageRef<X, I>) -> Self {
        self.link(self.reference(upstream), true);
        self.this()
    }

    /// Takes items from the stage named `upstream` (types checked by `build()`; the stage may
    /// be defined later).
    pub fn from_name(&self, upstream: impl Into<String>) -> Self {
        self.link(Ref::Name(upstream.into()), true);
        self.this()
    }

    /// Sends items to `downstream` (which must take this stage's output type).
    pub fn to<Y>(&self, downstream: &StageRef<O, Y>) -> Self {
        self.link(self.reference(downstream), false);
        self.this()
    }

    /// Sends items to the stage named `downstream` (types checked by `build()`; forward
    /// references allowed).
    pub fn to_name(&self, downstream: impl Into<String>) -> Self {
        self.link(Ref::Name(downstream.into()), false);
        self.this()
    }

    /// Inside a sub-pipeline: this stage receives what enters the sub-pipeline (an entry),
    /// even if it is not the first one. Several entries take the input in parallel.
    pub fn entry(&self) -> Self {
        self.with(|s| s.entry = true);
        self.this()
    }

    /// Replaces this stage's outgoing edges (Minigun's `reroute_stage`): its explicit
    /// downstreams are dropped, stages that named it in `from` no longer do, and it no longer
    /// feeds the next stage by default. Add the new edges with [`StageRef::to`].
    ///
    /// ```
    /// use minigun::Pipeline;
    /// fn base(p: &Pipeline) {
    ///     p.producer("gen", |out| out.emit_all(0..4u64).map_err(Into::into));
    ///     p.map("double", |x: u64| Ok(x * 2));
    ///     p.consumer("store", |_: u64| Ok(()));
    /// }
    /// // A derived definition: "double" now feeds both "store" and a new "audit" stage
    /// // (Minigun's `reroute_stage :double, to: [:store, :audit]`).
    /// let p = Pipeline::new("derived");
    /// base(&p);
    /// let audit = p.consumer("audit", |_: u64| Ok(()));
    /// let store = p.find::<u64, ()>("store").unwrap();
    /// p.find::<u64, u64>("double").unwrap().reroute().to(&store).to(&audit);
    /// let report = p.run().unwrap();
    /// assert_eq!(report.stage("audit").unwrap().items_in, 4);
    /// assert_eq!(report.stage("store").unwrap().items_in, 4);
    /// ```
    pub fn reroute(&self) -> Self {
        let me = self.id;
        let mut d = self.def.borrow_mut();
        if self.sub {
            d.subs[me].to.clear();
            d.subs[me].rerouted = true;
        } else {
            d.stages[me].to.clear();
            d.stages[me].rerouted = true;
        }
        let name = if self.sub {
            d.subs[me].name.clone()
        } else {
            d.stages[me].name.clone()
        };
        let points_here = |r: &Ref| match r {
            Ref::Id(i) => !self.sub && *i == me,
            Ref::Sub(g) => self.sub && *g == me,
            Ref::Name(n) => *n == name || name.ends_with(&format!("/{n}")),
            Ref::Foreign(_) => false,
        };
        for s in &mut d.stages {
            s.from.retain(|r| !points_here(r));
        }
        for g in &mut d.subs {
            g.from.retain(|r| !points_here(r));
        }
        drop(d);
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
        if self.sub {
            self.def.borrow_mut().subs[self.id].exec = Some(exec);
        } else {
            self.with(|s| s.exec = Some(ExecChoice::Exec(exec)));
        }
        self.this()
    }

    /// Per-item time limit of this stage's fork executor (set the executor first).
    pub fn timeout(&self, limit: Duration) -> Self {
        let bad = self.with(|s| match &mut s.exec {
            Some(ExecChoice::Exec(e)) if e.is_fork() => {
                *e = e.clone().timeout(limit);
                false
            }
            _ => true,
        });
        if bad {
            let name = self.name();
            let m = "timeout needs a fork executor set on the stage first".to_string();
            self.def.borrow_mut().misuse.push((name, m));
        }
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

impl<O> StageRef<(), O> {
    /// For a producer: declares how many items it will emit, so progress views can show a
    /// percentage and the time left.
    pub fn total(&self, items: u64) -> Self {
        self.with(|s| s.declared_total = Some(items));
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
                if n.wire.is_none() {
                    n.wire = Some(WireFns::outputs::<Postcard>());
                }
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
                if !n.codec_chosen {
                    n.wire = Some(WireFns::both::<Postcard>());
                }
            }
        });
        self.this()
    }

    /// Items of this stage cross the process boundary through the codec `C` instead of
    /// postcard (see [`Codec`]). Also declares the stage serialisable, like
    /// [`StageRef::wire`].
    ///
    /// ```
    /// # use minigun::{Codec, Pipeline};
    /// # use serde::{de::DeserializeOwned, Serialize};
    /// # struct Json;
    /// # impl Codec for Json {
    /// #     fn encode<T: Serialize + ?Sized>(v: &T, out: &mut Vec<u8>) -> Result<(), String> {
    /// #         serde_json::to_writer(out, v).map_err(|e| e.to_string())
    /// #     }
    /// #     fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, String> {
    /// #         serde_json::from_slice(b).map_err(|e| e.to_string())
    /// #     }
    /// # }
    /// let p = Pipeline::new("json-over-pipes");
    /// p.producer("gen", |out| out.emit_all(0..3u64).map_err(Into::into));
    /// p.map("double", |x: u64| Ok(x * 2)).codec::<Json>().ipc_fork(2);
    /// p.consumer("sink", |_: u64| Ok(()));
    /// assert_eq!(p.run().unwrap().stage("double").unwrap().items_out, 3);
    /// ```
    pub fn codec<C: Codec>(&self) -> Self {
        self.wire();
        self.with(|s| {
            if let Some(n) = s.node.as_any().downcast_mut::<ProcessorNode<I, O>>() {
                n.wire = Some(WireFns::both::<C>());
                n.codec_chosen = true;
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

/// A stage's fork hooks in order: pipeline, enclosing sub-pipelines (outermost first), stage.
fn fork_hooks(
    def: &Def,
    sub: Option<usize>,
    of: impl Fn(&SubDef) -> &Vec<ForkHook>,
    pipeline: &[ForkHook],
    stage: &[ForkHook],
) -> Vec<ForkHook> {
    let mut chain = Vec::new();
    let mut g = sub;
    while let Some(x) = g {
        chain.push(x);
        g = def.subs[x].parent;
    }
    let subs = chain.iter().rev().flat_map(|&x| of(&def.subs[x]).iter());
    pipeline.iter().chain(subs).chain(stage).cloned().collect()
}

/// Resolves a reference to a stage or a sub-pipeline. Names match a qualified name
/// (`sub/stage`) exactly, or else a unique last part.
fn resolve(def: &Def, stage: &str, r: &Ref) -> Result<Port, DefinitionError> {
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

fn build(mut def: Def) -> Result<Runnable, DefinitionError> {
    if let Some((stage, message)) = def.misuse.first() {
        return Err(DefinitionError::InvalidConfig {
            stage: stage.clone(),
            message: message.clone(),
        });
    }
    let names: Vec<String> = def.stages.iter().map(|s| s.name.clone()).collect();
    let n = names.len();
    let stage_only = |stage: &str, p: Port, what: &str| match p {
        Port::Stage(i) => Ok(i),
        Port::Sub(g) => Err(DefinitionError::InvalidConfig {
            stage: stage.to_string(),
            message: format!(
                "{what} {:?} is a sub-pipeline: name a stage inside it",
                def.subs[g].name
            ),
        }),
    };
    let mut dead_edges: Vec<(usize, usize)> = Vec::new();
    let mut route_edges: Vec<(usize, usize, usize)> = Vec::new();
    let mut declared = Declared {
        names: names.clone(),
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
            link(resolve(&def, &s.name, r)?, Port::Stage(v), &mut declared);
        }
        for r in &s.to {
            link(Port::Stage(v), resolve(&def, &s.name, r)?, &mut declared);
        }
        if let Some(r) = &s.dead_letter {
            let t = stage_only(&s.name, resolve(&def, &s.name, r)?, "dead-letter target")?;
            dead_edges.push((v, t));
        }
        for (k, (r, _)) in s.routes.iter().enumerate() {
            let t = stage_only(&s.name, resolve(&def, &s.name, r)?, "route target")?;
            route_edges.push((v, t, k));
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
            link(resolve(&def, &sub.name, r)?, Port::Sub(g), &mut declared);
        }
        for r in &sub.to {
            link(Port::Sub(g), resolve(&def, &sub.name, r)?, &mut declared);
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
    // A sub-pipeline's entries take its input type, its exits emit its output type.
    for (g, sub) in def.subs.iter().enumerate() {
        for &e in &wired.subs[g].entries {
            let st = &def.stages[e];
            node::check_edge((&sub.name, Some(sub.input)), (&st.name, st.node.input()))?;
        }
        for &x in &wired.subs[g].exits {
            let st = &def.stages[x];
            node::check_edge((&st.name, st.node.output()), (&sub.name, Some(sub.output)))?;
        }
    }
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
            None => {
                // The innermost of: the nearest enclosing sub-pipeline with a default
                // executor, and the execution block (which is inside that sub-pipeline if it
                // was opened there or deeper); then the pipeline default.
                let mut chain = Vec::new();
                let mut g = s.sub;
                while let Some(x) = g {
                    chain.push(x);
                    g = def.subs[x].parent;
                }
                let sub_at = chain.iter().position(|&x| def.subs[x].exec.is_some());
                let block_at = s.group.as_ref().map(|(_, scope)| {
                    scope
                        .and_then(|x| chain.iter().position(|&c| c == x))
                        .unwrap_or(chain.len())
                });
                match (sub_at, block_at) {
                    (Some(si), Some(bi)) if bi <= si => s.group.as_ref().map(|(e, _)| e.clone()),
                    (Some(si), _) => def.subs[chain[si]].exec.clone(),
                    (None, Some(_)) => s.group.as_ref().map(|(e, _)| e.clone()),
                    (None, None) => None,
                }
                .unwrap_or_else(|| def.default_exec.clone())
            }
        };
        if let Exec::CowFork(o) | Exec::IpcFork(o) = &exec {
            if o.max_frame < 4096 {
                return Err(DefinitionError::InvalidConfig {
                    stage: s.name.clone(),
                    message: format!(
                        "max_frame {} is below the minimum of 4096 bytes",
                        o.max_frame
                    ),
                });
            }
        }
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

    let run = Arc::new(RunShared::new(def.no_signals));
    let stats: Vec<Arc<StageStats>> = (0..n).map(|_| Arc::new(StageStats::default())).collect();
    for (v, s) in def.stages.iter().enumerate() {
        if let Some(total) = s.declared_total {
            let _ = stats[v].declared_total.set(total);
        }
    }
    let mut makers = Vec::with_capacity(n);
    let mut closers: Vec<Option<crate::loops::Closer>> = Vec::with_capacity(n);
    let mut inputs = Vec::with_capacity(n);
    let mut capacities = Vec::with_capacity(n);
    for (v, s) in def.stages.iter().enumerate() {
        // A routing loop's members feed each other: with bounded queues a member could block
        // on its own full queue for ever. Their queues are unbounded (the loop's work counter,
        // not a capacity, bounds what is in it).
        let in_loop = wired.loops.iter().any(|m| m.contains(&v));
        let cap = if in_loop {
            Capacity::Unbounded
        } else {
            s.capacity.unwrap_or(def.default_capacity)
        };
        match s.node.make_queue(cap, stats[v].clone()) {
            Some((maker, rx, closer)) => {
                makers.push(Some(maker));
                inputs.push(Some(rx));
                capacities.push(Some(cap));
                closers.push(Some(closer));
            }
            None => {
                closers.push(None);
                makers.push(None);
                inputs.push(None);
                capacities.push(None);
            }
        }
    }
    // Routing loops: one work counter each; every sender made below from outside a loop into
    // it holds one unit (taken when it is made).
    let mut loop_of: Vec<Option<Arc<Loop>>> = (0..n).map(|_| None).collect();
    let mut loops = Vec::new();
    for members in &wired.loops {
        let lp = Loop::new();
        for &m in members {
            loop_of[m] = Some(lp.clone());
            if let Some(close) = closers[m].take() {
                lp.member(close);
            }
        }
        loops.push(lp);
    }
    let membership = |u: usize, v: usize| match &loop_of[v] {
        None => Membership::default(),
        Some(lp) => Membership {
            lp: Some(lp.clone()),
            unit: match &loop_of[u] {
                Some(own) if Arc::ptr_eq(own, lp) => None,
                _ => Some(Arc::new(Unit::new(lp.clone()))),
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
    // A loop nothing can enter is finished before it starts.
    for lp in &loops {
        lp.close_if_idle();
    }

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
            before_fork: fork_hooks(
                &def,
                s.sub,
                |g| &g.before_fork,
                &def.before_fork,
                &s.hooks.before_fork,
            ),
            after_fork: fork_hooks(
                &def,
                s.sub,
                |g| &g.after_fork,
                &def.after_fork,
                &s.hooks.after_fork,
            ),
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
    for &v in &wired.order {
        planned.push(slots[v].take().expect("each stage planned once"));
    }
    // Edges for live views, as positions in the planned (topological) order.
    let mut pos = vec![0; n];
    for (k, &v) in wired.order.iter().enumerate() {
        pos[v] = k;
    }
    let mut view_edges: Vec<(usize, usize)> = Vec::new();
    for &(u, v) in wired.edges.iter().chain(&declared.side) {
        if !view_edges.contains(&(pos[u], pos[v])) {
            view_edges.push((pos[u], pos[v]));
        }
    }
    Ok(Runnable::new(
        def.name,
        planned,
        run,
        def.before_run,
        def.after_run,
        view_edges,
    ))
}
