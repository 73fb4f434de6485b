//! Running this program as a worker: [`serve_if_worker`], [`Pipeline::serve`], and the loop
//! that watches a pipeline's announcements and serves each run of its remote stages.

use super::broker::{Announcement, BrokerError, StageRun};
use super::worker::Served;
use crate::define::Pipeline;
use crate::error::DefinitionError;
use crate::shared::RunShared;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// How long the loop waits for an announcement before it looks at its runs and flags.
const WATCH_BLOCK: Duration = Duration::from_millis(200);

/// How a worker process serves (see [`ServeOptions::from_env`]).
#[derive(Debug, Clone)]
pub struct ServeOptions {
    stages: Option<Vec<String>>,
    once: bool,
    stop: Arc<AtomicBool>,
    handle_signals: bool,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            stages: None,
            once: false,
            stop: Arc::new(AtomicBool::new(false)),
            handle_signals: true,
        }
    }
}

impl ServeOptions {
    /// Serve every remote stage, run after run, until SIGTERM or SIGINT.
    pub fn new() -> Self {
        Self::default()
    }
    /// The options the environment sets: `MINIGUN_STAGES` (comma-separated stage names: serve
    /// only these) and `MINIGUN_WORKER_ONCE=1` (serve one run, then return).
    pub fn from_env() -> Self {
        let stages = std::env::var("MINIGUN_STAGES").ok().map(|v| {
            v.split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        });
        ServeOptions {
            stages,
            once: std::env::var("MINIGUN_WORKER_ONCE").is_ok_and(|v| v != "0" && !v.is_empty()),
            ..Self::default()
        }
    }
    /// Serve only the stages with these names (qualified, or a unique last part).
    pub fn stages<S: Into<String>>(mut self, names: impl IntoIterator<Item = S>) -> Self {
        self.stages = Some(names.into_iter().map(Into::into).collect());
        self
    }
    /// Serve one run, then return.
    pub fn once(mut self, once: bool) -> Self {
        self.once = once;
        self
    }
    /// Whether SIGTERM and SIGINT stop the worker gracefully (default: yes). Turn it off when
    /// the host program handles signals; it can still stop the worker with
    /// [`ServeOptions::stop_flag`].
    pub fn handle_signals(mut self, on: bool) -> Self {
        self.handle_signals = on;
        self
    }
    /// A flag that, once set, stops the worker gracefully (as SIGTERM does).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }
}

/// What a worker did, when it stops serving.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServeReport {
    /// Runs served (to their end, or until the worker stopped).
    pub runs: u64,
    /// Runs refused because the parent's definition differs, or left because the stage
    /// failed here (its instance could not be made): its entries go to the other workers.
    pub refused: u64,
    /// Items whose results this worker committed.
    pub items: u64,
    /// Items that finally failed here.
    pub failed: u64,
    /// Commits refused because another worker had taken the entry.
    pub lease_lost: u64,
    /// Entries taken over from lost workers (or released by workers that left).
    pub reclaimed: u64,
    /// Entries dead-lettered by this worker.
    pub dead_lettered: u64,
}

/// Why a worker could not serve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The definition does not build.
    #[error(transparent)]
    Definition(#[from] DefinitionError),
    /// The definition has no remote stage to serve (or none of those asked for).
    #[error("pipeline {pipeline:?} has no remote stage to serve{}", .asked.as_ref().map(|a| format!(" among {a:?}")).unwrap_or_default())]
    NoRemoteStages {
        /// The pipeline.
        pipeline: String,
        /// The stages asked for (`MINIGUN_STAGES`).
        asked: Option<Vec<String>>,
    },
    /// The broker refused or could not be reached.
    #[error("worker cannot use its broker: {0}")]
    Broker(#[from] BrokerError),
}

/// Whether this process was started as a worker (`MINIGUN_WORKER` set to anything but `0`).
pub fn is_worker() -> bool {
    std::env::var("MINIGUN_WORKER").is_ok_and(|v| v != "0" && !v.is_empty())
}

/// The entry point of a program with remote stages. Call it first in `main`, with the
/// function that defines the pipeline:
///
/// - started normally, it returns `Ok(())` at once and the program goes on as the parent;
/// - started as a worker (`MINIGUN_WORKER=1`), it builds the same definition, serves its
///   remote stages (see [`ServeOptions::from_env`]) until SIGTERM or SIGINT (or one run, with
///   `MINIGUN_WORKER_ONCE=1`), and **ends the process** (exit code 0). Nothing before the
///   call may have side effects a worker should not have.
///
/// ```no_run
/// use minigun::remote::{serve_if_worker, MemoryBroker, Remote};
/// use minigun::{Exec, Pipeline};
///
/// fn define() -> Pipeline {
///     let p = Pipeline::new("squares");
///     p.producer("numbers", |out| out.emit_all(0..100u64).map_err(Into::into));
///     p.map("square", |x: u64| Ok(x * x))
///         .remote(Remote::new(MemoryBroker::new()).worker_exec(Exec::ipc_fork(4)));
///     p.consumer("print", |x: u64| Ok(println!("{x}")));
///     p
/// }
///
/// fn main() -> Result<(), Box<dyn std::error::Error>> {
///     serve_if_worker(define)?;
///     println!("{}", define().run()?);
///     Ok(())
/// }
/// ```
pub fn serve_if_worker(define: impl FnOnce() -> Pipeline) -> Result<(), ServeError> {
    if !is_worker() {
        return Ok(());
    }
    let report = define().serve(ServeOptions::from_env())?;
    tracing::info!(?report, "the worker stops");
    std::process::exit(0)
}

impl Pipeline {
    /// Serves this definition's remote stages as a worker, run after run, until stopped (see
    /// [`serve_if_worker`], which calls this in a worker process).
    pub fn serve(self, opts: ServeOptions) -> Result<ServeReport, ServeError> {
        let name = self.name();
        let served = crate::link::served(self.take_def())?;
        serve(name, served, opts)
    }
}

/// Whether `name` (a qualified stage name) is one of `asked`.
fn asked_for(asked: &[String], name: &str) -> bool {
    asked
        .iter()
        .any(|a| a == name || name.ends_with(&format!("/{a}")))
}

fn serve(
    pipeline: String,
    served: Vec<Box<dyn Served>>,
    opts: ServeOptions,
) -> Result<ServeReport, ServeError> {
    let served: Vec<Arc<dyn Served>> = served
        .into_iter()
        .filter(|s| opts.stages.as_ref().is_none_or(|a| asked_for(a, s.stage())))
        .map(Arc::from)
        .collect();
    let Some(first) = served.first() else {
        return Err(ServeError::NoRemoteStages {
            pipeline,
            asked: opts.stages,
        });
    };
    let shared = Arc::new(RunShared::with_stop(
        opts.stop.clone(),
        !opts.handle_signals,
    ));
    let _signals = opts
        .handle_signals
        .then(|| crate::signals::Guard::install(&shared));
    let mut watch = first.remote().broker.session()?;
    let mut cursor: Option<String> = None;
    let mut active: HashMap<StageRun, JoinHandle<Result<super::wire::WorkerStats, String>>> =
        HashMap::new();
    let mut report = ServeReport::default();
    tracing::info!(pipeline = %pipeline, stages = served.len(), "serving remote stages");
    loop {
        reap(&mut active, &mut report, false);
        if opts.stop.load(Ordering::Relaxed) || opts.once && report.runs > 0 && active.is_empty() {
            break;
        }
        let announcements = match watch.announcements(&pipeline, cursor.as_deref(), WATCH_BLOCK) {
            Ok(a) => a,
            Err(e) if e.is_transient() => {
                std::thread::sleep(WATCH_BLOCK);
                if let Ok(s) = first.remote().broker.session() {
                    watch = s;
                }
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        for (c, a) in announcements {
            cursor = Some(c);
            if active.contains_key(&a.stage_run) {
                // Announced again (after a server restart): already served.
                continue;
            }
            let Some(s) = served.iter().find(|s| s.stage() == a.stage_run.stage) else {
                continue;
            };
            let (s, stop) = (s.clone(), opts.stop.clone());
            let run = a.stage_run.clone();
            let handle = std::thread::Builder::new()
                .name(format!("serve:{}", a.stage_run.stage))
                .spawn(move || serve_one(&*s, &a, &stop))
                .expect("spawn a serving thread");
            active.insert(run, handle);
        }
    }
    reap(&mut active, &mut report, true);
    Ok(report)
}

fn serve_one(
    s: &dyn Served,
    a: &Announcement,
    stop: &AtomicBool,
) -> Result<super::wire::WorkerStats, String> {
    let r = s.serve(a, stop);
    if let Err(m) = &r {
        tracing::warn!(run = %a.stage_run, "{m}");
    }
    r
}

/// Collects the runs that ended (all of them with `wait`).
fn reap(
    active: &mut HashMap<StageRun, JoinHandle<Result<super::wire::WorkerStats, String>>>,
    report: &mut ServeReport,
    wait: bool,
) {
    let ended: Vec<StageRun> = active
        .iter()
        .filter(|(_, h)| wait || h.is_finished())
        .map(|(r, _)| r.clone())
        .collect();
    for run in ended {
        let handle = active.remove(&run).expect("listed");
        match handle.join() {
            Ok(Ok(stats)) => {
                report.runs += 1;
                report.items += stats.items;
                report.failed += stats.failed;
                report.lease_lost += stats.lease_lost;
                report.reclaimed += stats.reclaimed;
                report.dead_lettered += stats.dead_lettered;
            }
            Ok(Err(_)) => report.refused += 1,
            Err(_) => report.refused += 1,
        }
    }
}
