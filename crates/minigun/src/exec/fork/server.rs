//! The parent's side of cow_fork's fork server ([`Exec::fork_server`](crate::Exec::fork_server)):
//! starting the server process when the run starts, sending it items, reading its reports,
//! noticing its death, and ending it. What the supervisor does with the children it reports
//! is `cow`'s (the same decisions as for children it forks itself).
//!
//! # Processes and channels
//!
//! ```text
//!  parent (supervisor thread)                 fork server (one thread)          item children
//!   ─ input pipe: item frames, then `fork` ──>  forks a child per `fork` ──────> run the items
//!   <─ report socket (records, SCM_RIGHTS) ───  forked(pid) + [pipe, pidfd]      │
//!                                               exited(status) once reaped       │
//!   <─────────────────────────────── result pipe: the child's frames ─────────────┘
//! ```
//!
//! The server is forked once, on the run's thread before the stage threads exist (right after
//! the stage's `before_fork` hooks), so its children see the parent's memory of that moment,
//! not what the parent writes later. The parent reads each child's results itself, on the
//! pipe the report handed it, and signals it through its pidfd (never by pid: the server
//! reaps it, and the pid may then be reused); the child's exit status comes in the server's
//! `exited` report. Invariants are listed in `crate::ipc`'s README ("The fork server").

use super::child::StageCode;
use super::supervise::{exit_failure, PIPE_SIZE};
use crate::error::FailureKind;
use crate::exec::parts::{drain, Parts};
use crate::exec::runner::{ForkHooks, PreparedRun};
use crate::exec::ForkOptions;
use crate::hooks;
use crate::ipc::frame::Kind;
use crate::ipc::outbox::Outbox;
use crate::ipc::reader::Stream;
use crate::ipc::server::{FromForker, MAX_REPORT};
use crate::stage::{Item, Wire};
use crate::sys::{self, fdpass};
use rustix::event::{PollFd, PollFlags};
use std::io;
use std::os::fd::OwnedFd;

/// What the server reported about child `seq`.
pub(super) enum Report {
    Forked {
        seq: u64,
        child: sys::Child,
        stream: Stream,
    },
    Exited {
        seq: u64,
        exit: sys::Exit,
    },
    Failed {
        seq: u64,
        message: String,
    },
}

/// A running fork server, seen from the parent. Dropping it ends the server and reaps it.
pub(super) struct ForkServer {
    /// The server process, until it is reaped.
    process: Option<sys::Child>,
    input: Option<sys::PipeWriter>,
    outbox: Outbox,
    reports: OwnedFd,
    next_seq: u64,
    max_frame: usize,
    /// Why the server is gone, once it is.
    gone: Option<String>,
    /// The supervisor was told ([`ForkServer::newly_gone`]).
    told: bool,
}

/// Where the server's fds are in a poll set.
pub(super) struct Polled {
    reports: Option<usize>,
    process: Option<usize>,
    input: Option<usize>,
}

/// Which of the server's fds a poll found ready.
pub(super) struct Ready {
    reports: bool,
    process: bool,
    input: bool,
}

impl Polled {
    pub(super) fn ready(&self, ready: impl Fn(usize) -> bool) -> Ready {
        Ready {
            reports: self.reports.is_some_and(&ready),
            process: self.process.is_some_and(&ready),
            input: self.input.is_some_and(&ready),
        }
    }
}

/// cow_fork with a fork server, prepared on the run's thread: the `before_fork` hooks run,
/// the heap is collapsed into huge pages (as the stage's setting says), then the server is
/// forked; the supervisor then runs on the stage's thread.
pub(super) fn prepare<I: Item, O: Wire>(
    parts: Parts<I, O>,
    opts: ForkOptions,
    hooks: ForkHooks,
) -> PreparedRun {
    // The server's children log through the switch installed on the forking thread.
    let log = super::trace::install();
    let started = hooks::run_fork(&hooks.before_fork, "before_fork").and_then(|()| {
        // The server is the one process forked from the parent: its children are forked from
        // its memory, so the parent's heap goes into huge pages before it, as before a
        // cow_fork stage's first fork.
        let (run, name) = (&parts.ctx.run, &parts.ctx.name);
        crate::huge::before_fork(run, name, opts.huge_pages, crate::HugePages::COW_DEFAULT);
        ForkServer::start(&parts, &hooks, &opts)
            .map_err(|e| format!("cannot start the fork server: {e}"))
    });
    drop(log);
    match started {
        Ok(server) => Box::new(move || super::cow::run(parts, opts, hooks, Some(server))),
        Err(m) => {
            parts.ctx.stage_failed(FailureKind::Start, m);
            Box::new(move || drain(&parts.ctx, &parts.input))
        }
    }
}

impl ForkServer {
    fn start<I: 'static, O: 'static>(
        parts: &Parts<I, O>,
        hooks: &ForkHooks,
        opts: &ForkOptions,
    ) -> io::Result<ForkServer> {
        let (max_frame, workers) = (opts.max_frame, opts.workers);
        let (input_r, input) = sys::input_pipe(PIPE_SIZE)?;
        let (reports, theirs) = fdpass::record_pair()?;
        sys::set_nonblocking(&reports)?;
        let code = StageCode::new(parts, &hooks.after_fork, max_frame);
        let keep = [sys::raw(&input_r), sys::raw(&theirs)];
        let children = format!("mg:{}", parts.ctx.name);
        let title = format!("mg:{}:srv", parts.ctx.name);
        let process = sys::fork_child(&keep, &title, move || {
            super::forker::serve::<I, O>(input_r, theirs, code, &children, workers)
        })?;
        Ok(ForkServer {
            process: Some(process),
            input: Some(input),
            outbox: Outbox::default(),
            reports,
            next_seq: 0,
            max_frame,
            gone: None,
            told: false,
        })
    }

    /// Why the server is gone, if it is.
    pub(super) fn gone(&self) -> Option<&str> {
        self.gone.as_deref()
    }

    /// Why the server is gone, the first time it is asked after the server went.
    pub(super) fn newly_gone(&mut self) -> Option<String> {
        match (&self.gone, self.told) {
            (Some(why), false) => {
                self.told = true;
                Some(why.clone())
            }
            _ => None,
        }
    }

    /// Sends the encoded items of one child (`(index, payload)`), and the `fork` that makes
    /// it. Returns the child's sequence number: reports about it name it.
    pub(super) fn launch(&mut self, items: &[(u64, Vec<u8>)]) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        for (index, payload) in items {
            self.outbox.push(Kind::Item, *index, payload);
        }
        self.outbox.push(Kind::Fork, seq, &[]);
        self.write();
        seq
    }

    /// The run is aborting: asks the server to fork none of the children still waiting in it
    /// (it reports each as not forked).
    pub(super) fn cancel(&mut self) {
        self.outbox.push(Kind::Cancel, 0, &[]);
        self.write();
    }

    fn write(&mut self) {
        if let Some(input) = &self.input {
            // A broken pipe means the server is gone: its pidfd says so, and how.
            let _ = self.outbox.write_to(input);
        }
    }

    /// Adds the server's fds to a poll set.
    pub(super) fn poll_fds<'a>(&'a self, fds: &mut super::supervise::PollSet<'a>) -> Polled {
        // Once the server is gone its socket is at end of file: not watched any more.
        let reports = self
            .gone
            .is_none()
            .then(|| fds.push(PollFd::new(&self.reports, PollFlags::IN)));
        let process = self
            .process
            .as_ref()
            .map(|p| fds.push(PollFd::new(&p.pidfd, PollFlags::IN)));
        let input = match (&self.input, self.outbox.is_empty()) {
            (Some(input), false) => Some(fds.push(PollFd::new(input, PollFlags::OUT))),
            _ => None,
        };
        Polled {
            reports,
            process,
            input,
        }
    }

    /// After a poll: writes what waits, takes every report, and notices the server's death
    /// (after its last reports). Returns the reports, in the order they were sent.
    pub(super) fn events(&mut self, ready: Ready) -> Vec<Report> {
        if ready.input {
            self.write();
        }
        let mut out = Vec::new();
        // The socket closes only when the server exits.
        let mut dead = ready.process;
        // A server seen dead may have left reports in the socket that this poll did not see
        // yet (it wrote them before it died): they are read before it is marked gone.
        if ready.reports || dead {
            let mut buf = [0u8; MAX_REPORT];
            loop {
                match fdpass::recv_record(&self.reports, &mut buf) {
                    Ok(None) => break,
                    Ok(Some((0, _))) => {
                        dead = true;
                        break;
                    }
                    Ok(Some((n, fds))) => match self.report(&buf[..n], fds, &mut out) {
                        Ok(()) => {}
                        Err(m) => {
                            self.end(format!("the fork server sent a bad report: {m}"));
                            break;
                        }
                    },
                    Err(e) => {
                        self.end(format!("cannot read the fork server's reports: {e}"));
                        break;
                    }
                }
            }
        }
        if dead && self.gone.is_none() {
            let pid = self.process.as_ref().map_or(0, |p| p.pid);
            let exit = self.reap();
            let (kind, _) = exit_failure(exit, false);
            self.gone = Some(format!("the fork server (pid {pid}) died: {kind}"));
        }
        out
    }

    /// The reports of one record, added to `out` in order; the record's fds are its `forked`
    /// report's (a record without one has none).
    fn report(
        &self,
        record: &[u8],
        fds: Vec<OwnedFd>,
        out: &mut Vec<Report>,
    ) -> Result<(), String> {
        let reports = FromForker::decode(record)?;
        let mut fds = Some(fds);
        for (seq, report) in reports {
            out.push(match report {
                FromForker::Forked { pid } => {
                    let fds = fds.take().unwrap_or_default();
                    let [pipe, pidfd]: [OwnedFd; 2] = fds
                        .try_into()
                        .map_err(|f: Vec<_>| format!("forked report with {} fds", f.len()))?;
                    Report::Forked {
                        seq,
                        child: sys::Child { pid, pidfd },
                        stream: Stream::new(pipe, self.max_frame),
                    }
                }
                FromForker::Exited(exit) => Report::Exited { seq, exit },
                FromForker::ForkFailed(message) => Report::Failed { seq, message },
            });
        }
        match fds.map_or(0, |f| f.len()) {
            0 => Ok(()),
            n => Err(format!(
                "a record without a forked report came with {n} fds"
            )),
        }
    }

    /// Kills and reaps the server, for `why` (the first reason stands).
    fn end(&mut self, why: String) {
        if let Some(p) = &self.process {
            fdpass::signal(p, libc::SIGKILL);
        }
        self.reap();
        self.gone.get_or_insert(why);
    }

    fn reap(&mut self) -> sys::Exit {
        self.input = None;
        match self.process.take() {
            Some(p) => sys::reap(p.pid),
            None => sys::Exit::Code(0),
        }
    }
}

impl Drop for ForkServer {
    /// The stage is done (or unwinding): the server's input closes, and it is killed and
    /// reaped (it has no child left once the supervisor has none; if it had, they die with it).
    fn drop(&mut self) {
        self.end("the stage ended".into());
    }
}
