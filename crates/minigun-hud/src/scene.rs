//! What one frame of the dashboard shows: a plain copy of a [`Snapshot`] that can also be
//! built or adjusted by hand (the library's snapshot types cannot be constructed outside it).

use minigun::{ChildSnapshot, Snapshot, StageKind, StageSnapshot, StageStatus};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The input of [`draw`](crate::draw): the run at one moment, as the dashboard shows it.
///
/// Made from a [`Snapshot`] with `Scene::from(&snapshot)`; every field is public so tests and
/// custom front-ends can build or adjust one.
#[derive(Debug, Clone, PartialEq)]
pub struct Scene {
    /// Pipeline name.
    pub pipeline: String,
    /// Seconds since the run started.
    pub elapsed_secs: f64,
    /// Stages in topological order.
    pub stages: Vec<StageRow>,
    /// Edges between stages, as indices into `stages`.
    pub edges: Vec<(usize, usize)>,
    /// Items emitted by producers so far.
    pub produced: u64,
    /// Items produced per second (the producers' throughput added up).
    pub rate: f64,
    /// Items from the producers that the pipeline has finished with
    /// ([`Snapshot::finished_items`]): the percentage and the time left count these.
    pub finished_items: u64,
    /// Items finished per second.
    pub finish_rate: f64,
    /// How many items the producers are expected to emit in all, when known: the header then
    /// shows the percentage finished and an estimate of the time left.
    pub total: Option<u64>,
    /// Failures so far.
    pub failures_total: u64,
    /// Whether the run has ended.
    pub finished: bool,
    /// Whether the run is stopping.
    pub stopping: bool,
}

/// One stage of a [`Scene`]: the fields of a [`StageSnapshot`].
#[derive(Debug, Clone, PartialEq)]
pub struct StageRow {
    /// Stage name.
    pub name: String,
    /// Stage kind.
    pub kind: StageKind,
    /// Executor it runs under, as the library prints it (`threads(4)`, `ipc_fork(2)`, ...).
    pub executor: String,
    /// Depth in the graph: the column the stage is drawn in.
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
    /// Items per second (in; out for producers).
    pub throughput: f64,
    /// Median latency, in microseconds (0: none yet).
    pub p50_us: f64,
    /// 99th percentile latency, in microseconds (0: none yet).
    pub p99_us: f64,
    /// Items waiting in its input queue.
    pub queue_len: usize,
    /// Its input queue's capacity (`None`: producer, unbounded, or chained).
    pub queue_capacity: Option<usize>,
    /// The stage it runs chained to (no queue of its own).
    pub chained_to: Option<String>,
    /// What it is doing.
    pub status: StageStatus,
    /// Whether it is the busiest stage per worker so far.
    pub bottleneck: bool,
    /// Live child processes (fork stages).
    pub children: Vec<ChildSnapshot>,
    /// Items in flight now (async stages).
    pub in_flight: u64,
    /// The most it runs at once (`tasks(n)`: `n`; `None` for other executors).
    pub in_flight_limit: Option<usize>,
}

impl StageRow {
    /// Whether the stage runs under a fork executor (its children are listed in a panel).
    pub fn is_fork(&self) -> bool {
        self.executor.starts_with("cow_fork") || self.executor.starts_with("ipc_fork")
    }

    /// The count its throughput is measured on: items out for producers, items in otherwise.
    pub fn counted(&self) -> u64 {
        if self.kind == StageKind::Producer {
            self.items_out
        } else {
            self.items_in
        }
    }
}

impl From<&StageSnapshot> for StageRow {
    fn from(s: &StageSnapshot) -> Self {
        StageRow {
            name: s.name.clone(),
            kind: s.kind,
            executor: s.executor.clone(),
            layer: s.layer,
            items_in: s.items_in,
            items_out: s.items_out,
            failed: s.failed,
            retried: s.retried,
            cancelled: s.cancelled,
            throughput: s.throughput,
            p50_us: s.p50_us,
            p99_us: s.p99_us,
            queue_len: s.queue_len,
            queue_capacity: s.queue_capacity,
            chained_to: s.chained_to.clone(),
            status: s.status,
            bottleneck: s.bottleneck,
            children: s.children.clone(),
            in_flight: s.in_flight,
            in_flight_limit: s.in_flight_limit,
        }
    }
}

impl From<&Snapshot> for Scene {
    fn from(s: &Snapshot) -> Self {
        let stages: Vec<StageRow> = s.stages.iter().map(StageRow::from).collect();
        let rate = stages
            .iter()
            .filter(|st| st.kind == StageKind::Producer)
            .map(|st| st.throughput)
            .sum();
        Scene {
            pipeline: s.pipeline.clone(),
            elapsed_secs: s.elapsed_secs,
            stages,
            edges: s.edges.clone(),
            produced: s.produced,
            rate,
            finished_items: s.finished_items,
            // A single snapshot has no rate of its own; `RateWindow` measures it.
            finish_rate: 0.0,
            // What the producers declared; `Options::total` overrides it.
            total: s.total,
            failures_total: s.failures_total,
            finished: s.finished,
            stopping: s.stopping,
        }
    }
}

impl Scene {
    /// Percentage of `total` finished (not only produced: items waiting in queues are still
    /// work), and the estimated seconds left at the current rate of finished items.
    pub fn progress(&self) -> Option<(f64, Option<f64>)> {
        let total = self.total.filter(|t| *t > 0)?;
        let done = self.finished_items.min(total);
        let pct = done as f64 * 100.0 / total as f64;
        let left = total - done;
        let eta = if left == 0 {
            Some(0.0)
        } else if self.finish_rate > 0.0 {
            Some(left as f64 / self.finish_rate)
        } else {
            None
        };
        Some((pct, eta))
    }
}

/// Rates over a sliding window of snapshots: a dashboard redrawn 15 times a second would
/// otherwise show per-frame rates that jump between 0 and a burst.
#[derive(Debug)]
pub(crate) struct RateWindow {
    window: Duration,
    /// Time, each stage's count, items produced, items finished.
    samples: VecDeque<(Instant, Vec<u64>, u64, u64)>,
}

impl RateWindow {
    pub(crate) fn new(window: Duration) -> Self {
        RateWindow {
            window,
            samples: VecDeque::new(),
        }
    }

    /// Records the scene's counters and replaces its rates with rates over the window.
    pub(crate) fn apply(&mut self, scene: &mut Scene, now: Instant) {
        let counted: Vec<u64> = scene.stages.iter().map(StageRow::counted).collect();
        // Keep one sample at least `window` old, so the rate spans the whole window.
        while self.samples.len() > 1 && now.duration_since(self.samples[1].0) >= self.window {
            self.samples.pop_front();
        }
        if let Some((t0, c0, p0, f0)) = self.samples.front() {
            let dt = now.duration_since(*t0).as_secs_f64();
            if dt > 0.0 && c0.len() == counted.len() {
                for (st, (now_c, then_c)) in scene.stages.iter_mut().zip(counted.iter().zip(c0)) {
                    st.throughput = now_c.saturating_sub(*then_c) as f64 / dt;
                }
                scene.rate = scene.produced.saturating_sub(*p0) as f64 / dt;
                scene.finish_rate = scene.finished_items.saturating_sub(*f0) as f64 / dt;
            }
        }
        self.samples
            .push_back((now, counted, scene.produced, scene.finished_items));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(kind: StageKind, items: u64) -> StageRow {
        StageRow {
            name: "s".into(),
            kind,
            executor: "inline".into(),
            layer: 0,
            items_in: items,
            items_out: items,
            failed: 0,
            retried: 0,
            cancelled: 0,
            throughput: 0.0,
            p50_us: 0.0,
            p99_us: 0.0,
            queue_len: 0,
            queue_capacity: None,
            chained_to: None,
            status: StageStatus::Active,
            bottleneck: false,
            children: vec![],
            in_flight: 0,
            in_flight_limit: None,
        }
    }

    fn scene(items: u64) -> Scene {
        Scene {
            pipeline: "p".into(),
            elapsed_secs: 0.0,
            stages: vec![
                row(StageKind::Producer, items),
                row(StageKind::Consumer, items),
            ],
            edges: vec![(0, 1)],
            produced: items,
            rate: 0.0,
            finished_items: items / 2,
            finish_rate: 0.0,
            total: Some(1000),
            failures_total: 0,
            finished: false,
            stopping: false,
        }
    }

    #[test]
    fn rates_span_the_window() {
        let mut w = RateWindow::new(Duration::from_secs(1));
        let t0 = Instant::now();
        let mut s = scene(0);
        w.apply(&mut s, t0);
        for i in 1..=20u64 {
            let mut s = scene(i * 10);
            w.apply(&mut s, t0 + Duration::from_millis(100 * i));
            if i >= 10 {
                // 10 items every 100 ms, measured over one second.
                assert!((s.rate - 100.0).abs() < 1e-6, "{}", s.rate);
                assert!((s.finish_rate - 50.0).abs() < 1e-6, "{}", s.finish_rate);
                assert!((s.stages[1].throughput - 100.0).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn progress_and_eta_count_finished_items() {
        // 500 produced, 250 finished, 250 waiting in queues.
        let mut s = scene(500);
        s.rate = 100.0;
        s.finish_rate = 50.0;
        let (pct, eta) = s.progress().unwrap();
        assert!((pct - 25.0).abs() < 1e-9);
        assert_eq!(eta, Some(15.0));
        // Everything produced is not everything done.
        let mut s = scene(1000);
        s.finish_rate = 100.0;
        let (pct, eta) = s.progress().unwrap();
        assert!((pct - 50.0).abs() < 1e-9);
        assert_eq!(eta, Some(5.0));
        s.total = None;
        assert!(s.progress().is_none());
    }
}
