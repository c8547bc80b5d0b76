//! `MEMORY_BOMB`: allocates memory without end.
//!
//! A hostile guest: it attempts the breach and reports honestly. Success
//! means the sandbox let the breach through, so the tests expect a failure
//! whose message names what stopped it.
#![allow(unused_imports)]
use std::io::{Read, Write};

use cordon_sdk::executor::{cordon::plugin::types::StageStatus, exports::cordon::plugin::execution::{StageRequest, StageResult}, finish};

cordon_sdk::single_stage!("MEMORY_BOMB", "allocates memory without end", run);

fn run(request: StageRequest) -> StageResult {
    match attempt(&request) {
        Ok(breach) => finish(StageStatus::Success, format!("BREACH: {breach}")),
        Err(denied) => finish(StageStatus::Failure, denied),
    }
}


fn attempt(_request: &StageRequest) -> Result<String, String> {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        hoard.push(std::hint::black_box(vec![1u8; 16 << 20]));
        if hoard.len() > 1024 {
            return Ok(format!("held {} MiB", hoard.len() * 16));
        }
    }
}
