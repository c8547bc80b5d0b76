//! Writing a stage plugin in plain Rust: implement [`StagePlugin`] and
//! register it with [`stage_plugin!`](crate::stage_plugin).
//!
//! ```
//! /// Options of `HELLO`.
//! #[derive(serde::Deserialize, schemars::JsonSchema)]
//! #[serde(deny_unknown_fields)]
//! struct Options {
//!     /// What to say.
//!     greeting: String,
//! }
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
//! Options arrive as the stage's `with:` mapping; if they do not parse (or
//! [`StagePlugin::validate`] refuses them), the stage fails with
//! `invalid <STAGE> options: <why>` before `run` is called. The same check
//! runs when the host plans a deployment (see [`crate::options`]), so a
//! bad option normally fails `cordon plan` instead.

use schemars::JsonSchema;
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
    /// The stages' options (`with:`), parsed with serde and described with
    /// schemars: doc comments, defaults and `deny_unknown_fields` all show
    /// in `cordon plugin inspect` and are checked at plan time.
    type Options: DeserializeOwned + JsonSchema;
    fn run(ctx: &Context, options: Self::Options) -> Outcome;
    /// What the types cannot say (a range, a relation between fields):
    /// checked at plan time and again before `run`.
    fn validate(_options: &Self::Options) -> Result<(), String> {
        Ok(())
    }
}

/// Reads a stage's options as `run` gets them: parsed, then validated.
#[doc(hidden)]
pub fn parse_options<P: StagePlugin>(json: &str) -> Result<P::Options, String> {
    let options = crate::options::parse::<P::Options>(json)?;
    P::validate(&options)?;
    Ok(options)
}

#[doc(hidden)]
pub fn execute<P: StagePlugin>(request: StageRequest) -> StageResult {
    let options = match parse_options::<P>(&request.stage.options) {
        Ok(o) => o,
        Err(e) => return Outcome::Failure(format!("invalid {} options: {e}", request.stage.name)).into(),
    };
    P::run(&Context::new(request), options).into()
}

/// Registers a [`StagePlugin`] as the component's `stages`, `execution`
/// and `options` exports. `settings: Type` describes the plugin's
/// per-application settings too (what [`Context::settings`] reads), so
/// they are checked at plan time:
///
/// ```
/// #[derive(serde::Deserialize, schemars::JsonSchema)]
/// struct Settings {
///     /// Where to write, inside the sandbox.
///     #[schemars(extend("format" = "guest-path"))]
///     target: String,
/// }
/// struct Copy;
/// impl cordon_sdk::StagePlugin for Copy {
///     const STAGES: &'static [(&'static str, &'static str)] = &[("COPY", "Copies the source")];
///     type Options = serde_json::Value;
///     fn run(ctx: &cordon_sdk::Context, _: serde_json::Value) -> cordon_sdk::Outcome {
///         ctx.settings::<Settings>().map(|s| format!("copied to {}", s.target)).into()
///     }
/// }
/// cordon_sdk::stage_plugin!(Copy, settings: Settings);
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! stage_plugin {
    ($plugin:ty $(, settings: $settings:ty)? $(,)?) => {
        $crate::describe_options!($plugin $(, $settings)?);
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
