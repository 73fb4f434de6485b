//! Typed stage definitions (nodes) and the tasks they become when wired.
//!
//! The builder keeps each stage as a `Box<dyn Node>` so that forward references by name can
//! be resolved later; `build()` checks every edge's types by `TypeId`, then hands each node
//! its typed queue ends (as `Box<dyn Any>`, downcast here, where the types are known again).

use crate::error::{DefinitionError, StageResult};
use crate::exec::{local, ForkOptions};
use crate::graph::StageKind;
use crate::hooks::ForkHook;
use crate::loops::Closer;
use crate::policy::StageCtx;
use crate::queue::Receiver;
use crate::queue::{self, Capacity, FanOut, QueueTx};
use crate::route::Router;
use crate::stage::{guarded, Factory, Failed, Item, Output, TypeInfo};
use crate::stats::StageStats;
use crate::Exec;
use std::any::Any;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(crate) type AnyBox = Box<dyn Any + Send>;
/// Makes one more sender (a `QueueTx<I>`) into a stage's queue.
pub(crate) type TxMaker = Box<dyn Fn(crate::loops::Membership) -> AnyBox + Send>;

/// A stage's new input queue: a maker of senders (one per upstream edge), the receiver (as
/// `Box<Receiver<I>>`) and a handle that closes the queue (for routing loops).
pub(crate) type QueueEnds = (TxMaker, AnyBox, Closer);

/// The typed ends a node receives when the graph is wired.
pub(crate) struct Wiring {
    pub(crate) ctx: Arc<StageCtx>,
    pub(crate) input: Option<AnyBox>,
    pub(crate) outputs: Vec<AnyBox>,
    pub(crate) fanout: FanOut,
    pub(crate) dead_letter: Option<AnyBox>,
    pub(crate) before_fork: Vec<ForkHook>,
    pub(crate) after_fork: Vec<ForkHook>,
    pub(crate) routes: crate::route::Routes,
}

/// A running stage: `prepare` runs for every stage, in order, on the run's thread before any
/// stage thread exists (ipc_fork pre-forks its workers there); `run` runs on the stage's
/// driver thread; `abandon` replaces `run` when the stage could not start.
pub(crate) trait Task: Send {
    fn prepare(&mut self) -> Result<(), String> {
        Ok(())
    }
    fn run(self: Box<Self>);
    fn abandon(self: Box<Self>);
}

/// A stage definition with its types.
pub(crate) trait Node: Send {
    fn kind(&self) -> StageKind;
    fn input(&self) -> Option<TypeInfo>;
    fn output(&self) -> Option<TypeInfo>;
    /// The item type a dead-letter stage of this stage must take.
    fn failed_type(&self) -> Option<TypeInfo>;
    /// Whether the node can run under this executor (fork executors need serde).
    fn supports(&self, exec: &Exec) -> bool;
    fn make_queue(&self, cap: Capacity, stats: Arc<StageStats>) -> Option<QueueEnds>;
    /// Checks the node's own settings.
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }
    fn into_task(self: Box<Self>, w: Wiring) -> Box<dyn Task>;
    fn as_any(&mut self) -> &mut dyn Any;
}

fn take<T: 'static>(b: AnyBox) -> T {
    *b.downcast::<T>()
        .expect("edge types were checked by build()")
}

fn router<O: Item>(w: &mut Wiring) -> Router<O> {
    let outs = std::mem::take(&mut w.outputs)
        .into_iter()
        .map(take::<QueueTx<O>>)
        .collect();
    let mut router = Router::new(outs, w.fanout, w.ctx.stats.clone());
    router.routes = std::mem::take(&mut w.routes);
    router
}

fn queue_for<I: Item>(cap: Capacity, stats: Arc<StageStats>) -> Option<QueueEnds> {
    let (tx, rx) = queue::channel::<I>(cap, stats.clone());
    // The probe reads the length without holding a receiver (which would keep senders going).
    let len = rx.len_probe();
    *stats.queue_len.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(len));
    let closer = rx.closer();
    Some((
        Box::new(move |m| Box::new(QueueTx::new(tx.clone(), m))),
        Box::new(rx),
        closer,
    ))
}

// ---------------------------------------------------------------------------------------------
// Producer

pub(crate) type ProducerFn<O> = Box<dyn FnOnce(&mut Output<'_, O>) -> StageResult + Send>;

pub(crate) struct ProducerNode<O> {
    pub(crate) f: ProducerFn<O>,
}

impl<O: Item> Node for ProducerNode<O> {
    fn kind(&self) -> StageKind {
        StageKind::Producer
    }
    fn input(&self) -> Option<TypeInfo> {
        None
    }
    fn output(&self) -> Option<TypeInfo> {
        Some(TypeInfo::of::<O>())
    }
    fn failed_type(&self) -> Option<TypeInfo> {
        None
    }
    fn supports(&self, _: &Exec) -> bool {
        true
    }
    fn make_queue(&self, _: Capacity, _: Arc<StageStats>) -> Option<QueueEnds> {
        None
    }
    fn into_task(self: Box<Self>, mut w: Wiring) -> Box<dyn Task> {
        let router = router::<O>(&mut w).stop_on(w.ctx.run.stop.clone());
        Box::new(ProducerTask {
            f: self.f,
            router,
            ctx: w.ctx,
        })
    }
    fn as_any(&mut self) -> &mut dyn Any {
        self
    }
}

struct ProducerTask<O> {
    f: ProducerFn<O>,
    router: Router<O>,
    ctx: Arc<StageCtx>,
}

impl<O: Item> Task for ProducerTask<O> {
    fn run(mut self: Box<Self>) {
        let t0 = Instant::now();
        let f = self.f;
        let r = guarded(|| f(&mut Output::new(&mut self.router)));
        self.ctx
            .stats
            .busy_ns
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        match r {
            Err(c) if !c.stop => {
                self.ctx.stage_error(c.kind, c.message, None);
            }
            _ => {}
        }
    }
    fn abandon(self: Box<Self>) {}
}

// ---------------------------------------------------------------------------------------------
// Processor, consumer, custom stage

/// Runs a processor under a fork executor; set by the serde-bounded builder methods.
pub(crate) type ForkRunner<I, O> = fn(local::Parts<I, O>, ForkOptions, ForkHooks) -> PreparedRun;

/// Fork hooks of one stage: pipeline-level first, then the stage's own.
#[derive(Clone, Default)]
pub(crate) struct ForkHooks {
    pub(crate) before_fork: Vec<ForkHook>,
    pub(crate) after_fork: Vec<ForkHook>,
}

/// What a fork executor's preparation leaves to run on the stage's thread.
pub(crate) type PreparedRun = Box<dyn FnOnce() + Send>;

pub(crate) struct ProcessorNode<I, O> {
    pub(crate) kind: StageKind,
    pub(crate) factory: Factory<I, O>,
    pub(crate) cow: Option<ForkRunner<I, O>>,
    pub(crate) ipc: Option<ForkRunner<I, O>>,
    pub(crate) wire: Option<crate::ipc::protocol::WireFns<I, O>>,
    /// The codec was chosen with `StageRef::codec` (not the default).
    pub(crate) codec_chosen: bool,
}

impl<I: Item, O: Item> Node for ProcessorNode<I, O> {
    fn kind(&self) -> StageKind {
        self.kind
    }
    fn input(&self) -> Option<TypeInfo> {
        Some(TypeInfo::of::<I>())
    }
    fn output(&self) -> Option<TypeInfo> {
        Some(TypeInfo::of::<O>())
    }
    fn failed_type(&self) -> Option<TypeInfo> {
        Some(TypeInfo::of::<Failed<I>>())
    }
    fn supports(&self, exec: &Exec) -> bool {
        match exec {
            Exec::CowFork(_) => self.cow.is_some(),
            Exec::IpcFork(_) => self.ipc.is_some(),
            _ => true,
        }
    }
    fn make_queue(&self, cap: Capacity, stats: Arc<StageStats>) -> Option<QueueEnds> {
        queue_for::<I>(cap, stats)
    }
    fn into_task(self: Box<Self>, mut w: Wiring) -> Box<dyn Task> {
        let parts = local::Parts {
            router: router::<O>(&mut w),
            input: take::<Receiver<I>>(w.input.take().expect("processor has an input")),
            dead_letter: w.dead_letter.take().map(take::<QueueTx<Failed<I>>>),
            factory: self.factory,
            ctx: w.ctx,
            wire: self.wire,
        };
        let hooks = ForkHooks {
            before_fork: w.before_fork,
            after_fork: w.after_fork,
        };
        Box::new(ProcessorTask {
            input: parts.input.clone(),
            ctx: parts.ctx.clone(),
            parts: Some(parts),
            cow: self.cow,
            ipc: self.ipc,
            hooks,
            prepared: None,
        })
    }
    fn as_any(&mut self) -> &mut dyn Any {
        self
    }
}

struct ProcessorTask<I, O> {
    /// The stage's queue and context, kept here too so that `abandon` can account for the
    /// queued items whatever the executor took with it.
    input: Receiver<I>,
    ctx: Arc<StageCtx>,
    parts: Option<local::Parts<I, O>>,
    cow: Option<ForkRunner<I, O>>,
    ipc: Option<ForkRunner<I, O>>,
    hooks: ForkHooks,
    prepared: Option<PreparedRun>,
}

impl<I: Item, O: Item> Task for ProcessorTask<I, O> {
    fn prepare(&mut self) -> Result<(), String> {
        // Persistent workers are forked now, before any stage thread exists.
        let parts = self.parts.take().expect("prepared once");
        match (parts.ctx.exec.clone(), self.ipc) {
            (Exec::IpcFork(opts), Some(start)) => {
                self.prepared = Some(start(parts, opts, self.hooks.clone()));
            }
            _ => self.parts = Some(parts),
        }
        Ok(())
    }
    fn run(self: Box<Self>) {
        if let Some(run) = self.prepared {
            return run();
        }
        let parts = self.parts.expect("parts present until run");
        match (parts.ctx.exec.clone(), self.cow) {
            (Exec::Threads(n), _) => local::run(parts, n.max(1)),
            (Exec::CowFork(opts), Some(start)) => start(parts, opts, self.hooks)(),
            _ => local::run(parts, 1),
        }
    }
    fn abandon(self: Box<Self>) {
        let ProcessorTask {
            input,
            ctx,
            parts,
            prepared,
            ..
        } = *self;
        // A prepared fork pool terminates and reaps its workers when dropped.
        drop((parts, prepared));
        local::drain(&ctx, &input);
    }
}

// ---------------------------------------------------------------------------------------------
// Accumulator

pub(crate) struct AccumulatorNode<I> {
    pub(crate) size: usize,
    pub(crate) max_wait: Option<Duration>,
    pub(crate) _t: std::marker::PhantomData<fn(I)>,
}

impl<I: Item> Node for AccumulatorNode<I> {
    fn kind(&self) -> StageKind {
        StageKind::Accumulator
    }
    fn input(&self) -> Option<TypeInfo> {
        Some(TypeInfo::of::<I>())
    }
    fn output(&self) -> Option<TypeInfo> {
        Some(TypeInfo::of::<Vec<I>>())
    }
    fn failed_type(&self) -> Option<TypeInfo> {
        None
    }
    fn validate(&self) -> Result<(), String> {
        match self.size {
            0 => Err("an accumulator's batch size must be at least 1".into()),
            _ => Ok(()),
        }
    }
    fn supports(&self, _: &Exec) -> bool {
        // Batching is bookkeeping in the driver: identical under every executor.
        true
    }
    fn make_queue(&self, cap: Capacity, stats: Arc<StageStats>) -> Option<QueueEnds> {
        queue_for::<I>(cap, stats)
    }
    fn into_task(self: Box<Self>, mut w: Wiring) -> Box<dyn Task> {
        Box::new(AccumulatorTask {
            size: self.size.max(1),
            max_wait: self.max_wait,
            router: router::<Vec<I>>(&mut w),
            input: take::<Receiver<I>>(w.input.take().expect("accumulator has an input")),
            ctx: w.ctx,
        })
    }
    fn as_any(&mut self) -> &mut dyn Any {
        self
    }
}

struct AccumulatorTask<I> {
    size: usize,
    max_wait: Option<Duration>,
    router: Router<Vec<I>>,
    input: Receiver<I>,
    ctx: Arc<StageCtx>,
}

impl<I: Item> AccumulatorTask<I> {
    fn flush(&self, batch: &mut Vec<I>) {
        if batch.is_empty() {
            return;
        }
        let n = batch.len() as u64;
        let full = std::mem::replace(batch, Vec::with_capacity(self.size));
        // Sent before the items count as done: inside a routing loop, releasing their units
        // first could close the loop with the batch still to be queued.
        if self.router.route(full).is_err() {
            self.ctx.stats.cancelled.fetch_add(n, Ordering::Relaxed);
        }
        self.ctx.items_done(n);
    }
}

impl<I: Item> Task for AccumulatorTask<I> {
    fn run(self: Box<Self>) {
        let mut batch: Vec<I> = Vec::with_capacity(self.size);
        let mut ready = VecDeque::new();
        // The time limit counts from the first item of a batch.
        let mut deadline: Option<Instant> = None;
        loop {
            let more = match deadline {
                Some(d) => self.input.recv_into_until(&mut ready, d),
                None => Some(self.ctx.recv_into(&self.input, &mut ready, 1)),
            };
            match more {
                Some(true) => {
                    if self.ctx.run.aborting() {
                        self.ctx.received_cancelled(ready.len() as u64);
                        ready.clear();
                        continue;
                    }
                    let n = ready.len() as u64;
                    self.ctx.stats.items_in.fetch_add(n, Ordering::Relaxed);
                    for item in ready.drain(..) {
                        if batch.is_empty() {
                            deadline = self.max_wait.map(|w| Instant::now() + w);
                        }
                        batch.push(item);
                        if batch.len() >= self.size {
                            self.flush(&mut batch);
                            deadline = None;
                        }
                    }
                    // A steady trickle of items never times the wait out: check here too.
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        self.flush(&mut batch);
                        deadline = None;
                    }
                }
                None => {
                    self.flush(&mut batch);
                    deadline = None;
                }
                Some(false) => break,
            }
        }
        if self.ctx.run.aborting() {
            self.ctx.cancelled(batch.len() as u64);
        } else {
            self.flush(&mut batch);
        }
    }
    fn abandon(self: Box<Self>) {
        local::drain(&self.ctx, &self.input);
    }
}

/// Checks a wiring's edge types; returns the first mismatch.
pub(crate) fn check_edge(
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
