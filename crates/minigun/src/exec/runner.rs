//! A processor stage's executor at run time: the [`Runner`], one arm per flavour, made once
//! from the planned [`Exec`] and the stage's [`Crossing`].
//!
//! Which executors a stage's types allow is known only where the serde bounds are: in the
//! handle methods of [`StageRef`](crate::StageRef) that require them (`cow_fork`, `ipc_fork`,
//! `wire`, `codec`). Those methods record a [`Crossing`]: what the types cross
//! ([`Crosses`], read by the planner) and the serde-bounded entry points of the fork
//! executors for exactly these types (one function pointer, monomorphised there). Nothing
//! else in the crate needs the bounds.
//!
//! Here too: whether fork is available ([`fork_available`]) and what the fork executors
//! become where it is not (the linker plans such stages inline, so the fallbacks below only
//! keep the crate compiling off Linux).

use super::parts::Parts;
use super::{local, Exec, ForkOptions};
use crate::hooks::ForkHook;
use crate::ipc::protocol::{Codec, WireFns};
use crate::stage::{Item, Wire};

/// Whether the fork executors can run here: Linux, unless the environment variable
/// `MINIGUN_NO_FORK` is set (then every fork stage runs inline, with a warning, which is also
/// how the fallback is tested).
pub(crate) fn fork_available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE
        .get_or_init(|| cfg!(target_os = "linux") && std::env::var_os("MINIGUN_NO_FORK").is_none())
}

/// What a fork executor's preparation leaves to run on the stage's thread.
pub(crate) type PreparedRun = Box<dyn FnOnce() + Send>;

/// Fork hooks of one stage: pipeline-level first, then enclosing sub-pipelines (outermost
/// first), then the stage's own.
#[derive(Clone, Default)]
pub(crate) struct ForkHooks {
    pub(crate) before_fork: Vec<ForkHook>,
    pub(crate) after_fork: Vec<ForkHook>,
}

/// What a stage's item types can cross a process with, in increasing order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub(crate) enum Crosses {
    /// Neither type is declared serialisable: in-process executors only.
    #[default]
    Nothing,
    /// The output is serialisable: cow_fork (the input reaches the child through
    /// copy-on-write memory).
    Output,
    /// Input and output are serialisable: ipc_fork too.
    Both,
}

/// The two fork executors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fork {
    Cow,
    Ipc,
}

/// Starts a fork executor for one stage's types (serde-bounded where it was made).
type ForkStart<I, O> = fn(Fork, Parts<I, O>, ForkOptions, ForkHooks) -> PreparedRun;

/// What a stage's types can cross, with the codec and the fork executors' entry points for
/// them. Made only by the serde-bounded constructors below.
pub(crate) struct Crossing<I, O> {
    pub(crate) crosses: Crosses,
    codec: WireFns<I, O>,
    start: ForkStart<I, O>,
}

impl<I: Item, O: Wire> Crossing<I, O> {
    /// The output crosses, encoded with `C`: cow_fork.
    pub(crate) fn output<C: Codec>() -> Self {
        #[cfg(target_os = "linux")]
        let start: ForkStart<I, O> = start_cow::<I, O>;
        #[cfg(not(target_os = "linux"))]
        let start: ForkStart<I, O> = inline::<I, O>;
        Crossing {
            crosses: Crosses::Output,
            codec: WireFns::outputs::<C>(),
            start,
        }
    }
}

impl<I: Wire, O: Wire> Crossing<I, O> {
    /// Input and output cross, encoded with `C`: both fork executors.
    pub(crate) fn both<C: Codec>() -> Self {
        #[cfg(target_os = "linux")]
        let start: ForkStart<I, O> = start_any::<I, O>;
        #[cfg(not(target_os = "linux"))]
        let start: ForkStart<I, O> = inline::<I, O>;
        Crossing {
            crosses: Crosses::Both,
            codec: WireFns::both::<C>(),
            start,
        }
    }
}

#[cfg(target_os = "linux")]
fn start_cow<I: Item, O: Wire>(
    fork: Fork,
    parts: Parts<I, O>,
    opts: ForkOptions,
    hooks: ForkHooks,
) -> PreparedRun {
    debug_assert_eq!(fork, Fork::Cow, "the planner checks what a stage crosses");
    super::fork::cow(parts, opts, hooks)
}

#[cfg(target_os = "linux")]
fn start_any<I: Wire, O: Wire>(
    fork: Fork,
    parts: Parts<I, O>,
    opts: ForkOptions,
    hooks: ForkHooks,
) -> PreparedRun {
    match fork {
        Fork::Cow => super::fork::cow(parts, opts, hooks),
        Fork::Ipc => super::fork::ipc(parts, opts, hooks),
    }
}

/// Without fork the planner runs fork stages inline, so this is never called.
#[cfg(not(target_os = "linux"))]
fn inline<I: Item, O: Item>(_: Fork, p: Parts<I, O>, _: ForkOptions, _: ForkHooks) -> PreparedRun {
    Box::new(move || local::run(p, 1))
}

/// A processor stage's executor, as planned.
pub(crate) enum Runner<I, O> {
    /// Inline (one worker, on the driver thread) or `threads(n)`.
    Local { threads: usize },
    /// cow_fork or ipc_fork.
    Fork {
        fork: Fork,
        opts: ForkOptions,
        hooks: ForkHooks,
        start: ForkStart<I, O>,
    },
}

impl<I: Item, O: Item> Runner<I, O> {
    /// The runner of `exec`, the planned executor of a stage whose types cross what
    /// `crossing` says; also returns the codec the stage's parts carry.
    pub(crate) fn new(
        exec: &Exec,
        crossing: Option<Crossing<I, O>>,
        hooks: ForkHooks,
    ) -> (Self, Option<WireFns<I, O>>) {
        let codec = crossing.as_ref().map(|c| c.codec);
        let fork = |fork: Fork, opts: &ForkOptions| {
            let c = crossing.expect("the planner checks what a fork stage's types cross");
            Runner::Fork {
                fork,
                opts: opts.clone(),
                hooks,
                start: c.start,
            }
        };
        let runner = match exec {
            Exec::Inline => Runner::Local { threads: 1 },
            Exec::Threads(n) => Runner::Local {
                threads: (*n).max(1),
            },
            Exec::CowFork(opts) => fork(Fork::Cow, opts),
            Exec::IpcFork(opts) => fork(Fork::Ipc, opts),
        };
        (runner, codec)
    }

    /// Prepares the stage's run; called on the run's thread before any stage thread exists
    /// (ipc_fork forks its workers here). The result runs on the stage's driver thread.
    pub(crate) fn prepare(self, parts: Parts<I, O>) -> PreparedRun {
        match self {
            Runner::Local { threads } => Box::new(move || local::run(parts, threads)),
            Runner::Fork {
                fork,
                opts,
                hooks,
                start,
            } => start(fork, parts, opts, hooks),
        }
    }
}
