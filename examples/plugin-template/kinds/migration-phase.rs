//! `{{name}}`: a Cordon migration phase that counts the selected source
//! keys page by page, checkpointing after every page.
//! Options: `{"page-entries": 1000}`.

use cordon_sdk::migrate::{Budget, MigrationPhase, Step, StepContext};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Options {
    #[serde(default = "default_page")]
    page_entries: u32,
}

fn default_page() -> u32 {
    1000
}

/// Where the scan stands (the host's continue token), and what it counted so far.
#[derive(Serialize, Deserialize)]
struct Checkpoint {
    next: String,
    counted: u64,
}

struct Count;

impl MigrationPhase for Count {
    type Options = Options;
    type Checkpoint = Checkpoint;

    fn step(ctx: &StepContext<'_>, o: Options, at: Option<Checkpoint>) -> Result<Step<Checkpoint>, String> {
        let (start, counted) = match at {
            Some(c) => (Some(c.next), c.counted),
            None => (None, 0),
        };
        let page = ctx.source.scan(start.as_deref(), Budget { max_entries: o.page_entries, max_bytes: 4 << 20 })?;
        let bytes = page.entries.iter().map(|e| (e.key.len() + e.value.len()) as u64).sum();
        let counted = counted + page.entries.len() as u64;
        let step = match page.continue_from {
            Some(next) => Step::more(Checkpoint { next, counted }, format!("{counted} keys so far")),
            None => Step::done(format!("{counted} keys selected")),
        };
        Ok(step.counted(page.entries.len() as u64, bytes))
    }
}

cordon_sdk::migration_phase_plugin!(Count);

cordon_sdk::manifest! {
    name: "{{name}}",
    version: env!("CARGO_PKG_VERSION"),
    stages: &[],
    capabilities: r#"{}"#,
}
