//! `prepare`: claims the migration's unit (a second migration of the same
//! unit is refused from here on) and checks that the destination holds
//! none of the selected keys, so that nothing there is overwritten
//! unnoticed. Options: `{"allow-existing": false}` — `true` merges into a
//! destination that already holds some.

use cordon_sdk::migrate::{Budget, MigrationPhase, Step, StepContext};
use serde::Deserialize;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Options {
    #[serde(default)]
    allow_existing: bool,
}

struct Prepare;

impl MigrationPhase for Prepare {
    type Options = Options;
    type Checkpoint = ();

    fn step(ctx: &StepContext<'_>, o: Options, _: Option<()>) -> Result<Step<()>, String> {
        ctx.source.claim()?;
        let first = ctx.destination.scan(None, Budget { max_entries: 1, max_bytes: u64::MAX })?;
        if let Some(e) = first.entries.first() {
            if !o.allow_existing {
                return Err(format!(
                    "the destination already holds selected keys (first {:?}); refusing to overwrite them. Remove them, or set `allow-existing: true` to merge",
                    String::from_utf8_lossy(&e.key)
                ));
            }
            return Ok(Step::done(format!("unit claimed by {}; merging into a destination that already holds selected keys", ctx.migration_id)));
        }
        Ok(Step::done(format!("unit claimed by {}; the destination holds none of its keys", ctx.migration_id)))
    }
}

cordon_sdk::migration_phase_plugin!(Prepare);
cordon_sdk::manifest! {
    name: "migrate-prepare",
    version: env!("CARGO_PKG_VERSION"),
    stages: &[],
    capabilities: r#"{}"#,
}
