//! Typed stage definitions (nodes) and the tasks they become when the pipeline is linked.
//!
//! The definition keeps each stage as a `Box<dyn Node>` so that references by name can be
//! resolved later; the linker checks every edge's types by `TypeId`, then hands each node its
//! [`Wiring`]: its typed queue ends and senders as [`Erased`] values, taken back here, where
//! the types are known again. One module per kind of stage: [`producer`], [`processor`]
//! (processors, consumers and custom stages, under any executor), `async_processor` (their
//! async counterparts, under `tasks(n)`) and [`accumulator`].

pub(crate) mod accumulator;
#[cfg(feature = "async")]
pub(crate) mod async_processor;
pub(crate) mod processor;
pub(crate) mod producer;

use crate::ctx::StageCtx;
use crate::erased::{take, Erased};
use crate::exec::runner::ForkHooks;
use crate::loops::{Closer, Membership};
use crate::policy::OnError;
use crate::queue::{self, Capacity, FanOut, QueueTx};
use crate::remote::worker::Served;
use crate::remote::Remote;
use crate::route::{MakeLink, Router, Routes};
use crate::stage::{Item, StageKind, TypeInfo};
use crate::stats::StageStats;
use std::sync::Arc;
use std::time::Duration;

/// Makes one more sender (a `QueueTx<I>`) into a stage's queue.
pub(crate) type TxMaker = Box<dyn Fn(Membership) -> Erased + Send>;

/// A stage's new input queue: a maker of senders (one per upstream edge), the receiver (as
/// `Box<Receiver<I>>`) and a handle that closes the queue (for routing loops).
pub(crate) type QueueEnds = (TxMaker, Erased, Closer);

/// What a node receives when the graph is linked.
pub(crate) struct Wiring {
    pub(crate) ctx: Arc<StageCtx>,
    pub(crate) input: Option<Erased>,
    pub(crate) outputs: Vec<Erased>,
    pub(crate) fanout: FanOut,
    pub(crate) dead_letter: Option<Erased>,
    pub(crate) routes: Routes,
    pub(crate) hooks: ForkHooks,
    /// What the stage's types cross, as its handle recorded it (a `Crossing<I, O>`).
    pub(crate) crossing: Option<Erased>,
    /// An accumulator's time limit for a partial batch.
    pub(crate) max_wait: Option<Duration>,
    /// A processor under `threads(n)` emits in input order (its results are collected in
    /// input order).
    pub(crate) in_order: bool,
    /// The stage chained to this one (a `MakeLink<O>`, see `link::chain`): its only output.
    pub(crate) chain: Option<Erased>,
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
    fn make_queue(&self, cap: Capacity, stats: Arc<StageStats>) -> Option<QueueEnds>;
    /// The stage's code returns futures: it runs under `tasks(n)` only.
    fn is_async(&self) -> bool {
        false
    }
    /// Checks the node's own settings (`stage`: its name, for the error).
    fn validate(&self, _stage: &str) -> Result<(), crate::error::DefinitionError> {
        Ok(())
    }
    fn into_task(self: Box<Self>, w: Wiring) -> Box<dyn Task>;
    /// The stage chained to its upstream: what the upstream's router calls instead of
    /// sending to a queue (a `MakeLink<I>`). Only processors chain (see `link::chain`).
    fn into_link(self: Box<Self>, _w: Wiring) -> Option<Erased> {
        None
    }
    /// The worker side of a remote stage (processors whose types cross a process only).
    fn into_served(self: Box<Self>, _w: ServeWiring) -> Option<Box<dyn Served>> {
        None
    }
}

/// What a remote stage's node receives when a worker links the definition.
pub(crate) struct ServeWiring {
    pub(crate) pipeline: String,
    pub(crate) name: String,
    pub(crate) remote: Remote,
    pub(crate) policy: OnError,
    pub(crate) hooks: ForkHooks,
    /// The stage's `Crossing<I, O>`.
    pub(crate) crossing: Option<Erased>,
}

/// The stage's router: its downstream queues, fan-out rule and declared routes.
fn router<O: Item>(w: &mut Wiring) -> Router<O> {
    let outs = std::mem::take(&mut w.outputs)
        .into_iter()
        .map(take::<QueueTx<O>>)
        .collect();
    let mut router = Router::new(outs, w.fanout, w.ctx.stats.clone());
    router.routes = std::mem::take(&mut w.routes);
    match w.chain.take() {
        Some(link) => router.chained(take::<MakeLink<O>>(link)),
        None => router,
    }
}

/// What a chained stage's place in the run is: no queue, no thread, nothing to run (its
/// upstream's workers run it, see `link::chain`); its hooks run on its chain's thread.
pub(crate) struct ChainedTask;

impl Task for ChainedTask {
    fn run(self: Box<Self>) {}
    fn abandon(self: Box<Self>) {}
}

/// A new input queue of items `I`.
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
