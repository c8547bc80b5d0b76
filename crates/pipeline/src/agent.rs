//! The agent: runs queued deployments and resumes unfinished ones.
//!
//! One agent owns a state directory at a time (an exclusive lock on
//! `agent.lock`); commands from other processes reach it through the state
//! store. Deployments of different applications run at once; a deployment
//! waits while an earlier one of the same application is unfinished. On
//! start it removes the staging directories killed commands left. While it
//! serves it records a heartbeat every [`HEARTBEAT`], so that followers
//! can say when no agent is alive instead of showing a stage "running"
//! for ever.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use cordon_store::lock::{AgentLock, sweep_state_dir};
use tokio::task::JoinSet;

use cordon_store::now_ms;
use crate::{Host, run};
use cordon_store::DeploymentStatus;

/// How often the agent looks for new deployments.
const POLL: Duration = Duration::from_millis(200);
/// How often a serving agent records a heartbeat.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// A heartbeat older than this means its agent stopped (or hangs).
pub const STALE: Duration = Duration::from_secs(10);

/// `None` while some agent reported within [`STALE`]; otherwise what a
/// follower should say (the newest heartbeat, if there is one).
pub fn stale_agent(store: &dyn cordon_store::StateStore) -> Result<Option<Stale>> {
    let now = now_ms();
    let last = store.agents()?.into_iter().next().map(|beat| {
        let silent = Duration::from_millis(now.saturating_sub(beat.beat_at));
        (beat, silent)
    });
    Ok(match last {
        Some((_, silent)) if silent < STALE => None,
        last => Some(Stale { last }),
    })
}

/// No agent has reported lately.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stale {
    /// The newest heartbeat and how long ago it was, if any agent ever
    /// wrote one.
    pub last: Option<(cordon_store::AgentBeat, Duration)>,
}

impl std::fmt::Display for Stale {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.last {
            Some((beat, silent)) => write!(
                f,
                "no agent has reported for {}s (the last was pid {} on {}); nothing runs until an agent does: start `cordon agent`",
                silent.as_secs(),
                beat.pid,
                beat.host
            ),
            None => write!(f, "no agent has ever reported on this state; nothing runs until one does: start `cordon agent`"),
        }
    }
}

/// This process's heartbeat, renewed by [`Beat::renew`] at most every
/// [`HEARTBEAT`].
struct Beat {
    record: cordon_store::AgentBeat,
    last: Option<std::time::Instant>,
}

impl Beat {
    fn new() -> Self {
        let host = rustix::system::uname().nodename().to_string_lossy().into_owned();
        let pid = std::process::id();
        let now = now_ms();
        Self { record: cordon_store::AgentBeat { id: format!("{host}/{pid}"), host, pid, started_at: now, beat_at: now }, last: None }
    }

    fn renew(&mut self, store: &dyn cordon_store::StateStore) -> Result<()> {
        if self.last.is_some_and(|t| t.elapsed() < HEARTBEAT) {
            return Ok(());
        }
        self.record.beat_at = now_ms();
        store.heartbeat(&self.record)?;
        self.last = Some(std::time::Instant::now());
        Ok(())
    }
}

/// Which deployments an agent loop serves.
#[derive(Debug, Clone, Default)]
pub struct ServeScope {
    /// Only this application's deployments (a `cordon deploy` without an agent).
    pub application: Option<String>,
    /// Return once this deployment has finished.
    pub until: Option<String>,
    /// Return once no deployment is left unfinished.
    pub until_idle: bool,
}

/// Runs deployments until `scope` says to stop (or forever).
pub async fn serve(host: Arc<Host>, _lock: &AgentLock, scope: ServeScope) -> Result<()> {
    let swept = sweep_state_dir(&host.state_dir)?;
    if swept > 0 {
        tracing::info!("removed {swept} staging director(ies) left by killed commands");
    }
    let mut running: JoinSet<Result<DeploymentStatus>> = JoinSet::new();
    // Task → (application, deployment), and applications with one running.
    let mut tasks: HashMap<tokio::task::Id, (String, String)> = HashMap::new();
    let mut active: HashSet<String> = HashSet::new();
    let mut beat = Beat::new();
    loop {
        beat.renew(host.store.as_ref())?;
        if let Some(until) = &scope.until {
            let done = host.store.deployment(until)?.is_none_or(|d| d.status.is_final());
            if done && running.is_empty() {
                return Ok(());
            }
        }
        let unfinished = host.store.unfinished_deployments()?;
        if scope.until_idle && unfinished.is_empty() && running.is_empty() {
            return Ok(());
        }
        for d in unfinished {
            if scope.application.as_ref().is_some_and(|a| *a != d.application) || !active.insert(d.application.clone()) {
                continue;
            }
            let task = running.spawn(run::run_deployment(host.clone(), d.id.clone()));
            tasks.insert(task.id(), (d.application, d.id));
        }
        // Wake when a deployment ends (its application may have the next
        // one queued) or to look for newly queued ones.
        let finished = tokio::select! {
            Some(joined) = running.join_next_with_id() => Some(joined),
            _ = tokio::time::sleep(POLL) => None,
        };
        let Some(joined) = finished else { continue };
        let (task, result) = match joined {
            Ok((task, result)) => (task, result),
            Err(e) => (e.id(), Err(anyhow::anyhow!("the deployment task panicked: {e}"))),
        };
        let (app, id) = tasks.remove(&task).expect("every task is recorded");
        active.remove(&app);
        match result {
            Ok(status) => tracing::info!("deployment {id} finished: {status}"),
            Err(e) => {
                tracing::error!("deployment {id} stopped: {e:#}");
                host.store.set_deployment_status(&id, DeploymentStatus::Failure, &format!("agent error: {e:#}"), now_ms())?;
            }
        }
    }
}
