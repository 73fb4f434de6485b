//! The run report: per-stage statistics, totals, bottleneck, failures. `Display` is a readable
//! table; `serde::Serialize` gives the machine-readable form.

use crate::ctx::StageCtx;
use crate::error::ItemFailure;
use crate::queue::Capacity;
use crate::shared::RunShared;
use crate::stage::StageKind;
use serde::Serialize;
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// The summary of a stage for the report, taken after the run.
pub(crate) struct StageInfo {
    pub(crate) ctx: Arc<StageCtx>,
    pub(crate) kind: StageKind,
    pub(crate) capacity: Option<Capacity>,
    /// Items end here (see [`RunReport::consumed`]).
    pub(crate) sink: bool,
    /// The stage it ran chained to.
    pub(crate) chained_to: Option<String>,
}

/// Latency percentiles of one stage, in microseconds (per attempt, measured where the stage
/// code ran: in the forked child for fork executors).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Latency {
    /// Number of measured attempts.
    pub count: u64,
    /// Mean.
    pub mean_us: f64,
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 95th percentile.
    pub p95_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Maximum.
    pub max_us: f64,
}

/// What one stage did.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct StageReport {
    /// Stage name.
    pub name: String,
    /// Stage kind.
    pub kind: StageKind,
    /// Executor it ran under.
    pub executor: String,
    /// Items received from its queue (each once, however many attempts). Every received item
    /// is accounted for exactly once: `items_in == processed + failed + cancelled`.
    pub items_in: u64,
    /// Items it emitted.
    pub items_out: u64,
    /// Items that finally failed.
    pub failed: u64,
    /// Retried attempts.
    pub retried: u64,
    /// Items sent to its dead-letter stage.
    pub dead_lettered: u64,
    /// Items never processed because the run was aborted or interrupted.
    pub cancelled: u64,
    /// Errors of the stage as a whole, not of an item: start-up, a hook, a producer's error,
    /// `Stage::finish` (they are in `failures` with no item).
    pub errors: u64,
    /// ipc_fork workers replaced at a recycling limit
    /// ([`Exec::max_items_per_worker`](crate::Exec::max_items_per_worker),
    /// [`Exec::max_worker_rss`](crate::Exec::max_worker_rss)).
    pub recycled_workers: u64,
    /// Wall time from its start to its end, in seconds.
    pub runtime_secs: f64,
    /// Items in per second of runtime (items out for producers).
    pub throughput: f64,
    /// Fraction of the stage's capacity (workers x runtime) spent in stage code.
    pub utilisation: f64,
    /// Latency percentiles.
    pub latency: Latency,
    /// Input queue capacity (`None`: producer or unbounded).
    pub queue_capacity: Option<usize>,
    /// Largest queue length seen.
    pub queue_high_water: usize,
    /// For a remote stage: its workers and the broker's counters.
    pub remote: Option<RemoteReport>,
    /// The stage it ran chained to: on that stage's threads, called with what it emitted,
    /// with no queue between them (so `queue_capacity` is `None` and the high-water mark
    /// 0). See [`Pipeline::chaining`](crate::Pipeline::chaining).
    pub chained_to: Option<String>,
}

/// What a remote stage's workers and broker did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[non_exhaustive]
pub struct RemoteReport {
    /// The broker's engine.
    pub broker: String,
    /// One row per worker process that served the run.
    pub workers: Vec<RemoteWorker>,
    /// Work entries sent by the parent.
    pub entries_sent: u64,
    /// Entries re-sent after the broker lost them (reconciliation).
    pub entries_resent: u64,
    /// Entries taken over from lost workers.
    pub reclaims: u64,
    /// Entries released by stopping workers (no delivery counted).
    pub releases: u64,
    /// Commits refused because another worker had taken the entry.
    pub lease_lost: u64,
    /// Results dropped because the item already had one (an item that ran twice).
    pub duplicates: u64,
    /// Entries moved to the broker's dead-letter stream.
    pub dead_lettered: u64,
    /// Most entries seen waiting in the broker at once (sampled).
    pub queue_high_water: u64,
    /// Time from sending an entry to having all its results, in microseconds.
    pub round_trip: Latency,
    /// Time spent waiting for an unreachable broker, in seconds.
    pub outage_secs: f64,
}

/// One worker process of a remote stage.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[non_exhaustive]
pub struct RemoteWorker {
    /// Host name.
    pub host: String,
    /// Process id.
    pub pid: u32,
    /// Items whose results it committed.
    pub items: u64,
    /// Items that finally failed there.
    pub failed: u64,
    /// Attempts it retried.
    pub retried: u64,
    /// Latency of the stage code there.
    pub latency: Latency,
}

/// Percentiles of a histogram of nanoseconds.
pub(crate) fn latency_of(h: &hdrhistogram::Histogram<u64>) -> Latency {
    let us = |ns: u64| ns as f64 / 1000.0;
    if h.is_empty() {
        return Latency::default();
    }
    Latency {
        count: h.len(),
        mean_us: h.mean() / 1000.0,
        p50_us: us(h.value_at_quantile(0.50)),
        p90_us: us(h.value_at_quantile(0.90)),
        p95_us: us(h.value_at_quantile(0.95)),
        p99_us: us(h.value_at_quantile(0.99)),
        max_us: us(h.max()),
    }
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct RunReport {
    /// Pipeline name.
    pub pipeline: String,
    /// Wall time of the run, in seconds.
    pub runtime_secs: f64,
    /// Items that entered the pipeline: emitted by its producers (the sources).
    pub produced: u64,
    /// Items that reached the sinks and were processed there: the stages where items end
    /// (no downstream, no declared route, not a dead-letter stage), not counting the ones
    /// that failed or were cancelled there. Counted in the sinks' own units: a sink after a
    /// `batch` stage counts batches.
    pub consumed: u64,
    /// Items that finally failed, in every stage (the dead-lettered ones among them).
    pub failed: u64,
    /// Failed items sent to a dead-letter stage, in every stage.
    pub dead_lettered: u64,
    /// Errors of stages as a whole (start-up, hooks, a producer's error, `Stage::finish`).
    pub stage_errors: u64,
    /// Source items per second: [`produced`](Self::produced) over the run's wall time.
    pub throughput: f64,
    /// The slowest real stage (highest busy time per worker), if any stage did work.
    pub bottleneck: Option<String>,
    /// Per-stage reports, in topological order.
    pub stages: Vec<StageReport>,
    /// Number of failures recorded: items that finally failed, and errors of stages as a
    /// whole.
    pub failures_total: u64,
    /// The first failures in full, at most [`Pipeline::keep_failures`](crate::Pipeline::keep_failures)
    /// ([`KEEP_FAILURES`](crate::KEEP_FAILURES) by default).
    pub failures: Vec<ItemFailure>,
    /// Failures counted in `failures_total` but left out of `failures` (past its cap).
    pub failures_left_out: u64,
    /// Whether the run was stopped early (handle `stop()`, signal, or abort).
    pub stopped: bool,
    /// The signal that stopped the run.
    pub signal: Option<i32>,
    /// What each fork stage did about huge pages for the parent's heap before it first
    /// forked (see [`HugePages`](crate::HugePages)), in the order they forked.
    pub huge_pages: Vec<crate::HugePagesReport>,
}

impl RunReport {
    /// The report of the stage named `name`.
    pub fn stage(&self, name: &str) -> Option<&StageReport> {
        self.stages.iter().find(|s| s.name == name)
    }

    pub(crate) fn collect(
        pipeline: &str,
        infos: &[StageInfo],
        shared: &RunShared,
        runtime: Duration,
    ) -> Self {
        let stages: Vec<StageReport> = infos.iter().map(stage_report).collect();
        let produced = stages
            .iter()
            .filter(|s| s.kind == StageKind::Producer)
            .map(|s| s.items_out)
            .sum();
        let consumed = infos
            .iter()
            .zip(&stages)
            .filter(|(i, s)| i.sink && s.kind != StageKind::Producer)
            .map(|(_, s)| s.items_in - s.failed.min(s.items_in) - s.cancelled.min(s.items_in))
            .sum();
        let bottleneck = infos
            .iter()
            .zip(&stages)
            .filter(|(_, s)| s.kind != StageKind::Producer && s.items_in > 0)
            .map(|(i, s)| {
                let busy = i.ctx.stats.busy_ns.load(Ordering::Relaxed) as f64;
                (busy / i.ctx.exec.concurrency().max(1) as f64, &s.name)
            })
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, n)| n.clone());
        let (failures, failures_total) = shared.failures();
        let secs = runtime.as_secs_f64();
        let signal = shared.signal.load(Ordering::Relaxed);
        let sum = |f: fn(&StageReport) -> u64| stages.iter().map(f).sum();
        RunReport {
            pipeline: pipeline.to_string(),
            runtime_secs: secs,
            produced,
            consumed,
            failed: sum(|s| s.failed),
            dead_lettered: sum(|s| s.dead_lettered),
            stage_errors: sum(|s| s.errors),
            throughput: if secs > 0.0 {
                produced as f64 / secs
            } else {
                0.0
            },
            bottleneck,
            failures_left_out: failures_total.saturating_sub(failures.len() as u64),
            stages,
            failures_total,
            failures,
            stopped: shared.stop.load(Ordering::Relaxed),
            signal: (signal != 0).then_some(signal),
            huge_pages: shared.huge.reports(),
        }
    }
}

fn stage_report(info: &StageInfo) -> StageReport {
    let st = &info.ctx.stats;
    let latency = latency_of(&st.latency.lock().unwrap_or_else(|e| e.into_inner()));
    let runtime = st.runtime().as_secs_f64();
    let items_in = st.items_in.load(Ordering::Relaxed);
    let items_out = st.items_out.load(Ordering::Relaxed);
    let counted = if info.kind == StageKind::Producer {
        items_out
    } else {
        items_in
    };
    let workers = info.ctx.exec.concurrency().max(1) as f64;
    let busy = st.busy_ns.load(Ordering::Relaxed) as f64 / 1e9;
    StageReport {
        name: info.ctx.name.clone(),
        kind: info.kind,
        executor: info.ctx.exec.to_string(),
        items_in,
        items_out,
        failed: st.failed.load(Ordering::Relaxed),
        retried: st.retried.load(Ordering::Relaxed),
        dead_lettered: st.dead_lettered.load(Ordering::Relaxed),
        cancelled: st.cancelled.load(Ordering::Relaxed),
        errors: st.errors.load(Ordering::Relaxed),
        recycled_workers: st.recycled_workers.load(Ordering::Relaxed),
        runtime_secs: runtime,
        throughput: if runtime > 0.0 {
            counted as f64 / runtime
        } else {
            0.0
        },
        utilisation: if runtime > 0.0 {
            (busy / (workers * runtime)).min(1.0)
        } else {
            0.0
        },
        latency,
        queue_capacity: match info.capacity {
            Some(crate::queue::Capacity::Bounded(n)) => Some(n),
            _ => None,
        },
        queue_high_water: st.queue_high_water.load(Ordering::Relaxed),
        remote: st.remote.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        chained_to: info.chained_to.clone(),
    }
}

impl fmt::Display for RunReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "pipeline {:?}: {} items from sources in {:.3}s ({:.0} items/s); {} reached sinks, \
             {} failed, {} dead-lettered{}{}",
            self.pipeline,
            self.produced,
            self.runtime_secs,
            self.throughput,
            self.consumed,
            self.failed,
            self.dead_lettered,
            match self.stage_errors {
                0 => String::new(),
                1 => ", 1 stage error".to_string(),
                n => format!(", {n} stage errors"),
            },
            match (self.stopped, self.signal) {
                (_, Some(s)) => format!(", stopped by signal {s}"),
                (true, None) => ", stopped early".to_string(),
                _ => String::new(),
            }
        )?;
        let width = self
            .stages
            .iter()
            .map(|s| s.name.chars().count())
            .max()
            .unwrap_or(5)
            .clamp(5, 32);
        writeln!(
            f,
            "  {:<width$} {:<12} {:>9} {:>9} {:>6} {:>6} {:>6} {:>11} {:>9} {:>9} {:>8}",
            "stage",
            "executor",
            "in",
            "out",
            "failed",
            "retry",
            "cancel",
            "items/s",
            "p50 us",
            "p99 us",
            "queue hw"
        )?;
        for s in &self.stages {
            let mark = if self.bottleneck.as_deref() == Some(&s.name) {
                "*"
            } else {
                " "
            };
            writeln!(
                f,
                " {mark}{:<width$} {:<12} {:>9} {:>9} {:>6} {:>6} {:>6} {:>11.0} {:>9.1} {:>9.1} {:>8}",
                truncate(&s.name, width),
                s.executor,
                s.items_in,
                s.items_out,
                s.failed,
                s.retried,
                s.cancelled,
                s.throughput,
                s.latency.p50_us,
                s.latency.p99_us,
                s.queue_high_water
            )?;
        }
        if let Some(b) = &self.bottleneck {
            writeln!(f, "  bottleneck: {b} (*)")?;
        }
        for s in &self.stages {
            if let Some(up) = &s.chained_to {
                writeln!(f, "  {}: chained to {up} (no queue between them)", s.name)?;
            }
        }
        for s in self.stages.iter().filter(|s| s.recycled_workers > 0) {
            writeln!(f, "  {}: {} workers recycled", s.name, s.recycled_workers)?;
        }
        for s in &self.stages {
            if let Some(r) = &s.remote {
                write_remote(f, &s.name, r)?;
            }
        }
        for h in &self.huge_pages {
            write_huge(f, h)?;
        }
        if self.failures_total > 0 {
            writeln!(f, "  {} failures; first:", self.failures_total)?;
            let shown = self.failures.iter().take(SHOWN_FAILURES);
            for fl in shown.clone() {
                writeln!(f, "    {fl}")?;
            }
            let more = self.failures_total - shown.count() as u64;
            if more > 0 {
                writeln!(
                    f,
                    "    ... and {more} more ({} more in the report's failures, {} left out of it)",
                    self.failures.len().saturating_sub(SHOWN_FAILURES),
                    self.failures_left_out
                )?;
            }
        }
        Ok(())
    }
}

/// How many failures the table prints (the report keeps more, see `failures`).
const SHOWN_FAILURES: usize = 5;
/// What a fork stage did about huge pages, on one line.
fn write_huge(f: &mut fmt::Formatter<'_>, h: &crate::HugePagesReport) -> fmt::Result {
    use crate::HugePagesStatus as S;
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let what = match h.status {
        S::Collapsed => format!(
            "collapsed {:.0} MiB of the parent's heap in {:.2}s ({:.0} -> {:.0} MiB in huge \
             pages, {:.0} MiB filled)",
            mib(h.asked_bytes),
            h.secs,
            mib(h.huge_before),
            mib(h.huge_after),
            mib(h.filled_bytes)
        ),
        S::Earlier => "collapsed earlier in this run".into(),
        S::Off => "off".into(),
        S::BelowThreshold => format!(
            "not needed (parent {:.0} MiB, below the threshold)",
            mib(h.anon_bytes)
        ),
        S::Unavailable => "unavailable".into(),
    };
    let why = h
        .reason
        .as_deref()
        .map_or(String::new(), |r| format!(": {r}"));
    writeln!(f, "  huge pages before {}: {what}{why}", h.stage)
}

/// A remote stage's broker counters and worker rows.
fn write_remote(f: &mut fmt::Formatter<'_>, stage: &str, r: &RemoteReport) -> fmt::Result {
    writeln!(
        f,
        "  {stage} on {}: {} entries sent, {} re-sent, {} reclaimed, {} released, {} lease lost, \
         {} duplicates dropped, {} dead-lettered, queue hw {} entries, round trip p50 {:.0} us \
         p99 {:.0} us, outage {:.1}s",
        r.broker,
        r.entries_sent,
        r.entries_resent,
        r.reclaims,
        r.releases,
        r.lease_lost,
        r.duplicates,
        r.dead_lettered,
        r.queue_high_water,
        r.round_trip.p50_us,
        r.round_trip.p99_us,
        r.outage_secs
    )?;
    for w in &r.workers {
        writeln!(
            f,
            "    worker {}:{} {:>9} items {:>6} failed {:>6} retried  p50 {:.1} us  p99 {:.1} us",
            w.host, w.pid, w.items, w.failed, w.retried, w.latency.p50_us, w.latency.p99_us
        )?;
    }
    Ok(())
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n - 1).chain(std::iter::once('~')).collect()
    }
}
