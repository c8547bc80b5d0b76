//! Writing a stage plugin in plain Rust: implement [`StagePlugin`] and
//! register it with [`stage_plugin!`](crate::stage_plugin).
//!
//! ```
//! #[derive(serde::Deserialize)]
//! struct Options { greeting: String }
//!
//! struct Hello;
//! impl cordon_sdk::StagePlugin for Hello {
//!     const STAGES: &'static [(&'static str, &'static str)] = &[("HELLO", "Says hello")];
//!     type Options = Options;
//!     fn run(ctx: &cordon_sdk::Context, options: Options) -> cordon_sdk::Outcome {
//!         cordon_sdk::log::info(&format!("{} from {}", options.greeting, ctx.deployment().application_name));
//!         cordon_sdk::Outcome::Success(String::new())
//!     }
//! }
//! cordon_sdk::stage_plugin!(Hello);
//! # fn main() {}
//! ```
//!
//! Options arrive as the stage's `with:` mapping; if they do not parse, the
//! stage fails with `invalid <STAGE> options: <why>` before `run` is called.

use serde::de::DeserializeOwned;

use crate::executor::cordon::plugin::types::{Deployment, Stage, StageStatus};
use crate::executor::exports::cordon::plugin::execution::{StageRequest, StageResult};

/// How a stage ended, with a one-line message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Success(String),
    Failure(String),
    /// Success, and the pipeline stops after this stage.
    Exited(String),
    Skipped(String),
    Cancelled(String),
}

impl From<Result<String, String>> for Outcome {
    fn from(r: Result<String, String>) -> Self {
        match r {
            Ok(message) => Outcome::Success(message),
            Err(message) => Outcome::Failure(message),
        }
    }
}

impl From<Outcome> for StageResult {
    fn from(o: Outcome) -> Self {
        let (status, message) = match o {
            Outcome::Success(m) => (StageStatus::Success, m),
            Outcome::Failure(m) => (StageStatus::Failure, m),
            Outcome::Exited(m) => (StageStatus::Exited, m),
            Outcome::Skipped(m) => (StageStatus::Skipped, m),
            Outcome::Cancelled(m) => (StageStatus::Cancelled, m),
        };
        StageResult { status, message }
    }
}

/// What a stage run knows: the deployment, the stage, where things are.
pub struct Context {
    request: StageRequest,
}

impl Context {
    #[doc(hidden)]
    pub fn new(request: StageRequest) -> Self {
        Self { request }
    }

    pub fn deployment(&self) -> &Deployment {
        &self.request.deployment
    }

    pub fn stage(&self) -> &Stage {
        &self.request.stage
    }

    /// The guest path of the target source (read-only).
    pub fn source(&self) -> &str {
        &self.request.sources.target
    }

    /// The guest path of the last deployed source, if there is one.
    pub fn running_source(&self) -> Option<&str> {
        self.request.sources.running.as_deref()
    }

    /// The guest path of this run's scratch directory (read-write).
    pub fn scratch(&self) -> &str {
        &self.request.sources.scratch
    }

    /// The plugin's settings for this application (`plugins.<name>`).
    pub fn settings<T: DeserializeOwned>(&self) -> Result<T, String> {
        serde_json::from_str(&self.request.app_config).map_err(|e| format!("invalid settings for this plugin: {e}"))
    }
}

/// A plugin that performs one or more stages.
pub trait StagePlugin {
    /// `(name, description)` of each stage it performs.
    const STAGES: &'static [(&'static str, &'static str)];
    /// The stages' options (`with:`), parsed with serde.
    type Options: DeserializeOwned;
    fn run(ctx: &Context, options: Self::Options) -> Outcome;
}

#[doc(hidden)]
pub fn execute<P: StagePlugin>(request: StageRequest) -> StageResult {
    let name = request.stage.name.clone();
    let options = match serde_json::from_str::<P::Options>(&request.stage.options) {
        Ok(o) => o,
        Err(e) => return Outcome::Failure(format!("invalid {name} options: {e}")).into(),
    };
    P::run(&Context::new(request), options).into()
}

/// Registers a [`StagePlugin`] as the component's `stages` and `execution` exports.
#[macro_export]
macro_rules! stage_plugin {
    ($plugin:ty) => {
        const _: () = {
            struct CordonStagePlugin;
            impl $crate::executor::exports::cordon::plugin::stages::Guest for CordonStagePlugin {
                fn defined_stages() -> ::std::vec::Vec<$crate::executor::exports::cordon::plugin::stages::StageDefinition> {
                    <$plugin as $crate::StagePlugin>::STAGES.iter().map(|(n, d)| $crate::executor::stage(n, d)).collect()
                }
            }
            impl $crate::executor::exports::cordon::plugin::execution::Guest for CordonStagePlugin {
                fn execute_stage(
                    request: $crate::executor::exports::cordon::plugin::execution::StageRequest,
                ) -> $crate::executor::exports::cordon::plugin::execution::StageResult {
                    $crate::stage::execute::<$plugin>(request)
                }
            }
            $crate::executor::export_executor!(CordonStagePlugin);
        };
    };
}
