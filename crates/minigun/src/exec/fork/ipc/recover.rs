//! Recovery: what the supervisor does when a worker misbehaves or dies.
//!
//! - A batched worker busy with a long item does not sit on finished results: the parent
//!   takes them from its results log ([`Supervisor::take_held`]).
//! - A corrupt stream is a protocol error: nothing more of it is read, and the worker is
//!   killed ([`Supervisor::protocol_error`]).
//! - A worker that exited is read to the end, its results log replayed
//!   ([`Supervisor::recover`]), then buried ([`Supervisor::bury`]): the item it was running
//!   fails with the way it died, the items queued behind it go back to the front of the queue
//!   (their attempt not counted), items whose results a corrupt batched stream lost run again,
//!   and a replacement is forked, after a backoff if workers keep dying
//!   ([`Supervisor::respawn_due`]).

use super::super::supervise::{exit_failure, killed_for_another, Killed};
use super::flight::Flight;
use super::supervisor::Supervisor;
use super::worker::{spawn, Intake, Worker};
use super::TAKE_HELD_AFTER;
use crate::error::FailureKind;
use crate::exec::parts::dead_letter;
use crate::ipc::frame::{self, Kind};
use crate::ipc::message::{FromChild, Sender};
use crate::ipc::results_log::{whole_answers, Replay};
use crate::ipc::{FINISH_ID, START_ID};
use crate::stage::Wire;
use crate::sys;
use std::time::{Duration, Instant};

impl<I: Wire, O: Wire> Supervisor<'_, I, O> {
    /// Replaces dead workers whose backoff has passed, while there is work.
    pub(super) fn respawn_due(&mut self, now: Instant) {
        let ctx = &self.parts.ctx;
        let work_left = !self.input_done || !self.queue.is_empty() || self.in_flight() > 0;
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
    }

    /// A batched worker busy with a long item does not sit on finished results: once its log
    /// has held the same bytes for [`TAKE_HELD_AFTER`], the parent takes them itself (see
    /// `ResultsLog`), after every byte the worker wrote to its pipe before them.
    pub(super) fn take_held(&mut self, slot: usize, now: Instant) {
        let w = self.workers[slot].as_mut().expect("live worker");
        if w.stream.corrupt.is_some() || !w.alive() {
            w.held = None;
            return;
        }
        let Worker {
            log: Some(log),
            stream,
            held,
            looked,
            items,
            ..
        } = w
        else {
            return;
        };
        if *items < 2 || log.len() == 0 {
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
        if let Some(n) = stream.take_held(log) {
            tracing::debug!(stage = %self.parts.ctx.name, slot, bytes = n,
                "took finished results from a busy worker's log");
        }
        // What was read from the pipe on the way is decoded too, taken or not (the pipe will
        // not wake the poll for bytes already read).
        if stream.received != before {
            self.pump(slot);
        }
    }

    /// A worker has exited: reads its pipe to the end, then (with `batch_results`) takes the
    /// frames of the items it had finished but not written from its results log, so that only
    /// the item it was running (then the front of its flights) fails, and nothing runs twice.
    pub(super) fn recover(&mut self, slot: usize) {
        loop {
            let before = self.workers[slot]
                .as_ref()
                .expect("live worker")
                .stream
                .received;
            self.pump(slot);
            let w = self.workers[slot].as_ref().expect("live worker");
            // A grandchild holding the pipe open can keep it from reaching its end.
            if w.stream.eof || w.stream.received == before {
                break;
            }
        }
        let w = self.workers[slot].as_mut().expect("live worker");
        let Some(log) = &w.log else { return };
        let (received, pending) = (w.stream.received, w.stream.dec.pending_bytes());
        let replay = log.replay(received, pending, w.stream.corrupt.is_none());
        if replay == Replay::Nothing {
            return;
        }
        let intact = matches!(replay, Replay::Continue(_));
        tracing::debug!(stage = %self.parts.ctx.name, slot, bytes = log.bytes().len(), intact,
            "replaying the results a dead worker left in its log");
        let bytes = match replay {
            Replay::Continue(unsent) => {
                let unsent = unsent.to_vec();
                w.stream.dec.extend(&unsent);
                self.pump(slot);
                // The worker died while it added an answer to the log's last frame.
                let w = self.workers[slot].as_mut().expect("live worker");
                if let Some(frame) = whole_answers(w.stream.dec.pending_bytes()) {
                    w.stream.dec.clear();
                    w.stream.dec.extend(&frame);
                    self.pump(slot);
                }
                return;
            }
            Replay::Foreign(bytes) => bytes,
            Replay::Nothing => return,
        };
        // Foreign bytes in the stream: take the logged frames of the items still in flight,
        // in order. (Results of the front item that already arrived came from a write of
        // its own while it ran, never through the log: the log holds only its later ones.)
        let now = Instant::now();
        let mut dec = frame::Decoder::new(self.opts.max_frame);
        dec.extend(bytes);
        loop {
            let w = self.workers[slot].as_mut().expect("live worker");
            let (frames, from) = (
                super::super::supervise::child_frames(self.parts),
                w.sender(None),
            );
            let front = w.flights.front().map(|f| f.index);
            let next = dec.next(|kind, id, payload| {
                let reserved = id == START_ID || id == FINISH_ID;
                let from = match (kind, front) {
                    (Kind::Log, _) => from,
                    // A results frame may begin with answers of items answered before.
                    (Kind::Results, Some(f)) if !reserved && id < f => {
                        Sender::Worker { running: Some(id) }
                    }
                    _ if reserved || Some(id) != front => return None, // answered before
                    _ => from,
                };
                Some(frames.decode(from, kind, id, payload).map(|m| (id, m)))
            });
            match next {
                Ok(Some(None)) => continue,
                Ok(Some(Some(Ok((id, m))))) => {
                    let (id, m) = match (m, front) {
                        (FromChild::Results { mut outs, bad }, Some(f)) if id < f => {
                            let answered = usize::try_from(f - id).unwrap_or(usize::MAX);
                            if answered >= outs.len() {
                                continue;
                            }
                            outs.drain(..answered);
                            (f, FromChild::Results { outs, bad })
                        }
                        (m, _) => (id, m),
                    };
                    if self.message(slot, id, m, now).is_err() {
                        break;
                    }
                }
                Ok(None) => match whole_answers(dec.pending_bytes()) {
                    // The worker died while it added an answer to the log's last frame.
                    Some(frame) => {
                        dec.clear();
                        dec.extend(&frame);
                    }
                    None => break,
                },
                _ => break,
            }
        }
        let w = self.workers[slot].as_mut().expect("live worker");
        if w.reported > 0 {
            let n = std::mem::take(&mut w.reported);
            self.parts.ctx.stats.child_items(w.child.pid, n);
        }
    }

    /// A frame of the worker's stream was refused: nothing more of it is read, the worker is
    /// killed, and its running item will fail with `m`.
    pub(super) fn protocol_error(&mut self, slot: usize, m: String) {
        let w = self.workers[slot].as_mut().expect("live worker");
        if w.stream.discard(m) {
            w.kill_now();
        }
    }

    /// A worker has exited and its stream is drained: fail what it was running, requeue the
    /// rest, and schedule a replacement.
    pub(super) fn bury(&mut self, slot: usize) {
        let mut w = self.workers[slot].take().expect("live worker");
        // What happens next happens to the running item alone, not to its run.
        w.split_front();
        // What the item it was running sent is not delivered: that attempt failed.
        self.partial[slot].clear();
        self.parts.ctx.stats.child_ended(w.child.pid);
        let exit = w.exit().expect("buried workers have exited");
        let shut_down = matches!(w.intake(), Intake::Shutdown { .. });
        let clean = shut_down && w.flights.is_empty() && exit == sys::Exit::Code(0);
        let rerun = self.lost_to_corruption(slot, &mut w);
        match self.tasks {
            None => self.judge_death(slot, &mut w, exit, clean, rerun.is_some()),
            #[cfg(feature = "async")]
            Some(_) => self.judge_async_death(slot, &mut w, exit, clean),
            #[cfg(not(feature = "async"))]
            Some(_) => unreachable!("async stages need the feature"),
        }
        let cancelled = self.parts.ctx.run.aborting();
        self.requeue(slot, &mut w, rerun.unwrap_or_default(), cancelled);
        if cancelled {
            return;
        }
        let retired = *w.intake() == Intake::Shutdown { retired: true };
        if clean && retired {
            self.respawn[slot] = Some(Instant::now());
        } else if !clean {
            let backoff = match self.deaths {
                0..=1 => Duration::ZERO,
                d => Duration::from_millis(10u64 << (d.min(7) - 1)),
            };
            self.respawn[slot] = Some(Instant::now() + backoff);
        }
    }

    /// A corrupt stream with batched results: the parent cannot tell which of the items the
    /// worker ran since its last readable write did it, and what it wrote after the
    /// corruption is lost. Those items run again, on workers that now write each item's
    /// results before the next (so a repeat fails exactly the item that does it; batched
    /// workers get no more items and are replaced); no result of theirs arrived, so nothing
    /// is delivered twice. An item some of whose results did arrive is not run again: it
    /// fails with the protocol error. The corruption is a stage error. Returns the items to
    /// run again (`None`: the stream was not a corrupt batched one).
    fn lost_to_corruption(&mut self, slot: usize, w: &mut Worker) -> Option<Vec<Flight>> {
        let (Some(m), Some(_)) = (&w.stream.corrupt, &w.log) else {
            return None;
        };
        if !self.strict {
            tracing::warn!(stage = %self.parts.ctx.name, slot, "a worker's result stream was corrupt; its items run again, one write per item from now on");
        }
        self.strict = true;
        let pid = Some(w.child.pid as u32);
        self.parts
            .ctx
            .stage_error(FailureKind::Protocol, m.clone(), pid);
        let keep_front = usize::from(w.results > 0).min(w.flights.len());
        let rerun = w.flights.drain(keep_front..).collect();
        if keep_front == 0 {
            w.stream.corrupt = None;
        }
        Some(rerun)
    }

    /// How the worker's death counts: a start-up failure (the stage fails once workers keep
    /// failing to start), the failure of the item it was running (by how it died), or an
    /// idle worker's death.
    fn judge_death(
        &mut self,
        slot: usize,
        w: &mut Worker,
        exit: sys::Exit,
        clean: bool,
        corrupt: bool,
    ) {
        let pid = Some(w.child.pid as u32);
        if let Intake::StartFailed(m) = w.intake() {
            let m = m.clone();
            self.start_failure(slot, &m);
        } else if let Some(front) = w.flights.pop_front() {
            let kill = w.kill();
            // Killed for the time limit of an item that answered after all (the front was
            // that item when the kill began; a retry or a requeued item may follow it with a
            // lower index, so the items are compared, not their order): the item running
            // then goes back with the items behind it, its attempt not counted.
            let sent = w.results > 0 || w.stream.corrupt.is_some();
            let (why, timed_out) = (kill.map(|k| k.why), kill.and_then(|k| k.timed_out));
            if killed_for_another(why, timed_out, front.index, sent, exit) {
                tracing::debug!(stage = %self.parts.ctx.name, slot, item = front.index,
                    "worker killed for an earlier item's time limit; the item runs again");
                w.flights.push_front(front);
                return;
            }
            let (kind, message) = match (kill.map(|k| k.why), w.stream.corrupt.take()) {
                (Some(Killed::Cancelled), _) => (
                    FailureKind::Cancelled,
                    "run interrupted; worker terminated".to_string(),
                ),
                (_, Some(m)) => (FailureKind::Protocol, m),
                // Only the item that overran is a timeout.
                (Some(Killed::Timeout), _)
                    if kill.and_then(|k| k.timed_out) == Some(front.index) =>
                {
                    (
                        FailureKind::Timeout,
                        format!(
                            "no result within {:?}; worker killed",
                            self.opts.timeout.unwrap_or_default()
                        ),
                    )
                }
                _ => exit_failure(exit, w.stream.dec.pending() > 0),
            };
            self.deaths += 1;
            self.failed(front, kind, message, pid);
        } else if !clean && !corrupt && !self.parts.ctx.run.aborting() {
            self.deaths += 1;
            let (_, m) = exit_failure(exit, false);
            tracing::warn!(stage = %self.parts.ctx.name, slot, message = %m, "idle worker died");
        }
    }

    /// A worker failed to start (`m`): the stage fails once workers keep failing to start.
    pub(super) fn start_failure(&mut self, slot: usize, m: &str) {
        self.deaths += 1;
        if self.deaths as usize > 3 * self.workers.len() {
            self.parts.ctx.stage_failed(
                FailureKind::Start,
                format!("workers keep failing to start: {m}"),
            );
        } else {
            tracing::warn!(stage = %self.parts.ctx.name, slot, message = %m, "worker failed to start");
        }
    }

    /// Items queued behind the failed one were never started: back to the front of the
    /// queue (after the ones to run again, `rerun`), their attempt not counted; cancelled if
    /// the run is aborting.
    fn requeue(&mut self, slot: usize, w: &mut Worker, rerun: Vec<Flight>, cancelled: bool) {
        if !rerun.is_empty() && !cancelled {
            tracing::debug!(stage = %self.parts.ctx.name, slot, items = rerun.len(),
                "results lost in a corrupt stream; those items run again");
        }
        for f in w.flights.drain(..).rev().chain(rerun.into_iter().rev()) {
            if cancelled {
                self.parts.ctx.cancelled(u64::from(f.count));
            } else {
                self.queue.push_front(Flight {
                    payload: f.payload.detach(),
                    ..f
                });
            }
        }
    }

    /// A failed attempt at `f`, settled by the stage's policy: a retry goes to the back of
    /// the queue, after its backoff.
    pub(super) fn failed(
        &mut self,
        f: Flight,
        kind: FailureKind,
        message: String,
        pid: Option<u32>,
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
        let again = super::super::supervise::settle(
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
            self.queue.push_back(Flight {
                attempt,
                not_before: Some(not_before),
                payload: f.payload.detach(),
                ..f
            });
        }
    }
}
