//! The untyped definition records: what a [`Pipeline`](crate::Pipeline) and its handles
//! write, and what the linker reads. Stages are indices into [`Def::stages`], sub-pipelines
//! indices into [`Def::subs`]; references by name stay names ([`Ref::Name`]) until the linker
//! resolves them. The typed parts of a stage are its [`Node`] and its [`CrossingRecord`].

use crate::erased::Erased;
use crate::exec::runner::{Crosses, Crossing};
use crate::exec::Exec;
use crate::hooks::{ForkHook, OnceHook, StageHooks};
use crate::node::Node;
use crate::policy::OnError;
use crate::queue::{Capacity, FanOut};
use crate::route::RouteDecl;
use crate::stage::TypeInfo;
use std::time::Duration;

/// A reference from one stage (or sub-pipeline) to another.
#[derive(Debug, Clone)]
pub(crate) enum Ref {
    /// A stage of this definition, by handle.
    Id(usize),
    /// A sub-pipeline of this definition, by handle.
    Sub(usize),
    /// A stage or sub-pipeline by name (qualified, or a unique last part).
    Name(String),
    /// A handle of another pipeline (an error, reported with its name).
    Foreign(String),
}

/// A sub-pipeline: a named group of stages that acts as one stage of its parent.
pub(crate) struct SubDef {
    pub(crate) name: String,
    pub(crate) parent: Option<usize>,
    pub(crate) from: Vec<Ref>,
    pub(crate) to: Vec<Ref>,
    pub(crate) exec: Option<Exec>,
    pub(crate) input: TypeInfo,
    pub(crate) output: TypeInfo,
    pub(crate) before_fork: Vec<ForkHook>,
    pub(crate) after_fork: Vec<ForkHook>,
    pub(crate) rerouted: bool,
}

/// An executor set on a stage: directly, or by naming an execution context.
#[derive(Debug, Clone)]
pub(crate) enum ExecChoice {
    Exec(Exec),
    Context(String),
}

/// One stage as defined.
pub(crate) struct StageDef {
    pub(crate) name: String,
    pub(crate) node: Box<dyn Node>,
    pub(crate) from: Vec<Ref>,
    pub(crate) to: Vec<Ref>,
    pub(crate) exec: Option<ExecChoice>,
    /// The innermost execution block around the stage, and the sub-pipeline it was opened in.
    pub(crate) group: Option<(Exec, Option<usize>)>,
    pub(crate) capacity: Option<Capacity>,
    pub(crate) fanout: FanOut,
    pub(crate) policy: OnError,
    pub(crate) dead_letter: Option<Ref>,
    pub(crate) hooks: StageHooks,
    /// An accumulator's time limit for a partial batch (an error on other stages).
    pub(crate) max_wait: Option<Duration>,
    /// What the stage's types can cross, recorded by the serde-bounded handle methods.
    pub(crate) crossing: Option<CrossingRecord>,
    pub(crate) routes: Vec<(Ref, RouteDecl)>,
    pub(crate) sub: Option<usize>,
    pub(crate) entry: bool,
    pub(crate) rerouted: bool,
    pub(crate) declared_total: Option<u64>,
    /// Neither chained to its upstream nor its downstream to it (see `link::chain`).
    pub(crate) no_chain: bool,
}

/// A whole definition: the stages, sub-pipelines, settings and hooks of one pipeline.
#[derive(Default)]
pub(crate) struct Def {
    pub(crate) name: String,
    pub(crate) stages: Vec<StageDef>,
    pub(crate) default_exec: Exec,
    pub(crate) default_capacity: Capacity,
    pub(crate) contexts: Vec<(String, Exec)>,
    pub(crate) group: Vec<(Exec, Option<usize>)>,
    pub(crate) before_run: Vec<OnceHook>,
    pub(crate) after_run: Vec<OnceHook>,
    pub(crate) before_fork: Vec<ForkHook>,
    pub(crate) after_fork: Vec<ForkHook>,
    pub(crate) subs: Vec<SubDef>,
    /// Settings that were applied to a handle they do not fit (reported by `build()`).
    pub(crate) misuse: Vec<crate::error::DefinitionError>,
    /// Leave SIGINT / SIGTERM to the host program.
    pub(crate) no_signals: bool,
    /// The stage that collects the final stage's items in input order (every stage upstream
    /// of it must keep the order).
    pub(crate) keep_order: Option<usize>,
    /// How many failures the report keeps in full (`None`: the default).
    pub(crate) keep_failures: Option<usize>,
    /// The pipeline's huge-page setting for fork stages (`None`: each stage's default).
    pub(crate) huge_pages: Option<crate::huge::HugePages>,
    /// Stages are never chained to their upstreams (see `link::chain`).
    pub(crate) no_chaining: bool,
}

/// What a stage's types can cross, as its serde-bounded handle methods recorded it.
pub(crate) struct CrossingRecord {
    pub(crate) crosses: Crosses,
    /// The codec was chosen with `StageRef::codec` (not the default).
    pub(crate) codec_chosen: bool,
    /// The stage's `Crossing<I, O>`.
    pub(crate) typed: Erased,
}

impl CrossingRecord {
    pub(crate) fn new<I: 'static, O: 'static>(c: Crossing<I, O>, codec_chosen: bool) -> Self
    where
        Crossing<I, O>: Send,
    {
        CrossingRecord {
            crosses: c.crosses,
            codec_chosen,
            typed: Box::new(c),
        }
    }
}

impl StageDef {
    /// What the stage's types can cross.
    pub(crate) fn crosses(&self) -> Crosses {
        self.crossing
            .as_ref()
            .map_or(Crosses::Nothing, |c| c.crosses)
    }
}
