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
/// (and by `run`), never a panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
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
    /// The stage graph has a cycle.
    #[error("the stages {stages:?} form a cycle")]
    Cycle {
        /// Stages on the cycle, in order.
        stages: Vec<String>,
    },
    /// A non-producer stage that nothing feeds.
    #[error("stage {stage:?} is not a producer and nothing feeds it")]
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
    /// An edge connects an output to an input of another type.
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
    /// A fork executor was chosen for a stage whose item types cannot cross a process.
    #[error(
        "stage {stage:?} runs under {executor} but its types are not declared serialisable: \
             set it with .cow_fork(n) / .ipc_fork(n) or call .wire()"
    )]
    NotSerialisable {
        /// The stage.
        stage: String,
        /// The executor that needs serde.
        executor: String,
    },
    /// A setting is out of range.
    #[error("stage {stage:?}: {message}")]
    InvalidConfig {
        /// The stage (or pipeline).
        stage: String,
        /// What is wrong.
        message: String,
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

/// Why a run did not complete normally.
#[derive(Debug, thiserror::Error)]
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

/// Why an emit did not go through.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
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

/// Whether a stage error is only the run stopping (not counted as a failure).
pub(crate) fn is_stop(e: &BoxError) -> bool {
    matches!(
        e.downcast_ref::<EmitError>(),
        Some(EmitError::Stopped) | Some(EmitError::Closed)
    )
}
