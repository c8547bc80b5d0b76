//! The `cordon` command line; the only part of Cordon that prints for
//! humans. Each command lives in its own module under [`commands`]: it
//! parses, calls the layer that owns the work, and prints.
//!
//! Exit codes: 0 when the stage or deployment succeeded (a stage may also
//! have exited or been skipped), 1 when it failed or was cancelled, 2 when
//! the input (a config, a file, an option, an unknown deployment) was
//! refused before anything ran.

mod commands;
mod follow;
mod print;
mod scaffold;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{CommandFactory, Parser, Subcommand};

use commands::*;

#[derive(Parser)]
#[command(name = "cordon", version, about = "Deploy through pipelines whose every stage is a sandboxed WebAssembly component")]
struct Cli {
    /// Agent config (plugins, grants, state directory).
    #[arg(long, global = true, env = "CORDON_CONFIG", default_value = "cordon.yaml")]
    config: PathBuf,
    /// A `cordon server` to act through instead of the state database
    /// (comma-separated replicas; https://, or http:// on loopback).
    #[arg(long, global = true, env = "CORDON_SERVER")]
    server: Option<String>,
    /// The file holding your token for --server (else $CORDON_TOKEN, or
    /// the credentials file `cordon login` wrote).
    #[arg(long = "token-file", global = true, env = "CORDON_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// How diagnostics on stderr are written: `text`, or `json` (one
    /// object per line, for a log collector). Their level: $CORDON_LOG.
    #[arg(long = "log-format", global = true, env = "CORDON_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Work with plugin components.
    #[command(subcommand)]
    Plugin(plugin::PluginCommand),
    /// Run stages outside a pipeline.
    #[command(subcommand)]
    Stage(stage::StageCommand),
    /// Trigger a deployment of the application in APP_DIR and follow it.
    Deploy(deploy::Deploy),
    /// Show the strategy, stages, DAG and versions a deployment would get; runs no stage.
    Plan(plan::Plan),
    /// Recent deployments, or one deployment's stages.
    Status(status::Status),
    /// A deployment's stage logs.
    Logs(logs::Logs),
    /// Approve a stage that waits for approval, and wait for its answer.
    Approve(control::Approve),
    /// Skip a stage (interrupting it if it runs).
    Skip(control::Skip),
    /// Cancel a deployment; rollback runs if the application enables it.
    Cancel(control::Cancel),
    /// Run queued deployments and resume unfinished ones, until interrupted.
    Agent(agent::Agent),
    /// The agents that report on this state: labels, stages, last heartbeat.
    Agents(agents::Agents),
    /// Delete finished deployments beyond the newest N of each application, with their logs and snapshots.
    Prune(prune::Prune),
    /// Select keys of a key space with a key-filter plugin.
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Rewrite JSON items with an item-action plugin.
    #[command(subcommand)]
    Items(keys::ItemsCommand),
    /// Work with a deployment paused at a breakpoint.
    #[command(subcommand)]
    Debug(debug::DebugCommand),
    /// Back up this control plane's state, or restore a backup into another state directory.
    #[command(subcommand)]
    Transfer(transfer::TransferCommand),
    /// Move one unit of keys between stores through migration-phase plugins.
    #[command(subcommand)]
    Migrate(migrate::MigrateCommand),
    /// Upload a local directory into the source of a paused deployment.
    Upload(upload::Upload),
    /// Print a shell completion script.
    Completions(completions::Completions),
    /// Serve the authenticated API for people and agents.
    Server(server::Server),
    /// Make, list or revoke the server's tokens.
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// The server's audit log.
    Audit(audit::Audit),
    /// Keep a token for --server in the credentials file.
    Login(login::Login),
}

#[derive(clap::ValueEnum, Clone, Copy)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("CORDON_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    // The state store is opened deep in the pipeline from the environment
    // (like $CORDON_DATABASE_URL); the flags win over it.
    for (var, value) in [(cordon_api::SERVER_ENV, cli.server.as_deref().map(std::ffi::OsStr::new)), (cordon_api::TOKEN_FILE_ENV, cli.token_file.as_deref().map(|p| p.as_os_str()))] {
        if let Some(value) = value {
            // SAFETY: no other thread exists yet.
            unsafe { std::env::set_var(var, value) };
        }
    }
    if !matches!(cli.command, Command::Agent(_)) {
        // Like every Unix filter: when the reader goes away (`cordon status
        // | head`), stop quietly instead of failing on a broken pipe. The
        // agent keeps ignoring SIGPIPE: a dead log reader must not stop it.
        // SAFETY: called before any other thread exists; SIG_DFL is a valid
        // disposition for SIGPIPE.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
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
            // Errors quote plugins' words and users' paths: control
            // characters are shown escaped, line by line, never sent raw.
            let text = format!("{e:#}");
            let lines: Vec<_> = text.lines().map(print::escape).collect();
            eprintln!("error: {}", lines.join("\n"));
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let config = cli.config.as_path();
    match cli.command {
        Command::Plugin(c) => c.run(config).await,
        Command::Stage(c) => c.run(config).await,
        Command::Deploy(c) => c.run(config).await,
        Command::Plan(c) => c.run(config).await,
        Command::Status(c) => c.run(config),
        Command::Logs(c) => c.run(config).await,
        Command::Approve(c) => c.run(config),
        Command::Skip(c) => c.run(config),
        Command::Cancel(c) => c.run(config),
        Command::Agent(c) => c.run(config).await,
        Command::Agents(c) => c.run(config),
        Command::Prune(c) => c.run(config),
        Command::Keys(c) => c.run(config).await,
        Command::Items(c) => c.run(config).await,
        Command::Debug(c) => c.run(config).await,
        Command::Transfer(c) => c.run(config),
        Command::Migrate(c) => c.run(config).await,
        Command::Upload(c) => c.run(config),
        Command::Completions(c) => c.run(Cli::command()),
        Command::Server(c) => c.run().await,
        Command::Token(c) => c.run(config),
        Command::Audit(c) => c.run(config),
        Command::Login(c) => c.run(cli.server.as_deref()),
    }
}
