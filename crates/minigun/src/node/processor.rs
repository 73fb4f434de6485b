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
use std::sync::Arc;

/// A processor, consumer or custom stage: its kind and its stage factory. What its types
/// can cross, and so which executors it may run under, its handle records in the definition
/// (see [`Crossing`]).
pub(crate) struct ProcessorNode<I, O> {
    pub(crate) kind: StageKind,
    pub(crate) factory: Factory<I, O>,
}

impl<I: Item, O: Item> Node for ProcessorNode<I, O> {
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
    fn into_task(self: Box<Self>, mut w: Wiring) -> Box<dyn Task> {
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
            factory: self.factory,
            ctx: w.ctx,
            wire: codec,
        };
        Box::new(ProcessorTask {
            input: parts.input.clone(),
            ctx: parts.ctx.clone(),
            planned: Some((runner, parts)),
            prepared: None,
        })
    }
    fn into_link(self: Box<Self>, mut w: Wiring) -> Option<Erased> {
        let router = router::<O>(&mut w);
        let dead_letter = w.dead_letter.take().map(take::<QueueTx<Failed<I>>>);
        let link = crate::exec::local::link(w.ctx, self.factory, router, dead_letter);
        Some(Box::new(link))
    }
    fn into_served(self: Box<Self>, w: ServeWiring) -> Option<Box<dyn Served>> {
        let crossing = take::<Crossing<I, O>>(w.crossing?);
        crossing.entry.serve(ServedStage {
            pipeline: w.pipeline,
            name: w.name,
            factory: self.factory,
            remote: w.remote,
            policy: w.policy,
            hooks: w.hooks,
        })
    }
}

struct ProcessorTask<I, O> {
    /// The stage's queue and context, kept here too so that `abandon` can account for the
    /// queued items whatever the executor took with it.
    input: Receiver<I>,
    ctx: Arc<StageCtx>,
    /// The planned executor and the stage's parts, until `prepare`.
    planned: Option<(Runner<I, O>, Parts<I, O>)>,
    /// What `prepare` left to run on the driver thread.
    prepared: Option<PreparedRun>,
}

impl<I: Item, O: Item> Task for ProcessorTask<I, O> {
    fn prepare(&mut self) -> Result<(), String> {
        let (runner, parts) = self.planned.take().expect("prepared once");
        self.prepared = Some(runner.prepare(parts));
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
        // A prepared fork pool terminates and reaps its workers when dropped.
        drop((planned, prepared));
        drain(&ctx, &input);
    }
}
