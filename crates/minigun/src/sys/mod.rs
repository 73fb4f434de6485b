//! The only module with `unsafe`: fork, `_exit`, signal dispositions, fds. Linux only.
//!
//! # Forking from a multi-threaded process
//!
//! The parent runs other threads while it forks. In the child only the forking thread exists,
//! and every lock another thread held at that instant stays locked forever. [`fork_child`]
//! keeps the library's own path in the child free of such locks:
//!
//! - in the parent, around `fork()`: the stdout and stderr locks are held (so no other thread
//!   is inside them) and stdout is flushed (so the child does not inherit half a line to print
//!   twice); every signal is blocked (so no handler runs in the child before it resets them);
//! - in the child, in order: release the stdio locks; reset every signal disposition to the
//!   default (SIGINT ignored: the parent decides; SIGPIPE ignored: a closed pipe is an error,
//!   not a death) and unblock them; close every fd except stdio and the child's own pipes
//!   (or siblings would never see end-of-file); `PR_SET_PDEATHSIG = SIGKILL` and re-check the
//!   parent (it may have died before the prctl); name the process; run the body under
//!   `catch_unwind`; flush stdio; `_exit`. (`tracing` in the child goes through a switch the
//!   parent installed on the forking thread; see `exec::fork::log`.)
//! - The child never returns into the parent's frames, never unwinds out of the body, and never
//!   runs `atexit` handlers (`_exit`, not `exit`).
//!
//! Children are reaped by pid (`waitpid(pid)` after their pidfd became readable), never with
//! `waitpid(-1)`, which would steal the host program's children.

#![allow(unsafe_code)]

pub(crate) mod huge;
pub(crate) mod signals;

use nix::sys::signal::{self, SigHandler, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{ForkResult, Pid};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

/// The crate's fork lock: held across every `fork()`, and by code that takes a process-wide
/// lock another thread might be forking under (installing or removing a scoped `tracing`
/// dispatcher takes tracing's global registry lock).
pub(crate) fn fork_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A forked child: its pid and a pidfd that becomes readable when it exits.
#[derive(Debug)]
pub(crate) struct Child {
    pub(crate) pid: i32,
    pub(crate) pidfd: OwnedFd,
}

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exit {
    Code(i32),
    Signal(i32),
}

/// Forks a child that runs `body` and exits with its return value (101 if it panics).
/// `keep` are the fds the child keeps besides stdin, stdout and stderr.
/// Returns in the parent only.
pub(crate) fn fork_child(
    keep: &[RawFd],
    name: &str,
    body: impl FnOnce() -> i32,
) -> io::Result<Child> {
    let parent = std::process::id() as i32;
    let mut keep: Vec<RawFd> = keep.iter().copied().filter(|&fd| fd > 2).collect();
    keep.sort_unstable();
    keep.dedup();
    let mut title = [0u8; 16];
    let n = name.len().min(15);
    title[..n].copy_from_slice(&name.as_bytes()[..n]);

    // No thread of ours may be inside a global registration (tracing's dispatcher list) while
    // we fork: such code runs under this lock too (see `exec::fork::log`).
    let fork_lock = fork_lock();
    let mut out = io::stdout().lock();
    let err = io::stderr().lock();
    let _ = out.flush();
    let mut old = SigSet::empty();
    signal::pthread_sigmask(
        SigmaskHow::SIG_SETMASK,
        Some(&SigSet::all()),
        Some(&mut old),
    )
    .map_err(io::Error::from)?;
    // SAFETY: the child runs only `child_after_fork`, which follows the rules in the module
    // docs (no lock another thread may hold: the stdio locks are held by this thread across
    // the fork, and released by the child's copy of this thread) and ends with `_exit`; it
    // never returns into the caller.
    let forked = unsafe { nix::unistd::fork() };
    match forked {
        Ok(ForkResult::Child) => {
            // This thread's copies of the locks it held: release them in the child.
            drop(err);
            drop(out);
            drop(fork_lock);
            child_after_fork(parent, &keep, &title, body)
        }
        Ok(ForkResult::Parent { child }) => {
            drop(fork_lock);
            let _ = signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
            drop(err);
            drop(out);
            let pid = child.as_raw();
            match rustix::process::pidfd_open(
                rustix::process::Pid::from_raw(pid).expect("fork returned a positive pid"),
                rustix::process::PidfdFlags::empty(),
            ) {
                Ok(pidfd) => Ok(Child { pid, pidfd }),
                Err(e) => {
                    kill(pid, libc::SIGKILL);
                    let _ = waitpid(child, None);
                    Err(e.into())
                }
            }
        }
        Err(e) => {
            drop(fork_lock);
            let _ = signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
            Err(e.into())
        }
    }
}

fn child_after_fork(
    parent: i32,
    keep: &[RawFd],
    title: &[u8; 16],
    body: impl FnOnce() -> i32,
) -> ! {
    for sig in Signal::iterator() {
        if matches!(sig, Signal::SIGKILL | Signal::SIGSTOP) {
            continue;
        }
        let handler = match sig {
            Signal::SIGINT | Signal::SIGPIPE => SigHandler::SigIgn,
            _ => SigHandler::SigDfl,
        };
        // SAFETY: installing SIG_DFL / SIG_IGN runs no code of ours in a handler.
        let _ = unsafe { signal::signal(sig, handler) };
    }
    let _ = signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
    close_all_but(keep);
    // SAFETY: prctl with these arguments only changes this process's attributes.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        libc::prctl(libc::PR_SET_NAME, title.as_ptr(), 0, 0, 0);
    }
    if nix::unistd::getppid().as_raw() != parent {
        exit_now(70);
    }
    let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).unwrap_or(101);
    let _ = io::stdout().flush();
    let _ = io::stderr().flush();
    exit_now(code)
}

/// Closes every fd above 2 that is not in `keep` (sorted).
fn close_all_but(keep: &[RawFd]) {
    let mut from: u32 = 3;
    for &fd in keep {
        let fd = fd as u32;
        if fd > from {
            // SAFETY: closes fds this process no longer uses; `keep` and stdio stay open.
            unsafe { libc::close_range(from, fd - 1, 0) };
        }
        from = fd + 1;
    }
    // SAFETY: as above.
    unsafe { libc::close_range(from, u32::MAX, 0) };
}

/// Ends the process at once: no destructors, no `atexit` handlers, no stdio flush.
pub(crate) fn exit_now(code: i32) -> ! {
    // SAFETY: `_exit` is async-signal-safe and never returns.
    unsafe { libc::_exit(code) }
}

/// Sends a signal to a child (errors, such as an already reaped pid, are ignored).
pub(crate) fn kill(pid: i32, sig: i32) {
    if let Ok(s) = Signal::try_from(sig) {
        let _ = signal::kill(Pid::from_raw(pid), s);
    }
}

/// Reaps a child that has exited (its pidfd is readable); blocks otherwise.
pub(crate) fn reap(pid: i32) -> Exit {
    loop {
        match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::__WALL)) {
            Ok(WaitStatus::Exited(_, code)) => return Exit::Code(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Exit::Signal(sig as i32),
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return Exit::Code(-1),
        }
    }
}

/// A pipe whose ends are close-on-exec; the read end is non-blocking when asked.
pub(crate) fn pipe(nonblocking_read: bool) -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    if nonblocking_read {
        set_nonblocking(&r)?;
    }
    Ok((r, w))
}

/// Makes an fd non-blocking.
pub(crate) fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    let flags = rustix::fs::fcntl_getfl(fd)?;
    rustix::fs::fcntl_setfl(fd, flags | rustix::fs::OFlags::NONBLOCK)?;
    Ok(())
}

/// Grows a pipe's buffer (best effort; the system maximum applies).
pub(crate) fn grow_pipe(fd: &OwnedFd, bytes: usize) {
    let _ = rustix::pipe::fcntl_setpipe_size(fd, bytes);
}

/// Raw fd of an owned fd (for `keep` lists).
pub(crate) fn raw(fd: &OwnedFd) -> RawFd {
    fd.as_raw_fd()
}

/// A byte log shared between the parent and the child it forks afterwards
/// (`MAP_SHARED | MAP_ANONYMOUS`), which outlives the child.
///
/// An ipc worker appends the frames of each finished item here instead of writing them to its
/// pipe at once, and writes the log to the pipe in batches. If it dies in between, the parent
/// (after reaping it and reading its pipe to the end) takes the unsent frames from the log, so
/// no finished item's results are lost and none has to run again.
///
/// Layout: `base` (u64, stream offset of the first logged byte), `len` (u64), `running`
/// (u64, the child's progress), `owner` (u64: free, child or parent), then the bytes.
///
/// While the child lives, the log belongs to whoever holds `owner`: the child takes it around
/// every append and every write to the pipe ([`SharedLog::hold`]), the parent only to take the
/// logged bytes itself when they have waited too long ([`SharedLog::take`]: a worker busy with
/// a long item does not sit on finished results). Whoever holds it sees every byte before
/// `base` already in the pipe or taken, so the stream stays in order. Once the child is gone
/// the parent reads the log without asking.
pub(crate) struct SharedLog {
    ptr: std::ptr::NonNull<u8>,
    map_len: usize,
}

// SAFETY: the mapping is owned by this value; its header is accessed atomically and its bytes
// are written by one process (the child, single-threaded) and read by the parent only while it
// holds `owner` or after that process ended.
unsafe impl Send for SharedLog {}
// SAFETY: as above.
unsafe impl Sync for SharedLog {}

const LOG_HEADER: usize = 64;

/// Values of the `owner` word.
const FREE: u64 = 0;
const CHILD: u64 = 1;
const PARENT: u64 = 2;

impl SharedLog {
    /// A log holding up to `cap` bytes.
    pub(crate) fn new(cap: usize) -> io::Result<Self> {
        let map_len = (LOG_HEADER + cap).next_multiple_of(4096);
        // SAFETY: a fresh anonymous mapping, not aliasing anything; checked before use.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = std::ptr::NonNull::new(raw.cast::<u8>()).expect("mmap never returns null");
        let log = SharedLog { ptr, map_len };
        log.set_running(u64::MAX);
        Ok(log)
    }

    fn word(&self, i: usize) -> &std::sync::atomic::AtomicU64 {
        debug_assert!(i < 4);
        // SAFETY: the header's four words lie inside the live mapping, page-aligned, zero-filled
        // at creation (valid AtomicU64s) and only accessed atomically.
        unsafe {
            &*self
                .ptr
                .as_ptr()
                .add(8 * i)
                .cast::<std::sync::atomic::AtomicU64>()
        }
    }

    fn capacity(&self) -> usize {
        self.map_len - LOG_HEADER
    }

    /// Child side: the item the child is about to run (or, with a flag bit, has finished).
    pub(crate) fn set_running(&self, word: u64) {
        self.word(2)
            .store(word, std::sync::atomic::Ordering::Release);
    }

    /// Parent side: the last value of [`SharedLog::set_running`] (`u64::MAX` if none).
    pub(crate) fn running(&self) -> u64 {
        self.word(2).load(std::sync::atomic::Ordering::Acquire)
    }

    /// Child side: waits until the log is the child's (the parent may be taking its bytes,
    /// which takes microseconds) and keeps it until [`SharedLog::release`].
    pub(crate) fn hold(&self) {
        use std::sync::atomic::Ordering;
        let owner = self.word(3);
        let mut spins = 0u32;
        while owner
            .compare_exchange_weak(FREE, CHILD, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            spins += 1;
            match spins {
                0..64 => std::hint::spin_loop(),
                _ => std::thread::yield_now(),
            }
        }
    }

    /// Child side: gives the log back.
    pub(crate) fn release(&self) {
        self.word(3)
            .store(FREE, std::sync::atomic::Ordering::Release);
    }

    /// Parent side, while the child lives: takes the logged bytes if the child is not using
    /// the log. `catch_up(base)` must first receive every byte the child wrote to the pipe,
    /// which ends at `base` (the child cannot write more meanwhile); if it cannot, or the
    /// log is empty or busy, nothing is taken. The taken bytes count as written to the pipe.
    pub(crate) fn take(&self, catch_up: impl FnOnce(u64) -> bool) -> Option<Vec<u8>> {
        use std::sync::atomic::Ordering;
        let owner = self.word(3);
        if self.word(1).load(Ordering::Acquire) == 0
            || owner
                .compare_exchange(FREE, PARENT, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
        {
            return None;
        }
        if self.word(1).load(Ordering::Acquire) == 0 {
            // The child wrote the log out just before the parent got it.
            owner.store(FREE, Ordering::Release);
            return None;
        }
        let base = self.base();
        let bytes = match catch_up(base) {
            true => self.bytes().to_vec(),
            false => Vec::new(),
        };
        if !bytes.is_empty() {
            // As the child's `sent`: length first, so a death in between never makes the
            // taken bytes look unsent.
            self.word(1).store(0, Ordering::Release);
            self.word(0).fetch_add(bytes.len() as u64, Ordering::AcqRel);
        }
        owner.store(FREE, Ordering::Release);
        (!bytes.is_empty()).then_some(bytes)
    }

    /// The number of logged bytes (a hint while the child lives).
    pub(crate) fn len(&self) -> u64 {
        self.word(1).load(std::sync::atomic::Ordering::Acquire)
    }

    /// The logged bytes: the child's, to write them; the parent's, once the child is gone.
    /// The length is capped at the capacity: a child that scribbled over its header cannot
    /// make the parent read outside the mapping.
    pub(crate) fn bytes(&self) -> &[u8] {
        let len = self.word(1).load(std::sync::atomic::Ordering::Acquire) as usize;
        // SAFETY: the range is inside the live mapping (`len` capped at the capacity). The
        // bytes are only written through `&mut self` (`append`) by the one process that
        // appends (the child; a single thread), so they do not change while this borrow
        // lives; the parent reads them only while it holds `owner` (the child appends only
        // while it holds it) or after that child ended. Stage code that scribbles over the
        // mapping anyway can only make the parent read wrong bytes, which its decoder
        // rejects as a corrupt stream.
        unsafe {
            std::slice::from_raw_parts(self.ptr.as_ptr().add(LOG_HEADER), len.min(self.capacity()))
        }
    }

    /// Appends `data` if it fits (child side); `false` if the log is too full.
    pub(crate) fn append(&mut self, data: &[u8]) -> bool {
        let len = self.bytes().len();
        if len + data.len() > self.capacity() {
            return false;
        }
        // SAFETY: the destination range `len..len + data.len()` is inside the mapping (checked
        // above) and does not overlap `data` (a private buffer); `&mut self` excludes any
        // borrow from `bytes` in this process.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.ptr.as_ptr().add(LOG_HEADER + len),
                data.len(),
            );
        }
        self.word(1).store(
            (len + data.len()) as u64,
            std::sync::atomic::Ordering::Release,
        );
        true
    }

    /// The logged bytes were written to the pipe (child side): empty the log. The length is
    /// cleared before the base moves, so a death in between never makes old bytes look unsent.
    pub(crate) fn sent(&mut self) {
        let len = self.word(1).swap(0, std::sync::atomic::Ordering::AcqRel);
        self.word(0)
            .fetch_add(len, std::sync::atomic::Ordering::AcqRel);
    }

    /// Child side: `n` bytes went to the pipe directly (not through the log).
    pub(crate) fn wrote(&mut self, n: usize) {
        self.word(0)
            .fetch_add(n as u64, std::sync::atomic::Ordering::AcqRel);
    }

    /// The stream offset of the first logged byte: every byte the child wrote to the pipe
    /// before it, through the log or directly.
    pub(crate) fn base(&self) -> u64 {
        self.word(0).load(std::sync::atomic::Ordering::Acquire)
    }
}

impl Drop for SharedLog {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; no borrow outlives `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.map_len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parent_takes_logged_bytes_only_when_the_child_lets_it() {
        let mut log = SharedLog::new(4096).unwrap();
        assert!(
            log.take(|_| true).is_none(),
            "nothing logged, nothing taken"
        );
        log.wrote(10);
        log.hold();
        assert!(log.append(b"abc"));
        // The child holds the log: the parent takes nothing and waits for nothing.
        assert!(log
            .take(|_| panic!("not asked while the child holds the log"))
            .is_none());
        log.release();
        // The parent cannot catch up with the pipe: the log stays as it is.
        assert!(log.take(|base| base == 0).is_none());
        assert_eq!((log.base(), log.bytes()), (10, &b"abc"[..]));
        assert_eq!(log.take(|base| base == 10), Some(b"abc".to_vec()));
        assert_eq!((log.base(), log.len()), (13, 0));
        // The child goes on where the parent stopped.
        log.hold();
        assert!(log.append(b"de"));
        log.sent();
        log.release();
        assert_eq!((log.base(), log.len()), (15, 0));
    }
}
