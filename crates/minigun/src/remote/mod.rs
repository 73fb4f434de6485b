//! Remote stages: a processor stage whose items run on worker processes on any number of
//! machines, carried by a message broker.
//!
//! ```text
//!  driver (this program)                 broker                      workers (this program,
//!                                                                     MINIGUN_WORKER=1)
//!  stage queue ─> sender ──entries──> work stream + group ──fetch──> worker_exec runs items
//!  downstream <── collector <─results── out stream <──commit (atomic)─ (results + ack)
//!                                       control, worker table <──── heartbeat, reclaim
//! ```
//!
//! A stage becomes remote with [`StageRef::remote`](crate::StageRef::remote) (or
//! [`Exec::remote`](crate::Exec::remote) with a serialisable stage). The program calls
//! [`serve_if_worker`] first in `main`: started as a worker, it builds the same definition and
//! serves the announced runs of its remote stages (see `worker` for the lifecycle), each item
//! under the local executor [`Remote::worker_exec`]. The driver's side (`parent`) sends items
//! in batched entries under a bound of items in flight, and keeps the first result of each
//! item index. Stage code runs at least once per item; its results reach the pipeline exactly
//! once.
//!
//! The core defines the [`Broker`] contract and an in-memory broker ([`MemoryBroker`]) for
//! tests; real engines live in their own crates (Redis Streams in `minigun-redis`). Every
//! broker passes the same [`conformance`] suite. The payloads (`wire`) reuse the frame layout
//! of the fork executors' pipes.

pub mod broker;
#[doc(hidden)]
pub mod conformance;
mod memory;
mod options;
pub(crate) mod parent;
mod serve;
mod wire;
pub(crate) mod worker;

pub use broker::{Broker, BrokerError, Session};
pub use memory::MemoryBroker;
pub use options::Remote;
pub use serve::{is_worker, serve_if_worker, ServeError, ServeOptions, ServeReport};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_broker_passes_the_conformance_suite() {
        let b = MemoryBroker::new();
        conformance::run_all(&b, &|d| b.advance(d));
    }
}
