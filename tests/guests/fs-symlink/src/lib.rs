//! `FS_SYMLINK`: follows a symlink planted in the source that points outside.
//!
//! A hostile guest: it attempts the breach and reports honestly. Success
//! means the sandbox let the breach through, so the tests expect a failure
//! whose message names what stopped it.
#![allow(unused_imports)]
use std::io::{Read, Write};

use cordon_sdk::executor::{cordon::plugin::types::StageStatus, exports::cordon::plugin::execution::{StageRequest, StageResult}, finish};

cordon_sdk::single_stage!("FS_SYMLINK", "follows a symlink planted in the source that points outside", run);

fn run(request: StageRequest) -> StageResult {
    match attempt(&request) {
        Ok(breach) => finish(StageStatus::Success, format!("BREACH: {breach}")),
        Err(denied) => finish(StageStatus::Failure, denied),
    }
}


fn attempt(request: &StageRequest) -> Result<String, String> {
    // The test plants `escape` -> a directory outside the mount, and `chain` -> `escape`.
    let mut seen = Vec::new();
    for name in ["escape/secret.txt", "chain/secret.txt", "trailing/"] {
        let path = format!("{}/{name}", request.sources.target);
        match std::fs::read_to_string(&path) {
            Ok(s) => return Ok(format!("read {path}: {s}")),
            Err(e) => seen.push(format!("read {path}: {e}")),
        }
    }
    Err(seen.join("; "))
}
