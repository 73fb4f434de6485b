//! Plain progress: one summary line to stderr every interval while the run goes on, and one
//! when it ends. Used when the dashboard is off (stderr is not a terminal, or not asked for).

use crate::format;
use crate::scene::Scene;
use crate::Options;
use minigun::{Monitor, RunError, RunHandle, RunReport};
use std::io::Write;
use std::time::{Duration, Instant};

/// How often the run is checked for its end between lines.
const POLL: Duration = Duration::from_millis(20);

/// The periodic line: `minigun: etl 3.0s: 12345 items, 9000 done, 4.1k/s, 3 failures, 45%,
/// ETA 5.0s` (the percentage and the time left count finished items).
pub(crate) fn line(scene: &Scene) -> String {
    let mut s = format!(
        "minigun: {} {}: {} items, {} done, {}, {} failure{}",
        scene.pipeline,
        format::secs(scene.elapsed_secs),
        scene.produced,
        scene.finished_items,
        format::rate(scene.rate),
        scene.failures_total,
        if scene.failures_total == 1 { "" } else { "s" },
    );
    if let Some((pct, eta)) = scene.progress() {
        s.push_str(&format!(", {pct:.0}%"));
        if let Some(eta) = eta.filter(|e| *e > 0.0) {
            s.push_str(&format!(", ETA {}", format::secs(eta)));
        }
    }
    if scene.stopping && !scene.finished {
        s.push_str(", stopping");
    }
    s
}

/// The closing line, from the run's result.
pub(crate) fn final_line(pipeline: &str, result: &Result<RunReport, RunError>) -> String {
    let summary = |r: &RunReport| {
        format!(
            "{} produced, {} reached sinks ({}), {} failure{}",
            r.produced,
            r.consumed,
            format::rate(r.throughput),
            r.failures_total,
            if r.failures_total == 1 { "" } else { "s" },
        )
    };
    match result {
        Ok(r) => {
            let how = match (r.signal, r.stopped) {
                (Some(sig), _) => format!("interrupted by signal {sig}"),
                (None, true) => "stopped".to_string(),
                (None, false) => "finished".to_string(),
            };
            format!(
                "minigun: {} {how} after {}: {}",
                r.pipeline,
                format::secs(r.runtime_secs),
                summary(r)
            )
        }
        Err(RunError::Aborted { cause, report }) => format!(
            "minigun: {} aborted after {}: {}; {}",
            report.pipeline,
            format::secs(report.runtime_secs),
            cause,
            summary(report)
        ),
        Err(e) => format!("minigun: {pipeline} failed: {e}"),
    }
}

/// Prints a line every `options.interval` until the run ends.
pub(crate) fn follow(handle: &RunHandle, monitor: &Monitor, options: &Options) {
    let interval = options.interval.max(Duration::from_millis(100));
    let first = monitor.snapshot();
    let mut last = (Instant::now(), first.produced, first.finished_items);
    while !handle.is_finished() {
        std::thread::sleep(POLL);
        let now = Instant::now();
        if now.duration_since(last.0) < interval || handle.is_finished() {
            continue;
        }
        let mut scene = Scene::from(&monitor.snapshot());
        scene.total = options.total.or(scene.total);
        let dt = now.duration_since(last.0).as_secs_f64();
        scene.rate = scene.produced.saturating_sub(last.1) as f64 / dt;
        scene.finish_rate = scene.finished_items.saturating_sub(last.2) as f64 / dt;
        last = (now, scene.produced, scene.finished_items);
        let _ = writeln!(std::io::stderr().lock(), "{}", line(&scene));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scene() -> Scene {
        Scene {
            pipeline: "etl".into(),
            elapsed_secs: 3.0,
            stages: vec![],
            edges: vec![],
            produced: 450,
            rate: 50.0,
            finished_items: 300,
            finish_rate: 25.0,
            total: None,
            failures_total: 1,
            finished: false,
            stopping: false,
        }
    }

    #[test]
    fn progress_lines() {
        let mut s = scene();
        assert_eq!(
            line(&s),
            "minigun: etl 3.0s: 450 items, 300 done, 50/s, 1 failure"
        );
        s.total = Some(1000);
        s.failures_total = 0;
        assert_eq!(
            line(&s),
            "minigun: etl 3.0s: 450 items, 300 done, 50/s, 0 failures, 30%, ETA 28s"
        );
        s.stopping = true;
        assert!(line(&s).ends_with(", stopping"));
    }

    #[test]
    fn final_lines() {
        let err = Err(RunError::Thread("boom".into()));
        assert_eq!(
            final_line("etl", &err),
            "minigun: etl failed: run thread failed: boom"
        );
    }
}
