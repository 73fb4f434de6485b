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
//! - Results are read while children run (a child can emit far more than a pipe holds).
//! - A child's outcome is decided when it has exited and its pipe is drained:
//!   `done` frame = success; `error` frame = the stage's error or panic; otherwise the exit
//!   status: killed by a signal, non-zero exit, or a stream that ended early (truncated).
//!   Each is one failure of that one item, handed to the stage's policy.

mod child;
mod cow;
mod ipc;
mod log;
mod outbox;

use crate::ctx::StageCtx;
use crate::exec::parts::Parts;
use crate::exec::runner::{ForkHooks, PreparedRun};
use crate::exec::ForkOptions;
use crate::ipc::frame::Decoder;
use crate::route::Router;
use crate::stage::{Item, Sink, Wire};
use crate::sys;
use crossbeam_channel::Receiver;
use rustix::event::{PollFd, PollFlags};
use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Grace between SIGTERM and SIGKILL.
const KILL_GRACE: Duration = Duration::from_millis(500);
/// Pipe buffer size asked for (the system maximum applies).
const PIPE_SIZE: usize = 1 << 20;
/// Most bytes read from one child per wake-up, so one chatty child cannot starve the rest.
const READ_BUDGET: usize = 4 << 20;

pub(crate) fn cow<I: Item, O: Wire>(
    parts: Parts<I, O>,
    opts: ForkOptions,
    hooks: ForkHooks,
) -> PreparedRun {
    Box::new(move || cow::run(parts, opts, hooks))
}

pub(crate) fn ipc<I: Wire, O: Wire>(
    parts: Parts<I, O>,
    opts: ForkOptions,
    hooks: ForkHooks,
) -> PreparedRun {
    ipc::start(parts, opts, hooks)
}

/// The wake pipe from the feeder to a sleeping supervisor.
pub(crate) struct Wake {
    r: OwnedFd,
    w: OwnedFd,
    sleeping: AtomicBool,
}

impl Wake {
    fn new() -> std::io::Result<Self> {
        let (r, w) = sys::pipe(true)?;
        sys::set_nonblocking(&w)?;
        Ok(Wake {
            r,
            w,
            sleeping: AtomicBool::new(false),
        })
    }
    /// Feeder side: wakes the supervisor if it is (about to be) asleep.
    fn notify(&self) {
        if self.sleeping.swap(false, Ordering::SeqCst) {
            let _ = rustix::io::write(&self.w, &[1]);
        }
    }
    /// Supervisor side: announce sleep; re-check for work after this, then poll.
    fn sleepy(&self) {
        self.sleeping.store(true, Ordering::SeqCst);
    }
    fn awake(&self) {
        self.sleeping.store(false, Ordering::SeqCst);
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
fn feed<I, T>(
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

/// The next item the feeder handed over: the rest of the last chunk, else a new chunk.
fn next_handed<T>(
    incoming: &mut std::collections::VecDeque<T>,
    rx: &Receiver<Vec<T>>,
) -> Result<T, crossbeam_channel::TryRecvError> {
    if let Some(t) = incoming.pop_front() {
        return Ok(t);
    }
    let chunk = rx.try_recv()?;
    incoming.extend(chunk);
    Ok(incoming.pop_front().expect("hand-offs are never empty"))
}

/// While aborting: cancels the items already in the hand-off (`size` items per message; the
/// feeder cancels what is still queued). Returns whether the input has ended.
fn cancel_ready<T>(ctx: &StageCtx, rx: &Receiver<T>, size: impl Fn(&T) -> u64) -> bool {
    loop {
        match rx.try_recv() {
            Ok(t) => ctx.cancelled(size(&t)),
            Err(crossbeam_channel::TryRecvError::Empty) => return false,
            Err(crossbeam_channel::TryRecvError::Disconnected) => return true,
        }
    }
}

/// A child's result stream, as the parent reads it.
pub(crate) struct Stream {
    fd: OwnedFd,
    dec: Decoder,
    eof: bool,
    /// Bytes of the stream received so far: read from the pipe, or taken from a batched
    /// worker's log.
    received: u64,
}

/// The start of a supervisor's poll set: the wake pipe, then the run's abort pipe. Once the
/// abort is handled the pipe stays readable: it is no longer watched, or every poll would
/// return at once until the children are gone. Room is made for `more` entries.
fn poll_set<'a>(
    wake: &'a Wake,
    abort: &'a OwnedFd,
    abort_handled: bool,
    more: usize,
) -> Vec<PollFd<'a>> {
    let mut fds = Vec::with_capacity(2 + more);
    fds.push(PollFd::new(&wake.r, PollFlags::IN));
    let watch_abort = match abort_handled {
        true => PollFlags::empty(),
        false => PollFlags::IN,
    };
    fds.push(PollFd::new(abort, watch_abort));
    fds
}

impl Stream {
    /// The stream's entry in a poll set: readable, until its end was read.
    fn poll_fd(&self) -> PollFd<'_> {
        let flags = match self.eof {
            true => PollFlags::empty(),
            false => PollFlags::IN,
        };
        PollFd::new(&self.fd, flags)
    }

    fn new(fd: OwnedFd, max: usize) -> Self {
        Stream {
            fd,
            dec: Decoder::new(max),
            eof: false,
            received: 0,
        }
    }
    /// The stream is corrupt: nothing more of it is read or decoded, not even bytes already
    /// read (the child's own frames after a bad one are not trusted).
    fn discard(&mut self) {
        self.eof = true;
        self.dec.clear();
    }

    /// Reads what is available now (non-blocking), up to the read budget.
    fn read_available(&mut self) {
        const CHUNK: usize = 64 << 10;
        let mut total = 0;
        while !self.eof && total < READ_BUDGET {
            match self.dec.read_from(&self.fd, CHUNK) {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    total += n;
                    self.received += n as u64;
                }
                Err(rustix::io::Errno::INTR) => continue,
                Err(rustix::io::Errno::AGAIN) => break,
                Err(_) => self.eof = true,
            }
        }
    }
}

/// How the parent ended a child early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Killed {
    Timeout,
    Cancelled,
    Protocol,
}

/// A watchdog state: SIGTERM first, SIGKILL after the grace period.
fn terminate(pid: i32, killed: &mut Option<Killed>, why: Killed, deadline: &mut Option<Instant>) {
    if killed.is_none() {
        *killed = Some(why);
        sys::kill(pid, libc::SIGTERM);
        *deadline = Some(Instant::now() + KILL_GRACE);
    } else {
        sys::kill(pid, libc::SIGKILL);
        *deadline = None;
    }
}

/// Sleeps in poll until one of `fds` is ready or `deadline` passes.
fn wait(fds: &mut [rustix::event::PollFd<'_>], deadline: Option<Instant>) {
    let timeout = deadline.map(|d| {
        let left = d.saturating_duration_since(Instant::now());
        rustix::event::Timespec {
            tv_sec: left.as_secs() as i64,
            tv_nsec: left.subsec_nanos() as i64,
        }
    });
    let _ = rustix::event::poll(fds, timeout.as_ref());
}

/// Text for a failure from how a child ended.
fn exit_failure(exit: sys::Exit, partial: bool) -> (crate::FailureKind, String) {
    use crate::FailureKind as K;
    match exit {
        sys::Exit::Signal(s) => (
            K::Signal(s),
            format!("child killed by signal {s} ({})", signal_name(s)),
        ),
        sys::Exit::Code(0) if partial => {
            (K::Truncated, "child exited in the middle of a frame".into())
        }
        sys::Exit::Code(0) => (
            K::Truncated,
            "child exited without finishing the item".into(),
        ),
        sys::Exit::Code(c) => (K::Exit(c), format!("child exited with code {c}")),
    }
}

fn signal_name(s: i32) -> &'static str {
    nix::sys::signal::Signal::try_from(s)
        .map(|s| s.as_str())
        .unwrap_or("unknown")
}

/// Routes results downstream, in input order when asked: results of item `i` are held until
/// every item before `i` has finished (succeeded or finally failed).
pub(crate) struct Release<O> {
    ordered: bool,
    next: u64,
    held: BTreeMap<u64, (Vec<O>, bool)>,
}

impl<O: Item> Release<O> {
    fn new(ordered: bool) -> Self {
        Release {
            ordered,
            next: 0,
            held: BTreeMap::new(),
        }
    }
    fn emit(&mut self, index: u64, o: O, router: &mut Router<O>) {
        if !self.ordered || index == self.next {
            let _ = router.send(o);
        } else {
            self.held.entry(index).or_default().0.push(o);
        }
    }
    /// Item `index` will produce nothing more.
    fn finished(&mut self, index: u64, router: &mut Router<O>) {
        if !self.ordered {
            return;
        }
        self.held.entry(index).or_default().1 = true;
        while let Some(entry) = self.held.first_entry() {
            if *entry.key() != self.next || !entry.get().1 {
                break;
            }
            for o in entry.remove().0 {
                let _ = router.send(o);
            }
            self.next += 1;
        }
    }
    /// End of the stage: whatever is still held goes out, in order (nothing is lost even if
    /// an item in between never finished, e.g. on abort).
    fn release_all(&mut self, router: &mut Router<O>) {
        for (_, (outs, _)) in std::mem::take(&mut self.held) {
            for o in outs {
                let _ = router.send(o);
            }
        }
    }
}

/// Decodes a `routed` frame's payload with the stage's route table.
fn decode_routed(
    routes: &crate::route::Routes,
    payload: &[u8],
) -> Result<(usize, crate::erased::Erased), String> {
    let (head, body) = payload
        .split_at_checked(4)
        .ok_or("routed frame without a route index")?;
    let index = u32::from_le_bytes(head.try_into().expect("4 bytes")) as usize;
    let entry = routes
        .entries
        .get(index)
        .ok_or_else(|| format!("routed frame for unknown route {index}"))?;
    let codec = entry
        .codec
        .ok_or_else(|| format!("route to {:?} is not serialisable", entry.name))?;
    let item = (codec.decode)(body)
        .map_err(|e| format!("cannot decode an item routed to {:?}: {e}", entry.name))?;
    Ok((index, item))
}

/// A failed attempt at item `index`, settled by the stage's policy (the one place both fork
/// executors decide it). Returns when to try again if the item is to be retried; otherwise
/// the item is cancelled, dead-lettered (through `dead_letter`) or dropped, counted as done,
/// and released downstream in order.
#[allow(clippy::too_many_arguments)]
fn settle<I, O: Item>(
    parts: &Parts<I, O>,
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
fn item_ended<O: Item>(
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

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
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
