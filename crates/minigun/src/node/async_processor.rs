//! Async processors, consumers and custom async stages: a [`ProcessorNode`] whose factory
//! makes an async stage. Its code returns a future per item, and it runs under `tasks(n)`
//! (`exec/tasks.rs`), under ipc_fork with `tasks_per_worker` (`exec/fork/ipc`, each worker
//! with a runtime of its own), or remote with such a `worker_exec`, which the planner
//! checked.
//!
//! [`ProcessorNode`]: super::processor::ProcessorNode

use super::processor::{ProcessorTask, StageCode};
use super::{router, Task, Wiring};
use crate::async_stage::AsyncFactory;
use crate::erased::take;
use crate::exec::parts::Parts;
use crate::exec::runner::{self, Across, Crossing};
use crate::exec::tasks;
use crate::exec::Exec;
use crate::queue::{QueueTx, Receiver};
use crate::remote::worker::{Served, ServedFactory, ServedStage};
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
            exec @ (Exec::IpcFork(_) | Exec::Remote(_)) => {
                let crossing = crossing.expect("the planner checks what a crossing stage crosses");
                let across = match exec {
                    Exec::IpcFork(opts) => Across::Ipc(opts),
                    Exec::Remote(r) => Across::Remote(r),
                    _ => unreachable!("matched above"),
                };
                Box::new(move || Ok(runner::start_async(across, crossing, parts, hooks)))
            }
            _ => unreachable!("the planner runs async stages under tasks or ipc_fork only"),
        };
        ProcessorTask::boxed(input, ctx, plan)
    }
    fn into_served(self, w: super::ServeWiring) -> Option<Box<dyn Served>> {
        let crossing = take::<Crossing<I, O>>(w.crossing?);
        crossing.entry.serve(ServedStage {
            pipeline: w.pipeline,
            name: w.name,
            factory: ServedFactory::Async(self),
            remote: w.remote,
            policy: w.policy,
            hooks: w.hooks,
        })
    }
}
