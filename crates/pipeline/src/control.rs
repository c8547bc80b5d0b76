//! What people do to deployments from outside the agent: approve, skip,
//! cancel, continue from a breakpoint. Each is checked here against the
//! deployment's state and recorded as a command in the store, where the
//! agent that runs the deployment picks it up.
//!
//! Deployments and stages are found by what people type: a stage by its id,
//! or by its name when that is unique in the deployment.

use std::fmt;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use cordon_store::{Answer, CommandKind, CommandRecord, DeploymentRecord, StageRecord, StageStatus, StateStore, now_ms};

/// How often [`await_answer`] looks for the stage's answer.
const ANSWER_POLL: Duration = Duration::from_millis(100);

/// The deployment `id`, or an error that lists recent ones.
pub fn deployment(store: &dyn StateStore, id: &str) -> Result<DeploymentRecord> {
    store.deployment(id)?.with_context(|| {
        let recent: Vec<String> = store.deployments(None, 5).unwrap_or_default().into_iter().map(|d| d.id).collect();
        format!("no deployment `{id}` (recent: {})", if recent.is_empty() { "none".to_string() } else { recent.join(", ") })
    })
}

/// A stage by id, or by name when the name is unique in the deployment.
pub fn resolve_stage<'a>(stages: &'a [StageRecord], deployment: &str, wanted: &str) -> Result<&'a StageRecord> {
    if let Some(s) = stages.iter().find(|s| s.id == wanted) {
        return Ok(s);
    }
    let by_name: Vec<&StageRecord> = stages.iter().filter(|s| s.name == wanted).collect();
    match by_name.as_slice() {
        [one] => Ok(one),
        [] => {
            let ids: Vec<&str> = stages.iter().map(|s| s.id.as_str()).collect();
            bail!("deployment {deployment} has no stage `{wanted}` (stages: {})", ids.join(", "))
        }
        several => {
            let ids: Vec<&str> = several.iter().map(|s| s.id.as_str()).collect();
            bail!("`{wanted}` names several stages of {deployment}; use one of the ids: {}", ids.join(", "))
        }
    }
}

/// The stage of `id` paused at a breakpoint.
pub fn paused_stage(store: &dyn StateStore, id: &str) -> Result<StageRecord> {
    let d = deployment(store, id)?;
    store.stages(id)?.into_iter().find(|s| s.status == StageStatus::Paused).with_context(|| {
        format!("deployment {id} ({}) has no paused stage; deploy with --break-before, --break-after or --break-on-failure", d.status)
    })
}

/// A recorded command; its `Display` is the one line that confirms it,
/// e.g. `approve sent to stage s1-WAIT_APPROVAL of app-3 as alice`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// The recorded command's id.
    pub id: String,
    pub deployment: String,
    /// The stage's id; empty for deployment commands.
    pub stage: String,
    pub kind: CommandKind,
    pub commander: String,
}

impl Sent {
    /// `deployment ID` or `stage STAGE of ID`.
    pub fn target(&self) -> String {
        if self.stage.is_empty() { format!("deployment {}", self.deployment) } else { format!("stage {} of {}", self.stage, self.deployment) }
    }
}

impl fmt::Display for Sent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} sent to {} as {}", self.kind, self.target(), self.commander)
    }
}

/// Checks and records a command for deployment `id` (or one of its
/// stages): the deployment and the stage must not have ended, and the
/// stage must exist once the deployment is planned.
pub fn send(store: &dyn StateStore, id: &str, stage: Option<&str>, kind: CommandKind, commander: &str) -> Result<Sent> {
    if commander.trim().is_empty() {
        bail!("--as is empty: name who sends the {kind} (it is recorded, and approver lists match it)");
    }
    let d = deployment(store, id)?;
    if d.status.is_final() {
        bail!("deployment {id} already ended ({}); there is nothing to {kind}", d.status);
    }
    let stage_id = match stage {
        Some(wanted) => {
            let stages = store.stages(id)?;
            if stages.is_empty() {
                bail!("deployment {id} is not planned yet; try again in a moment");
            }
            let s = resolve_stage(&stages, id, wanted)?;
            if s.status.is_final() {
                bail!("stage {} of {id} already ended ({}); there is nothing to {kind}", s.id, s.status);
            }
            // Only a running stage can be waiting for an approval.
            if kind == CommandKind::Approve && s.status != StageStatus::Running {
                bail!("stage {} of {id} is {}, not waiting for an approval; approve it while it runs", s.id, s.status);
            }
            s.id.clone()
        }
        None => String::new(),
    };
    let record = CommandRecord {
        id: format!("{id}/{kind}/{}-{}", now_ms(), std::process::id()),
        deployment: id.to_string(),
        stage: stage_id,
        kind,
        commander: commander.to_string(),
        created_at: now_ms() / 1000,
        answer: None,
    };
    store.add_command(&record)?;
    // A server records its caller's subject instead of the name sent.
    let commander = match store.through_server() {
        true => store.commands(id, None)?.into_iter().find(|c| c.id == record.id).map_or(record.commander, |c| c.commander),
        false => record.commander,
    };
    Ok(Sent { id: record.id, deployment: record.deployment, stage: record.stage, kind, commander })
}

/// Waits up to `within` for the stage's answer to `sent` (an approval's
/// plugin accepts or refuses it). `None` when no answer came: no agent
/// runs the deployment, the stage ended first, or its plugin does not
/// answer commands.
pub fn await_answer(store: &dyn StateStore, sent: &Sent, within: Duration) -> Result<Option<Answer>> {
    let deadline = Instant::now() + within;
    loop {
        // The stage first: a plugin answers before its stage ends, so an
        // ended stage's answer is in the commands read after.
        let stage_ended = store.stages(&sent.deployment)?.iter().any(|s| s.id == sent.stage && s.status.is_final());
        let command = store.commands(&sent.deployment, Some(&sent.stage))?.into_iter().find(|c| c.id == sent.id);
        if let Some(answer) = command.and_then(|c| c.answer) {
            return Ok(Some(answer));
        }
        if stage_ended || Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(ANSWER_POLL);
    }
}

/// Continues (or, with `fail`, fails) the stage `id` is paused at.
pub fn resume(store: &dyn StateStore, id: &str, fail: bool, commander: &str) -> Result<Sent> {
    paused_stage(store, id)?;
    let kind = if fail { CommandKind::DebugFailContinue } else { CommandKind::DebugContinue };
    send(store, id, None, kind, commander)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cordon_store::{DeploymentStatus, SqliteStore};

    fn stage(id: &str, name: &str, status: StageStatus) -> StageRecord {
        StageRecord {
            deployment: "d".into(),
            id: id.into(),
            ordinal: 0,
            name: name.into(),
            desc: String::new(),
            index: 0,
            rollback: false,
            options: "{}".into(),
            needs: Vec::new(),
            plugin: "p".into(),
            timeout_ms: 1000,
            status,
            message: String::new(),
            started_at: None,
            finished_at: None,
            attempts: 0,
        }
    }

    #[test]
    fn stages_resolve_by_id_or_unique_name() {
        let stages = [stage("s0", "WAIT", StageStatus::Success), stage("s1", "CHECK", StageStatus::Running), stage("s2", "CHECK", StageStatus::NotStarted)];
        assert_eq!(resolve_stage(&stages, "d", "s1").unwrap().id, "s1");
        assert_eq!(resolve_stage(&stages, "d", "WAIT").unwrap().id, "s0");
        let err = resolve_stage(&stages, "d", "CHECK").unwrap_err().to_string();
        assert!(err.contains("several") && err.contains("s1, s2"), "{err}");
        let err = resolve_stage(&stages, "d", "nope").unwrap_err().to_string();
        assert!(err.contains("no stage `nope`"), "{err}");
    }

    #[test]
    fn commands_are_refused_for_ended_deployments_and_stages() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("state.db")).unwrap();
        let err = send(&store, "nope-1", None, CommandKind::Cancel, "alice").unwrap_err().to_string();
        assert!(err.contains("no deployment `nope-1`"), "{err}");

        store.insert_deployment(&DeploymentRecord::queued("app-1", "app", String::new(), String::new(), now_ms())).unwrap();
        let err = send(&store, "app-1", Some("WAIT"), CommandKind::Approve, "alice").unwrap_err().to_string();
        assert!(err.contains("not planned yet"), "{err}");
        let sent = send(&store, "app-1", None, CommandKind::Cancel, "alice").unwrap();
        assert_eq!(sent.to_string(), "cancel sent to deployment app-1 as alice");
        assert_eq!(store.commands("app-1", None).unwrap().len(), 1);
        let err = send(&store, "app-1", None, CommandKind::Cancel, " ").unwrap_err().to_string();
        assert!(err.contains("--as is empty"), "{err}");
        let err = resume(&store, "app-1", false, "alice").unwrap_err().to_string();
        assert!(err.contains("no paused stage"), "{err}");

        let fence = store.claim("app-1", "agent", Duration::from_secs(5)).unwrap().unwrap();
        store.set_deployment_status(&fence, DeploymentStatus::Success, "", now_ms()).unwrap();
        let err = send(&store, "app-1", None, CommandKind::Cancel, "alice").unwrap_err().to_string();
        assert!(err.contains("already ended"), "{err}");
    }
}
