//! What a remote stage's payloads hold, in the frame layout of the pipes (see `ipc/`):
//!
//! | payload | frames |
//! |---|---|
//! | work entry | one `item` frame per item: id = the item's index, payload = the item (stage codec) |
//! | results | per item, in any order between items: `result` frames (one output each, stage codec), then one terminal frame: `done` (payload: the attempt's latency in ns, `u64` LE) or `error` (a [`RemoteFailure`], postcard); an item with exactly one output sends one `result_done` frame instead (the output, then the latency as 8 bytes LE), as the pipes do |
//! | finished | `result` frames with id `FINISH_ID` (the `finish` outputs), and an `error` frame with id `FINISH_ID` if `finish` failed |
//! | stats | a [`WorkerStats`], postcard |
//!
//! Every length is checked against the stage's `max_frame` before anything is decoded, and a
//! payload decodes only into the stage's own types: a malformed entry is a typed error, never
//! a panic.

use crate::error::FailureKind;
use crate::ipc::codec::Codec;
use crate::ipc::frame::{self, Decoder, Kind};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The id of the frames that carry a worker's `finish` outputs.
pub(crate) const FINISH_ID: u64 = u64::MAX;

/// How an item failed on a worker, as the parent receives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RemoteFailure {
    pub(crate) kind: FailureKind,
    pub(crate) message: String,
    /// Attempts made (the worker applied the stage's retries).
    pub(crate) attempt: u32,
    /// The process the item ran in (a worker's child under a fork `worker_exec`).
    pub(crate) pid: Option<u32>,
    /// The worker's host.
    pub(crate) host: String,
}

/// A worker's statistics for one run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct WorkerStats {
    pub(crate) host: String,
    pub(crate) pid: u32,
    /// Items whose results it committed.
    pub(crate) items: u64,
    /// Items that finally failed there.
    pub(crate) failed: u64,
    /// Attempts it retried.
    pub(crate) retried: u64,
    /// Commits refused because another worker had taken the entry.
    pub(crate) lease_lost: u64,
    /// Entries it took over from lost workers.
    pub(crate) reclaimed: u64,
    /// Entries it dead-lettered.
    pub(crate) dead_lettered: u64,
    /// Entries it released when it was stopped.
    pub(crate) released: u64,
    /// Its latency histogram (HdrHistogram V2 serialisation; empty: none).
    pub(crate) latency: Vec<u8>,
}

/// Serialises a latency histogram for [`WorkerStats::latency`].
pub(crate) fn histogram_bytes(h: &hdrhistogram::Histogram<u64>) -> Vec<u8> {
    let mut out = Vec::new();
    use hdrhistogram::serialization::Serializer as _;
    let _ = hdrhistogram::serialization::V2Serializer::new().serialize(h, &mut out);
    out
}

/// A histogram from [`histogram_bytes`] (an empty one if it does not decode).
pub(crate) fn histogram_of(bytes: &[u8]) -> hdrhistogram::Histogram<u64> {
    let mut d = hdrhistogram::serialization::Deserializer::new();
    d.deserialize(&mut std::io::Cursor::new(bytes))
        .unwrap_or_else(|_| crate::stats::new_histogram())
}

/// What one frame of a results payload says.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Outcome<O> {
    /// One output of item `index`.
    Output(u64, O),
    /// Item `index` succeeded; its latency in ns.
    Done(u64, u64),
    /// Item `index` finally failed.
    Failed(u64, RemoteFailure),
    /// A frame of item `index` that does not decode (an output not of the stage's type, a
    /// malformed failure): the item fails with `Protocol`.
    Bad(u64, String),
}

fn encode_with<C: Codec, T: Serialize>(
    buf: &mut Vec<u8>,
    kind: Kind,
    id: u64,
    value: &T,
    max: usize,
) -> Result<(), String> {
    let start = frame::begin(buf, kind, id);
    if let Err(e) = C::encode(value, buf) {
        buf.truncate(start);
        return Err(e);
    }
    frame::finish(buf, start, max).map_err(|e| e.to_string())
}

/// Appends an item's frame to a work entry.
pub(crate) fn push_item<C: Codec, I: Serialize>(
    buf: &mut Vec<u8>,
    index: u64,
    item: &I,
    max: usize,
) -> Result<(), String> {
    encode_with::<C, I>(buf, Kind::Item, index, item, max)
}

/// Appends one output of item `index` to a results payload.
pub(crate) fn push_output<C: Codec, O: Serialize>(
    buf: &mut Vec<u8>,
    index: u64,
    output: &O,
    max: usize,
) -> Result<(), String> {
    encode_with::<C, O>(buf, Kind::Result, index, output, max)
}

/// Appends item `index`'s success to a results payload.
pub(crate) fn push_done(buf: &mut Vec<u8>, index: u64, latency_ns: u64) {
    let _ = frame::push(
        buf,
        Kind::Done,
        index,
        &latency_ns.to_le_bytes(),
        usize::MAX,
    );
}

/// Item `index`'s success as the end of its one output's frame, which starts at `start` and
/// must be the last frame of `buf` (`result_done`: 21 bytes less than a `result` and a
/// `done` frame). `false`, and `buf` unchanged, if it is not the last frame or would grow
/// past `max`: then [`push_done`].
pub(crate) fn merge_done(buf: &mut Vec<u8>, start: usize, latency_ns: u64, max: usize) -> bool {
    frame::retag(buf, start, Kind::ResultDone, &latency_ns.to_le_bytes(), max)
}

/// Appends item `index`'s failure to a results payload.
pub(crate) fn push_failed(buf: &mut Vec<u8>, index: u64, f: &RemoteFailure) {
    let bytes = postcard::to_stdvec(f).expect("a failure always serialises");
    let _ = frame::push(buf, Kind::Error, index, &bytes, usize::MAX);
}

/// Every frame of a payload, or the first error.
fn frames<R>(
    payload: &[u8],
    max: usize,
    mut each: impl FnMut(Kind, u64, &[u8]) -> Result<R, String>,
) -> Result<Vec<R>, String> {
    let mut dec = Decoder::new(max);
    dec.extend(payload);
    let mut out = Vec::new();
    loop {
        match dec.next(&mut each) {
            Ok(Some(r)) => out.push(r?),
            Ok(None) if dec.pending() == 0 => return Ok(out),
            Ok(None) => return Err(format!("{} bytes of a truncated frame", dec.pending())),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// The items of a work entry, with their indexes.
pub(crate) fn decode_items<C: Codec, I: DeserializeOwned>(
    payload: &[u8],
    max: usize,
) -> Result<Vec<(u64, I)>, String> {
    frames(payload, max, |kind, id, bytes| match kind {
        Kind::Item => C::decode(bytes)
            .map(|item| (id, item))
            .map_err(|e| format!("item {id}: {e}")),
        other => Err(format!("a work entry holds an unexpected {other:?} frame")),
    })
}

/// What a results (or finished) payload says.
pub(crate) fn decode_results<C: Codec, O: DeserializeOwned>(
    payload: &[u8],
    max: usize,
) -> Result<Vec<Outcome<O>>, String> {
    // A `result_done` frame says two things: its output, then its item's end.
    let pairs = frames(payload, max, |kind, id, bytes| match kind {
        Kind::ResultDone => Ok(match bytes.len().checked_sub(8) {
            None => (
                Outcome::Bad(id, format!("a result_done frame of {} bytes", bytes.len())),
                None,
            ),
            Some(at) => {
                let (out, ns) = bytes.split_at(at);
                match C::decode(out) {
                    Ok(o) => {
                        let ns = u64::from_le_bytes(ns.try_into().expect("8 bytes"));
                        (Outcome::Output(id, o), Some(Outcome::Done(id, ns)))
                    }
                    Err(e) => (
                        Outcome::Bad(id, format!("an output does not decode: {e}")),
                        None,
                    ),
                }
            }
        }),
        other => result_frame::<C, O>(other, id, bytes).map(|o| (o, None)),
    })?;
    let mut out = Vec::with_capacity(pairs.len() * 2);
    for (o, done) in pairs {
        out.push(o);
        out.extend(done);
    }
    Ok(out)
}

/// One frame of a results payload other than `result_done`.
fn result_frame<C: Codec, O: DeserializeOwned>(
    kind: Kind,
    id: u64,
    bytes: &[u8],
) -> Result<Outcome<O>, String> {
    match kind {
        Kind::Result => Ok(C::decode(bytes).map_or_else(
            |e| Outcome::Bad(id, format!("an output does not decode: {e}")),
            |o| Outcome::Output(id, o),
        )),
        Kind::Done => Ok(match <[u8; 8]>::try_from(bytes) {
            Ok(ns) => Outcome::Done(id, u64::from_le_bytes(ns)),
            Err(_) => Outcome::Bad(id, format!("a done frame of {} bytes", bytes.len())),
        }),
        Kind::Error => Ok(postcard::from_bytes(bytes).map_or_else(
            |e| Outcome::Bad(id, format!("its failure does not decode: {e}")),
            |f| Outcome::Failed(id, f),
        )),
        other => Err(format!(
            "a results entry holds an unexpected {other:?} frame"
        )),
    }
}

/// Encodes a worker's statistics.
pub(crate) fn encode_stats(s: &WorkerStats) -> Vec<u8> {
    postcard::to_stdvec(s).expect("statistics always serialise")
}

/// Decodes a worker's statistics.
pub(crate) fn decode_stats(payload: &[u8]) -> Result<WorkerStats, String> {
    postcard::from_bytes(payload).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipc::codec::Postcard;

    #[test]
    fn entries_and_results_round_trip() {
        let mut entry = Vec::new();
        for i in 5..8u64 {
            push_item::<Postcard, String>(&mut entry, i, &format!("item {i}"), 1 << 20).unwrap();
        }
        let items = decode_items::<Postcard, String>(&entry, 1 << 20).unwrap();
        assert_eq!(
            items,
            vec![
                (5, "item 5".into()),
                (6, "item 6".into()),
                (7, "item 7".into())
            ]
        );

        let f = RemoteFailure {
            kind: FailureKind::WorkerLost { deliveries: 3 },
            message: "lost".into(),
            attempt: 3,
            pid: Some(9),
            host: "h".into(),
        };
        let mut results = Vec::new();
        push_output::<Postcard, u64>(&mut results, 5, &50, 1 << 20).unwrap();
        push_done(&mut results, 5, 1234);
        push_failed(&mut results, 6, &f);
        let got = decode_results::<Postcard, u64>(&results, 1 << 20).unwrap();
        assert_eq!(
            got,
            vec![
                Outcome::Output(5, 50),
                Outcome::Done(5, 1234),
                Outcome::Failed(6, f)
            ]
        );
    }

    #[test]
    fn garbage_and_oversized_payloads_are_errors_not_panics() {
        let mut entry = Vec::new();
        push_item::<Postcard, String>(&mut entry, 1, &"x".repeat(100), 1 << 20).unwrap();
        let e = decode_items::<Postcard, String>(&entry, 50).unwrap_err();
        assert!(e.contains("too large") || e.contains("exceeds"), "{e}");
        let e = decode_items::<Postcard, u64>(&entry[..entry.len() - 3], 1 << 20).unwrap_err();
        assert!(e.contains("truncated"), "{e}");
        for junk in [
            &b"\xff\xff\xff\xff\x01"[..],
            b"hello world, not frames",
            b"\x09\0\0\0\x09",
        ] {
            assert!(decode_items::<Postcard, u64>(junk, 1 << 20).is_err());
            assert!(decode_results::<Postcard, u64>(junk, 1 << 20).is_err());
        }
        // A results frame in a work entry, and the reverse.
        let mut results = Vec::new();
        push_done(&mut results, 1, 1);
        assert!(decode_items::<Postcard, u64>(&results, 1 << 20).is_err());
        assert!(decode_results::<Postcard, u64>(&entry, 1 << 20).is_err());
        // An output of another type, a short done frame: that item is bad, not the entry.
        let mut mixed = Vec::new();
        push_output::<Postcard, String>(&mut mixed, 3, &"not a bool".into(), 1 << 20).unwrap();
        frame::push(&mut mixed, Kind::Done, 4, &[1, 2], 1 << 20).unwrap();
        push_done(&mut mixed, 5, 7);
        let got = decode_results::<Postcard, bool>(&mixed, 1 << 20).unwrap();
        assert!(matches!(&got[0], Outcome::Bad(3, m) if m.contains("does not decode")));
        assert!(matches!(&got[1], Outcome::Bad(4, m) if m.contains("2 bytes")));
        assert_eq!(got[2], Outcome::Done(5, 7));
        // An item of another type.
        let mut other = Vec::new();
        push_item::<Postcard, String>(&mut other, 1, &"not a number".into(), 1 << 20).unwrap();
        assert!(decode_items::<Postcard, bool>(&other, 1 << 20).is_err());
    }

    #[test]
    fn a_single_output_and_its_end_travel_as_one_frame() {
        let mut results = Vec::new();
        let start = results.len();
        push_output::<Postcard, u64>(&mut results, 7, &70, 1 << 20).unwrap();
        let two_frames = {
            let mut b = results.clone();
            push_done(&mut b, 7, 99);
            b.len()
        };
        assert!(merge_done(&mut results, start, 99, 1 << 20));
        assert_eq!(results.len(), two_frames - frame::HEADER);
        // Not the last frame any more: refused, nothing changed.
        let start2 = results.len();
        push_output::<Postcard, u64>(&mut results, 8, &80, 1 << 20).unwrap();
        push_output::<Postcard, u64>(&mut results, 9, &90, 1 << 20).unwrap();
        let before = results.clone();
        assert!(!merge_done(&mut results, start2, 5, 1 << 20));
        assert_eq!(results, before);
        push_done(&mut results, 8, 5);
        let got = decode_results::<Postcard, u64>(&results, 1 << 20).unwrap();
        assert_eq!(
            got,
            vec![
                Outcome::Output(7, 70),
                Outcome::Done(7, 99),
                Outcome::Output(8, 80),
                Outcome::Output(9, 90),
                Outcome::Done(8, 5)
            ]
        );
        // A short or undecodable one is that item's protocol failure.
        let mut bad = Vec::new();
        frame::push(&mut bad, Kind::ResultDone, 3, &[1, 2, 3], 1 << 20).unwrap();
        frame::push(&mut bad, Kind::ResultDone, 4, &[0xff; 9], 1 << 20).unwrap();
        let got = decode_results::<Postcard, u64>(&bad, 1 << 20).unwrap();
        assert!(matches!(&got[0], Outcome::Bad(3, m) if m.contains("3 bytes")));
        assert!(matches!(&got[1], Outcome::Bad(4, m) if m.contains("does not decode")));
    }

    #[test]
    fn an_output_over_the_frame_limit_is_refused_and_leaves_the_payload_as_it_was() {
        let mut results = Vec::new();
        push_done(&mut results, 1, 1);
        let before = results.clone();
        let e = push_output::<Postcard, String>(&mut results, 2, &"y".repeat(200), 100);
        assert!(e.is_err());
        assert_eq!(results, before);
    }
}
