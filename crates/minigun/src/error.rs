//! Error types: definition errors from `build()`, per-item failures, run errors.
//!
//! Every error names its culprit: the stage, the reference, the item index, the process.

use serde::Serialize;
use std::fmt;

/// The error type stage code returns: any error that is `Send + Sync`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What a stage function returns.
pub type StageResult<T = ()> = Result<T, BoxError>;

/// A pipeline definition that cannot run. Returned by [`Pipeline::build`](crate::Pipeline::build)
/// (and by `run`), never a panic. Each variant is one mistake, and names the stage (or the
/// pipeline) at fault; its message says how to fix it. `Debug` prints the same message as
/// `Display`, so an `unwrap()` reads well.
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DefinitionError {
    /// Two stages share a name.
    #[error("pipeline {pipeline:?}: two stages are named {name:?}")]
    DuplicateName {
        /// The pipeline.
        pipeline: String,
        /// The duplicated name.
        name: String,
    },
    /// A `to` / `from` / dead-letter / context reference names nothing.
    #[error("stage {stage:?} refers to unknown {what} {reference:?}")]
    UnknownReference {
        /// The stage holding the reference.
        stage: String,
        /// What the reference should name (stage, context, ...).
        what: &'static str,
        /// The unknown name.
        reference: String,
    },
    /// A name matches several stages (in different sub-pipelines).
    #[error("stage {stage:?}: {reference:?} is ambiguous; it could be any of {candidates:?}")]
    AmbiguousReference {
        /// The stage holding the reference.
        stage: String,
        /// The ambiguous name.
        reference: String,
        /// Qualified names that match.
        candidates: Vec<String>,
    },
    /// A dead-letter or route target names a sub-pipeline instead of a stage.
    #[error("stage {stage:?}: the {what} {target:?} is a sub-pipeline; name a stage inside it")]
    TargetIsSubPipeline {
        /// The stage holding the reference.
        stage: String,
        /// What the reference is ("dead-letter target", "route target").
        what: &'static str,
        /// The sub-pipeline named.
        target: String,
    },
    /// The stage graph has a cycle.
    #[error(
        "the stages {stages:?} form a cycle of static edges: break it, or make the edge back a \
         declared route (routes_to) to get a routing loop"
    )]
    Cycle {
        /// Stages on the cycle, in order.
        stages: Vec<String>,
    },
    /// A non-producer stage that nothing feeds.
    #[error(
        "stage {stage:?} is not a producer and nothing feeds it: give it an upstream with \
         .from(&stage), declare it as a route target (routes_to), or define it right after the \
         stage that should feed it (stages connect in definition order)"
    )]
    Unfed {
        /// The stage.
        stage: String,
    },
    /// A producer was given an upstream.
    #[error("producer {stage:?} cannot receive items (from {upstream:?})")]
    ProducerHasInput {
        /// The producer.
        stage: String,
        /// The upstream it was wired to.
        upstream: String,
    },
    /// An explicit edge connects an output to an input of another type.
    #[error("edge {from:?} -> {to:?}: {from:?} emits {output} but {to:?} takes {input}")]
    TypeMismatch {
        /// Upstream stage.
        from: String,
        /// Downstream stage.
        to: String,
        /// Upstream output type.
        output: &'static str,
        /// Downstream input type.
        input: &'static str,
    },
    /// An edge of the default wiring (stages connect in definition order) connects an output
    /// to an input of another type: the stage was meant to be fed otherwise.
    #[error(
        "stage {to:?} takes {input} but is fed by definition order from {from:?}, which emits \
         {output}: wire {to:?} with .from(&stage) (or declare it as a route target of an \
         earlier stage with routes_to), or define it after the stage that should feed it"
    )]
    DefaultEdgeMismatch {
        /// Upstream stage.
        from: String,
        /// Downstream stage.
        to: String,
        /// Upstream output type.
        output: &'static str,
        /// Downstream input type.
        input: &'static str,
    },
    /// A fork or remote executor was chosen for a stage whose item types were not declared
    /// serialisable.
    #[error(
        "stage {stage:?} runs under {executor} but its types are not declared serialisable: \
         set it with .cow_fork(n) / .ipc_fork(n) on the stage (fork options go on the handle \
         they return, e.g. .cow_fork(4).timeout(d)), or declare the types with \
         .wire_output() (cow_fork) / .wire() (every executor) before .executor(..)"
    )]
    NotSerialisable {
        /// The stage.
        stage: String,
        /// The executor that needs serde.
        executor: String,
    },
    /// A stage that runs in a forked child or remotely declared a route with
    /// `routes_to_local`, whose items cannot cross a process.
    #[error(
        "stage {stage:?} runs under {executor} but declares a route with routes_to_local, \
         whose items cannot cross a process: declare it with routes_to, or run the stage \
         in-process (inline or threads)"
    )]
    LocalRouteAcrossProcess {
        /// The stage.
        stage: String,
        /// Its executor.
        executor: String,
    },
    /// A remote stage declared a route: remote stages send results to their downstreams
    /// only.
    #[error(
        "stage {stage:?} runs under {executor}, which cannot route items by name (routes_to): \
         a remote stage sends its results to its downstreams only"
    )]
    RemoteRoutes {
        /// The stage.
        stage: String,
        /// Its executor.
        executor: String,
    },
    /// An executor with no workers (`threads(0)`, `cow_fork(0)`, ...).
    #[error("stage {stage:?}: {executor} needs at least one worker")]
    NoWorkers {
        /// The stage.
        stage: String,
        /// The executor.
        executor: String,
    },
    /// An async stage (`map_async`, `processor_async`, `consumer_async`, `stage_async`) given
    /// an executor of its own other than `tasks(n)` or `ipc_fork(k).tasks_per_worker(n)`, or
    /// remote with another worker executor.
    #[error(
        "stage {stage:?} is async: it runs under Exec::tasks(n), or under \
         Exec::ipc_fork(k).tasks_per_worker(n) (n in flight in each worker), not {executor} \
         (an async stage cannot run in a cow_fork child or on a thread of its own; a remote \
         one needs one of those two as its worker_exec)"
    )]
    AsyncStageNeedsTasks {
        /// The stage.
        stage: String,
        /// The executor it was given.
        executor: String,
    },
    /// A stage whose code is not async given `tasks(n)` or `tasks_per_worker(n)` of its own.
    #[error(
        "stage {stage:?} is a sync {kind}: {executor} runs async stages only (define it with \
         map_async, processor_async, consumer_async or stage_async, or give it threads(n), or \
         ipc_fork(k) without tasks_per_worker)"
    )]
    TasksNeedAsyncStage {
        /// The stage.
        stage: String,
        /// Its kind.
        kind: crate::StageKind,
        /// The executor it was given.
        executor: String,
    },
    /// A fork executor's `max_frame` is too small for the protocol's control frames.
    #[error("stage {stage:?}: max_frame {max_frame} is below the minimum of {minimum} bytes")]
    MaxFrameTooSmall {
        /// The stage.
        stage: String,
        /// The frame size asked for.
        max_frame: usize,
        /// The smallest accepted.
        minimum: usize,
    },
    /// An accumulator with a batch size of 0.
    #[error("accumulator {stage:?}: the batch size must be at least 1")]
    ZeroBatchSize {
        /// The accumulator.
        stage: String,
    },
    /// A setting that this kind of stage cannot take: an executor, an execution context, fork
    /// options or fork hooks on a producer or an accumulator (they run on their own thread),
    /// a capacity on a producer (it has no input queue), `max_wait` on a stage that is not an
    /// accumulator, a remote executor on a consumer.
    #[error(
        "stage {stage:?} is a {kind}, which cannot take {setting}: it applies to {applies_to}; \
         remove it from this stage"
    )]
    NotForThisKind {
        /// The stage.
        stage: String,
        /// What the stage is.
        kind: crate::stage::StageKind,
        /// The setting (e.g. `executor cow_fork(2)`, `max_wait`).
        setting: String,
        /// The stages the setting applies to.
        applies_to: &'static str,
    },
    /// An executor option set on an executor it is not an option of (e.g. `timeout` on
    /// `threads(4)`, `items_per_fork` on `ipc_fork(2)`).
    #[error(
        "stage {stage:?}: {option} is not an option of {executor}; it applies to {applies_to}"
    )]
    OptionNotForExecutor {
        /// The stage (for an inherited executor: the first stage it applies to).
        stage: String,
        /// The option.
        option: &'static str,
        /// The executor it was set on.
        executor: String,
        /// The executors it applies to.
        applies_to: &'static str,
    },
    /// A stage setting applied to the handle of a sub-pipeline.
    #[error(
        "sub-pipeline {sub:?}: {setting} applies to stages, not to a sub-pipeline; set it on \
         a stage inside it"
    )]
    SettingOnSubPipeline {
        /// The sub-pipeline.
        sub: String,
        /// The setting.
        setting: &'static str,
    },
    /// [`Pipeline::collect`](crate::Pipeline::collect) (or `fold`, ...) on a pipeline whose
    /// stages all end in consumers: no stage's items are left to collect.
    #[error(
        "pipeline {pipeline:?}: nothing to collect, every stage ends in a consumer: end the \
         pipeline with the stage whose items you want back"
    )]
    NothingToCollect {
        /// The pipeline.
        pipeline: String,
    },
    /// [`Pipeline::collect`](crate::Pipeline::collect) (or `fold`, ...) on a pipeline with
    /// several stages that emit items to no downstream.
    #[error(
        "pipeline {pipeline:?}: collect needs one final stage, but {stages:?} all emit items \
         to no downstream: join them into one stage, or end the others with consumers"
    )]
    SeveralFinalStages {
        /// The pipeline.
        pipeline: String,
        /// The stages that emit to no downstream.
        stages: Vec<String>,
    },
    /// The type asked of `collect` (or `fold`, ...) is not what the final stage emits.
    #[error("cannot collect {wanted}: the final stage {stage:?} emits {emits}")]
    CollectTypeMismatch {
        /// The final stage.
        stage: String,
        /// What it emits.
        emits: &'static str,
        /// The type asked for.
        wanted: &'static str,
    },
    /// [`Pipeline::collect_ordered`](crate::Pipeline::collect_ordered): a stage on the way
    /// has several upstreams (several producers, a fan-in, a routing loop, a dead-letter
    /// edge), whose items interleave.
    #[error(
        "collect_ordered: stage {stage:?} takes items from {upstreams:?}, which interleave: \
         there is no one input order; collect() in arrival order instead"
    )]
    OrderLostByFanIn {
        /// The stage.
        stage: String,
        /// Its upstreams.
        upstreams: Vec<String>,
    },
    /// An accumulator inside a routing loop (a loop cannot end while it holds a partial
    /// batch).
    #[error(
        "accumulator {stage:?} is part of a routing loop, which could then never end: move it \
         out of the loop"
    )]
    AccumulatorInLoop {
        /// The accumulator.
        stage: String,
    },
}

/// How one item failed. The same kinds arise under every executor that can produce them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum FailureKind {
    /// The stage returned an error.
    Error,
    /// The stage panicked (location in the message when known).
    Panic,
    /// A forked child was killed by a signal (SIGKILL is often the OOM killer).
    Signal(i32),
    /// A forked child exited with a non-zero code without reporting.
    Exit(i32),
    /// The per-item time limit passed; the child was killed.
    Timeout,
    /// The child's stream ended in the middle of a frame, or before the item was done.
    Truncated,
    /// A frame could not be decoded, or broke the protocol.
    Protocol,
    /// A value could not be serialised, or exceeded the maximum frame size.
    Encode,
    /// The stage failed to start (hook, factory, fork).
    Start,
    /// The item was not processed because the run was aborted or stopped by a signal.
    Cancelled,
    /// A remote stage's item was delivered `deliveries` times, and each time the worker
    /// running it was lost (killed, crashed, or silent past its lease): it is dead-lettered
    /// instead of being tried again.
    WorkerLost {
        /// How often the item was delivered.
        deliveries: u32,
    },
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailureKind::Error => f.write_str("error"),
            FailureKind::Panic => f.write_str("panic"),
            FailureKind::Signal(s) => match signal_name(*s) {
                Some(name) => write!(f, "killed by signal {s} ({name})"),
                None => write!(f, "killed by signal {s}"),
            },
            FailureKind::Exit(c) => write!(f, "exited with code {c}"),
            FailureKind::Timeout => f.write_str("timeout"),
            FailureKind::Truncated => f.write_str("truncated"),
            FailureKind::Protocol => f.write_str("protocol error"),
            FailureKind::Encode => f.write_str("encode error"),
            FailureKind::Start => f.write_str("start failure"),
            FailureKind::Cancelled => f.write_str("cancelled"),
            FailureKind::WorkerLost { deliveries } => {
                write!(f, "worker lost {deliveries} times")
            }
        }
    }
}

/// The name of a signal (`SIGABRT`), where the platform has one.
pub(crate) fn signal_name(signal: i32) -> Option<&'static str> {
    #[cfg(target_os = "linux")]
    return nix::sys::signal::Signal::try_from(signal)
        .ok()
        .map(|s| s.as_str());
    #[cfg(not(target_os = "linux"))]
    return None;
}

/// One failed item: which stage, which item (0-based index in the stage's input), which
/// attempt, which process, and how it ended. An error of the stage as a whole (start-up, a
/// hook, a producer's own error, `Stage::finish`) has no item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ItemFailure {
    /// The stage.
    pub stage: String,
    /// Index of the item in the stage's input stream; `None` for an error of the stage as a
    /// whole (a producer's, a hook's, start-up, `Stage::finish`).
    pub item: Option<u64>,
    /// 1-based attempt number.
    pub attempt: u32,
    /// How it ended.
    pub kind: FailureKind,
    /// The error or panic message.
    pub message: String,
    /// The child process, for fork executors.
    pub pid: Option<u32>,
}

impl fmt::Display for ItemFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.item {
            Some(i) => write!(f, "stage {:?}, item {i}: {}", self.stage, self.kind)?,
            None => write!(f, "stage {:?}: {}", self.stage, self.kind)?,
        }
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ItemFailure {}

/// Why a run did not complete normally. `Debug` prints the same message as `Display` (the
/// report of an aborted run is in the variant, not in the message).
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// The definition is invalid.
    #[error(transparent)]
    Definition(#[from] DefinitionError),
    /// A fail-fast stage, a hook, or a stage start-up failed; the run was aborted.
    /// The report says what was done before.
    #[error("run aborted: {cause}")]
    Aborted {
        /// The failure that aborted the run.
        cause: ItemFailure,
        /// What the run did until then.
        report: Box<crate::report::RunReport>,
    },
    /// A `before_run` hook failed; nothing ran.
    #[error("before_run hook failed: {0}")]
    BeforeRun(String),
    /// The background run's thread died.
    #[error("run thread failed: {0}")]
    Thread(String),
}

/// Why an emit did not go through. `Debug` prints the same message as `Display`.
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EmitError {
    /// The run is stopping: a producer should return.
    #[error("run is stopping")]
    Stopped,
    /// Every downstream queue is closed (the run was aborted).
    #[error("downstream closed")]
    Closed,
    /// The value could not be serialised to cross the process boundary.
    #[error("cannot serialise output: {0}")]
    Encode(String),
    /// Dynamic routing to an unknown stage or a stage of another type.
    #[error("cannot route: {0}")]
    Route(String),
}

/// `Debug` as `Display`: what `unwrap()` and `{:?}` print reads like the message, without
/// the structure (an aborted run's whole report) around it.
macro_rules! debug_as_display {
    ($($t:ty),*) => {$(
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }
    )*};
}

debug_as_display!(DefinitionError, RunError, EmitError);

/// Whether a stage error is only the run stopping (not counted as a failure).
pub(crate) fn is_stop(e: &BoxError) -> bool {
    matches!(
        e.downcast_ref::<EmitError>(),
        Some(EmitError::Stopped) | Some(EmitError::Closed)
    )
}
