//! Remote stages: a processor stage whose items run on worker processes on any number of
//! machines, carried by a message broker.
//!
//! The core defines the [`Broker`] contract and an in-memory broker ([`MemoryBroker`]) for
//! tests; real engines live in their own crates (Redis Streams in `minigun-redis`). Every
//! broker passes the same [`conformance`] suite.

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
