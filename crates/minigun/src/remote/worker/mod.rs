//! The worker side of a remote stage: this same program, started as a worker, serving the
//! runs its parent announces.
//!
//! ```text
//!  broker :in ─> fetcher ─> local queue (index, item) ─> worker_exec (e.g. ipc_fork) running
//!                  ▲                                      the stage, wrapped: outputs tagged
//!  keeper: register, heartbeat,                          with their item's index
//!  reclaim, split, dead-letter           committers <─ tagged outputs, final failures
//!                                            └─> broker: results + ack of a whole entry, atomically
//! ```
//!
//! - The stage's own code runs under the local executor `worker_exec`, wrapped so that each
//!   output carries its item's index and each success ends with a `Done` mark; a final
//!   failure (after the stage's retries, applied here) reaches a local dead-letter queue with
//!   the item and its index. A crash under a fork `worker_exec` is therefore an ordinary
//!   item failure, decided here, with no redelivery.
//! - An entry is committed when every one of its items has its terminal result: results
//!   and acknowledgement in one atomic call that publishes nothing if another worker has
//!   taken the entry since (`lease_lost`).
//! - The keeper refreshes the worker's registration and the lease of every entry it holds
//!   every `heartbeat`, and every quarter of `claim_idle` reclaims entries idle past
//!   `claim_idle` (their worker was lost): past `max_deliveries` an entry is dead-lettered
//!   with a `WorkerLost` failure for each item; a reclaimed batch of several items is split
//!   into single-item entries, so a poison item is isolated after one redelivery. A worker
//!   claims one entry at a time, busy or not; an entry delivered before starts only once the
//!   worker holds nothing else (it waits, its lease kept), and while it waits or runs the
//!   worker fetches and claims nothing else, so that entry, if it kills the worker again,
//!   takes no other entry's delivery with it.
//! - The fetcher fetches what the local run has room for: the items it runs at once and
//!   what it settles in [`AHEAD`] at the pace it has kept (at least one entry, at most
//!   [`MAX_AHEAD`]), so fast items come many entries per round trip and slow ones one entry
//!   at a time, leaving the rest to other workers. It fetches once half of that room is
//!   free, or when the local run is about to run dry, so the takes stay large while the
//!   commits free room an entry or two at a time. The committers commit every entry that a
//!   chunk of the local run's results completed in one call. The run's state is read every
//!   [`FETCH_BLOCK`] or after an empty fetch.
//! - On `Finishing` the worker stops fetching, lets its local run end (which runs the
//!   stage's `finish`), and publishes its `finish` outputs once. On `Aborted`, or when the
//!   run's keys are gone, it stops at once and leaves its entries.
//! - When the local run aborts by itself (the stage cannot run on this host: its instance
//!   cannot be made, its fork workers keep failing to start), the worker releases what it
//!   holds (claimable at once, no delivery counted), leaves the run and fetches nothing more
//!   of it: its entries go to the other workers.
//! - On SIGTERM (or [`ServeOptions::stop_flag`](super::ServeOptions::stop_flag)) it stops fetching, gives its running items
//!   `grace` to finish and commit, releases the rest (claimable at once, no delivery
//!   counted), and leaves.

mod commit;
mod keeper;

use super::broker::*;
use super::options::{fingerprint, Remote};
use super::wire::{self, RemoteFailure, WorkerStats};
use crate::ctx::StageCtx;
use crate::error::{EmitError, FailureKind, StageResult};
use crate::exec::parts::Parts;
use crate::exec::runner::{Crossing, ForkHooks, Runner};
use crate::exec::Exec;
use crate::ipc::codec::Codec;
use crate::loops::Membership;
use crate::policy::{Final, OnError};
use crate::queue::{self, Capacity, FanOut, QueueTx};
use crate::route::Router;
use crate::shared::{host_name, unique_id, RunShared};
use crate::stage::{Factory, Failed, Output, Sink, Stage, Wire};
use crate::stats::StageStats;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a fetch waits for an entry before the fetcher looks at the run's state.
const FETCH_BLOCK: Duration = Duration::from_millis(50);
/// How far a worker fetches ahead of the items it runs: what it runs in this long at the
/// pace it has kept so far (at least one entry, at most [`MAX_AHEAD`] entries). Fast items
/// come many entries per fetch; slow ones one entry at a time, which leaves the rest to
/// other workers.
const AHEAD: Duration = Duration::from_millis(20);
/// Entries fetched ahead, at most: with fetches at half of it (see
/// [`RunServer::wait_for_room`]), 16 entries per round trip for fast items (16 ahead gave 8,
/// and W7b 0.58x the hand-written loop against 0.65x with 32, in four alternated runs each).
const MAX_AHEAD: usize = 32;

/// How a served stage makes its instances: a sync stage's factory or an async one's.
pub(crate) enum ServedFactory<I, O> {
    Sync(Factory<I, O>),
    #[cfg(feature = "async")]
    Async(crate::async_stage::AsyncFactory<I, O>),
}

/// A remote stage's code, as a worker serves it.
pub(crate) struct ServedStage<I, O> {
    pub(crate) pipeline: String,
    pub(crate) name: String,
    pub(crate) factory: ServedFactory<I, O>,
    pub(crate) remote: Remote,
    pub(crate) policy: OnError,
    pub(crate) hooks: ForkHooks,
}

/// A remote stage a worker can serve (type-erased).
pub(crate) trait Served: Send + Sync {
    /// The stage's qualified name.
    fn stage(&self) -> &str;
    /// Its settings (the broker among them).
    fn remote(&self) -> &Remote;
    /// The fingerprint a run must have to be served, and its text.
    fn fingerprint(&self) -> (String, String);
    /// Serves one announced run until it ends.
    fn serve(&self, a: &Announcement, stop: &AtomicBool) -> Result<WorkerStats, String>;
}

/// The typed [`Served`] of a stage with codec `C`.
pub(crate) fn served<I: Wire, O: Wire, C: Codec>(s: ServedStage<I, O>) -> Box<dyn Served> {
    Box::new(Typed::<I, O, C> {
        s,
        _c: std::marker::PhantomData,
    })
}

struct Typed<I, O, C> {
    s: ServedStage<I, O>,
    _c: std::marker::PhantomData<fn() -> C>,
}

impl<I: Wire, O: Wire, C: Codec> Served for Typed<I, O, C> {
    fn stage(&self) -> &str {
        &self.s.name
    }
    fn remote(&self) -> &Remote {
        &self.s.remote
    }
    fn fingerprint(&self) -> (String, String) {
        fingerprint(
            &self.s.pipeline,
            &self.s.name,
            std::any::type_name::<I>(),
            std::any::type_name::<O>(),
            std::any::type_name::<C>(),
            self.s.remote.build_id.as_deref(),
        )
    }
    fn serve(&self, a: &Announcement, stop: &AtomicBool) -> Result<WorkerStats, String> {
        let (fp, text) = self.fingerprint();
        if a.fingerprint != fp {
            return Err(format!(
                "refusing run {}: the parent's definition differs from this worker's \
                 (parent: {}; worker: {text})",
                a.stage_run, a.fingerprint_text
            ));
        }
        RunServer::<I, O, C>::new(&self.s, a, stop)?.serve()
    }
}

/// What a wrapped stage emits: its outputs tagged with their item's index, each success's
/// end, and its `finish` outputs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(bound(
    serialize = "O: Serialize",
    deserialize = "O: serde::de::DeserializeOwned"
))]
pub(crate) enum Tagged<O> {
    Out(u64, O),
    Done(u64, u64),
    Flush(O),
}

/// The user's stage, taking `(index, item)` and tagging what it emits.
struct Indexed<I, O> {
    inner: Box<dyn Stage<I, O>>,
}

struct TagSink<'a, 'b, O> {
    index: Option<u64>,
    out: &'a mut Output<'b, Tagged<O>>,
}

impl<O> Sink<O> for TagSink<'_, '_, O> {
    fn send(&mut self, item: O) -> Result<(), EmitError> {
        match self.index {
            Some(i) => self.out.emit(Tagged::Out(i, item)),
            None => self.out.emit(Tagged::Flush(item)),
        }
    }
    fn route(&mut self, target: &str, _: crate::stage::Routed) -> Result<(), EmitError> {
        Err(EmitError::Route(format!(
            "a remote stage cannot route to {target:?}: it sends its results to its downstreams"
        )))
    }
}

impl<I: Send + 'static, O: Send + 'static> Stage<(u64, I), Tagged<O>> for Indexed<I, O> {
    fn process(&mut self, (index, item): (u64, I), out: &mut Output<'_, Tagged<O>>) -> StageResult {
        let t0 = quanta::Instant::now();
        let mut sink = TagSink {
            index: Some(index),
            out,
        };
        self.inner.process(item, &mut Output::new(&mut sink))?;
        let ns = t0.elapsed().as_nanos() as u64;
        out.emit(Tagged::Done(index, ns))?;
        Ok(())
    }
    fn finish(&mut self, out: &mut Output<'_, Tagged<O>>) -> StageResult {
        let mut sink = TagSink { index: None, out };
        self.inner.finish(&mut Output::new(&mut sink))
    }
}

/// The user's async stage, taking `(index, item)` and tagging what it emits (as [`Indexed`]
/// does for a sync stage): the item's outputs, then its end, once its future has completed.
#[cfg(feature = "async")]
struct AsyncIndexed<I, O> {
    inner: Arc<dyn crate::async_stage::ErasedAsync<I, O>>,
}

#[cfg(feature = "async")]
impl<I: Send + 'static, O: Send + 'static> crate::AsyncStage<(u64, I), Tagged<O>>
    for AsyncIndexed<I, O>
{
    fn process(
        &self,
        (index, item): (u64, I),
        out: crate::AsyncOutput<Tagged<O>>,
    ) -> impl std::future::Future<Output = StageResult> + Send + 'static {
        let emitted = out.sibling();
        let t0 = quanta::Instant::now();
        let fut = self.inner.process(item, emitted.clone());
        async move {
            fut.await?;
            let ns = t0.elapsed().as_nanos() as u64;
            for o in emitted.close().0 {
                out.emit(Tagged::Out(index, o))?;
            }
            out.emit(Tagged::Done(index, ns))?;
            Ok(())
        }
    }
    fn finish(
        &self,
        out: crate::AsyncOutput<Tagged<O>>,
    ) -> impl std::future::Future<Output = StageResult> + Send + 'static {
        let emitted = out.sibling();
        let fut = self.inner.finish(emitted.clone());
        async move {
            fut.await?;
            for o in emitted.close().0 {
                out.emit(Tagged::Flush(o))?;
            }
            Ok(())
        }
    }
}

/// An entry this worker holds, until it is committed, released or given up.
struct Held {
    id: EntryId,
    count: u32,
    /// Items without a terminal result yet.
    left: u32,
    deliveries: u32,
    /// Delivered before (a redelivery, or a part split from one): it runs alone.
    suspect: bool,
    /// The frames of its items so far, as they came (each item's outputs come before its
    /// terminal frame; the parent reads them by item index).
    results: Vec<u8>,
    /// Items whose output could not be encoded: they fail with `Encode`.
    broken: HashMap<u64, String>,
    /// The item and start of the last output frame written to `results`: if it is still
    /// the last frame when that item ends, the end is merged into it.
    last_output: Option<(u64, usize)>,
    /// Every item has its terminal result and the entry is being committed (its results
    /// taken): it is held, and its lease kept, until the commit has an answer.
    committing: bool,
}

struct Book {
    /// Held entries by their first index.
    held: BTreeMap<u64, Held>,
    /// Items in the local run.
    local: usize,
    /// Items that reached their terminal result, ever.
    settled: u64,
    /// Held entries that were delivered before (see `Held::suspect`).
    suspects: usize,
    /// The `finish` outputs.
    flush: Vec<u8>,
    stats: WorkerStats,
}

/// A redelivered entry waiting to run alone: its first index and its items.
type Waiting<I> = (u64, Vec<(u64, I)>);

/// One run being served.
struct RunServer<'a, I, O, C> {
    s: &'a ServedStage<I, O>,
    run: StageRun,
    a: &'a Announcement,
    consumer: String,
    stop: &'a AtomicBool,
    book: Mutex<Book>,
    changed: Condvar,
    /// Items the local run runs at once, and a queue's worth more (always room for them).
    running: usize,
    /// Entries the keeper took over, for the fetcher to run.
    reclaimed: Mutex<VecDeque<Delivery>>,
    /// The worker is leaving the run (it released its entries): the keeper claims nothing.
    leaving: AtomicBool,
    /// A redelivered entry waiting to run alone.
    alone: Mutex<Option<Waiting<I>>>,
    _c: std::marker::PhantomData<fn() -> C>,
}

impl<'a, I: Wire, O: Wire, C: Codec> RunServer<'a, I, O, C> {
    fn new(
        s: &'a ServedStage<I, O>,
        a: &'a Announcement,
        stop: &'a AtomicBool,
    ) -> Result<Self, String> {
        let exec = local_exec(&s.remote.worker_exec);
        Ok(RunServer {
            s,
            run: a.stage_run.clone(),
            a,
            consumer: unique_id(),
            stop,
            book: Mutex::new(Book {
                held: BTreeMap::new(),
                local: 0,
                settled: 0,
                suspects: 0,
                flush: Vec::new(),
                stats: WorkerStats {
                    host: host_name(),
                    pid: std::process::id(),
                    ..WorkerStats::default()
                },
            }),
            changed: Condvar::new(),
            running: (exec.concurrency() * 2).max(1),
            reclaimed: Mutex::new(VecDeque::new()),
            leaving: AtomicBool::new(false),
            alone: Mutex::new(None),
            _c: std::marker::PhantomData,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn session(&self) -> Result<Box<dyn Session>, String> {
        self.s.remote.broker.session().map_err(|e| e.to_string())
    }

    fn info(&self) -> WorkerInfo {
        WorkerInfo {
            consumer: self.consumer.clone(),
            host: host_name(),
            pid: std::process::id(),
            concurrency: local_exec(&self.s.remote.worker_exec).concurrency() as u32,
            since_heartbeat: Duration::ZERO,
        }
    }

    fn serve(self) -> Result<WorkerStats, String> {
        let mut keeper = self.session()?;
        keeper
            .register(&self.run, &self.info())
            .map_err(|e| e.to_string())?;
        tracing::info!(run = %self.run, consumer = %self.consumer, "serving a remote stage");
        let local_run = Arc::new(RunShared::named(&self.s.pipeline, true));
        let stats = Arc::new(StageStats::default());
        let exec = local_exec(&self.s.remote.worker_exec);
        let most = self.running + MAX_AHEAD * self.s.remote.batch;
        let (tx, rx) = queue::channel::<(u64, I)>(Capacity::Bounded(most), stats.clone());
        let (otx, orx) = queue::channel::<Tagged<O>>(Capacity::Unbounded, stats.clone());
        let (dtx, drx) = queue::channel::<Failed<(u64, I)>>(Capacity::Unbounded, stats.clone());
        let ctx = Arc::new(StageCtx {
            name: self.s.name.clone(),
            exec: exec.clone(),
            policy: OnError {
                then: Final::DeadLetter,
                ..self.s.policy.clone()
            },
            stats: stats.clone(),
            run: local_run.clone(),
            lp: None,
        });
        let crossing = Crossing::<(u64, I), Tagged<O>>::local::<C>();
        let parts = Parts {
            ctx,
            input: rx,
            router: Router::new(
                vec![QueueTx::new(otx, Membership::default())],
                FanOut::Broadcast,
                stats.clone(),
            ),
            dead_letter: Some(QueueTx::new(dtx, Membership::default())),
            factory: (),
            wire: None,
        };
        let prepared = match &self.s.factory {
            ServedFactory::Sync(inner) => {
                let inner = inner.clone();
                let factory: Factory<(u64, I), Tagged<O>> =
                    Arc::new(move || Box::new(Indexed { inner: inner() }));
                let (runner, codec) = Runner::new(&exec, Some(crossing), self.s.hooks.clone());
                let parts = Parts {
                    wire: codec,
                    ..parts.map_factory(|()| factory)
                };
                runner.prepare(parts)
            }
            #[cfg(feature = "async")]
            ServedFactory::Async(inner) => {
                let inner = inner.clone();
                let factory: crate::async_stage::AsyncFactory<(u64, I), Tagged<O>> =
                    Arc::new(move || Arc::new(AsyncIndexed { inner: inner() }));
                let parts = parts.map_factory(|()| factory);
                local_async(&exec, crossing, parts, self.s.hooks.clone())
            }
        };
        let done = AtomicBool::new(false);
        let local_stats = stats.clone();
        let ended = std::thread::scope(|scope| {
            let builder =
                |name: &str| std::thread::Builder::new().name(format!("{}:{name}", self.s.name));
            let spawned = "spawn a worker thread";
            let local = builder("local")
                .spawn_scoped(scope, prepared)
                .expect(spawned);
            let outputs = builder("outputs")
                .spawn_scoped(scope, || self.outputs(orx))
                .expect(spawned);
            let failures = builder("failures")
                .spawn_scoped(scope, || self.failures(drx))
                .expect(spawned);
            let keep = builder("keeper")
                .spawn_scoped(scope, || self.keeper(&mut keeper, &done))
                .expect(spawned);
            let ended = self.fetcher(tx, &local_run);
            let _ = local.join();
            let _ = outputs.join();
            let _ = failures.join();
            {
                // Under the lock the keeper checks `done` with: it cannot miss the wake-up.
                let _book = self.lock();
                done.store(true, Ordering::Relaxed);
            }
            self.changed.notify_all();
            let _ = keep.join();
            ended
        });
        {
            let mut book = self.lock();
            book.stats.retried = local_stats.retried.load(Ordering::Relaxed);
            let h = local_stats
                .latency
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            book.stats.latency = wire::histogram_bytes(&h);
        }
        self.end(ended)
    }

    /// Fetches entries into the local run until the run is over for this worker.
    fn fetcher(&self, tx: queue::Sender<(u64, I)>, local_run: &RunShared) -> Ended {
        let mut session = match self.session() {
            Ok(s) => s,
            Err(_) => return Ended::Lost,
        };
        let mut own = true;
        // Since when the run's keys are missing: a server that restarted without them gets
        // them back from the parent within moments; a run whose parent is gone does not.
        let mut missing: Option<Instant> = None;
        let patience = (self.a.claim_idle * 2).max(Duration::from_secs(5));
        // The run's state is read when a fetch found nothing, and at least every
        // FETCH_BLOCK while entries keep coming (not once per entry).
        let mut looked: Option<Instant> = None;
        let mut pace = Pace::new();
        let ended = loop {
            if self.stop.load(Ordering::Relaxed) {
                break Ended::Stopped;
            }
            // The local run aborted by itself: the stage cannot run here. What this worker
            // holds goes to the others at once; it fetches nothing more of this run.
            if local_run.aborting() {
                let why = local_run
                    .take_cause()
                    .map_or_else(|| "the local run stopped".into(), |f| f.message);
                break Ended::Failed(why);
            }
            let look = looked.is_none_or(|t| t.elapsed() >= FETCH_BLOCK);
            match if look {
                session.control(&self.run)
            } else {
                Ok(Some(Control::Running))
            } {
                Ok(Some(Control::Running)) => {
                    missing = None;
                    if look {
                        looked = Some(Instant::now());
                    }
                }
                Ok(Some(Control::Finishing)) => break Ended::Finishing,
                Ok(Some(Control::Aborted)) => break Ended::Aborted,
                Ok(None) | Err(BrokerError::NoRun) => {
                    let since = *missing.get_or_insert_with(Instant::now);
                    if since.elapsed() > patience {
                        break Ended::Aborted;
                    }
                    own = true;
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                Err(e) if e.is_transient() => {
                    std::thread::sleep(Duration::from_millis(50));
                    if let Ok(s) = self.session() {
                        session = s;
                    }
                    own = true;
                    continue;
                }
                Err(_) => break Ended::Lost,
            }
            let taken_over: Vec<Delivery> = self
                .reclaimed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .drain(..)
                .collect();
            for d in taken_over {
                self.take(&mut *session, d, &tx);
            }
            self.run_waiting(&tx);
            let Some(count) = self.wait_for_room(pace.room(self)) else {
                continue;
            };
            // Our own entries again (after an error): all of them, for those whose delivery
            // was lost with a reply are among them; `take` leaves alone the ones this worker
            // holds already (they run here).
            let again = std::mem::take(&mut own);
            let count = match again {
                true => self.lock().held.len() + 2 * MAX_AHEAD,
                false => count,
            };
            let got = session.fetch(&self.run, &self.consumer, count, FETCH_BLOCK, again);
            match got {
                Ok(deliveries) => {
                    if deliveries.is_empty() {
                        looked = None;
                    }
                    let (deliveries, back) = one_suspect(deliveries);
                    self.give_back(&mut *session, &back);
                    for d in deliveries {
                        self.take(&mut *session, d, &tx);
                    }
                }
                Err(_) => {
                    // Read our own pending entries first after any error: a reply lost on
                    // the way left them delivered to us.
                    own = true;
                    std::thread::sleep(Duration::from_millis(50));
                    if let Ok(s) = self.session() {
                        session = s;
                    }
                }
            }
        };
        match &ended {
            Ended::Finishing => drop(tx),
            Ended::Stopped => {
                self.grace();
                local_run.abort(self.stop_failure());
                drop(tx);
                self.release(&mut *session);
            }
            Ended::Failed(_) => {
                drop(tx);
                self.release(&mut *session);
            }
            _ => {
                local_run.abort(self.stop_failure());
                drop(tx);
                let mut book = self.lock();
                book.held.clear();
                book.suspects = 0;
            }
        }
        ended
    }

    fn stop_failure(&self) -> crate::error::ItemFailure {
        crate::error::ItemFailure {
            stage: self.s.name.clone(),
            item: None,
            attempt: 1,
            kind: FailureKind::Cancelled,
            message: "the worker stops serving the run".into(),
            pid: Some(std::process::id()),
        }
    }

    /// Waits until the local run has room; the number of entries to fetch, or `None` if it
    /// is time to look at the run again. While it runs an entry that was delivered before,
    /// nothing else is fetched: if that entry kills the worker again, it takes no other
    /// entry's delivery with it.
    fn wait_for_room(&self, room: usize) -> Option<usize> {
        let batch = self.s.remote.batch;
        // Fetch in large takes: once half the entries ahead are free, or when the local run
        // is about to run dry. Fetching each entry as soon as a commit frees its room made
        // fast items come a few entries per round trip, and their commits as small.
        let half = (room.saturating_sub(self.running) / batch / 2).max(1);
        let free = |b: &Book| {
            if b.local >= room || b.suspects != 0 {
                return None;
            }
            let n = (room - b.local) / batch;
            (n >= half || b.local <= self.running).then(|| n.clamp(1, MAX_AHEAD))
        };
        let book = self.lock();
        if let Some(n) = free(&book) {
            return Some(n);
        }
        let (book, _) = self
            .changed
            .wait_timeout(book, FETCH_BLOCK)
            .unwrap_or_else(|e| e.into_inner());
        free(&book)
    }

    /// Entries fetched beyond one that runs alone: claimable again at once, no delivery
    /// counted.
    fn give_back(&self, session: &mut dyn Session, back: &[Delivery]) {
        if back.is_empty() {
            return;
        }
        let ids: Vec<(EntryId, u32)> = back.iter().map(|d| (d.id.clone(), d.deliveries)).collect();
        if let Err(e) = session.release(&self.run, &self.consumer, &ids, self.a.claim_idle) {
            tracing::debug!(run = %self.run, error = %e, "could not give entries back; they will be reclaimed");
        }
    }

    /// A delivered entry: split if it is a redelivered batch, else its items go to the local
    /// run.
    fn take(&self, session: &mut dyn Session, d: Delivery, tx: &queue::Sender<(u64, I)>) {
        let items = match wire::decode_items::<C, I>(&d.entry.payload, self.s.remote.max_frame) {
            Ok(items) => match misnumbered(&items, d.entry.first, d.entry.count) {
                None => items,
                Some(why) => return self.garbage(session, &d, why),
            },
            Err(m) => return self.garbage(session, &d, m),
        };
        if self
            .lock()
            .held
            .get(&d.entry.first)
            .is_some_and(|h| h.id == d.id)
        {
            // This very entry, delivered again (the keeper claimed it back after its lease
            // lapsed, or a claim and a re-read of the worker's own entries both found it):
            // it runs here already, and is neither split nor given back.
            return;
        }
        if d.deliveries >= 2 && items.len() > 1 {
            return self.split(session, &d, items);
        }
        {
            let suspect = is_suspect(&d);
            // Its lock is never taken under the book's.
            let one_waits = self.waiting().is_some();
            let mut book = self.lock();
            if overlaps(&book.held, d.entry.first, d.entry.count) {
                // Another copy of items this worker runs (a send that failed part way was
                // sent again, or a reconciliation re-added them): holding both would mix
                // their results under one entry. It goes back unrun, no delivery counted;
                // whoever takes it later runs it again, and the parent keeps one result.
                drop(book);
                tracing::debug!(run = %self.run, entry = %d.id, first = d.entry.first, "gave back a copy of items this worker runs");
                return self.give_back(session, std::slice::from_ref(&d));
            }
            // A redelivered entry runs alone: beside others it would take their deliveries
            // with it if it kills the worker again. It waits, held (its lease kept), until
            // the worker holds nothing else.
            let alone = !suspect || book.held.is_empty();
            if !alone && one_waits {
                // One waits already (never so: nothing is fetched or claimed while it does).
                drop(book);
                return self.give_back(session, std::slice::from_ref(&d));
            }
            if alone {
                book.local += items.len();
            }
            book.suspects += suspect as usize;
            book.held.insert(
                d.entry.first,
                Held {
                    id: d.id.clone(),
                    count: d.entry.count,
                    left: d.entry.count,
                    deliveries: d.deliveries,
                    suspect,
                    results: Vec::new(),
                    broken: HashMap::new(),
                    last_output: None,
                    committing: false,
                },
            );
            if !alone {
                drop(book);
                tracing::debug!(run = %self.run, entry = %d.id, "a redelivered entry waits to run alone");
                *self.waiting() = Some((d.entry.first, items));
                return;
            }
        }
        let mut items = items;
        tx.send_all(&mut items);
    }

    /// The redelivered entry waiting to run alone, if any.
    fn waiting(&self) -> MutexGuard<'_, Option<Waiting<I>>> {
        self.alone.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the waiting redelivered entry once the worker holds nothing else (it is
    /// forgotten if it is no longer held: released, or the run ended).
    fn run_waiting(&self, tx: &queue::Sender<(u64, I)>) {
        let mut waiting = self.waiting();
        let Some((first, _)) = waiting.as_ref() else {
            return;
        };
        let mut book = self.lock();
        if !book.held.contains_key(first) {
            *waiting = None;
            return;
        }
        if book.held.len() > 1 {
            return;
        }
        let (_, mut items) = waiting.take().expect("checked");
        book.local += items.len();
        drop(book);
        drop(waiting);
        tx.send_all(&mut items);
    }

    /// An entry that does not decode into this stage's items: dead-lettered as `Protocol`.
    fn garbage(&self, session: &mut dyn Session, d: &Delivery, why: String) {
        tracing::warn!(run = %self.run, entry = %d.id, error = %why, "a malformed work entry is dead-lettered");
        let mut results = Vec::new();
        let f = self.failure(
            FailureKind::Protocol,
            format!("malformed work entry: {why}"),
            1,
        );
        for i in entry_items(&d.entry) {
            wire::push_failed(&mut results, i, &f);
        }
        if let Ok(true) = session.dead_letter(&self.run, &d.id, Duration::ZERO, &results) {
            self.lock().stats.dead_lettered += 1;
        }
    }

    /// A redelivered batch becomes single-item entries, each carrying the deliveries spent.
    fn split(&self, session: &mut dyn Session, d: &Delivery, items: Vec<(u64, I)>) {
        let attempts = d
            .entry
            .attempts
            .saturating_add(d.deliveries.saturating_sub(1));
        let mut parts = Vec::with_capacity(items.len());
        for (index, item) in &items {
            let mut payload = Vec::new();
            if wire::push_item::<C, I>(&mut payload, *index, item, self.s.remote.max_frame).is_ok()
            {
                parts.push(NewEntry {
                    first: *index,
                    count: 1,
                    attempts,
                    payload,
                });
            }
        }
        match session.split(&self.run, &self.consumer, &d.id, &parts) {
            Ok(true) => {
                tracing::debug!(run = %self.run, entry = %d.id, items = parts.len(), "a redelivered batch was split")
            }
            Ok(false) => {}
            Err(e) => {
                tracing::debug!(run = %self.run, error = %e, "split failed; the entry will be reclaimed again")
            }
        }
    }

    fn failure(&self, kind: FailureKind, message: String, attempt: u32) -> RemoteFailure {
        RemoteFailure {
            kind,
            message,
            attempt,
            pid: Some(std::process::id()),
            host: host_name(),
        }
    }

    /// After a stop: the running items get `grace` to finish and commit.
    fn grace(&self) {
        let until = Instant::now() + self.s.remote.grace;
        // A redelivered entry waiting to run alone does not start any more: it is released.
        let waiting = self.waiting().take().map(|(first, _)| first);
        let mut book = self.lock();
        while book.held.keys().any(|&f| Some(f) != waiting) && Instant::now() < until {
            book = self
                .changed
                .wait_timeout(book, Duration::from_millis(20))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Releases the entries still held, and those the keeper claimed that the fetcher did not
    /// take: claimable at once, no delivery counted. They are forgotten first, so nothing of
    /// them is committed after; an entry whose commit is under way stays with the committer.
    /// The keeper reclaims nothing more for this run.
    fn release(&self, session: &mut dyn Session) {
        self.leaving.store(true, Ordering::Relaxed);
        let held = {
            let mut book = self.lock();
            book.suspects = 0;
            // An entry being committed is the committer's: it answers, and removes it.
            let (committing, rest) = std::mem::take(&mut book.held)
                .into_iter()
                .partition(|(_, h)| h.committing);
            book.held = committing;
            rest
        };
        let claimed: Vec<Delivery> = self.claimed().drain(..).collect();
        let held: Vec<(EntryId, u32)> = held
            .into_values()
            .map(|h| (h.id, h.deliveries))
            .chain(claimed.into_iter().map(|d| (d.id, d.deliveries)))
            .collect();
        if held.is_empty() {
            return;
        }
        match session.release(&self.run, &self.consumer, &held, self.a.claim_idle) {
            Ok(()) => {
                self.lock().stats.released += held.len() as u64;
                tracing::info!(run = %self.run, entries = held.len(), "released unfinished entries");
            }
            Err(e) => {
                tracing::warn!(run = %self.run, error = %e, "could not release entries; they will be reclaimed after claim_idle")
            }
        }
    }

    /// The run is over for this worker: report.
    fn end(self, ended: Ended) -> Result<WorkerStats, String> {
        let (flush, stats) = {
            let b = self.lock();
            (b.flush.clone(), b.stats.clone())
        };
        let mut session = self.session()?;
        match ended {
            Ended::Finishing => {
                let _ = session.stats(&self.run, &self.consumer, &wire::encode_stats(&stats));
                session
                    .finished(&self.run, &self.consumer, &flush)
                    .map_err(|e| e.to_string())?;
            }
            Ended::Stopped | Ended::Failed(_) => {
                let _ = session.stats(&self.run, &self.consumer, &wire::encode_stats(&stats));
                let _ = session.unregister(&self.run, &self.consumer);
            }
            Ended::Aborted | Ended::Lost => {}
        }
        if let Ended::Failed(why) = ended {
            return Err(format!(
                "stopped serving run {}: the stage failed here ({why}); its entries were \
                 released to the other workers",
                self.run
            ));
        }
        tracing::info!(run = %self.run, ?ended, items = stats.items, "stopped serving the run");
        Ok(stats)
    }
}

/// The pace at which the local run settles items, for how far to fetch ahead.
struct Pace {
    since: Instant,
    settled: u64,
    per_sec: f64,
}

impl Pace {
    fn new() -> Pace {
        Pace {
            since: Instant::now(),
            settled: 0,
            per_sec: 0.0,
        }
    }

    /// Items the local run may hold now: those it runs, and what it settles in [`AHEAD`].
    fn room<I: Wire, O: Wire, C: Codec>(&mut self, r: &RunServer<'_, I, O, C>) -> usize {
        let t = self.since.elapsed();
        if t >= AHEAD {
            let settled = r.lock().settled;
            let now = (settled - self.settled) as f64 / t.as_secs_f64();
            self.per_sec = (self.per_sec + now) / 2.0;
            self.since = Instant::now();
            self.settled = settled;
        }
        let batch = r.s.remote.batch;
        let ahead = (self.per_sec * AHEAD.as_secs_f64()) as usize;
        r.running + ahead.clamp(batch, MAX_AHEAD * batch)
    }
}

/// Whether items `first..first + count` overlap an entry in `held`. Held entries never
/// overlap one another (a worker holds one copy of any item), so the one that starts last at
/// or before the new entry's last item is the only one that can.
fn overlaps(held: &BTreeMap<u64, Held>, first: u64, count: u32) -> bool {
    let last = first + u64::from(count.max(1)) - 1;
    held.range(..=last)
        .next_back()
        .is_some_and(|(&f, h)| f + u64::from(h.count) > first)
}

/// Why the items decoded from an entry that says `count` items from `first` on are not
/// those items (`None`: they are). A worker runs an entry's items only if they are exactly
/// `first..first + count`, in order: it settles each item under its entry by its index.
fn misnumbered<I>(items: &[(u64, I)], first: u64, count: u32) -> Option<String> {
    if items.len() != count as usize {
        return Some(format!(
            "{} items where the entry says {count}",
            items.len()
        ));
    }
    if count == 0 {
        return Some("an entry of no items".into());
    }
    // The last index is reserved (a worker's `finish` outputs), and none lies past it.
    if first.checked_add(u64::from(count)).is_none() {
        return Some(format!(
            "its {count} items from {first} on run past the last index"
        ));
    }
    let at = (0..)
        .zip(items)
        .find(|(k, (i, _))| first.checked_add(*k) != Some(*i));
    at.map(|(k, (i, _))| {
        format!(
            "its item {k} is numbered {i}, not {}",
            first.saturating_add(k)
        )
    })
}

/// The items an entry names, for failing them all (at most 2^20 of them: a malformed
/// entry's count does not size a failure list).
pub(super) fn entry_items(entry: &NewEntry) -> std::ops::Range<u64> {
    entry.first
        ..entry
            .first
            .saturating_add(u64::from(entry.count.min(1 << 20)))
}

/// Whether an entry was delivered before (a redelivery, or a part split from one).
fn is_suspect(d: &Delivery) -> bool {
    d.entry.attempts.saturating_add(d.deliveries) >= 2
}

/// Of a fetch's deliveries, those to run: every first delivery, then at most one suspect
/// entry, last, which runs alone once the others are done (see [`RunServer::take`]); the
/// other suspects, to give back.
fn one_suspect(deliveries: Vec<Delivery>) -> (Vec<Delivery>, Vec<Delivery>) {
    let mut suspect = false;
    let (mut run, back): (Vec<Delivery>, Vec<Delivery>) = deliveries.into_iter().partition(|d| {
        let keep = !is_suspect(d) || !suspect;
        suspect |= is_suspect(d);
        keep
    });
    run.sort_by_key(is_suspect);
    (run, back)
}

/// How serving a run ended for this worker.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ended {
    Finishing,
    Aborted,
    Stopped,
    Lost,
    /// The stage failed here (its instance could not be made, its workers keep failing to
    /// start): why.
    Failed(String),
}

/// The executor a worker runs the items under (a remote one cannot nest; an async stage's
/// ipc_fork where fork is missing runs under `tasks`, as many in flight).
fn local_exec(e: &Exec) -> Exec {
    match e {
        Exec::Remote(_) => Exec::Inline,
        #[cfg(feature = "async")]
        e @ Exec::IpcFork(o)
            if o.tasks_per_worker.is_some() && !crate::exec::runner::fork_available() =>
        {
            Exec::tasks(e.concurrency())
        }
        e if e.is_fork() && !crate::exec::runner::fork_available() => Exec::Inline,
        e => e.clone(),
    }
}

/// An async stage's local run on a worker, under `tasks` or ipc_fork (the planner checked
/// the worker executor where the definition was built).
#[cfg(feature = "async")]
fn local_async<I: Wire, O: Wire>(
    exec: &Exec,
    crossing: Crossing<(u64, I), Tagged<O>>,
    parts: crate::exec::tasks::AsyncParts<(u64, I), Tagged<O>>,
    hooks: ForkHooks,
) -> crate::exec::runner::PreparedRun {
    use crate::exec::runner::Across;
    match exec {
        Exec::Tasks(o) => {
            let ctx = parts.ctx.clone();
            crate::exec::tasks::prepare(parts, o.clone()).unwrap_or_else(|m| {
                ctx.stage_failed(FailureKind::Start, m);
                Box::new(|| ())
            })
        }
        Exec::IpcFork(o) => {
            crate::exec::runner::start_async(Across::Ipc(o.clone()), crossing, parts, hooks)
        }
        other => {
            let m = format!("an async stage cannot run under {other} on a worker");
            parts.ctx.stage_failed(FailureKind::Start, m);
            Box::new(move || crate::exec::parts::drain(&parts.ctx, &parts.input))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(count: u32) -> Held {
        Held {
            id: "1-0".into(),
            count,
            left: count,
            deliveries: 1,
            suspect: false,
            results: Vec::new(),
            broken: HashMap::new(),
            last_output: None,
            committing: false,
        }
    }

    #[test]
    fn an_entry_runs_only_if_it_holds_exactly_the_items_it_names() {
        let items = |ids: &[u64]| ids.iter().map(|&i| (i, ())).collect::<Vec<_>>();
        assert_eq!(misnumbered(&items(&[7, 8, 9]), 7, 3), None);
        let cases: [(&[u64], u64, u32, &str); 6] = [
            (&[7, 8], 7, 3, "2 items where the entry says 3"),
            (&[], 7, 0, "an entry of no items"),
            (&[7, 9, 8], 7, 3, "its item 1 is numbered 9, not 8"),
            (&[9], 2, 1, "its item 0 is numbered 9, not 2"),
            (
                &[5, 6],
                u64::MAX - 1,
                2,
                "its 2 items from 18446744073709551614 on run past the last index",
            ),
            (
                &[u64::MAX],
                u64::MAX,
                1,
                "its 1 items from 18446744073709551615 on run past the last index",
            ),
        ];
        for (ids, first, count, why) in cases {
            assert_eq!(
                misnumbered(&items(ids), first, count).as_deref(),
                Some(why),
                "{ids:?} from {first}"
            );
        }
        let e = |first, count| NewEntry {
            first,
            count,
            attempts: 0,
            payload: Vec::new(),
        };
        assert_eq!(entry_items(&e(5, 3)), 5..8);
        assert_eq!(entry_items(&e(u64::MAX - 1, 4)), u64::MAX - 1..u64::MAX);
        assert_eq!(entry_items(&e(0, u32::MAX)).count(), 1 << 20);
    }

    #[test]
    fn an_entry_overlaps_a_held_one_exactly_when_they_share_an_item() {
        // Held: items 10..20 and 30..31.
        let mut h = BTreeMap::new();
        h.insert(10, held(10));
        h.insert(30, held(1));
        // The same items again, and any range sharing one item with a held entry.
        for (first, count) in [
            (10, 10),
            (10, 1),
            (19, 1),
            (5, 6),
            (15, 20),
            (0, 100),
            (30, 1),
        ] {
            assert!(overlaps(&h, first, count), "{first}+{count} overlaps");
        }
        // Ranges beside them, between them, after them.
        for (first, count) in [(0, 10), (20, 10), (20, 1), (29, 1), (31, 5), (100, 1)] {
            assert!(
                !overlaps(&h, first, count),
                "{first}+{count} does not overlap"
            );
        }
        assert!(!overlaps(&BTreeMap::new(), 0, 10), "nothing held");
    }
}
