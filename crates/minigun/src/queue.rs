//! Bounded stage input queues (the router that feeds them is in `route`).
//!
//! Invariants:
//! - every non-producer stage owns exactly one input queue; every upstream (static edge,
//!   dead-letter edge) holds one sender to it;
//! - end of stream is the queue disconnecting: it happens exactly when the last upstream has
//!   ended and dropped its sender, which is per-source end-of-stream accounting for free;
//! - a full bounded queue blocks the sender, so backpressure reaches the producer, and the
//!   queue length never exceeds its capacity (the high-water mark records the peak).

use crate::loops::Membership;
use crate::stats::StageStats;
use crossbeam_channel::{Receiver, Sender};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

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

pub(crate) fn channel<T>(cap: Capacity) -> (Sender<T>, Receiver<T>) {
    match cap {
        // A zero capacity would be a rendezvous channel; keep at least one slot.
        Capacity::Bounded(n) => crossbeam_channel::bounded(n.max(1)),
        Capacity::Unbounded => crossbeam_channel::unbounded(),
    }
}

/// A sender into a stage's queue that records the queue's high-water mark.
pub(crate) struct QueueTx<T> {
    tx: Sender<T>,
    target: Arc<StageStats>,
    loops: Membership,
    /// Sends through this handle, to sample the queue length (each clone counts its own).
    sends: AtomicU32,
}

/// The queue length is read after each of a sender's first sends, then after one send in
/// `SAMPLE_LEN_EVERY` (reading it costs about as much as the send itself). A queue that fills
/// up stays full across many sends, so its peak is still seen.
const SAMPLE_LEN_EVERY: u32 = 32;
const ALWAYS_SAMPLE_FIRST: u32 = 64;

impl<T> Clone for QueueTx<T> {
    fn clone(&self) -> Self {
        QueueTx {
            tx: self.tx.clone(),
            target: self.target.clone(),
            loops: self.loops.clone(),
            sends: AtomicU32::new(0),
        }
    }
}

impl<T> QueueTx<T> {
    pub(crate) fn new(tx: Sender<T>, target: Arc<StageStats>, loops: Membership) -> Self {
        QueueTx {
            tx,
            target,
            loops,
            sends: AtomicU32::new(0),
        }
    }

    /// Blocking send; `Err` gives the item back when the receiving stage is gone.
    pub(crate) fn send(&self, item: T) -> Result<(), T> {
        if let Some(lp) = &self.loops.lp {
            lp.take(1);
            if let Err(item) = self.push(item) {
                lp.release(1);
                return Err(item);
            }
            Ok(())
        } else {
            self.push(item)
        }
    }

    fn push(&self, item: T) -> Result<(), T> {
        self.tx.send(item).map_err(|e| e.0)?;
        let n = self.sends.fetch_add(1, Ordering::Relaxed);
        if n >= ALWAYS_SAMPLE_FIRST && !n.is_multiple_of(SAMPLE_LEN_EVERY) {
            return Ok(());
        }
        let len = self.tx.len();
        if len > self.target.queue_high_water.load(Ordering::Relaxed) {
            self.target
                .queue_high_water
                .fetch_max(len, Ordering::Relaxed);
        }
        Ok(())
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
