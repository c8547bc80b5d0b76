//! The host's own memory under memory attacks: while a hostile plugin tries
//! to make the process hold memory — in its linear memory, in host-side
//! HTTP resources, in metadata it reads back, in log lines — and another
//! application is deployed beside it, the process's peak RSS grows by no
//! more than the plugins' memory limits together plus [`HOST_CONSTANT`].
//!
//! The peak is the kernel's high-water mark (`VmHWM`), reset through
//! `/proc/self/clear_refs` before each attack; the tests of this binary run
//! one at a time, so no other test's memory is counted.

use cordon_runtime::runner::Status;
use cordon_tests::{Dirs, NEIGHBOUR_MEMORY, Server, beside_a_neighbour, load, run};

/// What the host may hold besides the plugins' memories: the pool slots'
/// resident pages, HTTP header maps (`limits.handles` × 32 KiB = 32 MiB
/// at the defaults), the neighbour's state store, buffers of the log and
/// of returned data.
const HOST_CONSTANT: u64 = 64 << 20;

/// The attack's own memory limit in every test here.
const ATTACK_MEMORY: u64 = 64 << 20;

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("no {field} in /proc/self/status"));
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// Runs the attack beside a neighbour and checks the growth of the peak
/// RSS; returns the attack's reason.
async fn peak_within_limits(guest: &str, extra: &str, stage: &str, options: &str) -> String {
    let _one = ONE_AT_A_TIME.lock().await;
    let plugin = load(guest, &format!("    limits: {{ memory: 64MiB }}\n{extra}")).await.unwrap();
    std::fs::write("/proc/self/clear_refs", "5").expect("cannot reset the RSS high-water mark");
    let before = status_kib("VmRSS:");
    let (outcome, _) = beside_a_neighbour(run(&plugin, stage, options, Dirs::new().run_dirs())).await;
    let grown = status_kib("VmHWM:").saturating_sub(before);
    let allowed = ATTACK_MEMORY + 2 * NEIGHBOUR_MEMORY + HOST_CONSTANT;
    eprintln!("{guest} {options}: peak RSS grew by {} MiB (allowed {} MiB): {}", grown >> 20, allowed >> 20, outcome.message);
    assert_eq!(outcome.status, Status::Failure, "{outcome:?}");
    assert!(!outcome.message.contains("BREACH"), "{outcome:?}");
    assert!(grown <= allowed, "peak RSS grew by {grown} bytes, more than the limits ({}) plus {HOST_CONSTANT}", ATTACK_MEMORY + 2 * NEIGHBOUR_MEMORY);
    outcome.message
}

#[tokio::test]
async fn a_memory_bomb_stays_within_its_limit() {
    let reason = peak_within_limits("memory-bomb", "", "MEMORY_BOMB", "{}").await;
    assert!(reason.contains("memory limit exceeded"), "{reason}");
}

#[tokio::test]
async fn http_header_maps_stay_within_the_handle_budget() {
    let reason = peak_within_limits("http-flood", "", "HTTP_FLOOD", r#""fields""#).await;
    assert!(reason.contains("handle limit exceeded"), "{reason}");
}

#[tokio::test]
async fn reading_back_metadata_stays_within_its_quota() {
    let reason = peak_within_limits("state-flood", "", "STATE_FLOOD", r#""metadata""#).await;
    assert!(reason.contains("the deployment's metadata may hold"), "{reason}");
}

#[tokio::test]
async fn a_log_flood_stays_within_its_budget() {
    let reason = peak_within_limits("log-flood", "", "LOG_FLOOD", "{}").await;
    assert!(reason.contains("log output passed the plugin's limit"), "{reason}");
}

#[tokio::test]
async fn many_requests_stay_within_the_in_flight_cap() {
    let server = Server::ok("pong").await;
    let grants = format!("    grants: {{ network: {{ allow: [\"http://127.0.0.1:{}\"] }} }}\n", server.port);
    let options = serde_json::json!({ "requests": format!("127.0.0.1:{}", server.port) }).to_string();
    let reason = peak_within_limits("http-flood", &grants, "HTTP_FLOOD", &options).await;
    assert!(reason.contains("beyond 16 in flight"), "{reason}");
}
