//! Dispatch: which worker gets the next item, and writing items to workers.
//!
//! Items go to workers that are alive, taking items, and hold fewer than the window's items
//! (`in_flight`, or what the items' time asks: `Supervisor::timed`; an async stage's:
//! `asynchronous::window`) and fewer than [`MAX_IN_FLIGHT_BYTES`] payload bytes (an async
//! stage's: `asynchronous::max_bytes`): in turn (round-robin) or to the one
//! holding the fewest. A worker is handed a run of items at once, as many as its window has
//! room for (the rest of the run goes next); an async worker, one item (its feeder makes no
//! runs). Retries that are due
//! go first, then new items in input order. Writes
//! are non-blocking: a slow worker never stalls the others, and what its pipe does not take
//! waits in its outbox for the next pass.

use super::feed::Encoded;
use super::flight::Flight;
use super::supervisor::Supervisor;
use crate::error::FailureKind;
use crate::exec::parts::dead_letter;
use crate::exec::Dispatch;
use crate::stage::Wire;
use crossbeam_channel::TryRecvError;
use std::time::Instant;

/// A worker is given no more items while it holds this many payload bytes (at least one
/// flight always fits: one item, or a run of at most one hand-off), so a large `in_flight`
/// is safe for large items.
pub(super) const MAX_IN_FLIGHT_BYTES: usize = 1 << 20;

impl<I: Wire, O: Wire> Supervisor<'_, I, O> {
    /// Hands items to workers while one has room: retries that are due first, then new
    /// items, round-robin.
    pub(super) fn dispatch(&mut self, now: Instant) {
        while let Some(slot) = self.next_worker() {
            let flight = if self
                .queue
                .front()
                .is_some_and(|f| f.not_before.is_none_or(|t| t <= now))
            {
                self.queue.pop_front().expect("front exists")
            } else {
                match self.incoming.next() {
                    Ok(Encoded::Flight(flight)) => flight,
                    Ok(Encoded::Failed {
                        index,
                        item,
                        message,
                    }) => {
                        // Encoding is deterministic: no retry (last attempt).
                        let attempt = self.parts.ctx.policy.retries + 1;
                        let (parts, kind) = (self.parts, FailureKind::Encode);
                        let dead = |f| dead_letter(parts, item, f);
                        let (release, router) = (&mut self.release, &mut self.router);
                        super::super::supervise::settle(
                            parts, release, router, index, attempt, kind, message, None, dead,
                        );
                        continue;
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        self.input_done = true;
                        break;
                    }
                }
            };
            // A run larger than the worker's room, or than its share among the workers with
            // room, is split; the rest goes next (to the next worker in turn).
            let room = self
                .room(slot)
                .min((flight.count as usize).div_ceil(self.with_room()));
            let flight = match flight.count as usize > room {
                true => {
                    let (head, rest) = flight.split(room);
                    self.queue.push_front(rest);
                    head
                }
                false => flight,
            };
            self.hand(slot, flight, now);
        }
    }

    /// How many items the worker in `slot` (which has room) takes now: what its window has
    /// room for, and no more than `max_items_per_worker` lets it be handed. (An async
    /// stage's flights are single items: nothing of theirs is split.)
    fn room(&self, slot: usize) -> usize {
        let w = self.workers[slot].as_ref().expect("chosen worker exists");
        let room = self.window.saturating_sub(w.items);
        let left = self
            .opts
            .max_items_per_worker
            .map_or(u64::MAX, |n| n.saturating_sub(w.handed));
        room.min(left.try_into().unwrap_or(usize::MAX)).max(1)
    }

    /// Queues `flight` for the worker in `slot`; an item that becomes its front starts its
    /// time limit now.
    fn hand(&mut self, slot: usize, flight: Flight, now: Instant) {
        let w = self.workers[slot].as_mut().expect("chosen worker exists");
        w.push(flight, now, self.opts.timeout);
        self.rr = slot + 1;
        self.recycle_if_due(slot, now);
    }

    /// Whether items are ready and a worker can take one now (then the loop goes round
    /// again instead of sleeping).
    pub(super) fn can_dispatch_more(&self) -> bool {
        !self.input_done
            && self.incoming.waiting()
            && self.next_worker().is_some()
            && !self.parts.ctx.run.aborting()
    }

    /// Writes what each worker's input pipe takes now. After a corrupt batched stream,
    /// batched workers get nothing more and are shut down once they have answered what they
    /// hold, to be replaced (`bury`).
    pub(super) fn write_inputs(&mut self) {
        for w in self.workers.iter_mut().flatten() {
            if self.strict && w.log.is_some() && w.flights.is_empty() && !w.killing() {
                w.shut_down(true);
            }
            w.flush_input();
        }
    }

    /// Items the workers hold.
    pub(super) fn in_flight(&self) -> usize {
        self.workers.iter().flatten().map(|w| w.items).sum()
    }

    /// Whether the worker in `slot` is alive, not shutting down and has room.
    fn has_room(&self, slot: usize) -> bool {
        self.workers[slot].as_ref().is_some_and(|w| {
            w.open()
                && !(self.strict && w.log.is_some())
                && w.items < self.window
                && w.bytes < self.max_bytes
        })
    }

    /// How many workers have room (at least 1: called once one has).
    fn with_room(&self) -> usize {
        (0..self.workers.len())
            .filter(|&s| self.has_room(s))
            .count()
            .max(1)
    }

    /// The next worker that is alive, not shutting down and has room: in turn (round-robin,
    /// the default) or the one holding the fewest items (least-loaded; ties in turn).
    pub(super) fn next_worker(&self) -> Option<usize> {
        let n = self.workers.len();
        let open = (0..n)
            .map(|k| (self.rr + k) % n)
            .filter(|&s| self.has_room(s));
        match self.opts.dispatch {
            Dispatch::RoundRobin => open.into_iter().next(),
            Dispatch::LeastLoaded => {
                open.min_by_key(|&s| self.workers[s].as_ref().map_or(0, |w| w.items))
            }
        }
    }
}
