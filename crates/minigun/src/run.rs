//! Running a built pipeline: one driver thread per stage, hooks around them, the report.
//!
//! Thread picture of a run:
//!
//! ```text
//! run thread ── before_run ── prepare every stage (ipc_fork pre-forks here, no stage thread yet)
//!            ── spawn one driver thread per stage ─┬─ producer: calls the producer closure
//!                                                 ├─ processor: inline, or n worker threads,
//!                                                 │  or a fork supervisor (see exec::fork)
//!                                                 └─ accumulator: batching loop
//!            ── join every driver ── after_run ── report
//! ```
//!
//! A stage ends when its input queue disconnects (every upstream ended) and its workers have
//! finished; it then drops its senders, which ends its downstreams. Stop and abort never break
//! that chain: they only make producers return early and make stages count queued items as
//! cancelled instead of processing them, so every stage still ends and nothing hangs.

use crate::ctx::StageCtx;
use crate::error::{FailureKind, ItemFailure, RunError};
use crate::hooks::{self, OnceHook};
use crate::monitor::{Monitor, StageView};
use crate::node::Task;
use crate::queue::Capacity;
use crate::report::{RunReport, StageInfo};
use crate::shared::RunShared;
use crate::stage::StageKind;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Waits until a scoped thread has exited, not only finished its closure (all that the end of
/// a scope waits for: the thread may still be listed by the system a moment later), so no
/// thread of a run outlives it. A panic of the thread goes on in the caller, as it would at
/// the end of the scope.
pub(crate) fn join<T>(thread: std::thread::ScopedJoinHandle<'_, T>) -> T {
    thread
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// One stage, ready to run.
pub(crate) struct PlannedStage {
    pub(crate) ctx: Arc<StageCtx>,
    pub(crate) kind: StageKind,
    pub(crate) capacity: Option<Capacity>,
    /// Items end here: no downstream, no route, not a dead-letter stage.
    pub(crate) sink: bool,
    pub(crate) before: Vec<OnceHook>,
    pub(crate) after: Vec<OnceHook>,
    /// The stage it runs chained to (see `link::chain`), for the report.
    pub(crate) chained_to: Option<String>,
    /// The position of the first stage of its chain, whose driver thread runs it.
    pub(crate) chain_head: Option<usize>,
    pub(crate) task: Box<dyn Task>,
}

/// A checked pipeline, ready to [`run`](Runnable::run) once.
pub struct Runnable {
    name: String,
    stages: Vec<PlannedStage>,
    shared: Arc<RunShared>,
    before_run: Vec<OnceHook>,
    after_run: Vec<OnceHook>,
    monitor: Monitor,
}

impl std::fmt::Debug for Runnable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runnable")
            .field("name", &self.name)
            .field(
                "stages",
                &self
                    .stages
                    .iter()
                    .map(|s| s.ctx.name.as_str())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Runnable {
    pub(crate) fn new(
        name: String,
        stages: Vec<PlannedStage>,
        shared: Arc<RunShared>,
        before_run: Vec<OnceHook>,
        after_run: Vec<OnceHook>,
        edges: Vec<(usize, usize)>,
    ) -> Self {
        let views = stages
            .iter()
            .map(|s| StageView {
                ctx: s.ctx.clone(),
                kind: s.kind,
                capacity: s.capacity,
                chained_to: s.chained_to.clone(),
            })
            .collect();
        let monitor = Monitor::new(name.clone(), views, edges, shared.clone());
        Runnable {
            name,
            stages,
            shared,
            before_run,
            after_run,
            monitor,
        }
    }

    /// A live view of this run, for dashboards and progress lines.
    pub fn monitor(&self) -> Monitor {
        self.monitor.clone()
    }

    /// What every stage of the run shares (its stop and abort flags).
    #[cfg(feature = "async")]
    pub(crate) fn shared(&self) -> Arc<RunShared> {
        self.shared.clone()
    }

    /// Runs the pipeline to the end and returns its report.
    ///
    /// Item failures under the skip / retry / dead-letter policies are in the report, not an
    /// error; a fail-fast failure, a failed hook or a stage that cannot start returns
    /// [`RunError::Aborted`] with the report of what was done.
    pub fn run(self) -> Result<RunReport, RunError> {
        let Runnable {
            name,
            stages,
            shared,
            before_run,
            after_run,
            monitor,
        } = self;
        monitor.mark_started();
        let result = Self::execute(name, stages, shared, before_run, after_run);
        monitor.mark_finished();
        result
    }

    fn execute(
        name: String,
        stages: Vec<PlannedStage>,
        shared: Arc<RunShared>,
        before_run: Vec<OnceHook>,
        after_run: Vec<OnceHook>,
    ) -> Result<RunReport, RunError> {
        let t0 = Instant::now();
        // The workers' clock calibrates once per process, on first use: here, before any
        // stage thread or fork exists, never in a thread racing a fork.
        let _ = quanta::Instant::now();
        hooks::run_once(before_run, "before_run").map_err(RunError::BeforeRun)?;
        let guard = (!shared.no_signals).then(|| crate::signals::Guard::install(&shared));
        let mut infos = Vec::with_capacity(stages.len());
        let mut tasks = Vec::with_capacity(stages.len());
        for mut st in stages {
            if let Err(m) = st.task.prepare() {
                st.ctx.stage_failed(FailureKind::Start, m);
            }
            infos.push(StageInfo {
                ctx: st.ctx.clone(),
                kind: st.kind,
                capacity: st.capacity,
                sink: st.sink,
                chained_to: st.chained_to.clone(),
            });
            tasks.push(st);
        }
        // A chained stage runs on the driver thread of the first stage of its chain (which
        // comes before it in the planned order).
        let mut groups: Vec<(PlannedStage, Vec<PlannedStage>)> = Vec::new();
        let mut at = vec![usize::MAX; tasks.len()];
        for (k, st) in tasks.into_iter().enumerate() {
            match st.chain_head {
                Some(h) => groups[at[h]].1.push(st),
                None => {
                    at[k] = groups.len();
                    groups.push((st, Vec::new()));
                }
            }
        }
        std::thread::scope(|s| {
            let drivers: Vec<_> = groups
                .into_iter()
                .map(|(st, chained)| {
                    std::thread::Builder::new()
                        .name(format!("minigun:{}", st.ctx.name))
                        .spawn_scoped(s, move || drive(st, chained))
                        .expect("spawn stage driver thread")
                })
                .collect();
            drivers.into_iter().for_each(join);
        });
        drop(guard);
        if let Err(m) = hooks::run_once(after_run, "after_run") {
            let f = ItemFailure {
                stage: name.clone(),
                item: None,
                attempt: 1,
                kind: FailureKind::Error,
                message: m,
                pid: None,
            };
            shared.record(&f);
            shared.abort(f);
        }
        let report = RunReport::collect(&name, &infos, &shared, t0.elapsed());
        let cause = shared.take_cause();
        match cause {
            Some(cause) => Err(RunError::Aborted {
                cause,
                report: Box::new(report),
            }),
            None => Ok(report),
        }
    }

    /// Runs the pipeline on a background thread.
    pub fn spawn(self) -> RunHandle {
        let stop = self.shared.stop.clone();
        let monitor = self.monitor.clone();
        let shared = self.shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("minigun-run:{}", self.name))
            .spawn(move || self.run())
            .expect("spawn run thread");
        RunHandle {
            stop,
            thread,
            monitor,
            shared,
        }
    }
}

/// One stage's driver thread: hooks, then the task; with the stages chained to it
/// (`chained`, in chain order), their hooks too, each stage's after its upstream's.
///
/// A chained stage whose `before` hook fails cannot start, and neither can its chain: the
/// first stage's queue is drained as cancelled (the run aborts).
fn drive(st: PlannedStage, chained: Vec<PlannedStage>) {
    let PlannedStage {
        ctx,
        before,
        after,
        task,
        ..
    } = st;
    let mut stages = vec![(ctx, before, after)];
    stages.extend(chained.into_iter().map(|c| (c.ctx, c.before, c.after)));
    for (ctx, ..) in &stages {
        ctx.stats.mark_started();
    }
    let head = &stages[0].0;
    let mut started = !head.run.aborting();
    let mut afters = Vec::with_capacity(stages.len());
    for (ctx, before, after) in stages.iter_mut().map(|(c, b, a)| (&*c, b, a)) {
        let before = std::mem::take(before);
        if started {
            if let Err(m) = hooks::run_once(before, "before") {
                ctx.stage_failed(FailureKind::Start, m);
                started = false;
            }
        }
        afters.push(std::mem::take(after));
    }
    if started {
        task.run();
        for ((ctx, ..), after) in stages.iter().zip(afters) {
            if let Err(m) = hooks::run_once(after, "after") {
                ctx.stage_failed(FailureKind::Error, m);
            }
        }
    } else {
        task.abandon();
    }
    for (ctx, ..) in &stages {
        ctx.stats.mark_finished();
    }
}

/// A pipeline running in the background.
#[derive(Debug)]
pub struct RunHandle {
    monitor: Monitor,
    shared: Arc<RunShared>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<RunReport, RunError>>,
}

impl RunHandle {
    /// Asks the run to stop: producers stop emitting, items already emitted are processed,
    /// every stage ends. The report's `stopped` is then true.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Stops the run now, as SIGINT would but without a signal: producers stop, queued items
    /// are cancelled (and counted), fork children are terminated and reaped. `wait()` then
    /// returns the report, with `stopped` set.
    pub fn cancel(&self) {
        self.shared.interrupt(0);
    }

    /// A live view of the run.
    pub fn monitor(&self) -> Monitor {
        self.monitor.clone()
    }

    /// Whether the run has ended.
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Waits for the run to end.
    pub fn wait(self) -> Result<RunReport, RunError> {
        self.thread.join().unwrap_or_else(|p| {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(RunError::Thread(msg))
        })
    }
}
