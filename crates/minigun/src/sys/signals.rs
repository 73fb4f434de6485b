//! SIGINT / SIGTERM handlers for the duration of runs.
//!
//! The handler only writes the signal number to a non-blocking self-pipe (async-signal-safe);
//! a watcher thread reads it and calls back into safe code. The handlers, the pipe and the
//! watcher exist only while at least one run holds them ([`acquire`] / [`release`]): the first
//! acquire saves the previous dispositions and starts the watcher, the last release puts the
//! dispositions back, closes the pipe and joins the watcher, so a process with no run active
//! holds no thread and no descriptor of ours.

#![allow(unsafe_code)]

use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::thread::JoinHandle;

/// The pipe's write end while handlers are installed, else -1.
static WRITE_FD: AtomicI32 = AtomicI32::new(-1);
/// Handlers between reading [`WRITE_FD`] and their write: the pipe is closed only at 0.
static IN_HANDLER: AtomicUsize = AtomicUsize::new(0);

/// What the installed handlers hold, and how many runs hold them.
struct Installed {
    holders: usize,
    saved: Vec<(Signal, SigAction)>,
    write: Option<OwnedFd>,
    watcher: Option<JoinHandle<()>>,
}

static STATE: Mutex<Installed> = Mutex::new(Installed {
    holders: 0,
    saved: Vec::new(),
    write: None,
    watcher: None,
});

extern "C" fn handler(sig: libc::c_int) {
    // Atomics are lock-free here, so async-signal-safe.
    IN_HANDLER.fetch_add(1, Ordering::SeqCst);
    let fd = WRITE_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let b = sig as u8;
        // SAFETY: write(2) is async-signal-safe; the buffer is a live local byte; the fd stays
        // open while IN_HANDLER is non-zero (see `release`).
        unsafe { libc::write(fd, (&b as *const u8).cast(), 1) };
    }
    IN_HANDLER.fetch_sub(1, Ordering::SeqCst);
}

/// Installs the handlers if no run holds them yet; `callback` runs on the watcher thread for
/// each signal. Every call is matched by one [`release`].
pub(crate) fn acquire(callback: fn(i32)) {
    let mut st = STATE.lock().unwrap_or_else(|e| e.into_inner());
    st.holders += 1;
    if st.holders > 1 {
        return;
    }
    let Ok((r, w)) = super::pipe(false) else {
        tracing::warn!("cannot create the signal pipe: SIGINT / SIGTERM keep their handlers");
        return;
    };
    if super::set_nonblocking(&w).is_err() {
        return;
    }
    let watcher = std::thread::Builder::new()
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
        });
    let Ok(watcher) = watcher else {
        tracing::warn!("cannot start the signal watcher: SIGINT / SIGTERM keep their handlers");
        return;
    };
    WRITE_FD.store(w.as_raw_fd(), Ordering::SeqCst);
    st.write = Some(w);
    st.watcher = Some(watcher);
    let action = SigAction::new(
        SigHandler::Handler(handler),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only touches atomics and calls write(2) on a pipe, which is
        // async-signal-safe.
        if let Ok(old) = unsafe { signal::sigaction(sig, &action) } {
            st.saved.push((sig, old));
        }
    }
}

/// Lets go of the handlers; the last holder puts back the dispositions saved by [`acquire`],
/// closes the pipe and joins the watcher.
///
/// The caller must not hold a lock that the watcher's callback takes.
pub(crate) fn release() {
    let mut st = STATE.lock().unwrap_or_else(|e| e.into_inner());
    st.holders = st.holders.saturating_sub(1);
    if st.holders > 0 {
        return;
    }
    for (sig, old) in st.saved.drain(..) {
        // SAFETY: re-installs the disposition that was in place before `acquire`.
        let _ = unsafe { signal::sigaction(sig, &old) };
    }
    WRITE_FD.store(-1, Ordering::SeqCst);
    // A handler that read the fd before it was cleared finishes its write first.
    while IN_HANDLER.load(Ordering::SeqCst) > 0 {
        std::thread::yield_now();
    }
    // Closing the write end ends the watcher's read with 0 bytes.
    st.write = None;
    if let Some(w) = st.watcher.take() {
        let _ = w.join();
    }
}

/// In a forked process that the parent ends itself (cow_fork's fork server): SIGTERM is
/// blocked (SIGINT is ignored, as in every child), so a SIGTERM to the whole process group
/// (from a terminal, `timeout` or a service manager) reaches the parent, which interrupts the
/// run and ends this process, instead of killing it under a live run; here it stays pending.
/// If the parent dies, `PR_SET_PDEATHSIG` still ends it. Its children keep the default
/// disposition and unblock SIGTERM (`fork_single`): they are not ended by what was pending
/// here (a child does not inherit pending signals), but by any SIGTERM sent to them.
pub(crate) fn leave_sigterm_to_the_parent() {
    let mut term = SigSet::empty();
    term.add(Signal::SIGTERM);
    let _ = signal::pthread_sigmask(signal::SigmaskHow::SIG_BLOCK, Some(&term), None);
}
