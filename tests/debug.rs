//! Breakpoints and upload: each breakpoint kind with continue,
//! fail-continue and run; the deployment timeout paused while paused;
//! failing closed; every tar escape refused with the workspace unchanged;
//! ignore rules; and the README's inner loop through the binary.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cordon_pipeline::debug::Breakpoints;
use cordon_pipeline::debug::upload::{self, Limits, Mode};
use cordon_pipeline::Host;
use cordon_pipeline::plan::TriggerInfo;
use cordon_store::{CommandKind, CommandRecord, DeploymentRecord, DeploymentStatus, StageStatus};
use cordon_tests::{World, plugin_entry, serve_until_idle, start_agent};

fn breaking(bp: Breakpoints) -> TriggerInfo {
    TriggerInfo { commander: "dev".into(), breakpoints: bp, ..Default::default() }
}

fn send(host: &Host, deployment: &str, kind: CommandKind) {
    host.store
        .add_command(&CommandRecord {
            id: format!("{deployment}/{kind}/{}", cordon_store::now_ms()),
            deployment: deployment.into(),
            stage: String::new(),
            kind,
            commander: "dev".into(),
            created_at: 0,
            answer: None,
        })
        .unwrap();
}

async fn until(what: &str, mut ready: impl FnMut() -> bool) {
    let started = Instant::now();
    while !ready() {
        assert!(started.elapsed() < Duration::from_secs(30), "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn status_of(host: &Host, d: &str, stage: &str) -> StageStatus {
    host.store.stages(d).unwrap().into_iter().find(|s| s.id == stage).map(|s| s.status).unwrap_or(StageStatus::NotStarted)
}

/// Triggers `yaml` with `bp`, runs it in the background, and returns the
/// deployment and the serving task.
async fn start(world: &World, host: &Arc<Host>, name: &str, yaml: &str, bp: Breakpoints) -> (String, tokio::task::JoinHandle<()>) {
    let app = world.app(name, yaml);
    let d = cordon_pipeline::trigger(host, &app, breaking(bp)).await.unwrap();
    let state = world.dir.path().join("state");
    let host = host.clone();
    (d.id, tokio::spawn(async move { serve_until_idle(&host, &state).await }))
}

fn finished(host: &Host, d: &str) -> DeploymentRecord {
    host.store.deployment(d).unwrap().unwrap()
}

const TWO: &str = "name: NAME\npipeline:\n  stages:\n    - { id: one, name: STEP, with: { marker: /marks/NAME-one } }\n    - { id: two, name: STEP, with: { marker: /marks/NAME-two, status: STATUS } }\n";

fn two(name: &str, status: &str) -> String {
    TWO.replace("NAME", name).replace("STATUS", status)
}

#[tokio::test]
async fn break_before_then_continue_or_fail_continue() {
    let world = World::new();
    let host = world.host().await;
    let bp = Breakpoints { break_before: vec!["two".into()], ..Default::default() };
    let (d, serving) = start(&world, &host, "bb", &two("bb", "success"), bp.clone()).await;
    until("the breakpoint", || status_of(&host, &d, "two") == StageStatus::Paused).await;
    assert!(world.marks("bb-two").is_empty(), "a stage paused before it runs must not have run");
    assert!(finished(&host, &d).reason.contains("stage two is paused"));
    send(&host, &d, CommandKind::DebugContinue);
    serving.await.unwrap();
    assert_eq!(finished(&host, &d).status, DeploymentStatus::Success);
    assert_eq!(world.marks("bb-two").len(), 1);

    let (d, serving) = start(&world, &host, "bf", &two("bf", "success"), bp).await;
    until("the breakpoint", || status_of(&host, &d, "two") == StageStatus::Paused).await;
    send(&host, &d, CommandKind::DebugFailContinue);
    serving.await.unwrap();
    let record = finished(&host, &d);
    assert_eq!(record.status, DeploymentStatus::Failure);
    assert!(record.reason.contains(&format!("failed at its breakpoint by {}, without running", world.recorded_as("dev"))), "{}", record.reason);
    assert!(world.marks("bf-two").is_empty());
}

#[tokio::test]
async fn break_after_and_on_failure() {
    let world = World::new();
    let host = world.host().await;
    let (d, serving) = start(&world, &host, "ba", &two("ba", "success"), Breakpoints { break_after: vec!["one".into()], ..Default::default() }).await;
    until("the breakpoint", || status_of(&host, &d, "one") == StageStatus::Paused).await;
    assert_eq!(world.marks("ba-one").len(), 1, "the stage ran before pausing");
    assert_eq!(status_of(&host, &d, "two"), StageStatus::NotStarted, "dependents wait while paused");
    send(&host, &d, CommandKind::DebugFailContinue);
    serving.await.unwrap();
    assert_eq!(finished(&host, &d).status, DeploymentStatus::Failure);

    let (d, serving) = start(&world, &host, "bof", &two("bof", "failure"), Breakpoints { break_on_failure: true, ..Default::default() }).await;
    until("the breakpoint", || status_of(&host, &d, "two") == StageStatus::Paused).await;
    send(&host, &d, CommandKind::DebugContinue);
    serving.await.unwrap();
    let record = finished(&host, &d);
    assert_eq!(record.status, DeploymentStatus::Success, "continue after a failure resumes as success");
    let two = host.store.stages(&d).unwrap().into_iter().find(|s| s.id == "two").unwrap();
    assert!(two.message.contains(&format!("failing on purpose (failed, then continued as a success by {})", world.recorded_as("dev"))), "{}", two.message);
}

#[tokio::test]
async fn breakpoints_from_the_app_config_and_the_paused_time_does_not_count() {
    let world = World::new();
    let host = world.host().await;
    let yaml = "name: t\ntimeout: 1500ms\ndebug: { breakBefore: [two] }\npipeline:\n  stages:\n    - { id: one, name: STEP }\n    - { id: two, name: STEP }\n";
    let (d, serving) = start(&world, &host, "t", yaml, Breakpoints::default()).await;
    until("the breakpoint", || status_of(&host, &d, "two") == StageStatus::Paused).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    send(&host, &d, CommandKind::DebugContinue);
    serving.await.unwrap();
    let record = finished(&host, &d);
    assert_eq!(record.status, DeploymentStatus::Success, "the paused time counted against the timeout: {}", record.reason);
}

#[tokio::test]
async fn cancel_ends_a_paused_stage() {
    let world = World::new();
    let host = world.host().await;
    let (d, serving) = start(&world, &host, "cp", &two("cp", "success"), Breakpoints { break_before: vec!["two".into()], ..Default::default() }).await;
    until("the breakpoint", || status_of(&host, &d, "two") == StageStatus::Paused).await;
    send(&host, &d, CommandKind::Cancel);
    serving.await.unwrap();
    assert_eq!(finished(&host, &d).status, DeploymentStatus::Cancelled);
    assert_eq!(status_of(&host, &d, "two"), StageStatus::Cancelled);
}

#[tokio::test]
async fn an_unreadable_pause_record_fails_closed() {
    let world = World::new();
    let host = world.host().await;
    let (d, serving) = start(&world, &host, "fc", &two("fc", "success"), Breakpoints { break_after: vec!["one".into()], ..Default::default() }).await;
    until("the breakpoint", || status_of(&host, &d, "one") == StageStatus::Paused).await;
    host.store.metadata_put(&host.store.lease(&d).unwrap().unwrap().0, "#cordon", "pause:one", "{not json").unwrap();
    send(&host, &d, CommandKind::DebugContinue);
    serving.await.unwrap();
    let record = finished(&host, &d);
    assert_eq!(record.status, DeploymentStatus::Failure);
    assert!(record.reason.contains("failing closed: the pause record is unreadable"), "{}", record.reason);
}

#[tokio::test]
async fn a_paused_stage_stays_paused_across_an_agent_restart() {
    let world = World::new();
    let host = world.host().await;
    let (d, serving) = start(&world, &host, "rs", &two("rs", "success"), Breakpoints { break_before: vec!["two".into()], ..Default::default() }).await;
    until("the breakpoint", || status_of(&host, &d, "two") == StageStatus::Paused).await;
    serving.abort();
    let _ = serving.await;
    let state = world.dir.path().join("state");
    let serving = tokio::spawn({
        let host = host.clone();
        async move { serve_until_idle(&host, &state).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(status_of(&host, &d, "two"), StageStatus::Paused);
    send(&host, &d, CommandKind::DebugContinue);
    serving.await.unwrap();
    assert_eq!(finished(&host, &d).status, DeploymentStatus::Success);
    assert_eq!(world.marks("rs-two").len(), 1);
}

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[tokio::test]
async fn debug_run_shows_everything_and_leaves_the_stage_paused() {
    let world = World::new();
    let host = world.host().await;
    let (d, serving) = start(&world, &host, "dr", &two("dr", "success"), Breakpoints { break_before: vec!["two".into()], ..Default::default() }).await;
    until("the breakpoint", || status_of(&host, &d, "two") == StageStatus::Paused).await;
    let out = world.cordon(&["debug", "run", &d]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    for part in ["plugin:   step (world executor", "options:  {\"marker\":\"/marks/dr-two\"", "/source", "read-only", "/scratch", "/marks", "secrets:  token", "not recorded; the stage stays paused"] {
        assert!(t.contains(part), "{part:?} missing from:\n{t}");
    }
    assert_eq!(world.marks("dr-two").len(), 1, "debug run executes the stage once");
    assert_eq!(status_of(&host, &d, "two"), StageStatus::Paused);
    let out = world.cordon(&["debug", "continue", &d]);
    assert!(out.status.success(), "{}", text(&out));
    serving.await.unwrap();
    assert_eq!(world.marks("dr-two").len(), 2);
    let out = world.cordon(&["debug", "continue", &d]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("has no paused stage"), "{}", text(&out));
}

#[tokio::test]
async fn breakpoints_must_name_a_stage() {
    let world = World::new();
    let host = world.host().await;
    let app = world.app("bad", "name: bad\npipeline:\n  stages:\n    - { id: one, name: STEP }\n");
    let err = cordon_pipeline::trigger(&host, &app, breaking(Breakpoints { break_before: vec!["nope".into()], ..Default::default() })).await.unwrap_err();
    assert!(format!("{err:#}").contains("breakpoint `nope` (--break) names no stage of the pipeline (stages: one)"), "{err:#}");
}

/// A quick sync leaves the configured pipeline out: `plan` and the
/// follower of `deploy` say which stages and why, and a breakpoint on one
/// of them fails the deployment before any stage runs, naming the
/// strategy, instead of never pausing.
#[tokio::test]
async fn a_quick_sync_says_what_it_leaves_out_and_refuses_breakpoints_there() {
    let world = World::new();
    let host = world.host().await;
    let app = world.app("qs", "name: qs\npipeline:\n  stages:\n    - { id: canary, name: TD_ROLLOUT }\nplugins:\n  test-deploy: { vote: quick }\n");
    let dir = app.to_str().unwrap().to_string();
    let out = world.cordon(&["plan", &dir]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(said.contains("strategy:    quick-sync") && said.contains("leaves out the configured stage(s) canary (deploy with --sync pipeline to run them)"), "{said}");

    let _agent = start_agent(&world);
    let out = world.cordon(&["deploy", &dir]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{said}{}", String::from_utf8_lossy(&out.stderr));
    assert!(said.contains("strategy: quick-sync (") && said.contains("leaves out the configured stage(s) canary"), "{said}");

    let out = world.cordon(&["deploy", &dir, "--break-before", "canary"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{said}{}", String::from_utf8_lossy(&out.stderr));
    assert!(said.contains("breakpoint `canary` (--break) names no stage this deployment runs: the strategy is quick-sync"), "{said}");
    let failed = host.store.deployments(Some("qs"), 1).unwrap().remove(0);
    assert_eq!(failed.status, DeploymentStatus::Failure);
    assert!(host.store.stages(&failed.id).unwrap().is_empty(), "no stage may run");
    // A rollback stage in the plan is no place for a breakpoint either: it never pauses.
    let out = world.cordon(&["plan", &dir, "--break-before", "TD_ROLLBACK"]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stderr).contains("breakpoint `TD_ROLLBACK` (--break) names no stage this deployment runs"), "{}", String::from_utf8_lossy(&out.stderr));
}

// ---- upload ----

/// Every file, directory and link under `dir`, with contents or targets.
fn snapshot(dir: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.file_type().is_symlink() {
                out.insert(rel, format!("-> {}", std::fs::read_link(&p).unwrap().display()));
            } else if meta.is_dir() {
                out.insert(rel.clone(), "dir".into());
                walk(root, &p, out);
            } else {
                out.insert(rel, String::from_utf8_lossy(&std::fs::read(&p).unwrap()).into_owned());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// A workspace inside a snapshots directory, like a deployment's source.
fn workspace() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path().join("site-1");
    std::fs::create_dir_all(ws.join("css")).unwrap();
    std::fs::write(ws.join("index.html"), "original").unwrap();
    std::fs::write(ws.join("css/site.css"), "body{}").unwrap();
    (dir, ws)
}

/// A tar entry written with raw header bytes, so that paths the tar crate
/// would refuse to build (`..`, absolute) can be crafted.
fn raw(builder: &mut tar::Builder<Vec<u8>>, path: &str, kind: tar::EntryType, link: Option<&str>, data: &[u8]) {
    let mut header = tar::Header::new_old();
    {
        let old = header.as_old_mut();
        old.name[..path.len()].copy_from_slice(path.as_bytes());
        if let Some(link) = link {
            old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
    }
    header.set_entry_type(kind);
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    builder.append(&header, data).unwrap();
}

/// A PAX extended-header record `key=value`, with its length prefix.
fn pax(key: &str, value: &str) -> Vec<u8> {
    let body = format!(" {key}={value}\n");
    let mut len = body.len() + 1;
    while (len.to_string().len() + body.len()) != len {
        len += 1;
    }
    format!("{len}{body}").into_bytes()
}

/// A ustar archive of a PAX extended header with `record`, then an empty
/// regular file `name` it applies to.
fn with_pax(record: Vec<u8>, name: &str) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, kind, data) in [("pax", tar::EntryType::XHeader, record.as_slice()), (name, tar::EntryType::Regular, b"".as_slice())] {
        let mut header = tar::Header::new_ustar();
        header.set_path(path).unwrap();
        header.set_entry_type(kind);
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append(&header, data).unwrap();
    }
    builder.into_inner().unwrap()
}

fn archive(entries: &[(&str, tar::EntryType, Option<&str>, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, kind, link, data) in entries {
        raw(&mut builder, path, *kind, *link, data);
    }
    builder.into_inner().unwrap()
}

/// Extracts `archive` into `workspace/to` and swaps it in.
fn extract(archive: &[u8], workspace: &Path, to: &Path, limits: &Limits) -> anyhow::Result<upload::Summary> {
    upload::prepare(archive, workspace, to, Mode::Merge, limits)?.commit()
}

#[test]
fn crafted_archives_are_refused_and_the_workspace_is_unchanged() {
    use tar::EntryType::*;
    let ok: &[u8] = b"fine";
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("dot-dot", archive(&[("good.txt", Regular, None, ok), ("../escaped.txt", Regular, None, b"x")]), "`..` is refused"),
        ("nested dot-dot", archive(&[("a/../../escaped.txt", Regular, None, b"x")]), "`..` is refused"),
        ("absolute", archive(&[("/tmp/escaped.txt", Regular, None, b"x")]), "absolute paths are refused"),
        ("absolute symlink", archive(&[("link", Symlink, Some("/etc"), b"")]), "symlink to the absolute path /etc is refused"),
        ("relative symlink outside", archive(&[("link", Symlink, Some("../../outside"), b"")]), "leads outside the workspace"),
        ("symlink chain", archive(&[("a", Symlink, Some("b"), b""), ("b", Symlink, Some("c/../.."), b""), ("c", Directory, None, b"")]), "leads outside the workspace"),
        ("write through an escaping link", archive(&[("out", Symlink, Some(".."), b""), ("out/escaped.txt", Regular, None, b"x")]), "archive entry out"),
        ("hard link", archive(&[("good.txt", Regular, None, ok), ("hard", Link, Some("good.txt"), b"")]), "hard links are refused"),
        ("device", archive(&[("dev", Char, None, b"")]), "device files and pipes are refused"),
        ("fifo", archive(&[("pipe", Fifo, None, b"")]), "device files and pipes are refused"),
        ("PAX size past the limit", with_pax(pax("size", "3221225472"), "big.bin"), "more than 2147483648 bytes, the upload limit"),
        ("deep path", with_pax(pax("path", &format!("{}deep", "d/".repeat(2044))), "deep"), "longer than 1024 bytes"),
    ];
    for (name, bytes, expected) in cases {
        let (dir, ws) = workspace();
        let before = snapshot(&ws);
        let err = extract(bytes.as_slice(), &ws, Path::new("."), &Limits::default()).expect_err(name);
        assert!(format!("{err:#}").contains(expected), "{name}: expected {expected:?} in {err:#}");
        assert_eq!(snapshot(&ws), before, "{name}: the workspace changed");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left.len(), 1, "{name}: staging left behind: {left:?}");
        assert!(!dir.path().join("escaped.txt").exists() && !Path::new("/tmp/escaped.txt").exists(), "{name}: escaped");
    }

    // Over the size limit, and a truncated archive.
    let (_dir, ws) = workspace();
    let before = snapshot(&ws);
    let big = archive(&[("a.bin", Regular, None, &[7u8; 4096]), ("b.bin", Regular, None, &[7u8; 4096])]);
    let err = extract(big.as_slice(), &ws, Path::new("."), &Limits { max_bytes: 6000, ..Default::default() }).unwrap_err();
    assert!(format!("{err:#}").contains("more than 6000 bytes"), "{err:#}");
    let truncated = &big[..big.len() / 2];
    let err = extract(truncated, &ws, Path::new("."), &Limits::default()).unwrap_err();
    assert!(format!("{err:#}").contains("truncated"), "{err:#}");
    let err = extract(archive(&[("a", Regular, None, ok)]).as_slice(), &ws, Path::new("../up"), &Limits::default()).unwrap_err();
    assert!(format!("{err:#}").contains("--to ../up: `..` is refused"), "{err:#}");
    assert_eq!(snapshot(&ws), before);
}

#[test]
fn a_good_archive_lands_atomically_under_to() {
    use tar::EntryType::*;
    let (_dir, ws) = workspace();
    // A hard-linked twin of a workspace file must not change when the upload replaces it.
    let twin = ws.parent().unwrap().join("twin.css");
    std::fs::hard_link(ws.join("css/site.css"), &twin).unwrap();
    let bytes = archive(&[("site.css", Regular, None, b"body{color:red}"), ("fonts", Directory, None, b""), ("fonts/a.woff", Regular, None, b"font"), ("latest.css", Symlink, Some("site.css"), b"")]);
    let summary = extract(bytes.as_slice(), &ws, Path::new("css"), &Limits::default()).unwrap();
    assert_eq!((summary.files, summary.dirs, summary.symlinks), (2, 1, 1));
    let after = snapshot(&ws);
    assert_eq!(after["css/site.css"], "body{color:red}");
    assert_eq!(after["css/fonts/a.woff"], "font");
    assert_eq!(after["css/latest.css"], "-> site.css");
    assert_eq!(after["index.html"], "original");
    assert_eq!(std::fs::read_to_string(&twin).unwrap(), "body{}", "the upload wrote through a hard link");
}

#[test]
fn ignore_rules_nested_gitignore_negation_and_git_directories() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (path, content) in [
        (".gitignore", "*.log\n!keep.log\nbuild/\n"),
        ("index.html", "x"),
        ("debug.log", "x"),
        ("keep.log", "x"),
        ("build/out.js", "x"),
        (".git/HEAD", "ref"),
        (".github/workflows/ci.yml", "x"),
        ("sub/.gitignore", "secret.txt\n"),
        ("sub/secret.txt", "x"),
        ("sub/page.html", "x"),
        ("other/secret.txt", "x"),
        ("tmp/scratch.txt", "x"),
        ("notes.md", "x"),
    ] {
        std::fs::create_dir_all(d.join(path).parent().unwrap()).unwrap();
        std::fs::write(d.join(path), content).unwrap();
    }
    let got: Vec<String> = upload::walk(d, &["tmp/".into(), "*.md".into()]).unwrap().iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let want = [
        ".github", ".github/workflows", ".github/workflows/ci.yml", ".gitignore", "index.html", "keep.log", "other", "other/secret.txt", "sub", "sub/.gitignore", "sub/page.html",
    ];
    assert_eq!(got, want);
}

#[tokio::test]
async fn the_inner_loop_from_the_readme() {
    let world = World::with(|dir| {
        let www = dir.join("www");
        std::fs::create_dir_all(&www).unwrap();
        plugin_entry("files", "deployment", &format!("    grants:\n      mounts: [{{ host: {}, guest: /www, access: read-write }}]\n", www.display()))
    });
    let app = world.app("site", "name: site\nplugins:\n  files: { target: /www }\n");
    std::fs::write(app.join("index.html"), "committed version").unwrap();
    let _agent = start_agent(&world);
    let out = world.cordon(&["deploy", app.to_str().unwrap(), "--break-before", "FILES_SYNC", "--detach"]);
    assert!(out.status.success(), "{}", text(&out));
    let host = world.host().await;
    until("the breakpoint", || host.store.stages("site-1").unwrap().iter().any(|s| s.status == StageStatus::Paused)).await;

    // Edit locally, upload, continue: no commit, no push.
    let local = world.dir.path().join("local-edit");
    std::fs::create_dir_all(&local).unwrap();
    std::fs::write(local.join("index.html"), "edited locally").unwrap();
    std::fs::write(local.join("debug.log"), "noise").unwrap();
    std::fs::write(local.join(".gitignore"), "*.log\n").unwrap();
    let out = world.cordon(&["upload", "site-1", local.to_str().unwrap(), "--continue"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("uploaded 2 files"), "{}", text(&out));
    until("the deployment", || host.store.deployment("site-1").unwrap().unwrap().status.is_final()).await;
    assert_eq!(host.store.deployment("site-1").unwrap().unwrap().status, DeploymentStatus::Success);
    let served = world.dir.path().join("www/current");
    assert_eq!(std::fs::read_to_string(served.join("index.html")).unwrap(), "edited locally");
    assert!(!served.join("debug.log").exists(), ".gitignore was not honoured");
    // Without a paused stage, uploads are refused.
    let out = world.cordon(&["upload", "site-1", local.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("has no paused stage"), "{}", text(&out));
}

#[test]
fn ordinary_input_is_accepted_git_archive_and_sparse_files() {
    // `git archive` starts with a PAX global header holding the commit.
    let repo = tempfile::tempdir().unwrap();
    let git = |args: &[&str]| {
        let out = Command::new("git").args(args).current_dir(repo.path()).env("GIT_CONFIG_GLOBAL", "/dev/null").output().unwrap();
        assert!(out.status.success(), "git {args:?}: {}", text(&out));
        out.stdout
    };
    git(&["init", "-q"]);
    std::fs::write(repo.path().join("index.html"), "from git").unwrap();
    git(&["add", "."]);
    git(&["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one"]);
    let archive = git(&["archive", "--format=tar", "HEAD"]);
    let (_dir, ws) = workspace();
    extract(&archive, &ws, Path::new("."), &Limits::default()).unwrap();
    assert_eq!(snapshot(&ws)["index.html"], "from git");

    // A sparse file in a directory upload (tar writes it as a GNU sparse entry).
    let local = tempfile::tempdir().unwrap();
    let sparse = std::fs::File::create(local.path().join("disk.img")).unwrap();
    sparse.set_len(8 << 20).unwrap();
    std::os::unix::fs::FileExt::write_at(&sparse, b"end", (8 << 20) - 3).unwrap();
    let (_dir, ws) = workspace();
    upload::prepare_dir(local.path(), &[], &ws, Path::new("."), Mode::Merge, &Limits::default()).unwrap().commit().unwrap();
    let copied = std::fs::read(ws.join("disk.img")).unwrap();
    assert_eq!((copied.len(), &copied[copied.len() - 3..]), (8 << 20, &b"end"[..]));
}

#[test]
fn an_upload_that_fails_on_the_local_side_changes_nothing() {
    let local = tempfile::tempdir().unwrap();
    std::fs::write(local.path().join("a.txt"), "a").unwrap();
    let _socket = std::os::unix::net::UnixListener::bind(local.path().join("z.sock")).unwrap();
    let (dir, ws) = workspace();
    let before = snapshot(&ws);
    let err = upload::prepare_dir(local.path(), &[], &ws, Path::new("."), Mode::Merge, &Limits::default()).err().expect("a socket cannot be uploaded");
    assert!(format!("{err:#}").contains("z.sock: sockets, pipes and device files cannot be uploaded"), "{err:#}");
    assert_eq!(snapshot(&ws), before);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "staging left behind");
}

#[test]
fn limits_count_the_whole_workspace_and_delete_mirrors() {
    use tar::EntryType::*;
    let (_dir, ws) = workspace(); // 3 entries: index.html, css, css/site.css
    let limits = Limits { max_entries: 5, max_bytes: 1 << 20 };
    extract(&archive(&[("a.txt", Regular, None, b"a"), ("b.txt", Regular, None, b"b")]), &ws, Path::new("."), &limits).unwrap();
    // Replacing files adds no entries; new ones do, across uploads.
    extract(&archive(&[("a.txt", Regular, None, b"a2")]), &ws, Path::new("."), &limits).unwrap();
    let err = extract(&archive(&[("c.txt", Regular, None, b"c")]), &ws, Path::new("."), &limits).unwrap_err();
    assert!(format!("{err:#}").contains("the workspace would hold more than 5 entries"), "{err:#}");
    let small = Limits { max_entries: 100, max_bytes: 20 };
    let err = extract(&archive(&[("big.txt", Regular, None, &[b'x'; 16])]), &ws, Path::new("."), &small).unwrap_err();
    assert!(format!("{err:#}").contains("the workspace would hold more than 20 bytes"), "{err:#}");

    // Mirror: `css` holds exactly the upload; the rest of the workspace stays.
    upload::prepare(archive(&[("new.css", Regular, None, b"n")]).as_slice(), &ws, Path::new("css"), Mode::Mirror, &limits).unwrap().commit().unwrap();
    let after = snapshot(&ws);
    assert_eq!(after.keys().cloned().collect::<Vec<_>>(), vec!["a.txt", "b.txt", "css", "css/new.css", "index.html"]);
}

fn local_dir(world: &World, name: &str, files: &[(&str, &str)]) -> PathBuf {
    let dir = world.dir.path().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for (file, content) in files {
        std::fs::write(dir.join(file), content).unwrap();
    }
    dir
}

fn spawn_cordon(world: &World, args: &[&str]) -> std::process::Child {
    world
        .command(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn message_of(host: &Host, d: &str, stage: &str) -> String {
    host.store.stages(d).unwrap().into_iter().find(|s| s.id == stage).unwrap().message
}

/// A paused `gate` and an independent `reader` that reads the source after
/// two seconds: uploads wait for the reader, run one after the other, and
/// a `debug continue` sent meanwhile never lets a stage run on a source
/// that changes under it.
#[tokio::test]
async fn uploads_wait_for_readers_and_for_each_other() {
    let world = World::new();
    let host = world.host().await;
    let yaml = "name: up\npipeline:\n  stages:\n    - { id: gate, name: STEP, with: { read: /source/data.txt } }\n    - { id: reader, name: STEP, needs: [], with: { sleep_ms: 2000, read: /source/data.txt } }\n";
    let app = world.app("up", yaml);
    std::fs::write(app.join("data.txt"), "v1").unwrap();
    let _agent = start_agent(&world);
    let paused_with_reader = |d: &str| status_of(&host, d, "gate") == StageStatus::Paused && status_of(&host, d, "reader") == StageStatus::Running;

    // Two uploads while the reader runs: both wait, both land.
    let out = world.cordon(&["deploy", app.to_str().unwrap(), "--break-before", "gate", "--detach"]);
    assert!(out.status.success(), "{}", text(&out));
    until("gate paused, reader running", || paused_with_reader("up-1")).await;
    let one = local_dir(&world, "one", &[("data.txt", "v2"), ("a.txt", "a")]);
    let two = local_dir(&world, "two", &[("b.txt", "b")]);
    let uploads = [spawn_cordon(&world, &["upload", "up-1", one.to_str().unwrap()]), spawn_cordon(&world, &["upload", "up-1", two.to_str().unwrap()])];
    let outs: Vec<_> = uploads.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    for out in &outs {
        assert!(out.status.success(), "{}", text(out));
    }
    assert!(outs.iter().any(|o| text(o).contains("waiting for the running stages of up-1")), "an upload did not wait for the reader");
    assert_eq!((status_of(&host, "up-1", "reader"), message_of(&host, "up-1", "reader").as_str()), (StageStatus::Success, "read v1"));
    let source = host.source(&host.store.deployment("up-1").unwrap().unwrap().target_snapshot).unwrap();
    let files = snapshot(&source);
    assert_eq!((files["data.txt"].as_str(), files["a.txt"].as_str(), files["b.txt"].as_str()), ("v2", "a", "b"), "an upload was lost");

    // An upload that would leave an invalid app config changes nothing.
    let bad = local_dir(&world, "bad", &[("app.cordon.yaml", "name: up\npipeline: [oops\n")]);
    let out = world.cordon(&["upload", "up-1", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("invalid application config; nothing was changed"), "{}", text(&out));
    assert_eq!(snapshot(&source), files);
    let out = world.cordon(&["debug", "continue", "up-1"]);
    assert!(out.status.success(), "{}", text(&out));
    until("up-1", || finished(&host, "up-1").status.is_final()).await;
    assert_eq!(finished(&host, "up-1").status, DeploymentStatus::Success);
    assert_eq!(message_of(&host, "up-1", "gate"), "read v2");

    // `debug continue` while an upload waits: the gate runs on the source it
    // was paused with; the upload, finding it resumed, changes nothing.
    let out = world.cordon(&["deploy", app.to_str().unwrap(), "--break-before", "gate", "--detach"]);
    assert!(out.status.success(), "{}", text(&out));
    until("gate paused, reader running", || paused_with_reader("up-2")).await;
    let late = local_dir(&world, "late", &[("data.txt", "late")]);
    let upload = spawn_cordon(&world, &["upload", "up-2", late.to_str().unwrap()]);
    let out = world.cordon(&["debug", "continue", "up-2"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = upload.wait_with_output().unwrap();
    until("up-2", || finished(&host, "up-2").status.is_final()).await;
    assert_eq!(finished(&host, "up-2").status, DeploymentStatus::Success);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("resumed during the upload; nothing was changed"), "{}", text(&out));
    assert_eq!(message_of(&host, "up-2", "gate"), "read v1");
    let source = host.source(&host.store.deployment("up-2").unwrap().unwrap().target_snapshot).unwrap();
    assert_eq!(snapshot(&source)["data.txt"], "v1");
}
