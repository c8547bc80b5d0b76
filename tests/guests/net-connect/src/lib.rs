//! `NET_CONNECT`: opens a TCP connection to a destination not granted.
//!
//! A hostile guest: it attempts the breach and reports honestly. Success
//! means the sandbox let the breach through, so the tests expect a failure
//! whose message names what stopped it.
#![allow(unused_imports)]
use std::io::{Read, Write};

use cordon_sdk::executor::{cordon::plugin::types::StageStatus, exports::cordon::plugin::execution::{StageRequest, StageResult}, finish};

cordon_sdk::single_stage!("NET_CONNECT", "opens a TCP connection to a destination not granted", run);

fn run(request: StageRequest) -> StageResult {
    match attempt(&request) {
        Ok(breach) => finish(StageStatus::Success, format!("BREACH: {breach}")),
        Err(denied) => finish(StageStatus::Failure, denied),
    }
}


fn attempt(request: &StageRequest) -> Result<String, String> {
    let addr: String = request.stage.options.trim_matches(|c| c == 0x22 as char).to_string();
    std::net::TcpStream::connect(addr.as_str()).map(|_| format!("connected to {addr}")).map_err(|e| format!("connect {addr}: {e}"))
}
