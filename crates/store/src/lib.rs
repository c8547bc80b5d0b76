//! Durable state: applications, deployments, stages, logs, metadata, blobs
//! and commands.
//!
//! Everything a restart needs is here, behind the [`StateStore`] trait:
//! [`sqlite::SqliteStore`] is the embedded default (one file under the
//! state directory, no setup, one agent); [`postgres::PostgresStore`] lets
//! many agents share one PostgreSQL database. Both pass one conformance
//! suite (`conformance.rs`).
//!
//! Agents coordinate through leases: an agent claims a deployment
//! ([`StateStore::claim`]), renews the lease while it runs it, and every
//! write it makes for the deployment carries the lease's [`Fence`]. A write
//! with a fence another agent has since replaced is refused ([`Fenced`]).
//!
//! Two rules make resume after a crash safe:
//! - a stage result is recorded only by the transition `running → final`
//!   ([`StateStore::transition_stage`] from `running` answers whether it
//!   recorded it), so a result can never be recorded twice;
//! - on resume, stages still `running` go back to `not-started`
//!   ([`StateStore::reset_running_stages`]) and run again; stages that
//!   succeeded are never re-run. Plugins keep progress in metadata.

pub mod lock;
pub mod postgres;
pub mod retention;
pub mod sqlite;
#[cfg(test)]
mod conformance;
#[cfg(any(test, feature = "test-cluster"))]
pub mod test_cluster;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Result;
use serde::{Deserialize, Serialize};

pub use postgres::{DATABASE_URL_ENV, PostgresStore};

/// Largest snapshot archive a shared store keeps (it is one row, read
/// whole by each agent that runs it).
pub const MAX_SNAPSHOT: usize = 128 << 20;

/// How the reference of a snapshot kept in the store starts (any other
/// reference is a directory).
pub const STORED_SNAPSHOT: &str = "sha256:";

/// The reference a snapshot `archive` is kept under in a shared store:
/// `sha256:` and its digest, 64 lowercase hex digits (so it is also safe
/// in a file name).
pub fn snapshot_reference(archive: &[u8]) -> String {
    use sha2::Digest;
    format!("{STORED_SNAPSHOT}{:x}", sha2::Sha256::digest(archive))
}

/// Whether `reference` is shaped like a [`snapshot_reference`].
pub fn is_snapshot_reference(reference: &str) -> bool {
    reference.strip_prefix(STORED_SNAPSHOT).is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}
pub use sqlite::SqliteStore;

/// The state database inside a state directory.
pub fn database_path(state_dir: &Path) -> PathBuf {
    state_dir.join("state.db")
}

/// Whether `name` is safe as an id or name that becomes a file name
/// (deployment and migration ids, application names): 1 to 128 ASCII
/// letters, digits, '-', '_' or '.', not starting with '.' — so never `..`,
/// a separator or a hidden file.
pub fn is_safe_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// Milliseconds since the Unix epoch: the clock of every stored time.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Lifecycle of a deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum DeploymentStatus {
    /// Waiting for the agent (or for an earlier deployment of the same app).
    Queued,
    Running,
    RollingBack,
    Success,
    Failure,
    Cancelled,
}

impl DeploymentStatus {
    pub fn is_final(self) -> bool {
        matches!(self, Self::Success | Self::Failure | Self::Cancelled)
    }
}

/// Lifecycle of a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum StageStatus {
    NotStarted,
    Running,
    /// Held at a breakpoint until `cordon debug continue|fail-continue`.
    Paused,
    Success,
    Failure,
    Cancelled,
    Skipped,
    Exited,
}

impl StageStatus {
    pub fn is_final(self) -> bool {
        !matches!(self, Self::NotStarted | Self::Running | Self::Paused)
    }

    /// Whether stages that need this one may run.
    pub fn lets_dependents_run(self) -> bool {
        matches!(self, Self::Success | Self::Skipped)
    }
}

macro_rules! text_enum {
    ($ty:ty { $($variant:ident => $text:literal),* $(,)? }) => {
        impl $ty {
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),* }
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(self.as_str())
            }
        }
        impl FromStr for $ty {
            type Err = anyhow::Error;
            fn from_str(s: &str) -> Result<Self> {
                match s {
                    $($text => Ok(Self::$variant),)*
                    other => anyhow::bail!("unknown {} {other:?} in the state store", stringify!($ty)),
                }
            }
        }
    };
}

text_enum!(DeploymentStatus {
    Queued => "queued",
    Running => "running",
    RollingBack => "rolling-back",
    Success => "success",
    Failure => "failure",
    Cancelled => "cancelled",
});

text_enum!(StageStatus {
    NotStarted => "not-started",
    Running => "running",
    Paused => "paused",
    Success => "success",
    Failure => "failure",
    Cancelled => "cancelled",
    Skipped => "skipped",
    Exited => "exited",
});

/// An agent's latest sign of life: it writes one every few seconds while
/// it serves deployments, so a follower can tell a dead agent from a slow
/// stage. It also says what the agent offers (its labels, the stages its
/// plugins define and the plugins themselves), since plugins and grants
/// are per agent: a deployment goes only to an agent that meets its
/// [`Requirements`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct AgentBeat {
    /// `HOST/PID`: one process (the lease owner).
    pub id: String,
    /// The name the operator gave the agent (default: the host name).
    pub name: String,
    pub host: String,
    pub pid: u32,
    pub started_at: u64,
    pub beat_at: u64,
    pub labels: BTreeMap<String, String>,
    /// Stages its plugins define, sorted.
    pub stages: Vec<String>,
    /// Its plugins' names, sorted.
    pub plugins: Vec<String>,
}

/// What a deployment needs of the agent that runs it: the labels its
/// application asks for (`agents:` in `app.cordon.yaml`), the stages of
/// its pipeline and the plugins it names settings for (its planners).
/// Fixed when the deployment is queued, so every agent decides the same.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Requirements {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub stages: Vec<String>,
    #[serde(default)]
    pub plugins: Vec<String>,
}

impl Requirements {
    /// What `agent` lacks of these, one phrase each (`label env=prod`,
    /// `stage WAIT`, `plugin files`); empty when it may run the deployment.
    pub fn unmet_by(&self, agent: &AgentBeat) -> Vec<String> {
        let labels = self.labels.iter().filter(|(k, v)| agent.labels.get(*k) != Some(*v)).map(|(k, v)| format!("label {k}={v}"));
        let stages = self.stages.iter().filter(|s| !agent.stages.contains(s)).map(|s| format!("stage {s}"));
        let plugins = self.plugins.iter().filter(|p| !agent.plugins.contains(p)).map(|p| format!("plugin {p}"));
        labels.chain(stages).chain(plugins).collect()
    }
}

/// A deployment's requirements or an agent's labels, stages or plugins as
/// stored: JSON text.
fn json_column(value: &impl Serialize) -> String {
    serde_json::to_string(value).expect("maps and lists of strings serialise")
}

fn from_json_column<T: serde::de::DeserializeOwned>(what: &str, text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| anyhow::anyhow!("unreadable {what} {text:?} in the state store: {e}"))
}

/// A deployment as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DeploymentRecord {
    pub id: String,
    pub application: String,
    pub status: DeploymentStatus,
    /// One line: why it ended as it did, or what it is waiting for.
    pub reason: String,
    /// The trigger and options, as JSON (see `pipeline::Trigger`).
    pub trigger: String,
    /// The plan (strategy, versions), as JSON; empty until planned.
    pub plan: String,
    /// Snapshot directory of the target source.
    pub target_snapshot: String,
    /// Snapshot directory of the running source; empty on a first deployment.
    pub running_snapshot: String,
    /// What the agent that runs it must offer.
    pub requires: Requirements,
    pub created_at: u64,
    pub started_at: Option<u64>,
    pub finished_at: Option<u64>,
}

impl DeploymentRecord {
    /// A deployment waiting to be planned.
    pub fn queued(id: &str, application: &str, trigger: String, target_snapshot: String, created_at: u64) -> Self {
        Self {
            id: id.to_string(),
            application: application.to_string(),
            status: DeploymentStatus::Queued,
            reason: String::new(),
            trigger,
            plan: String::new(),
            target_snapshot,
            running_snapshot: String::new(),
            requires: Requirements::default(),
            created_at,
            started_at: None,
            finished_at: None,
        }
    }
}

/// A stage of a planned deployment, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct StageRecord {
    pub deployment: String,
    pub id: String,
    /// Position in the plan; stages are listed and started in this order.
    pub ordinal: u32,
    pub name: String,
    pub desc: String,
    pub index: u32,
    pub rollback: bool,
    pub options: String,
    /// Ids of the stages this one needs.
    pub needs: Vec<String>,
    /// The plugin that performs it.
    pub plugin: String,
    /// Timeout in milliseconds.
    pub timeout_ms: u64,
    pub status: StageStatus,
    pub message: String,
    pub started_at: Option<u64>,
    pub finished_at: Option<u64>,
    /// How many times it was started (more than one after a resume).
    pub attempts: u32,
}

/// One stage log line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct LogRecord {
    pub seq: i64,
    pub deployment: String,
    pub stage: String,
    pub at_ms: u64,
    pub source: String,
    pub text: String,
}

/// A command an operator addressed to a deployment or one of its stages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct CommandRecord {
    pub id: String,
    pub deployment: String,
    /// Empty for deployment commands (cancel).
    pub stage: String,
    pub kind: CommandKind,
    pub commander: String,
    pub created_at: u64,
    /// What the stage answered, once it did (an approval's plugin accepts
    /// or refuses it; commands the host acts on get none).
    pub answer: Option<Answer>,
}

/// A stage's answer to a command addressed to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Answer {
    Accepted,
    /// Refused, with the plugin's reason.
    Refused(String),
}

impl Answer {
    /// As stored: the verdict column and the reason column.
    fn columns(&self) -> (&'static str, &str) {
        match self {
            Answer::Accepted => ("accepted", ""),
            Answer::Refused(reason) => ("refused", reason.as_str()),
        }
    }

    /// From the stored columns (`None`: not answered).
    fn from_columns(verdict: Option<&str>, reason: String) -> Option<Answer> {
        match verdict {
            None => None,
            Some("accepted") => Some(Answer::Accepted),
            Some(_) => Some(Answer::Refused(reason)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum CommandKind {
    Approve,
    Skip,
    Cancel,
    /// Resume a paused stage as a success (or run it, if paused before).
    DebugContinue,
    /// Resume a paused stage as a failure.
    DebugFailContinue,
}

text_enum!(CommandKind {
    Approve => "approve",
    Skip => "skip",
    Cancel => "cancel",
    DebugContinue => "debug-continue",
    DebugFailContinue => "debug-fail-continue",
});

/// How much one scope of metadata or blobs may hold: entries, and bytes of
/// keys and values together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Quota {
    pub entries: u64,
    pub bytes: u64,
}

impl Quota {
    /// Whether a scope holding `entries` other entries of `bytes` bytes
    /// may take one more of `added` bytes.
    pub fn admits(&self, entries: u64, bytes: u64, added: u64) -> bool {
        entries < self.entries && bytes.saturating_add(added) <= self.bytes
    }
}

/// An application known to the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ApplicationRecord {
    pub name: String,
    /// Directory the app config was read from.
    pub dir: String,
    /// The last deployment that succeeded, if any.
    pub last_success: Option<String>,
    /// Its source snapshot: the running source of the next deployment.
    pub running_snapshot: Option<String>,
}

/// An API token as stored: never the secret, only its SHA-256. What the
/// role and the application patterns allow is the server's to decide.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct TokenRecord {
    /// Public and unique (`tok-` and 12 hex digits): names the token in
    /// listings, revocations and the audit log.
    pub id: String,
    /// Hex SHA-256 of the token's secret.
    pub hash: String,
    /// Who uses it: a person, or an agent's name.
    pub subject: String,
    pub role: String,
    /// Application name patterns (`*` wildcards) it may reach.
    pub applications: Vec<String>,
    pub created_at: u64,
    pub created_by: String,
    pub expires_at: Option<u64>,
    pub revoked_at: Option<u64>,
}

/// One attempt at a state-changing request, allowed or refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct AuditRecord {
    /// Order of recording; assigned by the store.
    pub seq: i64,
    pub at: u64,
    /// The authenticated subject, or `-` when none was.
    pub subject: String,
    /// The API method.
    pub action: String,
    /// What it was aimed at (`deployment d-…`, `application web`, …).
    pub target: String,
    /// The client's address as the server saw it.
    pub client: String,
    /// `ok`, or the refusal's code (`forbidden`, `unauthenticated`, …).
    pub outcome: String,
}

/// The columns every backend reads and writes a token with, in this order.
const TOKEN_COLUMNS: &str = "id, hash, subject, role, applications, created_at, created_by, expires_at, revoked_at";
/// The columns every backend reads an audit entry with, in this order.
const AUDIT_COLUMNS: &str = "seq, at, subject, action, target, client, outcome";

/// SQL (the same in every backend) selecting, as `d`, the unfinished
/// deployments that are the oldest unfinished of their application: the
/// only claimable ones, so an application's deployments run in order.
const HEAD_OF_APPLICATION: &str = "d.status IN ('queued', 'running', 'rolling-back')
     AND NOT EXISTS (SELECT 1 FROM deployments e WHERE e.application = d.application
                     AND e.status IN ('queued', 'running', 'rolling-back') AND e.seq < d.seq)";

/// SQL (the same in every backend): the deployment `$id` of application
/// `$app` if it may be deleted — finished, and not its application's last
/// success. Placeholders are the backend's.
fn deletable(id: &str, app: &str) -> String {
    format!(
        "id = {id} AND application = {app} AND status IN ('success', 'failure', 'cancelled')
         AND NOT EXISTS (SELECT 1 FROM applications WHERE name = {app} AND last_success = {id})"
    )
}

/// The tables holding rows of a deployment (column `deployment`) besides
/// `deployments` itself.
const PER_DEPLOYMENT: [&str; 5] = ["stages", "logs", "metadata", "commands", "refused_writes"];

/// SQL (the same in every backend): the stored snapshots stored before
/// `{before}` (ms) that are no deployment's source, no unfinished one's
/// running source and no application's running source.
fn unreferenced_snapshots(before: &str) -> String {
    format!(
        "SELECT digest FROM snapshots s WHERE stored_at < {before}
         AND NOT EXISTS (SELECT 1 FROM deployments d WHERE d.target_snapshot = s.digest
                         OR (d.running_snapshot = s.digest AND d.status IN ('queued', 'running', 'rolling-back')))
         AND NOT EXISTS (SELECT 1 FROM applications a WHERE a.running_snapshot = s.digest)"
    )
}

/// What [`StateStore::delete_deployments`] deleted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Deleted {
    pub deployments: Vec<String>,
    /// Stored snapshots (`sha256:…`) that went with them.
    pub snapshots: Vec<String>,
}

/// The columns every backend reads a deployment from, in this order.
const DEPLOYMENT_COLUMNS: &str =
    "id, application, status, reason, trigger, plan, target_snapshot, running_snapshot, created_at, started_at, finished_at, requires";

/// The columns every backend reads and writes an agent's heartbeat with, in this order.
const AGENT_COLUMNS: &str = "id, name, host, pid, started_at, beat_at, labels, stages, plugins";

/// Free text (log lines, reasons, messages) as stored: NUL, which
/// PostgreSQL text cannot hold, becomes U+FFFD in every backend alike.
fn text(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains('\0') { s.replace('\0', "\u{FFFD}").into() } else { s.into() }
}

/// Keys and values that must come back exactly (metadata, blob keys):
/// refused, in every backend alike, when they hold a NUL.
fn exact<'a>(what: &str, s: &'a str) -> Result<&'a str> {
    anyhow::ensure!(!s.contains('\0'), "a {what} may not contain a NUL character (\\0); the state store cannot hold it");
    Ok(s)
}

/// The right to write one deployment's progress: the lease an agent
/// claimed on it, named by the lease's epoch. Every write an agent makes for
/// a deployment carries it; once another agent has claimed the deployment
/// (a higher epoch), such a write is refused with [`Fenced`], so an agent
/// that was frozen or cut off past its lease cannot overwrite its
/// successor's work.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Fence {
    pub deployment: String,
    pub epoch: i64,
}

/// A write carried a lease another agent has since taken over.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("deployment {}: this agent's lease (epoch {}) was taken over by another agent; it stops its stages there", .0.deployment, .0.epoch)]
pub struct Fenced(pub Fence);

/// A write refused because its lease was stale.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct RefusedWrite {
    /// The stale lease's epoch.
    pub epoch: i64,
    /// The store method (`transition_stage`, `append_logs`, `renew`, …).
    pub write: String,
    pub at: u64,
}

/// Whether `error` (or what it wraps) is a refused write of a stale lease.
pub fn is_fenced(error: &anyhow::Error) -> bool {
    error.chain().any(|e| e.is::<Fenced>())
}

/// Durable state behind one agent or many.
///
/// Reads take plain ids. Writes of a deployment's progress take the
/// [`Fence`] of the lease the writing agent holds; people's writes
/// (deployments queued, commands sent) take none.
pub trait StateStore: Send + Sync {
    /// Where the state is, for messages (never a credential).
    fn describe(&self) -> String;
    /// Whether a `cordon server` stands between this caller and the
    /// database: the server decides who may do what, and a person's
    /// command never runs a deployment itself.
    fn through_server(&self) -> bool {
        false
    }

    // Applications.
    fn upsert_application(&self, name: &str, dir: &str) -> Result<()>;
    fn application(&self, name: &str) -> Result<Option<ApplicationRecord>>;
    fn applications(&self) -> Result<Vec<ApplicationRecord>>;

    // Deployments.
    fn insert_deployment(&self, deployment: &DeploymentRecord) -> Result<()>;
    fn deployment(&self, id: &str) -> Result<Option<DeploymentRecord>>;
    /// Newest first; `application` filters when given.
    fn deployments(&self, application: Option<&str>, limit: usize) -> Result<Vec<DeploymentRecord>>;
    /// Deployments not yet finished, oldest first.
    fn unfinished_deployments(&self) -> Result<Vec<DeploymentRecord>>;
    /// Stores the plan, its stages and the running source it was planned
    /// against, and marks the deployment running, in one transaction.
    fn save_plan(&self, fence: &Fence, plan: &str, running_snapshot: &str, stages: &[StageRecord], at: u64) -> Result<()>;
    fn set_deployment_status(&self, fence: &Fence, status: DeploymentStatus, reason: &str, at: u64) -> Result<()>;
    /// Marks the deployment successful and its target snapshot the
    /// application's running source, in one transaction.
    fn complete_success(&self, fence: &Fence, reason: &str, at: u64) -> Result<()>;

    /// Points a paused deployment's target source at another snapshot
    /// (an upload on a shared store), if it still is at `from` and still
    /// has a paused stage; false, and nothing written, otherwise.
    fn replace_target_snapshot(&self, deployment: &str, from: &str, to: &str) -> Result<bool>;

    // Snapshots kept in the store (shared stores), by content digest.
    /// Stores a snapshot archive under its digest reference (`sha256:…`);
    /// storing one that is there already changes nothing.
    fn snapshot_put(&self, reference: &str, archive: &[u8]) -> Result<()>;
    fn snapshot_get(&self, reference: &str) -> Result<Option<Vec<u8>>>;

    // Retention (see [`retention`]).
    /// Deletes those of deployments `ids` that belong to `application`, are
    /// finished and are not its last success, with everything recorded for
    /// them (stages, logs, metadata, commands, refused writes); then the
    /// stored snapshots no longer needed (no deployment's source, no
    /// unfinished one's running source, no application's running source)
    /// that were stored more than `grace` ago (a younger one may belong to
    /// a deployment being queued).
    /// One transaction; answers what went.
    fn delete_deployments(&self, application: &str, ids: &[String], grace: std::time::Duration) -> Result<Deleted>;

    // Leases.
    /// Unfinished deployments an agent may claim now, oldest first: the
    /// oldest unfinished one of each application (so an application's
    /// deployments run in order, whoever runs them) whose lease is free or
    /// expired.
    fn claimable(&self) -> Result<Vec<DeploymentRecord>>;
    /// Claims `deployment` for `agent` for `ttl` if it is still claimable
    /// (skipping it, not waiting, when another agent is claiming it right
    /// now); the new lease's epoch is one more than any before.
    fn claim(&self, deployment: &str, agent: &str, ttl: std::time::Duration) -> Result<Option<Fence>>;
    /// Extends `agent`'s leases by `ttl`; returns those it no longer holds.
    fn renew(&self, agent: &str, fences: &[Fence], ttl: std::time::Duration) -> Result<Vec<Fence>>;
    /// Ends a lease (its deployment finished or its agent stops), so
    /// another agent need not wait for it to expire.
    fn release(&self, fence: &Fence) -> Result<()>;
    /// Ends every lease at once: only for an agent that knows it is the
    /// only one (the embedded database's agent holds the state directory's
    /// lock), so a restart resumes at once instead of after the lease.
    fn expire_leases(&self) -> Result<usize>;
    /// Writes refused for `deployment` because their lease was taken over
    /// (lease renewals included), oldest first: the trace a stale agent
    /// leaves. Each kind of write is recorded once per stale lease (its
    /// first refusal), so a stale agent's plugin that keeps logging cannot
    /// make the store hold a row per line.
    fn refused_writes(&self, deployment: &str) -> Result<Vec<RefusedWrite>>;
    /// The current lease of `deployment` (epoch 0 before any claim) and
    /// the agent that holds or last held it.
    fn lease(&self, deployment: &str) -> Result<Option<(Fence, Option<String>)>>;

    // Stages.
    fn stages(&self, deployment: &str) -> Result<Vec<StageRecord>>;
    /// `not-started → running`; counts an attempt.
    fn start_stage(&self, fence: &Fence, stage: &str, at: u64) -> Result<()>;
    /// Moves a stage from one of `from` to `to`, recording `message` (and,
    /// for a final status, the finish time); false (and nothing written) if
    /// the stage was in none of `from`, so no transition happens twice.
    fn transition_stage(&self, fence: &Fence, stage: &str, from: &[StageStatus], to: StageStatus, message: &str, at: u64) -> Result<bool>;
    /// `running → not-started` for every stage of the deployment; returns how many.
    fn reset_running_stages(&self, fence: &Fence) -> Result<usize>;

    // Logs.
    /// Appends lines of the fenced deployment (their `deployment` is ignored).
    fn append_logs(&self, fence: &Fence, lines: &[LogRecord]) -> Result<()>;
    /// Lines after `after_seq`, optionally of one stage, oldest first; a
    /// line is never committed after one with a higher `seq` of the same
    /// deployment, so a follower that asks for lines after the last it saw
    /// misses none.
    fn logs(&self, deployment: &str, stage: Option<&str>, after_seq: i64, limit: usize) -> Result<Vec<LogRecord>>;

    // Metadata: `stage` is empty for deployment scope.
    fn metadata_get(&self, deployment: &str, stage: &str, key: &str) -> Result<Option<String>>;
    /// A host write (pause state and the like): no quota.
    fn metadata_put(&self, fence: &Fence, stage: &str, key: &str, value: &str) -> Result<()>;
    /// A plugin's write: checked against `quota` for the scope (other
    /// entries plus this one) and stored in one transaction; false, and
    /// nothing written, when it would pass the quota.
    fn metadata_put_within(&self, fence: &Fence, stage: &str, key: &str, value: &str, quota: Quota) -> Result<bool>;
    fn metadata_entries(&self, deployment: &str, stage: &str) -> Result<Vec<(String, String)>>;

    // Blobs, per application and plugin, written by a deployment's stages.
    fn blob_get(&self, application: &str, plugin: &str, key: &str) -> Result<Option<Vec<u8>>>;
    /// Like [`StateStore::metadata_put_within`], for the blobs of one
    /// application and plugin.
    fn blob_put_within(&self, fence: &Fence, application: &str, plugin: &str, key: &str, value: &[u8], quota: Quota) -> Result<bool>;
    fn blob_delete(&self, fence: &Fence, application: &str, plugin: &str, key: &str) -> Result<()>;

    // Commands.
    fn add_command(&self, command: &CommandRecord) -> Result<()>;
    /// Commands of the deployment (`stage` = None) or of one stage.
    fn commands(&self, deployment: &str, stage: Option<&str>) -> Result<Vec<CommandRecord>>;
    /// Records the answer of `stage` of the fenced deployment to its
    /// command `id`, unless the command already has one; another stage's
    /// command, or an unknown id, changes nothing.
    fn answer_command(&self, fence: &Fence, stage: &str, id: &str, answer: &Answer) -> Result<()>;

    // Agents.
    /// Notified when a deployment may have become claimable (queued,
    /// finished, released) by any writer, so an agent need not wait for
    /// its next poll; `None` when the backend cannot tell (the agent then
    /// only polls). A notification may be spurious or, across a lost
    /// connection, late: agents keep polling as a fallback.
    fn wake(&self) -> Option<std::sync::Arc<tokio::sync::Notify>> {
        None
    }
    /// Records `beat` as its agent's latest heartbeat.
    fn heartbeat(&self, beat: &AgentBeat) -> Result<()>;
    /// Every agent's latest heartbeat, newest first.
    fn agents(&self) -> Result<Vec<AgentBeat>>;

    // Access (the server's tokens and audit log).
    fn token_insert(&self, token: &TokenRecord) -> Result<()>;
    fn token(&self, id: &str) -> Result<Option<TokenRecord>>;
    /// Every token, oldest first.
    fn tokens(&self) -> Result<Vec<TokenRecord>>;
    /// Marks the token revoked; `false` if there is none by that id or it
    /// was revoked already.
    fn token_revoke(&self, id: &str, at: u64) -> Result<bool>;
    /// Appends one entry (its `seq` is assigned); entries are never
    /// changed or removed (the database refuses it).
    fn audit_append(&self, entry: &AuditRecord) -> Result<()>;
    /// Entries after `after_seq`, oldest first.
    fn audit(&self, after_seq: i64, limit: usize) -> Result<Vec<AuditRecord>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requirements_name_what_an_agent_lacks() {
        let agent = AgentBeat {
            labels: [("env".to_string(), "dev".to_string()), ("zone".to_string(), "a".to_string())].into(),
            stages: vec!["WAIT".into()],
            plugins: vec!["wait".into()],
            ..Default::default()
        };
        let requires = Requirements {
            labels: [("env".to_string(), "prod".to_string()), ("zone".to_string(), "a".to_string())].into(),
            stages: vec!["WAIT".into(), "HTTP_CHECK".into()],
            plugins: vec!["files".into()],
        };
        assert_eq!(requires.unmet_by(&agent), ["label env=prod", "stage HTTP_CHECK", "plugin files"]);
        assert!(Requirements::default().unmet_by(&agent).is_empty(), "no requirements: any agent");
        assert!(Requirements { labels: [("zone".to_string(), "a".to_string())].into(), ..Default::default() }.unmet_by(&agent).is_empty());
    }

    #[test]
    fn safe_names_cannot_leave_a_directory() {
        for ok in ["web", "mig-18c2-ab12cd34", "app.v2", "a_b-1"] {
            assert!(is_safe_name(ok), "{ok}");
        }
        for bad in ["", ".", "..", "../../x", "/abs", "a/b", ".hidden", "a\\b", "a b", &"x".repeat(129)] {
            assert!(!is_safe_name(bad), "{bad:?}");
        }
    }
}
