//! The wire between a parent and its forked children.
//!
//! # Frame layout
//!
//! Every message on a pipe is one frame, in both directions:
//!
//! ```text
//! offset  size  field
//! 0       4     len: u32, little endian = number of bytes after this field (9 + payload)
//! 4       1     kind: u8 (see below)
//! 5       8     id: u64, little endian: the item id (the item's index in the stage's input)
//! 13      len-9 payload: the value, encoded by the stage's codec (postcard by default)
//! ```
//!
//! A frame whose `len` exceeds the stage's maximum frame size, or is below 9, or whose `kind`
//! is unknown, is a protocol error for that child: the stream is not trusted after it (the
//! child is killed and its item fails with `FailureKind::Protocol`). A stream that ends in the
//! middle of a frame is `FailureKind::Truncated`. The length prefix means a large message is
//! never mistaken for several small ones, whatever the pipe's atomicity.
//!
//! # Messages
//!
//! | kind | name | direction | payload |
//! |---|---|---|---|
//! | 1 | `item` | parent -> ipc worker | the input item |
//! | 2 | `result` | child -> parent | one output item (any number per input item) |
//! | 3 | `done` | child -> parent | [`protocol::Done`]: the item is finished (no outputs = the original's `no_result`), with its latency |
//! | 4 | `error` | child -> parent | [`protocol::ChildError`]: the item failed (error or panic, with message and location) |
//! | 5 | `shutdown` | parent -> ipc worker | empty: finish (flush the stage instance) and exit 0 |
//! | 7 | `routed` | child -> parent | an item routed by name ([`Output::to`](crate::Output::to)): `u32` little-endian index into the stage's route table, then the encoded item |
//! | 6 | `log` | child -> parent | a `tracing` record from stage code in the child (level, target, message with fields); id 0 |
//! | 8 | `result_done` | ipc worker -> parent | an item's only output, then its latency in ns (`u64` little-endian, the last 8 bytes): `result` and `done` in one frame, for the common item with exactly one output |
//!
//! Item ids are the item's index in the stage's input. Two ids are reserved: [`FINISH_ID`]
//! carries the outputs of a worker's end-of-stream flush (`Stage::finish`), and [`START_ID`]
//! carries a worker's start-up failure (an `after_fork` hook or the stage factory failed).
//!
//! An ipc_fork worker handles items in the order it receives them, and makes all of an item's
//! frames safe before it starts the next item: written to the pipe, or (batched results, the
//! default) appended to a log in memory shared with the parent, which the parent reads if the
//! worker dies and takes from itself while the worker is busy with a long item. So `done` /
//! `error` frames come back in item order and nothing of a finished item is lost with the
//! worker: the parent relies on it to know which item a dying worker was running.

pub(crate) mod frame;
pub(crate) mod protocol;

/// The id of a worker's end-of-stream flush outputs.
pub(crate) const FINISH_ID: u64 = u64::MAX;
/// The id of a worker's start-up failure.
pub(crate) const START_ID: u64 = u64::MAX - 1;
