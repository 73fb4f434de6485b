//! # minigun-hud
//!
//! A live terminal dashboard for [`minigun`] pipelines, and plain progress lines when there is
//! no terminal to draw on.
//!
//! ```no_run
//! use minigun::Pipeline;
//!
//! minigun_hud::init_logging(); // MINIGUN_LOG=debug for more
//! let p = Pipeline::new("numbers");
//! p.producer("gen", |out| out.emit_all(0..1_000_000u64).map_err(Into::into));
//! p.map("square", |x: u64| Ok(x * x));
//! p.consumer("sink", |_: u64| Ok(()));
//! // The dashboard with MINIGUN_HUD=1 (or Options::default().dashboard(true)),
//! // otherwise a progress line every second.
//! let report = minigun_hud::run(p)?;
//! println!("{report}");
//! # Ok::<(), minigun::RunError>(())
//! ```
//!
//! ## What is shown
//!
//! - The stage graph: a box per stage (name, executor, throughput), one column per layer,
//!   arrows along the edges. Box colours follow the stage's status.
//! - The stage table: kind, executor, items in / out, failures, throughput, p50 and p99
//!   latency, input queue depth (`len/cap`; `chained` for a stage that runs on its
//!   upstream's threads, with no queue), and status: `active`, `idle`, `bottleneck` (the
//!   busiest stage per worker, while it runs), `error` (had failures, still running),
//!   `done`, `waiting`.
//! - For `cow_fork` and `ipc_fork` stages, their live child processes: pid, items handled,
//!   resident memory, age.
//! - The run's state (running, stopping, finished), elapsed time, items produced and their
//!   rate, failures, and percentage and time left when the producers declare their total
//!   (`StageRef::total`) or [`Options::total`] is set. The percentage and the time left count
//!   the items the pipeline has finished with
//!   ([`Snapshot::finished_items`](minigun::Snapshot::finished_items)), not the items produced.
//!
//! Keys: `q` (or Ctrl-C) stops the run ([`RunHandle::stop`]) and leaves the dashboard, `space`
//! freezes the display (the run goes on), `↑ ↓ PgUp PgDn Home End` scroll the stage table,
//! `h` shows help. The dashboard is redrawn about 15 times a second from
//! [`Monitor::snapshot`](minigun::Monitor::snapshot) only; it never slows the run down.
//!
//! ## When the dashboard is shown
//!
//! When [`Options::dashboard`] is true, or the environment variable `MINIGUN_HUD` is set to
//! `1` (`MINIGUN_HUD=0` turns it off whatever the code says), and stderr is a terminal. The
//! dashboard draws on stderr, so stdout stays free for the program's output. Otherwise, and
//! also after `q` while the run winds down, a line like
//!
//! ```text
//! minigun: etl 3.0s: 12345 items, 9000 done, 4.1k/s, 3 failures, 45%, ETA 5.0s
//! ```
//!
//! goes to stderr every second (items produced, items finished, the rate of items produced,
//! failures, and the percentage finished with the time left), and one line when the run
//! ends. [`Options::progress`] turns these lines off.
//!
//! The terminal is always given back (raw mode off, main screen, cursor shown): when the run
//! ends, when the dashboard fails, and on a panic (the panic message is printed after the
//! terminal is restored).
//!
//! ## Logging
//!
//! [`init_logging`] installs a `tracing` subscriber filtered by `MINIGUN_LOG`
//! (`MINIGUN_LOG=debug`, `MINIGUN_LOG=warn,minigun=trace`, ...; warnings and errors when
//! unset). Log lines written while the dashboard is on screen are held and printed when it
//! closes. Stage code that prints to stdout or stderr itself draws over the dashboard: log
//! through `tracing` instead.
//!
//! ## Testing and custom front-ends
//!
//! [`draw`] is a pure function of a [`Scene`] (a plain copy of a
//! [`Snapshot`](minigun::Snapshot), every field public) and a [`ViewState`]: render it with
//! ratatui's `TestBackend` to test what the dashboard shows.

mod dag;
mod format;
mod logging;
mod progress;
mod render;
mod scene;
mod status;
mod tui;

pub use logging::{init_logging, LOG_ENV};
pub use render::{draw, draw_snapshot, render, ViewState, MIN_HEIGHT, MIN_WIDTH};
pub use scene::{Scene, StageRow};

use minigun::{Pipeline, RunError, RunHandle, RunReport};
use std::io::{IsTerminal, Write};
use std::time::Duration;

/// The environment variable that turns the dashboard on (`1`) or off (`0`).
pub const HUD_ENV: &str = "MINIGUN_HUD";

/// How a run is shown.
///
/// ```
/// use minigun_hud::Options;
/// let options = Options::default().dashboard(true).total(10_000);
/// assert!(options.dashboard && options.progress);
/// let same = Options { dashboard: true, total: Some(10_000), ..Options::default() };
/// assert_eq!(options, same);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Show the live dashboard when stderr is a terminal. `MINIGUN_HUD=1` / `MINIGUN_HUD=0`
    /// in the environment overrides it. Default: false.
    pub dashboard: bool,
    /// How many items the producers will emit in all, if known: adds a percentage and an
    /// estimate of the time left. Default: none.
    pub total: Option<u64>,
    /// Print progress lines to stderr when the dashboard is not shown, and a closing line.
    /// Default: true.
    pub progress: bool,
    /// Time between progress lines (at least 100 ms). Default: one second.
    pub interval: Duration,
    /// Keep the dashboard on screen after the run ends, until `q` is pressed. Default: false
    /// (it closes as soon as the run ends).
    pub linger: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            dashboard: false,
            total: None,
            progress: true,
            interval: Duration::from_secs(1),
            linger: false,
        }
    }
}

impl Options {
    /// Sets [`Options::dashboard`].
    pub fn dashboard(mut self, on: bool) -> Self {
        self.dashboard = on;
        self
    }
    /// Sets [`Options::total`].
    pub fn total(mut self, items: u64) -> Self {
        self.total = Some(items);
        self
    }
    /// Sets [`Options::progress`].
    pub fn progress(mut self, on: bool) -> Self {
        self.progress = on;
        self
    }
    /// Sets [`Options::interval`].
    pub fn interval(mut self, every: Duration) -> Self {
        self.interval = every;
        self
    }
    /// Sets [`Options::linger`].
    pub fn linger(mut self, on: bool) -> Self {
        self.linger = on;
        self
    }

    /// Whether the dashboard is asked for, by `MINIGUN_HUD` or else by [`Options::dashboard`]
    /// (whether stderr is a terminal is not checked here).
    pub fn dashboard_requested(&self) -> bool {
        env_flag(std::env::var(HUD_ENV).ok().as_deref()).unwrap_or(self.dashboard)
    }
}

/// `MINIGUN_HUD`'s value: unset or empty says nothing; `0`, `false`, `no`, `off` turn the
/// dashboard off; anything else turns it on.
fn env_flag(value: Option<&str>) -> Option<bool> {
    let v = value?.trim();
    if v.is_empty() {
        return None;
    }
    Some(!matches!(
        v.to_ascii_lowercase().as_str(),
        "0" | "false" | "no" | "off"
    ))
}

/// Shows runs: the dashboard or progress lines, as its [`Options`] say.
#[derive(Debug, Clone, Default)]
pub struct Hud {
    options: Options,
}

impl Hud {
    /// A hud with these options.
    pub fn new(options: Options) -> Self {
        Hud { options }
    }

    /// Its options.
    pub fn options(&self) -> &Options {
        &self.options
    }

    /// Shows a running pipeline until it ends, and returns its report.
    ///
    /// With the dashboard, `q` stops the run ([`RunHandle::stop`]: producers stop, items
    /// already emitted are still processed) and closes the dashboard; progress lines follow
    /// until the run has ended. The terminal is restored before this returns, and before a
    /// panic message is printed.
    pub fn watch(&self, handle: RunHandle) -> Result<RunReport, RunError> {
        let monitor = handle.monitor();
        let pipeline = monitor.snapshot().pipeline;
        if self.options.dashboard_requested() && std::io::stderr().is_terminal() {
            if let Err(e) = tui::run(&handle, &monitor, &self.options) {
                tracing::warn!(error = %e, "the dashboard failed; showing progress lines");
            }
        }
        if self.options.progress {
            progress::follow(&handle, &monitor, &self.options);
        }
        let result = handle.wait();
        if self.options.progress {
            let line = progress::final_line(&pipeline, &result);
            let _ = writeln!(std::io::stderr().lock(), "{line}");
        }
        result
    }

    /// Builds the pipeline, runs it in the background while showing it, and returns its report.
    pub fn run(&self, pipeline: Pipeline) -> Result<RunReport, RunError> {
        let handle = pipeline.spawn()?;
        self.watch(handle)
    }
}

/// Builds, runs and shows a pipeline with the default [`Options`] (the dashboard only with
/// `MINIGUN_HUD=1`), and returns its report once it has ended and the terminal is restored.
pub fn run(pipeline: Pipeline) -> Result<RunReport, RunError> {
    run_with(pipeline, Options::default())
}

/// [`run`] with options.
pub fn run_with(pipeline: Pipeline, options: Options) -> Result<RunReport, RunError> {
    Hud::new(options).run(pipeline)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_flag_values() {
        assert_eq!(env_flag(None), None);
        assert_eq!(env_flag(Some("")), None);
        assert_eq!(env_flag(Some("1")), Some(true));
        assert_eq!(env_flag(Some("yes")), Some(true));
        assert_eq!(env_flag(Some("0")), Some(false));
        assert_eq!(env_flag(Some("Off")), Some(false));
    }
}
