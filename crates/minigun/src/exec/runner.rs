//! A processor stage's executor at run time: the [`Runner`], one arm per flavour, made once
//! from the planned [`Exec`] and the stage's [`Crossing`].
//!
//! Which executors a stage's types allow is known only where the serde bounds are: in the
//! handle methods of [`StageRef`](crate::StageRef) that require them (`cow_fork`, `ipc_fork`,
//! `wire`, `wire_output`, `codec`). Those methods record a [`Crossing`]: what the types cross
//! ([`Crosses`], read by the planner) and the serde-bounded [`Entry`] points of the crossing
//! executors (cow_fork, ipc_fork, remote) for exactly these types, monomorphised there.
//! Nothing else in the crate needs the bounds.
//!
//! Here too: whether fork is available ([`fork_available`]), whether remote stages run
//! remotely ([`remote_enabled`]), and what the fork executors become where fork is missing
//! (the planner runs such stages inline, so that fallback only keeps the crate compiling off
//! Linux).

use super::parts::Parts;
use super::{local, Exec, ForkOptions};
use crate::hooks::ForkHook;
use crate::ipc::codec::{Codec, WireFns};
use crate::remote::worker::{Served, ServedStage};
use crate::remote::Remote;
use crate::stage::{Item, Wire};
use std::marker::PhantomData;

#[cfg(feature = "async")]
use super::tasks::AsyncParts;

/// Whether the fork executors can run here: Linux, unless the environment variable
/// `MINIGUN_NO_FORK` is set (then every fork stage runs inline, with a warning, which is also
/// how the fallback is tested).
pub(crate) fn fork_available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE
        .get_or_init(|| cfg!(target_os = "linux") && std::env::var_os("MINIGUN_NO_FORK").is_none())
}

/// Whether remote stages run remotely: yes, unless the environment variable `MINIGUN_REMOTE`
/// is `off` (then each runs here under its worker executor, for development and for hosts
/// without a broker).
pub(crate) fn remote_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("MINIGUN_REMOTE").map_or(true, |v| v != "off"))
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

/// Where a crossing executor sends the items, with its options.
#[derive(Debug, Clone)]
pub(crate) enum Across {
    Cow(ForkOptions),
    Ipc(ForkOptions),
    Remote(Remote),
}

/// The serde-bounded entry points of one stage's types: made where the bounds hold
/// ([`Crossing::output`], [`Crossing::both`]), called where they are not known.
pub(crate) trait Entry<I, O>: Send + Sync {
    /// Starts a crossing executor (the planner checked that the types cross what it needs).
    fn start(&self, across: Across, parts: Parts<I, O>, hooks: ForkHooks) -> PreparedRun;
    /// The worker side of a remote stage: the stage's code, ready to serve its runs. `None`
    /// for entry points that cannot be remote.
    fn serve(&self, _stage: ServedStage<I, O>) -> Option<Box<dyn Served>> {
        None
    }
    /// Starts a crossing executor for an async stage: ipc_fork with `tasks_per_worker`, or
    /// remote (the planner checked that input and output cross).
    #[cfg(feature = "async")]
    fn start_async(&self, across: Across, parts: AsyncParts<I, O>, hooks: ForkHooks)
        -> PreparedRun;
}

/// Starts a crossing executor (ipc_fork or remote) for an async stage whose types cross as
/// `crossing` says.
#[cfg(feature = "async")]
pub(crate) fn start_async<I: Item, O: Item>(
    across: Across,
    crossing: Crossing<I, O>,
    mut parts: AsyncParts<I, O>,
    hooks: ForkHooks,
) -> PreparedRun {
    parts.wire = Some(crossing.codec);
    crossing.entry.start_async(across, parts, hooks)
}

/// What a stage's types can cross, with the codec and the entry points of the crossing
/// executors for them. Made only by the serde-bounded constructors below.
pub(crate) struct Crossing<I, O> {
    pub(crate) crosses: Crosses,
    codec: WireFns<I, O>,
    pub(crate) entry: Box<dyn Entry<I, O>>,
}

impl<I: Item, O: Wire> Crossing<I, O> {
    /// The output crosses, encoded with `C`: cow_fork.
    pub(crate) fn output<C: Codec>() -> Self {
        Crossing {
            crosses: Crosses::Output,
            codec: WireFns::outputs::<C>(),
            entry: Box::new(OutputOnly::<C>(PhantomData)),
        }
    }
}

impl<I: Wire, O: Wire> Crossing<I, O> {
    /// Input and output cross, encoded with `C`: every crossing executor.
    pub(crate) fn both<C: Codec>() -> Self {
        Crossing {
            crosses: Crosses::Both,
            codec: WireFns::both::<C>(),
            entry: Box::new(Both::<C>(PhantomData)),
        }
    }
}

impl<I: Wire, O: Wire> Crossing<I, O> {
    /// Input and output cross, encoded with `C`, for the local executors only: a remote
    /// worker's own run of the stage (which cannot be remote again).
    pub(crate) fn local<C: Codec>() -> Self {
        Crossing {
            crosses: Crosses::Both,
            codec: WireFns::both::<C>(),
            entry: Box::new(LocalOnly::<C>(PhantomData)),
        }
    }
}

/// The entry points of a stage whose output crosses, with codec `C`.
struct OutputOnly<C>(PhantomData<fn() -> C>);
/// The entry points of a stage whose input and output cross, with codec `C`.
struct Both<C>(PhantomData<fn() -> C>);
/// The local entry points of a stage whose input and output cross, with codec `C`.
struct LocalOnly<C>(PhantomData<fn() -> C>);

impl<I: Wire, O: Wire, C: Codec> Entry<I, O> for LocalOnly<C> {
    fn start(&self, across: Across, parts: Parts<I, O>, hooks: ForkHooks) -> PreparedRun {
        start_local(across, parts, hooks)
    }
    #[cfg(feature = "async")]
    fn start_async(
        &self,
        across: Across,
        parts: AsyncParts<I, O>,
        hooks: ForkHooks,
    ) -> PreparedRun {
        start_ipc_async(across, parts, hooks)
    }
}

impl<I: Item, O: Wire, C: Codec> Entry<I, O> for OutputOnly<C> {
    fn start(&self, across: Across, parts: Parts<I, O>, hooks: ForkHooks) -> PreparedRun {
        start_cow(across, parts, hooks)
    }
    #[cfg(feature = "async")]
    fn start_async(&self, _: Across, parts: AsyncParts<I, O>, _: ForkHooks) -> PreparedRun {
        debug_assert!(
            false,
            "the planner gives ipc_fork only to stages whose types cross"
        );
        Box::new(move || super::parts::drain(&parts.ctx, &parts.input))
    }
}

impl<I: Wire, O: Wire, C: Codec> Entry<I, O> for Both<C> {
    fn start(&self, across: Across, parts: Parts<I, O>, hooks: ForkHooks) -> PreparedRun {
        match across {
            Across::Remote(r) => crate::remote::parent::start::<I, O, C, _>(parts, r),
            other => start_local(other, parts, hooks),
        }
    }
    fn serve(&self, stage: ServedStage<I, O>) -> Option<Box<dyn Served>> {
        Some(crate::remote::worker::served::<I, O, C>(stage))
    }
    #[cfg(feature = "async")]
    fn start_async(
        &self,
        across: Across,
        parts: AsyncParts<I, O>,
        hooks: ForkHooks,
    ) -> PreparedRun {
        match across {
            Across::Remote(r) => crate::remote::parent::start::<I, O, C, _>(parts, r),
            other => start_ipc_async(other, parts, hooks),
        }
    }
}

/// ipc_fork for an async stage whose input and output cross (where fork is missing, the
/// planner runs it under `tasks`, so that fallback only keeps the crate compiling).
#[cfg(feature = "async")]
fn start_ipc_async<I: Wire, O: Wire>(
    across: Across,
    parts: AsyncParts<I, O>,
    hooks: ForkHooks,
) -> PreparedRun {
    match across {
        #[cfg(target_os = "linux")]
        Across::Ipc(opts) => super::fork::ipc_async(parts, opts, hooks),
        other => {
            debug_assert!(
                false,
                "the planner does not give {other:?} to an async stage here"
            );
            Box::new(move || super::parts::drain(&parts.ctx, &parts.input))
        }
    }
}

/// cow_fork, for a stage whose output crosses.
fn start_cow<I: Item, O: Wire>(
    across: Across,
    parts: Parts<I, O>,
    hooks: ForkHooks,
) -> PreparedRun {
    match across {
        #[cfg(target_os = "linux")]
        Across::Cow(opts) => super::fork::cow(parts, opts, hooks),
        other => unreachable_flavour(other, parts, hooks),
    }
}

/// The fork executors, for a stage whose input and output cross.
fn start_local<I: Wire, O: Wire>(
    across: Across,
    parts: Parts<I, O>,
    hooks: ForkHooks,
) -> PreparedRun {
    match across {
        #[cfg(target_os = "linux")]
        Across::Ipc(opts) => super::fork::ipc(parts, opts, hooks),
        other => start_cow(other, parts, hooks),
    }
}

/// A flavour the planner never gives these types (or a fork flavour where fork is missing,
/// which the planner runs inline): runs inline rather than failing.
fn unreachable_flavour<I: Item, O: Item>(
    across: Across,
    parts: Parts<I, O>,
    _: ForkHooks,
) -> PreparedRun {
    debug_assert!(false, "the planner does not give {across:?} to these types");
    Box::new(move || local::run(parts, 1, false))
}

/// A processor stage's executor, as planned.
pub(crate) enum Runner<I, O> {
    /// Inline (one worker, on the driver thread) or `threads(n)`, whose workers emit in
    /// input order when `in_order`.
    Local { threads: usize, in_order: bool },
    /// cow_fork, ipc_fork or remote.
    Across {
        across: Box<Across>,
        hooks: ForkHooks,
        entry: Box<dyn Entry<I, O>>,
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
        let across = |across: Across| {
            let c = crossing.expect("the planner checks what a crossing stage's types cross");
            Runner::Across {
                across: Box::new(across),
                hooks,
                entry: c.entry,
            }
        };
        let runner = match exec {
            // The planner refuses misapplied options before any runner is made.
            Exec::Inline | Exec::Misapplied { .. } => Runner::Local {
                threads: 1,
                in_order: false,
            },
            Exec::Threads(n) => Runner::Local {
                threads: (*n).max(1),
                in_order: false,
            },
            Exec::CowFork(opts) => across(Across::Cow(opts.clone())),
            Exec::IpcFork(opts) => across(Across::Ipc(opts.clone())),
            Exec::Remote(r) => across(Across::Remote(r.clone())),
            // Only async stages run under tasks (their own node, `node::async_processor`);
            // the planner runs a sync stage that inherits it inline.
            #[cfg(feature = "async")]
            Exec::Tasks(_) => Runner::Local {
                threads: 1,
                in_order: false,
            },
        };
        (runner, codec)
    }

    /// The same runner, emitting in input order (for `threads(n)`; the fork and remote
    /// executors keep order through their own `ordered` option).
    pub(crate) fn in_order(self) -> Self {
        match self {
            Runner::Local { threads, .. } => Runner::Local {
                threads,
                in_order: true,
            },
            other => other,
        }
    }

    /// Prepares the stage's run; called on the run's thread before any stage thread exists
    /// (ipc_fork forks its workers here). The result runs on the stage's driver thread.
    pub(crate) fn prepare(self, parts: Parts<I, O>) -> PreparedRun {
        match self {
            Runner::Local { threads, in_order } => {
                Box::new(move || local::run(parts, threads, in_order))
            }
            Runner::Across {
                across,
                hooks,
                entry,
            } => entry.start(*across, parts, hooks),
        }
    }
}
