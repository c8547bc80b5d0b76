//! `NEEDS_GRANTS`: declares capabilities in its manifest, so the host must
//! refuse it (naming each missing grant) unless the operator granted them.
use cordon_sdk::executor::{cordon::plugin::types::StageStatus, exports::cordon::plugin::execution::{StageRequest, StageResult}, finish};

cordon_sdk::single_stage!("NEEDS_GRANTS", "Requests capabilities in its manifest", run);

cordon_sdk::manifest! {
    name: "needs-grants",
    version: "1.2.3",
    stages: &[("NEEDS_GRANTS", "")],
    capabilities: r#"{
        "mounts": [{"guest": "/data", "access": "read-write"}],
        "network": ["https://api.example.com", "tcp"],
        "env": ["REGION"],
        "secrets": ["db-password"]
    }"#,
}

fn run(_request: StageRequest) -> StageResult {
    finish(StageStatus::Success, "")
}
