//! The fork server's own process (cow_fork with [`Exec::fork_server`](crate::Exec::fork_server)):
//! what it runs, from its fork until its `_exit`. It never returns into the parent's code.
//!
//! It is single-threaded (forked once from the parent when the run starts, so it sees the
//! parent's memory of that moment through copy-on-write), ignores SIGINT and SIGTERM (the
//! parent ends it, or `PR_SET_PDEATHSIG` does) and does one thing: it reads item and `fork`
//! frames from its input pipe, forks one child per `fork` frame with the items
//! sent since the previous one (in order, at most `workers` alive: the parent may send up to
//! `workers` more, which wait here, so the next child is forked as soon as one is reaped,
//! without a round trip to the parent), and reports on its socket to the parent: `forked` (the
//! child's pid, with the read end of its result pipe and its pidfd attached), `fork_failed`,
//! and `exited` once it has reaped the child. A `cancel` frame (the run is aborting) drops
//! the children still waiting, each reported `fork_failed`. Items stay encoded here: each is
//! decoded in the child that runs it. The protocol and its invariants are in `crate::ipc`'s
//! README ("The fork server").

use super::child::{self, StageCode};
use super::supervise::PIPE_SIZE;
use crate::ipc::frame::Decoder;
use crate::ipc::server::{FromForker, ToForker};
use crate::sys::{self, fdpass};
use rustix::event::{PollFd, PollFlags};
use std::io;
use std::os::fd::OwnedFd;

/// What one frame from the parent asks.
enum Step {
    Item(u64, Vec<u8>),
    Fork(u64),
    Cancel,
}

/// Exit codes of the server: its input was not a valid stream; its socket is broken (the
/// parent is gone).
const CORRUPT_INPUT: i32 = 2;
const NO_PARENT: i32 = 3;

/// Why a child asked for was not forked after a `cancel`.
const CANCELLED: &str = "not forked: the run is aborting";

/// The children the parent asked for and not yet forked: sequence number and items.
type Batch = (u64, Vec<(u64, Vec<u8>)>);

/// The server's body. `children` is the name its children take; at most `workers` are
/// alive at once. Returns its exit code: 0 once the parent closes the input (the stage is
/// done; children still alive are killed and reaped first).
pub(super) fn serve<I: 'static, O: 'static>(
    input: OwnedFd,
    reports: OwnedFd,
    stage: StageCode<'_, I, O>,
    children: &str,
    workers: usize,
) -> i32 {
    // The parent ends it: a SIGTERM to the process group is the parent's to handle.
    sys::signals::leave_sigterm_to_the_parent();
    let mut dec = Decoder::new(stage.max);
    let mut items: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut waiting: std::collections::VecDeque<Batch> = Default::default();
    let mut live: Vec<(u64, sys::Child)> = Vec::new();
    // Children reaped and not yet reported: reported after the next forks, which come first.
    let mut reaped: Vec<(u64, sys::Exit)> = Vec::new();
    loop {
        loop {
            let next = dec.next(|kind, id, p| {
                ToForker::decode(kind, p).map(|m| match m {
                    ToForker::Item(p) => Step::Item(id, p.to_vec()),
                    ToForker::Fork => Step::Fork(id),
                    ToForker::Cancel => Step::Cancel,
                })
            });
            match next {
                Ok(None) => break,
                Ok(Some(Ok(Step::Item(id, p)))) => items.push((id, p)),
                Ok(Some(Ok(Step::Fork(seq)))) => {
                    waiting.push_back((seq, std::mem::take(&mut items)));
                }
                // The run is aborting: the children waiting are not forked, and said so.
                Ok(Some(Ok(Step::Cancel))) => {
                    items.clear();
                    for (seq, _) in waiting.drain(..) {
                        let report = FromForker::ForkFailed(CANCELLED.into()).encode(seq);
                        if fdpass::send_record(&reports, &report, &[]).is_err() {
                            return end(live, NO_PARENT);
                        }
                    }
                }
                Ok(Some(Err(_))) | Err(_) => return end(live, CORRUPT_INPUT),
            }
        }
        while live.len() < workers.max(1) {
            let Some((seq, batch)) = waiting.pop_front() else {
                break;
            };
            match spawn(seq, batch, stage, children, &reports) {
                Ok(Some(child)) => live.push((seq, child)),
                Ok(None) => {}
                Err(_) => return end(live, NO_PARENT),
            }
        }
        for (seq, status) in reaped.drain(..) {
            let report = FromForker::Exited(status).encode(seq);
            if fdpass::send_record(&reports, &report, &[]).is_err() {
                return end(live, NO_PARENT);
            }
        }
        let (input_ready, exited) = {
            let mut fds = Vec::with_capacity(1 + live.len());
            fds.push(PollFd::new(&input, PollFlags::IN));
            for (_, c) in &live {
                fds.push(PollFd::new(&c.pidfd, PollFlags::IN));
            }
            match rustix::event::poll(&mut fds, None) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(_) => return end(live, NO_PARENT),
            }
            let ready = |f: &PollFd<'_>| !f.revents().is_empty();
            let exited: Vec<bool> = fds[1..].iter().map(ready).collect();
            (ready(&fds[0]), exited)
        };
        for (i, _) in exited.iter().enumerate().rev().filter(|(_, &e)| e) {
            let (seq, child) = live.swap_remove(i);
            reaped.push((seq, sys::reap(child.pid)));
        }
        if input_ready {
            match dec.read_from(&input, 64 << 10) {
                Ok(0) => return end(live, 0),
                Ok(_) | Err(rustix::io::Errno::INTR) | Err(rustix::io::Errno::AGAIN) => {}
                Err(_) => return end(live, NO_PARENT),
            }
        }
    }
}

/// Forks child `seq` for `items` and reports it. `Err`: the report could not be sent.
fn spawn<I: 'static, O: 'static>(
    seq: u64,
    items: Vec<(u64, Vec<u8>)>,
    stage: StageCode<'_, I, O>,
    name: &str,
    reports: &OwnedFd,
) -> io::Result<Option<sys::Child>> {
    let made = sys::pipe(true).and_then(|(r, w)| {
        sys::grow_pipe(&w, PIPE_SIZE);
        let keep = [sys::raw(&w)];
        let child = sys::fork_child(&keep, name, move || {
            child::served_child::<I, O>(items, &stage, w)
        })?;
        Ok((r, child))
    });
    match made {
        Ok((r, child)) => {
            let report = FromForker::Forked { pid: child.pid }.encode(seq);
            fdpass::send_record(reports, &report, &[&r, &child.pidfd])?;
            Ok(Some(child))
        }
        Err(e) => {
            let report = FromForker::ForkFailed(format!("fork failed: {e}")).encode(seq);
            fdpass::send_record(reports, &report, &[])?;
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
