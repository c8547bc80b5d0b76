//! `cordon agents`: the agents that report on this state, with what they
//! offer (labels, stages) and their last heartbeat.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;

use cordon_pipeline::{agent, labels_text};
use cordon_store::now_ms;

use crate::print::{ago, escape, json_line};

/// Agents silent longer than this are left out unless `--all` is given:
/// every agent process leaves a row, and old ones would drown the live.
const GONE_FOR: Duration = Duration::from_secs(24 * 3600);

/// The agents that report on this state.
#[derive(clap::Args)]
pub struct Agents {
    /// Also list agents silent for more than a day.
    #[arg(long)]
    all: bool,
    /// One JSON object per line (the heartbeat, and `state`).
    #[arg(long)]
    json: bool,
}

impl Agents {
    pub fn run(self, config_path: &Path) -> Result<ExitCode> {
        let store = super::state(config_path)?;
        let now = now_ms();
        let mut out = std::io::stdout().lock();
        if !self.json {
            writeln!(out, "{:<20} {:<28} {:<6} {:>9}  {:<24} STAGES", "NAME", "ID", "STATE", "BEAT", "LABELS")?;
        }
        for beat in store.agents()? {
            let silent = agent::silence(&beat, now);
            if silent > GONE_FOR && !self.all {
                continue;
            }
            let state = if silent < agent::STALE { "alive" } else { "gone" };
            if self.json {
                json_line(&mut out, &serde_json::json!({ "agent": beat, "state": state }))?;
                continue;
            }
            let stages = if beat.stages.is_empty() { "none".to_string() } else { beat.stages.join(", ") };
            writeln!(
                out,
                "{:<20} {:<28} {:<6} {:>9}  {:<24} {}",
                escape(&beat.name),
                escape(&beat.id),
                state,
                ago(beat.beat_at),
                escape(&labels_text(&beat.labels)),
                escape(&stages)
            )?;
        }
        Ok(ExitCode::SUCCESS)
    }
}
