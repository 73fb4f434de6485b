//! Async processors, consumers and custom async stages: a [`ProcessorNode`] whose factory
//! makes an async stage. Its code returns a future per item, and it runs under `tasks(n)`
//! (`exec/tasks.rs`) or under ipc_fork with `tasks_per_worker` (`exec/fork/ipc`, each worker
//! with a runtime of its own), which the planner checked.
//!
//! [`ProcessorNode`]: super::processor::ProcessorNode

use super::processor::{ProcessorTask, StageCode};
use super::{router, Task, Wiring};
use crate::async_stage::AsyncFactory;
use crate::erased::take;
use crate::exec::parts::Parts;
use crate::exec::runner::{self, Crossing};
use crate::exec::tasks;
use crate::exec::Exec;
use crate::queue::{QueueTx, Receiver};
use crate::stage::{Failed, Item};

impl<I: Item, O: Item> StageCode<I, O> for AsyncFactory<I, O> {
    const ASYNC: bool = true;
    fn into_task(self, mut w: Wiring) -> Box<dyn Task> {
        let crossing = w.crossing.take().map(take::<Crossing<I, O>>);
        let hooks = std::mem::take(&mut w.hooks);
        let parts = Parts {
            router: router::<O>(&mut w),
            input: take::<Receiver<I>>(w.input.take().expect("async stage has an input")),
            dead_letter: w.dead_letter.take().map(take::<QueueTx<Failed<I>>>),
            factory: self,
            ctx: w.ctx,
            wire: None,
        };
        let (input, ctx) = (parts.input.clone(), parts.ctx.clone());
        let plan: super::processor::Plan = match parts.ctx.exec.clone() {
            Exec::Tasks(opts) => Box::new(move || tasks::prepare(parts, opts)),
            Exec::IpcFork(opts) => {
                let crossing = crossing.expect("the planner checks what an ipc_fork stage crosses");
                Box::new(move || Ok(runner::start_async(opts, crossing, parts, hooks)))
            }
            _ => unreachable!("the planner runs async stages under tasks or ipc_fork only"),
        };
        ProcessorTask::boxed(input, ctx, plan)
    }
}
