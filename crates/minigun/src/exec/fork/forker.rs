//! The fork server's own process (cow_fork with [`Exec::fork_server`](crate::Exec::fork_server)):
//! what it runs, from its fork until its `_exit`. It never returns into the parent's code.
//!
//! It is single-threaded (forked once from the parent when the run starts, so it sees the
//! parent's memory of that moment through copy-on-write), ignores SIGINT and blocks SIGTERM
//! (the parent ends it, or `PR_SET_PDEATHSIG` does) and does one thing: it reads item and `fork`
//! frames from its input pipe, forks one child per `fork` frame (with glibc's `_Fork`:
//! `sys::fork_single` says why that is sound here and what it saves) with the items
//! sent since the previous one (in order, at most `workers` alive: the parent may send up to
//! `workers` more, which wait here, so the next child is forked as soon as one is reaped,
//! without a round trip to the parent), and reports on its socket to the parent: `forked` (the
//! child's pid, with the read end of its result pipe and its pidfd attached), `fork_failed`,
//! and `exited` once it has reaped the child. A `cancel` frame (the run is aborting) drops
//! the children still waiting, each reported `fork_failed`. Items stay encoded here: each is
//! decoded in the child that runs it. The protocol and its invariants are in `crate::ipc`'s
//! README ("The fork server").

use super::child::{self, StageCode};
use super::supervise::cow_pipe;
use crate::ipc::frame::{self, Decoder};
use crate::ipc::server::{FromForker, ToForker, MAX_REPORTS};
use crate::sys::{self, fdpass};
use std::collections::VecDeque;
use std::io;
use std::os::fd::OwnedFd;

/// What one frame from the parent asks.
enum Step {
    /// The item's payload was added to the batch being collected.
    Item,
    Fork(u64),
    Cancel,
}

/// Exit codes of the server: its input was not a valid stream; its socket is broken (the
/// parent is gone).
const CORRUPT_INPUT: i32 = 2;
const NO_PARENT: i32 = 3;

/// Why a child asked for was not forked after a `cancel`.
const CANCELLED: &str = "not forked: the run is aborting";

/// The items of one child the parent asked for: its sequence number, each item's index and
/// where its payload is in `bytes`. Batches are reused (cleared, their memory kept), so the
/// server allocates nothing per child once it has seen its largest batches.
#[derive(Default)]
struct Batch {
    seq: u64,
    items: Vec<(u64, std::ops::Range<usize>)>,
    bytes: Vec<u8>,
}

impl Batch {
    /// Room for a few small items.
    fn with_capacity() -> Batch {
        Batch {
            seq: 0,
            items: Vec::with_capacity(8),
            bytes: Vec::with_capacity(128),
        }
    }

    fn payloads(&self) -> impl ExactSizeIterator<Item = (u64, &[u8])> {
        self.items
            .iter()
            .map(|(id, r)| (*id, &self.bytes[r.clone()]))
    }

    fn clear(&mut self) {
        self.items.clear();
        self.bytes.clear();
    }
}

/// The server's body. `children` is the name its children take; at most `workers` are
/// alive at once. Returns its exit code: 0 once the parent closes the input (the stage is
/// done; children still alive are killed and reaped first).
///
/// Every page this process writes while a child it forked lives is copied (the child shares
/// it): so the loop allocates nothing once warm, and sends each child's `forked` report with
/// the `exited` reports waiting, in one record.
pub(super) fn serve<I: 'static, O: 'static>(
    input: OwnedFd,
    reports: OwnedFd,
    stage: StageCode<'_, I, O>,
    children: &str,
    workers: usize,
) -> i32 {
    // The parent ends it: a SIGTERM to the process group is the parent's to handle.
    sys::signals::leave_sigterm_to_the_parent();
    let workers = workers.max(1);
    // What the loop writes is made here, at once, so it lies in as few pages as can be.
    let mut live: Vec<(u64, sys::Child)> = Vec::with_capacity(workers);
    let mut fds: Vec<libc::pollfd> = Vec::with_capacity(1 + workers);
    // `exited` reports of children reaped and not yet reported are sent with the next child's
    // `forked` report (after it: the fork comes first), or alone if none is forked.
    let mut out = Reports::with_capacity(workers);
    // The batch being collected, those waiting to be forked, and spare ones.
    let mut waiting: VecDeque<Batch> = VecDeque::with_capacity(workers + 1);
    let mut spare: Vec<Batch> = (0..workers + 2).map(|_| Batch::with_capacity()).collect();
    let mut batch = Batch::with_capacity();
    let mut dec = Decoder::new(stage.max);
    // The children's result buffer, made once (see `spawn`).
    let mut out_buf = crate::ipc::writer::buffer();
    loop {
        loop {
            let next = dec.next(|kind, id, p| {
                ToForker::decode(kind, p).map(|m| match m {
                    ToForker::Item(p) => {
                        let at = batch.bytes.len();
                        batch.bytes.extend_from_slice(p);
                        batch.items.push((id, at..at + p.len()));
                        Step::Item
                    }
                    ToForker::Fork => Step::Fork(id),
                    ToForker::Cancel => Step::Cancel,
                })
            });
            match next {
                Ok(None) => break,
                Ok(Some(Ok(Step::Item))) => {}
                Ok(Some(Ok(Step::Fork(seq)))) => {
                    let mut next = spare.pop().unwrap_or_default();
                    std::mem::swap(&mut next, &mut batch);
                    next.seq = seq;
                    waiting.push_back(next);
                }
                // The run is aborting: the children waiting are not forked, and said so.
                Ok(Some(Ok(Step::Cancel))) => {
                    batch.clear();
                    for mut b in waiting.drain(..) {
                        let failed = FromForker::ForkFailed(CANCELLED.into());
                        if out.with(&reports, b.seq, failed, &[]).is_err() {
                            return end(live, NO_PARENT);
                        }
                        b.clear();
                        spare.push(b);
                    }
                }
                Ok(Some(Err(_))) | Err(_) => return end(live, CORRUPT_INPUT),
            }
        }
        while live.len() < workers {
            let Some(mut next) = waiting.pop_front() else {
                break;
            };
            let spawned = spawn(&next, stage, children, &reports, &mut out, &mut out_buf);
            next.clear();
            spare.push(next);
            match spawned {
                Ok(Some(child)) => live.push(child),
                Ok(None) => {}
                Err(_) => return end(live, NO_PARENT),
            }
        }
        if out.send(&reports, &[]).is_err() {
            return end(live, NO_PARENT);
        }
        fds.clear();
        fds.push(sys::poll_entry(&input));
        fds.extend(live.iter().map(|(_, c)| sys::poll_entry(&c.pidfd)));
        if sys::poll(&mut fds).is_err() {
            return end(live, NO_PARENT);
        }
        for i in (0..live.len()).rev() {
            if fds[1 + i].revents != 0 {
                let (seq, child) = live.swap_remove(i);
                let status = sys::reap(child.pid);
                if out.exited(&reports, seq, status).is_err() {
                    return end(live, NO_PARENT);
                }
            }
        }
        if fds[0].revents != 0 {
            match dec.read_from(&input, 64 << 10) {
                Ok(0) => return end(live, 0),
                Ok(_) | Err(rustix::io::Errno::INTR) | Err(rustix::io::Errno::AGAIN) => {}
                Err(_) => return end(live, NO_PARENT),
            }
        }
    }
}

/// Reports to the parent, made in buffers kept from record to record: `exited` reports wait
/// for the next record (see [`serve`]).
#[derive(Default)]
struct Reports {
    /// A `forked` or `fork_failed` report, sent first in its record.
    head: Vec<u8>,
    /// `exited` reports waiting.
    exits: Vec<u8>,
    count: usize,
}

impl Reports {
    /// Room for a record about `workers` children.
    fn with_capacity(workers: usize) -> Reports {
        let exits = workers.min(MAX_REPORTS) * (frame::HEADER + 5);
        Reports {
            head: Vec::with_capacity(64),
            exits: Vec::with_capacity(exits),
            count: 0,
        }
    }

    /// Child `seq` was reaped with `status`; a full record is sent at once.
    fn exited(&mut self, sock: &OwnedFd, seq: u64, status: sys::Exit) -> io::Result<()> {
        if self.count + 1 >= MAX_REPORTS {
            self.send(sock, &[])?;
        }
        FromForker::Exited(status).encode_into(seq, &mut self.exits);
        self.count += 1;
        Ok(())
    }

    /// Sends `report` about child `seq` (with `fds`), then the `exited` reports waiting, in
    /// one record.
    fn with(
        &mut self,
        sock: &OwnedFd,
        seq: u64,
        report: FromForker,
        fds: &[&OwnedFd],
    ) -> io::Result<()> {
        self.head.clear();
        report.encode_into(seq, &mut self.head);
        self.send(sock, fds)
    }

    /// Sends what waits, as one record with `fds` (nothing if nothing waits).
    fn send(&mut self, sock: &OwnedFd, fds: &[&OwnedFd]) -> io::Result<()> {
        if self.head.is_empty() && self.count == 0 {
            return Ok(());
        }
        let r = fdpass::send_record(sock, &[&self.head, &self.exits], fds);
        self.head.clear();
        self.exits.clear();
        self.count = 0;
        r
    }
}

/// Forks the child of `batch` and reports it (with the `exited` reports waiting). `Err`: the
/// report could not be sent.
///
/// What the child needs is made here, before the fork, and read or written by the child
/// through copy-on-write: the items stay in this process's memory, and the child writes its
/// frames into its copy of `out_buf`. So a child of small items allocates nothing and frees
/// nothing (every allocator page it wrote would be a page copied).
fn spawn<I: 'static, O: 'static>(
    batch: &Batch,
    stage: StageCode<'_, I, O>,
    name: &str,
    sock: &OwnedFd,
    reports: &mut Reports,
    out_buf: &mut Vec<u8>,
) -> io::Result<Option<(u64, sys::Child)>> {
    let made = cow_pipe().and_then(|(r, w)| {
        let child = sys::fork_single(sys::raw(&w), name, move || {
            child::served_child::<I, O>(batch.payloads(), &stage, w, std::mem::take(out_buf))
        })?;
        Ok((r, child))
    });
    match made {
        Ok((r, child)) => {
            let forked = FromForker::Forked { pid: child.pid };
            reports.with(sock, batch.seq, forked, &[&r, &child.pidfd])?;
            Ok(Some((batch.seq, child)))
        }
        Err(e) => {
            let failed = FromForker::ForkFailed(format!("fork failed: {e}"));
            reports.with(sock, batch.seq, failed, &[])?;
            Ok(None)
        }
    }
}

/// The server ends: children still alive are killed and reaped (no zombie is left behind).
fn end(live: Vec<(u64, sys::Child)>, code: i32) -> i32 {
    for (_, c) in &live {
        fdpass::signal(c, libc::SIGKILL);
    }
    for (_, c) in live {
        sys::reap(c.pid);
    }
    code
}
