//! What differs for the workers of an async stage (`tasks_per_worker(n)`): the supervisor is
//! the same, but such a worker (`child_async`) runs up to `n` items at once and answers each
//! as it ends.
//!
//! - **Answers out of order.** Each frame names its item; an item's frames arrive together
//!   (its outputs, then `done`; or `error`). Its outputs are held here until its `done`
//!   ([`Answering`]), so an item that fails or dies half-answered delivers nothing, and a
//!   retry cannot deliver twice. A frame naming an item the worker does not hold is a
//!   protocol error.
//! - **Which items a dead worker had started.** The worker counts the items it takes off its
//!   input in a word of memory it shares with the parent (before decoding each). The items a
//!   worker was handed are numbered in order (`Flight::seq`), and it takes them in that
//!   order, so when it dies the parent knows exactly which it had started: those it had not
//!   answered fail with how it died (each is one failed attempt, for the stage's policy); the
//!   rest go back to the front of the queue, their attempt not counted, for any live worker.
//! - **Time limits.** The worker times its items itself (the future is dropped, the item fails
//!   with `Timeout`, the worker lives on). The parent only watches that a worker holding
//!   items answers something at least every `timeout` + [`STALL_GRACE`]: otherwise its runtime
//!   is stuck (a future blocks its thread) and it is killed; its started items then fail
//!   with `Timeout`.
//! - **The window** is `n` items, plus a quarter of `n` (1 to 256) waiting in the worker's
//!   pipe so that it never waits for the parent between two items ([`window`]).

use super::super::supervise::{exit_failure, Killed};
use super::flight::Flight;
use super::supervisor::Supervisor;
use super::worker::{Intake, Worker};
use crate::error::FailureKind;
use crate::exec::order::Partial;
use crate::ipc::message::{Done, FromChild};
use crate::ipc::{FINISH_ID, START_ID};
use crate::stage::Wire;
use crate::sys;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// How much longer than the per-item `timeout` a worker holding items may go without
/// answering any before it is killed.
pub(super) const STALL_GRACE: Duration = Duration::from_secs(1);

/// Items the parent keeps in an async worker that runs `n` at once.
pub(super) fn window(n: usize) -> usize {
    n + (n / 4).clamp(1, 256)
}

/// Payload bytes the parent keeps in an async worker at most, for a window of `window`
/// items: 1 MiB, or 8 KiB per item if that is more.
pub(super) fn max_bytes(window: usize) -> usize {
    (window << 13).max(1 << 20)
}

/// An async worker's item some of whose frames have arrived: its outputs so far, held until
/// its `done`.
pub(super) struct Answering<O> {
    pub(super) id: u64,
    held: Partial<O>,
}

impl<I: Wire, O: Wire> Supervisor<'_, I, O> {
    /// One message from an async worker, about item `id`. `Err`: the frame cannot be from
    /// this worker (a protocol error).
    pub(super) fn async_event(
        &mut self,
        slot: usize,
        id: u64,
        m: FromChild<O>,
        now: Instant,
    ) -> Result<(), String> {
        let w = self.workers[slot].as_mut().expect("live worker");
        let pid = w.child.pid;
        match (id, m) {
            (_, FromChild::Log(r)) => super::super::trace::emit(&self.parts.ctx.name, pid, &r),
            (START_ID, FromChild::Error(e)) => w.start_failed(e.message),
            (START_ID, _) => return Err("an output frame with the start-up id".into()),
            (FINISH_ID, FromChild::Result(o) | FromChild::ResultDone(o, _)) => {
                self.release.emit(u64::MAX, o, &mut self.router)
            }
            (FINISH_ID, FromChild::Routed(i, t)) => {
                let _ = self.parts.router.route_index(i, t);
            }
            (FINISH_ID, FromChild::Done(_)) => {}
            (FINISH_ID, FromChild::Error(e)) => {
                let m = format!("finish: {}", e.message);
                self.parts.ctx.stage_error(e.kind, m, Some(pid as u32));
            }
            (id, FromChild::Result(o)) => self.answering(slot, id).held.outs.push(o),
            (id, FromChild::Routed(i, t)) => self.answering(slot, id).held.routed.push((i, t)),
            (id, FromChild::ResultDone(o, latency_ns)) => {
                let d = Done {
                    latency_ns,
                    outputs: 1,
                };
                return self.async_done(slot, id, d, Some(o), now);
            }
            (id, FromChild::Done(d)) => return self.async_done(slot, id, d, None, now),
            (_, FromChild::Results { .. }) => {
                unreachable!("decoding refuses results frames from an async worker")
            }
            (id, FromChild::Error(e)) => {
                self.answering[slot] = None;
                let flight = self.answered(slot, id, now)?;
                self.failed(flight, e.kind, e.message, Some(pid as u32));
            }
        }
        Ok(())
    }

    /// The held outputs of item `id`, whose frames are arriving from the worker in `slot`
    /// (the decoder checked that no other item's are).
    fn answering(&mut self, slot: usize, id: u64) -> &mut Answering<O> {
        self.answering[slot].get_or_insert_with(|| Answering {
            id,
            held: Partial::default(),
        })
    }

    /// The worker in `slot` answered item `id`: its flight, if it holds it.
    fn answered(&mut self, slot: usize, id: u64, now: Instant) -> Result<Flight, String> {
        let w = self.workers[slot].as_mut().expect("live worker");
        let flight = w
            .answered(id, now, self.opts.timeout)
            .ok_or_else(|| format!("an answer for item {id}, which the worker does not hold"))?;
        w.reported += 1;
        Ok(flight)
    }

    /// Item `id` is finished (`last`: its only output, which came with its `done`): its held
    /// outputs go downstream (in input order with `ordered`), and it counts as done once they
    /// are sent.
    fn async_done(
        &mut self,
        slot: usize,
        id: u64,
        d: Done,
        last: Option<O>,
        now: Instant,
    ) -> Result<(), String> {
        let held = self.answering[slot].take();
        let flight = self.answered(slot, id, now)?;
        self.deaths = 0;
        let mut held = held.map_or_else(Partial::default, |a| a.held);
        let received = held.len() + usize::from(last.is_some());
        if received as u64 != d.outputs {
            let m = format!(
                "worker reported {} results, parent received {received}",
                d.outputs
            );
            let pid = self.workers[slot].as_ref().map(|w| w.child.pid as u32);
            self.failed(flight, FailureKind::Protocol, m, pid);
            return Ok(());
        }
        // The item's futures overlap: its busy time is its own latency.
        self.rec.latency_busy_local(d.latency_ns, d.latency_ns);
        let (release, router) = (&mut self.release, &mut self.router);
        held.deliver(flight.index, last, release, router, &self.parts.router);
        self.succeeded(slot, flight.index, Some(flight), now);
        Ok(())
    }

    /// How an async worker's death counts: every item it had started and not answered fails
    /// with how it died (one failed attempt each); the items it had not started stay in its
    /// flights, to go back to the queue.
    pub(super) fn judge_async_death(
        &mut self,
        slot: usize,
        w: &mut Worker,
        exit: sys::Exit,
        clean: bool,
    ) {
        self.answering[slot] = None;
        if let Intake::StartFailed(m) = w.intake() {
            let m = m.clone();
            return self.start_failure(slot, &m);
        }
        let started = started_by(w);
        let (ran, waiting) = std::mem::take(&mut w.flights)
            .into_iter()
            .partition::<Vec<_>, _>(|f| f.seq < started);
        w.flights = waiting.into();
        let aborting = self.parts.ctx.run.aborting();
        if ran.is_empty() {
            if !clean && !aborting {
                self.deaths += 1;
                let (_, m) = exit_failure(exit, false);
                tracing::warn!(stage = %self.parts.ctx.name, slot, message = %m, "idle worker died");
            }
            return;
        }
        let kill = w.kill().map(|k| k.why);
        let (kind, message) = match (kill, w.stream.corrupt.take()) {
            (Some(Killed::Cancelled), _) => (
                FailureKind::Cancelled,
                "run interrupted; worker terminated".to_string(),
            ),
            (_, Some(m)) => (FailureKind::Protocol, m),
            (Some(Killed::Timeout), _) => (
                FailureKind::Timeout,
                format!(
                    "the worker answered no item within {:?} and {STALL_GRACE:?} more; worker killed",
                    self.opts.timeout.unwrap_or_default()
                ),
            ),
            _ => exit_failure(exit, false),
        };
        self.deaths += 1;
        tracing::debug!(stage = %self.parts.ctx.name, slot, started = ran.len(),
            not_started = w.flights.len(), %kind, "an async worker ended with items in it");
        let pid = Some(w.child.pid as u32);
        for f in ran {
            self.failed(f, kind.clone(), message.clone(), pid);
        }
    }

    /// Items in the async workers, at most `n` each (what they run, or start as soon as
    /// they read it): the stage's in-flight count.
    pub(super) fn async_in_flight(&self) -> usize {
        let n = self.tasks.unwrap_or(0);
        self.workers.iter().flatten().map(|w| w.items.min(n)).sum()
    }
}

/// How many of the items handed to `w` it has started (0 for a sync worker).
fn started_by(w: &Worker) -> u64 {
    w.started
        .as_ref()
        .map_or(0, |m| m.word(0).load(Ordering::Relaxed))
}
