//! `cordon server` for the tests: replicas started as their own processes,
//! tokens stored directly, and the store an in-process [`Host`] uses when
//! the pipeline tests run through a server (`CORDON_TEST_STATE=server`).
//!
//! A test's `Host` both queues deployments (as a person) and runs them (as
//! an agent), but through a server those are two tokens: [`Split`] sends
//! each call to the side the API's method table says it belongs to.
//!
//! [`Host`]: cordon_pipeline::Host

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Result;
use cordon_api::{Access, RemoteStore, Token};
use cordon_store::*;

use crate::{AgentProcess, cordon_bin, expect_line, lines_of};

/// A token of `role` for `subject` reaching `applications`, stored; the
/// token itself.
pub fn insert_token(store: &dyn StateStore, subject: &str, role: &str, applications: &[&str], expires_at: Option<u64>) -> String {
    let token = Token::generate().unwrap();
    store
        .token_insert(&TokenRecord {
            id: token.id.clone(),
            hash: token.hash(),
            subject: subject.into(),
            role: role.into(),
            applications: applications.iter().map(|a| a.to_string()).collect(),
            created_at: now_ms(),
            created_by: "test".into(),
            expires_at,
            revoked_at: None,
        })
        .unwrap();
    token.reveal()
}

/// A `cordon server` process; its URL read from what it prints.
pub struct Replica {
    pub url: String,
    pub process: AgentProcess,
}

/// Starts `cordon server --server-config CONFIG`; its log goes to the
/// test's stderr.
pub fn start_replica(config: &Path) -> Replica {
    let mut child = Command::new(cordon_bin())
        .args(["server", "--server-config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = lines_of(child.stderr.take().unwrap());
    let mut seen = Vec::new();
    expect_line(&lines, "listening on", Duration::from_secs(30), &mut seen);
    let line = seen.iter().find(|l| l.contains("listening on")).unwrap();
    let url = line.split_whitespace().find(|w| w.starts_with("http")).unwrap().to_string();
    std::thread::spawn(move || for line in lines { eprintln!("server: {line}") });
    Replica { url, process: AgentProcess(child) }
}

/// The subject of the people's token a world's commands use unless they
/// name another with `--as`.
pub const PERSON: &str = "tester";

/// Two replicas over one world's database, with an admin token for people,
/// an agent token, and an approver token per name a test acts as. People
/// try the first replica first, agent processes too, and a [`Host`]'s
/// agent side the second: agents are connected to either.
///
/// [`Host`]: cordon_pipeline::Host
pub struct Replicas {
    replicas: Mutex<Vec<Replica>>,
    urls: Vec<String>,
    db: PostgresStore,
    agent: String,
    people: Mutex<HashMap<String, String>>,
}

impl Replicas {
    /// Starts two plain-HTTP loopback replicas on `database` (their
    /// configs go into `dir`).
    pub fn start(dir: &Path, database: &str) -> Replicas {
        // Opening the database first creates its schema once, before
        // two servers would race to.
        let db = PostgresStore::open(database, None, "the test database").unwrap();
        let agent = insert_token(&db, "agent", "agent", &["*"], None);
        let person = insert_token(&db, PERSON, "admin", &["*"], None);
        let replicas: Vec<Replica> = (0..2)
            .map(|i| {
                let config = dir.join(format!("server{i}.yaml"));
                std::fs::write(&config, format!("listen: 127.0.0.1:0\nplain-http: true\nstate: {{ postgres: {{ url: \"{database}\" }} }}\n")).unwrap();
                start_replica(&config)
            })
            .collect();
        let urls = replicas.iter().map(|r| r.url.clone()).collect();
        Replicas { replicas: Mutex::new(replicas), urls, db, agent, people: Mutex::new(HashMap::from([(PERSON.to_string(), person)])) }
    }

    /// The token of `subject` (an approver, made on first use).
    fn person(&self, subject: &str) -> String {
        self.people.lock().unwrap().entry(subject.to_string()).or_insert_with(|| insert_token(&self.db, subject, "approver", &["*"], None)).clone()
    }

    fn servers(&self, first: usize) -> String {
        format!("{},{}", self.urls[first], self.urls[1 - first])
    }

    /// Points `command` at the replicas as `subject`.
    pub fn as_person(&self, command: &mut Command, subject: &str) {
        command.env(cordon_api::SERVER_ENV, self.servers(0)).env(cordon_api::TOKEN_ENV, self.person(subject));
    }

    /// Points `command` (a `cordon agent`) at the replicas with the agent token.
    pub fn as_agent(&self, command: &mut Command) {
        command.env(cordon_api::SERVER_ENV, self.servers(0)).env(cordon_api::TOKEN_ENV, &self.agent);
    }

    /// Kills replica `i` (0 is the one people and agent processes try first).
    pub fn kill(&self, i: usize) {
        let mut replicas = self.replicas.lock().unwrap();
        let _ = replicas[i].process.0.kill();
        let _ = replicas[i].process.0.wait();
    }

    /// The audit log the replicas wrote.
    pub fn audit(&self) -> Vec<AuditRecord> {
        self.db.audit(0, usize::MAX).unwrap()
    }

    /// The store of a [`Host`] that queues as [`PERSON`] and runs as the agent.
    ///
    /// [`Host`]: cordon_pipeline::Host
    pub fn split(&self) -> Split {
        let open = |first: usize, token: &str| {
            let urls = cordon_api::client::parse_urls(&self.servers(first), "the test replicas").unwrap();
            RemoteStore::open(&cordon_api::Server { urls, token: Token::parse(token).unwrap(), ca_file: None }).unwrap()
        };
        Split { person: open(0, &self.person(PERSON)), agent: open(1, &self.agent) }
    }
}

/// A store whose agent-only methods go through the server with the agent
/// token and every other one with a person's.
pub struct Split {
    person: RemoteStore,
    agent: RemoteStore,
}

impl Split {
    /// The side `method` belongs to, by the API's own table.
    fn side(&self, method: &str) -> &RemoteStore {
        match cordon_api::method(method) {
            Some((Access::Agent, _)) => &self.agent,
            _ => &self.person,
        }
    }
}

/// Each method, sent to [`Split::side`] by its name.
macro_rules! routed {
    ($(fn $name:ident(&self $(, $arg:ident: $ty:ty)*) -> $ret:ty;)*) => {
        $(fn $name(&self $(, $arg: $ty)*) -> $ret {
            self.side(stringify!($name)).$name($($arg),*)
        })*
    };
}

impl StateStore for Split {
    fn describe(&self) -> String {
        self.person.describe()
    }
    fn through_server(&self) -> bool {
        true
    }
    routed! {
        fn upsert_application(&self, name: &str, dir: &str) -> Result<()>;
        fn application(&self, name: &str) -> Result<Option<ApplicationRecord>>;
        fn applications(&self) -> Result<Vec<ApplicationRecord>>;
        fn insert_deployment(&self, deployment: &DeploymentRecord) -> Result<()>;
        fn deployment(&self, id: &str) -> Result<Option<DeploymentRecord>>;
        fn deployments(&self, application: Option<&str>, limit: usize) -> Result<Vec<DeploymentRecord>>;
        fn unfinished_deployments(&self) -> Result<Vec<DeploymentRecord>>;
        fn save_plan(&self, fence: &Fence, plan: &str, running_snapshot: &str, stages: &[StageRecord], at: u64) -> Result<()>;
        fn set_deployment_status(&self, fence: &Fence, status: DeploymentStatus, reason: &str, at: u64) -> Result<()>;
        fn complete_success(&self, fence: &Fence, reason: &str, at: u64) -> Result<()>;
        fn replace_target_snapshot(&self, deployment: &str, from: &str, to: &str) -> Result<bool>;
        fn delete_deployments(&self, application: &str, ids: &[String], grace: Duration) -> Result<Deleted>;
        fn snapshot_put(&self, reference: &str, archive: &[u8]) -> Result<()>;
        fn snapshot_get(&self, reference: &str) -> Result<Option<Vec<u8>>>;
        fn claimable(&self) -> Result<Vec<DeploymentRecord>>;
        fn claim(&self, deployment: &str, agent: &str, ttl: Duration) -> Result<Option<Fence>>;
        fn renew(&self, agent: &str, fences: &[Fence], ttl: Duration) -> Result<Vec<Fence>>;
        fn release(&self, fence: &Fence) -> Result<()>;
        fn expire_leases(&self) -> Result<usize>;
        fn refused_writes(&self, deployment: &str) -> Result<Vec<RefusedWrite>>;
        fn lease(&self, deployment: &str) -> Result<Option<(Fence, Option<String>)>>;
        fn stages(&self, deployment: &str) -> Result<Vec<StageRecord>>;
        fn start_stage(&self, fence: &Fence, stage: &str, at: u64) -> Result<()>;
        fn transition_stage(&self, fence: &Fence, stage: &str, from: &[StageStatus], to: StageStatus, message: &str, at: u64) -> Result<bool>;
        fn reset_running_stages(&self, fence: &Fence) -> Result<usize>;
        fn append_logs(&self, fence: &Fence, lines: &[LogRecord]) -> Result<()>;
        fn logs(&self, deployment: &str, stage: Option<&str>, after_seq: i64, limit: usize) -> Result<Vec<LogRecord>>;
        fn metadata_get(&self, deployment: &str, stage: &str, key: &str) -> Result<Option<String>>;
        fn metadata_put(&self, fence: &Fence, stage: &str, key: &str, value: &str) -> Result<()>;
        fn metadata_put_within(&self, fence: &Fence, stage: &str, key: &str, value: &str, quota: Quota) -> Result<bool>;
        fn metadata_entries(&self, deployment: &str, stage: &str) -> Result<Vec<(String, String)>>;
        fn blob_get(&self, application: &str, plugin: &str, key: &str) -> Result<Option<Vec<u8>>>;
        fn blob_put_within(&self, fence: &Fence, application: &str, plugin: &str, key: &str, value: &[u8], quota: Quota) -> Result<bool>;
        fn blob_delete(&self, fence: &Fence, application: &str, plugin: &str, key: &str) -> Result<()>;
        fn add_command(&self, command: &CommandRecord) -> Result<()>;
        fn commands(&self, deployment: &str, stage: Option<&str>) -> Result<Vec<CommandRecord>>;
        fn answer_command(&self, fence: &Fence, stage: &str, id: &str, answer: &Answer) -> Result<()>;
        fn heartbeat(&self, beat: &AgentBeat) -> Result<()>;
        fn agents(&self) -> Result<Vec<AgentBeat>>;
        fn token_insert(&self, token: &TokenRecord) -> Result<()>;
        fn token(&self, id: &str) -> Result<Option<TokenRecord>>;
        fn tokens(&self) -> Result<Vec<TokenRecord>>;
        fn token_revoke(&self, id: &str, at: u64) -> Result<bool>;
        fn audit_append(&self, entry: &AuditRecord) -> Result<()>;
        fn audit(&self, after_seq: i64, limit: usize) -> Result<Vec<AuditRecord>>;
    }
}
