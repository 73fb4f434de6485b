//! A producer: runs once on its driver thread and emits any number of items, which move to
//! its downstream queues in runs (see `queue::RunSender`); its outputs are counted as it
//! emits them.

use super::{router, Node, QueueEnds, Task, Wiring};
use crate::ctx::StageCtx;
use crate::error::StageResult;
use crate::queue::Capacity;
use crate::route::Router;
use crate::stage::{guarded, Item, Output, StageKind, TypeInfo};
use crate::stats::StageStats;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

pub(crate) type ProducerFn<O> = Box<dyn FnOnce(&mut Output<'_, O>) -> StageResult + Send>;

pub(crate) struct ProducerNode<O> {
    pub(crate) f: ProducerFn<O>,
}

impl<O: Item> Node for ProducerNode<O> {
    fn kind(&self) -> StageKind {
        StageKind::Producer
    }
    fn input(&self) -> Option<TypeInfo> {
        None
    }
    fn output(&self) -> Option<TypeInfo> {
        Some(TypeInfo::of::<O>())
    }
    fn failed_type(&self) -> Option<TypeInfo> {
        None
    }
    fn make_queue(&self, _: Capacity, _: Arc<StageStats>) -> Option<QueueEnds> {
        None
    }
    fn into_task(self: Box<Self>, mut w: Wiring) -> Box<dyn Task> {
        let router = router::<O>(&mut w)
            .stop_on(w.ctx.run.stop.clone())
            .in_runs();
        Box::new(ProducerTask {
            f: self.f,
            router,
            ctx: w.ctx,
        })
    }
}

struct ProducerTask<O> {
    f: ProducerFn<O>,
    router: Router<O>,
    ctx: Arc<StageCtx>,
}

impl<O: Item> Task for ProducerTask<O> {
    fn run(mut self: Box<Self>) {
        let t0 = Instant::now();
        let f = self.f;
        let r = guarded(|| f(&mut Output::new(&mut self.router)));
        self.ctx
            .stats
            .busy_ns
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        match r {
            Err(c) if !c.stop => {
                self.ctx.stage_error(c.kind, c.message, None);
            }
            _ => {}
        }
    }
    fn abandon(self: Box<Self>) {}
}
