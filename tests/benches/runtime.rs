//! `make bench` figures for the engine, each against a baseline measured in
//! the same run, printed as `BENCH name=… value=… unit=… baseline=… ratio=…`
//! with the ratio oriented so that higher is better.
//!
//! - `instantiate`: median time to build a fresh sandboxed store (with
//!   grants: a read-only mount, a network allow-list, env, the three run
//!   directories), instantiate the `noop` component and call its stage —
//!   versus starting a native plugin process and doing one request/response
//!   with it over a pipe (the process-per-plugin model of PipeCD and Velero;
//!   `cat` stands in for the cheapest possible plugin binary).
//! - `cached_load`: loading a compiled component from the disk cache
//!   (digest check + deserialize) versus compiling it.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cordon_runtime::engine::{Engine, EngineOptions};
use cordon_runtime::plugin::{AgentConfig, Plugin};
use cordon_runtime::runner::{self, Deployment, Stage, StageCall, Status, Trigger};
use cordon_runtime::sandbox::output::NullSink;
use cordon_runtime::sandbox::{MemoryServices, RunDirs};
use sha2::{Digest, Sha256};
use cordon_tests::median;

fn guest(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guests/target/wasm32-wasip2/release").join(format!("{name}.wasm"));
    assert!(path.exists(), "{} is missing: run `make guests`", path.display());
    path
}

fn report(name: &str, value: f64, unit: &str, baseline: f64, ratio: f64) {
    println!("BENCH name={name} value={value:.3} unit={unit} baseline={baseline:.3} ratio={ratio:.1}");
}

fn config(dir: &Path, name: &str, extra: &str) -> AgentConfig {
    let file = guest(name);
    let sha = hex::encode(Sha256::digest(std::fs::read(&file).unwrap()));
    let yaml = format!(
        "state-dir: state\nplugins:\n  - name: {name}\n    path: {}\n    sha256: {sha}\n    world: executor\n{extra}",
        file.display()
    );
    AgentConfig::parse(&yaml, &dir.join("agent.yaml")).unwrap()
}

fn stage_call(dirs: RunDirs, services: Arc<MemoryServices>) -> StageCall {
    StageCall {
        deployment: Deployment {
            id: "bench".into(),
            application_id: "app".into(),
            application_name: "app".into(),
            labels: vec![("env".into(), "bench".into())],
            trigger: Trigger { commit_hash: "abc".into(), commit_message: "bench".into(), commander: "bench".into() },
            created_at: 0,
        },
        stage: Stage { id: "s".into(), name: "NOOP".into(), desc: String::new(), index: 0, rollback: false, options: "{}".into() },
        app_config: "{}".into(),
        dirs,
        services,
        sink: Arc::new(NullSink),
        timeout: None,
    }
}

fn bench_instantiate(rt: &tokio::runtime::Runtime) {
    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path().join("mount");
    let (source, scratch) = (dir.path().join("source"), dir.path().join("scratch"));
    for d in [&mount, &source, &scratch] {
        std::fs::create_dir_all(d).unwrap();
    }
    let grants = format!(
        "    grants:\n      mounts: [{{ host: {}, guest: /data, access: read-only }}]\n      network: {{ allow: [\"http://127.0.0.1:8080\", \"tcp://10.0.0.0/8:5432\"] }}\n      env: {{ MODE: bench }}\n",
        mount.display()
    );
    let config = config(dir.path(), "noop", &grants);
    let engine = config.engine().unwrap();
    assert!(engine.pooled(), "the pooling allocator is unavailable on this machine");
    let plugin = rt.block_on(Plugin::load(&engine, &config.plugins[0])).unwrap();
    let services = Arc::new(MemoryServices::default());
    let dirs = RunDirs { target: Some(source), running: None, scratch: Some(scratch) };

    let samples: Vec<Duration> = rt.block_on(async {
        let mut samples = Vec::new();
        for i in 0..6000 {
            let call = stage_call(dirs.clone(), services.clone());
            let start = Instant::now();
            let outcome = runner::execute_stage(&engine, &plugin, call).await;
            let elapsed = start.elapsed();
            assert_eq!(outcome.status, Status::Success, "{outcome:?}");
            if i >= 1000 {
                samples.push(elapsed);
            }
        }
        samples
    });
    let ours = median(samples);

    // Where the time goes: building the store alone, and store + instantiate.
    let (store_only, with_instance) = rt.block_on(async {
        let (mut store_only, mut with_instance) = (Vec::new(), Vec::new());
        for _ in 0..3000 {
            let context = cordon_runtime::sandbox::RunContext {
                dirs: dirs.clone(),
                services: services.clone(),
                sink: Arc::new(NullSink),
                timeout: None,
            };
            let start = Instant::now();
            let mut store = plugin.sandbox.store(engine.wasmtime(), context).unwrap();
            store_only.push(start.elapsed());
            plugin.executor().unwrap().instantiate_async(&mut store).await.unwrap();
            with_instance.push(start.elapsed());
        }
        (median(store_only), median(with_instance))
    });
    println!(
        "instantiate breakdown: store with grants {:.2} µs, + instantiate {:.2} µs, + call {:.2} µs",
        store_only.as_secs_f64() * 1e6,
        (with_instance - store_only).as_secs_f64() * 1e6,
        (ours.saturating_sub(with_instance)).as_secs_f64() * 1e6
    );

    // Baseline: a process per call, one request and one response over pipes.
    let request = br#"{"deployment":{"id":"bench"},"stage":{"name":"NOOP","options":{}}}"#;
    let mut samples = Vec::new();
    for i in 0..300 {
        let start = Instant::now();
        let mut child = Command::new("cat").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(request).unwrap();
        stdin.write_all(b"\n").unwrap();
        let mut reader = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        drop(stdin);
        child.wait().unwrap();
        let elapsed = start.elapsed();
        assert_eq!(line.trim_end().as_bytes(), request);
        if i >= 20 {
            samples.push(elapsed);
        }
    }
    let baseline = median(samples);
    let (value, base) = (ours.as_secs_f64() * 1e6, baseline.as_secs_f64() * 1e6);
    println!("instantiate: fresh sandbox + instantiate + no-op stage call, median {value:.2} µs; process + pipe round trip {base:.1} µs");
    report("instantiate", value, "us", base, base / value);
}

fn bench_cached_load() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), "wait", "");
    let bytes = std::fs::read(&config.plugins[0].path).unwrap();
    let sha = hex::encode(Sha256::digest(&bytes));
    let uncached = Engine::new(EngineOptions { cache_dir: None, ..Default::default() }).unwrap();
    let mut compile = Vec::new();
    for _ in 0..7 {
        let start = Instant::now();
        uncached.load(&bytes, &sha).unwrap();
        compile.push(start.elapsed());
    }
    let cached = config.engine().unwrap();
    cached.load(&bytes, &sha).unwrap();
    let mut load = Vec::new();
    for _ in 0..200 {
        let start = Instant::now();
        let (_, origin) = cached.load(&bytes, &sha).unwrap();
        load.push(start.elapsed());
        assert_eq!(origin, cordon_runtime::engine::Origin::Cache);
    }
    let (value, base) = (median(load).as_secs_f64() * 1e3, median(compile).as_secs_f64() * 1e3);
    println!("cached_load: wait.wasm ({} bytes) from the cache {value:.3} ms; compiled {base:.1} ms", bytes.len());
    report("cached_load", value, "ms", base, base / value);
}

fn main() {
    // `cargo bench` passes `--bench`; any other argument filters by name.
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let wanted = |name: &str| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    if wanted("instantiate") {
        bench_instantiate(&rt);
    }
    if wanted("cached_load") {
        bench_cached_load();
    }
}
