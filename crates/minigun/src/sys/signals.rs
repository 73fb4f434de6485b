//! SIGINT / SIGTERM handlers for the duration of runs.
//!
//! The handler only writes the signal number to a non-blocking self-pipe (async-signal-safe);
//! a watcher thread reads it and calls back into safe code. The previous dispositions are
//! saved on install and put back on restore.

#![allow(unsafe_code)]

use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Mutex, OnceLock};

static WRITE_FD: AtomicI32 = AtomicI32::new(-1);
static SAVED: Mutex<Vec<(Signal, SigAction)>> = Mutex::new(Vec::new());
static WATCHER: OnceLock<OwnedFd> = OnceLock::new();

extern "C" fn handler(sig: libc::c_int) {
    let fd = WRITE_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let b = sig as u8;
        // SAFETY: write(2) is async-signal-safe; the buffer is a live local byte.
        unsafe { libc::write(fd, (&b as *const u8).cast(), 1) };
    }
}

/// Installs the handlers; `callback` runs on a watcher thread for each signal.
pub(crate) fn install(callback: fn(i32)) {
    WATCHER.get_or_init(|| {
        let (r, w) = super::pipe(false).expect("create signal pipe");
        super::set_nonblocking(&w).expect("non-blocking signal pipe");
        WRITE_FD.store(w.as_raw_fd(), Ordering::Relaxed);
        std::thread::Builder::new()
            .name("minigun-signals".into())
            .spawn(move || {
                let mut buf = [0u8; 16];
                loop {
                    match rustix::io::read(&r, &mut buf) {
                        Ok(0) => return,
                        Ok(n) => buf[..n].iter().for_each(|&s| callback(s as i32)),
                        Err(rustix::io::Errno::INTR) => continue,
                        Err(_) => return,
                    }
                }
            })
            .expect("spawn signal watcher");
        w
    });
    let action = SigAction::new(
        SigHandler::Handler(handler),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    let mut saved = SAVED.lock().unwrap_or_else(|e| e.into_inner());
    if !saved.is_empty() {
        return;
    }
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only calls write(2) on a pipe, which is async-signal-safe.
        if let Ok(old) = unsafe { signal::sigaction(sig, &action) } {
            saved.push((sig, old));
        }
    }
}

/// Puts back the dispositions saved by [`install`].
pub(crate) fn restore() {
    let mut saved = SAVED.lock().unwrap_or_else(|e| e.into_inner());
    for (sig, old) in saved.drain(..) {
        // SAFETY: re-installs the disposition that was in place before `install`.
        let _ = unsafe { signal::sigaction(sig, &old) };
    }
}
