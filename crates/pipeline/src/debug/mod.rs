//! Breakpoints on stages and local data upload into a paused deployment
//! (Tekton's breakpoints and TEP-0149), for the developer's inner loop:
//! pause at a stage, push local changes into the deployment's source, go on.
//!
//! A stage at a breakpoint is `paused`. Before it runs (`breakBefore`):
//! `cordon debug continue` runs it, `fail-continue` fails it without
//! running. After it ran (`breakAfter`) or when it failed
//! (`breakOnFailure`): `continue` records it as a success, `fail-continue`
//! as a failure (and rollback follows as usual). `cordon debug run`
//! executes the paused stage once more, verbosely, and leaves it paused.
//! The deployment timeout does not count while a stage is paused.
//!
//! Fail closed: the reason a stage is paused is stored with it; if that
//! record is missing or unreadable, any resume is a failure — never a
//! success (Tekton fails *open* when its signal file is unreadable).

pub mod upload;

use serde::{Deserialize, Serialize};

use cordon_store::{Fence, StageRecord, StageStatus, StateStore};

/// Where a deployment pauses, from `cordon deploy --break-*` and the app
/// config's `debug:` section. Stages are named by id or name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Breakpoints {
    #[serde(default)]
    pub break_before: Vec<String>,
    #[serde(default)]
    pub break_after: Vec<String>,
    #[serde(default)]
    pub break_on_failure: bool,
}

fn names(list: &[String], stage: &StageRecord) -> bool {
    list.iter().any(|s| *s == stage.id || *s == stage.name)
}

impl Breakpoints {
    /// Both sets of breakpoints.
    pub fn merged(&self, other: &Breakpoints) -> Breakpoints {
        let mut out = self.clone();
        out.break_before.extend(other.break_before.iter().cloned());
        out.break_after.extend(other.break_after.iter().cloned());
        out.break_on_failure |= other.break_on_failure;
        out
    }

    pub fn before(&self, stage: &StageRecord) -> bool {
        !stage.rollback && names(&self.break_before, stage)
    }

    pub fn after(&self, stage: &StageRecord) -> bool {
        !stage.rollback && names(&self.break_after, stage)
    }

    /// Every stage reference, for validation.
    pub fn references(&self) -> impl Iterator<Item = &String> {
        self.break_before.iter().chain(&self.break_after)
    }
}

/// Why a stage is paused; stored with it so a restarted agent keeps it
/// paused and resumes it correctly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "at", rename_all = "kebab-case")]
pub enum Pause {
    Before,
    After { status: StageStatus, message: String },
    OnFailure { message: String },
}

/// The host's own metadata scope (plugins' stage ids never start with `#`).
const HOST_SCOPE: &str = "#cordon";

fn pause_key(stage: &str) -> String {
    format!("pause:{stage}")
}

impl Pause {
    pub fn save(&self, store: &dyn StateStore, fence: &Fence, stage: &str) -> anyhow::Result<()> {
        store.metadata_put(fence, HOST_SCOPE, &pause_key(stage), &serde_json::to_string(self)?)
    }

    /// The stored pause, or an error saying why it cannot be trusted.
    pub fn load(store: &dyn StateStore, deployment: &str, stage: &str) -> Result<Pause, String> {
        let text = store
            .metadata_get(deployment, HOST_SCOPE, &pause_key(stage))
            .map_err(|e| format!("the pause record cannot be read: {e:#}"))?
            .ok_or("the pause record is missing")?;
        serde_json::from_str(&text).map_err(|e| format!("the pause record is unreadable: {e}"))
    }

    /// What `continue` (`fail = false`) or `fail-continue` turns the stage
    /// into, and the message. `Before` + continue goes back to
    /// `not-started`, to run.
    pub fn resume(pause: Result<Pause, String>, fail: bool, who: &str) -> (StageStatus, String) {
        match (pause, fail) {
            (Err(why), _) => (StageStatus::Failure, format!("failing closed: {why}")),
            (Ok(Pause::Before), false) => (StageStatus::NotStarted, String::new()),
            (Ok(Pause::Before), true) => (StageStatus::Failure, format!("failed at its breakpoint by {who}, without running")),
            (Ok(Pause::After { message, .. }), false) => (StageStatus::Success, with(&message, &format!("continued by {who}"))),
            (Ok(Pause::After { message, .. }), true) => (StageStatus::Failure, with(&message, &format!("failed at its breakpoint by {who}"))),
            (Ok(Pause::OnFailure { message }), false) => (StageStatus::Success, with(&message, &format!("failed, then continued as a success by {who}"))),
            (Ok(Pause::OnFailure { message }), true) => (StageStatus::Failure, message),
        }
    }
}

fn with(message: &str, note: &str) -> String {
    if message.is_empty() { note.to_string() } else { format!("{message} ({note})") }
}

/// Marks that a stage passed its before-breakpoint, so it runs next time.
pub fn mark_passed(store: &dyn StateStore, fence: &Fence, stage: &str) -> anyhow::Result<()> {
    store.metadata_put(fence, HOST_SCOPE, &format!("passed:{stage}"), "1")
}

pub fn passed(store: &dyn StateStore, deployment: &str, stage: &str) -> anyhow::Result<bool> {
    Ok(store.metadata_get(deployment, HOST_SCOPE, &format!("passed:{stage}"))?.is_some())
}

/// Milliseconds the deployment spent paused (the deployment timeout
/// does not count them).
pub fn paused_ms(store: &dyn StateStore, deployment: &str) -> anyhow::Result<u64> {
    Ok(store.metadata_get(deployment, HOST_SCOPE, "paused-ms")?.and_then(|v| v.parse().ok()).unwrap_or(0))
}

pub fn set_paused_ms(store: &dyn StateStore, fence: &Fence, total: u64) -> anyhow::Result<()> {
    store.metadata_put(fence, HOST_SCOPE, "paused-ms", &total.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resuming_fails_closed() {
        let (status, message) = Pause::resume(Err("the pause record is missing".into()), false, "dev");
        assert_eq!(status, StageStatus::Failure);
        assert!(message.contains("failing closed"));
        assert_eq!(Pause::resume(Ok(Pause::Before), false, "dev").0, StageStatus::NotStarted);
        assert_eq!(Pause::resume(Ok(Pause::OnFailure { message: "boom".into() }), false, "dev").0, StageStatus::Success);
        assert_eq!(Pause::resume(Ok(Pause::After { status: StageStatus::Success, message: String::new() }), true, "dev").0, StageStatus::Failure);
    }
}
