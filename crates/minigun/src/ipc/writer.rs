//! The child's writer: its side of the result pipe (and of an ipc worker's results log).

use super::frame::HEADER;
use super::message::{self, ChildError, Done};
use super::results_log::ResultsLog;
use crate::error::{EmitError, FailureKind};
use std::any::Any;
use std::os::fd::OwnedFd;

type Enc<T> = fn(&T, &mut Vec<u8>) -> Result<(), String>;

/// Flush the child's buffer once it holds this much, so the parent reads while we run.
const FLUSH_AT: usize = 64 << 10;

/// Writes all of `bytes`; on a non-blocking fd (a cow child's pipe is made so, in one system
/// call with its read end) a full pipe is waited for.
fn write_all(fd: &OwnedFd, bytes: &[u8]) -> std::io::Result<()> {
    use rustix::event::{PollFd, PollFlags};
    let mut off = 0;
    while off < bytes.len() {
        match rustix::io::write(fd, &bytes[off..]) {
            Ok(n) => off += n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(rustix::io::Errno::AGAIN) => {
                // Readable again, or hung up (then the next write says so).
                let mut fds = [PollFd::new(fd, PollFlags::OUT)];
                match rustix::event::poll(&mut fds, None) {
                    Ok(_) | Err(rustix::io::Errno::INTR) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// A buffer for [`ChildOut::with_buffer`]: room for what is written at once.
pub(crate) fn buffer() -> Vec<u8> {
    Vec::with_capacity(FLUSH_AT)
}

/// The child's side of its result pipe: buffered frames, written with blocking writes.
///
/// An ipc worker also has a [`ResultsLog`]: it `commit`s each finished item's frames there and
/// writes the log to the pipe in batches; a cow child writes each item's frames at once.
pub(crate) struct ChildOut<'a> {
    fd: OwnedFd,
    buf: Vec<u8>,
    max: usize,
    outputs: u64,
    /// Where the running item's only result frame starts in `buf`, while it is the last
    /// frame there (its `done` may then join it as one `result_done` frame).
    last_result: Option<usize>,
    /// Whether `done` may join a lone result (ipc workers; cow children keep two frames).
    combine: bool,
    /// The item whose `result_done` frame is all of `buf`, and the frame's length: its
    /// answer may join the results log's last `results` frame ([`ResultsLog::answer`]).
    lone: Option<(u64, usize)>,
    /// The pipe is grown to this size before the first write of a full buffer, if set
    /// ([`ChildOut::growing`]).
    grow: Option<usize>,
    log: Option<&'a mut ResultsLog>,
}

impl<'a> ChildOut<'a> {
    pub(crate) fn new(fd: OwnedFd, max: usize, log: Option<&'a mut ResultsLog>) -> Self {
        Self::with_buffer(fd, max, log, buffer())
    }

    /// [`ChildOut::new`] writing through `buf` (from [`buffer`], made before the fork: a
    /// child that writes little then writes one page of it, and allocates nothing).
    pub(crate) fn with_buffer(
        fd: OwnedFd,
        max: usize,
        log: Option<&'a mut ResultsLog>,
        mut buf: Vec<u8>,
    ) -> Self {
        buf.clear();
        ChildOut {
            fd,
            buf,
            max,
            outputs: 0,
            last_result: None,
            combine: false,
            lone: None,
            grow: None,
            log,
        }
    }

    /// Grows the pipe to `bytes` (best effort) when the child first has a full buffer to
    /// write: a child that writes little never pays for it.
    pub(crate) fn growing(mut self, bytes: usize) -> Self {
        self.grow = Some(bytes);
        self
    }

    /// Lets `done` join an item's only result into one `result_done` frame.
    pub(crate) fn combined(mut self) -> Self {
        self.combine = true;
        self
    }

    /// The child is about to `_exit` after its last write: its buffer is not freed and its
    /// fd not closed (the exit does both), which would write pages of the allocator that a
    /// forked child otherwise shares with its parent.
    pub(crate) fn abandon(self) {
        std::mem::forget(self);
    }

    /// A new item starts: no outputs yet.
    pub(crate) fn start_item(&mut self) {
        self.outputs = 0;
        self.last_result = None;
        self.lone = None;
    }

    /// Frames the `tracing` records stage code logged so far (after the running item's frames).
    fn take_records(&mut self) {
        for rec in crate::exec::fork::trace::take() {
            let _ = message::push_log(&mut self.buf, &rec, self.max);
        }
    }

    /// Writes everything: the results log first (earlier items), then the buffer.
    pub(crate) fn flush(&mut self) -> std::io::Result<()> {
        self.take_records();
        if self.buf.len() >= FLUSH_AT {
            if let Some(bytes) = self.grow.take() {
                crate::sys::grow_pipe(&self.fd, bytes);
            }
        }
        // The log is the child's while it writes (the parent may take its bytes otherwise).
        if let Some(log) = self.log.as_deref() {
            log.hold();
        }
        let r = self.write_all_held();
        if let Some(log) = self.log.as_deref() {
            log.release();
        }
        r
    }

    fn write_all_held(&mut self) -> std::io::Result<()> {
        if let Some(log) = self.log.as_deref_mut() {
            if !log.bytes().is_empty() {
                if let Err(e) = write_all(&self.fd, log.bytes()) {
                    self.buf.clear();
                    self.last_result = None;
                    return Err(e);
                }
                log.sent();
            }
        }
        let r = write_all(&self.fd, &self.buf);
        if let (Ok(()), Some(log)) = (&r, self.log.as_deref_mut()) {
            log.wrote(self.buf.len());
        }
        self.buf.clear();
        self.last_result = None;
        self.lone = None;
        r
    }

    /// The current item has ended: its frames go to the results log (which survives this
    /// process), or out at once when the log is full or there is none (`Ok(true)`: written).
    /// An item whose only frame is a `result_done` joins the log's `results` frame of the
    /// items before it: one frame for a run of such items, not one each.
    pub(crate) fn commit(&mut self) -> std::io::Result<bool> {
        self.take_records();
        // Still the item's only frame (no log records came after it)?
        let lone = self.lone.take().filter(|&(_, n)| n == self.buf.len());
        let logged = match self.log.as_deref_mut() {
            Some(log) => {
                log.hold();
                let answered = lone.is_some_and(|(id, n)| {
                    let (output, latency) = self.buf[HEADER..n].split_at(n - HEADER - 8);
                    let latency_ns = u64::from_le_bytes(latency.try_into().expect("8 bytes"));
                    log.answer(id, latency_ns, output, self.max)
                });
                let logged = answered || log.append(&self.buf);
                log.release();
                logged
            }
            None => false,
        };
        if logged {
            self.buf.clear();
            self.last_result = None;
            return Ok(false);
        }
        self.flush().map(|()| true)
    }

    /// Whether frames wait to be written.
    pub(crate) fn holds(&self) -> bool {
        !self.buf.is_empty() || self.log.as_ref().is_some_and(|l| l.len() > 0)
    }

    /// Records in the results log which item runs (a flag bit: has ended), if there is one.
    pub(crate) fn running(&self, word: u64) {
        if let Some(log) = &self.log {
            log.set_running(word);
        }
    }

    pub(crate) fn result<O>(
        &mut self,
        id: u64,
        value: &O,
        encode: Enc<O>,
    ) -> Result<(), EmitError> {
        let start = message::push_result(&mut self.buf, id, value, encode, self.max)
            .map_err(|e| EmitError::Encode(format!("a {}: {e}", std::any::type_name::<O>())))?;
        self.last_result = (self.outputs == 0).then_some(start);
        self.outputs += 1;
        if self.buf.len() >= FLUSH_AT {
            self.flush().map_err(|_| EmitError::Closed)?;
        }
        Ok(())
    }

    pub(crate) fn routed(
        &mut self,
        id: u64,
        index: u32,
        item: &(dyn Any + Send),
        encode: fn(&(dyn Any + Send), &mut Vec<u8>) -> Result<(), String>,
    ) -> Result<(), EmitError> {
        message::push_routed(&mut self.buf, id, index, item, encode, self.max)
            .map_err(EmitError::Encode)?;
        self.outputs += 1;
        if self.buf.len() >= FLUSH_AT {
            self.flush().map_err(|_| EmitError::Closed)?;
        }
        Ok(())
    }

    pub(crate) fn done(&mut self, id: u64, latency_ns: u64) {
        if let (true, 1, Some(start)) = (self.combine, self.outputs, self.last_result.take()) {
            if message::join_done(&mut self.buf, start, latency_ns, self.max) {
                self.lone = (start == 0).then_some((id, self.buf.len()));
                return;
            }
        }
        let d = Done {
            latency_ns,
            outputs: self.outputs,
        };
        message::push_done(&mut self.buf, id, &d, self.max);
    }

    pub(crate) fn error(&mut self, id: u64, kind: FailureKind, message: String) {
        message::push_error(&mut self.buf, id, ChildError { kind, message }, self.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipc::codec::{Codec, Postcard};
    use crate::ipc::frame::{Decoder, Kind};

    fn encode(x: &u64, out: &mut Vec<u8>) -> Result<(), String> {
        Postcard::encode(x, out)
    }

    /// The kinds and ids of the whole frames in `bytes`, with each `results` frame's number
    /// of answers.
    fn frames(bytes: &[u8]) -> Vec<(Kind, u64, usize)> {
        let mut dec = Decoder::new(1 << 20);
        dec.extend(bytes);
        let mut got = Vec::new();
        while let Some(f) = dec
            .next(|kind, id, mut payload| {
                let mut answers = 0;
                while let (Kind::Results, Some((_, rest))) = (kind, message::split_answer(payload))
                {
                    answers += 1;
                    payload = rest;
                }
                (kind, id, answers)
            })
            .unwrap()
        {
            got.push(f);
        }
        assert_eq!(dec.pending(), 0);
        got
    }

    #[test]
    fn items_of_one_output_each_are_logged_as_one_results_frame() {
        let (r, w) = crate::sys::pipe(false).unwrap();
        let mut log = ResultsLog::new(1 << 16).unwrap();
        let mut out = ChildOut::new(w, 1 << 20, Some(&mut log)).combined();
        let item = |out: &mut ChildOut<'_>, id: u64, outputs: u64| {
            out.start_item();
            for k in 0..outputs {
                out.result(id, &(id * 10 + k), encode).unwrap();
            }
            out.done(id, 100 + id);
            assert!(!out.commit().unwrap(), "logged, not written");
        };
        for id in 0..3 {
            item(&mut out, id, 1);
        }
        // Two outputs, or none: frames of its own; the next lone item starts a frame.
        item(&mut out, 3, 2);
        item(&mut out, 4, 0);
        item(&mut out, 5, 1);
        item(&mut out, 6, 1);
        out.flush().unwrap();
        drop(out);
        assert_eq!(log.len(), 0, "the log went out");
        let mut bytes = vec![0; 1 << 16];
        let n = rustix::io::read(&r, &mut bytes).unwrap();
        assert_eq!(
            frames(&bytes[..n]),
            [
                (Kind::Results, 0, 3),
                (Kind::Result, 3, 0),
                (Kind::Result, 3, 0),
                (Kind::Done, 3, 0),
                (Kind::Done, 4, 0),
                (Kind::Results, 5, 2),
            ]
        );
    }
}
