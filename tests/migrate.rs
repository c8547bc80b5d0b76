//! Migrations end to end, against real etcd servers on loopback (two, as
//! two shards): one kcp logical cluster among several moved byte for byte
//! with everything else untouched on both sides; page-budget edges and a
//! garbage continue token; SIGKILL during `copy` and during `cleanup`, then
//! `resume`, with zero lost keys and nothing deleted before `verify`; a
//! concurrent second migration of the same unit refused; the host refusing
//! a delete before `verify` and stopping at a `verify` mismatch.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cordon_migrate::kv::{KvStore, Pair, Sqlite};
use cordon_migrate::run;
use cordon_migrate::{Ledger, Status};
use cordon_runtime::plugin::AgentConfig;
use cordon_runtime::sandbox::output::NullSink;
use cordon_tests::{EtcdServer, cordon_bin, plugin_entry, engine};

const CLUSTERS: [&str; 3] = ["root:org-a", "root:org-b", "root:org-c"];

/// kcp-style keys of `cluster`: built-in, namespaced and CRD resources.
fn cluster_keys(cluster: &str, n: usize) -> Vec<Pair> {
    (0..n)
        .map(|i| {
            let key = match i % 3 {
                0 => format!("/registry/core/configmaps/{cluster}/ns-{}/cm-{i}", i % 7),
                1 => format!("/registry/apps/deployments/{cluster}/ns-{}/app-{i}", i % 5),
                _ => format!("/registry/example.com/widgets/customresources/{cluster}/w-{i}"),
            };
            let value = format!("{{\"kind\":\"Thing\",\"cluster\":\"{cluster}\",\"i\":{i},\"pad\":\"{}\"}}", "x".repeat(i % 50)).into_bytes();
            (key.into_bytes(), value)
        })
        .collect()
}

struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let mut yaml = "state-dir: state\nplugins:\n".to_string();
        yaml.push_str(&plugin_entry("kcp-keys", "key-filter", ""));
        yaml.push_str(&plugin_entry("registry-rewrite", "item-action", ""));
        for phase in ["prepare", "copy", "verify", "cleanup", "finalize"] {
            yaml.push_str(&plugin_entry(&format!("migrate-{phase}"), "migration-phase", ""));
        }
        let config = dir.path().join("agent.yaml");
        std::fs::write(&config, yaml).unwrap();
        Setup { dir, config }
    }

    fn agent(&self) -> AgentConfig {
        AgentConfig::load(&self.config).unwrap()
    }

    fn ledger(&self) -> Arc<Ledger> {
        Arc::new(Ledger::open(&self.agent().state_dir).unwrap())
    }

    /// A spec file from `source`/`destination` YAML and the phase list.
    fn spec(&self, name: &str, source: &str, destination: &str, budget: &str, phases: &str) -> PathBuf {
        let text = format!(
            "source: {source}\ndestination: {destination}\nselector: {{ plugin: kcp-keys, with: {{ cluster: \"root:org-a\" }} }}\nbudget: {budget}\nphases:\n{phases}"
        );
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn cordon(&self, args: &[&str]) -> Output {
        Command::new(cordon_bin()).arg("--config").arg(&self.config).args(args).env_remove("CORDON_LOG").output().unwrap()
    }

    fn spawn_piped(&self, args: &[&str]) -> std::process::Child {
        Command::new(cordon_bin())
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .env_remove("CORDON_LOG")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn spawn(&self, args: &[&str]) -> std::process::Child {
        Command::new(cordon_bin())
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .env_remove("CORDON_LOG")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    }
}

const ALL_PHASES: &str = "  - { name: prepare, plugin: migrate-prepare }
  - { name: copy, plugin: migrate-copy }
  - { name: verify, plugin: migrate-verify }
  - { name: cleanup, plugin: migrate-cleanup }
  - { name: finalize, plugin: migrate-finalize, with: { require-empty-source: true } }
";

fn etcd(server: &EtcdServer) -> String {
    format!("{{ etcd: {{ endpoints: [\"{}\"] }} }}", server.endpoint)
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn selected(all: &[Pair]) -> Vec<Pair> {
    all.iter().filter(|(k, _)| String::from_utf8_lossy(k).contains("/root:org-a/")).cloned().collect()
}

fn others(all: &[Pair]) -> Vec<Pair> {
    all.iter().filter(|(k, _)| !String::from_utf8_lossy(k).contains("/root:org-a/")).cloned().collect()
}

async fn seed(kv: &dyn KvStore, per_cluster: usize, clusters: &[&str]) -> Vec<Pair> {
    let mut all = Vec::new();
    for c in clusters {
        all.extend(cluster_keys(c, per_cluster));
    }
    kv.put(&all).await.unwrap();
    all.sort();
    all
}

async fn migrate(setup: &Setup, spec: &Path) -> (String, run::Ended) {
    let ledger = setup.ledger();
    let agent = setup.agent();
    let id = run::create(&agent, &ledger, spec).unwrap();
    let ended = run::run(&agent, engine(), ledger, &id, Arc::new(NullSink), |_| {}).await.unwrap();
    (id, ended)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_logical_cluster_moves_between_etcd_shards_byte_for_byte() {
    let (a, b) = (EtcdServer::start().await, EtcdServer::start().await);
    let source_before = seed(&a.kv().await.unwrap(), 400, &CLUSTERS).await;
    let dest_before = seed(&b.kv().await.unwrap(), 50, &["root:org-z"]).await;
    let setup = Setup::new();
    let spec = setup.spec("m.yaml", &etcd(&a), &etcd(&b), "{ entries: 64, bytes: 16KiB }", ALL_PHASES);
    let (id, ended) = migrate(&setup, &spec).await;
    assert_eq!(ended.status, Status::Completed, "{:?}", ended.error);

    let (source_after, dest_after) = (a.dump().await, b.dump().await);
    assert_eq!(source_after, others(&source_before), "the source keeps exactly the other clusters' keys");
    let mut expected = dest_before.clone();
    expected.extend(selected(&source_before));
    expected.sort();
    assert_eq!(dest_after, expected, "the destination gains org-a's keys byte for byte and keeps its own");
    assert_eq!(selected(&source_before).len(), 400);

    let phases = setup.ledger().phases(&id).unwrap();
    assert!(phases.iter().all(|p| p.status == "done"), "{phases:?}");
    assert_eq!(phases[1].entries, 400, "copy counted every entry once");
    assert!(phases[1].steps >= 400 / 64, "copy went page by page: {phases:?}");
    // The claim is released: the same unit can be migrated again (back).
    let back = setup.spec("back.yaml", &etcd(&b), &etcd(&a), "{ entries: 1000 }", ALL_PHASES);
    let (_, ended) = migrate(&setup, &back).await;
    assert_eq!(ended.status, Status::Completed, "{:?}", ended.error);
    assert_eq!(a.dump().await, source_before);
}

/// Budgets and tokens, on the scoped store a phase sees (SQLite stores).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_budgets_and_continue_tokens() {
    use cordon_migrate::scope::ScopedStores;
    use cordon_migrate::spec::Budget as SpecBudget;
    use cordon_runtime::runner::KeyFilterSession;
    use cordon_runtime::sandbox::stores::{Budget, MigrationStores};

    let setup = Setup::new();
    let src = Arc::new(Sqlite::open(&setup.dir.path().join("src.sqlite")).unwrap());
    let dst = Arc::new(Sqlite::open(&setup.dir.path().join("dst.sqlite")).unwrap());
    let mut keys = cluster_keys("root:org-a", 10);
    keys.extend(cluster_keys("root:org-b", 10));
    // One entry far larger than the byte budget.
    keys.push((b"/registry/core/configmaps/root:org-a/big/huge".to_vec(), vec![b'h'; 10_000]));
    src.put(&keys).await.unwrap();

    let agent = setup.agent();
    let plugin = cordon_runtime::plugin::Plugin::load(engine(), agent.plugin("kcp-keys").unwrap()).await.unwrap();
    let scope = |entries: u32, bytes: u64| {
        let (src, dst, plugin, ledger) = (src.clone(), dst.clone(), &plugin, setup.ledger());
        async move {
            let filter = KeyFilterSession::open(engine(), plugin, r#"{"cluster": "root:org-a"}"#, Arc::new(NullSink)).await.unwrap();
            let budget = SpecBudget { entries, bytes: bytesize::ByteSize(bytes) };
            ScopedStores::new("mig-test", "unit", src, dst, filter, None, budget, ledger, false).unwrap()
        }
    };
    let any = Budget { max_entries: u32::MAX, max_bytes: u64::MAX };
    let pages = |s: ScopedStores| async move {
        let (mut sizes, mut token) = (Vec::new(), None);
        loop {
            let page = s.source_scan(token, any).await.unwrap();
            sizes.push(page.entries.len());
            match page.continue_from {
                Some(t) => token = Some(t),
                None => return sizes,
            }
        }
    };
    // 11 selected entries: pages of 11 (exact), of 5 (5, 5, 1), of 1 (eleven).
    assert_eq!(pages(scope(11, 1 << 30).await).await, vec![11]);
    assert_eq!(pages(scope(5, 1 << 30).await).await, vec![5, 5, 1]);
    assert_eq!(pages(scope(1, 1 << 30).await).await.len(), 11);
    // A byte budget smaller than the big entry: it comes alone, the scan goes on.
    let s = scope(1000, 1000).await;
    let mut token = None;
    let mut saw_big_alone = false;
    let mut total = 0;
    loop {
        let page = s.source_scan(token, any).await.unwrap();
        total += page.entries.len();
        if page.entries.iter().any(|e| e.value.len() == 10_000) {
            assert_eq!(page.entries.len(), 1, "an oversized entry goes alone");
            saw_big_alone = true;
        } else {
            assert!(page.entries.iter().map(|e| e.key.len() + e.value.len()).sum::<usize>() <= 1000);
        }
        match page.continue_from {
            Some(t) => token = Some(t),
            None => break,
        }
    }
    assert!(saw_big_alone);
    assert_eq!(total, 11);

    // A garbage token, and a real token of another migration, are refused.
    let e = s.source_scan(Some("garbage".into()), any).await.unwrap_err();
    assert!(e.contains("invalid continue token \"garbage\"") && e.contains("mig-test"), "{e}");
    let first = scope(2, 1 << 30).await.source_scan(None, any).await.unwrap().continue_from.unwrap();
    let other = {
        let filter = KeyFilterSession::open(engine(), &plugin, r#"{"cluster": "root:org-a"}"#, Arc::new(NullSink)).await.unwrap();
        ScopedStores::new("mig-other", "unit", src.clone(), dst.clone(), filter, None, SpecBudget::default(), setup.ledger(), false).unwrap()
    };
    assert!(other.source_scan(Some(first), any).await.unwrap_err().contains("invalid continue token"));
    // Writes need the claim; deletes need verify; nothing outside the selection.
    let e = s.destination_put(vec![]).await.unwrap_err();
    assert!(e.contains("claim"), "{e}");
    let e = s.source_delete(vec![keys[0].0.clone()]).await.unwrap_err();
    assert!(e.contains("claim"), "{e}");
}

/// Polls `cond` on the ledger of a migration run by another process.
async fn until(what: &str, ledger: &Ledger, mut cond: impl FnMut(&Ledger) -> bool) {
    let started = Instant::now();
    while !cond(ledger) {
        assert!(started.elapsed() < Duration::from_secs(60), "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_copy_and_cleanup_then_resume_loses_nothing() {
    let (a, b) = (EtcdServer::start().await, EtcdServer::start().await);
    let source_before = seed(&a.kv().await.unwrap(), 1500, &CLUSTERS).await;
    let setup = Setup::new();
    // Small pages, so that each phase takes many steps.
    let spec = setup.spec("m.yaml", &etcd(&a), &etcd(&b), "{ entries: 10 }", ALL_PHASES);
    let out = setup.cordon(&["migrate", "status"]);
    assert!(text(&out).contains("no migrations"), "{}", text(&out));

    let mut child = setup.spawn(&["migrate", "run", spec.to_str().unwrap()]);
    let ledger = setup.ledger();
    until("copy to be under way", &ledger, |l| {
        l.list().unwrap().first().is_some_and(|m| l.phases(&m.id).unwrap()[1].entries >= 200)
    })
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    let id = ledger.list().unwrap()[0].id.clone();
    let m = ledger.get(&id).unwrap().unwrap();
    assert_eq!((m.phase, m.verified), (1, false), "killed during copy");
    assert_eq!(a.dump().await, source_before, "nothing is deleted before verify");

    // A second migration of the same unit is refused while the first is unfinished.
    let second = setup.cordon(&["migrate", "run", spec.to_str().unwrap()]);
    assert_eq!(second.status.code(), Some(1), "{}", text(&second));
    assert!(text(&second).contains(&format!("already being migrated by {id}")), "{}", text(&second));

    // Resume, and kill again during cleanup.
    let mut child = setup.spawn(&["migrate", "resume", &id]);
    until("cleanup to be under way", &ledger, |l| l.phases(&id).unwrap()[3].entries >= 200).await;
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(ledger.get(&id).unwrap().unwrap().verified);
    let status = setup.cordon(&["migrate", "status", &id]);
    assert!(text(&status).contains("verified: yes") && text(&status).contains("cleanup"), "{}", text(&status));

    let resumed = setup.cordon(&["migrate", "resume", &id]);
    assert!(resumed.status.success(), "{}", text(&resumed));
    assert!(text(&resumed).contains(&format!("migration {id} completed")), "{}", text(&resumed));
    assert_eq!(a.dump().await, others(&source_before), "every selected key left the source, no other did");
    assert_eq!(b.dump().await, selected(&source_before), "zero lost keys");
    let again = setup.cordon(&["migrate", "resume", &id]);
    assert_eq!(again.status.code(), Some(2), "{}", text(&again));
    assert!(text(&again).contains("already completed"), "{}", text(&again));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_refuses_deletes_before_verify_and_stops_at_a_mismatch() {
    let setup = Setup::new();
    let src = setup.dir.path().join("src.sqlite");
    let kv = Sqlite::open(&src).unwrap();
    let before = seed(&kv, 30, &CLUSTERS).await;
    let sqlite = |p: &str| format!("{{ sqlite: {{ path: {p} }} }}");

    // The cleanup plugin run as a phase before verify: its deletes are refused.
    let early = setup.spec(
        "early.yaml",
        &sqlite("src.sqlite"),
        &sqlite("dst.sqlite"),
        "{ entries: 100 }",
        "  - { name: prepare, plugin: migrate-prepare }\n  - { name: early, plugin: migrate-cleanup, with: { retries: 0 } }\n  - { name: verify, plugin: migrate-verify }\n",
    );
    let (id, ended) = migrate(&setup, &early).await;
    assert_eq!(ended.status, Status::Failed);
    assert!(ended.error.as_deref().unwrap().contains("has not passed `verify`"), "{:?}", ended.error);
    let (all, _) = kv.range(b"", 10_000).await.unwrap();
    assert_eq!(all, before, "nothing was deleted");
    assert!(setup.ledger().holds_claim(&setup.ledger().get(&id).unwrap().unwrap().unit, &id).unwrap(), "a failed migration keeps its claim");

    // Verify without a copy: a mismatch stops the run before cleanup.
    let setup = Setup::new();
    let kv = Sqlite::open(&setup.dir.path().join("src.sqlite")).unwrap();
    seed(&kv, 30, &CLUSTERS).await;
    let mismatch = setup.spec("mismatch.yaml", &sqlite("src.sqlite"), &sqlite("dst.sqlite"), "{ entries: 100 }", "  - { name: prepare, plugin: migrate-prepare }\n  - { name: verify, plugin: migrate-verify }\n  - { name: cleanup, plugin: migrate-cleanup }\n");
    let (id, ended) = migrate(&setup, &mismatch).await;
    assert_eq!(ended.status, Status::Failed);
    assert!(ended.error.as_deref().unwrap().contains("verify failed"), "{:?}", ended.error);
    assert_eq!(setup.ledger().phases(&id).unwrap()[2].status, "pending");
    assert_eq!(kv.range(b"", 10_000).await.unwrap().0.len(), 90);
}

#[test]
fn bad_specs_are_refused_with_the_field_and_the_fix() {
    let setup = Setup::new();
    let agent = setup.agent();
    let cases = [
        ("source: { sqlite: { path: a } }\ndestination: { sqlite: { path: a } }\nselector: { plugin: kcp-keys }\nphases: [{ name: copy, plugin: migrate-copy }]", "same store"),
        ("source: { sqlite: { path: a } }\ndestination: { sqlite: { path: b } }\nselector: { plugin: migrate-copy }\nphases: [{ name: copy, plugin: migrate-copy }]", "needs a key-filter plugin"),
        ("source: { sqlite: { path: a } }\ndestination: { sqlite: { path: b } }\nselector: { plugin: kcp-keys }\nphases: [{ name: cleanup, plugin: migrate-cleanup }]", "a `verify` phase must come before it"),
        ("source: { sqlite: { path: a } }\ndestination: { sqlite: { path: b } }\nselector: { plugin: kcp-keys }\nphases: [{ name: verify, plugin: migrate-verify, on-error: continue-and-report }]", "verify must be fail-fast"),
        ("source: { etcd: { endpoints: [] } }\ndestination: { sqlite: { path: b } }\nselector: { plugin: kcp-keys }\nphases: [{ name: copy, plugin: migrate-copy }]", "endpoints is empty"),
        ("source: { sqlite: { path: a } }\ndestination: { sqlite: { path: b } }\nselector: { plugin: nope }\nphases: [{ name: copy, plugin: migrate-copy }]", "no plugin named `nope`"),
    ];
    for (yaml, want) in cases {
        let path = setup.dir.path().join("bad.yaml");
        std::fs::write(&path, yaml).unwrap();
        let e = format!("{:#}", cordon_migrate::MigrationSpec::load(&path, &agent).unwrap_err());
        assert!(e.contains(want) && e.contains("bad.yaml"), "{want}: {e}");
    }
    let out = setup.cordon(&["migrate", "run", setup.dir.path().join("bad.yaml").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(!setup.agent().state_dir.join("migrations.sqlite").exists() || setup.ledger().list().unwrap().is_empty(), "nothing recorded");
}

fn table_rows(state_dir: &Path) -> Vec<(String, i64)> {
    let conn = rusqlite::Connection::open(cordon_store::database_path(state_dir)).unwrap();
    ["applications", "deployments", "stages", "logs", "metadata", "blobs", "commands"]
        .iter()
        .map(|t| (t.to_string(), conn.query_row(&format!("SELECT COUNT(*) FROM {t}"), [], |r| r.get(0)).unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_carries_history_maps_taken_ids_and_adds_nothing_twice() {
    use cordon_tests::{World, deploy};
    let trigger = || cordon_pipeline::plan::TriggerInfo { commander: "test".into(), ..Default::default() };
    let app_yaml = "name: st\npipeline:\n  stages:\n    - { name: STEP }\n    - { name: STEP }\n";

    let source = World::new();
    let host = source.host().await;
    let app = source.app("st", app_yaml);
    let state = source.agent_config().state_dir;
    let d1 = deploy(&host, &state, &app, trigger()).await;
    let d2 = deploy(&host, &state, &app, trigger()).await;
    let fence = host.store.lease(&d1.id).unwrap().unwrap().0;
    assert!(host.store.blob_put_within(&fence, "st", "step", "k", b"blob value", cordon_store::Quota { entries: 1, bytes: 1024 }).unwrap());
    host.store.metadata_put(&fence, "", "note", "kept").unwrap();
    let logs = host.store.logs(&d1.id, None, 0, 1000).unwrap();
    drop(host);

    let backup = source.dir.path().join("backup.tar");
    let out = Command::new(cordon_bin()).arg("--config").arg(&source.config).args(["transfer", "backup", "--output"]).arg(&backup).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));

    // A target that already has a deployment with the id `st-1`.
    let target = World::new();
    let thost = target.host().await;
    let tapp = target.app("st", app_yaml);
    let tstate = target.agent_config().state_dir;
    deploy(&thost, &tstate, &tapp, trigger()).await;
    drop(thost);

    let restore = || Command::new(cordon_bin()).args(["transfer", "restore", "--input"]).arg(&backup).arg("--state").arg(&tstate).output().unwrap();
    let first = restore();
    assert!(first.status.success(), "{}", text(&first));
    assert!(text(&first).contains("2 deployments added (0 already there)"), "{}", text(&first));
    let after_first = table_rows(&tstate);
    let map_file = std::fs::read_dir(&tstate).unwrap().map(|e| e.unwrap().path()).find(|p| p.file_name().unwrap().to_string_lossy().starts_with("transfer-ids-")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&map_file).unwrap().permissions().mode() & 0o777, 0o600);
    let map: serde_json::Value = serde_json::from_slice(&std::fs::read(&map_file).unwrap()).unwrap();
    let new1 = map["deployments"][&d1.id].as_str().unwrap().to_string();
    let new2 = map["deployments"][&d2.id].as_str().unwrap().to_string();
    assert_ne!(new1, d1.id, "st-1 is taken in the target, so it gets a new id");
    assert_ne!(new1, new2);

    let store = cordon_store::sqlite::SqliteStore::open(&cordon_store::database_path(&tstate)).unwrap();
    use cordon_store::StateStore;
    let restored = store.deployment(&new1).unwrap().unwrap();
    assert_eq!((restored.status, restored.application.as_str()), (d1.status, "st"));
    assert_eq!(store.stages(&new1).unwrap().len(), 2);
    let texts = |l: Vec<cordon_store::LogRecord>| l.into_iter().map(|r| (r.stage, r.text)).collect::<Vec<_>>();
    assert_eq!(texts(store.logs(&new1, None, 0, 1000).unwrap()), texts(logs), "logs came along");
    assert_eq!(store.metadata_get(&new1, "", "note").unwrap().as_deref(), Some("kept"));
    assert_eq!(store.blob_get("st", "step", "k").unwrap().as_deref(), Some(&b"blob value"[..]));
    assert!(Path::new(&store.deployment(&new2).unwrap().unwrap().target_snapshot).is_dir(), "snapshots came along");

    // Again: nothing is added twice, and the mapping is the same.
    let map_before = std::fs::read(&map_file).unwrap();
    let second = restore();
    assert!(second.status.success(), "{}", text(&second));
    assert!(text(&second).contains("0 deployments added (2 already there)"), "{}", text(&second));
    assert_eq!(table_rows(&tstate), after_first);
    assert_eq!(std::fs::read(&map_file).unwrap(), map_before);

    // Bad input: nothing written.
    let junk = source.dir.path().join("junk.tar");
    std::fs::write(&junk, b"not a tar at all").unwrap();
    let empty = tempfile::tempdir().unwrap();
    let target = empty.path().join("state");
    let out = Command::new(cordon_bin()).args(["transfer", "restore", "--input"]).arg(&junk).arg("--state").arg(&target).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("junk.tar: not a Cordon transfer archive"), "{}", text(&out));
    assert!(!text(&out).contains("not a tar at all"), "the file's bytes were printed: {}", text(&out));
    assert!(!target.exists(), "a refused restore created {}", target.display());
}

/// What a restore leaves, independent of where: deployments, stages,
/// applications and the snapshot directory (staging included).
fn restored(state: &Path) -> Vec<String> {
    let conn = rusqlite::Connection::open(cordon_store::database_path(state)).unwrap();
    let prefix = state.to_string_lossy().into_owned();
    let mut out = Vec::new();
    for sql in [
        "SELECT id || ' ' || status || ' ' || application || ' ' || target_snapshot || ' ' || running_snapshot FROM deployments ORDER BY id",
        "SELECT deployment || ' ' || id || ' ' || status FROM stages ORDER BY deployment, id",
        "SELECT name || ' ' || COALESCE(last_success, '') || ' ' || COALESCE(running_snapshot, '') FROM applications ORDER BY name",
        "SELECT COUNT(*) || ' log lines' FROM logs",
    ] {
        let mut stmt = conn.prepare(sql).unwrap();
        out.extend(stmt.query_map([], |r| r.get::<_, String>(0)).unwrap().map(|r| r.unwrap().replace(&prefix, "STATE")));
    }
    let names = |dir: &Path| {
        let mut n: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        n.sort();
        n
    };
    out.extend(names(&state.join("snapshots")).into_iter().map(|n| format!("snapshot {n}")));
    out.extend(names(state).into_iter().filter(|n| n.starts_with('.')).map(|n| format!("staging {n}")));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_killed_and_run_again_equals_a_clean_one() {
    use cordon_tests::{World, deploy};
    let trigger = || cordon_pipeline::plan::TriggerInfo { commander: "test".into(), ..Default::default() };
    let source = World::new();
    let host = source.host().await;
    let app = source.app("kr", "name: kr\npipeline:\n  stages:\n    - { name: STEP }\n");
    for i in 0..300 {
        std::fs::write(app.join(format!("page-{i}.html")), format!("page {i}")).unwrap();
    }
    let state = source.agent_config().state_dir;
    for _ in 0..12 {
        deploy(&host, &state, &app, trigger()).await;
    }
    drop(host);
    let backup = source.dir.path().join("backup.tar");
    let out = Command::new(cordon_bin()).arg("--config").arg(&source.config).args(["transfer", "backup", "--output"]).arg(&backup).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let restore = |target: &Path| {
        let mut command = Command::new(cordon_bin());
        command.args(["transfer", "restore", "--input"]).arg(&backup).arg("--state").arg(target);
        command
    };

    let clean = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out = restore(clean.path()).output().unwrap();
    let took = started.elapsed();
    assert!(out.status.success(), "{}", text(&out));
    let want = restored(clean.path());
    let mut killed_mid_way = 0;
    // Kills spread over the restore's time, until two landed mid-way.
    for trial in 1..=24u32 {
        if killed_mid_way >= 2 && trial > 6 {
            break;
        }
        let target = tempfile::tempdir().unwrap();
        let mut child = restore(target.path()).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
        std::thread::sleep(took * (trial % 8 + 1) / 9);
        child.kill().unwrap();
        let killed = child.wait().unwrap().code().is_none();
        let staged = std::fs::read_dir(target.path()).map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().starts_with(".transfer-"))).unwrap_or(false);
        killed_mid_way += usize::from(killed && staged);
        let out = restore(target.path()).output().unwrap();
        assert!(out.status.success(), "trial {trial}: {}", text(&out));
        assert_eq!(restored(target.path()), want, "trial {trial}: a killed restore run again differs from a clean one");
    }
    eprintln!("{killed_mid_way} restores were killed with their staging in place (restore took {took:?})");
    assert!(killed_mid_way > 0, "no kill landed during a restore: the test proved nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_backup_after_an_older_one_completes_history_and_the_running_source() {
    use cordon_tests::{World, deploy, serve_until_idle};
    let trigger = || cordon_pipeline::plan::TriggerInfo { commander: "test".into(), ..Default::default() };
    let source = World::new();
    let host = source.host().await;
    let app = source.app("nw", "name: nw\npipeline:\n  stages:\n    - { name: STEP }\n");
    let state = source.agent_config().state_dir;
    deploy(&host, &state, &app, trigger()).await;
    let queued = cordon_pipeline::trigger(&host, &app, trigger()).await.unwrap();
    let backup = |name: &str| {
        let path = source.dir.path().join(name);
        let out = Command::new(cordon_bin()).arg("--config").arg(&source.config).args(["transfer", "backup", "--output"]).arg(&path).output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
        path
    };
    let older = backup("older.tar");
    serve_until_idle(&host, &state).await;
    let newer = backup("newer.tar");
    drop(host);

    let target = tempfile::tempdir().unwrap();
    for b in [&older, &newer] {
        let out = Command::new(cordon_bin()).args(["transfer", "restore", "--input"]).arg(b).arg("--state").arg(target.path()).output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
    }
    let store = cordon_store::sqlite::SqliteStore::open(&cordon_store::database_path(target.path())).unwrap();
    use cordon_store::StateStore;
    let d = store.deployment(&queued.id).unwrap().unwrap();
    assert_eq!(d.status, cordon_store::DeploymentStatus::Success, "{d:?}");
    assert_eq!(store.stages(&queued.id).unwrap().len(), 1, "the history is whole");
    let a = store.application("nw").unwrap().unwrap();
    assert_eq!(a.last_success.as_deref(), Some(queued.id.as_str()));
    assert!(Path::new(a.running_snapshot.as_deref().unwrap()).is_dir(), "{a:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_item_action_rewrites_values_during_copy_and_verify_agrees() {
    let setup = Setup::new();
    let src = Sqlite::open(&setup.dir.path().join("src.sqlite")).unwrap();
    let deployment = |cluster: &str, i: usize| -> Pair {
        let key = format!("/registry/apps/deployments/{cluster}/ns/app-{i}");
        let value = format!(r#"{{"kind":"Deployment","metadata":{{"name":"app-{i}"}},"spec":{{"template":{{"spec":{{"containers":[{{"name":"c","image":"old.example:5000/team/app:{i}"}}]}}}}}}}}"#);
        (key.into_bytes(), value.into_bytes())
    };
    let mut all: Vec<Pair> = (0..20).map(|i| deployment("root:org-a", i)).collect();
    all.extend((0..5).map(|i| deployment("root:org-b", i)));
    src.put(&all).await.unwrap();
    let spec = setup.spec(
        "rewrite.yaml",
        "{ sqlite: { path: src.sqlite } }",
        "{ sqlite: { path: dst.sqlite } }\ntransform: { plugin: registry-rewrite, with: { from: \"old.example:5000\", to: \"new.example\" } }",
        "{ entries: 7 }",
        "  - { name: prepare, plugin: migrate-prepare }\n  - { name: copy, plugin: migrate-copy }\n  - { name: verify, plugin: migrate-verify }\n",
    );
    let (_, ended) = migrate(&setup, &spec).await;
    assert_eq!(ended.status, Status::Completed, "{:?}", ended.error);
    let dst = Sqlite::open(&setup.dir.path().join("dst.sqlite")).unwrap();
    let (copied, _) = dst.range(b"", 1000).await.unwrap();
    assert_eq!(copied.len(), 20, "only org-a's keys");
    for (key, value) in &copied {
        let v: serde_json::Value = serde_json::from_slice(value).unwrap();
        let image = v.pointer("/spec/template/spec/containers/0/image").unwrap().as_str().unwrap();
        assert!(image.starts_with("new.example/team/app:"), "{}: {image}", String::from_utf8_lossy(key));
    }
    assert_eq!(src.range(b"", 1000).await.unwrap().0, { all.sort(); all }, "no cleanup phase: the source is untouched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_store_fails_the_step_naming_it_and_a_resumed_migration_completes() {
    let (a, b) = (EtcdServer::start().await, EtcdServer::start().await);
    let source_before = seed(&a.kv().await.unwrap(), 600, &CLUSTERS).await;
    let setup = Setup::new();
    let destination = format!("{{ etcd: {{ endpoints: [\"{}\"], timeout: 2s }} }}", b.endpoint);
    let spec = setup.spec("m.yaml", &etcd(&a), &destination, "{ entries: 10 }", ALL_PHASES);
    let child = setup.spawn_piped(&["migrate", "run", spec.to_str().unwrap()]);
    let ledger = setup.ledger();
    until("copy to be under way", &ledger, |l| l.list().unwrap().first().is_some_and(|m| l.phases(&m.id).unwrap()[1].entries >= 50)).await;
    b.freeze();
    let started = Instant::now();
    let out = child.wait_with_output().unwrap();
    let waited = started.elapsed();
    b.thaw();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(waited < Duration::from_secs(20), "the hung store stalled the migration for {waited:?}");
    assert!(text(&out).contains("did not answer within 2s") && text(&out).contains(&b.endpoint), "{}", text(&out));
    let id = ledger.list().unwrap()[0].id.clone();
    assert_eq!(ledger.get(&id).unwrap().unwrap().status, Status::Failed);

    // Resumed to the end: the earlier failed attempt of `copy` does not count.
    let resumed = setup.cordon(&["migrate", "resume", &id]);
    assert!(resumed.status.success(), "{}", text(&resumed));
    assert!(text(&resumed).contains(&format!("migration {id} completed")) && !text(&resumed).contains("with-errors"), "{}", text(&resumed));
    assert_eq!(b.dump().await, selected(&source_before));
    assert_eq!(a.dump().await, others(&source_before));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_starts_over_on_resume_and_abort_releases_the_claim() {
    let setup = Setup::new();
    let src = Sqlite::open(&setup.dir.path().join("src.sqlite")).unwrap();
    let before = seed(&src, 30, &CLUSTERS).await;
    let sqlite = |p: &str| format!("{{ sqlite: {{ path: {p} }} }}");
    // Verify against a destination that holds one wrong value: it fails.
    let dst = Sqlite::open(&setup.dir.path().join("dst.sqlite")).unwrap();
    let wanted = selected(&before);
    dst.put(&wanted).await.unwrap();
    dst.put(&[(wanted[0].0.clone(), b"tampered".to_vec())]).await.unwrap();
    let spec = setup.spec("v.yaml", &sqlite("src.sqlite"), &sqlite("dst.sqlite"), "{ entries: 4 }", "  - { name: prepare, plugin: migrate-prepare, with: { allow-existing: true } }\n  - { name: verify, plugin: migrate-verify }\n");
    let (id, ended) = migrate(&setup, &spec).await;
    assert_eq!(ended.status, Status::Failed, "{:?}", ended.error);
    // Fixed, then resumed: verify reads everything again and passes.
    dst.put(&wanted[..1]).await.unwrap();
    let resumed = setup.cordon(&["migrate", "resume", &id]);
    assert!(resumed.status.success(), "{}", text(&resumed));
    // Both sides, each read once.
    assert_eq!(setup.ledger().phases(&id).unwrap()[1].entries, 2 * wanted.len() as u64, "verify counted a page twice");

    // A failed migration holds the unit until it is aborted.
    dst.put(&[(wanted[0].0.clone(), b"tampered".to_vec())]).await.unwrap();
    let (id, ended) = migrate(&setup, &spec).await;
    assert_eq!(ended.status, Status::Failed);
    let second = setup.cordon(&["migrate", "run", spec.to_str().unwrap()]);
    assert!(text(&second).contains(&format!("already being migrated by {id}")), "{}", text(&second));
    let out = setup.cordon(&["migrate", "abort", &id]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("claim") && text(&out).contains("nothing was undone"), "{}", text(&out));
    assert_eq!(setup.ledger().get(&id).unwrap().unwrap().status, Status::Aborted);
    let again = setup.cordon(&["migrate", "abort", &id]);
    assert_eq!(again.status.code(), Some(2), "{}", text(&again));
    dst.put(&wanted[..1]).await.unwrap();
    let third = setup.cordon(&["migrate", "run", spec.to_str().unwrap()]);
    assert!(third.status.success(), "{}", text(&third));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_keeps_keys_written_after_the_copy() {
    let setup = Setup::new();
    let src_path = setup.dir.path().join("src.sqlite");
    let src = Sqlite::open(&src_path).unwrap();
    let before = seed(&src, 30, &CLUSTERS).await;
    let sqlite = |p: &str| format!("{{ sqlite: {{ path: {p} }} }}");
    let spec = setup.spec(
        "c.yaml",
        &sqlite("src.sqlite"),
        &sqlite("dst.sqlite"),
        "{ entries: 100 }",
        "  - { name: prepare, plugin: migrate-prepare }\n  - { name: copy, plugin: migrate-copy }\n  - { name: verify, plugin: migrate-verify }\n  - { name: cleanup, plugin: migrate-cleanup, with: { retries: 0 } }\n",
    );
    let wanted = selected(&before);
    let (changed, created) = (wanted[3].0.clone(), b"/registry/core/configmaps/root:org-a/ns-1/created-late".to_vec());
    // A writer that was not stopped: right after verify, it changes one
    // selected key and creates another.
    let writer = rusqlite::Connection::open(&src_path).unwrap();
    let ledger = setup.ledger();
    let agent = setup.agent();
    let id = run::create(&agent, &ledger, &spec).unwrap();
    let ended = run::run(&agent, engine(), ledger.clone(), &id, Arc::new(NullSink), |e| {
        if e.phase == "verify" && e.done {
            writer.execute("UPDATE kv SET value = ?2 WHERE key = ?1", rusqlite::params![changed, b"changed".to_vec()]).unwrap();
            writer.execute("INSERT INTO kv (key, value) VALUES (?1, ?2)", rusqlite::params![created, b"new".to_vec()]).unwrap();
        }
    })
    .await
    .unwrap();
    assert_eq!(ended.status, Status::Failed);
    let error = ended.error.unwrap();
    assert!(error.contains("2 key(s) changed in the source since they were copied") && error.contains("migrate abort"), "{error}");
    let (left, _) = src.range(b"", 10_000).await.unwrap();
    let left_selected = selected(&left);
    assert_eq!(left_selected.len(), 2, "only the two written keys stay: {left_selected:?}");
    assert!(left.contains(&(changed, b"changed".to_vec())) && left.contains(&(created, b"new".to_vec())));
    assert_eq!(others(&left), others(&before));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_that_cannot_start_is_left_failed_not_running() {
    let setup = Setup::new();
    Sqlite::open(&setup.dir.path().join("src.sqlite")).unwrap();
    let text = "source: { sqlite: { path: src.sqlite } }\ndestination: { sqlite: { path: dst.sqlite } }\nselector: { plugin: kcp-keys, with: { cluster: \"a/b\" } }\nphases:\n  - { name: prepare, plugin: migrate-prepare }\n";
    let spec = setup.dir.path().join("bad-selector.yaml");
    std::fs::write(&spec, text).unwrap();
    let out = setup.cordon(&["migrate", "run", spec.to_str().unwrap()]);
    assert_ne!(out.status.code(), Some(0));
    let ledger = setup.ledger();
    let m = &ledger.list().unwrap()[0];
    assert_eq!(m.status, Status::Failed);
    assert!(m.error.as_deref().unwrap_or_default().contains("invalid kcp-keys options"), "{:?}", m.error);
}
