//! The async stages of a [`Pipeline`]: their code returns a future per item, and they run
//! under [`Exec::tasks`](crate::Exec::tasks), or in forked workers under
//! [`Exec::ipc_fork`](crate::Exec::ipc_fork) with
//! [`tasks_per_worker`](crate::Exec::tasks_per_worker) (feature `async`).

use super::{Pipeline, StageRef};
use crate::async_stage::{AsyncFactory, AsyncOutput, AsyncStage, FnAsync};
use crate::error::StageResult;
use crate::node::processor::ProcessorNode;
use crate::stage::{Item, StageKind};
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;

impl Pipeline {
    /// An async processor: called once per item, its future emits 0..n items into the
    /// [`AsyncOutput`] it owns. Runs under [`Exec::tasks`](crate::Exec::tasks) (an inherited
    /// inline setting is `tasks(1)`, `threads(n)` is `tasks(n)`), or, with serialisable
    /// input and output, in forked workers under `ipc_fork(k).tasks_per_worker(n)` (see
    /// [`Exec::tasks_per_worker`](crate::Exec::tasks_per_worker)).
    ///
    /// ```
    /// use minigun::{AsyncOutput, Exec, Pipeline};
    /// let p = Pipeline::new("split");
    /// p.producer("lines", |out| out.emit_all(["a b", "c"]).map_err(Into::into));
    /// p.processor_async("words", |line: &'static str, out: AsyncOutput<String>| async move {
    ///     for w in line.split(' ') {
    ///         out.emit(w.to_string())?;
    ///     }
    ///     Ok(())
    /// })
    /// .executor(Exec::tasks(8));
    /// assert_eq!(p.collect::<String>().unwrap().items.len(), 3);
    /// ```
    pub fn processor_async<I, O, F, Fut>(&self, name: impl Into<String>, f: F) -> StageRef<I, O>
    where
        I: Item,
        O: Item,
        F: Fn(I, AsyncOutput<O>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = StageResult> + Send + 'static,
    {
        let f = Arc::new(f);
        let factory: AsyncFactory<I, O> = Arc::new(move || Arc::new(FnAsync(f.clone())));
        self.add_async(name.into(), StageKind::Processor, factory)
    }

    /// An async processor that emits exactly one item per input: the output of its future.
    ///
    /// ```
    /// use minigun::{Exec, Pipeline};
    /// let p = Pipeline::new("lookups");
    /// p.producer("ids", |out| out.emit_all(0..1000u64).map_err(Into::into));
    /// p.map_async("lookup", |id: u64| async move {
    ///     tokio::task::yield_now().await;
    ///     Ok(id * 2)
    /// })
    /// .executor(Exec::tasks(256));
    /// let got = p.collect::<u64>().unwrap();
    /// assert_eq!(got.items.len(), 1000);
    /// ```
    pub fn map_async<I, O, F, Fut>(&self, name: impl Into<String>, f: F) -> StageRef<I, O>
    where
        I: Item,
        O: Item,
        F: Fn(I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = StageResult<O>> + Send + 'static,
    {
        self.processor_async(name, move |item, out: AsyncOutput<O>| {
            let fut = f(item);
            async move { Ok(out.emit(fut.await?)?) }
        })
    }

    /// An async consumer: called once per item, emits nothing.
    ///
    /// ```
    /// use minigun::{Exec, Pipeline};
    /// let p = Pipeline::new("store");
    /// p.producer("rows", |out| out.emit_all(0..10u32).map_err(Into::into));
    /// p.consumer_async("save", |_row: u32| async move { Ok(()) }).executor(Exec::tasks(4));
    /// assert_eq!(p.run().unwrap().stage("save").unwrap().items_in, 10);
    /// ```
    pub fn consumer_async<I, F, Fut>(&self, name: impl Into<String>, f: F) -> StageRef<I, ()>
    where
        I: Item,
        F: Fn(I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = StageResult> + Send + 'static,
    {
        let f = Arc::new(move |item, _: AsyncOutput<()>| f(item));
        let factory: AsyncFactory<I, ()> = Arc::new(move || Arc::new(FnAsync(f.clone())));
        self.add_async(name.into(), StageKind::Consumer, factory)
    }

    /// A user-defined async stage type (see [`AsyncStage`]); `factory` makes its one
    /// instance when the stage starts, shared by the items in flight.
    pub fn stage_async<I: Item, O: Item, S: AsyncStage<I, O>>(
        &self,
        name: impl Into<String>,
        factory: impl Fn() -> S + Send + Sync + 'static,
    ) -> StageRef<I, O> {
        let factory: AsyncFactory<I, O> = Arc::new(move || Arc::new(factory()));
        self.add_async(name.into(), StageKind::Custom, factory)
    }

    fn add_async<I: Item, O: Item>(
        &self,
        name: String,
        kind: StageKind,
        factory: AsyncFactory<I, O>,
    ) -> StageRef<I, O> {
        let node = ProcessorNode {
            kind,
            factory,
            _t: PhantomData,
        };
        self.add(name, Box::new(node))
    }
}
