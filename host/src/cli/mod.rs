//! The `cordon` command line; the only module that prints for humans.
//!
//! Exit codes: 0 when the stage or deployment succeeded (a stage may also
//! have exited or been skipped), 1 when it failed or was cancelled, 2 when
//! the input (a config, a file, an option, an unknown deployment) was
//! refused before anything ran.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use sha2::{Digest, Sha256};

use crate::agent::{self, AgentLock};
use crate::contract::{self, World};
use crate::engine::{Runtime, RuntimeOptions};
use crate::pipeline::config::AppConfig;
use crate::pipeline::plan::{PlanInput, Strategy, TriggerInfo};
use crate::pipeline::services::now_ms;
use crate::pipeline::{self, Host};
use crate::plugin::{AgentConfig, Plugin, signature};
use crate::runner::{self, Deployment, Stage, StageCall, Status, Trigger};
use crate::sandbox::output::{LogSink, Source, NullSink};
use crate::sandbox::{MemoryServices, RunDirs};
use crate::store::{CommandKind, CommandRecord, DeploymentRecord, SqliteStore, StageRecord, StateStore};

mod follow;
mod migrate;

#[derive(Parser)]
#[command(name = "cordon", version, about = "Deploy through pipelines whose every stage is a sandboxed WebAssembly component")]
struct Cli {
    /// Agent config (plugins, grants, state directory).
    #[arg(long, global = true, env = "CORDON_CONFIG", default_value = "cordon.yaml")]
    config: PathBuf,
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
    /// Trigger a deployment of the application in APP_DIR and follow it.
    Deploy {
        app_dir: PathBuf,
        #[command(flatten)]
        trigger: TriggerArgs,
        /// Queue the deployment for a running `cordon agent` and return.
        #[arg(long)]
        detach: bool,
    },
    /// Show the strategy, stages, DAG and versions a deployment would get; runs no stage.
    Plan {
        app_dir: PathBuf,
        #[command(flatten)]
        trigger: TriggerArgs,
    },
    /// Recent deployments, or one deployment's stages.
    Status { deployment: Option<String> },
    /// A deployment's stage logs.
    Logs {
        deployment: String,
        /// Only this stage (its id or name).
        #[arg(long)]
        stage: Option<String>,
        /// Keep printing new lines until the deployment ends.
        #[arg(long)]
        follow: bool,
    },
    /// Approve a stage that waits for approval.
    Approve {
        deployment: String,
        stage: String,
        /// Who approves.
        #[arg(long = "as", default_value_t = default_user())]
        commander: String,
    },
    /// Skip a stage (interrupting it if it runs).
    Skip {
        deployment: String,
        stage: String,
        #[arg(long = "as", default_value_t = default_user())]
        commander: String,
    },
    /// Cancel a deployment; rollback runs if the application enables it.
    Cancel {
        deployment: String,
        #[arg(long = "as", default_value_t = default_user())]
        commander: String,
    },
    /// Run queued deployments and resume unfinished ones, until interrupted.
    Agent,
    /// Select keys of a key space with a key-filter plugin.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Rewrite JSON items with an item-action plugin.
    #[command(subcommand)]
    Items(ItemsCommand),
    /// Work with a deployment paused at a breakpoint.
    #[command(subcommand)]
    Debug(DebugCommand),
    /// Back up this control plane's state, or restore a backup into another state directory.
    #[command(subcommand)]
    Transfer(TransferCommand),
    /// Move one unit of keys between stores through migration-phase plugins.
    #[command(subcommand)]
    Migrate(MigrateCommand),
    /// Upload a local directory into the source of a paused deployment.
    Upload {
        deployment: String,
        /// The directory to upload (default: the current one).
        dir: Option<PathBuf>,
        /// Where inside the deployment's source to extract it.
        #[arg(long, default_value = ".")]
        to: PathBuf,
        /// More gitignore-style patterns to leave out (repeatable).
        #[arg(long = "ignore", value_name = "PATTERN")]
        ignore: Vec<String>,
        /// Upload this tar archive instead of a directory.
        #[arg(long, conflicts_with = "dir")]
        archive: Option<PathBuf>,
        /// Resume the deployment after the upload.
        #[arg(long = "continue")]
        resume: bool,
        #[arg(long = "as", default_value_t = default_user())]
        commander: String,
    },
}

#[derive(Subcommand)]
enum DebugCommand {
    /// Resume the paused stage as a success (a stage paused before it runs, runs).
    Continue {
        deployment: String,
        #[arg(long = "as", default_value_t = default_user())]
        commander: String,
    },
    /// Resume the paused stage as a failure; rollback follows as usual.
    FailContinue {
        deployment: String,
        #[arg(long = "as", default_value_t = default_user())]
        commander: String,
    },
    /// Run the paused stage once, verbosely, and leave it paused.
    Run { deployment: String },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Write the selected keys (one per line, or JSON lines with a `key`) in input order.
    ///
    /// Exits 1 when some keys could not be classified (they are reported,
    /// and written to --unclassified when given), 0 otherwise.
    Filter {
        #[command(flatten)]
        io: PluginIo,
        /// Where to write the keys the filter could not classify.
        #[arg(long)]
        unclassified: Option<PathBuf>,
        /// Filter instances working in parallel (default: one per core).
        #[arg(long)]
        jobs: Option<usize>,
        /// Print the delete prefixes covering the selected keys instead of the keys.
        #[arg(long)]
        prefixes: bool,
    },
}

#[derive(Subcommand)]
enum TransferCommand {
    /// Write applications, deployment history, metadata and blobs of the config's state to FILE.
    Backup {
        #[arg(long)]
        output: PathBuf,
    },
    /// Add a backup's records to the state in DIR (again: adds nothing twice).
    Restore {
        #[arg(long)]
        input: PathBuf,
        /// The target state directory (`state-dir` of the target's agent config).
        #[arg(long = "state")]
        state: PathBuf,
    },
}

#[derive(Subcommand)]
enum MigrateCommand {
    /// Start the migration a spec describes and run it to its end.
    ///
    /// Exits 0 when it completed, 1 when it failed or completed with errors.
    Run { spec: PathBuf },
    /// List migrations, or show one with its phases' progress.
    Status { id: Option<String> },
    /// Continue an interrupted or failed migration from its last checkpoint.
    Resume { id: String },
}

#[derive(Subcommand)]
enum ItemsCommand {
    /// Apply the action to JSON items, one per line, in input order.
    Apply {
        #[command(flatten)]
        io: PluginIo,
    },
}

/// A plugin, its options, and where data comes from and goes.
#[derive(clap::Args)]
struct PluginIo {
    /// Plugin name from the agent config.
    #[arg(long)]
    plugin: String,
    /// The plugin's options as JSON.
    #[arg(long = "with", default_value = "{}")]
    with: String,
    /// Input file; `-` or nothing reads standard input.
    input: Option<PathBuf>,
    /// Output file (written atomically); standard output when absent.
    #[arg(long)]
    output: Option<PathBuf>,
}

#[derive(clap::Args, Clone)]
struct TriggerArgs {
    /// Force a strategy instead of letting the planners decide.
    #[arg(long, value_enum)]
    sync: Option<SyncArg>,
    /// Commit message (skip rules and commit matchers read it).
    #[arg(long, default_value = "")]
    message: String,
    /// Commit hash, for the record.
    #[arg(long, default_value = "")]
    commit: String,
    /// Who triggers the deployment.
    #[arg(long = "as", default_value_t = default_user())]
    commander: String,
    /// Pause before this stage runs (id or name; repeatable).
    #[arg(long = "break-before", value_name = "STAGE")]
    break_before: Vec<String>,
    /// Pause after this stage ran (id or name; repeatable).
    #[arg(long = "break-after", value_name = "STAGE")]
    break_after: Vec<String>,
    /// Pause at any stage that fails, instead of failing.
    #[arg(long = "break-on-failure")]
    break_on_failure: bool,
}

#[derive(clap::ValueEnum, Clone, Copy)]
enum SyncArg {
    Quick,
    Pipeline,
}

impl TriggerArgs {
    fn info(&self) -> TriggerInfo {
        TriggerInfo {
            commit_hash: self.commit.clone(),
            commit_message: self.message.clone(),
            commander: self.commander.clone(),
            sync: self.sync.map(|s| match s {
                SyncArg::Quick => Strategy::QuickSync,
                SyncArg::Pipeline => Strategy::PipelineSync,
            }),
            breakpoints: crate::debug::Breakpoints {
                break_before: self.break_before.clone(),
                break_after: self.break_after.clone(),
                break_on_failure: self.break_on_failure,
            },
        }
    }
}

fn default_user() -> String {
    std::env::var("USER").unwrap_or_else(|_| "operator".to_string())
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Write a new plugin project (Rust, on the SDK) to build, try and sign.
    New {
        /// The plugin's name: a-z, 0-9 and '-'.
        name: String,
        #[arg(long, value_enum, default_value = "stage")]
        kind: crate::plugin::scaffold::Kind,
        /// Where to write it (default: ./NAME).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The `guests/sdk` directory of a Cordon checkout (default: the one this binary was built from).
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// Show a component's worlds, imports, exports, contract version, size and sha256.
    Inspect {
        /// The component (.wasm) to inspect.
        file: PathBuf,
    },
    /// Create a signing key pair: KEY (private, mode 0600) and KEY.pub.
    Keygen { key: PathBuf },
    /// Sign a component: writes FILE.sig (ed25519 over its sha256).
    Sign {
        file: PathBuf,
        /// The private key from `cordon plugin keygen`.
        #[arg(long)]
        key: PathBuf,
    },
    /// Verify FILE.sig against public keys (or the agent config's trusted keys).
    Verify {
        file: PathBuf,
        /// A `.pub` file to trust (repeatable); without it, the agent config's `trusted-keys`.
        #[arg(long = "public-key")]
        public_keys: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
enum StageCommand {
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
    let config = cli.config;
    match cli.command {
        Command::Plugin(PluginCommand::New { name, kind, dir, sdk }) => {
            let request = crate::plugin::scaffold::Request { name: &name, kind, dir: dir.as_deref(), sdk: sdk.as_deref() };
            let dir = crate::plugin::scaffold::new_plugin(&request)?;
            println!("wrote {}; next: cd {} && cargo build --release (then follow its README.md)", dir.display(), dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Plugin(PluginCommand::Inspect { file }) => inspect(&file).await,
        Command::Plugin(PluginCommand::Keygen { key }) => {
            let (public, _) = signature::keygen(&key)?;
            println!("private key {} (keep it secret), public key {}", key.display(), public.display());
            println!("trust it in the agent config:\n  trusted-keys:\n    {}: \"{}\"", key.file_name().unwrap_or_default().to_string_lossy(), std::fs::read_to_string(&public)?.trim());
            Ok(ExitCode::SUCCESS)
        }
        Command::Plugin(PluginCommand::Sign { file, key }) => {
            let sig = signature::sign(&file, &key)?;
            println!("signed {} -> {}", file.display(), sig.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Plugin(PluginCommand::Verify { file, public_keys }) => verify(&config, &file, &public_keys),
        Command::Stage(StageCommand::Run { plugin, stage, with, source, running }) => {
            stage_run(&config, &plugin, &stage, &with, source.as_deref(), running.as_deref()).await
        }
        Command::Deploy { app_dir, trigger, detach } => deploy(&config, &app_dir, trigger.info(), detach).await,
        Command::Plan { app_dir, trigger } => plan(&config, &app_dir, trigger.info()).await,
        Command::Status { deployment } => status(&config, deployment.as_deref()),
        Command::Logs { deployment, stage, follow } => logs(&config, &deployment, stage.as_deref(), follow).await,
        Command::Approve { deployment, stage, commander } => command(&config, &deployment, Some(&stage), CommandKind::Approve, &commander),
        Command::Skip { deployment, stage, commander } => command(&config, &deployment, Some(&stage), CommandKind::Skip, &commander),
        Command::Cancel { deployment, commander } => command(&config, &deployment, None, CommandKind::Cancel, &commander),
        Command::Agent => agent(&config).await,
        Command::Keys(KeysCommand::Filter { io, unclassified, jobs, prefixes }) => {
            keys_filter(&config, &io, unclassified.as_deref(), jobs, prefixes).await
        }
        Command::Items(ItemsCommand::Apply { io }) => items_apply(&config, &io).await,
        Command::Transfer(TransferCommand::Backup { output }) => {
            let config = AgentConfig::load(&config)?;
            let report = crate::store::transfer::backup(&config.state_dir, &output)?;
            let counts: Vec<String> = report.counts.iter().map(|(t, n)| format!("{n} {t}")).collect();
            println!("wrote {} (origin {}): {}", output.display(), report.origin, counts.join(", "));
            Ok(ExitCode::SUCCESS)
        }
        Command::Transfer(TransferCommand::Restore { input, state }) => {
            let report = crate::store::transfer::restore(&input, &state)?;
            println!(
                "restored into {}: {} applications, {} deployments added ({} already there), {} blobs; id mapping in {}",
                state.display(),
                report.applications_added,
                report.deployments_added,
                report.deployments_skipped,
                report.blobs_added,
                report.id_map.display()
            );
            for note in &report.notes {
                println!("  note: {note}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate(MigrateCommand::Run { spec }) => migrate::start(&config, &spec).await,
        Command::Migrate(MigrateCommand::Status { id }) => migrate::status(&config, id.as_deref()),
        Command::Migrate(MigrateCommand::Resume { id }) => migrate::resume(&config, &id).await,
        Command::Debug(DebugCommand::Continue { deployment, commander }) => debug_resume(&config, &deployment, false, &commander),
        Command::Debug(DebugCommand::FailContinue { deployment, commander }) => debug_resume(&config, &deployment, true, &commander),
        Command::Debug(DebugCommand::Run { deployment }) => debug_run(&config, &deployment).await,
        Command::Upload { deployment, dir, to, ignore, archive, resume, commander } => {
            upload(&config, &deployment, dir.as_deref(), &to, &ignore, archive.as_deref(), resume, &commander)
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
    match summary.manifest.as_deref().map(crate::plugin::Manifest::parse) {
        None => writeln!(out, "manifest:  none (the plugin requests no capabilities up front)")?,
        Some(Err(e)) => writeln!(out, "manifest:  INVALID: {e}")?,
        Some(Ok(m)) => {
            writeln!(out, "manifest:  {} {} (contract {}), stages {}", m.name, m.version, m.contract, m.stages.join(", "))?;
            let caps = &m.capabilities;
            let mounts: Vec<String> = caps.mounts.iter().map(|r| format!("{} ({})", r.guest, r.access.as_str())).collect();
            for (what, list) in [("mounts", mounts), ("network", caps.network.clone()), ("env", caps.env.clone()), ("secrets", caps.secrets.clone())] {
                writeln!(out, "  requests {what}: {}", if list.is_empty() { "none".to_string() } else { list.join(", ") })?;
            }
        }
    }
    if let Some(world) = worlds.iter().copied().find(|w| w.defines_stages()) {
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
        signature: None,
        signature_file: None,
        trust: Default::default(),
    };
    Ok(Plugin::load_for_inspection(&runtime, &config).await?.stages)
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

/// Opens the state store named by the agent config, without loading plugins.
fn open_store(config_path: &Path) -> Result<(AgentConfig, SqliteStore)> {
    let config = AgentConfig::load(config_path)?;
    let db = pipeline::database_path(&config.state_dir);
    if !db.exists() {
        bail!("no state at {}: nothing was deployed with {} yet", db.display(), config_path.display());
    }
    let store = SqliteStore::open(&db)?;
    Ok((config, store))
}

fn deployment_or_err(store: &dyn StateStore, id: &str) -> Result<DeploymentRecord> {
    store.deployment(id)?.with_context(|| {
        let recent: Vec<String> = store.deployments(None, 5).unwrap_or_default().into_iter().map(|d| d.id).collect();
        format!("no deployment `{id}` (recent: {})", if recent.is_empty() { "none".to_string() } else { recent.join(", ") })
    })
}

/// A stage by id, or by name when the name is unique in the deployment.
fn resolve_stage<'a>(stages: &'a [StageRecord], deployment: &str, wanted: &str) -> Result<&'a StageRecord> {
    if let Some(s) = stages.iter().find(|s| s.id == wanted) {
        return Ok(s);
    }
    let by_name: Vec<&StageRecord> = stages.iter().filter(|s| s.name == wanted).collect();
    match by_name.as_slice() {
        [one] => Ok(one),
        [] => {
            let ids: Vec<&str> = stages.iter().map(|s| s.id.as_str()).collect();
            bail!("deployment {deployment} has no stage `{wanted}` (stages: {})", ids.join(", "))
        }
        several => {
            let ids: Vec<&str> = several.iter().map(|s| s.id.as_str()).collect();
            bail!("`{wanted}` names several stages of {deployment}; use one of the ids: {}", ids.join(", "))
        }
    }
}

async fn deploy(config_path: &Path, app_dir: &Path, trigger: TriggerInfo, detach: bool) -> Result<ExitCode> {
    let config = AgentConfig::load(config_path)?;
    let host = Arc::new(Host::open(&config).await?);
    let record = pipeline::trigger(&host, app_dir, trigger)?;
    let id = record.id.clone();
    println!("deployment {id} of {} queued", record.application);
    if detach {
        return Ok(ExitCode::SUCCESS);
    }
    let runner = match AgentLock::try_acquire(&config.state_dir)? {
        Some(lock) => {
            let scope = agent::Scope { application: Some(record.application.clone()), until: Some(id.clone()), until_idle: false };
            let host = host.clone();
            Some(tokio::spawn(async move { agent::serve(host, &lock, scope).await }))
        }
        None => {
            println!("an agent is running on {}; following", config.state_dir.display());
            None
        }
    };
    let finished = follow::follow(host.store.as_ref(), &id).await?;
    if let Some(runner) = runner {
        runner.await.context("the deployment runner panicked")??;
    }
    Ok(ExitCode::from(follow::exit_code(finished.status)))
}

async fn plan(config_path: &Path, app_dir: &Path, trigger: TriggerInfo) -> Result<ExitCode> {
    let config = AgentConfig::load(config_path)?;
    let host = Host::open(&config).await?;
    let app = AppConfig::load(app_dir)?;
    let running = host.store.application(&app.name)?.and_then(|a| a.running_snapshot).map(PathBuf::from).filter(|p| p.is_dir());
    let changed = pipeline::snapshot::changed_files(running.as_deref(), app_dir)?;
    let scratch = tempfile::tempdir()?;
    let preview = DeploymentRecord::queued(&format!("{}-plan", app.name), &app.name, String::new(), app_dir.to_string_lossy().into_owned(), now_ms());
    let input = PlanInput {
        runtime: &host.runtime,
        plugins: &host.plugins,
        app: &app,
        trigger: &trigger,
        deployment: pipeline::deployment_info(&preview, &app, &trigger),
        target: app_dir.to_path_buf(),
        running: running.clone(),
        scratch: scratch.path().to_path_buf(),
        changed,
        sink: Arc::new(NullSink),
    };
    let planned = pipeline::plan::plan(&input).await?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "application: {}", app.name)?;
    writeln!(out, "strategy:    {} ({})", planned.summary.strategy.as_str(), planned.summary.summary)?;
    writeln!(out, "running:     {}", running.map_or("none (first deployment)".to_string(), |p| p.display().to_string()))?;
    writeln!(out, "changed:     {} file(s)", planned.summary.changed.len())?;
    writeln!(out, "versions:")?;
    for v in &planned.summary.versions {
        writeln!(out, "  {} {} {} {} ({})", v.plugin, v.kind, v.name, v.version, v.url)?;
    }
    writeln!(out, "stages:")?;
    for s in &planned.stages {
        let kind = if s.rollback { " (rollback)" } else { "" };
        writeln!(out, "  {:<24} plugin {:<12} {}{kind}", s.id, s.plugin, follow::needs_text(s))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn ago(ms: u64) -> String {
    let secs = now_ms().saturating_sub(ms) / 1000;
    match secs {
        0..=59 => format!("{secs}s ago"),
        60..=3599 => format!("{}m ago", secs / 60),
        _ => format!("{}h ago", secs / 3600),
    }
}

fn status(config_path: &Path, deployment: Option<&str>) -> Result<ExitCode> {
    let (_, store) = open_store(config_path)?;
    let mut out = std::io::stdout().lock();
    match deployment {
        None => {
            for d in store.deployments(None, 20)? {
                writeln!(out, "{:<24} {:<14} {:<12} {:>8}  {}", d.id, d.application, d.status.as_str(), ago(d.created_at), d.reason)?;
            }
        }
        Some(id) => {
            let d = deployment_or_err(&store, id)?;
            writeln!(out, "deployment {} of {}: {}{}", d.id, d.application, d.status, if d.reason.is_empty() { String::new() } else { format!(" ({})", d.reason) })?;
            for s in store.stages(id)? {
                let took = match (s.started_at, s.finished_at) {
                    (Some(a), Some(b)) => format!("{:.1}s", b.saturating_sub(a) as f64 / 1000.0),
                    _ => String::new(),
                };
                writeln!(out, "  {:<24} {:<12} {:>7} {}  {}", s.id, s.status.as_str(), took, follow::needs_text(&s), s.message)?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn logs(config_path: &Path, id: &str, stage: Option<&str>, keep_following: bool) -> Result<ExitCode> {
    let (_, store) = open_store(config_path)?;
    deployment_or_err(&store, id)?;
    let stage_id = match stage {
        Some(s) => Some(resolve_stage(&store.stages(id)?, id, s)?.id.clone()),
        None => None,
    };
    let mut after = 0;
    loop {
        let finished = store.deployment(id)?.is_some_and(|d| d.status.is_final());
        let lines = store.logs(id, stage_id.as_deref(), after, 10_000)?;
        for l in &lines {
            after = l.seq;
            let stage = if l.stage.is_empty() { "plan" } else { &l.stage };
            println!("{stage} | {}: {}", l.source, l.text);
        }
        if !keep_following || (finished && lines.is_empty()) {
            return Ok(ExitCode::SUCCESS);
        }
        if lines.is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
}

fn command(config_path: &Path, id: &str, stage: Option<&str>, kind: CommandKind, commander: &str) -> Result<ExitCode> {
    let (_, store) = open_store(config_path)?;
    send_command(&store, id, stage, kind, commander)?;
    Ok(ExitCode::SUCCESS)
}

/// Validates and stores a command for deployment `id` (or one of its stages).
fn send_command(store: &dyn StateStore, id: &str, stage: Option<&str>, kind: CommandKind, commander: &str) -> Result<()> {
    let d = deployment_or_err(store, id)?;
    if d.status.is_final() {
        bail!("deployment {id} already ended ({}); there is nothing to {kind}", d.status);
    }
    let stage_id = match stage {
        Some(wanted) => {
            let stages = store.stages(id)?;
            if stages.is_empty() {
                bail!("deployment {id} is not planned yet; try again in a moment");
            }
            let s = resolve_stage(&stages, id, wanted)?;
            if s.status.is_final() {
                bail!("stage {} of {id} already ended ({}); there is nothing to {kind}", s.id, s.status);
            }
            s.id.clone()
        }
        None => String::new(),
    };
    let record = CommandRecord {
        id: format!("{id}/{kind}/{}-{}", now_ms(), std::process::id()),
        deployment: id.to_string(),
        stage: stage_id.clone(),
        kind,
        commander: commander.to_string(),
        created_at: now_ms() / 1000,
    };
    store.add_command(&record)?;
    let target = if stage_id.is_empty() { format!("deployment {id}") } else { format!("stage {stage_id} of {id}") };
    println!("{kind} sent to {target} as {commander}");
    Ok(())
}

/// The stage of `id` paused at a breakpoint.
fn paused_stage(store: &dyn StateStore, id: &str) -> Result<StageRecord> {
    let d = deployment_or_err(store, id)?;
    store.stages(id)?.into_iter().find(|s| s.status == crate::store::StageStatus::Paused).with_context(|| {
        format!("deployment {id} ({}) has no paused stage; deploy with --break-before, --break-after or --break-on-failure", d.status)
    })
}

fn debug_resume(config_path: &Path, id: &str, fail: bool, commander: &str) -> Result<ExitCode> {
    let (_, store) = open_store(config_path)?;
    paused_stage(&store, id)?;
    let kind = if fail { CommandKind::DebugFailContinue } else { CommandKind::DebugContinue };
    send_command(&store, id, None, kind, commander)?;
    Ok(ExitCode::SUCCESS)
}

async fn debug_run(config_path: &Path, id: &str) -> Result<ExitCode> {
    let config = AgentConfig::load(config_path)?;
    let host = Host::open(&config).await?;
    let stage = paused_stage(host.store.as_ref(), id)?;
    let record = deployment_or_err(host.store.as_ref(), id)?;
    let app = AppConfig::load(Path::new(&record.target_snapshot))?;
    let trigger: TriggerInfo = serde_json::from_str(&record.trigger).context("the stored trigger is not readable")?;
    let plugin = host.plugins.get(&stage.plugin).with_context(|| format!("plugin `{}` is no longer in the agent config", stage.plugin))?.clone();
    let info = pipeline::deployment_info(&record, &app, &trigger);
    let call = pipeline::run::stage_call(&host, &record, &app, &info, &stage, &format!("{}-debug", stage.id), Arc::new(TerminalSink))?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "debug run of stage {} ({}) of deployment {id}; it stays paused", stage.id, stage.name)?;
    writeln!(out, "  plugin:   {} (world {}, {}, sha256 {})", plugin.name, plugin.world, plugin.path.display(), plugin.sha256)?;
    writeln!(out, "  options:  {}", stage.options)?;
    writeln!(out, "  settings: {}", call.app_config)?;
    writeln!(out, "  mounts:")?;
    let show = |guest: &str, host: &Option<PathBuf>, access: &str| host.as_ref().map(|p| format!("    {guest:<10} <- {} ({access})", p.display()));
    for line in [
        show(crate::sandbox::fs::TARGET, &call.dirs.target, "read-only"),
        show(crate::sandbox::fs::RUNNING, &call.dirs.running, "read-only"),
        show(crate::sandbox::fs::SCRATCH, &call.dirs.scratch, "read-write"),
    ]
    .into_iter()
    .flatten()
    {
        writeln!(out, "{line}")?;
    }
    let grants = plugin.sandbox.grants();
    for m in &grants.mounts {
        writeln!(out, "    {:<10} <- {} ({}, granted)", m.guest, m.host.display(), m.access.as_str())?;
    }
    let allow: Vec<String> = grants.network.allow.iter().map(|d| d.to_string()).collect();
    writeln!(out, "  network:  {}", if allow.is_empty() { "none".to_string() } else { allow.join(", ") })?;
    let env: Vec<&String> = grants.env.keys().chain(&grants.inherit_env).collect();
    writeln!(out, "  env:      {}", if env.is_empty() { "none".to_string() } else { env.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ") })?;
    let secrets: Vec<&String> = grants.secrets.keys().collect();
    writeln!(out, "  secrets:  {}", if secrets.is_empty() { "none".to_string() } else { secrets.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ") })?;
    let limits = plugin.sandbox.limits();
    writeln!(out, "  limits:   memory {}, timeout {}, log {}, result {}", limits.memory, humantime::format_duration(limits.timeout.min(Duration::from_millis(stage.timeout_ms))), limits.log_bytes, limits.result_bytes)?;
    drop(out);
    let started = Instant::now();
    let outcome = runner::execute_stage(&host.runtime, &plugin, call).await;
    let detail = if outcome.message.is_empty() { String::new() } else { format!(": {}", outcome.message) };
    println!("{}: {} in {:.2}s{detail} (not recorded; the stage stays paused)", stage.id, outcome.status, started.elapsed().as_secs_f64());
    Ok(ExitCode::SUCCESS)
}

#[allow(clippy::too_many_arguments)]
fn upload(
    config_path: &Path,
    id: &str,
    dir: Option<&Path>,
    to: &Path,
    ignore: &[String],
    archive: Option<&Path>,
    resume: bool,
    commander: &str,
) -> Result<ExitCode> {
    let (_, store) = open_store(config_path)?;
    let stage = paused_stage(&store, id)?;
    let record = deployment_or_err(&store, id)?;
    let workspace = PathBuf::from(&record.target_snapshot);
    let limits = crate::debug::upload::Limits::default();
    let summary = match archive {
        Some(file) => {
            let reader = std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
            crate::debug::upload::extract(std::io::BufReader::new(reader), &workspace, to, &limits)?
        }
        None => {
            let dir = dir.unwrap_or(Path::new("."));
            crate::debug::upload::upload_dir(dir, ignore, &workspace, to, &limits)?
        }
    };
    println!(
        "uploaded {} files ({} bytes) into {}/{} of deployment {id}, paused at {}",
        summary.files,
        summary.bytes,
        crate::sandbox::fs::TARGET,
        to.display(),
        stage.id
    );
    if resume {
        send_command(&store, id, None, CommandKind::DebugContinue, commander)?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn agent(config_path: &Path) -> Result<ExitCode> {
    let config = AgentConfig::load(config_path)?;
    let lock = AgentLock::try_acquire(&config.state_dir)?
        .with_context(|| format!("another agent already runs on {}", config.state_dir.display()))?;
    let host = Arc::new(Host::open(&config).await?);
    println!("agent serving {} with {} plugin(s)", config.state_dir.display(), host.plugins.all().len());
    tokio::select! {
        result = agent::serve(host, &lock, agent::Scope::default()) => result?,
        _ = tokio::signal::ctrl_c() => println!("agent stopping; unfinished deployments resume at the next start"),
    }
    Ok(ExitCode::SUCCESS)
}

/// Loads one plugin of the agent config, checking its world.
async fn load_one(config_path: &Path, name: &str, world: World) -> Result<(Runtime, Plugin)> {
    let config = AgentConfig::load(config_path)?;
    let plugin_config = config.plugin(name)?;
    if plugin_config.world != world {
        bail!("plugin `{name}` is declared with world `{}` in {}; this command needs a `{world}` plugin", plugin_config.world, config_path.display());
    }
    let runtime = Runtime::new(RuntimeOptions { cache_dir: Some(config.cache_dir()), ..Default::default() })?;
    let plugin = Plugin::load(&runtime, plugin_config).await?;
    Ok((runtime, plugin))
}

fn check_json(flag: &str, value: &str) -> Result<()> {
    if let Err(e) = serde_json::from_str::<serde_json::Value>(value) {
        bail!("{flag} {value:?} is not valid JSON ({e})");
    }
    Ok(())
}

fn open_input(input: Option<&Path>) -> Result<Box<dyn std::io::BufRead + Send>> {
    Ok(match input {
        None => Box::new(std::io::BufReader::new(std::io::stdin())),
        Some(p) if p == Path::new("-") => Box::new(std::io::BufReader::new(std::io::stdin())),
        Some(p) => Box::new(std::io::BufReader::with_capacity(
            1 << 20,
            std::fs::File::open(p).with_context(|| format!("cannot open input {}", p.display()))?,
        )),
    })
}

/// An output file written through a temporary file and renamed into place
/// only when the command succeeds, or standard output.
enum Output {
    Stdout(std::io::BufWriter<std::io::Stdout>),
    File(std::io::BufWriter<tempfile::NamedTempFile>, PathBuf),
}

impl Output {
    fn open(path: Option<&Path>) -> Result<Output> {
        Ok(match path {
            None => Output::Stdout(std::io::BufWriter::with_capacity(1 << 20, std::io::stdout())),
            Some(p) => {
                let dir = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
                let tmp = tempfile::NamedTempFile::new_in(dir).with_context(|| format!("cannot write into {}", dir.display()))?;
                Output::File(std::io::BufWriter::with_capacity(1 << 20, tmp), p.to_path_buf())
            }
        })
    }

    fn writer(&mut self) -> &mut (dyn Write + Send) {
        match self {
            Output::Stdout(w) => w,
            Output::File(w, _) => w,
        }
    }

    fn commit(self) -> Result<()> {
        match self {
            Output::Stdout(mut w) => Ok(w.flush()?),
            Output::File(w, path) => {
                let tmp = w.into_inner().map_err(|e| e.into_error())?;
                tmp.persist(&path).with_context(|| format!("cannot write {}", path.display()))?;
                Ok(())
            }
        }
    }
}

fn progress_bar(unit: &'static str) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(indicatif::ProgressStyle::with_template(&format!("{{spinner}} {{pos}} {unit} ({{per_sec}}) {{elapsed}}")).expect("valid template"));
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

async fn keys_filter(config_path: &Path, io: &PluginIo, unclassified: Option<&Path>, jobs: Option<usize>, prefixes: bool) -> Result<ExitCode> {
    let (name, with, input, output) = (io.plugin.as_str(), io.with.as_str(), io.input.as_deref(), io.output.as_deref());
    check_json("--with", with)?;
    let (runtime, plugin) = load_one(config_path, name, World::KeyFilter).await?;
    let reader = open_input(input)?;
    let sink: Arc<dyn LogSink> = Arc::new(StderrSink);
    let open = || runner::KeyFilterSession::open(&runtime, &plugin, with, sink.clone());
    if prefixes {
        let mut session = open().await.map_err(anyhow::Error::msg)?;
        let found = crate::keys::filter::delete_prefixes(reader, &mut session).await?;
        let mut out = Output::open(output)?;
        for p in found {
            writeln!(out.writer(), "{p}")?;
        }
        out.commit()?;
        return Ok(ExitCode::SUCCESS);
    }
    let jobs = jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
    let mut sessions = Vec::with_capacity(jobs);
    for _ in 0..jobs {
        sessions.push(open().await.map_err(anyhow::Error::msg)?);
    }
    let mut out = Output::open(output)?;
    let mut rejects = unclassified.map(|p| Output::open(Some(p))).transpose()?;
    let bar = progress_bar("keys");
    let progress = |n: u64| bar.set_position(n);
    let sinks = crate::keys::filter::Sinks {
        selected: out.writer(),
        unclassified: rejects.as_mut().map(Output::writer),
        progress: &progress,
    };
    let stats = crate::keys::filter::run(reader, sessions, sinks).await?;
    bar.finish_and_clear();
    out.commit()?;
    if let Some(r) = rejects {
        r.commit()?;
    }
    eprintln!("{} keys: {} selected, {} unclassified", stats.keys, stats.selected, stats.unclassified);
    if stats.unclassified > 0 {
        for key in &stats.unclassified_sample {
            eprintln!("  unclassified: {key}");
        }
        if unclassified.is_none() {
            eprintln!("  (pass --unclassified FILE to keep all of them)");
        }
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

async fn items_apply(config_path: &Path, io: &PluginIo) -> Result<ExitCode> {
    let (name, with, input, output) = (io.plugin.as_str(), io.with.as_str(), io.input.as_deref(), io.output.as_deref());
    check_json("--with", with)?;
    let (runtime, plugin) = load_one(config_path, name, World::ItemAction).await?;
    let reader = open_input(input)?;
    let mut session = runner::ItemActionSession::open(&runtime, &plugin, Arc::new(StderrSink)).await.map_err(anyhow::Error::msg)?;
    let mut out = Output::open(output)?;
    let stats = crate::keys::items::run(reader, out.writer(), &mut session, with).await?;
    out.commit()?;
    eprintln!(
        "{} items: {} modified, {} unchanged, {} skipped, {} additional, {} duplicates dropped",
        stats.items, stats.modified, stats.unchanged, stats.skipped, stats.additional, stats.duplicates
    );
    Ok(ExitCode::SUCCESS)
}

/// Plugin log lines of key and item commands go to standard error, so
/// standard output carries only data.
struct StderrSink;

impl LogSink for StderrSink {
    fn line(&self, source: Source, text: &str) {
        eprintln!("{source:>7} | {text}");
    }
}

fn verify(config_path: &Path, file: &Path, public_keys: &[PathBuf]) -> Result<ExitCode> {
    let keys: std::collections::BTreeMap<String, ed25519_dalek::VerifyingKey> = if public_keys.is_empty() {
        let config = AgentConfig::load(config_path)?;
        config.trusted_keys.iter().map(|(n, k)| Ok((n.clone(), signature::parse_public(k)?))).collect::<Result<_>>()?
    } else {
        public_keys
            .iter()
            .map(|p| {
                let text = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
                Ok((p.display().to_string(), signature::parse_public(&text).with_context(|| format!("{}", p.display()))?))
            })
            .collect::<Result<_>>()?
    };
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let sha = hex::encode(Sha256::digest(&bytes));
    let signer = signature::check(file, &signature::signature_path(file), &sha, &keys)?;
    println!("{}: sha256 {sha}, signed by `{signer}`", file.display());
    Ok(ExitCode::SUCCESS)
}
