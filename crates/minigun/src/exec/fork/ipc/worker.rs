//! A worker: its process, pipes, results log and the items it holds.

use super::super::child;
use super::super::supervise::{end_child, result_pipe, Killed, PIPE_SIZE};
use super::flight::Flight;
use super::{Code, IpcParts};
use crate::exec::runner::ForkHooks;
use crate::exec::ForkOptions;
use crate::ipc::frame::Kind;
use crate::ipc::message::{run_offset, split_run, Sender, RUN_PREFIX};
use crate::ipc::outbox::Outbox;
use crate::ipc::reader::Stream;
use crate::ipc::results_log::{ResultsLog, LOG_BYTES};
use crate::stage::Wire;
use crate::sys;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

pub(super) struct Worker {
    pub(super) child: sys::Child,
    /// With `batch_results`: frames of finished items the worker has not written yet.
    pub(super) log: Option<ResultsLog>,
    /// The worker's input pipe, until it is closed (after `shutdown`, or once it broke).
    pub(super) input: Option<sys::PipeWriter>,
    pub(super) out: Outbox,
    pub(super) stream: Stream,
    /// Where the worker is in its life.
    life: Life,
    pub(super) flights: VecDeque<Flight>,
    /// Items in `flights`.
    pub(super) items: usize,
    /// Payload bytes of `flights`.
    pub(super) bytes: usize,
    /// When the first flight started running (deadline base).
    pub(super) front_since: Option<Instant>,
    /// When the first flight's time limit runs out.
    item_deadline: Option<Instant>,
    pub(super) results: u64,
    /// Items finished since the stage's live child table was last updated.
    pub(super) reported: u64,
    /// With `batch_results`: the log's base when it was first seen holding bytes, and when.
    pub(super) held: Option<(u64, Instant)>,
    /// When the parent last looked at the log and found nothing to take.
    pub(super) looked: Instant,
    /// Items handed to it (for `max_items_per_worker`).
    pub(super) handed: u64,
    /// When its resident memory was last read (for `max_worker_rss`).
    pub(super) rss_read: Instant,
    /// An async stage's worker: word 0 counts the items it has started (see
    /// `asynchronous`), in memory it shares with the parent.
    pub(super) started: Option<sys::SharedMem>,
}

/// Whether a worker takes items.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Intake {
    /// It takes items while it has room.
    Open,
    /// `shutdown` is queued: it finishes its stage instance and exits 0. A `retired` worker
    /// is replaced at once, by one that writes each item's results (after a corrupt batched
    /// stream).
    Shutdown { retired: bool },
    /// It reported that it cannot start (its `after_fork` hook or the stage factory failed):
    /// it takes nothing and exits.
    StartFailed(String),
}

/// The parent ending a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Kill {
    pub(super) why: Killed,
    /// With [`Killed::Timeout`]: the item whose time limit ran out.
    pub(super) timed_out: Option<u64>,
}

/// Where a worker is in its life. Only a live worker can be given items or signals; only a
/// worker being killed has a kill deadline; only an exited one has an exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Life {
    /// Running.
    Alive { intake: Intake },
    /// Being ended by the parent: SIGTERM sent and SIGKILL due at `kill_at`, or SIGKILL sent
    /// (`kill_at` is then the item's deadline after a corrupt stream, or none).
    Killing {
        intake: Intake,
        kill: Kill,
        kill_at: Option<Instant>,
    },
    /// Reaped.
    Exited {
        intake: Intake,
        kill: Option<Kill>,
        exit: sys::Exit,
    },
}

impl Life {
    fn intake(&self) -> &Intake {
        match self {
            Life::Alive { intake } | Life::Killing { intake, .. } | Life::Exited { intake, .. } => {
                intake
            }
        }
    }
    fn intake_mut(&mut self) -> &mut Intake {
        match self {
            Life::Alive { intake } | Life::Killing { intake, .. } | Life::Exited { intake, .. } => {
                intake
            }
        }
    }
}

impl Worker {
    fn new(
        child: sys::Child,
        log: Option<ResultsLog>,
        input: sys::PipeWriter,
        stream: Stream,
    ) -> Self {
        Worker {
            started: None,
            child,
            log,
            input: Some(input),
            out: Outbox::default(),
            stream,
            life: Life::Alive {
                intake: Intake::Open,
            },
            flights: VecDeque::new(),
            items: 0,
            bytes: 0,
            front_since: None,
            item_deadline: None,
            results: 0,
            reported: 0,
            held: None,
            looked: Instant::now(),
            handed: 0,
            rss_read: Instant::now(),
        }
    }

    /// Whether the worker has not been reaped.
    pub(super) fn alive(&self) -> bool {
        !matches!(self.life, Life::Exited { .. })
    }

    /// Whether the worker runs and takes items (it may still have no room).
    pub(super) fn open(&self) -> bool {
        matches!(
            self.life,
            Life::Alive {
                intake: Intake::Open
            }
        )
    }

    /// Whether the parent is ending (or has ended) the worker, and why.
    pub(super) fn kill(&self) -> Option<Kill> {
        match self.life {
            Life::Alive { .. } => None,
            Life::Killing { kill, .. } => Some(kill),
            Life::Exited { kill, .. } => kill,
        }
    }

    /// Whether the worker is being ended by the parent (and not yet reaped).
    pub(super) fn killing(&self) -> bool {
        matches!(self.life, Life::Killing { .. })
    }

    pub(super) fn intake(&self) -> &Intake {
        self.life.intake()
    }

    /// How it ended, once reaped.
    pub(super) fn exit(&self) -> Option<sys::Exit> {
        match self.life {
            Life::Exited { exit, .. } => Some(exit),
            _ => None,
        }
    }

    /// When the loop must act on the worker: its running item's time limit, or (while it is
    /// being killed) SIGKILL.
    pub(super) fn deadline(&self) -> Option<Instant> {
        match self.life {
            Life::Alive { .. } => self.item_deadline,
            Life::Killing { kill_at, .. } => kill_at,
            Life::Exited { .. } => None,
        }
    }

    /// Queues `shutdown` for a live worker that takes items (`retired`: to be replaced at
    /// once). A worker that failed to start takes nothing, `shutdown` included.
    pub(super) fn shut_down(&mut self, retired: bool) {
        if !self.alive() {
            return;
        }
        let intake = self.life.intake_mut();
        if *intake == Intake::Open {
            *intake = Intake::Shutdown { retired };
            self.out.push(Kind::Shutdown, 0, &[]);
        }
    }

    /// The worker reported that it cannot start.
    pub(super) fn start_failed(&mut self, message: String) {
        *self.life.intake_mut() = Intake::StartFailed(message);
    }

    /// The parent ends a live worker for `why`: SIGTERM first, SIGKILL once the grace
    /// period is over (a second call). `timed_out` names the item whose time limit ran out.
    pub(super) fn terminate(&mut self, why: Killed, timed_out: Option<u64>) {
        match &mut self.life {
            Life::Alive { intake } => {
                self.life = Life::Killing {
                    intake: std::mem::replace(intake, Intake::Open),
                    kill: Kill { why, timed_out },
                    kill_at: end_child(self.child.pid, true),
                };
            }
            Life::Killing { kill_at, .. } => *kill_at = end_child(self.child.pid, false),
            Life::Exited { .. } => {}
        }
    }

    /// The worker's stream is corrupt: SIGKILL at once (a worker already being killed keeps
    /// its reason and its kill deadline; a live one keeps its item's deadline). Sent through
    /// its pidfd: a stream found corrupt while it is replayed after the worker was reaped
    /// must not reach another process that took its pid.
    pub(super) fn kill_now(&mut self) {
        if let Life::Alive { intake } = &mut self.life {
            self.life = Life::Killing {
                intake: std::mem::replace(intake, Intake::Open),
                kill: Kill {
                    why: Killed::Protocol,
                    timed_out: None,
                },
                kill_at: self.item_deadline,
            };
        }
        if self.alive() {
            sys::fdpass::signal(&self.child, libc::SIGKILL);
        }
    }

    /// The worker has exited: reaps it.
    pub(super) fn reap(&mut self) {
        if !self.alive() {
            return;
        }
        let exit = sys::reap(self.child.pid);
        let kill = self.kill();
        let intake = std::mem::replace(self.life.intake_mut(), Intake::Open);
        self.life = Life::Exited { intake, kill, exit };
    }

    /// `flight` goes to the worker; as its front, it starts its time limit now (an async
    /// worker's: see `asynchronous::STALL_GRACE`).
    pub(super) fn push(&mut self, mut flight: Flight, now: Instant, timeout: Option<Duration>) {
        self.out
            .push_item(flight.kind(), flight.index, &flight.payload);
        if self.flights.is_empty() {
            self.front_since = Some(now);
            self.item_deadline = self.time_limit(now, timeout);
        }
        flight.seq = self.handed;
        self.bytes += flight.payload.len();
        self.items += flight.count as usize;
        self.handed += u64::from(flight.count);
        self.flights.push_back(flight);
    }

    /// The running item (the front flight's first) was answered `done` at `now`: the next
    /// one, if any, starts now, with its own deadline (see [`Worker::front_ended`]). Returns
    /// the front flight if that was its last item (a run moves on to its next item).
    pub(super) fn front_done(&mut self, now: Instant, timeout: Option<Duration>) -> Option<Flight> {
        let front = self
            .flights
            .front_mut()
            .expect("an answer for the running item");
        if front.count == 1 {
            return Some(self.front_ended(now, timeout));
        }
        let (item, _) = split_run(&front.payload).expect("a well-formed run");
        // The last item of a run is held alone, without its length.
        let gone = RUN_PREFIX + item.len() + if front.count == 2 { RUN_PREFIX } else { 0 };
        front.payload.advance(gone);
        front.index += 1;
        front.count -= 1;
        self.bytes -= gone;
        self.items -= 1;
        self.front_since = Some(now);
        self.item_deadline = timeout.map(|t| now + t);
        None
    }

    /// The front flight's first `n` items (at most all of them) were answered `done` at
    /// `now`, as [`Worker::front_done`] for each in turn. Returns the front flight if they
    /// were all its items.
    pub(super) fn front_done_n(
        &mut self,
        n: usize,
        now: Instant,
        timeout: Option<Duration>,
    ) -> Option<Flight> {
        let front = self
            .flights
            .front_mut()
            .expect("answers for the running items");
        let count = front.count as usize;
        debug_assert!(n >= 1 && n <= count);
        if n == count {
            let flight = self.flights.pop_front().expect("the front flight");
            self.bytes -= flight.payload.len();
            self.items -= n;
            let more = !self.flights.is_empty();
            self.front_since = more.then_some(now);
            self.item_deadline = timeout.filter(|_| more).map(|t| now + t);
            return Some(flight);
        }
        // The last item of a run is held alone, without its length.
        let gone = run_offset(&front.payload, n) + if count - n == 1 { RUN_PREFIX } else { 0 };
        front.payload.advance(gone);
        front.index += n as u64;
        front.count -= n as u32;
        self.bytes -= gone;
        self.items -= n;
        self.front_since = Some(now);
        self.item_deadline = timeout.map(|t| now + t);
        None
    }

    /// Takes the running item out of its run, so that the front flight is that item alone
    /// (the rest of its run follows it).
    pub(super) fn split_front(&mut self) {
        let Some(front) = self.flights.pop_front() else {
            return;
        };
        if front.count == 1 {
            return self.flights.push_front(front);
        }
        let before = front.payload.len();
        let (first, rest) = front.split(1);
        self.bytes = self.bytes - before + first.payload.len() + rest.payload.len();
        self.flights.push_front(rest);
        self.flights.push_front(first);
    }

    /// The item the worker was running has ended (`done` or `error`): the next one, if any,
    /// starts now, with its own deadline (which counts once the worker is no longer being
    /// killed: it never is again, so a kill deadline stands, whatever it still answers).
    /// Returns that item alone.
    pub(super) fn front_ended(&mut self, now: Instant, timeout: Option<Duration>) -> Flight {
        self.split_front();
        let flight = self
            .flights
            .pop_front()
            .expect("an answer for the running item");
        self.bytes -= flight.payload.len();
        self.items -= 1;
        let more = !self.flights.is_empty();
        self.front_since = more.then_some(now);
        self.item_deadline = timeout.filter(|_| more).map(|t| now + t);
        flight
    }

    /// The time limit of the worker's front item when it starts at `now`: `timeout`; for an
    /// async worker, which times its items itself, the time it may go without answering.
    fn time_limit(&self, now: Instant, timeout: Option<Duration>) -> Option<Instant> {
        match self.started {
            None => timeout.map(|t| now + t),
            #[cfg(feature = "async")]
            Some(_) => timeout.map(|t| now + t + super::asynchronous::STALL_GRACE),
            #[cfg(not(feature = "async"))]
            Some(_) => None,
        }
    }

    /// An async worker answered item `index` at `now` (`None`: it holds no such item): its
    /// flight leaves, and the worker's time limit starts again if it holds more.
    #[cfg(feature = "async")]
    pub(super) fn answered(
        &mut self,
        index: u64,
        now: Instant,
        timeout: Option<Duration>,
    ) -> Option<Flight> {
        let at = self.flights.iter().position(|f| f.index == index)?;
        let flight = self.flights.remove(at).expect("position is inside");
        debug_assert_eq!(flight.count, 1, "an async worker's items go one by one");
        self.bytes -= flight.payload.len();
        self.items -= 1;
        let more = !self.flights.is_empty();
        self.front_since = more.then_some(now);
        self.item_deadline = self.time_limit(now, timeout).filter(|_| more);
        Some(flight)
    }

    /// Writes as much of the worker's pending input as its pipe takes now; closes the input
    /// after the shutdown frame is out.
    pub(super) fn flush_input(&mut self) {
        let Some(fd) = &self.input else { return };
        if self.out.write_to(fd).is_err() {
            // The worker is gone (EPIPE); its pidfd tells the rest.
            self.input = None;
        }
        if matches!(self.intake(), Intake::Shutdown { .. }) && self.out.is_empty() {
            self.input = None;
        }
    }

    /// The sender of the worker's frames, as decoding them needs to know it (`answering`:
    /// for an async worker, the item some of whose frames have arrived).
    pub(super) fn sender(&self, answering: Option<u64>) -> Sender {
        match self.started {
            None => Sender::Worker {
                running: self.flights.front().map(|f| f.index),
            },
            Some(_) => Sender::AsyncWorker { answering },
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if self.alive() {
            sys::kill(self.child.pid, libc::SIGKILL);
            self.reap();
        }
    }
}

pub(super) fn spawn<I: Wire, O: Wire>(
    parts: &IpcParts<I, O>,
    opts: &ForkOptions,
    hooks: &ForkHooks,
    slot: usize,
    batched: bool,
) -> std::io::Result<Worker> {
    let (in_r, in_w) = sys::input_pipe(PIPE_SIZE)?;
    let (stream, out_w) = result_pipe(opts.max_frame)?;
    let keep = [sys::raw(&in_r), sys::raw(&out_w)];
    let name = format!("mg:{}#{slot}", parts.ctx.name);
    let (routes, max) = (&parts.router.routes, opts.max_frame);
    let wire = parts.wire.expect("fork stages have a codec");
    let (child, log, started) = match &parts.factory {
        Code::Sync(factory) => {
            let mut log = match batched {
                true => Some(ResultsLog::new(LOG_BYTES)?),
                false => None,
            };
            let child_log = log.as_mut();
            let code = child::StageCode {
                factory,
                after_fork: &hooks.after_fork,
                max,
                routes,
                wire,
            };
            let child = sys::fork_child(&keep, &name, move || {
                child::ipc_worker::<I, O>(in_r, out_w, child_log, &code)
            })?;
            (child, log, None)
        }
        #[cfg(feature = "async")]
        Code::Async { factory, tasks } => {
            let started = sys::SharedMem::new(0)?;
            let code = super::super::child_async::AsyncCode {
                factory,
                after_fork: &hooks.after_fork,
                max,
                routes,
                wire,
                tasks: *tasks,
                timeout: opts.timeout,
                started: started.word(0),
            };
            let child = sys::fork_child(&keep, &name, move || {
                super::super::child_async::worker::<I, O>(in_r, out_w, &code)
            })?;
            (child, None, Some(started))
        }
    };
    parts.ctx.stats.child_started(child.pid);
    let mut w = Worker::new(child, log, in_w, stream);
    w.started = started;
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::fork::ipc::flight::tests::run;
    use crate::ipc::outbox::Payload;

    /// A worker around a child that only sleeps (and dies by the first signal).
    fn sleeper() -> Worker {
        let (out_r, _out_w) = sys::pipe(true).unwrap();
        let (_in_r, in_w) = sys::input_pipe(PIPE_SIZE).unwrap();
        let child = sys::fork_child(&[], "mg:sleeper", || {
            std::thread::sleep(Duration::from_secs(60));
            0
        })
        .unwrap();
        Worker::new(child, None, in_w, Stream::new(out_r, 1 << 20))
    }

    fn flight(index: u64) -> Flight {
        Flight::one(index, Payload::own(vec![1, 2, 3]))
    }

    #[test]
    fn a_run_moves_on_item_by_item_and_a_failing_item_leaves_it_alone() {
        let mut w = sleeper();
        let now = Instant::now();
        let timeout = Some(Duration::from_secs(30));
        w.push(run(10, &[b"a", b"bb", b"ccc", b"dddd"]), now, timeout);
        w.push(flight(14), now, timeout);
        assert_eq!((w.flights.len(), w.items, w.handed), (2, 5, 5));
        assert_eq!(w.bytes, 4 * 4 + 10 + 3);
        // Item 10 is done: the run moves on, nothing is returned.
        assert!(w.front_done(now, timeout).is_none());
        let front = w.flights.front().unwrap();
        assert_eq!((front.index, front.count, w.items), (11, 3, 4));
        assert_eq!(w.bytes, 3 * 4 + 9 + 3);
        // Item 11 fails: it comes out alone, with its own bytes, and item 12 runs.
        let failed = w.front_ended(now, timeout);
        assert_eq!(
            (failed.index, failed.count, &failed.payload[..]),
            (11, 1, &b"bb"[..])
        );
        let front = w.flights.front().unwrap();
        assert_eq!((front.index, front.count, w.items), (12, 2, 3));
        // Item 12 done: the last item of the run is held alone, without its length.
        assert!(w.front_done(now, timeout).is_none());
        let front = w.flights.front().unwrap();
        assert_eq!(
            (front.index, front.count, &front.payload[..]),
            (13, 1, &b"dddd"[..])
        );
        assert_eq!(w.bytes, 4 + 3);
        // Its last item done: the flight is returned (its buffer may go back to the feeder).
        let last = w.front_done(now, timeout).expect("the run's last item");
        assert_eq!(last.index, 13);
        assert_eq!((w.flights.len(), w.items, w.bytes), (1, 1, 3));
    }

    #[test]
    fn answers_of_several_items_move_a_run_on_as_many_single_answers_would() {
        let items: [&[u8]; 5] = [b"a", b"bb", b"ccc", b"dddd", b"eeeee"];
        let (t0, timeout) = (Instant::now(), Some(Duration::from_secs(30)));
        let later = t0 + Duration::from_millis(5);
        // n answers at once, against n single answers, from every point of the run.
        for n in 1..=items.len() {
            let (mut one_by_one, mut at_once) = (sleeper(), sleeper());
            for w in [&mut one_by_one, &mut at_once] {
                w.push(run(10, &items), t0, timeout);
                w.push(flight(15), t0, timeout);
            }
            let mut last = None;
            for _ in 0..n {
                last = one_by_one.front_done(later, timeout);
            }
            let whole = at_once.front_done_n(n, later, timeout);
            // All of the run answered: the flight comes back (its buffer may go to the
            // feeder), whole where single answers give its last item.
            assert_eq!(whole.is_some(), n == items.len(), "n = {n}");
            assert_eq!(last.is_some(), n == items.len(), "n = {n}");
            if let Some(f) = whole {
                assert_eq!((f.index, f.count), (10, 5));
            }
            let state = |w: &Worker| {
                let f = w.flights.front().unwrap();
                let front = (f.index, f.count, f.payload.to_vec());
                (
                    front,
                    w.flights.len(),
                    w.items,
                    w.bytes,
                    w.front_since,
                    w.item_deadline,
                )
            };
            assert_eq!(state(&at_once), state(&one_by_one), "n = {n}");
        }
    }

    #[test]
    fn taking_the_running_item_out_of_its_run_keeps_the_workers_counts() {
        let mut w = sleeper();
        w.push(run(0, &[b"x", b"yy", b"zzz", b"w"]), Instant::now(), None);
        let bytes = w.bytes;
        w.split_front();
        assert_eq!((w.flights.len(), w.items), (2, 4));
        assert_eq!(w.bytes, bytes - 4, "the running item lost its length");
        let front = w.flights.front().unwrap();
        assert_eq!((front.index, front.count), (0, 1));
    }

    #[test]
    fn a_killed_worker_keeps_its_kill_deadline_and_reason_until_it_is_reaped() {
        let mut w = sleeper();
        let now = Instant::now();
        w.push(flight(0), now, Some(Duration::from_secs(30)));
        w.push(flight(1), now, Some(Duration::from_secs(30)));
        assert!(w.open() && w.alive() && w.kill().is_none());
        assert_eq!(w.deadline(), Some(now + Duration::from_secs(30)));
        w.terminate(Killed::Timeout, Some(0));
        let kill = Kill {
            why: Killed::Timeout,
            timed_out: Some(0),
        };
        assert!(w.killing() && !w.open());
        assert_eq!(w.kill(), Some(kill));
        let kill_at = w.deadline().expect("SIGKILL is due");
        assert!(kill_at < now + Duration::from_secs(30));
        // An answer that arrives now starts the next item, but the kill deadline stands.
        w.front_ended(Instant::now(), Some(Duration::from_secs(30)));
        assert_eq!(w.deadline(), Some(kill_at));
        // A second reason does not replace the first: SIGKILL now, nothing more is due.
        w.terminate(Killed::Cancelled, None);
        assert_eq!((w.kill(), w.deadline()), (Some(kill), None));
        w.reap();
        assert!(!w.alive() && !w.killing() && w.exit().is_some());
        assert_eq!((w.kill(), w.deadline()), (Some(kill), None));
        // Nothing more happens to a reaped worker.
        w.shut_down(false);
        w.terminate(Killed::Cancelled, None);
        assert_eq!(*w.intake(), Intake::Open);
        assert_eq!(w.kill(), Some(kill));
    }

    #[test]
    fn a_worker_that_shuts_down_or_failed_to_start_takes_nothing_more() {
        let mut w = sleeper();
        w.shut_down(true);
        assert_eq!(*w.intake(), Intake::Shutdown { retired: true });
        assert!(!w.open() && w.alive() && !w.out.is_empty());
        // Queued once: a second shutdown changes nothing.
        w.shut_down(false);
        assert_eq!(*w.intake(), Intake::Shutdown { retired: true });
        w.start_failed("factory failed".into());
        assert_eq!(*w.intake(), Intake::StartFailed("factory failed".into()));
        assert!(!w.open());

        // A corrupt stream kills at once; the running item's deadline stays the one due.
        let mut w = sleeper();
        let now = Instant::now();
        w.push(flight(0), now, Some(Duration::from_secs(30)));
        w.kill_now();
        assert!(w.killing());
        assert_eq!(w.kill().map(|k| k.why), Some(Killed::Protocol));
        assert_eq!(w.deadline(), Some(now + Duration::from_secs(30)));
        // Dropping a live worker kills and reaps it.
    }
}
