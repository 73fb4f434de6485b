//! What every workload shares: the result row, run settings, timing, peak RSS, PSS sampling.

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One line of the result table / one object of the JSON array.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Row {
    /// `W1` .. `W7`.
    pub(crate) workload: String,
    /// `minigun`, `baseline` (hand-written, measured in the same run) or `python` (bench_mp.py).
    pub(crate) runner: String,
    /// Executor as minigun names it (`cow_fork(4)`), or the baseline's name.
    pub(crate) executor: String,
    /// What distinguishes this row from its neighbours (in_flight, dataset kind, ...).
    pub(crate) variant: String,
    pub(crate) workers: usize,
    pub(crate) items: u64,
    /// Wall time of the measured run (the best of the repetitions).
    pub(crate) wall_secs: f64,
    pub(crate) items_per_sec: f64,
    /// The baseline's items/s measured in the same process (or the ideal rate for W5).
    pub(crate) floor_items_per_sec: Option<f64>,
    /// `items_per_sec / floor_items_per_sec`.
    pub(crate) ratio: Option<f64>,
    /// getrusage(RUSAGE_SELF).ru_maxrss of the process that ran this workload.
    pub(crate) peak_rss_bytes: u64,
    /// getrusage(RUSAGE_CHILDREN).ru_maxrss: the largest reaped child of that process.
    pub(crate) peak_rss_children_bytes: u64,
    /// Input megabytes (10^6) per second (W3).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub(crate) mb_per_sec: Option<f64>,
    /// Largest sum of PSS over the parent and its live children, sampled every ~20 ms (W4).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub(crate) pss_bytes: Option<u64>,
    /// ipc_fork's per-worker window.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub(crate) in_flight: Option<usize>,
    /// Share of the machine's CPU capacity used by other processes while this row's workload
    /// ran (from /proc/stat minus this benchmark's own CPU time). Above ~0.1 the numbers are
    /// disturbed by other work on the machine.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub(crate) foreign_cpu_share: Option<f64>,
    /// Median latency in ms (W7c: an item's round trip; W7d: from the kill of a worker to
    /// its item's result elsewhere).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub(crate) p50_ms: Option<f64>,
    /// 99th percentile latency in ms (W7d: the worst of its repetitions).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub(crate) p99_ms: Option<f64>,
    /// Growth of this process's resident memory over the measured run (W8c).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub(crate) rss_growth_bytes: Option<u64>,
    /// Anything else worth knowing about the measurement.
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub(crate) note: String,
}

impl Row {
    pub(crate) fn new(
        workload: &str,
        runner: &str,
        executor: impl Into<String>,
        workers: usize,
        items: u64,
        wall: Duration,
    ) -> Self {
        let secs = wall.as_secs_f64();
        let (peak_rss_bytes, peak_rss_children_bytes) = peak_rss();
        Row {
            workload: workload.into(),
            runner: runner.into(),
            executor: executor.into(),
            variant: String::new(),
            workers,
            items,
            wall_secs: secs,
            items_per_sec: items as f64 / secs,
            floor_items_per_sec: None,
            ratio: None,
            peak_rss_bytes,
            peak_rss_children_bytes,
            mb_per_sec: None,
            pss_bytes: None,
            in_flight: None,
            foreign_cpu_share: None,
            p50_ms: None,
            p99_ms: None,
            rss_growth_bytes: None,
            note: String::new(),
        }
    }

    pub(crate) fn variant(mut self, v: impl Into<String>) -> Self {
        self.variant = v.into();
        self
    }

    /// Sets the floor and the ratio against it.
    pub(crate) fn floor(mut self, floor_items_per_sec: f64) -> Self {
        self.floor_items_per_sec = Some(floor_items_per_sec);
        self.ratio = Some(self.items_per_sec / floor_items_per_sec);
        self
    }

    pub(crate) fn note(mut self, n: impl Into<String>) -> Self {
        let n = n.into();
        if self.note.is_empty() {
            self.note = n;
        } else {
            self.note = format!("{}; {n}", self.note);
        }
        self
    }
}

/// Settings shared by the workloads.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cfg {
    /// Small sizes (CI).
    pub(crate) quick: bool,
    /// Repetitions of short measurements; the best (shortest) one is reported.
    pub(crate) reps: usize,
}

impl Cfg {
    /// `full` normally, `quick` under `--quick`.
    pub(crate) fn size<T>(&self, full: T, quick: T) -> T {
        if self.quick {
            quick
        } else {
            full
        }
    }
}

/// Keeps `r` if it was faster than `best`.
fn keep_faster<T>(best: &mut (Duration, T), r: (Duration, T)) {
    if r.0 < best.0 {
        *best = r;
    }
}

/// Runs `f` `reps` times and keeps the fastest run (with whatever it returned).
pub(crate) fn best_of<T>(reps: usize, mut f: impl FnMut() -> (Duration, T)) -> (Duration, T) {
    let mut best = f();
    for _ in 1..reps {
        keep_faster(&mut best, f());
    }
    best
}

/// Runs `a` and `b` alternately `reps` times each (so both see the same machine conditions)
/// and keeps the fastest run of each.
pub(crate) fn best_of_pair<A, B>(
    reps: usize,
    mut a: impl FnMut() -> (Duration, A),
    mut b: impl FnMut() -> (Duration, B),
) -> ((Duration, A), (Duration, B)) {
    let (mut best_a, mut best_b) = (a(), b());
    for _ in 1..reps {
        keep_faster(&mut best_a, a());
        keep_faster(&mut best_b, b());
    }
    (best_a, best_b)
}

/// [`best_of_pair`] for three runners, alternating `a`, `b`, `c`.
pub(crate) fn best_of_three<A, B, C>(
    reps: usize,
    mut a: impl FnMut() -> (Duration, A),
    mut b: impl FnMut() -> (Duration, B),
    mut c: impl FnMut() -> (Duration, C),
) -> ((Duration, A), (Duration, B), (Duration, C)) {
    let (mut best_a, mut best_b, mut best_c) = (a(), b(), c());
    for _ in 1..reps {
        keep_faster(&mut best_a, a());
        keep_faster(&mut best_b, b());
        keep_faster(&mut best_c, c());
    }
    (best_a, best_b, best_c)
}

/// Starts and joins one thread. Once a process has had a second thread, glibc forks it the
/// multi-threaded way for the rest of its life (it runs its fork handlers and takes malloc's
/// locks, and the child resets them: about 16 more page faults per fork here), and every
/// process that runs minigun has had one. A job calls this before its first baseline, so
/// every repetition of a hand-written loop forks as minigun's processes do; before, the first
/// repetition, run before any minigun run had started a thread, forked the single-threaded
/// way and, being the fastest, alone made the floor of the first pair.
pub(crate) fn as_after_threads() {
    std::thread::spawn(|| {}).join().expect("an empty thread");
}

/// Times one call.
pub(crate) fn timed<T>(f: impl FnOnce() -> T) -> (Duration, T) {
    let t0 = Instant::now();
    let r = f();
    (t0.elapsed(), r)
}

/// Peak RSS of this process and of its largest reaped child, in bytes.
pub(crate) fn peak_rss() -> (u64, u64) {
    (
        crate::raw::max_rss(libc::RUSAGE_SELF),
        crate::raw::max_rss(libc::RUSAGE_CHILDREN),
    )
}

/// Progress on stderr (stdout carries the results).
pub(crate) fn progress(msg: impl AsRef<str>) {
    eprintln!("  .. {}", msg.as_ref());
}

/// The sum of the first field named `field` (in kB) of `/proc/<pid>/smaps_rollup`, in bytes.
pub(crate) fn smaps_field(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        let kb: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kb * 1024)
    })
}

/// Pids whose parent is `parent`: from `/proc/<parent>/task/*/children` (cheap), or by
/// scanning every `/proc/<pid>/stat` when the kernel lacks CONFIG_PROC_CHILDREN.
pub(crate) fn children_of(parent: u32) -> Vec<u32> {
    if let Some(v) = children_from_tasks(parent) {
        return v;
    }
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    // pid (comm) state ppid ...; comm may hold spaces and parentheses.
                    let after = &s[s.rfind(')')? + 1..];
                    after.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect()
}

fn children_from_tasks(parent: u32) -> Option<Vec<u32>> {
    let mut out = Vec::new();
    let mut any = false;
    for task in std::fs::read_dir(format!("/proc/{parent}/task")).ok()? {
        let Ok(task) = task else { continue };
        // A thread may end between the listing and the read: skip it.
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            any = true;
            out.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    any.then_some(out)
}

/// Samples the summed PSS of this process and its live children on a thread, every
/// `every`, and keeps the maximum.
///
/// A sum is only meaningful if no process forked or exited while it was read: a page's PSS
/// share is its size divided by its current number of sharers, so reading the parent before a
/// fork and its new child after it counts the shared pages twice over. A sample is therefore
/// kept only if the set of children was the same before and after it was read; an
/// inconsistent read is retried at once (up to 20 times per tick).
#[derive(Debug)]
pub(crate) struct PssSampler {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<PssStats>,
}

/// What a [`PssSampler`] saw.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PssStats {
    /// Largest consistent sum, in bytes.
    pub(crate) max: u64,
    /// Samples kept.
    pub(crate) kept: usize,
    /// Samples dropped because a child forked or exited while they were read.
    pub(crate) dropped: usize,
}

/// Attempts per sampling tick before giving up on that tick.
const RETRIES: usize = 20;

impl PssSampler {
    pub(crate) fn start(every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::Builder::new()
            .name("pss-sampler".into())
            .spawn(move || {
                let me = std::process::id();
                let mut st = PssStats::default();
                let mut next = Instant::now();
                while !s.load(Ordering::Relaxed) {
                    // Up to RETRIES attempts per tick, until one reads a stable set.
                    for _ in 0..RETRIES {
                        let mut before = children_of(me);
                        let mut sum = smaps_field(me, "Pss").unwrap_or(0);
                        for &c in &before {
                            sum += smaps_field(c, "Pss").unwrap_or(0);
                        }
                        let mut after = children_of(me);
                        before.sort_unstable();
                        after.sort_unstable();
                        if before == after {
                            st.max = st.max.max(sum);
                            st.kept += 1;
                            break;
                        }
                        st.dropped += 1;
                    }
                    next += every;
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    } else {
                        next = now;
                    }
                }
                st
            })
            .expect("spawn the PSS sampler");
        PssSampler { stop, handle }
    }

    /// Stops sampling and returns what it saw.
    pub(crate) fn finish(self) -> PssStats {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("PSS sampler panicked")
    }
}

/// A small deterministic PRNG (xorshift64*), so runs are reproducible without a dependency.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }
    pub(crate) fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// The checksum used by W3 and W4: the sum of the bytes (vectorises well; the point of
/// these workloads is moving and sharing the bytes, not hashing them).
pub(crate) fn byte_sum(bytes: &[u8]) -> u64 {
    // Sum in u32 lanes per 64 KiB block (no overflow: 65536 * 255 < 2^32), then widen.
    bytes
        .chunks(1 << 16)
        .map(|c| c.iter().map(|&b| b as u32).sum::<u32>() as u64)
        .sum()
}

/// MiB, for the table.
pub(crate) fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// CPU time of the whole machine and of this process's reaped children, to tell how much of
/// the machine other processes used while a child job ran.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MachineCpu {
    busy_secs: f64,
    total_secs: f64,
    children_secs: f64,
}

impl MachineCpu {
    pub(crate) fn now() -> Option<MachineCpu> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let line = stat.lines().next()?.strip_prefix("cpu ")?;
        let v: Vec<f64> = line
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal (guest time is inside user).
        if v.len() < 8 {
            return None;
        }
        let hz = crate::raw::clock_ticks() as f64;
        let idle = v[3] + v[4];
        let total: f64 = v[..8].iter().sum();
        Some(MachineCpu {
            busy_secs: (total - idle) / hz,
            total_secs: total / hz,
            children_secs: crate::raw::children_cpu_secs(),
        })
    }

    /// Share of the machine's capacity used by others since `self` (our reaped children
    /// excluded).
    pub(crate) fn foreign_share_since(self) -> Option<f64> {
        let n = MachineCpu::now()?;
        let total = n.total_secs - self.total_secs;
        if total <= 0.0 {
            return None;
        }
        let foreign = (n.busy_secs - self.busy_secs) - (n.children_secs - self.children_secs);
        Some((foreign / total).clamp(0.0, 1.0))
    }
}
