//! [`Remote`]: the settings of a remote stage, and the fingerprint both sides agree on.

use super::broker::Broker;
use crate::exec::Exec;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// The version of the remote wire format (entries, results, failures); part of the
/// fingerprint, so a worker built from another version refuses the run.
pub(crate) const WIRE_VERSION: u32 = 2;

/// How a remote stage runs: which broker carries its items, and the lease, batching,
/// backpressure and local-execution settings (see [`Exec::remote`]).
///
/// ```
/// use minigun::remote::{MemoryBroker, Remote};
/// use minigun::Exec;
/// use std::time::Duration;
/// let r = Remote::new(MemoryBroker::new())
///     .max_deliveries(3)
///     .claim_idle(Duration::from_secs(30))
///     .max_in_flight(5_000)
///     .batch(64)
///     .worker_exec(Exec::ipc_fork(4));
/// let e = Exec::remote(r);
/// assert_eq!(e.to_string(), "remote(memory)");
/// ```
#[derive(Clone)]
pub struct Remote {
    pub(crate) broker: Arc<dyn Broker>,
    pub(crate) max_deliveries: u32,
    pub(crate) claim_idle: Duration,
    pub(crate) heartbeat: Option<Duration>,
    pub(crate) max_in_flight: usize,
    pub(crate) batch: usize,
    pub(crate) batch_bytes: usize,
    pub(crate) linger: Duration,
    pub(crate) worker_exec: Box<Exec>,
    pub(crate) wait_for_workers: Duration,
    pub(crate) keep_keys: Option<Duration>,
    pub(crate) max_frame: usize,
    pub(crate) grace: Duration,
    pub(crate) max_outage: Duration,
    pub(crate) build_id: Option<String>,
    pub(crate) ordered: bool,
}

impl Remote {
    /// A remote stage carried by `broker`, with the default settings.
    pub fn new(broker: impl Broker) -> Self {
        Self::with_broker(Arc::new(broker))
    }

    /// Like [`Remote::new`], with a shared broker.
    pub fn with_broker(broker: Arc<dyn Broker>) -> Self {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        Remote {
            broker,
            max_deliveries: 3,
            claim_idle: Duration::from_secs(30),
            heartbeat: None,
            max_in_flight: 1_000,
            batch: 64,
            batch_bytes: 256 << 10,
            linger: Duration::from_millis(1),
            worker_exec: Box::new(Exec::ipc_fork(cpus)),
            wait_for_workers: Duration::from_secs(30),
            keep_keys: None,
            max_frame: 256 << 20,
            grace: Duration::from_secs(25),
            max_outage: Duration::from_secs(60),
            build_id: None,
            ordered: false,
        }
    }

    /// Deliveries that end in a lost worker (a crash, a kill, a lapsed lease) before an item
    /// is dead-lettered with [`FailureKind::WorkerLost`](crate::FailureKind::WorkerLost).
    /// Default 3.
    pub fn max_deliveries(mut self, n: u32) -> Self {
        self.max_deliveries = n.max(1);
        self
    }
    /// How long an entry may go without a heartbeat before another worker reclaims it.
    /// Default 30 s.
    pub fn claim_idle(mut self, d: Duration) -> Self {
        self.claim_idle = d;
        self
    }
    /// How often a worker keeps the entries it runs (default: a third of `claim_idle`).
    pub fn heartbeat(mut self, d: Duration) -> Self {
        self.heartbeat = Some(d);
        self
    }
    /// Items sent and not yet finished, at most: the parent's backpressure. Default 1,000.
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.max(1);
        self
    }
    /// Items per stream entry, at most (results are batched per entry too). Default 64.
    pub fn batch(mut self, n: usize) -> Self {
        self.batch = n.max(1);
        self
    }
    /// Encoded bytes per stream entry, at most (one larger item still goes alone). Default
    /// 256 KiB.
    pub fn batch_bytes(mut self, n: usize) -> Self {
        self.batch_bytes = n.max(1);
        self
    }
    /// How long a partial entry waits for more items before it is sent. Default 1 ms; zero
    /// sends whatever is ready at once.
    pub fn linger(mut self, d: Duration) -> Self {
        self.linger = d;
        self
    }
    /// How each worker host runs the items (default `ipc_fork` with one worker per CPU: a
    /// crashing item then fails alone, as on one machine). An async stage needs one that
    /// runs async stages: `Exec::tasks(n)`, or `Exec::ipc_fork(k).tasks_per_worker(n)`.
    pub fn worker_exec(mut self, e: Exec) -> Self {
        self.worker_exec = Box::new(e);
        self
    }
    /// How long the parent waits for a first worker before the stage fails. Default 30 s.
    pub fn wait_for_workers(mut self, d: Duration) -> Self {
        self.wait_for_workers = d;
        self
    }
    /// Keep the run's keys for this long after the run instead of deleting them.
    pub fn keep_keys(mut self, d: Duration) -> Self {
        self.keep_keys = Some(d);
        self
    }
    /// Largest encoded item or result accepted, in bytes. Default 256 MiB.
    pub fn max_frame(mut self, bytes: usize) -> Self {
        self.max_frame = bytes;
        self
    }
    /// How long a worker stopped with SIGTERM may take to finish its running items before it
    /// releases the rest. Default 25 s.
    pub fn grace(mut self, d: Duration) -> Self {
        self.grace = d;
        self
    }
    /// How long the broker may be unreachable before the stage fails. Default 60 s.
    pub fn max_outage(mut self, d: Duration) -> Self {
        self.max_outage = d;
        self
    }
    /// Emit results in input order (default: as they come back). Results of a finished item
    /// wait in the parent for every earlier item to finish: at most `max_in_flight` items.
    pub fn ordered(mut self, on: bool) -> Self {
        self.ordered = on;
        self
    }
    /// A build id (a version or a commit hash) that parent and workers must share.
    pub fn build_id(mut self, id: impl Into<String>) -> Self {
        self.build_id = Some(id.into());
        self
    }

    /// The heartbeat interval in force.
    pub(crate) fn heartbeat_every(&self) -> Duration {
        self.heartbeat.unwrap_or(self.claim_idle / 3)
    }
}

impl fmt::Debug for Remote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Remote")
            .field("broker", &self.broker.name())
            .field("max_deliveries", &self.max_deliveries)
            .field("claim_idle", &self.claim_idle)
            .field("max_in_flight", &self.max_in_flight)
            .field("batch", &self.batch)
            .field("linger", &self.linger)
            .field("worker_exec", &self.worker_exec)
            .finish_non_exhaustive()
    }
}

impl PartialEq for Remote {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.broker, &other.broker)
            && self.max_deliveries == other.max_deliveries
            && self.claim_idle == other.claim_idle
            && self.heartbeat == other.heartbeat
            && self.max_in_flight == other.max_in_flight
            && self.batch == other.batch
            && self.batch_bytes == other.batch_bytes
            && self.linger == other.linger
            && self.worker_exec == other.worker_exec
            && self.wait_for_workers == other.wait_for_workers
            && self.keep_keys == other.keep_keys
            && self.max_frame == other.max_frame
            && self.grace == other.grace
            && self.max_outage == other.max_outage
            && self.build_id == other.build_id
            && self.ordered == other.ordered
    }
}

impl Eq for Remote {}

/// What parent and workers must agree on, as text and as a hash of it.
pub(crate) fn fingerprint(
    pipeline: &str,
    stage: &str,
    input: &str,
    output: &str,
    codec: &str,
    build_id: Option<&str>,
) -> (String, String) {
    let text = format!(
        "pipeline {pipeline:?}, stage {stage:?}, {input} -> {output}, codec {codec}, \
         wire version {WIRE_VERSION}, build {:?}",
        build_id.unwrap_or("")
    );
    // FNV-1a, 64 bits: stable across builds and platforms (std's hashers are not).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (format!("{h:016x}"), text)
}
