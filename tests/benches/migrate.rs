//! `migrate_copy`: one million keys (one kcp logical cluster) from one etcd
//! server to another through the component pipeline — the `kcp-keys`
//! selector, the `prepare` and `copy` phase components, scoped store
//! handles, a ledger checkpoint after every page — versus a host-only copy
//! loop (range a page, put it) over the same etcd clients and the same page
//! and transaction sizes, in the same run, into a third server.
//!
//! Ratio: component throughput / host-only throughput (higher is better).
//! Lives in the tests crate because it starts etcd servers like the tests.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cordon_migrate::kv::{Etcd, KvStore, Pair};
use cordon_migrate::{Ledger, Status, run};
use cordon_runtime::plugin::AgentConfig;
use cordon_runtime::sandbox::output::NullSink;
use cordon_tests::{EtcdServer, plugin_entry, engine};

const KEYS: usize = 1_000_000;
/// Entries per page and per transaction. etcd 3.4 counts every key of a
/// range before applying its limit, so a paged scan costs O(keys²/page):
/// large pages keep that term small for both paths.
const PAGE: usize = 10_000;
const ETCD_FLAGS: [&str; 6] = ["--max-txn-ops", "10000", "--max-request-bytes", "16777216", "--quota-backend-bytes", "8589934592"];

fn key(i: usize) -> Vec<u8> {
    match i % 3 {
        0 => format!("/registry/core/configmaps/root:org-a/ns-{}/cm-{i:07}", i % 97),
        1 => format!("/registry/apps/deployments/root:org-a/ns-{}/app-{i:07}", i % 89),
        _ => format!("/registry/example.com/widgets/customresources/root:org-a/w-{i:07}"),
    }
    .into_bytes()
}

fn value(i: usize) -> Vec<u8> {
    format!("{{\"kind\":\"Thing\",\"i\":{i},\"spec\":{{\"replicas\":3,\"image\":\"registry.example.com/team/app:{}\"}}}}", i % 1000).into_bytes()
}

async fn connect(s: &EtcdServer) -> Etcd {
    Etcd::connect(std::slice::from_ref(&s.endpoint), "", PAGE, Duration::from_secs(30)).await.unwrap()
}

async fn count(kv: &Etcd) -> usize {
    let (mut n, mut start) = (0, Vec::new());
    loop {
        let (page, more) = kv.range(&start, 10_000).await.unwrap();
        n += page.len();
        if let Some((last, _)) = page.last() {
            start = [last.as_slice(), &[0]].concat();
        }
        if !more {
            return n;
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let (source, through_components, host_only) =
        (EtcdServer::start_with(&ETCD_FLAGS).await, EtcdServer::start_with(&ETCD_FLAGS).await, EtcdServer::start_with(&ETCD_FLAGS).await);
    let src = connect(&source).await;
    let started = Instant::now();
    let mut batch: Vec<Pair> = Vec::with_capacity(PAGE * 10);
    for i in 0..KEYS {
        batch.push((key(i), value(i)));
        if batch.len() == PAGE * 10 {
            src.put(&batch).await.unwrap();
            batch.clear();
        }
    }
    src.put(&batch).await.unwrap();
    eprintln!("seeded {KEYS} keys in {:.1}s", started.elapsed().as_secs_f64());

    // Host-only: the same clients, pages and transactions, no plugins.
    let dst = connect(&host_only).await;
    let started = Instant::now();
    let mut start = Vec::new();
    loop {
        let (page, more) = src.range(&start, PAGE).await.unwrap();
        dst.put(&page).await.unwrap();
        match page.last() {
            Some((last, _)) if more => start = [last.as_slice(), &[0]].concat(),
            _ => break,
        }
    }
    let host_secs = started.elapsed().as_secs_f64();
    assert_eq!(count(&dst).await, KEYS);

    // Through the components.
    let dir = tempfile::tempdir().unwrap();
    let mut yaml = "state-dir: state\nplugins:\n".to_string();
    yaml.push_str(&plugin_entry("kcp-keys", "key-filter", ""));
    yaml.push_str(&plugin_entry("migrate-prepare", "migration-phase", ""));
    yaml.push_str(&plugin_entry("migrate-copy", "migration-phase", ""));
    std::fs::write(dir.path().join("agent.yaml"), yaml).unwrap();
    let agent = AgentConfig::load(&dir.path().join("agent.yaml")).unwrap();
    let store = |s: &EtcdServer| format!("{{ etcd: {{ endpoints: [\"{}\"], max-txn-ops: {PAGE} }} }}", s.endpoint);
    let spec = format!(
        "source: {}\ndestination: {}\nselector: {{ plugin: kcp-keys, with: {{ cluster: \"root:org-a\" }} }}\nbudget: {{ entries: {PAGE}, bytes: 64MiB }}\nphases:\n  - {{ name: prepare, plugin: migrate-prepare }}\n  - {{ name: copy, plugin: migrate-copy }}\n",
        store(&source),
        store(&through_components)
    );
    std::fs::write(dir.path().join("spec.yaml"), spec).unwrap();
    let ledger = Arc::new(Ledger::open(&agent.state_dir).unwrap());
    let id = run::create(&agent, &ledger, &dir.path().join("spec.yaml")).unwrap();
    let started = Instant::now();
    let ended = run::run(&agent, engine(), ledger.clone(), &id, Arc::new(NullSink), |_| {}).await.unwrap();
    let component_secs = started.elapsed().as_secs_f64();
    assert_eq!(ended.status, Status::Completed, "{:?}", ended.error);
    assert_eq!(count(&connect(&through_components).await).await, KEYS);
    let steps = ledger.phases(&id).unwrap()[1].steps;

    let (value, baseline) = (KEYS as f64 / component_secs, KEYS as f64 / host_secs);
    eprintln!("component path: {component_secs:.2}s in {steps} copy steps; host-only loop: {host_secs:.2}s");
    println!("BENCH name=migrate_copy value={value:.0} unit=keys/s baseline={baseline:.0} ratio={:.2}", value / baseline);
}
