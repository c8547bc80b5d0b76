//! `STATE_FLOOD`: stores 64 KiB metadata values (options `"metadata"`) or
//! 16 MiB blobs (`"blobs"`) under new keys until the host refuses one — in
//! a host without quotas, until the state database fills the disk — and
//! then reads every metadata entry back at once.
use cordon_sdk::executor::cordon::plugin::{blobs, metadata};
use cordon_sdk::executor::{cordon::plugin::types::StageStatus, exports::cordon::plugin::execution::{StageRequest, StageResult}, finish};

cordon_sdk::single_stage!("STATE_FLOOD", "fills metadata or blobs until the host refuses", run);

fn run(request: StageRequest) -> StageResult {
    let mode: String = serde_json::from_str(&request.stage.options).unwrap_or_default();
    for i in 0..100_000 {
        let stored = match mode.as_str() {
            "blobs" => blobs::put(&format!("blob-{i}"), &vec![b'b'; 16 << 20]),
            _ => metadata::put(metadata::Scope::Deployment, &format!("key-{i}"), &"m".repeat(64 << 10)),
        };
        if let Err(e) = stored {
            let held = metadata::entries(metadata::Scope::Deployment).len();
            return finish(StageStatus::Failure, format!("refused after {i} writes ({held} metadata entries): {e}"));
        }
    }
    finish(StageStatus::Success, "BREACH: 100000 writes stored".to_string())
}
