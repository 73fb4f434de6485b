//! What both fork supervisors share, in the order a supervisor uses it. Each fork stage runs
//! the same skeleton (`cow::run`, `ipc::start` and its supervisor):
//!
//! 1. **Start** ([`supervised`]): the `tracing` bridge is installed on the supervisor's
//!    thread and a [`Wake`] pipe is made; the feeder thread starts ([`feed`]): stage queue to
//!    a bounded hand-off, waking the supervisor only when it is about to sleep.
//! 2. **Fork**: each child gets a result pipe ([`result_pipe`]) that the parent reads as a
//!    `Stream` while the child runs.
//! 3. **Loop**, until the input has ended and no item is left:
//!    - an abort cancels what waits in the [`Handoff`] and ends every child ([`terminate`]:
//!      SIGTERM, then SIGKILL after a grace period);
//!    - items taken from the [`Handoff`] go to children (forked per item, or written to a
//!      persistent worker);
//!    - the supervisor announces sleep ([`Wake::sleepy`]), re-checks for work, and sleeps in
//!      one `poll` ([`PollSet`]) over the wake and abort pipes and each child's result pipe
//!      and pidfd, until the nearest deadline ([`earliest`]): an item's time limit, a kill's
//!      grace, a retry's backoff;
//!    - each child is read, and reaped once its pidfd says it exited (then its pipe is read to
//!      the end); a deadline that passed ends it ([`terminate`]);
//!    - each item that ended is settled: results go downstream in order ([`Release`]), a
//!      failure (from its `error` frame, or from how the child ended: [`exit_failure`]) goes
//!      to the stage's policy ([`settle`]), and the item is counted only after the outputs
//!      it frees were sent ([`item_ended`]).
//! 4. **End**: what is still held goes downstream ([`Release::release_all`]).

use crate::ctx::StageCtx;
use crate::error::FailureKind;
use crate::exec::order::Release;
use crate::exec::parts::{drain, Parts};
use crate::ipc::message::ChildFrames;
use crate::ipc::reader::Stream;
use crate::route::Router;
use crate::stage::Item;
use crate::sys;
use crossbeam_channel::{Receiver, TryRecvError};
use rustix::event::{PollFd, PollFlags};
use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Grace between SIGTERM and SIGKILL.
pub(crate) const KILL_GRACE: Duration = Duration::from_millis(500);
/// Pipe buffer size asked for (the system maximum applies).
pub(crate) const PIPE_SIZE: usize = 1 << 20;

/// The wake pipe from the feeder to a sleeping supervisor.
pub(crate) struct Wake {
    r: OwnedFd,
    w: OwnedFd,
    sleeping: AtomicBool,
}

impl Wake {
    pub(crate) fn new() -> std::io::Result<Self> {
        let (r, w) = sys::pipe(true)?;
        sys::set_nonblocking(&w)?;
        Ok(Wake {
            r,
            w,
            sleeping: AtomicBool::new(false),
        })
    }
    /// Feeder side: wakes the supervisor if it is (about to be) asleep.
    pub(crate) fn notify(&self) {
        if self.sleeping.swap(false, Ordering::SeqCst) {
            let _ = rustix::io::write(&self.w, &[1]);
        }
    }
    /// Supervisor side: announce sleep; re-check for work after this, then poll.
    pub(crate) fn sleepy(&self) {
        self.sleeping.store(true, Ordering::SeqCst);
    }
    pub(crate) fn awake(&self) {
        self.awake_polled(true);
    }
    /// [`Wake::awake`] that reads the pipe only if `readable` (a poll found it so): a byte
    /// written since that poll stays and makes the next poll return at once, when it is
    /// read. Saves a read that finds nothing on every wake-up for something else.
    pub(crate) fn awake_polled(&self, readable: bool) {
        self.sleeping.store(false, Ordering::SeqCst);
        if !readable {
            return;
        }
        let mut buf = [0u8; 64];
        while let Ok(n) = rustix::io::read(&self.r, &mut buf) {
            if n == 0 {
                break;
            }
        }
    }
}

/// The feeder: stage queue -> hand-off, turning items into what the supervisor needs, in
/// hand-offs of up to `chunk` items (`make` turns each chunk taken into one or more
/// hand-offs, calling `send` for each; `send` returns how many it could not hand off when
/// the supervisor is gone). Counts each item taken as `items_in` once; items taken after an
/// abort are cancelled.
pub(crate) fn feed<I, T>(
    ctx: &StageCtx,
    input: &crate::queue::Receiver<I>,
    wake: &Wake,
    chunk: usize,
    mut make: impl FnMut(
        std::collections::vec_deque::Drain<'_, I>,
        &mut dyn FnMut(Vec<T>) -> Result<(), u64>,
    ) -> Result<(), u64>,
    mut send: impl FnMut(Vec<T>) -> Result<(), u64>,
) {
    let mut ready = std::collections::VecDeque::new();
    // Take only what can be handed on now: the rest stays in the queue, where live views
    // and backpressure see it.
    'feed: while input.recv_upto(&mut ready, chunk) {
        while !ready.is_empty() {
            if ctx.run.aborting() {
                ctx.received_cancelled(ready.len() as u64);
                ready.clear();
                break;
            }
            let take = ready.len().min(chunk.max(1));
            ctx.stats.items_in.fetch_add(take as u64, Ordering::Relaxed);
            let mut hand = |batch: Vec<T>| {
                if batch.is_empty() {
                    return Ok(());
                }
                send(batch)?;
                wake.notify();
                Ok(())
            };
            if let Err(unsent) = make(ready.drain(..take), &mut hand) {
                ctx.cancelled(unsent);
                // Taken from the queue but never handed off: cancelled, not lost.
                ctx.received_cancelled(ready.len() as u64);
                break 'feed;
            }
        }
    }
    // The hand-off ends with `send`.
    drop(send);
    wake.sleeping.store(false, Ordering::SeqCst);
    let _ = rustix::io::write(&wake.w, &[1]);
}

/// The supervisor's end of the hand-off from the feeder: chunks of items, taken one by one.
pub(crate) struct Handoff<T> {
    rx: Receiver<Vec<T>>,
    /// The rest of the last chunk taken.
    ready: VecDeque<T>,
}

impl<T> Handoff<T> {
    pub(crate) fn new(rx: Receiver<Vec<T>>) -> Self {
        Handoff {
            rx,
            ready: VecDeque::new(),
        }
    }

    /// The next item the feeder handed over: the rest of the last chunk, else a new chunk.
    pub(crate) fn next(&mut self) -> Result<T, TryRecvError> {
        if let Some(t) = self.ready.pop_front() {
            return Ok(t);
        }
        let chunk = self.rx.try_recv()?;
        self.ready.extend(chunk);
        Ok(self.ready.pop_front().expect("hand-offs are never empty"))
    }

    /// Whether items wait to be taken.
    pub(crate) fn waiting(&self) -> bool {
        !self.ready.is_empty() || !self.rx.is_empty()
    }

    /// While aborting: cancels the items handed over and not yet taken (the feeder cancels
    /// what is still queued). Returns whether the input has ended.
    /// `items` says how many items an entry holds.
    pub(crate) fn cancel(&mut self, ctx: &StageCtx, items: impl Fn(&T) -> u64) -> bool {
        let count = |entries: &mut dyn Iterator<Item = &T>| entries.map(&items).sum::<u64>();
        ctx.cancelled(count(&mut self.ready.iter()));
        self.ready.clear();
        loop {
            match self.rx.try_recv() {
                Ok(chunk) => ctx.cancelled(count(&mut chunk.iter())),
                Err(TryRecvError::Empty) => return false,
                Err(TryRecvError::Disconnected) => return true,
            }
        }
    }
}

/// How the parent ended a child early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Killed {
    Timeout,
    Cancelled,
    Protocol,
}

/// Ends a child in two steps: SIGTERM, with SIGKILL due after the grace period (`first`),
/// then SIGKILL, with nothing more due. Returns when the next step is due.
pub(crate) fn end_child(pid: i32, first: bool) -> Option<Instant> {
    end_with(first, |sig| sys::kill(pid, sig))
}

fn end_with(first: bool, send: impl FnOnce(i32)) -> Option<Instant> {
    match first {
        true => {
            send(libc::SIGTERM);
            Some(Instant::now() + KILL_GRACE)
        }
        false => {
            send(libc::SIGKILL);
            None
        }
    }
}

/// The parent ends a child for `why` (the first reason stands), as [`end_child`] does, with
/// the signals sent through the child's pidfd (a fork server's child is reaped by the server,
/// so its pid may be reused before the parent hears of it).
pub(crate) fn terminate(
    child: &sys::Child,
    killed: &mut Option<Killed>,
    why: Killed,
    deadline: &mut Option<Instant>,
) {
    *deadline = end_with(killed.is_none(), |sig| sys::fdpass::signal(child, sig));
    killed.get_or_insert(why);
}

/// A child's result pipe: the parent's stream (non-blocking), and the child's end.
pub(crate) fn result_pipe(max_frame: usize) -> std::io::Result<(Stream, OwnedFd)> {
    let (r, w) = sys::pipe(true)?;
    sys::grow_pipe(&w, PIPE_SIZE);
    Ok((Stream::new(r, max_frame), w))
}

/// A cow child's result pipe, in one system call: the read end (the parent's, or a fork
/// server's to hand on) and the child's write end, both non-blocking (the child's writer
/// waits for room itself); it keeps the default size, and the child grows it only if it has
/// much to write (`ChildOut::growing`).
pub(crate) fn cow_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let flags = rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK;
    Ok(rustix::pipe::pipe_with(flags)?)
}

/// Runs a supervisor `body` with the `tracing` bridge installed on this thread and a wake
/// pipe for its feeder; if no pipe can be made, the stage fails to start and its input is
/// drained.
pub(crate) fn supervised<I, O, F>(parts: &Parts<I, O, F>, body: impl FnOnce(&Wake)) {
    let _log = super::trace::install();
    match Wake::new() {
        Ok(wake) => body(&wake),
        Err(e) => {
            parts
                .ctx
                .stage_failed(FailureKind::Start, format!("cannot create a pipe: {e}"));
            drain(&parts.ctx, &parts.input)
        }
    }
}

/// A supervisor's poll set: the wake pipe, then the run's abort pipe, then the children's
/// fds. Once the abort is handled the pipe stays readable: it is no longer watched, or every
/// poll would return at once until the children are gone.
pub(crate) struct PollSet<'a> {
    fds: Vec<PollFd<'a>>,
}

impl<'a> PollSet<'a> {
    /// The wake and abort pipes, with room for `more` entries.
    pub(crate) fn new(
        wake: &'a Wake,
        abort: &'a OwnedFd,
        abort_handled: bool,
        more: usize,
    ) -> Self {
        let mut fds = Vec::with_capacity(2 + more);
        fds.push(PollFd::new(&wake.r, PollFlags::IN));
        let watch_abort = match abort_handled {
            true => PollFlags::empty(),
            false => PollFlags::IN,
        };
        fds.push(PollFd::new(abort, watch_abort));
        PollSet { fds }
    }

    /// Adds an entry; returns its index.
    pub(crate) fn push(&mut self, fd: PollFd<'a>) -> usize {
        self.fds.push(fd);
        self.fds.len() - 1
    }

    /// Sleeps in poll until an entry is ready or `deadline` passes.
    pub(crate) fn wait(&mut self, deadline: Option<Instant>) {
        let timeout = deadline.map(|d| {
            let left = d.saturating_duration_since(Instant::now());
            rustix::event::Timespec {
                tv_sec: left.as_secs() as i64,
                tv_nsec: left.subsec_nanos() as i64,
            }
        });
        let _ = rustix::event::poll(&mut self.fds, timeout.as_ref());
    }

    /// Whether entry `i` was ready.
    pub(crate) fn ready(&self, i: usize) -> bool {
        !self.fds[i].revents().is_empty()
    }

    /// Whether the wake pipe was ready.
    pub(crate) fn woken(&self) -> bool {
        self.ready(0)
    }
}

/// Whether the item a child (or worker) was running when it died is blameless for its death:
/// the parent killed it (`killed`) for the time limit of another item (`timed_out`, which
/// answered after all, before the signal landed), it ended by that signal, and the item had
/// sent nothing (no output, nothing lost or corrupt). Such an item runs again, its attempt
/// not counted; one that had sent outputs fails as a crash would.
pub(crate) fn killed_for_another(
    killed: Option<Killed>,
    timed_out: Option<u64>,
    running: u64,
    sent: bool,
    exit: sys::Exit,
) -> bool {
    killed == Some(Killed::Timeout)
        && timed_out.is_some_and(|t| t != running)
        && !sent
        && matches!(exit, sys::Exit::Signal(libc::SIGTERM | libc::SIGKILL))
}

/// Text for a failure from how a child ended.
pub(crate) fn exit_failure(exit: sys::Exit, partial: bool) -> (crate::FailureKind, String) {
    use crate::FailureKind as K;
    match exit {
        // The kind names the signal or the code: the message says only what it ended.
        sys::Exit::Signal(s) => (
            K::Signal(s),
            "the child process died running the item".into(),
        ),
        sys::Exit::Code(0) if partial => {
            (K::Truncated, "child exited in the middle of a frame".into())
        }
        sys::Exit::Code(0) => (
            K::Truncated,
            "child exited without finishing the item".into(),
        ),
        sys::Exit::Code(c) => (
            K::Exit(c),
            "the child process exited before finishing the item".into(),
        ),
    }
}

/// What decoding the frames of a stage's children needs.
pub(crate) fn child_frames<I, O, F>(parts: &Parts<I, O, F>) -> ChildFrames<'_, I, O> {
    ChildFrames {
        wire: parts.wire.expect("fork stages have a codec"),
        routes: &parts.router.routes,
    }
}

/// A failed attempt at item `index`, settled by the stage's policy (the one place both fork
/// executors decide it). Returns when to try again if the item is to be retried; otherwise
/// the item is cancelled, dead-lettered (through `dead_letter`) or dropped, counted as done,
/// and released downstream in order.
#[allow(clippy::too_many_arguments)]
pub(crate) fn settle<I, O: Item, F>(
    parts: &Parts<I, O, F>,
    release: &mut Release<O>,
    router: &mut Router<O>,
    index: u64,
    attempt: u32,
    kind: crate::FailureKind,
    message: String,
    pid: Option<u32>,
    dead_letter: impl FnOnce(crate::ItemFailure),
) -> Option<Instant> {
    let cancelled = kind == crate::FailureKind::Cancelled;
    if !cancelled {
        match parts.ctx.failure(index, attempt, kind, message, pid) {
            crate::policy::Verdict::Retry(delay) => return Some(Instant::now() + delay),
            crate::policy::Verdict::DeadLetter(f) => dead_letter(f),
            crate::policy::Verdict::Dropped => {}
        }
    }
    item_ended(&parts.ctx, release, router, index, cancelled);
    None
}

/// Item `index` has reached its final outcome (`cancelled` or not): the outputs held back
/// for ordering that it frees go downstream first, while the item still holds its
/// routing-loop unit, and only then is it counted, which releases the unit (the loop could
/// close under outputs sent after that). Items cancelled in bulk while a run aborts are
/// counted without it: the supervisor sends everything still held when it ends
/// (`Release::release_all`).
pub(crate) fn item_ended<O: Item>(
    ctx: &StageCtx,
    release: &mut Release<O>,
    router: &mut Router<O>,
    index: u64,
    cancelled: bool,
) {
    release.finished(index, router);
    let _ = router.flush();
    match cancelled {
        true => ctx.cancelled(1),
        false => ctx.items_done(1),
    }
}

pub(crate) fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loops::{Loop, Membership};
    use crate::queue::{channel, Capacity, FanOut, QueueTx};
    use crate::stats::StageStats;
    use std::sync::Arc;

    #[test]
    fn an_ending_item_sends_the_outputs_it_frees_before_it_releases_its_loop_unit() {
        for cancelled in [false, true] {
            // An ordered fork stage inside a routing loop, sending to a member of the loop.
            let lp = Loop::new();
            let closed = Arc::new(AtomicBool::new(false));
            let c = closed.clone();
            lp.member(Arc::new(move || c.store(true, Ordering::SeqCst)));
            let stats = Arc::new(StageStats::default());
            let (tx, rx) = channel(Capacity::Bounded(10), stats.clone());
            let membership = Membership {
                lp: Some(lp.clone()),
                unit: None,
            };
            let out = vec![QueueTx::new(tx, membership)];
            let mut router = Router::new(out, FanOut::Broadcast, stats.clone());
            let mut release = Release::new(true);
            let ctx = StageCtx {
                name: "ordered".into(),
                exec: crate::Exec::cow_fork(2),
                policy: crate::OnError::default(),
                stats,
                run: Arc::new(crate::shared::RunShared::new(true)),
                lp: Some(lp.clone()),
            };
            // Items 0 and 1 are in the stage, each holding a unit of the loop.
            lp.take(2);
            // Item 1 ends first: its output waits for item 0's.
            release.emit(1, 11, &mut router);
            item_ended(&ctx, &mut release, &mut router, 1, false);
            assert_eq!(rx.len(), 0, "held back for ordering");
            // Item 0 ends without output: item 1's output goes out, and only then is item
            // 0's unit released (the output's own unit keeps the loop open).
            item_ended(&ctx, &mut release, &mut router, 0, cancelled);
            assert_eq!(rx.len(), 1, "item 1's output was sent");
            assert!(
                !closed.load(Ordering::SeqCst),
                "the loop closed with an output on its way (cancelled: {cancelled})"
            );
            // The downstream member handles it: now the loop is idle and closes.
            lp.release(1);
            assert!(closed.load(Ordering::SeqCst));
        }
    }
}
