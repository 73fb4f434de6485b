//! [`StageRef`]: a typed handle to one stage (or sub-pipeline) of a definition, for wiring it
//! and setting it. Settings that need the stage's types to cross a process (`cow_fork`,
//! `ipc_fork`, `wire`, `wire_output`, `codec`) exist only where the serde bounds hold, and
//! record the stage's [`Crossing`] for the planner; `cow_fork` and `ipc_fork` return a
//! [`ForkRef`] for their options.

use super::fork_ref::{CowFork, ForkRef, IpcFork};
use super::record::{CrossingRecord, Def, ExecChoice, Ref, StageDef};
use crate::error::{DefinitionError, StageResult};
use crate::exec::runner::{Crosses, Crossing};
use crate::exec::Exec;
use crate::ipc::codec::{Codec, Postcard};
use crate::policy::{Final, OnError};
use crate::queue::{Capacity, FanOut};
use crate::remote::Remote;
use crate::route::{self, RouteCodec, RouteDecl};
use crate::stage::{Failed, Item, TypeInfo, Wire};
use std::cell::RefCell;
use std::marker::PhantomData;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

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
    pub(super) id: usize,
    /// The handle names a sub-pipeline (`id` indexes the sub-pipelines), not a stage.
    pub(super) sub: bool,
    pub(super) def: Rc<RefCell<Def>>,
    pub(super) _t: PhantomData<fn(I) -> O>,
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

impl<I, O> StageRef<I, O> {
    /// Applies the stage setting named `setting`; on a sub-pipeline handle it is recorded as
    /// a misuse that `build()` reports.
    pub(super) fn with<R: Default>(
        &self,
        setting: &'static str,
        f: impl FnOnce(&mut StageDef) -> R,
    ) -> R {
        let mut d = self.def.borrow_mut();
        if self.sub {
            let sub = d.subs[self.id].name.clone();
            d.misuse
                .push(DefinitionError::SettingOnSubPipeline { sub, setting });
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
        self.with("entry", |s| s.entry = true);
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
        self.with("round_robin", |s| s.fanout = FanOut::RoundRobin);
        self.this()
    }

    /// With several downstreams: send every item to each of them (the default).
    pub fn broadcast(&self) -> Self {
        self.with("broadcast", |s| s.fanout = FanOut::Broadcast);
        self.this()
    }

    /// Runs this stage under `exec`. Fork executors need serde on the stage's types: use
    /// [`StageRef::cow_fork`] / [`StageRef::ipc_fork`] (which check the bounds at compile
    /// time and return a handle for the fork options), or declare the types first with
    /// [`StageRef::wire_output`] (cow_fork) or [`StageRef::wire`] (every executor); without
    /// that, `build()` fails with [`DefinitionError::NotSerialisable`]. Producers and
    /// accumulators take no executor of their own (they run on their thread): `build()` fails
    /// with [`DefinitionError::NotForThisKind`].
    pub fn executor(&self, exec: Exec) -> Self {
        if self.sub {
            self.def.borrow_mut().subs[self.id].exec = Some(exec);
        } else {
            self.with("executor", |s| s.exec = Some(ExecChoice::Exec(exec)));
        }
        self.this()
    }

    /// Runs this stage in the named execution context (see [`Pipeline::context`](crate::Pipeline::context)).
    pub fn context(&self, name: impl Into<String>) -> Self {
        let c = ExecChoice::Context(name.into());
        self.with("context", |s| s.exec = Some(c));
        self.this()
    }

    /// Whether this stage may be chained (default: yes, see
    /// [`Pipeline::chaining`](crate::Pipeline::chaining)): with `false` it keeps its own
    /// queue and threads, and no downstream is chained to it.
    pub fn chain(&self, on: bool) -> Self {
        self.with("chain", |s| s.no_chain = !on);
        self.this()
    }

    /// This stage's input queue capacity. A stage with a capacity of its own is never
    /// chained to its upstream (it keeps its queue).
    pub fn capacity(&self, cap: Capacity) -> Self {
        self.with("capacity", |s| s.capacity = Some(cap));
        self.this()
    }

    /// This stage's error policy.
    pub fn on_error(&self, policy: OnError) -> Self {
        self.with("on_error", |s| {
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
        self.with("dead_letter", |s| {
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
        self.with("a route", |s| s.routes.push((target, decl)));
        self.this()
    }

    /// Runs once on the stage's thread before it handles its first item.
    pub fn before(&self, hook: impl FnOnce() -> StageResult + Send + 'static) -> Self {
        self.with("a before hook", |s| s.hooks.before.push(Box::new(hook)));
        self.this()
    }

    /// Runs once after the stage handled its last item.
    pub fn after(&self, hook: impl FnOnce() -> StageResult + Send + 'static) -> Self {
        self.with("an after hook", |s| s.hooks.after.push(Box::new(hook)));
        self.this()
    }

    /// Runs in the parent before this fork stage first forks.
    pub fn before_fork(&self, hook: impl Fn() -> StageResult + Send + Sync + 'static) -> Self {
        self.with("a before_fork hook", |s| {
            s.hooks.before_fork.push(Arc::new(hook))
        });
        self.this()
    }

    /// Runs in each child of this fork stage (per item for cow_fork, per worker for ipc_fork).
    pub fn after_fork(&self, hook: impl Fn() -> StageResult + Send + Sync + 'static) -> Self {
        self.with("an after_fork hook", |s| {
            s.hooks.after_fork.push(Arc::new(hook))
        });
        self.this()
    }
}

impl<O> StageRef<(), O> {
    /// For a producer: declares how many items it will emit, so progress views can show a
    /// percentage and the time left.
    pub fn total(&self, items: u64) -> Self {
        self.with("total", |s| s.declared_total = Some(items));
        self.this()
    }
}

impl<I: Item> StageRef<I, Vec<I>> {
    /// For an accumulator: emit a partial batch once its first item has waited `wait`.
    pub fn max_wait(&self, wait: Duration) -> Self {
        self.with("max_wait", |s| s.max_wait = Some(wait));
        self.this()
    }
}

impl<I: Item, O: Wire> StageRef<I, O> {
    /// Declares that this stage's output can cross a process (its input need not), so that
    /// a cow_fork executor set with [`StageRef::executor`], a context, a block or a default
    /// can apply to it. [`StageRef::wire`] declares both types, for every executor.
    pub fn wire_output(&self) -> Self {
        self.with("wire_output", |s| {
            if s.crosses() == Crosses::Nothing {
                let c = Crossing::<I, O>::output::<Postcard>();
                s.crossing = Some(CrossingRecord::new(c, false));
            }
        });
        self.this()
    }

    /// Runs this stage in one forked child per item, at most `n` at once. The child reads the
    /// item through copy-on-write memory: only the output crosses the pipe, so only the
    /// output needs serde. What a fork costs against the parent's size, and when another
    /// executor is faster: [`Exec::cow_fork`](crate::Exec::cow_fork). Returns a handle for the cow_fork options (and, through `Deref`,
    /// everything a [`StageRef`] does):
    ///
    /// ```
    /// use minigun::Pipeline;
    /// use std::time::Duration;
    /// # #[derive(Clone)] struct Table(u64);
    /// let p = Pipeline::new("lookup");
    /// p.producer("keys", |out| out.emit_all((0..8u64).map(Table)).map_err(Into::into));
    /// // `Table` has no serde: it reaches the child through copy-on-write memory.
    /// p.map("look", |t: Table| Ok(t.0 * 2))
    ///     .cow_fork(4)
    ///     .timeout(Duration::from_secs(5))
    ///     .items_per_fork(2)
    ///     .ordered();
    /// p.consumer("store", |_: u64| Ok(()));
    /// assert_eq!(p.run().unwrap().stage("store").unwrap().items_in, 8);
    /// ```
    pub fn cow_fork(&self, n: usize) -> ForkRef<I, O, CowFork> {
        self.wire_output();
        self.executor(Exec::cow_fork(n));
        ForkRef::new(self.this())
    }
}

impl<I: Wire, O: Wire> StageRef<I, O> {
    /// Runs this stage on `n` persistent forked workers fed over pipes (input and output
    /// need serde). Returns a handle for the ipc_fork options (and, through `Deref`,
    /// everything a [`StageRef`] does):
    ///
    /// ```
    /// use minigun::{Dispatch, Pipeline};
    /// let p = Pipeline::new("score");
    /// p.producer("ids", |out| out.emit_all(0..100u64).map_err(Into::into));
    /// p.map("score", |x: u64| Ok(x + 1))
    ///     .ipc_fork(2)
    ///     .in_flight(16)
    ///     .dispatch(Dispatch::LeastLoaded);
    /// p.consumer("store", |_: u64| Ok(()));
    /// assert_eq!(p.run().unwrap().stage("store").unwrap().items_in, 100);
    /// ```
    pub fn ipc_fork(&self, n: usize) -> ForkRef<I, O, IpcFork> {
        self.wire();
        self.executor(Exec::ipc_fork(n));
        ForkRef::new(self.this())
    }

    /// Runs this stage on worker processes on any number of machines, fed through the
    /// broker of `remote` (see [`crate::remote`]).
    pub fn remote(&self, remote: Remote) -> Self {
        self.wire();
        self.executor(Exec::remote(remote))
    }

    /// Declares that this stage's items can cross a process, so a pipeline-wide, group or
    /// context fork executor can apply to it.
    pub fn wire(&self) -> Self {
        self.with("wire", |s| {
            if !s.crossing.as_ref().is_some_and(|c| c.codec_chosen) {
                let c = Crossing::<I, O>::both::<Postcard>();
                s.crossing = Some(CrossingRecord::new(c, false));
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
        self.with("codec", |s| {
            s.crossing = Some(CrossingRecord::new(Crossing::<I, O>::both::<C>(), true))
        });
        self.this()
    }
}
