//! Deployment plugins: a planner and an executor in one component (the
//! `deployment` world), written as one [`DeploymentPlugin`] impl.
//!
//! A separate crate from `cordon-sdk` because wit-bindgen names the helper
//! macros of an exported interface after the interface, so the `executor`
//! and `deployment` bindings (which export the same `stages` and
//! `execution` interfaces) cannot both live in one crate. The host imports
//! and shared types are `cordon-sdk`'s, so [`cordon_sdk::log`] and friends
//! work here unchanged.
//!
//! ```
//! use cordon_sdk_deployment::{PlanContext, PlannedStage, StageConfig, planned};
//!
//! struct Copy;
//! impl cordon_sdk::StagePlugin for Copy {
//!     const STAGES: &'static [(&'static str, &'static str)] = &[("COPY_SYNC", "Copies the source"), ("COPY_ROLLBACK", "Copies it back")];
//!     type Options = serde_json::Value;
//!     fn run(_: &cordon_sdk::Context, _: serde_json::Value) -> cordon_sdk::Outcome {
//!         cordon_sdk::Outcome::Success(String::new())
//!     }
//! }
//! impl cordon_sdk_deployment::DeploymentPlugin for Copy {
//!     fn quick_sync_stages(_: &PlanContext, rollback: bool) -> Result<Vec<PlannedStage>, String> {
//!         let mut stages = vec![planned(0, "COPY_SYNC", false, "{}")];
//!         if rollback {
//!             stages.push(planned(0, "COPY_ROLLBACK", true, "{}"));
//!         }
//!         Ok(stages)
//!     }
//!     fn pipeline_sync_stages(_: &PlanContext, stages: &[StageConfig], _: bool) -> Result<Vec<PlannedStage>, String> {
//!         Ok(stages.iter().map(|s| planned(s.index, &s.name, false, &s.options)).collect())
//!     }
//! }
//! cordon_sdk_deployment::deployment_plugin!(Copy);
//! # fn main() {}
//! ```

/// The raw bindings of the `deployment` world, for plugins that need to
/// implement the exports themselves (register with `bindings::export_deployment!`).
pub mod bindings {
    include!("bindings/deployment.rs");
}

#[doc(hidden)]
pub use cordon_sdk as __sdk;

use bindings::exports::cordon::plugin::{execution, planning};
use cordon_sdk::executor::cordon::plugin::types::Deployment;
use cordon_sdk::executor::exports::cordon::plugin::execution as executor_execution;
use serde::de::DeserializeOwned;

pub use bindings::exports::cordon::plugin::planning::{ArtifactVersion, PlannedStage};
pub use cordon_sdk::executor::cordon::plugin::types::{StageConfig, SyncStrategy};
pub use cordon_sdk::{Context, Outcome, StagePlugin};

/// What planning knows: the deployment and where its sources are.
pub struct PlanContext {
    request: planning::PlanRequest,
}

impl PlanContext {
    pub fn deployment(&self) -> &Deployment {
        &self.request.deployment
    }

    /// The guest path of the target source (read-only).
    pub fn source(&self) -> &str {
        &self.request.sources.target
    }

    /// The guest path of the last deployed source, if there is one.
    pub fn running_source(&self) -> Option<&str> {
        self.request.sources.running.as_deref()
    }

    /// The plugin's settings for this application (`plugins.<name>`).
    pub fn settings<T: DeserializeOwned>(&self) -> Result<T, String> {
        serde_json::from_str(&self.request.app_config).map_err(|e| format!("invalid settings for this plugin: {e}"))
    }
}

/// A stage for a plan: `index` is the configured stage's index (0 for quick
/// sync), `options` the stage's options as JSON text.
pub fn planned(index: u32, name: &str, rollback: bool, options: &str) -> PlannedStage {
    PlannedStage { index, name: name.into(), desc: String::new(), rollback, options: options.into() }
}

/// A plugin that plans deployments and performs their stages. The
/// [`StagePlugin`] half performs stages; this half plans them.
pub trait DeploymentPlugin: StagePlugin {
    /// Quick or pipeline sync, with one line on why; `None` leaves the
    /// choice to the next plugin (or the host's default).
    fn determine_strategy(_ctx: &PlanContext) -> Result<Option<(SyncStrategy, String)>, String> {
        Ok(None)
    }

    /// The versions of what the target source deploys, shown by `cordon plan`.
    fn determine_versions(_ctx: &PlanContext) -> Result<Vec<ArtifactVersion>, String> {
        Ok(Vec::new())
    }

    /// Stages for a quick sync, rollback stages included when `rollback`.
    fn quick_sync_stages(ctx: &PlanContext, rollback: bool) -> Result<Vec<PlannedStage>, String>;

    /// Stages for a pipeline sync from the configured stages this plugin
    /// defines, rollback stages included when `rollback`.
    fn pipeline_sync_stages(ctx: &PlanContext, stages: &[StageConfig], rollback: bool) -> Result<Vec<PlannedStage>, String>;
}

#[doc(hidden)]
pub fn execute<P: StagePlugin>(r: execution::StageRequest) -> execution::StageResult {
    let request = executor_execution::StageRequest { deployment: r.deployment, stage: r.stage, sources: r.sources, app_config: r.app_config };
    let result = cordon_sdk::stage::execute::<P>(request);
    execution::StageResult { status: result.status, message: result.message }
}

#[doc(hidden)]
pub fn context(request: planning::PlanRequest) -> PlanContext {
    PlanContext { request }
}

#[doc(hidden)]
pub fn strategy<P: DeploymentPlugin>(request: planning::PlanRequest) -> Result<planning::StrategyAnswer, String> {
    Ok(match P::determine_strategy(&context(request))? {
        None => planning::StrategyAnswer::Unsupported,
        Some((strategy, summary)) => planning::StrategyAnswer::Decided(planning::Strategy { strategy, summary }),
    })
}

/// Registers a [`DeploymentPlugin`] as the component's `stages`,
/// `execution`, `planning` and `options` exports; `settings: Type`
/// describes its per-application settings, as for
/// [`cordon_sdk::stage_plugin!`].
#[macro_export]
macro_rules! deployment_plugin {
    ($plugin:ty $(, settings: $settings:ty)? $(,)?) => {
        $crate::__sdk::describe_options!($plugin $(, $settings)?);
        const _: () = {
            use $crate::bindings::exports::cordon::plugin::{execution, planning, stages};
            struct CordonDeploymentPlugin;
            impl stages::Guest for CordonDeploymentPlugin {
                fn defined_stages() -> ::std::vec::Vec<stages::StageDefinition> {
                    <$plugin as $crate::StagePlugin>::STAGES
                        .iter()
                        .map(|(n, d)| stages::StageDefinition { name: n.to_string(), description: d.to_string() })
                        .collect()
                }
            }
            impl execution::Guest for CordonDeploymentPlugin {
                fn execute_stage(request: execution::StageRequest) -> execution::StageResult {
                    $crate::execute::<$plugin>(request)
                }
            }
            impl planning::Guest for CordonDeploymentPlugin {
                fn determine_strategy(request: planning::PlanRequest) -> Result<planning::StrategyAnswer, String> {
                    $crate::strategy::<$plugin>(request)
                }
                fn determine_versions(request: planning::PlanRequest) -> Result<::std::vec::Vec<planning::ArtifactVersion>, String> {
                    <$plugin as $crate::DeploymentPlugin>::determine_versions(&$crate::context(request))
                }
                fn build_quick_sync_stages(request: planning::PlanRequest, rollback: bool) -> Result<::std::vec::Vec<planning::PlannedStage>, String> {
                    <$plugin as $crate::DeploymentPlugin>::quick_sync_stages(&$crate::context(request), rollback)
                }
                fn build_pipeline_sync_stages(
                    request: planning::PlanRequest,
                    stages: ::std::vec::Vec<$crate::StageConfig>,
                    rollback: bool,
                ) -> Result<::std::vec::Vec<planning::PlannedStage>, String> {
                    <$plugin as $crate::DeploymentPlugin>::pipeline_sync_stages(&$crate::context(request), &stages, rollback)
                }
            }
            $crate::bindings::export_deployment!(CordonDeploymentPlugin);
        };
    };
}
