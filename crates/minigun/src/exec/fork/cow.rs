//! cow_fork: one forked child per item (or per `items_per_fork` items), at most `workers`
//! alive.
//!
//! The items reach the child through copy-on-write memory: the supervisor holds them in a
//! slot, forks, and the child's copy of the slot is moved into the stage. The parent keeps its
//! own copy for retries and dead-lettering, so the input type needs no serde and no `Clone`
//! call happens per attempt.
//!
//! A child given several items runs them in order and sends each item's frames before the
//! next starts, so when it dies the parent knows which item it was running: that one fails,
//! the ones after it go back to the queue (their attempt is not counted). If the parent was
//! ending the child for an earlier item's time limit and that item answered before the child
//! died, the item running at its death did not overrun: it goes back to the queue too (unless
//! it had sent outputs).
//!
//! A job's outputs are held in the parent until its `done` (`Partial`): a job that fails, or
//! whose child dies, delivers none of them, so a retry never delivers an output twice.
//!
//! With a fork server (`served`, [`Exec::fork_server`](crate::Exec::fork_server)) the
//! supervisor does not fork: it sends the items to the server, which forks the child and
//! reports it; from then on the child is read, timed, killed and decided exactly like one
//! forked here, except that its exit status comes from the server's report.

mod served;

use super::child;
use super::per_fork::PerFork;
use super::server::ForkServer;
use super::supervise::{
    child_frames, cow_pipe, earliest, exit_failure, feed, item_ended, killed_for_another, settle,
    supervised, terminate, Handoff, Killed, PollSet, Wake,
};
use crate::error::FailureKind;
use crate::exec::order::{Partial, Release};
use crate::exec::parts::{dead_letter, Parts};
use crate::exec::runner::ForkHooks;
use crate::exec::ForkOptions;
use crate::hooks;
use crate::huge::HugePages;
use crate::ipc::message::{ChildError, Done, FromChild, Sender};
use crate::ipc::reader::Stream;
use crate::route::Router;
use crate::stage::{Item, Wire};
use crate::stats::Recorder;
use crate::sys;
use crossbeam_channel::TryRecvError;
use rustix::event::{PollFd, PollFlags};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::time::Instant;

struct Pending<I> {
    item: I,
    index: u64,
    attempt: u32,
    not_before: Option<Instant>,
}

/// How one item of a child ended, as its frames said: done (with the time the child was busy
/// with it, seen from the parent) or failed.
type Ended = Result<(Done, u64), ChildError>;

struct Running<I, O> {
    jobs: Vec<Pending<I>>,
    /// The end of each job, in order; `cur` is the first job without one (the one running).
    ends: Vec<Option<Ended>>,
    cur: usize,
    /// When the current job started (its deadline and busy time count from here).
    since: Instant,
    /// When the fork was called.
    forked: Instant,
    child: sys::Child,
    stream: Stream,
    exit: Option<sys::Exit>,
    deadline: Option<Instant>,
    killed: Option<Killed>,
    results: u64,
    /// The running job's outputs, held until its `done` (a failed attempt delivers none).
    held: Partial<O>,
    /// The job whose time limit ran out, if the child is being killed for it.
    timed_out: Option<usize>,
    /// The fork server's sequence number of the child (`None`: forked here).
    seq: Option<u64>,
    /// The child was lost with the fork server: why (its status is then unknown).
    lost: Option<String>,
}

/// A child's pipe is watched (read while the child runs) once it has lived this long; before,
/// what it wrote is read when its exit is known (it waits in the pipe, which the child grows
/// to 1 MiB once it has 64 KiB to write at once). A child that ends sooner wakes the parent
/// once (its exit) instead of twice (its frames, then its exit): W1 cow_fork(2) with
/// fork_server spent about 10 us of the parent's time per item in the second wake-up.
/// A deadline that passes before then (a `timeout` under 1 ms) reads the pipe before it is
/// judged ([`Supervisor::visit`]).
const WATCH_AFTER: std::time::Duration = std::time::Duration::from_millis(1);

/// Items the feeder hands the supervisor at once. One per fork made the feeder wake for
/// every fork; W1 cow_fork(2) went from about 3,160 to 3,700 items/s with chunks of 8 to 128.
const FEED_CHUNK: usize = 32;

pub(super) fn run<I: Item, O: Wire>(
    parts: Parts<I, O>,
    opts: ForkOptions,
    hooks: ForkHooks,
    server: Option<ForkServer>,
) {
    // Items are handed over in chunks: the feeder wakes once per chunk, not once per fork
    // (a thread of the parent running while it forks costs every copy-on-write fault of the
    // fork a cross-CPU TLB flush). At most `FEED_CHUNK` (or `workers`) items wait in a chunk.
    let chunk = FEED_CHUNK.max(opts.workers);
    let (tx, rx) = crossbeam_channel::bounded::<Vec<I>>(1);
    supervised(&parts, |wake| {
        std::thread::scope(|s| {
            let feeder = std::thread::Builder::new()
                .name(format!("{}:feed", parts.ctx.name))
                .spawn_scoped(s, || {
                    let send = move |items: Vec<I>| tx.send(items).map_err(|e| e.0.len() as u64);
                    let make =
                        |items: std::collections::vec_deque::Drain<'_, I>,
                         hand: &mut dyn FnMut(Vec<I>) -> Result<(), u64>| {
                            hand(items.collect())
                        };
                    feed(&parts.ctx, &parts.input, wake, chunk, make, send)
                })
                .expect("spawn feeder thread");
            // The supervisor owns the hand-off receiver: if it ever unwinds, the feeder's
            // sends fail instead of blocking forever.
            Supervisor {
                parts: &parts,
                opts: &opts,
                hooks: &hooks,
                // With a server, the `before_fork` hooks ran before it was made.
                forked_once: server.is_some(),
                server,
                launching: VecDeque::new(),
                per_fork: PerFork::new(opts.items_per_fork, opts.items_per_fork_auto),
                out_buf: crate::ipc::writer::buffer(),
                release: RefCell::new(Release::new(opts.ordered)),
                router: RefCell::new(parts.router.clone()),
            }
            .run(Handoff::new(rx), wake);
            crate::run::join(feeder);
        })
    });
}

struct Supervisor<'a, I, O> {
    parts: &'a Parts<I, O>,
    opts: &'a ForkOptions,
    hooks: &'a ForkHooks,
    forked_once: bool,
    /// The fork server, if the stage has one, and the children asked of it and not yet
    /// reported, in order.
    server: Option<ForkServer>,
    launching: VecDeque<served::Launch<I>>,
    per_fork: PerFork,
    /// The children's result buffer, made once here: each child writes into its own
    /// copy-on-write copy of it instead of allocating one.
    out_buf: Vec<u8>,
    release: RefCell<Release<O>>,
    /// Where results go (sent as they arrive).
    router: RefCell<Router<O>>,
}

impl<I: Item, O: Wire> Supervisor<'_, I, O> {
    /// Item `index` has reached its final outcome (see [`item_ended`]).
    fn ended(&self, index: u64, cancelled: bool) {
        let (release, router) = (
            &mut self.release.borrow_mut(),
            &mut self.router.borrow_mut(),
        );
        item_ended(&self.parts.ctx, release, router, index, cancelled);
    }

    fn run(&mut self, mut incoming: Handoff<I>, wake: &Wake) {
        let ctx = &self.parts.ctx;
        let abort_fd = ctx.run.abort_fd();
        let mut rec = Recorder::new(&ctx.stats);
        let mut running: Vec<Running<I, O>> = Vec::new();
        let mut retry: VecDeque<Pending<I>> = VecDeque::new();
        let mut next_index = 0u64;
        let mut input_done = false;
        let mut cancelled_all = false;
        loop {
            if ctx.run.aborting() && !cancelled_all {
                cancelled_all = true;
                ctx.cancelled(retry.len() as u64);
                retry.clear();
                // Before the children's ends: none waiting in a server is forked after them.
                self.cancel_launches();
                for r in running.iter_mut().filter(|r| r.killed.is_none()) {
                    terminate(&r.child, &mut r.killed, Killed::Cancelled, &mut r.deadline);
                }
            }
            // Fork while there is room: due retries first, then new items, up to
            // `items_per_fork` per child (never waiting for more than are ready).
            while self.room(&running) && !ctx.run.aborting() {
                let (batch, ended) = self.next_batch(&mut retry, &mut incoming, &mut next_index);
                input_done |= ended;
                if batch.is_empty() {
                    break;
                }
                if let Some(r) = self.fork(batch, running.len(), &mut retry) {
                    running.push(r);
                }
            }
            if ctx.run.aborting() {
                input_done |= incoming.cancel(ctx, |_| 1);
            }
            if input_done && running.is_empty() && retry.is_empty() && self.launching.is_empty() {
                // The server (if any) is ended and reaped before the stage's end is known.
                self.server = None;
                self.release
                    .borrow_mut()
                    .release_all(&mut self.router.borrow_mut());
                break;
            }
            // Sleep until a child speaks or exits, an item arrives, or a deadline passes.
            wake.sleepy();
            if self.room(&running) && incoming.waiting() {
                // Not polled: a byte the feeder wrote waits for the next poll.
                wake.awake_polled(false);
                continue;
            }
            let now = Instant::now();
            let watched = |r: &Running<I, O>| r.exit.is_some() || now >= r.forked + WATCH_AFTER;
            let mut deadline = running.iter().fold(None, |d, r| {
                let watch = (!watched(r)).then(|| r.forked + WATCH_AFTER);
                earliest(earliest(d, r.deadline), watch)
            });
            if self.room(&running) {
                deadline = earliest(deadline, retry.front().and_then(|p| p.not_before));
            }
            let (readable, exited, reports, woken) = {
                let mut fds = PollSet::new(wake, abort_fd, cancelled_all, 2 * running.len() + 3);
                let mut at = Vec::with_capacity(running.len());
                // A served child's exit is the server's to report (its pidfd is readable
                // before the server has reaped it), unless the server is gone.
                let gone = self.server.as_ref().is_none_or(|s| s.gone().is_some());
                for r in &running {
                    // A pipe at its end is always "ready" (POLLHUP): not watched any more.
                    let watch = !r.stream.eof && watched(r);
                    let stream = watch.then(|| fds.push(r.stream.poll_fd()));
                    let pidfd = PollFd::new(&r.child.pidfd, PollFlags::IN);
                    at.push((stream, (r.seq.is_none() || gone).then(|| fds.push(pidfd))));
                }
                let server = self.server.as_ref().map(|s| s.poll_fds(&mut fds));
                fds.wait(deadline);
                let server = server.map(|at| at.ready(|i| fds.ready(i)));
                let (readable, exited) = at
                    .iter()
                    .map(|&(i, p)| {
                        (
                            i.is_some_and(|i| fds.ready(i)),
                            p.is_some_and(|p| fds.ready(p)),
                        )
                    })
                    .unzip::<_, _, Vec<_>, Vec<_>>();
                (readable, exited, server, fds.woken())
            };
            wake.awake_polled(woken);
            let reports = match (self.server.as_mut(), reports) {
                (Some(s), Some(ready)) => s.events(ready),
                _ => Vec::new(),
            };
            // Children the server reported are visited with the others.
            let born = self.reports(reports, &mut running, &mut retry);
            running.extend(born);
            let (mut readable, mut exited) = (readable, exited);
            readable.resize(running.len(), false);
            exited.resize(running.len(), false);
            // Read, reap, decide. Children are visited from the last so removal keeps indices.
            let now = Instant::now();
            for i in (0..running.len()).rev() {
                if self.visit(&mut running[i], readable[i], exited[i], now) {
                    let r = running.swap_remove(i);
                    self.finish(r, &mut rec, &mut retry);
                }
            }
        }
    }

    /// The items for the next child: due retries first, then new items, up to
    /// `items_per_fork` (never waiting for more than are ready), numbered from `next_index`.
    /// Also whether the input has ended.
    fn next_batch(
        &self,
        retry: &mut VecDeque<Pending<I>>,
        incoming: &mut Handoff<I>,
        next_index: &mut u64,
    ) -> (Vec<Pending<I>>, bool) {
        let now = Instant::now();
        let mut batch = Vec::new();
        let size = self.per_fork.size();
        while batch.len() < size {
            if retry
                .front()
                .is_some_and(|p| p.not_before.is_none_or(|t| t <= now))
            {
                batch.extend(retry.pop_front());
                continue;
            }
            match incoming.next() {
                Ok(item) => {
                    *next_index += 1;
                    let index = *next_index - 1;
                    batch.push(Pending {
                        item,
                        index,
                        attempt: 1,
                        not_before: None,
                    });
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return (batch, true),
            }
        }
        (batch, false)
    }

    /// One child after a poll: reads what it sent, reaps it if it exited (then reads the
    /// rest), and ends it if its deadline passed. Returns whether it has exited.
    fn visit(&self, r: &mut Running<I, O>, readable: bool, exited: bool, now: Instant) -> bool {
        if readable {
            self.pump(r);
        }
        if exited && r.exit.is_none() {
            r.exit = Some(self.reap(r));
            // Everything the child wrote before exiting is in the pipe now.
            self.pump(r);
        }
        let overdue = |r: &Running<I, O>| r.exit.is_none() && r.deadline.is_some_and(|d| d <= now);
        if overdue(r) && !readable && !r.stream.eof {
            // The answer may have come since the poll, or before the pipe is watched
            // (`WATCH_AFTER`): read it before judging.
            self.pump(r);
        }
        if overdue(r) {
            if r.killed.is_none() {
                r.timed_out = Some(r.cur);
            }
            let why = r.killed.unwrap_or(Killed::Timeout);
            terminate(&r.child, &mut r.killed, why, &mut r.deadline);
        }
        r.exit.is_some()
    }

    /// Forks a child for `jobs`; on fork failure the items fail (and may be retried).
    /// `running`: how many children run now.
    fn fork(
        &mut self,
        jobs: Vec<Pending<I>>,
        running: usize,
        retry: &mut VecDeque<Pending<I>>,
    ) -> Option<Running<I, O>> {
        let ctx = &self.parts.ctx;
        if self.server.is_some() {
            self.launch(jobs, running, retry);
            return None;
        }
        if !self.forked_once {
            self.forked_once = true;
            if let Err(m) = hooks::run_fork(&self.hooks.before_fork, "before_fork") {
                ctx.stage_failed(FailureKind::Start, m);
                for job in jobs {
                    self.ended(job.index, true);
                }
                return None;
            }
            let setting = self.opts.huge_pages;
            crate::huge::before_fork(&ctx.run, &ctx.name, setting, HugePages::COW_DEFAULT);
        }
        let (stream, w) = match cow_pipe() {
            Ok((r, w)) => (Stream::new(r, self.opts.max_frame), w),
            Err(e) => {
                let m = format!("cannot create a pipe: {e}");
                self.fail_all(jobs, FailureKind::Start, &m, retry);
                return None;
            }
        };
        let (items, metas): (Vec<I>, Vec<(u64, u32)>) = jobs
            .into_iter()
            .map(|j| (j.item, (j.index, j.attempt)))
            .unzip();
        let ids: Vec<u64> = metas.iter().map(|m| m.0).collect();
        let mut slot = Some(items);
        let slot_ref = &mut slot;
        let code = child::StageCode::new(self.parts, &self.hooks.after_fork, self.opts.max_frame);
        let keep = [sys::raw(&w)];
        let name = format!("mg:{}", ctx.name);
        let forked_at = Instant::now();
        let buf = &mut self.out_buf;
        let forked = sys::fork_child(&keep, &name, move || {
            let items = slot_ref.take().expect("the child's copy of the items");
            child::cow_child::<I, O>(items, &ids, &code, w, std::mem::take(buf))
        });
        let items = slot.expect("the parent keeps its copy");
        let jobs: Vec<Pending<I>> = items
            .into_iter()
            .zip(metas)
            .map(|(item, (index, attempt))| Pending {
                item,
                index,
                attempt,
                not_before: None,
            })
            .collect();
        match forked {
            Ok(child) => Some(self.started(jobs, forked_at, child, stream, None)),
            Err(e) => {
                self.fail_all(
                    jobs,
                    FailureKind::Start,
                    &format!("fork failed: {e}"),
                    retry,
                );
                None
            }
        }
    }

    /// A child has started with `jobs` (forked at `forked_at`, here or by the server).
    fn started(
        &self,
        jobs: Vec<Pending<I>>,
        forked_at: Instant,
        child: sys::Child,
        stream: Stream,
        seq: Option<u64>,
    ) -> Running<I, O> {
        self.parts.ctx.stats.child_started(child.pid);
        let now = Instant::now();
        Running {
            ends: jobs.iter().map(|_| None).collect(),
            jobs,
            cur: 0,
            since: now,
            forked: forked_at,
            child,
            stream,
            exit: None,
            deadline: self.opts.timeout.map(|t| now + t),
            killed: None,
            results: 0,
            held: Partial::default(),
            timed_out: None,
            seq,
            lost: None,
        }
    }

    /// Every job of a child that could not start fails with `kind` (and may be retried).
    fn fail_all(
        &self,
        jobs: Vec<Pending<I>>,
        kind: FailureKind,
        message: &str,
        retry: &mut VecDeque<Pending<I>>,
    ) {
        for job in jobs {
            self.failed(job, kind.clone(), message.to_string(), None, retry);
        }
    }

    /// Reads what the child sent: a job's results are held until its `done`, then routed.
    fn pump(&self, r: &mut Running<I, O>) {
        r.stream.read_available();
        loop {
            let index = r.jobs.get(r.cur).map_or(u64::MAX, |j| j.index);
            let from = Sender::CowChild { running: index };
            let frames = child_frames(self.parts);
            let next = r
                .stream
                .dec
                .next(|kind, id, payload| frames.decode(from, kind, id, payload));
            match next {
                Ok(None) => break,
                Ok(Some(Ok(FromChild::Result(o)))) => {
                    r.results += 1;
                    r.held.outs.push(o);
                }
                Ok(Some(Ok(FromChild::Done(d)))) if d.outputs != r.results => {
                    let m = format!(
                        "child reported {} results, parent received {}",
                        d.outputs, r.results
                    );
                    self.protocol_error(r, m);
                    break;
                }
                Ok(Some(Ok(FromChild::Done(d)))) => {
                    r.held.deliver(
                        index,
                        None,
                        &mut self.release.borrow_mut(),
                        &mut self.router.borrow_mut(),
                        &self.parts.router,
                    );
                    let busy = r.since.elapsed().as_nanos() as u64;
                    self.parts.ctx.stats.child_item(r.child.pid);
                    self.next_job(r, Ok((d, busy)));
                }
                Ok(Some(Ok(FromChild::Routed(i, t)))) => {
                    r.results += 1;
                    r.held.routed.push((i, t));
                }
                Ok(Some(Ok(FromChild::Log(rec)))) => {
                    super::trace::emit(&self.parts.ctx.name, r.child.pid, &rec)
                }
                Ok(Some(Ok(FromChild::ResultDone(..) | FromChild::Results { .. }))) => {
                    unreachable!("decoding refuses result_done and results frames from a cow child")
                }
                Ok(Some(Ok(FromChild::Error(e)))) => {
                    r.held.clear();
                    self.next_job(r, Err(e))
                }
                Ok(Some(Err(e))) => {
                    self.protocol_error(r, e.to_string());
                    break;
                }
                Err(e) => {
                    self.protocol_error(r, e.to_string());
                    break;
                }
            }
        }
    }

    /// The current job ended (its `done` or `error` frame arrived): the next one starts now.
    fn next_job(&self, r: &mut Running<I, O>, end: Ended) {
        if let Some(slot) = r.ends.get_mut(r.cur) {
            *slot = Some(end);
        }
        r.cur += 1;
        r.results = 0;
        r.since = Instant::now();
        if r.killed.is_none() {
            r.deadline = self.opts.timeout.map(|t| r.since + t);
        }
    }

    fn protocol_error(&self, r: &mut Running<I, O>, m: String) {
        if r.stream.discard(m) {
            sys::fdpass::signal(&r.child, libc::SIGKILL);
            r.killed.get_or_insert(Killed::Protocol);
        }
    }

    /// The child has exited and its stream is drained: decide each of its items' outcome.
    fn finish(
        &mut self,
        r: Running<I, O>,
        rec: &mut Recorder<'_>,
        retry: &mut VecDeque<Pending<I>>,
    ) {
        let busy: Vec<u64> = r
            .ends
            .iter()
            .filter_map(|e| e.as_ref()?.as_ref().ok().map(|(_, busy)| *busy))
            .collect();
        self.per_fork.measured(r.forked.elapsed(), &busy);
        let pid = Some(r.child.pid as u32);
        self.parts.ctx.stats.child_ended(r.child.pid);
        let exit = r.exit.expect("finished children have exited");
        let (cur, partial) = (r.cur, r.stream.dec.pending() > 0);
        // Killed (by the parent's signal) for the time limit of an item that answered after
        // all: the item running then is not the one that overran (run again if it sent
        // nothing yet; with outputs sent, it fails as a crash would).
        let sent = r.results > 0 || r.lost.is_some() || r.stream.corrupt.is_some();
        // Positions in the child's list: the one that overran came before `cur`.
        let timed_out = r.timed_out.map(|t| t as u64);
        let blameless = killed_for_another(r.killed, timed_out, cur as u64, sent, exit);
        // How the item the child was running ended, if it never said.
        let died = || match (r.killed, &r.stream.corrupt) {
            _ if r.lost.is_some() => (
                FailureKind::Signal(libc::SIGKILL),
                r.lost.clone().unwrap_or_default(),
            ),
            (Some(Killed::Cancelled), _) => (
                FailureKind::Cancelled,
                "run interrupted; child terminated".to_string(),
            ),
            (_, Some(m)) => (FailureKind::Protocol, m.clone()),
            (Some(Killed::Timeout), _) if r.timed_out == Some(cur) => (
                FailureKind::Timeout,
                format!(
                    "no result within {:?}; child killed",
                    self.opts.timeout.unwrap_or_default()
                ),
            ),
            _ => exit_failure(exit, partial),
        };
        let mut requeue = Vec::new();
        for (k, (job, end)) in r.jobs.into_iter().zip(r.ends).enumerate() {
            match end {
                Some(Ok((d, busy))) => {
                    rec.latency_busy(d.latency_ns, busy);
                    self.ended(job.index, false);
                }
                Some(Err(e)) => self.failed(job, e.kind, e.message, pid, retry),
                None if k == cur && !blameless => {
                    let (kind, message) = died();
                    self.failed(job, kind, message, pid, retry);
                }
                // Never started (or blameless): back to the queue, or cancelled when the run
                // is aborting.
                None if self.parts.ctx.run.aborting() => {
                    self.failed(job, FailureKind::Cancelled, String::new(), pid, retry)
                }
                None => requeue.push(job),
            }
        }
        for job in requeue.into_iter().rev() {
            retry.push_front(job);
        }
    }

    fn failed(
        &self,
        job: Pending<I>,
        kind: FailureKind,
        message: String,
        pid: Option<u32>,
        retry: &mut VecDeque<Pending<I>>,
    ) {
        let Pending {
            item,
            index,
            attempt,
            ..
        } = job;
        let mut item = Some(item);
        let dead = |f| {
            if let Some(item) = item.take() {
                dead_letter(self.parts, item, f);
            }
        };
        let mut release = self.release.borrow_mut();
        let again = settle(
            self.parts,
            &mut release,
            &mut self.router.borrow_mut(),
            index,
            attempt,
            kind,
            message,
            pid,
            dead,
        );
        if let (Some(not_before), Some(item)) = (again, item) {
            let attempt = attempt + 1;
            retry.push_back(Pending {
                item,
                index,
                attempt,
                not_before: Some(not_before),
            });
        }
    }
}
