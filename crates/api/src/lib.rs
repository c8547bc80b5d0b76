//! Cordon's HTTP API: the methods a server offers, who may call each, how
//! a refusal looks, and [`RemoteStore`], the state store that calls a
//! server instead of opening a database.
//!
//! The shape follows the RPC style of PipeCD's piped API (gRPC) in plain
//! JSON, like Twirp or Connect: every method of the state store is
//! `POST /api/v1/<method>` with its arguments as a JSON object, and
//! answers with its result as JSON. So the server offers exactly what an
//! agent or a command needs of the store, [`Call`] is the one list of
//! methods for server, client and the OpenAPI document, and a new store
//! method is one new variant. Snapshot archives are raw bytes
//! (`PUT`/`GET /api/v1/snapshots/<reference>`), not JSON.
//!
//! Authentication is a bearer token ([`Token`]); what each method asks of
//! its caller is [`Access`], decided by the method alone.

pub mod client;
mod token;

use serde::{Deserialize, Serialize};

use cordon_store::{
    AgentBeat, Answer, CommandRecord, DeploymentRecord, DeploymentStatus, Fence, LogRecord, Quota, StageRecord, StageStatus, TokenRecord,
};

pub use client::{CA_FILE_ENV, RemoteStore, SERVER_ENV, Server, TOKEN_ENV, TOKEN_FILE_ENV};
pub use token::{Role, Token, check_record, patterns};

/// Where every method lives: `POST {PREFIX}/<method>`.
pub const PREFIX: &str = "/api/v1";
/// Snapshot archives: `PUT`/`GET {SNAPSHOTS}/<reference>`.
pub const SNAPSHOTS: &str = "/api/v1/snapshots";
/// The OpenAPI document of this API.
pub const OPENAPI: &str = "/api/v1/openapi.json";
/// Longest a `logs` call may wait for new lines (a long poll).
pub const MAX_WAIT_MS: u64 = 25_000;

/// One call of a store method: the method (the path) and its arguments
/// (the body).
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "method", content = "args", rename_all = "snake_case", deny_unknown_fields)]
pub enum Call {
    Application { name: String },
    Applications {},
    UpsertApplication { name: String, dir: String },
    InsertDeployment { deployment: DeploymentRecord },
    Deployment { id: String },
    Deployments { application: Option<String>, limit: usize },
    UnfinishedDeployments {},
    SavePlan { fence: Fence, plan: String, running_snapshot: String, stages: Vec<StageRecord>, at: u64 },
    SetDeploymentStatus { fence: Fence, status: DeploymentStatus, reason: String, at: u64 },
    CompleteSuccess { fence: Fence, reason: String, at: u64 },
    ReplaceTargetSnapshot { deployment: String, from: String, to: String },
    DeleteDeployments { application: String, ids: Vec<String>, grace_ms: u64 },
    Claimable {},
    Claim { deployment: String, agent: String, ttl_ms: u64 },
    Renew { agent: String, fences: Vec<Fence>, ttl_ms: u64 },
    Release { fence: Fence },
    ExpireLeases {},
    RefusedWrites { deployment: String },
    Lease { deployment: String },
    Stages { deployment: String },
    StartStage { fence: Fence, stage: String, at: u64 },
    TransitionStage { fence: Fence, stage: String, from: Vec<StageStatus>, to: StageStatus, message: String, at: u64 },
    ResetRunningStages { fence: Fence },
    AppendLogs { fence: Fence, lines: Vec<LogRecord> },
    /// Lines after `after_seq`; with `wait_ms`, waits up to that long
    /// (at most [`MAX_WAIT_MS`]) for the first new line (a long poll).
    Logs {
        deployment: String,
        stage: Option<String>,
        after_seq: i64,
        limit: usize,
        #[serde(default)]
        wait_ms: u64,
    },
    MetadataGet { deployment: String, stage: String, key: String },
    MetadataPut { fence: Fence, stage: String, key: String, value: String },
    MetadataPutWithin { fence: Fence, stage: String, key: String, value: String, quota: Quota },
    MetadataEntries { deployment: String, stage: String },
    BlobGet { application: String, plugin: String, key: String },
    /// `value` in standard base64.
    BlobPutWithin { fence: Fence, application: String, plugin: String, key: String, value: String, quota: Quota },
    BlobDelete { fence: Fence, application: String, plugin: String, key: String },
    /// The server records the caller as the commander.
    AddCommand { command: CommandRecord },
    Commands { deployment: String, stage: Option<String> },
    AnswerCommand { fence: Fence, stage: String, id: String, answer: Answer },
    Heartbeat { beat: AgentBeat },
    Agents {},
    /// The server records the caller as the creator, and the time.
    TokenInsert { token: TokenRecord },
    Tokens {},
    TokenRevoke { id: String },
    Audit { after_seq: i64, limit: usize },
}

/// What a method asks of its caller's token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Any token; results are limited to the token's applications (and,
    /// for an agent, to the deployments it holds).
    Read,
    /// A person's token of role `deployer` or above (`approver` for an
    /// approval).
    Deploy,
    /// An agent's token, holding the lease of the deployment written.
    Agent,
    /// An `admin` token.
    Admin,
}

/// Every method by its name in the path, with the access it needs and
/// whether it changes state (each attempt at such a method is audited).
/// The one table the server routes and documents by.
pub const METHODS: &[(&str, Access, bool)] = &[
    ("application", Access::Read, false),
    ("applications", Access::Read, false),
    ("upsert_application", Access::Deploy, true),
    ("insert_deployment", Access::Deploy, true),
    ("deployment", Access::Read, false),
    ("deployments", Access::Read, false),
    ("unfinished_deployments", Access::Read, false),
    ("save_plan", Access::Agent, true),
    ("set_deployment_status", Access::Agent, true),
    ("complete_success", Access::Agent, true),
    ("replace_target_snapshot", Access::Deploy, true),
    ("delete_deployments", Access::Admin, true),
    ("claimable", Access::Agent, false),
    ("claim", Access::Agent, true),
    ("renew", Access::Agent, true),
    ("release", Access::Agent, true),
    ("expire_leases", Access::Admin, true),
    ("refused_writes", Access::Read, false),
    ("lease", Access::Read, false),
    ("stages", Access::Read, false),
    ("start_stage", Access::Agent, true),
    ("transition_stage", Access::Agent, true),
    ("reset_running_stages", Access::Agent, true),
    ("append_logs", Access::Agent, true),
    ("logs", Access::Read, false),
    ("metadata_get", Access::Read, false),
    ("metadata_put", Access::Agent, true),
    ("metadata_put_within", Access::Agent, true),
    ("metadata_entries", Access::Read, false),
    ("blob_get", Access::Read, false),
    ("blob_put_within", Access::Agent, true),
    ("blob_delete", Access::Agent, true),
    ("add_command", Access::Deploy, true),
    ("commands", Access::Read, false),
    ("answer_command", Access::Agent, true),
    ("heartbeat", Access::Agent, true),
    ("agents", Access::Read, false),
    ("token_insert", Access::Admin, true),
    ("tokens", Access::Admin, false),
    ("token_revoke", Access::Admin, true),
    ("audit", Access::Admin, false),
];

/// The method `name` of the path: its access and whether it changes state.
pub fn method(name: &str) -> Option<(Access, bool)> {
    METHODS.iter().find(|(n, ..)| *n == name).map(|&(_, access, writes)| (access, writes))
}

impl Call {
    /// The method's name (the path) and its arguments (the body), from
    /// one serialisation of the call.
    pub fn parts(&self) -> (String, serde_json::Value) {
        let mut value = serde_json::to_value(self).expect("calls serialise");
        let name = value["method"].as_str().expect("every call has a method").to_string();
        (name, value["args"].take())
    }

    /// The lease a write of an agent carries, if it is one.
    pub fn fence(&self) -> Option<&Fence> {
        use Call::*;
        match self {
            SavePlan { fence, .. }
            | SetDeploymentStatus { fence, .. }
            | CompleteSuccess { fence, .. }
            | Release { fence }
            | StartStage { fence, .. }
            | TransitionStage { fence, .. }
            | ResetRunningStages { fence }
            | AppendLogs { fence, .. }
            | MetadataPut { fence, .. }
            | MetadataPutWithin { fence, .. }
            | BlobPutWithin { fence, .. }
            | BlobDelete { fence, .. }
            | AnswerCommand { fence, .. } => Some(fence),
            _ => None,
        }
    }

    /// The call of method `name` with arguments `args` (a request's path
    /// and body); the error names the field and what was wrong with it.
    pub fn parse(name: &str, args: serde_json::Value) -> Result<Call, serde_json::Error> {
        serde_json::from_value(serde_json::json!({ "method": name, "args": args }))
    }
}

/// A refusal as every endpoint answers it: a stable code for programs and
/// a message for people that names the field or value and the fix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message} ({code})")]
pub struct ApiError {
    pub code: String,
    pub message: String,
}

/// The body of every refusal: `{"error": {"code": …, "message": …}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ApiError,
}

/// Stable refusal codes and their HTTP statuses.
pub mod code {
    /// 401: no token, or one unknown, revoked or expired.
    pub const UNAUTHENTICATED: &str = "unauthenticated";
    /// 403: the token's role or applications do not allow it.
    pub const FORBIDDEN: &str = "forbidden";
    /// 400: the body is not the method's arguments.
    pub const BAD_REQUEST: &str = "bad_request";
    /// 404: no such method, deployment, application or snapshot.
    pub const NOT_FOUND: &str = "not_found";
    /// 409: already exists, or a lease another agent has since taken over.
    pub const CONFLICT: &str = "conflict";
    /// 409: a write under a lease another agent has taken over.
    pub const FENCED: &str = "fenced";
    /// 413: the body is larger than the server accepts.
    pub const TOO_LARGE: &str = "too_large";
    /// 503: the state store did not answer.
    pub const UNAVAILABLE: &str = "unavailable";
    /// 500: the state store failed otherwise, or the handler stopped.
    pub const INTERNAL: &str = "internal";
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table and the enum name the same methods, and a call survives
    /// the trip through a path and a body.
    #[test]
    fn every_call_has_one_entry_in_the_table() {
        let schema = schemars::schema_for!(Call);
        let variants = schema.as_value()["oneOf"].as_array().unwrap().clone();
        let mut names: Vec<String> = variants.iter().map(|v| v["properties"]["method"]["const"].as_str().unwrap().to_string()).collect();
        let mut table: Vec<String> = METHODS.iter().map(|(n, ..)| n.to_string()).collect();
        names.sort();
        table.sort();
        assert_eq!(names, table);

        let call = Call::Logs { deployment: "d1".into(), stage: None, after_seq: 3, limit: 10, wait_ms: 0 };
        let (name, args) = call.parts();
        let back = Call::parse(&name, args).unwrap();
        assert_eq!(format!("{back:?}"), format!("{call:?}"));
        let err = Call::parse("deployment", serde_json::json!({"idd": "x"})).unwrap_err().to_string();
        assert!(err.contains("idd") || err.contains("`id`"), "{err}");
    }
}
