//! The `cordon` command line; the only module that prints for humans.
//!
//! Exit codes: 0 when the stage succeeded (or exited, or was skipped), 1
//! when it failed or was cancelled, 2 when the input (a config, a file, an
//! option) was refused before anything ran.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use sha2::{Digest, Sha256};

use crate::contract::{self, World};
use crate::engine::{Runtime, RuntimeOptions};
use crate::plugin::{AgentConfig, Plugin};
use crate::runner::{self, Deployment, Stage, StageCall, Status, Trigger};
use crate::sandbox::output::{LogSink, Source};
use crate::sandbox::{MemoryServices, RunDirs};

#[derive(Parser)]
#[command(name = "cordon", version, about = "Run deployment-stage plugins as sandboxed WebAssembly components")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Work with plugin components.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Run stages outside a pipeline.
    #[command(subcommand)]
    Stage(StageCommand),
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Show a component's worlds, imports, exports, contract version, size and sha256.
    Inspect {
        /// The component (.wasm) to inspect.
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum StageCommand {
    /// Run one stage of one plugin once, in its sandbox, and exit with its status.
    Run {
        /// Agent config naming the plugin and its grants.
        #[arg(long)]
        config: PathBuf,
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
    },
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CORDON_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Plugin(PluginCommand::Inspect { file }) => inspect(&file).await,
        Command::Stage(StageCommand::Run { config, plugin, stage, with, source, running }) => {
            stage_run(&config, &plugin, &stage, &with, source.as_deref(), running.as_deref()).await
        }
    }
}

async fn inspect(file: &Path) -> Result<ExitCode> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let summary = contract::summarize(&bytes).map_err(|e| anyhow::anyhow!("{} {e}", file.display()))?;
    let worlds = summary.worlds();
    let versions = summary.contract_versions();
    let mut out = std::io::stdout().lock();
    writeln!(out, "file:      {}", file.display())?;
    writeln!(out, "size:      {} bytes", bytes.len())?;
    writeln!(out, "sha256:    {}", hex::encode(Sha256::digest(&bytes)))?;
    let compat = if versions.iter().all(|v| v == contract::VERSION) { "compatible" } else { "NOT compatible" };
    writeln!(
        out,
        "contract:  {} {} ({compat} with this host's {})",
        contract::PACKAGE,
        if versions.is_empty() { "(none)".to_string() } else { versions.join(", ") },
        contract::VERSION
    )?;
    let names: Vec<&str> = worlds.iter().map(|w| w.name()).collect();
    writeln!(out, "worlds:    {}", if names.is_empty() { "none of this contract".to_string() } else { names.join(", ") })?;
    writeln!(out, "imports:")?;
    for import in &summary.imports {
        writeln!(out, "  {import}")?;
    }
    writeln!(out, "exports:")?;
    for export in &summary.exports {
        writeln!(out, "  {export}")?;
    }
    if let Some(world) = worlds.iter().copied().find(|w| w.executes_stages()) {
        let stages = list_stages(file, &bytes, world).await?;
        writeln!(out, "stages:")?;
        for stage in stages {
            writeln!(out, "  {:<20} {}", stage.name, stage.description)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Loads the component with no grants to ask which stages it defines.
async fn list_stages(file: &Path, bytes: &[u8], world: World) -> Result<Vec<crate::plugin::StageInfo>> {
    let runtime = Runtime::new(RuntimeOptions { cache_dir: None, pooling: false, ..Default::default() })?;
    let config = crate::plugin::PluginConfig {
        name: "inspected".into(),
        path: file.to_path_buf(),
        sha256: hex::encode(Sha256::digest(bytes)),
        world,
        grants: Default::default(),
        limits: Default::default(),
    };
    Ok(Plugin::load(&runtime, &config).await?.stages)
}

/// Prints stage log lines as they arrive.
struct TerminalSink;

impl LogSink for TerminalSink {
    fn line(&self, source: Source, text: &str) {
        println!("{source:>7} | {text}");
    }
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

async fn stage_run(
    config_path: &Path,
    plugin_name: &str,
    stage_name: &str,
    with: &str,
    source: Option<&Path>,
    running: Option<&Path>,
) -> Result<ExitCode> {
    let config = AgentConfig::load(config_path)?;
    let plugin_config = config.plugin(plugin_name)?;
    if let Err(e) = serde_json::from_str::<serde_json::Value>(with) {
        bail!("--with {with:?} is not valid JSON ({e}); pass stage options like --with '{{\"duration\": 2}}'");
    }
    for (flag, dir) in [("--source", source), ("--running", running)] {
        if let Some(dir) = dir
            && !dir.is_dir()
        {
            bail!("{flag} {} is not a directory", dir.display());
        }
    }
    let runtime = Runtime::new(RuntimeOptions { cache_dir: Some(config.cache_dir()), ..Default::default() })?;
    let plugin = Plugin::load(&runtime, plugin_config).await?;
    if !plugin.stages.iter().any(|s| s.name == stage_name) {
        let known: Vec<&str> = plugin.stages.iter().map(|s| s.name.as_str()).collect();
        bail!("plugin `{plugin_name}` does not define stage `{stage_name}` (it defines: {})", known.join(", "));
    }

    let scratch_root = config.state_dir.join("scratch");
    std::fs::create_dir_all(&scratch_root).with_context(|| format!("cannot create {}", scratch_root.display()))?;
    let scratch = tempfile::Builder::new().prefix("stage-run-").tempdir_in(&scratch_root)?;
    let empty_source = tempfile::tempdir()?;
    let target = source.map(Path::to_path_buf).unwrap_or_else(|| empty_source.path().to_path_buf());
    let app_name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "app".into());
    let id = format!("run-{}", now_unix());
    let call = StageCall {
        deployment: Deployment {
            id: id.clone(),
            application_id: app_name.clone(),
            application_name: app_name,
            labels: Vec::new(),
            trigger: Trigger { commit_hash: String::new(), commit_message: String::new(), commander: "cordon stage run".into() },
            created_at: now_unix(),
        },
        stage: Stage {
            id: format!("{id}-0"),
            name: stage_name.to_string(),
            desc: String::new(),
            index: 0,
            rollback: false,
            options: with.to_string(),
        },
        app_config: "{}".into(),
        dirs: RunDirs {
            target: Some(target),
            running: running.map(Path::to_path_buf),
            scratch: Some(scratch.path().to_path_buf()),
        },
        services: Arc::new(MemoryServices::default()),
        sink: Arc::new(TerminalSink),
        timeout: None,
    };
    println!("{stage_name}: running plugin `{plugin_name}` (world {}, {})", plugin.world, plugin.origin);
    let started = Instant::now();
    let outcome = runner::execute_stage(&runtime, &plugin, call).await;
    let elapsed = started.elapsed();
    let detail = if outcome.message.is_empty() { String::new() } else { format!(": {}", outcome.message) };
    println!("{stage_name}: {} in {:.2}s{detail}", outcome.status, elapsed.as_secs_f64());
    Ok(match outcome.status {
        Status::Success | Status::Exited | Status::Skipped => ExitCode::SUCCESS,
        Status::Failure | Status::Cancelled => ExitCode::from(1),
    })
}
