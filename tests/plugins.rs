//! The first-party stage plugins end to end: `wait` across an agent
//! restart, `approval` with refused and repeated approvers, `http-check`
//! (pass, fail, denied URL, results kept and compared), and `files`
//! (quick sync, canary pipeline, rollback to the exact previous files).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use cordon_pipeline::plan::TriggerInfo;
use cordon_store::{DeploymentStatus, StageStatus};
use cordon_tests::{Server, World, deploy, plugin_entry, serve_until_idle, start_agent};

fn trigger() -> TriggerInfo {
    TriggerInfo { commander: "test".into(), ..Default::default() }
}


async fn until(what: &str, mut ready: impl FnMut() -> bool) {
    let started = Instant::now();
    while !ready() {
        assert!(started.elapsed() < Duration::from_secs(30), "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The same end-to-end test runs against WAIT in Rust (`wait`) and its
/// Python twin (`wait-py`, built with componentize-py).
async fn wait_survives_an_agent_restart(guest: &str) {
    let world = World::custom(&[(guest, "executor")], |_| String::new());
    let host = world.host().await;
    let app = world.app("w", "name: w\npipeline:\n  stages:\n    - { name: WAIT, with: { duration: 4 } }\n");
    let d = cordon_pipeline::trigger(&host, &app, trigger()).await.unwrap();
    let mut agent = start_agent(&world);
    until("WAIT to run", || host.store.stages(&d.id).unwrap().first().is_some_and(|s| s.status == StageStatus::Running)).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    agent.0.kill().unwrap();
    agent.0.wait().unwrap();
    let _agent = start_agent(&world);
    until("the deployment to finish", || host.store.deployment(&d.id).unwrap().unwrap().status.is_final()).await;
    let d = host.store.deployment(&d.id).unwrap().unwrap();
    assert_eq!(d.status, DeploymentStatus::Success, "{guest}: {d:?}");
    let took = d.finished_at.unwrap() - d.started_at.unwrap();
    // Starting over would take 2.5 s + 4 s; resuming takes the 4 s plus the restart.
    assert!((4000..6000).contains(&took), "{guest}: the wait took {took} ms");
    let stage = &host.store.stages(&d.id).unwrap()[0];
    assert_eq!(stage.attempts, 2);
    let logs = host.store.logs(&d.id, Some(&stage.id), 0, 100).unwrap();
    assert!(logs.iter().any(|l| l.text.starts_with("resuming a wait")), "{guest}: {logs:?}");
}

/// Bad options fail the deployment before the stage does anything. The Rust
/// WAIT describes its options, so `deploy` refuses them before anything is
/// recorded; the Python twin does not export `options`, so its stage fails
/// reading them.
async fn wait_refuses_bad_options(guest: &str) {
    let world = World::custom(&[(guest, "executor")], |_| String::new());
    let host = world.host().await;
    let state = world.dir.path().join("state");
    for (name, with, expected) in [("w", "{ duration: -1 }", "duration must be a number of seconds from 0 to 2592000"), ("w2", "{ duratoin: 1 }", "unknown field `duratoin`")] {
        let app = world.app(name, &format!("name: {name}\npipeline:\n  stages:\n    - {{ name: WAIT, with: {with} }}\n"));
        let reason = if guest == "wait" {
            let refused = format!("{:#}", cordon_pipeline::trigger(&host, &app, trigger()).await.unwrap_err());
            assert!(host.store.deployments(Some(name), 10).unwrap().is_empty(), "a refused deployment was recorded");
            refused
        } else {
            let d = deploy(&host, &state, &app, trigger()).await;
            assert_eq!(d.status, DeploymentStatus::Failure);
            d.reason
        };
        assert!(reason.contains(expected), "{guest}: {reason}");
    }
    let app = world.app("w3", "name: w3\npipeline:\n  stages:\n    - { name: WAIT, with: { duration: 0.2 } }\n");
    let d = deploy(&host, &state, &app, trigger()).await;
    assert_eq!(d.status, DeploymentStatus::Success, "{guest}: {d:?}");
}

#[tokio::test]
async fn wait_keeps_its_start_time_across_an_agent_restart() {
    wait_survives_an_agent_restart("wait").await;
}

#[tokio::test]
async fn wait_in_python_keeps_its_start_time_across_an_agent_restart() {
    wait_survives_an_agent_restart("wait-py").await;
}

#[tokio::test]
async fn wait_checks_its_options() {
    wait_refuses_bad_options("wait").await;
}

#[tokio::test]
async fn wait_in_python_checks_its_options() {
    wait_refuses_bad_options("wait-py").await;
}

/// `cordon approve` in another process, as an operator runs it.
async fn approve(world: &World, deployment: &str, who: &str) -> std::process::Output {
    let mut command = world.command(&["approve", deployment, "gate", "--as", who]);
    tokio::task::spawn_blocking(move || command.output().unwrap()).await.unwrap()
}

#[tokio::test]
async fn approval_needs_distinct_listed_approvers_and_answers_each() {
    let world = World::with_plugins(&plugin_entry("approval", "executor", ""));
    let host = world.host().await;
    let state = world.dir.path().join("state");
    let app = world.app("ap", "name: ap\npipeline:\n  stages:\n    - { id: gate, name: WAIT_APPROVAL, with: { approvers: [alice, bob], minApprovals: 2 } }\n");
    let d = cordon_pipeline::trigger(&host, &app, trigger()).await.unwrap();
    let serving = tokio::spawn({
        let host = host.clone();
        async move { serve_until_idle(&host, &state).await }
    });
    until("the gate to run", || host.store.stages(&d.id).unwrap().first().is_some_and(|s| s.status == StageStatus::Running)).await;
    // A refused approval fails the command with the plugin's reason.
    let out = approve(&world, &d.id, "mallory").await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("refused the approval by mallory: mallory is not one of the approvers (alice, bob)"), "{stderr}");
    for _ in 0..2 {
        let out = approve(&world, &d.id, "alice").await;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let accepted = format!("approve sent to stage gate of {} as alice: accepted", d.id);
        assert!(String::from_utf8_lossy(&out.stdout).contains(&accepted), "{out:?}");
    }
    assert_eq!(host.store.stages(&d.id).unwrap()[0].status, StageStatus::Running, "one distinct approver is not enough");
    let out = approve(&world, &d.id, "bob").await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("accepted"), "{out:?}");
    serving.await.unwrap();
    let d = host.store.deployment(&d.id).unwrap().unwrap();
    assert_eq!(d.status, DeploymentStatus::Success);
    let gate = &host.store.stages(&d.id).unwrap()[0];
    assert_eq!(gate.message, "approved by alice, bob");
    assert_eq!(host.store.metadata_get(&d.id, "gate", "approved-by").unwrap().as_deref(), Some("alice,bob"));
    let logs: Vec<String> = host.store.logs(&d.id, Some("gate"), 0, 100).unwrap().into_iter().map(|l| l.text).collect();
    assert!(logs.iter().any(|l| l.contains("approval refused: mallory is not one of the approvers")), "{logs:?}");
}

#[tokio::test]
async fn http_check_passes_fails_and_stays_inside_its_grant() {
    let server = Server::ok("<h1>Hello from version 1</h1>").await;
    let forbidden = Server::ok("secret").await;
    let grant = format!("    grants: {{ network: {{ allow: [\"http://127.0.0.1:{}\"] }} }}\n", server.port);
    let world = World::with_plugins(&plugin_entry("http-check", "executor", &grant));
    let host = world.host().await;
    let state = world.dir.path().join("state");
    let url = format!("http://127.0.0.1:{}/index.html", server.port);
    let check = |name: &str, with: String| format!("name: {name}\npipeline:\n  stages:\n    - {{ name: HTTP_CHECK, with: {with} }}\n");

    let app = world.app("ok", &check("ok", format!("{{ url: \"{url}\", bodyContains: \"version 1\", compareWithLast: true }}")));
    let d = deploy(&host, &state, &app, trigger()).await;
    assert_eq!(d.status, DeploymentStatus::Success, "{d:?}");
    let kept = host.store.blob_get("ok", "http-check", &format!("last-result:{url}")).unwrap().expect("the result is kept");
    let kept: serde_json::Value = serde_json::from_slice(&kept).unwrap();
    assert_eq!((kept["ok"].as_bool(), kept["passes"].as_u64()), (Some(true), Some(1)));
    // The next deployment compares with it.
    let d = deploy(&host, &state, &app, trigger()).await;
    assert_eq!(d.status, DeploymentStatus::Success);
    let logs = host.store.logs(&d.id, None, 0, 100).unwrap();
    assert!(logs.iter().any(|l| l.text.starts_with("last result: 1 passes")), "{logs:?}");

    let app = world.app("status", &check("status", format!("{{ url: \"{url}\", expectedStatus: 201, tries: 2, interval: 0.1 }}")));
    let d = deploy(&host, &state, &app, trigger()).await;
    assert_eq!(d.status, DeploymentStatus::Failure);
    assert!(d.reason.contains("0 of 2 checks") && d.reason.contains("status 200 (expected 201)"), "{}", d.reason);

    let app = world.app("body", &check("body", format!("{{ url: \"{url}\", bodyContains: \"version 2\", tries: 2, successThreshold: 2, interval: 0.1 }}")));
    let d = deploy(&host, &state, &app, trigger()).await;
    assert!(d.reason.contains("does not contain \\\"version 2\\\"") || d.reason.contains("does not contain \"version 2\""), "{}", d.reason);

    let denied = format!("http://127.0.0.1:{}/", forbidden.port);
    let app = world.app("denied", &check("denied", format!("{{ url: \"{denied}\", tries: 1 }}")));
    let d = deploy(&host, &state, &app, trigger()).await;
    assert_eq!(d.status, DeploymentStatus::Failure);
    assert!(d.reason.contains(&format!("sandbox denied HTTP request to http://127.0.0.1:{}", forbidden.port)), "{}", d.reason);
    assert_eq!(forbidden.hits(), 0);
}

/// Every file under `dir` (following the `current` symlink) and its bytes.
fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(p.strip_prefix(root).unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    if dir.exists() {
        walk(dir, dir, &mut out);
    }
    out
}

/// A world with the `files` plugin and its mounts: `www` and `canary`
/// read-write, `archive` read-only.
fn files_world() -> World {
    World::with(|dir| {
        let (www, canary, archive) = (dir.join("www"), dir.join("canary"), dir.join("archive"));
        for dir in [&www, &canary, &archive] {
            std::fs::create_dir_all(dir).unwrap();
        }
        let grants = format!(
            "    grants:\n      mounts:\n        - {{ host: {}, guest: /www, access: read-write }}\n        - {{ host: {}, guest: /canary, access: read-write }}\n        - {{ host: {}, guest: /archive, access: read-only }}\n",
            www.display(),
            canary.display(),
            archive.display()
        );
        plugin_entry("files", "deployment", &grants)
    })
}

fn mount(world: &World, which: &str) -> std::path::PathBuf {
    world.dir.path().join(which)
}

fn write_site(app: &Path, version: &str, files: &[(&str, &str)]) {
    for entry in std::fs::read_dir(app).unwrap() {
        let p = entry.unwrap().path();
        if p.file_name().unwrap() != "app.cordon.yaml" {
            if p.is_dir() { std::fs::remove_dir_all(&p).unwrap() } else { std::fs::remove_file(&p).unwrap() }
        }
    }
    std::fs::write(app.join("VERSION"), version).unwrap();
    for (name, content) in files {
        let path = app.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }
}

#[tokio::test]
async fn files_quick_sync_makes_the_target_equal_the_source() {
    let world = files_world();
    let host = world.host().await;
    let state = world.dir.path().join("state");
    let app = world.app(
        "site",
        "name: site\npipeline:\n  stages:\n    - name: FILES_CANARY_ROLLOUT\n    - name: FILES_PRIMARY_ROLLOUT\n    - name: FILES_CANARY_CLEAN\nplugins:\n  files: { target: /www, canary: /canary }\n",
    );
    write_site(&app, "1.0.0", &[("index.html", "v1"), ("old.css", "old"), ("img/logo.svg", "<svg/>")]);
    let d = deploy(&host, &state, &app, trigger()).await;
    assert_eq!(d.status, DeploymentStatus::Success, "{d:?}");
    let plan: serde_json::Value = serde_json::from_str(&d.plan).unwrap();
    assert!(plan["summary"].as_str().unwrap().contains("first deployment"), "{plan}");
    let www = mount(&world, "www").join("current");
    let served = tree(&www);
    assert_eq!(served.keys().cloned().collect::<Vec<_>>(), vec!["VERSION", "img/logo.svg", "index.html", "old.css"], "app.cordon.yaml is not deployed");

    // Same VERSION: the planner votes quick sync; a removed file disappears.
    write_site(&app, "1.0.0", &[("index.html", "v1.1"), ("img/logo.svg", "<svg/>")]);
    let d = deploy(&host, &state, &app, trigger()).await;
    assert_eq!(d.status, DeploymentStatus::Success);
    let plan: serde_json::Value = serde_json::from_str(&d.plan).unwrap();
    assert_eq!(plan["strategy"], "quick-sync");
    assert!(plan["summary"].as_str().unwrap().contains("only content changed"), "{plan}");
    let served = tree(&www);
    assert_eq!(served.get("index.html").map(Vec::as_slice), Some(&b"v1.1"[..]));
    assert!(!served.contains_key("old.css"), "a file the source no longer has is still served");
    let releases = std::fs::read_dir(mount(&world, "www").join("releases")).unwrap().count();
    assert!(releases <= 2, "old releases are pruned ({releases} left)");

    // A new VERSION: the planner votes for the canary pipeline.
    write_site(&app, "2.0.0", &[("index.html", "v2")]);
    let d = deploy(&host, &state, &app, trigger()).await;
    assert_eq!(d.status, DeploymentStatus::Success);
    let plan: serde_json::Value = serde_json::from_str(&d.plan).unwrap();
    assert_eq!(plan["strategy"], "pipeline-sync");
    assert!(plan["summary"].as_str().unwrap().contains("VERSION changed from 1.0.0 to 2.0.0"), "{plan}");
    assert_eq!(tree(&www).get("index.html").map(Vec::as_slice), Some(&b"v2"[..]));
}

#[tokio::test]
async fn files_pipeline_rolls_back_to_the_exact_previous_files() {
    let world = files_world();
    let host = world.host().await;
    let state = world.dir.path().join("state");
    let yaml = "name: site\nplanner: { alwaysUsePipeline: true }\npipeline:\n  stages:\n    - name: FILES_CANARY_ROLLOUT\n    - name: FILES_PRIMARY_ROLLOUT\n    - { name: STEP, with: { status: STATUS } }\n    - name: FILES_CANARY_CLEAN\nplugins:\n  files: { target: /www, canary: /canary }\n";
    let app = world.app("site", &yaml.replace("STATUS", "success"));
    write_site(&app, "1.0.0", &[("index.html", "v1"), ("a/b.txt", "b1"), ("gone-in-v2.txt", "x")]);
    let d = deploy(&host, &state, &app, trigger()).await;
    assert_eq!(d.status, DeploymentStatus::Success, "{d:?}");
    let (www, canary) = (mount(&world, "www").join("current"), mount(&world, "canary").join("current"));
    let v1 = tree(&www);
    assert!(!canary.exists(), "the canary is cleaned");

    // Version 2 fails after it reached the primary: the rollback restores v1 exactly.
    std::fs::write(app.join("app.cordon.yaml"), yaml.replace("STATUS", "failure")).unwrap();
    write_site(&app, "2.0.0", &[("index.html", "v2"), ("a/b.txt", "b2"), ("new-in-v2.txt", "y")]);
    let d = deploy(&host, &state, &app, trigger()).await;
    assert_eq!(d.status, DeploymentStatus::Failure, "{d:?}");
    let stages = host.store.stages(&d.id).unwrap();
    let rollback = stages.iter().find(|s| s.rollback).unwrap();
    assert_eq!((rollback.name.as_str(), rollback.status), ("FILES_ROLLBACK", StageStatus::Success));
    assert_eq!(tree(&www), v1, "the rollback did not restore the exact previous files");
    assert!(!canary.exists(), "the rollback empties the canary");
    let versions: serde_json::Value = serde_json::from_str(&d.plan).unwrap();
    assert_eq!(versions["versions"][0]["version"], "2.0.0");
}

/// Every file of the tree `current` leads to (resolved once, as a web
/// server resolves it per request): all `count` of them, all with the same
/// content — or why not.
fn whole(current: &Path, count: usize) -> Result<(), String> {
    let Ok(tree) = std::fs::canonicalize(current) else { return Ok(()) }; // nothing served yet
    let dir = std::fs::read_dir(&tree).map_err(|e| format!("{}: {e}", tree.display()))?;
    let names: Vec<_> = dir.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>().map_err(|e| e.to_string())?;
    let mut contents = std::collections::BTreeSet::new();
    for path in &names {
        contents.insert(std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?);
    }
    if names.len() != count || contents.len() != 1 {
        return Err(format!("{} files, {} distinct contents", names.len(), contents.len()));
    }
    Ok(())
}

#[tokio::test]
async fn files_readers_never_see_a_partial_tree_while_the_agent_is_killed_at_the_flip() {
    const FILES: usize = 300;
    let world = files_world();
    let host = world.host().await;
    let app = world.app("site", "name: site\nplugins:\n  files: { target: /www, exclude: [app.cordon.yaml, VERSION] }\n");
    let current = mount(&world, "www").join("current");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = std::thread::spawn({
        let (current, stop) = (current.clone(), stop.clone());
        move || {
            let mut reads = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Err(why) = whole(&current, FILES) {
                    return Err(format!("a reader saw a partial tree after {reads} whole reads: {why}"));
                }
                reads += 1;
            }
            Ok(reads)
        }
    });
    let mut reruns = 0;
    for round in 1..=4 {
        let content = format!("round {round}");
        let files: Vec<(String, &str)> = (0..FILES).map(|i| (format!("f{i:03}.txt"), content.as_str())).collect();
        write_site(&app, "1", &files.iter().map(|(n, c)| (n.as_str(), *c)).collect::<Vec<_>>());
        let out = world.cordon(&["deploy", app.to_str().unwrap(), "--detach"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let id = format!("site-{round}");
        let before = std::fs::read_link(&current).ok();
        let mut agent = start_agent(&world);
        // Kill the agent the moment `current` flips: before it records the result.
        let started = Instant::now();
        while std::fs::read_link(&current).ok() == before {
            assert!(started.elapsed() < Duration::from_secs(30), "round {round}: `current` never flipped");
            std::thread::sleep(Duration::from_micros(200));
        }
        agent.0.kill().unwrap();
        agent.0.wait().unwrap();
        let _agent = start_agent(&world);
        until(&format!("deployment {id}"), || host.store.deployment(&id).unwrap().unwrap().status.is_final()).await;
        let d = host.store.deployment(&id).unwrap().unwrap();
        assert_eq!(d.status, DeploymentStatus::Success, "{d:?}");
        let stage = &host.store.stages(&id).unwrap()[0];
        if stage.attempts > 1 {
            reruns += 1;
            let logs = host.store.logs(&id, Some(&stage.id), 0, usize::MAX).unwrap();
            let text: String = logs.iter().map(|l| l.text.clone()).collect();
            assert!(text.contains("already serves"), "the re-run did not find its release current: {text}");
        }
        assert_eq!(std::fs::read(current.join("f000.txt")).unwrap(), content.as_bytes());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let reads = reader.join().unwrap().unwrap();
    eprintln!("{reruns} of 4 stages ran again after the flip; {reads} whole reads");
    assert!(reruns > 0, "no kill landed between the flip and the recorded result: the test proved nothing");
}

/// Issue #18 items 1 and 4: options and settings are checked by the plugins
/// themselves when a deployment is planned — `cordon plan` and `cordon
/// deploy` refuse a misspelt or mistyped option, a value out of range, a
/// host path where the plugin takes a guest path, or a read-only mount
/// where it writes, naming the file, the
/// stage and the fix, before any stage runs; `plugin inspect` lists them.
#[tokio::test]
async fn options_and_settings_are_checked_when_planning_before_anything_runs() {
    let world = files_world();
    let www = mount(&world, "www");
    let path = |p: &Path| p.to_str().unwrap().to_string();
    let stages = |second: &str| format!("name: site\npipeline:\n  stages:\n    - {{ id: first, name: WAIT, with: {{ duration: 0 }} }}\n    - {{ id: second, name: WAIT, with: {second} }}\n");
    let cases = [
        (stages("{ durtion: 5 }"), "stage `second` (WAIT of plugin `wait`) has invalid options: unknown field `durtion`, expected `duration`"),
        (stages("{ duration: five }"), "invalid type: string \"five\", expected f64"),
        (stages("{ duration: 1e9 }"), "duration must be a number of seconds from 0 to 2592000"),
        (format!("name: site\nplugins:\n  files: {{ target: {} }}\n", www.display()), "plugins.files: invalid settings for plugin `files`: `target` must be the guest path of a mount"),
        (format!("name: site\nplugins:\n  files: {{ target: {} }}\n", www.display()), "write `target: /www`"),
        ("name: site\nplugins:\n  files: { target: /www, canary: /srv/canary }\n".to_string(), "`canary` must be the guest path of a mount, but \"/srv/canary\" is not granted"),
        ("name: site\nplugins:\n  files: { target: /archive }\n".to_string(), "\"/archive\" is granted read-only: set `access: read-write` on the mount"),
        ("name: site\nplugins:\n  files: { target: /www, exclud: [] }\n".to_string(), "unknown field `exclud`"),
        ("name: site\nplugins:\n  files: {}\n".to_string(), "missing field `target`"),
    ];
    for (yaml, expected) in &cases {
        let app = world.app("site", yaml);
        let file = path(&app.join("app.cordon.yaml"));
        for command in ["plan", "deploy"] {
            let out = world.cordon(&[command, &path(&app)]);
            let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            assert_eq!(out.status.code(), Some(2), "{command} {yaml}: {text}");
            assert!(text.contains(&file) && text.contains(expected) && text.contains("cordon plugin inspect"), "{command}: expected {expected:?}: {text}");
        }
    }
    // Nothing was recorded and no stage ran; the fixed configs plan.
    let status = world.cordon(&["status", "--json"]);
    assert!(status.status.success() && !String::from_utf8_lossy(&status.stdout).contains("site-"), "{status:?}");
    for yaml in [stages("{ duration: 0.1 }"), "name: site\nplugins:\n  files: { target: /www, canary: /canary }\n".to_string()] {
        let app = world.app("site", &yaml);
        let out = world.cordon(&["plan", &path(&app)]);
        assert!(out.status.success(), "{yaml}: {out:?}");
    }
    // A planner's stages are checked too: the quick sync of `files` has
    // FILES_SYNC, whose options it makes itself and which take none.
    let host = world.host().await;
    let app = world.app("site", "name: site\nplugins:\n  files: { target: /www }\n");
    let d = deploy(&host, &world.dir.path().join("state"), &app, trigger()).await;
    assert_eq!(d.status, DeploymentStatus::Success, "{d:?}");
    // The options are documented by the plugins themselves.
    for (guest, expected) in [("wait", "duration"), ("files", "target"), ("http-check", "successThreshold"), ("approval", "minApprovals")] {
        let out = world.cordon(&["plugin", "inspect", &path(&cordon_tests::guest(guest))]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let line = text.lines().find(|l| l.trim_start().starts_with(expected)).unwrap_or_else(|| panic!("{guest}: no {expected}: {text}"));
        assert!(line.contains(" — "), "{guest}: {expected} is not described: {line}");
    }
    let out = world.cordon(&["plugin", "inspect", &path(&cordon_tests::guest("wait"))]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("duration               number, double, ≥ 0.0, ≤ 2592000.0, default 10.0 — How long to wait, in seconds"), "{out:?}");
    let out = world.cordon(&["plugin", "inspect", &path(&cordon_tests::guest("noop"))]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("options:   not described"), "{out:?}");
}

/// Issue #18 item 7: `stage run --app DIR` tries a stage that reads the
/// application's settings (FILES_*) alone: the stage gets `plugins.files`
/// of DIR's app config, and DIR is its source. Without it the stage has
/// no settings and says so.
#[tokio::test]
async fn stage_run_takes_an_applications_settings() {
    let world = files_world();
    let app = world.app("site", "name: site\nplugins:\n  files: { target: /www }\n");
    write_site(&app, "1.0.0", &[("index.html", "<h1>alone</h1>")]);
    let app = app.to_str().unwrap().to_string();
    let alone = world.cordon(&["stage", "run", "--plugin", "files", "--stage", "FILES_SYNC", "--source", &app]);
    let said = String::from_utf8_lossy(&alone.stdout).into_owned();
    assert_eq!(alone.status.code(), Some(1), "{said}");
    assert!(said.contains("missing field `target`"), "{said}");
    let run = world.cordon(&["stage", "run", "--plugin", "files", "--stage", "FILES_SYNC", "--app", &app]);
    let said = String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(run.status.success(), "{said}{}", String::from_utf8_lossy(&run.stderr));
    assert_eq!(std::fs::read_to_string(mount(&world, "www").join("current/index.html")).unwrap(), "<h1>alone</h1>");
}
