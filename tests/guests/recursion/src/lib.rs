//! `RECURSION`: recurses without bound.
//!
//! A hostile guest: it attempts the breach and reports honestly. Success
//! means the sandbox let the breach through, so the tests expect a failure
//! whose message names what stopped it.
#![allow(unused_imports)]
use std::io::{Read, Write};

use cordon_sdk::executor::{cordon::plugin::types::StageStatus, exports::cordon::plugin::execution::{StageRequest, StageResult}, finish};

cordon_sdk::single_stage!("RECURSION", "recurses without bound", run);

fn run(request: StageRequest) -> StageResult {
    match attempt(&request) {
        Ok(breach) => finish(StageStatus::Success, format!("BREACH: {breach}")),
        Err(denied) => finish(StageStatus::Failure, denied),
    }
}


fn attempt(_request: &StageRequest) -> Result<String, String> {
    #[allow(unconditional_recursion)]
    fn deeper(n: u64) -> u64 {
        let pad = std::hint::black_box([n; 16]);
        deeper(n + 1) + pad[3]
    }
    Ok(format!("returned {}", deeper(0)))
}
