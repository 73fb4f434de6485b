//! The two fork executors and what they share.
//!
//! # Process and thread picture of one fork stage
//!
//! ```text
//!  stage queue ──> feeder thread ──(bounded hand-off + wake pipe)──> supervisor (driver thread)
//!                                                                     │ fork / write items
//!                                                                     │ poll: result pipes,
//!                                                                     │   pidfds, wake, abort
//!                                                                     ▼
//!                                       children ──(result frames)──> supervisor ──> downstream
//! ```
//!
//! - The **feeder** only moves items from the stage queue into a small hand-off channel (and,
//!   for ipc_fork, serialises them there, off the supervisor's thread). It wakes the supervisor
//!   through a pipe only when the supervisor is about to sleep.
//! - The **supervisor** is the only thread that forks, writes to children, reads from them,
//!   reaps them and applies the error policy. It sleeps in one `poll` over every result pipe,
//!   every child's pidfd, the wake pipe and the run's abort pipe, with a timeout only for the
//!   nearest per-item deadline or retry backoff: no polling loops.
//! - Results are read while children run (a child can emit far more than a pipe holds): an
//!   ipc worker's pipe always, a cow child's once it has lived 1 ms (before, its frames wait
//!   in its pipe and are read when its exit is known, so a short child wakes the supervisor
//!   once).
//! - A child's outcome is decided when it has exited and its pipe is drained:
//!   `done` frame = success; `error` frame = the stage's error or panic; otherwise the exit
//!   status: killed by a signal, non-zero exit, or a stream that ended early (truncated).
//!   Each is one failure of that one item, handed to the stage's policy.
//!
//! # Where things are
//!
//! - `supervise`: the skeleton both supervisors follow, step by step, and what they share
//!   (the feeder and its hand-off, the poll set, ending a child, settling an item).
//! - `cow`: cow_fork's supervisor, and `per_fork` how many items each of its children gets; `ipc/`: ipc_fork's (worker, feeding, dispatch, recovery,
//!   the event loop).
//! - `server`: cow_fork's fork server seen from the parent (started when the run starts,
//!   fed items, its reports read, its death noticed), `cow/served` what the supervisor does
//!   with it, and `forker` the server's own process (see `crate::ipc`'s README, "The fork
//!   server").
//! - `child`: where a forked child starts (a cow child, an ipc worker); it never returns
//!   into the parent's code. `child_async`: an ipc worker of an async stage, with a runtime
//!   of its own.
//! - `trace`: `tracing` records from stage code in a child, carried to the parent as `log`
//!   frames.
//! - The wire itself (frames, messages, readers and writers, the results log) is
//!   `crate::ipc`.

mod child;
#[cfg(feature = "async")]
mod child_async;
mod cow;
mod forker;
mod ipc;
mod per_fork;
mod server;
mod supervise;
pub(crate) mod trace;

use crate::exec::parts::Parts;
use crate::exec::runner::{ForkHooks, PreparedRun};
use crate::exec::ForkOptions;
use crate::stage::{Item, Wire};

pub(crate) fn cow<I: Item, O: Wire>(
    parts: Parts<I, O>,
    opts: ForkOptions,
    hooks: ForkHooks,
) -> PreparedRun {
    if opts.fork_server {
        return server::prepare(parts, opts, hooks);
    }
    Box::new(move || cow::run(parts, opts, hooks, None))
}

pub(crate) fn ipc<I: Wire, O: Wire>(
    parts: Parts<I, O>,
    opts: ForkOptions,
    hooks: ForkHooks,
) -> PreparedRun {
    ipc::start(ipc::Code::sync(parts), opts, hooks)
}

/// ipc_fork for an async stage: each worker runs `tasks_per_worker` of its items at once.
#[cfg(feature = "async")]
pub(crate) fn ipc_async<I: Wire, O: Wire>(
    parts: crate::exec::tasks::AsyncParts<I, O>,
    opts: ForkOptions,
    hooks: ForkHooks,
) -> PreparedRun {
    let tasks = opts.tasks_per_worker.unwrap_or(1).max(1);
    ipc::start(ipc::Code::asynchronous(parts, tasks), opts, hooks)
}
