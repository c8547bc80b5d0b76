//! `cordon migrate run|status|resume|abort`: migrations from the command line,
//! with progress (entries and bytes per phase) on a terminal.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Result;
use bytesize::ByteSize;
use indicatif::{ProgressBar, ProgressStyle};

use clap::Subcommand;

use cordon_migrate::run::{self, StepEvent};
use cordon_migrate::{Ledger, Status};
use cordon_runtime::plugin::AgentConfig;

use crate::print::{PrintSink, escape};

#[derive(Subcommand)]
pub enum MigrateCommand {
    /// Start the migration a spec describes and run it to its end.
    ///
    /// Exits 0 when it completed, 1 when it failed or completed with errors.
    Run { spec: PathBuf },
    /// List migrations, or show one with its phases' progress.
    Status { id: Option<String> },
    /// Continue an interrupted or failed migration from its last checkpoint.
    Resume { id: String },
    /// Give a failed migration up and release its claim on the unit.
    ///
    /// Nothing in the stores is undone: keys already copied stay in the
    /// destination, keys cleanup already deleted stay deleted.
    Abort { id: String },
}

impl MigrateCommand {
    pub async fn run(self, config: &Path) -> Result<ExitCode> {
        match self {
            MigrateCommand::Run { spec } => start(config, &spec).await,
            MigrateCommand::Status { id } => status(config, id.as_deref()),
            MigrateCommand::Resume { id } => resume(config, &id).await,
            MigrateCommand::Abort { id } => abort(config, &id),
        }
    }
}

/// Exit status of a migration: 0 completed, 1 failed or completed with errors.
fn exit(status: Status) -> ExitCode {
    match status {
        Status::Completed => ExitCode::SUCCESS,
        _ => ExitCode::from(1),
    }
}

async fn start(config_path: &Path, spec: &Path) -> Result<ExitCode> {
    let config = super::load_with_plugins(config_path).await?;
    let ledger = Arc::new(Ledger::open(&config.state_dir)?);
    let id = run::create(&config, &ledger, spec)?;
    println!("migration {id} started (cordon migrate resume {id} continues it after an interruption)");
    drive(&config, ledger, &id).await
}

async fn resume(config_path: &Path, id: &str) -> Result<ExitCode> {
    let config = super::load_with_plugins(config_path).await?;
    let ledger = Arc::new(Ledger::open(&config.state_dir)?);
    println!("resuming migration {id}");
    drive(&config, ledger, id).await
}

async fn drive(config: &AgentConfig, ledger: Arc<Ledger>, id: &str) -> Result<ExitCode> {
    let engine = config.engine()?;
    let tty = std::io::stderr().is_terminal();
    let mut bar: Option<(usize, ProgressBar)> = None;
    let report = |e: &StepEvent<'_>| {
        let line = format!(
            "[{}/{}] {:<9} {:>10} entries {:>10}{}  {}",
            e.index + 1,
            e.phases,
            e.phase,
            e.entries,
            ByteSize(e.bytes).to_string(),
            if e.failed > 0 { format!("  {} failed", e.failed) } else { String::new() },
            escape(e.summary)
        );
        if tty {
            if bar.as_ref().is_none_or(|(i, _)| *i != e.index) {
                let pb = ProgressBar::new_spinner().with_style(ProgressStyle::with_template("{spinner} {msg}").expect("a valid template"));
                pb.enable_steady_tick(std::time::Duration::from_millis(120));
                bar = Some((e.index, pb));
            }
            let (_, pb) = bar.as_ref().expect("set above");
            if e.done {
                pb.finish_with_message(line);
            } else {
                pb.set_message(line);
            }
        } else if e.done {
            println!("{line}");
        }
    };
    let ended = run::run(config, &engine, ledger, id, Arc::new(PrintSink::Stderr), report).await?;
    match &ended.error {
        Some(error) => println!("migration {id} {}: {error}\n(fix the cause, then: cordon migrate resume {id})", ended.status.as_str()),
        None => println!("migration {id} {}", ended.status.as_str()),
    }
    Ok(exit(ended.status))
}

fn abort(config_path: &Path, id: &str) -> Result<ExitCode> {
    let config = AgentConfig::load(config_path)?;
    let ledger = Ledger::open(&config.state_dir)?;
    let m = run::abort(&config, &ledger, id)?;
    println!("migration {id} aborted; its claim on {} is released", m.unit);
    println!("nothing was undone: keys it copied stay in the destination; keys its cleanup deleted (if it ran) stay deleted");
    Ok(ExitCode::SUCCESS)
}

fn status(config_path: &Path, id: Option<&str>) -> Result<ExitCode> {
    let config = AgentConfig::load(config_path)?;
    let ledger = Ledger::open(&config.state_dir)?;
    let Some(id) = id else {
        let all = ledger.list()?;
        if all.is_empty() {
            println!("no migrations in {}", config.state_dir.display());
        }
        for m in all {
            println!("{}  {:<22} phase {}  {}", m.id, m.status.as_str(), m.phase, m.spec_path);
        }
        return Ok(ExitCode::SUCCESS);
    };
    let m = ledger.get(id)?.ok_or_else(|| anyhow::anyhow!("no migration {id} in {}; `cordon migrate status` lists them", config.state_dir.display()))?;
    println!("migration {}  {}", m.id, m.status.as_str());
    println!("spec:     {}", m.spec_path);
    println!("unit:     {}", m.unit);
    println!("verified: {}", if m.verified { "yes" } else { "no" });
    if let Some(e) = &m.error {
        println!("error:    {e}");
    }
    for (i, p) in ledger.phases(id)?.iter().enumerate() {
        println!(
            "  {}. {:<9} {:<17} {:>10} entries {:>10} {:>6} steps{}  {}",
            i + 1,
            p.name,
            p.status,
            p.entries,
            ByteSize(p.bytes).to_string(),
            p.steps,
            if p.failed > 0 { format!("  {} failed", p.failed) } else { String::new() },
            escape(&p.summary)
        );
    }
    Ok(ExitCode::SUCCESS)
}
