//! `RO_WRITE`: creates and appends to files in the read-only source.
//!
//! A hostile guest: it attempts the breach and reports honestly. Success
//! means the sandbox let the breach through, so the tests expect a failure
//! whose message names what stopped it.
#![allow(unused_imports)]
use std::io::{Read, Write};

use cordon_sdk::executor::{cordon::plugin::types::StageStatus, exports::cordon::plugin::execution::{StageRequest, StageResult}, finish};

cordon_sdk::single_stage!("RO_WRITE", "creates and appends to files in the read-only source", run);

fn run(request: StageRequest) -> StageResult {
    match attempt(&request) {
        Ok(breach) => finish(StageStatus::Success, format!("BREACH: {breach}")),
        Err(denied) => finish(StageStatus::Failure, denied),
    }
}


fn attempt(request: &StageRequest) -> Result<String, String> {
    let mut seen = Vec::new();
    let created = format!("{}/planted.txt", request.sources.target);
    match std::fs::File::create(&created) {
        Ok(_) => return Ok(format!("created {created}")),
        Err(e) => seen.push(format!("create {created}: {e}")),
    }
    let existing = format!("{}/index.html", request.sources.target);
    match std::fs::OpenOptions::new().append(true).open(&existing) {
        Ok(mut f) => if f.write_all(b"pwned").is_ok() { return Ok(format!("appended to {existing}")) },
        Err(e) => seen.push(format!("append {existing}: {e}")),
    }
    let dir = format!("{}/newdir", request.sources.target);
    match std::fs::create_dir(&dir) {
        Ok(()) => return Ok(format!("created {dir}")),
        Err(e) => seen.push(format!("mkdir {dir}: {e}")),
    }
    Err(seen.join("; "))
}
