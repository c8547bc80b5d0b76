//! `WAIT_APPROVAL` — holds the pipeline until enough distinct approvers
//! have approved through `cordon approve DEPLOYMENT STAGE --as NAME`.
//!
//! Options: `{"approvers": ["alice", "bob"], "minApprovals": 1}`. An empty
//! (or absent) `approvers` list accepts anyone. An approval from someone
//! not on the list is refused and logged; the same person approving twice
//! counts once. Who approved is kept in stage metadata (`approved-by`), so
//! approvals survive an agent restart. Needs no grants.

use std::collections::BTreeSet;
use std::time::Duration;

use cordon_sdk::executor::cordon::plugin::{commands, log, metadata, types::StageStatus};
use cordon_sdk::executor::exports::cordon::plugin::execution::{StageRequest, StageResult};
use cordon_sdk::executor::finish;
use serde::Deserialize;

const APPROVED: &str = "approved-by";
const POLL: Duration = Duration::from_millis(300);

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Options {
    #[serde(default)]
    approvers: Vec<String>,
    #[serde(default = "one")]
    min_approvals: usize,
}

fn one() -> usize {
    1
}

cordon_sdk::single_stage!("WAIT_APPROVAL", "Wait for approvals from listed approvers", run);
cordon_sdk::manifest!(r#"{"name": "approval", "version": "0.1.0", "contract": "0.1.0", "stages": ["WAIT_APPROVAL"], "capabilities": {}}"#);

fn run(request: StageRequest) -> StageResult {
    let options: Options = match serde_json::from_str(&request.stage.options) {
        Ok(o) => o,
        Err(e) => return finish(StageStatus::Failure, format!("invalid WAIT_APPROVAL options: {e}")),
    };
    if options.min_approvals == 0 {
        return finish(StageStatus::Failure, "invalid WAIT_APPROVAL options: minApprovals must be at least 1");
    }
    if !options.approvers.is_empty() && options.approvers.len() < options.min_approvals {
        return finish(StageStatus::Failure, format!("invalid WAIT_APPROVAL options: {} approvals needed but only {} approvers listed", options.min_approvals, options.approvers.len()));
    }
    let mut approved: BTreeSet<String> = metadata::get(metadata::Scope::Stage, APPROVED)
        .map(|v| v.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect())
        .unwrap_or_default();
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let who = if options.approvers.is_empty() { "anyone".to_string() } else { options.approvers.join(", ") };
    log::write(log::Level::Info, &format!("waiting for {} approval(s) from {who}", options.min_approvals));
    loop {
        for command in commands::received() {
            if command.kind != commands::CommandKind::Approve || !seen.insert(command.id.clone()) {
                continue;
            }
            let name = command.commander;
            if !options.approvers.is_empty() && !options.approvers.contains(&name) {
                log::write(log::Level::Warn, &format!("approval by {name} refused: not one of the approvers ({who})"));
                continue;
            }
            if approved.insert(name.clone()) {
                log::write(log::Level::Info, &format!("approved by {name} ({}/{})", approved.len(), options.min_approvals));
                let list: Vec<&str> = approved.iter().map(String::as_str).collect();
                if let Err(e) = metadata::put(metadata::Scope::Stage, APPROVED, &list.join(",")) {
                    return finish(StageStatus::Failure, format!("cannot record the approval: {e}"));
                }
            }
        }
        if approved.len() >= options.min_approvals {
            let list: Vec<&str> = approved.iter().map(String::as_str).collect();
            return finish(StageStatus::Success, format!("approved by {}", list.join(", ")));
        }
        std::thread::sleep(POLL);
    }
}
