//! A deployment plugin (planner and executor) for the pipeline tests.
//!
//! Stages: `TD_SYNC`, `TD_ROLLOUT`, `TD_ROLLBACK`. App settings (JSON):
//! `vote` (`quick`, `pipeline`, `unsupported`: its strategy answer) and
//! `violate` (`foreign-index`, `renamed`, `missing`, `duplicate`,
//! `quick-index`: break the index contract that way; `leak-secret`: put
//! the granted `token` secret into its summary, version and stage
//! options). Stage options:
//! `fail`, `sleep_ms`, `marker`; `TD_ROLLBACK` reports the options it
//! received and sleeps `rollback_sleep_ms`.
use std::io::Write;
use std::time::Duration;

use cordon_sdk_deployment::bindings::exports::cordon::plugin::{
    execution::{self, StageRequest, StageResult},
    planning::{self, ArtifactVersion, PlanRequest, PlannedStage, Strategy, StrategyAnswer},
    stages::{self, StageDefinition},
};
use cordon_sdk::executor::cordon::plugin::types::{StageConfig, StageStatus, SyncStrategy};
use serde_json::Value;

struct TestDeploy;

fn settings(request: &PlanRequest) -> Value {
    serde_json::from_str(&request.app_config).unwrap_or(Value::Null)
}

fn text<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

impl stages::Guest for TestDeploy {
    fn defined_stages() -> Vec<StageDefinition> {
        ["TD_SYNC", "TD_ROLLOUT", "TD_ROLLBACK"]
            .into_iter()
            .map(|n| StageDefinition { name: n.into(), description: format!("test stage {n}") })
            .collect()
    }
}

fn stage(index: u32, name: &str, rollback: bool, options: &str) -> PlannedStage {
    PlannedStage { index, name: name.into(), desc: String::new(), rollback, options: options.into() }
}

/// The `token` secret's value when the app settings ask to leak it.
fn leak(request: &PlanRequest) -> String {
    if text(&settings(request), "violate") != Some("leak-secret") {
        return String::new();
    }
    cordon_sdk::executor::cordon::plugin::secrets::get("token").map(|v| format!(" {v}")).unwrap_or_default()
}

impl planning::Guest for TestDeploy {
    fn determine_strategy(request: PlanRequest) -> Result<StrategyAnswer, String> {
        Ok(match text(&settings(&request), "vote") {
            Some("quick") => StrategyAnswer::Decided(Strategy { strategy: SyncStrategy::QuickSync, summary: format!("voted quick{}", leak(&request)) }),
            Some("pipeline") => StrategyAnswer::Decided(Strategy { strategy: SyncStrategy::PipelineSync, summary: "voted pipeline".into() }),
            _ => StrategyAnswer::Unsupported,
        })
    }

    fn determine_versions(request: PlanRequest) -> Result<Vec<ArtifactVersion>, String> {
        let version = std::fs::read_to_string(format!("{}/VERSION", request.sources.target)).unwrap_or_else(|_| "unknown".into());
        Ok(vec![ArtifactVersion {
            kind: "test".into(),
            name: request.deployment.application_name.clone(),
            version: format!("{}{}", version.trim(), leak(&request)),
            url: String::new(),
        }])
    }

    fn build_quick_sync_stages(request: PlanRequest, rollback: bool) -> Result<Vec<PlannedStage>, String> {
        let settings = settings(&request);
        let violation = text(&settings, "violate");
        let index = if violation == Some("quick-index") { 3 } else { 0 };
        let mut out = vec![stage(index, "TD_SYNC", false, &serde_json::json!({ "note": leak(&request) }).to_string())];
        if violation == Some("borrow") {
            // A stage another plugin defines (and would run with its grants).
            out.push(stage(0, "STEP", false, r#"{"sleep_ms": 1}"#));
        }
        if rollback {
            out.push(stage(0, "TD_ROLLBACK", true, "{}"));
        }
        Ok(out)
    }

    fn build_pipeline_sync_stages(request: PlanRequest, given: Vec<StageConfig>, rollback: bool) -> Result<Vec<PlannedStage>, String> {
        let mut out: Vec<PlannedStage> = given.iter().map(|s| stage(s.index, &s.name, false, &s.options)).collect();
        match text(&settings(&request), "violate") {
            Some("foreign-index") => out[0].index += 100,
            Some("renamed") => out[0].name = "TD_SYNC".into(),
            Some("missing") => {
                out.pop();
            }
            Some("duplicate") => {
                let copy = out[0].clone();
                out.push(copy);
            }
            _ => {}
        }
        if text(&settings(&request), "violate") == Some("borrow-rollback") && let Some(first) = given.first() {
            out.push(stage(first.index, "STEP", true, "{}"));
        }
        if rollback && let Some(first) = given.first() {
            // Rollback reuses the first stage's index; the host gives it that stage's options.
            out.push(stage(first.index, "TD_ROLLBACK", true, "{}"));
        }
        Ok(out)
    }
}

impl execution::Guest for TestDeploy {
    fn execute_stage(request: StageRequest) -> StageResult {
        let options: Value = serde_json::from_str(&request.stage.options).unwrap_or(Value::Null);
        if let Some(marker) = text(&options, "marker") {
            let line = format!("{} {}\n", request.deployment.id, request.stage.id);
            let _ = std::fs::OpenOptions::new().create(true).append(true).open(marker).and_then(|mut f| f.write_all(line.as_bytes()));
        }
        if request.stage.name == "TD_ROLLBACK" {
            if let Some(ms) = options.get("rollback_sleep_ms").and_then(Value::as_u64) {
                std::thread::sleep(Duration::from_millis(ms));
            }
            return StageResult { status: StageStatus::Success, message: format!("rolled back with options {}", request.stage.options) };
        }
        if let Some(ms) = options.get("sleep_ms").and_then(Value::as_u64) {
            std::thread::sleep(Duration::from_millis(ms));
        }
        if options.get("fail").and_then(Value::as_bool) == Some(true) {
            return StageResult { status: StageStatus::Failure, message: "failing on purpose".into() };
        }
        StageResult { status: StageStatus::Success, message: String::new() }
    }
}

cordon_sdk_deployment::bindings::export_deployment!(TestDeploy);
