//! `cordon agent`: runs queued deployments and resumes unfinished ones.
//!
//! SIGTERM or Ctrl-C stops it gracefully: it claims nothing more, lets its
//! running deployments go on for `--grace`, then hands the rest over
//! (interrupted, their leases ended so the next agent resumes them at once).
//! A second signal stops it at once; what it ran then resumes when its
//! leases expire (at once on the embedded database's next start).

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::signal::unix::{SignalKind, signal};

use cordon_pipeline::{Host, agent};
use cordon_store::lock::AgentLock;

/// Run queued deployments and resume unfinished ones, until interrupted.
#[derive(clap::Args)]
pub struct Agent {
    /// On SIGTERM or Ctrl-C, how long running deployments may go on before
    /// they are handed over to the next agent.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    grace: Duration,
}

impl Agent {
    pub async fn run(self, config_path: &Path) -> Result<ExitCode> {
        let config = super::load_with_plugins(config_path).await?;
        let lock = AgentLock::try_acquire(&config.state_dir)?
            .with_context(|| format!("another agent already runs on {}", config.state_dir.display()))?;
        let host = Arc::new(Host::open(&config).await?);
        let mut terminate = signal(SignalKind::terminate()).context("cannot watch for SIGTERM")?;
        let mut asked = async move || {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        println!("agent serving {} with {} plugin(s)", config.state_dir.display(), host.plugins.all().len());
        let (stop, stopping) = tokio::sync::watch::channel(false);
        let scope = agent::ServeScope { stop: Some(stopping), grace: self.grace, ..Default::default() };
        let serving = agent::serve(host, &lock, scope);
        tokio::pin!(serving);
        tokio::select! {
            result = &mut serving => return result.map(|()| ExitCode::SUCCESS),
            () = asked() => {}
        }
        let _ = stop.send(true);
        println!(
            "agent stopping: claiming nothing more; running deployments get {} to finish, then are handed over (signal again to stop at once)",
            humantime::format_duration(self.grace)
        );
        tokio::select! {
            result = &mut serving => result?,
            () = asked() => println!("agent stopping at once; unfinished deployments resume when their leases expire"),
        }
        println!("agent stopped");
        Ok(ExitCode::SUCCESS)
    }
}
