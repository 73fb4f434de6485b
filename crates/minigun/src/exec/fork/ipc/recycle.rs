//! Worker recycling (Python's `maxtasksperchild`): a worker that was handed
//! `max_items_per_worker` items, or whose resident memory passed `max_worker_rss`, takes no
//! more items. It is shut down like at the end of the input: it answers every item it holds,
//! flushes its stage instance (`Stage::finish`) and exits 0, and a fresh worker takes its
//! slot at once. No item is lost or run twice; ordering and retries are the parent's, so they
//! mean what they meant.

use super::supervisor::Supervisor;
use crate::stage::Wire;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// A worker's resident memory is read at most this often (a read is a file of `/proc`).
const RSS_EVERY: Duration = Duration::from_millis(1);

impl<I: Wire, O: Wire> Supervisor<'_, I, O> {
    /// Retires the worker in `slot` if it reached a recycling limit (after it was handed an
    /// item, or finished one).
    pub(super) fn recycle_if_due(&mut self, slot: usize, now: Instant) {
        let (max_items, max_rss) = (self.opts.max_items_per_worker, self.opts.max_worker_rss);
        let Some(w) = self.workers[slot].as_mut() else {
            return;
        };
        if !w.open() {
            return;
        }
        let items = max_items.is_some_and(|n| w.handed >= n);
        let memory = max_rss.is_some_and(|max| {
            if now.saturating_duration_since(w.rss_read) < RSS_EVERY {
                return false;
            }
            w.rss_read = now;
            crate::stats::rss_bytes(w.child.pid as u32) > max
        });
        if items || memory {
            let why = if items { "items" } else { "resident memory" };
            tracing::debug!(stage = %self.parts.ctx.name, pid = w.child.pid, why, "recycling an ipc worker");
            w.shut_down(true);
            let stats = &self.parts.ctx.stats;
            stats.recycled_workers.fetch_add(1, Ordering::Relaxed);
        }
    }
}
