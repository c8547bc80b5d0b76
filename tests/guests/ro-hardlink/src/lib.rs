//! `RO_HARDLINK`: hard-links files across the read-only boundary.
//!
//! A hostile guest: it attempts the breach and reports honestly. Success
//! means the sandbox let the breach through, so the tests expect a failure
//! whose message names what stopped it.
#![allow(unused_imports)]
use std::io::{Read, Write};

use cordon_sdk::executor::{cordon::plugin::types::StageStatus, exports::cordon::plugin::execution::{StageRequest, StageResult}, finish};

cordon_sdk::single_stage!("RO_HARDLINK", "hard-links files across the read-only boundary", run);

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
    // Into the read-only mount, and out of it into a writable one (which
    // would let the guest write the read-only file through the new name).
    for (from, to) in [
        (format!("{scratch}/mine.txt"), format!("{src}/linked.txt")),
        (format!("{src}/index.html"), format!("{scratch}/index-link.html")),
    ] {
        match std::fs::hard_link(&from, &to) {
            Ok(()) => {
                let wrote = std::fs::OpenOptions::new().append(true).open(&to).and_then(|mut f| f.write_all(b"pwned"));
                return Ok(format!("linked {from} to {to} (write through it: {wrote:?})"));
            }
            Err(e) => seen.push(format!("link {from} -> {to}: {e}")),
        }
    }
    Err(seen.join("; "))
}
