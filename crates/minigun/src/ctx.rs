//! A stage's context at run time ([`StageCtx`]): its name, executor, policy, statistics, run
//! and routing loop, and the accounting every executor does through it.
//!
//! Every item a stage receives ends exactly once in its accounting: processed, finally
//! failed, or cancelled ([`StageCtx::items_done`], [`StageCtx::cancelled`]). Every failed
//! attempt goes through [`StageCtx::failure`], the one place that applies the stage's
//! [`OnError`] policy.

use crate::error::{FailureKind, ItemFailure};
use crate::exec::Exec;
use crate::loops::Loop;
use crate::policy::{Final, OnError, Verdict};
use crate::queue::Receiver;
use crate::shared::RunShared;
use crate::stats::StageStats;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Everything a stage's executor needs to know about its stage and its run.
pub(crate) struct StageCtx {
    pub(crate) name: String,
    pub(crate) exec: Exec,
    pub(crate) policy: OnError,
    pub(crate) stats: Arc<StageStats>,
    pub(crate) run: Arc<RunShared>,
    /// The routing loop this stage is part of, if any.
    pub(crate) lp: Option<Arc<Loop>>,
}

impl StageCtx {
    /// One attempt at item `index` failed: count it, log it, decide.
    pub(crate) fn failure(
        &self,
        index: u64,
        attempt: u32,
        kind: FailureKind,
        message: String,
        pid: Option<u32>,
    ) -> Verdict {
        let retryable = !matches!(kind, FailureKind::Cancelled);
        if retryable && attempt <= self.policy.retries && !self.run.aborting() {
            self.stats.retried.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(stage = %self.name, item = index, attempt, %kind, %message, "retrying item");
            let factor = 1u32.checked_shl(attempt - 1).unwrap_or(u32::MAX);
            return Verdict::Retry(self.policy.backoff.saturating_mul(factor));
        }
        let failure = ItemFailure {
            stage: self.name.clone(),
            item: Some(index),
            attempt,
            kind,
            message,
            pid,
        };
        self.stats.failed.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(stage = %failure.stage, item = index, attempt, kind = %failure.kind,
            message = %failure.message, pid = ?pid, "item failed");
        self.run.record(&failure);
        match self.policy.then {
            _ if failure.kind == FailureKind::Cancelled => Verdict::Dropped,
            Final::Skip => Verdict::Dropped,
            Final::FailFast => {
                self.run.abort(failure);
                Verdict::Dropped
            }
            Final::DeadLetter => Verdict::DeadLetter(failure),
        }
    }

    /// Counts items already counted in `items_in` that will not be processed (the run is
    /// aborting). Every item a stage receives ends up exactly once in its output accounting:
    /// processed, failed, or cancelled.
    pub(crate) fn cancelled(&self, n: u64) {
        self.stats.cancelled.fetch_add(n, Ordering::Relaxed);
        self.items_done(n);
    }

    /// `n` received items have reached their final outcome (processed, finally failed or
    /// cancelled): inside a routing loop, their units are released.
    pub(crate) fn items_done(&self, n: u64) {
        self.stats.done.fetch_add(n, Ordering::Relaxed);
        if let Some(lp) = &self.lp {
            lp.release(n);
        }
    }

    /// Moves the next ready items of this stage's queue into `buf` (at least one; see
    /// [`Receiver::recv_into`](crate::queue::Receiver::recv_into)); `false` at end of stream:
    /// every upstream ended, or the stage's routing loop closed (which closes its queue).
    pub(crate) fn recv_into<I>(
        &self,
        input: &Receiver<I>,
        buf: &mut VecDeque<I>,
        workers: usize,
    ) -> bool {
        input.recv_into(buf, workers)
    }

    /// Counts items just received from the queue that will not be processed.
    pub(crate) fn received_cancelled(&self, n: u64) {
        self.stats.items_in.fetch_add(n, Ordering::Relaxed);
        self.cancelled(n);
    }

    /// A failure of the stage as a whole (start-up, hook): recorded and the run aborts.
    pub(crate) fn stage_failed(&self, kind: FailureKind, message: String) {
        let failure = self.stage_failure(kind, message, None);
        tracing::error!(stage = %failure.stage, kind = %failure.kind, message = %failure.message, "stage failed");
        self.run.abort(failure);
    }

    /// An error of the stage as a whole, not of an item (a producer's error, `finish`, an
    /// ipc worker's flush): recorded and counted as a stage error (never as a failed item,
    /// never retried); under a fail-fast policy the run aborts.
    pub(crate) fn stage_error(&self, kind: FailureKind, message: String, pid: Option<u32>) {
        let failure = self.stage_failure(kind, message, pid);
        tracing::warn!(stage = %failure.stage, kind = %failure.kind, message = %failure.message, "stage error");
        if self.policy.then == Final::FailFast {
            self.run.abort(failure);
        }
    }

    fn stage_failure(&self, kind: FailureKind, message: String, pid: Option<u32>) -> ItemFailure {
        let failure = ItemFailure {
            stage: self.name.clone(),
            item: None,
            attempt: 1,
            kind,
            message,
            pid,
        };
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        self.run.record(&failure);
        failure
    }
}
