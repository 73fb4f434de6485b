//! Bounded stage input queues (the router that feeds them is in `route`).
//!
//! Invariants:
//! - every non-producer stage owns exactly one input queue; every upstream (static edge,
//!   dead-letter edge) holds one sender to it;
//! - end of stream is the queue disconnecting: it happens exactly when the last upstream has
//!   ended and dropped its sender, which is per-source end-of-stream accounting for free;
//! - a full bounded queue blocks the sender, so backpressure reaches the producer, and the
//!   queue length never exceeds its capacity (the high-water mark records the peak; the
//!   capacity also counts what producers' runs hold, below); a blocked sender is woken once
//!   half the queue is free, not at every take;
//! - items move in batches without waiting for one: a receiver takes every ready item under
//!   one lock, an in-process worker sends what it emitted when it has handled what it took
//!   (or after [`LINGER`](crate::exec::local) of work), so no item waits for others to arrive;
//! - a producer sends in *runs* ([`RunSender`]): its emits fill a run of at most [`RUN`]
//!   items (or as many as the queue had room for) that moves into the queue under one lock
//!   at the emit that fills it, when a receiver waits,
//!   and when the producer ends. A producer's code may wait for as long as it likes between
//!   two emits, so the run does not wait for the next emit: a receiver that finds the queue
//!   empty takes the partial runs itself before it sleeps (after its short spin), and a
//!   producer that emits while a receiver waits moves its run at once. So an item waits in a
//!   run only while its stage is busy with the items before it. The room for a run's items
//!   is promised by the queue before they are emitted (the run's credit, counted against the
//!   capacity), so runs never take the queue over its capacity; a producer waiting for room
//!   holds nothing back;
//! - a routing loop closes its members' queues ([`Receiver::closer`]); a closed queue still
//!   delivers what it holds, then ends.
//!
//! Lock order: a run's lock, then the queue's (a receiver taking a run holds both; a
//! producer never waits on the queue while it holds its run).
//!
//! Why not a channel crate: the engine's cost per item was the channel operation on both
//! sides of every hop (one cache-line transfer per item). Taking and sending batches and runs
//! makes it one transfer per batch; a producer's run lock stays on its own core unless a
//! receiver comes for the run. The W6 benchmark measures the difference against a
//! hand-written `crossbeam-channel` chain.

use crate::loops::{Closer, Membership};
use crate::stats::StageStats;
use crossbeam_utils::{Backoff, CachePadded};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

/// The capacity of a stage's input queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Capacity {
    /// At most this many items wait; a full queue blocks the sender.
    Bounded(usize),
    /// No limit: memory grows if the stage is slower than its upstreams.
    Unbounded,
}

impl Default for Capacity {
    fn default() -> Self {
        Capacity::Bounded(1000)
    }
}

pub(crate) fn channel<T>(cap: Capacity, target: Arc<StageStats>) -> (Sender<T>, Receiver<T>) {
    let cap = match cap {
        // A zero capacity would be a rendezvous; keep at least one slot.
        Capacity::Bounded(n) => n.max(1),
        Capacity::Unbounded => usize::MAX,
    };
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            senders: 1,
            receivers: 1,
            closed: false,
            recv_waiting: 0,
            unwoken: 0,
            woken: 0,
            send_waiting: 0,
            high_water: 0,
            taken: 0,
            reserved: 0,
            runs: Vec::new(),
        }),
        not_empty: Condvar::new(),
        not_full: Condvar::new(),
        cap,
        len: CachePadded::new(AtomicUsize::new(0)),
        sleepers: CachePadded::new(AtomicUsize::new(0)),
        gone: AtomicBool::new(false),
        target,
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver { shared },
    )
}

/// A stage's input queue, shared by its senders and receivers.
///
/// A mutex around a `VecDeque`, not a lock-free ring: a sender pays one lock per item or per
/// batch ([`Sender::send_all`]), and a receiver takes every ready item under one lock
/// ([`Receiver::recv_into`]), so the line moves between cores once per batch instead of once
/// per item. The queue itself holds nothing back: an item is visible to the receiver the
/// moment it is sent (what an in-process worker holds before sending is described in
/// `exec::local`).
struct Shared<T> {
    state: Mutex<State<T>>,
    not_empty: Condvar,
    not_full: Condvar,
    cap: usize,
    /// The queue's length, readable without the lock (probes, the receiver's spin).
    len: CachePadded<AtomicUsize>,
    /// Receivers waiting on the queue that no wake-up of all has reached yet (mirrors
    /// `unwoken`): a sender holding a batch or a run sends it at once when someone waits for
    /// it, and once they are all woken goes on filling it.
    sleepers: CachePadded<AtomicUsize>,
    /// Every receiver is gone (set once, with `receivers` reaching 0): a run sender's emit
    /// fails at once, as a send does, not when its run moves.
    gone: AtomicBool,
    /// The receiving stage's statistics (high-water mark).
    target: Arc<StageStats>,
}

struct State<T> {
    items: VecDeque<T>,
    senders: usize,
    receivers: usize,
    /// Closed from outside (the stage's routing loop has no work left).
    closed: bool,
    /// Threads blocked in a wait: a send or receive signals only when someone waits, so the
    /// hot path makes no system call.
    recv_waiting: usize,
    /// Of those, the receivers that came to wait since the last wake-up of all (`woken`
    /// counts those wake-ups): a receiver leaving the wait counts itself out of `unwoken`
    /// only if no wake-up of all came since it came.
    unwoken: usize,
    woken: u64,
    send_waiting: usize,
    high_water: usize,
    /// Items taken by receivers so far: the next item's index in the stage's input.
    taken: u64,
    /// Room promised to the runs of [`RunSender`]s (their items and their unused credit):
    /// counted against the capacity with `items`.
    reserved: usize,
    /// The runs of this queue's [`RunSender`]s, which a receiver about to wait takes.
    runs: Vec<Arc<Run<T>>>,
}

impl<T> State<T> {
    /// Room left for a sender: the capacity less what waits and what runs were promised.
    fn room(&self, cap: usize) -> usize {
        cap.saturating_sub(self.items.len() + self.reserved)
    }
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes every waiting receiver (if any), releasing the lock: from now on none is
    /// awaiting items that nobody told it of (see `sleepers`).
    fn wake_all(&self, mut s: MutexGuard<'_, State<T>>) {
        if self.waking_all(&mut s) {
            drop(s);
            self.not_empty.notify_all();
        }
    }

    /// Counts a wake-up of all the waiting receivers, if any (the caller then notifies
    /// them); whether there are any.
    fn waking_all(&self, s: &mut State<T>) -> bool {
        if s.recv_waiting == 0 {
            return false;
        }
        s.woken += 1;
        s.unwoken = 0;
        self.sleepers.store(0, Ordering::Relaxed);
        true
    }

    /// Publishes the queue's new length (after items were added) and its high-water mark.
    fn grew(&self, s: &mut State<T>) {
        let len = s.items.len();
        self.len.store(len, Ordering::Relaxed);
        if len > s.high_water {
            s.high_water = len;
            self.target
                .queue_high_water
                .fetch_max(len, Ordering::Relaxed);
        }
    }

    /// Moves a run's items into the queue (their promised room is now theirs in the queue)
    /// and wakes a waiting receiver; with `all`, gives back the run's unused credit too.
    /// The caller holds the run's lock (the order is always run, then queue).
    fn take_run(&self, run: &mut RunState<T>, all: bool) {
        let credit = if all {
            std::mem::take(&mut run.credit)
        } else {
            0
        };
        let mut s = self.lock();
        s.reserved -= run.items.len() + credit;
        s.items.extend(run.items.drain(..));
        self.grew(&mut s);
        if !s.items.is_empty() {
            self.wake_all(s);
        }
    }
}

/// The longest run a [`RunSender`] fills before it moves it into the queue.
const RUN: usize = 128;

/// The items a [`RunSender`] has emitted and not yet moved into its queue, and the room it
/// was promised for more (its credit). Shared with the queue's receivers, which take it
/// when they would otherwise wait.
///
/// Its lock is taken at every emit and by a receiver only when it would wait, and held for
/// a push or a move into the queue: a spin lock (one atomic read-modify-write per emit
/// instead of a mutex's two) whose waiter yields its core at each look, so a preempted
/// holder is never spun against.
struct Run<T> {
    state: RunLock<RunState<T>>,
}

type RunLock<T> = spin::mutex::SpinMutex<T, spin::relax::Yield>;
type RunGuard<'a, T> = spin::mutex::SpinMutexGuard<'a, T>;

struct RunState<T> {
    items: Vec<T>,
    /// How many more items the queue promised room for (counted in its `reserved`).
    credit: usize,
}

impl<T> Run<T> {
    fn lock(&self) -> RunGuard<'_, RunState<T>> {
        self.state.lock()
    }
}

/// The sending end of a stage's queue. Dropping the last sender ends the stream.
pub(crate) struct Sender<T> {
    shared: Arc<Shared<T>>,
}

/// The receiving end of a stage's queue. When the last receiver is gone, sends fail.
pub(crate) struct Receiver<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.shared.lock().senders += 1;
        Sender {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let mut s = self.shared.lock();
        s.senders -= 1;
        if s.senders == 0 {
            self.shared.wake_all(s);
        }
    }
}

impl<T> Clone for Receiver<T> {
    fn clone(&self) -> Self {
        self.shared.lock().receivers += 1;
        Receiver {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let mut s = self.shared.lock();
        s.receivers -= 1;
        if s.receivers == 0 {
            self.shared.gone.store(true, Ordering::Relaxed);
        }
        let wake = s.receivers == 0 && s.send_waiting > 0;
        drop(s);
        if wake {
            self.shared.not_full.notify_all();
        }
    }
}

impl<T> Sender<T> {
    /// Blocking send; `Err` gives the item back when every receiver is gone.
    pub(crate) fn send(&self, item: T) -> Result<(), T> {
        let sh = &*self.shared;
        let mut s = sh.lock();
        loop {
            if s.receivers == 0 {
                return Err(item);
            }
            if s.room(sh.cap) > 0 {
                break;
            }
            s.send_waiting += 1;
            s = sh.not_full.wait(s).unwrap_or_else(|e| e.into_inner());
            s.send_waiting -= 1;
        }
        s.items.push_back(item);
        sh.grew(&mut s);
        let wake = s.recv_waiting > 0;
        drop(s);
        if wake {
            sh.not_empty.notify_one();
        }
        Ok(())
    }

    /// Sends every item of `items` in order (as many at a time as there is room for),
    /// leaving it empty; returns how many could not be sent because every receiver is gone.
    pub(crate) fn send_all(&self, items: &mut Vec<T>) -> u64 {
        let sh = &*self.shared;
        let mut items = items.drain(..);
        let mut s = sh.lock();
        loop {
            if s.receivers == 0 {
                return items.len() as u64;
            }
            let room = s.room(sh.cap);
            if room > 0 {
                s.items.extend(items.by_ref().take(room));
                sh.grew(&mut s);
                if items.len() == 0 {
                    // More than one item may be ready: wake every waiting worker.
                    sh.wake_all(s);
                    return 0;
                }
                if sh.waking_all(&mut s) {
                    sh.not_empty.notify_all();
                }
            }
            s.send_waiting += 1;
            s = sh.not_full.wait(s).unwrap_or_else(|e| e.into_inner());
            s.send_waiting -= 1;
        }
    }

    /// Whether every receiver is gone.
    pub(crate) fn is_closed(&self) -> bool {
        self.shared.lock().receivers == 0
    }

    /// Whether a receiver is asleep waiting for items (a hint, read without the lock).
    pub(crate) fn awaited(&self) -> bool {
        self.shared.sleepers.load(Ordering::Relaxed) > 0
    }
}

/// A sender that moves its items into the queue in runs (a producer's, see the module
/// docs): what it emits goes into its [`Run`] (a lock only it and, rarely, a receiver take),
/// and the run moves into the queue under one queue lock when the room promised for it is
/// used up (at most [`RUN`] items), when a receiver is waiting, and when the sender is
/// dropped; a receiver about to wait takes the run itself. So no item waits for a run to
/// fill: it waits only while the receiving stage is busy with items that came before it.
///
/// Its items count against the queue's capacity from their emit on: the sender reserves
/// room (its credit) before it fills a run, and waits for room, holding nothing, when the
/// queue is full.
pub(crate) struct RunSender<T> {
    tx: Sender<T>,
    run: Arc<Run<T>>,
}

impl<T> Sender<T> {
    /// A sender of runs into this queue.
    pub(crate) fn runs(&self) -> RunSender<T> {
        let run = Arc::new(Run {
            state: RunLock::new(RunState {
                items: Vec::new(),
                credit: 0,
            }),
        });
        self.shared.lock().runs.push(run.clone());
        RunSender {
            tx: self.clone(),
            run,
        }
    }
}

impl<T> RunSender<T> {
    /// Emits an item into the run; `Err` gives it back when every receiver is gone.
    pub(crate) fn send(&self, item: T) -> Result<(), T> {
        let sh = &*self.tx.shared;
        if sh.gone.load(Ordering::Relaxed) {
            return Err(item);
        }
        let mut run = self.run.lock();
        if run.credit > 0 {
            run.credit -= 1;
            self.push(run, item);
            return Ok(());
        }
        // Out of credit (a full run moved when it filled): the sender waits, holding
        // nothing, until there is room for the next run.
        if !run.items.is_empty() {
            sh.take_run(&mut run, false);
        }
        drop(run);
        let mut s = sh.lock();
        let credit = loop {
            if s.receivers == 0 {
                return Err(item);
            }
            let room = s.room(sh.cap);
            if room > 0 {
                break room.min(RUN);
            }
            s.send_waiting += 1;
            s = sh.not_full.wait(s).unwrap_or_else(|e| e.into_inner());
            s.send_waiting -= 1;
        };
        s.reserved += credit;
        drop(s);
        let mut run = self.run.lock();
        // A receiver may have taken the (empty) run meanwhile: it found no credit to return.
        run.credit += credit - 1;
        self.push(run, item);
        Ok(())
    }

    /// Adds an item (its room already counted out of the credit) to the run, held by `run`:
    /// a run that this fills moves into the queue at once (it was promised the room), so
    /// what the queue's length and high-water mark leave out is at most a partial run.
    fn push(&self, mut run: RunGuard<'_, RunState<T>>, item: T) {
        let sh = &*self.tx.shared;
        run.items.push(item);
        if run.credit == 0 {
            sh.take_run(&mut run, false);
            return;
        }
        drop(run);
        // A receiver registers as waiting before it looks at the runs (and the run's lock
        // orders the two): if it found this run without the item, it is seen here.
        if sh.sleepers.load(Ordering::Relaxed) > 0 {
            self.flush();
        }
    }

    /// Moves the run into the queue now, keeping its credit.
    fn flush(&self) {
        let mut run = self.run.lock();
        if !run.items.is_empty() {
            self.tx.shared.take_run(&mut run, false);
        }
    }
}

impl<T> Drop for RunSender<T> {
    fn drop(&mut self) {
        let sh = &*self.tx.shared;
        let mut run = self.run.lock();
        sh.take_run(&mut run, true);
        drop(run);
        // Then the inner sender's drop ends the stream if it was the last.
        sh.lock().runs.retain(|r| !Arc::ptr_eq(r, &self.run));
    }
}

/// What a worker's receive took (see [`Receiver::recv_waited`]).
#[derive(Default)]
pub(crate) struct Taken {
    /// The receive had to wait for items (spun or slept).
    pub(crate) waited: bool,
    /// The index in the stage's input of the first item taken.
    pub(crate) first: u64,
}

/// How many items one receive takes at most: a whole default queue (1000), so a sole
/// receiver of a full queue takes it by swapping buffers, and its blocked senders, woken
/// then, refill it in one go instead of once per quarter.
const MAX_TAKE: usize = 1024;

impl<T> Receiver<T> {
    /// Moves ready items into `buf`, blocking until there is at least one; `false` at end of
    /// stream (no sender left, or the queue was closed) once the queue is empty.
    ///
    /// A sole worker takes everything ready (up to [`MAX_TAKE`]); one of `workers` workers
    /// (`threads(n)`) takes its share, so slow items still spread over the workers.
    /// An empty queue is watched briefly (spinning, then yielding) before sleeping: a busy
    /// upstream fills it again within microseconds, and the wait costs no system call.
    pub(crate) fn recv_into(&self, buf: &mut VecDeque<T>, workers: usize) -> bool {
        self.recv_waited(buf, workers).is_some()
    }

    /// [`Receiver::recv_into`] for a sole receiver that takes at most `max` items (a fork
    /// feeder takes what it can hand on: the rest stay visible in the queue).
    pub(crate) fn recv_upto(&self, buf: &mut VecDeque<T>, max: usize) -> bool {
        self.recv_inner(buf, 1, max, None, &mut Taken::default())
            .is_some_and(|more| more)
    }

    /// [`Receiver::recv_into`] that also says whether it had to wait for items, and the
    /// index in the stage's input of the first item taken (indices follow the queue's order
    /// whichever worker takes them); `None` at end of stream.
    pub(crate) fn recv_waited(&self, buf: &mut VecDeque<T>, workers: usize) -> Option<Taken> {
        let mut taken = Taken {
            waited: false,
            first: 0,
        };
        match self.recv_inner(buf, workers, MAX_TAKE, None, &mut taken) {
            Some(false) => None,
            _ => Some(taken),
        }
    }

    /// [`Receiver::recv_upto`] that also gives the index in the stage's input of the first
    /// item taken; `None` at end of stream.
    #[cfg(feature = "async")]
    pub(crate) fn recv_upto_indexed(&self, buf: &mut VecDeque<T>, max: usize) -> Option<Taken> {
        let mut taken = Taken::default();
        match self.recv_inner(buf, 1, max, None, &mut taken) {
            Some(true) => Some(taken),
            _ => None,
        }
    }

    /// [`Receiver::recv_upto`] that gives up at `deadline`: `None` on timeout.
    pub(crate) fn recv_upto_until(
        &self,
        buf: &mut VecDeque<T>,
        max: usize,
        deadline: Instant,
    ) -> Option<bool> {
        self.recv_inner(buf, 1, max, Some(deadline), &mut Taken::default())
    }

    /// [`Receiver::recv_into`] that gives up at `deadline`: `None` on timeout.
    pub(crate) fn recv_into_until(&self, buf: &mut VecDeque<T>, deadline: Instant) -> Option<bool> {
        self.recv_inner(buf, 1, MAX_TAKE, Some(deadline), &mut Taken::default())
    }

    fn recv_inner(
        &self,
        buf: &mut VecDeque<T>,
        workers: usize,
        max: usize,
        deadline: Option<Instant>,
        taken: &mut Taken,
    ) -> Option<bool> {
        let sh = &*self.shared;
        let backoff = Backoff::new();
        while sh.len.load(Ordering::Relaxed) == 0 && !backoff.is_completed() {
            taken.waited = true;
            backoff.snooze();
        }
        let mut s = sh.lock();
        loop {
            if !s.items.is_empty() {
                let ready = s.items.len();
                let take = match workers {
                    0 | 1 => ready,
                    n => ready / (2 * n),
                }
                .clamp(1, max.clamp(1, MAX_TAKE));
                if take == ready && buf.is_empty() {
                    // Everything, into an empty buffer: the two trade places (the queue
                    // keeps the buffer's allocation), no item is copied under the lock.
                    std::mem::swap(buf, &mut s.items);
                } else {
                    buf.extend(s.items.drain(..take));
                }
                taken.first = s.taken;
                s.taken += take as u64;
                sh.len.store(s.items.len(), Ordering::Relaxed);
                // A blocked sender is woken once the queue has drained to half, so it
                // refills half a queue per wake-up instead of one take's worth.
                let wake = s.send_waiting > 0 && s.items.len() <= sh.cap / 2;
                drop(s);
                if wake {
                    sh.not_full.notify_all();
                }
                return Some(true);
            }
            if s.senders == 0 || s.closed {
                return Some(false);
            }
            if deadline.is_some_and(|d| d <= Instant::now()) {
                return None;
            }
            taken.waited = true;
            s.recv_waiting += 1;
            s.unwoken += 1;
            sh.sleepers.store(s.unwoken, Ordering::Relaxed);
            let came = s.woken;
            // Leaves the wait: counted out of `unwoken` unless a wake-up of all did it.
            let leave = |s: &mut State<T>| {
                s.recv_waiting -= 1;
                if s.woken == came {
                    s.unwoken -= 1;
                    sh.sleepers.store(s.unwoken, Ordering::Relaxed);
                }
            };
            if !s.runs.is_empty() {
                // Registered as waiting first: a sender that adds to its run after this
                // looked at it sees the waiter and moves the run itself.
                let runs = s.runs.clone();
                drop(s);
                for run in &runs {
                    let mut run = run.lock();
                    if !run.items.is_empty() || run.credit > 0 {
                        sh.take_run(&mut run, true);
                    }
                }
                s = sh.lock();
                // A wake-up of all meanwhile found nobody asleep: look again before waiting.
                if s.woken != came || !s.items.is_empty() || s.senders == 0 || s.closed {
                    leave(&mut s);
                    continue;
                }
            }
            s = match deadline {
                None => sh.not_empty.wait(s).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    sh.not_empty
                        .wait_timeout(s, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
            leave(&mut s);
        }
    }

    /// How many items wait in the queue now.
    pub(crate) fn len(&self) -> usize {
        self.shared.len.load(Ordering::Relaxed)
    }

    /// Reads the queue's length without being a receiver (a probe must not keep senders going).
    pub(crate) fn len_probe(&self) -> impl Fn() -> usize + Send + Sync + 'static
    where
        T: Send + 'static,
    {
        let sh = self.shared.clone();
        move || sh.len.load(Ordering::Relaxed)
    }

    /// A handle that closes the queue: receivers then end once it is empty.
    pub(crate) fn closer(&self) -> Closer
    where
        T: Send + 'static,
    {
        let sh = self.shared.clone();
        Arc::new(move || {
            let mut s = sh.lock();
            s.closed = true;
            sh.wake_all(s);
        })
    }
}

/// A sender into a stage's queue that also takes routing-loop units.
pub(crate) struct QueueTx<T> {
    tx: Sender<T>,
    loops: Membership,
}

impl<T> Clone for QueueTx<T> {
    fn clone(&self) -> Self {
        QueueTx {
            tx: self.tx.clone(),
            loops: self.loops.clone(),
        }
    }
}

impl<T> QueueTx<T> {
    pub(crate) fn new(tx: Sender<T>, loops: Membership) -> Self {
        QueueTx { tx, loops }
    }

    /// Sends every item of `items` (emptying it); returns how many the stage did not take
    /// because it is gone.
    pub(crate) fn send_all(&self, items: &mut Vec<T>) -> u64 {
        let n = items.len() as u64;
        if let Some(lp) = &self.loops.lp {
            lp.take(n);
            let lost = self.tx.send_all(items);
            lp.release(lost);
            lost
        } else {
            self.tx.send_all(items)
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// A sender of runs into the stage's queue ([`RunSender`]); `None` for a routing loop's
    /// member, whose termination counts every item sent one by one.
    pub(crate) fn runs(&self) -> Option<RunSender<T>> {
        self.loops.lp.is_none().then(|| self.tx.runs())
    }

    pub(crate) fn awaited(&self) -> bool {
        self.tx.awaited()
    }

    /// Blocking send; `Err` gives the item back when the receiving stage is gone.
    pub(crate) fn send(&self, item: T) -> Result<(), T> {
        if let Some(lp) = &self.loops.lp {
            lp.take(1);
            if let Err(item) = self.tx.send(item) {
                lp.release(1);
                return Err(item);
            }
            Ok(())
        } else {
            self.tx.send(item)
        }
    }
}

/// How a stage with several downstreams distributes its items.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub enum FanOut {
    /// Every downstream receives every item (clones; the last one gets the original).
    #[default]
    Broadcast,
    /// Each item goes to one downstream, in turn.
    RoundRobin,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn queue(cap: usize) -> (Sender<u32>, Receiver<u32>) {
        channel(Capacity::Bounded(cap), Arc::new(StageStats::default()))
    }

    /// Waits (polling every millisecond, for at most 5 s) until `count` of the queue's state
    /// reaches `n`; panics, naming `what`, if it does not.
    fn wait_until<T>(shared: &Shared<T>, what: &str, n: usize, count: impl Fn(&State<T>) -> usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let now = count(&shared.lock());
            if now == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: {now}, not {n}, after 5 s"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn send_all_waits_for_room_keeps_order_and_never_exceeds_capacity() {
        let (tx, rx) = queue(7);
        let probe = rx.len_probe();
        let sender = std::thread::spawn(move || {
            let mut items: Vec<u32> = (0..1000).collect();
            let lost = tx.send_all(&mut items);
            (lost, items.len())
        });
        let mut got = Vec::new();
        let mut buf = VecDeque::new();
        while rx.recv_into(&mut buf, 1) {
            assert!(buf.len() <= 7, "took {} from a queue of 7", buf.len());
            assert!(probe() <= 7);
            got.extend(buf.drain(..));
        }
        assert_eq!(sender.join().unwrap(), (0, 0));
        assert_eq!(got, (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn a_blocked_sender_wakes_when_half_the_queue_is_free() {
        let (tx, rx) = queue(8);
        for i in 0..8 {
            tx.send(i).unwrap();
        }
        let sender = std::thread::spawn(move || tx.send(8));
        wait_until(&rx.shared, "senders blocked", 1, |s| s.send_waiting);
        let waiting = || rx.shared.lock().send_waiting;
        let mut buf = VecDeque::new();
        for left in (5..8).rev() {
            assert!(rx.recv_upto(&mut buf, 1));
            assert_eq!(rx.len(), left);
            // Room for one, but the sender is left asleep until half the queue is free.
            std::thread::sleep(Duration::from_millis(20));
            assert_eq!(waiting(), 1, "sender woken with {left} of 8 queued");
        }
        assert!(rx.recv_upto(&mut buf, 1));
        sender.join().unwrap().unwrap();
        assert_eq!(rx.len(), 5);
    }

    #[test]
    fn a_sole_receiver_takes_everything_ready_several_share() {
        let (tx, rx) = queue(100);
        for i in 0..40 {
            tx.send(i).unwrap();
        }
        let mut buf = VecDeque::new();
        assert!(rx.recv_into(&mut buf, 1));
        assert_eq!(buf.len(), 40);
        buf.clear();
        let rx2 = rx.clone();
        for i in 0..40 {
            tx.send(i).unwrap();
        }
        assert!(rx2.recv_into(&mut buf, 2));
        assert_eq!(
            buf.len(),
            10,
            "a quarter of the ready items for one of two workers"
        );
        // One slow item at a time still goes to one worker each.
        buf.clear();
        let (tx, rx) = queue(100);
        tx.send(1).unwrap();
        tx.send(2).unwrap();
        assert!(rx.recv_into(&mut buf, 2));
        assert_eq!(buf.len(), 1);
        assert!(rx.recv_into(&mut buf, 2));
        assert_eq!(buf.len(), 2);
    }

    #[test]
    fn receives_number_items_in_queue_order() {
        let (tx, rx) = queue(100);
        let rx2 = rx.clone();
        for i in 0..10 {
            tx.send(i).unwrap();
        }
        let mut buf = VecDeque::new();
        let a = rx.recv_waited(&mut buf, 2).unwrap();
        let n = buf.len() as u64;
        let b = rx2.recv_waited(&mut buf, 2).unwrap();
        assert_eq!((a.first, b.first), (0, n));
        assert!(!a.waited, "items were ready");
        assert_eq!(
            buf.iter().copied().collect::<Vec<_>>(),
            (0..buf.len() as u32).collect::<Vec<_>>()
        );
        drop(tx);
    }

    #[test]
    fn end_of_stream_after_the_last_item_and_only_then() {
        let (tx, rx) = queue(10);
        let tx2 = tx.clone();
        tx.send(1).unwrap();
        drop(tx);
        let mut buf = VecDeque::new();
        assert!(rx.recv_into(&mut buf, 1), "one sender is left");
        let shared = rx.shared.clone();
        let waiter = std::thread::spawn(move || {
            let mut buf = VecDeque::new();
            let more = rx.recv_into(&mut buf, 1);
            (more, buf.len())
        });
        // The receiver is asleep on the empty queue (past its spin, in the wait) before the
        // last item comes: a receiver that ended early would never get there.
        wait_until(&shared, "receivers asleep", 1, |s| s.recv_waiting);
        tx2.send(2).unwrap();
        // The item wakes it (a lost wake-up fails here instead of hanging the join).
        wait_until(&shared, "receivers asleep", 0, |s| s.recv_waiting);
        drop(tx2);
        assert_eq!(waiter.join().unwrap(), (true, 1));
    }

    #[test]
    fn closing_ends_a_waiting_receiver_once_empty() {
        let (tx, rx) = queue(10);
        tx.send(5).unwrap();
        let close = rx.closer();
        close();
        let mut buf = VecDeque::new();
        assert!(rx.recv_into(&mut buf, 1), "queued items come first");
        assert!(!rx.recv_into(&mut buf, 1), "then the closed queue ends");
        drop(tx);
    }

    #[test]
    fn sends_fail_once_every_receiver_is_gone_even_a_blocked_one() {
        let (tx, rx) = queue(1);
        tx.send(1).unwrap();
        let blocked = std::thread::spawn(move || tx.send(2));
        // The sender is asleep on the full queue when the last receiver goes, and is woken.
        let shared = rx.shared.clone();
        wait_until(&shared, "senders blocked", 1, |s| s.send_waiting);
        drop(rx);
        wait_until(&shared, "senders blocked", 0, |s| s.send_waiting);
        assert_eq!(blocked.join().unwrap(), Err(2));
        let (tx, rx) = queue(2);
        drop(rx);
        let mut items = vec![1, 2, 3];
        assert_eq!(tx.send_all(&mut items), 3);
        assert!(tx.is_closed());
    }

    #[test]
    fn a_timed_receive_times_out_and_still_sees_items() {
        let (tx, rx) = queue(10);
        let mut buf = VecDeque::new();
        let t0 = Instant::now();
        assert_eq!(
            rx.recv_into_until(&mut buf, t0 + Duration::from_millis(30)),
            None
        );
        assert!(t0.elapsed() >= Duration::from_millis(30));
        tx.send(1).unwrap();
        assert_eq!(
            rx.recv_into_until(&mut buf, t0),
            Some(true),
            "ready items win"
        );
        drop(tx);
        assert_eq!(
            rx.recv_into_until(&mut buf, Instant::now() + Duration::from_secs(5)),
            Some(false)
        );
    }

    #[test]
    fn runs_keep_order_and_the_capacity_counts_their_items() {
        let (tx, rx) = queue(7);
        let probe = rx.len_probe();
        let shared = rx.shared.clone();
        let sender = std::thread::spawn(move || {
            let runs = tx.runs();
            drop(tx);
            (0..1000).all(|i| runs.send(i).is_ok())
        });
        let mut got = Vec::new();
        let mut buf = VecDeque::new();
        while rx.recv_into(&mut buf, 1) {
            {
                let s = shared.lock();
                assert!(s.items.len() + s.reserved <= 7, "over the capacity");
            }
            assert!(buf.len() <= 7 && probe() <= 7, "took {}", buf.len());
            got.extend(buf.drain(..));
        }
        assert!(sender.join().unwrap());
        assert_eq!(got, (0..1000).collect::<Vec<_>>());
        assert!(shared.lock().high_water <= 7);
        assert_eq!(shared.lock().reserved, 0, "every promise settled");
    }

    #[test]
    fn a_receiver_about_to_wait_takes_a_partial_run_and_its_credit() {
        let (tx, rx) = queue(4);
        let runs = tx.runs();
        runs.send(1).unwrap();
        // Nobody waited: the item is still in the run, with room promised for 3 more.
        assert_eq!(rx.len(), 0);
        assert_eq!(rx.shared.lock().reserved, 4);
        let mut buf = VecDeque::new();
        assert!(rx.recv_into(&mut buf, 1), "the run's item is taken");
        assert_eq!(buf.pop_front(), Some(1));
        // The unused credit went back: a plain sender fills the queue without waiting.
        assert_eq!(rx.shared.lock().reserved, 0);
        for i in 0..4 {
            tx.send(i).unwrap();
        }
        assert_eq!(rx.len(), 4);
        // The run sender's next item waits for room, holding nothing.
        let sender = std::thread::spawn(move || runs.send(9));
        wait_until(&rx.shared, "senders blocked", 1, |s| s.send_waiting);
        assert!(rx.recv_into(&mut buf, 1));
        assert_eq!(sender.join().unwrap(), Ok(()), "sent once there was room");
        drop(tx);
        assert!(rx.recv_into(&mut buf, 1));
        assert!(!rx.recv_into(&mut buf, 1), "the dropped run sender ended");
        assert_eq!(buf.into_iter().collect::<Vec<_>>(), [0, 1, 2, 3, 9]);
    }

    #[test]
    fn a_sleeping_receiver_is_woken_by_an_item_added_to_a_run() {
        let (tx, rx) = queue(100);
        let shared = rx.shared.clone();
        let waiter = std::thread::spawn(move || {
            let mut buf = VecDeque::new();
            let more = rx.recv_into(&mut buf, 1);
            (more, buf.into_iter().collect::<Vec<_>>())
        });
        wait_until(&shared, "receivers asleep", 1, |s| s.recv_waiting);
        let runs = tx.runs();
        runs.send(5).unwrap();
        // The item wakes it though the run is far from full (a lost wake-up fails the
        // join below instead of hanging: the run sender ends the stream when dropped).
        wait_until(&shared, "receivers asleep", 0, |s| s.recv_waiting);
        assert_eq!(waiter.join().unwrap(), (true, vec![5]));
        drop((tx, runs));
    }

    #[test]
    fn a_full_run_is_in_the_queue_at_once_not_at_the_next_emit() {
        // The run was promised the whole queue (4) and used it all: it is full, so its items
        // are in the queue, seen in its length and high-water mark, though the producer's
        // next emit may not come for a long time.
        let stats = Arc::new(StageStats::default());
        let (tx, rx) = channel(Capacity::Bounded(4), stats.clone());
        let runs = tx.runs();
        for i in 0..4 {
            runs.send(i).unwrap();
        }
        assert_eq!(rx.len(), 4, "the full run is still outside the queue");
        assert_eq!(stats.queue_high_water.load(Ordering::Relaxed), 4);
        assert_eq!(rx.shared.lock().reserved, 0, "no room is promised any more");
        // A run of the longest length, in a larger queue.
        let (tx2, rx2) = queue(1000);
        let runs2 = tx2.runs();
        for i in 0..RUN as u32 {
            runs2.send(i).unwrap();
        }
        assert_eq!(rx2.len(), RUN);
        runs2.send(0).unwrap();
        assert_eq!(rx2.len(), RUN, "the next run has begun");
        drop((tx, runs, tx2, runs2));
        let mut buf = VecDeque::new();
        assert!(rx.recv_into(&mut buf, 1));
        assert_eq!(buf.drain(..).collect::<Vec<_>>(), [0, 1, 2, 3]);
        assert!(rx2.recv_into(&mut buf, 1));
        assert_eq!(buf.len(), RUN + 1);
    }

    #[test]
    fn a_run_sender_fails_once_the_receiver_is_gone() {
        let (tx, rx) = queue(2);
        let runs = tx.runs();
        runs.send(1).unwrap();
        drop(rx);
        // Though the run has room promised for one more, the emit fails at once.
        assert_eq!(runs.send(2), Err(2));
    }

    #[test]
    fn the_high_water_mark_reaches_the_stage_statistics() {
        let stats = Arc::new(StageStats::default());
        let (tx, rx) = channel(Capacity::Bounded(50), stats.clone());
        let mut items: Vec<u32> = (0..30).collect();
        assert_eq!(tx.send_all(&mut items), 0);
        tx.send(1).unwrap();
        assert_eq!(stats.queue_high_water.load(Ordering::Relaxed), 31);
        drop(rx);
    }
}
