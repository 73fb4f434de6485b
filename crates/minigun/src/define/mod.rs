//! The typed, user-facing definition API: [`Pipeline`] and the typed stage handles
//! ([`StageRef`]) it returns, over the untyped definition [`record`]s that the linker
//! ([`crate::link`]) turns into a runnable pipeline.
//!
//! Handles share the definition through an `Rc`, so a stage can be configured and wired after
//! later stages exist (forward references), and so a definition reads as a sequence of `let`
//! statements. Nothing here runs anything or checks the whole: [`Pipeline::build`] hands the
//! records to the linker, which returns a [`Runnable`](crate::Runnable) or a
//! [`DefinitionError`](crate::DefinitionError).

mod collect;
mod fork_ref;
mod pipeline;
#[cfg(feature = "async")]
mod pipeline_async;
pub(crate) mod record;
mod stage_ref;

pub use collect::{Collected, Folded};
pub use fork_ref::{CowFork, ForkKind, ForkRef, IpcFork};
pub use pipeline::Pipeline;
pub use stage_ref::StageRef;
