//! `cordon prune`: apply retention now — delete applications' finished
//! deployments beyond the newest N, with their logs and snapshots (the
//! same rule the agent's and the server's `retention:` apply after each
//! deployment or every ten minutes; see `cordon_store::retention`).

use std::num::NonZeroUsize;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Result, bail};

use cordon_pipeline::{retention, snapshot};
use cordon_runtime::plugin::AgentConfig;

use crate::print::escape;

/// Delete finished deployments beyond the newest N of each application.
#[derive(clap::Args)]
pub struct Prune {
    /// Finished deployments to keep per application (default: the agent
    /// config's `retention.keep-deployments`). The last success and
    /// unfinished deployments are always kept besides.
    #[arg(long)]
    keep: Option<NonZeroUsize>,
    /// Only say what would be deleted; delete nothing (needs no admin
    /// role through a server).
    #[arg(long)]
    dry_run: bool,
    /// Only these applications (default: all).
    applications: Vec<String>,
}

impl Prune {
    pub fn run(self, config_path: &Path) -> Result<ExitCode> {
        // Through a server its state holds no snapshot directories of
        // this machine's; otherwise the agent config's state directory does.
        let (store, snapshots, configured) = match cordon_pipeline::open_server()? {
            Some(store) => (store, None, None),
            None => {
                let config = AgentConfig::load(config_path)?;
                let store = cordon_pipeline::open_store(&config)?;
                (store, Some(snapshot::dir(&config.state_dir)), config.retention.keep_deployments)
            }
        };
        let Some(keep) = self.keep.or(configured) else {
            let or = if snapshots.is_some() { format!(" (or set `retention: {{ keep-deployments: N }}` in {})", config_path.display()) } else { String::new() };
            bail!("give --keep N: how many finished deployments of each application to keep{or}");
        };
        let known: Vec<String> = store.applications()?.into_iter().map(|a| a.name).collect();
        if let Some(unknown) = self.applications.iter().find(|a| !known.contains(a)) {
            bail!("no application `{}` in {}; `cordon status` lists the deployed ones", escape(unknown), store.describe());
        }
        let chosen = if self.applications.is_empty() { known } else { self.applications };
        for application in chosen {
            if self.dry_run {
                let plan = cordon_store::retention::plan(store.as_ref(), &application, keep)?;
                println!(
                    "{application}: would delete {} deployment(s) ({}) and {} snapshot(s) only they use; would keep the newest {keep} finished, the last success and unfinished ones",
                    plan.deployments.len(),
                    listed(&plan.deployments),
                    plan.snapshots.len()
                );
                continue;
            }
            let deleted = retention::prune(store.as_ref(), snapshots.as_deref(), &application, keep)?;
            println!(
                "{application}: deleted {} deployment(s) ({}) and {} stored snapshot(s); kept the newest {keep} finished, the last success and unfinished ones",
                deleted.deployments.len(),
                listed(&deleted.deployments),
                deleted.snapshots.len()
            );
        }
        Ok(ExitCode::SUCCESS)
    }
}

fn listed(ids: &[String]) -> String {
    if ids.is_empty() { "none".to_string() } else { ids.join(", ") }
}
