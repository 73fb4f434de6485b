//! The parent side of a remote stage: what runs in place of a local executor.
//!
//! ```text
//!  stage queue ─> sender (driver thread): index, batch into entries, wait for credit ─> broker :in
//!  downstream <─ collector thread: dedup by index, failures to the policy <─ broker :out
//! ```
//!
//! - The **sender** gives each item its index, packs items into entries (at most `batch`
//!   items or `batch_bytes`, sent after `linger`), and keeps at most `max_in_flight` items
//!   sent and not finished: past that it stops taking from the stage queue, so backpressure
//!   reaches the producer exactly as with a full local queue.
//! - The **collector** is the only reader of the out stream. It takes the **first** terminal
//!   result of each index (`done` or `error`) with the outputs before it, and drops later
//!   duplicates (a redelivered item that ran twice). Final failures go to the stage's policy
//!   (retries already happened on the worker): skip, dead-letter (the parent kept the item),
//!   or fail fast.
//! - Every entry stays in the parent's book until all its items are finished, so a server
//!   that lost entries (restart without persistence) gets them again: when the server's id
//!   changes, the parent announces the run again and re-sends every entry the server no
//!   longer has (reconciliation; an entry re-sent twice is deduplicated like any duplicate).
//! - When the input has ended and every index is finished, the run goes to `Finishing`:
//!   each registered worker runs `finish` on its stage instances and reports; a worker whose
//!   heartbeat lapses first is a stage error naming it. Then the run's keys are removed.
//! - Broker errors are retried with capped backoff; the stage fails only after `max_outage`
//!   without an answer. No item is counted failed for an outage.

use super::broker::*;
use super::options::{fingerprint, Remote};
use super::wire::{self, Outcome, RemoteFailure, FINISH_ID};
use crate::ctx::StageCtx;
use crate::error::{FailureKind, ItemFailure};
use crate::exec::order::Release;
use crate::exec::parts::{drain, Parts};
use crate::exec::runner::PreparedRun;
use crate::ipc::codec::Codec;
use crate::policy::Verdict;
use crate::queue::QueueTx;
use crate::report::{latency_of, RemoteReport, RemoteWorker};
use crate::route::Router;
use crate::stage::{Failed, Sink, Wire};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a blocking read of the out stream waits before the collector looks around.
const READ_BLOCK: Duration = Duration::from_millis(200);
/// How often the collector checks the server's identity and the worker table.
const LOOK_EVERY: Duration = Duration::from_millis(500);
/// Longest wait between two attempts of a failed broker call.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Starts a remote stage's parent side (run on the stage's driver thread).
pub(crate) fn start<I: Wire, O: Wire, C: Codec>(parts: Parts<I, O>, remote: Remote) -> PreparedRun {
    Box::new(move || run::<I, O, C>(parts, remote))
}

/// What sender and collector share.
struct Book<I> {
    /// Items sent and not finished.
    in_flight: usize,
    /// Indexes sent and not finished.
    open: HashSet<u64>,
    /// Entries not finished, by first index: what a reconciliation re-sends, with the
    /// items left and when it was sent.
    entries: BTreeMap<u64, Open>,
    /// Entries sent.
    sent: u64,
    /// Items kept for the dead-letter stage.
    kept: HashMap<u64, I>,
    /// Every item was sent: the stage has this many.
    total: Option<u64>,
    /// The collector stopped (the stage failed, or everything finished).
    over: bool,
}

/// An entry not finished.
struct Open {
    entry: NewEntry,
    left: u32,
    sent: Instant,
}

struct Shared<I> {
    book: Mutex<Book<I>>,
    /// The collector finished items (credit for the sender), or the run is over.
    changed: Condvar,
}

impl<I> Shared<I> {
    fn lock(&self) -> MutexGuard<'_, Book<I>> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn run<I: Wire, O: Wire, C: Codec>(parts: Parts<I, O>, remote: Remote) {
    let ctx = parts.ctx.clone();
    let stage_run = StageRun {
        pipeline: ctx.run.pipeline.clone(),
        run: ctx.run.id.clone(),
        stage: ctx.name.clone(),
    };
    let (fp, fp_text) = fingerprint(
        &stage_run.pipeline,
        &stage_run.stage,
        std::any::type_name::<I>(),
        std::any::type_name::<O>(),
        std::any::type_name::<C>(),
        remote.build_id.as_deref(),
    );
    let announcement = Announcement {
        stage_run: stage_run.clone(),
        fingerprint: fp,
        fingerprint_text: fp_text,
        claim_idle: remote.claim_idle,
        max_deliveries: remote.max_deliveries,
    };
    let link = Link::new(&remote, &ctx, &announcement);
    let (mut sender, mut collector) = match (link.open(), link.open()) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return start_failed(&parts, &remote, e),
    };
    if let Err(e) = link.call(&mut sender, |s| s.announce(&announcement)) {
        return start_failed(&parts, &remote, e);
    }
    tracing::debug!(stage = %ctx.name, run = %stage_run, "remote stage announced");
    let shared = Arc::new(Shared {
        book: Mutex::new(Book {
            in_flight: 0,
            open: HashSet::new(),
            entries: BTreeMap::new(),
            sent: 0,
            kept: HashMap::new(),
            total: None,
            over: false,
        }),
        changed: Condvar::new(),
    });
    let Parts {
        ctx: _,
        input,
        router,
        dead_letter: dl,
        factory,
        wire,
    } = parts;
    let sender_dl = dl.clone();
    std::thread::scope(|scope| {
        let c = Collector::<I, O, C> {
            ctx: &ctx,
            remote: &remote,
            link: &link,
            run: &stage_run,
            announcement: &announcement,
            shared: &shared,
            router: router.batched_until_flush(),
            dead_letter: dl,
            server: None,
            workers_seen: false,
            started: Instant::now(),
            report: RemoteReport {
                broker: remote.broker.name().to_string(),
                ..RemoteReport::default()
            },
            workers: BTreeMap::new(),
            round_trip: crate::stats::new_histogram(),
            release: Release::new(remote.ordered),
            _c: std::marker::PhantomData,
        };
        std::thread::Builder::new()
            .name(format!("{}:collect", ctx.name))
            .spawn_scoped(scope, move || c.run(&mut collector))
            .expect("spawn the remote collector");
        Sender::<I, C> {
            ctx: &ctx,
            remote: &remote,
            link: &link,
            run: &stage_run,
            shared: &shared,
            // Items are kept only for the dead-letter stage (retries happen on the worker).
            keep: sender_dl.is_some(),
            dead_letter: sender_dl,
            next: 0,
            _c: std::marker::PhantomData,
        }
        .run(&input, &mut sender);
    });
    drop((factory, wire));
    // Whatever is still queued (the run aborted) is cancelled.
    drain(&ctx, &input);
    let _ = link.call(&mut sender, |s| s.cleanup(&stage_run, remote.keep_keys));
}

/// Sends a finally failed item to the stage's dead-letter stage.
fn send_dead_letter<I>(
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

/// The stage cannot start: a clear stage failure; its queued items are cancelled.
fn start_failed<I, O>(parts: &Parts<I, O>, remote: &Remote, e: BrokerError) {
    let m = format!(
        "remote stage cannot reach its broker ({}): {e}",
        remote.broker.name()
    );
    parts.ctx.stage_failed(FailureKind::Start, m);
    drain(&parts.ctx, &parts.input);
}

/// Broker calls with the outage rule: transient errors are retried with capped backoff
/// until `max_outage` has passed without an answer.
/// A call that finds the run's keys gone (a server that restarted without them) announces
/// the run again and is made again; the collector re-sends what was lost.
struct Link<'a> {
    remote: &'a Remote,
    ctx: &'a StageCtx,
    announcement: &'a Announcement,
    /// Time spent waiting for the broker to answer again, in ns.
    outage_ns: std::sync::atomic::AtomicU64,
}

impl<'a> Link<'a> {
    fn new(remote: &'a Remote, ctx: &'a StageCtx, announcement: &'a Announcement) -> Self {
        Link {
            remote,
            ctx,
            announcement,
            outage_ns: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Time spent waiting for the broker to answer again.
    fn outage(&self) -> Duration {
        Duration::from_nanos(self.outage_ns.load(Ordering::Relaxed))
    }

    fn open(&self) -> BrokerResult<Box<dyn Session>> {
        self.retrying(|| self.remote.broker.session())
    }

    /// Calls `f` on `session`, reopening the session and retrying after transient errors.
    fn call<T>(
        &self,
        session: &mut Box<dyn Session>,
        mut f: impl FnMut(&mut dyn Session) -> BrokerResult<T>,
    ) -> BrokerResult<T> {
        self.retrying(|| match f(&mut **session) {
            Err(BrokerError::Unavailable(m)) => {
                if let Ok(s) = self.remote.broker.session() {
                    *session = s;
                }
                Err(BrokerError::Unavailable(m))
            }
            Err(BrokerError::NoRun) => {
                tracing::warn!(stage = %self.ctx.name, "the broker lost the run: announcing it again");
                session.announce(self.announcement)?;
                Err(BrokerError::Unavailable("the run was announced again".into()))
            }
            r => r,
        })
    }

    fn retrying<T>(&self, mut f: impl FnMut() -> BrokerResult<T>) -> BrokerResult<T> {
        let since = Instant::now();
        let mut wait = Duration::from_millis(10);
        loop {
            match f() {
                Err(BrokerError::Unavailable(m))
                    if since.elapsed() < self.remote.max_outage && !self.ctx.run.aborting() =>
                {
                    tracing::debug!(stage = %self.ctx.name, error = %m, "broker unavailable; retrying");
                    std::thread::sleep(wait);
                    self.outage_ns
                        .fetch_add(wait.as_nanos() as u64, Ordering::Relaxed);
                    wait = (wait * 2).min(MAX_BACKOFF);
                }
                r => return r,
            }
        }
    }
}

struct Sender<'a, I, C> {
    ctx: &'a StageCtx,
    remote: &'a Remote,
    link: &'a Link<'a>,
    run: &'a StageRun,
    shared: &'a Shared<I>,
    keep: bool,
    dead_letter: Option<QueueTx<Failed<I>>>,
    next: u64,
    _c: std::marker::PhantomData<fn() -> C>,
}

impl<I: Wire, C: Codec> Sender<'_, I, C> {
    /// Items from the stage queue into entries, until the input ends or the stage is over.
    fn run(&mut self, input: &crate::queue::Receiver<I>, session: &mut Box<dyn Session>) {
        let mut ready = VecDeque::new();
        let mut entry = Vec::new();
        let mut count = 0u32;
        let mut first = 0u64;
        let mut opened: Option<Instant> = None;
        while let Some(credit) = self.credit(count > 0) {
            if credit == 0 {
                // No room for more items: the partial entry goes now (its items are what
                // holds the credit, so waiting for its linger would wait for ever).
                self.send(session, &mut entry, first, &mut count);
                opened = None;
                continue;
            }
            let room = credit.min(self.remote.batch - count as usize).max(1);
            let more = match opened {
                None => Some(input.recv_upto(&mut ready, room)),
                Some(t) => input.recv_upto_until(&mut ready, room, t + self.remote.linger),
            };
            match more {
                Some(false) => break,
                None => {
                    // The linger passed: send the partial entry.
                    self.send(session, &mut entry, first, &mut count);
                    opened = None;
                    continue;
                }
                Some(true) => {}
            }
            if self.ctx.run.aborting() {
                self.ctx.received_cancelled(ready.len() as u64);
                ready.clear();
                continue;
            }
            self.ctx
                .stats
                .items_in
                .fetch_add(ready.len() as u64, Ordering::Relaxed);
            for item in ready.drain(..) {
                let index = self.next;
                self.next += 1;
                if count == 0 {
                    first = index;
                    opened = Some(Instant::now());
                }
                match wire::push_item::<C, I>(&mut entry, index, &item, self.remote.max_frame) {
                    Ok(()) => {
                        count += 1;
                        self.opened(index, item);
                    }
                    Err(e) => {
                        // Not sendable: this item fails here, alone.
                        self.unsendable(index, item, e, &mut first, count);
                    }
                }
                if count as usize >= self.remote.batch || entry.len() >= self.remote.batch_bytes {
                    self.send(session, &mut entry, first, &mut count);
                    opened = None;
                }
            }
            if self.remote.linger.is_zero() {
                self.send(session, &mut entry, first, &mut count);
                opened = None;
            }
        }
        self.send(session, &mut entry, first, &mut count);
        let mut book = self.shared.lock();
        book.total = Some(self.next);
        drop(book);
        self.shared.changed.notify_all();
        // Wait for the collector to finish every item (or give up).
        let mut book = self.shared.lock();
        while !book.over {
            book = self
                .shared
                .changed
                .wait(book)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Free room for items (waits for it, unless a partial entry is waiting to be sent:
    /// then `Some(0)`); `None` once the stage is over.
    fn credit(&self, partial: bool) -> Option<usize> {
        let mut book = self.shared.lock();
        loop {
            if book.over {
                return None;
            }
            let free = self.remote.max_in_flight.saturating_sub(book.in_flight);
            if free > 0 || self.ctx.run.aborting() {
                return Some(free.max(1));
            }
            if partial {
                return Some(0);
            }
            book = self
                .shared
                .changed
                .wait(book)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Item `index` is on its way.
    fn opened(&self, index: u64, item: I) {
        let mut book = self.shared.lock();
        book.in_flight += 1;
        book.open.insert(index);
        if self.keep {
            book.kept.insert(index, item);
        }
    }

    /// Item `index` cannot be encoded: it fails here with `Encode`.
    fn unsendable(&self, index: u64, item: I, e: String, first: &mut u64, count: u32) {
        if count == 0 {
            *first = index + 1;
        }
        let m = format!("cannot encode the item for the broker: {e}");
        let attempt = self.ctx.policy.retries + 1;
        if let Verdict::DeadLetter(failure) =
            self.ctx
                .failure(index, attempt, FailureKind::Encode, m, None)
        {
            send_dead_letter(self.ctx, self.dead_letter.as_ref(), item, failure);
        }
        self.ctx.items_done(1);
    }

    /// Sends the entry being built (if any) and records it.
    fn send(
        &self,
        session: &mut Box<dyn Session>,
        entry: &mut Vec<u8>,
        first: u64,
        count: &mut u32,
    ) {
        if *count == 0 {
            entry.clear();
            return;
        }
        let e = NewEntry {
            first,
            count: *count,
            attempts: 0,
            payload: std::mem::take(entry),
        };
        *count = 0;
        let mut book = self.shared.lock();
        book.sent += 1;
        let open = Open {
            entry: e.clone(),
            left: e.count,
            sent: Instant::now(),
        };
        book.entries.insert(first, open);
        drop(book);
        if let Err(err) = self
            .link
            .call(session, |s| s.send(self.run, std::slice::from_ref(&e)))
        {
            // The outage lasted too long: the stage fails; the collector ends it.
            self.ctx.stage_failed(
                FailureKind::Error,
                format!("remote stage lost its broker: {err}"),
            );
        }
    }
}

struct Collector<'a, I, O, C> {
    ctx: &'a StageCtx,
    remote: &'a Remote,
    link: &'a Link<'a>,
    run: &'a StageRun,
    announcement: &'a Announcement,
    shared: &'a Shared<I>,
    router: Router<O>,
    dead_letter: Option<QueueTx<Failed<I>>>,
    /// The server's identity when last seen.
    server: Option<String>,
    /// A worker registered at least once.
    workers_seen: bool,
    started: Instant,
    /// The report's remote part, filled in as the run goes.
    report: RemoteReport,
    /// Each worker's row, by consumer.
    workers: BTreeMap<String, RemoteWorker>,
    /// Round trips of entries (send to last result).
    round_trip: hdrhistogram::Histogram<u64>,
    /// Sends the outputs downstream, in input order with `ordered`.
    release: Release<O>,
    _c: std::marker::PhantomData<fn() -> C>,
}

impl<I: Wire, O: Wire, C: Codec> Collector<'_, I, O, C> {
    fn run(mut self, session: &mut Box<dyn Session>) {
        let mut looked = Instant::now() - LOOK_EVERY;
        let mut own = true;
        loop {
            if self.ctx.run.aborting() {
                return self.abort(session);
            }
            if looked.elapsed() >= LOOK_EVERY {
                looked = Instant::now();
                if let Err(m) = self.look(session) {
                    self.ctx.stage_failed(FailureKind::Start, m);
                    return self.abort(session);
                }
            }
            if self.all_finished() {
                return self.finish(session);
            }
            let got = self.link.call(session, |s| {
                let r = s.read_out(self.run, 256, READ_BLOCK, own);
                // After an error (a timeout, a lost connection) the entries may have been
                // delivered with the reply lost: they wait in the parent's own pending list.
                own = r.is_err();
                r
            });
            match got {
                Ok(entries) => self.take(session, entries),
                Err(BrokerError::NoRun) => own = true,
                Err(e) => {
                    self.ctx.stage_failed(
                        FailureKind::Error,
                        format!("remote stage lost its broker: {e}"),
                    );
                    return self.abort(session);
                }
            }
        }
    }

    /// The server restarted (reconcile), and a worker is there.
    fn look(&mut self, session: &mut Box<dyn Session>) -> Result<(), String> {
        let id = self
            .link
            .call(session, |s| s.server_id())
            .map_err(|e| e.to_string())?;
        if self.server.as_ref().is_some_and(|old| *old != id) {
            tracing::warn!(stage = %self.ctx.name, "the broker restarted: reconciling the run");
            self.reconcile(session).map_err(|e| e.to_string())?;
        }
        self.server = Some(id);
        if let Ok((entries, _)) = self.link.call(session, |s| s.depth(self.run)) {
            self.report.queue_high_water = self.report.queue_high_water.max(entries);
        }
        if let Ok(workers) = self.link.call(session, |s| s.workers(self.run)) {
            let live = workers
                .into_iter()
                .filter(|w| w.since_heartbeat < self.remote.claim_idle)
                .map(|w| (w.host, w.pid));
            self.ctx.stats.remote_workers(live);
            self.workers_seen |= !self
                .ctx
                .stats
                .children
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty();
        }
        if !self.workers_seen && self.started.elapsed() > self.remote.wait_for_workers {
            return Err(format!(
                "no worker served the remote stage within {:?}: start workers of this \
                 program with MINIGUN_WORKER=1 (fingerprint: {})",
                self.remote.wait_for_workers, self.announcement.fingerprint_text
            ));
        }
        Ok(())
    }

    /// Announces the run again and re-sends every unfinished entry the broker no longer has.
    fn reconcile(&mut self, session: &mut Box<dyn Session>) -> BrokerResult<()> {
        self.link.call(session, |s| s.announce(self.announcement))?;
        let present: HashSet<u64> = self
            .link
            .call(session, |s| s.outstanding(self.run))?
            .into_iter()
            .flat_map(|(first, count)| first..first + count as u64)
            .collect();
        let book = self.shared.lock();
        let missing: Vec<NewEntry> = book
            .entries
            .values()
            .map(|o| &o.entry)
            .filter(|e| {
                (e.first..e.first + e.count as u64)
                    .any(|i| book.open.contains(&i) && !present.contains(&i))
            })
            .cloned()
            .collect();
        drop(book);
        if !missing.is_empty() {
            tracing::warn!(stage = %self.ctx.name, entries = missing.len(), "re-sending entries the broker lost");
            self.link.call(session, |s| s.send(self.run, &missing))?;
            self.report.entries_resent += missing.len() as u64;
        }
        Ok(())
    }

    fn all_finished(&self) -> bool {
        let book = self.shared.lock();
        book.total.is_some() && book.open.is_empty()
    }

    /// Out entries: results, finish reports, statistics.
    fn take(&mut self, session: &mut Box<dyn Session>, entries: Vec<OutEntry>) {
        if entries.is_empty() {
            return;
        }
        let ids: Vec<EntryId> = entries.iter().map(|e| e.id.clone()).collect();
        let mut lost = false;
        for e in entries {
            match e.kind {
                OutKind::Results => lost |= !self.results(&e),
                OutKind::Finished => self.finished_outputs(&e),
                OutKind::Stats => self.worker_stats(&e),
            }
        }
        let _ = self.router.flush();
        let _ = self.link.call(session, |s| s.ack_out(self.run, &ids));
        if lost {
            // The items of an entry that could not be read at all: whatever the broker no
            // longer holds is sent again (a duplicate of anything else is dropped later).
            let _ = self.reconcile(session);
        }
        self.shared.changed.notify_all();
    }

    /// A results entry; `false` if it could not be read at all.
    fn results(&mut self, e: &OutEntry) -> bool {
        let outcomes = match wire::decode_results::<C, O>(&e.payload, self.remote.max_frame) {
            Ok(o) => o,
            Err(m) => {
                tracing::warn!(stage = %self.ctx.name, consumer = %e.consumer, error = %m,
                    "a results entry could not be decoded; its items run again");
                return false;
            }
        };
        // Outputs are held per item until its terminal frame: only the first terminal
        // result of an index counts, with its own outputs.
        let mut held: HashMap<u64, Vec<O>> = HashMap::new();
        let mut bad: HashSet<u64> = HashSet::new();
        let mut latencies = Vec::new();
        for o in outcomes {
            match o {
                Outcome::Output(i, _) | Outcome::Done(i, _) | Outcome::Failed(i, _)
                    if bad.contains(&i) => {}
                Outcome::Output(i, out) => held.entry(i).or_default().push(out),
                Outcome::Done(i, ns) => {
                    let outs = held.remove(&i).unwrap_or_default();
                    if self.close(i).is_some() {
                        self.release_item(i, outs);
                        latencies.push(ns);
                        self.ctx.items_done(1);
                    } else {
                        self.report.duplicates += 1;
                    }
                }
                Outcome::Bad(i, m) => {
                    held.remove(&i);
                    if let Some(kept) = self.close(i) {
                        self.release.finished(i, &mut self.router);
                        let f = RemoteFailure {
                            kind: FailureKind::Protocol,
                            message: format!("its results from the worker are unreadable: {m}"),
                            attempt: 1,
                            pid: None,
                            host: String::from("?"),
                        };
                        self.failed(i, kept, f, &e.consumer);
                        self.ctx.items_done(1);
                    }
                    bad.insert(i);
                }
                Outcome::Failed(i, f) => {
                    let outs = held.remove(&i).unwrap_or_default();
                    if let Some(kept) = self.close(i) {
                        self.release_item(i, outs);
                        self.failed(i, kept, f, &e.consumer);
                        self.ctx.items_done(1);
                    } else {
                        self.report.duplicates += 1;
                    }
                }
            }
        }
        if !latencies.is_empty() {
            let mut h = self
                .ctx
                .stats
                .latency
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            for ns in latencies {
                h.saturating_record(ns.max(1));
            }
        }
        true
    }

    /// The outputs of item `index`, which has ended: downstream (in order with `ordered`),
    /// before the item counts as done.
    fn release_item(&mut self, index: u64, outs: Vec<O>) {
        for out in outs {
            self.release.emit(index, out, &mut self.router);
        }
        self.release.finished(index, &mut self.router);
    }

    /// Item `index` reached its terminal result: `None` if it had one already, else the item
    /// if the parent kept it (for the dead-letter stage).
    fn close(&mut self, index: u64) -> Option<Option<I>> {
        let mut book = self.shared.lock();
        if !book.open.remove(&index) {
            return None;
        }
        book.in_flight -= 1;
        let kept = book.kept.remove(&index);
        if let Some((&first, _)) = book.entries.range(..=index).next_back() {
            let open = book.entries.get_mut(&first).expect("found");
            open.left -= 1;
            if open.left == 0 {
                let ns = open.sent.elapsed().as_nanos() as u64;
                book.entries.remove(&first);
                self.round_trip.saturating_record(ns.max(1));
            }
        }
        Some(kept)
    }

    /// A final failure from a worker: the policy decides (no retry: the worker retried).
    fn failed(&mut self, index: u64, item: Option<I>, f: RemoteFailure, consumer: &str) {
        let attempt = f.attempt.max(self.ctx.policy.retries + 1);
        let message = format!("{} (on {}, worker {consumer})", f.message, f.host);
        if let Verdict::DeadLetter(failure) =
            self.ctx.failure(index, attempt, f.kind, message, f.pid)
        {
            if let Some(item) = item {
                send_dead_letter(self.ctx, self.dead_letter.as_ref(), item, failure);
            }
        }
    }

    /// A worker's statistics: its row, and its part of the broker counters.
    fn worker_stats(&mut self, e: &OutEntry) {
        let st = match wire::decode_stats(&e.payload) {
            Ok(st) => st,
            Err(m) => {
                tracing::debug!(stage = %self.ctx.name, error = %m, "undecodable worker statistics");
                return;
            }
        };
        self.report.reclaims += st.reclaimed;
        self.report.releases += st.released;
        self.report.lease_lost += st.lease_lost;
        self.report.dead_lettered += st.dead_lettered;
        let row = self.workers.entry(e.consumer.clone()).or_default();
        row.host = st.host;
        row.pid = st.pid;
        row.items += st.items;
        row.failed += st.failed;
        row.retried += st.retried;
        row.latency = latency_of(&wire::histogram_of(&st.latency));
    }

    /// A worker's `finish` outputs.
    fn finished_outputs(&mut self, e: &OutEntry) {
        match wire::decode_results::<C, O>(&e.payload, self.remote.max_frame) {
            Ok(outcomes) => {
                for o in outcomes {
                    match o {
                        Outcome::Output(FINISH_ID, out) => {
                            let _ = Sink::send(&mut self.router, out);
                        }
                        Outcome::Failed(FINISH_ID, f) => self.ctx.stage_error(
                            f.kind,
                            format!(
                                "finish on {} (worker {}): {}",
                                f.host, e.consumer, f.message
                            ),
                            f.pid,
                        ),
                        _ => {}
                    }
                }
            }
            Err(m) => self.ctx.stage_error(
                FailureKind::Protocol,
                format!(
                    "the finish report of worker {} could not be decoded: {m}",
                    e.consumer
                ),
                None,
            ),
        }
    }

    /// Every item is finished: the workers finish their stage instances.
    fn finish(mut self, session: &mut Box<dyn Session>) {
        let _ = self
            .link
            .call(session, |s| s.set_control(self.run, Control::Finishing));
        let mut finished: HashSet<String> = HashSet::new();
        let deadline_idle = self.remote.claim_idle.max(Duration::from_millis(500));
        let mut own = false;
        while let Ok(workers) = self.link.call(session, |s| s.workers(self.run)) {
            let waiting: Vec<&WorkerInfo> = workers
                .iter()
                .filter(|w| !finished.contains(&w.consumer))
                .collect();
            let (lapsed, live): (Vec<&WorkerInfo>, Vec<&WorkerInfo>) = waiting
                .into_iter()
                .partition(|w| w.since_heartbeat > deadline_idle);
            for w in &lapsed {
                finished.insert(w.consumer.clone());
                self.ctx.stage_error(
                    FailureKind::Error,
                    format!(
                        "worker {} (host {}, pid {}) was lost before it finished the stage: \
                         what its stage instance held is lost",
                        w.consumer, w.host, w.pid
                    ),
                    Some(w.pid),
                );
            }
            if live.is_empty() || self.ctx.run.aborting() {
                break;
            }
            let got = self.link.call(session, |s| {
                let r = s.read_out(self.run, 256, READ_BLOCK, own);
                own = r.is_err();
                r
            });
            match got {
                Ok(entries) => {
                    for e in &entries {
                        if e.kind == OutKind::Finished {
                            finished.insert(e.consumer.clone());
                        }
                    }
                    self.take(session, entries);
                }
                Err(_) => break,
            }
        }
        if self.report.duplicates > 0 {
            tracing::debug!(stage = %self.ctx.name, duplicates = self.report.duplicates,
                "results of items that ran more than once were dropped");
        }
        self.over();
    }

    /// The run aborted: workers stop; unfinished items are cancelled.
    fn abort(self, session: &mut Box<dyn Session>) {
        let _ = self
            .link
            .call(session, |s| s.set_control(self.run, Control::Aborted));
        let mut book = self.shared.lock();
        let n = book.open.len() as u64;
        book.open.clear();
        book.in_flight = 0;
        drop(book);
        self.ctx.cancelled(n);
        self.over();
    }

    /// The collector is done: the report's remote part, and the sender may end.
    fn over(mut self) {
        // Whatever is still held for ordering goes out (nothing is lost on an abort).
        self.release.release_all(&mut self.router);
        let _ = self.router.flush();
        self.ctx.stats.remote_workers(std::iter::empty());
        let mut report = std::mem::take(&mut self.report);
        report.workers = std::mem::take(&mut self.workers).into_values().collect();
        report.round_trip = latency_of(&self.round_trip);
        report.entries_sent = self.shared.lock().sent;
        report.outage_secs = self.link.outage().as_secs_f64();
        *self
            .ctx
            .stats
            .remote
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(report);
        self.shared.lock().over = true;
        self.shared.changed.notify_all();
    }
}
