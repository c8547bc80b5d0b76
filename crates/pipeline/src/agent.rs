//! The agent: runs queued deployments and resumes unfinished ones.
//!
//! One agent owns a state directory at a time (an exclusive lock on
//! `agent.lock`); commands from other processes reach it through the state
//! store. Agents sharing a PostgreSQL store divide deployments by leases
//! (see [`serve`]). Deployments of different applications run at once; a deployment
//! waits while an earlier one of the same application is unfinished. On
//! start it removes the staging directories killed commands left. While it
//! serves it records a heartbeat every [`HEARTBEAT`], so that followers
//! can say when no agent is alive instead of showing a stage "running"
//! for ever. The heartbeat also carries what the agent offers (name,
//! labels, stages, plugins): it claims only deployments whose
//! requirements it meets, and followers say when no live agent does.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use cordon_store::lock::{AgentLock, sweep_state_dir};
use tokio::task::JoinSet;

use cordon_store::{AgentBeat, DeploymentRecord, DeploymentStatus, Fence, Fenced, now_ms};
use crate::{Host, retention, run};

/// How often the agent looks for new deployments when its store cannot
/// wake it.
const POLL: Duration = Duration::from_millis(200);
/// How often it looks anyway when the store wakes it (notifications can
/// be lost with a connection, and expired leases notify nobody).
const FALLBACK_POLL: Duration = Duration::from_secs(1);
/// How often a serving agent records a heartbeat.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// A heartbeat older than this means its agent stopped (or hangs).
pub const STALE: Duration = Duration::from_secs(10);

/// How long before `now` (milliseconds since the epoch) the agent of
/// `beat` last reported: it is alive while this is under [`STALE`].
pub fn silence(beat: &AgentBeat, now: u64) -> Duration {
    Duration::from_millis(now.saturating_sub(beat.beat_at))
}

/// `None` while a live agent (one that reported within [`STALE`]) may
/// run `deployment`; otherwise why nothing will, for a follower to say.
pub fn nobody_runs(store: &dyn cordon_store::StateStore, deployment: &DeploymentRecord) -> Result<Option<Stale>> {
    nobody_meets(store, &deployment.requires)
}

/// [`nobody_runs`] for a deployment that needs `requires`.
pub fn nobody_meets(store: &dyn cordon_store::StateStore, requires: &cordon_store::Requirements) -> Result<Option<Stale>> {
    let now = now_ms();
    let agents = store.agents()?;
    let live: Vec<&AgentBeat> = agents.iter().filter(|beat| silence(beat, now) < STALE).collect();
    if live.is_empty() {
        return Ok(Some(Stale::Silent { last: agents.first().map(|beat| (beat.clone(), silence(beat, now))) }));
    }
    let lacking: Vec<(String, Vec<String>)> = live.iter().map(|beat| (format!("{} ({})", beat.name, beat.id), requires.unmet_by(beat))).collect();
    if lacking.iter().any(|(_, unmet)| unmet.is_empty()) {
        return Ok(None);
    }
    Ok(Some(Stale::Ineligible { lacking }))
}

/// Why no agent runs a deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stale {
    /// No agent has reported lately: the newest heartbeat and how long ago
    /// it was, if any agent ever wrote one.
    Silent { last: Option<(AgentBeat, Duration)> },
    /// Agents are alive, but none meets the deployment's requirements:
    /// each one with what it lacks.
    Ineligible { lacking: Vec<(String, Vec<String>)> },
}

impl std::fmt::Display for Stale {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stale::Silent { last: Some((beat, silent)) } => write!(
                f,
                "no agent has reported for {}s (the last was pid {} on {}); nothing runs until an agent does: start `cordon agent`",
                silent.as_secs(),
                beat.pid,
                beat.host
            ),
            Stale::Silent { last: None } => write!(f, "no agent has ever reported on this state; nothing runs until one does: start `cordon agent`"),
            Stale::Ineligible { lacking } => {
                let each: Vec<String> = lacking.iter().map(|(agent, unmet)| format!("{agent} lacks {}", unmet.join(", "))).collect();
                write!(
                    f,
                    "no live agent may run this deployment ({}); it waits until one that may reports: start one with those labels and plugins, or change `agents:` in the application config",
                    each.join("; ")
                )
            }
        }
    }
}

/// This process's heartbeat, renewed by [`Beat::renew`] at most every
/// [`HEARTBEAT`].
struct Beat {
    record: AgentBeat,
    last: Option<std::time::Instant>,
}

impl Beat {
    fn new(offer: &AgentBeat) -> Self {
        let pid = std::process::id();
        let now = now_ms();
        let record = AgentBeat { id: format!("{}/{pid}", offer.host), pid, started_at: now, beat_at: now, ..offer.clone() };
        Self { record, last: None }
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

/// Interrupts the deployments still running and ends their leases, for
/// another agent to resume them without waiting for the leases to expire.
async fn hand_over(host: &Host, mut running: JoinSet<Result<DeploymentStatus>>, held: HashMap<tokio::task::Id, Held>) -> Result<()> {
    running.abort_all();
    while running.join_next().await.is_some() {}
    for Held { fence, .. } in held.into_values() {
        match host.store.release(&fence) {
            Ok(()) => tracing::warn!("deployment {}: handed over (its running stages run again where it resumes)", fence.deployment),
            Err(e) => tracing::warn!("deployment {}: cannot end its lease ({e:#}); it resumes once the lease expires", fence.deployment),
        }
    }
    Ok(())
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
    /// Becomes true when the agent is asked to stop (SIGTERM): it claims
    /// nothing more, gives its running deployments [`ServeScope::grace`]
    /// to finish, then hands the rest over — interrupts them and ends
    /// their leases, so another agent (or the next start) resumes them at
    /// once, re-running the stages that were interrupted, as after a crash.
    pub stop: Option<tokio::sync::watch::Receiver<bool>>,
    /// How long running deployments may go on once stopping.
    pub grace: Duration,
}

/// A deployment this agent runs: its lease and its task.
struct Held {
    fence: Fence,
    task: tokio::task::AbortHandle,
}

/// How often leases are renewed: well inside the lease, so one late
/// renewal does not lose it.
fn renew_every(lease: Duration) -> Duration {
    HEARTBEAT.min(lease / 3)
}

/// Runs deployments until `scope` says to stop (or forever).
///
/// It looks for work when the store wakes it (PostgreSQL notifies every
/// change that may make a deployment claimable), when one of its own
/// deployments ends, and at least every [`POLL`] ([`FALLBACK_POLL`] when
/// the store wakes it).
///
/// The agent claims each deployment it runs with a lease (see
/// [`cordon_store::StateStore::claim`]) and renews its leases as often as
/// it beats. A deployment whose lease another agent took over (this agent
/// was frozen or cut off past it) is stopped at once: its task is
/// aborted, and every write it still attempts is refused. On the embedded
/// database the agent holding the state directory's lock is the only one,
/// so it ends leases a killed predecessor left and resumes at once.
pub async fn serve(host: Arc<Host>, _lock: &AgentLock, scope: ServeScope) -> Result<()> {
    let swept = sweep_state_dir(&host.state_dir)?;
    if swept > 0 {
        tracing::info!("removed {swept} staging director(ies) left by killed commands");
    }
    if !host.shared {
        host.store.expire_leases()?;
    }
    let mut running: JoinSet<Result<DeploymentStatus>> = JoinSet::new();
    // Retention passes under way (left to finish, or to the next start's
    // sweep, when the agent stops).
    let mut pruning: JoinSet<()> = JoinSet::new();
    let mut held: HashMap<tokio::task::Id, Held> = HashMap::new();
    let mut beat = Beat::new(&host.offer);
    let mut renewed = std::time::Instant::now();
    let wake = host.store.wake();
    // Often enough to renew leases in time, whatever wakes the loop.
    let poll = if wake.is_some() { FALLBACK_POLL } else { POLL }.min(renew_every(host.lease));
    let mut stop = scope.stop.clone();
    // When the running deployments are handed over, once stopping.
    let mut handover: Option<tokio::time::Instant> = None;
    loop {
        if handover.is_none() && stop.as_ref().is_some_and(|s| *s.borrow()) {
            handover = Some(tokio::time::Instant::now() + scope.grace);
            if !held.is_empty() {
                tracing::warn!("stopping: claiming nothing more; {} running deployment(s) get {} to finish", held.len(), humantime::format_duration(scope.grace));
            }
        }
        if let Some(at) = handover {
            if running.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= at {
                return hand_over(&host, running, held).await;
            }
        }
        beat.renew(host.store.as_ref())?;
        if renewed.elapsed() >= renew_every(host.lease) {
            renewed = std::time::Instant::now();
            let fences: Vec<Fence> = held.values().map(|h| h.fence.clone()).collect();
            for lost in host.store.renew(&beat.record.id, &fences, host.lease)? {
                tracing::warn!("deployment {}: another agent took it over (this agent's lease ran out); stopping its stages here", lost.deployment);
                held.values().filter(|h| h.fence == lost).for_each(|h| h.task.abort());
            }
        }
        while pruning.try_join_next().is_some() {}
        if let Some(until) = &scope.until {
            let done = host.store.deployment(until)?.is_none_or(|d| d.status.is_final());
            if done && running.is_empty() && pruning.is_empty() {
                return Ok(());
            }
        }
        if scope.until_idle && running.is_empty() && pruning.is_empty() && host.store.unfinished_deployments()?.is_empty() {
            return Ok(());
        }
        let claimable = if handover.is_none() && held.len() < host.max_deployments { host.store.claimable()? } else { Vec::new() };
        for d in claimable {
            if held.len() >= host.max_deployments {
                break;
            }
            if scope.application.as_ref().is_some_and(|a| *a != d.application) || !d.requires.unmet_by(&beat.record).is_empty() {
                continue;
            }
            let Some(fence) = host.store.claim(&d.id, &beat.record.id, host.lease)? else { continue };
            let task = running.spawn(run::run_deployment(host.clone(), fence.clone()));
            held.insert(task.id(), Held { fence, task });
        }
        // Wake when a deployment ends (its application may have the next
        // one queued), when the store says work may be claimable, or to
        // look anyway.
        let notified = async {
            match &wake {
                Some(wake) => wake.notified().await,
                None => std::future::pending().await,
            }
        };
        let asked_to_stop = async {
            match stop.as_mut() {
                Some(stop) if handover.is_none() => {
                    let _ = stop.wait_for(|stopping| *stopping).await;
                }
                _ => std::future::pending().await,
            }
        };
        let nap = handover.map_or(poll, |at| poll.min(at.saturating_duration_since(tokio::time::Instant::now())));
        let finished = tokio::select! {
            Some(joined) = running.join_next_with_id() => Some(joined),
            Some(_) = pruning.join_next(), if !pruning.is_empty() => None,
            () = notified => None,
            () = asked_to_stop => None,
            _ = tokio::time::sleep(nap) => None,
        };
        let Some(joined) = finished else { continue };
        let (task, result) = match joined {
            Ok((task, result)) => (task, result),
            // Aborted: its lease was lost.
            Err(e) if e.is_cancelled() => (e.id(), Err(Fenced(held[&e.id()].fence.clone()).into())),
            Err(e) => (e.id(), Err(anyhow::anyhow!("the deployment task panicked: {e}"))),
        };
        let Held { fence, .. } = held.remove(&task).expect("every task is recorded");
        let id = &fence.deployment;
        let failed = match result {
            Ok(status) => {
                tracing::info!("deployment {id} finished: {status}");
                Ok(())
            }
            Err(e) if cordon_store::is_fenced(&e) => Err(e),
            Err(e) => {
                tracing::error!("deployment {id} stopped: {e:#}");
                host.store.set_deployment_status(&fence, DeploymentStatus::Failure, &format!("agent error: {e:#}"), now_ms())
            }
        };
        match failed {
            Err(e) if cordon_store::is_fenced(&e) => {
                tracing::warn!("deployment {id}: stopped here; the agent that took it over continues it");
                continue;
            }
            other => other?,
        }
        host.store.release(&fence)?;
        if let Some(keep) = host.retention {
            // Off the loop: removing large snapshot trees must not delay
            // lease renewals. Two prunes of one application may overlap;
            // each step of one tolerates the other.
            let (host, id) = (host.clone(), id.clone());
            pruning.spawn_blocking(move || retention::after(&host, &id, keep));
        }
    }
}
