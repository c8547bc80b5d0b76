//! `key_filter`: one million keys in kcp's etcd layout through the
//! `kcp-keys` component, on one core, versus the same classifier source
//! compiled natively, through the same streaming path (batching, ordered
//! output) in the same run. `key_filter_cores`: the same with one instance
//! per core, against native with as many workers.
//!
//! `key_filter_select`: the classifier alone on pre-packed batches, no
//! reading or writing, to show what the component boundary costs.
//!
//! Ratios are component throughput / native throughput (higher is better).

use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cordon_migrate::keys::batch;
use cordon_migrate::keys::filter::{self, Selector, Sinks};
use cordon_runtime::plugin::{AgentConfig, Plugin};
use cordon_runtime::runner::{KeyBatch, KeyFilterSession, Selection};
use cordon_runtime::sandbox::output::NullSink;
use sha2::{Digest, Sha256};

const KEYS: usize = 1_000_000;
const TARGET: &str = "2h5f8mz0cgqnm9y3";

/// The native classifier behind the same interface as the component.
struct Native(kcp_keys::Classifier);

impl Selector for Native {
    async fn select(&mut self, batch: &KeyBatch) -> Result<Selection, String> {
        let (mut selected, mut unclassified) = (Vec::new(), Vec::new());
        self.0.select_batch(&batch.data, &batch.ends, &mut selected, &mut unclassified, |_, _| {})?;
        Ok(Selection { selected, unclassified })
    }
}

/// A million keys: 500 clusters (the target holds ~1%), built-in,
/// custom-resource and identity resources, namespaced and cluster-scoped.
fn key_space() -> Vec<u8> {
    let identity = "9c4f2a6d7e8b1c3f5a0d2e4b6c8a1f3e5d7b9c0a2e4f6a8b1d3c5e7f9a0b2c4d";
    let mut out = Vec::with_capacity(KEYS * 72);
    let mut state = 0x2545f4914f6cdd1du64;
    for i in 0..KEYS {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let cluster = if state.is_multiple_of(100) { TARGET.to_string() } else { format!("c{:015x}", state % 500) };
        let ns = ["default", "kube-system", "team-a", "payments"][(state >> 8) as usize % 4];
        let key = match (state >> 16) % 6 {
            0 => format!("/registry/apps/deployments/{cluster}/{ns}/web-{i}"),
            1 => format!("/registry/core/configmaps/{cluster}/{ns}/cfg-{i}"),
            2 => format!("/registry/core/namespaces/{cluster}/{ns}"),
            3 => format!("/registry/example.com/widgets/customresources/{cluster}/{ns}/w-{i}"),
            4 => format!("/registry/tenancy.kcp.io/workspaces/{identity}/{cluster}/ws-{i}"),
            _ => format!("/registry/rbac.authorization.k8s.io/clusterroles/{cluster}/role-{i}"),
        };
        out.extend_from_slice(key.as_bytes());
        out.push(b'\n');
    }
    out
}

async fn run_filter<S: Selector>(input: &Arc<Vec<u8>>, selectors: Vec<S>) -> (Duration, u64) {
    let mut sink = std::io::sink();
    let input = Cursor::new(input.as_ref().clone());
    let start = Instant::now();
    let stats = filter::run(input, selectors, Sinks { selected: &mut sink, unclassified: None, progress: &|_| {} })
        .await
        .unwrap();
    let elapsed = start.elapsed();
    assert_eq!(stats.keys, KEYS as u64);
    assert_eq!(stats.unclassified, 0);
    (elapsed, stats.selected)
}

fn best(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[0]
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guests/target/wasm32-wasip2/release/kcp_keys.wasm");
    assert!(file.exists(), "{} is missing: run `make guests`", file.display());
    let sha = hex::encode(Sha256::digest(std::fs::read(&file).unwrap()));
    std::fs::write(
        dir.path().join("agent.yaml"),
        format!("state-dir: state\nplugins:\n  - {{ name: kcp-keys, path: {}, sha256: {sha}, world: key-filter }}\n", file.display()),
    )
    .unwrap();
    let config = AgentConfig::load(&dir.path().join("agent.yaml")).unwrap();
    let options = serde_json::json!({ "prefix": "/registry", "cluster": TARGET, "identities": ["9c4f2a6d7e8b1c3f5a0d2e4b6c8a1f3e5d7b9c0a2e4f6a8b1d3c5e7f9a0b2c4d"] }).to_string();
    let input = Arc::new(key_space());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());

    let measure = |workers: usize| {
        let rt = if workers == 1 {
            tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
        } else {
            tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build().unwrap()
        };
        rt.block_on(async {
            let engine = config.engine().unwrap();
            let plugin = Plugin::load(&engine, &config.plugins[0]).await.unwrap();
            let (mut ours, mut native) = (Vec::new(), Vec::new());
            let mut selected = (0, 0);
            for _ in 0..5 {
                let mut sessions = Vec::new();
                for _ in 0..workers {
                    sessions.push(KeyFilterSession::open(&engine, &plugin, &options, Arc::new(NullSink)).await.unwrap());
                }
                let (t, s) = run_filter(&input, sessions).await;
                ours.push(t);
                selected.0 = s;
                let natives = (0..workers).map(|_| Native(kcp_keys::Classifier::new(&options).unwrap())).collect();
                let (t, s) = run_filter(&input, natives).await;
                native.push(t);
                selected.1 = s;
            }
            assert_eq!(selected.0, selected.1, "component and native disagree");
            (best(ours), best(native), selected.0)
        })
    };

    // The classifier alone: pre-packed batches, no reading or writing.
    let batches: Vec<KeyBatch> = {
        let mut batches = Vec::new();
        let mut batch = KeyBatch { data: Vec::new(), ends: Vec::new() };
        for line in input.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            batch.data.extend_from_slice(line);
            batch.ends.push(batch.data.len() as u32);
            if batch.ends.len() == batch::BATCH_KEYS {
                batches.push(std::mem::replace(&mut batch, KeyBatch { data: Vec::new(), ends: Vec::new() }));
            }
        }
        batches.push(batch);
        batches
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (ours, native) = rt.block_on(async {
        let engine = config.engine().unwrap();
        let plugin = Plugin::load(&engine, &config.plugins[0]).await.unwrap();
        let mut session = KeyFilterSession::open(&engine, &plugin, &options, Arc::new(NullSink)).await.unwrap();
        let mut native = Native(kcp_keys::Classifier::new(&options).unwrap());
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..5 {
            let start = Instant::now();
            for batch in &batches {
                session.select(batch).await.unwrap();
            }
            a.push(start.elapsed());
            let start = Instant::now();
            for batch in &batches {
                native.select(batch).await.unwrap();
            }
            b.push(start.elapsed());
        }
        (best(a), best(b))
    });
    let rate = |d: Duration| KEYS as f64 / d.as_secs_f64() / 1e6;
    println!("key_filter_select: the classifier alone on packed batches: component {:.1} M keys/s, native {:.1} M keys/s", rate(ours), rate(native));
    println!("BENCH name=key_filter_select value={:.2} unit=Mkeys/s baseline={:.2} ratio={:.3}", rate(ours), rate(native), rate(ours) / rate(native));

    for (name, workers) in [("key_filter", 1), ("key_filter_cores", cores)] {
        let (ours, native, selected) = measure(workers);
        let rate = |d: Duration| KEYS as f64 / d.as_secs_f64() / 1e6;
        let (value, base) = (rate(ours), rate(native));
        println!(
            "{name}: {KEYS} keys ({} MB, {selected} selected), {workers} worker(s): component {value:.1} M keys/s, native {base:.1} M keys/s",
            input.len() / 1_000_000
        );
        println!("BENCH name={name} value={value:.2} unit=Mkeys/s baseline={base:.2} ratio={:.3}", value / base);
    }
}
