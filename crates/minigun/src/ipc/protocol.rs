//! Payloads of the control messages, and the codec trait for item payloads.

use crate::error::FailureKind;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// Payload of a `done` frame.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct Done {
    /// Time the child spent in stage code for this item.
    pub(crate) latency_ns: u64,
    /// How many `result` frames it sent for this item (checked by the parent).
    pub(crate) outputs: u64,
}

/// Payload of an `error` frame.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ChildError {
    pub(crate) kind: FailureKind,
    pub(crate) message: String,
}

/// How items are turned into frame payloads and back when they cross a process.
///
/// postcard ([`Postcard`]) is the default: a stable, documented, compact format with clean
/// errors on bad input. Choose another per stage with
/// [`StageRef::codec`](crate::StageRef::codec), for example a self-describing format for
/// types that postcard cannot represent (`#[serde(flatten)]`, untagged enums).
///
/// ```
/// use minigun::Codec;
/// use serde::{de::DeserializeOwned, Serialize};
/// /// JSON across the pipe.
/// struct Json;
/// impl Codec for Json {
///     fn encode<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), String> {
///         serde_json::to_writer(out, value).map_err(|e| e.to_string())
///     }
///     fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
///         serde_json::from_slice(bytes).map_err(|e| e.to_string())
///     }
/// }
/// ```
pub trait Codec: 'static {
    /// Appends the encoding of `value` to `out`. On error `out` may hold a partial encoding
    /// past its original length; the caller truncates it.
    fn encode<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), String>;
    /// Decodes a value from a whole payload.
    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String>;
}

/// postcard: a stable, documented, compact format with clean errors on bad input (the
/// default codec).
#[derive(Debug, Clone, Copy, Default)]
pub struct Postcard;

impl Codec for Postcard {
    fn encode<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), String> {
        postcard::to_io(value, out)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
        postcard::from_bytes(bytes).map_err(|e| e.to_string())
    }
}

type Enc<T> = fn(&T, &mut Vec<u8>) -> Result<(), String>;
type Dec<T> = fn(&[u8]) -> Result<T, String>;

/// A stage's codec, bound to its item types (plain function pointers: no type parameter has
/// to travel through the executors).
pub(crate) struct WireFns<I, O> {
    pub(crate) encode_in: Enc<I>,
    pub(crate) decode_in: Dec<I>,
    pub(crate) encode_out: Enc<O>,
    pub(crate) decode_out: Dec<O>,
}

impl<I, O> Clone for WireFns<I, O> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<I, O> Copy for WireFns<I, O> {}

fn enc<C: Codec, T: Serialize>(v: &T, out: &mut Vec<u8>) -> Result<(), String> {
    C::encode(v, out)
}
fn dec<C: Codec, T: DeserializeOwned>(b: &[u8]) -> Result<T, String> {
    C::decode(b)
}
fn not_serialisable<T>(_: &T, _: &mut Vec<u8>) -> Result<(), String> {
    Err("this stage's input type is not serialisable".into())
}
fn not_deserialisable<T>(_: &[u8]) -> Result<T, String> {
    Err("this stage's input type is not serialisable".into())
}

impl<I, O: Serialize + DeserializeOwned> WireFns<I, O> {
    /// Outputs through `C`; the input never crosses (cow_fork with a non-serde input).
    pub(crate) fn outputs<C: Codec>() -> Self {
        WireFns {
            encode_in: not_serialisable::<I>,
            decode_in: not_deserialisable::<I>,
            encode_out: enc::<C, O>,
            decode_out: dec::<C, O>,
        }
    }
}

impl<I: Serialize + DeserializeOwned, O: Serialize + DeserializeOwned> WireFns<I, O> {
    /// Inputs and outputs through `C`.
    pub(crate) fn both<C: Codec>() -> Self {
        WireFns {
            encode_in: enc::<C, I>,
            decode_in: dec::<C, I>,
            encode_out: enc::<C, O>,
            decode_out: dec::<C, O>,
        }
    }
}

/// Appends one frame carrying `value` to `buf`. On failure `buf` is unchanged.
pub(crate) fn encode_frame<T: Serialize + ?Sized>(
    buf: &mut Vec<u8>,
    kind: super::frame::Kind,
    id: u64,
    value: &T,
    max: usize,
) -> Result<(), String> {
    let start = super::frame::begin(buf, kind, id);
    if let Err(e) = Postcard::encode(value, buf) {
        buf.truncate(start);
        return Err(e);
    }
    super::frame::finish(buf, start, max).map_err(|e| e.to_string())
}

/// Encodes a payload (appends to `out`).
pub(crate) fn encode<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), String> {
    Postcard::encode(value, out)
}

/// Appends one frame whose payload `write` produces. On failure `buf` is unchanged.
pub(crate) fn frame_with(
    buf: &mut Vec<u8>,
    kind: super::frame::Kind,
    id: u64,
    max: usize,
    write: impl FnOnce(&mut Vec<u8>) -> Result<(), String>,
) -> Result<(), String> {
    let start = super::frame::begin(buf, kind, id);
    if let Err(e) = write(buf) {
        buf.truncate(start);
        return Err(e);
    }
    super::frame::finish(buf, start, max).map_err(|e| e.to_string())
}

/// Decodes a payload.
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    Postcard::decode(bytes)
}
