//! What an async stage is to its user: the [`AsyncStage`] trait, the [`AsyncOutput`] its
//! futures emit into, and the closure adapters behind `map_async`, `processor_async` and
//! `consumer_async`. They run under [`Exec::tasks`](crate::Exec::tasks) (`exec/tasks.rs`), or
//! in forked workers under `ipc_fork(k).tasks_per_worker(n)` (`exec/fork/child_async.rs`).
//!
//! An item's future owns everything it uses (it is `'static`: it runs on the runtime, apart
//! from the stage's thread). What it emits is kept with the item and leaves through the
//! stage's router when the future has completed, in the stage's own thread: a full
//! downstream queue then holds the stage back (no new item starts while its slot is taken),
//! and never blocks a runtime thread.

use crate::error::{EmitError, StageResult};
use crate::route::Routes;
use crate::stage::Routed;
use futures::future::BoxFuture;
use std::any::Any;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

/// A user-defined async stage: one instance per stage (under `ipc_fork`, one per worker,
/// made in the worker), shared by the items in flight (`&self`: keep mutable state behind a
/// lock or an atomic).
///
/// ```
/// use minigun::{AsyncOutput, AsyncStage, Exec, Pipeline, StageResult};
/// use std::future::Future;
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use std::sync::Arc;
///
/// struct Tally(Arc<AtomicU64>);
/// impl AsyncStage<u64, u64> for Tally {
///     fn process(&self, x: u64, out: AsyncOutput<u64>) -> impl Future<Output = StageResult> + Send + 'static {
///         let seen = self.0.clone();
///         async move {
///             seen.fetch_add(1, Ordering::Relaxed);
///             out.emit(x * 2)?;
///             Ok(())
///         }
///     }
///     fn finish(&self, out: AsyncOutput<u64>) -> impl Future<Output = StageResult> + Send + 'static {
///         let seen = self.0.load(Ordering::Relaxed);
///         async move { Ok(out.emit(seen)?) }
///     }
/// }
///
/// let p = Pipeline::new("tally");
/// p.producer("gen", |out| out.emit_all(0..10u64).map_err(Into::into));
/// p.stage_async("tally", || Tally(Arc::new(AtomicU64::new(0)))).executor(Exec::tasks(4));
/// let got = p.collect::<u64>().unwrap();
/// assert_eq!(got.items.len(), 11);
/// assert!(got.items.contains(&10));
/// ```
pub trait AsyncStage<I, O>: Send + Sync + 'static {
    /// Handles one item: the future it returns runs on the stage's runtime.
    fn process(
        &self,
        item: I,
        out: AsyncOutput<O>,
    ) -> impl Future<Output = StageResult> + Send + 'static;
    /// Called once at end of stream, after every item's future has completed.
    fn finish(&self, _out: AsyncOutput<O>) -> impl Future<Output = StageResult> + Send + 'static {
        std::future::ready(Ok(()))
    }
}

/// An [`AsyncStage`] behind a trait object.
pub(crate) trait ErasedAsync<I, O>: Send + Sync {
    fn process(&self, item: I, out: AsyncOutput<O>) -> BoxFuture<'static, StageResult>;
    fn finish(&self, out: AsyncOutput<O>) -> BoxFuture<'static, StageResult>;
}

impl<I, O, S: AsyncStage<I, O>> ErasedAsync<I, O> for S {
    fn process(&self, item: I, out: AsyncOutput<O>) -> BoxFuture<'static, StageResult> {
        Box::pin(AsyncStage::process(self, item, out))
    }
    fn finish(&self, out: AsyncOutput<O>) -> BoxFuture<'static, StageResult> {
        Box::pin(AsyncStage::finish(self, out))
    }
}

/// Makes the stage's instance (once per run of the stage, on its thread).
pub(crate) type AsyncFactory<I, O> = Arc<dyn Fn() -> Arc<dyn ErasedAsync<I, O>> + Send + Sync>;

/// The closure behind `processor_async` (and so `map_async` and `consumer_async`).
pub(crate) struct FnAsync<F>(pub(crate) Arc<F>);

impl<I, O, F, Fut> AsyncStage<I, O> for FnAsync<F>
where
    F: Fn(I, AsyncOutput<O>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = StageResult> + Send + 'static,
{
    fn process(
        &self,
        item: I,
        out: AsyncOutput<O>,
    ) -> impl Future<Output = StageResult> + Send + 'static {
        (self.0)(item, out)
    }
}

/// Items for declared routes: the route's index and the item.
pub(crate) type RoutedItems = Vec<(usize, Box<dyn Any + Send>)>;

/// What one item's future emitted, until it completes.
struct Emitted<O> {
    outs: Vec<O>,
    routed: RoutedItems,
    /// The item's future has completed: later emits are refused.
    closed: bool,
}

/// The handle an async stage's future emits into (any number of items per input, as
/// [`Output`](crate::Output)). It is owned, so it can move into the future, and cheap to
/// clone. Emitting never waits: the items leave through the stage's downstream queues
/// when the item's future has completed (a full queue then holds new items back).
/// An attempt that fails emits nothing: a retried item emits only what its successful
/// attempt emitted.
pub struct AsyncOutput<O> {
    emitted: Arc<Mutex<Emitted<O>>>,
    routes: Routes,
}

impl<O> Clone for AsyncOutput<O> {
    fn clone(&self) -> Self {
        AsyncOutput {
            emitted: self.emitted.clone(),
            routes: self.routes.clone(),
        }
    }
}

impl<O> std::fmt::Debug for AsyncOutput<O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AsyncOutput")
    }
}

impl<O> AsyncOutput<O> {
    pub(crate) fn new(routes: Routes) -> Self {
        AsyncOutput {
            emitted: Arc::new(Mutex::new(Emitted {
                outs: Vec::new(),
                routed: Vec::new(),
                closed: false,
            })),
            routes,
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Emitted<O>) -> R) -> Result<R, EmitError> {
        let mut e = self.emitted.lock().unwrap_or_else(PoisonError::into_inner);
        if e.closed {
            return Err(EmitError::Closed);
        }
        Ok(f(&mut e))
    }

    /// Sends one item downstream once the item's future has completed. After that, it
    /// returns [`EmitError::Closed`] (a clone kept by a task the future spawned).
    pub fn emit(&self, item: O) -> Result<(), EmitError> {
        self.with(|e| e.outs.push(item))
    }

    /// Sends `item` to the stage named `stage` (dynamic routing; see
    /// [`Output::to`](crate::Output::to)); an undeclared name or an item of the wrong type
    /// is an [`EmitError::Route`] at once.
    pub fn to<T: Send + 'static>(&self, stage: &str, item: T) -> Result<(), EmitError> {
        let routed = Routed {
            item: Box::new(item),
            type_name: std::any::type_name::<T>(),
        };
        let i = self.routes.resolve(stage, &routed)?;
        self.with(|e| e.routed.push((i, routed.item)))
    }

    /// A fresh output with the same routes, for a stage that wraps another.
    pub(crate) fn sibling<T>(&self) -> AsyncOutput<T> {
        AsyncOutput::new(self.routes.clone())
    }

    /// Everything emitted, taken out; later emits are refused.
    pub(crate) fn close(&self) -> (Vec<O>, RoutedItems) {
        let mut e = self.emitted.lock().unwrap_or_else(PoisonError::into_inner);
        e.closed = true;
        (std::mem::take(&mut e.outs), std::mem::take(&mut e.routed))
    }
}
