//! `HTTP_CHECK` — an analysis stage: requests a URL until enough checks
//! pass, through `wasi:http`, so the operator's network grant decides which
//! URLs it may reach (a URL outside the grant fails the stage).
//!
//! Options:
//! `{"url": "http://127.0.0.1:8080/", "expectedStatus": 200,
//!   "bodyContains": "version 2", "tries": 3, "interval": 1.0,
//!   "successThreshold": 1, "compareWithLast": false,
//!   "maxLatencyRegression": 3.0}` — only `url` is required.
//!
//! Up to `tries` requests, `interval` seconds apart; the stage succeeds as
//! soon as `successThreshold` of them passed (right status, body contains
//! the text) and fails when that can no longer happen. The result (passes,
//! last status, median latency, body digest) is kept in the application's
//! blobs; with `compareWithLast` the stage reports the difference from the
//! last result and fails if the median latency grew more than
//! `maxLatencyRegression` times.

use std::time::{Duration, Instant};

use cordon_sdk::{Context, Outcome, StagePlugin, blobs, log};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Options {
    /// The URL to request; the agent's network grant must allow it.
    url: String,
    /// The HTTP status a passing check answers with.
    #[serde(default = "ok_status")]
    expected_status: u16,
    /// Text the body of a passing check contains.
    #[serde(default)]
    body_contains: Option<String>,
    /// How many requests at most.
    #[serde(default = "three")]
    #[schemars(range(min = 1))]
    tries: u32,
    /// Seconds between requests.
    #[serde(default = "one_second")]
    #[schemars(range(min = 0.0))]
    interval: f64,
    /// How many checks must pass, at most `tries`.
    #[serde(default = "one")]
    #[schemars(range(min = 1))]
    success_threshold: u32,
    /// Compare with the last deployment's result and fail on a latency regression.
    #[serde(default)]
    compare_with_last: bool,
    /// With `compareWithLast`: the largest allowed growth of the median latency, as a factor.
    #[serde(default = "regression")]
    max_latency_regression: f64,
}

fn ok_status() -> u16 {
    200
}
fn three() -> u32 {
    3
}
fn one() -> u32 {
    1
}
fn one_second() -> f64 {
    1.0
}
fn regression() -> f64 {
    3.0
}

/// What is kept between deployments.
#[derive(Serialize, Deserialize, Debug)]
struct CheckResult {
    ok: bool,
    passes: u32,
    tries: u32,
    last_status: Option<u16>,
    median_latency_ms: u64,
    body_sha: String,
}

fn digest(body: &[u8]) -> String {
    // FNV-1a: a cheap fingerprint to tell "same page" from "changed page".
    let mut h: u64 = 0xcbf29ce484222325;
    for b in body {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

struct HttpCheck;

impl StagePlugin for HttpCheck {
    const STAGES: &'static [(&'static str, &'static str)] = &[("HTTP_CHECK", "Check a URL over HTTP until enough checks pass")];
    type Options = Options;

    fn validate(o: &Options) -> Result<(), String> {
        if o.tries == 0 || o.success_threshold == 0 || o.success_threshold > o.tries || !o.interval.is_finite() || o.interval < 0.0 {
            return Err("need 1 <= successThreshold <= tries and interval >= 0".into());
        }
        Ok(())
    }

    fn run(_ctx: &Context, options: Options) -> Outcome {
        check(options)
    }
}

cordon_sdk::stage_plugin!(HttpCheck);
cordon_sdk::manifest! {
    name: "http-check",
    version: env!("CARGO_PKG_VERSION"),
    stages: <HttpCheck as StagePlugin>::STAGES,
    capabilities: r#"{"network": ["http"]}"#,
}

fn check(o: Options) -> Outcome {
    let mut passes = 0;
    let mut latencies = Vec::new();
    let mut last_status = None;
    let mut last_error = String::new();
    let mut body_sha = String::new();
    for attempt in 1..=o.tries {
        let started = Instant::now();
        match cordon_sdk::http::get(&o.url, 1 << 20) {
            Ok(response) => {
                let ms = started.elapsed().as_millis() as u64;
                latencies.push(ms);
                last_status = Some(response.status);
                body_sha = digest(&response.body);
                let body_ok = o.body_contains.as_ref().is_none_or(|t| String::from_utf8_lossy(&response.body).contains(t.as_str()));
                if response.status == o.expected_status && body_ok {
                    passes += 1;
                    log::info(format!("check {attempt}/{}: {} in {ms} ms, passed", o.tries, response.status));
                } else {
                    last_error = if response.status != o.expected_status {
                        format!("status {} (expected {})", response.status, o.expected_status)
                    } else {
                        format!("the body does not contain {:?}", o.body_contains.as_deref().unwrap_or_default())
                    };
                    log::warn(format!("check {attempt}/{}: {last_error}", o.tries));
                }
            }
            Err(e) => {
                last_error = e;
                log::warn(format!("check {attempt}/{}: {last_error}", o.tries));
            }
        }
        if passes >= o.success_threshold || passes + (o.tries - attempt) < o.success_threshold {
            break;
        }
        std::thread::sleep(Duration::from_secs_f64(o.interval));
    }
    latencies.sort_unstable();
    let median = latencies.get(latencies.len() / 2).copied().unwrap_or(0);
    let ok = passes >= o.success_threshold;
    let result = CheckResult { ok, passes, tries: o.tries, last_status, median_latency_ms: median, body_sha };
    let key = format!("last-result:{}", o.url);
    let previous: Option<CheckResult> = blobs::get(&key).and_then(|b| serde_json::from_slice(&b).ok());
    if let Err(e) = blobs::put(&key, &serde_json::to_vec(&result).unwrap_or_default()) {
        log::warn(format!("cannot keep the result: {e}"));
    }
    if !ok {
        return Outcome::Failure(format!("{passes} of {} checks of {} passed, {} needed: {last_error}", o.tries, o.url, o.success_threshold));
    }
    if o.compare_with_last {
        match previous {
            None => log::info("no last result to compare with"),
            Some(last) => {
                log::info(
                    format!(
                        "last result: {} passes, median {} ms, page {}; now: {passes} passes, median {median} ms, page {}",
                        last.passes,
                        last.median_latency_ms,
                        if last.body_sha == result.body_sha { "unchanged" } else { "changed" },
                        result.body_sha
                    ),
                );
                let limit = (last.median_latency_ms.max(1) as f64 * o.max_latency_regression) as u64;
                if last.ok && median > limit {
                    return Outcome::Failure(format!("median latency {median} ms regressed more than {}x from the last result ({} ms)", o.max_latency_regression, last.median_latency_ms));
                }
            }
        }
    }
    Outcome::Success(format!("{passes} of {} checks passed", o.tries))
}
