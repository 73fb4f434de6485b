//! Executors: where a stage's items are processed.
//!
//! [`Exec`] is the public setting. Behind it, each processor stage gets one crate-private
//! [`Runner`](runner::Runner), decided once when the pipeline is built:
//!
//! 1. [`plan::precedence`]: which setting applies (stage > block or sub-pipeline > pipeline);
//! 2. [`plan::fit`]: what it becomes for this stage (producers and accumulators run inline; a
//!    fork executor needs the types to cross a process; fallbacks where fork is missing);
//! 3. [`runner::Runner::new`]: the planned executor with the stage's
//!    [`Crossing`](runner::Crossing) (the serde-bounded entry points its handle recorded);
//! 4. [`runner::Runner::prepare`] on the run's thread, then the result on the stage's thread.
//!
//! | flavour | module | where items run | crosses a process |
//! |---|---|---|---|
//! | [`Exec::Inline`] | [`local`] | the stage's driver thread, one item at a time | no |
//! | [`Exec::Threads`] | [`local`] | `n` threads pulling from the stage queue | no |
//! | [`Exec::CowFork`] | `fork::cow` | one forked child per item, at most `n` alive | output only |
//! | [`Exec::IpcFork`] | `fork::ipc` | `n` persistent forked workers fed over pipes | input and output |
//! | [`Exec::Remote`] | [`crate::remote`] | worker processes on other machines, through a broker | input and output |
//!
//! Every executor takes the same [`Parts`](parts::Parts) and hands failed attempts to the
//! stage's one policy ([`StageCtx::failure`](crate::ctx::StageCtx::failure)), so a stage
//! means the same under all of them.
//!
//! **Adding an executor** is one new module here and one arm in each step: a variant of
//! [`Exec`] (with its `Display` and `concurrency`), what it needs the types to cross in
//! `plan::fit`, and a [`Runner`](runner::Runner) arm that starts it in `prepare`.

#[cfg(target_os = "linux")]
pub(crate) mod fork;
pub(crate) mod local;
pub(crate) mod order;
pub(crate) mod parts;
pub(crate) mod plan;
pub(crate) mod runner;

use crate::huge::HugePages;
use crate::remote::Remote;
use std::time::Duration;

/// Options of the fork executors.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ForkOptions {
    /// Concurrent children (cow_fork) or persistent workers (ipc_fork).
    pub workers: usize,
    /// Per-item time limit; the child is killed (SIGTERM, then SIGKILL) when it passes.
    pub timeout: Option<Duration>,
    /// Largest frame accepted on a pipe, in bytes.
    pub max_frame: usize,
    /// Items a persistent worker may hold at once (ipc_fork; also at most 1 MiB of them);
    /// 1 = strict request/response. Default 256.
    pub in_flight: usize,
    /// Emit results in input order (default: as they complete).
    pub ordered: bool,
    /// How ipc_fork picks the worker for the next item.
    pub dispatch: Dispatch,
    /// Items handed to one forked child (cow_fork); 1 = one child per item.
    pub items_per_fork: usize,
    /// ipc_fork workers send results in batches (see [`Exec::batch_results`]; on by default).
    pub batch_results: bool,
    /// Huge pages for the parent's heap before the first fork (see [`Exec::huge_pages`];
    /// `None`: the pipeline's setting, else the executor's default).
    pub huge_pages: Option<HugePages>,
}

/// How ipc_fork hands items to its workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Dispatch {
    /// Each worker in turn (the founding document's behaviour).
    #[default]
    RoundRobin,
    /// The worker holding the fewest items: uneven item costs do not pile up behind a slow
    /// worker.
    LeastLoaded,
}

impl ForkOptions {
    fn new(workers: usize) -> Self {
        ForkOptions {
            workers,
            timeout: None,
            max_frame: 256 << 20,
            in_flight: 256,
            ordered: false,
            dispatch: Dispatch::RoundRobin,
            items_per_fork: 1,
            batch_results: true,
            huge_pages: None,
        }
    }
}

/// An execution strategy, set pipeline-wide, per group of stages, or per stage.
///
/// ```
/// use minigun::Exec;
/// use std::time::Duration;
/// let e = Exec::threads(8);
/// let f = Exec::cow_fork(4).timeout(Duration::from_secs(5));
/// # let _ = (e, f);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Exec {
    /// On the stage's own driver thread, one item at a time.
    #[default]
    Inline,
    /// `n` worker threads, `n` items in flight at once.
    Threads(usize),
    /// One forked child per item (copy-on-write input), at most `workers` alive.
    CowFork(ForkOptions),
    /// `workers` persistent forked workers fed over pipes.
    IpcFork(ForkOptions),
    /// Worker processes on any number of machines, fed through a message broker (see
    /// [`Exec::remote`]).
    Remote(Remote),
}

impl Exec {
    /// On the stage's driver thread.
    pub fn inline() -> Self {
        Exec::Inline
    }
    /// `n` threads.
    pub fn threads(n: usize) -> Self {
        Exec::Threads(n)
    }
    /// One forked child per item, at most `n` at once. The child reads the item and the
    /// parent's data through copy-on-write memory; only the output crosses a pipe.
    ///
    /// # Choosing it: what a fork costs
    ///
    /// A fork copies the parent's page tables, so its cost grows with the parent's resident
    /// memory: about 20 us per MiB in ordinary 4 KiB pages (measured on a 2-vCPU VM). A parent
    /// holding 1 GiB forks in about 20 ms, so fork-per-item tops out near 50 items/s
    /// whatever the work; in 2 MiB huge pages the same parent forks in about 0.5 ms.
    ///
    /// - **Huge pages for the parent's heap** (on by default above 256 MiB, see
    ///   [`Exec::huge_pages`]): before the first fork, the parent's populated heap (maps,
    ///   strings, structs: millions of small allocations) is collapsed into transparent huge
    ///   pages, once per run. In the benchmark's W4b (a `HashMap<String, u64>` of 10 M keys,
    ///   about 1 GiB, 1,000 lookups per item, `cow_fork(4)`) this took the stage from 10 to
    ///   261 items/s, for a one-off collapse of 7.7 s (on a busy machine; 0.77 s for 270 MiB,
    ///   where it went from 45 to 430 items/s): the collapse pays back after about 30 to 80
    ///   items; for a stage with fewer items, switch it off. Data the parent writes afterwards
    ///   goes back to 4 KiB pages, page by page, while a child shares it.
    /// - **One large buffer**: build it in a [`HugeBuf`](crate::HugeBuf) (typed, huge pages
    ///   from the start, no collapse needed).
    /// - **Cheap items**: [`Exec::items_per_fork`] shares one fork among several items.
    /// - **Many cheap lookups into big data**: [`Exec::ipc_fork`] workers also see the data
    ///   the parent built before the run through copy-on-write, and are forked once, not per
    ///   item; the input must then be serialisable.
    /// - **No isolation needed**: if the data is `Send + Sync` and a crash need not be
    ///   contained, [`Exec::threads`] is simply faster: no fork at all (a 179 MiB map read
    ///   by 4 threads: about 10,000 items/s, against about 300 for `cow_fork(4)` at 4 KiB
    ///   pages).
    ///
    /// Choose cow_fork for crash isolation per item, for inputs that cannot be serialised,
    /// or for code that must not share the parent's threads or state.
    pub fn cow_fork(n: usize) -> Self {
        Exec::CowFork(ForkOptions::new(n))
    }
    /// `n` persistent forked workers.
    pub fn ipc_fork(n: usize) -> Self {
        Exec::IpcFork(ForkOptions::new(n))
    }
    /// Worker processes on any number of machines, fed through the broker of `remote`. The
    /// workers are this same program, started as workers (see
    /// [`serve_if_worker`](crate::remote::serve_if_worker)); each runs the items under
    /// [`Remote::worker_exec`]. Processors only, with serialisable input and output.
    pub fn remote(remote: Remote) -> Self {
        Exec::Remote(remote)
    }
    /// Per-item time limit (fork executors; ignored by the others).
    pub fn timeout(mut self, t: Duration) -> Self {
        if let Some(o) = self.fork_options_mut() {
            o.timeout = Some(t);
        }
        self
    }
    /// Largest frame accepted on a pipe (fork executors; ignored by the others).
    pub fn max_frame(mut self, bytes: usize) -> Self {
        if let Some(o) = self.fork_options_mut() {
            o.max_frame = bytes;
        }
        self
    }
    /// Items a persistent worker may hold at once (ipc_fork; ignored by the others).
    pub fn in_flight(mut self, n: usize) -> Self {
        if let Some(o) = self.fork_options_mut() {
            o.in_flight = n;
        }
        self
    }
    /// Emit results in input order (fork executors; ignored by the others). Results of a
    /// finished item wait for every earlier item to finish.
    pub fn ordered(mut self) -> Self {
        if let Some(o) = self.fork_options_mut() {
            o.ordered = true;
        }
        self
    }
    /// Up to `n` ready items per forked child (cow_fork; ignored by the others): for cheap
    /// items, the fork's cost is shared. `after_fork` hooks and the stage instance are then
    /// per child, not per item. Default 1.
    pub fn items_per_fork(mut self, n: usize) -> Self {
        if let Some(o) = self.fork_options_mut() {
            o.items_per_fork = n.max(1);
        }
        self
    }
    /// Whether ipc_fork workers send the results of cheap items in batches (the default) or
    /// with one write per item (ignored by the others). For streams of small items, batches
    /// give about twice the throughput; a result then waits at most about 3 ms longer.
    ///
    /// A batched worker keeps finished results in memory it shares with the parent, so a
    /// crash, a kill or a timeout still fails exactly the item that was running and no item
    /// runs twice; if stage code writes its own bytes into the result pipe, the items whose
    /// results were lost run again on workers that write per item. With `false`, a corrupt
    /// stream fails exactly the item whose code wrote into it. The protocol, with its
    /// invariants, is described in the repository's `crates/minigun/src/ipc/README.md`.
    pub fn batch_results(mut self, on: bool) -> Self {
        if let Some(o) = self.fork_options_mut() {
            o.batch_results = on;
        }
        self
    }
    /// Whether this fork stage puts the parent's populated heap into transparent huge pages
    /// before it first forks (fork executors; ignored by the others). Overrides
    /// [`Pipeline::huge_pages`](crate::Pipeline::huge_pages). Defaults:
    /// [`HugePages::COW_DEFAULT`] (above 256 MiB) for cow_fork, [`HugePages::IPC_DEFAULT`]
    /// (off) for ipc_fork. At most once per run; see [`HugePages`] and the run report's
    /// [`huge_pages`](crate::RunReport::huge_pages).
    ///
    /// ```
    /// use minigun::{Exec, HugePages};
    /// let e = Exec::cow_fork(4).huge_pages(HugePages::Off);
    /// # let _ = e;
    /// ```
    pub fn huge_pages(mut self, setting: HugePages) -> Self {
        if let Some(o) = self.fork_options_mut() {
            o.huge_pages = Some(setting);
        }
        self
    }
    /// How ipc_fork picks a worker for each item (ignored by the others).
    pub fn dispatch(mut self, d: Dispatch) -> Self {
        if let Some(o) = self.fork_options_mut() {
            o.dispatch = d;
        }
        self
    }
    /// The options of a fork executor.
    pub(crate) fn fork_options(&self) -> Option<&ForkOptions> {
        match self {
            Exec::CowFork(o) | Exec::IpcFork(o) => Some(o),
            _ => None,
        }
    }
    fn fork_options_mut(&mut self) -> Option<&mut ForkOptions> {
        match self {
            Exec::CowFork(o) | Exec::IpcFork(o) => Some(o),
            _ => None,
        }
    }
    pub(crate) fn is_fork(&self) -> bool {
        matches!(self, Exec::CowFork(_) | Exec::IpcFork(_))
    }
    /// How many items this executor processes at once.
    pub fn concurrency(&self) -> usize {
        match self {
            Exec::Inline => 1,
            Exec::Threads(n) => *n,
            Exec::CowFork(o) | Exec::IpcFork(o) => o.workers,
            Exec::Remote(r) => r.max_in_flight,
        }
    }
}

impl std::fmt::Display for Exec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exec::Inline => f.write_str("inline"),
            Exec::Threads(n) => write!(f, "threads({n})"),
            Exec::CowFork(o) => write!(f, "cow_fork({})", o.workers),
            Exec::IpcFork(o) => write!(f, "ipc_fork({})", o.workers),
            Exec::Remote(r) => write!(f, "remote({})", r.broker.name()),
        }
    }
}
