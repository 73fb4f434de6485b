//! SIGINT / SIGTERM during a run: the run is interrupted (producers stop, queued items are
//! cancelled, fork children are terminated and reaped) and the report names the signal.
//! Handlers are installed when the first run starts; when the last run ends the previous
//! ones are restored and the watcher thread and its pipe are gone.

use crate::shared::RunShared;
use std::sync::{Arc, Mutex, Weak};

static ACTIVE: Mutex<Vec<Weak<RunShared>>> = Mutex::new(Vec::new());

/// Keeps the run registered for signals while alive.
pub(crate) struct Guard {
    shared: Weak<RunShared>,
}

impl Guard {
    pub(crate) fn install(shared: &Arc<RunShared>) -> Guard {
        ACTIVE
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::downgrade(shared));
        #[cfg(target_os = "linux")]
        crate::sys::signals::acquire(on_signal);
        Guard {
            shared: Arc::downgrade(shared),
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        ACTIVE
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|w| w.strong_count() > 0 && !w.ptr_eq(&self.shared));
        // Not under ACTIVE: the last release joins the watcher, whose callback takes it.
        #[cfg(target_os = "linux")]
        crate::sys::signals::release();
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
