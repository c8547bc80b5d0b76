//! `DISK_FILL`: writes 1 MiB chunks into one file (options
//! `{"dir": "/scratch"}`) or creates empty files (`{"dir": …, "files":
//! true}`) in a directory until something stops it — in a host without a
//! disk budget, the disk.
use std::io::Write;

use cordon_sdk::executor::{cordon::plugin::types::StageStatus, exports::cordon::plugin::execution::{StageRequest, StageResult}, finish};

cordon_sdk::single_stage!("DISK_FILL", "writes to a directory until the host stops it", run);

fn run(request: StageRequest) -> StageResult {
    let options: serde_json::Value = serde_json::from_str(&request.stage.options).unwrap_or_default();
    let dir = options["dir"].as_str().unwrap_or("/scratch").to_string();
    if options["files"].as_bool().unwrap_or(false) {
        for i in 0..10_000_000u64 {
            if let Err(e) = std::fs::File::create(format!("{dir}/f-{i}")) {
                return finish(StageStatus::Failure, format!("create failed after {i} files: {e}"));
            }
        }
        return finish(StageStatus::Success, "BREACH: created 10 million files".to_string());
    }
    let mut file = match std::fs::File::create(format!("{dir}/fill")) {
        Ok(file) => file,
        Err(e) => return finish(StageStatus::Failure, format!("create {dir}/fill: {e}")),
    };
    let chunk = vec![0x5au8; 1 << 20];
    for written in 0..8192u64 {
        if let Err(e) = file.write_all(&chunk) {
            return finish(StageStatus::Failure, format!("write failed after {written} MiB: {e}"));
        }
    }
    finish(StageStatus::Success, "BREACH: wrote 8 GiB".to_string())
}
