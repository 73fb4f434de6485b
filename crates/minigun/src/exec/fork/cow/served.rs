//! cow_fork's supervisor with a fork server: asking the server for a child, turning its
//! reports into running children (decided from then on like any other), and what happens
//! when the server dies: the items not yet forked fail, the children running die with it
//! (their parent is the server) and their running item fails, and the stage fails, which
//! ends the run.

use super::super::server::Report;
use super::super::supervise::{terminate, Killed};
use super::{Pending, Running, Supervisor};
use crate::error::FailureKind;
use crate::stage::{Item, Wire};
use crate::sys;
use std::collections::VecDeque;
use std::time::Instant;

/// A child asked of the server and not yet reported.
pub(super) struct Launch<I> {
    seq: u64,
    jobs: Vec<Pending<I>>,
    /// When it was asked, if the server could fork it at once (the child's overhead counts
    /// from here; else from its `forked` report).
    sent: Option<Instant>,
}

impl<I: Item, O: Wire> Supervisor<'_, I, O> {
    /// Whether another child may start (or, with a fork server, be asked for: the server
    /// keeps at most `workers` alive, and up to `workers` more waiting, so it forks the next
    /// one as soon as it reaps one).
    pub(super) fn room(&self, running: &[Running<I, O>]) -> bool {
        let most = match self.server {
            Some(_) => 2 * self.opts.workers,
            None => self.opts.workers,
        };
        running.len() + self.launching.len() < most
    }

    /// Sends `jobs` to the server for one child. An item that cannot be encoded fails with
    /// its encode error; if the server is gone, the items fail with why.
    pub(super) fn launch(
        &mut self,
        jobs: Vec<Pending<I>>,
        running: usize,
        retry: &mut VecDeque<Pending<I>>,
    ) {
        let server = self.server.as_mut().expect("a served stage has a server");
        if let Some(why) = server.gone().map(str::to_string) {
            let m = format!("{why}; the item's child was not forked");
            return self.fail_all(jobs, FailureKind::Start, &m, retry);
        }
        let encode = self.parts.wire.expect("fork stages have a codec").encode_in;
        let (mut sent, mut payloads) = (Vec::new(), Vec::new());
        for job in jobs {
            let mut buf = Vec::new();
            let fits = |buf: &Vec<u8>| match buf.len() + 9 <= self.opts.max_frame {
                true => Ok(()),
                false => Err(format!("{} bytes exceed max_frame", buf.len())),
            };
            match encode(&job.item, &mut buf).and_then(|()| fits(&buf)) {
                Ok(()) => {
                    payloads.push((job.index, buf));
                    sent.push(job);
                }
                Err(e) => {
                    let m = format!("cannot encode the input item: {e}");
                    self.failed(job, FailureKind::Encode, m, None, retry);
                }
            }
        }
        if sent.is_empty() {
            return;
        }
        // Whether it waits in the server behind `workers` children.
        let queued = self.launching.len() + running >= self.opts.workers;
        let seq = self
            .server
            .as_mut()
            .expect("a served stage has a server")
            .launch(&payloads);
        self.launching.push_back(Launch {
            seq,
            jobs: sent,
            sent: (!queued).then(Instant::now),
        });
    }

    /// Applies the server's reports: children forked (returned, to run), failed to fork, or
    /// reaped (their exit recorded, their pipe read to the end). Then, if the server has
    /// died, fails what it took with it.
    pub(super) fn reports(
        &mut self,
        reports: Vec<Report>,
        running: &mut [Running<I, O>],
        retry: &mut VecDeque<Pending<I>>,
    ) -> Vec<Running<I, O>> {
        let mut born: Vec<Running<I, O>> = Vec::new();
        for report in reports {
            match report {
                Report::Forked { seq, child, stream } => {
                    let Some(l) = self.take_launch(seq) else {
                        continue;
                    };
                    let forked_at = l.sent.unwrap_or_else(Instant::now);
                    let mut r = self.started(l.jobs, forked_at, child, stream, Some(seq));
                    if self.parts.ctx.run.aborting() {
                        terminate(&r.child, &mut r.killed, Killed::Cancelled, &mut r.deadline);
                    }
                    born.push(r);
                }
                Report::Failed { seq, message } => {
                    // While aborting (the server was told to cancel), its items are cancelled.
                    let kind = match self.parts.ctx.run.aborting() {
                        true => FailureKind::Cancelled,
                        false => FailureKind::Start,
                    };
                    if let Some(l) = self.take_launch(seq) {
                        self.fail_all(l.jobs, kind, &message, retry);
                    }
                }
                Report::Exited { seq, exit } => {
                    let all = running.iter_mut().chain(born.iter_mut());
                    if let Some(r) = all.into_iter().find(|r| r.seq == Some(seq)) {
                        r.exit = Some(exit);
                        // It wrote everything before it exited.
                        self.pump(r);
                    }
                }
            }
        }
        let died = self.server.as_mut().and_then(|s| s.newly_gone());
        if let Some(why) = died {
            let m = format!("{why}; the item's child was not forked");
            for l in std::mem::take(&mut self.launching) {
                self.fail_all(l.jobs, FailureKind::Start, &m, retry);
            }
            for r in running.iter().chain(&born).filter(|r| r.exit.is_none()) {
                // Its parent died: PR_SET_PDEATHSIG kills it too; make sure.
                sys::fdpass::signal(&r.child, libc::SIGKILL);
            }
            self.parts.ctx.stage_failed(FailureKind::Start, why);
        }
        born
    }

    /// The run is aborting: the server is told to fork none of the children waiting in it.
    pub(super) fn cancel_launches(&mut self) {
        if let Some(s) = self.server.as_mut().filter(|s| s.gone().is_none()) {
            s.cancel();
        }
    }

    fn take_launch(&mut self, seq: u64) -> Option<Launch<I>> {
        let at = self.launching.iter().position(|l| l.seq == seq)?;
        self.launching.remove(at)
    }

    /// The exit of a child that has exited: reaped here if it was forked here; a served one
    /// is watched this way only once the server is gone, and died with it (reaped here if it
    /// became this process's child, as under a subreaper or PID 1).
    pub(super) fn reap(&self, r: &mut Running<I, O>) -> sys::Exit {
        if r.seq.is_none() {
            return sys::reap(r.child.pid);
        }
        sys::fdpass::reap_adopted(&r.child);
        let why = self.server.as_ref().and_then(|s| s.gone());
        let why = why.unwrap_or("the fork server is gone");
        r.lost = Some(format!(
            "{why}; its child {} was killed with it",
            r.child.pid
        ));
        sys::Exit::Signal(libc::SIGKILL)
    }
}
