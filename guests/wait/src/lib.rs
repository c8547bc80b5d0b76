//! `WAIT` — holds the pipeline for `duration` seconds.
//!
//! Options: `{"duration": <seconds>}` (default 10). The start time is kept in
//! stage metadata, so a stage re-run after an agent restart waits only for
//! what is left instead of starting over. Needs no grants.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cordon_sdk::{Context, Outcome, StagePlugin, log, metadata};
use schemars::JsonSchema;
use serde::Deserialize;

const START_KEY: &str = "wait.start-unix-ms";

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct Options {
    /// How long to wait, in seconds (fractions allowed), at most 30 days.
    #[serde(default = "default_duration")]
    #[schemars(range(min = 0.0, max = 2592000.0))]
    duration: f64,
}

/// The longest wait: 30 days (longer is a typo, and would overflow).
const MAX_SECONDS: f64 = 30.0 * 24.0 * 3600.0;

fn default_duration() -> f64 {
    10.0
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

struct Wait;

impl StagePlugin for Wait {
    const STAGES: &'static [(&'static str, &'static str)] = &[("WAIT", "Wait for a duration; survives agent restarts")];
    type Options = Options;

    fn validate(options: &Options) -> Result<(), String> {
        if !(options.duration.is_finite() && (0.0..=MAX_SECONDS).contains(&options.duration)) {
            return Err(format!("duration must be a number of seconds from 0 to {MAX_SECONDS} (30 days), not {}", options.duration));
        }
        Ok(())
    }

    fn run(_ctx: &Context, options: Options) -> Outcome {
        let start = match metadata::stage_get(START_KEY).and_then(|v| v.parse::<u64>().ok()) {
            Some(start) => {
                log::info(format!("resuming a wait that started at {start} (unix ms)"));
                start
            }
            None => {
                let start = now_ms();
                if let Err(e) = metadata::stage_put(START_KEY, &start.to_string()) {
                    return Outcome::Failure(format!("cannot record the start time: {e}"));
                }
                start
            }
        };
        let end = start + (options.duration * 1000.0) as u64;
        log::info(format!("waiting {:.1}s", options.duration));
        while now_ms() < end {
            std::thread::sleep(Duration::from_millis((end - now_ms()).min(5_000)));
            if end > now_ms() {
                log::info(format!("{:.0}s left", (end - now_ms()) as f64 / 1000.0));
            }
        }
        log::info("wait finished");
        Outcome::Success(String::new())
    }
}

cordon_sdk::stage_plugin!(Wait);
cordon_sdk::manifest! {
    name: "wait",
    version: env!("CARGO_PKG_VERSION"),
    stages: <Wait as StagePlugin>::STAGES,
    capabilities: r#"{}"#,
}
