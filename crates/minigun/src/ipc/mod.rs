#![doc = include_str!("README.md")]

pub(crate) mod codec;
pub(crate) mod frame;
pub(crate) mod message;
#[cfg(target_os = "linux")]
pub(crate) mod outbox;
#[cfg(target_os = "linux")]
pub(crate) mod reader;
#[cfg(target_os = "linux")]
pub(crate) mod results_log;
#[cfg(target_os = "linux")]
pub(crate) mod server;
#[cfg(target_os = "linux")]
pub(crate) mod writer;

/// The id of a worker's end-of-stream flush outputs.
pub(crate) const FINISH_ID: u64 = u64::MAX;
/// The id of a worker's start-up failure.
pub(crate) const START_ID: u64 = u64::MAX - 1;
