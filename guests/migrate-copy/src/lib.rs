//! `copy`: copies the selected keys page by page: one page per step, a
//! checkpoint (the scan's continue token) after every page. Writes are
//! idempotent, so a page repeated after a crash leaves the same entries.
//!
//! Options: `{"page-entries": 1000, "page-bytes": 4194304}` (the spec's
//! budget caps both). Under `continue-and-report`, a page whose write fails
//! is written entry by entry and the entries that still fail are counted
//! and named; `verify` then refuses the migration.

use cordon_sdk::migrate::{Budget, MigrationPhase, Step, StepContext};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Options {
    #[serde(default = "default_entries")]
    page_entries: u32,
    #[serde(default = "default_bytes")]
    page_bytes: u64,
}

fn default_entries() -> u32 {
    u32::MAX
}

fn default_bytes() -> u64 {
    u64::MAX
}

#[derive(Serialize, Deserialize)]
struct Checkpoint {
    token: String,
    copied: u64,
}

struct Copy;

impl MigrationPhase for Copy {
    type Options = Options;
    type Checkpoint = Checkpoint;

    fn step(ctx: &StepContext<'_>, o: Options, at: Option<Checkpoint>) -> Result<Step<Checkpoint>, String> {
        let (token, copied) = match at {
            Some(c) => (Some(c.token), c.copied),
            None => (None, 0),
        };
        let page = ctx.source.scan(token.as_deref(), Budget { max_entries: o.page_entries, max_bytes: o.page_bytes })?;
        let entries = page.entries.len() as u64;
        let bytes: u64 = page.entries.iter().map(|e| (e.key.len() + e.value.len()) as u64).sum();
        let mut failed = Vec::new();
        if let Err(e) = ctx.destination.put(&page.entries) {
            if !ctx.continue_on_error() {
                return Err(format!("writing a page of {entries} entries: {e}"));
            }
            for entry in &page.entries {
                if let Err(e) = ctx.destination.put(std::slice::from_ref(entry)) {
                    failed.push(format!("{:?}: {e}", String::from_utf8_lossy(&entry.key)));
                }
            }
        }
        let copied = copied + entries - failed.len() as u64;
        let mut summary = format!("{copied} entries copied");
        if let Some(first) = failed.first() {
            summary = format!("{summary}; {} failed, first {first}", failed.len());
        }
        let step = match page.continue_from {
            Some(token) => Step::more(Checkpoint { token, copied }, summary),
            None => Step::done(summary),
        };
        Ok(step.counted(entries - failed.len() as u64, bytes).failed(failed.len() as u64))
    }
}

cordon_sdk::migration_phase_plugin!(Copy);
cordon_sdk::manifest! {
    name: "migrate-copy",
    version: env!("CARGO_PKG_VERSION"),
    stages: &[],
    capabilities: r#"{}"#,
}
