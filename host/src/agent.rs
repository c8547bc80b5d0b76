//! The agent: runs queued deployments and resumes unfinished ones.
//!
//! One agent owns a state directory at a time (an exclusive lock on
//! `agent.lock`); commands from other processes reach it through the state
//! store. Deployments of different applications run at once; a deployment
//! waits while an earlier one of the same application is unfinished.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::task::JoinHandle;

use crate::pipeline::{Host, run};
use crate::store::DeploymentStatus;

/// How often the agent looks for new deployments.
const POLL: Duration = Duration::from_millis(200);

/// The exclusive right to run deployments from a state directory.
pub struct AgentLock {
    _file: File,
}

impl AgentLock {
    /// Takes the lock, or `None` if another agent holds it.
    pub fn try_acquire(state_dir: &Path) -> Result<Option<AgentLock>> {
        std::fs::create_dir_all(state_dir).with_context(|| format!("cannot create {}", state_dir.display()))?;
        let path = state_dir.join("agent.lock");
        let file = File::options().create(true).truncate(false).write(true).open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(AgentLock { _file: file })),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(e).with_context(|| format!("cannot lock {}", path.display())),
        }
    }
}

/// Which deployments an agent loop serves.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// Only this application's deployments (a `cordon deploy` without an agent).
    pub application: Option<String>,
    /// Return once this deployment has finished.
    pub until: Option<String>,
    /// Return once no deployment is left unfinished.
    pub until_idle: bool,
}

/// Runs deployments until `scope.until` finishes (or forever).
pub async fn serve(host: Arc<Host>, _lock: &AgentLock, scope: Scope) -> Result<()> {
    let mut active: HashMap<String, (String, JoinHandle<Result<DeploymentStatus>>)> = HashMap::new();
    loop {
        // Reap finished deployments.
        let done: Vec<String> = active.iter().filter(|(_, (_, h))| h.is_finished()).map(|(a, _)| a.clone()).collect();
        for app in done {
            let (id, handle) = active.remove(&app).expect("present");
            match handle.await {
                Ok(Ok(status)) => tracing::info!("deployment {id} finished: {status}"),
                Ok(Err(e)) => {
                    tracing::error!("deployment {id} stopped: {e:#}");
                    let _ = host.store.set_deployment_status(&id, DeploymentStatus::Failure, &format!("agent error: {e:#}"), crate::pipeline::services::now_ms());
                }
                Err(e) => tracing::error!("deployment {id} panicked: {e}"),
            }
        }
        if let Some(until) = &scope.until {
            let status = host.store.deployment(until)?.map(|d| d.status);
            if status.is_none_or(|s| s.is_final()) && !active.values().any(|(id, _)| id == until) {
                return Ok(());
            }
        }
        let unfinished = host.store.unfinished_deployments()?;
        if scope.until_idle && unfinished.is_empty() && active.is_empty() {
            return Ok(());
        }
        for d in unfinished {
            if scope.application.as_ref().is_some_and(|a| *a != d.application) || active.contains_key(&d.application) {
                continue;
            }
            let handle = tokio::spawn(run::run_deployment(host.clone(), d.id.clone()));
            active.insert(d.application.clone(), (d.id, handle));
        }
        tokio::time::sleep(POLL).await;
    }
}
