//! The in-process executors: `inline` (one worker on the driver thread) and `threads(n)`
//! (`n` scoped threads, each with its own stage instance, all pulling from the stage's queue).
//!
//! The stage ends when every worker has seen the queue disconnect and flushed its instance;
//! the workers' router clones are dropped then, which ends the downstream streams.
//!
//! A worker takes every ready item from its queue at once (up to 256; its share under
//! `threads(n)`), counts them and reserves their indices once, reads the clock (the TSC,
//! through `quanta`) once per item (an item's end is the next one's start; time blocked
//! sending is nobody's), and holds what it emits until
//! it has handled the batch, has been busy [`LINGER`] since its last send (checked between
//! items), a downstream is asleep waiting, or 256 are held. So an output waits at most
//! `LINGER` plus the rest of the call that emitted it, and never while its downstream idles
//! after that call. Latencies and busy time are merged into the stage's statistics every
//! 250 ms, and before the worker waits for input.
//!
//! Under `threads(n)` a worker takes `ready / 2n` items at a time (at least one), so a
//! backlog of slow items is shared out, in smaller takes as it shrinks. A worker's taken
//! items are outside the queue: the memory bound is the queue's capacity plus one take per
//! worker.

use crate::ctx::StageCtx;
use crate::error::FailureKind;
use crate::exec::order::{Held, Shared};
use crate::exec::parts::{dead_letter, drain, Parts};
use crate::policy::Verdict;
use crate::route::Router;
use crate::stage::{guarded, Output, Sink, Stage};
use crate::stats::Recorder;
use quanta::Instant;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Runs `threads` workers (1 = inline, on this thread) until the input ends; with
/// `in_order` (and several threads), the stage emits in input order: each item's outputs are
/// held until every earlier item is done ([`Shared`]).
pub(crate) fn run<I: Clone + Send + 'static, O: Clone + Send + 'static>(
    parts: Parts<I, O>,
    threads: usize,
    in_order: bool,
) {
    let shared = (in_order && threads > 1).then(|| Shared::new(parts.router.clone()));
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
        let mut router = parts.router.clone().batched();
        let mut rec = Recorder::new(&parts.ctx.stats);
        let mut ready = VecDeque::new();
        // Items are taken from the queue in batches (whatever is ready); counters and the
        // item indices are updated once per batch, the clock read once per item.
        let mut t0 = Instant::now();
        while let Some(taken) = parts.input.recv_waited(&mut ready, threads) {
            let n = ready.len() as u64;
            if parts.ctx.run.aborting() {
                parts.ctx.received_cancelled(n);
                ready.clear();
                continue;
            }
            parts.ctx.stats.items_in.fetch_add(n, Ordering::Relaxed);
            let first = taken.first;
            // The first item starts now, or when the last one ended if nothing was awaited.
            if taken.waited {
                t0 = Instant::now();
            }
            let mut flushed = t0;
            for (index, item) in (first..).zip(ready.drain(..)) {
                if parts.ctx.run.aborting() {
                    parts.ctx.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                t0 = match &shared {
                    None => {
                        process_item(&parts, &mut *stage, &mut router, &mut rec, item, index, t0)
                    }
                    Some(shared) => {
                        let mut held = Held::new(&router);
                        let t =
                            process_item(&parts, &mut *stage, &mut held, &mut rec, item, index, t0);
                        shared.done(index, held.outs);
                        t
                    }
                };
                if t0.saturating_duration_since(flushed) >= LINGER && flush(&parts.ctx, &mut router)
                {
                    // Time blocked on a full downstream is not the next item's.
                    t0 = Instant::now();
                    flushed = t0;
                }
            }
            if flush(&parts.ctx, &mut router) {
                t0 = Instant::now();
            }
            // Every item of the batch reached its final outcome (for a routing loop, its
            // unit is released only now, which is later but never too early).
            parts.ctx.items_done(n);
            if parts.input.len() == 0 {
                // Likely to wait: let live views see this worker's figures first.
                rec.idle(t0);
            }
        }
        let finished = match &shared {
            None => guarded(|| stage.finish(&mut Output::new(&mut router))),
            Some(shared) => {
                let mut held = Held::new(&router);
                let r = guarded(|| stage.finish(&mut Output::new(&mut held)));
                shared.send(held.outs);
                r
            }
        };
        if let Err(c) = finished {
            if !c.stop {
                parts
                    .ctx
                    .stage_error(c.kind, format!("finish: {}", c.message), None);
            }
        }
        flush(&parts.ctx, &mut router);
    };
    if threads <= 1 {
        worker();
    } else {
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads)
                .map(|i| {
                    std::thread::Builder::new()
                        .name(format!("{}#{i}", parts.ctx.name))
                        .spawn_scoped(s, worker)
                        .expect("spawn stage worker thread")
                })
                .collect();
            workers.into_iter().for_each(crate::run::join);
        });
    }
    if let Some(shared) = shared {
        shared.end();
    }
}

/// The longest a worker holds emitted items while it is busy with a batch of input.
const LINGER: Duration = Duration::from_micros(100);

/// Sends what a worker's router holds; whether it sent anything. Outputs refused by a
/// closed downstream (only while the run aborts: a stage's queue closes when the stage is
/// gone) are logged; the downstream's own accounting and the aborted report cover the rest.
pub(crate) fn flush<O>(ctx: &StageCtx, router: &mut Router<O>) -> bool {
    match router.flush() {
        Ok(sent) => sent,
        Err(lost) => {
            tracing::debug!(stage = %ctx.name, lost, "outputs refused by a closed downstream");
            true
        }
    }
}

/// One item through one stage instance, with the stage's error policy. The first attempt
/// started at `t0`; returns when the last one ended (the next item's start). The caller
/// counts the item as done.
fn process_item<I: Clone + Send + 'static, O: Clone + Send + 'static>(
    parts: &Parts<I, O>,
    stage: &mut dyn Stage<I, O>,
    sink: &mut dyn Sink<O>,
    rec: &mut Recorder<'_>,
    item: I,
    index: u64,
    mut t0: Instant,
) -> Instant {
    let keep = parts.ctx.policy.keeps_item();
    let mut item = Some(item);
    let mut attempt = 1;
    loop {
        let this = if keep { item.clone() } else { item.take() }.expect("item present");
        let r = guarded(|| stage.process(this, &mut Output::new(sink)));
        let end = Instant::now();
        rec.attempt(t0, end);
        let Err(c) = r else {
            return end;
        };
        if c.stop && parts.ctx.run.aborting() {
            parts.ctx.stats.cancelled.fetch_add(1, Ordering::Relaxed);
            return end;
        }
        match parts.ctx.failure(index, attempt, c.kind, c.message, None) {
            Verdict::Retry(delay) => {
                if !delay.is_zero() {
                    std::thread::sleep(delay);
                }
                attempt += 1;
                t0 = Instant::now();
            }
            Verdict::DeadLetter(failure) => {
                dead_letter(parts, item.take().expect("kept item"), failure);
                return Instant::now();
            }
            Verdict::Dropped => return Instant::now(),
        }
    }
}
