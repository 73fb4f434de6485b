//! The parent side of a remote stage: what runs in place of a local executor.
//!
//! ```text
//!  stage queue ─> sender (driver thread): index, batch into entries, wait for credit ─> broker :in
//!  downstream <─ collector thread: dedup by index, failures to the policy <─ broker :out
//! ```
//!
//! - The **sender** gives each item its index, packs items into entries (at most `batch`
//!   items or `batch_bytes`, sent after `linger`), and keeps at most `max_in_flight` items
//!   sent and not finished: past that it stops taking from the stage queue, so backpressure
//!   reaches the producer exactly as with a full local queue.
//! - The **collector** is the only reader of the out stream. It takes the **first** terminal
//!   result of each index (`done` or `error`) with the outputs before it, and drops later
//!   duplicates (a redelivered item that ran twice). Final failures go to the stage's policy
//!   (retries already happened on the worker): skip, dead-letter (the parent kept the item),
//!   or fail fast.
//! - Every entry stays in the parent's book until all its items are finished, so a server
//!   that lost entries (restart without persistence) gets them again: when the server's id
//!   changes, the parent announces the run again and re-sends every entry the server no
//!   longer has (reconciliation; an entry re-sent twice is deduplicated like any duplicate).
//! - When the input has ended and every index is finished, the run goes to `Finishing`
//!   (and the workers waiting for entries are woken, [`Session::wake`], to see it now):
//!   each registered worker runs `finish` on its stage instances and reports; a worker whose
//!   heartbeat lapses first is a stage error naming it. Then the run's keys are removed.
//! - Broker errors are retried with capped backoff; the stage fails only after `max_outage`
//!   without an answer. No item is counted failed for an outage.

mod collector;
mod sender;

use super::broker::*;
use super::options::{fingerprint, Remote};
use crate::ctx::StageCtx;
use crate::error::FailureKind;
use crate::exec::order::Release;
use crate::exec::parts::{drain, Parts};
use crate::exec::runner::PreparedRun;
use crate::ipc::codec::Codec;
use crate::report::RemoteReport;
use crate::stage::Wire;
use collector::Collector;
use sender::Sender;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::BuildHasherDefault;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a blocking read of the out stream waits before the collector looks around.
pub(super) const READ_BLOCK: Duration = Duration::from_millis(200);
/// How often the collector checks the server's identity and the worker table.
pub(super) const LOOK_EVERY: Duration = Duration::from_millis(500);
/// Longest wait between two attempts of a failed broker call.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Starts a remote stage's parent side (run on the stage's driver thread).
/// (The stage's factory `F`, sync or async, runs on the workers, never here.)
pub(crate) fn start<I: Wire, O: Wire, C: Codec, F: Send + 'static>(
    parts: Parts<I, O, F>,
    remote: Remote,
) -> PreparedRun {
    Box::new(move || run::<I, O, C, F>(parts, remote))
}

/// Hashes an item index by one multiplication (Fibonacci hashing) instead of SipHash: the
/// parent hashes every item's index several times, and the indexes are its own.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct IndexHasher(u64);

impl std::hash::Hasher for IndexHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// A set of item indexes.
pub(super) type IndexSet = HashSet<u64, BuildHasherDefault<IndexHasher>>;
/// A map by item index.
pub(super) type IndexMap<V> = HashMap<u64, V, BuildHasherDefault<IndexHasher>>;

/// What sender and collector share.
pub(super) struct Book<I> {
    /// Items sent and not finished.
    pub(super) in_flight: usize,
    /// Indexes sent and not finished.
    pub(super) open: IndexSet,
    /// Entries not finished, by first index: what a reconciliation re-sends, with the
    /// items left and when it was sent.
    pub(super) entries: BTreeMap<u64, Open>,
    /// Entries sent.
    pub(super) sent: u64,
    /// Items kept for the dead-letter stage.
    pub(super) kept: IndexMap<I>,
    /// Items that could not be sent (they failed in the sender), until the collector has
    /// released the items after them in input order.
    pub(super) unsent: Vec<u64>,
    /// Every item was sent: the stage has this many.
    pub(super) total: Option<u64>,
    /// The collector stopped (the stage failed, or everything finished).
    pub(super) over: bool,
}

/// An entry not finished.
pub(super) struct Open {
    pub(super) entry: NewEntry,
    pub(super) left: u32,
    pub(super) sent: Instant,
}

pub(super) struct Shared<I> {
    pub(super) book: Mutex<Book<I>>,
    /// The collector finished items (credit for the sender), or the run is over.
    pub(super) changed: Condvar,
}

impl<I> Shared<I> {
    pub(super) fn lock(&self) -> MutexGuard<'_, Book<I>> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn run<I: Wire, O: Wire, C: Codec, F>(parts: Parts<I, O, F>, remote: Remote) {
    let ctx = parts.ctx.clone();
    let stage_run = StageRun {
        pipeline: ctx.run.pipeline.clone(),
        run: ctx.run.id.clone(),
        stage: ctx.name.clone(),
    };
    let (fp, fp_text) = fingerprint(
        &stage_run.pipeline,
        &stage_run.stage,
        std::any::type_name::<I>(),
        std::any::type_name::<O>(),
        std::any::type_name::<C>(),
        remote.build_id.as_deref(),
    );
    let announcement = Announcement {
        stage_run: stage_run.clone(),
        fingerprint: fp,
        fingerprint_text: fp_text,
        claim_idle: remote.claim_idle,
        max_deliveries: remote.max_deliveries,
    };
    let link = Link::new(&remote, &ctx, &announcement);
    let (mut sender, mut collector) = match (link.open(), link.open()) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return start_failed(&parts, &remote, e),
    };
    if let Err(e) = link.call(&mut sender, |s| s.announce(&announcement)) {
        return start_failed(&parts, &remote, e);
    }
    tracing::debug!(stage = %ctx.name, run = %stage_run, "remote stage announced");
    let shared = Arc::new(Shared {
        book: Mutex::new(Book {
            in_flight: 0,
            open: IndexSet::default(),
            entries: BTreeMap::new(),
            sent: 0,
            kept: IndexMap::default(),
            unsent: Vec::new(),
            total: None,
            over: false,
        }),
        changed: Condvar::new(),
    });
    let Parts {
        ctx: _,
        input,
        router,
        dead_letter: dl,
        factory,
        wire,
    } = parts;
    let sender_dl = dl.clone();
    std::thread::scope(|scope| {
        let c = Collector::<I, O, C> {
            ctx: &ctx,
            remote: &remote,
            link: &link,
            run: &stage_run,
            announcement: &announcement,
            shared: &shared,
            router: router.batched_until_flush(),
            dead_letter: dl,
            server: None,
            workers_seen: false,
            started: Instant::now(),
            report: RemoteReport {
                broker: remote.broker.name().to_string(),
                ..RemoteReport::default()
            },
            workers: BTreeMap::new(),
            round_trip: crate::stats::new_histogram(),
            release: Release::new(remote.ordered),
            _c: std::marker::PhantomData,
        };
        std::thread::Builder::new()
            .name(format!("{}:collect", ctx.name))
            .spawn_scoped(scope, move || c.run(&mut collector))
            .expect("spawn the remote collector");
        Sender::<I, C> {
            ctx: &ctx,
            remote: &remote,
            link: &link,
            run: &stage_run,
            shared: &shared,
            // Items are kept only for the dead-letter stage (retries happen on the worker).
            keep: sender_dl.is_some(),
            dead_letter: sender_dl,
            next: 0,
            _c: std::marker::PhantomData,
        }
        .run(&input, &mut sender);
    });
    drop((factory, wire));
    // Whatever is still queued (the run aborted) is cancelled.
    drain(&ctx, &input);
    let _ = link.call(&mut sender, |s| s.cleanup(&stage_run, remote.keep_keys));
}

/// Sends a finally failed item to the stage's dead-letter stage.
pub(super) use crate::exec::parts::dead_letter_to as send_dead_letter;

/// The stage cannot start: a clear stage failure; its queued items are cancelled.
fn start_failed<I, O, F>(parts: &Parts<I, O, F>, remote: &Remote, e: BrokerError) {
    let m = format!(
        "remote stage cannot reach its broker ({}): {e}",
        remote.broker.name()
    );
    parts.ctx.stage_failed(FailureKind::Start, m);
    drain(&parts.ctx, &parts.input);
}

/// Broker calls with the outage rule: transient errors are retried with capped backoff
/// until `max_outage` has passed without an answer.
/// A call that finds the run's keys gone (a server that restarted without them) announces
/// the run again and is made again; the collector re-sends what was lost.
pub(super) struct Link<'a> {
    remote: &'a Remote,
    ctx: &'a StageCtx,
    announcement: &'a Announcement,
    /// Time spent waiting for the broker to answer again, in ns.
    outage_ns: std::sync::atomic::AtomicU64,
}

impl<'a> Link<'a> {
    fn new(remote: &'a Remote, ctx: &'a StageCtx, announcement: &'a Announcement) -> Self {
        Link {
            remote,
            ctx,
            announcement,
            outage_ns: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Time spent waiting for the broker to answer again.
    pub(super) fn outage(&self) -> Duration {
        Duration::from_nanos(self.outage_ns.load(Ordering::Relaxed))
    }

    fn open(&self) -> BrokerResult<Box<dyn Session>> {
        self.retrying(|| self.remote.broker.session())
    }

    /// Calls `f` on `session`, reopening the session and retrying after transient errors.
    pub(super) fn call<T>(
        &self,
        session: &mut Box<dyn Session>,
        mut f: impl FnMut(&mut dyn Session) -> BrokerResult<T>,
    ) -> BrokerResult<T> {
        self.retrying(|| match f(&mut **session) {
            Err(BrokerError::Unavailable(m)) => {
                if let Ok(s) = self.remote.broker.session() {
                    *session = s;
                }
                Err(BrokerError::Unavailable(m))
            }
            Err(BrokerError::NoRun) => {
                tracing::warn!(stage = %self.ctx.name, "the broker lost the run: announcing it again");
                session.announce(self.announcement)?;
                Err(BrokerError::Unavailable("the run was announced again".into()))
            }
            r => r,
        })
    }

    fn retrying<T>(&self, mut f: impl FnMut() -> BrokerResult<T>) -> BrokerResult<T> {
        let since = Instant::now();
        let mut wait = Duration::from_millis(10);
        loop {
            match f() {
                Err(BrokerError::Unavailable(m))
                    if since.elapsed() < self.remote.max_outage && !self.ctx.run.aborting() =>
                {
                    tracing::debug!(stage = %self.ctx.name, error = %m, "broker unavailable; retrying");
                    std::thread::sleep(wait);
                    self.outage_ns
                        .fetch_add(wait.as_nanos() as u64, Ordering::Relaxed);
                    wait = (wait * 2).min(MAX_BACKOFF);
                }
                r => return r,
            }
        }
    }
}
