//! `cordon debug continue|fail-continue|run`: a deployment paused at a
//! breakpoint.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Subcommand;

use cordon_pipeline::config::AppConfig;
use cordon_pipeline::snapshot::SourceLock;
use cordon_pipeline::{self as pipeline, Host, control};
use cordon_runtime::runner;
use cordon_runtime::sandbox::fs::{RUNNING, SCRATCH, TARGET};

use super::trigger::commander;
use crate::print::{PrintSink, escape};

#[derive(Subcommand)]
pub enum DebugCommand {
    /// Resume the paused stage as a success (a stage paused before it runs, runs).
    Continue {
        deployment: String,
        /// Who (default: $USER); refused against a server, which records your token's subject.
        #[arg(long = "as")]
        commander: Option<String>,
    },
    /// Resume the paused stage as a failure; rollback follows as usual.
    FailContinue {
        deployment: String,
        /// Who (default: $USER); refused against a server, which records your token's subject.
        #[arg(long = "as")]
        commander: Option<String>,
    },
    /// Run the paused stage once, verbosely, and leave it paused.
    Run { deployment: String },
}

impl DebugCommand {
    pub async fn run(self, config: &Path) -> Result<ExitCode> {
        let (deployment, fail, given) = match self {
            DebugCommand::Run { deployment } => return run_paused(config, &deployment).await,
            DebugCommand::Continue { deployment, commander } => (deployment, false, commander),
            DebugCommand::FailContinue { deployment, commander } => (deployment, true, commander),
        };
        let store = super::state(config)?;
        let who = commander(store.as_ref(), given)?;
        println!("{}", control::resume(store.as_ref(), &deployment, fail, &who)?);
        Ok(ExitCode::SUCCESS)
    }
}

/// Runs the paused stage once with everything it would get, and says so.
async fn run_paused(config_path: &Path, id: &str) -> Result<ExitCode> {
    let config = super::load_with_plugins(config_path).await?;
    let host = Host::open(&config).await?;
    let stage = control::paused_stage(host.store.as_ref(), id)?;
    let record = host.localise(control::deployment(host.store.as_ref(), id)?)?;
    // Like a stage, the debug run reads the source: not while an upload changes it.
    let mut source = SourceLock::of(Path::new(&record.target_snapshot));
    if !source.share()? {
        anyhow::bail!("an upload into {id} is under way; run this again when it is done");
    }
    let app = AppConfig::load(Path::new(&record.target_snapshot))?;
    let plugin = host.plugins.get(&stage.plugin).with_context(|| format!("plugin `{}` is no longer in the agent config", stage.plugin))?.clone();
    // The run writes under the lease of the agent that holds the deployment
    // paused: it acts for that agent, and stops writing if another takes over.
    let (fence, _) = host.store.lease(id)?.with_context(|| format!("no deployment `{id}`"))?;
    let call = pipeline::run::stage_call(&host, &fence, &record, &app, &stage, &format!("{}-debug", stage.id), Arc::new(PrintSink::Stdout))?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "debug run of stage {} ({}) of deployment {id}; it stays paused", stage.id, stage.name)?;
    writeln!(out, "  plugin:   {} (world {}, {}, sha256 {})", plugin.name, plugin.world, plugin.path.display(), plugin.sha256)?;
    writeln!(out, "  options:  {}", escape(&stage.options))?;
    writeln!(out, "  settings: {}", escape(&call.app_config))?;
    writeln!(out, "  mounts:")?;
    let show = |guest: &str, host: &Option<PathBuf>, access: &str| host.as_ref().map(|p| format!("    {guest:<10} <- {} ({access})", p.display()));
    let fixed = [show(TARGET, &call.dirs.target, "read-only"), show(RUNNING, &call.dirs.running, "read-only"), show(SCRATCH, &call.dirs.scratch, "read-write")];
    for line in fixed.into_iter().flatten() {
        writeln!(out, "{line}")?;
    }
    let grants = plugin.sandbox.grants();
    for m in &grants.mounts {
        writeln!(out, "    {:<10} <- {} ({}, granted)", m.guest, m.host.display(), m.access.as_str())?;
    }
    let list = |items: Vec<String>| if items.is_empty() { "none".to_string() } else { items.join(", ") };
    writeln!(out, "  network:  {}", list(grants.network.allow.iter().map(|d| d.to_string()).collect()))?;
    writeln!(out, "  env:      {}", list(grants.env.keys().chain(&grants.inherit_env).cloned().collect()))?;
    writeln!(out, "  secrets:  {}", list(grants.secrets.keys().cloned().collect()))?;
    let limits = plugin.sandbox.limits();
    let timeout = humantime::format_duration(limits.timeout.min(Duration::from_millis(stage.timeout_ms)));
    writeln!(out, "  limits:   memory {}, timeout {timeout}, log {}, result {}", limits.memory, limits.log_bytes, limits.result_bytes)?;
    drop(out);
    let started = Instant::now();
    let outcome = runner::execute_stage(&host.engine, &plugin, call).await;
    let detail = if outcome.message.is_empty() { String::new() } else { format!(": {}", escape(&outcome.message)) };
    println!("{}: {} in {:.2}s{detail} (not recorded; the stage stays paused)", stage.id, outcome.status, started.elapsed().as_secs_f64());
    Ok(ExitCode::SUCCESS)
}
