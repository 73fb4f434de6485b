//! [`ForkRef`]: the handle [`StageRef::cow_fork`] and [`StageRef::ipc_fork`] return, on which
//! the options of that fork executor are set. Each executor's handle has exactly its options,
//! so an option that cannot apply (`items_per_fork` on ipc_fork, `in_flight` on cow_fork) does
//! not compile; the serde bounds were checked when the handle was made.

use super::record::ExecChoice;
use super::StageRef;
use crate::error::DefinitionError;
use crate::exec::{Dispatch, Exec};
use std::marker::PhantomData;
use std::ops::Deref;
use std::time::Duration;

/// Marks a [`ForkRef`] of a stage under cow_fork (see [`StageRef::cow_fork`]).
#[derive(Debug)]
pub enum CowFork {}

/// Marks a [`ForkRef`] of a stage under ipc_fork (see [`StageRef::ipc_fork`]).
#[derive(Debug)]
pub enum IpcFork {}

/// The fork executors a [`ForkRef`] can stand for.
pub trait ForkKind: sealed::Sealed {
    /// The executor's name, for messages.
    const NAME: &'static str;
    /// Whether `exec` is this fork executor.
    fn is(exec: &Exec) -> bool;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::CowFork {}
    impl Sealed for super::IpcFork {}
}

impl ForkKind for CowFork {
    const NAME: &'static str = "cow_fork";
    fn is(exec: &Exec) -> bool {
        matches!(exec, Exec::CowFork(_))
    }
}

impl ForkKind for IpcFork {
    const NAME: &'static str = "ipc_fork";
    fn is(exec: &Exec) -> bool {
        matches!(exec, Exec::IpcFork(_))
    }
}

/// A stage handle under a fork executor `K` ([`CowFork`] or [`IpcFork`]), with that
/// executor's options. It dereferences to the stage's [`StageRef`], for wiring and every
/// other setting:
///
/// ```
/// use minigun::Pipeline;
/// use std::time::Duration;
/// let p = Pipeline::new("isolated");
/// p.producer("gen", |out| out.emit_all(0..4u64).map_err(Into::into));
/// let parse = p
///     .map("parse", |x: u64| Ok(x + 1))
///     .ipc_fork(2)
///     .timeout(Duration::from_secs(5))
///     .ordered();
/// p.consumer("store", |_: u64| Ok(())).from(&parse);
/// assert_eq!(p.run().unwrap().stage("store").unwrap().items_in, 4);
/// ```
///
/// An option of the other fork executor does not compile:
///
/// ```compile_fail
/// # use minigun::Pipeline;
/// let p = Pipeline::new("typed-options");
/// p.producer("gen", |out| out.emit_all(0..4u64).map_err(Into::into));
/// p.map("parse", |x: u64| Ok(x + 1)).ipc_fork(2).items_per_fork(8);
/// ```
///
/// Nor does a fork executor the stage's types do not allow: cow_fork needs a serialisable
/// output, ipc_fork a serialisable input too.
///
/// ```compile_fail
/// # use minigun::Pipeline;
/// #[derive(Clone)]
/// struct Table(u64); // no serde
/// let p = Pipeline::new("typed-executors");
/// p.producer("gen", |out| out.emit(Table(1)).map_err(Into::into));
/// p.map("look", |t: Table| Ok(t.0)).ipc_fork(2); // cow_fork(2) compiles
/// ```
///
/// ```compile_fail
/// # use minigun::Pipeline;
/// #[derive(Clone)]
/// struct Table(u64); // no serde
/// let p = Pipeline::new("typed-executors");
/// p.producer("gen", |out| out.emit(1u64).map_err(Into::into));
/// p.map("make", |x: u64| Ok(Table(x))).cow_fork(2);
/// ```
///
/// If the stage's executor is replaced after the handle was made (with
/// [`StageRef::executor`] through the `Deref`), an option set afterwards through this handle
/// is a [`DefinitionError::OptionNotForExecutor`] when the pipeline is built.
pub struct ForkRef<I, O, K> {
    stage: StageRef<I, O>,
    _k: PhantomData<fn() -> K>,
}

impl<I, O, K> Clone for ForkRef<I, O, K> {
    fn clone(&self) -> Self {
        ForkRef {
            stage: self.stage.clone(),
            _k: PhantomData,
        }
    }
}

impl<I, O, K: ForkKind> std::fmt::Debug for ForkRef<I, O, K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ForkRef<{}>({:?})", K::NAME, self.stage.name())
    }
}

impl<I, O, K> Deref for ForkRef<I, O, K> {
    type Target = StageRef<I, O>;
    fn deref(&self) -> &StageRef<I, O> {
        &self.stage
    }
}

impl<I, O, K> From<ForkRef<I, O, K>> for StageRef<I, O> {
    fn from(f: ForkRef<I, O, K>) -> Self {
        f.stage
    }
}

impl<I, O, K: ForkKind> ForkRef<I, O, K> {
    pub(super) fn new(stage: StageRef<I, O>) -> Self {
        ForkRef {
            stage,
            _k: PhantomData,
        }
    }

    /// The stage's plain handle.
    pub fn stage(&self) -> StageRef<I, O> {
        self.stage.clone()
    }

    /// Sets option `option` on the stage's executor, which must still be `K`.
    fn option(&self, option: &'static str, set: impl FnOnce(Exec) -> Exec) -> Self {
        let replaced = self.stage.with(option, |s| match &mut s.exec {
            Some(ExecChoice::Exec(e)) if K::is(e) => {
                *e = set(e.clone());
                None
            }
            Some(ExecChoice::Exec(e)) => Some(e.to_string()),
            Some(ExecChoice::Context(c)) => Some(format!("the execution context {c:?}")),
            None => Some("no executor of its own".to_string()),
        });
        if let Some(executor) = replaced {
            let e = DefinitionError::OptionNotForExecutor {
                stage: self.stage.name(),
                option,
                executor,
                applies_to: K::NAME,
            };
            self.stage.def.borrow_mut().misuse.push(e);
        }
        self.clone()
    }

    /// Per-item time limit: a child still running an item after `limit` is killed (SIGTERM,
    /// then SIGKILL) and the item fails with [`FailureKind::Timeout`](crate::FailureKind::Timeout).
    /// For an async stage under ipc_fork, the item's future is dropped inside its worker,
    /// which lives on (see [`Exec::tasks_per_worker`](crate::Exec::tasks_per_worker)).
    pub fn timeout(&self, limit: Duration) -> Self {
        self.option("timeout", |e| e.timeout(limit))
    }

    /// Emits results in input order (default: as they complete). Results of a finished item
    /// wait for every earlier item to finish.
    pub fn ordered(&self) -> Self {
        self.option("ordered", Exec::ordered)
    }

    /// Largest frame accepted on a pipe, in bytes (default 256 MiB; at least 4096).
    pub fn max_frame(&self, bytes: usize) -> Self {
        self.option("max_frame", |e| e.max_frame(bytes))
    }

    /// Whether the parent's heap goes into huge pages before the first fork (see
    /// [`Exec::huge_pages`](crate::Exec::huge_pages)).
    pub fn huge_pages(&self, setting: crate::HugePages) -> Self {
        self.option("huge_pages", |e| e.huge_pages(setting))
    }
}

impl<I, O> ForkRef<I, O, CowFork> {
    /// Up to `n` ready items per forked child (default 1): for cheap items the fork's cost
    /// is shared. `after_fork` hooks and the stage instance are then per child, not per item.
    pub fn items_per_fork(&self, n: usize) -> Self {
        self.option("items_per_fork", |e| e.items_per_fork(n))
    }

    /// Lets cow_fork choose the items per child, up to `max`, from the measured fork cost
    /// and item time (see [`Exec::items_per_fork_auto`](crate::Exec::items_per_fork_auto)).
    pub fn items_per_fork_auto(&self, max: usize) -> Self {
        self.option("items_per_fork", |e| e.items_per_fork_auto(max))
    }
}

impl<I: crate::stage::Wire, O: crate::stage::Wire> ForkRef<I, O, CowFork> {
    /// Forks the children from a single-threaded fork server made when the run starts (see
    /// [`Exec::fork_server`](crate::Exec::fork_server)): the input then crosses a pipe, so
    /// this compiles only for a serialisable input, and children see the parent as it was
    /// when the run started.
    pub fn fork_server(&self) -> Self {
        self.stage.wire();
        self.option("fork_server", |e| e.fork_server())
    }
}

impl<I, O> ForkRef<I, O, IpcFork> {
    /// Items a worker may hold at once, fixed (at most 1 MiB of them); 1 is strict
    /// request/response. By default the executor chooses from the items' measured time (see
    /// [`Exec::in_flight`](crate::Exec::in_flight)).
    pub fn in_flight(&self, n: usize) -> Self {
        self.option("in_flight", |e| e.in_flight(n))
    }

    /// Replaces a worker after it was handed `n` items, for leaky stage code (see
    /// [`Exec::max_items_per_worker`](crate::Exec::max_items_per_worker)).
    pub fn max_items_per_worker(&self, n: u64) -> Self {
        self.option("max_items_per_worker", |e| e.max_items_per_worker(n))
    }

    /// Replaces a worker once its resident memory passes `bytes` (see
    /// [`Exec::max_worker_rss`](crate::Exec::max_worker_rss)).
    pub fn max_worker_rss(&self, bytes: u64) -> Self {
        self.option("max_worker_rss", |e| e.max_worker_rss(bytes))
    }

    /// How the next item's worker is picked (default: round-robin).
    pub fn dispatch(&self, d: Dispatch) -> Self {
        self.option("dispatch", |e| e.dispatch(d))
    }

    /// Whether workers write the results of cheap items in batches (the default) or one
    /// write per item; see [`Exec::batch_results`].
    pub fn batch_results(&self, on: bool) -> Self {
        self.option("batch_results", |e| e.batch_results(on))
    }
    /// For an async stage: each worker runs up to `n` of its items at once, on a tokio
    /// runtime it builds after the fork (see
    /// [`Exec::tasks_per_worker`](crate::Exec::tasks_per_worker)). On a sync stage it is a
    /// definition error.
    ///
    /// ```
    /// use minigun::Pipeline;
    /// use std::time::Duration;
    /// let p = Pipeline::new("crawl");
    /// p.producer("urls", |out| out.emit_all(0..100u64).map_err(Into::into));
    /// p.map_async("fetch", |id: u64| async move {
    ///     tokio::time::sleep(Duration::from_millis(2)).await;
    ///     Ok(id * 2)
    /// })
    /// .ipc_fork(2)
    /// .tasks_per_worker(20)
    /// .timeout(Duration::from_secs(5));
    /// p.consumer("store", |_: u64| Ok(()));
    /// assert_eq!(p.run().unwrap().stage("store").unwrap().items_in, 100);
    /// ```
    #[cfg(feature = "async")]
    pub fn tasks_per_worker(&self, n: usize) -> Self {
        self.option("tasks_per_worker", |e| e.tasks_per_worker(n))
    }
}
