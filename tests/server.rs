//! `cordon server`: the authorization matrix (every role × every method ×
//! an application in and out of the token's reach, and no, revoked,
//! expired or forged tokens), the audit log of every attempt, malformed
//! and random requests, and people and agents working through two
//! replicas of which one is killed mid-deployment.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use cordon_api::{Access, METHODS, Role, Token};
use cordon_store::test_cluster::Cluster;
use cordon_store::*;
use cordon_tests::replicas::{insert_token, start_replica};
use cordon_tests::{AgentProcess, World, cordon_bin, expect_line, lines_of, plugin_entry};

/// A server of this process on a loopback port, over `store`.
struct Api {
    url: String,
    store: Arc<dyn StateStore>,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
}

/// The two backends every in-process test runs on.
fn stores() -> Vec<(&'static str, Arc<dyn StateStore>, tempfile::TempDir)> {
    let dir = tempfile::tempdir().unwrap();
    let sqlite: Arc<dyn StateStore> = Arc::new(SqliteStore::open(&dir.path().join("state.db")).unwrap());
    let url = Cluster::shared().database();
    let postgres: Arc<dyn StateStore> = Arc::new(PostgresStore::open(&url, None, "the test database").unwrap());
    vec![("sqlite", sqlite, dir), ("postgres", postgres, tempfile::tempdir().unwrap())]
}

async fn start(store: Arc<dyn StateStore>, dir: tempfile::TempDir) -> Api {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = cordon_server::router(store.clone(), 1 << 20);
    tokio::spawn(async move { axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await.unwrap() });
    // No pooled connections: a connection the server closed after a 413
    // must not be picked for the next request.
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    Api { url, store, client, _dir: dir }
}

impl Api {
    async fn send(&self, method: reqwest::Method, path: &str, token: Option<&str>, body: Vec<u8>) -> (u16, Value) {
        self.try_send(method, path, token, body).await.unwrap()
    }

    async fn try_send(&self, method: reqwest::Method, path: &str, token: Option<&str>, body: Vec<u8>) -> reqwest::Result<(u16, Value)> {
        let mut request = self.client.request(method, format!("{}{path}", self.url)).body(body);
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await?;
        Ok((status, serde_json::from_slice(&bytes).unwrap_or_else(|_| json!(String::from_utf8_lossy(&bytes)))))
    }

    async fn post(&self, method: &str, token: Option<&str>, body: &Value) -> (u16, Value) {
        self.send(reqwest::Method::POST, &format!("/api/v1/{method}"), token, serde_json::to_vec(body).unwrap()).await
    }

    /// The audit entries after `seq`.
    fn audit_after(&self, seq: i64) -> Vec<AuditRecord> {
        self.store.audit(seq, 10_000).unwrap()
    }

    fn last_seq(&self) -> i64 {
        self.audit_after(0).last().map_or(0, |e| e.seq)
    }
}

fn digest(c: char) -> String {
    format!("sha256:{}", c.to_string().repeat(64))
}

/// Two applications, `in` and `out`, each with a planned deployment
/// (`d-in`, `d-out`) whose lease agent `ag` holds (epoch 1), and their
/// target snapshots stored.
fn fixture(store: &dyn StateStore) {
    for app in ["in", "out"] {
        store.upsert_application(app, "/apps").unwrap();
        let archive = format!("archive of {app}").into_bytes();
        let reference = snapshot_reference(&archive);
        store.snapshot_put(&reference, &archive).unwrap();
        let id = format!("d-{app}");
        store.insert_deployment(&DeploymentRecord::queued(&id, app, "{}".into(), reference, 1)).unwrap();
        let fence = store.claim(&id, "ag:h/1", Duration::from_secs(3600)).unwrap().unwrap();
        let stage = StageRecord {
            deployment: id.clone(),
            id: "s1".into(),
            ordinal: 0,
            name: "STEP".into(),
            desc: String::new(),
            index: 0,
            rollback: false,
            options: "{}".into(),
            needs: vec![],
            plugin: "step".into(),
            timeout_ms: 1000,
            status: StageStatus::NotStarted,
            message: String::new(),
            started_at: None,
            finished_at: None,
            attempts: 0,
        };
        store.save_plan(&fence, "{}", "", &[stage], 2).unwrap();
    }
}

/// Valid arguments of `method` aimed at application `app` and its
/// deployment; writes of an agent carry a stale lease (epoch 999), so an
/// allowed one is refused by the store as fenced and changes nothing.
fn example(method: &str, app: &str, n: usize) -> Value {
    let dep = format!("d-{app}");
    let fence = json!({"deployment": dep, "epoch": 999});
    let quota = json!({"entries": 10, "bytes": 1000});
    match method {
        "application" => json!({"name": app}),
        "upsert_application" => json!({"name": app, "dir": "/apps"}),
        "insert_deployment" => json!({"deployment": DeploymentRecord::queued(&dep, app, "{}".into(), digest('a'), 1)}),
        "deployment" => json!({"id": dep}),
        "deployments" => json!({"application": app, "limit": 5}),
        "save_plan" => json!({"fence": fence, "plan": "{}", "running_snapshot": "", "stages": [], "at": 1}),
        "set_deployment_status" => json!({"fence": fence, "status": "failure", "reason": "x", "at": 1}),
        "complete_success" => json!({"fence": fence, "reason": "x", "at": 1}),
        "replace_target_snapshot" => json!({"deployment": dep, "from": digest('b'), "to": digest('c')}),
        "claim" => json!({"deployment": dep, "agent": "h/1", "ttl_ms": 60000}),
        "delete_deployments" => json!({"application": app, "ids": [dep], "grace_ms": 3_600_000}),
        "renew" => json!({"agent": "h/1", "fences": [], "ttl_ms": 60000}),
        "release" | "reset_running_stages" => json!({"fence": fence}),
        "refused_writes" | "lease" | "stages" => json!({"deployment": dep}),
        "start_stage" => json!({"fence": fence, "stage": "s1", "at": 1}),
        "transition_stage" => json!({"fence": fence, "stage": "s1", "from": [], "to": "success", "message": "", "at": 1}),
        "append_logs" => json!({"fence": fence, "lines": []}),
        "logs" => json!({"deployment": dep, "stage": null, "after_seq": 0, "limit": 10}),
        "metadata_get" => json!({"deployment": dep, "stage": "s1", "key": "k"}),
        "metadata_put" => json!({"fence": fence, "stage": "s1", "key": "k", "value": "v"}),
        "metadata_put_within" => json!({"fence": fence, "stage": "s1", "key": "k", "value": "v", "quota": quota}),
        "metadata_entries" => json!({"deployment": dep, "stage": "s1"}),
        "blob_get" => json!({"application": app, "plugin": "p", "key": "k"}),
        "blob_put_within" => json!({"fence": fence, "application": app, "plugin": "p", "key": "k", "value": "aGk=", "quota": quota}),
        "blob_delete" => json!({"fence": fence, "application": app, "plugin": "p", "key": "k"}),
        "add_command" => json!({"command": CommandRecord {
            id: format!("c{n}"), deployment: dep, stage: "s1".into(), kind: CommandKind::Approve,
            commander: "forged".into(), created_at: 0, answer: None }}),
        "commands" => json!({"deployment": dep, "stage": null}),
        "answer_command" => json!({"fence": fence, "stage": "s1", "id": "c0", "answer": "accepted"}),
        "heartbeat" => json!({"beat": AgentBeat { id: "h/1".into(), name: "ag".into(), ..Default::default() }}),
        "token_insert" => json!({"token": {"id": format!("tok-{n:012x}"), "hash": "0".repeat(64), "subject": "new", "role": "viewer",
            "applications": [app], "created_at": 0, "created_by": "forged", "expires_at": null, "revoked_at": null}}),
        "token_revoke" => json!({"id": "tok-000000000000"}),
        "audit" => json!({"after_seq": 0, "limit": 1}),
        _ => json!({}),
    }
}

/// Whether the method is aimed at one application (and so refused out
/// of reach) rather than listing what is within reach.
fn aimed(method: &str) -> bool {
    !matches!(method, "applications" | "unfinished_deployments" | "claimable" | "renew" | "expire_leases" | "heartbeat" | "agents")
        && !method.starts_with("token")
        && method != "audit"
}

/// Whether `role` may call `method` on an application within reach.
fn role_allows(role: Role, access: Access, method: &str) -> bool {
    match access {
        Access::Read => true,
        Access::Deploy => role.includes(if method == "add_command" { Role::Approver } else { Role::Deployer }),
        Access::Agent => role == Role::Agent,
        Access::Admin => role.includes(Role::Admin),
    }
}

/// Each role × each method × in and out of reach gives exactly the
/// expected allow or 403; no, forged, revoked and expired tokens get
/// 401; every attempt that changes state or is refused is in the audit
/// log with its subject, method and outcome — and nothing else is.
#[tokio::test(flavor = "multi_thread")]
async fn every_role_on_every_method_in_and_out_of_reach() {
    for (backend, store, dir) in stores() {
        fixture(store.as_ref());
        let api = start(store.clone(), dir).await;
        let tokens: Vec<(Role, String, String)> = Role::ALL
            .iter()
            .map(|&role| {
                let subject = if role == Role::Agent { "ag".to_string() } else { format!("{role}-person") };
                (role, subject.clone(), insert_token(store.as_ref(), &subject, role.as_str(), &["in"], None))
            })
            .collect();
        let mut n = 0;
        let mut checked = 0;
        for &(method, access, writes) in METHODS {
            for app in ["in", "out"] {
                for (role, subject, token) in &tokens {
                    n += 1;
                    let before = api.last_seq();
                    let (status, body) = api.post(method, Some(token), &example(method, app, n)).await;
                    let allowed = role_allows(*role, access, method) && !(app == "out" && aimed(method));
                    let what = format!("{backend}: {role} {method} on {app}: {status} {body}");
                    if allowed {
                        assert!(status != 401 && status != 403 && status < 500, "expected allowed; {what}");
                    } else {
                        assert_eq!(status, 403, "expected 403; {what}");
                        assert_eq!(body["error"]["code"], "forbidden", "{what}");
                    }
                    let quiet = *role == Role::Agent && matches!(method, "heartbeat" | "renew") && status == 200;
                    let entries = api.audit_after(before);
                    if (writes && !quiet) || status >= 400 {
                        assert_eq!(entries.len(), 1, "one audit entry; {what}: {entries:?}");
                        let outcome = if status == 200 { "ok".to_string() } else { body["error"]["code"].as_str().unwrap().to_string() };
                        assert_eq!((entries[0].subject.as_str(), entries[0].action.as_str(), entries[0].outcome.as_str()), (subject.as_str(), method, outcome.as_str()), "{what}");
                        assert!(entries[0].client.starts_with("127.0.0.1:"), "{:?}", entries[0]);
                    } else {
                        assert!(entries.is_empty(), "an allowed read is not audited; {what}: {entries:?}");
                    }
                    checked += 1;
                }
            }
        }
        // The recorded commander is the token's subject, never what was sent.
        let approvals = store.commands("d-in", None).unwrap();
        assert!(!approvals.is_empty() && approvals.iter().all(|c| c.commander != "forged"), "{approvals:?}");
        assert!(store.tokens().unwrap().iter().all(|t| t.created_by != "forged"));

        // Tokens that prove nobody: 401 for every method, audited, and nothing done.
        let revoked = insert_token(store.as_ref(), "gone", "admin", &["*"], None);
        assert!(store.token_revoke(&Token::parse(&revoked).unwrap().id, now_ms()).unwrap());
        let expired = insert_token(store.as_ref(), "late", "admin", &["*"], Some(now_ms() - 1));
        let forged = format!("{}x", &tokens[3].2[..tokens[3].2.len() - 1]);
        let commands = store.commands("d-in", None).unwrap().len();
        for &(method, ..) in METHODS {
            for (token, why) in [(None, "no token"), (Some(revoked.as_str()), "revoked"), (Some(expired.as_str()), "expired"), (Some(forged.as_str()), "not known")] {
                let before = api.last_seq();
                let (status, body) = api.post(method, token, &example(method, "in", 0)).await;
                assert_eq!(status, 401, "{backend}: {method} with {why}: {body}");
                assert_eq!(body["error"]["code"], "unauthenticated");
                let entries = api.audit_after(before);
                assert_eq!(entries.len(), 1, "{method} {why}");
                assert_eq!((entries[0].subject.as_str(), entries[0].outcome.as_str()), ("-", "unauthenticated"));
                checked += 1;
            }
        }
        assert_eq!(store.commands("d-in", None).unwrap().len(), commands, "refused requests changed nothing");

        // Snapshots: reachable ones are served; others look absent; storing needs deployer.
        let d_in = store.deployment("d-in").unwrap().unwrap().target_snapshot;
        let d_out = store.deployment("d-out").unwrap().unwrap().target_snapshot;
        for (role, subject, token) in &tokens {
            let before = api.last_seq();
            let (status, _) = api.send(reqwest::Method::GET, "/api/v1/snapshots/sha256:nothex", Some(token), vec![]).await;
            assert_eq!(status, 400, "{role}: a reference that is no digest");
            let entries = api.audit_after(before);
            assert_eq!(entries.iter().map(|e| (e.subject.as_str(), e.outcome.as_str())).collect::<Vec<_>>(), [(subject.as_str(), "bad_request")]);
            let (status, _) = api.send(reqwest::Method::GET, &format!("/api/v1/snapshots/{d_in}"), Some(token), vec![]).await;
            assert_eq!(status, 200, "{role} reads an in-reach snapshot");
            let (status, _) = api.send(reqwest::Method::GET, &format!("/api/v1/snapshots/{d_out}"), Some(token), vec![]).await;
            assert_eq!(status, 404, "{role} cannot see an out-of-reach snapshot");
            let archive = format!("new by {role}").into_bytes();
            let reference = snapshot_reference(&archive);
            let (status, _) = api.send(reqwest::Method::PUT, &format!("/api/v1/snapshots/{reference}"), Some(token), archive).await;
            assert_eq!(status, if role.includes(Role::Deployer) { 200 } else { 403 }, "{role} stores a snapshot");
            let (status, body) = api.send(reqwest::Method::PUT, &format!("/api/v1/snapshots/{}", digest('d')), Some(token), b"other".to_vec()).await;
            assert_eq!(status, if role.includes(Role::Deployer) { 400 } else { 403 }, "{role}: a snapshot under another digest: {body}");
        }
        eprintln!("{backend}: {checked} requests checked");
    }
}

/// Tiny deterministic generator (xorshift), so a failure repeats.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn string(&mut self) -> String {
        let pieces = ["", "a", "in", "d-in", "s1", "../..", "\u{0}", "é", "🦀", "*", "sha256:", " ", "\"", "%2F", "'; DROP TABLE audit; --"];
        let mut s = String::new();
        for _ in 0..self.next() % 4 {
            s.push_str(pieces[(self.next() % pieces.len() as u64) as usize]);
        }
        if self.next().is_multiple_of(20) {
            s.push_str(&"x".repeat(100_000));
        }
        s
    }

    fn number(&mut self) -> Value {
        match self.next() % 5 {
            0 => json!(0),
            1 => json!(-1),
            2 => json!(u64::MAX),
            3 => json!(i64::MAX),
            _ => json!(self.next() % 1000),
        }
    }

    /// `value` with its leaves replaced by random values of the same
    /// kind (sometimes of another kind).
    fn mutate(&mut self, value: &Value) -> Value {
        if self.next().is_multiple_of(12) {
            return [json!(null), json!(true), json!([]), json!({}), json!("x"), json!(1.5)][(self.next() % 6) as usize].clone();
        }
        match value {
            Value::String(_) => json!(self.string()),
            Value::Number(_) => self.number(),
            Value::Array(items) => Value::Array(items.iter().map(|v| self.mutate(v)).collect()),
            Value::Object(map) => Value::Object(map.iter().map(|(k, v)| (k.clone(), self.mutate(v))).collect()),
            other => other.clone(),
        }
    }
}

/// Everything the store holds but the audit log, as text.
fn state_of(store: &dyn StateStore) -> String {
    let mut out = String::new();
    for d in store.deployments(None, 1000).unwrap() {
        out += &format!(
            "{d:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n",
            store.stages(&d.id).unwrap(),
            store.commands(&d.id, None).unwrap(),
            store.logs(&d.id, None, 0, 1000).unwrap(),
            store.metadata_entries(&d.id, "s1").unwrap(),
            store.lease(&d.id).unwrap(),
            store.refused_writes(&d.id).unwrap()
        );
    }
    out += &format!("{:?}\n{:?}\n{:?}\n", store.applications().unwrap(), store.tokens().unwrap(), store.agents().unwrap());
    out += &format!("{:?}", store.blob_get("in", "p", "k").unwrap());
    out
}

/// Malformed requests to every method, with every kind of token, get a
/// 4xx with a JSON error and change nothing; requests of the right shape
/// with random values never get a 5xx.
#[tokio::test(flavor = "multi_thread")]
async fn malformed_and_random_requests_get_no_5xx_and_malformed_ones_change_nothing() {
    for (backend, store, dir) in stores() {
        fixture(store.as_ref());
        let api = start(store.clone(), dir).await;
        let tokens: Vec<String> =
            ["admin", "deployer", "agent"].iter().map(|role| insert_token(store.as_ref(), if *role == "agent" { "ag" } else { role }, role, &["*"], None)).collect();
        let before = state_of(store.as_ref());
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        let malformed: Vec<Vec<u8>> = vec![
            b"[]".to_vec(),
            b"\"text\"".to_vec(),
            b"{\"unknown_field\": 1}".to_vec(),
            b"{".to_vec(),
            vec![0xff, 0xfe, 0x00, 0x01],
            deep.into_bytes(),
            vec![b' '; 2 << 20],
            b"null".to_vec(),
        ];
        let mut rng = Rng(0x5eed_c0de);
        let mut sent = 0;
        for &(method, ..) in METHODS {
            for token in &tokens {
                for body in &malformed {
                    let sent_whole = api.try_send(reqwest::Method::POST, &format!("/api/v1/{method}"), Some(token), body.clone()).await;
                    // A body over the limit is answered (413) before it is read
                    // whole; the client may see the connection close instead.
                    let (status, answer) = match sent_whole {
                        Ok(answer) => answer,
                        Err(_) if body.len() > 1 << 20 => continue,
                        Err(e) => panic!("{method}: {e}"),
                    };
                    assert!((400..500).contains(&status), "{backend}: {method} malformed {:?}…: {status} {answer}", &body[..body.len().min(20)]);
                    assert!(answer["error"]["code"].is_string() && answer["error"]["message"].is_string(), "{answer}");
                    sent += 1;
                }
            }
        }
        assert_eq!(state_of(store.as_ref()), before, "{backend}: a malformed request changed the state");
        for &(method, ..) in METHODS {
            for round in 0..25 {
                let token = &tokens[round % tokens.len()];
                let app = if rng.next().is_multiple_of(2) { "in" } else { "out" };
                let args = rng.mutate(&example(method, app, round));
                let (status, answer) = api.post(method, Some(token), &args).await;
                assert!(status < 500, "{backend}: {method} {args}: {status} {answer}");
                sent += 1;
            }
        }
        for path in ["/api/v1", "/api/v1/snapshots/x/y", "/nope", "/api/v1/snapshots/%00"] {
            let (status, answer) = api.send(reqwest::Method::POST, path, Some(&tokens[0]), b"{}".to_vec()).await;
            assert!((400..500).contains(&status), "{path}: {status} {answer}");
        }
        eprintln!("{backend}: {sent} requests");
    }
}

/// The served OpenAPI document names every method, with its arguments'
/// schema, and the health endpoints answer without a token.
#[tokio::test(flavor = "multi_thread")]
async fn the_api_is_described_and_health_needs_no_token() {
    let (_, store, dir) = stores().remove(0);
    let api = start(store, dir).await;
    let (status, doc) = api.send(reqwest::Method::GET, "/api/v1/openapi.json", None, vec![]).await;
    assert_eq!(status, 200);
    for &(method, ..) in METHODS {
        assert!(doc["paths"][format!("/api/v1/{method}")]["post"]["requestBody"].is_object(), "{method}");
    }
    assert_eq!(api.send(reqwest::Method::GET, "/healthz", None, vec![]).await.0, 200);
    assert_eq!(api.send(reqwest::Method::GET, "/readyz", None, vec![]).await.0, 200);
    let (status, body) = api.send(reqwest::Method::GET, "/api/v1/deployment", None, vec![]).await;
    assert_eq!((status, body["error"]["code"].as_str()), (405, Some("method_not_allowed")));
}

/// `cordon login` checks the token with the server, then keeps it in a
/// credentials file only its owner may read, which later commands use
/// with `--server` alone; a file others may read is refused, and an
/// unknown token is neither accepted nor kept.
#[tokio::test(flavor = "multi_thread")]
async fn login_keeps_the_token_in_a_private_credentials_file() {
    use std::os::unix::fs::PermissionsExt;
    let (_, store, dir) = stores().remove(0);
    let token = insert_token(store.as_ref(), "vic", "viewer", &["*"], None);
    let files = tempfile::tempdir().unwrap();
    let (good, unknown) = (files.path().join("good.token"), files.path().join("unknown.token"));
    std::fs::write(&good, format!("{token}\n")).unwrap();
    std::fs::write(&unknown, Token::generate().unwrap().reveal()).unwrap();
    let credentials = files.path().join("config/cordon/credentials");
    let api = start(store, dir).await;
    let cordon = move |args: Vec<String>| {
        let credentials = credentials.clone();
        tokio::task::spawn_blocking(move || {
            Command::new(cordon_bin())
                .args(&args)
                .env("CORDON_CREDENTIALS", &credentials)
                .env_remove("CORDON_SERVER")
                .env_remove("CORDON_TOKEN")
                .env_remove("CORDON_TOKEN_FILE")
                .output()
                .unwrap()
        })
    };
    let args = |extra: &[&str]| -> Vec<String> { ["--server", &api.url].iter().chain(extra).map(|s| s.to_string()).collect() };
    let file = files.path().join("config/cordon/credentials");

    let out = cordon(args(&["login", "--token-file", unknown.to_str().unwrap()])).await.unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("did not accept the token"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!file.exists(), "a refused token was kept");

    let out = cordon(args(&["login", "--token-file", good.to_str().unwrap()])).await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    let kept: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(kept[&api.url].as_str(), Some(token.as_str()), "{kept}");
    let listed = cordon(args(&["agents"])).await.unwrap();
    assert!(listed.status.success(), "the kept token was not used: {}", String::from_utf8_lossy(&listed.stderr));

    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let refused = cordon(args(&["agents"])).await.unwrap();
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("may be read by others (mode 644); run `chmod 600"), "{}", String::from_utf8_lossy(&refused.stderr));
}

/// A certificate authority and a server certificate for 127.0.0.1 it
/// signed: (CA file, certificate file, key file).
fn certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap().signed_by(&key, &issuer).unwrap();
    let files = (dir.join("ca.pem"), dir.join("server.pem"), dir.join("server.key"));
    std::fs::write(&files.0, ca.pem()).unwrap();
    std::fs::write(&files.1, cert.pem()).unwrap();
    std::fs::write(&files.2, key.serialize_pem()).unwrap();
    files
}

/// `cordon` with `args` through the servers `servers`, as the holder of
/// `token` (a file), with `config` for the plugins.
fn cordon_through(config: &Path, servers: &str, token: &Path, ca: &Path, args: &[&str]) -> std::process::Output {
    Command::new(cordon_bin())
        .arg("--config")
        .arg(config)
        .args(args)
        .env("CORDON_SERVER", servers)
        .env("CORDON_TOKEN_FILE", token)
        .env("CORDON_CA_FILE", ca)
        .env_remove("CORDON_TOKEN")
        .output()
        .unwrap()
}

/// Two replicas on one PostgreSQL, one over TLS; two agents with agent
/// tokens, each connected to a different replica first; people deploy,
/// approve, upload and continue through them with their own tokens. The
/// replica everyone started on is killed mid-deployment: agents and
/// commands move to the other, and nothing is lost. The authenticated
/// subjects are recorded, `--as` is refused, a role or an application
/// out of reach is refused, a revoked token stops working at once, and
/// the audit log says who did what.
#[test]
fn people_and_agents_work_through_two_replicas_and_survive_losing_one() {
    let url = Cluster::shared().database();
    let world = World::with_plugins(&plugin_entry("approval", "executor", ""));
    let dir = world.dir.path();
    let (ca, cert, key) = certificates(dir);
    let state = format!("state: {{ postgres: {{ url: \"{url}\" }} }}\n");
    let tls_config = dir.join("s1.yaml");
    std::fs::write(&tls_config, format!("listen: 127.0.0.1:0\ntls: {{ cert: {}, key: {} }}\n{state}", cert.display(), key.display())).unwrap();
    let plain_config = dir.join("s2.yaml");
    std::fs::write(&plain_config, format!("listen: 127.0.0.1:0\nplain-http: true\n{state}")).unwrap();

    // Tokens, made on the database directly (the first admin's way in).
    let make = |subject: &str, role: &str, apps: &str| -> PathBuf {
        let out = Command::new(cordon_bin())
            .args(["token", "create", "--server-config"])
            .arg(&tls_config)
            .args(["--subject", subject, "--role", role, "--applications", apps])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let file = dir.join(format!("{subject}.token"));
        std::fs::write(&file, &out.stdout).unwrap();
        file
    };
    let (admin, dana, alice, vic) = (make("root", "admin", "*"), make("dana", "deployer", "srv*"), make("alice", "approver", "*"), make("vic", "viewer", "*"));
    let agent_tokens = [make("agent-a", "agent", "*"), make("agent-b", "agent", "*")];

    let mut s1 = start_replica(&tls_config);
    let s2 = start_replica(&plain_config);
    assert!(s1.url.starts_with("https://") && s2.url.starts_with("http://"), "{} {}", s1.url, s2.url);
    let both = format!("{},{}", s1.url, s2.url);

    // Agents: their own state directories, no database credentials.
    let agents: Vec<AgentProcess> = agent_tokens
        .iter()
        .enumerate()
        .map(|(i, token)| {
            let text = std::fs::read_to_string(&world.config).unwrap();
            let config = dir.join(format!("agent{i}.yaml"));
            let own = text.lines().map(|l| if l.starts_with("state-dir:") { format!("state-dir: {}", dir.join(format!("agent{i}")).display()) } else { l.to_string() });
            std::fs::write(&config, own.collect::<Vec<_>>().join("\n") + "\n").unwrap();
            let servers = if i == 0 { both.clone() } else { format!("{},{}", s2.url, s1.url) };
            let log = std::fs::File::create(dir.join(format!("agent{i}.log"))).unwrap();
            let child = Command::new(cordon_bin())
                .arg("--config")
                .arg(&config)
                .arg("agent")
                .env("CORDON_SERVER", servers)
                .env("CORDON_TOKEN_FILE", token)
                .env("CORDON_CA_FILE", &ca)
                .env("CORDON_LOG", "info")
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap();
            AgentProcess(child)
        })
        .collect();

    let app = world.app(
        "srv",
        "name: srv\npipeline:\n  stages:\n    - { id: first, name: STEP, with: { marker: /marks/first } }\n    - { id: gate, name: WAIT_APPROVAL, with: { approvers: [alice] } }\n    - { id: last, name: STEP, with: { marker: /marks/last } }\n",
    );
    let db = PostgresStore::open(&url, None, "the test database").unwrap();
    let until = |what: &str, done: &dyn Fn() -> bool| {
        let started = Instant::now();
        while !done() {
            assert!(started.elapsed() < Duration::from_secs(60), "{what} did not happen within 60s");
            std::thread::sleep(Duration::from_millis(50));
        }
    };

    // dana deploys and follows through the replicas (the TLS one first).
    let mut deploy = Command::new(cordon_bin())
        .arg("--config")
        .arg(&world.config)
        .args(["deploy", app.to_str().unwrap()])
        .env("CORDON_SERVER", &both)
        .env("CORDON_TOKEN_FILE", &dana)
        .env("CORDON_CA_FILE", &ca)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out_lines = lines_of(deploy.stdout.take().unwrap());
    let err_lines = lines_of(deploy.stderr.take().unwrap());
    let mut seen = Vec::new();
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| expect_line(&out_lines, "queued", Duration::from_secs(60), &mut seen))).is_err() {
        std::thread::sleep(Duration::from_millis(500));
        panic!("deploy queued nothing: {:?}", err_lines.try_iter().collect::<Vec<_>>());
    }
    let id = seen.iter().find(|l| l.contains("queued")).unwrap().split_whitespace().nth(1).unwrap().to_string();
    until("the gate to wait", &|| db.stages(&id).unwrap().iter().any(|s| s.id == "gate" && s.status == StageStatus::Running));

    // The replica everyone started on dies mid-deployment.
    drop(std::mem::replace(&mut s1.process, AgentProcess(Command::new("true").spawn().unwrap())));

    let refused = cordon_through(&world.config, &both, &alice, &ca, &["approve", &id, "gate", "--as", "bob"]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--as is refused against a server"), "{}", String::from_utf8_lossy(&refused.stderr));
    let viewer = cordon_through(&world.config, &both, &vic, &ca, &["approve", &id, "gate"]);
    assert_eq!(viewer.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&viewer.stderr).contains("vic has role viewer; this needs approver"), "{}", String::from_utf8_lossy(&viewer.stderr));
    let approved = cordon_through(&world.config, &both, &alice, &ca, &["approve", &id, "gate"]);
    assert!(approved.status.success(), "{}{}", String::from_utf8_lossy(&approved.stdout), String::from_utf8_lossy(&approved.stderr));
    assert!(String::from_utf8_lossy(&approved.stdout).contains("accepted"));
    let status = deploy.wait().unwrap();
    let errs: Vec<String> = err_lines.try_iter().collect();
    assert!(status.success(), "deploy failed: {seen:?} {errs:?}");

    let record = db.deployment(&id).unwrap().unwrap();
    assert_eq!(record.status, DeploymentStatus::Success, "{}", record.reason);
    assert!(record.trigger.contains("\"commander\":\"dana\""), "{}", record.trigger);
    let approvals = db.commands(&id, Some("gate")).unwrap();
    assert_eq!(approvals.iter().map(|c| c.commander.as_str()).collect::<Vec<_>>(), ["alice"], "{approvals:?}");
    assert_eq!(world.marks("first").len() + world.marks("last").len(), 2, "each stage ran once");
    let owners: Vec<String> = db.agents().unwrap().into_iter().map(|a| a.id).collect();
    assert!(owners.iter().all(|o| o.starts_with("agent-a:") || o.starts_with("agent-b:")), "{owners:?}");

    // A viewer reads; a deployer cannot reach an application outside its patterns.
    let listed = cordon_through(&world.config, &s2.url, &vic, &ca, &["status", &id]);
    assert!(listed.status.success() && String::from_utf8_lossy(&listed.stdout).contains("gate"), "{}", String::from_utf8_lossy(&listed.stderr));
    let other = world.app("other", "name: other\npipeline:\n  stages:\n    - { name: STEP, with: { marker: /marks/other } }\n");
    let out = cordon_through(&world.config, &s2.url, &dana, &ca, &["deploy", other.to_str().unwrap(), "--detach"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not reach application `other`"), "{}", String::from_utf8_lossy(&out.stderr));

    // Upload into a paused deployment through the server, then continue.
    let out = cordon_through(&world.config, &s2.url, &dana, &ca, &["deploy", app.to_str().unwrap(), "--break-before", "last", "--detach"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let second = String::from_utf8_lossy(&out.stdout).split_whitespace().nth(1).unwrap().to_string();
    until("the second deployment to pause or wait", &|| db.stages(&second).unwrap().iter().any(|s| s.id == "gate" && s.status == StageStatus::Running));
    assert!(cordon_through(&world.config, &s2.url, &alice, &ca, &["approve", &second, "gate"]).status.success());
    until("the breakpoint", &|| db.stages(&second).unwrap().iter().any(|s| s.id == "last" && s.status == StageStatus::Paused));
    let upload = dir.join("upload");
    std::fs::create_dir_all(&upload).unwrap();
    std::fs::write(upload.join("extra.txt"), "uploaded\n").unwrap();
    let before = db.deployment(&second).unwrap().unwrap().target_snapshot;
    let out = cordon_through(&world.config, &s2.url, &dana, &ca, &["upload", &second, upload.to_str().unwrap(), "--to", "extra", "--continue"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    until("the second deployment to finish", &|| db.deployment(&second).unwrap().unwrap().status.is_final());
    let done = db.deployment(&second).unwrap().unwrap();
    assert_eq!(done.status, DeploymentStatus::Success, "{}", done.reason);
    assert_ne!(done.target_snapshot, before, "the upload moved the deployment to a new snapshot");

    // Revocation takes effect at once; the audit log names who did what.
    let revoke_id = Token::parse(&std::fs::read_to_string(&vic).unwrap()).unwrap().id;
    let out = cordon_through(&world.config, &s2.url, &admin, &ca, &["token", "revoke", &revoke_id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = cordon_through(&world.config, &s2.url, &vic, &ca, &["status"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("was revoked"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = cordon_through(&world.config, &s2.url, &dana, &ca, &["audit"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs admin"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = cordon_through(&world.config, &s2.url, &admin, &ca, &["audit", "--json", "--limit", "10000"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let audit: Vec<AuditRecord> = String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let has = |subject: &str, action: &str, outcome: &str| audit.iter().any(|e| e.subject == subject && e.action == action && e.outcome == outcome);
    assert!(has("dana", "insert_deployment", "ok") && has("alice", "add_command", "ok") && has("vic", "add_command", "forbidden"));
    assert!(has("dana", "upsert_application", "forbidden") && has("root", "token_revoke", "ok"), "{audit:#?}");
    assert!(audit.iter().any(|e| e.subject == "-" && e.outcome == "unauthenticated"), "the revoked token's attempt: {audit:#?}");
    assert!(has("agent-a", "claim", "ok") || has("agent-b", "claim", "ok"));
    drop(agents);
}

/// A server with `retention:` deletes each application's finished
/// deployments beyond the newest N when it starts (and every ten minutes),
/// records that in the audit log as `server`, and keeps unfinished ones;
/// `keep-deployments: 0` is refused naming the file.
#[test]
fn a_server_with_retention_prunes_old_history() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let store = SqliteStore::open(&database_path(&state)).unwrap();
    store.upsert_application("web", "/apps/web").unwrap();
    for n in 1..=4 {
        let id = format!("web-{n}");
        store.insert_deployment(&DeploymentRecord::queued(&id, "web", "{}".into(), digest('a'), n)).unwrap();
        let fence = store.claim(&id, "ag:h/1", Duration::from_secs(60)).unwrap().unwrap();
        store.set_deployment_status(&fence, DeploymentStatus::Failure, "", n).unwrap();
        store.release(&fence).unwrap();
    }
    store.insert_deployment(&DeploymentRecord::queued("web-5", "web", "{}".into(), digest('b'), 5)).unwrap();
    let config = dir.path().join("server.yaml");
    let yaml = |keep: usize| format!("listen: 127.0.0.1:0\nplain-http: true\nstate-dir: {}\nretention: {{ keep-deployments: {keep} }}\n", state.display());
    std::fs::write(&config, yaml(0)).unwrap();
    let err = format!("{:#}", cordon_server::config::ServerConfig::load(&config).unwrap_err());
    assert!(err.contains(&config.display().to_string()) && err.contains("keep-deployments"), "{err}");

    std::fs::write(&config, yaml(2)).unwrap();
    let _server = start_replica(&config);
    let ids = || -> Vec<String> { store.deployments(Some("web"), 10).unwrap().into_iter().map(|d| d.id).collect() };
    let started = Instant::now();
    while ids().len() > 3 && started.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(ids(), ["web-5", "web-4", "web-3"]);
    let audit = store.audit(0, 100).unwrap();
    assert!(
        audit.iter().any(|a| a.subject == "server" && a.action == "delete_deployments" && a.target == "application web: web-2, web-1 and 0 stored snapshot(s)"),
        "{audit:#?}"
    );
}
