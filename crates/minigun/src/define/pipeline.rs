//! [`Pipeline`]: the definition's root handle. It names the pipeline, holds its settings and
//! hooks, opens execution blocks and sub-pipelines, and adds stages (each returns a typed
//! [`StageRef`]).

use super::record::{Def, StageDef, SubDef};
use super::StageRef;
use crate::error::RunError;
use crate::error::{DefinitionError, StageResult};
use crate::exec::Exec;
use crate::hooks::StageHooks;
use crate::node::accumulator::AccumulatorNode;
use crate::node::processor::ProcessorNode;
use crate::node::producer::ProducerNode;
use crate::node::Node;
use crate::policy::OnError;
use crate::queue::{Capacity, FanOut};
use crate::report::RunReport;
use crate::run::{RunHandle, Runnable};
use crate::stage::{Factory, FnStage, Item, Output, Stage, StageKind, TypeInfo};
use std::cell::RefCell;
use std::marker::PhantomData;
use std::rc::Rc;
use std::sync::Arc;

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
    pub(super) def: Rc<RefCell<Def>>,
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

    /// How many failures the run report keeps in full, in the order they happened (default
    /// [`KEEP_FAILURES`](crate::KEEP_FAILURES), 100). Every failure is counted
    /// ([`RunReport::failures_total`](crate::RunReport::failures_total)), and the report says
    /// how many it left out ([`RunReport::failures_left_out`](crate::RunReport::failures_left_out)).
    ///
    /// ```
    /// use minigun::Pipeline;
    /// let p = Pipeline::new("picky");
    /// p.producer("gen", |out| out.emit_all(0..10u64).map_err(Into::into));
    /// p.consumer("sink", |x: u64| if x % 2 == 0 { Err("even".into()) } else { Ok(()) });
    /// p.keep_failures(2);
    /// let report = p.run().unwrap();
    /// assert_eq!((report.failures.len(), report.failures_total, report.failures_left_out), (2, 5, 3));
    /// ```
    pub fn keep_failures(&self, n: usize) -> &Self {
        self.def.borrow_mut().keep_failures = Some(n);
        self
    }

    /// Whether consecutive in-process stages may run chained: a stage whose only input is
    /// its upstream's only output, on the same number of threads (both `inline`, or both
    /// `threads(n)`), then runs on its upstream's threads with no queue between them (the
    /// rule is in the `link::chain` module docs; per-stage statistics, error policies and
    /// hooks keep their meaning). Default: on. Off for every pipeline of the process when
    /// the environment variable `MINIGUN_NO_CHAIN` is set; off for one stage with
    /// [`StageRef::chain`](crate::StageRef::chain). The report says which stages ran
    /// chained ([`StageReport::chained_to`](crate::StageReport::chained_to)).
    ///
    /// ```
    /// use minigun::Pipeline;
    /// let p = Pipeline::new("apart");
    /// p.producer("gen", |out| out.emit_all(0..10u64).map_err(Into::into));
    /// p.map("inc", |x: u64| Ok(x + 1));
    /// p.consumer("sink", |_: u64| Ok(()));
    /// p.chaining(false);
    /// let report = p.run().unwrap();
    /// assert_eq!(report.stage("sink").unwrap().chained_to, None);
    /// ```
    pub fn chaining(&self, on: bool) -> &Self {
        self.def.borrow_mut().no_chaining = !on;
        self
    }

    /// Whether fork stages put the parent's heap into transparent huge pages before they
    /// first fork, for every fork stage without its own setting
    /// ([`Exec::huge_pages`](crate::Exec::huge_pages)). Default:
    /// [`HugePages::COW_DEFAULT`](crate::HugePages::COW_DEFAULT) for `cow_fork`,
    /// [`HugePages::IPC_DEFAULT`](crate::HugePages::IPC_DEFAULT) for `ipc_fork`. It happens
    /// once per run; the report says what it did ([`RunReport::huge_pages`](crate::RunReport::huge_pages)).
    pub fn huge_pages(&self, setting: crate::HugePages) -> &Self {
        self.def.borrow_mut().huge_pages = Some(setting);
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

    pub(super) fn add<I, O>(&self, name: String, node: Box<dyn Node>) -> StageRef<I, O> {
        let mut d = self.def.borrow_mut();
        let group = d.group.last().cloned();
        let name = self.qualify(&d, name);
        d.stages.push(StageDef {
            sub: self.scope,
            entry: false,
            rerouted: false,
            declared_total: None,
            no_chain: false,
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
            max_wait: None,
            crossing: None,
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
        crate::link::build(self.take_def())
    }

    /// The pipeline's name.
    pub fn name(&self) -> String {
        self.def.borrow().name.clone()
    }

    /// Takes the definition records out of the handles.
    pub(crate) fn take_def(self) -> Def {
        std::mem::take(&mut *self.def.borrow_mut())
    }

    /// Builds and runs the pipeline, blocking until it ends.
    pub fn run(self) -> Result<RunReport, RunError> {
        self.build()?.run()
    }

    /// Builds the pipeline and runs it on a background thread.
    pub fn spawn(self) -> Result<RunHandle, DefinitionError> {
        Ok(self.build()?.spawn())
    }
}

fn processor_node<I: Item, O: Item>(kind: StageKind, factory: Factory<I, O>) -> Box<dyn Node> {
    Box::new(ProcessorNode {
        kind,
        factory,
        _t: PhantomData,
    })
}
