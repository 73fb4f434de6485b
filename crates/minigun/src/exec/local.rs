//! The in-process executors: `inline` (one worker on the driver thread) and `threads(n)`
//! (`n` scoped threads, each with its own stage instance, all pulling from the stage's queue).
//!
//! The stage ends when every worker has seen the queue disconnect and flushed its instance;
//! the workers' router clones are dropped then, which ends the downstream streams.
//!
//! A worker takes every ready item from its queue at once (up to 1024; its share under
//! `threads(n)`), counts them and reserves their indices once, and holds what it emits until
//! it has handled the batch, has been busy [`LINGER`] since its last send (checked at each
//! clock reading, below), or, at the end of an item, a downstream is asleep waiting or 256
//! are held. So an output waits at most `LINGER` plus the rest of the run of items it
//! belongs to, and never while its downstream idles after that run. Latencies and busy time
//! are merged into the stage's statistics every 250 ms, and before the worker waits for
//! input.
//!
//! # An item's outputs count only if it succeeds
//!
//! As under the fork executors, what an attempt emits (and routes, with `Output::to`) is
//! held until the attempt succeeds: the router marks where each attempt's outputs begin
//! ([`Router::begin`]), sends nothing while it runs, and on success counts them and sends
//! its routed items ([`Router::commit`]); a failed attempt's (an error or a panic) are
//! dropped ([`Router::discard`]), before the retry, the skip or the dead letter. So a retry
//! never delivers an output twice and a failed item delivers nothing. An item that succeeds
//! costs a few stores, no copy: its outputs are where the batch holds them anyway. An item
//! that emits many outputs holds them all until it ends (the downstream's backpressure
//! applies at its end), as a fork child's are held in the parent.
//!
//! Under `threads(n)` a worker takes `ready / 2n` items at a time (at least one), so a
//! backlog of slow items is shared out, in smaller takes as it shrinks. A worker's taken
//! items are outside the queue: the memory bound is the queue's capacity plus one take per
//! worker.
//!
//! # Timing: items one by one while they are slow, in runs while they are fast
//!
//! A clock reading (the TSC, through `quanta`) costs about 40 ns on the 2-vCPU machine the
//! benchmark runs on: more than a fast stage's whole work on an item. So a worker reads the
//! clock at the end of a *run* of consecutive attempts (an attempt's end is the next one's
//! start; time blocked sending is nobody's) and records each attempt of the run at the run's
//! mean ([`Timer`]). A run is one attempt long after a slow run (a mean of at least
//! [`SLOW`], 1 us, where a reading costs under 5 %), and twice as long as the last one after
//! a fast run, up to [`MAX_RUN`] (32). So items of 1 us or more are timed one by one (a
//! slow item among fast ones: from the run after it), busy time is exact, the histogram
//! still holds one value per attempt, and a failed attempt ends its run (the failure path
//! reads the clock). What runs of fast items lose is the spread inside a run: their
//! percentiles describe means of up to 32 consecutive items.
//!
//! # Fast runs: one panic guard for many items
//!
//! A worker attempts the items of a batch one after another under one panic guard (a
//! `catch_unwind`, and the mark that keeps a stage's panic off stderr), not one per item:
//! guarding each call cost more than a fast stage's own work. The run records which item it
//! is on (and the item itself when the error policy may need it again: the stage is given a
//! clone), so a failure is still its item's, a panic of its `Clone` included: an error or a
//! panic ends the run at that item, which alone goes through the error policy (its retries
//! guarded one by one, each clone inside the guard), and the next run starts after it. A
//! panic between items (sending what finished items emitted) is no item's: a stage error.
//! Stages that keep input order across threads (`Shared`) are still guarded item by item.
//!
//! # Chained stages
//!
//! A stage chained to its upstream (the rule is in `link::chain`) has no queue and no thread
//! of its own: each worker of the upstream owns a [`Worker`] of it ([`link`]), and the
//! upstream's router hands it what the upstream emitted where it would have sent it to a
//! queue (at the end of a batch, after `LINGER`, when 256 are held at the end of an item),
//! never an output of an item still running. The chained worker handles them there, as a
//! batch of its own: its own item indices, statistics, error policy, dead letters and router; the
//! upstream's timing leaves out the time spent in it. When the upstream worker ends, the
//! chained instance finishes and its router is dropped, so the chained stage's downstreams
//! end exactly as they would after its own workers.

use crate::ctx::StageCtx;
use crate::error::FailureKind;
use crate::exec::order::{Held, Shared};
use crate::exec::parts::{dead_letter_to, drain, Parts};
use crate::policy::Verdict;
use crate::queue::QueueTx;
use crate::route::{Link, MakeLink, Router};
use crate::stage::{
    catch_panic, caught_error, guarded, Caught, Factory, Failed, Item, Output, Sink, Stage,
};
use crate::stats::Recorder;
use quanta::Instant;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Runs `threads` workers (1 = inline, on this thread) until the input ends; with
/// `in_order` (and several threads), the stage emits in input order: each item's outputs are
/// held until every earlier item is done ([`Shared`]).
pub(crate) fn run<I: Item, O: Item>(parts: Parts<I, O>, threads: usize, in_order: bool) {
    let shared = (in_order && threads > 1).then(|| Shared::new(parts.router.clone()));
    let worker = || {
        let dead_letter = parts.dead_letter.clone();
        let router = parts.router.clone();
        let Some(mut w) = Worker::start(&parts.ctx, &parts.factory, router, dead_letter) else {
            drain(&parts.ctx, &parts.input);
            return;
        };
        let mut ready = VecDeque::new();
        // Items are taken from the queue in batches (whatever is ready); counters and the
        // item indices are updated once per batch.
        let mut t0 = Instant::now();
        while let Some(taken) = parts.input.recv_waited(&mut ready, threads) {
            let n = ready.len() as u64;
            if parts.ctx.run.aborting() {
                parts.ctx.received_cancelled(n);
                ready.clear();
                continue;
            }
            parts.ctx.stats.items_in.fetch_add(n, Ordering::Relaxed);
            // The first item starts now, or when the last one ended if nothing was awaited.
            if taken.waited {
                t0 = Instant::now();
            }
            t0 = w.batch(taken.first, ready.drain(..), t0, shared.as_ref());
            // Every item of the batch reached its final outcome (for a routing loop, its
            // unit is released only now, which is later but never too early).
            parts.ctx.items_done(n);
            if parts.input.len() == 0 {
                // Likely to wait: let live views see this worker's figures first.
                w.rec.idle(t0);
            }
        }
        w.finish(shared.as_ref());
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

/// A run of attempts with a mean at least this long is followed by attempts timed one by
/// one (a clock reading then costs under 5 % of an attempt).
const SLOW: Duration = Duration::from_micros(1);

/// The most attempts timed together by one clock reading.
const MAX_RUN: u64 = 32;

/// One stage instance with what it works with: the body of an in-process worker, fed by its
/// queue ([`run`]) or, chained, by its upstream's router ([`link`]).
pub(crate) struct Worker<I, O> {
    ctx: Arc<StageCtx>,
    stage: Box<dyn Stage<I, O>>,
    router: Router<O>,
    rec: Recorder<'static>,
    dead_letter: Option<QueueTx<Failed<I>>>,
    timer: Timer,
}

impl<I: Item, O: Item> Worker<I, O> {
    /// Makes the stage instance (a factory that fails is a failure of the stage, which
    /// aborts the run: `None`) and batches `router` (which makes this worker's instance of
    /// a chained downstream).
    fn start(
        ctx: &Arc<StageCtx>,
        factory: &Factory<I, O>,
        router: Router<O>,
        dead_letter: Option<QueueTx<Failed<I>>>,
    ) -> Option<Self> {
        let stage = match guarded(|| Ok(factory())) {
            Ok(s) => s,
            Err(c) => {
                let m = format!("stage factory failed: {}", c.message);
                ctx.stage_failed(FailureKind::Start, m);
                return None;
            }
        };
        let router = router.batched();
        let timer = Timer {
            start: Instant::now(),
            nested: router.nested(),
            nested0: 0,
            run: 0,
            len: 1,
        };
        Some(Worker {
            ctx: ctx.clone(),
            stage,
            router,
            rec: Recorder::owned(ctx.stats.clone()),
            dead_letter,
            timer,
        })
    }

    /// Handles items `first..` (already counted in), the first starting at `t0`, and sends
    /// what they emitted; returns the clock reading that ended the last one (the next
    /// batch's start if nothing is awaited). The caller counts the items as done.
    ///
    /// Items go through the stage in *fast runs*: first attempts, one after another, under
    /// one panic guard ([`catch_panic`]) instead of one per item. The run remembers which
    /// item it is on (and, when the policy may need it again, a clone of it), so an item
    /// whose attempt fails or panics is still the one that fails: the run stops there, the
    /// item goes through the error policy alone ([`Item1::settle`]), and a new run starts
    /// with the next item.
    fn batch(
        &mut self,
        first: u64,
        items: impl Iterator<Item = I>,
        t0: Instant,
        shared: Option<&Shared<O>>,
    ) -> Instant {
        self.timer.restart(t0);
        let mut flushed = t0;
        let mut items = (first..).zip(items);
        if let Some(shared) = shared {
            for (index, item) in items {
                self.one(index, item, shared, &mut flushed);
            }
        } else {
            let keep = self.ctx.policy.keeps_item();
            // The item the run is on (`None` between items): its index and, if kept, the
            // item itself for a retry or a dead letter (the stage is given a clone).
            let mut on: (Option<u64>, Option<I>) = (None, None);
            loop {
                let run = catch_panic(|| self.fast_run(&mut items, keep, &mut on, &mut flushed));
                let caught = match run {
                    Ok(None) => break,
                    Ok(Some(c)) => c,
                    Err(panic) => panic,
                };
                let (Some(index), kept) = (on.0.take(), on.1.take()) else {
                    // A panic between items (sending what finished items emitted) is no
                    // item's: a stage error, and the run goes on with the next item.
                    let m = format!("sending outputs: {}", caught.message);
                    self.ctx.stage_error(caught.kind, m, None);
                    continue;
                };
                self.router.discard();
                self.timer.run += 1;
                let end = self.timer.read(&mut self.rec);
                let (mut one, router) = self.item1();
                if let Some(now) = one.settle(router, caught, kept, index, end) {
                    self.lingered(now, &mut flushed);
                }
            }
        }
        let end = self.timer.read(&mut self.rec);
        if flush(&self.ctx, &mut self.router) {
            return Instant::now();
        }
        end
    }

    /// First attempts at `items` until one fails (its error: `Some`) or the items end
    /// (`None`); `on` follows the item being attempted. Runs inside one panic guard.
    ///
    /// What an attempt emits is held by the router until it succeeds ([`Router::begin`]):
    /// the caller drops it when the attempt fails.
    fn fast_run(
        &mut self,
        items: &mut impl Iterator<Item = (u64, I)>,
        keep: bool,
        on: &mut (Option<u64>, Option<I>),
        flushed: &mut Instant,
    ) -> Option<Caught> {
        // One attempt is opened for the run; each success commits it, which begins the next
        // item's. A failure leaves it open for the caller's `discard`.
        self.router.begin();
        for (index, item) in items {
            if self.ctx.run.aborting() {
                self.ctx.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            // From here a panic is this item's, its clone's included: the item is kept
            // before it is cloned, so the kept one is never another item.
            on.0 = Some(index);
            let item = match keep {
                true => on.1.insert(item).clone(),
                false => item,
            };
            if let Err(e) = self.stage.process(item, &mut Output::new(&mut self.router)) {
                return Some(caught_error(e));
            }
            // Its routed items are sent in the commit: still this item's.
            if self.router.commit() {
                on.0 = None;
                flush(&self.ctx, &mut self.router);
            }
            if let Some(now) = self.timer.attempt(&mut self.rec) {
                on.0 = None;
                self.lingered(now, flushed);
            }
        }
        on.0 = None;
        self.router.close();
        None
    }

    /// One item, every attempt guarded on its own, its outputs held for the stage's input
    /// order ([`Shared`]).
    fn one(&mut self, index: u64, item: I, shared: &Shared<O>, flushed: &mut Instant) {
        if self.ctx.run.aborting() {
            self.ctx.stats.cancelled.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let (mut one, router) = self.item1();
        let mut held = Held::new(router);
        let read = one.process(&mut held, item, index);
        held.send_routed();
        shared.done(index, held.outs);
        if let Some(now) = read {
            self.lingered(now, flushed);
        }
    }

    /// What one item goes through, and the router it emits into.
    fn item1(&mut self) -> (Item1<'_, I, O>, &mut Router<O>) {
        (
            Item1 {
                ctx: &self.ctx,
                dead_letter: self.dead_letter.as_ref(),
                stage: &mut *self.stage,
                rec: &mut self.rec,
                timer: &mut self.timer,
            },
            &mut self.router,
        )
    }

    /// After a clock reading `now`: sends what is held if the last send was [`LINGER`] ago.
    fn lingered(&mut self, now: Instant, flushed: &mut Instant) {
        if now.saturating_duration_since(*flushed) >= LINGER && flush(&self.ctx, &mut self.router) {
            // Time blocked on a full downstream (or spent in a chained one) is not the next
            // item's.
            *flushed = Instant::now();
            self.timer.restart(*flushed);
        }
    }

    /// The end of the input: the instance finishes, then what it holds is sent and its
    /// chained downstream, if any, finishes too.
    fn finish(mut self, shared: Option<&Shared<O>>) {
        let stage = &mut self.stage;
        let finished = match shared {
            None => guarded(|| stage.finish(&mut Output::new(&mut self.router))),
            Some(shared) => {
                let mut held = Held::new(&self.router);
                let r = guarded(|| stage.finish(&mut Output::new(&mut held)));
                held.send_routed();
                shared.send(held.outs);
                r
            }
        };
        if let Err(c) = finished {
            if !c.stop {
                self.ctx
                    .stage_error(c.kind, format!("finish: {}", c.message), None);
            }
        }
        let finished = self.router.finish_chain();
        logged(&self.ctx, finished);
    }
}

/// Makes the workers of a stage chained to its upstream: one per upstream worker, each
/// with its own stage instance, sharing the stage's item indices.
pub(crate) fn link<I: Item, O: Item>(
    ctx: Arc<StageCtx>,
    factory: Factory<I, O>,
    router: Router<O>,
    dead_letter: Option<QueueTx<Failed<I>>>,
) -> MakeLink<I> {
    let next = Arc::new(AtomicU64::new(0));
    Arc::new(move || {
        let worker = Worker::start(&ctx, &factory, router.clone(), dead_letter.clone());
        Box::new(Chained {
            worker,
            ctx: ctx.clone(),
            next: next.clone(),
        })
    })
}

/// One upstream worker's instance of a chained stage.
struct Chained<I, O> {
    /// `None` when its factory failed (the run is aborting).
    worker: Option<Worker<I, O>>,
    ctx: Arc<StageCtx>,
    /// The index of the stage's next item, whichever instance takes it.
    next: Arc<AtomicU64>,
}

impl<I: Item, O: Item> Link<I> for Chained<I, O> {
    fn handle(&mut self, items: &mut Vec<I>) -> u64 {
        let n = items.len() as u64;
        let ctx = &self.ctx;
        let worker = self.worker.as_mut().filter(|_| !ctx.run.aborting());
        let Some(w) = worker else {
            ctx.received_cancelled(n);
            items.clear();
            return 0;
        };
        ctx.stats.items_in.fetch_add(n, Ordering::Relaxed);
        let first = self.next.fetch_add(n, Ordering::Relaxed);
        let t0 = Instant::now();
        let end = w.batch(first, items.drain(..), t0, None);
        ctx.items_done(n);
        w.rec.idle(end);
        end.saturating_duration_since(t0).as_nanos() as u64
    }

    fn finish(&mut self) {
        if let Some(w) = self.worker.take() {
            w.finish(None);
        }
    }
}

/// Sends what a worker's router holds; whether it sent anything.
pub(crate) fn flush<O>(ctx: &StageCtx, router: &mut Router<O>) -> bool {
    logged(ctx, router.flush())
}

/// Whether a flush sent anything. Outputs refused by a closed downstream (only while the run
/// aborts: a stage's queue closes when the stage is gone) are logged; the downstream's own
/// accounting and the aborted report cover the rest.
fn logged(ctx: &StageCtx, flushed: Result<bool, u64>) -> bool {
    match flushed {
        Ok(sent) => sent,
        Err(lost) => {
            tracing::debug!(stage = %ctx.name, lost, "outputs refused by a closed downstream");
            true
        }
    }
}

/// How a worker times its attempts: in runs that end with a clock reading (see the module
/// docs), leaving out what its chained downstream spent.
struct Timer {
    /// When the current run started.
    start: Instant,
    /// The router's count of nanoseconds spent in a chained downstream, and its value at
    /// `start`.
    nested: Arc<AtomicU64>,
    nested0: u64,
    /// Attempts in the current run, and how many end it.
    run: u64,
    len: u64,
}

impl Timer {
    /// A new run starts at `now` (after a wait, a send, a retry's back-off).
    fn restart(&mut self, now: Instant) {
        self.start = now;
        self.nested0 = self.nested.load(Ordering::Relaxed);
        self.run = 0;
    }

    /// An attempt succeeded; returns the clock reading if it ended the run.
    #[inline]
    fn attempt(&mut self, rec: &mut Recorder<'_>) -> Option<Instant> {
        self.run += 1;
        (self.run >= self.len).then(|| self.read(rec))
    }

    /// Ends the current run now (a failed attempt, the end of a batch): records it and
    /// returns the reading, the next run's start.
    fn read(&mut self, rec: &mut Recorder<'_>) -> Instant {
        let now = Instant::now();
        if self.run > 0 {
            let nested = self.nested.load(Ordering::Relaxed) - self.nested0;
            let took = now.saturating_duration_since(self.start).as_nanos() as u64;
            let ns = took.saturating_sub(nested);
            rec.run(ns, self.run, now);
            self.len = match ns / self.run >= SLOW.as_nanos() as u64 {
                true => 1,
                false => (self.len * 2).min(MAX_RUN),
            };
        }
        self.restart(now);
        now
    }
}

/// Where an attempt emits: what it emits counts only if it succeeds (`commit`), and is
/// dropped if it fails (`discard`).
trait Attempts<O>: Sink<O> {
    fn begin(&mut self);
    /// The attempt succeeded (what is due is sent through the stage of `ctx`).
    fn commit(&mut self, ctx: &StageCtx);
    fn discard(&mut self);
}

/// The worker's router holds an attempt's outputs until it succeeds.
impl<O: Item> Attempts<O> for Router<O> {
    fn begin(&mut self) {
        Router::begin(self);
    }
    fn commit(&mut self, ctx: &StageCtx) {
        let due = Router::commit(self);
        Router::close(self);
        if due {
            flush(ctx, self);
        }
    }
    fn discard(&mut self) {
        Router::discard(self);
    }
}

/// The item's outputs for the stage's input order: all one item's, dropped when an attempt
/// fails.
impl<O: Item> Attempts<O> for Held<'_, O> {
    fn begin(&mut self) {}
    fn commit(&mut self, _: &StageCtx) {}
    fn discard(&mut self) {
        self.clear();
    }
}

/// What one item goes through: its stage instance, the error policy, the timer.
struct Item1<'w, I, O> {
    ctx: &'w StageCtx,
    dead_letter: Option<&'w QueueTx<Failed<I>>>,
    stage: &'w mut dyn Stage<I, O>,
    rec: &'w mut Recorder<'static>,
    timer: &'w mut Timer,
}

impl<I: Item, O: Item> Item1<'_, I, O> {
    /// One item through the stage instance, with the stage's error policy, emitting into
    /// `sink`; returns the clock reading if one was taken (the caller checks `LINGER`
    /// then). The caller counts the item as done.
    fn process(&mut self, sink: &mut impl Attempts<O>, item: I, index: u64) -> Option<Instant> {
        let keep = self.ctx.policy.keeps_item();
        let mut kept = None;
        let stage = &mut *self.stage;
        sink.begin();
        let r = guarded(|| {
            // Kept before it is cloned: a panic of its `Clone` fails this item.
            let item = match keep {
                true => kept.insert(item).clone(),
                false => item,
            };
            stage.process(item, &mut Output::new(&mut *sink))
        });
        let Err(c) = r else {
            sink.commit(self.ctx);
            return self.timer.attempt(self.rec);
        };
        sink.discard();
        self.timer.run += 1;
        let end = self.timer.read(self.rec);
        self.settle(sink, c, kept, index, end)
    }

    /// Item `index`'s first attempt failed with `caught` (its run has been timed): the
    /// error policy, then the retries, each guarded on its own, emitting into `sink`;
    /// returns the clock reading that ends it.
    fn settle(
        &mut self,
        sink: &mut impl Attempts<O>,
        caught: Caught,
        kept: Option<I>,
        index: u64,
        end: Instant,
    ) -> Option<Instant> {
        let mut item = kept;
        if let Ok(now) = self.failed(caught, &mut item, index, 1, end) {
            return Some(now);
        }
        let mut attempt = 2;
        loop {
            let stage = &mut *self.stage;
            sink.begin();
            let r = guarded(|| {
                // A panic of its `Clone` is this attempt's.
                let this = item.clone().expect("a retried item is kept");
                stage.process(this, &mut Output::new(&mut *sink))
            });
            let Err(c) = r else {
                sink.commit(self.ctx);
                return self.timer.attempt(self.rec);
            };
            sink.discard();
            self.timer.run += 1;
            let end = self.timer.read(self.rec);
            match self.failed(c, &mut item, index, attempt, end) {
                Ok(now) => return Some(now),
                Err(()) => attempt += 1,
            }
        }
    }

    /// Attempt `attempt` at item `index` failed with `c` (timed, ending at `end`): applies
    /// the policy. `Err` when it is retried (after its back-off); else the clock reading
    /// that ends the item.
    fn failed(
        &mut self,
        c: Caught,
        item: &mut Option<I>,
        index: u64,
        attempt: u32,
        end: Instant,
    ) -> Result<Instant, ()> {
        if c.stop && self.ctx.run.aborting() {
            self.ctx.stats.cancelled.fetch_add(1, Ordering::Relaxed);
            return Ok(end);
        }
        match self.ctx.failure(index, attempt, c.kind, c.message, None) {
            Verdict::Retry(delay) => {
                if !delay.is_zero() {
                    std::thread::sleep(delay);
                }
                self.timer.restart(Instant::now());
                Err(())
            }
            Verdict::DeadLetter(failure) => {
                let item = item.take().expect("kept item");
                dead_letter_to(self.ctx, self.dead_letter, item, failure);
                let now = Instant::now();
                self.timer.restart(now);
                Ok(now)
            }
            Verdict::Dropped => {
                let now = Instant::now();
                self.timer.restart(now);
                Ok(now)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::StageStats;

    fn timer() -> Timer {
        Timer {
            start: Instant::now(),
            nested: Arc::default(),
            nested0: 0,
            run: 0,
            len: 1,
        }
    }

    #[test]
    fn every_attempt_is_recorded_once_however_they_are_grouped() {
        let stats = Arc::new(StageStats::default());
        let mut rec = Recorder::owned(stats.clone());
        let mut t = timer();
        let readings = (0..1000).filter(|_| t.attempt(&mut rec).is_some()).count();
        t.read(&mut rec);
        drop(rec);
        assert_eq!(stats.latency.lock().unwrap().len(), 1000);
        assert!(readings < 1000, "fast attempts share readings ({readings})");
    }

    #[test]
    fn slow_attempts_are_timed_one_by_one_and_the_chained_stages_time_is_left_out() {
        let stats = Arc::new(StageStats::default());
        let mut rec = Recorder::owned(stats.clone());
        let mut t = timer();
        t.restart(Instant::now());
        for _ in 0..5 {
            std::thread::sleep(Duration::from_millis(2));
            // A chained stage "spent" a second of it: left out (saturating at zero).
            let spent = t.nested.load(Ordering::Relaxed) + 1_000_000_000;
            t.nested.store(spent, Ordering::Relaxed);
            // Its own time is nothing: not a slow attempt.
            t.attempt(&mut rec);
        }
        t.read(&mut rec);
        drop(rec);
        let h = stats.latency.lock().unwrap();
        assert_eq!(h.len(), 5);
        assert_eq!(h.max(), 1, "the nested time is not the attempt's");
        drop(h);
        let stats = Arc::new(StageStats::default());
        let mut rec = Recorder::owned(stats.clone());
        let mut t = timer();
        for _ in 0..5 {
            std::thread::sleep(Duration::from_millis(2));
            assert!(t.attempt(&mut rec).is_some(), "a slow attempt ends its run");
        }
        drop(rec);
        let h = stats.latency.lock().unwrap();
        assert_eq!(h.len(), 5);
        assert!(
            h.min() >= 2_000_000,
            "each at least its 2 ms sleep: {}",
            h.min()
        );
    }
}
