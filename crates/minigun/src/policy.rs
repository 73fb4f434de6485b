//! Per-stage error policy: what a stage does with an item that failed ([`OnError`]) and the
//! verdict on one failed attempt ([`Verdict`]).
//!
//! Every executor reports a failed attempt to [`StageCtx::failure`](crate::ctx::StageCtx::failure),
//! which applies the policy; none of them decides on its own, so an error means the same
//! thing under inline, threads, cow_fork and ipc_fork.

use crate::error::ItemFailure;
use std::time::Duration;

/// What a stage does with an item whose processing failed.
///
/// ```
/// use minigun::OnError;
/// use std::time::Duration;
/// let p = OnError::retry(3).backoff(Duration::from_millis(10)); // then skip and record
/// let q = OnError::fail_fast();
/// # let _ = (p, q);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnError {
    pub(crate) retries: u32,
    pub(crate) backoff: Duration,
    pub(crate) then: Final,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Final {
    Skip,
    FailFast,
    DeadLetter,
}

impl Default for OnError {
    fn default() -> Self {
        OnError::skip()
    }
}

impl OnError {
    /// Record the failure (count, log, report) and go on with the next item. The default.
    pub fn skip() -> Self {
        OnError {
            retries: 0,
            backoff: Duration::ZERO,
            then: Final::Skip,
        }
    }
    /// Abort the whole run at the first failure: producers stop, queued items are cancelled
    /// (and counted), `run()` returns [`RunError::Aborted`](crate::RunError::Aborted).
    pub fn fail_fast() -> Self {
        OnError {
            retries: 0,
            backoff: Duration::ZERO,
            then: Final::FailFast,
        }
    }
    /// Retry a failed item up to `n` more times, then skip and record it.
    pub fn retry(n: u32) -> Self {
        OnError {
            retries: n,
            backoff: Duration::ZERO,
            then: Final::Skip,
        }
    }
    /// Wait `base`, then twice as long, and so on, between attempts.
    pub fn backoff(mut self, base: Duration) -> Self {
        self.backoff = base;
        self
    }
    /// After the retries, abort the run instead of skipping.
    pub fn then_fail_fast(mut self) -> Self {
        self.then = Final::FailFast;
        self
    }
    pub(crate) fn keeps_item(&self) -> bool {
        self.retries > 0 || self.then == Final::DeadLetter
    }
}

/// What the executor does next with a failed item.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// Try again after this delay.
    Retry(Duration),
    /// Send the item with this failure to the dead-letter stage.
    DeadLetter(ItemFailure),
    /// Done with it (recorded; maybe the run is now aborting).
    Dropped,
}
