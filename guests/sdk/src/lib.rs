//! Rust bindings for the Cordon plugin contract (`cordon:plugin`, `wit/`),
//! and a plain-Rust layer over them.
//!
//! One trait per kind of plugin, each registered with its macro; options
//! are typed through serde:
//!
//! | kind | trait | macro |
//! | --- | --- | --- |
//! | stage plugin (`executor` world) | [`StagePlugin`] | [`stage_plugin!`] |
//! | deployment plugin (planner + executor) | `DeploymentPlugin` in the `cordon-sdk-deployment` crate | `deployment_plugin!` |
//! | key filter | [`KeyFilter`] | [`key_filter_plugin!`] |
//! | item action | [`ItemAction`] | [`item_action_plugin!`] |
//! | migration phase | [`MigrationPhase`] | [`migration_phase_plugin!`] |
//!
//! The host's services are plain calls in [`log`], [`metadata`],
//! [`commands`], [`blobs`] and [`secrets`]; [`manifest!`] embeds the
//! plugin's manifest, built from its declarations.
//!
//! The raw bindings: one module per world. A plugin crate (a `cdylib` built for
//! `wasm32-wasip2`) implements the `Guest` traits of its world's exports and
//! registers its type with that module's export macro:
//!
//! ```
//! use cordon_sdk::executor::exports::cordon::plugin::{execution, stages};
//! use cordon_sdk::executor::cordon::plugin::types::StageStatus;
//!
//! struct Hello;
//! impl stages::Guest for Hello {
//!     fn defined_stages() -> Vec<stages::StageDefinition> {
//!         vec![cordon_sdk::executor::stage("HELLO", "Says hello")]
//!     }
//! }
//! impl execution::Guest for Hello {
//!     fn execute_stage(_: execution::StageRequest) -> execution::StageResult {
//!         cordon_sdk::executor::finish(StageStatus::Success, "hello")
//!     }
//! }
//! cordon_sdk::executor::export_executor!(Hello);
//! # fn main() {}
//! ```

/// The `executor` world: performs stages, may call the stage host services.
pub mod executor {
    include!("bindings/executor.rs");

    use exports::cordon::plugin::{execution::StageResult, stages::StageDefinition};
    use cordon::plugin::types::StageStatus;

    /// A stage definition, for `defined_stages`.
    pub fn stage(name: &str, description: &str) -> StageDefinition {
        StageDefinition { name: name.to_string(), description: description.to_string() }
    }

    /// A finished stage with a one-line reason.
    pub fn finish(status: StageStatus, message: impl Into<String>) -> StageResult {
        StageResult { status, message: message.into() }
    }
}

/// The `key-filter` world: batched key selection, no host imports.
pub mod key_filter {
    include!("bindings/key_filter.rs");
}

/// The `item-action` world: rewrites JSON items.
pub mod item_action {
    include!("bindings/item_action.rs");
}

/// The `migration-phase` world: one host-driven step of a migration.
pub mod migration_phase {
    include!("bindings/migration_phase.rs");
}

/// Outgoing HTTP through `wasi:http`, the only way a plugin reaches the
/// network over HTTP. The host checks every request (and so every redirect
/// hop, which is a new request) against the plugin's network grant.
pub mod http;

mod host;
pub mod items;
pub mod keys;
pub mod manifest;
pub mod migrate;
pub mod options;
pub mod stage;

pub use host::{blobs, commands, log, metadata, secrets};
pub use items::{Action, ItemAction};
pub use keys::{KeyFilter, Verdict};
pub use migrate::{MigrationPhase, Step, StepContext};
pub use stage::{Context, Outcome, StagePlugin};

/// Declares a plugin that defines exactly one stage, run by `run`:
///
/// ```
/// use cordon_sdk::executor::exports::cordon::plugin::execution::{StageRequest, StageResult};
/// use cordon_sdk::executor::cordon::plugin::types::StageStatus;
///
/// cordon_sdk::single_stage!("HELLO", "Says hello", run);
/// fn run(request: StageRequest) -> StageResult {
///     cordon_sdk::executor::finish(StageStatus::Success, format!("hello, {}", request.deployment.application_name))
/// }
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! single_stage {
    ($name:literal, $description:literal, $run:path) => {
        struct CordonSingleStage;
        impl $crate::executor::exports::cordon::plugin::stages::Guest for CordonSingleStage {
            fn defined_stages() -> ::std::vec::Vec<$crate::executor::exports::cordon::plugin::stages::StageDefinition> {
                ::std::vec![$crate::executor::stage($name, $description)]
            }
        }
        impl $crate::executor::exports::cordon::plugin::execution::Guest for CordonSingleStage {
            fn execute_stage(
                request: $crate::executor::exports::cordon::plugin::execution::StageRequest,
            ) -> $crate::executor::exports::cordon::plugin::execution::StageResult {
                $run(request)
            }
        }
        $crate::executor::export_executor!(CordonSingleStage);
    };
}
