//! What a stage is to its user: the [`Stage`] trait, the [`Output`] it emits into, and the
//! closure adapters behind `processor`, `map` and `consumer`.
//!
//! A stage never knows where it runs: the same `Output` is backed by in-process queues under
//! `inline` / `threads`, and by a pipe to the parent inside a forked child.

use crate::error::{EmitError, FailureKind, StageResult};
use std::any::{Any, TypeId};
use std::cell::RefCell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, Once};

/// What a stage is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum StageKind {
    /// No input; runs once and emits any number of items.
    Producer,
    /// Called once per input item; emits 0..n items.
    Processor,
    /// Collects items into batches.
    Accumulator,
    /// Called once per item; emits nothing.
    Consumer,
    /// A user-defined [`Stage`] type.
    Custom,
}

impl std::fmt::Display for StageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StageKind::Producer => "producer",
            StageKind::Processor => "processor",
            StageKind::Accumulator => "accumulator",
            StageKind::Consumer => "consumer",
            StageKind::Custom => "stage",
        })
    }
}

/// The bound on every item that flows between stages. Fan-out broadcasts clones; the last
/// downstream receives the original, so a single downstream never clones.
pub trait Item: Clone + Send + 'static {}
impl<T: Clone + Send + 'static> Item for T {}

/// The bound on items that cross a process boundary (`ipc_fork` inputs and outputs,
/// `cow_fork` outputs).
pub trait Wire: Item + serde::Serialize + serde::de::DeserializeOwned {}
impl<T: Item + serde::Serialize + serde::de::DeserializeOwned> Wire for T {}

/// An item sent with [`Output::to`], and the name of its type (for the route error).
pub(crate) struct Routed {
    pub(crate) item: Box<dyn Any + Send>,
    pub(crate) type_name: &'static str,
}

/// Where emitted items go. Implemented by the in-process router and by the fork child's pipe.
pub(crate) trait Sink<O> {
    fn send(&mut self, item: O) -> Result<(), EmitError>;
    /// Sends an item to a declared route target.
    fn route(&mut self, target: &str, item: Routed) -> Result<(), EmitError>;
}

/// The handle a stage emits items into. Emitting any number of items (0..n) per input is
/// fine, and means the same thing under every executor.
pub struct Output<'a, O> {
    sink: &'a mut dyn Sink<O>,
}

impl<O> std::fmt::Debug for Output<'_, O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Output")
    }
}

impl<'a, O> Output<'a, O> {
    pub(crate) fn new(sink: &'a mut dyn Sink<O>) -> Self {
        Output { sink }
    }

    /// Sends one item downstream. Blocks while the downstream queue is full (backpressure).
    ///
    /// Returns [`EmitError::Stopped`] when the run is stopping; a producer should then return
    /// the error with `?` (it is not counted as a failure).
    pub fn emit(&mut self, item: O) -> Result<(), EmitError> {
        self.sink.send(item)
    }

    /// Sends `item` to the stage named `stage` instead of the default downstream (dynamic
    /// routing). The target must be declared with
    /// [`StageRef::routes_to`](crate::StageRef::routes_to); an undeclared name or an item of
    /// the wrong type is an [`EmitError::Route`].
    ///
    /// ```
    /// use minigun::{Output, Pipeline};
    /// let p = Pipeline::new("router");
    /// p.producer("jobs", |out| out.emit_all(0..10u32).map_err(Into::into));
    /// let route = p.processor("route", |job: u32, out: &mut Output<'_, u32>| {
    ///     if job % 3 == 0 { out.to("urgent", job)?; } else { out.emit(job)?; }
    ///     Ok(())
    /// });
    /// p.consumer("normal", |_: u32| Ok(()));
    /// let urgent = p.consumer("urgent", |_: u32| Ok(()));
    /// route.routes_to(&urgent);
    /// let report = p.run().unwrap();
    /// assert_eq!(report.stage("urgent").unwrap().items_in, 4);
    /// assert_eq!(report.stage("normal").unwrap().items_in, 6);
    /// ```
    pub fn to<T: Send + 'static>(&mut self, stage: &str, item: T) -> Result<(), EmitError> {
        let item = Routed {
            item: Box::new(item),
            type_name: std::any::type_name::<T>(),
        };
        self.sink.route(stage, item)
    }

    /// Emits every item of an iterator.
    pub fn emit_all<It: IntoIterator<Item = O>>(&mut self, items: It) -> Result<(), EmitError> {
        items.into_iter().try_for_each(|i| self.sink.send(i))
    }
}

/// A user-defined stage with state: Minigun's stage classes.
///
/// One instance is made per worker by the factory given to
/// [`Pipeline::stage`](crate::Pipeline::stage): one for `inline`, one per thread for
/// `threads(n)`, one per worker process (made in the child, after fork) for `ipc_fork(n)`, one per
/// forked child for `cow_fork(n)`.
///
/// ```
/// use minigun::{Output, Stage, StageResult};
/// struct Dedup(std::collections::HashSet<u64>);
/// impl Stage<u64, u64> for Dedup {
///     fn process(&mut self, item: u64, out: &mut Output<'_, u64>) -> StageResult {
///         if self.0.insert(item) { out.emit(item)?; }
///         Ok(())
///     }
/// }
/// ```
pub trait Stage<I, O>: Send + 'static {
    /// Handles one item.
    fn process(&mut self, item: I, out: &mut Output<'_, O>) -> StageResult;
    /// Called once per instance at end of stream, to flush what the instance holds.
    fn finish(&mut self, _out: &mut Output<'_, O>) -> StageResult {
        Ok(())
    }
}

/// Makes one stage instance per worker.
pub(crate) type Factory<I, O> = Arc<dyn Fn() -> Box<dyn Stage<I, O>> + Send + Sync>;

/// The closure behind `processor`.
pub(crate) struct FnStage<F>(pub(crate) Arc<F>);

impl<I, O, F> Stage<I, O> for FnStage<F>
where
    F: Fn(I, &mut Output<'_, O>) -> StageResult + Send + Sync + 'static,
{
    fn process(&mut self, item: I, out: &mut Output<'_, O>) -> StageResult {
        (self.0)(item, out)
    }
}

/// An item that failed, with its error: what a dead-letter stage receives.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Failed<I> {
    /// The item as it entered the failing stage.
    pub item: I,
    /// The failure.
    pub failure: crate::error::ItemFailure,
}

/// The name and identity of an item type, for type checks at build time.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TypeInfo {
    pub(crate) id: TypeId,
    pub(crate) name: &'static str,
}

impl TypeInfo {
    pub(crate) fn of<T: Any>() -> Self {
        TypeInfo {
            id: TypeId::of::<T>(),
            name: std::any::type_name::<T>(),
        }
    }
}

thread_local! {
    static IN_STAGE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// A failed call of stage code.
#[derive(Debug)]
pub(crate) struct Caught {
    pub(crate) kind: FailureKind,
    pub(crate) message: String,
    /// The error is only the run stopping (an emit refused with `Stopped` / `Closed`).
    pub(crate) stop: bool,
}

/// Runs stage code, turning an error or a panic into a [`Caught`] (panic message with location).
///
/// A process-wide panic hook (installed once, chained to the previous one) records the message
/// and location of panics raised inside stage code and keeps them off stderr: they are reported
/// through the run report and `tracing` instead.
pub(crate) fn guarded<T>(f: impl FnOnce() -> StageResult<T>) -> Result<T, Caught> {
    match catch_panic(f) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(caught_error(e)),
        Err(panic) => Err(panic),
    }
}

/// Runs stage code that may panic (also one poll of an async stage's future): a panic is
/// caught as a [`FailureKind::Panic`] with its message and location, kept off stderr.
pub(crate) fn catch_panic<T>(f: impl FnOnce() -> T) -> Result<T, Caught> {
    install_panic_hook();
    // Stage code may call stage code (a chained stage runs inside its upstream's emit): the
    // outer call is still in stage code when the inner one returns.
    let outer = IN_STAGE.with(|c| c.replace(true));
    let r = panic::catch_unwind(AssertUnwindSafe(f));
    IN_STAGE.with(|c| c.set(outer));
    r.map_err(|payload| {
        let msg = LAST_PANIC
            .with(|p| p.borrow_mut().take())
            .unwrap_or_else(|| panic_message(&*payload));
        Caught {
            kind: FailureKind::Panic,
            message: msg,
            stop: false,
        }
    })
}

/// The error a stage returned, as a failed call.
pub(crate) fn caught_error(e: crate::error::BoxError) -> Caught {
    Caught {
        kind: match e.downcast_ref::<EmitError>() {
            Some(EmitError::Encode(_)) => FailureKind::Encode,
            _ => FailureKind::Error,
        },
        message: error_chain(&*e),
        stop: crate::error::is_stop(&e),
    }
}

/// An error and its sources, joined with ": ".
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_string()
    }
}

#[inline]
pub(crate) fn install_panic_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if IN_STAGE.with(|c| c.get()) {
                let msg = panic_message(info.payload());
                let full = match info.location() {
                    Some(l) => format!("{msg} (at {}:{}:{})", l.file(), l.line(), l.column()),
                    None => msg,
                };
                LAST_PANIC.with(|p| *p.borrow_mut() = Some(full));
            } else {
                previous(info);
            }
        }));
    });
}
