//! `ENV_READ`: reads environment variables it was not granted.
//!
//! A hostile guest: it attempts the breach and reports honestly. Success
//! means the sandbox let the breach through, so the tests expect a failure
//! whose message names what stopped it.
#![allow(unused_imports)]
use std::io::{Read, Write};

use cordon_sdk::executor::{cordon::plugin::types::StageStatus, exports::cordon::plugin::execution::{StageRequest, StageResult}, finish};

cordon_sdk::single_stage!("ENV_READ", "reads environment variables it was not granted", run);

fn run(request: StageRequest) -> StageResult {
    match attempt(&request) {
        Ok(breach) => finish(StageStatus::Success, format!("BREACH: {breach}")),
        Err(denied) => finish(StageStatus::Failure, denied),
    }
}


fn attempt(_request: &StageRequest) -> Result<String, String> {
    let all: Vec<String> = std::env::vars().map(|(k, _)| k).collect();
    match std::env::var("CORDON_TEST_SECRET") {
        Ok(v) => Ok(format!("CORDON_TEST_SECRET={v}")),
        Err(e) => Err(format!("env CORDON_TEST_SECRET: {e}; visible vars: [{}]", all.join(","))),
    }
}
