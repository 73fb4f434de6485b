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
//! | [`Exec::CowFork`] with [`Exec::fork_server`] | `fork::cow`, `fork::server` | the same, forked by a single-threaded fork server made at run start | input and output |
//! | [`Exec::IpcFork`] | `fork::ipc` | `n` persistent forked workers fed over pipes | input and output |
//! | [`Exec::Remote`] | [`crate::remote`] | worker processes on other machines, through a broker | input and output |
//! | `Exec::Tasks` (feature `async`) | `tasks` | async stages: at most `n` futures in flight on a tokio runtime | no |
//! | [`Exec::IpcFork`] with `Exec::tasks_per_worker` (feature `async`) | `fork::ipc`, `fork::child_async` | async stages: `n` futures in each of the persistent forked workers, each on a runtime of its own | input and output |
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
#[cfg(feature = "async")]
pub(crate) mod tasks;

use crate::huge::HugePages;
use crate::remote::Remote;
use std::time::Duration;

#[cfg(feature = "async")]
pub use tasks::{RuntimeHandle, TaskOptions};

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
    /// 1 = strict request/response. With `in_flight_auto` (the default), the most the
    /// executor chooses; default 4096.
    pub in_flight: usize,
    /// ipc_fork chooses how many items each worker holds from the measured item time: about
    /// [`Exec::IN_FLIGHT_AHEAD`] of work, at least 2, at most `in_flight` (see
    /// [`Exec::in_flight`]). On by default; `in_flight(n)` sets a fixed window.
    pub in_flight_auto: bool,
    /// Emit results in input order (default: as they complete).
    pub ordered: bool,
    /// How ipc_fork picks the worker for the next item.
    pub dispatch: Dispatch,
    /// Items handed to one forked child (cow_fork); 1 = one child per item. With
    /// `items_per_fork_auto`, the most a child is given.
    pub items_per_fork: usize,
    /// cow_fork chooses the items per child itself, from the measured fork cost and item
    /// time, up to `items_per_fork` (see [`Exec::items_per_fork_auto`]).
    pub items_per_fork_auto: bool,
    /// ipc_fork workers send results in batches (see [`Exec::batch_results`]; on by default).
    pub batch_results: bool,
    /// An ipc_fork worker is replaced after it was handed this many items (see
    /// [`Exec::max_items_per_worker`]; default: never).
    pub max_items_per_worker: Option<u64>,
    /// An ipc_fork worker is replaced once its resident memory passes this many bytes (see
    /// [`Exec::max_worker_rss`]; default: never).
    pub max_worker_rss: Option<u64>,
    /// cow_fork forks its children from a single-threaded fork server made when the run
    /// starts, not from the busy parent (see [`Exec::fork_server`]). Off by default.
    pub fork_server: bool,
    /// Huge pages for the parent's heap before the first fork (see [`Exec::huge_pages`];
    /// `None`: the pipeline's setting, else the executor's default).
    pub huge_pages: Option<HugePages>,
    /// ipc_fork of an async stage: how many of its items each worker runs at once, on a
    /// tokio runtime of its own (see `Exec::tasks_per_worker`, feature `async`).
    pub tasks_per_worker: Option<usize>,
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
    pub(crate) fn new(workers: usize) -> Self {
        ForkOptions {
            workers,
            timeout: None,
            max_frame: 256 << 20,
            in_flight: 4096,
            in_flight_auto: true,
            ordered: false,
            dispatch: Dispatch::RoundRobin,
            items_per_fork: 1,
            items_per_fork_auto: false,
            batch_results: true,
            max_items_per_worker: None,
            max_worker_rss: None,
            fork_server: false,
            huge_pages: None,
            tasks_per_worker: None,
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
    /// Async stages: at most `in_flight` futures at once on a tokio runtime (see
    /// [`Exec::tasks`]).
    #[cfg(feature = "async")]
    Tasks(TaskOptions),
    /// An option set on an executor it does not apply to (`Exec::threads(2).timeout(d)`),
    /// kept so that `build()` reports it as a definition error naming the stage.
    #[doc(hidden)]
    Misapplied {
        /// The executor, with the options that did apply.
        base: Box<Exec>,
        /// The first option that did not.
        option: Opt,
    },
}

/// An executor option: its name and the executors it applies to.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opt {
    pub(crate) name: &'static str,
    cow: bool,
    ipc: bool,
    pub(crate) tasks: bool,
}

impl Opt {
    pub(crate) const fn new(name: &'static str, cow: bool, ipc: bool) -> Self {
        Opt {
            name,
            cow,
            ipc,
            tasks: false,
        }
    }
    /// The option also applies to `tasks(n)` (which exists with the feature `async`).
    pub(crate) const fn and_tasks(self) -> Self {
        Opt {
            tasks: cfg!(feature = "async"),
            ..self
        }
    }
    const TIMEOUT: Opt = Opt::new("timeout", true, true).and_tasks();
    const MAX_FRAME: Opt = Opt::new("max_frame", true, true);
    const ORDERED: Opt = Opt::new("ordered", true, true).and_tasks();
    const ITEMS_PER_FORK: Opt = Opt::new("items_per_fork", true, false);
    const IN_FLIGHT: Opt = Opt::new("in_flight", false, true);
    const BATCH_RESULTS: Opt = Opt::new("batch_results", false, true);
    const DISPATCH: Opt = Opt::new("dispatch", false, true);
    const MAX_ITEMS_PER_WORKER: Opt = Opt::new("max_items_per_worker", false, true);
    const MAX_WORKER_RSS: Opt = Opt::new("max_worker_rss", false, true);
    const FORK_SERVER: Opt = Opt::new("fork_server", true, false);
    const HUGE_PAGES: Opt = Opt::new("huge_pages", true, true);
    #[cfg(feature = "async")]
    const TASKS_PER_WORKER: Opt = Opt::new("tasks_per_worker", false, true);

    /// The executors the option applies to, for messages.
    pub(crate) fn applies_to(&self) -> &'static str {
        match (self.cow, self.ipc, self.tasks) {
            (true, true, true) => "cow_fork, ipc_fork and tasks",
            (true, true, false) => "cow_fork and ipc_fork",
            (true, false, _) => "cow_fork",
            (false, true, _) => "ipc_fork",
            (false, false, _) => "tasks",
        }
    }
}

impl Exec {
    /// On the stage's driver thread.
    ///
    /// As under the fork executors, an item's outputs count only if it succeeds: what an
    /// attempt emits, and what it routes with [`Output::to`](crate::Output::to), is held
    /// until the attempt returns `Ok`, and dropped if it returns an error or panics. So a
    /// retry never delivers an output twice, and a skipped or dead-lettered item delivers
    /// nothing. An item's outputs leave together when it ends (an item that emits many
    /// holds them all until then). A panic in the item's `Clone` (the error policy keeps
    /// the item for a retry or a dead letter) fails that item.
    pub fn inline() -> Self {
        Exec::Inline
    }
    /// `n` threads, each with its own stage instance. An item's outputs count only if it
    /// succeeds, as under [`Exec::inline`].
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
    ///
    /// An item's outputs count only if it succeeds: the parent holds what a child sends for
    /// an item until the item's `done`, so an attempt that fails (an error, a panic, a
    /// crash, a kill, a timeout) delivers none of its outputs. A retried item delivers
    /// exactly what its successful attempt emitted, once; a skipped or dead-lettered item
    /// delivers nothing.
    pub fn cow_fork(n: usize) -> Self {
        Exec::CowFork(ForkOptions::new(n))
    }
    /// `n` persistent forked workers. For an async stage, add
    /// [`Exec::tasks_per_worker`]: each worker then runs that many of its futures at once.
    ///
    /// As under [`Exec::cow_fork`], an item's outputs count only if it succeeds: the parent
    /// holds what a worker sends for an item (its outputs and routed items) until the
    /// item's `done`, and drops them if the attempt fails (an error, a panic, a crash of the
    /// worker, a kill, a timeout, a broken stream). So a retry never delivers an output
    /// twice, and a skipped or dead-lettered item delivers nothing. An item that emits a
    /// great many outputs keeps them in the parent's memory until it ends.
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
    /// Per-item time limit (fork executors: the child is killed; `tasks` and an async
    /// ipc_fork stage: the item's future is dropped). Only the item that overran fails with
    /// `Timeout`: if the killed child or worker had started a later item (the overdue one
    /// answered before the kill landed), that item runs again, its attempt not counted,
    /// unless it had sent outputs. On another executor, `build()` fails with
    /// [`DefinitionError::OptionNotForExecutor`](crate::DefinitionError::OptionNotForExecutor)
    /// naming the stage; the same holds for every option below.
    pub fn timeout(self, t: Duration) -> Self {
        self.option(Opt::TIMEOUT, |o| o.timeout = Some(t))
    }
    /// Largest frame accepted on a pipe (fork executors).
    pub fn max_frame(self, bytes: usize) -> Self {
        self.option(Opt::MAX_FRAME, |o| o.max_frame = bytes)
    }
    /// Items a persistent worker may hold at once (ipc_fork), fixed; 1 is strict
    /// request/response. A worker also holds at most 1 MiB of items.
    ///
    /// Without it the executor chooses: each worker holds about [`Exec::IN_FLIGHT_AHEAD`]
    /// of work by the items' measured time (an average of their recent run times in the
    /// workers), at least 2 (one running, the next already in its pipe) and at most 4096.
    /// Tiny items then go in long runs per write and read, and slow items do not pile up
    /// behind one worker while another is idle at the end of the input. It starts at 2
    /// until the first item has been timed. An async stage's window follows
    /// [`Exec::tasks_per_worker`] instead (a fixed `in_flight` beside it is a definition
    /// error).
    pub fn in_flight(self, n: usize) -> Self {
        self.option(Opt::IN_FLIGHT, |o| {
            o.in_flight = n;
            o.in_flight_auto = false;
        })
    }

    /// The work an ipc_fork worker holds ahead when the executor chooses `in_flight`.
    pub const IN_FLIGHT_AHEAD: Duration = Duration::from_millis(2);
    /// Emit results in input order (fork executors and `tasks`). Results of a finished item wait for
    /// every earlier item to finish.
    pub fn ordered(self) -> Self {
        self.option(Opt::ORDERED, |o| o.ordered = true)
    }
    /// Up to `n` ready items per forked child (cow_fork): for cheap items, the fork's cost is
    /// shared. `after_fork` hooks and the stage instance are then per child, not per item.
    /// Default 1.
    pub fn items_per_fork(self, n: usize) -> Self {
        self.option(Opt::ITEMS_PER_FORK, |o| {
            o.items_per_fork = n.max(1);
            o.items_per_fork_auto = false;
        })
    }
    /// Lets cow_fork choose how many ready items each child gets, up to `max`: it measures
    /// what a fork costs (the fork, the child's start and exit) and how long items run, and
    /// gives a child enough items that the fork is about a tenth of its life. Expensive items
    /// still get a child each; cheap ones share one.
    ///
    /// Items that share a child share its stage instance, its `after_fork` hooks and its
    /// memory (an item sees what earlier items of its child wrote; the parent never does).
    /// When a child dies, the item it was running fails alone (with its crash kind) and the
    /// items after it run again in a new child, once, their attempt not counted. Ordering,
    /// timeouts and retries stay per item: if a child killed for one item's time limit had
    /// started the next one (the overdue item answered before the kill landed), that next
    /// item is not failed for it but runs again, unless it had sent outputs.
    pub fn items_per_fork_auto(self, max: usize) -> Self {
        self.option(Opt::ITEMS_PER_FORK, |o| {
            o.items_per_fork = max.max(1);
            o.items_per_fork_auto = true;
        })
    }
    /// Whether ipc_fork workers send the results of cheap items in batches (the default) or
    /// with one write per item. For streams of small items, batches give about twice the
    /// throughput; a result then waits at most about 3 ms longer.
    ///
    /// A batched worker keeps finished results in memory it shares with the parent, so a
    /// crash, a kill or a timeout still fails exactly the item that was running and no item
    /// runs twice; if stage code writes its own bytes into the result pipe, the items whose
    /// results were lost run again on workers that write per item. With `false`, a corrupt
    /// stream fails exactly the item whose code wrote into it. The protocol, with its
    /// invariants, is described in the repository's `crates/minigun/src/ipc/README.md`.
    pub fn batch_results(self, on: bool) -> Self {
        self.option(Opt::BATCH_RESULTS, |o| o.batch_results = on)
    }
    /// Replaces an ipc_fork worker after it was handed `n` items, for stage code that
    /// leaks: Python's `maxtasksperchild`. The worker is shut down as at the end of the
    /// input (it answers what it holds, runs `Stage::finish`, and exits) and a fresh one is
    /// forked in its place (`after_fork` and the stage factory run again). No item is lost or
    /// run twice; `ordered` and retries mean the same. The report counts the replaced
    /// workers ([`StageReport::recycled_workers`](crate::StageReport::recycled_workers)).
    ///
    /// ```
    /// use minigun::{Exec, Pipeline};
    /// let p = Pipeline::new("recycled");
    /// p.producer("gen", |out| out.emit_all(0..40u64).map_err(Into::into));
    /// p.map("work", |x: u64| Ok(x + 1))
    ///     .wire()
    ///     .executor(Exec::ipc_fork(2).max_items_per_worker(10));
    /// p.consumer("sink", |_: u64| Ok(()));
    /// let report = p.run().unwrap();
    /// # #[cfg(target_os = "linux")]
    /// // 40 items, 10 per worker: 4 workers replaced (3 if the last two share the last 10).
    /// assert!(report.stage("work").unwrap().recycled_workers >= 3);
    /// ```
    pub fn max_items_per_worker(self, n: u64) -> Self {
        self.option(Opt::MAX_ITEMS_PER_WORKER, |o| {
            o.max_items_per_worker = Some(n.max(1))
        })
    }
    /// Replaces an ipc_fork worker once its resident memory (RSS, read from `/proc` at most
    /// every millisecond, after it finishes an item) passes `bytes`; otherwise as
    /// [`Exec::max_items_per_worker`]. The items already handed to the worker (up to
    /// `in_flight`) still run there: with a small `in_flight` it is replaced sooner.
    pub fn max_worker_rss(self, bytes: u64) -> Self {
        self.option(Opt::MAX_WORKER_RSS, |o| o.max_worker_rss = Some(bytes))
    }
    /// cow_fork forks its children from a **fork server**: one
    /// single-threaded process, forked from the parent once when the run starts (right
    /// after the stage's `before_fork` hooks, before any stage runs), which forks a child per
    /// item (or per `items_per_fork` items) when the parent sends it the item.
    ///
    /// A fork from a busy multi-threaded parent costs its other threads copy-on-write faults
    /// and TLB-flush interrupts, and a child can inherit a lock another parent thread held;
    /// the server has one thread and does nothing else, so its forks are cheaper and never
    /// inherit such a lock. In exchange:
    ///
    /// - **the input item crosses a pipe**: the stage's input type must be `Serialize +
    ///   Deserialize` (declare it with [`StageRef::wire`](crate::StageRef::wire) or
    ///   [`StageRef::codec`](crate::StageRef::codec)); a stage set to it explicitly without
    ///   that is refused when the pipeline is built (a definition error naming the stage);
    /// - **children see the parent's memory as it was when the run started**: data the parent
    ///   builds or changes after that (in a producer, another stage, another thread) is not
    ///   visible to them. Build what the stage reads before calling `run`.
    ///
    /// Everything else is as without it: one child per item (or per `items_per_fork`, also
    /// automatic), `timeout` kills the child, `ordered`, retries and dead letters by the
    /// stage's policy, the same failure kinds for a crash, an exit code or a broken stream,
    /// `tracing` records from children, and the report's children and pids. `before_fork`
    /// hooks run once in the parent, before the server is made; `after_fork` hooks run in
    /// every child, before its items; the `pthread_atfork` handlers of C libraries run once,
    /// when the server is forked, not again for each child (it forks them with glibc's
    /// `_Fork` and runs no code of yours in between, so each child starts from the state
    /// those handlers left). `huge_pages` collapses the parent's heap before the
    /// server is forked, so the server's children are forked from huge pages. If the server dies, the items it had not forked fail,
    /// the children it had forked die with it (their running item fails, as killed by
    /// SIGKILL), and the stage fails, which ends the run.
    ///
    /// ```
    /// use minigun::{Exec, Pipeline};
    /// let p = Pipeline::new("served");
    /// p.producer("gen", |out| out.emit_all(0..4u64).map_err(Into::into));
    /// p.map("double", |x: u64| Ok(x * 2))
    ///     .wire()
    ///     .executor(Exec::cow_fork(2).fork_server());
    /// p.consumer("sink", |_: u64| Ok(()));
    /// # #[cfg(target_os = "linux")]
    /// assert_eq!(p.run().unwrap().stage("double").unwrap().items_out, 4);
    /// ```
    pub fn fork_server(self) -> Self {
        self.option(Opt::FORK_SERVER, |o| o.fork_server = true)
    }
    /// Whether this fork stage puts the parent's populated heap into transparent huge pages
    /// before it first forks (fork executors). Overrides
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
    pub fn huge_pages(self, setting: HugePages) -> Self {
        self.option(Opt::HUGE_PAGES, |o| o.huge_pages = Some(setting))
    }
    /// How ipc_fork picks a worker for each item.
    pub fn dispatch(self, d: Dispatch) -> Self {
        self.option(Opt::DISPATCH, |o| o.dispatch = d)
    }
    /// An async stage ([`Pipeline::map_async`](crate::Pipeline::map_async) and its siblings)
    /// under ipc_fork: each worker process runs up to `n` of the stage's items at once, on a
    /// tokio runtime it builds after the fork (current-thread; never one inherited from the
    /// parent). `ipc_fork(k).tasks_per_worker(n)` has up to `k * n` items in flight, with the
    /// crash isolation of ipc_fork.
    ///
    /// - The stage instance is made in each worker, after its `after_fork` hooks, inside its
    ///   runtime; `finish` runs in each worker at the end of the input.
    /// - The parent keeps `n` items in each worker plus a few waiting in its pipe (a quarter
    ///   of `n`, 1 to 256), at most 1 MiB of items per worker or 8 KiB per item held, if
    ///   that is more; `in_flight` does not apply. Each item is answered as it ends, in any
    ///   order; with `ordered()` its results still leave in input order. What ended during
    ///   one wake-up of the worker's runtime leaves in one write (`batch_results` has no
    ///   effect here: there is no results log).
    /// - `timeout` is per item, inside the worker: the item's future is dropped and the item
    ///   fails with [`FailureKind::Timeout`](crate::FailureKind::Timeout), the worker lives
    ///   on. A worker that answers nothing for `timeout` plus one second while it holds
    ///   items (a future blocks its thread) is killed, and the items it had started fail
    ///   with `Timeout`.
    /// - A panic in a future fails that item with the panic's message; retries, dead letters
    ///   and `fail_fast` are the stage's policy, decided in the parent as for every executor.
    /// - A worker that crashes (a signal, an abort, the OOM killer) fails every item it had
    ///   started and not answered, each with the crash's kind; the items it had been sent but
    ///   not started run again on a live worker, once, their attempt not counted.
    ///
    /// On a sync stage, a `tasks_per_worker` of its own is a definition error; an inherited
    /// one does not apply. An async stage given `ipc_fork(k)` of its own without it is a
    /// definition error too. A remote async stage can run under it on each worker host
    /// ([`Remote::worker_exec`](crate::remote::Remote::worker_exec)).
    ///
    /// ```
    /// use minigun::{Exec, Pipeline};
    /// use std::time::Duration;
    /// let p = Pipeline::new("crawl");
    /// p.producer("urls", |out| out.emit_all(0..200u64).map_err(Into::into));
    /// p.map_async("fetch", |id: u64| async move {
    ///     tokio::time::sleep(Duration::from_millis(5)).await;
    ///     Ok(id)
    /// })
    /// .wire()
    /// .executor(Exec::ipc_fork(2).tasks_per_worker(50).timeout(Duration::from_secs(5)));
    /// p.consumer("store", |_: u64| Ok(()));
    /// assert_eq!(p.run().unwrap().stage("store").unwrap().items_in, 200);
    /// ```
    #[cfg(feature = "async")]
    pub fn tasks_per_worker(self, n: usize) -> Self {
        self.option(Opt::TASKS_PER_WORKER, |o| o.tasks_per_worker = Some(n))
    }
    /// Sets a fork option where it applies; elsewhere keeps it as misapplied, for the planner
    /// to report (the first misapplied option is the one reported).
    fn option(self, opt: Opt, set: impl FnOnce(&mut ForkOptions)) -> Self {
        self.apply(opt, |e| match e {
            Exec::CowFork(mut o) if opt.cow => {
                set(&mut o);
                (Exec::CowFork(o), true)
            }
            Exec::IpcFork(mut o) if opt.ipc => {
                set(&mut o);
                (Exec::IpcFork(o), true)
            }
            #[cfg(feature = "async")]
            Exec::Tasks(mut o) if opt.tasks => {
                o.set_fork_option(set);
                (Exec::Tasks(o), true)
            }
            other => (other, false),
        })
    }
    /// Sets `opt` with `set`, which gives the executor back and whether `opt` applied to it;
    /// where it did not, `opt` is kept as misapplied (a misapplied executor keeps its first
    /// one and takes the setting on its base).
    pub(crate) fn apply(self, opt: Opt, set: impl FnOnce(Exec) -> (Exec, bool)) -> Self {
        match self {
            Exec::Misapplied { base, option } => Exec::Misapplied {
                base: Box::new(base.apply(opt, set).without_misapplied()),
                option,
            },
            e => match set(e) {
                (e, true) => e,
                (other, false) => Exec::Misapplied {
                    base: Box::new(other),
                    option: opt,
                },
            },
        }
    }
    /// The executor with its misapplied options dropped.
    pub(crate) fn without_misapplied(self) -> Self {
        match self {
            Exec::Misapplied { base, .. } => *base,
            other => other,
        }
    }
    /// The options of a fork executor.
    pub(crate) fn fork_options(&self) -> Option<&ForkOptions> {
        match self {
            Exec::CowFork(o) | Exec::IpcFork(o) => Some(o),
            _ => None,
        }
    }
    /// The most items in flight at once, for an executor with such a limit (`tasks(n)`,
    /// and ipc_fork with `tasks_per_worker`).
    pub(crate) fn in_flight_limit(&self) -> Option<usize> {
        match self {
            #[cfg(feature = "async")]
            Exec::Tasks(o) => Some(o.in_flight),
            Exec::IpcFork(o) => o.tasks_per_worker.map(|n| n * o.workers),
            _ => None,
        }
    }
    /// Whether this executor runs async stages (`tasks(n)`, or ipc_fork with
    /// `tasks_per_worker`).
    pub(crate) fn runs_async(&self) -> bool {
        match self {
            #[cfg(feature = "async")]
            Exec::Tasks(_) => true,
            Exec::IpcFork(o) => o.tasks_per_worker.is_some(),
            _ => false,
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
            Exec::IpcFork(o) => o.workers * o.tasks_per_worker.unwrap_or(1),
            Exec::CowFork(o) => o.workers,
            Exec::Remote(r) => r.max_in_flight,
            #[cfg(feature = "async")]
            Exec::Tasks(o) => o.in_flight,
            Exec::Misapplied { base, .. } => base.concurrency(),
        }
    }
}

impl std::fmt::Display for Exec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exec::Inline => f.write_str("inline"),
            Exec::Threads(n) => write!(f, "threads({n})"),
            Exec::CowFork(o) if o.fork_server => write!(f, "cow_fork({}) fork_server", o.workers),
            Exec::CowFork(o) => write!(f, "cow_fork({})", o.workers),
            Exec::IpcFork(o) => match o.tasks_per_worker {
                Some(n) => write!(f, "ipc_fork({}) tasks_per_worker({n})", o.workers),
                None => write!(f, "ipc_fork({})", o.workers),
            },
            Exec::Remote(r) => write!(f, "remote({})", r.broker.name()),
            #[cfg(feature = "async")]
            Exec::Tasks(o) => write!(f, "tasks({})", o.in_flight),
            Exec::Misapplied { base, .. } => base.fmt(f),
        }
    }
}
