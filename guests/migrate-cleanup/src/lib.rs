//! `cleanup`: deletes the selected keys from the source, a page per step
//! (the host refuses any delete before `verify` passed). Deleted keys drop
//! out of the scan, so every step scans from the start: the phase ends
//! when a rescan finds no selected key left — the proof that none remain.
//!
//! A failed delete is recorded in the checkpoint and retried on the next
//! step. Under `fail-fast` the phase fails once a page has failed
//! `retries` times in a row; under `continue-and-report` it stops
//! deleting, reports how many keys remain, and the migration ends with
//! errors. Options: `{"page-entries": 1000, "retries": 3}`.

use cordon_sdk::migrate::{Budget, MigrationPhase, Step, StepContext};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Options {
    #[serde(default = "default_entries")]
    page_entries: u32,
    #[serde(default = "default_retries")]
    retries: u32,
}

fn default_entries() -> u32 {
    u32::MAX
}

fn default_retries() -> u32 {
    3
}

#[derive(Serialize, Deserialize, Default)]
struct Checkpoint {
    deleted: u64,
    /// Consecutive failed attempts on the current first page.
    failures: u32,
    last_error: Option<String>,
}

struct Cleanup;

impl MigrationPhase for Cleanup {
    type Options = Options;
    type Checkpoint = Checkpoint;

    fn step(ctx: &StepContext<'_>, o: Options, at: Option<Checkpoint>) -> Result<Step<Checkpoint>, String> {
        let mut c = at.unwrap_or_default();
        let page = ctx.source.scan(None, Budget { max_entries: o.page_entries, max_bytes: u64::MAX })?;
        if page.entries.is_empty() {
            return Ok(Step::done(format!("{} keys deleted; a rescan found none left", c.deleted)));
        }
        let keys: Vec<Vec<u8>> = page.entries.iter().map(|e| e.key.clone()).collect();
        let bytes = page.entries.iter().map(|e| (e.key.len() + e.value.len()) as u64).sum();
        match ctx.source.delete(&keys) {
            Ok(n) => {
                c.deleted += u64::from(n);
                c.failures = 0;
                let summary = format!("{} keys deleted", c.deleted);
                Ok(Step::more(c, summary).counted(u64::from(n), bytes))
            }
            Err(e) => {
                c.failures += 1;
                c.last_error = Some(e.clone());
                if c.failures <= o.retries {
                    let summary = format!("delete failed ({e}); retry {} of {}", c.failures, o.retries);
                    return Ok(Step::more(c, summary));
                }
                if !ctx.continue_on_error() {
                    return Err(format!("deleting {} keys failed {} times: {e}", keys.len(), c.failures));
                }
                let summary = format!("{} keys deleted; gave up on the rest after {} failures ({e}); they remain in the source", c.deleted, c.failures);
                Ok(Step::done(summary).failed(keys.len() as u64))
            }
        }
    }
}

cordon_sdk::migration_phase_plugin!(Cleanup);
cordon_sdk::manifest! {
    name: "migrate-cleanup",
    version: env!("CARGO_PKG_VERSION"),
    stages: &[],
    capabilities: r#"{}"#,
}
