//! `WAIT_APPROVAL` — holds the pipeline until enough distinct approvers
//! have approved through `cordon approve DEPLOYMENT STAGE --as NAME`.
//!
//! Options: `{"approvers": ["alice", "bob"], "minApprovals": 1}`. An empty
//! (or absent) `approvers` list accepts anyone. An approval from someone
//! not on the list is refused, logged and answered (so `cordon approve`
//! fails with the reason); the same person approving twice
//! counts once. Who approved is kept in stage metadata (`approved-by`), so
//! approvals survive an agent restart. Needs no grants.

use std::collections::BTreeSet;
use std::time::Duration;

use cordon_sdk::{Context, Outcome, StagePlugin, commands, log, metadata};
use schemars::JsonSchema;
use serde::Deserialize;

const APPROVED: &str = "approved-by";
const POLL: Duration = Duration::from_millis(300);

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Options {
    /// Who may approve (the commander names of `cordon approve`); empty:
    /// anyone.
    #[serde(default)]
    approvers: Vec<String>,
    /// How many different approvers must approve, at least 1.
    #[serde(default = "one")]
    #[schemars(range(min = 1))]
    min_approvals: usize,
}

fn one() -> usize {
    1
}

struct Approval;

impl StagePlugin for Approval {
    const STAGES: &'static [(&'static str, &'static str)] = &[("WAIT_APPROVAL", "Wait for approvals from listed approvers")];
    type Options = Options;

    fn validate(o: &Options) -> Result<(), String> {
        if o.min_approvals == 0 {
            return Err("minApprovals must be at least 1".into());
        }
        if !o.approvers.is_empty() && o.approvers.len() < o.min_approvals {
            return Err(format!("{} approvals needed but only {} approvers listed", o.min_approvals, o.approvers.len()));
        }
        Ok(())
    }

    fn run(_ctx: &Context, o: Options) -> Outcome {
        let mut approved: BTreeSet<String> =
            metadata::stage_get(APPROVED).map(|v| v.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect()).unwrap_or_default();
        let mut seen = BTreeSet::new();
        let who = if o.approvers.is_empty() { "anyone".to_string() } else { o.approvers.join(", ") };
        log::info(format!("waiting for {} approval(s) from {who}", o.min_approvals));
        loop {
            for command in commands::approvals() {
                if !seen.insert(command.id.clone()) {
                    continue;
                }
                let name = command.commander.clone();
                if !o.approvers.is_empty() && !o.approvers.contains(&name) {
                    let reason = format!("{name} is not one of the approvers ({who})");
                    log::warn(format!("approval refused: {reason}"));
                    commands::refuse(&command, &reason);
                    continue;
                }
                commands::accept(&command);
                if approved.insert(name.clone()) {
                    log::info(format!("approved by {name} ({}/{})", approved.len(), o.min_approvals));
                    let list: Vec<&str> = approved.iter().map(String::as_str).collect();
                    if let Err(e) = metadata::stage_put(APPROVED, &list.join(",")) {
                        return Outcome::Failure(format!("cannot record the approval: {e}"));
                    }
                }
            }
            if approved.len() >= o.min_approvals {
                let list: Vec<&str> = approved.iter().map(String::as_str).collect();
                return Outcome::Success(format!("approved by {}", list.join(", ")));
            }
            std::thread::sleep(POLL);
        }
    }
}

cordon_sdk::stage_plugin!(Approval);
cordon_sdk::manifest! {
    name: "approval",
    version: env!("CARGO_PKG_VERSION"),
    stages: <Approval as StagePlugin>::STAGES,
    capabilities: r#"{}"#,
}
