//! The collector: the only reader of the out stream. It keeps the first terminal result of
//! each item, sends outputs on (in order with `ordered`), hands final failures to the stage's
//! policy, reconciles after a broker restart, and ends the run with the workers' `finish`.

use super::{send_dead_letter, IndexMap, IndexSet, Link, Shared, LOOK_EVERY, READ_BLOCK};
use crate::ctx::StageCtx;
use crate::error::FailureKind;
use crate::exec::order::Release;
use crate::ipc::codec::Codec;
use crate::policy::Verdict;
use crate::queue::QueueTx;
use crate::remote::broker::*;
use crate::remote::options::Remote;
use crate::remote::wire::{self, Outcome, RemoteFailure, FINISH_ID};
use crate::report::{latency_of, RemoteReport, RemoteWorker};
use crate::route::Router;
use crate::stage::{Failed, Sink, Wire};
use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

pub(super) struct Collector<'a, I, O, C> {
    pub(super) ctx: &'a StageCtx,
    pub(super) remote: &'a Remote,
    pub(super) link: &'a Link<'a>,
    pub(super) run: &'a StageRun,
    pub(super) announcement: &'a Announcement,
    pub(super) shared: &'a Shared<I>,
    pub(super) router: Router<O>,
    pub(super) dead_letter: Option<QueueTx<Failed<I>>>,
    /// The server's identity when last seen.
    pub(super) server: Option<String>,
    /// A worker registered at least once.
    pub(super) workers_seen: bool,
    pub(super) started: Instant,
    /// The report's remote part, filled in as the run goes.
    pub(super) report: RemoteReport,
    /// Each worker's row, by consumer.
    pub(super) workers: BTreeMap<String, RemoteWorker>,
    /// Round trips of entries (send to last result).
    pub(super) round_trip: hdrhistogram::Histogram<u64>,
    /// Sends the outputs downstream, in input order with `ordered`.
    pub(super) release: Release<O>,
    pub(super) _c: std::marker::PhantomData<fn() -> C>,
}

impl<I: Wire, O: Wire, C: Codec> Collector<'_, I, O, C> {
    pub(super) fn run(mut self, session: &mut Box<dyn Session>) {
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
            self.release_unsent();
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

    /// Items the sender could not send have ended (they failed there): the items after
    /// them are released in input order.
    fn release_unsent(&mut self) {
        let unsent = std::mem::take(&mut self.shared.lock().unsent);
        for i in unsent {
            self.release.finished(i, &mut self.router);
        }
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
        // Every terminal frame's item is closed first, under one lock of the book; then,
        // without the lock, outputs go downstream and failures to the policy.
        let mut closed = self.close_all(&outcomes).into_iter();
        // Outputs are held per item until its terminal frame: only the first terminal
        // result of an index counts, with its own outputs.
        let mut held: IndexMap<Vec<O>> = IndexMap::default();
        let mut bad = IndexSet::default();
        let mut latencies = Vec::with_capacity(outcomes.len() / 2);
        let mut outcomes = outcomes.into_iter().peekable();
        while let Some(o) = outcomes.next() {
            match o {
                Outcome::Output(i, _) | Outcome::Done(i, _) | Outcome::Failed(i, _)
                    if bad.contains(&i) => {}
                // The usual case, an item's one output and its end together (`result_done`):
                // no buffer for it.
                Outcome::Output(i, out)
                    if !held.contains_key(&i)
                        && matches!(outcomes.peek(), Some(Outcome::Done(j, _)) if *j == i) =>
                {
                    let Some(Outcome::Done(_, ns)) = outcomes.next() else {
                        unreachable!("peeked")
                    };
                    if closed.next().flatten().is_some() {
                        self.release_item(i, std::iter::once(out));
                        latencies.push(ns);
                        self.ctx.items_done(1);
                    } else {
                        self.report.duplicates += 1;
                    }
                }
                Outcome::Output(i, out) => held.entry(i).or_default().push(out),
                Outcome::Done(i, ns) => {
                    let outs = held.remove(&i).unwrap_or_default();
                    if closed.next().flatten().is_some() {
                        self.release_item(i, outs);
                        latencies.push(ns);
                        self.ctx.items_done(1);
                    } else {
                        self.report.duplicates += 1;
                    }
                }
                Outcome::Bad(i, m) => {
                    held.remove(&i);
                    if let Some(kept) = closed.next().flatten() {
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
                    if let Some(kept) = closed.next().flatten() {
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
                crate::stats::record(&mut h, ns, 1);
            }
        }
        true
    }

    /// The outputs of item `index`, which has ended: downstream (in order with `ordered`),
    /// before the item counts as done.
    fn release_item(&mut self, index: u64, outs: impl IntoIterator<Item = O>) {
        for out in outs {
            self.release.emit(index, out, &mut self.router);
        }
        self.release.finished(index, &mut self.router);
    }

    /// Closes the item of each terminal frame that counts (not one after its item's results
    /// were found unreadable), in order, under one lock: for each, `None` if the item had its
    /// terminal result already, else the item if the parent kept it (for the dead-letter
    /// stage).
    fn close_all(&mut self, outcomes: &[Outcome<O>]) -> Vec<Option<Option<I>>> {
        let mut bad = IndexSet::default();
        let mut book = self.shared.lock();
        let mut closed = Vec::new();
        for o in outcomes {
            match o {
                Outcome::Output(..) => {}
                Outcome::Done(i, _) | Outcome::Failed(i, _) if bad.contains(i) => {}
                Outcome::Done(i, _) | Outcome::Failed(i, _) => {
                    closed.push(Self::close(&mut book, &mut self.round_trip, *i))
                }
                Outcome::Bad(i, _) => {
                    closed.push(Self::close(&mut book, &mut self.round_trip, *i));
                    bad.insert(*i);
                }
            }
        }
        closed
    }

    /// Item `index` reached its terminal result: `None` if it had one already, else the item
    /// if the parent kept it.
    fn close(
        book: &mut super::Book<I>,
        round_trip: &mut hdrhistogram::Histogram<u64>,
        index: u64,
    ) -> Option<Option<I>> {
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
                crate::stats::record(round_trip, ns, 1);
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
        // Workers waiting for entries see the new state now, not when their wait ends.
        if let Ok(workers) = self.link.call(session, |s| s.workers(self.run)) {
            let _ = self.link.call(session, |s| s.wake(self.run, workers.len()));
        }
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
