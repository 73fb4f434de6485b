//! The supervisor: the one thread that forks workers, writes to them, reads from them, reaps
//! them and applies the error policy. Its event loop ([`Supervisor::run`]) is a list of named
//! steps; dispatching is in `dispatch`, and everything after a worker misbehaves or dies in
//! `recover`.

use super::super::supervise::{earliest, Handoff, Killed, PollSet, Wake};
use super::dispatch::MAX_IN_FLIGHT_BYTES;
use super::feed::{Encoded, LARGE_ITEM, MAX_SPARE};
use super::flight::Flight;
use super::worker::Worker;
use super::IpcParts;
use super::{LOOK_EVERY, TAKE_HELD_AFTER};
use crate::error::FailureKind;
use crate::exec::order::{Partial, Release};
use crate::exec::runner::ForkHooks;
use crate::exec::ForkOptions;
use crate::ipc::message::{Done, FromChild, MessageError};
use crate::ipc::results_log::ResultsLog;
use crate::ipc::{FINISH_ID, START_ID};
use crate::stage::Wire;
use crate::stats::Recorder;
use crossbeam_channel::Receiver;
use rustix::event::{PollFd, PollFlags};
use std::collections::VecDeque;
#[cfg(feature = "async")]
use std::sync::atomic::Ordering;
use std::time::Instant;

pub(super) struct Supervisor<'a, I, O> {
    pub(super) parts: &'a IpcParts<I, O>,
    pub(super) opts: &'a ForkOptions,
    pub(super) hooks: &'a ForkHooks,
    pub(super) workers: Vec<Option<Worker>>,
    /// When to fork a replacement for each dead worker's slot.
    pub(super) respawn: Vec<Option<Instant>>,
    /// Where the round-robin dispatch looks first.
    pub(super) rr: usize,
    /// Workers that died since an item last succeeded (the respawn backoff grows with it).
    pub(super) deaths: u32,
    pub(super) release: Release<O>,
    /// A batched worker corrupted its stream: replacements write each item's results
    /// before the next item, so a repeat is pinned on the item that does it.
    pub(super) strict: bool,
    /// Where results go: held, and sent after each read of the workers' pipes.
    pub(super) router: crate::route::Router<O>,
    /// Items finished since the last send (counted done once their results are sent).
    pub(super) done: u64,
    /// Gives the feeder the buffers of large items that ended.
    pub(super) spares: crossbeam_channel::Sender<Vec<u8>>,
    /// Items waiting for a worker: retries (after their backoff) and items put back when
    /// their worker died before running them.
    pub(super) queue: VecDeque<Flight>,
    /// Items handed off by the feeder, not yet dispatched.
    pub(super) incoming: Handoff<Encoded<I>>,
    pub(super) wake: &'a Wake,
    pub(super) rec: Recorder<'a>,
    /// The feeder has handed off its last item.
    pub(super) input_done: bool,
    /// The run's abort has been handled (queued items cancelled, workers terminated).
    pub(super) cancelled_all: bool,
    /// Items a worker holds at most: `in_flight`, or with `in_flight_auto` what the items'
    /// measured time asks ([`Supervisor::timed`]).
    pub(super) window: usize,
    /// With `in_flight_auto`: the items' recent run time in the workers, in ns (a moving
    /// average), once one has been timed.
    pub(super) item_ns: Option<u64>,
    /// Payload bytes a worker holds at most.
    pub(super) max_bytes: usize,
    /// An async stage: items each worker runs at once (see `asynchronous`).
    pub(super) tasks: Option<usize>,
    /// Per slot, the outputs of the item a sync worker runs, held until its `done`.
    pub(super) partial: Vec<Partial<O>>,
    /// An async stage: per slot, the item whose frames are arriving, with its outputs so far.
    #[cfg(feature = "async")]
    pub(super) answering: Vec<Option<super::asynchronous::Answering<O>>>,
}

/// With `in_flight_auto`, the fewest items a worker holds: one running and the next in its
/// pipe, so it never waits for the parent between two items.
pub(super) const AUTO_MIN: usize = 2;

impl<'a, I: Wire, O: Wire> Supervisor<'a, I, O> {
    pub(super) fn new(
        parts: &'a IpcParts<I, O>,
        opts: &'a ForkOptions,
        hooks: &'a ForkHooks,
        workers: Vec<Option<Worker>>,
        rx: Receiver<Vec<Encoded<I>>>,
        wake: &'a Wake,
        spares: crossbeam_channel::Sender<Vec<u8>>,
    ) -> Self {
        Supervisor {
            parts,
            opts,
            hooks,
            respawn: vec![None; workers.len()],
            workers,
            rr: 0,
            deaths: 0,
            release: Release::new(opts.ordered),
            strict: false,
            router: parts.router.clone().batched_until_flush(),
            done: 0,
            spares,
            queue: VecDeque::new(),
            incoming: Handoff::new(rx),
            wake,
            rec: Recorder::new(&parts.ctx.stats),
            input_done: false,
            cancelled_all: false,
            window: match opts.in_flight_auto {
                true => AUTO_MIN.min(opts.in_flight).max(1),
                false => opts.in_flight.max(1),
            },
            item_ns: None,
            max_bytes: MAX_IN_FLIGHT_BYTES,
            tasks: parts.factory.tasks(),
            partial: (0..opts.workers).map(|_| Partial::default()).collect(),
            #[cfg(feature = "async")]
            answering: (0..opts.workers).map(|_| None).collect(),
        }
        .sized_for_async()
    }

    /// An async stage's workers get a fixed window of their own (see `asynchronous`).
    fn sized_for_async(self) -> Self {
        #[cfg(feature = "async")]
        if let Some(n) = self.tasks {
            let window = super::asynchronous::window(n);
            let max_bytes = super::asynchronous::max_bytes(window);
            return Supervisor {
                window,
                max_bytes,
                ..self
            };
        }
        self
    }

    /// The event loop. Each pass: handle an abort; replace dead workers whose backoff has
    /// passed; hand items to workers with room; end once nothing is left; write what the
    /// workers' pipes take; then, unless more items can go out at once, sleep in one `poll`
    /// until a worker speaks, exits or can take more bytes, an item arrives, a deadline
    /// passes or the run aborts; and visit every worker: read, reap, recover, time out,
    /// bury, take held results. Results read in a pass go downstream at its end.
    pub(super) fn run(&mut self) {
        loop {
            let now = Instant::now();
            self.on_abort();
            self.respawn_due(now);
            if !self.parts.ctx.run.aborting() {
                self.dispatch(now);
            }
            if self.shut_down_when_done() {
                break;
            }
            self.write_inputs();
            self.show_in_flight();
            self.wake.sleepy();
            if self.can_dispatch_more() {
                self.wake.awake();
                continue;
            }
            let ready = self.sleep(self.next_deadline());
            self.wake.awake();
            self.visit_all(&ready);
            self.send_results();
        }
    }

    /// Once the run aborts: the queued items are cancelled and every worker is terminated
    /// (once); the items handed off since are cancelled on every pass.
    fn on_abort(&mut self) {
        let ctx = &self.parts.ctx;
        if ctx.run.aborting() && !self.cancelled_all {
            self.cancelled_all = true;
            ctx.cancelled(self.queue.iter().map(|f| u64::from(f.count)).sum());
            self.queue.clear();
            for w in self.workers.iter_mut().flatten() {
                if w.alive() && !w.killing() {
                    w.terminate(Killed::Cancelled, None);
                }
            }
        }
        if ctx.run.aborting() {
            self.input_done |= self.incoming.cancel(ctx, Encoded::items);
        }
    }

    /// When the input has ended and no item is left (or the run aborts): each live worker
    /// gets `shutdown`, flushes its instance and exits. `true` once they all have: what is
    /// still held goes downstream and the stage ends.
    fn shut_down_when_done(&mut self) -> bool {
        let nothing_left = self.input_done && self.queue.is_empty() && self.in_flight() == 0;
        if !(nothing_left || self.parts.ctx.run.aborting() && self.input_done) {
            return false;
        }
        for w in self.workers.iter_mut().flatten() {
            w.shut_down(false);
        }
        if self.workers.iter().flatten().any(Worker::alive) {
            return false;
        }
        self.release.release_all(&mut self.router);
        self.send_results();
        true
    }

    /// The nearest time the loop must wake without a poll event: a worker's deadline (its
    /// item's time limit, or SIGKILL after SIGTERM), a retry's backoff, a respawn, or a look
    /// at a batched worker's log that may hold results.
    fn next_deadline(&self) -> Option<Instant> {
        let mut deadline = self
            .workers
            .iter()
            .flatten()
            .fold(None, |d, w| earliest(d, w.deadline()));
        deadline = earliest(deadline, self.queue.front().and_then(|f| f.not_before));
        for t in self.respawn.iter().flatten() {
            deadline = earliest(deadline, Some(*t));
        }
        // A batched worker with items may be holding results: look again soon.
        for w in self.workers.iter().flatten() {
            if w.log.is_some() && w.alive() && w.stream.corrupt.is_none() {
                let at = match w.held {
                    Some((_, since)) => Some(since + TAKE_HELD_AFTER),
                    None if w.items >= 2 => Some(w.looked + LOOK_EVERY),
                    None => None,
                };
                deadline = earliest(deadline, at);
            }
        }
        deadline
    }

    /// Sleeps in one `poll` over the wake pipe, the abort pipe and each live worker's result
    /// pipe, pidfd and (with bytes waiting) input pipe, until one is ready or `deadline`.
    /// Returns, for each live worker in slot order, whether its result pipe and its pidfd
    /// were ready.
    fn sleep(&self, deadline: Option<Instant>) -> Vec<(bool, bool)> {
        let abort_fd = self.parts.ctx.run.abort_fd();
        let mut fds = PollSet::new(
            self.wake,
            abort_fd,
            self.cancelled_all,
            3 * self.workers.len(),
        );
        let mut map = Vec::new();
        for w in self.workers.iter().flatten() {
            map.push(fds.push(w.stream.poll_fd()));
            fds.push(PollFd::new(
                &w.child.pidfd,
                if w.alive() {
                    PollFlags::IN
                } else {
                    PollFlags::empty()
                },
            ));
            if let (Some(fd), false) = (&w.input, w.out.is_empty()) {
                fds.push(PollFd::new(fd, PollFlags::OUT));
            }
        }
        fds.wait(deadline);
        map.iter()
            .map(|&b| (fds.ready(b), fds.ready(b + 1)))
            .collect()
    }

    /// Visits every worker that was live when the loop slept, with what `poll` said of it.
    fn visit_all(&mut self, ready: &[(bool, bool)]) {
        let now = Instant::now();
        let live: Vec<usize> = (0..self.workers.len())
            .filter(|&s| self.workers[s].is_some())
            .collect();
        for (k, &slot) in live.iter().enumerate() {
            let (readable, exited) = ready[k];
            self.visit(slot, readable, exited, now);
        }
    }

    /// One worker after a poll: reads what it sent; reaps it if it exited and recovers what
    /// it left; judges its deadline; buries it if it is gone, or else takes the results it
    /// holds for too long.
    fn visit(&mut self, slot: usize, readable: bool, exited: bool, now: Instant) {
        if readable {
            self.pump(slot);
        }
        let w = self.workers[slot].as_mut().expect("live worker");
        if exited && w.alive() {
            w.reap();
            self.recover(slot);
        }
        let w = self.workers[slot].as_mut().expect("live worker");
        if w.alive() && !w.killing() && w.deadline().is_some_and(|d| d <= now) {
            // The answer may have come since the poll: read it before judging.
            self.pump(slot);
        }
        self.deadline_passed(slot, now);
        let w = self.workers[slot].as_mut().expect("live worker");
        if !w.alive() {
            self.bury(slot);
        } else {
            self.take_held(slot, now);
        }
    }

    /// A live worker whose deadline has passed: SIGTERM for the item that overran (the
    /// worker's own progress word says which one it runs, with batched results), SIGKILL
    /// once the grace after SIGTERM is over.
    fn deadline_passed(&mut self, slot: usize, now: Instant) {
        let w = self.workers[slot].as_mut().expect("live worker");
        if !w.alive() || w.deadline().is_none_or(|d| d > now) {
            return;
        }
        // With batched results, earlier items may have finished unreported. (A worker being
        // killed already keeps its reason: it now gets SIGKILL.)
        let running = w.log.as_ref().and_then(ResultsLog::running_item);
        let timed_out = running.or_else(|| w.flights.front().map(|f| f.index));
        w.terminate(Killed::Timeout, timed_out);
    }

    /// Sends the results held since the last call, then counts their items done (in that
    /// order: inside a routing loop, an item's unit must outlive the sending of its results).
    pub(super) fn send_results(&mut self) {
        if let Err(lost) = self.router.flush() {
            tracing::debug!(stage = %self.parts.ctx.name, lost, "results refused by a closed downstream");
        }
        if self.done > 0 {
            self.parts.ctx.items_done(std::mem::take(&mut self.done));
        }
        self.show_in_flight();
    }

    /// For an async stage: the stage's in-flight count for live views (see
    /// `async_in_flight`).
    fn show_in_flight(&self) {
        #[cfg(feature = "async")]
        if self.tasks.is_some() {
            let n = self.async_in_flight() as u64;
            self.parts.ctx.stats.in_flight.store(n, Ordering::Relaxed);
        }
    }

    /// Reads what a worker sent: routes results, completes and fails its items in order.
    pub(super) fn pump(&mut self, slot: usize) {
        // One clock read for everything this read brings.
        let now = Instant::now();
        self.pump_at(slot, now);
        self.rec.idle(quanta::Instant::now());
        let w = self.workers[slot].as_mut().expect("live worker");
        if w.reported > 0 {
            let n = std::mem::take(&mut w.reported);
            self.parts.ctx.stats.child_items(w.child.pid, n);
        }
    }

    fn pump_at(&mut self, slot: usize, now: Instant) {
        loop {
            let w = self.workers[slot].as_mut().expect("live worker");
            w.stream.read_available();
            let mut progressed = false;
            loop {
                let answering = self.answering_id(slot);
                let w = self.workers[slot].as_mut().expect("live worker");
                let (frames, from) = (
                    super::super::supervise::child_frames(self.parts),
                    w.sender(answering),
                );
                let next = w.stream.dec.next(|kind, id, payload| {
                    frames.decode(from, kind, id, payload).map(|m| (id, m))
                });
                match next {
                    Ok(None) => break,
                    Ok(Some(m)) => {
                        progressed = true;
                        match m {
                            Ok((id, m)) if self.tasks.is_none() => {
                                if let Err(e) = self.message(slot, id, m, now) {
                                    self.protocol_error(slot, e);
                                    return;
                                }
                            }
                            #[cfg(feature = "async")]
                            Ok((id, m)) => {
                                if let Err(e) = self.async_event(slot, id, m, now) {
                                    self.protocol_error(slot, e);
                                    return;
                                }
                            }
                            #[cfg(not(feature = "async"))]
                            Ok(_) => unreachable!("async stages need the feature"),
                            Err(e) => {
                                self.protocol_error(slot, e.to_string());
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

    /// Item `index` succeeded (its outputs were emitted): it is released downstream and
    /// counted done at the next send, and its worker may be due for recycling. `flight` is
    /// its flight if the item was its last: a large item's buffer goes back to the feeder.
    pub(super) fn succeeded(
        &mut self,
        slot: usize,
        index: u64,
        flight: Option<Flight>,
        now: Instant,
    ) {
        self.release.finished(index, &mut self.router);
        self.done += 1;
        self.recycle_if_due(slot, now);
        self.give_back(flight);
    }

    /// A flight that ended: the buffer of a large item goes back to the feeder (unless items
    /// are byte vectors, their own payloads: the feeder encodes into no buffer then).
    fn give_back(&mut self, flight: Option<Flight>) {
        let raw = self.parts.wire.is_some_and(|w| w.raw_in);
        if let Some(flight) = flight.filter(|f| f.payload.len() >= LARGE_ITEM && !raw) {
            if let Some(buf) = flight.payload.into_buffer(MAX_SPARE) {
                let _ = self.spares.try_send(buf);
            }
        }
    }

    /// One message from a sync worker, about item `id`; `Err` if it is a protocol error.
    pub(super) fn message(
        &mut self,
        slot: usize,
        id: u64,
        m: FromChild<O>,
        now: Instant,
    ) -> Result<(), String> {
        match m {
            FromChild::Results { outs, bad } => self.answers(slot, id, outs, bad, now),
            m => {
                self.event(slot, id, m, now);
                Ok(())
            }
        }
    }

    /// A `results` frame: the answers of the worker's items from `id` on, in order, each
    /// meaning what its item's `result_done` means; then `bad`, if the frame ended in one that
    /// could not be made out (the item it answers is then the running one). The answers of
    /// one flight are settled together (the flight moves on once), and the mean time of the
    /// frame's items counts once for the automatic window; each item still has its latency
    /// recorded, its output delivered and its place in the input order released.
    fn answers(
        &mut self,
        slot: usize,
        id: u64,
        outs: Vec<(O, u64)>,
        bad: Option<MessageError>,
        now: Instant,
    ) -> Result<(), String> {
        let mut outs = outs.into_iter();
        let (mut next, mut sum, mut settled) = (id, 0u128, 0u128);
        let mut bad = bad.map(|e| e.to_string());
        while outs.len() > 0 {
            let w = self.workers[slot].as_mut().expect("live worker");
            let front = w.flights.front().map(|f| (f.index, f.count as usize));
            let count = match front {
                Some((index, count)) if index == next => count,
                _ => {
                    let running = format!("{:?}", front.map(|f| f.0));
                    let e = MessageError::OtherItem {
                        id: next,
                        who: "worker",
                        running,
                    };
                    bad = Some(e.to_string());
                    break;
                }
            };
            if w.results > 0 {
                // Outputs of its own came before: the item fails alone (a wrong count).
                let (o, latency_ns) = outs.next().expect("an answer left");
                let d = Done {
                    latency_ns,
                    outputs: 1,
                };
                self.item_done(slot, d, Some(o), now);
                next = next.wrapping_add(1);
                continue;
            }
            let n = count.min(outs.len());
            let first_busy = w
                .front_since
                .map(|t| now.duration_since(t).as_nanos() as u64);
            let flight = w.front_done_n(n, now, self.opts.timeout);
            w.reported += n as u64;
            self.deaths = 0;
            for (k, (o, latency_ns)) in (0u64..).zip(outs.by_ref().take(n)) {
                let busy = match k {
                    0 => first_busy.unwrap_or(latency_ns),
                    // Items after the first ran while the parent was not looking.
                    _ => 0,
                };
                self.rec.latency_busy_local(latency_ns, busy);
                (sum, settled) = (sum + u128::from(latency_ns), settled + 1);
                let index = next.wrapping_add(k);
                self.release.emit(index, o, &mut self.router);
                self.release.finished(index, &mut self.router);
            }
            self.done += n as u64;
            self.recycle_if_due(slot, now);
            self.give_back(flight);
            next = next.wrapping_add(n as u64);
        }
        if let Some(mean) = sum.checked_div(settled) {
            self.timed(mean as u64);
        }
        bad.map_or(Ok(()), Err)
    }

    /// One message from a worker, about item `id`. An item's outputs are held until its
    /// `done` ([`Partial`]); those of a worker's `finish` go downstream as they come.
    pub(super) fn event(&mut self, slot: usize, id: u64, m: FromChild<O>, now: Instant) {
        let w = self.workers[slot].as_mut().expect("live worker");
        match (id, m) {
            (_, FromChild::Log(r)) => {
                super::super::trace::emit(&self.parts.ctx.name, w.child.pid, &r)
            }
            (FINISH_ID | START_ID, FromChild::Routed(i, t)) => {
                let _ = self.parts.router.route_index(i, t);
            }
            (FINISH_ID | START_ID, FromChild::Result(o) | FromChild::ResultDone(o, _)) => {
                w.results = 0;
                self.release.emit(u64::MAX, o, &mut self.router);
            }
            (_, FromChild::Routed(i, t)) => {
                w.results += 1;
                self.partial[slot].routed.push((i, t));
            }
            (_, FromChild::Result(o)) => {
                w.results += 1;
                self.partial[slot].outs.push(o);
            }
            (_, FromChild::ResultDone(o, latency_ns)) => {
                let d = Done {
                    latency_ns,
                    outputs: 1,
                };
                self.item_done(slot, d, Some(o), now);
            }
            (FINISH_ID | START_ID, FromChild::Done(_)) => w.results = 0,
            (_, FromChild::Done(d)) => self.item_done(slot, d, None, now),
            (_, FromChild::Results { .. }) => unreachable!("answers are taken by `message`"),
            (START_ID, FromChild::Error(e)) => {
                w.start_failed(e.message);
            }
            (FINISH_ID, FromChild::Error(e)) => {
                let pid = Some(w.child.pid as u32);
                w.results = 0;
                self.parts
                    .ctx
                    .stage_error(e.kind, format!("finish: {}", e.message), pid);
            }
            (_, FromChild::Error(e)) => {
                w.results = 0;
                self.partial[slot].clear();
                let flight = w.front_ended(now, self.opts.timeout);
                let pid = Some(w.child.pid as u32);
                self.failed(flight, e.kind, e.message, pid);
            }
        }
    }

    /// The item a sync worker runs is done (`last`: its only output, which came with its
    /// `done`): its held outputs go downstream if the worker sent as many as it says, or
    /// else it fails with a protocol error and they are dropped.
    fn item_done(&mut self, slot: usize, d: Done, last: Option<O>, now: Instant) {
        let w = self.workers[slot].as_mut().expect("live worker");
        let results = std::mem::take(&mut w.results) + u64::from(last.is_some());
        let busy = w
            .front_since
            .map_or(d.latency_ns, |t| now.duration_since(t).as_nanos() as u64);
        w.reported += 1;
        self.deaths = 0;
        if d.outputs != results {
            let flight = w.front_ended(now, self.opts.timeout);
            let m = format!(
                "worker reported {} results, parent received {results}",
                d.outputs
            );
            let pid = Some(w.child.pid as u32);
            self.partial[slot].clear();
            return self.failed(flight, FailureKind::Protocol, m, pid);
        }
        let index = w
            .flights
            .front()
            .expect("an answer for the running item")
            .index;
        let flight = w.front_done(now, self.opts.timeout);
        self.rec.latency_busy_local(d.latency_ns, busy);
        self.timed(d.latency_ns);
        let (release, router) = (&mut self.release, &mut self.router);
        self.partial[slot].deliver(index, last, release, router, &self.parts.router);
        self.succeeded(slot, index, flight, now);
    }
}

impl<I, O> Supervisor<'_, I, O> {
    /// For an async worker: the item some of whose frames have arrived from `slot`.
    fn answering_id(&self, slot: usize) -> Option<u64> {
        #[cfg(feature = "async")]
        if self.tasks.is_some() {
            return self.answering[slot].as_ref().map(|a| a.id);
        }
        let _ = slot;
        None
    }

    /// With `in_flight_auto`: an item ran `ns` in its worker (or the items of a `results`
    /// frame did, on average). Each worker then holds about
    /// [`Exec::IN_FLIGHT_AHEAD`](crate::Exec::IN_FLIGHT_AHEAD) of work by the average of
    /// recent items (the first sets it, each later one moves it by a sixteenth of the
    /// difference), within [`AUTO_MIN`]..=`in_flight`.
    pub(super) fn timed(&mut self, ns: u64) {
        if !self.opts.in_flight_auto {
            return;
        }
        let avg = match self.item_ns {
            None => ns,
            // In i128: a worker's reported time may be any u64.
            Some(a) => (a as i128 + (ns as i128 - a as i128) / 16) as u64,
        };
        self.item_ns = Some(avg);
        let ahead = crate::Exec::IN_FLIGHT_AHEAD.as_nanos() as u64;
        self.window = auto_window(ahead, avg, self.opts.in_flight);
    }
}

/// The window for items of `avg` ns: `ahead` ns of work, within [`AUTO_MIN`]..=`most`.
pub(super) fn auto_window(ahead: u64, avg: u64, most: usize) -> usize {
    let n = (ahead / avg.max(1)).min(most as u64) as usize;
    n.max(AUTO_MIN).min(most.max(1))
}

#[cfg(test)]
mod tests {
    use super::auto_window;

    #[test]
    fn the_window_holds_the_work_ahead_within_its_bounds() {
        let ahead = 2_000_000;
        // Tiny items: the most.
        assert_eq!(auto_window(ahead, 50, 4096), 4096);
        assert_eq!(auto_window(ahead, 0, 4096), 4096);
        // 100 us items: 20 of them.
        assert_eq!(auto_window(ahead, 100_000, 4096), 20);
        // Items longer than the work ahead: one running, one waiting.
        assert_eq!(auto_window(ahead, 5_000_000, 4096), 2);
        // A smaller maximum wins, down to 1.
        assert_eq!(auto_window(ahead, 50, 16), 16);
        assert_eq!(auto_window(ahead, 5_000_000, 1), 1);
    }
}
