//! `cordon transfer backup|restore`: Cordon's own state between state
//! directories.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;

use cordon_migrate::transfer;
use cordon_runtime::plugin::AgentConfig;

#[derive(Subcommand)]
pub enum TransferCommand {
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

impl TransferCommand {
    pub fn run(self, config_path: &Path) -> Result<ExitCode> {
        match self {
            TransferCommand::Backup { output } => {
                let config = AgentConfig::load(config_path)?;
                if cordon_pipeline::is_shared(&config) {
                    anyhow::bail!(
                        "{}: the state is in PostgreSQL; `transfer backup` reads the embedded SQLite state only — back up PostgreSQL with pg_dump",
                        config.source.display()
                    );
                }
                let report = transfer::backup(&config.state_dir, &output)?;
                let counts: Vec<String> = report.counts.iter().map(|(t, n)| format!("{n} {t}")).collect();
                println!("wrote {} (origin {}): {}", output.display(), report.origin, counts.join(", "));
            }
            TransferCommand::Restore { input, state } => {
                let report = transfer::restore(&input, &state)?;
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
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}
