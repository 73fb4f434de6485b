//! The in-process executors: `inline` (one worker on the driver thread) and `threads(n)`
//! (`n` scoped threads, each with its own stage instance, all pulling from the stage's queue).
//!
//! The stage ends when every worker has seen the queue disconnect and flushed its instance;
//! the workers' router clones are dropped then, which ends the downstream streams.

use crate::error::FailureKind;
use crate::policy::{StageCtx, Verdict};
use crate::queue::QueueTx;
use crate::route::Router;
use crate::stage::{guarded, Factory, Failed, Output, Stage};
use crate::stats::Recorder;
use crossbeam_channel::Receiver;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// The parts of a running processor stage, whatever its executor.
pub(crate) struct Parts<I, O> {
    pub(crate) ctx: std::sync::Arc<StageCtx>,
    pub(crate) input: Receiver<I>,
    pub(crate) router: Router<O>,
    pub(crate) dead_letter: Option<QueueTx<Failed<I>>>,
    pub(crate) factory: Factory<I, O>,
    /// The stage's codec, for fork executors.
    pub(crate) wire: Option<crate::ipc::protocol::WireFns<I, O>>,
}

/// Runs `threads` workers (1 = inline, on this thread) until the input ends.
pub(crate) fn run<I: Clone + Send + 'static, O: Clone + Send + 'static>(
    parts: Parts<I, O>,
    threads: usize,
) {
    let next_index = AtomicU64::new(0);
    let worker = || {
        let mut stage = match guarded(|| Ok((parts.factory)())) {
            Ok(s) => s,
            Err(c) => {
                let m = format!("stage factory failed: {}", c.message);
                parts.ctx.stage_failed(FailureKind::Start, m);
                drain(&parts.ctx, &parts.input);
                return;
            }
        };
        let mut router = parts.router.clone();
        let mut rec = Recorder::new(&parts.ctx.stats);
        while let Some(item) = parts.ctx.recv(&parts.input) {
            if parts.ctx.run.aborting() {
                parts.ctx.received_cancelled(1);
                continue;
            }
            let index = next_index.fetch_add(1, Ordering::Relaxed);
            parts.ctx.stats.items_in.fetch_add(1, Ordering::Relaxed);
            process_item(&parts, &mut *stage, &mut router, &mut rec, item, index);
        }
        let mut out = Output::new(&mut router);
        if let Err(c) = guarded(|| stage.finish(&mut out)) {
            if !c.stop {
                parts
                    .ctx
                    .stage_error(c.kind, format!("finish: {}", c.message), None);
            }
        }
    };
    if threads <= 1 {
        worker();
    } else {
        std::thread::scope(|s| {
            for i in 0..threads {
                std::thread::Builder::new()
                    .name(format!("{}#{i}", parts.ctx.name))
                    .spawn_scoped(s, worker)
                    .expect("spawn stage worker thread");
            }
        });
    }
}

/// One item through one stage instance, with the stage's error policy.
fn process_item<I: Clone + Send + 'static, O: Clone + Send + 'static>(
    parts: &Parts<I, O>,
    stage: &mut dyn Stage<I, O>,
    router: &mut Router<O>,
    rec: &mut Recorder<'_>,
    item: I,
    index: u64,
) {
    let keep = parts.ctx.policy.keeps_item();
    let mut item = Some(item);
    let mut attempt = 1;
    loop {
        let this = if keep { item.clone() } else { item.take() }.expect("item present");
        let t0 = Instant::now();
        let r = guarded(|| stage.process(this, &mut Output::new(router)));
        rec.attempt(t0, Instant::now());
        let Err(c) = r else {
            return parts.ctx.items_done(1);
        };
        if c.stop && parts.ctx.run.aborting() {
            parts.ctx.cancelled(1);
            return;
        }
        match parts.ctx.failure(index, attempt, c.kind, c.message, None) {
            Verdict::Retry(delay) => {
                if !delay.is_zero() {
                    std::thread::sleep(delay);
                }
                attempt += 1;
            }
            Verdict::DeadLetter(failure) => {
                dead_letter(parts, item.take().expect("kept item"), failure);
                return parts.ctx.items_done(1);
            }
            Verdict::Dropped => return parts.ctx.items_done(1),
        }
    }
}

/// Sends a failed item to the stage's dead-letter stage.
pub(crate) fn dead_letter<I, O>(parts: &Parts<I, O>, item: I, failure: crate::ItemFailure) {
    if let Some(dl) = &parts.dead_letter {
        if dl.send(Failed { item, failure }).is_ok() {
            parts
                .ctx
                .stats
                .dead_lettered
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Empties a queue whose stage cannot process it, counting every item as cancelled.
pub(crate) fn drain<I>(ctx: &StageCtx, input: &Receiver<I>) {
    // One at a time: inside a routing loop each item's unit must be released before the
    // loop can close and end this drain.
    while ctx.recv(input).is_some() {
        ctx.received_cancelled(1);
    }
}
