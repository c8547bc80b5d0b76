//! `LOG_FLOOD`: writes log lines without end; with the options
//! `"newlines"`, one `log.write` of four million empty lines and then as
//! many through stdout (cheap for the guest, costly to store).
//!
//! A hostile guest: it attempts the breach and reports honestly. Success
//! means the sandbox let the breach through, so the tests expect a failure
//! whose message names what stopped it.
#![allow(unused_imports)]
use std::io::{Read, Write};

use cordon_sdk::executor::{cordon::plugin::types::StageStatus, exports::cordon::plugin::execution::{StageRequest, StageResult}, finish};

cordon_sdk::single_stage!("LOG_FLOOD", "writes log lines without end", run);

fn run(request: StageRequest) -> StageResult {
    match attempt(&request) {
        Ok(breach) => finish(StageStatus::Success, format!("BREACH: {breach}")),
        Err(denied) => finish(StageStatus::Failure, denied),
    }
}


fn attempt(request: &StageRequest) -> Result<String, String> {
    if request.stage.options.contains("newlines") {
        let flood = "\n".repeat(4_000_000);
        cordon_sdk::executor::cordon::plugin::log::write(cordon_sdk::executor::cordon::plugin::log::Level::Info, &flood);
        print!("{flood}");
        return Ok("four million empty lines were accepted".into());
    }
    let line = "flood ".repeat(100);
    let mut n: u64 = 0;
    loop {
        // Alternate the sinks: the stage log import, stdout and stderr share one budget.
        match n % 3 {
            0 => cordon_sdk::executor::cordon::plugin::log::write(cordon_sdk::executor::cordon::plugin::log::Level::Info, &line),
            1 => println!("{line}"),
            _ => eprintln!("{line}"),
        }
        n += 1;
    }
}
