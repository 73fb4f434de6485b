//! Feeding: the feeder thread numbers the stage's input items and encodes them, off the
//! supervisor's thread, into hand-offs of up to [`FEED_CHUNK`] items and [`FEED_BYTES`] bytes.
//!
//! Small items of one hand-off share one buffer; an item of [`LARGE_ITEM`] bytes or more (on
//! average, in the last hand-off) gets a buffer of its own, reused from the spares the
//! supervisor gives back once such an item has ended. Encoding happens once per item: the
//! outbox writes a payload from where it was encoded.

use super::super::supervise::{feed, Wake};
use super::IpcParts;
use crate::exec::ForkOptions;
use crate::ipc::frame;
use crate::ipc::outbox::Payload;
use crossbeam_channel::{Receiver, Sender};
use std::sync::Arc;

/// Items the feeder hands the supervisor at once (one wake-up, one write per worker).
pub(super) const FEED_CHUNK: usize = 256;

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

/// An input item as the feeder hands it over: `(index, payload)` or, when it cannot be
/// serialised, the item and the reason (the supervisor fails it: encoding is deterministic, so
/// it is never retried).
pub(super) type Encoded<I> = (u64, Result<Payload, (I, String)>);

/// The sizes of the hand-off: how many hand-offs wait at most, and how many items each holds.
pub(super) fn hand_off_sizes(opts: &ForkOptions) -> (usize, usize) {
    let window = opts.in_flight.max(1);
    // Enough ready items to refill every worker's window between two wake-ups, but not a
    // copy of the whole input (and a hand-off ends at `FEED_BYTES`, so large items wait in
    // bounded bytes too).
    let ready = (opts.workers * window).clamp(1, 4 * FEED_CHUNK);
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
    let send = move |batch: Vec<Encoded<I>>| tx.send(batch).map_err(|e| e.0.len() as u64);
    feed(&parts.ctx, &parts.input, wake, chunk, make, send)
}

/// The feeder's side of the hand-off: numbers the items and encodes them.
struct FeedEncoder<I> {
    encode: fn(&I, &mut Vec<u8>) -> Result<(), String>,
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

impl<I> FeedEncoder<I> {
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
                false => (self.per_item * items.len()).min(FEED_BYTES + self.per_item),
            };
            let mut buf = Vec::with_capacity(guess);
            let mut spans = Vec::with_capacity(items.len());
            let mut bytes = 0;
            /// Where an item's encoding is, until the shared buffer is complete.
            enum At {
                Span(usize, usize),
                Own(Vec<u8>),
            }
            for item in items.by_ref() {
                let at = match large {
                    true => {
                        let mut own = self
                            .spares
                            .try_recv()
                            .unwrap_or_else(|_| Vec::with_capacity(self.per_item.min(MAX_SPARE)));
                        encode_input(self.encode, item, &mut own, self.max).map(|()| {
                            // A spare, or a buffer sized after a huge item, is held as
                            // long as this item.
                            shrink_oversized(&mut own);
                            At::Own(own)
                        })
                    }
                    false => {
                        // Encoded apart, then appended: a codec that does not just append to
                        // its output can spoil only its own item, never its neighbours'.
                        let scratch = &mut self.scratch;
                        scratch.clear();
                        encode_input(self.encode, item, scratch, self.max).map(|()| {
                            let start = buf.len();
                            buf.extend_from_slice(scratch);
                            At::Span(start, buf.len())
                        })
                    }
                };
                bytes += match &at {
                    Ok(At::Span(start, end)) => end - start,
                    Ok(At::Own(own)) => own.len(),
                    Err(_) => 0,
                };
                spans.push((self.index, at));
                self.index += 1;
                if bytes >= FEED_BYTES {
                    break;
                }
            }
            self.per_item = bytes / spans.len().max(1);
            // Sized for larger items than came: held for as long as any of its items.
            shrink_oversized(&mut buf);
            let buf = Arc::new(buf);
            let batch = spans
                .into_iter()
                .map(|(i, at)| {
                    let payload = at.map(|at| match at {
                        At::Span(start, end) => Payload::shared(&buf, start, end),
                        At::Own(own) => Payload::own(own),
                    });
                    (i, payload)
                })
                .collect();
            hand(batch).map_err(|unsent| unsent + items.len() as u64)?;
        }
        Ok(())
    }
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
        Ok(()) => {
            let m = format!(
                "input item of {} bytes exceeds the maximum frame size of {max}",
                out.len()
            );
            Err((item, m))
        }
        Err(e) => Err((item, format!("cannot serialise the input item: {e}"))),
    }
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
            for (_, p) in batch {
                let p = p.map_err(|(_, m)| m).expect("encodes");
                sizes.push((p.len(), p.capacity()));
            }
            Ok(())
        };
        enc.hand_off(&mut items.drain(..), &mut take)
            .expect("handed off");
        sizes
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
