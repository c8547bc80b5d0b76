//! Writing a migration phase in plain Rust: implement [`MigrationPhase`]
//! and register it with [`migration_phase_plugin!`](crate::migration_phase_plugin!).
//!
//! The host calls [`MigrationPhase::step`] until it answers
//! [`Step::done`], persisting the step's checkpoint after every call; after
//! a crash the next step starts from the last persisted checkpoint, so a
//! step must be safe to repeat (writes to the destination are idempotent).
//! The store handles are scoped by the host: the source yields only the
//! selected keys, and deletes are refused until `verify` has passed.

use serde::Serialize;
use serde::de::DeserializeOwned;

pub use crate::migration_phase::cordon::plugin::store::{Budget, Destination, Entry, Page, Source};
pub use crate::migration_phase::exports::cordon::plugin::phase::ErrorPolicy as OnError;
use crate::migration_phase::exports::cordon::plugin::phase::{ErrorPolicy, StepOutcome, StepRequest};

/// What a step knows.
pub struct StepContext<'a> {
    pub migration_id: &'a str,
    /// The phase's name in the spec, e.g. `copy`.
    pub phase: &'a str,
    pub source: &'a Source,
    pub destination: &'a Destination,
    pub on_error: ErrorPolicy,
}

impl StepContext<'_> {
    /// The operator chose `continue-and-report`: record errors on single
    /// entries (in [`Step::failed`] and the summary) and go on.
    pub fn continue_on_error(&self) -> bool {
        self.on_error == ErrorPolicy::ContinueAndReport
    }
}

/// The result of one step.
#[derive(Debug, Clone, PartialEq)]
pub struct Step<C> {
    /// `false`: call again with `checkpoint`.
    pub done: bool,
    pub checkpoint: Option<C>,
    /// Entries and bytes this step handled, for the progress display.
    pub entries: u64,
    pub bytes: u64,
    /// Entries this step could not handle (under `continue-and-report`).
    pub failed: u64,
    /// One line for the progress display.
    pub summary: String,
}

impl<C> Step<C> {
    /// The phase is finished.
    pub fn done(summary: impl Into<String>) -> Self {
        Step { done: true, checkpoint: None, entries: 0, bytes: 0, failed: 0, summary: summary.into() }
    }

    /// More to do, from `checkpoint`.
    pub fn more(checkpoint: C, summary: impl Into<String>) -> Self {
        Step { done: false, checkpoint: Some(checkpoint), entries: 0, bytes: 0, failed: 0, summary: summary.into() }
    }

    /// Counts what the step handled.
    pub fn counted(mut self, entries: u64, bytes: u64) -> Self {
        self.entries = entries;
        self.bytes = bytes;
        self
    }

    /// Counts the entries it could not handle.
    pub fn failed(mut self, failed: u64) -> Self {
        self.failed = failed;
        self
    }
}

/// One phase of a migration.
pub trait MigrationPhase {
    /// The phase's options (`with:` in the spec), parsed with serde.
    type Options: DeserializeOwned;
    /// Where the phase stands between steps; persisted by the host as JSON.
    type Checkpoint: Serialize + DeserializeOwned;

    fn step(ctx: &StepContext<'_>, options: Self::Options, checkpoint: Option<Self::Checkpoint>) -> Result<Step<Self::Checkpoint>, String>;
}

#[doc(hidden)]
pub fn step<P: MigrationPhase>(request: StepRequest, source: &Source, destination: &Destination) -> Result<StepOutcome, String> {
    let phase = &request.phase;
    let options = serde_json::from_str(&request.options).map_err(|e| format!("invalid {phase} options: {e}"))?;
    let checkpoint = match &request.checkpoint {
        Some(text) => Some(serde_json::from_str(text).map_err(|e| format!("invalid {phase} checkpoint {text:?}: {e}"))?),
        None => None,
    };
    let ctx = StepContext { migration_id: &request.migration_id, phase, source, destination, on_error: request.on_error };
    let step = P::step(&ctx, options, checkpoint)?;
    let checkpoint = step.checkpoint.map(|c| serde_json::to_string(&c)).transpose().map_err(|e| e.to_string())?;
    Ok(StepOutcome { done: step.done, checkpoint, entries: step.entries, bytes: step.bytes, failed: step.failed, summary: step.summary })
}

/// Registers a [`MigrationPhase`] as the component's `phase` export.
#[macro_export]
macro_rules! migration_phase_plugin {
    ($phase:ty) => {
        const _: () = {
            use $crate::migration_phase::cordon::plugin::store::{Destination, Source};
            use $crate::migration_phase::exports::cordon::plugin::phase::{Guest, StepOutcome, StepRequest};
            struct CordonMigrationPhase;
            impl Guest for CordonMigrationPhase {
                fn step(request: StepRequest, source: &Source, destination: &Destination) -> Result<StepOutcome, String> {
                    $crate::migrate::step::<$phase>(request, source, destination)
                }
            }
            $crate::migration_phase::export_migration_phase!(CordonMigrationPhase);
        };
    };
}
