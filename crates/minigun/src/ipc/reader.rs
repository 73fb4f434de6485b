//! The parent's reader of a child's result stream.

use super::frame::Decoder;
use super::results_log::ResultsLog;
use rustix::event::{PollFd, PollFlags};
use std::os::fd::OwnedFd;

/// Most bytes read from one child per wake-up, so one chatty child cannot starve the rest.
const READ_BUDGET: usize = 4 << 20;

/// A child's result stream, as the parent reads it.
pub(crate) struct Stream {
    fd: OwnedFd,
    pub(crate) dec: Decoder,
    pub(crate) eof: bool,
    /// Bytes of the stream received so far: read from the pipe, or taken from a batched
    /// worker's log.
    pub(crate) received: u64,
    /// Why the stream is not trusted, once a frame of it was refused ([`Stream::discard`]).
    pub(crate) corrupt: Option<String>,
}

impl Stream {
    /// The stream's entry in a poll set: readable, until its end was read.
    pub(crate) fn poll_fd(&self) -> PollFd<'_> {
        let flags = match self.eof {
            true => PollFlags::empty(),
            false => PollFlags::IN,
        };
        PollFd::new(&self.fd, flags)
    }

    pub(crate) fn new(fd: OwnedFd, max: usize) -> Self {
        Stream {
            fd,
            dec: Decoder::new(max),
            eof: false,
            received: 0,
            corrupt: None,
        }
    }
    /// The stream is corrupt (`why`): nothing more of it is read or decoded, not even bytes
    /// already read (the child's own frames after a bad one are not trusted). `false` if it
    /// already was (the first reason stands).
    pub(crate) fn discard(&mut self, why: String) -> bool {
        if self.corrupt.is_some() {
            return false;
        }
        self.corrupt = Some(why);
        self.eof = true;
        self.dec.clear();
        true
    }

    /// Reads what is available now (non-blocking), up to the read budget.
    pub(crate) fn read_available(&mut self) {
        const CHUNK: usize = 64 << 10;
        let mut total = 0;
        while !self.eof && total < READ_BUDGET {
            match self.dec.read_from(&self.fd, CHUNK) {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    total += n;
                    self.received += n as u64;
                }
                Err(rustix::io::Errno::INTR) => continue,
                Err(rustix::io::Errno::AGAIN) => break,
                Err(_) => self.eof = true,
            }
        }
    }

    /// Takes the frames a busy worker holds in its results log ([`ResultsLog::take`]), once
    /// every byte it wrote to the pipe before them has been read (the pipe is read up to the
    /// log's base first); returns how many bytes it took. Bytes read from the pipe on the way
    /// stay in the decoder, taken or not.
    pub(crate) fn take_held(&mut self, log: &ResultsLog) -> Option<usize> {
        let bytes = log.take(|base| {
            // Everything before `base` is in the pipe already: read it first.
            while self.received < base && !self.eof {
                let before = self.received;
                self.read_available();
                if self.received == before {
                    break;
                }
            }
            self.received == base
        })?;
        self.dec.extend(&bytes);
        self.received += bytes.len() as u64;
        Some(bytes.len())
    }
}
