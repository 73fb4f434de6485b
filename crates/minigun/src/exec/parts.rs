//! The parts of a running processor stage, whatever its executor: its context, input queue,
//! router, dead-letter sender, stage factory and codec, and the two ways an item leaves a
//! stage without being processed (dead-lettered, or drained as cancelled).

use crate::ctx::StageCtx;
use crate::error::ItemFailure;
use crate::ipc::codec::WireFns;
use crate::queue::{QueueTx, Receiver};
use crate::route::Router;
use crate::stage::{Factory, Failed};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// The parts of a running processor stage, whatever its executor (`F`: how it makes its
/// stage instances; an async stage's differs).
pub(crate) struct Parts<I, O, F = Factory<I, O>> {
    pub(crate) ctx: Arc<StageCtx>,
    pub(crate) input: Receiver<I>,
    pub(crate) router: Router<O>,
    pub(crate) dead_letter: Option<QueueTx<Failed<I>>>,
    pub(crate) factory: F,
    /// The stage's codec, for fork executors.
    pub(crate) wire: Option<WireFns<I, O>>,
}

impl<I, O, F> Parts<I, O, F> {
    /// The same parts with the factory `f` makes of this one.
    pub(crate) fn map_factory<G>(self, f: impl FnOnce(F) -> G) -> Parts<I, O, G> {
        Parts {
            ctx: self.ctx,
            input: self.input,
            router: self.router,
            dead_letter: self.dead_letter,
            factory: f(self.factory),
            wire: self.wire,
        }
    }
}

/// Sends a failed item to the stage's dead-letter stage.
pub(crate) fn dead_letter<I, O, F>(parts: &Parts<I, O, F>, item: I, failure: ItemFailure) {
    dead_letter_to(&parts.ctx, parts.dead_letter.as_ref(), item, failure);
}

/// Sends a failed item to a dead-letter sender of the stage of `ctx`, if it has one.
pub(crate) fn dead_letter_to<I>(
    ctx: &StageCtx,
    dl: Option<&QueueTx<Failed<I>>>,
    item: I,
    failure: ItemFailure,
) {
    if let Some(dl) = dl {
        if dl.send(Failed { item, failure }).is_ok() {
            ctx.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Empties a queue whose stage cannot process it, counting every item as cancelled.
pub(crate) fn drain<I>(ctx: &StageCtx, input: &Receiver<I>) {
    // Inside a routing loop the items' units are released here, which lets the loop close
    // (closing this queue) and end the drain.
    let mut ready = VecDeque::new();
    while ctx.recv_into(input, &mut ready, 1) {
        ctx.received_cancelled(ready.len() as u64);
        ready.clear();
    }
}
