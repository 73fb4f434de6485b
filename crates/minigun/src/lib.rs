//! # minigun
//!
//! Composable, high-throughput data pipelines whose stages run inline, on thread pools, in a
//! copy-on-write **fork-per-item** pool, or in a pool of **persistent forked workers** fed over
//! pipes. A Rust port of the Ruby framework Minigun, keeping its vocabulary (producer,
//! processor, accumulator, consumer, `cow_fork`, `ipc_fork`, `before_fork`, `after_fork`).
//!
//! ## The model
//!
//! A [`Pipeline`] is a DAG of named stages. A **producer** runs once and emits items; a
//! **processor** is called once per item and emits 0..n items; an **accumulator**
//! ([`Pipeline::batch`]) groups items into batches; a **consumer** takes items and emits
//! nothing; a user type implementing [`Stage`] is a stage with state. Every non-producer stage
//! owns one bounded input queue (1000 items by default): a full queue blocks its senders, so a
//! slow stage slows the producer down instead of filling memory.
//!
//! Stages connect in definition order unless told otherwise; [`StageRef::from`] and
//! [`StageRef::to`] draw explicit edges (by typed handle, so a mis-wired edge does not compile,
//! or by name, checked when the pipeline is built). A stage with several downstreams
//! broadcasts each item to all of them, or distributes them round-robin. A stage with several
//! upstreams ends once every one of them has ended.
//!
//! ## A complete example
//!
//! ```
//! use minigun::{Exec, OnError, Pipeline};
//!
//! let p = Pipeline::new("newsletter");
//! p.producer("users", |out| {
//!     for id in 0..1_000u64 {
//!         out.emit(id)?;
//!     }
//!     Ok(())
//! });
//! p.map("render", |id: u64| Ok(format!("hello user {id}")))
//!     .executor(Exec::threads(4));
//! p.map("send", |mail: String| Ok(mail.len()))
//!     .on_error(OnError::retry(2));
//! p.batch::<usize>("batch", 100);
//! p.consumer("record", |sizes: Vec<usize>| {
//!     assert!(sizes.len() <= 100);
//!     Ok(())
//! });
//! let report = p.run()?;
//! assert_eq!(report.stage("record").unwrap().items_in, 10);
//! println!("{report}");
//! # Ok::<(), minigun::RunError>(())
//! ```
//!
//! ## Getting results back
//!
//! [`Pipeline::run`] returns the [`RunReport`]; consumers keep what they need. To get the
//! items of the final stage back, as rayon's `collect`, Python's `Pool.map` or Ruby's
//! `Parallel.map` give them, call [`Pipeline::collect`] (arrival order),
//! [`Pipeline::collect_ordered`] (input order), [`Pipeline::fold`] or [`Pipeline::reduce`]
//! instead; each returns the report alongside ([`Collected`], [`Folded`]).
//!
//! ```
//! use minigun::Pipeline;
//! let p = Pipeline::new("lengths");
//! p.producer("words", |out| out.emit_all(["fork", "pipe", "copy-on-write"]).map_err(Into::into));
//! p.map("len", |w: &'static str| Ok(w.len())).cow_fork(2);
//! let got = p.collect_ordered::<usize>()?;
//! assert_eq!(got.items, [4, 4, 13]);
//! assert_eq!(got.report.stage("len").unwrap().items_out, 3);
//! # Ok::<(), minigun::RunError>(())
//! ```
//!
//! ## Choosing an executor
//!
//! Set one per stage ([`StageRef::executor`]), for a group of stages
//! ([`Pipeline::with_executor`], [`Pipeline::context`]), or pipeline-wide
//! ([`Pipeline::default_executor`]); the most specific wins.
//!
//! - Cheap work, or work that must keep order of side effects: **inline**.
//! - I/O-bound or CPU-bound work on data that is `Send`: **`threads(n)`**, `n` items at once.
//! - Crash isolation, or large read-only data in the parent that each item reads:
//!   **`cow_fork(n)`** ([`StageRef::cow_fork`]). The child sees the parent's memory through
//!   copy-on-write: the input is never serialised, only the output (which needs serde). The
//!   fork options (`timeout`, `ordered`, `items_per_fork`, ...) are set on the [`ForkRef`]
//!   that `cow_fork` and `ipc_fork` return.
//! - Expensive per-worker start-up (connections, models), strong isolation, many items:
//!   **`ipc_fork(n)`** ([`StageRef::ipc_fork`]). Input and output cross pipes (serde), in
//!   batches when several items are ready (see [`Exec::batch_results`]).
//! - More work than one machine holds: **`remote`** ([`StageRef::remote`], see [`remote`]):
//!   worker processes on any number of machines, carried by a broker (Redis Streams in the
//!   `minigun-redis` crate), each running the items under a local executor.
//! - Many requests waiting at once (HTTP, databases, object stores): an async stage
//!   ([`Pipeline::map_async`] and its siblings) under **`tasks(n)`** ([`Exec::tasks`]): at most
//!   `n` futures in flight on a tokio runtime, thousands without a thread each, with the
//!   queues, policies and report of every other stage. With crash isolation too:
//!   **`ipc_fork(k).tasks_per_worker(n)`** ([`Exec::tasks_per_worker`]), `n` futures in each
//!   of `k` forked workers, each with a runtime it builds after the fork.
//! - Data that cannot be serialised: inline, threads or tasks.
//!
//! Errors mean the same under every executor: a stage returns `Result`, a panic is caught, and
//! the stage's [`OnError`] policy decides (skip and record, fail fast, retry with backoff,
//! dead-letter). Failures are counted, logged with `tracing`, and kept in the [`RunReport`].
//!
//! ## Your code in a forked child
//!
//! Under `cow_fork` and `ipc_fork`, stage code (and its factory and `after_fork` hooks) runs in
//! a process forked from a multi-threaded parent, in which only the forking thread exists.
//!
//! - **Safe:** allocating; reading anything the parent built before the fork (that is the
//!   point of `cow_fork`); writing to your own copies (the parent never sees the writes);
//!   opening files, sockets and connections; printing; logging with `tracing` (records reach
//!   the parent's subscriber through the pipe); spawning your own threads.
//! - **Deadlocks or misbehaves:** taking a mutex another parent thread may have held at the
//!   instant of fork (it stays locked forever in the child); using the parent's thread pools,
//!   async runtimes or channels (their threads do not exist in the child; rayon's pool is one
//!   of them; an async stage under ipc_fork gets a runtime of its worker's own); relying on a connection or socket inherited from the parent (reconnect in
//!   `after_fork` instead: two processes sharing one connection corrupt it); in the host
//!   program, installing scoped `tracing` dispatchers (`set_default`, `with_default`) on other
//!   threads while fork stages run (it takes tracing's global lock, which a child may then
//!   need: the library's own installs are serialised with its forks, the host's cannot be).
//! - **Guaranteed by the library:** children die with the parent (SIGKILL on parent death),
//!   hold only their own pipes (no inherited descriptors keep other children's pipes open),
//!   ignore SIGINT (the parent decides), and leave with `_exit` (no `atexit` handlers, no
//!   double-flushed stdio). Children are reaped by pid: the host program's own children are
//!   never waited for. glibc's malloc is supported; allocators that are not fork-safe in
//!   multi-threaded programs are not.
//!
//! ## Feature flags
//!
//! - `async` (default): async stages ([`Pipeline::map_async`], [`Pipeline::processor_async`],
//!   [`Pipeline::consumer_async`], [`Pipeline::stage_async`] with [`AsyncStage`]),
//!   [`Exec::tasks`] and [`Exec::tasks_per_worker`], and [`Pipeline::run_async`] to await a
//!   run from a tokio application. It
//!   brings in tokio and futures; `default-features = false` leaves them out of a sync-only
//!   build.
//!
//! ## Platform support
//!
//! The fork executors need Linux (fork, pidfd). Elsewhere they fall back to inline with a
//! warning.

#[cfg(feature = "async")]
mod async_stage;
mod ctx;
mod define;
mod erased;
mod error;
mod exec;
mod hooks;
mod huge;
mod ipc;
mod link;
mod loops;
mod monitor;
mod node;
mod policy;
mod queue;
pub mod remote;
mod report;
mod route;
mod run;
#[cfg(feature = "async")]
mod run_async;
mod shared;
mod signals;
mod stage;
mod stats;
#[cfg(target_os = "linux")]
mod sys;

#[cfg(feature = "async")]
pub use async_stage::{AsyncOutput, AsyncStage};
/// The `Pod` trait of [`HugeBuf`]'s values (and `#[derive(Pod, Zeroable)]` with bytemuck's
/// `derive` feature in your own `Cargo.toml`).
pub use bytemuck;
pub use define::{Collected, CowFork, Folded, ForkKind, ForkRef, IpcFork, Pipeline, StageRef};
pub use error::{
    BoxError, DefinitionError, EmitError, FailureKind, ItemFailure, RunError, StageResult,
};
pub use exec::{Dispatch, Exec, ForkOptions};
#[cfg(feature = "async")]
pub use exec::{RuntimeHandle, TaskOptions};
pub use huge::{collapse_heap, HugePages, HugePagesReport, HugePagesStatus};
pub use ipc::codec::{Codec, Postcard};
pub use monitor::{ChildSnapshot, Monitor, Snapshot, StageSnapshot, StageStatus};
pub use policy::OnError;
pub use queue::{Capacity, FanOut};
pub use report::{Latency, RemoteReport, RemoteWorker, RunReport, StageReport};
pub use run::{RunHandle, Runnable};
#[cfg(feature = "async")]
pub use run_async::RunFuture;
pub use shared::KEEP_FAILURES;
pub use stage::{Failed, Item, Output, Stage, StageKind, Wire};
#[cfg(target_os = "linux")]
pub use sys::huge::HugeBuf;

/// Entry points for the fuzz targets in `fuzz/`; not part of the API.
#[doc(hidden)]
#[cfg(target_os = "linux")]
pub mod fuzzing {
    /// Feeds `data` to a frame decoder in chunks of `chunk` bytes; returns the number of
    /// complete frames before the end of the data or the first error. Must never panic.
    pub fn decode_frames(data: &[u8], chunk: usize, max_frame: usize) -> usize {
        crate::ipc::frame::fuzz_decode(data, chunk, max_frame)
    }

    /// Feeds `data` in chunks of `chunk` bytes to a frame decoder and decodes each frame's
    /// message as the parent or an ipc worker would (results are byte vectors, one route of
    /// `u32`); returns the number of messages before the end of the data or the first error.
    /// Must never panic.
    pub fn decode_messages(data: &[u8], chunk: usize, max_frame: usize) -> usize {
        crate::ipc::message::fuzz_decode(data, chunk, max_frame)
    }
}
