//! Hand-written baselines straight against libc: fork-per-item loops and forked pipe workers.
//! They do the least a correct program can do, so they are the floor minigun is measured
//! against. The only module with `unsafe` besides the W4 mmap dataset.
//!
//! Children run only code that takes no lock (no allocation, no stdio) and end with `_exit`,
//! so forking while another thread of this process (a PSS sampler, minigun's signal watcher)
//! holds the allocator lock cannot deadlock them.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// getrusage(who).ru_maxrss in bytes.
pub(crate) fn max_rss(who: libc::c_int) -> u64 {
    // SAFETY: `rusage` is plain old data; zeroed is a valid value and getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage for the duration of the call.
    unsafe { libc::getrusage(who, &mut ru) };
    ru.ru_maxrss.max(0) as u64 * 1024
}

/// This process's counters from getrusage(RUSAGE_SELF), for per-run differences.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Counters {
    /// Minor page faults (in the parent after a fork: mostly copy-on-write breaks).
    pub(crate) minflt: u64,
    /// Voluntary context switches (blocking waits).
    pub(crate) nvcsw: u64,
    /// Involuntary context switches (preemptions).
    pub(crate) nivcsw: u64,
}

impl Counters {
    pub(crate) fn now() -> Counters {
        // SAFETY: `rusage` is plain old data; zeroed is a valid value and getrusage fills it.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `ru` is a valid, writable rusage for the duration of the call.
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
        Counters {
            minflt: ru.ru_minflt.max(0) as u64,
            nvcsw: ru.ru_nvcsw.max(0) as u64,
            nivcsw: ru.ru_nivcsw.max(0) as u64,
        }
    }

    /// What happened since `self`.
    pub(crate) fn since(self) -> Counters {
        let n = Counters::now();
        Counters {
            minflt: n.minflt - self.minflt,
            nvcsw: n.nvcsw - self.nvcsw,
            nivcsw: n.nivcsw - self.nivcsw,
        }
    }

    /// "x faults, y switches per item".
    pub(crate) fn per_item(&self, items: u64) -> String {
        let n = items.max(1) as f64;
        format!(
            "{:.1} minor faults, {:.1} context switches",
            self.minflt as f64 / n,
            (self.nvcsw + self.nivcsw) as f64 / n
        )
    }
}

/// Clock ticks per second of /proc/stat.
pub(crate) fn clock_ticks() -> i64 {
    // SAFETY: sysconf only reads a system constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t
    } else {
        100
    }
}

/// User + system CPU seconds of this process's reaped children (getrusage(RUSAGE_CHILDREN)).
pub(crate) fn children_cpu_secs() -> f64 {
    // SAFETY: `rusage` is plain old data; zeroed is a valid value and getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage for the duration of the call.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// A pipe: (read end, write end), close-on-exec.
pub(crate) fn pipe() -> io::Result<(RawFd, RawFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` has room for the two fds pipe2 writes.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    Ok((fds[0], fds[1]))
}

/// Asks for a larger pipe buffer (best effort).
pub(crate) fn grow_pipe(fd: RawFd, bytes: usize) {
    // SAFETY: F_SETPIPE_SZ only changes the pipe's capacity; failure is harmless.
    unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, bytes as libc::c_int) };
}

pub(crate) fn close(fd: RawFd) {
    // SAFETY: the caller owns `fd` and does not use it afterwards.
    unsafe { libc::close(fd) };
}

/// Writes all of `buf` (blocking fd).
pub(crate) fn write_all(fd: RawFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: `buf` is a live slice of `buf.len()` readable bytes.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

/// One read(2); 0 = end of file.
pub(crate) fn read_some(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is a live, writable slice of `buf.len()` bytes.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Reads until `buf` is full or end of file; returns how many bytes were read.
pub(crate) fn read_full(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    let mut off = 0;
    while off < buf.len() {
        match read_some(fd, &mut buf[off..])? {
            0 => break,
            n => off += n,
        }
    }
    Ok(off)
}

/// Reads exactly `n` bytes (or up to end of file) into a new `Vec`, straight into its
/// allocation (no zeroing, no second copy): what a stage that owns each item it receives
/// costs at least.
pub(crate) fn read_owned(fd: RawFd, n: usize) -> io::Result<Vec<u8>> {
    let mut v: Vec<u8> = Vec::with_capacity(n);
    while v.len() < n {
        let want = n - v.len();
        let room = &mut v.spare_capacity_mut()[..want];
        // SAFETY: `room` is writable, uninitialised memory of `room.len()` bytes inside
        // `v`'s allocation; read(2) writes at most that many bytes into it.
        let got = unsafe { libc::read(fd, room.as_mut_ptr().cast(), room.len()) };
        match got {
            0 => break,
            ..0 => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            got => {
                let len = v.len() + got as usize;
                // SAFETY: read(2) initialised the `got` bytes after the old length, and the
                // new length is within the capacity (`got <= room.len()`).
                unsafe { v.set_len(len) };
            }
        }
    }
    Ok(v)
}

/// Forks; the child runs `body` and `_exit`s with its result (it never returns here).
pub(crate) fn fork(body: impl FnOnce() -> i32) -> io::Result<libc::pid_t> {
    // SAFETY: the child only runs `body` (lock-free code: see the module docs) and then
    // `_exit`s; it never returns into the caller's frames or runs destructors.
    let pid = check(unsafe { libc::fork() })?;
    if pid == 0 {
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).unwrap_or(101);
        // SAFETY: `_exit` is async-signal-safe and never returns.
        unsafe { libc::_exit(code) }
    }
    Ok(pid)
}

/// waitpid(pid or -1, blocking); returns the reaped pid.
pub(crate) fn wait(pid: libc::pid_t) -> io::Result<libc::pid_t> {
    let mut status = 0;
    loop {
        // SAFETY: `status` is a valid int for waitpid to write.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r >= 0 {
            if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
                return Err(io::Error::other(format!(
                    "child {r} ended with status {status:#x}"
                )));
            }
            return Ok(r);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Blocks until one of `fds` is readable (or hung up); returns the ready flags.
pub(crate) fn poll_readable(fds: &[RawFd]) -> io::Result<Vec<bool>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `pfds` is a live array of `pfds.len()` pollfd structs.
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, -1) };
        if r >= 0 {
            return Ok(pfds.iter().map(|p| p.revents != 0).collect());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The raw fork-per-item loop: for each item, pipe + fork; the child computes `work(i)`,
/// writes 8 bytes and `_exit`s; the parent keeps `in_flight` children alive, and for each
/// reaps one (waitpid(-1)), reads its 8 bytes and closes the pipe.
/// Returns the wall time and the sum of the results.
pub(crate) fn fork_loop(
    items: u64,
    in_flight: usize,
    work: impl Fn(u64) -> u64,
) -> io::Result<(Duration, u64)> {
    let t0 = Instant::now();
    let mut live: Vec<(libc::pid_t, RawFd)> = Vec::with_capacity(in_flight);
    let mut sum = 0u64;
    let reap_one = |live: &mut Vec<(libc::pid_t, RawFd)>, sum: &mut u64| -> io::Result<()> {
        let pid = wait(-1)?;
        let k = live
            .iter()
            .position(|&(p, _)| p == pid)
            .ok_or_else(|| io::Error::other(format!("reaped a foreign child {pid}")))?;
        let (_, fd) = live.swap_remove(k);
        let mut b = [0u8; 8];
        let n = read_full(fd, &mut b)?;
        close(fd);
        if n != 8 {
            return Err(io::Error::other("child sent a short result"));
        }
        *sum = sum.wrapping_add(u64::from_le_bytes(b));
        Ok(())
    };
    for i in 0..items {
        if live.len() >= in_flight {
            reap_one(&mut live, &mut sum)?;
        }
        let (r, w) = pipe()?;
        let pid = fork(|| {
            let v = work(i).to_le_bytes();
            match write_all(w, &v) {
                Ok(()) => 0,
                Err(_) => 1,
            }
        })?;
        close(w);
        live.push((pid, r));
    }
    while !live.is_empty() {
        reap_one(&mut live, &mut sum)?;
    }
    Ok((t0.elapsed(), sum))
}

/// Persistent forked workers, each with an input pipe and an output pipe.
#[derive(Debug)]
pub(crate) struct Workers {
    pub(crate) pids: Vec<libc::pid_t>,
    /// Parent's write ends (worker input).
    pub(crate) inputs: Vec<RawFd>,
    /// Parent's read ends (worker output).
    pub(crate) outputs: Vec<RawFd>,
}

impl Workers {
    /// Forks `n` workers running `body(input, output)`. Each child closes every parent-side
    /// fd (its own and its older siblings'), so closing an input gives its worker EOF.
    pub(crate) fn spawn(n: usize, body: impl Fn(RawFd, RawFd) -> i32) -> io::Result<Workers> {
        let mut w = Workers {
            pids: Vec::with_capacity(n),
            inputs: Vec::with_capacity(n),
            outputs: Vec::with_capacity(n),
        };
        for _ in 0..n {
            let (in_r, in_w) = pipe()?;
            let (out_r, out_w) = pipe()?;
            grow_pipe(in_w, 1 << 20);
            grow_pipe(out_w, 1 << 20);
            w.inputs.push(in_w);
            w.outputs.push(out_r);
            let parent_fds: Vec<RawFd> = w.inputs.iter().chain(&w.outputs).copied().collect();
            let pid = fork(|| {
                for &fd in &parent_fds {
                    close(fd);
                }
                body(in_r, out_w)
            })?;
            close(in_r);
            close(out_w);
            w.pids.push(pid);
        }
        Ok(w)
    }

    /// Reads every worker's output until all of them closed it, handing `(worker, bytes)` to
    /// `f`; then reaps the workers. Inputs must be closed (by a writer thread) for this to end.
    pub(crate) fn drain(self, buf_size: usize, mut f: impl FnMut(usize, &[u8])) -> io::Result<()> {
        let mut open: Vec<usize> = (0..self.outputs.len()).collect();
        let mut buf = vec![0u8; buf_size];
        while !open.is_empty() {
            let fds: Vec<RawFd> = open.iter().map(|&k| self.outputs[k]).collect();
            let ready = poll_readable(&fds)?;
            let mut closed = Vec::new();
            for (j, &k) in open.iter().enumerate() {
                if !ready[j] {
                    continue;
                }
                match read_some(self.outputs[k], &mut buf)? {
                    0 => closed.push(k),
                    n => f(k, &buf[..n]),
                }
            }
            open.retain(|k| !closed.contains(k));
        }
        for &fd in &self.outputs {
            close(fd);
        }
        for &pid in &self.pids {
            wait(pid)?;
        }
        Ok(())
    }

    /// [`Workers::drain`] for workers that answer with little-endian u64s: their wrapping
    /// sum (a u64 may arrive split across reads).
    pub(crate) fn sum_u64s(self, buf_size: usize) -> io::Result<u64> {
        let mut carry: Vec<Vec<u8>> = vec![Vec::new(); self.outputs.len()];
        let mut sum = 0u64;
        self.drain(buf_size, |k, bytes| {
            let c = &mut carry[k];
            c.extend_from_slice(bytes);
            let whole = c.len() / 8 * 8;
            for x in c[..whole].chunks_exact(8) {
                sum = sum.wrapping_add(u64::from_le_bytes(x.try_into().expect("8 bytes")));
            }
            c.drain(..whole);
        })?;
        Ok(sum)
    }
}

/// Sends `sig` to process `pid` (one this program started and has not reaped yet).
pub(crate) fn signal(pid: u32, sig: libc::c_int) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(io::Error::other)?;
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    check(unsafe { libc::kill(pid, sig) }).map(drop)
}

/// Most children in flight for [`fork_server_loop`] (its tables are fixed arrays: the server
/// allocates nothing after it is forked).
const SERVER_MAX: usize = 32;
/// One report entry of [`fork_server_loop`]'s server: tag (0 forked, 1 exited), item index,
/// pid or exit status.
const ENTRY: usize = 1 + 8 + 4;

/// A hand-written fork server: the least that minigun's `fork_server` has to do, straight
/// against libc, so the limit of that design is a measurement. The parent forks one
/// single-threaded server; it reads item indices from a pipe and forks one child per item (at
/// most `in_flight` alive); each child computes `work(i)`, writes its 8 bytes to a pipe of its
/// own and `_exit`s. The server opens a pidfd for each child (to see it exit while it waits
/// for input; minigun's parent also signals children through it) and sends the parent, on a
/// `SOCK_SEQPACKET` socket, one record per fork: the child's pipe and pidfd (`SCM_RIGHTS`),
/// with the exit statuses of the children reaped since the last record. The parent keeps up
/// to `2 * in_flight` items sent, and reads a child's result once its exit is reported.
/// What it leaves out against minigun: no frames or codec (8 raw bytes), no reading of a
/// child's pipe while it runs (results are read after its exit), no time limits, no stage
/// code, hooks or statistics, no threads in the parent.
pub(crate) fn fork_server_loop(
    items: u64,
    in_flight: usize,
    work: impl Fn(u64) -> u64,
) -> io::Result<(Duration, u64)> {
    let in_flight = in_flight.clamp(1, SERVER_MAX);
    let t0 = Instant::now();
    let (in_r, in_w) = pipe()?;
    let mut sv = [0 as RawFd; 2];
    // SAFETY: `sv` has room for the two fds socketpair writes.
    check(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            sv.as_mut_ptr(),
        )
    })?;
    let (parent_sock, server_sock) = (sv[0], sv[1]);
    let server = fork(|| {
        close(in_w);
        close(parent_sock);
        serve(in_r, server_sock, in_flight, &work)
    })?;
    close(in_r);
    close(server_sock);
    let result = fork_server_parent(items, in_flight, in_w, parent_sock);
    close(in_w);
    close(parent_sock);
    wait(server)?;
    result.map(|sum| (t0.elapsed(), sum))
}

/// The parent of [`fork_server_loop`]: sends indices, takes reports, reads results.
fn fork_server_parent(items: u64, in_flight: usize, input: RawFd, sock: RawFd) -> io::Result<u64> {
    // item index -> (pipe, pidfd) of its child
    let mut open: Vec<Option<(RawFd, RawFd)>> = vec![None; items as usize];
    let (mut sent, mut done, mut sum) = (0u64, 0u64, 0u64);
    let mut buf = [0u8; ENTRY * (SERVER_MAX + 2)];
    while done < items {
        while sent < items && sent - done < 2 * in_flight as u64 {
            write_all(input, &sent.to_le_bytes())?;
            sent += 1;
        }
        let (n, fds) = recv_with_fds(sock, &mut buf)?;
        if n == 0 {
            return Err(io::Error::other("the fork server closed its socket"));
        }
        let mut fds = fds.into_iter();
        for e in buf[..n].chunks_exact(ENTRY) {
            let i = u64::from_le_bytes(e[1..9].try_into().expect("8 bytes"));
            let v = i32::from_le_bytes(e[9..13].try_into().expect("4 bytes"));
            match e[0] {
                0 => {
                    let (p, f) = (fds.next(), fds.next());
                    let (Some(p), Some(f)) = (p, f) else {
                        return Err(io::Error::other("a forked report without its fds"));
                    };
                    open[i as usize] = Some((p, f));
                }
                _ => {
                    let Some((p, f)) = open[i as usize].take() else {
                        return Err(io::Error::other("an exit before its fork"));
                    };
                    if v != 0 {
                        return Err(io::Error::other(format!("child {i} ended with {v:#x}")));
                    }
                    let mut b = [0u8; 8];
                    let got = read_full(p, &mut b)?;
                    close(p);
                    close(f);
                    if got != 8 {
                        return Err(io::Error::other("child sent a short result"));
                    }
                    sum = sum.wrapping_add(u64::from_le_bytes(b));
                    done += 1;
                }
            }
        }
    }
    Ok(sum)
}

/// The server of [`fork_server_loop`] (a forked child: no allocation, no lock). Returns its
/// exit code.
fn serve(input: RawFd, sock: RawFd, in_flight: usize, work: &impl Fn(u64) -> u64) -> i32 {
    let mut queue = [0u64; 2 * SERVER_MAX + 2];
    let (mut head, mut len) = (0usize, 0usize);
    // (pid, pidfd, item) of the children alive
    let mut live = [(0, 0, 0u64); SERVER_MAX];
    let mut nlive = 0;
    let mut exits = [0u8; ENTRY * SERVER_MAX];
    let mut nexits = 0;
    let mut input_open = true;
    let mut pending = [0u8; 8];
    let mut npending = 0;
    loop {
        while nlive < in_flight && len > 0 {
            let i = queue[head];
            head = (head + 1) % queue.len();
            len -= 1;
            let Ok((r, w)) = pipe() else { return 1 };
            let Ok(pid) = fork(|| {
                close(r);
                match write_all(w, &work(i).to_le_bytes()) {
                    Ok(()) => 0,
                    Err(_) => 1,
                }
            }) else {
                return 1;
            };
            close(w);
            // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
            let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as RawFd;
            if pidfd < 0 {
                return 1;
            }
            let mut rec = [0u8; ENTRY * (SERVER_MAX + 1)];
            rec[0] = 0;
            rec[1..9].copy_from_slice(&i.to_le_bytes());
            rec[9..13].copy_from_slice(&pid.to_le_bytes());
            rec[ENTRY..ENTRY + nexits * ENTRY].copy_from_slice(&exits[..nexits * ENTRY]);
            if send_with_fds(sock, &rec[..ENTRY * (1 + nexits)], &[r, pidfd]).is_err() {
                return 3;
            }
            nexits = 0;
            close(r);
            live[nlive] = (pid, pidfd, i);
            nlive += 1;
        }
        if nexits > 0 {
            if send_with_fds(sock, &exits[..nexits * ENTRY], &[]).is_err() {
                return 3;
            }
            nexits = 0;
        }
        if !input_open && nlive == 0 && len == 0 {
            return 0;
        }
        let mut pfds = [libc::pollfd {
            fd: -1,
            events: libc::POLLIN,
            revents: 0,
        }; SERVER_MAX + 1];
        // Input is read only while there is room for what it brings.
        if input_open && len + 1 < queue.len() {
            pfds[0].fd = input;
        }
        for (k, c) in live[..nlive].iter().enumerate() {
            pfds[1 + k].fd = c.1;
        }
        // SAFETY: `pfds` is a live array of at least `1 + nlive` pollfd structs.
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), (1 + nlive) as libc::nfds_t, -1) };
        if r < 0 {
            continue;
        }
        for k in (0..nlive).rev() {
            if pfds[1 + k].revents == 0 {
                continue;
            }
            let (pid, pidfd, i) = live[k];
            let mut status = 0;
            // SAFETY: `status` is a valid int for waitpid to write.
            while unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {}
            close(pidfd);
            let e = &mut exits[nexits * ENTRY..(nexits + 1) * ENTRY];
            e[0] = 1;
            e[1..9].copy_from_slice(&i.to_le_bytes());
            e[9..13].copy_from_slice(&status.to_le_bytes());
            nexits += 1;
            live[k] = live[nlive - 1];
            nlive -= 1;
        }
        if pfds[0].revents != 0 {
            let room = (queue.len() - len - 1) * 8;
            let mut b = [0u8; 8 * (2 * SERVER_MAX)];
            match read_some(input, &mut b[..room.min(8 * 2 * SERVER_MAX)]) {
                Ok(0) | Err(_) => input_open = false,
                Ok(n) => {
                    for &byte in &b[..n] {
                        pending[npending] = byte;
                        npending += 1;
                        if npending == 8 {
                            queue[(head + len) % queue.len()] = u64::from_le_bytes(pending);
                            len += 1;
                            npending = 0;
                        }
                    }
                }
            }
        }
    }
}

/// sendmsg of `bytes` with `fds` attached (`SCM_RIGHTS`).
fn send_with_fds(sock: RawFd, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    let mut control = [0u64; 8];
    // SAFETY: `msghdr` is plain old data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let len = std::mem::size_of_val(fds) as u32;
        msg.msg_control = control.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE only computes a size.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(len) } as usize;
        // SAFETY: `control` is large enough for one header with `fds` (64 bytes, at most
        // 4 fds here), and the header and data pointers point inside it.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(len) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c).cast(), fds.len());
        }
    }
    loop {
        // SAFETY: `msg` points at live iovec and control buffers for the call.
        let n = unsafe { libc::sendmsg(sock, &msg, 0) };
        if n >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// recvmsg into `buf`; returns the length (0: the peer closed) and the fds that came with it.
fn recv_with_fds(sock: RawFd, buf: &mut [u8]) -> io::Result<(usize, Vec<RawFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = [0u64; 8];
    // SAFETY: `msghdr` is plain old data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    let n = loop {
        // SAFETY: `msg` points at live iovec and control buffers for the call.
        let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: the control buffer was filled by recvmsg; CMSG_FIRSTHDR / CMSG_NXTHDR walk the
    // headers it wrote and stay inside `msg_controllen`.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                for k in 0..count {
                    fds.push(std::ptr::read_unaligned(data.add(k)));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((n, fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hand_written_fork_server_returns_every_result_once() {
        for in_flight in [1, 2, 4] {
            let (_, sum) = fork_server_loop(300, in_flight, |x| 3 * x).unwrap();
            assert_eq!(sum, 3 * 299 * 300 / 2, "{in_flight} in flight");
        }
    }

    #[test]
    fn the_raw_fork_loop_returns_every_result_once() {
        let (_, sum) = fork_loop(300, 4, |x| 3 * x).unwrap();
        assert_eq!(sum, 3 * 299 * 300 / 2);
    }
}
