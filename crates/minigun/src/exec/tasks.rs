//! `tasks(n)`: async stages on a tokio runtime, at most `n` items in flight.
//!
//! Three parts, so that no runtime thread ever blocks:
//!
//! - the **feeder** (a thread of the stage, `stage#feed`) waits for a free slot, takes as many
//!   ready items from the stage's queue as there are free slots (never more: what is not in
//!   flight stays visible in the queue, and a full queue holds the upstream back), and spawns
//!   one task per item on the runtime;
//! - each **item task** runs the stage's future, attempt after attempt by the stage's policy
//!   ([`StageCtx::failure`]), waiting out a retry's backoff on the runtime's timer, under the
//!   per-item `timeout`, and catching a panic inside the future as the item's failure; then it
//!   hands what the item emitted to the collector. A guard does that also when the task is
//!   dropped (cancelled, or its runtime shut down), so every item reaches the collector once;
//! - the **collector** (the stage's driver thread) routes each finished item's outputs through
//!   the stage's router (in input order with `ordered`, through [`Release`]), dead-letters,
//!   records latency, and only then frees the item's slot. A slow downstream blocks the
//!   collector, so slots stay taken and the feeder takes nothing more: in flight stays at most
//!   `n`, memory at most `n` items and their outputs.
//!
//! When the run aborts (fail_fast, [`RunHandle::cancel`](crate::RunHandle::cancel), SIGINT or
//! SIGTERM), the collector notices within [`ABORT_POLL`] and tells every task through a watch
//! channel: their futures are dropped (their guards run) and the items count as cancelled.
//! The runtime is the stage's own (made when the run starts, shut down when the stage ends,
//! its threads joined) unless the user passed a handle.

use super::local::flush;
use super::order::Release;
use super::parts::{dead_letter, drain, Parts};
use super::runner::PreparedRun;
use super::{Exec, ForkOptions, Opt};
use crate::async_stage::{AsyncFactory, AsyncOutput, ErasedAsync, RoutedItems};
use crate::ctx::StageCtx;
use crate::error::{FailureKind, ItemFailure, StageResult};
use crate::policy::Verdict;
use crate::route::{Router, Routes};
use crate::stage::{catch_panic, caught_error, Caught, Item};
use crate::stats::Recorder;
use crossbeam_channel as chan;
use futures::future::{BoxFuture, Either};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::watch;

/// The options of [`Exec::tasks`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TaskOptions {
    /// At most this many items of the stage in flight at once.
    pub in_flight: usize,
    /// Per-item time limit for each attempt: the item's future is dropped when it passes.
    pub timeout: Option<Duration>,
    /// Emit results in input order (default: as they complete).
    pub ordered: bool,
    /// Run on this runtime instead of one the stage makes for the run.
    pub runtime: Option<RuntimeHandle>,
    /// Worker threads of the runtime the stage makes (default: one per CPU).
    pub runtime_threads: Option<usize>,
}

impl TaskOptions {
    /// Applies a fork option that `tasks` shares (`timeout`, `ordered`).
    pub(crate) fn set_fork_option(&mut self, set: impl FnOnce(&mut ForkOptions)) {
        let mut fork = ForkOptions::new(self.in_flight);
        fork.timeout = self.timeout;
        fork.ordered = self.ordered;
        set(&mut fork);
        self.timeout = fork.timeout;
        self.ordered = fork.ordered;
    }
}

/// A tokio runtime handle passed to [`Exec::runtime`]. Two settings are equal when they hold
/// the same handle (the same call's clone).
#[derive(Clone)]
pub struct RuntimeHandle(Arc<tokio::runtime::Handle>);

impl RuntimeHandle {
    /// The handle.
    pub fn handle(&self) -> &tokio::runtime::Handle {
        &self.0
    }
}

impl PartialEq for RuntimeHandle {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}
impl Eq for RuntimeHandle {}

impl std::fmt::Debug for RuntimeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RuntimeHandle")
    }
}

const RUNTIME: Opt = Opt::new("runtime", false, false).and_tasks();
const RUNTIME_THREADS: Opt = Opt::new("runtime_threads", false, false).and_tasks();

impl Exec {
    /// Async stages ([`Pipeline::map_async`](crate::Pipeline::map_async) and its siblings):
    /// at most `n` items in flight at once, each a task on a tokio runtime (thousands are
    /// fine). The runtime is the stage's own, multi-thread, one worker per CPU (see
    /// [`Exec::runtime_threads`]), made when the run starts and shut down when the stage
    /// ends; or the one given with [`Exec::runtime`]. `timeout` and `ordered` apply; the
    /// stage's error policy too (a retry's backoff waits on the runtime's timer, no thread
    /// waits). Only async stages take it: on another stage, a `tasks` setting of its own is a
    /// definition error, an inherited one does not apply (it runs inline). For crash
    /// isolation as well, run an async stage in forked workers:
    /// [`Exec::tasks_per_worker`].
    ///
    /// ```
    /// use minigun::{Exec, Pipeline};
    /// use std::time::Duration;
    /// let p = Pipeline::new("waits");
    /// p.producer("ids", |out| out.emit_all(0..100u64).map_err(Into::into));
    /// p.map_async("wait", |id: u64| async move {
    ///     tokio::time::sleep(Duration::from_millis(10)).await;
    ///     Ok(id)
    /// })
    /// .executor(Exec::tasks(100).timeout(Duration::from_secs(5)));
    /// p.consumer("sink", |_: u64| Ok(()));
    /// assert_eq!(p.run().unwrap().stage("sink").unwrap().items_in, 100);
    /// ```
    pub fn tasks(n: usize) -> Self {
        Exec::Tasks(TaskOptions {
            in_flight: n,
            timeout: None,
            ordered: false,
            runtime: None,
            runtime_threads: None,
        })
    }
    /// Runs a `tasks` stage on `handle`'s runtime (one the application already runs) instead
    /// of a runtime of its own. The runtime must have its timer enabled for `timeout` and
    /// retry backoff. minigun never shuts it down; a run's tasks on it end with the run.
    pub fn runtime(self, handle: tokio::runtime::Handle) -> Self {
        self.task_option(RUNTIME, |o| {
            o.runtime = Some(RuntimeHandle(Arc::new(handle)))
        })
    }
    /// Worker threads of the runtime a `tasks` stage makes (default: one per CPU).
    pub fn runtime_threads(self, n: usize) -> Self {
        self.task_option(RUNTIME_THREADS, |o| o.runtime_threads = Some(n.max(1)))
    }
    /// Sets a `tasks` option; elsewhere keeps it as misapplied (see `Exec::option`).
    fn task_option(self, opt: Opt, set: impl FnOnce(&mut TaskOptions)) -> Self {
        self.apply(opt, |e| match e {
            Exec::Tasks(mut o) => {
                set(&mut o);
                (Exec::Tasks(o), true)
            }
            other => (other, false),
        })
    }
}

/// The parts of a running async stage.
pub(crate) type AsyncParts<I, O> = Parts<I, O, AsyncFactory<I, O>>;

/// How often the collector checks whether the run is aborting while it waits.
const ABORT_POLL: Duration = Duration::from_millis(10);

/// The longest an owned runtime's shutdown waits for blocking tasks stage code started.
const SHUTDOWN: Duration = Duration::from_secs(10);

/// The runtime a stage's items run on.
enum Rt {
    Owned(tokio::runtime::Runtime),
    Borrowed(tokio::runtime::Handle),
}

impl Rt {
    fn handle(&self) -> &tokio::runtime::Handle {
        match self {
            Rt::Owned(rt) => rt.handle(),
            Rt::Borrowed(h) => h,
        }
    }
}

/// Makes the stage's runtime (on the run's thread, before any stage runs); the rest runs on
/// the stage's driver thread.
pub(crate) fn prepare<I: Item, O: Item>(
    parts: AsyncParts<I, O>,
    opts: TaskOptions,
) -> Result<PreparedRun, String> {
    let rt = match &opts.runtime {
        Some(h) => Rt::Borrowed(h.handle().clone()),
        None => {
            let threads = opts
                .runtime_threads
                .or_else(|| std::thread::available_parallelism().ok().map(Into::into))
                .unwrap_or(1);
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .thread_name(format!("{}:rt", parts.ctx.name))
                .enable_all()
                .build()
                .map(Rt::Owned)
                .map_err(|e| format!("cannot start the stage's tokio runtime: {e}"))?
        }
    };
    Ok(Box::new(move || run(parts, opts, rt)))
}

fn run<I: Item, O: Item>(parts: AsyncParts<I, O>, opts: TaskOptions, rt: Rt) {
    let ctx = &parts.ctx;
    let stage = match catch_panic(|| (parts.factory)()) {
        Ok(s) => s,
        Err(c) => {
            let m = format!("stage factory failed: {}", c.message);
            ctx.stage_failed(FailureKind::Start, m);
            drain(ctx, &parts.input);
            return;
        }
    };
    let handle = rt.handle().clone();
    let slots = Slots::new(opts.in_flight.max(1));
    let (done_tx, done_rx) = chan::unbounded();
    let (cancel_tx, cancel_rx) = watch::channel(false);
    let items = Arc::new(ItemCtx {
        ctx: ctx.clone(),
        stage: stage.clone(),
        routes: parts.router.routes.clone(),
        timeout: opts.timeout,
        cancel: cancel_rx.clone(),
    });
    let mut router = parts.router.clone().batched();
    std::thread::scope(|s| {
        let feeder = std::thread::Builder::new()
            .name(format!("{}#feed", ctx.name))
            .spawn_scoped(s, || feed(&parts, &slots, &handle, items, done_tx))
            .expect("spawn feeder thread");
        collect(
            &parts,
            &slots,
            &done_rx,
            &cancel_tx,
            &mut router,
            opts.ordered,
        );
        crate::run::join(feeder);
    });
    finish(ctx, &*stage, &handle, &mut router, cancel_rx);
    flush(ctx, &mut router);
    drop((router, stage, parts));
    if let Rt::Owned(rt) = rt {
        rt.shutdown_timeout(SHUTDOWN);
    }
}

/// What every item task of the stage needs.
struct ItemCtx<I, O> {
    ctx: Arc<StageCtx>,
    stage: Arc<dyn ErasedAsync<I, O>>,
    routes: Routes,
    timeout: Option<Duration>,
    /// Becomes true when the run aborts.
    cancel: watch::Receiver<bool>,
}

/// The free slots of the stage: at most `n` items in flight.
///
/// A waiting feeder is woken once `n / 16` slots are free (at least one), or when the
/// collector has nothing more to hand back: a wake-up per finished item would cost a system
/// call each, and a burst of finished items (a timer wheel's tick) is refilled in a few takes.
struct Slots {
    /// Free slots, and whether the feeder waits for one.
    free: Mutex<(usize, bool)>,
    freed: Condvar,
    /// Free slots that wake a waiting feeder at once.
    batch: usize,
}

impl Slots {
    fn new(n: usize) -> Self {
        Slots {
            free: Mutex::new((n, false)),
            freed: Condvar::new(),
            batch: (n / 16).max(1),
        }
    }
    /// Waits until a slot is free; how many are.
    fn wait_free(&self) -> usize {
        let mut s = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        while s.0 == 0 {
            s.1 = true;
            s = self.freed.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
        s.1 = false;
        s.0
    }
    fn take(&self, n: usize) {
        self.free.lock().unwrap_or_else(PoisonError::into_inner).0 -= n;
    }
    fn release(&self) {
        let mut s = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        s.0 += 1;
        if s.1 && s.0 >= self.batch {
            s.1 = false;
            self.freed.notify_one();
        }
    }
    /// The collector is about to wait: a waiting feeder takes whatever is free.
    fn wake(&self) {
        let mut s = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        if s.1 && s.0 > 0 {
            s.1 = false;
            self.freed.notify_one();
        }
    }
}

/// Takes items from the stage's queue while slots are free and starts a task for each.
fn feed<I: Item, O: Item>(
    parts: &AsyncParts<I, O>,
    slots: &Slots,
    handle: &tokio::runtime::Handle,
    items: Arc<ItemCtx<I, O>>,
    done: chan::Sender<Finished<I, O>>,
) {
    let ctx = &parts.ctx;
    let mut ready = VecDeque::new();
    loop {
        let free = slots.wait_free();
        let Some(taken) = parts.input.recv_upto_indexed(&mut ready, free) else {
            break;
        };
        let n = ready.len();
        if ctx.run.aborting() {
            ctx.received_cancelled(n as u64);
            ready.clear();
            continue;
        }
        ctx.stats.items_in.fetch_add(n as u64, Ordering::Relaxed);
        slots.take(n);
        ctx.stats.in_flight.fetch_add(n as u64, Ordering::Relaxed);
        for (index, item) in (taken.first..).zip(ready.drain(..)) {
            let report = Report {
                done: Some(done.clone()),
                index,
            };
            handle.spawn(item_task(items.clone(), item, report));
        }
    }
}

/// How an item ended.
enum Outcome<I, O> {
    /// It succeeded and emitted these (routed: the route's index and the item).
    Done {
        outs: Vec<O>,
        routed: RoutedItems,
    },
    DeadLetter(I, ItemFailure),
    /// Finally failed (recorded by the policy).
    Dropped,
    /// Cancelled: the run aborted while it was in flight.
    Cancelled,
}

/// An item's end, for the collector.
struct Finished<I, O> {
    index: u64,
    outcome: Outcome<I, O>,
    /// How long each attempt took, in ns.
    attempts: Vec<u64>,
}

/// Hands an item's end to the collector exactly once: when the task ends, or, if it is
/// dropped before (cancelled, or its runtime shut down), as cancelled.
struct Report<I, O> {
    done: Option<chan::Sender<Finished<I, O>>>,
    index: u64,
}

impl<I, O> Report<I, O> {
    fn send(&mut self, outcome: Outcome<I, O>, attempts: Vec<u64>) {
        if let Some(tx) = self.done.take() {
            let _ = tx.send(Finished {
                index: self.index,
                outcome,
                attempts,
            });
        }
    }
}

impl<I, O> Drop for Report<I, O> {
    fn drop(&mut self) {
        self.send(Outcome::Cancelled, Vec::new());
    }
}

/// One item, from its first attempt to its end, unless the run aborts first (then its
/// future is dropped here, which runs its guards, and the report says cancelled).
async fn item_task<I: Item, O: Item>(items: Arc<ItemCtx<I, O>>, item: I, mut report: Report<I, O>) {
    let mut cancel = items.cancel.clone();
    let mut attempts = Vec::new();
    let outcome = {
        let work = pin!(run_item(&items, item, report.index, &mut attempts));
        let aborted = pin!(cancel.wait_for(|aborting| *aborting));
        match futures::future::select(work, aborted).await {
            Either::Left((outcome, _)) => outcome,
            Either::Right(_) => Outcome::Cancelled,
        }
    };
    report.send(outcome, attempts);
}

/// The attempts at one item, by the stage's policy.
async fn run_item<I: Item, O: Item>(
    items: &ItemCtx<I, O>,
    item: I,
    index: u64,
    attempts: &mut Vec<u64>,
) -> Outcome<I, O> {
    let ctx = &items.ctx;
    let keep = ctx.policy.keeps_item();
    let mut item = Some(item);
    let mut attempt = 1;
    loop {
        let this = if keep { item.clone() } else { item.take() }.expect("item present");
        let out = AsyncOutput::new(items.routes.clone());
        let t0 = quanta::Instant::now();
        let r = attempt_once(items, this, out.clone()).await;
        attempts.push(t0.elapsed().as_nanos() as u64);
        let (outs, routed) = out.close();
        let c = match r {
            Ok(()) => return Outcome::Done { outs, routed },
            Err(c) => c,
        };
        if c.stop && ctx.run.aborting() {
            return Outcome::Cancelled;
        }
        match ctx.failure(index, attempt, c.kind, c.message, None) {
            Verdict::Retry(delay) => {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                attempt += 1;
            }
            Verdict::DeadLetter(failure) => {
                return Outcome::DeadLetter(item.take().expect("kept item"), failure)
            }
            Verdict::Dropped => return Outcome::Dropped,
        }
    }
}

/// One attempt: the stage's future under the stage's time limit, a panic caught.
async fn attempt_once<I, O>(
    items: &ItemCtx<I, O>,
    item: I,
    out: AsyncOutput<O>,
) -> Result<(), Caught> {
    attempt(&*items.stage, item, out, items.timeout).await
}

/// One attempt at `item` with `stage` (here, and in an async ipc_fork worker): its future
/// under the time limit `timeout` (dropped when it passes), a panic caught as the item's
/// failure.
pub(crate) async fn attempt<I, O>(
    stage: &dyn ErasedAsync<I, O>,
    item: I,
    out: AsyncOutput<O>,
    timeout: Option<Duration>,
) -> Result<(), Caught> {
    let fut = CatchPanic(catch_panic(|| stage.process(item, out))?);
    match timeout {
        None => fut.await,
        Some(limit) => tokio::time::timeout(limit, fut).await.unwrap_or_else(|_| {
            Err(Caught {
                kind: FailureKind::Timeout,
                message: format!("the item's future ran past its timeout of {limit:?}"),
                stop: false,
            })
        }),
    }
}

/// A stage's future whose polls catch a panic as the item's failure (with its message and
/// location).
pub(crate) struct CatchPanic(pub(crate) BoxFuture<'static, StageResult>);

impl Future for CatchPanic {
    type Output = Result<(), Caught>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match catch_panic(|| self.0.as_mut().poll(cx)) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(r)) => Poll::Ready(r.map_err(caught_error)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

/// Routes each finished item's outputs, then frees its slot; returns when the feeder and
/// every task have ended.
fn collect<I: Item, O: Item>(
    parts: &AsyncParts<I, O>,
    slots: &Slots,
    done: &chan::Receiver<Finished<I, O>>,
    cancel: &watch::Sender<bool>,
    router: &mut Router<O>,
    ordered: bool,
) {
    let ctx = &parts.ctx;
    let mut release = Release::new(ordered);
    let mut rec = Recorder::new(&ctx.stats);
    let mut cancelled = false;
    let mut cancel_if_aborting = || {
        if !cancelled && ctx.run.aborting() {
            cancelled = true;
            let _ = cancel.send(true);
        }
    };
    loop {
        let f = match done.try_recv() {
            Ok(f) => f,
            Err(chan::TryRecvError::Disconnected) => break,
            Err(chan::TryRecvError::Empty) => {
                // About to wait: send what is held, let the feeder fill every free slot, and
                // let live views see the figures.
                flush(ctx, router);
                slots.wake();
                rec.idle(quanta::Instant::now());
                match done.recv_timeout(ABORT_POLL) {
                    Ok(f) => f,
                    Err(chan::RecvTimeoutError::Timeout) => {
                        cancel_if_aborting();
                        continue;
                    }
                    Err(chan::RecvTimeoutError::Disconnected) => break,
                }
            }
        };
        cancel_if_aborting();
        for ns in &f.attempts {
            rec.latency_busy_local(*ns, *ns);
        }
        match f.outcome {
            Outcome::Done { outs, routed } => {
                for o in outs {
                    release.emit(f.index, o, router);
                }
                for (route, item) in routed {
                    if let Err(e) = router.route_index(route, item) {
                        tracing::debug!(stage = %ctx.name, item = f.index, error = %e, "routed item refused");
                    }
                }
            }
            Outcome::DeadLetter(item, failure) => dead_letter(parts, item, failure),
            Outcome::Dropped => {}
            Outcome::Cancelled => {
                ctx.stats.cancelled.fetch_add(1, Ordering::Relaxed);
            }
        }
        release.finished(f.index, router);
        ctx.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        ctx.items_done(1);
        slots.release();
    }
    release.release_all(router);
}

/// The stage's `finish`, on its runtime (cancelled if the run aborts); what it emits goes
/// out after every item's outputs.
fn finish<I, O: Item>(
    ctx: &StageCtx,
    stage: &dyn ErasedAsync<I, O>,
    handle: &tokio::runtime::Handle,
    router: &mut Router<O>,
    mut cancel: watch::Receiver<bool>,
) {
    let out = AsyncOutput::new(router.routes.clone());
    let r = catch_panic(|| stage.finish(out.clone())).and_then(|fut| {
        handle.block_on(async {
            let aborted = pin!(cancel.wait_for(|aborting| *aborting));
            match futures::future::select(CatchPanic(fut), aborted).await {
                Either::Left((r, _)) => r,
                Either::Right(_) => Ok(()),
            }
        })
    });
    let (outs, routed) = out.close();
    for o in outs {
        let _ = crate::stage::Sink::send(router, o);
    }
    for (route, item) in routed {
        let _ = router.route_index(route, item);
    }
    if let Err(c) = r {
        if !c.stop {
            ctx.stage_error(c.kind, format!("finish: {}", c.message), None);
        }
    }
}
