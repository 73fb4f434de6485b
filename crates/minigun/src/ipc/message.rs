//! The messages of each direction, typed: what a frame's kind, id and payload mean, and how
//! each message is written into a frame buffer.
//!
//! - Parent to ipc worker: [`ToWorker`] (`item`, `shutdown`). The parent writes them through
//!   its outbox (`ipc::outbox`), which sends a large item's payload without copying it.
//! - Child to parent: [`FromChild`] (`log`, `result`, `result_done`, `routed`, `done`,
//!   `error`), decoded by [`ChildFrames::decode`] for both fork executors and written by the
//!   child's writer (`ipc::writer`) with the `push_*` functions here.
//!
//! Decoding never panics: a frame the receiver cannot make sense of is a [`MessageError`],
//! which the receiver treats as a corrupt stream.

use super::codec::{self, Codec, Postcard, WireFns};
use super::frame::{self, Kind};
use super::{FINISH_ID, START_ID};
use crate::erased::Erased;
use crate::error::FailureKind;
use crate::route::Routes;
use serde::{Deserialize, Serialize};
use std::any::Any;

/// Payload of a `done` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Done {
    /// Time the child spent in stage code for this item.
    pub(crate) latency_ns: u64,
    /// How many `result` frames it sent for this item (checked by the parent).
    pub(crate) outputs: u64,
}

/// Payload of an `error` frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ChildError {
    pub(crate) kind: FailureKind,
    pub(crate) message: String,
}

/// Payload of a `log` frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LogRecord {
    /// 0 = error .. 4 = trace.
    pub(crate) level: u8,
    pub(crate) target: String,
    pub(crate) message: String,
}

/// A frame from the parent to an ipc worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ToWorker<'a> {
    /// An input item, still encoded: the worker decodes it with the stage's codec once it
    /// has recorded that the item runs (a death while decoding is that item's).
    Item(&'a [u8]),
    /// A run of input items with consecutive ids from the frame's id on, each still
    /// encoded behind its length ([`split_run`] takes them apart); only sync workers get
    /// them.
    Items(&'a [u8]),
    /// Finish: flush the stage instance and exit 0.
    Shutdown,
}

impl<'a> ToWorker<'a> {
    /// What a frame from the parent means.
    pub(crate) fn decode(kind: Kind, payload: &'a [u8]) -> Result<Self, MessageError> {
        match kind {
            Kind::Item => Ok(ToWorker::Item(payload)),
            Kind::Items => Ok(ToWorker::Items(payload)),
            Kind::Shutdown => Ok(ToWorker::Shutdown),
            other => Err(MessageError::Unexpected {
                kind: other,
                from: "the parent",
            }),
        }
    }
}

/// Bytes before each item in a run (`items` frame): its length, `u32` little endian.
pub(crate) const RUN_PREFIX: usize = 4;

/// Appends `item`, an encoded input item, to a run's payload: its length, then its bytes.
pub(crate) fn push_run_item(run: &mut Vec<u8>, item: &[u8]) {
    let len = u32::try_from(item.len()).expect("an item's length fits in 32 bits");
    run.extend_from_slice(&len.to_le_bytes());
    run.extend_from_slice(item);
}

/// The first item of a run's payload and the bytes after it, or `None` if the payload does
/// not start with a whole item.
pub(crate) fn split_run(run: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = run.get(..RUN_PREFIX)?;
    let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
    let rest = &run[RUN_PREFIX..];
    (len <= rest.len()).then(|| rest.split_at(len))
}

/// Where item `k` of a well-formed run starts in it (`k` at most its number of items).
pub(crate) fn run_offset(run: &[u8], k: usize) -> usize {
    let mut at = 0;
    for _ in 0..k {
        let (item, _) = split_run(&run[at..]).expect("a well-formed run");
        at += RUN_PREFIX + item.len();
    }
    at
}

/// Bytes before each answer in a `results` frame: the item's latency in ns (`u64` little
/// endian), then the length of its output's encoding (`u32` little endian).
pub(crate) const ANSWER_PREFIX: usize = 12;

/// What goes before an answer's `output` (an encoded output) in a `results` frame.
pub(crate) fn answer_prefix(latency_ns: u64, output: &[u8]) -> [u8; ANSWER_PREFIX] {
    let len = u32::try_from(output.len()).expect("an output's length fits in 32 bits");
    let mut p = [0; ANSWER_PREFIX];
    p[..8].copy_from_slice(&latency_ns.to_le_bytes());
    p[8..].copy_from_slice(&len.to_le_bytes());
    p
}

/// One answer of a `results` frame: an item's latency and its only output, encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Answer<'a> {
    pub(crate) latency_ns: u64,
    pub(crate) output: &'a [u8],
}

/// The first answer of a `results` payload and the bytes after it, or `None` if the payload
/// does not start with a whole answer.
pub(crate) fn split_answer(bytes: &[u8]) -> Option<(Answer<'_>, &[u8])> {
    let prefix = bytes.get(..ANSWER_PREFIX)?;
    let latency_ns = u64::from_le_bytes(prefix[..8].try_into().expect("8 bytes"));
    let len = u32::from_le_bytes(prefix[8..].try_into().expect("4 bytes")) as usize;
    let rest = &bytes[ANSWER_PREFIX..];
    (len <= rest.len()).then(|| {
        let (output, after) = rest.split_at(len);
        (Answer { latency_ns, output }, after)
    })
}

/// A frame from a child (a cow_fork child or an ipc_fork worker) to the parent. The frame's
/// id names the item it is about.
#[derive(Debug)]
pub(crate) enum FromChild<O> {
    /// A `tracing` record from stage code (id 0).
    Log(LogRecord),
    /// One output of the running item.
    Result(O),
    /// The running item's only output, then its latency in ns: `Result` then `Done` with one
    /// output (ipc workers only).
    ResultDone(O, u64),
    /// The answers of consecutive items from the frame's id on, each item's only output with
    /// its latency in ns: a `ResultDone` for each (sync ipc workers with a results log only).
    /// `bad`: why the answers stop before the frame's end (the stream is corrupt there).
    Results {
        outs: Vec<(O, u64)>,
        bad: Option<MessageError>,
    },
    /// An item routed by name: the index of its target in the stage's route table.
    Routed(usize, Erased),
    /// The item is finished.
    Done(Done),
    /// The item failed.
    Error(ChildError),
}

/// Who sends a stream of child frames, and which item it runs: which ids its frames may carry.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Sender {
    /// A cow_fork child running item `running` (`u64::MAX` once it has none left). Every frame
    /// but `log` names that item; it never joins `result` and `done`.
    CowChild { running: u64 },
    /// An ipc_fork worker whose oldest unanswered item is `running`. Its frames name that item
    /// or a reserved id ([`FINISH_ID`], [`START_ID`]).
    Worker { running: Option<u64> },
    /// An ipc_fork worker of an async stage, which answers its items as they end, in any
    /// order, each item's frames together. Its frames name a reserved id, or `answering`
    /// while some of that item's frames have arrived and its `done` or `error` has not, or
    /// else any item (the receiver checks that the worker holds it).
    AsyncWorker { answering: Option<u64> },
}

impl Sender {
    fn name(self) -> &'static str {
        match self {
            Sender::CowChild { .. } => "a child",
            Sender::Worker { .. } | Sender::AsyncWorker { .. } => "a worker",
        }
    }

    /// `Err` if a frame for item `id` cannot come from this sender now (the error's text is
    /// made only then: this runs for every frame).
    fn check(self, id: u64) -> Result<(), MessageError> {
        let ok = match self {
            Sender::CowChild { running } => id == running,
            Sender::Worker { running } => id == FINISH_ID || id == START_ID || Some(id) == running,
            Sender::AsyncWorker { answering } => {
                id == FINISH_ID || id == START_ID || answering.is_none_or(|a| a == id)
            }
        };
        if ok {
            return Ok(());
        }
        let (who, running) = match self {
            Sender::CowChild { running } => ("child", running.to_string()),
            Sender::Worker { running } => ("worker", format!("{running:?}")),
            Sender::AsyncWorker { answering } => ("worker", format!("{answering:?}")),
        };
        Err(MessageError::OtherItem { id, who, running })
    }
}

/// A frame whose meaning cannot be made out: the stream is not trusted after it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum MessageError {
    #[error("unexpected {kind:?} frame from {from}")]
    Unexpected { kind: Kind, from: &'static str },
    #[error("frame for item {id} while the {who} runs item {running}")]
    OtherItem {
        id: u64,
        who: &'static str,
        running: String,
    },
    #[error("bad log frame: {0}")]
    Log(String),
    #[error("cannot decode a result: {0}")]
    Result(String),
    #[error("result_done frame without a latency")]
    NoLatency,
    #[error("results frame without an answer")]
    NoAnswers,
    #[error("results frame that ends inside an answer")]
    CutAnswer,
    #[error("bad done frame: {0}")]
    Done(String),
    #[error("bad error frame: {0}")]
    Error(String),
    #[error("routed frame without a route index")]
    NoRoute,
    #[error("routed frame for unknown route {0}")]
    UnknownRoute(usize),
    #[error("route to {0:?} is not serialisable")]
    RouteNotSerialisable(String),
    #[error("cannot decode an item routed to {name:?}: {error}")]
    Routed { name: String, error: String },
}

/// What decoding a stage's child frames needs: the stage's codec and route table.
pub(crate) struct ChildFrames<'a, I, O> {
    pub(crate) wire: WireFns<I, O>,
    pub(crate) routes: &'a Routes,
}

impl<I, O> Clone for ChildFrames<'_, I, O> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<I, O> Copy for ChildFrames<'_, I, O> {}

impl<I, O> ChildFrames<'_, I, O> {
    /// What a frame from `from` means. A `log` frame may name any item; any other is checked
    /// against the item `from` runs before its payload is decoded.
    pub(crate) fn decode(
        self,
        from: Sender,
        kind: Kind,
        id: u64,
        payload: &[u8],
    ) -> Result<FromChild<O>, MessageError> {
        if kind == Kind::Log {
            return codec::decode::<LogRecord>(payload)
                .map(FromChild::Log)
                .map_err(MessageError::Log);
        }
        from.check(id)?;
        match kind {
            Kind::Routed => {
                decode_routed(self.routes, payload).map(|(i, t)| FromChild::Routed(i, t))
            }
            Kind::Result => (self.wire.decode_out)(payload)
                .map(FromChild::Result)
                .map_err(MessageError::Result),
            Kind::ResultDone if !matches!(from, Sender::CowChild { .. }) => {
                let (body, latency) = payload
                    .split_last_chunk::<8>()
                    .ok_or(MessageError::NoLatency)?;
                let latency_ns = u64::from_le_bytes(*latency);
                (self.wire.decode_out)(body)
                    .map(|o| FromChild::ResultDone(o, latency_ns))
                    .map_err(MessageError::Result)
            }
            Kind::Results if matches!(from, Sender::Worker { .. }) => self.answers(payload),
            Kind::Done => codec::decode::<Done>(payload)
                .map(FromChild::Done)
                .map_err(MessageError::Done),
            Kind::Error => codec::decode::<ChildError>(payload)
                .map(FromChild::Error)
                .map_err(MessageError::Error),
            other => Err(MessageError::Unexpected {
                kind: other,
                from: from.name(),
            }),
        }
    }

    /// A `results` frame's answers, up to the first that cannot be made out (an error if
    /// that is the first).
    fn answers(self, mut rest: &[u8]) -> Result<FromChild<O>, MessageError> {
        let mut outs = Vec::new();
        let mut bad = None;
        while !rest.is_empty() {
            let Some((answer, after)) = split_answer(rest) else {
                bad = Some(MessageError::CutAnswer);
                break;
            };
            match (self.wire.decode_out)(answer.output) {
                Ok(o) => outs.push((o, answer.latency_ns)),
                Err(e) => {
                    bad = Some(MessageError::Result(e));
                    break;
                }
            }
            rest = after;
        }
        match (outs.is_empty(), bad) {
            (true, bad) => Err(bad.unwrap_or(MessageError::NoAnswers)),
            (false, bad) => Ok(FromChild::Results { outs, bad }),
        }
    }
}

/// Decodes a `routed` frame's payload with the stage's route table.
fn decode_routed(routes: &Routes, payload: &[u8]) -> Result<(usize, Erased), MessageError> {
    let (head, body) = payload.split_at_checked(4).ok_or(MessageError::NoRoute)?;
    let index = u32::from_le_bytes(head.try_into().expect("4 bytes")) as usize;
    let entry = routes
        .entries
        .get(index)
        .ok_or(MessageError::UnknownRoute(index))?;
    let codec = entry
        .codec
        .ok_or_else(|| MessageError::RouteNotSerialisable(entry.name.clone()))?;
    let item = (codec.decode)(body).map_err(|error| MessageError::Routed {
        name: entry.name.clone(),
        error,
    })?;
    Ok((index, item))
}

/// Appends one frame carrying `value` to `buf`. On failure `buf` is unchanged.
pub(crate) fn encode_frame<T: Serialize + ?Sized>(
    buf: &mut Vec<u8>,
    kind: Kind,
    id: u64,
    value: &T,
    max: usize,
) -> Result<(), String> {
    frame_with(buf, kind, id, max, |b| Postcard::encode(value, b))
}

/// Appends one frame whose payload `write` produces. On failure `buf` is unchanged.
pub(crate) fn frame_with(
    buf: &mut Vec<u8>,
    kind: Kind,
    id: u64,
    max: usize,
    write: impl FnOnce(&mut Vec<u8>) -> Result<(), String>,
) -> Result<(), String> {
    let start = frame::begin(buf, kind, id);
    if let Err(e) = write(buf) {
        buf.truncate(start);
        return Err(e);
    }
    frame::finish(buf, start, max).map_err(|e| e.to_string())
}

/// Appends a `log` frame.
pub(crate) fn push_log(buf: &mut Vec<u8>, rec: &LogRecord, max: usize) -> Result<(), String> {
    encode_frame(buf, Kind::Log, 0, rec, max)
}

/// Appends a `result` frame for item `id`; returns where it starts in `buf`.
pub(crate) fn push_result<O>(
    buf: &mut Vec<u8>,
    id: u64,
    value: &O,
    encode: fn(&O, &mut Vec<u8>) -> Result<(), String>,
    max: usize,
) -> Result<usize, String> {
    let start = buf.len();
    frame_with(buf, Kind::Result, id, max, |b| encode(value, b)).map(|()| start)
}

/// Appends a `routed` frame for item `id`: the route's index, then the item.
pub(crate) fn push_routed(
    buf: &mut Vec<u8>,
    id: u64,
    index: u32,
    item: &(dyn Any + Send),
    encode: fn(&(dyn Any + Send), &mut Vec<u8>) -> Result<(), String>,
    max: usize,
) -> Result<(), String> {
    let start = frame::begin(buf, Kind::Routed, id);
    buf.extend_from_slice(&index.to_le_bytes());
    if let Err(e) = encode(item, buf) {
        buf.truncate(start);
        return Err(e);
    }
    frame::finish(buf, start, max).map_err(|e| e.to_string())
}

/// Turns the `result` frame at `start`, the last one in `buf`, into a `result_done` frame
/// with `latency_ns`. `false` (and `buf` unchanged) if it is not the last or would not fit.
pub(crate) fn join_done(buf: &mut Vec<u8>, start: usize, latency_ns: u64, max: usize) -> bool {
    frame::retag(buf, start, Kind::ResultDone, &latency_ns.to_le_bytes(), max)
}

/// Appends a `done` frame.
pub(crate) fn push_done(buf: &mut Vec<u8>, id: u64, done: &Done, max: usize) {
    encode_frame(buf, Kind::Done, id, done, max).expect("a done frame always encodes");
}

/// Appends an `error` frame; a message too long for the frame limit is cut to 1 KiB.
pub(crate) fn push_error(buf: &mut Vec<u8>, id: u64, mut e: ChildError, max: usize) {
    if encode_frame(buf, Kind::Error, id, &e, max).is_err() {
        let mut cut = e.message.len().min(1024);
        while !e.message.is_char_boundary(cut) {
            cut -= 1;
        }
        e.message.truncate(cut);
        let _ = encode_frame(buf, Kind::Error, id, &e, max);
    }
}

/// Decodes a byte stream delivered in chunks as an ipc worker's frames (for fuzzing): messages
/// until the first error. Results are strings (whose decoding can fail: a byte vector's
/// cannot); the route table has one route, of `u32`.
pub(crate) fn fuzz_decode(data: &[u8], chunk: usize, max: usize) -> usize {
    let routes = fuzz_routes();
    let frames = ChildFrames {
        wire: WireFns::<Vec<u8>, String>::both::<Postcard>(),
        routes: &routes,
    };
    let mut dec = frame::Decoder::new(max);
    let mut messages = 0;
    for part in data.chunks(chunk.max(1)) {
        dec.extend(part);
        loop {
            let next = dec.next(|kind, id, payload| {
                let from = Sender::Worker { running: Some(id) };
                match kind {
                    Kind::Item | Kind::Items | Kind::Shutdown => {
                        ToWorker::decode(kind, payload).map(|_| ())
                    }
                    _ => frames.decode(from, kind, id, payload).map(|_| ()),
                }
            });
            match next {
                Ok(Some(Ok(()))) => messages += 1,
                Ok(None) => break,
                Ok(Some(Err(_))) | Err(_) => return messages,
            }
        }
    }
    messages
}

/// A route table with one route, `"sink"`, of `u32` items.
fn fuzz_routes() -> Routes {
    Routes {
        stage: "fuzz".into(),
        entries: vec![crate::route::RouteEntry {
            name: "sink".into(),
            ty: crate::stage::TypeInfo::of::<u32>(),
            send: Box::new(|_| Ok(())),
            codec: Some(crate::route::RouteCodec::of::<u32>()),
        }]
        .into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAX: usize = 1 << 20;

    fn frames(routes: &Routes) -> ChildFrames<'_, Vec<u8>, String> {
        ChildFrames {
            wire: WireFns::both::<Postcard>(),
            routes,
        }
    }

    /// Every frame in `buf`, decoded as an ipc worker's running item `running`.
    fn decode_all(buf: &[u8], routes: &Routes, running: u64) -> Vec<(u64, FromChild<String>)> {
        let mut dec = frame::Decoder::new(MAX);
        dec.extend(buf);
        let from = Sender::Worker {
            running: Some(running),
        };
        let mut out = Vec::new();
        while let Some(m) = dec
            .next(|kind, id, payload| (id, frames(routes).decode(from, kind, id, payload)))
            .expect("whole frames")
        {
            out.push((m.0, m.1.expect("decodes")));
        }
        out
    }

    fn encode_string(s: &String, out: &mut Vec<u8>) -> Result<(), String> {
        Postcard::encode(s, out)
    }

    #[test]
    fn every_message_kind_round_trips() {
        let routes = fuzz_routes();
        let mut buf = Vec::new();
        let rec = LogRecord {
            level: 2,
            target: "t".into(),
            message: "m x=1".into(),
        };
        push_log(&mut buf, &rec, MAX).unwrap();
        push_result(&mut buf, 7, &"one".to_string(), encode_string, MAX).unwrap();
        let start = push_result(&mut buf, 7, &"two".to_string(), encode_string, MAX).unwrap();
        assert!(join_done(&mut buf, start, 42, MAX));
        let encode = routes.entries[0].codec.unwrap().encode;
        push_routed(&mut buf, 7, 0, &9u32, encode, MAX).unwrap();
        let done = Done {
            latency_ns: 5,
            outputs: 3,
        };
        push_done(&mut buf, 7, &done, MAX);
        let err = ChildError {
            kind: FailureKind::Panic,
            message: "boom".into(),
        };
        push_error(&mut buf, FINISH_ID, err.clone(), MAX);
        let got = decode_all(&buf, &routes, 7);
        assert_eq!(got.len(), 6);
        assert!(matches!(&got[0], (0, FromChild::Log(r)) if *r == rec));
        assert!(matches!(&got[1], (7, FromChild::Result(s)) if s == "one"));
        assert!(matches!(&got[2], (7, FromChild::ResultDone(s, 42)) if s == "two"));
        match &got[3] {
            (7, FromChild::Routed(0, item)) => assert_eq!(item.downcast_ref::<u32>(), Some(&9)),
            _ => panic!("not the routed item"),
        }
        assert!(matches!(&got[4], (7, FromChild::Done(d)) if *d == done));
        assert!(matches!(&got[5], (FINISH_ID, FromChild::Error(e)) if *e == err));

        // Parent to worker.
        let mut buf = Vec::new();
        frame::push(&mut buf, Kind::Item, 3, b"abc", MAX).unwrap();
        frame::push(&mut buf, Kind::Shutdown, 0, &[], MAX).unwrap();
        let mut dec = frame::Decoder::new(MAX);
        dec.extend(&buf);
        let mut got = Vec::new();
        while let Some(m) = dec
            .next(|kind, id, payload| {
                (
                    id,
                    ToWorker::decode(kind, payload).map(|m| format!("{m:?}")),
                )
            })
            .unwrap()
        {
            got.push(m);
        }
        assert_eq!(
            got,
            vec![
                (3, Ok(format!("{:?}", ToWorker::Item(b"abc")))),
                (0, Ok("Shutdown".to_string()))
            ]
        );
    }

    /// A `results` frame for items from `id` on: each answer is (latency, encoded output).
    fn results_frame(id: u64, answers: &[(u64, &[u8])]) -> Vec<u8> {
        let mut payload = Vec::new();
        for (latency, output) in answers {
            payload.extend_from_slice(&answer_prefix(*latency, output));
            payload.extend_from_slice(output);
        }
        let mut buf = Vec::new();
        frame::push(&mut buf, Kind::Results, id, &payload, MAX).unwrap();
        buf
    }

    /// `buf`'s one frame, decoded as from `from`.
    fn decode_one(buf: &[u8], from: Sender) -> Result<FromChild<String>, MessageError> {
        let routes = fuzz_routes();
        let mut dec = frame::Decoder::new(MAX);
        dec.extend(buf);
        dec.next(|kind, id, payload| frames(&routes).decode(from, kind, id, payload))
            .unwrap()
            .expect("a whole frame")
    }

    #[test]
    fn a_results_frame_answers_items_until_one_cannot_be_made_out() {
        let enc = |s: &str| {
            let mut out = Vec::new();
            Postcard::encode(s, &mut out).unwrap();
            out
        };
        let (a, b) = (enc("a"), enc("bc"));
        let worker = Sender::Worker { running: Some(5) };
        let buf = results_frame(5, &[(7, &a), (8, &b)]);
        match decode_one(&buf, worker) {
            Ok(FromChild::Results { outs, bad: None }) => {
                assert_eq!(outs, [("a".to_string(), 7), ("bc".to_string(), 8)]);
            }
            other => panic!("not two answers: {other:?}"),
        }
        // An answer that does not decode, or a frame that ends inside one: the answers
        // before it, then why the rest cannot be made out.
        let buf = results_frame(5, &[(7, &a), (8, &[200])]);
        match decode_one(&buf, worker) {
            Ok(FromChild::Results {
                outs,
                bad: Some(MessageError::Result(_)),
            }) => {
                assert_eq!(outs, [("a".to_string(), 7)]);
            }
            other => panic!("not one answer and a bad one: {other:?}"),
        }
        let mut buf = results_frame(5, &[(7, &a)]);
        buf.extend_from_slice(&[1, 2, 3]);
        let len = (buf.len() - 4) as u32;
        buf[..4].copy_from_slice(&len.to_le_bytes());
        assert!(matches!(
            decode_one(&buf, worker),
            Ok(FromChild::Results {
                bad: Some(MessageError::CutAnswer),
                ..
            })
        ));
        // Nothing to take: an error.
        assert_eq!(
            decode_one(&results_frame(5, &[]), worker).unwrap_err(),
            MessageError::NoAnswers
        );
        assert!(matches!(
            decode_one(&results_frame(5, &[(7, &[200])]), worker),
            Err(MessageError::Result(_))
        ));
        // Only from a sync worker, for the item it runs.
        let buf = results_frame(5, &[(7, &a)]);
        assert!(matches!(
            decode_one(&buf, Sender::Worker { running: Some(4) }),
            Err(MessageError::OtherItem { id: 5, .. })
        ));
        for from in [
            Sender::CowChild { running: 5 },
            Sender::AsyncWorker { answering: None },
        ] {
            assert!(matches!(
                decode_one(&buf, from),
                Err(MessageError::Unexpected {
                    kind: Kind::Results,
                    ..
                })
            ));
        }
    }

    #[test]
    fn a_long_error_message_is_cut_to_fit() {
        let mut buf = Vec::new();
        let e = ChildError {
            kind: FailureKind::Error,
            message: "é".repeat(2000),
        };
        push_error(&mut buf, 1, e, 1100);
        let got = decode_all(&buf, &fuzz_routes(), 1);
        match &got[..] {
            [(1, FromChild::Error(e))] => assert!(e.message.len() <= 1024),
            _ => panic!("one error frame"),
        }
    }

    #[test]
    fn frames_that_cannot_be_made_out_are_typed_errors() {
        let routes = fuzz_routes();
        let f = frames(&routes);
        let worker = Sender::Worker { running: Some(1) };
        let child = Sender::CowChild { running: 1 };
        let err = |from, kind, id, payload: &[u8]| f.decode(from, kind, id, payload).unwrap_err();
        assert_eq!(
            err(child, Kind::Done, 2, &[]).to_string(),
            "frame for item 2 while the child runs item 1"
        );
        assert_eq!(
            err(worker, Kind::Done, 2, &[]).to_string(),
            "frame for item 2 while the worker runs item Some(1)"
        );
        assert!(matches!(
            err(child, Kind::Done, FINISH_ID, &[]),
            MessageError::OtherItem { .. }
        ));
        assert_eq!(
            err(child, Kind::ResultDone, 1, &[0; 9]).to_string(),
            "unexpected ResultDone frame from a child"
        );
        assert!(matches!(
            err(worker, Kind::Item, 1, &[]),
            MessageError::Unexpected { .. }
        ));
        assert_eq!(
            err(worker, Kind::ResultDone, 1, &[1]),
            MessageError::NoLatency
        );
        assert!(matches!(
            err(worker, Kind::Result, 1, &[200]),
            MessageError::Result(_)
        ));
        assert!(matches!(
            err(worker, Kind::Done, 1, &[]),
            MessageError::Done(_)
        ));
        assert!(matches!(
            err(worker, Kind::Error, 1, &[99]),
            MessageError::Error(_)
        ));
        assert!(matches!(
            err(worker, Kind::Log, 9, &[3, 1]),
            MessageError::Log(_)
        ));
        assert_eq!(err(worker, Kind::Routed, 1, &[0, 0]), MessageError::NoRoute);
        assert_eq!(
            err(worker, Kind::Routed, 1, &[5, 0, 0, 0]),
            MessageError::UnknownRoute(5)
        );
        assert!(matches!(
            err(worker, Kind::Routed, 1, &[0, 0, 0, 0, 0xff]),
            MessageError::Routed { .. }
        ));
        assert!(matches!(
            ToWorker::decode(Kind::Done, &[]),
            Err(MessageError::Unexpected { .. })
        ));
    }

    #[test]
    fn an_async_worker_names_any_item_but_never_two_at_once() {
        let routes = fuzz_routes();
        let f = frames(&routes);
        let mut buf = Vec::new();
        push_result(&mut buf, 9, &"x".to_string(), encode_string, MAX).unwrap();
        let result = buf.clone();
        let idle = Sender::AsyncWorker { answering: None };
        let busy = Sender::AsyncWorker { answering: Some(9) };
        let decode = |from, id| {
            let mut dec = frame::Decoder::new(MAX);
            dec.extend(&result);
            dec.next(|kind, _, payload| f.decode(from, kind, id, payload).map(|_| ()))
                .unwrap()
                .unwrap()
        };
        // Any item while none is half-answered; only that one while one is.
        assert!(decode(idle, 9).is_ok() && decode(idle, 3).is_ok());
        assert!(decode(busy, 9).is_ok() && decode(busy, FINISH_ID).is_ok());
        assert_eq!(
            decode(busy, 3).unwrap_err().to_string(),
            "frame for item 3 while the worker runs item Some(9)"
        );
        // It joins result and done, as a sync worker does.
        let start = push_result(&mut buf, 9, &"y".to_string(), encode_string, MAX).unwrap();
        assert!(join_done(&mut buf, start, 7, MAX));
        let mut dec = frame::Decoder::new(MAX);
        dec.extend(&buf);
        dec.next(|_, _, _| ()).unwrap().unwrap();
        let joined = dec
            .next(|kind, id, payload| f.decode(busy, kind, id, payload))
            .unwrap()
            .unwrap();
        assert!(matches!(joined, Ok(FromChild::ResultDone(s, 7)) if s == "y"));
    }

    proptest! {
        #[test]
        fn any_payload_of_any_kind_decodes_or_errs(kind in 1u8..=15, id in 0u64..4, payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut buf = Vec::new();
            buf.extend_from_slice(&((payload.len() + 9) as u32).to_le_bytes());
            buf.push(kind);
            buf.extend_from_slice(&id.to_le_bytes());
            buf.extend_from_slice(&payload);
            prop_assert!(fuzz_decode(&buf, 7, MAX) <= 1);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512), chunk in 1usize..40) {
            fuzz_decode(&bytes, chunk, 4096);
        }
    }
}
