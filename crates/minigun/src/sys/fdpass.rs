//! Unix datagram-like sockets that carry file descriptors (`SCM_RIGHTS`), and signals sent
//! (and orphans reaped) through a pidfd. Mechanisms of the cow_fork fork server: what the
//! records mean is `ipc::server`'s.
//!
//! Everything here goes through rustix's safe wrappers; no `unsafe`.

use super::Child;
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};

/// Most fds a record carries.
pub(crate) const MAX_FDS: usize = 2;
/// Most parts a record is sent from ([`send_record`]).
const MAX_PARTS: usize = 4;

/// A connected pair of `SOCK_SEQPACKET` unix sockets (close-on-exec): every record sent is
/// received whole and alone, with the fds sent with it.
pub(crate) fn record_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

/// Sends one record, the concatenation of `parts`, with `fds` attached (at most
/// [`MAX_FDS`]); blocks while the peer's queue is full (unless the socket is non-blocking).
/// Allocates nothing.
pub(crate) fn send_record(sock: &OwnedFd, parts: &[&[u8]], fds: &[&OwnedFd]) -> io::Result<()> {
    assert!(fds.len() <= MAX_FDS, "at most {MAX_FDS} fds per record");
    assert!(
        parts.len() <= MAX_PARTS,
        "at most {MAX_PARTS} parts per record"
    );
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    // The slots past `fds.len()` are placeholders, never sent.
    let mut borrowed = [sock.as_fd(); MAX_FDS];
    for (slot, f) in borrowed.iter_mut().zip(fds) {
        *slot = f.as_fd();
    }
    if !fds.is_empty() {
        control.push(SendAncillaryMessage::ScmRights(&borrowed[..fds.len()]));
    }
    let mut iov = [IoSlice::new(&[]); MAX_PARTS];
    for (slot, part) in iov.iter_mut().zip(parts) {
        *slot = IoSlice::new(part);
    }
    loop {
        match rustix::net::sendmsg(sock, &iov[..parts.len()], &mut control, SendFlags::empty()) {
            Ok(_) => return Ok(()),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// One record received into `buf`: `Ok(None)` if none waits (non-blocking socket), its
/// length 0 when the peer has closed its end. The fds come close-on-exec. A record longer
/// than `buf`, or with more fds than [`MAX_FDS`], is an error (its fds are closed).
pub(crate) fn recv_record(
    sock: &OwnedFd,
    buf: &mut [u8],
) -> io::Result<Option<(usize, Vec<OwnedFd>)>> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = loop {
        match rustix::net::recvmsg(
            sock,
            &mut [IoSliceMut::new(buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(got) => break got,
            Err(rustix::io::Errno::INTR) => continue,
            Err(rustix::io::Errno::AGAIN) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
    };
    let mut fds = Vec::new();
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = msg {
            fds.extend(rights);
        }
    }
    let flags = got.flags;
    if flags.contains(rustix::net::ReturnFlags::TRUNC)
        || flags.contains(rustix::net::ReturnFlags::CTRUNC)
    {
        return Err(io::Error::other("a record or its fds were truncated"));
    }
    Ok(Some((got.bytes, fds)))
}

/// Sends `sig` to a child through its pidfd: never to another process that took its pid
/// after it was reaped (the pidfd names the process, not the number). Errors (the process
/// is gone) are ignored.
pub(crate) fn signal(child: &Child, sig: i32) {
    match rustix::process::Signal::from_named_raw(sig) {
        Some(s) => {
            let _ = rustix::process::pidfd_send_signal(&child.pidfd, s);
        }
        None => super::kill(child.pid, sig),
    }
}

/// Reaps `child` if it has exited and become this process's own: a fork server's child is
/// handed to the nearest subreaper (or PID 1) when the server dies, which may be this
/// process. Otherwise (another process's child: `ECHILD`; still running) nothing happens.
/// Through the pidfd, so never another process that took its pid.
pub(crate) fn reap_adopted(child: &Child) {
    use rustix::process::{waitid, WaitId, WaitIdOptions};
    let options = WaitIdOptions::EXITED | WaitIdOptions::NOHANG;
    while let Err(rustix::io::Errno::INTR) = waitid(WaitId::PidFd(child.pidfd.as_fd()), options) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_arrives_whole_with_its_fds() {
        let (a, b) = record_pair().unwrap();
        let (r, w) = super::super::pipe(false).unwrap();
        send_record(&a, &[b"hel", b"lo"], &[&r, &w]).unwrap();
        send_record(&a, &[b"two"], &[]).unwrap();
        super::super::set_nonblocking(&b).unwrap();
        let mut buf = [0u8; 16];
        let (n, fds) = recv_record(&b, &mut buf).unwrap().unwrap();
        assert_eq!((&buf[..n], fds.len()), (&b"hello"[..], 2));
        rustix::io::write(&fds[1], b"x").unwrap();
        let mut one = [0u8; 1];
        assert_eq!(rustix::io::read(&r, &mut one).unwrap(), 1, "the same pipe");
        let (n, fds) = recv_record(&b, &mut buf).unwrap().unwrap();
        assert_eq!((&buf[..n], fds.len()), (&b"two"[..], 0));
        assert!(
            recv_record(&b, &mut buf).unwrap().is_none(),
            "nothing waits"
        );
        drop(a);
        assert_eq!(recv_record(&b, &mut buf).unwrap().unwrap().0, 0, "closed");
    }
}
