//! cow_fork: one forked child per item, at most `workers` alive.
//!
//! The item reaches the child through copy-on-write memory: the supervisor holds it in a
//! slot, forks, and the child's copy of the slot is moved into the stage. The parent keeps its
//! own copy of the item for retries and dead-lettering, so the input type needs no serde and
//! no `Clone` call happens per attempt.

use super::{
    child, earliest, exit_failure, feed, terminate, wait, Killed, Release, Stream, Wake, PIPE_SIZE,
};
use crate::error::FailureKind;
use crate::exec::local::{dead_letter, drain, Parts};
use crate::exec::ForkOptions;
use crate::hooks;
use crate::ipc::frame::Kind;
use crate::ipc::protocol::{self, ChildError, Done};
use crate::node::ForkHooks;
use crate::policy::Verdict;
use crate::stage::{Item, Wire};
use crate::stats::Recorder;
use crate::sys;
use crossbeam_channel::{Receiver, TryRecvError};
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

struct Running<I> {
    job: Pending<I>,
    started: Instant,
    child: sys::Child,
    stream: Stream,
    exit: Option<sys::Exit>,
    deadline: Option<Instant>,
    killed: Option<Killed>,
    done: Option<Done>,
    error: Option<ChildError>,
    protocol: Option<String>,
    results: u64,
}

pub(super) fn run<I: Item, O: Wire>(parts: Parts<I, O>, opts: ForkOptions, hooks: ForkHooks) {
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
    let (tx, rx) = crossbeam_channel::bounded::<I>(opts.workers.max(1));
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name(format!("{}:feed", parts.ctx.name))
            .spawn_scoped(s, || feed(&parts.ctx, &parts.input, tx, &wake, Some))
            .expect("spawn feeder thread");
        // The supervisor owns the hand-off receiver: if it ever unwinds, the feeder's sends
        // fail instead of blocking forever.
        Supervisor {
            parts: &parts,
            opts: &opts,
            hooks: &hooks,
            forked_once: false,
            release: RefCell::new(Release::new(opts.ordered)),
        }
        .run(rx, &wake);
    });
}

struct Supervisor<'a, I, O> {
    parts: &'a Parts<I, O>,
    opts: &'a ForkOptions,
    hooks: &'a ForkHooks,
    forked_once: bool,
    release: RefCell<Release<O>>,
}

impl<I: Item, O: Wire> Supervisor<'_, I, O> {
    fn run(&mut self, rx: Receiver<I>, wake: &Wake) {
        let ctx = &self.parts.ctx;
        let abort_fd = ctx.run.abort_fd();
        let mut rec = Recorder::new(&ctx.stats);
        let mut running: Vec<Running<I>> = Vec::new();
        let mut retry: VecDeque<Pending<I>> = VecDeque::new();
        let mut next_index = 0u64;
        let mut input_done = false;
        let mut cancelled_all = false;
        loop {
            if ctx.run.aborting() && !cancelled_all {
                cancelled_all = true;
                ctx.cancelled(retry.len() as u64);
                retry.clear();
                for r in running.iter_mut().filter(|r| r.killed.is_none()) {
                    terminate(
                        r.child.pid,
                        &mut r.killed,
                        Killed::Cancelled,
                        &mut r.deadline,
                    );
                }
            }
            // Fork while there is room: due retries first, then new items.
            while running.len() < self.opts.workers && !ctx.run.aborting() {
                let now = Instant::now();
                let job = if retry
                    .front()
                    .is_some_and(|p| p.not_before.is_none_or(|t| t <= now))
                {
                    retry.pop_front()
                } else {
                    match rx.try_recv() {
                        Ok(item) => {
                            next_index += 1;
                            Some(Pending {
                                item,
                                index: next_index - 1,
                                attempt: 1,
                                not_before: None,
                            })
                        }
                        Err(TryRecvError::Empty) => None,
                        Err(TryRecvError::Disconnected) => {
                            input_done = true;
                            None
                        }
                    }
                };
                let Some(job) = job else { break };
                if let Some(r) = self.fork(job, &mut retry) {
                    running.push(r);
                }
            }
            if ctx.run.aborting() {
                // The feeder cancels what is still queued; drop what reached the hand-off.
                loop {
                    match rx.try_recv() {
                        Ok(_item) => ctx.cancelled(1),
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => {
                            input_done = true;
                            break;
                        }
                    }
                }
            }
            if input_done && running.is_empty() && retry.is_empty() {
                self.release.borrow_mut().release_all(&self.parts.router);
                break;
            }
            // Sleep until a child speaks or exits, an item arrives, or a deadline passes.
            wake.sleepy();
            if running.len() < self.opts.workers && !rx.is_empty() {
                wake.awake();
                continue;
            }
            let mut deadline = running.iter().fold(None, |d, r| earliest(d, r.deadline));
            if running.len() < self.opts.workers {
                deadline = earliest(deadline, retry.front().and_then(|p| p.not_before));
            }
            let (readable, exited) = {
                let mut fds = Vec::with_capacity(2 + 2 * running.len());
                fds.push(PollFd::new(&wake.r, PollFlags::IN));
                // Once the abort is handled the pipe stays readable: stop watching it, or
                // every poll would return at once until the children are gone.
                let watch_abort = if cancelled_all {
                    PollFlags::empty()
                } else {
                    PollFlags::IN
                };
                fds.push(PollFd::new(abort_fd, watch_abort));
                for r in &running {
                    fds.push(PollFd::new(
                        &r.stream.fd,
                        if r.stream.eof {
                            PollFlags::empty()
                        } else {
                            PollFlags::IN
                        },
                    ));
                    fds.push(PollFd::new(&r.child.pidfd, PollFlags::IN));
                }
                wait(&mut fds, deadline);
                let ready = |f: &PollFd<'_>| !f.revents().is_empty();
                let pairs = fds[2..].chunks(2);
                pairs
                    .map(|p| (ready(&p[0]), ready(&p[1])))
                    .unzip::<_, _, Vec<_>, Vec<_>>()
            };
            wake.awake();
            // Read, reap, decide. Children are visited from the last so removal keeps indices.
            let now = Instant::now();
            for i in (0..running.len()).rev() {
                let r = &mut running[i];
                if readable[i] {
                    self.pump(r);
                }
                if exited[i] && r.exit.is_none() {
                    r.exit = Some(sys::reap(r.child.pid));
                    // Everything the child wrote before exiting is in the pipe now.
                    self.pump(r);
                }
                if r.exit.is_none() && r.deadline.is_some_and(|d| d <= now) {
                    let why = r.killed.unwrap_or(Killed::Timeout);
                    terminate(r.child.pid, &mut r.killed, why, &mut r.deadline);
                }
                if r.exit.is_some() {
                    let r = running.swap_remove(i);
                    self.finish(r, &mut rec, &mut retry);
                }
            }
        }
    }

    /// Forks a child for `job`; on fork failure the item fails (and may be retried).
    fn fork(&mut self, job: Pending<I>, retry: &mut VecDeque<Pending<I>>) -> Option<Running<I>> {
        let ctx = &self.parts.ctx;
        if !self.forked_once {
            self.forked_once = true;
            if let Err(m) = hooks::run_fork(&self.hooks.before_fork, "before_fork") {
                ctx.stage_failed(FailureKind::Start, m);
                ctx.cancelled(1);
                self.release
                    .borrow_mut()
                    .finished(job.index, &self.parts.router);
                return None;
            }
        }
        let pipe = sys::pipe(true);
        let (r, w) = match pipe {
            Ok(p) => p,
            Err(e) => {
                self.failed(
                    job,
                    FailureKind::Start,
                    format!("cannot create a pipe: {e}"),
                    None,
                    retry,
                );
                return None;
            }
        };
        sys::grow_pipe(&w, PIPE_SIZE);
        let mut slot = Some(job.item);
        let slot_ref = &mut slot;
        let (index, max) = (job.index, self.opts.max_frame);
        let factory = &self.parts.factory;
        let after_fork = &self.hooks.after_fork;
        let keep = [sys::raw(&w)];
        let name = format!("mg:{}", ctx.name);
        let routes = &self.parts.router.routes;
        let forked = sys::fork_child(&keep, &name, move || {
            let item = slot_ref.take().expect("the child's copy of the item");
            child::cow_child::<I, O>(item, index, factory, after_fork, w, max, routes)
        });
        let job = Pending {
            item: slot.expect("the parent keeps its copy"),
            ..job
        };
        match forked {
            Ok(child) => {
                ctx.stats.child_started(child.pid);
                let deadline = self.opts.timeout.map(|t| Instant::now() + t);
                Some(Running {
                    job,
                    started: Instant::now(),
                    child,
                    stream: Stream::new(r, self.opts.max_frame),
                    exit: None,
                    deadline,
                    killed: None,
                    done: None,
                    error: None,
                    protocol: None,
                    results: 0,
                })
            }
            Err(e) => {
                self.failed(
                    job,
                    FailureKind::Start,
                    format!("fork failed: {e}"),
                    None,
                    retry,
                );
                None
            }
        }
    }

    /// Reads what the child sent and routes its results.
    fn pump(&self, r: &mut Running<I>) {
        r.stream.read_available();
        loop {
            let index = r.job.index;
            let (stage, pid) = (&self.parts.ctx.name, r.child.pid);
            let routes = &self.parts.router.routes;
            let next = r.stream.dec.next(|kind, id, payload| {
                if kind == Kind::Log {
                    return protocol::decode::<super::log::LogRecord>(payload)
                        .map(|rec| {
                            super::log::emit(stage, pid, &rec);
                            Event::Log
                        })
                        .map_err(|e| format!("bad log frame: {e}"));
                }
                if id != index {
                    return Err(format!(
                        "frame for item {id} from the child of item {index}"
                    ));
                }
                match kind {
                    Kind::Routed => {
                        super::decode_routed(routes, payload).map(|(i, t)| Event::Routed(i, t))
                    }
                    Kind::Result => protocol::decode::<O>(payload)
                        .map(Event::Result)
                        .map_err(|e| format!("cannot decode a result: {e}")),
                    Kind::Done => protocol::decode::<Done>(payload)
                        .map(Event::Done)
                        .map_err(|e| format!("bad done frame: {e}")),
                    Kind::Error => protocol::decode::<ChildError>(payload)
                        .map(Event::Error)
                        .map_err(|e| format!("bad error frame: {e}")),
                    other => Err(format!("unexpected {other:?} frame from a child")),
                }
            });
            match next {
                Ok(None) => break,
                Ok(Some(Ok(Event::Result(o)))) => {
                    r.results += 1;
                    self.release.borrow_mut().emit(index, o, &self.parts.router);
                }
                Ok(Some(Ok(Event::Done(d)))) => r.done = Some(d),
                Ok(Some(Ok(Event::Routed(i, t)))) => {
                    r.results += 1;
                    let _ = self.parts.router.route_index(i, t);
                }
                Ok(Some(Ok(Event::Log))) => {}
                Ok(Some(Ok(Event::Error(e)))) => r.error = Some(e),
                Ok(Some(Err(m))) => {
                    self.protocol_error(r, m);
                    break;
                }
                Err(e) => {
                    self.protocol_error(r, e.to_string());
                    break;
                }
            }
        }
    }

    fn protocol_error(&self, r: &mut Running<I>, m: String) {
        if r.protocol.is_none() {
            r.protocol = Some(m);
            r.stream.eof = true;
            sys::kill(r.child.pid, libc::SIGKILL);
            r.killed.get_or_insert(Killed::Protocol);
        }
    }

    /// The child has exited and its stream is drained: decide the item's outcome.
    fn finish(&self, r: Running<I>, rec: &mut Recorder<'_>, retry: &mut VecDeque<Pending<I>>) {
        let pid = Some(r.child.pid as u32);
        self.parts.ctx.stats.child_ended(r.child.pid);
        let exit = r.exit.expect("finished children have exited");
        let outcome = match (r.killed, r.error, r.done, r.protocol) {
            (Some(Killed::Cancelled), ..) if r.done.is_none() => Err((
                FailureKind::Cancelled,
                "run interrupted; child terminated".to_string(),
            )),
            (_, _, _, Some(m)) => Err((FailureKind::Protocol, m)),
            (_, Some(e), _, _) => Err((e.kind, e.message)),
            (_, None, Some(d), _) if d.outputs == r.results => {
                rec.latency_busy(d.latency_ns, r.started.elapsed().as_nanos() as u64);
                Ok(())
            }
            (_, None, Some(d), _) => Err((
                FailureKind::Protocol,
                format!(
                    "child reported {} results, parent received {}",
                    d.outputs, r.results
                ),
            )),
            (Some(Killed::Timeout), ..) => Err((
                FailureKind::Timeout,
                format!(
                    "no result within {:?}; child killed",
                    self.opts.timeout.unwrap_or_default()
                ),
            )),
            _ => Err(exit_failure(exit, r.stream.dec.pending() > 0)),
        };
        match outcome {
            Err((kind, message)) => self.failed(r.job, kind, message, pid, retry),
            Ok(()) => {
                self.parts.ctx.items_done(1);
                let mut release = self.release.borrow_mut();
                release.finished(r.job.index, &self.parts.router);
            }
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
        let index = job.index;
        if kind == FailureKind::Cancelled {
            self.parts.ctx.cancelled(1);
        } else {
            let ctx = &self.parts.ctx;
            match ctx.failure(job.index, job.attempt, kind, message, pid) {
                Verdict::Retry(delay) => {
                    let not_before = Some(Instant::now() + delay);
                    let attempt = job.attempt + 1;
                    return retry.push_back(Pending {
                        attempt,
                        not_before,
                        ..job
                    });
                }
                Verdict::DeadLetter(f) => dead_letter(self.parts, job.item, f),
                Verdict::Dropped => {}
            }
            ctx.items_done(1);
        }
        self.release
            .borrow_mut()
            .finished(index, &self.parts.router);
    }
}

enum Event<O> {
    Log,
    Result(O),
    Routed(usize, crate::route::AnyItem),
    Done(Done),
    Error(ChildError),
}
