//! Live view of a run: [`Monitor::snapshot`] reads the stages' counters, queue lengths and
//! live fork children at any moment, from any thread. Executors never call into a monitor;
//! it only reads what they already keep (atomics, one short lock per stage).

use crate::ctx::StageCtx;
use crate::queue::Capacity;
use crate::shared::RunShared;
use crate::stage::StageKind;
use serde::Serialize;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

/// What a stage is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub enum StageStatus {
    /// Not started yet.
    Waiting,
    /// Handled items since the previous snapshot, or has items queued.
    Active,
    /// Started, nothing to do right now.
    Idle,
    /// Had failures (and is still running).
    Error,
    /// Ended.
    Done,
}

/// A live child process of a fork stage, or a live worker process of a remote stage.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChildSnapshot {
    /// Process id.
    pub pid: u32,
    /// The host of a remote stage's worker (`None`: a child of this process).
    pub host: Option<String>,
    /// Items it has handled (ipc_fork workers; 0 for a cow_fork child, which has one).
    pub items: u64,
    /// Resident set size, from the kernel (0 if it already exited, or runs on another host).
    pub rss_bytes: u64,
    /// Seconds since it was forked.
    pub age_secs: f64,
}

/// One stage at the moment of the snapshot.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct StageSnapshot {
    /// Stage name (qualified inside sub-pipelines).
    pub name: String,
    /// Stage kind.
    pub kind: StageKind,
    /// Executor it runs under.
    pub executor: String,
    /// Depth in the graph (longest path from a producer), for drawing it in layers.
    pub layer: usize,
    /// Items received so far.
    pub items_in: u64,
    /// Items emitted so far.
    pub items_out: u64,
    /// Items failed so far.
    pub failed: u64,
    /// Retried attempts so far.
    pub retried: u64,
    /// Items cancelled so far.
    pub cancelled: u64,
    /// Items per second (in; out for producers) since the previous snapshot.
    pub throughput: f64,
    /// Median latency so far, in microseconds.
    pub p50_us: f64,
    /// 99th percentile latency so far, in microseconds.
    pub p99_us: f64,
    /// Items waiting in its input queue.
    pub queue_len: usize,
    /// Its input queue's capacity (`None`: producer, unbounded, or chained).
    pub queue_capacity: Option<usize>,
    /// The stage it runs chained to, on that stage's threads with no queue between them
    /// (see [`StageReport::chained_to`](crate::StageReport::chained_to)).
    pub chained_to: Option<String>,
    /// What it is doing.
    pub status: StageStatus,
    /// Whether it is the bottleneck so far (most busy time per worker).
    pub bottleneck: bool,
    /// Live child processes (fork stages).
    pub children: Vec<ChildSnapshot>,
    /// Items in flight now (async stages under `tasks(n)`; 0 for other executors).
    pub in_flight: u64,
    /// The most items it runs at once, for an executor with such a limit (`tasks(n)`: `n`).
    pub in_flight_limit: Option<usize>,
}

/// The whole run at one moment.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct Snapshot {
    /// Pipeline name.
    pub pipeline: String,
    /// Seconds since the run started (0 before).
    pub elapsed_secs: f64,
    /// Stages in topological order.
    pub stages: Vec<StageSnapshot>,
    /// Edges between stages, as indices into `stages` (data, dead-letter and route edges).
    pub edges: Vec<(usize, usize)>,
    /// Items emitted by producers so far.
    pub produced: u64,
    /// Items from the producers that the pipeline has finished with: of the `produced` items,
    /// the share that every stage on their way is done with (processed, failed or cancelled).
    /// A stage's share is its upstreams' share times the part of what reached it (received or
    /// queued) that it finished, so it is exact for stages that take source items and an
    /// estimate past stages that change the count (filters, batches). Progress and ETA count
    /// these, not `produced`: a run is not further along because its queues are full.
    pub finished_items: u64,
    /// Items the producers said they will emit, if every producer declared it
    /// ([`StageRef::total`](crate::StageRef::total)).
    pub total: Option<u64>,
    /// Failures so far.
    pub failures_total: u64,
    /// Whether the run has ended.
    pub finished: bool,
    /// Whether the run is stopping (stop, signal or abort).
    pub stopping: bool,
}

pub(crate) struct StageView {
    pub(crate) ctx: Arc<StageCtx>,
    pub(crate) kind: StageKind,
    pub(crate) capacity: Option<Capacity>,
    /// The stage it runs chained to (no queue of its own).
    pub(crate) chained_to: Option<String>,
}

struct Inner {
    pipeline: String,
    stages: Vec<StageView>,
    edges: Vec<(usize, usize)>,
    layers: Vec<usize>,
    shared: Arc<RunShared>,
    started: OnceLock<Instant>,
    finished: OnceLock<Instant>,
    last: Mutex<(Instant, Vec<u64>)>,
}

/// A live view of one run, cheap to clone and `Send + Sync`: get it from
/// [`Runnable::monitor`](crate::Runnable::monitor) or [`RunHandle::monitor`](crate::RunHandle::monitor).
///
/// ```
/// use minigun::Pipeline;
/// let p = Pipeline::new("watched");
/// p.producer("gen", |out| out.emit_all(0..1000u64).map_err(Into::into));
/// p.consumer("sink", |_: u64| Ok(()));
/// let handle = p.spawn().unwrap();
/// let monitor = handle.monitor();
/// let report = handle.wait().unwrap();
/// let snap = monitor.snapshot();
/// assert!(snap.finished);
/// assert_eq!(snap.stages[1].items_in, 1000);
/// # let _ = report;
/// ```
#[derive(Clone)]
pub struct Monitor {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Monitor({:?})", self.inner.pipeline)
    }
}

impl Monitor {
    pub(crate) fn new(
        pipeline: String,
        stages: Vec<StageView>,
        edges: Vec<(usize, usize)>,
        shared: Arc<RunShared>,
    ) -> Self {
        let n = stages.len();
        // Longest path from a source; loops are cut by bounding the relaxation rounds.
        let mut layers = vec![0usize; n];
        for _ in 0..n {
            let mut changed = false;
            for &(u, v) in &edges {
                if u != v && layers[v] < layers[u] + 1 && layers[u] + 1 < n {
                    layers[v] = layers[u] + 1;
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        let last = Mutex::new((Instant::now(), vec![0; n]));
        let inner = Inner {
            pipeline,
            stages,
            edges,
            layers,
            shared,
            started: OnceLock::new(),
            finished: OnceLock::new(),
            last,
        };
        Monitor {
            inner: Arc::new(inner),
        }
    }

    pub(crate) fn mark_started(&self) {
        let _ = self.inner.started.set(Instant::now());
    }

    pub(crate) fn mark_finished(&self) {
        let _ = self.inner.finished.set(Instant::now());
    }

    /// Reads the current state of every stage.
    pub fn snapshot(&self) -> Snapshot {
        let inner = &*self.inner;
        let now = Instant::now();
        let mut last = inner.last.lock().unwrap_or_else(|e| e.into_inner());
        let dt = now.duration_since(last.0).as_secs_f64();
        let busiest = busiest(&inner.stages);
        let mut stages = Vec::with_capacity(inner.stages.len());
        let mut produced = 0;
        let mut total = Some(0u64);
        let mut shares = Vec::with_capacity(inner.stages.len());
        for (i, s) in inner.stages.iter().enumerate() {
            let (mut snap, delta) = stage_snapshot(s, &mut last.1[i], now);
            shares.push(finished_share(i, s, &snap, &shares, &inner.edges));
            if s.kind == StageKind::Producer {
                produced += snap.items_out;
                let declared = s.ctx.stats.declared_total.get().copied();
                total = total.zip(declared).map(|(a, b)| a + b);
            }
            snap.layer = inner.layers[i];
            snap.throughput = if dt > 0.0 { delta as f64 / dt } else { 0.0 };
            snap.bottleneck = busiest == Some(i);
            stages.push(snap);
        }
        last.0 = now;
        Snapshot {
            pipeline: inner.pipeline.clone(),
            elapsed_secs: inner.started.get().map_or(0.0, |t| {
                let end = inner.finished.get().copied().unwrap_or(now);
                end.saturating_duration_since(*t).as_secs_f64()
            }),
            stages,
            edges: inner.edges.clone(),
            produced,
            finished_items: (produced as f64 * shares.iter().copied().fold(1.0, f64::min)) as u64,
            total,
            failures_total: inner.shared.failures().1,
            finished: inner.finished.get().is_some(),
            stopping: inner.shared.stop.load(Ordering::Relaxed),
        }
    }
}

/// The share of the produced items that stage `v` and every stage before it are done with:
/// the smallest share of its upstreams (earlier in `shares`, which holds the stages before it
/// in topological order; a routing loop's edge back is left out) times the part of what
/// reached it, received or queued, that it finished. A producer's share is 1 (of what it
/// produced), and so is an ended stage's.
fn finished_share(
    v: usize,
    s: &StageView,
    snap: &StageSnapshot,
    shares: &[f64],
    edges: &[(usize, usize)],
) -> f64 {
    if s.kind == StageKind::Producer || snap.status == StageStatus::Done {
        return 1.0;
    }
    let upstream = edges
        .iter()
        .filter(|&&(u, w)| w == v && u < v)
        .map(|&(u, _)| shares[u])
        .fold(1.0, f64::min);
    let reached = snap.items_in + snap.queue_len as u64;
    let done = s.ctx.stats.done.load(Ordering::Relaxed).min(reached);
    match reached {
        0 => upstream,
        n => upstream * done as f64 / n as f64,
    }
}

/// The stage (not a producer) with the most busy time per worker, if any was busy.
fn busiest(stages: &[StageView]) -> Option<usize> {
    stages
        .iter()
        .enumerate()
        .filter(|(_, s)| s.kind != StageKind::Producer)
        .map(|(i, s)| {
            let busy = s.ctx.stats.busy_ns.load(Ordering::Relaxed) as f64;
            (busy / s.ctx.exec.concurrency().max(1) as f64, i)
        })
        .filter(|(b, _)| *b > 0.0)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, i)| i)
}

/// One stage's row and how many items it took (a producer: emitted) since the last
/// snapshot, whose count `last` holds (its layer, throughput and bottleneck mark are the
/// caller's).
fn stage_snapshot(s: &StageView, last: &mut u64, now: Instant) -> (StageSnapshot, u64) {
    let st = &s.ctx.stats;
    let items_in = st.items_in.load(Ordering::Relaxed);
    let items_out = st.items_out.load(Ordering::Relaxed);
    let counted = match s.kind {
        StageKind::Producer => items_out,
        _ => items_in,
    };
    let delta = counted.saturating_sub(*last);
    *last = counted;
    let failed = st.failed.load(Ordering::Relaxed);
    let queue_len = st
        .queue_len
        .lock()
        .ok()
        .and_then(|q| q.as_ref().map(|f| f()))
        .unwrap_or(0);
    let started = st.started.lock().map(|s| s.is_some()).unwrap_or(false);
    let ended = st.finished.lock().map(|s| s.is_some()).unwrap_or(false);
    let status = if ended {
        StageStatus::Done
    } else if !started {
        StageStatus::Waiting
    } else if failed > 0 {
        StageStatus::Error
    } else if s.kind == StageKind::Producer
        || delta > 0
        || queue_len > 0
        || items_in > st.done.load(Ordering::Relaxed)
    {
        StageStatus::Active
    } else {
        StageStatus::Idle
    };
    let (p50_us, p99_us) = match st.latency.lock() {
        Ok(h) if !h.is_empty() => (
            h.value_at_quantile(0.5) as f64 / 1e3,
            h.value_at_quantile(0.99) as f64 / 1e3,
        ),
        _ => (0.0, 0.0),
    };
    let children = st
        .children
        .lock()
        .map(|c| c.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|c| ChildSnapshot {
            pid: c.pid,
            items: c.items,
            rss_bytes: if c.host.is_none() {
                crate::stats::rss_bytes(c.pid)
            } else {
                0
            },
            host: c.host,
            age_secs: now.duration_since(c.started).as_secs_f64(),
        })
        .collect();
    let snap = StageSnapshot {
        name: s.ctx.name.clone(),
        kind: s.kind,
        executor: s.ctx.exec.to_string(),
        layer: 0,
        items_in,
        items_out,
        failed,
        retried: st.retried.load(Ordering::Relaxed),
        cancelled: st.cancelled.load(Ordering::Relaxed),
        throughput: 0.0,
        p50_us,
        p99_us,
        queue_len,
        queue_capacity: match s.capacity {
            Some(Capacity::Bounded(n)) => Some(n),
            _ => None,
        },
        chained_to: s.chained_to.clone(),
        status,
        bottleneck: false,
        children,
        in_flight: st.in_flight.load(Ordering::Relaxed),
        in_flight_limit: s.ctx.exec.in_flight_limit(),
    };
    (snap, delta)
}
