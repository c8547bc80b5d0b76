//! `cordon stage run`: one stage of one plugin, once, in its sandbox.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Subcommand;

use cordon_pipeline::config::AppConfig;
use cordon_runtime::plugin::{AgentConfig, Plugin};
use cordon_runtime::runner::{self, StageCall};
use cordon_runtime::sandbox::RunDirs;

use crate::print::{PrintSink, escape};

#[derive(Subcommand)]
pub enum StageCommand {
    /// Run one stage of one plugin once, in its sandbox, and exit with its status.
    Run {
        /// Plugin name from the agent config.
        #[arg(long)]
        plugin: String,
        /// Stage name, e.g. WAIT.
        #[arg(long)]
        stage: String,
        /// Stage options as JSON, e.g. '{"duration": 2}'.
        #[arg(long = "with", default_value = "{}")]
        with: String,
        /// Directory mounted read-only as the target source (/source).
        #[arg(long)]
        source: Option<PathBuf>,
        /// Directory mounted read-only as the running source (/running).
        #[arg(long)]
        running: Option<PathBuf>,
        /// An application directory: the stage gets its settings for this
        /// plugin (`plugins.<name>` of its app.cordon.yaml) and its name, and
        /// the directory is the source unless --source says otherwise.
        #[arg(long)]
        app: Option<PathBuf>,
    },
}

impl StageCommand {
    pub async fn run(self, config_path: &Path) -> Result<ExitCode> {
        let StageCommand::Run { plugin: plugin_name, stage, with, source, running, app: app_dir } = self;
        let config = AgentConfig::load(config_path)?;
        let app = app_dir.as_deref().map(AppConfig::load).transpose()?;
        let source = source.or(app_dir);
        let plugin_config = config.plugin(&plugin_name)?;
        cordon_registry::fetch_plugin(&config, plugin_config).await?;
        if let Err(e) = serde_json::from_str::<serde_json::Value>(&with) {
            bail!("--with {with:?} is not valid JSON ({e}); pass stage options like --with '{{\"duration\": 2}}'");
        }
        for (flag, dir) in [("--source", &source), ("--running", &running)] {
            if let Some(dir) = dir
                && !dir.is_dir()
            {
                bail!("{flag} {} is not a directory", dir.display());
            }
        }
        let engine = config.engine()?;
        let plugin = Plugin::load(&engine, plugin_config).await?;
        if !plugin.stages.iter().any(|s| s.name == stage) {
            let known: Vec<&str> = plugin.stages.iter().map(|s| s.name.as_str()).collect();
            bail!("plugin `{plugin_name}` does not define stage `{stage}` (it defines: {})", known.join(", "));
        }

        let scratch_root = config.state_dir.join("scratch");
        std::fs::create_dir_all(&scratch_root).with_context(|| format!("cannot create {}", scratch_root.display()))?;
        let scratch = tempfile::Builder::new().prefix("stage-run-").tempdir_in(&scratch_root)?;
        let empty_source = tempfile::tempdir()?;
        let dirs = RunDirs {
            target: Some(source.unwrap_or_else(|| empty_source.path().to_path_buf())),
            running,
            scratch: Some(scratch.path().to_path_buf()),
        };
        let mut call = StageCall::standalone(&stage, &with, dirs, Arc::new(PrintSink::Stdout));
        if let Some(app) = &app {
            call.app_config = app.plugin_settings(&plugin_name);
            call.deployment.application_id = app.name.clone();
            call.deployment.application_name = app.name.clone();
        }
        println!("{stage}: running plugin `{plugin_name}` (world {}, {})", plugin.world, plugin.origin);
        let started = Instant::now();
        let outcome = runner::execute_stage(&engine, &plugin, call).await;
        let detail = if outcome.message.is_empty() { String::new() } else { format!(": {}", escape(&outcome.message)) };
        println!("{stage}: {} in {:.2}s{detail}", outcome.status, started.elapsed().as_secs_f64());
        Ok(if outcome.status.is_success() { ExitCode::SUCCESS } else { ExitCode::from(1) })
    }
}
