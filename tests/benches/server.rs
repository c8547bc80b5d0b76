//! `cordon server`.
//!
//! `server_stage_overhead`: a 300-stage pipeline of no-op stages run by an
//! agent whose every store call goes through a server (loopback, plain
//! HTTP, agent token: authentication, lease ownership check and audit per
//! write) onto PostgreSQL, per stage; baseline: the same agent on the same
//! PostgreSQL directly, in the same run. ratio = direct / server.
//!
//! `api_status_rps`: `POST /api/v1/deployment` (one deployment's record,
//! a viewer token) under load from `wrk` (2 threads, 32 connections, 5 s)
//! against a `cordon server` process on PostgreSQL; baseline: `GET
//! /healthz` of the same server under the same load (HTTP alone: no token,
//! no store). ratio = deployment / healthz (requests per second).
//!
//! Medians of 3 runs each; a fresh database per run.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use cordon_api::{RemoteStore, Server, Token};
use cordon_pipeline::Host;
use cordon_pipeline::agent::{ServeScope, serve};
use cordon_pipeline::plan::TriggerInfo;
use cordon_runtime::plugin::AgentConfig;
use cordon_store::lock::AgentLock;
use cordon_store::test_cluster::Cluster;
use cordon_store::{DeploymentStatus, PostgresStore, StateStore};
use cordon_tests::{engine, guest, median, sha256_file};

const RUNS: usize = 3;
const STAGES: usize = 300;

fn token(store: &dyn StateStore, subject: &str, role: &str) -> Token {
    Token::parse(&cordon_tests::replicas::insert_token(store, subject, role, &["*"], None)).unwrap()
}

/// An agent config with the `noop` plugin on database `url`, and an
/// application of `STAGES` no-op stages.
fn setup(dir: &Path, url: &str) -> (PathBuf, PathBuf) {
    let noop = guest("noop");
    let config = dir.join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "state-dir: {}\nstate: {{ postgres: {{ url: \"{url}\", lease: 5s }} }}\nplugins:\n  - {{ name: noop, path: {}, sha256: {}, world: executor }}\n",
            dir.join("state").display(),
            noop.display(),
            sha256_file(&noop)
        ),
    )
    .unwrap();
    let app = dir.join("long");
    std::fs::create_dir_all(&app).unwrap();
    std::fs::write(app.join("app.cordon.yaml"), format!("name: long\npipeline:\n  stages:\n{}", "    - name: NOOP\n".repeat(STAGES))).unwrap();
    (config, app)
}

/// Milliseconds per stage of one long pipeline, the agent's store being
/// `agent_store` (the database, or a server on it).
async fn per_stage(config: &Path, app: &Path, agent_store: Option<Arc<dyn StateStore>>) -> f64 {
    let loaded = AgentConfig::load(config).unwrap();
    let person = Arc::new(Host::open_with(engine().clone(), &loaded).await.unwrap());
    let mut agent = Host::open_with(engine().clone(), &loaded).await.unwrap();
    if let Some(store) = agent_store {
        agent.store = store;
    }
    let agent = Arc::new(agent);
    let lock = AgentLock::try_acquire(&loaded.state_dir).unwrap().unwrap();
    let start = Instant::now();
    let record = cordon_pipeline::trigger(&person, app, TriggerInfo::default()).await.unwrap();
    // The agent serves as `cordon agent` does; the person's view says when
    // it is done (an agent's token reads only what it holds).
    let serving = tokio::spawn(async move { serve(agent, &lock, ServeScope::default()).await });
    while !person.store.deployment(&record.id).unwrap().unwrap().status.is_final() {
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    let took = start.elapsed().as_secs_f64();
    serving.abort();
    assert_eq!(person.store.deployment(&record.id).unwrap().unwrap().status, DeploymentStatus::Success);
    took * 1e3 / STAGES as f64
}

/// Requests per second `wrk` reaches on `url` (POST `body` when given).
fn wrk(dir: &Path, url: &str, token: &str, body: Option<&str>) -> f64 {
    let script = dir.join("request.lua");
    let lua = match body {
        Some(body) => format!("wrk.method = \"POST\"\nwrk.body = '{body}'\nwrk.headers[\"Authorization\"] = \"Bearer {token}\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\n"),
        None => String::new(),
    };
    std::fs::write(&script, lua).unwrap();
    let out = Command::new("wrk").args(["-t2", "-c32", "-d5s", "-s"]).arg(&script).arg(url).output().expect("wrk (make bench installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("Non-2xx"), "wrk saw refusals:\n{text}");
    let line = text.lines().find(|l| l.starts_with("Requests/sec:")).unwrap_or_else(|| panic!("no rate from wrk:\n{text}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    // The server runs on threads of its own, as it would in its own
    // process: the agent's store calls block the threads they run on.
    let server_rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let cluster = Cluster::start();
    let (mut direct, mut through) = (Vec::new(), Vec::new());
    let (mut status, mut health) = (Vec::new(), Vec::new());
    for run in 0..RUNS {
        let dir = tempfile::tempdir().unwrap();
        let url = cluster.database();
        let (config, app) = setup(dir.path(), &url);
        let db = PostgresStore::open(&url, None, "the bench database").unwrap();
        let agent_token = token(&db, "bench-agent", "agent");
        let viewer = token(&db, "bench-viewer", "viewer");

        // The in-process server the agent goes through.
        let store: Arc<dyn StateStore> = Arc::new(db);
        let listener = server_rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let address = listener.local_addr().unwrap();
        let router = cordon_server::router(store.clone(), 16 << 20);
        server_rt.spawn(async move { axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>()).await.unwrap() });
        let remote: Arc<dyn StateStore> =
            Arc::new(RemoteStore::open(&Server { urls: vec![format!("http://{address}").parse().unwrap()], token: agent_token, ca_file: None }).unwrap());
        rt.block_on(async {
            direct.push(per_stage(&config, &app, None).await);
            through.push(per_stage(&config, &app, Some(remote)).await);
        });

        // A server process under wrk's load.
        let server_config = dir.path().join("server.yaml");
        std::fs::write(&server_config, format!("listen: 127.0.0.1:0\nplain-http: true\nstate: {{ postgres: {{ url: \"{url}\" }} }}\n")).unwrap();
        let server = cordon_tests::replicas::start_replica(&server_config);
        let base = server.url.clone();
        let id = store.deployments(None, 1).unwrap()[0].id.clone();
        status.push(wrk(dir.path(), &format!("{base}/api/v1/deployment"), &viewer.reveal(), Some(&format!("{{\"id\": \"{id}\"}}"))));
        health.push(wrk(dir.path(), &format!("{base}/healthz"), "", None));
        println!(
            "run {run}: per stage direct {:.3} ms, through the server {:.3} ms; deployment {:.0} req/s, healthz {:.0} req/s",
            direct[run], through[run], status[run], health[run]
        );
    }
    let (server, db) = (median(through), median(direct));
    println!("BENCH name=server_stage_overhead value={server:.3} unit=ms baseline={db:.3} ratio={:.3}", db / server);
    let (status, health) = (median(status), median(health));
    println!("BENCH name=api_status_rps value={status:.0} unit=requests/s baseline={health:.0} ratio={:.3}", status / health);
}
