//! `finalize`: the last check before the host marks the migration done and
//! releases its unit: the destination holds the unit's keys and, when
//! `require-empty-source` is set (the spec has a `cleanup`), the source
//! holds none. Options: `{"require-empty-source": false}`.

use cordon_sdk::migrate::{Budget, MigrationPhase, Step, StepContext};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Options {
    #[serde(default)]
    require_empty_source: bool,
}

struct Finalize;

impl MigrationPhase for Finalize {
    type Options = Options;
    type Checkpoint = ();

    fn step(ctx: &StepContext<'_>, o: Options, _: Option<()>) -> Result<Step<()>, String> {
        let one = Budget { max_entries: 1, max_bytes: u64::MAX };
        let left = ctx.source.scan(None, one)?;
        if let Some(e) = left.entries.first()
            && o.require_empty_source
        {
            return Err(format!("the source still holds selected keys (first {:?}); run cleanup first", String::from_utf8_lossy(&e.key)));
        }
        if ctx.destination.scan(None, one)?.entries.is_empty() && !left.entries.is_empty() {
            return Err("the destination holds none of the unit's keys".into());
        }
        let source = if left.entries.is_empty() { "the source holds none of them" } else { "the source still holds them (no cleanup)" };
        Ok(Step::done(format!("the unit now lives in the destination; {source}")))
    }
}

cordon_sdk::migration_phase_plugin!(Finalize);
cordon_sdk::manifest! {
    name: "migrate-finalize",
    version: env!("CARGO_PKG_VERSION"),
    stages: &[],
    capabilities: r#"{}"#,
}
