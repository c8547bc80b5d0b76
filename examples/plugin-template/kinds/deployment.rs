//! `{{name}}`: a Cordon deployment plugin (planner and executor). It
//! deploys an application's source directory by copying it into the
//! directory the operator mounts at `/target`.
//!
//! Stages: `{{STAGE}}_SYNC` (quick sync and pipeline sync) and
//! `{{STAGE}}_ROLLBACK` (added when automatic rollback is on).

use cordon_sdk_deployment::{Context, DeploymentPlugin, Outcome, PlanContext, PlannedStage, StageConfig, StagePlugin, SyncStrategy, planned};
use schemars::JsonSchema;
use serde::Deserialize;

/// Its stages take no options (`with:`): anything given is refused when the
/// deployment is planned.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct NoOptions {}

fn copy_dir(from: &str, to: &str) -> Result<u64, String> {
    let mut count = 0;
    std::fs::create_dir_all(to).map_err(|e| format!("create {to}: {e}"))?;
    for entry in std::fs::read_dir(from).map_err(|e| format!("read {from}: {e}"))? {
        let entry = entry.map_err(|e| e.to_string())?;
        let (src, dst) = (entry.path(), format!("{to}/{}", entry.file_name().to_string_lossy()));
        if entry.file_type().map_err(|e| e.to_string())?.is_dir() {
            count += copy_dir(&src.to_string_lossy(), &dst)?;
        } else {
            std::fs::copy(&src, &dst).map_err(|e| format!("copy {}: {e}", src.display()))?;
            count += 1;
        }
    }
    Ok(count)
}

struct Plugin;

impl StagePlugin for Plugin {
    const STAGES: &'static [(&'static str, &'static str)] =
        &[("{{STAGE}}_SYNC", "Copy the source to /target"), ("{{STAGE}}_ROLLBACK", "Copy the running source back to /target")];
    type Options = NoOptions;

    fn run(ctx: &Context, _: NoOptions) -> Outcome {
        let from = match ctx.stage().name.as_str() {
            "{{STAGE}}_ROLLBACK" => match ctx.running_source() {
                Some(running) => running,
                None => return Outcome::Success("nothing to roll back to".into()),
            },
            _ => ctx.source(),
        };
        copy_dir(from, "/target").map(|n| format!("{n} files copied to /target")).into()
    }
}

impl DeploymentPlugin for Plugin {
    fn determine_strategy(ctx: &PlanContext) -> Result<Option<(SyncStrategy, String)>, String> {
        Ok(match ctx.running_source() {
            None => Some((SyncStrategy::QuickSync, "first deployment".into())),
            Some(_) => None,
        })
    }

    fn quick_sync_stages(_: &PlanContext, rollback: bool) -> Result<Vec<PlannedStage>, String> {
        let mut stages = vec![planned(0, "{{STAGE}}_SYNC", false, "{}")];
        if rollback {
            stages.push(planned(0, "{{STAGE}}_ROLLBACK", true, "{}"));
        }
        Ok(stages)
    }

    fn pipeline_sync_stages(_: &PlanContext, given: &[StageConfig], rollback: bool) -> Result<Vec<PlannedStage>, String> {
        let mut stages: Vec<PlannedStage> = given.iter().map(|g| planned(g.index, &g.name, false, &g.options)).collect();
        if rollback && let Some(first) = given.first() {
            stages.push(planned(first.index, "{{STAGE}}_ROLLBACK", true, "{}"));
        }
        Ok(stages)
    }
}

cordon_sdk_deployment::deployment_plugin!(Plugin);

cordon_sdk::manifest! {
    name: "{{name}}",
    version: env!("CARGO_PKG_VERSION"),
    stages: <Plugin as StagePlugin>::STAGES,
    capabilities: r#"{"mounts": [{"guest": "/target", "access": "read-write"}]}"#,
}
