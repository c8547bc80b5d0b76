//! `cordon logs`: a deployment's stage log, optionally followed.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;

use cordon_pipeline::control;

use crate::follow;
use crate::print::{escape, json_line};

/// A deployment's stage logs.
#[derive(clap::Args)]
pub struct Logs {
    deployment: String,
    /// Only this stage (its id or name).
    #[arg(long)]
    stage: Option<String>,
    /// Keep printing new lines until the deployment ends; then exit 0 if
    /// it succeeded, 1 if not.
    #[arg(long, short)]
    follow: bool,
    /// One JSON object per line (stage, source, time, text).
    #[arg(long)]
    json: bool,
}

impl Logs {
    pub async fn run(self, config_path: &Path) -> Result<ExitCode> {
        let store = super::state(config_path)?;
        let id = self.deployment.as_str();
        control::deployment(store.as_ref(), id)?;
        let stage_id = match &self.stage {
            Some(s) => Some(control::resolve_stage(&store.stages(id)?, id, s)?.id.clone()),
            None => None,
        };
        let mut after = 0;
        loop {
            let ended = store.deployment(id)?.map(|d| d.status).filter(|s| s.is_final());
            let lines = store.logs(id, stage_id.as_deref(), after, 10_000)?;
            for l in &lines {
                after = l.seq;
                if self.json {
                    json_line(&mut std::io::stdout().lock(), l)?;
                    continue;
                }
                let stage = if l.stage.is_empty() { "plan" } else { &l.stage };
                println!("{stage} | {}: {}", l.source, escape(&l.text));
            }
            if !self.follow {
                return Ok(ExitCode::SUCCESS);
            }
            if let Some(status) = ended.filter(|_| lines.is_empty()) {
                return Ok(ExitCode::from(follow::exit_code(status)));
            }
            if lines.is_empty() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}
