//! An accumulator: groups items into batches on its driver thread (the same under every
//! executor: batching is bookkeeping), with an optional time limit for a partial batch.

use super::{queue_for, router, Node, QueueEnds, Task, Wiring};
use crate::ctx::StageCtx;
use crate::erased::take;
use crate::exec::parts::drain;
use crate::queue::{Capacity, Receiver};
use crate::route::Router;
use crate::stage::{Item, StageKind, TypeInfo};
use crate::stats::StageStats;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// An accumulator of batches of `size` items (its `max_wait` comes with its wiring).
pub(crate) struct AccumulatorNode<I> {
    pub(crate) size: usize,
    pub(crate) _t: std::marker::PhantomData<fn(I)>,
}

impl<I: Item> Node for AccumulatorNode<I> {
    fn kind(&self) -> StageKind {
        StageKind::Accumulator
    }
    fn input(&self) -> Option<TypeInfo> {
        Some(TypeInfo::of::<I>())
    }
    fn output(&self) -> Option<TypeInfo> {
        Some(TypeInfo::of::<Vec<I>>())
    }
    fn failed_type(&self) -> Option<TypeInfo> {
        None
    }
    fn validate(&self, stage: &str) -> Result<(), crate::error::DefinitionError> {
        match self.size {
            0 => Err(crate::error::DefinitionError::ZeroBatchSize {
                stage: stage.to_string(),
            }),
            _ => Ok(()),
        }
    }
    fn make_queue(&self, cap: Capacity, stats: Arc<StageStats>) -> Option<QueueEnds> {
        queue_for::<I>(cap, stats)
    }
    fn into_task(self: Box<Self>, mut w: Wiring) -> Box<dyn Task> {
        Box::new(AccumulatorTask {
            size: self.size.max(1),
            max_wait: w.max_wait,
            router: router::<Vec<I>>(&mut w),
            input: take::<Receiver<I>>(w.input.take().expect("accumulator has an input")),
            ctx: w.ctx,
        })
    }
}

struct AccumulatorTask<I> {
    size: usize,
    max_wait: Option<Duration>,
    router: Router<Vec<I>>,
    input: Receiver<I>,
    ctx: Arc<StageCtx>,
}

impl<I: Item> AccumulatorTask<I> {
    fn flush(&self, batch: &mut Vec<I>) {
        if batch.is_empty() {
            return;
        }
        let n = batch.len() as u64;
        let full = std::mem::replace(batch, Vec::with_capacity(self.size));
        // Sent before the items count as done: inside a routing loop, releasing their units
        // first could close the loop with the batch still to be queued.
        if self.router.route(full).is_err() {
            self.ctx.stats.cancelled.fetch_add(n, Ordering::Relaxed);
        }
        self.ctx.items_done(n);
    }
}

impl<I: Item> Task for AccumulatorTask<I> {
    fn run(self: Box<Self>) {
        let mut batch: Vec<I> = Vec::with_capacity(self.size);
        let mut ready = VecDeque::new();
        // The time limit counts from the first item of a batch.
        let mut deadline: Option<Instant> = None;
        loop {
            let more = match deadline {
                Some(d) => self.input.recv_into_until(&mut ready, d),
                None => Some(self.ctx.recv_into(&self.input, &mut ready, 1)),
            };
            match more {
                Some(true) => {
                    if self.ctx.run.aborting() {
                        self.ctx.received_cancelled(ready.len() as u64);
                        ready.clear();
                        continue;
                    }
                    let n = ready.len() as u64;
                    self.ctx.stats.items_in.fetch_add(n, Ordering::Relaxed);
                    for item in ready.drain(..) {
                        if batch.is_empty() {
                            deadline = self.max_wait.map(|w| Instant::now() + w);
                        }
                        batch.push(item);
                        if batch.len() >= self.size {
                            self.flush(&mut batch);
                            deadline = None;
                        }
                    }
                    // A steady trickle of items never times the wait out: check here too.
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        self.flush(&mut batch);
                        deadline = None;
                    }
                }
                None => {
                    self.flush(&mut batch);
                    deadline = None;
                }
                Some(false) => break,
            }
        }
        if self.ctx.run.aborting() {
            self.ctx.cancelled(batch.len() as u64);
        } else {
            self.flush(&mut batch);
        }
    }
    fn abandon(self: Box<Self>) {
        drain(&self.ctx, &self.input);
    }
}
