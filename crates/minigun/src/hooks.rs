//! Hooks: `before_run` / `after_run` once per run, `before` / `after` once per stage,
//! `before_fork` (parent, once per fork stage before its first fork) and `after_fork` (child:
//! per item for cow_fork, per worker for ipc_fork). Pipeline-level hooks run before
//! stage-level ones; several hooks run in definition order.

use crate::error::StageResult;
use std::sync::Arc;

/// A hook that runs once.
pub(crate) type OnceHook = Box<dyn FnOnce() -> StageResult + Send>;
/// A hook that may run many times, in a forked child too.
pub(crate) type ForkHook = Arc<dyn Fn() -> StageResult + Send + Sync>;

#[derive(Default)]
pub(crate) struct StageHooks {
    pub(crate) before: Vec<OnceHook>,
    pub(crate) after: Vec<OnceHook>,
    pub(crate) before_fork: Vec<ForkHook>,
    pub(crate) after_fork: Vec<ForkHook>,
}

impl std::fmt::Debug for StageHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StageHooks")
            .field("before", &self.before.len())
            .field("after", &self.after.len())
            .field("before_fork", &self.before_fork.len())
            .field("after_fork", &self.after_fork.len())
            .finish()
    }
}

/// Runs once-hooks in order; the first error stops and is returned as a message.
pub(crate) fn run_once(hooks: Vec<OnceHook>, what: &str) -> Result<(), String> {
    for h in hooks {
        crate::stage::guarded(h).map_err(|c| format!("{what} hook failed: {}", c.message))?;
    }
    Ok(())
}

/// Runs fork hooks in order.
pub(crate) fn run_fork(hooks: &[ForkHook], what: &str) -> Result<(), String> {
    for h in hooks {
        crate::stage::guarded(|| h()).map_err(|c| format!("{what} hook failed: {}", c.message))?;
    }
    Ok(())
}
