//! `NET_HTTP`: sends an HTTP request to a destination not granted.
//!
//! A hostile guest: it attempts the breach and reports honestly. Success
//! means the sandbox let the breach through, so the tests expect a failure
//! whose message names what stopped it.
#![allow(unused_imports)]
use std::io::{Read, Write};

use cordon_sdk::executor::{cordon::plugin::types::StageStatus, exports::cordon::plugin::execution::{StageRequest, StageResult}, finish};

cordon_sdk::single_stage!("NET_HTTP", "sends an HTTP request to a destination not granted", run);

fn run(request: StageRequest) -> StageResult {
    match attempt(&request) {
        Ok(breach) => finish(StageStatus::Success, format!("BREACH: {breach}")),
        Err(denied) => finish(StageStatus::Failure, denied),
    }
}


fn attempt(request: &StageRequest) -> Result<String, String> {
    let url: String = request.stage.options.trim_matches(|c| c == 0x22 as char).to_string();
    cordon_sdk::http::get(&url, 4096).map(|r| format!("GET {url}: {}", r.status)).map_err(|e| format!("GET {url}: {e}"))
}
