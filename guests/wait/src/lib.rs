//! `WAIT` — holds the pipeline for `duration` seconds.
//!
//! Options: `{"duration": <seconds>}` (default 10). The start time is kept in
//! stage metadata, so a stage re-run after an agent restart waits only for
//! what is left instead of starting over. Needs no grants.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cordon_sdk::executor::{
    cordon::plugin::{
        log::{self, Level},
        metadata::{self, Scope},
        types::StageStatus,
    },
    exports::cordon::plugin::{
        execution::{Guest, StageRequest, StageResult},
        stages::{self, StageDefinition},
    },
    finish, stage,
};
use serde::Deserialize;

const START_KEY: &str = "wait.start-unix-ms";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    #[serde(default = "default_duration")]
    duration: f64,
}

fn default_duration() -> f64 {
    10.0
}

struct Wait;

impl stages::Guest for Wait {
    fn defined_stages() -> Vec<StageDefinition> {
        vec![stage("WAIT", "Wait for a duration; survives agent restarts")]
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Guest for Wait {
    fn execute_stage(request: StageRequest) -> StageResult {
        let options: Options = match serde_json::from_str(&request.stage.options) {
            Ok(o) => o,
            Err(e) => return finish(StageStatus::Failure, format!("invalid WAIT options: {e}")),
        };
        if !(options.duration.is_finite() && options.duration >= 0.0) {
            return finish(StageStatus::Failure, "invalid WAIT options: duration must be a non-negative number of seconds");
        }
        let total_ms = (options.duration * 1000.0) as u64;
        let start = match metadata::get(Scope::Stage, START_KEY).and_then(|v| v.parse::<u64>().ok()) {
            Some(start) => {
                log::write(Level::Info, &format!("resuming a wait that started at {start} (unix ms)"));
                start
            }
            None => {
                let start = now_ms();
                if let Err(e) = metadata::put(Scope::Stage, START_KEY, &start.to_string()) {
                    return finish(StageStatus::Failure, format!("cannot record the start time: {e}"));
                }
                start
            }
        };
        let end = start + total_ms;
        log::write(Level::Info, &format!("waiting {:.1}s", options.duration));
        loop {
            let now = now_ms();
            if now >= end {
                break;
            }
            let left = end - now;
            std::thread::sleep(Duration::from_millis(left.min(5_000)));
            if end > now_ms() {
                log::write(Level::Info, &format!("{:.0}s left", (end - now_ms()) as f64 / 1000.0));
            }
        }
        log::write(Level::Info, "wait finished");
        finish(StageStatus::Success, "")
    }
}

cordon_sdk::executor::export_executor!(Wait);
cordon_sdk::manifest!(r#"{"name": "wait", "version": "0.1.0", "contract": "0.1.0", "stages": ["WAIT"], "capabilities": {}}"#);
