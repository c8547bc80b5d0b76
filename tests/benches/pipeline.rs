//! `pipeline_overhead`: a 1,000-stage pipeline of no-op stages, end to end
//! through the engine — planning, the DAG scheduler, the SQLite state store
//! (every stage start and result committed), per-stage scratch directories
//! and store-backed host services — per stage; baseline, measured in the
//! same run: the same 1,000 stage calls made directly on the engine.
//! Printed as `BENCH name=pipeline_overhead value=<ms per stage> …` with
//! ratio = baseline / value (higher is better; 1.0 would mean the engine
//! costs nothing).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use cordon_pipeline::agent::{ServeScope, serve};
use cordon_store::lock::AgentLock;
use cordon_pipeline::Host;
use cordon_pipeline::plan::TriggerInfo;
use cordon_runtime::plugin::AgentConfig;
use cordon_runtime::runner::{self, Deployment, Stage, StageCall, Status, Trigger};
use cordon_runtime::sandbox::output::NullSink;
use cordon_runtime::sandbox::{MemoryServices, RunDirs};
use cordon_store::{DeploymentStatus, StageStatus};
use sha2::{Digest, Sha256};

const STAGES: usize = 1000;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let noop = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guests/target/wasm32-wasip2/release/noop.wasm");
    assert!(noop.exists(), "{} is missing: run `make guests`", noop.display());
    let sha = hex::encode(Sha256::digest(std::fs::read(&noop).unwrap()));
    let config_path = dir.path().join("agent.yaml");
    std::fs::write(
        &config_path,
        format!("state-dir: state\nplugins:\n  - {{ name: noop, path: {}, sha256: {sha}, world: executor }}\n", noop.display()),
    )
    .unwrap();
    let config = AgentConfig::load(&config_path).unwrap();
    let app = dir.path().join("app");
    std::fs::create_dir_all(&app).unwrap();
    let mut yaml = String::from("name: bench\npipeline:\n  stages:\n");
    for _ in 0..STAGES {
        yaml.push_str("    - name: NOOP\n");
    }
    std::fs::write(app.join("app.cordon.yaml"), yaml).unwrap();
    std::fs::write(app.join("index.html"), "bench").unwrap();

    let (ours, baseline) = rt.block_on(async {
        let host = Arc::new(Host::open(&config).await.unwrap());
        let plugin = host.plugins.get("noop").unwrap().clone();

        // Baseline: the same number of stage calls, directly on the engine.
        let scratch = dir.path().join("scratch");
        std::fs::create_dir_all(&scratch).unwrap();
        let services = Arc::new(MemoryServices::default());
        let start = Instant::now();
        for i in 0..STAGES {
            let call = StageCall {
                deployment: Deployment {
                    id: "direct".into(),
                    application_id: "bench".into(),
                    application_name: "bench".into(),
                    labels: vec![],
                    trigger: Trigger { commit_hash: String::new(), commit_message: String::new(), commander: "bench".into() },
                    created_at: 0,
                },
                stage: Stage { id: format!("s{i}"), name: "NOOP".into(), desc: String::new(), index: i as u32, rollback: false, options: "{}".into() },
                app_config: "{}".into(),
                dirs: RunDirs { target: Some(app.clone()), running: None, scratch: Some(scratch.clone()) },
                services: services.clone(),
                sink: Arc::new(NullSink),
                timeout: None,
            };
            let outcome = runner::execute_stage(&host.engine, &plugin, call).await;
            assert_eq!(outcome.status, Status::Success);
        }
        let baseline = start.elapsed();

        // The engine: trigger (snapshot), plan, run 1,000 stages, record all.
        let lock = AgentLock::try_acquire(&config.state_dir).unwrap().unwrap();
        let start = Instant::now();
        let record = cordon_pipeline::trigger(&host, &app, TriggerInfo::default()).await.unwrap();
        serve(host.clone(), &lock, ServeScope { until_idle: true, ..Default::default() }).await.unwrap();
        let ours = start.elapsed();
        let d = host.store.deployment(&record.id).unwrap().unwrap();
        assert_eq!(d.status, DeploymentStatus::Success, "{d:?}");
        let stages = host.store.stages(&record.id).unwrap();
        assert_eq!(stages.len(), STAGES);
        assert!(stages.iter().all(|s| s.status == StageStatus::Success));
        (ours, baseline)
    });
    let per = |d: std::time::Duration| d.as_secs_f64() * 1e3 / STAGES as f64;
    let (value, base) = (per(ours), per(baseline));
    println!("pipeline_overhead: {STAGES} no-op stages end to end {:.2} s ({value:.3} ms per stage); direct calls {:.2} s ({base:.3} ms per stage)", ours.as_secs_f64(), baseline.as_secs_f64());
    println!("BENCH name=pipeline_overhead value={value:.3} unit=ms baseline={base:.3} ratio={:.3}", base / value);
}
