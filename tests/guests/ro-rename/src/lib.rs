//! `RO_RENAME`: renames files into, within and out of the read-only source.
//!
//! A hostile guest: it attempts the breach and reports honestly. Success
//! means the sandbox let the breach through, so the tests expect a failure
//! whose message names what stopped it.
#![allow(unused_imports)]
use std::io::{Read, Write};

use cordon_sdk::executor::{cordon::plugin::types::StageStatus, exports::cordon::plugin::execution::{StageRequest, StageResult}, finish};

cordon_sdk::single_stage!("RO_RENAME", "renames files into, within and out of the read-only source", run);

fn run(request: StageRequest) -> StageResult {
    match attempt(&request) {
        Ok(breach) => finish(StageStatus::Success, format!("BREACH: {breach}")),
        Err(denied) => finish(StageStatus::Failure, denied),
    }
}


fn attempt(request: &StageRequest) -> Result<String, String> {
    let (src, scratch) = (&request.sources.target, &request.sources.scratch);
    std::fs::write(format!("{scratch}/mine.txt"), b"mine").map_err(|e| format!("scratch must be writable: {e}"))?;
    let mut seen = Vec::new();
    for (from, to) in [
        (format!("{scratch}/mine.txt"), format!("{src}/index.html")),
        (format!("{src}/index.html"), format!("{src}/moved.html")),
        (format!("{src}/index.html"), format!("{scratch}/stolen.html")),
    ] {
        match std::fs::rename(&from, &to) {
            Ok(()) => return Ok(format!("renamed {from} to {to}")),
            Err(e) => seen.push(format!("rename {from} -> {to}: {e}")),
        }
    }
    Err(seen.join("; "))
}
