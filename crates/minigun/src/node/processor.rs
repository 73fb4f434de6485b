//! Processors, consumers and custom stages: called once per item, under the executor their
//! plan chose (see [`Runner`]).

use super::{queue_for, router, Node, QueueEnds, ServeWiring, Task, Wiring};
use crate::ctx::StageCtx;
use crate::erased::{take, Erased};
use crate::exec::parts::{drain, Parts};
use crate::exec::runner::{Crossing, PreparedRun, Runner};
use crate::queue::{Capacity, QueueTx, Receiver};
use crate::remote::worker::{Served, ServedStage};
use crate::stage::{Factory, Failed, Item, StageKind, TypeInfo};
use crate::stats::StageStats;
use std::marker::PhantomData;
use std::sync::Arc;

/// A processor, consumer or custom stage: its kind and its stage factory `F` (a sync
/// stage's [`Factory`] here; an async stage's in `async_processor`). What its types can
/// cross, and so which executors it may run under, its handle records in the definition
/// (see [`Crossing`]).
pub(crate) struct ProcessorNode<I, O, F = Factory<I, O>> {
    pub(crate) kind: StageKind,
    pub(crate) factory: F,
    pub(crate) _t: PhantomData<fn(I) -> O>,
}

/// What a processor node's factory makes of it when linked.
pub(crate) trait StageCode<I, O>: Send + Sized + 'static {
    /// The stage's code returns futures (see [`Node::is_async`]).
    const ASYNC: bool = false;
    fn into_task(self, w: Wiring) -> Box<dyn Task>;
    /// The stage chained to its upstream (see [`Node::into_link`]); async stages do not chain.
    fn into_link(self, _w: Wiring) -> Option<Erased> {
        None
    }
    fn into_served(self, _w: ServeWiring) -> Option<Box<dyn Served>> {
        None
    }
}

impl<I: Item, O: Item, F: StageCode<I, O>> Node for ProcessorNode<I, O, F> {
    fn kind(&self) -> StageKind {
        self.kind
    }
    fn input(&self) -> Option<TypeInfo> {
        Some(TypeInfo::of::<I>())
    }
    fn output(&self) -> Option<TypeInfo> {
        Some(TypeInfo::of::<O>())
    }
    fn failed_type(&self) -> Option<TypeInfo> {
        Some(TypeInfo::of::<Failed<I>>())
    }
    fn make_queue(&self, cap: Capacity, stats: Arc<StageStats>) -> Option<QueueEnds> {
        queue_for::<I>(cap, stats)
    }
    fn is_async(&self) -> bool {
        F::ASYNC
    }
    fn into_task(self: Box<Self>, w: Wiring) -> Box<dyn Task> {
        self.factory.into_task(w)
    }
    fn into_link(self: Box<Self>, w: Wiring) -> Option<Erased> {
        self.factory.into_link(w)
    }
    fn into_served(self: Box<Self>, w: ServeWiring) -> Option<Box<dyn Served>> {
        self.factory.into_served(w)
    }
}

impl<I: Item, O: Item> StageCode<I, O> for Factory<I, O> {
    fn into_task(self, mut w: Wiring) -> Box<dyn Task> {
        let crossing = w.crossing.take().map(take::<Crossing<I, O>>);
        let (runner, codec) = Runner::new(&w.ctx.exec, crossing, std::mem::take(&mut w.hooks));
        let runner = if w.in_order {
            runner.in_order()
        } else {
            runner
        };
        let parts = Parts {
            router: router::<O>(&mut w),
            input: take::<Receiver<I>>(w.input.take().expect("processor has an input")),
            dead_letter: w.dead_letter.take().map(take::<QueueTx<Failed<I>>>),
            factory: self,
            ctx: w.ctx,
            wire: codec,
        };
        let (input, ctx) = (parts.input.clone(), parts.ctx.clone());
        ProcessorTask::boxed(input, ctx, Box::new(move || Ok(runner.prepare(parts))))
    }
    fn into_link(self, mut w: Wiring) -> Option<Erased> {
        let router = router::<O>(&mut w);
        let dead_letter = w.dead_letter.take().map(take::<QueueTx<Failed<I>>>);
        let link = crate::exec::local::link(w.ctx, self, router, dead_letter);
        Some(Box::new(link))
    }
    fn into_served(self, w: ServeWiring) -> Option<Box<dyn Served>> {
        let crossing = take::<Crossing<I, O>>(w.crossing?);
        crossing.entry.serve(ServedStage {
            pipeline: w.pipeline,
            name: w.name,
            factory: crate::remote::worker::ServedFactory::Sync(self),
            remote: w.remote,
            policy: w.policy,
            hooks: w.hooks,
        })
    }
}

/// Prepares a processor's run (see [`Task::prepare`]): what runs on the driver thread.
pub(crate) type Plan = Box<dyn FnOnce() -> Result<PreparedRun, String> + Send>;

/// A processor stage's task, whatever its executor.
pub(crate) struct ProcessorTask<I> {
    /// The stage's queue and context, kept here too so that `abandon` can account for the
    /// queued items whatever the executor took with it.
    input: Receiver<I>,
    ctx: Arc<StageCtx>,
    /// The planned executor with the stage's parts, until `prepare`.
    planned: Option<Plan>,
    /// What `prepare` left to run on the driver thread.
    prepared: Option<PreparedRun>,
}

impl<I: Item> ProcessorTask<I> {
    pub(crate) fn boxed(input: Receiver<I>, ctx: Arc<StageCtx>, plan: Plan) -> Box<dyn Task> {
        Box::new(ProcessorTask {
            input,
            ctx,
            planned: Some(plan),
            prepared: None,
        })
    }
}

impl<I: Item> Task for ProcessorTask<I> {
    fn prepare(&mut self) -> Result<(), String> {
        let plan = self.planned.take().expect("prepared once");
        self.prepared = Some(plan()?);
        Ok(())
    }
    fn run(self: Box<Self>) {
        (self
            .prepared
            .expect("every stage is prepared before it runs"))()
    }
    fn abandon(self: Box<Self>) {
        let ProcessorTask {
            input,
            ctx,
            planned,
            prepared,
        } = *self;
        // A prepared fork pool terminates and reaps its workers when dropped (an async
        // stage's runtime shuts down).
        drop((planned, prepared));
        drain(&ctx, &input);
    }
}
