//! The contract between the remote executor and a message broker.
//!
//! A broker carries one run of one remote stage ([`StageRun`]) in three places: a **work
//! stream** of entries (each a batch of encoded items) read by the workers through one
//! consumer group, with a pending list that records which consumer holds which entry, since
//! when, and how often it was delivered; an **out stream** of result batches read only by the
//! parent; and a **dead-letter stream** kept for inspection. Besides these, the run has a
//! control state (read by workers) and a worker table (written by workers).
//!
//! The broker never looks inside a payload: items, results and failures are encoded by the
//! executor (see `remote::wire`). What the broker guarantees is the **ownership rule**, which
//! every conforming implementation must keep (the conformance suite checks it):
//!
//! - [`Session::commit_many`], [`Session::heartbeat`] and [`Session::split`] act only on entries
//!   the calling consumer still holds; otherwise they change nothing
//!   ([`Commit::LeaseLost`], an id left out, `false`). A commit publishes the results and
//!   removes the entry atomically.
//! - [`Session::claim`] takes only entries idle for at least `min_idle`, and counts a
//!   delivery; [`Session::dead_letter`] re-checks the idle time atomically with the move.
//! - [`Session::release`] makes entries claimable at once without counting a delivery.
//! - A delivered entry stays in its consumer's pending list until it is committed, split,
//!   dead-lettered or claimed by another: a reply lost on the way is found again by
//!   [`Session::fetch`] with `own: true`.
//!
//! Everything else (deduplication by item index, backpressure, retries of the broker's own
//! calls) is the executor's.

use std::fmt;
use std::time::Duration;

/// One run of one remote stage on a broker.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StageRun {
    /// The pipeline's name.
    pub pipeline: String,
    /// The run's id, unique per run of the pipeline.
    pub run: String,
    /// The stage's qualified name.
    pub stage: String,
}

impl fmt::Display for StageRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.pipeline, self.run, self.stage)
    }
}

/// What the parent publishes for a run of a remote stage. Workers serve it when their own
/// definition has the same `fingerprint`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    /// The run and stage.
    pub stage_run: StageRun,
    /// Hash of what both sides must agree on (names, types, codec, wire version, build id).
    pub fingerprint: String,
    /// Human-readable text of what the fingerprint covers, for a refusal message.
    pub fingerprint_text: String,
    /// Idle time after which an entry may be reclaimed.
    pub claim_idle: Duration,
    /// Deliveries after which an item is dead-lettered.
    pub max_deliveries: u32,
}

/// A broker-assigned entry id (opaque; ordered by the broker).
pub type EntryId = String;

/// A work entry to add: items `first..first + count`, encoded in `payload`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEntry {
    /// Index of the first item.
    pub first: u64,
    /// Number of items.
    pub count: u32,
    /// Deliveries already spent on these items (an entry split from a redelivered batch).
    pub attempts: u32,
    /// The encoded items.
    pub payload: Vec<u8>,
}

/// A work entry as a worker receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The entry's id.
    pub id: EntryId,
    /// What was added.
    pub entry: NewEntry,
    /// How often the entry has been delivered, this delivery included (1 the first time).
    pub deliveries: u32,
}

/// An entry in the work stream's pending list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// The entry's id.
    pub id: EntryId,
    /// The consumer holding it.
    pub owner: String,
    /// Time since it was delivered or last kept by a heartbeat.
    pub idle: Duration,
    /// How often it has been delivered.
    pub deliveries: u32,
    /// The entry itself (`None` if it no longer exists: it was removed while pending).
    pub entry: Option<NewEntry>,
}

/// What an entry of the out stream carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutKind {
    /// The results of one work entry (or a dead-lettered one's failures).
    Results,
    /// A worker's statistics.
    Stats,
    /// A worker finished the stage (its `finish` outputs, if any, in the payload).
    Finished,
}

/// An entry of the out stream, as the parent reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutEntry {
    /// The entry's id (to acknowledge it).
    pub id: EntryId,
    /// What it carries.
    pub kind: OutKind,
    /// The consumer that wrote it.
    pub consumer: String,
    /// The encoded content.
    pub payload: Vec<u8>,
}

/// The outcome of a [`Session::commit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    /// The results were published and the entry removed.
    Committed,
    /// The consumer no longer holds the entry: nothing was published.
    LeaseLost,
}

/// The state of a run, as the parent sets it and the workers read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Workers fetch and process entries.
    Running,
    /// Every item is done: workers finish their stage instances and report `Finished`.
    Finishing,
    /// The run was aborted: workers stop at once and leave their entries.
    Aborted,
}

/// A worker as it registers in a run's worker table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerInfo {
    /// The consumer name: unique per process incarnation, never reused.
    pub consumer: String,
    /// Host name.
    pub host: String,
    /// Process id.
    pub pid: u32,
    /// Items it runs at once.
    pub concurrency: u32,
    /// Time since its last heartbeat (on reading; zero when registering).
    pub since_heartbeat: Duration,
}

/// An error of the broker itself, never of an item.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// The broker cannot be reached, or a call timed out: worth retrying.
    #[error("broker unreachable: {0}")]
    Unavailable(String),
    /// The broker refused the credentials or the permission.
    #[error("broker refused access: {0}")]
    Auth(String),
    /// The broker is set up in a way the executor cannot work with (a clear fix in the text).
    #[error("broker not usable: {0}")]
    Unusable(String),
    /// The run's keys are gone (the server lost them): the parent recreates them.
    #[error("the run is unknown to the broker")]
    NoRun,
    /// Any other answer the executor did not expect.
    #[error("broker error: {0}")]
    Other(String),
}

impl BrokerError {
    /// Whether the call may succeed if made again (after a reconnect).
    pub fn is_transient(&self) -> bool {
        matches!(self, BrokerError::Unavailable(_) | BrokerError::NoRun)
    }
}

/// A broker result.
pub type BrokerResult<T> = Result<T, BrokerError>;

/// A message broker that can carry remote stages: a factory of [`Session`]s. One session is
/// one connection, used by one thread.
pub trait Broker: Send + Sync + fmt::Debug + 'static {
    /// The engine's name, shown in reports (`remote(redis)`).
    fn name(&self) -> &str;
    /// Opens a session (a connection).
    fn session(&self) -> BrokerResult<Box<dyn Session>>;
}

/// One connection to a broker. Every call either completes or fails as a whole, except
/// [`Session::send`]: a send that fails part way may have added some of its entries. The
/// executor sends them again, and keeps the first result of each item index, so an entry
/// added twice costs a second execution, never a second result.
pub trait Session: Send {
    // ----- the server

    /// An id of the server's incarnation: it changes when the server restarts (the parent
    /// then reconciles what may have been lost).
    fn server_id(&mut self) -> BrokerResult<String>;

    // ----- the parent

    /// Creates the run's streams (work stream with its consumer group from the first entry,
    /// out stream), sets the control state to `Running` and announces the run to workers.
    /// Creating what already exists is not an error (the parent calls it again after a
    /// server restart).
    fn announce(&mut self, a: &Announcement) -> BrokerResult<()>;
    /// Adds work entries, in order; returns their ids. A failure may leave some added.
    fn send(&mut self, run: &StageRun, entries: &[NewEntry]) -> BrokerResult<Vec<EntryId>>;
    /// Reads up to `max` entries of the out stream, waiting up to `block` for the first. With
    /// `own`, re-reads the entries delivered to the parent and not yet acknowledged instead.
    fn read_out(
        &mut self,
        run: &StageRun,
        max: usize,
        block: Duration,
        own: bool,
    ) -> BrokerResult<Vec<OutEntry>>;
    /// Acknowledges and removes out entries.
    fn ack_out(&mut self, run: &StageRun, ids: &[EntryId]) -> BrokerResult<()>;
    /// Sets the run's control state.
    fn set_control(&mut self, run: &StageRun, c: Control) -> BrokerResult<()>;
    /// The run's registered workers.
    fn workers(&mut self, run: &StageRun) -> BrokerResult<Vec<WorkerInfo>>;
    /// The `(first, count)` of every work entry still in the work stream (delivered or not).
    fn outstanding(&mut self, run: &StageRun) -> BrokerResult<Vec<(u64, u32)>>;
    /// Entries in the work stream and pending entries, for live views.
    fn depth(&mut self, run: &StageRun) -> BrokerResult<(u64, u64)>;
    /// Wakes up to `workers` workers blocked in [`Session::fetch`] so that they look at the
    /// control state now (the parent calls it after a change of state). A broker whose
    /// blocked reads end on time needs nothing here; one whose server ends them late (Redis
    /// checks block timeouts only on its timer, every 100 ms by default, when no client is
    /// busy) gives each worker a sign that a fetch consumes and never delivers.
    fn wake(&mut self, run: &StageRun, workers: usize) -> BrokerResult<()> {
        let _ = (run, workers);
        Ok(())
    }
    /// Removes the run's keys (`keep`: let them expire after that long instead).
    fn cleanup(&mut self, run: &StageRun, keep: Option<Duration>) -> BrokerResult<()>;

    // ----- the workers

    /// Announcements of `pipeline` after the cursor `after` (`None`: only those of runs still
    /// running), waiting up to `block` for one; each with its cursor.
    fn announcements(
        &mut self,
        pipeline: &str,
        after: Option<&str>,
        block: Duration,
    ) -> BrokerResult<Vec<(String, Announcement)>>;
    /// The run's control state (`None`: the run's keys are gone).
    fn control(&mut self, run: &StageRun) -> BrokerResult<Option<Control>>;
    /// Records (or refreshes) a worker in the run's worker table.
    fn register(&mut self, run: &StageRun, w: &WorkerInfo) -> BrokerResult<()>;
    /// Removes a worker from the run's worker table.
    fn unregister(&mut self, run: &StageRun, consumer: &str) -> BrokerResult<()>;
    /// Delivers up to `count` new entries to `consumer`, waiting up to `block` for one. With
    /// `own`, re-delivers the entries the consumer already holds instead (after an error).
    fn fetch(
        &mut self,
        run: &StageRun,
        consumer: &str,
        count: usize,
        block: Duration,
        own: bool,
    ) -> BrokerResult<Vec<Delivery>>;
    /// For each `(id, results)`: if `consumer` still holds entry `id`, publishes its results
    /// and removes the entry, atomically; one outcome per entry, in order. The results of
    /// several entries may be published together (the parent reads results by item index,
    /// not by entry), and a broker that can should do the whole call in one round trip.
    fn commit_many(
        &mut self,
        run: &StageRun,
        consumer: &str,
        done: &[(&EntryId, &[u8])],
    ) -> BrokerResult<Vec<Commit>>;
    /// [`Session::commit_many`] of one entry.
    fn commit(
        &mut self,
        run: &StageRun,
        consumer: &str,
        id: &EntryId,
        results: &[u8],
    ) -> BrokerResult<Commit> {
        let mut c = self.commit_many(run, consumer, &[(id, results)])?;
        Ok(c.pop().unwrap_or(Commit::LeaseLost))
    }
    /// Resets the idle time of the entries `consumer` still holds among `ids`; returns those.
    fn heartbeat(
        &mut self,
        run: &StageRun,
        consumer: &str,
        ids: &[EntryId],
    ) -> BrokerResult<Vec<EntryId>>;
    /// Up to `count` pending entries idle for at least `min_idle`, oldest first, each with
    /// its content (the reclaimer needs the item indexes of an entry it dead-letters).
    fn pending_idle(
        &mut self,
        run: &StageRun,
        min_idle: Duration,
        count: usize,
    ) -> BrokerResult<Vec<Pending>>;
    /// Takes the entries among `ids` that are still idle for at least `min_idle`, for
    /// `consumer`, counting one delivery each. Entries that no longer exist are dropped from
    /// the pending list.
    fn claim(
        &mut self,
        run: &StageRun,
        consumer: &str,
        min_idle: Duration,
        ids: &[EntryId],
    ) -> BrokerResult<Vec<Delivery>>;
    /// If entry `id` is still idle for at least `min_idle`: copies it to the dead-letter
    /// stream (with its delivery count and last owner), publishes `results` (its items'
    /// failures) and removes it, atomically. Whether it did.
    fn dead_letter(
        &mut self,
        run: &StageRun,
        id: &EntryId,
        min_idle: Duration,
        results: &[u8],
    ) -> BrokerResult<bool>;
    /// If `consumer` still holds entry `id`: adds `parts` in its place and removes it,
    /// atomically. Whether it did.
    fn split(
        &mut self,
        run: &StageRun,
        consumer: &str,
        id: &EntryId,
        parts: &[NewEntry],
    ) -> BrokerResult<bool>;
    /// Makes entries `consumer` holds claimable at once, without counting a delivery (each
    /// id with its current delivery count).
    fn release(
        &mut self,
        run: &StageRun,
        consumer: &str,
        ids: &[(EntryId, u32)],
        claim_idle: Duration,
    ) -> BrokerResult<()>;
    /// Publishes that `consumer` finished the stage, with its `finish` outputs; publishes
    /// once however often it is called.
    fn finished(&mut self, run: &StageRun, consumer: &str, outputs: &[u8]) -> BrokerResult<()>;
    /// Publishes a worker's statistics.
    fn stats(&mut self, run: &StageRun, consumer: &str, payload: &[u8]) -> BrokerResult<()>;
}
