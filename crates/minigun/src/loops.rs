//! Termination of routing loops.
//!
//! Outside loops, a stage ends when its queue disconnects (its last upstream ended). Inside a
//! loop (stages that can route items back to each other) that never happens: members hold
//! senders to each other. Each loop instead keeps one work counter:
//!
//! - one unit per edge from a stage outside the loop into it, released when that upstream
//!   stage has ended (its last sender is dropped);
//! - one unit per item sent into a member's queue (taken before the send), released when a
//!   member has finished with the item: processed, finally failed, or cancelled.
//!
//! A unit is only ever taken by someone who holds one (a live upstream, or a member busy
//! with an item), so once the counter reaches zero it stays there: no item is queued or in
//! process in the loop and none can arrive. The loop is then closed and its members end
//! together, as if their queues had disconnected.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Closes a member's queue (made by `queue::Receiver::closer`): its receivers end once it is
/// empty.
pub(crate) type Closer = Arc<dyn Fn() + Send + Sync>;

/// The work counter of one routing loop.
pub(crate) struct Loop {
    work: AtomicU64,
    /// Closes the members' queues; `None` once the loop is closed.
    close: Mutex<Option<Vec<Closer>>>,
}

impl std::fmt::Debug for Loop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loop").field("work", &self.work).finish()
    }
}

impl Loop {
    /// A loop with no unit yet: units are taken as the senders into it are made, then
    /// [`Loop::close_if_idle`] closes it if there were none.
    pub(crate) fn new() -> Arc<Loop> {
        Arc::new(Loop {
            work: AtomicU64::new(0),
            close: Mutex::new(Some(Vec::new())),
        })
    }
    /// Registers a member's queue, to be closed with the loop (at once if it already is).
    pub(crate) fn member(&self, closer: Closer) {
        let mut c = self.close.lock().unwrap_or_else(|e| e.into_inner());
        match c.as_mut() {
            Some(list) => list.push(closer),
            None => {
                drop(c);
                closer();
            }
        }
    }
    pub(crate) fn close_if_idle(&self) {
        if self.work.load(Ordering::SeqCst) == 0 {
            self.close();
        }
    }
    pub(crate) fn take(&self, n: u64) {
        self.work.fetch_add(n, Ordering::SeqCst);
    }
    pub(crate) fn release(&self, n: u64) {
        if n > 0 && self.work.fetch_sub(n, Ordering::SeqCst) == n {
            self.close();
        }
    }
    fn close(&self) {
        let closers = self.close.lock().unwrap_or_else(|e| e.into_inner()).take();
        for close in closers.into_iter().flatten() {
            close();
        }
    }
}

/// The unit an upstream outside the loop holds while it runs.
#[derive(Debug)]
pub(crate) struct Unit(Arc<Loop>);

impl Unit {
    pub(crate) fn new(lp: Arc<Loop>) -> Self {
        lp.take(1);
        Unit(lp)
    }
}

impl Drop for Unit {
    fn drop(&mut self) {
        self.0.release(1);
    }
}

/// What a sender into a loop member carries.
#[derive(Debug, Clone, Default)]
pub(crate) struct Membership {
    /// The loop of the target stage, if it is in one.
    pub(crate) lp: Option<Arc<Loop>>,
    /// The unit of this edge, if it comes from outside the loop: held (never read) so that
    /// dropping the edge's last sender releases it.
    #[allow(dead_code)]
    pub(crate) unit: Option<Arc<Unit>>,
}
