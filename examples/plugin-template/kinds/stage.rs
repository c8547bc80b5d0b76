//! `{{name}}`: a Cordon stage plugin that performs the stage `{{STAGE}}`.
//!
//! Options (`with:` in the pipeline): `{"greeting": "hello", "fail": false}`.

use cordon_sdk::{Context, Outcome, StagePlugin, log, metadata};
use schemars::JsonSchema;
use serde::Deserialize;

/// The stage's options (`with:`). Cordon checks them when it plans a
/// deployment, with this very type, and `cordon plugin inspect` lists them
/// with these doc comments and defaults.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct Options {
    /// What to say.
    #[serde(default = "default_greeting")]
    greeting: String,
    /// Fail the stage, to see a failure (and a rollback) in a pipeline.
    #[serde(default)]
    fail: bool,
}

fn default_greeting() -> String {
    "hello".to_string()
}

struct Plugin;

impl StagePlugin for Plugin {
    const STAGES: &'static [(&'static str, &'static str)] = &[("{{STAGE}}", "Greets the application being deployed")];
    type Options = Options;

    fn run(ctx: &Context, options: Options) -> Outcome {
        let app = &ctx.deployment().application_name;
        log::info(format!("{} from {{name}} to {app}", options.greeting));
        // Stage metadata survives an agent restart: a re-run sees it.
        let runs = metadata::stage_get("runs").and_then(|r| r.parse::<u32>().ok()).unwrap_or(0) + 1;
        if let Err(e) = metadata::stage_put("runs", &runs.to_string()) {
            return Outcome::Failure(format!("cannot record the run: {e}"));
        }
        if options.fail {
            return Outcome::Failure(format!("{} was asked to fail", ctx.stage().name));
        }
        Outcome::Success(format!("greeted {app} (run {runs})"))
    }
}

cordon_sdk::stage_plugin!(Plugin);

// What the plugin is and what it needs; the host refuses to load it when
// the operator granted less, and `cordon plugin inspect` shows it.
cordon_sdk::manifest! {
    name: "{{name}}",
    version: env!("CARGO_PKG_VERSION"),
    stages: <Plugin as StagePlugin>::STAGES,
    capabilities: r#"{}"#,
}
