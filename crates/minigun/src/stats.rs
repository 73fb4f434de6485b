//! Live per-stage counters and latency histograms.
//!
//! Workers keep a local histogram and busy time that they merge into the stage's shared ones
//! every [`MERGE_AFTER`] and when they end, so the hot path takes no lock and writes no
//! shared cache line (a merge walks the whole histogram: it is not done per item).
//! Fork executors measure latency in the child and send it back with each item's completion.

use hdrhistogram::Histogram;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The largest latency a histogram tells apart: 1 hour (larger ones count as this).
const HIGHEST_NS: u64 = 3_600_000_000_000;

/// A latency histogram: 1 ns .. [`HIGHEST_NS`], 3 significant digits. Its counts grow with
/// the largest value recorded (16 KiB at first, about 90 KiB once it holds 1 ms), instead of
/// being made for the whole range at once: 264 KiB of written memory per histogram, whose
/// page tables every fork of the process copied (three stages' histograms were most of what
/// a fork of the W1 pipeline copied). Record into it with [`record`].
pub(crate) fn new_histogram() -> Histogram<u64> {
    Histogram::new(3).expect("valid histogram precision")
}

/// Records `n` values of `ns` (clamped to 1 ns .. [`HIGHEST_NS`]) into a histogram of
/// [`new_histogram`], growing it if needed.
pub(crate) fn record(h: &mut Histogram<u64>, ns: u64, n: u64) {
    // Growing can only fail when the counts would not fit in memory's address range.
    let _ = h.record_n(ns.clamp(1, HIGHEST_NS), n);
}

/// The live statistics of one stage.
pub(crate) struct StageStats {
    pub(crate) items_in: AtomicU64,
    pub(crate) items_out: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) retried: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) cancelled: AtomicU64,
    /// Errors of the stage as a whole (start-up, hooks, a producer's error, `finish`).
    pub(crate) errors: AtomicU64,
    /// ipc_fork workers retired at a recycling limit and replaced.
    pub(crate) recycled_workers: AtomicU64,
    /// Received items that reached their final outcome (processed, failed or cancelled).
    pub(crate) done: AtomicU64,
    /// Items in flight now (async stages: futures started and not yet done).
    pub(crate) in_flight: AtomicU64,
    pub(crate) busy_ns: AtomicU64,
    pub(crate) queue_high_water: AtomicUsize,
    pub(crate) latency: Mutex<Histogram<u64>>,
    pub(crate) started: Mutex<Option<Instant>>,
    pub(crate) finished: Mutex<Option<Instant>>,
    /// How many items a producer said it will emit (for progress and ETA).
    pub(crate) declared_total: std::sync::OnceLock<u64>,
    /// Live forked children of a fork stage (updated by its supervisor).
    pub(crate) children: Mutex<Vec<ChildInfo>>,
    /// Reads the current length of the stage's input queue.
    /// Dropped when the stage ends: a probe must not keep its queue open (sends to an ended
    /// stage then fail instead of filling a queue nobody reads).
    pub(crate) queue_len: Mutex<Option<QueueLen>>,
    /// A remote stage's report part (written by its parent side).
    pub(crate) remote: Mutex<Option<crate::report::RemoteReport>>,
}

impl std::fmt::Debug for StageStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StageStats")
            .field("items_in", &self.items_in)
            .field("items_out", &self.items_out)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

/// Reads a queue's current length.
pub(crate) type QueueLen = Box<dyn Fn() -> usize + Send + Sync>;

/// A live child process of a fork stage.
#[derive(Debug, Clone)]
pub(crate) struct ChildInfo {
    pub(crate) pid: u32,
    pub(crate) started: Instant,
    pub(crate) items: u64,
    /// The host of a remote stage's worker (`None`: a child of this process).
    pub(crate) host: Option<String>,
}

impl StageStats {
    pub(crate) fn child_started(&self, pid: i32) {
        let info = ChildInfo {
            pid: pid as u32,
            started: Instant::now(),
            items: 0,
            host: None,
        };
        self.children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(info);
    }
    pub(crate) fn child_item(&self, pid: i32) {
        self.child_items(pid, 1);
    }
    pub(crate) fn child_items(&self, pid: i32, n: u64) {
        let mut c = self.children.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ch) = c.iter_mut().find(|c| c.pid == pid as u32) {
            ch.items += n;
        }
    }
    /// The live workers of a remote stage, replacing the last list (a worker keeps the time
    /// it was first seen).
    pub(crate) fn remote_workers(&self, workers: impl IntoIterator<Item = (String, u32)>) {
        let mut c = self.children.lock().unwrap_or_else(|e| e.into_inner());
        let old = std::mem::take(&mut *c);
        for (host, pid) in workers {
            let started = old
                .iter()
                .find(|o| o.pid == pid && o.host.as_deref() == Some(host.as_str()))
                .map_or_else(Instant::now, |o| o.started);
            c.push(ChildInfo {
                pid,
                started,
                items: 0,
                host: Some(host),
            });
        }
    }
    pub(crate) fn child_ended(&self, pid: i32) {
        let mut c = self.children.lock().unwrap_or_else(|e| e.into_inner());
        c.retain(|ch| ch.pid != pid as u32);
    }
}

impl Default for StageStats {
    fn default() -> Self {
        StageStats {
            items_in: AtomicU64::new(0),
            items_out: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            recycled_workers: AtomicU64::new(0),
            done: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            busy_ns: AtomicU64::new(0),
            queue_high_water: AtomicUsize::new(0),
            latency: Mutex::new(new_histogram()),
            started: Mutex::new(None),
            finished: Mutex::new(None),
            children: Mutex::new(Vec::new()),
            declared_total: std::sync::OnceLock::new(),
            queue_len: Mutex::new(None),
            remote: Mutex::new(None),
        }
    }
}

impl StageStats {
    pub(crate) fn mark_started(&self) {
        self.started
            .lock()
            .unwrap()
            .get_or_insert_with(Instant::now);
    }
    pub(crate) fn mark_finished(&self) {
        self.queue_len
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        *self.finished.lock().unwrap() = Some(Instant::now());
    }
    pub(crate) fn runtime(&self) -> Duration {
        match (
            *self.started.lock().unwrap(),
            *self.finished.lock().unwrap(),
        ) {
            (Some(s), Some(f)) => f.saturating_duration_since(s),
            (Some(s), None) => s.elapsed(),
            _ => Duration::ZERO,
        }
    }
    pub(crate) fn merge(&self, local: &mut Histogram<u64>) {
        if local.is_empty() {
            return;
        }
        if let Ok(mut h) = self.latency.lock() {
            let _ = h.add(&*local);
        }
        local.reset();
    }
}

/// Resident set size of a process of this host, in bytes (0 if unknown: it already exited).
pub(crate) fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// The statistics a [`Recorder`] writes into: borrowed from the stage, or owned by a worker
/// that outlives any borrow (a chained stage's worker, owned by its upstream's router).
enum StatsRef<'a> {
    Borrowed(&'a StageStats),
    Owned(std::sync::Arc<StageStats>),
}

impl std::ops::Deref for StatsRef<'_> {
    type Target = StageStats;
    fn deref(&self) -> &StageStats {
        match self {
            StatsRef::Borrowed(s) => s,
            StatsRef::Owned(s) => s,
        }
    }
}

/// A worker's view of its stage statistics: local histogram, shared counters.
pub(crate) struct Recorder<'a> {
    stats: StatsRef<'a>,
    local: Histogram<u64>,
    busy_ns: u64,
    /// The TSC clock (`quanta`): workers time every item with it.
    merged: quanta::Instant,
}

/// A worker also merges its histogram when this long has passed since its last merge, so
/// live views of slow stages see their latencies.
const MERGE_AFTER: Duration = Duration::from_millis(250);
/// A worker about to wait merges its histogram if this long has passed since its last merge.
const MERGE_IDLE: Duration = Duration::from_millis(10);

impl<'a> Recorder<'a> {
    pub(crate) fn new(stats: &'a StageStats) -> Self {
        Self::with(StatsRef::Borrowed(stats))
    }

    fn with(stats: StatsRef<'a>) -> Self {
        Recorder {
            stats,
            local: new_histogram(),
            busy_ns: 0,
            merged: quanta::Instant::now(),
        }
    }

    /// Records `n` attempts that together took `ns` of stage code (their busy time), each at
    /// the mean (a run of fast items timed together, see `exec::local`); `now` is the clock
    /// reading that ended the run.
    pub(crate) fn run(&mut self, ns: u64, n: u64, now: quanta::Instant) {
        if n == 0 {
            return;
        }
        record(&mut self.local, ns / n, n);
        self.busy_ns += ns;
        if now.saturating_duration_since(self.merged) >= MERGE_AFTER {
            self.merged = now;
            self.publish();
        }
    }

    /// Records an attempt's latency in stage code and the wall time its worker was occupied
    /// (for fork executors the latter includes fork, transfer and exit).
    pub(crate) fn latency_busy(&mut self, ns: u64, busy_ns: u64) {
        // A fork item costs far more than an atomic add: its busy time shows at once (live
        // views rank the bottleneck by it).
        self.stats.busy_ns.fetch_add(busy_ns, Ordering::Relaxed);
        self.record(ns, 0, quanta::Instant::now());
    }

    /// Records an attempt without reading the clock or touching shared counters: the caller
    /// handles items in batches and calls [`Recorder::idle`] after each batch.
    pub(crate) fn latency_busy_local(&mut self, ns: u64, busy_ns: u64) {
        record(&mut self.local, ns, 1);
        // A child's report of its own time is not trusted not to overflow.
        self.busy_ns = self.busy_ns.saturating_add(busy_ns);
    }

    fn record(&mut self, ns: u64, busy_ns: u64, now: quanta::Instant) {
        record(&mut self.local, ns, 1);
        self.busy_ns = self.busy_ns.saturating_add(busy_ns);
        if now.saturating_duration_since(self.merged) >= MERGE_AFTER {
            self.merged = now;
            self.publish();
        }
    }

    /// The worker is about to wait for input, or has handled a batch: publish what it has
    /// (histograms at most every [`MERGE_IDLE`], a merge walks the whole histogram).
    pub(crate) fn idle(&mut self, now: quanta::Instant) {
        if self.busy_ns > 0 {
            self.stats
                .busy_ns
                .fetch_add(std::mem::take(&mut self.busy_ns), Ordering::Relaxed);
        }
        if now.saturating_duration_since(self.merged) >= MERGE_IDLE {
            self.merged = now;
            self.stats.merge(&mut self.local);
        }
    }

    fn publish(&mut self) {
        self.stats
            .busy_ns
            .fetch_add(self.busy_ns, Ordering::Relaxed);
        self.busy_ns = 0;
        self.stats.merge(&mut self.local);
    }
}

impl Recorder<'static> {
    /// A recorder that holds its stage's statistics itself.
    pub(crate) fn owned(stats: std::sync::Arc<StageStats>) -> Self {
        Self::with(StatsRef::Owned(stats))
    }
}

impl Drop for Recorder<'_> {
    fn drop(&mut self) {
        self.publish();
    }
}
