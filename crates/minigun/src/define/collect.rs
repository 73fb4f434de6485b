//! Running a pipeline for its results: [`Pipeline::collect`], [`Pipeline::collect_ordered`],
//! [`Pipeline::fold`] and [`Pipeline::reduce`], what rayon's `collect` / `fold`, Python's
//! `Pool.map` and Ruby's `Parallel.map` give: the items of the pipeline's final stage, with
//! the run's report.
//!
//! The items are taken by one more consumer stage (named `collect`, and listed in the
//! report), connected to the final stage when the pipeline is built and run inline on its own
//! thread, so folding needs no locks of the caller's.

use super::Pipeline;
use crate::error::RunError;
use crate::exec::Exec;
use crate::policy::OnError;
use crate::report::RunReport;
use crate::stage::Item;
use std::sync::{Arc, Mutex, PoisonError};

/// What [`Pipeline::collect`] and [`Pipeline::collect_ordered`] return: the final stage's
/// items and the run's report.
#[derive(Debug)]
#[non_exhaustive]
pub struct Collected<T> {
    /// The items the final stage emitted, in arrival order (`collect`) or input order
    /// (`collect_ordered`).
    pub items: Vec<T>,
    /// The run's report (the collecting stage is in it, named `collect`).
    pub report: RunReport,
}

/// What [`Pipeline::fold`] and [`Pipeline::reduce`] return: the folded value and the run's
/// report.
#[derive(Debug)]
#[non_exhaustive]
pub struct Folded<A> {
    /// The value folded from every item of the final stage.
    pub value: A,
    /// The run's report (the folding stage is in it, named `collect`).
    pub report: RunReport,
}

impl Pipeline {
    /// Runs the pipeline and returns the items its final stage emits (in the order they
    /// arrive), with the report. The final stage is the one stage that emits items and feeds
    /// no downstream: typically the last one defined, with no consumer after it.
    ///
    /// ```
    /// use minigun::Pipeline;
    /// let p = Pipeline::new("squares");
    /// p.producer("numbers", |out| out.emit_all(1..=5u64).map_err(Into::into));
    /// p.map("square", |x: u64| Ok(x * x)).ipc_fork(2);
    /// let got = p.collect::<u64>()?;
    /// let mut squares = got.items;
    /// squares.sort();
    /// assert_eq!(squares, [1, 4, 9, 16, 25]);
    /// assert_eq!(got.report.stage("square").unwrap().items_out, 5);
    /// # Ok::<(), minigun::RunError>(())
    /// ```
    ///
    /// Errors: the definition errors of [`Pipeline::build`], plus
    /// [`NothingToCollect`](crate::DefinitionError::NothingToCollect),
    /// [`SeveralFinalStages`](crate::DefinitionError::SeveralFinalStages) and
    /// [`CollectTypeMismatch`](crate::DefinitionError::CollectTypeMismatch); and what
    /// [`Pipeline::run`] returns. Failed items are in the report, as with `run`.
    pub fn collect<T: Item>(self) -> Result<Collected<T>, RunError> {
        self.collect_in(false)
    }

    /// Like [`Pipeline::collect`], with the items in input order: the order in which the
    /// pipeline's producer emitted the items they come from, as `Pool.map` keeps it. Every
    /// stage on the way then emits in input order: fork and remote stages as with
    /// `ordered()`, and `threads(n)` stages too (an item's results wait for every earlier
    /// item). A stage with several upstreams on the way (several producers, a fan-in, a
    /// routing loop, a dead-letter edge) has no one input order: that is a definition error,
    /// [`OrderLostByFanIn`](crate::DefinitionError::OrderLostByFanIn).
    ///
    /// ```
    /// use minigun::Pipeline;
    /// let p = Pipeline::new("ordered");
    /// p.producer("numbers", |out| out.emit_all(0..50u64).map_err(Into::into));
    /// p.map("slow", |x: u64| {
    ///     std::thread::sleep(std::time::Duration::from_millis(x % 3));
    ///     Ok(x + 1)
    /// })
    /// .cow_fork(4);
    /// let items = p.collect_ordered::<u64>()?.items;
    /// assert_eq!(items, (1..=50).collect::<Vec<_>>());
    /// # Ok::<(), minigun::RunError>(())
    /// ```
    pub fn collect_ordered<T: Item>(self) -> Result<Collected<T>, RunError> {
        self.collect_in(true)
    }

    /// Runs the pipeline and folds the items its final stage emits (in arrival order) into
    /// one value, starting from `init`, with the report. `f` runs on one thread, one item at
    /// a time; a panic in it aborts the run ([`RunError::Aborted`]).
    ///
    /// ```
    /// use minigun::Pipeline;
    /// let p = Pipeline::new("word-count");
    /// p.producer("lines", |out| out.emit_all(["a b", "c", "d e f"]).map_err(Into::into));
    /// p.map("words", |line: &'static str| Ok(line.split(' ').count()))
    ///     .executor(minigun::Exec::threads(2));
    /// let total = p.fold(0, |sum, n: usize| sum + n)?;
    /// assert_eq!(total.value, 6);
    /// # Ok::<(), minigun::RunError>(())
    /// ```
    pub fn fold<T: Item, A: Send + 'static>(
        self,
        init: A,
        f: impl FnMut(A, T) -> A + Send + 'static,
    ) -> Result<Folded<A>, RunError> {
        self.fold_in(init, f, false)
    }

    /// Runs the pipeline and combines the items its final stage emits with `f` (in arrival
    /// order); `None` if it emitted none.
    ///
    /// ```
    /// use minigun::Pipeline;
    /// let p = Pipeline::new("max");
    /// p.producer("numbers", |out| out.emit_all([3u64, 9, 4]).map_err(Into::into));
    /// p.map("double", |x: u64| Ok(x * 2));
    /// assert_eq!(p.reduce(|a, b: u64| a.max(b))?.value, Some(18));
    /// # Ok::<(), minigun::RunError>(())
    /// ```
    pub fn reduce<T: Item>(
        self,
        mut f: impl FnMut(T, T) -> T + Send + 'static,
    ) -> Result<Folded<Option<T>>, RunError> {
        self.fold(None, move |acc, x| {
            Some(match acc {
                None => x,
                Some(a) => f(a, x),
            })
        })
    }

    fn collect_in<T: Item>(self, ordered: bool) -> Result<Collected<T>, RunError> {
        let push = |mut items: Vec<T>, x| {
            items.push(x);
            items
        };
        let Folded { value, report } = self.fold_in(Vec::new(), push, ordered)?;
        Ok(Collected {
            items: value,
            report,
        })
    }

    /// Adds the folding sink as the last stage, links it to the final stage and runs.
    fn fold_in<T: Item, A: Send + 'static>(
        self,
        init: A,
        mut f: impl FnMut(A, T) -> A + Send + 'static,
        ordered: bool,
    ) -> Result<Folded<A>, RunError> {
        let acc = Arc::new(Mutex::new(Some(init)));
        let into = acc.clone();
        let step = Mutex::new(move |x: T| {
            // The sink runs inline: the locks are never contended. A panic in `f` loses the
            // accumulator and aborts the run (fail-fast), so `None` is never read.
            let mut a = into.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(v) = a.take() {
                *a = Some(f(v, x));
            }
        });
        let name = self.unused_name("collect");
        self.consumer(name, move |x: T| {
            (step.lock().unwrap_or_else(PoisonError::into_inner))(x);
            Ok(())
        })
        .executor(Exec::inline())
        .on_error(OnError::fail_fast());
        let report = crate::link::collecting(self.take_def(), ordered)?.run()?;
        let value = acc.lock().unwrap_or_else(PoisonError::into_inner).take();
        let value = value.expect("a run that folded every item keeps the accumulator");
        Ok(Folded { value, report })
    }

    /// `base`, or `base-2`, `base-3`, ... : a stage name not yet taken.
    fn unused_name(&self, base: &str) -> String {
        let d = self.def.borrow();
        let taken = |n: &str| d.stages.iter().any(|s| s.name == n);
        (1..)
            .map(|k| match k {
                1 => base.to_string(),
                k => format!("{base}-{k}"),
            })
            .find(|n| !taken(n))
            .expect("some name is free")
    }
}
