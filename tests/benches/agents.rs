//! Many agents on PostgreSQL.
//!
//! `postgres_overhead`: a 300-stage pipeline of no-op stages end to end
//! (plan, DAG, every stage start and result committed, store-backed
//! services) on PostgreSQL, per stage; baseline: the same on the embedded
//! SQLite store, in the same run. ratio = SQLite / PostgreSQL.
//!
//! `multi_agent`: throughput of 60 deployments of 5 no-op stages each, run
//! by three `cordon agent` processes on one PostgreSQL; baseline: one
//! agent, same work, same run. Each agent runs up to 4 deployments at once
//! (`max-deployments`), so three agents may run three times as many.
//! ratio = three / one (deployments per second; higher is better).
//!
//! Medians of 3 runs each; a fresh database per run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cordon_pipeline::Host;
use cordon_pipeline::agent::{ServeScope, serve};
use cordon_pipeline::plan::TriggerInfo;
use cordon_runtime::plugin::AgentConfig;
use cordon_store::lock::AgentLock;
use cordon_store::test_cluster::Cluster;
use cordon_store::{DeploymentStatus, StageStatus};
use cordon_tests::{AgentProcess, cordon_bin, engine, guest, median, sha256_file};

const RUNS: usize = 3;
const OVERHEAD_STAGES: usize = 300;
const DEPLOYMENTS: usize = 60;
const STAGES_PER_DEPLOYMENT: usize = 5;

/// An agent config with the `noop` plugin; on `url` when given.
fn config(dir: &Path, name: &str, url: Option<&str>) -> PathBuf {
    let noop = guest("noop");
    let state = url.map(|u| format!("state: {{ postgres: {{ url: \"{u}\", lease: 5s }} }}\nmax-deployments: 4\n")).unwrap_or_default();
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &path,
        format!(
            "state-dir: {}\n{state}plugins:\n  - {{ name: noop, path: {}, sha256: {}, world: executor }}\n",
            dir.join(name).display(),
            noop.display(),
            sha256_file(&noop)
        ),
    )
    .unwrap();
    path
}

fn app(dir: &Path, name: &str, stages: usize) -> PathBuf {
    let app = dir.join("apps").join(name);
    std::fs::create_dir_all(&app).unwrap();
    let mut yaml = format!("name: {name}\npipeline:\n  stages:\n");
    for _ in 0..stages {
        yaml.push_str("    - name: NOOP\n");
    }
    std::fs::write(app.join("app.cordon.yaml"), yaml).unwrap();
    app
}

async fn host(config: &Path) -> Arc<Host> {
    Arc::new(Host::open_with(engine().clone(), &AgentConfig::load(config).unwrap()).await.unwrap())
}

/// Seconds per stage of one long pipeline run in this process.
async fn per_stage(config: &Path, app: &Path) -> f64 {
    let host = host(config).await;
    let state = AgentConfig::load(config).unwrap().state_dir;
    let lock = AgentLock::try_acquire(&state).unwrap().unwrap();
    let start = Instant::now();
    let record = cordon_pipeline::trigger(&host, app, TriggerInfo::default()).await.unwrap();
    serve(host.clone(), &lock, ServeScope { until: Some(record.id.clone()), ..Default::default() }).await.unwrap();
    let took = start.elapsed().as_secs_f64();
    let stages = host.store.stages(&record.id).unwrap();
    assert_eq!(host.store.deployment(&record.id).unwrap().unwrap().status, DeploymentStatus::Success);
    assert!(stages.len() == OVERHEAD_STAGES && stages.iter().all(|s| s.status == StageStatus::Success));
    took * 1e3 / OVERHEAD_STAGES as f64
}

/// Deployments per second of `agents` agent processes on a fresh database.
async fn throughput(dir: &Path, cluster: &Cluster, agents: usize, run: usize) -> f64 {
    let url = cluster.database();
    let base = dir.join(format!("multi-{agents}-{run}"));
    std::fs::create_dir_all(&base).unwrap();
    let trigger = host(&config(&base, "trigger", Some(&url))).await;
    let _agents: Vec<AgentProcess> = (0..agents)
        .map(|i| AgentProcess(Command::new(cordon_bin()).arg("--config").arg(config(&base, &format!("agent{i}"), Some(&url))).arg("agent").spawn().unwrap()))
        .collect();
    // Every agent has reported before the clock starts.
    while trigger.store.agents().unwrap().len() < agents {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let apps: Vec<PathBuf> = (0..DEPLOYMENTS).map(|i| app(&base, &format!("m{i}"), STAGES_PER_DEPLOYMENT)).collect();
    let start = Instant::now();
    for app in &apps {
        cordon_pipeline::trigger(&trigger, app, TriggerInfo::default()).await.unwrap();
    }
    while !trigger.store.unfinished_deployments().unwrap().is_empty() {
        assert!(start.elapsed() < Duration::from_secs(300), "the agents did not finish");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = start.elapsed().as_secs_f64();
    let done = trigger.store.deployments(None, usize::MAX).unwrap();
    assert!(done.len() == DEPLOYMENTS && done.iter().all(|d| d.status == DeploymentStatus::Success));
    DEPLOYMENTS as f64 / took
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start();
    let long = app(dir.path(), "long", OVERHEAD_STAGES);
    let (mut sqlite, mut postgres) = (Vec::new(), Vec::new());
    let (mut one, mut three) = (Vec::new(), Vec::new());
    rt.block_on(async {
        for run in 0..RUNS {
            sqlite.push(per_stage(&config(dir.path(), &format!("sqlite{run}"), None), &long).await);
            postgres.push(per_stage(&config(dir.path(), &format!("pg{run}"), Some(&cluster.database())), &long).await);
            one.push(throughput(dir.path(), &cluster, 1, run).await);
            three.push(throughput(dir.path(), &cluster, 3, run).await);
            println!(
                "run {run}: per stage sqlite {:.3} ms, postgres {:.3} ms; deployments/s one agent {:.2}, three agents {:.2}",
                sqlite[run], postgres[run], one[run], three[run]
            );
        }
    });
    let (pg, lite) = (median(postgres), median(sqlite));
    println!("BENCH name=postgres_overhead value={pg:.3} unit=ms baseline={lite:.3} ratio={:.3}", lite / pg);
    let (three, one) = (median(three), median(one));
    println!("BENCH name=multi_agent value={three:.2} unit=deployments/s baseline={one:.2} ratio={:.3}", three / one);
}
