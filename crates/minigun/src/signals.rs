//! SIGINT / SIGTERM during a run: the run is interrupted (producers stop, queued items are
//! cancelled, fork children are terminated and reaped) and the report names the signal.
//! Handlers are installed when the first run starts and the previous ones restored when the
//! last run ends.

use crate::shared::RunShared;
use std::sync::{Arc, Mutex, Weak};

static ACTIVE: Mutex<Vec<Weak<RunShared>>> = Mutex::new(Vec::new());

/// Keeps the run registered for signals while alive.
pub(crate) struct Guard {
    shared: Weak<RunShared>,
}

impl Guard {
    pub(crate) fn install(shared: &Arc<RunShared>) -> Guard {
        let mut active = ACTIVE.lock().unwrap_or_else(|e| e.into_inner());
        active.retain(|w| w.strong_count() > 0);
        #[cfg(target_os = "linux")]
        if active.is_empty() {
            crate::sys::signals::install(on_signal);
        }
        active.push(Arc::downgrade(shared));
        Guard {
            shared: Arc::downgrade(shared),
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut active = ACTIVE.lock().unwrap_or_else(|e| e.into_inner());
        active.retain(|w| w.strong_count() > 0 && !w.ptr_eq(&self.shared));
        #[cfg(target_os = "linux")]
        if active.is_empty() {
            crate::sys::signals::restore();
        }
    }
}

#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
/// Called on the signal watcher thread (not in the handler) for each signal received.
fn on_signal(signal: i32) {
    let active = ACTIVE.lock().unwrap_or_else(|e| e.into_inner());
    for run in active.iter().filter_map(Weak::upgrade) {
        tracing::warn!(signal, "signal received: interrupting the run");
        run.interrupt(signal);
    }
}
