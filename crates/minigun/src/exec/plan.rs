//! Planning a stage's executor: which setting applies ([`precedence`]) and what it becomes for
//! this stage ([`fit`]). Both are pure functions of the definition; the linker calls them once
//! per stage, and the result is the stage's [`Exec`] for the whole run (its report row, its
//! [`Runner`](super::runner::Runner)).
//!
//! The rule, most specific first:
//!
//! 1. the stage's own setting ([`StageRef::executor`](crate::StageRef::executor), or the
//!    named context it joined with [`StageRef::context`](crate::StageRef::context));
//! 2. the innermost of: the execution block around the stage
//!    ([`Pipeline::with_executor`](crate::Pipeline::with_executor)) and the default executor of
//!    the nearest enclosing sub-pipeline that sets one; a block opened inside that
//!    sub-pipeline (or deeper) wins over its default;
//! 3. the pipeline's default ([`Pipeline::default_executor`](crate::Pipeline::default_executor)).
//!
//! Then [`fit`]: an option set on an executor it does not belong to is an error;
//! producers and accumulators always run on their driver thread (a setting of their own that
//! says otherwise is an error, an inherited one does not apply to them); a fork
//! executor needs the stage's types to cross a process (an explicit setting that cannot
//! apply is an error, an inherited one falls back to inline); a fork stage cannot route to a
//! target declared with `routes_to_local`; where fork is not available, fork stages run
//! inline with a warning.

use super::runner::Crosses;
use super::Exec;
use crate::error::DefinitionError;
use crate::stage::StageKind;

/// The smallest `max_frame` accepted: every control frame must fit.
const MIN_MAX_FRAME: usize = 4096;

/// An execution block around a stage: its executor, and the level it was opened at (the
/// position of its sub-pipeline in the stage's chain of enclosing sub-pipelines, innermost
/// first; the chain's length for a block opened at the pipeline's level).
pub(crate) type Block<'a> = (&'a Exec, usize);

/// The executor setting that applies to a stage. `stage`: its own setting; `block`: the
/// innermost execution block around it; `subs`: the default executors of its enclosing
/// sub-pipelines, innermost first; `pipeline`: the pipeline's default.
pub(crate) fn precedence(
    stage: Option<&Exec>,
    block: Option<Block<'_>>,
    subs: &[Option<&Exec>],
    pipeline: &Exec,
) -> Exec {
    if let Some(exec) = stage {
        return exec.clone();
    }
    let sub = subs
        .iter()
        .enumerate()
        .find_map(|(level, e)| e.map(|e| (e, level)));
    match (sub, block) {
        (Some((_, at)), Some((block, opened))) if opened <= at => block,
        (Some((sub, _)), _) => sub,
        (None, Some((block, _))) => block,
        (None, None) => pipeline,
    }
    .clone()
}

/// What the planner needs to know of the machine.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Env {
    /// See [`fork_available`](super::runner::fork_available).
    pub(crate) fork: bool,
    /// See [`remote_enabled`](super::runner::remote_enabled).
    pub(crate) remote: bool,
}

/// What the planner needs to know of a stage besides the setting that applies.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stage<'a> {
    pub(crate) name: &'a str,
    pub(crate) kind: StageKind,
    /// The setting is the stage's own (not inherited from a block, sub-pipeline or default).
    pub(crate) explicit: bool,
    /// What the stage's types can cross a process with.
    pub(crate) crosses: Crosses,
    /// The stage declared a route whose item type cannot cross a process.
    pub(crate) local_routes: bool,
    /// The stage declared any route.
    pub(crate) routes: bool,
    /// The stage's code returns futures (it runs under `tasks(n)` only).
    pub(crate) is_async: bool,
}

/// The executor a stage runs under, from the setting that applies to it (see the module
/// docs); `fork_available` is [`fork_available`](super::runner::fork_available) in the crate.
pub(crate) fn fit(s: Stage<'_>, exec: Exec, env: Env) -> Result<Exec, DefinitionError> {
    let stage = || s.name.to_string();
    if matches!(s.kind, StageKind::Producer | StageKind::Accumulator) {
        // Producers and accumulators always run on their driver thread: a setting of their
        // own that says otherwise cannot apply.
        if s.explicit && exec != Exec::Inline {
            return Err(DefinitionError::NotForThisKind {
                stage: stage(),
                kind: s.kind,
                setting: format!("executor {exec}"),
                applies_to: "processors, consumers and custom stages (producers and \
                             accumulators run on their own thread)",
            });
        }
        return Ok(Exec::Inline);
    }
    if let Exec::Misapplied { base, option } = &exec {
        return Err(DefinitionError::OptionNotForExecutor {
            stage: stage(),
            option: option.name,
            executor: base.to_string(),
            applies_to: option.applies_to(),
        });
    }
    let exec = fit_async(s, exec)?;
    if let Some(o) = exec.fork_options() {
        if o.max_frame < MIN_MAX_FRAME {
            return Err(DefinitionError::MaxFrameTooSmall {
                stage: stage(),
                max_frame: o.max_frame,
                minimum: MIN_MAX_FRAME,
            });
        }
    }
    if exec.concurrency() == 0 {
        return Err(DefinitionError::NoWorkers {
            stage: stage(),
            executor: exec.to_string(),
        });
    }
    if s.crosses < needs(&exec) {
        if s.explicit {
            let why = match &exec {
                Exec::CowFork(o) if o.fork_server => {
                    " (its input crosses a pipe to the fork server: declare it with .wire())"
                }
                _ => "",
            };
            return Err(DefinitionError::NotSerialisable {
                stage: stage(),
                executor: format!("{exec}{why}"),
            });
        }
        // An inherited fork default does not apply to stages that cannot cross a process;
        // they keep the in-process default.
        tracing::debug!(stage = %s.name, %exec, "stage is not serialisable; runs in process");
        return Ok(in_process(s, &exec));
    }
    if exec.is_fork() && s.local_routes {
        return Err(DefinitionError::LocalRouteAcrossProcess {
            stage: stage(),
            executor: exec.to_string(),
        });
    }
    if exec.is_fork() && !env.fork {
        tracing::warn!(stage = %s.name, %exec, "fork is not available here: the stage runs in process");
        return Ok(in_process(s, &exec));
    }
    if let Exec::Remote(r) = &exec {
        if s.kind == StageKind::Consumer {
            return Err(DefinitionError::NotForThisKind {
                stage: stage(),
                kind: s.kind,
                setting: format!("executor {exec}"),
                applies_to: "processors (map, processor, stage): a consumer stays in the parent",
            });
        }
        if s.routes {
            return Err(DefinitionError::RemoteRoutes {
                stage: stage(),
                executor: exec.to_string(),
            });
        }
        // The workers run the items under `worker_exec`: its mistakes are found here, where
        // the definition is built, not silently on the workers.
        let local = Stage {
            explicit: true,
            ..s
        };
        let on_workers = Env {
            fork: true,
            remote: false,
        };
        fit(local, (*r.worker_exec).clone(), on_workers)?;
        if !env.remote {
            tracing::info!(stage = %s.name, worker_exec = %r.worker_exec,
                "remote stages are off (MINIGUN_REMOTE=off): the stage runs here");
            let local = Stage {
                explicit: true,
                ..s
            };
            return fit(local, (*r.worker_exec).clone(), env);
        }
    }
    Ok(exec)
}

/// Async stages run under `tasks(n)` or `ipc_fork(k).tasks_per_worker(n)` only (or remote,
/// with one of them as the worker executor), and only they do. A setting of the stage's own that breaks this is an error; an inherited one is
/// translated: an async stage that inherits inline or `threads(n)` runs under `tasks(1)` or
/// `tasks(n)` (another fork or remote setting under `tasks(1)`), a sync stage that inherits
/// `tasks(n)` runs inline, one that inherits `tasks_per_worker` runs under its ipc_fork
/// without it. An async ipc_fork stage's window follows `tasks_per_worker`: a fixed
/// `in_flight` of its own is an error.
fn fit_async(s: Stage<'_>, exec: Exec) -> Result<Exec, DefinitionError> {
    let runs_async = match &exec {
        // A remote async stage runs under its worker executor, which must run it.
        Exec::Remote(r) if s.is_async => r.worker_exec.runs_async(),
        e => e.runs_async(),
    };
    match (s.is_async, runs_async, s.explicit) {
        (true, false, true) => Err(DefinitionError::AsyncStageNeedsTasks {
            stage: s.name.to_string(),
            executor: exec.to_string(),
        }),
        (false, true, true) => Err(DefinitionError::TasksNeedAsyncStage {
            stage: s.name.to_string(),
            kind: s.kind,
            executor: exec.to_string(),
        }),
        #[cfg(feature = "async")]
        (true, false, false) => {
            let n = match exec {
                Exec::Threads(n) => n,
                _ => 1,
            };
            tracing::debug!(stage = %s.name, %exec, "async stage inherits a sync executor: runs under tasks({n})");
            Ok(Exec::tasks(n))
        }
        (false, true, false) => match exec {
            Exec::IpcFork(mut o) => {
                o.tasks_per_worker = None;
                Ok(Exec::IpcFork(o))
            }
            _ => Ok(Exec::Inline),
        },
        (true, true, _) => match &exec {
            Exec::IpcFork(o) if !o.in_flight_auto => Err(DefinitionError::OptionNotForExecutor {
                stage: s.name.to_string(),
                option: "in_flight",
                executor: exec.to_string(),
                applies_to:
                    "sync ipc_fork stages (an async stage's window follows tasks_per_worker)",
            }),
            _ => Ok(exec),
        },
        _ => Ok(exec),
    }
}

/// Where an async stage runs when its ipc_fork cannot apply (fork is missing, or the
/// inherited setting's types cannot cross): under `tasks` with as many in flight, its
/// `timeout` and `ordered` kept. A sync stage runs inline.
fn in_process(s: Stage<'_>, exec: &Exec) -> Exec {
    #[cfg(feature = "async")]
    if let (true, Exec::IpcFork(o)) = (s.is_async, exec) {
        let mut tasks = Exec::tasks(exec.concurrency());
        if let Exec::Tasks(t) = &mut tasks {
            t.timeout = o.timeout;
            t.ordered = o.ordered;
        }
        return tasks;
    }
    let _ = (s, exec);
    Exec::Inline
}

/// What an executor needs the stage's types to cross.
fn needs(exec: &Exec) -> Crosses {
    match exec {
        Exec::Inline | Exec::Threads(_) => Crosses::Nothing,
        // The fork server's children get their input through a pipe.
        Exec::CowFork(o) if o.fork_server => Crosses::Both,
        Exec::CowFork(_) => Crosses::Output,
        Exec::IpcFork(_) | Exec::Remote(_) => Crosses::Both,
        #[cfg(feature = "async")]
        Exec::Tasks(_) => Crosses::Nothing,
        Exec::Misapplied { base, .. } => needs(base),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(n: usize) -> Exec {
        Exec::threads(n)
    }

    #[test]
    fn the_stage_setting_wins_over_everything() {
        let e = precedence(Some(&t(1)), Some((&t(2), 0)), &[Some(&t(3))], &t(4));
        assert_eq!(e, t(1));
    }

    #[test]
    fn without_any_setting_the_pipeline_default_applies() {
        assert_eq!(precedence(None, None, &[], &t(4)), t(4));
        assert_eq!(precedence(None, None, &[None, None], &t(4)), t(4));
    }

    #[test]
    fn a_block_wins_over_the_default_of_the_sub_pipeline_it_was_opened_in_or_below() {
        // Opened inside the stage's own sub-pipeline, which sets a default.
        assert_eq!(
            precedence(None, Some((&t(2), 0)), &[Some(&t(3))], &t(4)),
            t(2)
        );
        // Opened inside a sub-pipeline nested in the one with the default.
        let subs = [None, Some(&t(3))];
        assert_eq!(precedence(None, Some((&t(2), 0)), &subs, &t(4)), t(2));
        // Opened at the same level as the default.
        assert_eq!(precedence(None, Some((&t(2), 1)), &subs, &t(4)), t(2));
    }

    #[test]
    fn a_sub_pipeline_default_inside_a_block_wins_over_the_block() {
        // The block was opened outside the sub-pipeline that sets a default.
        assert_eq!(
            precedence(None, Some((&t(2), 1)), &[Some(&t(3))], &t(4)),
            t(3)
        );
        // The block was opened at the pipeline's level.
        let subs = [None, Some(&t(3))];
        assert_eq!(precedence(None, Some((&t(2), 2)), &subs, &t(4)), t(3));
    }

    #[test]
    fn the_innermost_sub_pipeline_default_wins() {
        let subs = [None, Some(&t(3)), Some(&t(5))];
        assert_eq!(precedence(None, None, &subs, &t(4)), t(3));
    }

    #[test]
    fn a_block_alone_wins_over_the_pipeline_default() {
        assert_eq!(precedence(None, Some((&t(2), 1)), &[None], &t(4)), t(2));
    }

    const ENV: Env = Env {
        fork: true,
        remote: true,
    };
    const NO_FORK: Env = Env {
        fork: false,
        remote: true,
    };

    fn stage(kind: StageKind, explicit: bool, crosses: Crosses) -> Stage<'static> {
        Stage {
            name: "s",
            kind,
            explicit,
            crosses,
            local_routes: false,
            routes: false,
            is_async: false,
        }
    }

    fn remote() -> Exec {
        Exec::remote(crate::remote::Remote::new(
            crate::remote::MemoryBroker::new(),
        ))
    }

    #[test]
    fn a_remote_stage_needs_both_types_to_cross_and_takes_no_consumer_or_route() {
        let both = stage(StageKind::Processor, true, Crosses::Both);
        let r = remote();
        assert_eq!(fit(both, r.clone(), ENV).unwrap(), r);
        let out = stage(StageKind::Processor, true, Crosses::Output);
        assert!(matches!(
            fit(out, remote(), ENV),
            Err(DefinitionError::NotSerialisable { .. })
        ));
        let consumer = stage(StageKind::Consumer, true, Crosses::Both);
        let e = fit(consumer, remote(), ENV).unwrap_err();
        assert!(
            e.to_string().contains("consumer stays in the parent"),
            "{e}"
        );
        let mut routed = both;
        routed.routes = true;
        let e = fit(routed, remote(), ENV).unwrap_err();
        assert!(e.to_string().contains("routes_to"), "{e}");
    }

    #[test]
    fn a_remote_stage_worker_executor_is_checked_where_the_definition_is_built() {
        let exec = Exec::remote(
            crate::remote::Remote::new(crate::remote::MemoryBroker::new())
                .worker_exec(Exec::threads(2).items_per_fork(3)),
        );
        let s = stage(StageKind::Processor, true, Crosses::Both);
        match fit(s, exec, ENV) {
            Err(DefinitionError::OptionNotForExecutor {
                option, executor, ..
            }) => {
                assert_eq!(
                    (option, executor.as_str()),
                    ("items_per_fork", "threads(2)")
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn with_remote_stages_off_a_remote_stage_runs_under_its_worker_executor() {
        let off = Env {
            fork: true,
            remote: false,
        };
        let exec = Exec::remote(
            crate::remote::Remote::new(crate::remote::MemoryBroker::new())
                .worker_exec(Exec::ipc_fork(3)),
        );
        let s = stage(StageKind::Processor, false, Crosses::Both);
        assert_eq!(fit(s, exec.clone(), off).unwrap(), Exec::ipc_fork(3));
        let no_fork = Env {
            fork: false,
            remote: false,
        };
        assert_eq!(fit(s, exec, no_fork).unwrap(), Exec::Inline);
    }

    #[test]
    fn producers_and_accumulators_run_inline_whatever_they_inherit() {
        for kind in [StageKind::Producer, StageKind::Accumulator] {
            let s = stage(kind, false, Crosses::Both);
            assert_eq!(fit(s, Exec::ipc_fork(2), ENV).unwrap(), Exec::Inline);
            assert_eq!(fit(s, t(3), ENV).unwrap(), Exec::Inline);
        }
    }

    #[test]
    fn an_executor_of_their_own_on_producers_and_accumulators_is_an_error() {
        for kind in [StageKind::Producer, StageKind::Accumulator] {
            let s = stage(kind, true, Crosses::Both);
            for exec in [Exec::ipc_fork(2), Exec::cow_fork(2), t(3)] {
                match fit(s, exec.clone(), ENV) {
                    Err(DefinitionError::NotForThisKind {
                        stage,
                        kind: k,
                        setting,
                        ..
                    }) => {
                        assert_eq!((stage.as_str(), k), ("s", kind));
                        assert_eq!(setting, format!("executor {exec}"));
                    }
                    other => panic!("{kind} under {exec}: {other:?}"),
                }
            }
            assert_eq!(fit(s, Exec::Inline, ENV).unwrap(), Exec::Inline);
        }
    }

    #[test]
    fn an_option_on_an_executor_it_does_not_belong_to_is_an_error() {
        let s = stage(StageKind::Processor, false, Crosses::Both);
        let cases = [
            (t(2).timeout(std::time::Duration::from_secs(1)), "timeout"),
            (Exec::Inline.ordered(), "ordered"),
            (Exec::ipc_fork(2).items_per_fork(4), "items_per_fork"),
            (Exec::cow_fork(2).in_flight(4), "in_flight"),
            (
                Exec::cow_fork(2).dispatch(crate::Dispatch::LeastLoaded),
                "dispatch",
            ),
            (
                Exec::cow_fork(2).ordered().batch_results(false),
                "batch_results",
            ),
        ];
        for (exec, want) in cases {
            match fit(s, exec, ENV) {
                Err(DefinitionError::OptionNotForExecutor { stage, option, .. }) => {
                    assert_eq!((stage.as_str(), option), ("s", want));
                }
                other => panic!("{want}: {other:?}"),
            }
        }
        // The options that apply are kept beside a misapplied one; the first misapplied is
        // the one reported.
        let e = Exec::cow_fork(2)
            .in_flight(3)
            .ordered()
            .dispatch(crate::Dispatch::LeastLoaded);
        let Exec::Misapplied { base, option } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(**base, Exec::cow_fork(2).ordered());
        assert_eq!(option.name, "in_flight");
        assert_eq!(option.applies_to(), "ipc_fork");
    }

    #[test]
    fn a_fork_executor_needs_what_the_stage_types_cross() {
        let cases = [
            (Exec::cow_fork(2), Crosses::Nothing, false),
            (Exec::cow_fork(2), Crosses::Output, true),
            (Exec::cow_fork(2), Crosses::Both, true),
            (Exec::cow_fork(2).fork_server(), Crosses::Output, false),
            (Exec::cow_fork(2).fork_server(), Crosses::Both, true),
            (Exec::ipc_fork(2), Crosses::Nothing, false),
            (Exec::ipc_fork(2), Crosses::Output, false),
            (Exec::ipc_fork(2), Crosses::Both, true),
            (t(2), Crosses::Nothing, true),
        ];
        for (exec, crosses, fits) in cases {
            let explicit = stage(StageKind::Processor, true, crosses);
            match fit(explicit, exec.clone(), ENV) {
                Ok(e) => assert!(fits && e == exec, "{exec} with {crosses:?}"),
                Err(DefinitionError::NotSerialisable { stage, executor }) => {
                    assert!(!fits, "{exec} with {crosses:?}");
                    assert_eq!(stage, "s");
                    assert!(executor.starts_with(&exec.to_string()), "{executor}");
                }
                Err(e) => panic!("unexpected {e}"),
            }
            // Inherited, a setting that cannot apply falls back to inline.
            let inherited = stage(StageKind::Consumer, false, crosses);
            let want = if fits { exec.clone() } else { Exec::Inline };
            assert_eq!(fit(inherited, exec, ENV).unwrap(), want);
        }
    }

    #[cfg(feature = "async")]
    #[test]
    fn async_stages_run_under_tasks_and_only_they_do() {
        let asynchronous = |explicit| Stage {
            is_async: true,
            ..stage(StageKind::Processor, explicit, Crosses::Nothing)
        };
        let sync = |explicit| stage(StageKind::Processor, explicit, Crosses::Nothing);
        let tasks = Exec::tasks(8);
        assert_eq!(fit(asynchronous(true), tasks.clone(), ENV).unwrap(), tasks);
        for exec in [Exec::Inline, t(2), Exec::cow_fork(2), Exec::ipc_fork(2)] {
            let e = fit(asynchronous(true), exec.clone(), ENV).unwrap_err();
            assert!(
                matches!(e, DefinitionError::AsyncStageNeedsTasks { .. }),
                "{exec}: {e}"
            );
        }
        // Inherited: inline is one in flight, threads(n) is n, the rest one.
        let inherited = [(Exec::Inline, 1), (t(3), 3), (Exec::ipc_fork(2), 1)];
        for (exec, n) in inherited {
            assert_eq!(fit(asynchronous(false), exec, ENV).unwrap(), Exec::tasks(n));
        }
        let e = fit(sync(true), tasks.clone(), ENV).unwrap_err();
        assert!(
            matches!(e, DefinitionError::TasksNeedAsyncStage { .. }),
            "{e}"
        );
        assert_eq!(fit(sync(false), tasks, ENV).unwrap(), Exec::Inline);
        assert!(matches!(
            fit(asynchronous(true), Exec::tasks(0), ENV),
            Err(DefinitionError::NoWorkers { .. })
        ));
        assert!(matches!(
            fit(asynchronous(true), Exec::tasks(2).items_per_fork(2), ENV),
            Err(DefinitionError::OptionNotForExecutor {
                option: "items_per_fork",
                ..
            })
        ));
    }

    #[cfg(feature = "async")]
    #[test]
    fn async_stages_run_under_ipc_fork_with_tasks_per_worker() {
        let asynchronous = |explicit, crosses| Stage {
            is_async: true,
            ..stage(StageKind::Processor, explicit, crosses)
        };
        let sync = |explicit| stage(StageKind::Processor, explicit, Crosses::Both);
        let ipc = Exec::ipc_fork(3).tasks_per_worker(50).ordered();
        for explicit in [true, false] {
            let s = asynchronous(explicit, Crosses::Both);
            assert_eq!(fit(s, ipc.clone(), ENV).unwrap(), ipc);
        }
        assert_eq!(ipc.concurrency(), 150);
        assert_eq!(ipc.in_flight_limit(), Some(150));
        assert_eq!(ipc.to_string(), "ipc_fork(3) tasks_per_worker(50)");
        // Where it cannot fork, or an inherited setting whose types cannot cross: tasks with
        // as many in flight, its options kept.
        let tasks = Exec::tasks(150).ordered();
        let s = asynchronous(true, Crosses::Both);
        assert_eq!(fit(s, ipc.clone(), NO_FORK).unwrap(), tasks);
        let s = asynchronous(false, Crosses::Nothing);
        assert_eq!(fit(s, ipc.clone(), ENV).unwrap(), tasks);
        let s = asynchronous(true, Crosses::Nothing);
        assert!(matches!(
            fit(s, ipc.clone(), ENV),
            Err(DefinitionError::NotSerialisable { .. })
        ));
        // Without tasks_per_worker, or beside a fixed in_flight, an async stage's own
        // ipc_fork is refused.
        let s = asynchronous(true, Crosses::Both);
        assert!(matches!(
            fit(s, Exec::ipc_fork(3), ENV),
            Err(DefinitionError::AsyncStageNeedsTasks { .. })
        ));
        assert!(matches!(
            fit(s, ipc.clone().in_flight(8), ENV),
            Err(DefinitionError::OptionNotForExecutor {
                option: "in_flight",
                ..
            })
        ));
        // A sync stage: refused as its own, dropped when inherited.
        assert!(matches!(
            fit(sync(true), ipc.clone(), ENV),
            Err(DefinitionError::TasksNeedAsyncStage { .. })
        ));
        assert_eq!(
            fit(sync(false), ipc, ENV).unwrap(),
            Exec::ipc_fork(3).ordered()
        );
        // Remote: its worker executor must run async stages.
        let r = crate::remote::Remote::new(crate::remote::MemoryBroker::new());
        let on_tasks = Exec::remote(r.clone().worker_exec(Exec::tasks(4)));
        assert_eq!(fit(s, on_tasks.clone(), ENV).unwrap(), on_tasks);
        let on_ipc = Exec::remote(r.clone().worker_exec(Exec::ipc_fork(2).tasks_per_worker(4)));
        assert_eq!(fit(s, on_ipc.clone(), ENV).unwrap(), on_ipc);
        assert!(matches!(
            fit(s, Exec::remote(r), ENV),
            Err(DefinitionError::AsyncStageNeedsTasks { .. })
        ));
        // Only ipc_fork takes it.
        for exec in [Exec::cow_fork(2), Exec::tasks(4), Exec::threads(2)] {
            assert!(matches!(
                fit(s, exec.tasks_per_worker(4), ENV),
                Err(DefinitionError::OptionNotForExecutor {
                    option: "tasks_per_worker",
                    ..
                })
            ));
        }
    }

    #[test]
    fn without_fork_a_fork_stage_runs_inline() {
        let s = stage(StageKind::Custom, true, Crosses::Both);
        assert_eq!(fit(s, Exec::ipc_fork(2), NO_FORK).unwrap(), Exec::Inline);
        assert_eq!(fit(s, t(2), NO_FORK).unwrap(), t(2));
    }

    #[test]
    fn a_fork_stage_with_a_local_route_is_refused_even_where_fork_is_missing() {
        let mut s = stage(StageKind::Processor, false, Crosses::Both);
        s.local_routes = true;
        for env in [ENV, NO_FORK] {
            let e = fit(s, Exec::cow_fork(2), env).unwrap_err();
            assert!(e.to_string().contains("routes_to_local"), "{e}");
        }
        assert_eq!(fit(s, t(2), ENV).unwrap(), t(2));
    }

    #[test]
    fn zero_workers_and_a_tiny_max_frame_are_refused() {
        let s = stage(StageKind::Processor, true, Crosses::Both);
        let e = fit(s, t(0), ENV).unwrap_err();
        assert!(matches!(&e, DefinitionError::NoWorkers { .. }), "{e}");
        assert!(e.to_string().contains("at least one worker"), "{e}");
        let e = fit(s, Exec::ipc_fork(1).max_frame(100), ENV).unwrap_err();
        assert!(
            matches!(
                &e,
                DefinitionError::MaxFrameTooSmall {
                    max_frame: 100,
                    minimum: 4096,
                    ..
                }
            ),
            "{e}"
        );
        assert!(fit(s, Exec::ipc_fork(1).max_frame(4096), ENV).is_ok());
    }
}
