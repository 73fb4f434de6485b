//! ipc_fork: `workers` persistent forked workers fed over pipes.
//!
//! Workers are forked when the run prepares its stages, before any stage thread exists. Items
//! are serialised by the feeder thread, handed to the supervisor up to [`FEED_CHUNK`] at a
//! time, and dispatched round-robin to workers that hold fewer than `in_flight` items; a
//! worker answers in order, so the first item it holds (without an answer) is the one it is
//! running. Writes are non-blocking (a slow worker never stalls the others) and several ready
//! items go out in one write; an item of 4 KiB or more goes out from the buffer the feeder
//! encoded it into, not copied again (`outbox`). Results are held and sent downstream once per
//! read of the workers' pipes; their items count as done after that (a routing loop's unit
//! outlives the sending of its item's results).
//!
//! A worker writes each item's frames before it starts the next, or, with `batch_results`,
//! keeps them in a log shared with the parent and writes the log in batches: the parent
//! recovers the log of a dead worker, so the answer order above still holds (see
//! `Supervisor::recover`), and takes what a worker busy with a long item has held for
//! 1 ms (`Supervisor::take_held`; it looks every 2 ms while a worker has two items or more).
//!
//! A worker that dies is noticed at once (its pidfd): the item it was running fails with the
//! way it died, the items queued behind it go back to the front of the queue (their attempt is
//! not counted), and a new worker is forked in its place, after a backoff if workers keep dying.
//! When the input ends, each worker gets `shutdown`, flushes its stage instance and exits 0.

use super::outbox::{Outbox, Payload};
use super::{
    child, earliest, exit_failure, feed, poll_set, terminate, wait, Killed, Release, Stream, Wake,
    PIPE_SIZE,
};
use crate::error::FailureKind;
use crate::exec::parts::{dead_letter, drain, Parts};
use crate::exec::runner::{ForkHooks, PreparedRun};
use crate::exec::{Dispatch, ForkOptions};
use crate::hooks;
use crate::ipc::frame::{self, Kind};
use crate::ipc::protocol::{self, ChildError, Done};
use crate::ipc::{FINISH_ID, START_ID};
use crate::stage::Wire;
use crate::stats::Recorder;
use crate::sys;
use crossbeam_channel::{Receiver, TryRecvError};
use rustix::event::{PollFd, PollFlags};
use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Items the feeder hands the supervisor at once (one wake-up, one write per worker).
const FEED_CHUNK: usize = 256;

/// A hand-off ends once its items' encodings reach this many bytes, so the items waiting
/// between feeder and supervisor stay bounded in bytes as well as in number.
const FEED_BYTES: usize = 1 << 20;

/// A batched worker's finished results that have waited this long in its log, while it is
/// busy with a long item, are taken from the log by the parent.
const TAKE_HELD_AFTER: Duration = Duration::from_millis(1);

/// How often the parent looks at the log of a batched worker that may hold results (one
/// with at least two items: a worker with one holds nothing, it writes when its input is
/// empty).
const LOOK_EVERY: Duration = Duration::from_millis(2);

/// A worker is given no more items while it holds this many payload bytes (at least one
/// item always fits), so a large `in_flight` is safe for large items.
const MAX_IN_FLIGHT_BYTES: usize = 1 << 20;

/// Items of at least this many encoded bytes (on average, in the last hand-off) get a
/// buffer each.
const LARGE_ITEM: usize = 16 << 10;

/// Buffers of ended large items kept for the feeder to encode the next large items into, at
/// most. Only buffers of at most [`MAX_SPARE`] bytes are kept, so the spares of a stage hold
/// at most 8 MiB, until the stage ends.
const SPARES: usize = 8;
/// The largest buffer kept as a spare, and the largest a large item's buffer is sized to in
/// advance.
const MAX_SPARE: usize = 1 << 20;

/// The feeder's side of the hand-off: numbers the items and encodes them.
struct FeedEncoder<I> {
    encode: fn(&I, &mut Vec<u8>) -> Result<(), String>,
    max: usize,
    /// The next item's index in the stage's input.
    index: u64,
    /// Encoded bytes per item in the last hand-off: sizes the next buffers (so an item is
    /// mostly encoded once, not copied again as its buffer grows) and picks shared or own
    /// buffers.
    per_item: usize,
    /// Where a small item is encoded before it joins its hand-off's buffer.
    scratch: Vec<u8>,
    /// Buffers of large items that have ended, given back by the supervisor for the next
    /// large items (a fresh buffer costs a page fault per page, every time).
    spares: Receiver<Vec<u8>>,
}

impl<I> FeedEncoder<I> {
    /// Encodes `items` into hand-offs of at most [`FEED_BYTES`] (plus one item) and passes
    /// each to `hand`. On `Err`, the count includes the items not encoded yet: the feeder
    /// counts them cancelled, not lost.
    fn hand_off(
        &mut self,
        items: &mut std::collections::vec_deque::Drain<'_, I>,
        hand: &mut dyn FnMut(Vec<Encoded<I>>) -> Result<(), u64>,
    ) -> Result<(), u64> {
        while items.len() > 0 {
            let large = self.per_item >= LARGE_ITEM;
            let guess = match large {
                true => 0,
                false => (self.per_item * items.len()).min(FEED_BYTES + self.per_item),
            };
            let mut buf = Vec::with_capacity(guess);
            let mut spans = Vec::with_capacity(items.len());
            let mut bytes = 0;
            /// Where an item's encoding is, until the shared buffer is complete.
            enum At {
                Span(usize, usize),
                Own(Vec<u8>),
            }
            for item in items.by_ref() {
                let at = match large {
                    true => {
                        let mut own = self
                            .spares
                            .try_recv()
                            .unwrap_or_else(|_| Vec::with_capacity(self.per_item.min(MAX_SPARE)));
                        encode_input(self.encode, item, &mut own, self.max).map(|()| {
                            // A spare, or a buffer sized after a huge item, is held as
                            // long as this item.
                            shrink_oversized(&mut own);
                            At::Own(own)
                        })
                    }
                    false => {
                        // Encoded apart, then appended: a codec that does not just append to
                        // its output can spoil only its own item, never its neighbours'.
                        let scratch = &mut self.scratch;
                        scratch.clear();
                        encode_input(self.encode, item, scratch, self.max).map(|()| {
                            let start = buf.len();
                            buf.extend_from_slice(scratch);
                            At::Span(start, buf.len())
                        })
                    }
                };
                bytes += match &at {
                    Ok(At::Span(start, end)) => end - start,
                    Ok(At::Own(own)) => own.len(),
                    Err(_) => 0,
                };
                spans.push((self.index, at));
                self.index += 1;
                if bytes >= FEED_BYTES {
                    break;
                }
            }
            self.per_item = bytes / spans.len().max(1);
            // Sized for larger items than came: held for as long as any of its items.
            shrink_oversized(&mut buf);
            let buf = Arc::new(buf);
            let batch = spans
                .into_iter()
                .map(|(i, at)| {
                    let payload = at.map(|at| match at {
                        At::Span(start, end) => Payload::shared(&buf, start, end),
                        At::Own(own) => Payload::own(own),
                    });
                    (i, payload)
                })
                .collect();
            hand(batch).map_err(|unsent| unsent + items.len() as u64)?;
        }
        Ok(())
    }
}

/// Whether a buffer has much more room than its bytes need (at most twice, plus a page).
fn oversized(len: usize, capacity: usize) -> bool {
    capacity > 2 * len + 4096
}

/// Gives back the room an encoded buffer does not need, if it is [`oversized`].
fn shrink_oversized(buf: &mut Vec<u8>) {
    if oversized(buf.len(), buf.capacity()) {
        buf.shrink_to_fit();
    }
}

/// One item on its way through a worker.
struct Flight {
    index: u64,
    attempt: u32,
    payload: Payload,
    not_before: Option<Instant>,
}

struct Worker {
    child: sys::Child,
    /// With `batch_results`: frames of finished items the worker has not written yet.
    log: Option<sys::SharedLog>,
    input: Option<OwnedFd>,
    out: Outbox,
    stream: Stream,
    exit: Option<sys::Exit>,
    flights: VecDeque<Flight>,
    /// Payload bytes of `flights`.
    bytes: usize,
    /// The item whose time limit ran out, if the worker is being killed for it.
    timed_out: Option<u64>,
    /// When the first flight started running (deadline base).
    front_since: Option<Instant>,
    deadline: Option<Instant>,
    killed: Option<Killed>,
    shutdown: bool,
    start_error: Option<String>,
    protocol: Option<String>,
    results: u64,
    /// Items finished since the stage's live child table was last updated.
    reported: u64,
    /// With `batch_results`: the log's base when it was first seen holding bytes, and when.
    held: Option<(u64, Instant)>,
    /// When the parent last looked at the log and found nothing to take.
    looked: Instant,
    /// Shut down to be replaced by a worker that writes each item's results (after a
    /// corrupt batched stream).
    retired: bool,
}

impl Worker {
    /// The item the worker was running has ended (`done` or `error`): the next one, if any,
    /// starts now, with its own deadline.
    fn front_ended(&mut self, now: Instant, timeout: Option<Duration>) -> Flight {
        let flight = self
            .flights
            .pop_front()
            .expect("an answer for the running item");
        self.bytes -= flight.payload.len();
        let more = !self.flights.is_empty();
        self.front_since = more.then_some(now);
        // Once the worker is being killed, its kill deadline (SIGKILL after the grace
        // period) stands, whatever it still answers.
        if self.killed.is_none() {
            self.deadline = timeout.filter(|_| more).map(|t| now + t);
        }
        flight
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if self.exit.is_none() {
            sys::kill(self.child.pid, libc::SIGKILL);
            self.exit = Some(sys::reap(self.child.pid));
        }
    }
}

fn spawn<I: Wire, O: Wire>(
    parts: &Parts<I, O>,
    opts: &ForkOptions,
    hooks: &ForkHooks,
    slot: usize,
    batched: bool,
) -> std::io::Result<Worker> {
    let (in_r, in_w) = sys::pipe(false)?;
    let (out_r, out_w) = sys::pipe(true)?;
    sys::set_nonblocking(&in_w)?;
    sys::grow_pipe(&in_w, PIPE_SIZE);
    sys::grow_pipe(&out_w, PIPE_SIZE);
    let keep = [sys::raw(&in_r), sys::raw(&out_w)];
    let mut log = match batched {
        true => Some(sys::SharedLog::new(child::LOG_BYTES)?),
        false => None,
    };
    let child_log = log.as_mut();
    let code = child::StageCode::new(parts, &hooks.after_fork, opts.max_frame);
    let child = sys::fork_child(&keep, &format!("mg:{}#{slot}", parts.ctx.name), move || {
        child::ipc_worker::<I, O>(in_r, out_w, child_log, &code)
    })?;
    parts.ctx.stats.child_started(child.pid);
    Ok(Worker {
        child,
        log,
        input: Some(in_w),
        out: Outbox::default(),
        stream: Stream::new(out_r, opts.max_frame),
        exit: None,
        flights: VecDeque::new(),
        bytes: 0,
        timed_out: None,
        front_since: None,
        deadline: None,
        killed: None,
        shutdown: false,
        start_error: None,
        protocol: None,
        results: 0,
        reported: 0,
        held: None,
        looked: Instant::now(),
        retired: false,
    })
}

/// Forks the workers (called while the run prepares, before stage threads exist).
pub(super) fn start<I: Wire, O: Wire>(
    parts: Parts<I, O>,
    opts: ForkOptions,
    hooks: ForkHooks,
) -> PreparedRun {
    let _log = super::log::install();
    let ctx = parts.ctx.clone();
    let fail = move |parts: Parts<I, O>, m: String| -> PreparedRun {
        ctx.stage_failed(FailureKind::Start, m);
        Box::new(move || drain(&parts.ctx, &parts.input))
    };
    if let Err(m) = hooks::run_fork(&hooks.before_fork, "before_fork") {
        return fail(parts, m);
    }
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
    parts: Parts<I, O>,
    opts: ForkOptions,
    hooks: ForkHooks,
    workers: Vec<Option<Worker>>,
) {
    let _log = super::log::install();
    let wake = match Wake::new() {
        Ok(w) => w,
        Err(e) => {
            parts
                .ctx
                .stage_failed(FailureKind::Start, format!("cannot create a pipe: {e}"));
            return drain(&parts.ctx, &parts.input);
        }
    };
    let window = opts.in_flight.max(1);
    // Enough ready items to refill every worker's window between two wake-ups, but not a
    // copy of the whole input (and a hand-off ends at `FEED_BYTES`, so large items wait in
    // bounded bytes too).
    let ready = (opts.workers * window).clamp(1, 4 * FEED_CHUNK);
    let chunk = ready.min(FEED_CHUNK);
    let (tx, rx) = crossbeam_channel::bounded::<Vec<Encoded<I>>>(ready.div_ceil(chunk));
    let (spare_tx, spare_rx) = crossbeam_channel::bounded(SPARES);
    std::thread::scope(|s| {
        let ctx = &parts.ctx;
        std::thread::Builder::new()
            .name(format!("{}:feed", ctx.name))
            .spawn_scoped(s, || {
                let wire = parts.wire.expect("fork stages have a codec");
                let mut enc = FeedEncoder {
                    encode: wire.encode_in,
                    max: opts.max_frame,
                    index: 0,
                    per_item: 0,
                    scratch: Vec::new(),
                    spares: spare_rx,
                };
                let make =
                    |mut items: std::collections::vec_deque::Drain<'_, I>,
                     hand: &mut dyn FnMut(Vec<Encoded<I>>) -> Result<(), u64>| {
                        enc.hand_off(&mut items, hand)
                    };
                let send =
                    move |batch: Vec<Encoded<I>>| tx.send(batch).map_err(|e| e.0.len() as u64);
                feed(ctx, &parts.input, &wake, chunk, make, send)
            })
            .expect("spawn feeder thread");
        let respawn = vec![None; workers.len()];
        let mut sup = Supervisor {
            parts: &parts,
            opts: &opts,
            hooks: &hooks,
            workers,
            respawn,
            rr: 0,
            deaths: 0,
            release: Release::new(opts.ordered),
            strict: false,
            router: parts.router.clone().batched_until_flush(),
            done: 0,
            spares: spare_tx,
        };
        sup.run(rx, &wake);
    });
}

/// An input item as the feeder hands it over: `(index, payload)` or, when it cannot be
/// serialised, the item and the reason (the supervisor fails it: encoding is deterministic, so
/// it is never retried).
type Encoded<I> = (u64, Result<Payload, (I, String)>);

/// Serialises an input item into the empty `out` on the feeder thread, or gives the item
/// back with the reason it cannot cross.
fn encode_input<I>(
    encode: fn(&I, &mut Vec<u8>) -> Result<(), String>,
    item: I,
    out: &mut Vec<u8>,
    max: usize,
) -> Result<(), (I, String)> {
    debug_assert!(out.is_empty());
    match encode(&item, out) {
        Ok(()) if out.len() + frame::HEADER - 4 <= max => Ok(()),
        Ok(()) => {
            let m = format!(
                "input item of {} bytes exceeds the maximum frame size of {max}",
                out.len()
            );
            Err((item, m))
        }
        Err(e) => Err((item, format!("cannot serialise the input item: {e}"))),
    }
}

struct Supervisor<'a, I, O> {
    parts: &'a Parts<I, O>,
    opts: &'a ForkOptions,
    hooks: &'a ForkHooks,
    workers: Vec<Option<Worker>>,
    respawn: Vec<Option<Instant>>,
    rr: usize,
    deaths: u32,
    release: Release<O>,
    /// A batched worker corrupted its stream: replacements write each item's results
    /// before the next item, so a repeat is pinned on the item that does it.
    strict: bool,
    /// Where results go: held, and sent after each read of the workers' pipes.
    router: crate::route::Router<O>,
    /// Items finished since the last send (counted done once their results are sent).
    done: u64,
    /// Gives the feeder the buffers of large items that ended.
    spares: crossbeam_channel::Sender<Vec<u8>>,
}

impl<I: Wire, O: Wire> Supervisor<'_, I, O> {
    fn run(&mut self, rx: Receiver<Vec<Encoded<I>>>, wake: &Wake) {
        let ctx = &self.parts.ctx;
        let abort_fd = ctx.run.abort_fd();
        let mut rec = Recorder::new(&ctx.stats);
        let mut queue: VecDeque<Flight> = VecDeque::new();
        // Items handed off by the feeder, not yet dispatched.
        let mut incoming: VecDeque<Encoded<I>> = VecDeque::new();
        let mut input_done = false;
        let mut cancelled_all = false;
        let window = self.opts.in_flight.max(1);
        loop {
            let now = Instant::now();
            if ctx.run.aborting() && !cancelled_all {
                cancelled_all = true;
                ctx.cancelled(queue.len() as u64);
                queue.clear();
                for w in self.workers.iter_mut().flatten() {
                    if w.exit.is_none() && w.killed.is_none() {
                        terminate(
                            w.child.pid,
                            &mut w.killed,
                            Killed::Cancelled,
                            &mut w.deadline,
                        );
                    }
                }
            }
            if ctx.run.aborting() {
                ctx.cancelled(incoming.len() as u64);
                incoming.clear();
                input_done |= super::cancel_ready(ctx, &rx, |v| v.len() as u64);
            }
            // Replace dead workers whose backoff has passed, while there is work.
            let work_left = !input_done || !queue.is_empty() || self.in_flight() > 0;
            for slot in 0..self.workers.len() {
                if self.workers[slot].is_none() && self.respawn[slot].is_some_and(|t| t <= now) {
                    self.respawn[slot] = None;
                    if work_left && !ctx.run.aborting() {
                        let batched = self.opts.batch_results && !self.strict;
                        match spawn(self.parts, self.opts, self.hooks, slot, batched) {
                            Ok(w) => self.workers[slot] = Some(w),
                            Err(e) => {
                                tracing::warn!(stage = %ctx.name, slot, error = %e, "cannot fork a replacement worker");
                                self.respawn[slot] = Some(now + Duration::from_secs(1));
                            }
                        }
                    }
                }
            }
            // Dispatch: retries that are due first, then new items, round-robin.
            if !ctx.run.aborting() {
                while let Some(slot) = self.next_worker(window) {
                    let flight = if queue
                        .front()
                        .is_some_and(|f| f.not_before.is_none_or(|t| t <= now))
                    {
                        queue.pop_front().expect("front exists")
                    } else {
                        match super::next_handed(&mut incoming, &rx) {
                            Ok((index, Ok(payload))) => Flight {
                                index,
                                attempt: 1,
                                payload,
                                not_before: None,
                            },
                            Ok((index, Err((item, message)))) => {
                                // Encoding is deterministic: no retry (last attempt).
                                let attempt = self.parts.ctx.policy.retries + 1;
                                let (parts, kind) = (self.parts, FailureKind::Encode);
                                let dead = |f| dead_letter(parts, item, f);
                                let (release, router) = (&mut self.release, &mut self.router);
                                super::settle(
                                    parts, release, router, index, attempt, kind, message, None,
                                    dead,
                                );
                                continue;
                            }
                            Err(TryRecvError::Empty) => break,
                            Err(TryRecvError::Disconnected) => {
                                input_done = true;
                                break;
                            }
                        }
                    };
                    let w = self.workers[slot].as_mut().expect("chosen worker exists");
                    w.out.push_item(flight.index, &flight.payload);
                    if w.flights.is_empty() {
                        w.front_since = Some(now);
                        w.deadline = self.opts.timeout.map(|t| now + t);
                    }
                    w.bytes += flight.payload.len();
                    w.flights.push_back(flight);
                    self.rr = slot + 1;
                }
            }
            let nothing_left = input_done && queue.is_empty() && self.in_flight() == 0;
            if nothing_left || ctx.run.aborting() && input_done {
                // Graceful shutdown: each live worker flushes its instance and exits.
                for w in self.workers.iter_mut().flatten() {
                    if !w.shutdown && w.exit.is_none() {
                        w.shutdown = true;
                        w.out.push(Kind::Shutdown, 0, &[]);
                    }
                }
                if self.workers.iter().flatten().all(|w| w.exit.is_some()) {
                    self.release.release_all(&mut self.router);
                    self.send_results();
                    break;
                }
            }
            for w in self.workers.iter_mut().flatten() {
                // After a corrupt batched stream, batched workers get nothing more and are
                // replaced (`bury`) once they have answered what they hold.
                let idle = w.flights.is_empty() && w.exit.is_none() && w.killed.is_none();
                if self.strict && w.log.is_some() && idle && !w.shutdown {
                    w.shutdown = true;
                    w.retired = true;
                    w.out.push(Kind::Shutdown, 0, &[]);
                }
                flush_input(w);
            }
            // Sleep until a worker speaks, exits or can take more bytes, an item arrives, a
            // deadline passes, or the run aborts.
            wake.sleepy();
            if !input_done
                && (!incoming.is_empty() || !rx.is_empty())
                && self.next_worker(window).is_some()
                && !ctx.run.aborting()
            {
                wake.awake();
                continue;
            }
            let mut deadline = self
                .workers
                .iter()
                .flatten()
                .fold(None, |d, w| earliest(d, w.deadline));
            deadline = earliest(deadline, queue.front().and_then(|f| f.not_before));
            for t in self.respawn.iter().flatten() {
                deadline = earliest(deadline, Some(*t));
            }
            // A batched worker with items may be holding results: look again soon.
            for w in self.workers.iter().flatten() {
                if w.log.is_some() && w.exit.is_none() && w.protocol.is_none() {
                    let at = match w.held {
                        Some((_, since)) => Some(since + TAKE_HELD_AFTER),
                        None if w.flights.len() >= 2 => Some(w.looked + LOOK_EVERY),
                        None => None,
                    };
                    deadline = earliest(deadline, at);
                }
            }
            let ready: Vec<(bool, bool)> = {
                let mut fds = poll_set(wake, abort_fd, cancelled_all, 3 * self.workers.len());
                let mut map = Vec::new();
                for w in self.workers.iter().flatten() {
                    let base = fds.len();
                    fds.push(w.stream.poll_fd());
                    fds.push(PollFd::new(
                        &w.child.pidfd,
                        if w.exit.is_none() {
                            PollFlags::IN
                        } else {
                            PollFlags::empty()
                        },
                    ));
                    if let (Some(fd), false) = (&w.input, w.out.is_empty()) {
                        fds.push(PollFd::new(fd, PollFlags::OUT));
                    }
                    map.push(base);
                }
                wait(&mut fds, deadline);
                map.iter()
                    .map(|&b| {
                        (
                            !fds[b].revents().is_empty(),
                            !fds[b + 1].revents().is_empty(),
                        )
                    })
                    .collect()
            };
            wake.awake();
            let now = Instant::now();
            let live: Vec<usize> = (0..self.workers.len())
                .filter(|&s| self.workers[s].is_some())
                .collect();
            for (k, &slot) in live.iter().enumerate() {
                let (readable, exited) = ready[k];
                if readable {
                    self.pump(slot, &mut rec, &mut queue);
                }
                let w = self.workers[slot].as_mut().expect("live worker");
                if exited && w.exit.is_none() {
                    w.exit = Some(sys::reap(w.child.pid));
                    self.recover(slot, &mut rec, &mut queue);
                }
                let w = self.workers[slot].as_mut().expect("live worker");
                if w.exit.is_none() && w.killed.is_none() && w.deadline.is_some_and(|d| d <= now) {
                    // The answer may have come since the poll: read it before judging.
                    self.pump(slot, &mut rec, &mut queue);
                }
                let w = self.workers[slot].as_mut().expect("live worker");
                if w.exit.is_none() && w.deadline.is_some_and(|d| d <= now) {
                    if w.killed.is_none() {
                        // With batched results, earlier items may have finished unreported:
                        // the worker's own word says which one it runs.
                        let running = w.log.as_ref().map(|l| l.running());
                        w.timed_out = match running {
                            Some(r) if r & child::PROGRESS_DONE == 0 => Some(r),
                            _ => w.flights.front().map(|f| f.index),
                        };
                    }
                    let why = w.killed.unwrap_or(Killed::Timeout);
                    terminate(w.child.pid, &mut w.killed, why, &mut w.deadline);
                }
                if w.exit.is_some() {
                    self.bury(slot, &mut queue);
                } else {
                    self.take_held(slot, now, &mut rec, &mut queue);
                }
            }
            self.send_results();
        }
    }

    /// Sends the results held since the last call, then counts their items done (in that
    /// order: inside a routing loop, an item's unit must outlive the sending of its results).
    fn send_results(&mut self) {
        if let Err(lost) = self.router.flush() {
            tracing::debug!(stage = %self.parts.ctx.name, lost, "results refused by a closed downstream");
        }
        if self.done > 0 {
            self.parts.ctx.items_done(std::mem::take(&mut self.done));
        }
    }

    fn in_flight(&self) -> usize {
        self.workers.iter().flatten().map(|w| w.flights.len()).sum()
    }

    /// The next worker that is alive, not shutting down and has room: in turn (round-robin,
    /// the default) or the one holding the fewest items (least-loaded; ties in turn).
    fn next_worker(&self, window: usize) -> Option<usize> {
        let n = self.workers.len();
        let open = (0..n).map(|k| (self.rr + k) % n).filter(|&s| {
            self.workers[s].as_ref().is_some_and(|w| {
                w.exit.is_none()
                    && w.killed.is_none()
                    && !w.shutdown
                    && !(self.strict && w.log.is_some())
                    && w.start_error.is_none()
                    && w.flights.len() < window
                    && w.bytes < MAX_IN_FLIGHT_BYTES
            })
        });
        match self.opts.dispatch {
            Dispatch::RoundRobin => open.into_iter().next(),
            Dispatch::LeastLoaded => {
                open.min_by_key(|&s| self.workers[s].as_ref().map_or(0, |w| w.flights.len()))
            }
        }
    }

    /// Reads what a worker sent: routes results, completes and fails its items in order.
    fn pump(&mut self, slot: usize, rec: &mut Recorder<'_>, queue: &mut VecDeque<Flight>) {
        // One clock read for everything this read brings.
        let now = Instant::now();
        self.pump_at(slot, rec, queue, now);
        rec.idle(quanta::Instant::now());
        let w = self.workers[slot].as_mut().expect("live worker");
        if w.reported > 0 {
            let n = std::mem::take(&mut w.reported);
            self.parts.ctx.stats.child_items(w.child.pid, n);
        }
    }

    fn pump_at(
        &mut self,
        slot: usize,
        rec: &mut Recorder<'_>,
        queue: &mut VecDeque<Flight>,
        now: Instant,
    ) {
        loop {
            let w = self.workers[slot].as_mut().expect("live worker");
            w.stream.read_available();
            let mut progressed = false;
            loop {
                let w = self.workers[slot].as_mut().expect("live worker");
                let frames = Frames::of(self.parts, w);
                let next = w
                    .stream
                    .dec
                    .next(|kind, id, payload| frames.event(kind, id, payload));
                match next {
                    Ok(None) => break,
                    Ok(Some(ev)) => {
                        progressed = true;
                        match ev {
                            Ok(ev) => self.event(slot, ev, rec, queue, now),
                            Err(m) => {
                                self.protocol_error(slot, m);
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        self.protocol_error(slot, e.to_string());
                        return;
                    }
                }
            }
            let w = self.workers[slot].as_ref().expect("live worker");
            if !progressed || w.stream.eof {
                return;
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn event(
        &mut self,
        slot: usize,
        ev: Event<O>,
        rec: &mut Recorder<'_>,
        queue: &mut VecDeque<Flight>,
        now: Instant,
    ) {
        let w = self.workers[slot].as_mut().expect("live worker");
        match ev {
            Event::Log => {}
            Event::Routed(i, t) => {
                w.results += 1;
                let _ = self.parts.router.route_index(i, t);
            }
            Event::Result(o) => {
                w.results += 1;
                let index = w.flights.front().map_or(u64::MAX, |f| f.index);
                self.release.emit(index, o, &mut self.router);
            }
            Event::ResultDone(id, o, latency_ns) => {
                self.event(slot, Event::Result(o), rec, queue, now);
                let d = Done {
                    latency_ns,
                    outputs: 1,
                };
                self.event(slot, Event::Done(id, d), rec, queue, now);
            }
            Event::Done(FINISH_ID, _) | Event::Done(START_ID, _) => w.results = 0,
            Event::Done(_, d) => {
                let results = std::mem::take(&mut w.results);
                let busy = w
                    .front_since
                    .map_or(d.latency_ns, |t| now.duration_since(t).as_nanos() as u64);
                let flight = w.front_ended(now, self.opts.timeout);
                w.reported += 1;
                self.deaths = 0;
                if d.outputs == results {
                    rec.latency_busy_local(d.latency_ns, busy);
                    self.release.finished(flight.index, &mut self.router);
                    self.done += 1;
                    if flight.payload.len() >= LARGE_ITEM {
                        if let Some(buf) = flight.payload.into_buffer(MAX_SPARE) {
                            let _ = self.spares.try_send(buf);
                        }
                    }
                } else {
                    let m = format!(
                        "worker reported {} results, parent received {results}",
                        d.outputs
                    );
                    let pid = Some(w.child.pid as u32);
                    self.failed(flight, FailureKind::Protocol, m, pid, queue);
                }
            }
            Event::Error(START_ID, e) => {
                w.start_error = Some(e.message);
            }
            Event::Error(FINISH_ID, e) => {
                let pid = Some(w.child.pid as u32);
                w.results = 0;
                self.parts
                    .ctx
                    .stage_error(e.kind, format!("finish: {}", e.message), pid);
            }
            Event::Error(_, e) => {
                w.results = 0;
                let flight = w.front_ended(now, self.opts.timeout);
                let pid = Some(w.child.pid as u32);
                self.failed(flight, e.kind, e.message, pid, queue);
            }
        }
    }

    /// A batched worker busy with a long item does not sit on finished results: once its log
    /// has held the same bytes for [`TAKE_HELD_AFTER`], the parent takes them itself (see
    /// `SharedLog`), after every byte the worker wrote to its pipe before them.
    fn take_held(
        &mut self,
        slot: usize,
        now: Instant,
        rec: &mut Recorder<'_>,
        queue: &mut VecDeque<Flight>,
    ) {
        let w = self.workers[slot].as_mut().expect("live worker");
        if w.protocol.is_some() || w.exit.is_some() {
            w.held = None;
            return;
        }
        let Worker {
            log: Some(log),
            stream,
            held,
            looked,
            flights,
            ..
        } = w
        else {
            return;
        };
        if flights.len() < 2 || log.len() == 0 {
            *held = None;
            *looked = now;
            return;
        }
        let base = log.base();
        match *held {
            Some((b, since)) if b == base => {
                if now.saturating_duration_since(since) < TAKE_HELD_AFTER {
                    return;
                }
            }
            _ => {
                *held = Some((base, now));
                return;
            }
        }
        *held = None;
        *looked = now;
        let before = stream.received;
        let taken = log.take(|base| {
            // Everything before `base` is in the pipe already: read it first.
            while stream.received < base && !stream.eof {
                let before = stream.received;
                stream.read_available();
                if stream.received == before {
                    break;
                }
            }
            stream.received == base
        });
        if let Some(bytes) = taken {
            tracing::debug!(stage = %self.parts.ctx.name, slot, bytes = bytes.len(),
                "took finished results from a busy worker's log");
            stream.dec.extend(&bytes);
            stream.received += bytes.len() as u64;
        }
        // What was read from the pipe on the way is decoded too, taken or not (the pipe will
        // not wake the poll for bytes already read).
        if stream.received != before {
            self.pump(slot, rec, queue);
        }
    }

    /// A worker has exited: reads its pipe to the end, then (with `batch_results`) takes the
    /// frames of the items it had finished but not written from its shared log, so that only
    /// the item it was running (then the front of its flights) fails, and nothing runs twice.
    fn recover(&mut self, slot: usize, rec: &mut Recorder<'_>, queue: &mut VecDeque<Flight>) {
        loop {
            let before = self.workers[slot]
                .as_ref()
                .expect("live worker")
                .stream
                .received;
            self.pump(slot, rec, queue);
            let w = self.workers[slot].as_ref().expect("live worker");
            // A grandchild holding the pipe open can keep it from reaching its end.
            if w.stream.eof || w.stream.received == before {
                break;
            }
        }
        let w = self.workers[slot].as_mut().expect("live worker");
        let Some(log) = &w.log else { return };
        let bytes = log.bytes();
        if bytes.is_empty() {
            return;
        }
        // An intact stream continues in the log exactly where the pipe left off: the bytes
        // of a frame the parent has in part are the log's bytes just before that point.
        let pending = w.stream.dec.pending() as u64;
        let at = w.stream.received.checked_sub(log.base());
        let intact = w.protocol.is_none()
            && at.is_some_and(|at| {
                at <= bytes.len() as u64
                    && at >= pending
                    && w.stream.dec.pending_bytes() == &bytes[(at - pending) as usize..at as usize]
            });
        tracing::debug!(stage = %self.parts.ctx.name, slot, bytes = bytes.len(), intact,
            "replaying the results a dead worker left in its log");
        if intact {
            let unsent = bytes[at.unwrap_or(0) as usize..].to_vec();
            w.stream.dec.extend(&unsent);
            return self.pump(slot, rec, queue);
        }
        // Foreign bytes in the stream: take the logged frames of the items still in flight,
        // in order. (Results of the front item that already arrived came from a write of
        // its own while it ran, never through the log: the log holds only its later ones.)
        let now = Instant::now();
        let mut dec = frame::Decoder::new(self.opts.max_frame);
        dec.extend(bytes);
        loop {
            let w = self.workers[slot].as_mut().expect("live worker");
            let frames = Frames::of(self.parts, w);
            let next = dec.next(|kind, id, payload| {
                let front = frames.front;
                if kind != Kind::Log && (Some(id) != front || id == START_ID || id == FINISH_ID) {
                    return None; // an item whose frames arrived before
                }
                Some(frames.event(kind, id, payload))
            });
            match next {
                Ok(Some(None)) => continue,
                Ok(Some(Some(Ok(ev)))) => self.event(slot, ev, rec, queue, now),
                _ => break,
            }
        }
        let w = self.workers[slot].as_mut().expect("live worker");
        if w.reported > 0 {
            let n = std::mem::take(&mut w.reported);
            self.parts.ctx.stats.child_items(w.child.pid, n);
        }
    }

    fn protocol_error(&mut self, slot: usize, m: String) {
        let w = self.workers[slot].as_mut().expect("live worker");
        if w.protocol.is_none() {
            w.protocol = Some(m);
            w.stream.discard();
            w.killed.get_or_insert(Killed::Protocol);
            sys::kill(w.child.pid, libc::SIGKILL);
        }
    }

    /// A worker has exited and its stream is drained: fail what it was running, requeue the
    /// rest, and schedule a replacement.
    fn bury(&mut self, slot: usize, queue: &mut VecDeque<Flight>) {
        let mut w = self.workers[slot].take().expect("live worker");
        self.parts.ctx.stats.child_ended(w.child.pid);
        let exit = w.exit.expect("buried workers have exited");
        let pid = Some(w.child.pid as u32);
        let clean = w.shutdown && w.flights.is_empty() && exit == sys::Exit::Code(0);
        // A corrupt stream with batched results: the parent cannot tell which of the items
        // the worker ran since its last readable write did it, and what it wrote after the
        // corruption is lost. Those items run again, on workers that now write each item's
        // results before the next (so a repeat fails exactly the item that does it; batched
        // workers get no more items and are replaced); no result of theirs arrived, so
        // nothing is delivered twice. An item some of whose
        // results did arrive is not run again: it fails with the protocol error. The
        // corruption is a stage error.
        let mut rerun: Vec<Flight> = Vec::new();
        let mut corrupt = false;
        if let (Some(m), Some(_)) = (&w.protocol, &w.log) {
            if !self.strict {
                tracing::warn!(stage = %self.parts.ctx.name, slot, "a worker's result stream was corrupt; its items run again, one write per item from now on");
            }
            self.strict = true;
            self.parts
                .ctx
                .stage_error(FailureKind::Protocol, m.clone(), pid);
            corrupt = true;
            let keep_front = usize::from(w.results > 0).min(w.flights.len());
            rerun.extend(w.flights.drain(keep_front..));
            if keep_front == 0 {
                w.protocol = None;
            }
        }
        if let Some(m) = w.start_error.take() {
            self.deaths += 1;
            if self.deaths as usize > 3 * self.workers.len() {
                self.parts.ctx.stage_failed(
                    FailureKind::Start,
                    format!("workers keep failing to start: {m}"),
                );
            } else {
                tracing::warn!(stage = %self.parts.ctx.name, slot, message = %m, "worker failed to start");
            }
        } else if let Some(front) = w.flights.pop_front() {
            let (kind, message) = match (w.killed, w.protocol.take()) {
                (Some(Killed::Cancelled), _) => (
                    FailureKind::Cancelled,
                    "run interrupted; worker terminated".to_string(),
                ),
                (_, Some(m)) => (FailureKind::Protocol, m),
                // Only the item that overran is a timeout; one that started after it (the
                // worker answered before the signal landed) fails by how the worker ended.
                (Some(Killed::Timeout), _) if w.timed_out == Some(front.index) => (
                    FailureKind::Timeout,
                    format!(
                        "no result within {:?}; worker killed",
                        self.opts.timeout.unwrap_or_default()
                    ),
                ),
                _ => exit_failure(exit, w.stream.dec.pending() > 0),
            };
            self.deaths += 1;
            self.failed(front, kind, message, pid, queue);
        } else if !clean && !corrupt && !self.parts.ctx.run.aborting() {
            self.deaths += 1;
            let (_, m) = exit_failure(exit, false);
            tracing::warn!(stage = %self.parts.ctx.name, slot, message = %m, "idle worker died");
        }
        // Items queued behind the failed one were never started: back to the front (after
        // the ones to run again), their attempt not counted.
        let cancelled = self.parts.ctx.run.aborting();
        if !rerun.is_empty() && !cancelled {
            tracing::debug!(stage = %self.parts.ctx.name, slot, items = rerun.len(),
                "results lost in a corrupt stream; those items run again");
        }
        for f in w.flights.drain(..).rev().chain(rerun.into_iter().rev()) {
            if cancelled {
                self.parts.ctx.cancelled(1);
            } else {
                queue.push_front(Flight {
                    payload: f.payload.detach(),
                    ..f
                });
            }
        }
        if clean && w.retired && !cancelled {
            self.respawn[slot] = Some(Instant::now());
        } else if !clean && !cancelled {
            let backoff = match self.deaths {
                0..=1 => Duration::ZERO,
                d => Duration::from_millis(10u64 << (d.min(7) - 1)),
            };
            self.respawn[slot] = Some(Instant::now() + backoff);
        }
        drop(w);
    }

    fn failed(
        &mut self,
        f: Flight,
        kind: FailureKind,
        message: String,
        pid: Option<u32>,
        queue: &mut VecDeque<Flight>,
    ) {
        let parts = self.parts;
        let decode_in = parts.wire.expect("fork stages have a codec").decode_in;
        let dead = |failure| match decode_in(&f.payload) {
            Ok(item) => dead_letter(parts, item, failure),
            Err(e) => {
                let stage = &parts.ctx.name;
                tracing::error!(%stage, item = f.index, error = %e, "cannot decode a dead letter");
            }
        };
        let (index, attempt) = (f.index, f.attempt);
        let again = super::settle(
            parts,
            &mut self.release,
            &mut self.router,
            index,
            attempt,
            kind,
            message,
            pid,
            dead,
        );
        if let Some(not_before) = again {
            let attempt = attempt + 1;
            queue.push_back(Flight {
                attempt,
                not_before: Some(not_before),
                payload: f.payload.detach(),
                ..f
            });
        }
    }
}

/// Writes as much of a worker's pending input as its pipe takes now; closes the input after
/// the shutdown frame is out.
fn flush_input(w: &mut Worker) {
    let Some(fd) = &w.input else { return };
    if w.out.write_to(fd).is_err() {
        // The worker is gone (EPIPE); its pidfd tells the rest.
        w.input = None;
    }
    if w.shutdown && w.out.is_empty() {
        w.input = None;
    }
}

/// What decoding a worker's frames needs: the stage's codec and routes, and which item the
/// worker runs (`front`).
struct Frames<'a, I, O> {
    wire: crate::ipc::protocol::WireFns<I, O>,
    routes: &'a crate::route::Routes,
    stage: &'a str,
    pid: i32,
    front: Option<u64>,
}

impl<'a, I, O> Frames<'a, I, O> {
    fn of(parts: &'a Parts<I, O>, w: &Worker) -> Self {
        Frames {
            wire: parts.wire.expect("fork stages have a codec"),
            routes: &parts.router.routes,
            stage: &parts.ctx.name,
            pid: w.child.pid,
            front: w.flights.front().map(|f| f.index),
        }
    }

    /// Decodes a frame into what it means.
    fn event(&self, kind: Kind, id: u64, payload: &[u8]) -> Result<Event<O>, String> {
        let Frames {
            wire,
            routes,
            stage,
            pid,
            front,
        } = *self;
        if kind == Kind::Log {
            return super::log::forward(stage, pid, payload).map(|()| Event::Log);
        }
        if id != FINISH_ID && id != START_ID && Some(id) != front {
            return Err(format!(
                "frame for item {id} while the worker runs item {front:?}"
            ));
        }
        match kind {
            Kind::Routed => super::decode_routed(routes, payload).map(|(i, t)| Event::Routed(i, t)),
            Kind::Result => (wire.decode_out)(payload)
                .map(Event::Result)
                .map_err(|e| format!("cannot decode a result: {e}")),
            Kind::ResultDone => {
                let (body, latency) = payload
                    .split_last_chunk::<8>()
                    .ok_or("result_done frame without a latency")?;
                let latency_ns = u64::from_le_bytes(*latency);
                (wire.decode_out)(body)
                    .map(|o| Event::ResultDone(id, o, latency_ns))
                    .map_err(|e| format!("cannot decode a result: {e}"))
            }
            Kind::Done => protocol::decode::<Done>(payload)
                .map(|d| Event::Done(id, d))
                .map_err(|e| format!("bad done frame: {e}")),
            Kind::Error => protocol::decode::<ChildError>(payload)
                .map(|e| Event::Error(id, e))
                .map_err(|e| format!("bad error frame: {e}")),
            other => Err(format!("unexpected {other:?} frame from a worker")),
        }
    }
}

enum Event<O> {
    Log,
    Result(O),
    /// An item's only result and its latency (`Result` then `Done`).
    ResultDone(u64, O, u64),
    Routed(usize, crate::erased::Erased),
    Done(u64, Done),
    Error(u64, ChildError),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hands `items` off; the length of each payload and the capacity of its buffer.
    fn hand(enc: &mut FeedEncoder<Vec<u8>>, items: Vec<Vec<u8>>) -> Vec<(usize, usize)> {
        let mut items: VecDeque<Vec<u8>> = items.into();
        let mut sizes = Vec::new();
        let mut take = |batch: Vec<Encoded<Vec<u8>>>| {
            for (_, p) in batch {
                let p = p.map_err(|(_, m)| m).expect("encodes");
                sizes.push((p.len(), p.capacity()));
            }
            Ok(())
        };
        enc.hand_off(&mut items.drain(..), &mut take)
            .expect("handed off");
        sizes
    }

    /// The largest room a buffer had when an item was encoded into it (since the last reset).
    static ROOM: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    /// postcard, recording the room it is given.
    fn encode_recording_room(v: &Vec<u8>, out: &mut Vec<u8>) -> Result<(), String> {
        ROOM.fetch_max(out.capacity(), std::sync::atomic::Ordering::Relaxed);
        protocol::encode(v, out)
    }

    #[test]
    fn a_huge_item_or_a_large_spare_does_not_size_the_buffers_of_the_items_after_it() {
        let (spare_tx, spares) = crossbeam_channel::bounded(SPARES);
        let mut enc = FeedEncoder {
            encode: encode_recording_room,
            max: usize::MAX,
            index: 0,
            per_item: 0,
            scratch: Vec::new(),
            spares,
        };
        hand(&mut enc, vec![vec![1; 20 << 10]; 4]);
        hand(&mut enc, vec![vec![2; 8 << 20]]);
        spare_tx.send(Vec::with_capacity(MAX_SPARE)).unwrap();
        ROOM.store(0, std::sync::atomic::Ordering::Relaxed);
        let after = hand(&mut enc, vec![vec![3; 20 << 10]; 40]);
        let room = ROOM.load(std::sync::atomic::Ordering::Relaxed);
        assert!(room <= MAX_SPARE, "an item was given {room} bytes of room");
        assert_eq!(after.len(), 40);
        for (len, cap) in after {
            assert!(!oversized(len, cap), "{cap} bytes of buffer for {len}");
        }
    }
}
