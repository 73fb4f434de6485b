//! Feeding: the feeder thread numbers the stage's input items and encodes them, off the
//! supervisor's thread, into hand-offs of up to [`FEED_CHUNK`] items and [`FEED_BYTES`] bytes.
//!
//! Small items of one hand-off share one buffer, in runs: consecutive items that go to a
//! worker in one `items` frame and are tracked as one flight (a run ends at an item that
//! cannot be serialised, at the end of the hand-off, or before it would outgrow a frame).
//! An item of [`LARGE_ITEM`] bytes or more (on average, in the last hand-off) gets a buffer
//! of its own, and a flight of its own, reused from the spares the supervisor gives back
//! once such an item has ended. Encoding happens once per item: the outbox writes a payload
//! from where it was encoded.

use super::super::supervise::{feed, Wake};
use super::flight::Flight;
use super::IpcParts;
use crate::exec::ForkOptions;
use crate::ipc::codec::cast;
use crate::ipc::frame;
use crate::ipc::message::{push_run_item, RUN_PREFIX};
use crate::ipc::outbox::Payload;
use crossbeam_channel::{Receiver, Sender};
use std::sync::Arc;

/// Items the feeder hands the supervisor at once (one wake-up, one write per worker). At
/// 256, W2's cheap items spent about twice the system time in wake-ups and writes; 4096 was
/// no faster than 1024.
pub(super) const FEED_CHUNK: usize = 1024;

/// Items encoded and waiting for the supervisor at most, in hand-offs of [`FEED_CHUNK`]
/// (fewer when the workers' windows hold fewer: `in_flight`). Four hand-offs let the feeder
/// run ahead of a supervisor that waits for the CPU: W2 ran about 8% slower with two.
const READY: usize = 4 * FEED_CHUNK;

/// A hand-off ends once its items' encodings reach this many bytes, so the items waiting
/// between feeder and supervisor stay bounded in bytes as well as in number.
const FEED_BYTES: usize = 1 << 20;

/// Items of at least this many encoded bytes (on average, in the last hand-off) get a
/// buffer each.
pub(super) const LARGE_ITEM: usize = 16 << 10;

/// Buffers of ended large items kept for the feeder to encode the next large items into, at
/// most. Only buffers of at most [`MAX_SPARE`] bytes are kept, so the spares of a stage hold
/// at most 8 MiB, until the stage ends.
pub(super) const SPARES: usize = 8;
/// The largest buffer kept as a spare, and the largest a large item's buffer is sized to in
/// advance.
pub(super) const MAX_SPARE: usize = 1 << 20;

/// Input items as the feeder hands them over: a flight (one item, or a run of them) or, when
/// an item cannot be serialised, the item and the reason (the supervisor fails it: encoding
/// is deterministic, so it is never retried).
pub(super) enum Encoded<I> {
    Flight(Flight),
    Failed {
        index: u64,
        item: I,
        message: String,
    },
}

impl<I> Encoded<I> {
    /// Items it holds.
    pub(super) fn items(&self) -> u64 {
        match self {
            Encoded::Flight(f) => u64::from(f.count),
            Encoded::Failed { .. } => 1,
        }
    }
}

/// The sizes of the hand-off: how many hand-offs wait at most, and how many items each holds.
pub(super) fn hand_off_sizes(opts: &ForkOptions) -> (usize, usize) {
    let window = opts.in_flight.max(1);
    // Enough ready items to refill every worker's window between two wake-ups, but not a
    // copy of the whole input (and a hand-off ends at `FEED_BYTES`, so large items wait in
    // bounded bytes too). What waits here is off the stage's queue, outside its depth and
    // its backpressure: at most `READY` items, whatever their time.
    let ready = (opts.workers * window).clamp(1, READY);
    let chunk = ready.min(FEED_CHUNK);
    (ready.div_ceil(chunk), chunk)
}

/// The feeder thread's body: the stage queue to the hand-off, encoded.
pub(super) fn run<I: crate::stage::Wire, O>(
    parts: &IpcParts<I, O>,
    opts: &ForkOptions,
    wake: &Wake,
    chunk: usize,
    tx: Sender<Vec<Encoded<I>>>,
    spares: Receiver<Vec<u8>>,
) {
    let wire = parts.wire.expect("fork stages have a codec");
    let mut enc = FeedEncoder {
        encode: wire.encode_in,
        // An async worker takes its items one by one.
        runs: parts.factory.tasks().is_none(),
        raw: wire.raw_in,
        max: opts.max_frame,
        index: 0,
        per_item: 0,
        scratch: Vec::new(),
        spares,
    };
    let make = |mut items: std::collections::vec_deque::Drain<'_, I>,
                hand: &mut dyn FnMut(Vec<Encoded<I>>) -> Result<(), u64>| {
        enc.hand_off(&mut items, hand)
    };
    let send = move |batch: Vec<Encoded<I>>| {
        tx.send(batch)
            .map_err(|e| e.0.iter().map(Encoded::items).sum::<u64>())
    };
    feed(&parts.ctx, &parts.input, wake, chunk, make, send)
}

/// The feeder's side of the hand-off: numbers the items and encodes them.
struct FeedEncoder<I> {
    encode: fn(&I, &mut Vec<u8>) -> Result<(), String>,
    /// Whether consecutive items join in runs (else each item is a flight of its own).
    runs: bool,
    /// Whether an item is a byte vector that is its own encoding (`WireFns::raw_in`).
    raw: bool,
    max: usize,
    /// The next item's index in the stage's input.
    index: u64,
    /// Encoded bytes per item in the last hand-off: sizes the next buffers (so an item is
    /// mostly encoded once, not copied again as its buffer grows) and picks shared or own
    /// buffers.
    per_item: usize,
    /// Where a small item is encoded before it joins its hand-off's buffer.
    scratch: Vec<u8>,
    /// Buffers of large items that have ended, given back by the supervisor for the next
    /// large items (a fresh buffer costs a page fault per page, every time).
    spares: Receiver<Vec<u8>>,
}

impl<I: 'static> FeedEncoder<I> {
    /// Encodes `items` into hand-offs of at most [`FEED_BYTES`] (plus one item) and passes
    /// each to `hand`. On `Err`, the count includes the items not encoded yet: the feeder
    /// counts them cancelled, not lost.
    fn hand_off(
        &mut self,
        items: &mut std::collections::vec_deque::Drain<'_, I>,
        hand: &mut dyn FnMut(Vec<Encoded<I>>) -> Result<(), u64>,
    ) -> Result<(), u64> {
        while items.len() > 0 {
            let large = self.per_item >= LARGE_ITEM;
            let guess = match large {
                true => 0,
                false => {
                    ((self.per_item + RUN_PREFIX) * items.len()).min(FEED_BYTES + self.per_item)
                }
            };
            let mut buf = Vec::with_capacity(guess);
            let mut spans = Vec::new();
            let (mut bytes, mut encoded) = (0, 0);
            // A run's items may fill a frame's payload (`max` counts the kind and id too).
            let run_max = self.max.saturating_sub(frame::HEADER - 4);
            let runs = self.runs;
            for item in items.by_ref() {
                let index = self.index;
                self.index += 1;
                encoded += 1;
                let r = match large {
                    // A byte vector is its own payload: its buffer, not a copy of it.
                    true if self.raw => take_input(item, self.max).map(|own| {
                        bytes += own.len();
                        spans.push(At::Own(index, own));
                    }),
                    true => {
                        let mut own = self
                            .spares
                            .try_recv()
                            .unwrap_or_else(|_| Vec::with_capacity(self.per_item.min(MAX_SPARE)));
                        encode_input(self.encode, item, &mut own, self.max).map(|()| {
                            // A spare, or a buffer sized after a huge item, is held as
                            // long as this item.
                            shrink_oversized(&mut own);
                            bytes += own.len();
                            spans.push(At::Own(index, own));
                        })
                    }
                    false => {
                        // Encoded apart, then appended: a codec that does not just append to
                        // its output can spoil only its own item, never its neighbours'.
                        let scratch = &mut self.scratch;
                        scratch.clear();
                        encode_input(self.encode, item, scratch, self.max).map(|()| {
                            bytes += scratch.len();
                            let start = buf.len();
                            push_run_item(&mut buf, scratch);
                            let end = buf.len();
                            match spans.last_mut() {
                                Some(At::Run {
                                    count,
                                    start: s,
                                    end: e,
                                    ..
                                }) if runs && end - *s <= run_max => {
                                    (*count, *e) = (*count + 1, end);
                                }
                                _ => spans.push(At::Run {
                                    index,
                                    count: 1,
                                    start,
                                    end,
                                }),
                            }
                        })
                    }
                };
                if let Err((item, message)) = r {
                    spans.push(At::Failed(index, item, message));
                }
                if bytes >= FEED_BYTES {
                    break;
                }
            }
            self.per_item = bytes / encoded.max(1);
            // Sized for larger items than came: held for as long as any of its items.
            shrink_oversized(&mut buf);
            let buf = Arc::new(buf);
            let batch = spans
                .into_iter()
                .map(|at| match at {
                    At::Run {
                        index,
                        count,
                        start,
                        end,
                    } => {
                        // A single item travels without its length.
                        let from = if count == 1 {
                            start + RUN_PREFIX
                        } else {
                            start
                        };
                        let payload = Payload::shared(&buf, from, end);
                        Encoded::Flight(Flight {
                            count,
                            ..Flight::one(index, payload)
                        })
                    }
                    At::Own(index, own) => Encoded::Flight(Flight::one(index, Payload::own(own))),
                    At::Failed(index, item, message) => Encoded::Failed {
                        index,
                        item,
                        message,
                    },
                })
                .collect();
            hand(batch).map_err(|unsent| unsent + items.len() as u64)?;
        }
        Ok(())
    }
}

/// Where the feeder put an item, until its hand-off's buffer is complete.
enum At<I> {
    /// A run of `count` items from `index` on, at `start..end` in the shared buffer.
    Run {
        index: u64,
        count: u32,
        start: usize,
        end: usize,
    },
    /// A large item in a buffer of its own.
    Own(u64, Vec<u8>),
    /// An item that cannot be serialised.
    Failed(u64, I, String),
}

/// Whether a buffer has much more room than its bytes need (at most twice, plus a page).
fn oversized(len: usize, capacity: usize) -> bool {
    capacity > 2 * len + 4096
}

/// Gives back the room an encoded buffer does not need, if it is [`oversized`].
fn shrink_oversized(buf: &mut Vec<u8>) {
    if oversized(buf.len(), buf.capacity()) {
        buf.shrink_to_fit();
    }
}

/// Serialises an input item into the empty `out` on the feeder thread, or gives the item
/// back with the reason it cannot cross.
fn encode_input<I>(
    encode: fn(&I, &mut Vec<u8>) -> Result<(), String>,
    item: I,
    out: &mut Vec<u8>,
    max: usize,
) -> Result<(), (I, String)> {
    debug_assert!(out.is_empty());
    match encode(&item, out) {
        Ok(()) if out.len() + frame::HEADER - 4 <= max => Ok(()),
        Ok(()) => Err((item, too_large(out.len(), max))),
        Err(e) => Err((item, format!("cannot serialise the input item: {e}"))),
    }
}

/// A byte vector input item (`WireFns::raw_in`) as its own payload, or the item back with
/// the reason it cannot cross.
fn take_input<I: 'static>(item: I, max: usize) -> Result<Vec<u8>, (I, String)> {
    let mut own =
        cast::<I, Vec<u8>>(item).unwrap_or_else(|_| unreachable!("a raw input is Vec<u8>"));
    if own.len() + frame::HEADER - 4 <= max {
        // Held until the item ends, counted by its length: not much more room than that.
        shrink_oversized(&mut own);
        return Ok(own);
    }
    let m = too_large(own.len(), max);
    let item = cast::<Vec<u8>, I>(own).unwrap_or_else(|_| unreachable!("a raw input is Vec<u8>"));
    Err((item, m))
}

/// Why an input item of `len` bytes cannot cross.
fn too_large(len: usize, max: usize) -> String {
    format!("input item of {len} bytes exceeds the maximum frame size of {max}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// Hands `items` off; the length of each payload and the capacity of its buffer.
    fn hand(enc: &mut FeedEncoder<Vec<u8>>, items: Vec<Vec<u8>>) -> Vec<(usize, usize)> {
        let mut items: VecDeque<Vec<u8>> = items.into();
        let mut sizes = Vec::new();
        let mut take = |batch: Vec<Encoded<Vec<u8>>>| {
            for e in batch {
                let Encoded::Flight(f) = e else {
                    panic!("encodes")
                };
                sizes.push((f.payload.len(), f.payload.capacity()));
            }
            Ok(())
        };
        enc.hand_off(&mut items.drain(..), &mut take)
            .expect("handed off");
        sizes
    }

    /// postcard, refusing the empty item.
    fn encode_refusing_empty(v: &Vec<u8>, out: &mut Vec<u8>) -> Result<(), String> {
        match v.is_empty() {
            true => Err("empty".into()),
            false => crate::ipc::codec::encode(v, out),
        }
    }

    /// What one hand-off of `items` becomes: `(index, count, payload)` per flight, or
    /// `(index, 0, message)` per item that cannot be serialised.
    fn flights(runs: bool, max: usize, items: Vec<Vec<u8>>) -> Vec<(u64, u32, Vec<u8>)> {
        let (_spare_tx, spares) = crossbeam_channel::bounded(SPARES);
        let mut enc = FeedEncoder {
            encode: encode_refusing_empty,
            runs,
            raw: false,
            max,
            index: 0,
            per_item: 0,
            scratch: Vec::new(),
            spares,
        };
        let mut items: VecDeque<Vec<u8>> = items.into();
        let mut got = Vec::new();
        let mut take = |batch: Vec<Encoded<Vec<u8>>>| {
            for e in batch {
                got.push(match e {
                    Encoded::Flight(f) => (f.index, f.count, f.payload.to_vec()),
                    Encoded::Failed { index, message, .. } => (index, 0, message.into_bytes()),
                });
            }
            Ok(())
        };
        enc.hand_off(&mut items.drain(..), &mut take)
            .expect("handed off");
        got
    }

    #[test]
    fn ready_items_become_runs_cut_at_an_item_that_cannot_be_serialised_and_at_a_frame() {
        let items = vec![vec![1], vec![2], vec![], vec![4], vec![5], vec![6]];
        let got = flights(true, usize::MAX, items.clone());
        // postcard's `Vec<u8>` of one byte is two bytes; each is behind its length in a run.
        let run = |xs: &[u8]| {
            let mut b = Vec::new();
            for &x in xs {
                crate::ipc::message::push_run_item(&mut b, &[1, x]);
            }
            b
        };
        assert_eq!(
            got,
            [
                (0, 2, run(&[1, 2])),
                (2, 0, b"cannot serialise the input item: empty".to_vec()),
                (3, 3, run(&[4, 5, 6])),
            ]
        );
        // A frame holds two of these items (6 bytes each in a run) and its kind and id: the
        // runs are cut there; a run of one is the item alone.
        let max = frame::HEADER - 4 + 12;
        let got = flights(true, max, vec![vec![1], vec![2], vec![3], vec![4], vec![5]]);
        assert_eq!(
            got,
            [
                (0, 2, run(&[1, 2])),
                (2, 2, run(&[3, 4])),
                (4, 1, vec![1, 5]),
            ]
        );
        // For an async stage, every item is a flight of its own.
        let got = flights(false, usize::MAX, items);
        let counts: Vec<(u64, u32)> = got.iter().map(|(i, c, _)| (*i, *c)).collect();
        assert_eq!(counts, [(0, 1), (1, 1), (2, 0), (3, 1), (4, 1), (5, 1)]);
        assert_eq!(got[4].2, [1, 5], "a single item travels without its length");
    }

    #[test]
    fn a_large_byte_vector_is_its_own_payload_and_one_too_large_comes_back_whole() {
        let (_spare_tx, spares) = crossbeam_channel::bounded(SPARES);
        let wire = crate::ipc::codec::WireFns::<Vec<u8>, u8>::both::<crate::Postcard>();
        let max = 100 << 10;
        let mut enc = FeedEncoder {
            encode: wire.encode_in,
            runs: true,
            raw: wire.raw_in,
            max,
            index: 0,
            per_item: 0,
            scratch: Vec::new(),
            spares,
        };
        // The first hand-off tells the feeder that items are large.
        hand(&mut enc, vec![vec![1; 20 << 10]; 2]);
        let items = vec![vec![2; 20 << 10], vec![3; 200 << 10], vec![4; 30 << 10]];
        let ptrs: Vec<*const u8> = items.iter().map(|v| v.as_ptr()).collect();
        let mut items: VecDeque<Vec<u8>> = items.into();
        let mut got = Vec::new();
        let mut take = |batch: Vec<Encoded<Vec<u8>>>| {
            for e in batch {
                got.push(match e {
                    Encoded::Flight(f) => (f.index, f.payload.as_ptr(), f.payload.len(), None),
                    Encoded::Failed {
                        index,
                        item,
                        message,
                    } => (index, item.as_ptr(), item.len(), Some(message)),
                });
            }
            Ok(())
        };
        enc.hand_off(&mut items.drain(..), &mut take)
            .expect("handed off");
        let too_large = too_large(200 << 10, max);
        assert_eq!(
            got,
            [
                (2, ptrs[0], 20 << 10, None),
                (3, ptrs[1], 200 << 10, Some(too_large)),
                (4, ptrs[2], 30 << 10, None),
            ],
            "each item's own buffer, never a copy"
        );
    }

    /// The largest room a buffer had when an item was encoded into it (since the last reset).
    static ROOM: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    /// postcard, recording the room it is given.
    fn encode_recording_room(v: &Vec<u8>, out: &mut Vec<u8>) -> Result<(), String> {
        ROOM.fetch_max(out.capacity(), std::sync::atomic::Ordering::Relaxed);
        crate::ipc::codec::encode(v, out)
    }

    #[test]
    fn a_huge_item_or_a_large_spare_does_not_size_the_buffers_of_the_items_after_it() {
        let (spare_tx, spares) = crossbeam_channel::bounded(SPARES);
        let mut enc = FeedEncoder {
            encode: encode_recording_room,
            runs: true,
            raw: false,
            max: usize::MAX,
            index: 0,
            per_item: 0,
            scratch: Vec::new(),
            spares,
        };
        hand(&mut enc, vec![vec![1; 20 << 10]; 4]);
        hand(&mut enc, vec![vec![2; 8 << 20]]);
        spare_tx.send(Vec::with_capacity(MAX_SPARE)).unwrap();
        ROOM.store(0, std::sync::atomic::Ordering::Relaxed);
        let after = hand(&mut enc, vec![vec![3; 20 << 10]; 40]);
        let room = ROOM.load(std::sync::atomic::Ordering::Relaxed);
        assert!(room <= MAX_SPARE, "an item was given {room} bytes of room");
        assert_eq!(after.len(), 40);
        for (len, cap) in after {
            assert!(!oversized(len, cap), "{cap} bytes of buffer for {len}");
        }
    }
}
