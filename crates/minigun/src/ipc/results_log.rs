//! The results log: what a batched ipc worker has finished but not yet written to its pipe,
//! in memory it shares with the parent (a [`SharedMem`] mapping, made before the fork), so
//! that it survives the worker.
//!
//! A worker appends the frames of each finished item here instead of writing them to its
//! pipe at once, and writes the log to the pipe in batches. If it dies in between, the parent
//! (after reaping it and reading its pipe to the end) takes the unsent frames from the log
//! ([`ResultsLog::replay`]), so no finished item's results are lost and none has to run again.
//!
//! # Layout
//!
//! Header words: `base` (the stream offset of the first logged byte: every byte the worker
//! wrote to the pipe before it, through the log or directly), `len` (logged bytes),
//! `running` (the worker's progress: the item it runs, with [`PROGRESS_DONE`] once it has
//! ended), `owner` (free, child or parent); then the logged bytes, whole frames. The answers
//! of consecutive items of one output each share one `results` frame, which each such item
//! extends ([`ResultsLog::answer`]); a death while it does is undone by [`whole_answers`].
//!
//! # Who holds the log
//!
//! While the worker lives, the log belongs to whoever holds `owner`: the worker takes it
//! around every append and every write to the pipe ([`ResultsLog::hold`]), the parent only to
//! take the logged bytes itself when they have waited too long ([`ResultsLog::take`]: a worker
//! busy with a long item does not sit on finished results). Whoever holds it sees every byte
//! before `base` already in the pipe or taken, so the stream stays in order. Once the worker
//! is gone the parent reads the log without asking.
//!
//! Whenever bytes leave the log (written by the worker, taken by the parent), `len` is
//! cleared before `base` moves, so a death in between never makes bytes already sent look
//! unsent: at worst the parent sees them neither in the log nor yet in the pipe, which the
//! replay check ([`ResultsLog::replay`]) tells apart from an intact stream.

use super::frame::{self, Kind, HEADER};
use super::message::{self, ANSWER_PREFIX};
use crate::sys::SharedMem;
use std::sync::atomic::{AtomicU64, Ordering};

/// The size of an ipc worker's results log.
pub(crate) const LOG_BYTES: usize = 256 << 10;

/// The bit of the `running` word set once the item it names has ended.
pub(crate) const PROGRESS_DONE: u64 = 1 << 63;

/// Header words.
const BASE: usize = 0;
const LEN: usize = 1;
const RUNNING: usize = 2;
const OWNER: usize = 3;

/// Values of the `owner` word.
const FREE: u64 = 0;
const CHILD: u64 = 1;
const PARENT: u64 = 2;

/// A batched ipc worker's results log (see the module docs).
pub(crate) struct ResultsLog {
    mem: SharedMem,
    /// Child side: the `results` frame at the log's end, which the next item's answer may
    /// extend (not shared: each process has its own copy of this word).
    open: Option<Open>,
}

/// A `results` frame the child may extend: where it starts and ends in the log, and the
/// item whose answer may come next in it.
#[derive(Debug, Clone, Copy)]
struct Open {
    start: usize,
    end: usize,
    next: u64,
}

/// What a dead worker's log adds to the stream the parent read from its pipe.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Replay<'a> {
    /// The log is empty.
    Nothing,
    /// The stream is intact and continues in the log exactly where the pipe left off: these
    /// are the bytes after that point.
    Continue(&'a [u8]),
    /// The stream had foreign bytes, or does not meet the log: the whole log, whose frames
    /// the parent matches to the items still in flight.
    Foreign(&'a [u8]),
}

impl ResultsLog {
    /// A log holding up to `cap` bytes.
    pub(crate) fn new(cap: usize) -> std::io::Result<Self> {
        let log = ResultsLog {
            mem: SharedMem::new(cap)?,
            open: None,
        };
        log.set_running(u64::MAX);
        Ok(log)
    }

    fn word(&self, i: usize) -> &AtomicU64 {
        self.mem.word(i)
    }

    /// Child side: the item the child is about to run (or, with [`PROGRESS_DONE`], has
    /// finished).
    pub(crate) fn set_running(&self, word: u64) {
        self.word(RUNNING).store(word, Ordering::Release);
    }

    /// Parent side: the item the worker runs now, if the last value of
    /// [`ResultsLog::set_running`] names one that has not ended (`u64::MAX` at first: none).
    pub(crate) fn running_item(&self) -> Option<u64> {
        Some(self.word(RUNNING).load(Ordering::Acquire)).filter(|r| r & PROGRESS_DONE == 0)
    }

    /// Child side: waits until the log is the child's (the parent may be taking its bytes,
    /// which takes microseconds) and keeps it until [`ResultsLog::release`].
    pub(crate) fn hold(&self) {
        let owner = self.word(OWNER);
        let mut spins = 0u32;
        while owner
            .compare_exchange_weak(FREE, CHILD, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            spins += 1;
            match spins {
                0..64 => std::hint::spin_loop(),
                _ => std::thread::yield_now(),
            }
        }
    }

    /// Child side: gives the log back.
    pub(crate) fn release(&self) {
        self.word(OWNER).store(FREE, Ordering::Release);
    }

    /// Parent side, while the child lives: takes the logged bytes if the child is not using
    /// the log. `catch_up(base)` must first receive every byte the child wrote to the pipe,
    /// which ends at `base` (the child cannot write more meanwhile); if it cannot, or the
    /// log is empty or busy, nothing is taken. The taken bytes count as written to the pipe.
    pub(crate) fn take(&self, catch_up: impl FnOnce(u64) -> bool) -> Option<Vec<u8>> {
        let owner = self.word(OWNER);
        if self.word(LEN).load(Ordering::Acquire) == 0
            || owner
                .compare_exchange(FREE, PARENT, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
        {
            return None;
        }
        if self.word(LEN).load(Ordering::Acquire) == 0 {
            // The child wrote the log out just before the parent got it.
            owner.store(FREE, Ordering::Release);
            return None;
        }
        let base = self.base();
        let bytes = match catch_up(base) {
            true => self.bytes().to_vec(),
            false => Vec::new(),
        };
        if !bytes.is_empty() {
            // As the child's `sent`: length first, so a death in between never makes the
            // taken bytes look unsent.
            self.word(LEN).store(0, Ordering::Release);
            self.word(BASE)
                .fetch_add(bytes.len() as u64, Ordering::AcqRel);
        }
        owner.store(FREE, Ordering::Release);
        (!bytes.is_empty()).then_some(bytes)
    }

    /// The number of logged bytes (a hint while the child lives).
    pub(crate) fn len(&self) -> u64 {
        self.word(LEN).load(Ordering::Acquire)
    }

    /// The logged bytes: the child's, to write them; the parent's, once the child is gone.
    /// The length is capped at the capacity: a child that scribbled over its header cannot
    /// make the parent read outside the mapping (stage code that scribbles over the bytes can
    /// only make the parent read wrong ones, which its decoder rejects as a corrupt stream).
    pub(crate) fn bytes(&self) -> &[u8] {
        self.mem
            .bytes(self.word(LEN).load(Ordering::Acquire) as usize)
    }

    /// Appends `data`, whole frames, if it fits (child side); `false` if the log is too full.
    pub(crate) fn append(&mut self, data: &[u8]) -> bool {
        self.open = None;
        let len = self.bytes().len();
        if !self.mem.write(len, data) {
            return false;
        }
        self.word(LEN)
            .store((len + data.len()) as u64, Ordering::Release);
        true
    }

    /// Child side: appends item `id`'s answer (its only output, encoded, and its latency in
    /// ns) to the `results` frame at the log's end if that frame ends with the answer of the
    /// item before `id` and stays within `max` bytes, or else as a new `results` frame.
    /// `false` (nothing written) if it does not fit in the log, or in one frame of `max`.
    ///
    /// The answer's bytes are written after the log's end first, then the frame's new length,
    /// then the log's `len`: a death between the last two leaves a last frame longer than
    /// the log, which the parent takes back to the answers the log holds ([`whole_answers`]).
    pub(crate) fn answer(&mut self, id: u64, latency_ns: u64, output: &[u8], max: usize) -> bool {
        let len = self.bytes().len();
        let prefix = message::answer_prefix(latency_ns, output);
        let add = ANSWER_PREFIX + output.len();
        let extend = self
            .open
            .filter(|o| o.end == len && o.next == id && o.end - o.start - 4 + add <= max);
        let (start, head) = match extend {
            Some(o) => (o.start, None),
            None if HEADER - 4 + add <= max => (len, Some(frame::header(Kind::Results, id, add))),
            None => return false,
        };
        let at = len + head.map_or(0, |h| h.len());
        if at + add > self.mem.capacity() {
            return false;
        }
        if let Some(h) = head {
            self.mem.write(len, &h);
        }
        self.mem.write(at, &prefix);
        self.mem.write(at + ANSWER_PREFIX, output);
        let end = at + add;
        if head.is_none() {
            let frame_len = u32::try_from(end - start - 4).expect("within the frame limit");
            self.mem.write(start, &frame_len.to_le_bytes());
        }
        self.word(LEN).store(end as u64, Ordering::Release);
        self.open = Some(Open {
            start,
            end,
            next: id.wrapping_add(1),
        });
        true
    }

    /// The logged bytes were written to the pipe (child side): empty the log. The length is
    /// cleared before the base moves, so a death in between never makes old bytes look unsent.
    pub(crate) fn sent(&mut self) {
        self.open = None;
        let len = self.word(LEN).swap(0, Ordering::AcqRel);
        self.word(BASE).fetch_add(len, Ordering::AcqRel);
    }

    /// Child side: `n` bytes went to the pipe directly (not through the log).
    pub(crate) fn wrote(&mut self, n: usize) {
        self.word(BASE).fetch_add(n as u64, Ordering::AcqRel);
    }

    /// The stream offset of the first logged byte: every byte the child wrote to the pipe
    /// before it, through the log or directly.
    pub(crate) fn base(&self) -> u64 {
        self.word(BASE).load(Ordering::Acquire)
    }

    /// Parent side, once the child is gone and its pipe read to the end: what the log adds
    /// to the `received` bytes of stream, of which `pending` are a frame not yet complete.
    /// A stream not `trusted` (it was corrupt) never continues in the log.
    ///
    /// An intact stream continues in the log exactly where the pipe left off: the bytes of
    /// a frame the parent has in part are the log's bytes just before that point.
    pub(crate) fn replay(&self, received: u64, pending: &[u8], trusted: bool) -> Replay<'_> {
        let bytes = self.bytes();
        if bytes.is_empty() {
            return Replay::Nothing;
        }
        let n = pending.len() as u64;
        let at = received.checked_sub(self.base());
        let intact = trusted
            && at.is_some_and(|at| {
                at <= bytes.len() as u64
                    && at >= n
                    && pending == &bytes[(at - n) as usize..at as usize]
            });
        match (intact, at) {
            (true, Some(at)) => Replay::Continue(&bytes[at as usize..]),
            _ => Replay::Foreign(bytes),
        }
    }
}

/// Parent side, for a dead worker's stream: if `pending` (the bytes of a last frame not
/// complete) is a `results` frame that the worker was extending when it died (its length
/// already counts the answer it was adding, which the log's `len` does not hold yet), that
/// frame cut to the whole answers it has. `None` for anything else (an item whose frames did
/// not all arrive, which is the one that was running).
pub(crate) fn whole_answers(pending: &[u8]) -> Option<Vec<u8>> {
    let payload = pending.get(HEADER..)?;
    let claimed = u32::from_le_bytes(pending[..4].try_into().expect("4 bytes")) as usize;
    if pending[4] != Kind::Results as u8 || claimed <= pending.len() - 4 {
        return None;
    }
    let mut rest = payload;
    while !rest.is_empty() {
        let (_, after) = message::split_answer(rest)?;
        rest = after;
    }
    let mut frame = pending.to_vec();
    let len = u32::try_from(pending.len() - 4).ok()?;
    frame[..4].copy_from_slice(&len.to_le_bytes());
    (!payload.is_empty()).then_some(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parent_takes_logged_bytes_only_when_the_child_lets_it() {
        let mut log = ResultsLog::new(4096).unwrap();
        assert!(
            log.take(|_| true).is_none(),
            "nothing logged, nothing taken"
        );
        log.wrote(10);
        log.hold();
        assert!(log.append(b"abc"));
        // The child holds the log: the parent takes nothing and waits for nothing.
        assert!(log
            .take(|_| panic!("not asked while the child holds the log"))
            .is_none());
        log.release();
        // The parent cannot catch up with the pipe: the log stays as it is.
        assert!(log.take(|base| base == 0).is_none());
        assert_eq!((log.base(), log.bytes()), (10, &b"abc"[..]));
        assert_eq!(log.take(|base| base == 10), Some(b"abc".to_vec()));
        assert_eq!((log.base(), log.len()), (13, 0));
        // The child goes on where the parent stopped.
        log.hold();
        assert!(log.append(b"de"));
        log.sent();
        log.release();
        assert_eq!((log.base(), log.len()), (15, 0));
    }

    /// A `results` frame: its first item, and its answers as (latency, output).
    type Frame = (u64, Vec<(u64, Vec<u8>)>);

    /// The `results` frames in `bytes` (whole frames).
    fn results_frames(bytes: &[u8]) -> Vec<Frame> {
        let mut dec = frame::Decoder::new(1 << 20);
        dec.extend(bytes);
        let mut frames = Vec::new();
        while let Some(f) = dec
            .next(|kind, id, mut payload| {
                assert_eq!(kind, Kind::Results);
                let mut answers = Vec::new();
                while let Some((a, rest)) = message::split_answer(payload) {
                    answers.push((a.latency_ns, a.output.to_vec()));
                    payload = rest;
                }
                assert!(payload.is_empty(), "whole answers");
                (id, answers)
            })
            .unwrap()
        {
            frames.push(f);
        }
        assert_eq!(dec.pending(), 0, "whole frames");
        frames
    }

    #[test]
    fn answers_of_consecutive_items_share_a_frame_until_anything_else_comes() {
        let mut log = ResultsLog::new(4096).unwrap();
        let max = 1 << 20;
        assert!(log.answer(4, 10, b"a", max));
        assert!(log.answer(5, 11, b"bb", max));
        assert!(log.answer(6, 12, b"", max));
        // Not the next item (a retry, a requeued item): a frame of its own.
        assert!(log.answer(2, 13, b"c", max));
        let frames = results_frames(log.bytes());
        assert_eq!(
            frames,
            vec![
                (
                    4,
                    vec![(10, b"a".to_vec()), (11, b"bb".to_vec()), (12, vec![])]
                ),
                (2, vec![(13, b"c".to_vec())]),
            ]
        );
        // Other frames between two answers: the next answer starts a frame.
        let mut other = Vec::new();
        frame::push(&mut other, Kind::Done, 3, &[0, 1], max).unwrap();
        assert!(log.append(&other));
        assert!(log.answer(3, 14, b"d", max));
        let tail = &log.bytes()[log.bytes().len() - (HEADER + ANSWER_PREFIX + 1)..];
        assert_eq!(results_frames(tail), vec![(3, vec![(14, b"d".to_vec())])]);
        // Written to the pipe, or taken by the parent: the next answer starts a frame.
        log.sent();
        assert!(log.answer(4, 15, b"e", max));
        assert_eq!(
            log.take(|_| true).map(|b| results_frames(&b).len()),
            Some(1)
        );
        assert!(log.answer(5, 16, b"f", max));
        assert_eq!(
            results_frames(log.bytes()),
            vec![(5, vec![(16, b"f".to_vec())])]
        );
        // A frame stays within the limit: the answer that would pass it starts a frame.
        let max = HEADER - 4 + 2 * (ANSWER_PREFIX + 1);
        assert!(log.answer(6, 17, b"g", max));
        assert!(log.answer(7, 18, b"h", max));
        let frames = results_frames(log.bytes());
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0].1.len(), 2, "f and g: the limit");
        assert_eq!(frames[1], (7, vec![(18, b"h".to_vec())]));
        // An answer that fits in no frame, or not in the log, is refused and writes nothing.
        let len = log.len();
        assert!(!log.answer(8, 19, &[0; 30], max));
        let cap = log.mem.capacity();
        assert!(!log.answer(8, 19, &vec![0; cap], 1 << 24));
        assert_eq!(log.len(), len);
    }

    #[test]
    fn a_death_while_an_answer_is_added_leaves_the_answers_before_it() {
        let mut log = ResultsLog::new(4096).unwrap();
        let max = 1 << 20;
        assert!(log.answer(0, 10, b"a", max));
        assert!(log.answer(1, 11, b"b", max));
        let len = log.len();
        // The worker dies after it wrote item 2's answer and the frame's new length, before
        // the log's length: the frame now claims more than the log holds.
        assert!(log.answer(2, 12, b"c", max));
        log.word(LEN).store(len, Ordering::Release);
        let Replay::Continue(bytes) = log.replay(0, &[], true) else {
            panic!("an intact stream")
        };
        let mut dec = frame::Decoder::new(max);
        dec.extend(bytes);
        assert_eq!(
            dec.next(|_, _, _| ()),
            Ok(None),
            "the last frame is cut short"
        );
        let frame = whole_answers(dec.pending_bytes()).expect("its whole answers");
        assert_eq!(
            results_frames(&frame),
            vec![(0, vec![(10, b"a".to_vec()), (11, b"b".to_vec())])]
        );
        // Anything else cut short is left alone: a frame of another kind, a results frame
        // cut inside an answer (a partial write to the pipe), a whole frame, a header.
        let mut done = Vec::new();
        frame::push(&mut done, Kind::Done, 3, &[0, 1], max).unwrap();
        assert_eq!(whole_answers(&done[..done.len() - 1]), None);
        assert_eq!(whole_answers(&frame[..frame.len() - 1]), None);
        assert_eq!(whole_answers(&frame), None);
        assert_eq!(whole_answers(&frame[..HEADER]), None);
    }

    #[test]
    fn a_full_log_refuses_what_does_not_fit() {
        let mut log = ResultsLog::new(10).unwrap();
        let cap = log.mem.capacity();
        assert!(log.append(&vec![1; cap - 1]));
        assert!(!log.append(&[2, 2]), "one byte of room left");
        assert_eq!(log.len(), cap as u64 - 1);
        assert!(log.append(&[3]));
        assert_eq!(log.bytes().len(), cap);
    }

    #[test]
    fn replay_continues_an_intact_stream_only_where_the_pipe_left_off() {
        let mut log = ResultsLog::new(4096).unwrap();
        assert_eq!(log.replay(0, &[], true), Replay::Nothing);
        // 10 bytes went through the pipe, then "abcdef" was logged; the parent received 12
        // bytes, the last two ("ab") a frame it has in part.
        log.wrote(10);
        assert!(log.append(b"abcdef"));
        assert_eq!(log.replay(12, b"ab", true), Replay::Continue(b"cdef"));
        assert_eq!(log.replay(10, &[], true), Replay::Continue(b"abcdef"));
        // The partial frame does not match the log, the stream is not trusted, the parent is
        // short of the log's base, or past its end: the whole log, as foreign.
        assert_eq!(log.replay(12, b"xb", true), Replay::Foreign(b"abcdef"));
        assert_eq!(log.replay(12, b"ab", false), Replay::Foreign(b"abcdef"));
        assert_eq!(log.replay(9, &[], true), Replay::Foreign(b"abcdef"));
        assert_eq!(log.replay(17, &[], true), Replay::Foreign(b"abcdef"));
        assert_eq!(log.running_item(), None);
        log.set_running(4);
        assert_eq!(log.running_item(), Some(4));
        log.set_running(4 | PROGRESS_DONE);
        assert_eq!(log.running_item(), None);
    }
}
