//! What the parent has yet to write to an ipc worker's input pipe.
//!
//! Frames go out in order. Small ones are copied into one buffer, so several ready items
//! leave in one write; a large payload is not copied at all: the outbox keeps a reference to
//! the feeder's buffer and hands its pages to the pipe (`vmsplice`), so the worker's read is
//! the only copy of its bytes. The pipe is non-blocking, so a write may end anywhere, even
//! inside a header; the rest waits for the next call.
//!
//! # The rule of handed pages
//!
//! A pipe holds the pages of a handed payload, not a copy: its reader reads whatever they
//! hold when it reads. So a payload is never changed (a [`Payload`] is immutable, and its
//! buffer is reused only by its sole owner: [`Payload::into_buffer`]) nor freed while a live
//! worker may still read it: the flight that holds it keeps it until its item is answered
//! (the worker read the whole frame before it ran the item) or its worker is buried (it can
//! read no more). A payload that goes to another worker is handed to that worker's pipe
//! anew.

use crate::ipc::frame::{self, Kind};
use crate::sys::PipeWriter;
use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::Arc;

/// Payloads of at least this many bytes are not copied: they are written from the buffer the
/// feeder encoded them into (the item's own, or a range of its hand-off's).
const COPY_UNDER: usize = 4 << 10;

/// An emptied copy buffer of at most this many bytes is kept for the next frames.
const KEEP_COPY_BUFFER: usize = 1 << 20;

/// Buffers passed to one `writev` at most.
const MAX_SLICES: usize = crate::sys::VMSPLICE_MAX;

/// An encoded input item: a range of a buffer, shared by the items of one hand-off (small
/// items) or its own (large ones).
#[derive(Clone)]
pub(crate) struct Payload {
    buf: Arc<Vec<u8>>,
    start: usize,
    end: usize,
}

impl Payload {
    /// A payload with a buffer of its own.
    pub(crate) fn own(buf: Vec<u8>) -> Self {
        let end = buf.len();
        Payload {
            buf: Arc::new(buf),
            start: 0,
            end,
        }
    }

    /// `buf[start..end]`, sharing `buf`.
    pub(crate) fn shared(buf: &Arc<Vec<u8>>, start: usize, end: usize) -> Self {
        debug_assert!(start <= end && end <= buf.len());
        Payload {
            buf: buf.clone(),
            start,
            end,
        }
    }

    /// `self[from..to]`, sharing its buffer.
    pub(crate) fn slice(&self, from: usize, to: usize) -> Self {
        debug_assert!(from <= to && to <= self.len());
        Payload {
            buf: self.buf.clone(),
            start: self.start + from,
            end: self.start + to,
        }
    }

    /// Drops the first `n` bytes.
    pub(crate) fn advance(&mut self, n: usize) {
        debug_assert!(n <= self.len());
        self.start += n;
    }

    /// Whether the payload is its whole buffer (the item's own).
    fn is_whole(&self) -> bool {
        self.start == 0 && self.end == self.buf.len()
    }

    /// The payload in a buffer of its own: an item that waits (a retry's backoff, a
    /// replacement worker) does not keep its whole hand-off's buffer alive.
    pub(crate) fn detach(self) -> Payload {
        match self.is_whole() {
            true => self,
            false => Payload::own(self.to_vec()),
        }
    }

    /// The emptied buffer, for encoding another item into, if the payload has it alone and
    /// it holds at most `max` bytes.
    pub(crate) fn into_buffer(self, max: usize) -> Option<Vec<u8>> {
        if !self.is_whole() || self.buf.capacity() > max {
            return None;
        }
        let mut buf = Arc::try_unwrap(self.buf).ok()?;
        buf.clear();
        Some(buf)
    }
}

#[cfg(test)]
impl Payload {
    /// The capacity of the buffer the payload is in.
    pub(crate) fn capacity(&self) -> usize {
        self.buf.capacity()
    }
}

impl std::ops::Deref for Payload {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }
}

enum Segment {
    /// Whole frames (or headers) copied in.
    Copied(Vec<u8>),
    /// A large payload, written from where the feeder encoded it.
    Shared(Payload),
}

impl Segment {
    fn bytes(&self) -> &[u8] {
        match self {
            Segment::Copied(v) => v,
            Segment::Shared(p) => p,
        }
    }
}

/// The bytes waiting for a worker's pipe, in order.
#[derive(Default)]
pub(crate) struct Outbox {
    segments: VecDeque<Segment>,
    /// Bytes of the first segment already written.
    head: usize,
    /// An emptied copy buffer, kept for the next frames.
    spare: Vec<u8>,
}

/// The worker's end of the pipe is closed: it is gone (its pidfd tells the rest).
#[derive(Debug)]
pub(crate) struct Broken;

impl Outbox {
    pub(crate) fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// The buffer that copied frames go to: the last segment if it is one.
    fn copy_buffer(&mut self) -> &mut Vec<u8> {
        if !matches!(self.segments.back(), Some(Segment::Copied(_))) {
            let spare = std::mem::take(&mut self.spare);
            self.segments.push_back(Segment::Copied(spare));
        }
        match self.segments.back_mut() {
            Some(Segment::Copied(v)) => v,
            _ => unreachable!("a copy buffer was just pushed"),
        }
    }

    /// Queues a frame of the parent's own (no size limit applies to it).
    pub(crate) fn push(&mut self, kind: Kind, id: u64, payload: &[u8]) {
        frame::push(self.copy_buffer(), kind, id, payload, usize::MAX)
            .expect("no limit on the parent's own frames");
    }

    /// Queues an item frame (`Kind::Item`), or a run of items (`Kind::Items`); a large
    /// payload is referenced, not copied.
    pub(crate) fn push_item(&mut self, kind: Kind, id: u64, payload: &Payload) {
        if payload.len() < COPY_UNDER {
            return self.push(kind, id, payload);
        }
        let out = self.copy_buffer();
        out.extend_from_slice(&frame::header(kind, id, payload.len()));
        self.segments.push_back(Segment::Shared(payload.clone()));
    }

    /// Writes as much as the pipe takes now: copied frames with `writev`, large payloads
    /// handed over page by page (see the module docs).
    pub(crate) fn write_to(&mut self, fd: &PipeWriter) -> Result<(), Broken> {
        while let Some(front) = self.segments.front() {
            let handed = matches!(front, Segment::Shared(_));
            let mut bufs: [&[u8]; MAX_SLICES] = [&[]; MAX_SLICES];
            let mut n = 0;
            for (i, s) in self.segments.iter().take(MAX_SLICES).enumerate() {
                if matches!(s, Segment::Shared(_)) != handed {
                    break;
                }
                let from = if i == 0 { self.head } else { 0 };
                bufs[n] = &s.bytes()[from..];
                n += 1;
            }
            let r = match handed {
                true => crate::sys::vmsplice(fd, &bufs[..n]),
                false => {
                    let slices: [IoSlice<'_>; MAX_SLICES] =
                        std::array::from_fn(|i| IoSlice::new(bufs[i]));
                    rustix::io::writev(fd, &slices[..n])
                }
            };
            match r {
                Ok(written) => self.advance(written),
                Err(rustix::io::Errno::INTR) => continue,
                Err(rustix::io::Errno::AGAIN) => return Ok(()),
                Err(_) => {
                    self.segments.clear();
                    self.head = 0;
                    return Err(Broken);
                }
            }
        }
        Ok(())
    }

    /// `written` bytes from the front went out.
    fn advance(&mut self, mut written: usize) {
        while written > 0 {
            let front = self.segments.front().expect("written bytes were queued");
            let left = front.bytes().len() - self.head;
            if written < left {
                self.head += written;
                return;
            }
            written -= left;
            self.head = 0;
            if let Some(Segment::Copied(mut v)) = self.segments.pop_front() {
                if v.capacity() <= KEEP_COPY_BUFFER {
                    v.clear();
                    self.spare = v;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipc::frame::Decoder;
    use std::io::Read;

    /// Items of the given sizes, each filled with its index.
    fn payloads(sizes: &[usize]) -> Vec<Payload> {
        let shared = Arc::new((0..64u8).collect::<Vec<u8>>());
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| match n {
                0..=64 if i % 2 == 0 => Payload::shared(&shared, 0, n),
                _ => Payload::own(vec![i as u8; n]),
            })
            .collect()
    }

    #[test]
    fn frames_arrive_whole_and_in_order_through_a_small_pipe() {
        // A pipe of one page takes at most a page per write: writes end inside headers
        // and payloads alike.
        let (r, w) = crate::sys::input_pipe(4096).unwrap();
        assert_eq!(rustix::pipe::fcntl_getpipe_size(&w).unwrap(), 4096);
        let sizes = [3, 70_000, 0, 5_000, 64, 4_095, 4_096, 200_000, 1];
        let items = payloads(&sizes);
        let mut out = Outbox::default();
        for (i, p) in items.iter().enumerate() {
            out.push_item(Kind::Item, i as u64, p);
        }
        out.push(Kind::Shutdown, 0, &[]);
        let expected: usize = sizes.iter().map(|n| n + frame::HEADER).sum::<usize>() + 13;
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            std::fs::File::from(r).read_to_end(&mut all).unwrap();
            all
        });
        let mut writes = 0;
        while !out.is_empty() {
            out.write_to(&w).unwrap();
            writes += 1;
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        drop(w);
        let all = reader.join().unwrap();
        assert_eq!(all.len(), expected);
        assert!(
            writes > 1,
            "the pipe took everything at once: nothing was split"
        );
        let mut dec = Decoder::new(usize::MAX);
        dec.extend(&all);
        let mut got = Vec::new();
        while let Some((kind, id, body)) = dec
            .next(|kind, id, body| (kind, id, body.to_vec()))
            .unwrap()
        {
            got.push((kind, id, body));
        }
        assert_eq!(got.len(), sizes.len() + 1);
        for (i, p) in items.iter().enumerate() {
            assert_eq!(got[i], (Kind::Item, i as u64, p.to_vec()), "frame {i}");
        }
        assert_eq!(got[sizes.len()].0, Kind::Shutdown);
    }

    #[test]
    fn a_large_payload_is_not_copied_and_a_closed_pipe_is_broken() {
        let mut out = Outbox::default();
        let big = Payload::own(vec![7; COPY_UNDER]);
        out.push_item(Kind::Item, 1, &big);
        assert_eq!(
            out.segments.len(),
            2,
            "header, then the payload by reference"
        );
        match &out.segments[1] {
            Segment::Shared(p) => assert!(Arc::ptr_eq(&p.buf, &big.buf)),
            Segment::Copied(_) => panic!("a large payload was copied"),
        }
        out.push_item(Kind::Item, 2, &Payload::own(vec![1; COPY_UNDER - 1]));
        assert_eq!(out.segments.len(), 3, "a small frame is copied after it");
        let (r, w) = crate::sys::input_pipe(4096).unwrap();
        drop(r);
        assert!(out.write_to(&w).is_err());
        assert!(out.is_empty());
    }

    #[test]
    fn detach_copies_only_a_shared_range() {
        let buf = Arc::new(vec![1, 2, 3, 4]);
        let part = Payload::shared(&buf, 1, 3).detach();
        assert_eq!(&*part, &[2, 3]);
        assert!(!Arc::ptr_eq(&part.buf, &buf));
        let own = Payload::own(vec![9; 3]);
        let inner = own.buf.clone();
        assert!(Arc::ptr_eq(&own.detach().buf, &inner));
    }

    #[test]
    fn a_buffer_is_reused_only_by_its_sole_owner_and_only_if_small_enough() {
        let shared = Arc::new(vec![1; 8]);
        assert!(Payload::shared(&shared, 0, 4).into_buffer(100).is_none());
        let own = Payload::own(vec![2; 8]);
        let still_held = own.clone();
        assert!(
            own.into_buffer(100).is_none(),
            "the outbox may still write it"
        );
        assert!(Payload::own(vec![3; 200]).into_buffer(100).is_none());
        let buf = still_held.into_buffer(100).expect("sole owner");
        assert!(buf.is_empty() && buf.capacity() >= 8);
    }
}
