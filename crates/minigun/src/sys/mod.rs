//! The only module with `unsafe`: fork, `_exit`, signal dispositions, fds, memory shared with
//! children ([`SharedMem`]). Linux only: mechanisms, no protocol (what the wire and the shared
//! memory carry is `ipc`'s).
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
//!   `catch_unwind`; flush stdout; `_exit`. (`tracing` in the child goes through a switch the
//!   parent installed on the forking thread; see `exec::fork::trace`.)
//! - The child never returns into the parent's frames, never unwinds out of the body, and never
//!   runs `atexit` handlers (`_exit`, not `exit`).
//!
//! [`fork_single`] forks the children of a process known to be single-threaded (cow_fork's
//! fork server) without those precautions, and without glibc's own (`_Fork`).
//!
//! Children are reaped by pid (`waitpid(pid)` after their pidfd became readable), never with
//! `waitpid(-1)`, which would steal the host program's children.

#![allow(unsafe_code)]

pub(crate) mod collapse;
pub(crate) mod fdpass;
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
    let title = title(name);

    // No thread of ours may be inside a global registration (tracing's dispatcher list) while
    // we fork: such code runs under this lock too (see `exec::fork::trace`).
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
            pidfd_of(child)
        }
        Err(e) => {
            drop(fork_lock);
            let _ = signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
            Err(e.into())
        }
    }
}

/// Forks a child of a single-threaded process whose signal state is known: cow_fork's fork
/// server (`exec::fork::forker`), itself a [`fork_child`] child, so every signal has its
/// default disposition but SIGINT and SIGPIPE (ignored, as a child wants them), and SIGTERM is
/// blocked ([`signals::leave_sigterm_to_the_parent`]); it installs no handler and runs no
/// other thread. So nothing is held or blocked across the fork (no other thread can hold a
/// lock, no handler can run), and the child only unblocks SIGTERM (one sent to it since the
/// fork is delivered then, not lost) instead of resetting every disposition; from there on it
/// is [`fork_child`]'s child: only `keep` (and stdio) stay open, `PR_SET_PDEATHSIG`, named
/// `name`, `body` under `catch_unwind`, stdout flushed, `_exit`. That is 33 system calls fewer
/// per child than [`fork_child`], and no page of the stdio locks written around the fork.
///
/// # Forked with `_Fork`, not `fork`
///
/// The server was forked from a process that has had threads, and glibc never forgets that:
/// its `fork()` would lock every malloc arena, the stdio list and the loader around each fork
/// and reset them all in the child (about 16 page faults per child, and arena pages the
/// server writes while its children share them). That protects locks another thread may hold;
/// this process has no other thread, and this thread holds none of them here, so the child
/// inherits them all free. glibc's `_Fork()` (public since 2.34, which `close_range` already
/// needs) forks without that: one `clone` as `fork` makes it (the kernel writes the child's
/// thread id where glibc keeps it, so `pthread_self`-based calls name the child's thread), and
/// the child's robust-mutex list registered again, as `fork` does. What it skips besides is
/// running `pthread_atfork` handlers: the child handlers of every library ran once, in this
/// process, when it was forked from the parent, and this process runs no code of the user's
/// since, so each child starts from that same just-forked state. (A handler that records
/// something of the forking process itself, such as a pid cached for later, sees the server,
/// not the child; the crate registers none.)
///
/// Only for a process that has those properties; returns in the parent only.
pub(crate) fn fork_single(
    keep: RawFd,
    name: &str,
    body: impl FnOnce() -> i32,
) -> io::Result<Child> {
    let parent = std::process::id() as i32;
    let title = title(name);
    // SAFETY: `_Fork` takes no argument and returns -1 (errno set), 0 in the child or the
    // child's pid. The calling process is single-threaded (see above) and this thread holds no
    // lock here, so the child inherits every lock free and may call anything. It runs only
    // `run_child`, which ends with `_exit` and never returns into the caller.
    let forked = unsafe { _Fork() };
    match forked {
        0 => {
            // As a plain system call: the libc and nix wrappers would each bring another page
            // of code into the child (a page fault each, in every child).
            let term: u64 = 1 << (libc::SIGTERM - 1);
            // SAFETY: rt_sigprocmask reads the 8-byte mask at `term` (alive for the call) and
            // writes nothing (no old mask asked for); unblocking SIGTERM is all it changes.
            unsafe {
                libc::syscall(
                    libc::SYS_rt_sigprocmask,
                    libc::SIG_UNBLOCK,
                    &term as *const u64,
                    std::ptr::null_mut::<u64>(),
                    8usize,
                )
            };
            run_child(parent, &[keep], &title, body)
        }
        ..0 => Err(io::Error::last_os_error()),
        child => pidfd_of(Pid::from_raw(child)),
    }
}

extern "C" {
    /// glibc's `fork` without fork handlers and without the lock resets of a process that
    /// has had threads (glibc 2.34 and later); see [`fork_single`].
    fn _Fork() -> libc::pid_t;
}

/// A process title for `PR_SET_NAME`: the first 15 bytes of `name`, NUL-terminated.
fn title(name: &str) -> [u8; 16] {
    let mut title = [0u8; 16];
    let n = name.len().min(15);
    title[..n].copy_from_slice(&name.as_bytes()[..n]);
    title
}

/// A pidfd for a child just forked; if none can be opened, the child is killed and reaped.
fn pidfd_of(child: Pid) -> io::Result<Child> {
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
    run_child(parent, keep, title, body)
}

/// The rest of a child's start once its signals are as it wants them, its body, its exit.
fn run_child(parent: i32, keep: &[RawFd], title: &[u8; 16], body: impl FnOnce() -> i32) -> ! {
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
    // Stdout is line-buffered (a partial line may wait); stderr is never buffered.
    let _ = io::stdout().flush();
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

/// A `poll` entry watching `fd` for input (or its end). A plain `pollfd` borrows nothing, so a
/// poll set can be kept from one `poll` to the next instead of made anew.
pub(crate) fn poll_entry(fd: &OwnedFd) -> libc::pollfd {
    libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Sleeps in `poll` until an entry of `fds` is ready (`revents` non-zero), with no time
/// limit; a signal ends the sleep early with no entry ready.
pub(crate) fn poll(fds: &mut [libc::pollfd]) -> io::Result<()> {
    for f in fds.iter_mut() {
        f.revents = 0;
    }
    // SAFETY: `fds` is a live, writable array of `fds.len()` pollfd structs: poll reads their
    // fds and events and writes their revents only (an fd that is not open is reported as
    // POLLNVAL, not used).
    let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
    match r {
        0.. => Ok(()),
        _ => match io::Error::last_os_error() {
            e if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            e => Err(e),
        },
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

/// The write end of a pipe made by [`input_pipe`], non-blocking: the only kind of fd
/// [`vmsplice`] hands pages to (into a read end it would write into the borrowed bytes).
pub(crate) struct PipeWriter(OwnedFd);

impl std::os::fd::AsFd for PipeWriter {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// A pipe that the parent feeds a child through: the read end (close-on-exec, blocking) and
/// the write end, non-blocking and grown to `bytes` (best effort).
pub(crate) fn input_pipe(bytes: usize) -> io::Result<(OwnedFd, PipeWriter)> {
    let (r, w) = pipe(false)?;
    set_nonblocking(&w)?;
    grow_pipe(&w, bytes);
    Ok((r, PipeWriter(w)))
}

/// Most buffers [`vmsplice`] hands over in one call.
pub(crate) const VMSPLICE_MAX: usize = 64;

/// Hands the pages holding `bufs` (at most [`VMSPLICE_MAX`]) to the pipe `fd`, without
/// copying them, and without blocking: the pipe keeps references to the pages, and its
/// reader gets whatever bytes they hold when it reads. Returns how many bytes were handed
/// over (`AGAIN`: the pipe is full).
///
/// The bytes are the reader's only if the caller leaves them unchanged, and their memory
/// unfreed, until the reader has read them or can no longer read (the rule of
/// `ipc::outbox`); otherwise the reader gets other bytes of this process's, never memory of
/// another process or freed memory (the kernel holds its own references to the pages).
pub(crate) fn vmsplice(fd: &PipeWriter, bufs: &[&[u8]]) -> rustix::io::Result<usize> {
    use rustix::pipe::{IoSliceRaw, SpliceFlags};
    let n = bufs.len().min(VMSPLICE_MAX);
    let mut raw: [IoSliceRaw<'_>; VMSPLICE_MAX] =
        std::array::from_fn(|_| IoSliceRaw::from_slice(&[]));
    for (r, b) in raw.iter_mut().zip(bufs) {
        *r = IoSliceRaw::from_slice(b);
    }
    // SAFETY: `fd` is the write end of a pipe (a `PipeWriter` is made only by `input_pipe`),
    // so the kernel only reads the memory of `bufs`, live shared borrows for the length of
    // this call; without `SpliceFlags::GIFT` the pages are not given away: the pipe holds
    // references of its own to them, which stay valid whatever this process does with the
    // memory later.
    unsafe { rustix::pipe::vmsplice(&fd.0, &raw[..n], SpliceFlags::NONBLOCK) }
}

/// Raw fd of an owned fd (for `keep` lists).
pub(crate) fn raw(fd: &OwnedFd) -> RawFd {
    fd.as_raw_fd()
}

/// Memory shared between the parent and the children it forks afterwards
/// (`MAP_SHARED | MAP_ANONYMOUS`): [`SharedMem::WORDS`] atomic header words, then
/// [`SharedMem::capacity`] bytes. It outlives the children.
///
/// This is only the mechanism: what the words and bytes mean, and who may write the bytes
/// when, is the caller's protocol (`ipc::results_log`). Within one process the bytes are
/// written only through `&mut self`; another process sharing the mapping that writes them
/// against the protocol can only make this one read wrong bytes, never memory outside the
/// mapping.
pub(crate) struct SharedMem {
    ptr: std::ptr::NonNull<u8>,
    map_len: usize,
}

// SAFETY: the mapping is owned by this value; its header is accessed atomically and its bytes
// are written only through `&mut self` in each process (another process's writes are the
// caller's protocol to order, see the type's docs).
unsafe impl Send for SharedMem {}
// SAFETY: as above.
unsafe impl Sync for SharedMem {}

impl SharedMem {
    /// Header words before the bytes.
    pub(crate) const WORDS: usize = 8;
    const HEADER: usize = 8 * Self::WORDS;

    /// A mapping of at least `cap` bytes after the header; the words start at 0.
    pub(crate) fn new(cap: usize) -> io::Result<Self> {
        let map_len = (Self::HEADER + cap).next_multiple_of(4096);
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
        Ok(SharedMem { ptr, map_len })
    }

    /// Header word `i` (below [`SharedMem::WORDS`]).
    pub(crate) fn word(&self, i: usize) -> &std::sync::atomic::AtomicU64 {
        assert!(i < Self::WORDS, "header word {i} of {}", Self::WORDS);
        // SAFETY: the header's words lie inside the live mapping, page-aligned, zero-filled at
        // creation (valid AtomicU64s) and only accessed atomically.
        unsafe {
            &*self
                .ptr
                .as_ptr()
                .add(8 * i)
                .cast::<std::sync::atomic::AtomicU64>()
        }
    }

    /// Bytes after the header.
    pub(crate) fn capacity(&self) -> usize {
        self.map_len - Self::HEADER
    }

    /// The first `len` bytes after the header (at most [`SharedMem::capacity`]).
    pub(crate) fn bytes(&self, len: usize) -> &[u8] {
        // SAFETY: the range is inside the live mapping (`len` capped at the capacity). In this
        // process the bytes are only written through `&mut self` (`write`), so they do not
        // change while this borrow lives; another process's writes are excluded by the
        // caller's protocol, and break at worst the values read (any byte is a valid `u8`).
        unsafe {
            std::slice::from_raw_parts(
                self.ptr.as_ptr().add(Self::HEADER),
                len.min(self.capacity()),
            )
        }
    }

    /// Copies `data` to bytes `at..at + data.len()`; `false` (nothing written) if that range
    /// is not inside the capacity.
    pub(crate) fn write(&mut self, at: usize, data: &[u8]) -> bool {
        if at
            .checked_add(data.len())
            .is_none_or(|end| end > self.capacity())
        {
            return false;
        }
        // SAFETY: the destination range is inside the mapping (checked above) and does not
        // overlap `data` (a borrow of memory this value does not hand out mutably); `&mut
        // self` excludes any borrow from `bytes` in this process.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.ptr.as_ptr().add(Self::HEADER + at),
                data.len(),
            );
        }
        true
    }
}

impl Drop for SharedMem {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; no borrow outlives `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.map_len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmsplice_hands_over_the_pages_themselves() {
        let (r, w) = input_pipe(1 << 16).unwrap();
        let mut buf = vec![b'a'; 8192];
        let n = vmsplice(&w, &[&buf[..4096], &buf[4096..]]).unwrap();
        assert_eq!(n, 8192);
        // The pipe holds the pages, not a copy: a change before the read is what is read
        // (which is why the outbox never changes or frees a payload a live reader may read).
        // (A fork by another thread in between would make this write copy the page; each
        // test runs in a process of its own under the suite's runner.)
        buf[0] = b'b';
        let mut got = vec![0; 8192];
        assert_eq!(rustix::io::read(&r, &mut got).unwrap(), 8192);
        assert_eq!((got[0], got[1], got[8191]), (b'b', b'a', b'a'));
        // A full pipe: as many bytes as fit, then AGAIN.
        rustix::pipe::fcntl_setpipe_size(&w, 4096).unwrap();
        let n = vmsplice(&w, &[&buf]).unwrap();
        assert!(n > 0 && n < buf.len(), "{n}");
        assert_eq!(vmsplice(&w, &[&buf[n..]]), Err(rustix::io::Errno::AGAIN));
    }

    /// Runs `server` in a process set up as cow_fork's fork server is (a [`fork_child`]
    /// child, SIGTERM blocked, no other thread): its exit code, 0 when all it checked held.
    fn as_a_fork_server(server: fn() -> i32) -> Exit {
        let child = fork_child(&[], "mg-test-srv", || {
            signals::leave_sigterm_to_the_parent();
            server()
        })
        .expect("fork the server-like process");
        reap(child.pid)
    }

    #[test]
    fn a_child_forked_by_fork_single_is_a_whole_process_of_its_own() {
        // Each check that fails gives its own exit code: 10 + the check's number in the
        // child, 20 + its number in the server-like process.
        fn server() -> i32 {
            let Ok((r, w)) = pipe(false) else { return 20 };
            let data: Vec<u64> = (0..1000).collect();
            let body = || {
                // The data of the forking process, through copy-on-write.
                if data.iter().sum::<u64>() != 499_500 {
                    return 11;
                }
                // glibc's idea of this thread is the child's: the CPU clock glibc derives
                // from the thread id it keeps for `pthread_self` reads (a stale id would name
                // the server's thread, whose clock this process may not read).
                let mut clock: libc::clockid_t = 0;
                let mut now = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                // SAFETY: `pthread_self` is this live thread; both out-pointers are live locals.
                let read = unsafe {
                    libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock) == 0
                        && libc::clock_gettime(clock, &mut now) == 0
                };
                if !read {
                    return 12;
                }
                // Threads, locks and the allocator work in it.
                let lock = std::sync::Mutex::new(vec![1u8; 1 << 20]);
                let sum = std::thread::scope(|s| {
                    s.spawn(|| lock.lock().map(|v| v.len()).unwrap_or(0)).join()
                });
                if sum.ok() != Some(1 << 20) {
                    return 14;
                }
                let pid = std::process::id().to_le_bytes();
                match rustix::io::write(&w, &pid) {
                    Ok(4) => 0,
                    _ => 15,
                }
            };
            let Ok(child) = fork_single(raw(&w), "mg-test-kid", body) else {
                return 21;
            };
            drop(w);
            let mut pid = [0u8; 4];
            if rustix::io::read(&r, &mut pid) != Ok(4) {
                return 22;
            }
            if i32::from_le_bytes(pid) != child.pid {
                return 23;
            }
            // Its pidfd is its own: readable once it has exited, not before it is reaped.
            let mut fds = [poll_entry(&child.pidfd)];
            if poll(&mut fds).is_err() || fds[0].revents == 0 {
                return 24;
            }
            match reap(child.pid) {
                Exit::Code(0) => 0,
                Exit::Code(c) if (10..20).contains(&c) => c,
                _ => 25,
            }
        }
        assert_eq!(as_a_fork_server(server), Exit::Code(0));
    }

    #[test]
    fn a_child_forked_by_fork_single_ends_as_a_child_of_fork_child_does() {
        // 0 when every child ended as expected; 20 + the case that did not.
        fn server() -> i32 {
            fn fork_then(body: fn() -> i32, then: impl FnOnce(&Child)) -> Option<Exit> {
                let child = fork_single(2, "mg-test-kid", body).ok()?;
                then(&child);
                Some(reap(child.pid))
            }
            fn sleep() -> i32 {
                std::thread::sleep(std::time::Duration::from_secs(30));
                0
            }
            let cases: [(Option<Exit>, Exit); 4] = [
                // A SIGTERM sent at once, before the child can have unblocked it (the server
                // blocks it), is delivered, not lost.
                (
                    fork_then(sleep, |c| fdpass::signal(c, libc::SIGTERM)),
                    Exit::Signal(libc::SIGTERM),
                ),
                (
                    fork_then(sleep, |c| fdpass::signal(c, libc::SIGKILL)),
                    Exit::Signal(libc::SIGKILL),
                ),
                (
                    fork_then(|| panic!("a panic in the child"), |_| {}),
                    Exit::Code(101),
                ),
                (
                    fork_then(|| std::process::abort(), |_| {}),
                    Exit::Signal(libc::SIGABRT),
                ),
            ];
            match cases.iter().position(|(got, want)| *got != Some(*want)) {
                None => 0,
                Some(k) => 20 + k as i32,
            }
        }
        assert_eq!(as_a_fork_server(server), Exit::Code(0));
    }

    #[test]
    fn shared_memory_keeps_its_bytes_inside_the_mapping() {
        let mut mem = SharedMem::new(100).unwrap();
        let cap = mem.capacity();
        assert!(cap >= 100);
        assert!(mem.write(0, b"abc"));
        assert!(mem.write(cap - 2, b"yz"));
        assert!(!mem.write(cap - 1, b"yz"), "past the end");
        assert!(!mem.write(usize::MAX, b"a"), "an offset that overflows");
        assert_eq!(mem.bytes(3), b"abc");
        assert_eq!(mem.bytes(usize::MAX).len(), cap, "capped at the capacity");
        mem.word(SharedMem::WORDS - 1)
            .store(7, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(
            mem.word(SharedMem::WORDS - 1)
                .load(std::sync::atomic::Ordering::Relaxed),
            7
        );
    }
}
