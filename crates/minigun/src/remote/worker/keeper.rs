//! The keeper of a run a worker serves: registration and heartbeats of the entries it holds,
//! when each is due, and the reclaim pass over entries idle past `claim_idle` (dead-lettered
//! past `max_deliveries`, else taken over one at a time).

use super::RunServer;
use crate::error::FailureKind;
use crate::ipc::codec::Codec;
use crate::remote::broker::*;
use crate::remote::wire;
use crate::stage::Wire;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::MutexGuard;
use std::time::{Duration, Instant};

impl<I: Wire, O: Wire, C: Codec> RunServer<'_, I, O, C> {
    /// Registration, heartbeats and reclaims, until the run is over for this worker.
    pub(super) fn keeper(&self, session: &mut Box<dyn Session>, done: &AtomicBool) {
        let beat = self
            .s
            .remote
            .heartbeat_every()
            .max(Duration::from_millis(10));
        let reclaim_every = (self.a.claim_idle / 4).max(Duration::from_millis(10));
        // Each is done when it is due, not whenever `changed` wakes the keeper (it is
        // notified whenever the local run settles items).
        let mut beat_due = Instant::now();
        let mut reclaim_due = Instant::now() + reclaim_every;
        // Entries the last pass left idle because one it took was still running: the next
        // pass comes as soon as that one is done, not a whole interval later.
        let mut backlog = false;
        while !done.load(Ordering::Relaxed) {
            let now = Instant::now();
            if now >= beat_due {
                beat_due = now + beat;
                // Entries claimed and not yet taken by the fetcher are kept too.
                let mut ids: Vec<EntryId> =
                    self.lock().held.values().map(|h| h.id.clone()).collect();
                ids.extend(self.claimed().iter().map(|d| d.id.clone()));
                let _ = session.register(&self.run, &self.info());
                if !ids.is_empty() {
                    let _ = session.heartbeat(&self.run, &self.consumer, &ids);
                }
            }
            if now >= reclaim_due {
                reclaim_due = now + reclaim_every;
                if !self.stop.load(Ordering::Relaxed) && !self.leaving.load(Ordering::Relaxed) {
                    backlog = self.reclaim(&mut **session);
                }
            }
            let book = self.lock();
            if done.load(Ordering::Relaxed) {
                break;
            }
            if backlog && book.suspects == 0 && self.claimed().is_empty() {
                backlog = false;
                reclaim_due = Instant::now();
                continue;
            }
            let due = beat_due.min(reclaim_due);
            let _ = self
                .changed
                .wait_timeout(book, due.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Entries idle past `claim_idle`: dead-lettered past `max_deliveries`, else taken over.
    /// Whether some were left because one taken over is still running.
    fn reclaim(&self, session: &mut dyn Session) -> bool {
        let Ok(idle) = session.pending_idle(&self.run, self.a.claim_idle, 100) else {
            return false;
        };
        let mut backlog = false;
        for p in idle {
            let Some(entry) = &p.entry else {
                // The entry is gone: a claim drops it from the pending list.
                let _ = session.claim(
                    &self.run,
                    &self.consumer,
                    self.a.claim_idle,
                    std::slice::from_ref(&p.id),
                );
                continue;
            };
            let total = entry.attempts.saturating_add(p.deliveries);
            if total >= self.a.max_deliveries {
                let f = self.failure(
                    FailureKind::WorkerLost { deliveries: total },
                    format!("the item was delivered {total} times and each time its worker was lost (last: {})", p.owner),
                    total,
                );
                let mut results = Vec::new();
                for i in super::entry_items(entry) {
                    wire::push_failed(&mut results, i, &f);
                }
                if let Ok(true) = session.dead_letter(&self.run, &p.id, self.a.claim_idle, &results)
                {
                    tracing::warn!(run = %self.run, entry = %p.id, deliveries = total, "an entry was dead-lettered");
                    self.lock().stats.dead_lettered += 1;
                }
                continue;
            }
            // One entry at a time, even when busy (an idle worker is not needed for a lost
            // worker's entry to move on): none while a claimed one waits for the fetcher or a
            // redelivered one runs here, which also keeps a poison entry from taking
            // another entry's delivery with it.
            if self.lock().suspects > 0 || !self.claimed().is_empty() {
                backlog = true;
                continue;
            }
            if let Ok(got) = session.claim(
                &self.run,
                &self.consumer,
                self.a.claim_idle,
                std::slice::from_ref(&p.id),
            ) {
                for d in got {
                    tracing::info!(run = %self.run, entry = %d.id, from = %p.owner, deliveries = d.deliveries, "reclaimed an entry of a lost worker");
                    self.lock().stats.reclaimed += 1;
                    self.reclaimed
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push_back(d);
                }
            }
        }
        backlog
    }

    /// Entries the keeper claimed that the fetcher has not taken yet.
    pub(super) fn claimed(&self) -> MutexGuard<'_, VecDeque<Delivery>> {
        self.reclaimed.lock().unwrap_or_else(|e| e.into_inner())
    }
}
