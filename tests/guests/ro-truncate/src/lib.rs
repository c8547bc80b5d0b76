//! `RO_TRUNCATE`: truncates a file in the read-only source.
//!
//! A hostile guest: it attempts the breach and reports honestly. Success
//! means the sandbox let the breach through, so the tests expect a failure
//! whose message names what stopped it.
#![allow(unused_imports)]
use std::io::{Read, Write};

use cordon_sdk::executor::{cordon::plugin::types::StageStatus, exports::cordon::plugin::execution::{StageRequest, StageResult}, finish};

cordon_sdk::single_stage!("RO_TRUNCATE", "truncates a file in the read-only source", run);

fn run(request: StageRequest) -> StageResult {
    match attempt(&request) {
        Ok(breach) => finish(StageStatus::Success, format!("BREACH: {breach}")),
        Err(denied) => finish(StageStatus::Failure, denied),
    }
}


fn attempt(request: &StageRequest) -> Result<String, String> {
    let mut seen = Vec::new();
    let path = format!("{}/index.html", request.sources.target);
    match std::fs::OpenOptions::new().write(true).truncate(true).open(&path) {
        Ok(_) => return Ok(format!("truncated {path} on open")),
        Err(e) => seen.push(format!("open {path} with truncate: {e}")),
    }
    // A read-only handle must not be able to set the length either.
    match std::fs::File::open(&path).and_then(|f| f.set_len(0)) {
        Ok(()) => return Ok(format!("set_len(0) on {path}")),
        Err(e) => seen.push(format!("set_len {path}: {e}")),
    }
    Err(seen.join("; "))
}
