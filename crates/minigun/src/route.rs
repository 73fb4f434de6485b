//! Where a stage's items go: the [`Router`] (its downstream queues and fan-out rule) and
//! dynamic routing.
//!
//! Dynamic routing: a stage sends an item to a named stage instead of (or as well as) its
//! default downstream, with [`Output::to`](crate::Output::to).
//!
//! # How termination stays exact
//!
//! A stage may only route to targets it declared ([`StageRef::routes_to`](crate::StageRef::routes_to)).
//! Each declaration is an edge of the graph: the routing stage holds a sender to the target's
//! queue for as long as it runs, exactly like a static upstream. So a target fed only
//! dynamically ends when every stage that could still send to it has ended: no item is dropped
//! (a slow source keeps the target open) and nothing waits forever (the last source's end
//! closes it). Declared edges take part in cycle detection like static ones.
//!
//! Routing to an undeclared name, or with an item of the wrong type, is an
//! [`EmitError::Route`] naming the stage, the target and the types.
//!
//! From a fork child, a routed item crosses the pipe in a `routed` frame carrying the index of
//! the target in the stage's route table; the parent decodes it and sends it on.

use crate::erased::{take, Erased};
use crate::error::EmitError;
use crate::queue::{FanOut, QueueTx, RunSender};
use crate::stage::{Item, Routed, Sink, TypeInfo, Wire};
use crate::stats::StageStats;
use std::any::Any;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// Serialisation of a route's item type, for routing from fork children.
#[derive(Clone, Copy)]
pub(crate) struct RouteCodec {
    pub(crate) encode: fn(&(dyn Any + Send), &mut Vec<u8>) -> Result<(), String>,
    pub(crate) decode: fn(&[u8]) -> Result<Erased, String>,
}

impl RouteCodec {
    pub(crate) fn of<T: Wire>() -> Self {
        RouteCodec {
            encode: |item, out| match item.downcast_ref::<T>() {
                Some(t) => crate::ipc::codec::encode(t, out),
                None => Err(format!("expected {}", std::any::type_name::<T>())),
            },
            decode: |bytes| crate::ipc::codec::decode::<T>(bytes).map(|t| Box::new(t) as Erased),
        }
    }
}

/// Turns a target's `QueueTx<T>` (type-erased) into a sender of type-erased items.
pub(crate) type MakeSender = fn(Erased) -> SendFn;
pub(crate) type SendFn = Box<dyn Fn(Erased) -> Result<(), EmitError> + Send + Sync>;

pub(crate) fn make_sender<T: Item>(tx: Erased) -> SendFn {
    let tx = take::<QueueTx<T>>(tx);
    Box::new(move |item: Erased| match item.downcast::<T>() {
        Ok(t) => tx.send(*t).map_err(|_| EmitError::Closed),
        Err(_) => Err(EmitError::Route(format!(
            "the target takes {}, not this item's type",
            std::any::type_name::<T>()
        ))),
    })
}

/// A declared route, as the builder keeps it.
#[derive(Clone)]
pub(crate) struct RouteDecl {
    pub(crate) ty: TypeInfo,
    pub(crate) make: MakeSender,
    pub(crate) codec: Option<RouteCodec>,
}

/// One route of a running stage.
pub(crate) struct RouteEntry {
    pub(crate) name: String,
    /// The item type the target takes.
    pub(crate) ty: TypeInfo,
    pub(crate) send: SendFn,
    pub(crate) codec: Option<RouteCodec>,
}

/// The routes of a running stage, shared by its workers.
#[derive(Clone, Default)]
pub(crate) struct Routes {
    pub(crate) stage: Arc<str>,
    pub(crate) entries: Arc<[RouteEntry]>,
}

impl Routes {
    /// The route named `target`: its qualified name, or else a unique last part.
    pub(crate) fn index(&self, target: &str) -> Result<usize, EmitError> {
        if let Some(i) = self.entries.iter().position(|e| e.name == target) {
            return Ok(i);
        }
        let suffix = format!("/{target}");
        let found: Vec<usize> = (0..self.entries.len())
            .filter(|&i| self.entries[i].name.ends_with(&suffix))
            .collect();
        if found.len() > 1 {
            let names: Vec<&str> = found
                .iter()
                .map(|&i| self.entries[i].name.as_str())
                .collect();
            return Err(EmitError::Route(format!(
                "stage {:?}: route target {target:?} is ambiguous; it could be any of {names:?}",
                self.stage
            )));
        }
        found.first().copied().ok_or_else(|| {
            EmitError::Route(format!(
                "stage {:?} cannot route to {target:?}: not a declared route target (declared: {:?})",
                self.stage,
                self.entries.iter().map(|e| e.name.as_str()).collect::<Vec<_>>()
            ))
        })
    }

    /// The route named `target` for `item`: an undeclared target, or an item of a type the
    /// target does not take, is an [`EmitError::Route`] naming the route and both types (in
    /// the parent and in a fork child alike).
    pub(crate) fn resolve(&self, target: &str, item: &Routed) -> Result<usize, EmitError> {
        let i = self.index(target)?;
        let e = &self.entries[i];
        if (*item.item).type_id() != e.ty.id {
            return Err(EmitError::Route(format!(
                "route {:?} -> {:?}: the target takes {}, not {}",
                self.stage, e.name, e.ty.name, item.type_name
            )));
        }
        Ok(i)
    }

    pub(crate) fn send_index(&self, i: usize, item: Erased) -> Result<(), EmitError> {
        match self.entries.get(i) {
            Some(e) => (e.send)(item),
            None => Err(EmitError::Route(format!("route index {i} out of range"))),
        }
    }
}

/// A stage chained to its upstream (see `link::chain`), as one worker of the upstream holds
/// it: the downstream stage's worker, called on the upstream's thread with the items the
/// upstream emitted instead of a queue between them.
pub(crate) trait Link<O>: Send {
    /// Handles the items (emptying `items`) with the chained stage's own statistics, error
    /// policy and router; returns how long that took, in nanoseconds (the upstream's own
    /// timing leaves it out).
    fn handle(&mut self, items: &mut Vec<O>) -> u64;
    /// The upstream worker has ended: the chained instance finishes and sends what it holds.
    fn finish(&mut self);
}

/// Makes one chained worker per worker of the upstream stage (each `threads(n)` worker of
/// the upstream gets its own instance of the chained stage).
pub(crate) type MakeLink<O> = Arc<dyn Fn() -> Box<dyn Link<O>> + Send + Sync>;

/// The outgoing side of a stage: its downstream queues and the fan-out rule, or the stage
/// chained to it.
/// Each worker holds its own clone; dropping the last clone ends the downstream streams.
pub(crate) struct Router<O> {
    pub(crate) outs: Vec<QueueTx<O>>,
    /// The stage chained to this one (then `outs` is empty): a batched router makes its own
    /// instance of it ([`Router::batched`]).
    chain: Option<MakeLink<O>>,
    /// This worker's instance of the chained stage. Only touched through `&mut self`; the
    /// mutex makes the router `Sync`.
    link: Option<std::sync::Mutex<Box<dyn Link<O>>>>,
    /// Nanoseconds spent in the chained stage so far (see [`Router::nested`]); written by
    /// this router's worker only.
    nested: Arc<AtomicU64>,
    /// An item's attempt is under way ([`Router::begin`]): what it emits is held until it
    /// succeeds, and dropped if it fails.
    attempt: Attempt,
    mode: FanOut,
    rr: Arc<AtomicUsize>,
    stats: Arc<StageStats>,
    /// Set for producers: emits fail with `Stopped` once the run is stopping.
    stop: Option<Arc<AtomicBool>>,
    /// Declared dynamic-routing targets.
    pub(crate) routes: Routes,
    /// Batched mode (see [`Router::batched`]): items waiting to be sent, one list per output.
    /// Only touched through `&mut self` (`get_mut`, no locking); the mutex makes the router
    /// `Sync` for items that are only `Send`.
    pending: Option<std::sync::Mutex<Vec<Vec<O>>>>,
    /// Items emitted in batched mode and not yet added to `items_out` (added by `flush`).
    held_out: u64,
    /// Batched mode sends at once to a downstream asleep waiting (in-process workers, whose
    /// stage code may run long between flushes); a fork supervisor flushes after each read.
    eager: bool,
    /// A producer's senders of runs, one per output (`None`: that output takes items one by
    /// one), see [`Router::in_runs`].
    runs: Vec<Option<RunSender<O>>>,
}

/// What a batched router knows of the attempt under way ([`Router::begin`]).
#[derive(Default)]
struct Attempt {
    /// An attempt is under way.
    open: bool,
    /// `held_out` when it began: the one held list has grown by as many since; with several
    /// lists, `marks` has their lengths then (round robin, or a broadcast whose clone of an
    /// item panicked after some lists took it, grows them unevenly).
    held_out: u64,
    marks: Vec<usize>,
    /// It made a list full: a flush is due when it succeeds.
    full: bool,
    /// Its routed items, with their route's index. Only touched through `&mut self`; the
    /// mutex makes the router `Sync`.
    routed: std::sync::Mutex<Vec<(usize, Erased)>>,
}

/// A batched router sends an output's items once this many wait.
const MAX_PENDING: usize = 256;

/// Adds an item to a batched router's held lists by the fan-out rule; whether a list is full.
fn push_held<O: Clone>(pending: &mut [Vec<O>], mode: FanOut, rr: &AtomicUsize, item: O) -> bool {
    match (pending.len(), mode) {
        (0, _) => false,
        (1, _) => {
            pending[0].push(item);
            pending[0].len() >= MAX_PENDING
        }
        (n, FanOut::RoundRobin) => {
            let i = rr.fetch_add(1, Ordering::Relaxed) % n;
            pending[i].push(item);
            pending[i].len() >= MAX_PENDING
        }
        (n, FanOut::Broadcast) => {
            for p in &mut pending[..n - 1] {
                p.push(item.clone());
            }
            pending[n - 1].push(item);
            pending[0].len() >= MAX_PENDING
        }
    }
}

impl<O> Clone for Router<O> {
    fn clone(&self) -> Self {
        Router {
            outs: self.outs.clone(),
            chain: self.chain.clone(),
            // A batched clone holds items for its own instance of the chained stage.
            link: (self.pending.as_ref())
                .and(self.chain.as_ref())
                .map(|make| std::sync::Mutex::new(make())),
            nested: Arc::default(),
            attempt: Attempt::default(),
            mode: self.mode,
            rr: self.rr.clone(),
            stats: self.stats.clone(),
            stop: self.stop.clone(),
            routes: self.routes.clone(),
            pending: self
                .pending
                .as_ref()
                .map(|_| std::sync::Mutex::new(self.lists())),
            held_out: 0,
            eager: self.eager,
            // A clone sends item by item (only a producer's router, never cloned, has runs).
            runs: Vec::new(),
        }
    }
}

impl<O> Router<O> {
    /// One empty list of held items per output (the chained stage is the only output).
    fn lists(&self) -> Vec<Vec<O>> {
        let n = self.outs.len() + usize::from(self.chain.is_some());
        (0..n).map(|_| Vec::new()).collect()
    }

    /// Sends every held item; `Ok(true)` if there were any. `Err` counts the items closed
    /// downstreams (an aborting run) did not take, once per refusing downstream.
    ///
    /// With a chained stage, sending is calling it: it handles the items on this thread
    /// before `flush` returns.
    pub(crate) fn flush(&mut self) -> Result<bool, u64> {
        let Some(pending) = self.pending.as_mut() else {
            return Ok(false);
        };
        if self.held_out > 0 {
            self.stats
                .items_out
                .fetch_add(std::mem::take(&mut self.held_out), Ordering::Relaxed);
        }
        let pending = pending.get_mut().unwrap_or_else(|e| e.into_inner());
        let sent = if let Some(link) = self.link.as_mut() {
            let items = &mut pending[0];
            if items.is_empty() {
                return Ok(false);
            }
            let link = link.get_mut().unwrap_or_else(|e| e.into_inner());
            let ns = link.handle(items);
            // One writer: a plain store, no read-modify-write.
            let total = self.nested.load(Ordering::Relaxed) + ns;
            self.nested.store(total, Ordering::Relaxed);
            Ok(true)
        } else {
            Self::send_held(&self.outs, pending)
        };
        if self.attempt.open {
            // A fast run flushes between two items: the next attempt begins after this.
            self.mark();
        }
        sent
    }

    /// Counts the nanoseconds this router's chained stage has spent handling items so far
    /// (zero without one): a worker leaves what accrued during its items out of their time.
    pub(crate) fn nested(&self) -> Arc<AtomicU64> {
        self.nested.clone()
    }

    /// The worker ends: sends what it holds, then the chained stage's instance finishes and
    /// is dropped (dropping its router, which ends its downstreams once every instance has).
    pub(crate) fn finish_chain(&mut self) -> Result<bool, u64> {
        let sent = self.flush();
        if let Some(link) = self.link.take() {
            let mut link = link.into_inner().unwrap_or_else(|e| e.into_inner());
            link.finish();
        }
        sent
    }

    /// An item's attempt begins (a batched router of an in-process worker): what it emits is
    /// held, and its routed items too, until [`Router::commit`] (it succeeded) or
    /// [`Router::discard`] (it failed: they are dropped). Meanwhile nothing is sent: a list
    /// grows past 256 if the item emits that many, and a flush that falls due waits for the
    /// commit. Two stores, and one per list when there are several outputs.
    #[inline]
    pub(crate) fn begin(&mut self) {
        self.attempt.open = true;
        self.mark();
    }

    /// Where the attempt under way begins: what is held now stays if it fails.
    #[inline]
    fn mark(&mut self) {
        let a = &mut self.attempt;
        a.held_out = self.held_out;
        // Several lists may grow unevenly: by the fan-out rule (round robin), or when a
        // broadcast's clone panics after the first lists took the item.
        if self.outs.len() > 1 {
            if let Some(pending) = self.pending.as_mut() {
                let pending = pending.get_mut().unwrap_or_else(|e| e.into_inner());
                a.marks.clear();
                a.marks.extend(pending.iter().map(Vec::len));
            }
        }
    }

    /// The attempt under way failed: what it emitted is dropped.
    pub(crate) fn discard(&mut self) {
        let a = &mut self.attempt;
        if !a.open {
            return;
        }
        a.open = false;
        a.full = false;
        a.routed
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        let grown = (self.held_out - a.held_out) as usize;
        self.held_out = a.held_out;
        if let Some(pending) = self.pending.as_mut() {
            let pending = pending.get_mut().unwrap_or_else(|e| e.into_inner());
            let marked = pending.len() > 1;
            for (i, list) in pending.iter_mut().enumerate() {
                let mark = match marked {
                    true => a.marks[i],
                    false => list.len() - grown,
                };
                list.truncate(mark);
            }
        }
    }

    fn send_held(outs: &[QueueTx<O>], pending: &mut [Vec<O>]) -> Result<bool, u64> {
        let mut lost = 0;
        let mut sent = false;
        for (q, items) in outs.iter().zip(pending.iter_mut()) {
            if !items.is_empty() {
                sent = true;
                lost += q.send_all(items);
            }
        }
        match lost {
            0 => Ok(sent),
            n => Err(n),
        }
    }
}

impl<O> Drop for Router<O> {
    fn drop(&mut self) {
        // Workers flush before they end; this only matters if one unwinds past its flush
        // (an attempt under way then did not succeed).
        self.discard();
        let _ = self.flush();
    }
}

impl<O: Clone> Router<O> {
    pub(crate) fn new(outs: Vec<QueueTx<O>>, mode: FanOut, stats: Arc<StageStats>) -> Self {
        Router {
            outs,
            chain: None,
            link: None,
            nested: Arc::default(),
            attempt: Attempt::default(),
            mode,
            rr: Arc::new(AtomicUsize::new(0)),
            stats,
            stop: None,
            routes: Routes::default(),
            pending: None,
            held_out: 0,
            eager: true,
            runs: Vec::new(),
        }
    }

    /// A producer's router: what it emits moves into each downstream queue in runs
    /// ([`RunSender`]: one queue lock per run, and a waiting downstream takes a partial run
    /// itself, so an item never waits for the producer's next emit). Its outputs are still
    /// counted one by one, as they are emitted.
    pub(crate) fn in_runs(mut self) -> Self {
        self.runs = self.outs.iter().map(QueueTx::runs).collect();
        self
    }

    /// Counts an output: a producer's router is its stage's only writer of `items_out` (it
    /// runs on the producer's thread, and is never cloned), so a plain store does, no
    /// read-modify-write; other routers share the counter with their stage's other workers.
    fn count_out(&self) {
        let out = &self.stats.items_out;
        if self.runs.is_empty() {
            out.fetch_add(1, Ordering::Relaxed);
        } else {
            out.store(out.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        }
    }

    /// Sends an item to output `i`: into its run if it has one.
    fn send_to(&self, i: usize, item: O) -> Result<(), EmitError> {
        let sent = match self.runs.get(i) {
            Some(Some(run)) => run.send(item),
            _ => self.outs[i].send(item),
        };
        sent.map_err(|_| EmitError::Closed)
    }

    /// A router for one in-process worker: what the stage emits through [`Sink::send`] is
    /// held and sent in batches (one queue lock per batch instead of one per item): at once
    /// when a downstream is asleep waiting, when 256 are held, and by the worker (see
    /// `exec::local`) when it has handled the items it took and every 100 us while busy.
    ///
    /// With a chained stage, this is where the worker's own instance of it is made.
    pub(crate) fn batched(mut self) -> Self {
        self.pending = Some(std::sync::Mutex::new(self.lists()));
        if let Some(make) = &self.chain {
            self.link = Some(std::sync::Mutex::new(make()));
        }
        self
    }

    /// A router whose only output is a stage chained to this one.
    pub(crate) fn chained(mut self, make: MakeLink<O>) -> Self {
        debug_assert!(self.outs.is_empty(), "a chained stage is the only output");
        self.chain = Some(make);
        self
    }

    /// A batched router for a fork supervisor: what it sends through [`Sink::send`] is held
    /// until [`Router::flush`] (after each read of the children's pipes) or 256 are held,
    /// even while a downstream waits.
    pub(crate) fn batched_until_flush(self) -> Self {
        let mut r = self.batched();
        r.eager = false;
        r
    }

    fn hold(&mut self, item: O) -> Result<(), EmitError> {
        if let Some(stop) = &self.stop {
            if stop.load(Ordering::Relaxed) {
                return Err(EmitError::Stopped);
            }
        }
        self.held_out += 1;
        let pending = self
            .pending
            .as_mut()
            .expect("batched router")
            .get_mut()
            .unwrap_or_else(|e| e.into_inner());
        let full = push_held(pending, self.mode, &self.rr, item);
        if self.attempt.open {
            // Held until the attempt succeeds; the commit says when to send.
            self.attempt.full |= full;
            return Ok(());
        }
        // Send now when the batch is full, or when a downstream is asleep waiting for items
        // (it would gain nothing from the wait; a busy one takes the batch later).
        let idle = |q: &QueueTx<O>| q.awaited();
        if full || self.eager && self.outs.iter().any(idle) {
            // Every downstream gone: the run is aborting; the emit says so.
            if self.flush().is_err() && self.outs.iter().all(|q| q.is_closed()) {
                return Err(EmitError::Closed);
            }
        }
        Ok(())
    }

    pub(crate) fn stop_on(mut self, flag: Arc<AtomicBool>) -> Self {
        self.stop = Some(flag);
        self
    }

    /// Sends an item to a declared route target.
    pub(crate) fn route_dynamic(&self, target: &str, item: Routed) -> Result<(), EmitError> {
        self.check_stop()?;
        let i = self.routes.resolve(target, &item)?;
        self.routes.send_index(i, item.item)?;
        self.count_out();
        Ok(())
    }

    /// Sends an item decoded from a fork child's `routed` frame.
    pub(crate) fn route_index(&self, index: usize, item: Erased) -> Result<(), EmitError> {
        self.routes.send_index(index, item)?;
        self.count_out();
        Ok(())
    }

    /// The attempt under way succeeded: its outputs count (its routed items are sent now),
    /// and the next item's attempt begins here (a fast run opens one attempt for its first
    /// item and commits each: no `begin` per item). Whether a flush is due: a list is full,
    /// or a downstream is asleep waiting.
    #[inline]
    pub(crate) fn commit(&mut self) -> bool {
        self.mark();
        let a = &mut self.attempt;
        if !a
            .routed
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
        {
            self.send_routed();
        }
        let full = std::mem::take(&mut self.attempt.full);
        (full || self.eager && self.outs.iter().any(|q| q.awaited())) && self.held_out > 0
    }

    /// No attempt is under way any more (after its commit): what is emitted from here is
    /// sent as it would be outside a worker's items.
    #[inline]
    pub(crate) fn close(&mut self) {
        self.attempt.open = false;
    }

    /// Sends the routed items of the attempt that succeeded.
    #[cold]
    fn send_routed(&mut self) {
        let routed = self
            .attempt
            .routed
            .get_mut()
            .unwrap_or_else(|e| e.into_inner());
        let mut routed = std::mem::take(routed);
        for (i, item) in routed.drain(..) {
            // Refused only by a closed target (the run is aborting).
            let _ = self.route_index(i, item);
        }
        // The buffer is kept for the next attempt.
        *self
            .attempt
            .routed
            .get_mut()
            .unwrap_or_else(|e| e.into_inner()) = routed;
    }

    fn check_stop(&self) -> Result<(), EmitError> {
        match &self.stop {
            Some(stop) if stop.load(Ordering::Relaxed) => Err(EmitError::Stopped),
            _ => Ok(()),
        }
    }

    /// Sends an item at once (an unbatched router; a batched one holds through `Sink::send`).
    pub(crate) fn route(&self, item: O) -> Result<(), EmitError> {
        if let Some(stop) = &self.stop {
            if stop.load(Ordering::Relaxed) {
                return Err(EmitError::Stopped);
            }
        }
        debug_assert!(
            self.pending.is_none(),
            "a batched router sends through `Sink::send`"
        );
        debug_assert!(
            self.chain.is_none(),
            "a chained stage is called by a batched router"
        );
        self.count_out();
        match (self.outs.len(), self.mode) {
            (0, _) => Ok(()),
            (1, _) => self.send_to(0, item),
            (n, FanOut::RoundRobin) => {
                let i = self.rr.fetch_add(1, Ordering::Relaxed) % n;
                self.send_to(i, item)
            }
            (n, FanOut::Broadcast) => {
                let mut delivered = false;
                for i in 0..n - 1 {
                    delivered |= self.send_to(i, item.clone()).is_ok();
                }
                delivered |= self.send_to(n - 1, item).is_ok();
                if delivered {
                    Ok(())
                } else {
                    Err(EmitError::Closed)
                }
            }
        }
    }
}

impl<O: Clone> Sink<O> for Router<O> {
    fn send(&mut self, item: O) -> Result<(), EmitError> {
        if self.pending.is_some() {
            return self.hold(item);
        }
        Router::route(&*self, item)
    }
    fn route(&mut self, target: &str, item: Routed) -> Result<(), EmitError> {
        if self.attempt.open {
            self.check_stop()?;
            let i = self.routes.resolve(target, &item)?;
            let routed = self.attempt.routed.get_mut();
            let routed = routed.unwrap_or_else(|e| e.into_inner());
            routed.push((i, item.item));
            return Ok(());
        }
        self.route_dynamic(target, item)
    }
}
