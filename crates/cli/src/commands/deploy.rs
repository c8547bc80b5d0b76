//! `cordon deploy`: queue a deployment and follow it, running it in this
//! process when no agent serves the state directory.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};

use cordon_pipeline::{self as pipeline, Host, agent};
use cordon_store::lock::AgentLock;

use super::trigger::TriggerArgs;
use crate::follow;

/// Trigger a deployment of the application in APP_DIR and follow it.
#[derive(clap::Args)]
pub struct Deploy {
    app_dir: PathBuf,
    #[command(flatten)]
    trigger: TriggerArgs,
    /// Queue the deployment for a running `cordon agent` and return.
    #[arg(long)]
    detach: bool,
}

impl Deploy {
    pub async fn run(self, config_path: &Path) -> Result<ExitCode> {
        let config = super::load_with_plugins(config_path).await?;
        let host = Arc::new(Host::open(&config).await?);
        let record = pipeline::trigger(&host, &self.app_dir, self.trigger.info(host.store.as_ref())?).await?;
        let id = record.id.clone();
        println!("deployment {id} of {} queued", record.application);
        // With no agent alive, this command runs the deployment itself: on
        // the embedded database that is when no agent holds the state
        // directory; on a shared one, when no live agent may run it and
        // this process may (never through a server: people do not hold leases).
        let nobody = if host.shared { agent::nobody_runs(host.store.as_ref(), &record)? } else { None };
        let may_run = !host.store.through_server() && record.requires.unmet_by(&host.offer).is_empty();
        let alone = !host.shared || (nobody.is_some() && may_run);
        let lock = if alone { AgentLock::try_acquire(&config.state_dir)? } else { None };
        let state = if host.shared { host.store.describe() } else { config.state_dir.display().to_string() };
        if self.detach {
            match (&lock, &nobody) {
                (Some(_), _) => eprintln!("warning: no agent is running on {state}; {id} waits until `cordon agent` starts"),
                (None, Some(why)) => eprintln!("warning: {id} waits on {state}: {why}"),
                (None, None) => {}
            }
            return Ok(ExitCode::SUCCESS);
        }
        let runner = match lock {
            Some(lock) => {
                let scope = agent::ServeScope { application: Some(record.application.clone()), until: Some(id.clone()), ..Default::default() };
                let host = host.clone();
                Some(tokio::spawn(async move { agent::serve(host, &lock, scope).await }))
            }
            None if nobody.is_some() => {
                // The follower says why nothing runs it.
                println!("following {id} on {state}");
                None
            }
            None => {
                println!("an agent is running on {state}; following");
                None
            }
        };
        let finished = follow::follow(host.store.as_ref(), &id).await?;
        if let Some(runner) = runner {
            runner.await.context("the deployment runner panicked")??;
        }
        Ok(ExitCode::from(follow::exit_code(finished.status)))
    }
}
