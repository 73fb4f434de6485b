//! Async processors, consumers and custom async stages: a [`ProcessorNode`] whose factory
//! makes an async stage. Its code returns a future per item, and it runs under `tasks(n)`
//! (`exec/tasks.rs`), which the planner checked.
//!
//! [`ProcessorNode`]: super::processor::ProcessorNode

use super::processor::{ProcessorTask, StageCode};
use super::{router, Task, Wiring};
use crate::async_stage::AsyncFactory;
use crate::erased::take;
use crate::exec::parts::Parts;
use crate::exec::tasks;
use crate::exec::Exec;
use crate::queue::{QueueTx, Receiver};
use crate::stage::{Failed, Item};

impl<I: Item, O: Item> StageCode<I, O> for AsyncFactory<I, O> {
    const ASYNC: bool = true;
    fn into_task(self, mut w: Wiring) -> Box<dyn Task> {
        let parts = Parts {
            router: router::<O>(&mut w),
            input: take::<Receiver<I>>(w.input.take().expect("async stage has an input")),
            dead_letter: w.dead_letter.take().map(take::<QueueTx<Failed<I>>>),
            factory: self,
            ctx: w.ctx,
            wire: None,
        };
        let Exec::Tasks(opts) = parts.ctx.exec.clone() else {
            unreachable!("the planner runs async stages under tasks only")
        };
        let (input, ctx) = (parts.input.clone(), parts.ctx.clone());
        ProcessorTask::boxed(input, ctx, Box::new(move || tasks::prepare(parts, opts)))
    }
}
