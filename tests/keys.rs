//! Key filtering and item actions end to end: the `kcp-keys` table of
//! layouts and traps (checked through the component *and* the native build
//! of the same source), streaming order and unclassified reporting, and the
//! `registry-rewrite` and `item-links` item actions.

use std::io::Cursor;
use std::sync::Arc;

use cordon_migrate::items;
use cordon_runtime::call::RunError;
use cordon_migrate::keys::filter;
use cordon_runtime::plugin::Plugin;
use cordon_runtime::runner::{ItemActionSession, KeyBatch, KeyFilterSession};
use cordon_runtime::sandbox::output::NullSink;
use cordon_tests::{agent_config, beside_a_neighbour, engine, guest};
use kcp_keys::{Classifier, Verdict};

const C: &str = "2h5f8mz0cgqnm9y3";
const ID: &str = "9c4f2a6d7e8b1c3f5a0d2e4b6c8a1f3e5d7b9c0a2e4f6a8b1d3c5e7f9a0b2c4d";
const UNKNOWN_ID: &str = "0000000000000000000000000000000000000000000000000000000000000000";

fn options() -> String {
    serde_json::json!({ "prefix": "/registry", "cluster": C, "identities": [ID, "samename"] }).to_string()
}

/// Every layout and trap, with the expected answer written out.
fn table() -> Vec<(String, Verdict, &'static str)> {
    use Verdict::*;
    let k = |s: &str| s.replace("{C}", C).replace("{ID}", ID).replace("{UNKNOWN}", UNKNOWN_ID);
    vec![
        (k("/registry/apps/deployments/{C}/default/web"), Selected, "built-in, namespaced"),
        (k("/registry/core/namespaces/{C}/default"), Selected, "built-in, cluster-scoped"),
        (k("/registry/apps/deployments/other/default/web"), Rejected, "another cluster"),
        (k("/registry/apps/deployments/{C}x/default/web"), Rejected, "cluster X versus XY"),
        (k("/registry/apps/deployments/x{C}/default/web"), Rejected, "cluster X versus YX"),
        (k("/registry/apps/deployments/other/{C}/web"), Rejected, "a namespace named like the target cluster"),
        (k("/registry/core/configmaps/other/default/{C}"), Rejected, "an object named like the target cluster"),
        (k("/registry/example.com/widgets/customresources/{C}/default/w1"), Selected, "custom resource, namespaced"),
        (k("/registry/example.com/widgets/customresources/{C}/w1"), Selected, "custom resource, cluster-scoped"),
        (k("/registry/example.com/widgets/customresources/other/{C}/w1"), Rejected, "custom resource, namespace named like the cluster"),
        (k("/registry/example.com/widgets/{ID}/{C}/default/w1"), Selected, "identity resource, namespaced"),
        (k("/registry/example.com/widgets/{ID}/{C}/w1"), Selected, "identity resource, cluster-scoped (5 segments, identity known)"),
        (k("/registry/example.com/widgets/{ID}/other/{C}"), Rejected, "identity resource of another cluster, named like the target"),
        (k("/registry/example.com/widgets/{UNKNOWN}/{C}/w1"), Unclassified, "5 segments read both ways: unknown identity or namespace"),
        (k("/registry/example.com/widgets/{UNKNOWN}/{C}/default/w1"), Selected, "6 segments can only be an (unknown) identity resource"),
        (k("/registry/example.com/widgets/samename/{C}/w1"), Selected, "a configured identity that is not a cluster name"),
        (format!("/registry/example.com/widgets/{C}/other/w1"), Selected, "built-in namespaced, not an identity"),
        (format!("/registry/apps/deployments/{C}/{C}/web"), Selected, "namespace and cluster both named like the target"),
        (k("/registry/apps/deployments/{C}/a/b/c"), Unclassified, "too many segments, mentions the cluster"),
        (k("/registry/apps//{C}/web"), Unclassified, "an empty segment, mentions the cluster"),
        (k("/elsewhere/apps/deployments/{C}/default/web"), Unclassified, "another prefix, mentions the cluster"),
        (k("/elsewhere/apps/deployments/other/default/web"), Rejected, "another prefix"),
        (k("/registryx/apps/deployments/other/default/web"), Rejected, "a prefix that only starts like ours"),
    ]
}

/// The identity-equals-cluster trap needs the target cluster to be listed as an identity.
fn identity_named_like_cluster() -> (String, Vec<(String, Verdict)>) {
    let options = serde_json::json!({ "cluster": "tenant1", "identities": ["tenant1"] }).to_string();
    let cases = vec![
        ("/registry/g/r/tenant1/other/name".to_string(), Verdict::Unclassified),
        ("/registry/g/r/tenant1/tenant1/name".to_string(), Verdict::Selected),
        ("/registry/g/r/tenant1/other/ns/name".to_string(), Verdict::Rejected),
        ("/registry/g/r/other/tenant1/name".to_string(), Verdict::Rejected),
    ];
    (options, cases)
}

fn pack(keys: &[String]) -> KeyBatch {
    let mut batch = KeyBatch { data: Vec::new(), ends: Vec::new() };
    for k in keys {
        batch.data.extend_from_slice(k.as_bytes());
        batch.ends.push(batch.data.len() as u32);
    }
    batch
}

async fn plugin(name: &str, world: &str) -> Plugin {
    let dir = tempfile::tempdir().unwrap();
    let config = agent_config(dir.path(), name, &guest(name), world, "").unwrap();
    Plugin::load(engine(), &config.plugins[0]).await.unwrap()
}

async fn session(options: &str) -> KeyFilterSession {
    let plugin = plugin("kcp-keys", "key-filter").await;
    KeyFilterSession::open(engine(), &plugin, options, Arc::new(NullSink)).await.unwrap()
}

fn verdicts(selection: &cordon_runtime::runner::Selection, n: usize) -> Vec<Verdict> {
    (0..n)
        .map(|i| {
            if selection.selected[i / 8] & (1 << (i % 8)) != 0 {
                Verdict::Selected
            } else if selection.unclassified.contains(&(i as u32)) {
                Verdict::Unclassified
            } else {
                Verdict::Rejected
            }
        })
        .collect()
}

#[tokio::test]
async fn kcp_keys_table_through_the_component_and_natively() {
    let cases = table();
    let keys: Vec<String> = cases.iter().map(|(k, _, _)| k.clone()).collect();
    let mut component = session(&options()).await;
    let selection = component.select(&pack(&keys)).await.unwrap();
    let got = verdicts(&selection, keys.len());
    let native = Classifier::new(&options()).unwrap();
    for (i, (key, expected, why)) in cases.iter().enumerate() {
        assert_eq!(got[i], *expected, "component, {why}: {key}");
        assert_eq!(native.classify(key.as_bytes()).0, *expected, "native, {why}: {key}");
    }

    let (options, cases) = identity_named_like_cluster();
    let mut component = session(&options).await;
    let keys: Vec<String> = cases.iter().map(|(k, _)| k.clone()).collect();
    let got = verdicts(&component.select(&pack(&keys)).await.unwrap(), keys.len());
    for (i, (key, expected)) in cases.iter().enumerate() {
        assert_eq!(got[i], *expected, "identity named like the cluster: {key}");
    }

    let sharded = serde_json::json!({ "cluster": C, "shard": "shard-1" }).to_string();
    let mut component = session(&sharded).await;
    let keys = vec![format!("/registry/shard-1/apps/deployments/{C}/ns/web"), format!("/registry/shard-2/apps/deployments/{C}/ns/web")];
    let got = verdicts(&component.select(&pack(&keys)).await.unwrap(), 2);
    assert_eq!(got, vec![Verdict::Selected, Verdict::Rejected]);
}

#[tokio::test]
async fn delete_prefixes_end_with_a_slash_and_cover_the_selection() {
    let mut component = session(&options()).await;
    let keys: Vec<String> = table().into_iter().map(|(k, _, _)| k).collect();
    let prefixes = component.delete_prefixes(&pack(&keys)).await.unwrap();
    let expected = [
        format!("/registry/apps/deployments/{C}/"),
        format!("/registry/core/namespaces/{C}/"),
        format!("/registry/example.com/widgets/customresources/{C}/"),
        format!("/registry/example.com/widgets/{ID}/{C}/"),
        format!("/registry/example.com/widgets/{UNKNOWN_ID}/{C}/"),
        format!("/registry/example.com/widgets/samename/{C}/"),
        format!("/registry/example.com/widgets/{C}/"),
    ];
    for p in &expected {
        assert!(prefixes.contains(p), "{p} missing from {prefixes:#?}");
    }
    assert!(prefixes.iter().all(|p| p.ends_with('/')));
    assert_eq!(prefixes.len(), expected.len(), "{prefixes:#?}");
}

#[tokio::test]
async fn bad_options_are_refused_with_the_reason() {
    let plugin = plugin("kcp-keys", "key-filter").await;
    for (options, expected) in [
        (r#"{"prefix": "/registry"}"#, "missing field `cluster`"),
        (r#"{"cluster": "a/b"}"#, "without '/'"),
        (r#"{"cluster": "c", "prefix": "registry"}"#, "must start with '/'"),
        (r#"{"cluster": "c", "clsuter": "x"}"#, "unknown field `clsuter`"),
    ] {
        let err = KeyFilterSession::open(engine(), &plugin, options, Arc::new(NullSink)).await.err().unwrap();
        assert!(matches!(err, RunError::Plugin(_)), "{err:?}");
        let err = err.to_string();
        assert!(err.contains("refused its options") && err.contains(expected), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_keeps_input_order_across_workers_and_reports_unclassified() {
    let mut input = String::new();
    let mut expected = String::new();
    let table = table();
    for i in 0..60_000 {
        let (key, verdict, _) = &table[i % table.len()];
        let key = format!("{key}{}", if key.ends_with('/') { String::new() } else { format!("-{i}") });
        input.push_str(&key);
        input.push('\n');
        if *verdict == Verdict::Selected {
            expected.push_str(&key);
            expected.push('\n');
        }
    }
    let sessions = vec![session(&options()).await, session(&options()).await];
    let mut out = Vec::new();
    let mut rejects = Vec::new();
    let stats = filter::run(
        Cursor::new(input.into_bytes()),
        sessions,
        filter::Sinks { selected: &mut out, unclassified: Some(&mut rejects), progress: &|_| {} },
    )
    .await
    .unwrap();
    assert_eq!(stats.keys, 60_000);
    assert_eq!(String::from_utf8(out).unwrap(), expected, "selected keys out of order or wrong");
    let unclassified_per_table = table.iter().filter(|(_, v, _)| *v == Verdict::Unclassified).count() as u64;
    assert!(stats.unclassified >= unclassified_per_table * (60_000 / table.len() as u64));
    assert_eq!(String::from_utf8(rejects).unwrap().lines().count() as u64, stats.unclassified);
    assert!(!stats.unclassified_sample.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_input_passes_selected_lines_through() {
    let lines = format!(
        "{{\"key\":\"/registry/apps/deployments/{C}/ns/a\",\"value\":\"AQID\"}}\n{{\"key\":\"/registry/apps/deployments/other/ns/a\",\"value\":\"BAUG\"}}\n"
    );
    let mut out = Vec::new();
    filter::run(Cursor::new(lines.clone().into_bytes()), vec![session(&options()).await], filter::Sinks { selected: &mut out, unclassified: None, progress: &|_| {} })
        .await
        .unwrap();
    assert_eq!(String::from_utf8(out).unwrap(), format!("{}\n", lines.lines().next().unwrap()));
    let err = filter::run(Cursor::new(b"{\"nokey\": 1}\n".to_vec()), vec![session(&options()).await], filter::Sinks { selected: &mut Vec::new(), unclassified: None, progress: &|_| {} })
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("input line 1: not a JSON object with a string `key`"), "{err:#}");
}

async fn apply(guest_name: &str, options: &str, input: &str) -> (String, items::Stats) {
    let plugin = plugin(guest_name, "item-action").await;
    let mut session = ItemActionSession::open(engine(), &plugin, Arc::new(NullSink)).await.unwrap();
    let mut out = Vec::new();
    let stats = items::run(Cursor::new(input.as_bytes().to_vec()), &mut out, &mut session, options).await.unwrap();
    (String::from_utf8(out).unwrap(), stats)
}

const REWRITE: &str = r#"{"from": "old.example:5000", "to": "new.example"}"#;

fn workload(kind: &str, spec_path: &[&str]) -> String {
    let containers = serde_json::json!({
        "containers": [{ "name": "app", "image": "old.example:5000/team/app:1.2" }, { "name": "side", "image": "docker.io/library/nginx:1" }],
        "initContainers": [{ "name": "init", "image": "old.example:5000/init:3" }]
    });
    let mut value = containers;
    for key in spec_path.iter().rev() {
        value = serde_json::json!({ *key: value });
    }
    let mut item = serde_json::json!({ "apiVersion": "v1", "kind": kind, "metadata": { "name": "x", "namespace": "ns" } });
    for (k, v) in value.as_object().unwrap() {
        item[k] = v.clone();
    }
    item.to_string()
}

#[tokio::test]
async fn registry_rewrite_handles_every_workload_kind() {
    let kinds: [(&str, &[&str]); 9] = [
        ("Pod", &["spec"]),
        ("Deployment", &["spec", "template", "spec"]),
        ("StatefulSet", &["spec", "template", "spec"]),
        ("DaemonSet", &["spec", "template", "spec"]),
        ("ReplicaSet", &["spec", "template", "spec"]),
        ("ReplicationController", &["spec", "template", "spec"]),
        ("Job", &["spec", "template", "spec"]),
        ("CronJob", &["spec", "jobTemplate", "spec", "template", "spec"]),
        ("PodTemplate", &["template", "spec"]),
    ];
    for (kind, path) in kinds {
        let (out, stats) = apply("registry-rewrite", REWRITE, &format!("{}\n", workload(kind, path))).await;
        assert_eq!(stats.modified, 1, "{kind}: {out}");
        assert!(out.contains("\"new.example/team/app:1.2\"") && out.contains("\"new.example/init:3\""), "{kind}: {out}");
        assert!(out.contains("docker.io/library/nginx:1") && !out.contains("old.example"), "{kind}: {out}");
    }
}

#[tokio::test]
async fn registry_rewrite_skips_owned_pods_and_leaves_the_rest_byte_for_byte() {
    let owned = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p","namespace":"ns","ownerReferences":[{"kind":"ReplicaSet","name":"rs","controller":true}]},"spec":{"containers":[{"image":"old.example:5000/a:1"}]}}"#;
    let bare = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"bare","namespace":"ns","ownerReferences":[{"kind":"Node","name":"n","controller":false}]},"spec":{"containers":[{"image":"old.example:5000/a:1"}]}}"#;
    let other_registry = "{ \"apiVersion\" : \"apps/v1\",  \"kind\":\"Deployment\", \"metadata\":{\"name\":\"d\",\"namespace\":\"ns\"},\"spec\":{\"template\":{\"spec\":{\"containers\":[{\"image\":\"old.example:50001/a:1\"}]}}} }";
    let configmap = "{\"apiVersion\":\"v1\",\"kind\":\"ConfigMap\",\"metadata\":{\"name\":\"c\",\"namespace\":\"ns\"},\"data\":{\"big\":\"x\"},  \"n\": 1e400 }";
    let input = format!("{owned}\n{bare}\n{other_registry}\n{configmap}\n");
    let (out, stats) = apply("registry-rewrite", REWRITE, &input).await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "the owned pod is skipped: {out}");
    assert!(lines[0].contains("\"new.example/a:1\""), "{out}");
    assert_eq!(lines[1], other_registry, "an item the action leaves alone must pass byte for byte");
    assert_eq!(lines[2], configmap, "an item the action does not select must pass byte for byte");
    assert_eq!((stats.skipped, stats.modified, stats.unchanged), (1, 1, 2));
}

#[tokio::test]
async fn registry_rewrite_keeps_big_integers_unknown_fields_and_order() {
    let item = r#"{"kind":"Deployment","apiVersion":"apps/v1","metadata":{"name":"d","namespace":"ns","generation":18446744073709551617},"zExtra":{"nested":[1,2.50,-0]},"spec":{"replicas":9007199254740993,"template":{"spec":{"containers":[{"image":"old.example:5000/a:1","futureField":true}]}}},"aLast":123456789012345678901234567890}"#;
    let (out, _) = apply("registry-rewrite", REWRITE, &format!("{item}\n")).await;
    assert_eq!(out.trim_end(), item.replace("old.example:5000/a:1", "new.example/a:1"), "anything but the image changed");
}

#[tokio::test]
async fn additional_items_are_deduplicated_so_cycles_end() {
    let a = r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"a","namespace":"ns","labels":{"test":"links"},"annotations":{"test/links":"ConfigMap/ns/b,ConfigMap/ns/c"}}}"#;
    let unrelated = r#"{"apiVersion":"v1","kind":"Secret","metadata":{"name":"s","namespace":"ns"}}"#;
    let b_again = r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"b","namespace":"ns","labels":{"test":"links"},"annotations":{"test/links":"ConfigMap/ns/a"}}}"#;
    let (out, stats) = apply("item-links", "{}", &format!("{a}\n{unrelated}\n{b_again}\n")).await;
    let names: Vec<String> = out
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    // a, then what a adds (b, c; b links back to a, which is not added again), then s.
    assert_eq!(names, vec!["a", "b", "c", "s"], "{out}");
    assert_eq!(stats.additional, 2);
    assert!(stats.duplicates >= 2, "{stats:?}");
}

/// A hostile action that expands every item into nine padded new ones is
/// stopped by the bound on what the host holds for it (the pending
/// additional items), long before the host's memory or the output budget.
#[tokio::test]
async fn item_amplification_is_bounded_by_the_output_budget() {
    let plugin = plugin("item-flood", "item-action").await;
    let mut session = ItemActionSession::open(engine(), &plugin, Arc::new(NullSink)).await.unwrap();
    let input = (0..3).map(|i| format!(r#"{{"apiVersion":"v1","kind":"ConfigMap","metadata":{{"name":"seed{i}","namespace":"ns"}}}}"#)).collect::<Vec<_>>().join("\n");
    let mut out = Vec::new();
    let err = beside_a_neighbour(items::run(Cursor::new(input.into_bytes()), &mut out, &mut session, "{}")).await.unwrap_err().to_string();
    assert!(err.contains(&format!("pending additional items passed {} bytes", items::MAX_PENDING)), "{err}");
    assert!(out.len() as u64 <= items::OUTPUT_SLACK + 1024, "wrote {} bytes", out.len());
}

/// A filter that reports one key as unclassified many times is refused: the
/// host reports each key at most once.
#[tokio::test]
async fn repeated_unclassified_indexes_are_a_contract_error() {
    let plugin = plugin("keys-repeat", "key-filter").await;
    let session = KeyFilterSession::open(engine(), &plugin, "{}", Arc::new(NullSink)).await.unwrap();
    let mut unclassified = Vec::new();
    let err = beside_a_neighbour(filter::run(
        Cursor::new(b"/registry/a\n/registry/b\n".to_vec()),
        vec![session],
        filter::Sinks { selected: &mut Vec::new(), unclassified: Some(&mut unclassified), progress: &|_| {} },
    ))
    .await
    .unwrap_err();
    assert!(format!("{err:#}").contains("out of order or twice"), "{err:#}");
    assert!(unclassified.len() < 100, "wrote {} bytes of unclassified keys", unclassified.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_json_dumps_are_streamed() {
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let mut kvs = Vec::new();
    for i in 0..10_000 {
        let cluster = if i % 10 == 0 { C } else { "other" };
        kvs.push(serde_json::json!({ "key": b64(&format!("/registry/core/configmaps/{cluster}/ns/cm-{i}")), "create_revision": i, "value": b64("v") }));
    }
    let dump = serde_json::json!({ "header": { "revision": 7 }, "kvs": kvs, "count": 10_000 }).to_string();
    let mut out = Vec::new();
    let stats = filter::run(Cursor::new(dump.into_bytes()), vec![session(&options()).await], filter::Sinks { selected: &mut out, unclassified: None, progress: &|_| {} })
        .await
        .unwrap();
    assert_eq!((stats.keys, stats.selected), (10_000, 1_000));
    let out = String::from_utf8(out).unwrap();
    let first: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(first["key"], format!("/registry/core/configmaps/{C}/ns/cm-0"));
    assert_eq!(first["value"], b64("v"));

    let dump = serde_json::json!({ "header": {}, "kvs": [{ "key": b64(&format!("/registry/core/configmaps/{C}/ns/cm")) }, { "key": b64("/registry/core/configmaps/other/ns/cm") }] }).to_string();
    let mut component = session(&options()).await;
    let prefixes = filter::delete_prefixes(Cursor::new(dump.into_bytes()), &mut component).await.unwrap();
    assert_eq!(prefixes, vec![format!("/registry/core/configmaps/{C}/")]);

    let bad = r#"{"header":{},"kvs":[{"key":"!!not base64!!"}]}"#;
    let err = filter::run(Cursor::new(bad.as_bytes().to_vec()), vec![session(&options()).await], filter::Sinks { selected: &mut Vec::new(), unclassified: None, progress: &|_| {} })
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("entry 1: `key` is not base64"), "{err:#}");
}
