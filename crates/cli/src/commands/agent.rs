//! `cordon agent`: runs queued deployments and resumes unfinished ones.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};

use cordon_pipeline::{Host, agent};
use cordon_store::lock::AgentLock;

/// Run queued deployments and resume unfinished ones, until interrupted.
#[derive(clap::Args)]
pub struct Agent {}

impl Agent {
    pub async fn run(self, config_path: &Path) -> Result<ExitCode> {
        let config = super::load_with_plugins(config_path).await?;
        let lock = AgentLock::try_acquire(&config.state_dir)?
            .with_context(|| format!("another agent already runs on {}", config.state_dir.display()))?;
        let host = Arc::new(Host::open(&config).await?);
        println!("agent serving {} with {} plugin(s)", config.state_dir.display(), host.plugins.all().len());
        tokio::select! {
            result = agent::serve(host, &lock, agent::ServeScope::default()) => result?,
            _ = tokio::signal::ctrl_c() => println!("agent stopping; unfinished deployments resume at the next start"),
        }
        Ok(ExitCode::SUCCESS)
    }
}
