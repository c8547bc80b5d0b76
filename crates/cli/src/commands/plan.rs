//! `cordon plan`: what a deployment of an application would do, without
//! queuing it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Result;

use cordon_pipeline::config::AppConfig;
use cordon_pipeline::plan::PlanInput;
use cordon_pipeline::{self as pipeline, Host};
use cordon_runtime::sandbox::NullSink;
use cordon_store::{DeploymentRecord, now_ms};

use super::trigger::TriggerArgs;
use crate::follow;
use crate::print::{escape, json_line};

/// Show the strategy, stages, DAG and versions a deployment would get; runs no stage.
#[derive(clap::Args)]
pub struct Plan {
    app_dir: PathBuf,
    #[command(flatten)]
    trigger: TriggerArgs,
    /// One JSON object: application, running source, plan and stages.
    #[arg(long)]
    json: bool,
}

impl Plan {
    pub async fn run(self, config_path: &Path) -> Result<ExitCode> {
        let config = super::load_with_plugins(config_path).await?;
        let host = Host::open(&config).await?;
        let app = AppConfig::load(&self.app_dir)?;
        let trigger = self.trigger.info(host.store.as_ref())?;
        let running = host.running_source(&app.name)?.map(|(_, dir)| dir);
        let changed = pipeline::snapshot::changed_files(running.as_deref(), &self.app_dir)?;
        let scratch = tempfile::tempdir()?;
        let preview = DeploymentRecord::queued(&format!("{}-plan", app.name), &app.name, String::new(), self.app_dir.to_string_lossy().into_owned(), now_ms());
        let input = PlanInput {
            engine: &host.engine,
            plugins: &host.plugins,
            app: &app,
            trigger: &trigger,
            deployment: pipeline::deployment_info(&preview, &app, &trigger),
            target: self.app_dir.clone(),
            running: running.clone(),
            scratch: scratch.path().to_path_buf(),
            changed,
            sink: Arc::new(NullSink),
        };
        let planned = pipeline::plan::plan(&input).await?;
        let mut out = std::io::stdout().lock();
        if self.json {
            let value = serde_json::json!({ "application": app.name, "running": running, "plan": planned.summary, "stages": planned.stages });
            json_line(&mut out, &value)?;
            return Ok(ExitCode::SUCCESS);
        }
        writeln!(out, "application: {}", app.name)?;
        writeln!(out, "strategy:    {} ({})", planned.summary.strategy.as_str(), escape(&planned.summary.summary))?;
        writeln!(out, "running:     {}", running.map_or("none (first deployment)".to_string(), |p| p.display().to_string()))?;
        writeln!(out, "changed:     {} file(s)", planned.summary.changed.len())?;
        writeln!(out, "versions:")?;
        for v in &planned.summary.versions {
            writeln!(out, "  {}", escape(&format!("{} {} {} {} ({})", v.plugin, v.kind, v.name, v.version, v.url)))?;
        }
        writeln!(out, "stages:")?;
        for s in &planned.stages {
            let kind = if s.rollback { " (rollback)" } else { "" };
            writeln!(out, "  {:<24} plugin {:<12} {}{kind}", s.id, s.plugin, follow::needs_text(s))?;
        }
        Ok(ExitCode::SUCCESS)
    }
}
