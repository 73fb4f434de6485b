//! An in-memory [`Broker`], for tests of the remote executor that need no server: the same
//! streams, consumer group, pending list and ownership rule as the contract describes, in
//! one process. Its clock can be moved forward ([`MemoryBroker::advance`]) so that leases
//! expire without waiting.

use super::broker::*;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A broker that lives in this process (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct MemoryBroker {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct State {
    /// Added to the real clock.
    offset: Duration,
    /// Id of the server's incarnation (changed by `restart`).
    incarnation: u64,
    next_id: u64,
    /// Announcements with their cursor (which keeps growing across restarts, as a
    /// server's time-based stream ids do).
    announcements: Vec<(u64, Announcement)>,
    runs: HashMap<StageRun, Run>,
    /// Calls that fail once with `Unavailable`, by method name (fault injection).
    fail_next: HashMap<&'static str, u32>,
    /// Calls that take effect and then fail with `Unavailable` (a reply lost on the way).
    fail_after: HashMap<&'static str, u32>,
}

#[derive(Debug, Default)]
struct Run {
    control: Option<Control>,
    /// Work entries by id, in order.
    work: BTreeMap<u64, NewEntry>,
    /// Entries never delivered, in order.
    undelivered: std::collections::VecDeque<u64>,
    pending: BTreeMap<u64, Pend>,
    out: BTreeMap<u64, OutEntry>,
    out_unread: std::collections::VecDeque<u64>,
    out_pending: HashSet<u64>,
    dead: Vec<(NewEntry, u32, String)>,
    workers: HashMap<String, (WorkerInfo, Instant)>,
    finished: HashSet<String>,
}

#[derive(Debug, Clone)]
struct Pend {
    owner: String,
    since: Instant,
    deliveries: u32,
}

impl MemoryBroker {
    /// A new, empty broker.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves the broker's clock forward: pending entries and heartbeats age by `d`.
    pub fn advance(&self, d: Duration) {
        self.lock().offset += d;
        self.shared.changed.notify_all();
    }

    /// Loses everything, as a server restarted without persistence does.
    pub fn restart(&self) {
        let mut s = self.lock();
        let offset = s.offset;
        let incarnation = s.incarnation + 1;
        let next_id = s.next_id;
        *s = State {
            offset,
            incarnation,
            next_id,
            ..State::default()
        };
        drop(s);
        self.shared.changed.notify_all();
    }

    /// Makes the next `times` calls of the session method `method` fail with
    /// [`BrokerError::Unavailable`] (a lost connection), before they take effect.
    pub fn fail_next(&self, method: &'static str, times: u32) {
        self.lock().fail_next.insert(method, times);
    }

    /// Makes the next `times` calls of the session method `method` take effect and then fail
    /// with [`BrokerError::Unavailable`], as a call whose reply is lost with its connection.
    pub fn fail_after_next(&self, method: &'static str, times: u32) {
        self.lock().fail_after.insert(method, times);
    }

    /// Injected failures of `method` not used yet ([`MemoryBroker::fail_next`] and
    /// [`MemoryBroker::fail_after_next`] together): a test checks that its faults happened.
    pub fn faults_left(&self, method: &'static str) -> u32 {
        let s = self.lock();
        let left = |m: &HashMap<&'static str, u32>| m.get(method).copied().unwrap_or(0);
        left(&s.fail_next) + left(&s.fail_after)
    }

    /// The entries in the dead-letter stream of a run: each entry, its deliveries and its
    /// last owner.
    pub fn dead_letters(&self, run: &StageRun) -> Vec<(NewEntry, u32, String)> {
        self.lock()
            .runs
            .get(run)
            .map(|r| r.dead.clone())
            .unwrap_or_default()
    }

    /// Whether any key of the run is left.
    pub fn has_run(&self, run: &StageRun) -> bool {
        self.lock().runs.contains_key(run)
    }
}

impl Broker for MemoryBroker {
    fn name(&self) -> &str {
        "memory"
    }
    fn session(&self) -> BrokerResult<Box<dyn Session>> {
        Ok(Box::new(MemorySession {
            broker: self.clone(),
        }))
    }
}

struct MemorySession {
    broker: MemoryBroker,
}

impl State {
    fn now(&self) -> Instant {
        Instant::now() + self.offset
    }
    fn check(&mut self, method: &'static str) -> BrokerResult<()> {
        match self.fail_next.get_mut(method) {
            Some(n) if *n > 0 => {
                *n -= 1;
                Err(BrokerError::Unavailable(format!("{method}: injected")))
            }
            _ => Ok(()),
        }
    }
    fn run(&mut self, run: &StageRun) -> BrokerResult<&mut Run> {
        self.runs.get_mut(run).ok_or(BrokerError::NoRun)
    }
    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
}

fn id_of(id: &str) -> Option<u64> {
    id.parse().ok()
}

impl MemorySession {
    /// Runs `f` on the state, then wakes blocked readers.
    fn with<T>(
        &self,
        method: &'static str,
        f: impl FnOnce(&mut State) -> BrokerResult<T>,
    ) -> BrokerResult<T> {
        let mut s = self.broker.lock();
        s.check(method)?;
        let r = f(&mut s);
        let r = match (r, s.fail_after.get_mut(method)) {
            (Ok(_), Some(n)) if *n > 0 => {
                *n -= 1;
                Err(BrokerError::Unavailable(format!("{method}: reply lost")))
            }
            (r, _) => r,
        };
        drop(s);
        self.broker.shared.changed.notify_all();
        r
    }

    /// Waits up to `block` (real time) until `f` returns something non-empty.
    fn wait<T>(
        &self,
        method: &'static str,
        block: Duration,
        mut f: impl FnMut(&mut State) -> BrokerResult<Vec<T>>,
    ) -> BrokerResult<Vec<T>> {
        let deadline = Instant::now() + block;
        let mut s = self.broker.lock();
        s.check(method)?;
        loop {
            let got = f(&mut s)?;
            let left = deadline.saturating_duration_since(Instant::now());
            if !got.is_empty() || left.is_zero() {
                // What was delivered stays delivered when the reply is lost (a fetch that
                // found nothing loses nothing: the fault waits for one that delivers).
                let lost = match s.fail_after.get_mut(method) {
                    Some(n) if *n > 0 && !got.is_empty() => {
                        *n -= 1;
                        true
                    }
                    _ => false,
                };
                drop(s);
                self.broker.shared.changed.notify_all();
                return match lost {
                    true => Err(BrokerError::Unavailable(format!("{method}: reply lost"))),
                    false => Ok(got),
                };
            }
            s = self
                .broker
                .shared
                .changed
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

fn delivery(id: u64, e: &NewEntry, deliveries: u32) -> Delivery {
    Delivery {
        id: id.to_string(),
        entry: e.clone(),
        deliveries,
    }
}

fn push_out(s: &mut State, run: &StageRun, kind: OutKind, consumer: &str, payload: &[u8]) {
    let id = s.id();
    if let Some(r) = s.runs.get_mut(run) {
        r.out.insert(
            id,
            OutEntry {
                id: id.to_string(),
                kind,
                consumer: consumer.to_string(),
                payload: payload.to_vec(),
            },
        );
        r.out_unread.push_back(id);
    }
}

impl Session for MemorySession {
    fn server_id(&mut self) -> BrokerResult<String> {
        self.with("server_id", |s| Ok(format!("memory-{}", s.incarnation)))
    }

    fn announce(&mut self, a: &Announcement) -> BrokerResult<()> {
        self.with("announce", |s| {
            let run = s.runs.entry(a.stage_run.clone()).or_default();
            run.control = Some(Control::Running);
            let id = s.id();
            s.announcements.push((id, a.clone()));
            Ok(())
        })
    }

    fn send(&mut self, run: &StageRun, entries: &[NewEntry]) -> BrokerResult<Vec<EntryId>> {
        self.with("send", |s| {
            s.run(run)?;
            let mut ids = Vec::with_capacity(entries.len());
            for e in entries {
                let id = s.id();
                let r = s.run(run)?;
                r.work.insert(id, e.clone());
                r.undelivered.push_back(id);
                ids.push(id.to_string());
            }
            Ok(ids)
        })
    }

    fn read_out(
        &mut self,
        run: &StageRun,
        max: usize,
        block: Duration,
        own: bool,
    ) -> BrokerResult<Vec<OutEntry>> {
        if own {
            return self.with("read_out", |s| {
                let r = s.run(run)?;
                let mut ids: Vec<u64> = r.out_pending.iter().copied().collect();
                ids.sort_unstable();
                Ok(ids
                    .into_iter()
                    .take(max)
                    .filter_map(|i| r.out.get(&i).cloned())
                    .collect())
            });
        }
        self.wait("read_out", block, |s| {
            let r = s.run(run)?;
            let mut got = Vec::new();
            while got.len() < max {
                let Some(id) = r.out_unread.pop_front() else {
                    break;
                };
                r.out_pending.insert(id);
                if let Some(e) = r.out.get(&id) {
                    got.push(e.clone());
                }
            }
            Ok(got)
        })
    }

    fn ack_out(&mut self, run: &StageRun, ids: &[EntryId]) -> BrokerResult<()> {
        self.with("ack_out", |s| {
            let r = s.run(run)?;
            for id in ids.iter().filter_map(|i| id_of(i)) {
                r.out_pending.remove(&id);
                r.out.remove(&id);
            }
            Ok(())
        })
    }

    fn set_control(&mut self, run: &StageRun, c: Control) -> BrokerResult<()> {
        self.with("set_control", |s| {
            s.run(run)?.control = Some(c);
            Ok(())
        })
    }

    fn workers(&mut self, run: &StageRun) -> BrokerResult<Vec<WorkerInfo>> {
        self.with("workers", |s| {
            let now = s.now();
            let r = s.run(run)?;
            let mut all: Vec<WorkerInfo> = r
                .workers
                .values()
                .map(|(w, at)| WorkerInfo {
                    since_heartbeat: now.saturating_duration_since(*at),
                    ..w.clone()
                })
                .collect();
            all.sort_by(|a, b| a.consumer.cmp(&b.consumer));
            Ok(all)
        })
    }

    fn outstanding(&mut self, run: &StageRun) -> BrokerResult<Vec<(u64, u32)>> {
        self.with("outstanding", |s| {
            Ok(s.run(run)?
                .work
                .values()
                .map(|e| (e.first, e.count))
                .collect())
        })
    }

    fn depth(&mut self, run: &StageRun) -> BrokerResult<(u64, u64)> {
        self.with("depth", |s| {
            let r = s.run(run)?;
            Ok((r.work.len() as u64, r.pending.len() as u64))
        })
    }

    fn cleanup(&mut self, run: &StageRun, keep: Option<Duration>) -> BrokerResult<()> {
        self.with("cleanup", |s| {
            if keep.is_some() {
                // Kept for inspection (this broker never expires anything).
                return Ok(());
            }
            s.runs.remove(run);
            s.announcements.retain(|(_, a)| &a.stage_run != run);
            Ok(())
        })
    }

    fn announcements(
        &mut self,
        pipeline: &str,
        after: Option<&str>,
        block: Duration,
    ) -> BrokerResult<Vec<(String, Announcement)>> {
        let after = after.and_then(|a| a.parse::<u64>().ok());
        self.wait("announcements", block, |s| {
            let live = |a: &Announcement| {
                s.runs
                    .get(&a.stage_run)
                    .is_some_and(|r| r.control == Some(Control::Running))
            };
            Ok(s.announcements
                .iter()
                .filter(|(id, _)| after.is_none_or(|c| *id > c))
                .filter(|(_, a)| a.stage_run.pipeline == pipeline)
                .filter(|(_, a)| after.is_some() || live(a))
                .map(|(id, a)| (id.to_string(), a.clone()))
                .collect())
        })
    }

    fn control(&mut self, run: &StageRun) -> BrokerResult<Option<Control>> {
        self.with("control", |s| Ok(s.runs.get(run).and_then(|r| r.control)))
    }

    fn register(&mut self, run: &StageRun, w: &WorkerInfo) -> BrokerResult<()> {
        self.with("register", |s| {
            let now = s.now();
            s.run(run)?
                .workers
                .insert(w.consumer.clone(), (w.clone(), now));
            Ok(())
        })
    }

    fn unregister(&mut self, run: &StageRun, consumer: &str) -> BrokerResult<()> {
        self.with("unregister", |s| {
            if let Ok(r) = s.run(run) {
                r.workers.remove(consumer);
            }
            Ok(())
        })
    }

    fn fetch(
        &mut self,
        run: &StageRun,
        consumer: &str,
        count: usize,
        block: Duration,
        own: bool,
    ) -> BrokerResult<Vec<Delivery>> {
        if own {
            return self.with("fetch", |s| {
                let r = s.run(run)?;
                Ok(r.pending
                    .iter()
                    .filter(|(_, p)| p.owner == consumer)
                    .filter_map(|(id, p)| r.work.get(id).map(|e| delivery(*id, e, p.deliveries)))
                    .take(count)
                    .collect())
            });
        }
        self.wait("fetch", block, |s| {
            let now = s.now();
            let r = s.run(run)?;
            let mut got = Vec::new();
            while got.len() < count {
                let Some(id) = r.undelivered.pop_front() else {
                    break;
                };
                let Some(e) = r.work.get(&id) else { continue };
                r.pending.insert(
                    id,
                    Pend {
                        owner: consumer.to_string(),
                        since: now,
                        deliveries: 1,
                    },
                );
                got.push(delivery(id, e, 1));
            }
            Ok(got)
        })
    }

    fn commit_many(
        &mut self,
        run: &StageRun,
        consumer: &str,
        done: &[(&EntryId, &[u8])],
    ) -> BrokerResult<Vec<Commit>> {
        self.with("commit", |s| {
            let r = s.run(run)?;
            let mut results = Vec::new();
            let outcomes: Vec<Commit> = done
                .iter()
                .map(|(id, payload)| {
                    let held =
                        id_of(id).filter(|n| r.pending.get(n).is_some_and(|p| p.owner == consumer));
                    let Some(n) = held else {
                        return Commit::LeaseLost;
                    };
                    r.pending.remove(&n);
                    r.work.remove(&n);
                    results.extend_from_slice(payload);
                    Commit::Committed
                })
                .collect();
            if outcomes.contains(&Commit::Committed) {
                push_out(s, run, OutKind::Results, consumer, &results);
            }
            Ok(outcomes)
        })
    }

    fn heartbeat(
        &mut self,
        run: &StageRun,
        consumer: &str,
        ids: &[EntryId],
    ) -> BrokerResult<Vec<EntryId>> {
        self.with("heartbeat", |s| {
            let now = s.now();
            let r = s.run(run)?;
            let mut kept = Vec::new();
            for id in ids {
                if let Some(p) = id_of(id).and_then(|n| r.pending.get_mut(&n)) {
                    if p.owner == consumer {
                        p.since = now;
                        kept.push(id.clone());
                    }
                }
            }
            Ok(kept)
        })
    }

    fn pending_idle(
        &mut self,
        run: &StageRun,
        min_idle: Duration,
        count: usize,
    ) -> BrokerResult<Vec<Pending>> {
        self.with("pending_idle", |s| {
            let now = s.now();
            let r = s.run(run)?;
            Ok(r.pending
                .iter()
                .map(|(id, p)| Pending {
                    id: id.to_string(),
                    owner: p.owner.clone(),
                    idle: now.saturating_duration_since(p.since),
                    deliveries: p.deliveries,
                    entry: r.work.get(id).cloned(),
                })
                .filter(|p| p.idle >= min_idle)
                .take(count)
                .collect())
        })
    }

    fn claim(
        &mut self,
        run: &StageRun,
        consumer: &str,
        min_idle: Duration,
        ids: &[EntryId],
    ) -> BrokerResult<Vec<Delivery>> {
        self.with("claim", |s| {
            let now = s.now();
            let r = s.run(run)?;
            let mut got = Vec::new();
            for n in ids.iter().filter_map(|i| id_of(i)) {
                let Some(p) = r.pending.get_mut(&n) else {
                    continue;
                };
                if now.saturating_duration_since(p.since) < min_idle {
                    continue;
                }
                match r.work.get(&n) {
                    Some(e) => {
                        p.owner = consumer.to_string();
                        p.since = now;
                        p.deliveries += 1;
                        got.push(delivery(n, e, p.deliveries));
                    }
                    None => {
                        r.pending.remove(&n);
                    }
                }
            }
            Ok(got)
        })
    }

    fn dead_letter(
        &mut self,
        run: &StageRun,
        id: &EntryId,
        min_idle: Duration,
        results: &[u8],
    ) -> BrokerResult<bool> {
        self.with("dead_letter", |s| {
            let now = s.now();
            let r = s.run(run)?;
            let Some(n) = id_of(id) else { return Ok(false) };
            let idle = r
                .pending
                .get(&n)
                .is_some_and(|p| now.saturating_duration_since(p.since) >= min_idle);
            if !idle {
                return Ok(false);
            }
            let p = r.pending.remove(&n).expect("checked");
            if let Some(e) = r.work.remove(&n) {
                r.dead.push((e, p.deliveries, p.owner.clone()));
            }
            push_out(s, run, OutKind::Results, &p.owner, results);
            Ok(true)
        })
    }

    fn split(
        &mut self,
        run: &StageRun,
        consumer: &str,
        id: &EntryId,
        parts: &[NewEntry],
    ) -> BrokerResult<bool> {
        self.with("split", |s| {
            let Some(n) = id_of(id) else { return Ok(false) };
            let owned = s
                .run(run)?
                .pending
                .get(&n)
                .is_some_and(|p| p.owner == consumer);
            if !owned {
                return Ok(false);
            }
            let mut ids = Vec::with_capacity(parts.len());
            for _ in parts {
                ids.push(s.id());
            }
            let r = s.run(run)?;
            r.pending.remove(&n);
            r.work.remove(&n);
            for (id, e) in ids.into_iter().zip(parts) {
                r.work.insert(id, e.clone());
                r.undelivered.push_back(id);
            }
            Ok(true)
        })
    }

    fn release(
        &mut self,
        run: &StageRun,
        consumer: &str,
        ids: &[(EntryId, u32)],
        claim_idle: Duration,
    ) -> BrokerResult<()> {
        self.with("release", |s| {
            let now = s.now();
            let r = s.run(run)?;
            for (id, deliveries) in ids {
                if let Some(p) = id_of(id).and_then(|n| r.pending.get_mut(&n)) {
                    if p.owner == consumer {
                        // Idle as if past its lease, and one delivery less: the reclaim that
                        // takes it counts it back.
                        p.since = now.checked_sub(claim_idle).unwrap_or(p.since);
                        p.deliveries = deliveries.saturating_sub(1);
                    }
                }
            }
            Ok(())
        })
    }

    fn finished(&mut self, run: &StageRun, consumer: &str, outputs: &[u8]) -> BrokerResult<()> {
        self.with("finished", |s| {
            if !s.run(run)?.finished.insert(consumer.to_string()) {
                return Ok(());
            }
            push_out(s, run, OutKind::Finished, consumer, outputs);
            Ok(())
        })
    }

    fn stats(&mut self, run: &StageRun, consumer: &str, payload: &[u8]) -> BrokerResult<()> {
        self.with("stats", |s| {
            s.run(run)?;
            push_out(s, run, OutKind::Stats, consumer, payload);
            Ok(())
        })
    }
}
