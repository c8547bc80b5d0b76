//! The `cordon` binary as a user runs it: `plugin inspect` on every guest,
//! `stage run` exit codes, and one clear error (exit 2) for bad input.

use std::path::Path;
use std::process::{Command, Output};

use cordon_tests::{agent_config, cordon_bin, guest, root};

fn cordon(args: &[&str]) -> Output {
    Command::new(cordon_bin()).args(args).env_remove("CORDON_LOG").output().unwrap()
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

#[test]
fn inspect_works_on_every_guest() {
    let dir = root().join("guests/target/wasm32-wasip2/release");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "wasm") {
            continue;
        }
        let out = cordon(&["plugin", "inspect", path.to_str().unwrap()]);
        let t = text(&out);
        assert!(out.status.success(), "{}: {t}", path.display());
        assert!(t.contains("sha256:") && t.contains("size:") && t.contains("contract:  cordon:plugin"), "{t}");
        seen += 1;
    }
    assert!(seen >= 20, "only {seen} guests found in {}", dir.display());

    let t = text(&cordon(&["plugin", "inspect", guest("wait").to_str().unwrap()]));
    assert!(t.contains("worlds:    executor") && t.contains("WAIT") && t.contains("cordon:plugin/execution@0.1.0"), "{t}");
    let t = text(&cordon(&["plugin", "inspect", guest("newer-contract").to_str().unwrap()]));
    assert!(t.contains("0.2.0 (NOT compatible with this host's 0.1.0)"), "{t}");
}

fn config(dir: &Path, guest_name: &str) -> String {
    agent_config(dir, guest_name, &guest(guest_name), "executor", "    limits: { timeout: 20s }\n").unwrap();
    dir.join("agent.yaml").to_str().unwrap().to_string()
}

#[test]
fn stage_run_exits_with_the_stage_status() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "wait");
    let out = cordon(&["--config", &cfg, "stage", "run", "--plugin", "wait", "--stage", "WAIT", "--with", r#"{"duration": 0.2}"#]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(t.contains("waiting 0.2s") && t.contains("WAIT: success"), "{t}");

    let out = cordon(&["--config", &cfg, "stage", "run", "--plugin", "wait", "--stage", "WAIT", "--with", r#"{"duration": -1}"#]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("WAIT: failure") && text(&out).contains("duration must be a number of seconds from 0 to 2592000"));
    // So large it would overflow the deadline: refused, not finished at once.
    let out = cordon(&["--config", &cfg, "stage", "run", "--plugin", "wait", "--stage", "WAIT", "--with", r#"{"duration": 1e308}"#]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("duration must be a number of seconds"), "{}", text(&out));

    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "panic");
    let out = cordon(&["--config", &cfg, "stage", "run", "--plugin", "panic", "--stage", "PANIC"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("hostile guest panicked on purpose"));
}

/// A plugin's I/O error carries WASI's number (ENOENT is 44 there, 2 on
/// Linux): the stage's message names it and says that paths are the
/// plugin's own.
#[test]
fn wasi_error_numbers_are_said_in_words() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "step");
    let out = cordon(&["--config", &cfg, "stage", "run", "--plugin", "step", "--stage", "STEP", "--with", r#"{"read": "/srv/www/index.html"}"#]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("read /srv/www/index.html: No such file or directory (WASI ENOENT; paths are the plugin's own"), "{t}");
    assert!(!t.contains("os error"), "{t}");
}

/// Guest-chosen control bytes — an OSC title sequence, a carriage return
/// that would overwrite the line with a fake `cordon |` line, a screen
/// clear — reach the terminal only escaped, from log lines, stderr and the
/// failure reason alike.
#[test]
fn guest_text_cannot_drive_the_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "probe");
    let with = serde_json::json!({ "log": "\u{1b}]0;pwned\u{7}\rcordon | WAIT: success", "read": "/source/\u{1b}[2J" }).to_string();
    let out = cordon(&["--config", &cfg, "stage", "run", "--plugin", "probe", "--stage", "PROBE", "--with", &with]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let raw = [out.stdout.as_slice(), out.stderr.as_slice()].concat();
    assert!(!raw.iter().any(|b| matches!(b, 0x1b | b'\r' | 0x07)), "raw control bytes reached the terminal: {}", text(&out));
    assert!(text(&out).contains("\\u{1b}[2J"), "the reason shows the escape: {}", text(&out));
}

/// An id that would become a path outside the state directory is refused
/// before any file is created.
/// An error quoting what a user or plugin wrote (here a path with an ANSI
/// sequence in it) is printed with the control characters escaped.
#[test]
fn errors_cannot_drive_the_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "wait");
    let app = dir.path().join("red\x1b[31mapp");
    let out = cordon(&["--config", &cfg, "plan", app.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(!stderr.contains('\x1b') && stderr.contains("red\\u{1b}[31mapp"), "{stderr:?}");
}

#[test]
fn ids_that_would_leave_the_state_directory_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "wait");
    for id in ["../../x", "/tmp/x"] {
        let out = cordon(&["--config", &cfg, "migrate", "resume", id]);
        assert_ne!(out.status.code(), Some(0), "{}", text(&out));
        assert!(text(&out).contains("is not a migration id"), "{}", text(&out));
    }
    assert!(!dir.path().join("x.lock").exists() && !Path::new("/tmp/x.lock").exists(), "a lock file was created outside the state directory");
}

/// `cordon … | head`: when the reader has gone, the command stops quietly
/// (by SIGPIPE, as Unix filters do) instead of printing an error or a panic.
#[test]
fn a_closed_pipe_stops_output_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let child = Command::new(cordon_bin())
        .args(["plugin", "inspect", guest("wait").to_str().unwrap()])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("error") && !stderr.contains("panicked"), "{stderr}");
    const SIGPIPE: i32 = 13;
    assert_eq!(out.status.signal(), Some(SIGPIPE), "{:?} {stderr}", out.status);
}

#[test]
fn bad_input_gets_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "wait");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--config", "/nonexistent/agent.yaml", "stage", "run", "--plugin", "wait", "--stage", "WAIT"], "cannot read agent config /nonexistent/agent.yaml"),
        (vec!["--config", &cfg, "stage", "run", "--plugin", "nope", "--stage", "WAIT"], "no plugin named `nope` (configured: wait)"),
        (vec!["--config", &cfg, "stage", "run", "--plugin", "wait", "--stage", "NOPE"], "does not define stage `NOPE` (it defines: WAIT)"),
        (vec!["--config", &cfg, "stage", "run", "--plugin", "wait", "--stage", "WAIT", "--with", "{oops"], "--with \"{oops\" is not valid JSON"),
        (vec!["--config", &cfg, "stage", "run", "--plugin", "wait", "--stage", "WAIT", "--source", "/nonexistent"], "--source /nonexistent is not a directory"),
        (vec!["plugin", "inspect", "/nonexistent.wasm"], "cannot read /nonexistent.wasm"),
    ];
    for (args, expected) in cases {
        let out = cordon(&args);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {t}");
        assert!(t.contains(expected), "expected {expected:?} for {args:?}, got: {t}");
        assert_eq!(t.matches("error:").count(), 1, "one error, not several: {t}");
    }

    // A pin that does not match: refused, exit 2, nothing compiled.
    let yaml = std::fs::read_to_string(&cfg).unwrap();
    let sha = cordon_tests::sha256_file(&guest("wait"));
    std::fs::write(&cfg, yaml.replace(&sha, &"ab".repeat(32))).unwrap();
    let out = cordon(&["--config", &cfg, "stage", "run", "--plugin", "wait", "--stage", "WAIT"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("refusing to compile"), "{}", text(&out));
}

#[test]
fn deploy_refuses_bad_app_configs_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "wait");
    let app = dir.path().join("app");
    std::fs::create_dir_all(&app).unwrap();
    let file = app.join("app.cordon.yaml");
    let cases = [
        ("name: a\npipeline:\n  stages:\n    - { name: DEPLOY_IT }\n", "no plugin defines stage `DEPLOY_IT` (defined: WAIT)"),
        ("name: a\npipeline:\n  stages:\n    - { id: x, name: WAIT, needs: [y] }\n    - { id: y, name: WAIT, needs: [x] }\n", "`needs` forms a cycle: x -> y -> x"),
        ("name: a\npipeline:\n  stages:\n    - { name: WAIT, needs: [nope] }\n", "needs `nope`, but no stage has that id or name"),
        ("name: a\npipline: {}\n", "unknown field `pipline`"),
        ("name: a\nplugins:\n  files: {}\n", "plugins.files: no plugin named `files`"),
        // Refused as `plan` refuses it, not recorded as a failed deployment.
        ("name: a\n", "nothing to deploy: there is no pipeline and no planner"),
        // The embedded database's only agent is this config's: it lacks the label.
        ("name: a\nagents: { env: prod }\npipeline:\n  stages:\n    - { name: WAIT }\n", "agents: no agent can run this application: it needs label env=prod"),
    ];
    for (yaml, expected) in cases {
        std::fs::write(&file, yaml).unwrap();
        let out = cordon(&["--config", &cfg, "deploy", app.to_str().unwrap()]);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(2), "{t}");
        assert!(t.contains(&file.display().to_string()) && t.contains(expected), "expected {expected:?}: {t}");
    }
    let out = cordon(&["--config", &cfg, "status"]);
    let t = text(&out);
    assert!(!t.contains("a-1"), "a refused deployment was recorded: {t}");
    assert!(!dir.path().join("state/snapshots/a-1").exists());
}

#[test]
fn keys_filter_and_items_apply_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = {
        agent_config(dir.path(), "kcp-keys", &guest("kcp-keys"), "key-filter", "").unwrap();
        dir.path().join("agent.yaml").to_str().unwrap().to_string()
    };
    let input = dir.path().join("keys.txt");
    std::fs::write(
        &input,
        "/registry/apps/deployments/c1/ns/a\n/registry/apps/deployments/c2/ns/b\n/registry/g/r/0000000000000000000000000000000000000000000000000000000000000000/c1/x\n/registry/core/namespaces/c1/default\n",
    )
    .unwrap();
    let out = dir.path().join("selected.txt");
    let rejects = dir.path().join("unclassified.txt");
    let run = cordon(&[
        "--config", &cfg, "keys", "filter", "--plugin", "kcp-keys", "--with", r#"{"cluster": "c1"}"#,
        input.to_str().unwrap(), "--output", out.to_str().unwrap(), "--unclassified", rejects.to_str().unwrap(), "--jobs", "2",
    ]);
    let t = text(&run);
    assert_eq!(run.status.code(), Some(1), "unclassified keys make the exit code 1: {t}");
    assert!(t.contains("4 keys: 2 selected, 1 unclassified"), "{t}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "/registry/apps/deployments/c1/ns/a\n/registry/core/namespaces/c1/default\n");
    assert!(std::fs::read_to_string(&rejects).unwrap().contains("/c1/x"));

    let run = cordon(&["--config", &cfg, "keys", "filter", "--plugin", "kcp-keys", "--with", r#"{"cluster": "c1"}"#, "--prefixes", input.to_str().unwrap()]);
    assert_eq!(String::from_utf8_lossy(&run.stdout), "/registry/apps/deployments/c1/\n/registry/core/namespaces/c1/\n");

    // A bad option: exit 2, and no output file is left behind.
    let missing = dir.path().join("never.txt");
    let run = cordon(&["--config", &cfg, "keys", "filter", "--plugin", "kcp-keys", "--with", r#"{"clusterr": "c1"}"#, input.to_str().unwrap(), "--output", missing.to_str().unwrap()]);
    assert_eq!(run.status.code(), Some(2));
    assert!(text(&run).contains("unknown field `clusterr`") && !missing.exists(), "{}", text(&run));

    let dir = tempfile::tempdir().unwrap();
    agent_config(dir.path(), "registry-rewrite", &guest("registry-rewrite"), "item-action", "").unwrap();
    let cfg = dir.path().join("agent.yaml").to_str().unwrap().to_string();
    let items = dir.path().join("items.jsonl");
    std::fs::write(&items, "{\"apiVersion\":\"v1\",\"kind\":\"Pod\",\"metadata\":{\"name\":\"p\",\"namespace\":\"n\"},\"spec\":{\"containers\":[{\"image\":\"old:5000/a:1\"}]}}\n").unwrap();
    let run = cordon(&["--config", &cfg, "items", "apply", "--plugin", "registry-rewrite", "--with", r#"{"from": "old:5000", "to": "new"}"#, items.to_str().unwrap()]);
    assert!(run.status.success(), "{}", text(&run));
    assert!(String::from_utf8_lossy(&run.stdout).contains("\"new/a:1\""));
    let run = cordon(&["--config", &cfg, "keys", "filter", "--plugin", "registry-rewrite", items.to_str().unwrap()]);
    assert_eq!(run.status.code(), Some(2));
    assert!(text(&run).contains("declared with world `item-action`") && text(&run).contains("needs a `key-filter` plugin"), "{}", text(&run));
}

#[test]
fn shell_completions_cover_every_command() {
    for shell in ["bash", "zsh", "fish"] {
        let out = cordon(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", text(&out));
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(script.contains("approve") && script.contains("migrate") && script.contains("completions"), "{shell}: {script}");
    }
    assert_eq!(cordon(&["completions", "tcsh"]).status.code(), Some(2), "an unknown shell is refused");
}
