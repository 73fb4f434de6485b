//! State shared by every stage of one run: stop and abort flags, the failures kept for the
//! report, the signal that stopped it, and the pipe that wakes fork supervisors on abort.

use crate::error::ItemFailure;
#[cfg(target_os = "linux")]
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
#[cfg(target_os = "linux")]
use std::sync::OnceLock;
use std::sync::{Arc, Mutex};

/// How many failures a run report keeps in full by default (all are counted); see
/// [`Pipeline::keep_failures`](crate::Pipeline::keep_failures).
pub const KEEP_FAILURES: usize = 100;

/// State shared by every stage of one run.
#[derive(Debug, Default)]
pub(crate) struct RunShared {
    /// Producers stop emitting.
    pub(crate) stop: Arc<AtomicBool>,
    abort: AtomicBool,
    cause: Mutex<Option<ItemFailure>>,
    failures: Mutex<Vec<ItemFailure>>,
    failures_total: AtomicU64,
    /// How many failures are kept in full.
    pub(crate) keep_failures: usize,
    /// The signal that stopped the run, or 0.
    pub(crate) signal: AtomicI32,
    /// The host program handles SIGINT / SIGTERM.
    pub(crate) no_signals: bool,
    /// The pipeline's name.
    pub(crate) pipeline: String,
    /// This run's id: unique across processes and hosts (remote stages name their keys
    /// with it).
    pub(crate) id: String,
    /// Huge pages for the parent's heap: the pipeline's setting and what each fork stage did.
    pub(crate) huge: crate::huge::RunHuge,
    /// Becomes readable when the run aborts: fork supervisors poll it.
    #[cfg(target_os = "linux")]
    abort_pipe: OnceLock<(OwnedFd, OwnedFd)>,
}

impl RunShared {
    pub(crate) fn new(no_signals: bool) -> Self {
        RunShared {
            no_signals,
            keep_failures: KEEP_FAILURES,
            ..RunShared::default()
        }
    }

    /// Shared state whose stop flag is `stop` (set from outside to stop).
    pub(crate) fn with_stop(stop: Arc<AtomicBool>, no_signals: bool) -> Self {
        RunShared {
            stop,
            ..RunShared::new(no_signals)
        }
    }

    /// The shared state of a run of the pipeline `pipeline`, with a new run id.
    pub(crate) fn named(pipeline: &str, no_signals: bool) -> Self {
        RunShared {
            pipeline: pipeline.to_string(),
            id: unique_id(),
            ..RunShared::new(no_signals)
        }
    }

    /// An fd that becomes readable once the run aborts (created on first use).
    #[cfg(target_os = "linux")]
    pub(crate) fn abort_fd(&self) -> &OwnedFd {
        &self
            .abort_pipe
            .get_or_init(|| {
                let (r, w) = crate::sys::pipe(true).expect("create abort pipe");
                if self.aborting() {
                    let _ = rustix::io::write(&w, &[1]);
                }
                (r, w)
            })
            .0
    }
    fn wake_supervisors(&self) {
        #[cfg(target_os = "linux")]
        if let Some((_, w)) = self.abort_pipe.get() {
            let _ = rustix::io::write(w, &[1]);
        }
    }
    #[inline]
    pub(crate) fn aborting(&self) -> bool {
        self.abort.load(Ordering::Relaxed)
    }
    pub(crate) fn record(&self, f: &ItemFailure) {
        self.failures_total.fetch_add(1, Ordering::Relaxed);
        let mut v = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if v.len() < self.keep_failures {
            v.push(f.clone());
        }
    }
    /// Aborts the run: producers stop, queued items are cancelled, children are terminated.
    pub(crate) fn abort(&self, cause: ItemFailure) {
        self.stop.store(true, Ordering::Relaxed);
        let mut c = self.cause.lock().unwrap_or_else(|e| e.into_inner());
        if c.is_none() {
            *c = Some(cause);
        }
        self.abort.store(true, Ordering::Relaxed);
        self.wake_supervisors();
    }
    /// A stop by signal: like an abort, but the report (not an error) says so.
    pub(crate) fn interrupt(&self, signal: i32) {
        self.signal.store(signal, Ordering::Relaxed);
        self.stop.store(true, Ordering::Relaxed);
        self.abort.store(true, Ordering::Relaxed);
        self.wake_supervisors();
    }
    /// The failures kept in full, and how many there were in all.
    /// The failure that aborted the run, if any (taken once, for the run's result).
    pub(crate) fn take_cause(&self) -> Option<ItemFailure> {
        self.cause.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    pub(crate) fn failures(&self) -> (Vec<ItemFailure>, u64) {
        let v = self
            .failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        (v, self.failures_total.load(Ordering::Relaxed))
    }
}

/// An id no other process or run shares: host, pid, time and a counter.
pub(crate) fn unique_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{}-{}-{nanos:x}-{}",
        host_name(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// This machine's host name (`localhost` if unknown).
pub(crate) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}
