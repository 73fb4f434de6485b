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

/// How values are turned into frame payloads and back.
pub(crate) trait Codec {
    /// Appends the encoding of `value` to `out`; on error `out` may hold a partial encoding
    /// past its original length, which the caller truncates.
    fn encode<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), String>;
    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String>;
}

/// postcard: a stable, documented, compact format with clean errors on bad input.
#[derive(Debug)]
pub(crate) struct Postcard;

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

/// Decodes a payload.
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    Postcard::decode(bytes)
}
