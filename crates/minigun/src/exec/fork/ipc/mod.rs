//! ipc_fork: `workers` persistent forked workers fed over pipes.
//!
//! Workers are forked when the run prepares its stages, before any stage thread exists. Items
//! are serialised by the feeder thread, handed to the supervisor up to `feed::FEED_CHUNK` at a
//! time in runs of consecutive items (each run one frame and one `Flight`, split to fit a
//! worker's room; see "Runs" in the `ipc` README), and dispatched round-robin to workers that
//! hold fewer than their window of items
//! (a fixed `in_flight`, or by default about `Exec::IN_FLIGHT_AHEAD` of work by the items'
//! measured time, 2 to 4096: `Supervisor::timed`); a
//! worker answers in order, so the first item it holds (without an answer) is the one it is
//! running. Writes are non-blocking (a slow worker never stalls the others) and several ready
//! items go out in one write; an item of 4 KiB or more is handed to the pipe by its pages from
//! the buffer the feeder encoded it into, never copied in the parent (`outbox`, which says why
//! a flight keeps its payload until its item is answered or its worker is buried). An item's
//! results are held until its `done` (`Partial`: an attempt that fails delivers none of them,
//! so a retry never delivers twice),
//! then sent downstream once per read of the workers' pipes; their items count as done after
//! that (a routing loop's unit outlives the sending of its item's results).
//!
//! A worker writes each item's frames before it starts the next, or, with `batch_results`,
//! keeps them in a log shared with the parent (the answers of a run of items with one output
//! each in one `results` frame, settled by the parent one flight at a time:
//! `Supervisor::answers`) and writes the log in batches: the parent
//! recovers the log of a dead worker, so the answer order above still holds (see
//! `Supervisor::recover`), and takes what a worker busy with a long item has held for
//! 1 ms (`Supervisor::take_held`; it looks every 2 ms while a worker has two items or more).
//!
//! A worker that dies is noticed at once (its pidfd): the item it was running fails with the
//! way it died, the items queued behind it go back to the front of the queue (their attempt is
//! not counted), and a new worker is forked in its place, after a backoff if workers keep dying.
//! When the input ends, each worker gets `shutdown`, flushes its stage instance and exits 0.
//!
//! An async stage (`tasks_per_worker(n)`, [`Code::Async`]) runs the same supervisor with
//! three differences, all in `asynchronous`: its workers (`child_async`) run up to `n` items
//! at once on a runtime of their own and answer each as it ends, in any order (each frame
//! names its item; an item's frames arrive together); a worker counts the items it has
//! started in memory shared with the parent, so that when it dies the parent fails exactly
//! the items it had started and not answered and sends the rest to other workers; and the
//! parent's window for it is `n` plus a few, fixed.

//!
//! | file | what |
//! |---|---|
//! | `worker.rs` | a worker: its process, pipes, results log and the items it holds |
//! | `flight.rs` | a flight: one item or a run of them on its way through a worker, and taking a run apart |
//! | `feed.rs` | the feeder thread: numbering and encoding items into hand-offs |
//! | `supervisor.rs` | the supervisor's event loop, reading and handling workers' messages |
//! | `dispatch.rs` | which worker gets the next item, writing to workers |
//! | `recover.rs` | taking held results, protocol errors, replay, burying, respawning |
//! | `asynchronous.rs` | what differs for an async stage's workers: answers out of order, which items a dead one had started |

#[cfg(feature = "async")]
mod asynchronous;
mod dispatch;
mod feed;
mod flight;
mod recover;
mod recycle;
mod supervisor;
mod worker;

use super::supervise::supervised;
use crate::error::FailureKind;
use crate::exec::parts::{drain, Parts};
use crate::exec::runner::{ForkHooks, PreparedRun};
use crate::exec::ForkOptions;
use crate::hooks;
use crate::stage::Factory;
use crate::stage::Wire;
use feed::{Encoded, SPARES};
use std::time::Duration;
use supervisor::Supervisor;
use worker::{spawn, Worker};

/// A batched worker's finished results that have waited this long in its log, while it is
/// busy with a long item, are taken from the log by the parent.
pub(super) const TAKE_HELD_AFTER: Duration = Duration::from_millis(1);

/// How often the parent looks at the log of a batched worker that may hold results (one
/// with at least two items: a worker with one holds nothing, it writes when its input is
/// empty).
pub(super) const LOOK_EVERY: Duration = Duration::from_millis(2);

/// What a worker makes its stage instance with.
pub(crate) enum Code<I, O> {
    /// A sync stage: one item at a time, answered in order.
    Sync(Factory<I, O>),
    /// An async stage: up to `tasks` items at once on the worker's runtime, answered as they
    /// end.
    #[cfg(feature = "async")]
    Async {
        factory: crate::async_stage::AsyncFactory<I, O>,
        tasks: usize,
    },
}

/// The parts of an ipc_fork stage.
pub(super) type IpcParts<I, O> = Parts<I, O, Code<I, O>>;

impl<I, O> Code<I, O> {
    /// A sync stage's parts.
    pub(crate) fn sync(parts: Parts<I, O>) -> IpcParts<I, O> {
        parts.map_factory(Code::Sync)
    }

    /// An async stage's parts, `tasks` items at once per worker.
    #[cfg(feature = "async")]
    pub(crate) fn asynchronous(
        parts: crate::exec::tasks::AsyncParts<I, O>,
        tasks: usize,
    ) -> IpcParts<I, O> {
        parts.map_factory(|factory| Code::Async { factory, tasks })
    }

    /// An async stage's items per worker (`None`: a sync stage).
    pub(super) fn tasks(&self) -> Option<usize> {
        match self {
            Code::Sync(_) => None,
            #[cfg(feature = "async")]
            Code::Async { tasks, .. } => Some(*tasks),
        }
    }
}

/// Forks the workers (called while the run prepares, before stage threads exist).
pub(super) fn start<I: Wire, O: Wire>(
    parts: IpcParts<I, O>,
    opts: ForkOptions,
    hooks: ForkHooks,
) -> PreparedRun {
    let _log = super::trace::install();
    let ctx = parts.ctx.clone();
    let fail = move |parts: IpcParts<I, O>, m: String| -> PreparedRun {
        ctx.stage_failed(FailureKind::Start, m);
        Box::new(move || drain(&parts.ctx, &parts.input))
    };
    if let Err(m) = hooks::run_fork(&hooks.before_fork, "before_fork") {
        return fail(parts, m);
    }
    let (shared, name) = (&parts.ctx.run, &parts.ctx.name);
    crate::huge::before_fork(shared, name, opts.huge_pages, crate::HugePages::IPC_DEFAULT);
    let mut workers = Vec::with_capacity(opts.workers);
    for slot in 0..opts.workers {
        match spawn(&parts, &opts, &hooks, slot, opts.batch_results) {
            Ok(w) => workers.push(Some(w)),
            Err(e) => return fail(parts, format!("cannot fork worker {slot}: {e}")),
        }
    }
    Box::new(move || run(parts, opts, hooks, workers))
}

fn run<I: Wire, O: Wire>(
    parts: IpcParts<I, O>,
    opts: ForkOptions,
    hooks: ForkHooks,
    workers: Vec<Option<Worker>>,
) {
    let (hand_offs, chunk) = feed::hand_off_sizes(&opts);
    let (tx, rx) = crossbeam_channel::bounded::<Vec<Encoded<I>>>(hand_offs);
    let (spare_tx, spare_rx) = crossbeam_channel::bounded(SPARES);
    supervised(&parts, |wake| {
        std::thread::scope(|s| {
            let feeder = std::thread::Builder::new()
                .name(format!("{}:feed", parts.ctx.name))
                .spawn_scoped(s, || feed::run(&parts, &opts, wake, chunk, tx, spare_rx))
                .expect("spawn feeder thread");
            // The supervisor owns the hand-off receiver: if it ever unwinds, the feeder's
            // sends fail instead of blocking forever.
            Supervisor::new(&parts, &opts, &hooks, workers, rx, wake, spare_tx).run();
            crate::run::join(feeder);
        })
    });
}
