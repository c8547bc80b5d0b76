//! The pipeline engine end to end: strategy selection, the stage DAG and
//! real parallelism, the index contract, timeouts, cancel, commands from a
//! second process, rollback, `exited`, secret masking, SIGKILL and resume,
//! and many concurrent deployments.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cordon_pipeline::Host;
use cordon_pipeline::plan::{self, PlanInput, Strategy, TriggerInfo};
use cordon_runtime::sandbox::output::NullSink;
use cordon_store::{CommandKind, CommandRecord, DeploymentRecord, DeploymentStatus, StageStatus};
use cordon_tests::{AgentProcess, TOKEN_VALUE, World, agent_command, beside_a_neighbour, deploy, expect_line, lines_of, serve_until_idle, signal, start_agent};

fn message(m: &str) -> TriggerInfo {
    TriggerInfo { commit_message: m.into(), commander: "test".into(), ..Default::default() }
}

fn stages(host: &Host, id: &str) -> Vec<cordon_store::StageRecord> {
    host.store.stages(id).unwrap()
}

fn stage_status(host: &Host, d: &DeploymentRecord) -> Vec<(String, StageStatus)> {
    stages(host, &d.id).into_iter().map(|s| (s.id, s.status)).collect()
}

async fn strategy_of(host: &Host, app_dir: &Path, trigger: TriggerInfo, running: Option<&Path>) -> anyhow::Result<(Strategy, String)> {
    let app = cordon_pipeline::config::AppConfig::load(app_dir)?;
    let scratch = tempfile::tempdir().unwrap();
    let record = DeploymentRecord::queued("preview", &app.name, String::new(), String::new(), 0);
    let input = PlanInput {
        engine: &host.engine,
        plugins: &host.plugins,
        app: &app,
        trigger: &trigger,
        deployment: cordon_pipeline::deployment_info(&record, &app, &trigger),
        target: app_dir.to_path_buf(),
        running: running.map(Path::to_path_buf),
        scratch: scratch.path().to_path_buf(),
        changed: vec![],
        sink: Arc::new(NullSink),
    };
    let planned = plan::plan(&input).await?;
    Ok((planned.summary.strategy, planned.summary.summary))
}

#[tokio::test]
async fn strategy_is_chosen_in_pipecd_order() {
    let world = World::new();
    let host = world.host().await;
    let pipeline = "pipeline:\n  stages:\n    - name: TD_ROLLOUT\n";
    let running = tempfile::tempdir().unwrap();
    let r = Some(running.path());
    let quick = Strategy::QuickSync;
    let pipe = Strategy::PipelineSync;

    let app = world.app("vote-quick", &format!("name: vq\n{pipeline}plugins:\n  test-deploy: {{ vote: quick }}\n"));
    // 1. An explicit trigger wins over everything.
    let t = TriggerInfo { sync: Some(pipe), ..message("") };
    assert_eq!(strategy_of(&host, &app, t, r).await.unwrap().0, pipe);
    // 2. No pipeline: quick sync.
    let none = world.app("no-pipeline", "name: np\nplugins:\n  test-deploy: { vote: pipeline }\n");
    let (s, why) = strategy_of(&host, &none, message(""), r).await.unwrap();
    assert_eq!((s, why.contains("no pipeline")), (quick, true));
    // 3. alwaysUsePipeline.
    let always = world.app("always", &format!("name: al\nplanner: {{ alwaysUsePipeline: true }}\n{pipeline}plugins:\n  test-deploy: {{ vote: quick }}\n"));
    assert_eq!(strategy_of(&host, &always, message(""), r).await.unwrap().0, pipe);
    // 4. Commit matchers, both ways.
    let matchers = world.app(
        "matchers",
        &format!("name: ma\nplanner:\n  commitMatcher: {{ quickSync: '^hotfix', pipeline: '^release' }}\n{pipeline}plugins:\n  test-deploy: {{ vote: unsupported }}\n"),
    );
    assert_eq!(strategy_of(&host, &matchers, message("hotfix: x"), r).await.unwrap().0, quick);
    assert_eq!(strategy_of(&host, &matchers, message("release 2"), r).await.unwrap().0, pipe);
    // 5. First deployment: quick sync.
    let (s, why) = strategy_of(&host, &matchers, message("other"), None).await.unwrap();
    assert_eq!((s, why.contains("first deployment")), (quick, true));
    // 6. The planner's vote, "unsupported" ignored, and a clear error when nobody decides.
    assert_eq!(strategy_of(&host, &app, message(""), r).await.unwrap().0, quick);
    let vote_pipe = world.app("vote-pipe", &format!("name: vp\n{pipeline}plugins:\n  test-deploy: {{ vote: pipeline }}\n"));
    assert_eq!(strategy_of(&host, &vote_pipe, message(""), r).await.unwrap().0, pipe);
    let err = format!("{:#}", strategy_of(&host, &matchers, message("other"), r).await.unwrap_err());
    assert!(err.contains("no strategy was decided") && err.contains("test-deploy"), "{err}");
}

#[tokio::test]
async fn dag_runs_in_order_and_independent_stages_in_parallel() {
    let world = World::new();
    let host = world.host().await;
    let app = world.app(
        "dag",
        "name: dag\nplanner: { alwaysUsePipeline: true }\npipeline:\n  stages:\n    - { id: first, name: STEP, with: { marker: /marks/order } }\n    - { id: a, name: STEP, needs: [first], with: { sleep_ms: 800, marker: /marks/order } }\n    - { id: b, name: STEP, needs: [first], with: { sleep_ms: 800, marker: /marks/order } }\n    - { id: last, name: STEP, needs: [a, b], with: { marker: /marks/order } }\n",
    );
    let started = Instant::now();
    let d = deploy(&host, &world.dir.path().join("state"), &app, message("")).await;
    assert_eq!(d.status, DeploymentStatus::Success, "{d:?}");
    let s = stages(&host, &d.id);
    let (a, b) = (&s[1], &s[2]);
    assert!(a.started_at.unwrap() < b.finished_at.unwrap() && b.started_at.unwrap() < a.finished_at.unwrap(), "a and b did not overlap: {a:?} {b:?}");
    assert!(s[3].started_at.unwrap() >= a.finished_at.unwrap().max(b.finished_at.unwrap()));
    assert!(s[1].started_at.unwrap() >= s[0].finished_at.unwrap());
    assert!(started.elapsed() < Duration::from_millis(1500), "parallel stages took {:?}", started.elapsed());
    let order = world.marks("order");
    assert_eq!(order.len(), 4);
    assert!(order[0].ends_with(" first") && order[3].ends_with(" last"), "{order:?}");
}

#[tokio::test]
async fn index_contract_violations_are_rejected() {
    let world = World::new();
    let host = world.host().await;
    for (n, violation) in ["foreign-index", "renamed", "missing", "duplicate"].into_iter().enumerate() {
        let app = world.app(
            &format!("v{n}"),
            &format!("name: v{n}\nplanner: {{ alwaysUsePipeline: true }}\npipeline:\n  stages:\n    - name: TD_ROLLOUT\n    - name: TD_ROLLOUT\nplugins:\n  test-deploy: {{ violate: {violation} }}\n"),
        );
        let d = deploy(&host, &world.dir.path().join("state"), &app, message("")).await;
        assert_eq!(d.status, DeploymentStatus::Failure);
        assert!(d.reason.contains("planner `test-deploy` broke the index contract"), "{violation}: {}", d.reason);
        assert!(stages(&host, &d.id).is_empty(), "nothing may run after a broken plan");
    }
    let app = world.app("vq", "name: vq\nplugins:\n  test-deploy: { violate: quick-index }\n");
    let d = deploy(&host, &world.dir.path().join("state"), &app, message("")).await;
    assert!(d.reason.contains("quick-sync stages use index 0"), "{}", d.reason);
}

/// A planner cannot make another plugin (with grants the planner lacks)
/// run a stage: quick-sync and rollback stages must be its own.
#[tokio::test]
async fn planners_cannot_borrow_other_plugins_stages() {
    let world = World::new();
    let host = world.host().await;
    let state = world.dir.path().join("state");
    let cases = [
        ("bq", "name: bq\nplugins:\n  test-deploy: { violate: borrow }\n", "returned stage `STEP`"),
        (
            "br",
            "name: br\nplanner: { alwaysUsePipeline: true }\npipeline:\n  stages:\n    - name: TD_ROLLOUT\nplugins:\n  test-deploy: { violate: borrow-rollback }\n",
            "returned rollback stage `STEP`",
        ),
    ];
    for (name, yaml, expected) in cases {
        let d = beside_a_neighbour(deploy(&host, &state, &world.app(name, yaml), message(""))).await;
        assert_eq!(d.status, DeploymentStatus::Failure);
        assert!(d.reason.contains("planner `test-deploy` broke the index contract") && d.reason.contains(expected), "{}", d.reason);
        assert!(d.reason.contains("which it does not define"), "{}", d.reason);
        assert!(stages(&host, &d.id).is_empty(), "nothing may run after a broken plan");
    }
}

/// A planner that puts a granted secret into its answers (summary,
/// versions, stage options) gets it masked before anything is stored.
#[tokio::test]
async fn planner_answers_are_masked_before_they_are_stored() {
    let world = World::new();
    let host = world.host().await;
    let state = world.dir.path().join("state");
    let app = world.app("leak", "name: leak\nplugins:\n  test-deploy: { vote: quick, violate: leak-secret }\n");
    let d = deploy(&host, &state, &app, message("")).await;
    let stored = format!("{d:?} {:?}", stages(&host, &d.id));
    assert!(stored.contains("***"), "the leak was not attempted: {stored}");
    assert!(!stored.contains(TOKEN_VALUE), "a secret was stored in clear: {stored}");
    for file in ["state.db", "state.db-wal"] {
        let bytes = std::fs::read(state.join(file)).unwrap_or_default();
        assert!(!bytes.windows(TOKEN_VALUE.len()).any(|w| w == TOKEN_VALUE.as_bytes()), "the secret is in {file}");
    }
}

#[tokio::test]
async fn stage_and_deployment_timeouts() {
    let world = World::new();
    let host = world.host().await;
    let state = world.dir.path().join("state");
    let app = world.app("st", "name: st\npipeline:\n  stages:\n    - { name: STEP, timeout: 300ms, with: { sleep_ms: 5000 } }\n    - { name: STEP }\n");
    let started = Instant::now();
    let d = deploy(&host, &state, &app, message("")).await;
    assert_eq!(d.status, DeploymentStatus::Failure);
    assert!(d.reason.contains("timed out after 300ms"), "{}", d.reason);
    assert_eq!(stage_status(&host, &d)[1].1, StageStatus::NotStarted);
    assert!(started.elapsed() < Duration::from_secs(4));

    let app = world.app("dt", "name: dt\ntimeout: 500ms\npipeline:\n  stages:\n    - { name: STEP, with: { sleep_ms: 5000 } }\n");
    let d = deploy(&host, &state, &app, message("")).await;
    assert_eq!(d.status, DeploymentStatus::Failure);
    assert!(d.reason.contains("deployment timed out after 500ms"), "{}", d.reason);
    assert_eq!(stage_status(&host, &d)[0].1, StageStatus::Cancelled);
}

/// Sends a command the way `cordon cancel/skip/approve` do, from this process.
fn send(host: &Host, deployment: &str, stage: &str, kind: CommandKind) {
    host.store
        .add_command(&CommandRecord {
            id: format!("{deployment}/{stage}/{kind}/{}", cordon_store::now_ms()),
            deployment: deployment.into(),
            stage: stage.into(),
            kind,
            commander: "tester".into(),
            created_at: 0,
            answer: None,
        })
        .unwrap();
}

async fn wait_for_stage(host: &Host, deployment: &str, stage: &str, status: StageStatus) {
    let started = Instant::now();
    loop {
        if host.store.stages(deployment).unwrap().iter().any(|s| s.id == stage && s.status == status) {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "stage {stage} never became {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn cancel_during_a_stage_rolls_back_and_cancel_during_rollback_stops_it() {
    let world = World::new();
    let host = world.host().await;
    let state = world.dir.path().join("state");
    let yaml = "name: c\nplanner: { alwaysUsePipeline: true }\npipeline:\n  stages:\n    - { name: TD_ROLLOUT, with: { sleep_ms: 20000, rollback_sleep_ms: 50 } }\n";
    let app = world.app("c1", yaml);
    let d = cordon_pipeline::trigger(&host, &app, message("")).await.unwrap();
    let serving = tokio::spawn({
        let host = host.clone();
        let state = state.clone();
        async move { serve_until_idle(&host, &state).await }
    });
    wait_for_stage(&host, &d.id, "s0-TD_ROLLOUT", StageStatus::Running).await;
    send(&host, &d.id, "", CommandKind::Cancel);
    serving.await.unwrap();
    let d = host.store.deployment(&d.id).unwrap().unwrap();
    assert_eq!(d.status, DeploymentStatus::Cancelled, "{d:?}");
    assert!(d.reason.contains("cancelled by tester") && d.reason.contains("rolled back"), "{}", d.reason);
    assert_eq!(stage_status(&host, &d), vec![("s0-TD_ROLLOUT".into(), StageStatus::Cancelled), ("rb0-TD_ROLLBACK".into(), StageStatus::Success)]);

    // Now the rollback itself takes long, and is cancelled too.
    let app = world.app("c2", &yaml.replace("rollback_sleep_ms: 50", "rollback_sleep_ms: 20000").replace("sleep_ms: 20000,", "fail: true,"));
    let d = cordon_pipeline::trigger(&host, &app, message("")).await.unwrap();
    let serving = tokio::spawn({
        let host = host.clone();
        async move { serve_until_idle(&host, &state).await }
    });
    wait_for_stage(&host, &d.id, "rb0-TD_ROLLBACK", StageStatus::Running).await;
    send(&host, &d.id, "", CommandKind::Cancel);
    let started = Instant::now();
    serving.await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    let d = host.store.deployment(&d.id).unwrap().unwrap();
    assert_eq!(d.status, DeploymentStatus::Cancelled);
    assert!(d.reason.contains("failing on purpose") && d.reason.contains("rollback cancelled by tester"), "{}", d.reason);
}

#[tokio::test]
async fn cancel_interrupts_a_busy_plugin_at_once() {
    let world = World::new();
    let host = world.host().await;
    let state = world.dir.path().join("state");
    let app = world.app("busy", "name: busy\npipeline:\n  stages:\n    - { name: SPIN }\n    - { name: STEP }\n");
    let d = cordon_pipeline::trigger(&host, &app, message("")).await.unwrap();
    let serving = tokio::spawn({
        let host = host.clone();
        async move { serve_until_idle(&host, &state).await }
    });
    wait_for_stage(&host, &d.id, "s0-SPIN", StageStatus::Running).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    send(&host, &d.id, "", CommandKind::Cancel);
    serving.await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(2), "cancel took {:?}", started.elapsed());
    let d = host.store.deployment(&d.id).unwrap().unwrap();
    assert_eq!(d.status, DeploymentStatus::Cancelled);
    assert_eq!(stage_status(&host, &d), vec![("s0-SPIN".into(), StageStatus::Cancelled), ("s1-STEP".into(), StageStatus::NotStarted)]);
}

#[tokio::test]
async fn rollback_receives_the_source_stage_options() {
    let world = World::new();
    let host = world.host().await;
    let app = world.app(
        "rb",
        "name: rb\nplanner: { alwaysUsePipeline: true }\npipeline:\n  stages:\n    - { name: TD_ROLLOUT, with: { color: blue } }\n    - { name: STEP, with: { status: failure } }\n",
    );
    let d = deploy(&host, &world.dir.path().join("state"), &app, message("")).await;
    assert_eq!(d.status, DeploymentStatus::Failure);
    let s = stages(&host, &d.id);
    let rollback = s.iter().find(|s| s.rollback).expect("a rollback stage");
    assert_eq!((rollback.id.as_str(), rollback.status, rollback.index), ("rb0-TD_ROLLBACK", StageStatus::Success, 0));
    assert!(rollback.message.contains(r#""color":"blue""#), "{}", rollback.message);
    assert!(d.reason.contains("stage s1-STEP failure: failing on purpose; rolled back"), "{}", d.reason);
}

#[tokio::test]
async fn exited_stops_the_pipeline_as_success() {
    let world = World::new();
    let host = world.host().await;
    let app = world.app("ex", "name: ex\npipeline:\n  stages:\n    - { name: STEP, with: { status: exited } }\n    - { name: STEP, with: { marker: /marks/never } }\n");
    let d = deploy(&host, &world.dir.path().join("state"), &app, message("")).await;
    assert_eq!(d.status, DeploymentStatus::Success, "{d:?}");
    assert_eq!(stage_status(&host, &d), vec![("s0-STEP".into(), StageStatus::Exited), ("s1-STEP".into(), StageStatus::Skipped)]);
    assert!(world.marks("never").is_empty());
    // The next deployment sees this one as its running source.
    assert!(host.store.application("ex").unwrap().unwrap().last_success.as_deref() == Some(d.id.as_str()));
}

#[tokio::test]
async fn skip_rules_and_secret_masking() {
    let world = World::new();
    let host = world.host().await;
    let app = world.app(
        "sk",
        "name: sk\npipeline:\n  stages:\n    - { name: STEP, with: { secret: token, log: visible } }\n    - { name: STEP, skipOn: { commitMessagePrefixes: ['[skip]'] }, with: { marker: /marks/skipped } }\n",
    );
    let d = deploy(&host, &world.dir.path().join("state"), &app, message("[skip] docs")).await;
    assert_eq!(d.status, DeploymentStatus::Success);
    assert_eq!(stage_status(&host, &d)[1].1, StageStatus::Skipped);
    assert!(world.marks("skipped").is_empty());
    let logs = host.store.logs(&d.id, None, 0, 1000).unwrap();
    let text: String = logs.iter().map(|l| format!("{}\n", l.text)).collect();
    assert!(text.contains("secret token is ***") && text.contains("visible"), "{text}");
    assert!(!text.contains(TOKEN_VALUE), "the secret leaked into the stored log:\n{text}");
}

// Two threads: the agent runs while the test waits for `cordon approve`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approve_and_skip_from_a_second_process() {
    let world = World::new();
    let host = world.host().await;
    let state = world.dir.path().join("state");
    let app = world.app(
        "ap",
        "name: ap\npipeline:\n  stages:\n    - { id: gate, name: STEP, with: { wait_for: approve, refuse_first: true, secret: token } }\n    - { id: soak, name: STEP, with: { sleep_ms: 30000 } }\n    - { name: STEP }\n",
    );
    let d = cordon_pipeline::trigger(&host, &app, message("")).await.unwrap();
    let serving = tokio::spawn({
        let host = host.clone();
        async move { serve_until_idle(&host, &state).await }
    });
    wait_for_stage(&host, &d.id, "gate", StageStatus::Running).await;
    // Approving a stage that is not running yet, or as nobody, is refused.
    let out = world.cordon(&["approve", &d.id, "soak", "--as", "alice"]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not waiting for an approval"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = world.cordon(&["approve", &d.id, "gate", "--as", ""]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    let refusal = if world.replicas.is_some() { "--as is refused against a server" } else { "--as is empty" };
    assert!(String::from_utf8_lossy(&out.stderr).contains(refusal), "{}", String::from_utf8_lossy(&out.stderr));
    // A refusal fails the command with the plugin's reason, secrets masked.
    let out = world.cordon(&["approve", &d.id, "gate", "--as", "alice"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("refused the approval by alice: not yet (secret ***)") && !stderr.contains(TOKEN_VALUE), "{stderr}");
    let out = world.cordon(&["approve", &d.id, "gate", "--as", "alice"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).ends_with("as alice: accepted\n"), "{out:?}");
    wait_for_stage(&host, &d.id, "soak", StageStatus::Running).await;
    // A stage name shared by several stages is refused: ask for the id.
    let out = world.cordon(&["skip", &d.id, "STEP", "--as", "bob"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("names several stages"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = world.cordon(&["skip", &d.id, "soak", "--as", "bob"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serving.await.unwrap();
    let d = host.store.deployment(&d.id).unwrap().unwrap();
    assert_eq!(d.status, DeploymentStatus::Success, "{d:?}");
    let s = stages(&host, &d.id);
    assert_eq!((s[0].status, s[0].message.as_str()), (StageStatus::Success, "approved by alice"));
    assert_eq!((s[1].status, s[1].message.as_str()), (StageStatus::Skipped, "skipped by bob"));
    assert_eq!(s[2].status, StageStatus::Success);
    // Commands for a finished deployment are refused with a clear error.
    let out = world.cordon(&["cancel", &d.id]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already ended"));
}

#[tokio::test]
async fn logs_follow_exits_with_the_outcome_and_status_has_a_header() {
    let world = World::new();
    let host = world.host().await;
    let app = world.app("lf", "name: lf\npipeline:\n  stages:\n    - { name: STEP, with: { status: failure } }\n");
    let d = deploy(&host, &world.dir.path().join("state"), &app, message("")).await;
    assert_eq!(d.status, DeploymentStatus::Failure, "{d:?}");
    assert_eq!(world.cordon(&["logs", &d.id, "--follow"]).status.code(), Some(1), "following a failed deployment");
    assert_eq!(world.cordon(&["logs", &d.id]).status.code(), Some(0), "printing the log worked");
    let out = world.cordon(&["status"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("DEPLOYMENT") && stdout.contains(&d.id), "{stdout}");
    // `-m` is `--message`.
    let out = world.cordon(&["deploy", app.to_str().unwrap(), "--detach", "-m", "fix: typo"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let queued = host.store.deployments(Some("lf"), 1).unwrap().remove(0);
    assert!(queued.trigger.contains("fix: typo"), "{}", queued.trigger);
}

/// Each line `output` printed, parsed as JSON.
fn json_lines(output: &std::process::Output) -> Vec<serde_json::Value> {
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}"))).collect()
}

/// `--json` on the listings: one object per line, fields as stored.
#[tokio::test]
async fn status_logs_agents_and_plan_print_json() {
    let world = World::new();
    let host = world.host().await;
    let app = world.app("js", "name: js\npipeline:\n  stages:\n    - { id: only, name: STEP, with: { log: \"\\u001b[2Jhello\" } }\n");
    let d = deploy(&host, &world.dir.path().join("state"), &app, message("")).await;
    assert_eq!(d.status, DeploymentStatus::Success, "{d:?}");

    let listed = json_lines(&world.cordon(&["status", "--json"]));
    assert_eq!((listed.len(), listed[0]["deployment"]["id"].as_str(), listed[0]["deployment"]["status"].as_str()), (1, Some(d.id.as_str()), Some("success")), "{listed:?}");
    let one = json_lines(&world.cordon(&["status", &d.id, "--json"]));
    assert_eq!((one.len(), one[0]["stages"][0]["id"].as_str(), one[0]["stages"][0]["status"].as_str()), (1, Some("only"), Some("success")), "{one:?}");
    let logs = json_lines(&world.cordon(&["logs", &d.id, "--json"]));
    assert!(logs.iter().any(|l| l["stage"] == "only" && l["text"].as_str().is_some_and(|t| t.ends_with("\u{1b}[2Jhello"))), "{logs:?}");
    let raw = world.cordon(&["logs", &d.id, "--json"]).stdout;
    assert!(!raw.contains(&0x1b), "a control character reached the terminal raw");
    let agents = json_lines(&world.cordon(&["agents", "--json"]));
    assert!(agents.iter().all(|a| a["agent"]["id"].is_string() && (a["state"] == "alive" || a["state"] == "gone")), "{agents:?}");
    let plan = json_lines(&world.cordon(&["plan", app.to_str().unwrap(), "--json"]));
    assert_eq!((plan[0]["application"].as_str(), plan[0]["plan"]["strategy"].is_string(), plan[0]["stages"][0]["id"].as_str()), (Some("js"), true, Some("only")), "{plan:?}");
}

#[tokio::test]
async fn sigkill_during_a_stage_then_resume_without_duplicates() {
    let world = World::new();
    let host = world.host().await;
    let app = world.app(
        "kill",
        "name: kill\npipeline:\n  stages:\n    - { name: STEP, with: { marker: /marks/one } }\n    - { name: STEP, with: { marker: /marks/two, sleep_ms: 3000 } }\n    - { name: STEP, with: { marker: /marks/three } }\n",
    );
    let out = world.cordon(&["deploy", app.to_str().unwrap(), "--detach"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("warning:") && said.contains("`cordon agent`"), "queued silently: {said}");
    let id = "kill-1";
    let mut agent = start_agent(&world);
    wait_for_stage(&host, id, "s1-STEP", StageStatus::Running).await;
    agent.0.kill().unwrap(); // SIGKILL
    agent.0.wait().unwrap();
    assert_eq!(host.store.deployment(id).unwrap().unwrap().status, DeploymentStatus::Running);
    let _agent = start_agent(&world);
    if let Some(replicas) = &world.replicas {
        // Through a server, the replica the agent and this test talk to
        // first dies while the interrupted stage runs again: both move on
        // to the other one.
        let started = Instant::now();
        while !host.store.stages(id).unwrap().iter().any(|s| s.id == "s1-STEP" && s.attempts == 2) {
            assert!(started.elapsed() < Duration::from_secs(30), "the interrupted stage did not start again");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        replicas.kill(0);
    }
    let started = Instant::now();
    while !host.store.deployment(id).unwrap().unwrap().status.is_final() {
        assert!(started.elapsed() < Duration::from_secs(30), "the resumed deployment did not finish");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let d = host.store.deployment(id).unwrap().unwrap();
    assert_eq!(d.status, DeploymentStatus::Success, "{d:?}");
    assert_eq!(world.marks("one").len(), 1, "a stage that succeeded ran again");
    assert_eq!(world.marks("two").len(), 2, "the interrupted stage runs again");
    assert_eq!(world.marks("three").len(), 1);
    let s = stages(&host, id);
    assert_eq!(s.iter().map(|s| s.attempts).collect::<Vec<_>>(), vec![1, 2, 1]);
    if let Some(replicas) = &world.replicas {
        let audit = replicas.audit();
        let did = |subject: &str, action: &str| audit.iter().any(|e| e.subject == subject && e.action == action && e.outcome == "ok" && e.target.contains(id));
        assert!(did(cordon_tests::replicas::PERSON, "insert_deployment") && did("agent", "complete_success"), "{audit:#?}");
    }
    assert!(s.iter().all(|s| s.status == StageStatus::Success));
}

/// Waits up to `within` for `child` to exit.
fn exits_within(child: &mut std::process::Child, within: Duration) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(started.elapsed() < within, "the agent did not exit within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGTERM stops an agent gracefully: it claims nothing more and lets a
/// running deployment finish within `--grace`; one that does not finish
/// in time is handed over (interrupted, its lease ended so it is
/// claimable at once) and resumed by the next agent. Its diagnostics are
/// JSON lines when asked.
#[tokio::test]
async fn sigterm_lets_deployments_finish_then_hands_over_the_rest() {
    let world = World::new();
    let host = world.host().await;
    let short = world.app("short", "name: short\npipeline:\n  stages:\n    - { name: STEP, with: { marker: /marks/short, sleep_ms: 1500 } }\n");
    let long = world.app("long", "name: long\npipeline:\n  stages:\n    - { name: STEP, with: { marker: /marks/long, sleep_ms: 8000 } }\n");

    let short_id = cordon_pipeline::trigger(&host, &short, message("")).await.unwrap().id;
    let mut agent = AgentProcess(
        agent_command(&world, &world.config)
            .args(["--grace", "20s"])
            .env("CORDON_LOG_FORMAT", "json")
            .env("CORDON_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (out, err) = (lines_of(agent.0.stdout.take().unwrap()), lines_of(agent.0.stderr.take().unwrap()));
    wait_for_stage(&host, &short_id, "s0-STEP", StageStatus::Running).await;
    assert!(signal(&agent.0, "-TERM"));
    let mut said = Vec::new();
    expect_line(&out, "agent stopping: claiming nothing more", Duration::from_secs(10), &mut said);
    let long_id = cordon_pipeline::trigger(&host, &long, message("")).await.unwrap().id;
    assert!(exits_within(&mut agent.0, Duration::from_secs(30)).success());
    assert_eq!(host.store.deployment(&short_id).unwrap().unwrap().status, DeploymentStatus::Success, "the running deployment finished");
    assert!(world.marks("long").is_empty(), "a stopping agent claimed a deployment");
    said.extend(out.iter());
    assert_eq!(said.last().map(String::as_str), Some("agent stopped"), "{said:?}");
    let logs: Vec<serde_json::Value> = err.iter().map(|l| serde_json::from_str(&l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}"))).collect();
    assert!(logs.iter().any(|l| l["level"] == "INFO" && l["fields"]["message"].as_str().is_some_and(|m| m.contains(&format!("deployment {short_id} finished")))), "{logs:?}");

    // Too long for the grace: handed over, and resumed by the next agent.
    let mut agent = AgentProcess(agent_command(&world, &world.config).args(["--grace", "300ms"]).stdout(std::process::Stdio::null()).spawn().unwrap());
    wait_for_stage(&host, &long_id, "s0-STEP", StageStatus::Running).await;
    assert!(signal(&agent.0, "-TERM"));
    assert!(exits_within(&mut agent.0, Duration::from_secs(4)).success(), "the agent waited for the stage instead of handing it over");
    assert!(host.store.claimable().unwrap().iter().any(|d| d.id == long_id), "the handed-over deployment's lease did not end");
    let _agent = start_agent(&world);
    let started = Instant::now();
    while !host.store.deployment(&long_id).unwrap().unwrap().status.is_final() {
        assert!(started.elapsed() < Duration::from_secs(30), "the handed-over deployment did not finish");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(host.store.deployment(&long_id).unwrap().unwrap().status, DeploymentStatus::Success);
    assert_eq!(stages(&host, &long_id)[0].attempts, 2, "the interrupted stage ran again");
    assert_eq!(world.marks("long").len(), 2);
}

#[tokio::test]
async fn twenty_concurrent_deployments_across_ten_applications() {
    let world = World::new();
    let host = world.host().await;
    let mut ids = Vec::new();
    for a in 0..10 {
        let app = world.app(&format!("app{a}"), &format!("name: app{a}\npipeline:\n  stages:\n    - {{ name: STEP, with: {{ sleep_ms: 200, marker: /marks/app{a} }} }}\n    - {{ name: STEP }}\n"));
        for _ in 0..2 {
            ids.push(cordon_pipeline::trigger(&host, &app, message("")).await.unwrap().id);
        }
    }
    let started = Instant::now();
    serve_until_idle(&host, &world.dir.path().join("state")).await;
    for id in &ids {
        let d = host.store.deployment(id).unwrap().unwrap();
        assert_eq!(d.status, DeploymentStatus::Success, "{d:?}");
        assert!(stages(&host, id).iter().all(|s| s.status == StageStatus::Success && s.attempts == 1));
    }
    for a in 0..10 {
        assert_eq!(world.marks(&format!("app{a}")).len(), 2);
        let first = host.store.deployment(&format!("app{a}-1")).unwrap().unwrap();
        let second = host.store.deployment(&format!("app{a}-2")).unwrap().unwrap();
        assert!(second.started_at.unwrap() >= first.finished_at.unwrap(), "the second deployment of app{a} did not wait its turn");
    }
    // Ten applications at once: far less than twenty sequential deployments.
    assert!(started.elapsed() < Duration::from_secs(8), "took {:?}", started.elapsed());
}

#[tokio::test]
async fn a_relative_config_path_stores_absolute_paths() {
    let world = World::new();
    let yaml = std::fs::read_to_string(&world.config).unwrap();
    let state = world.dir.path().join("state");
    std::fs::write(world.dir.path().join("rel.yaml"), yaml.replace(&format!("state-dir: {}", state.display()), "state-dir: state")).unwrap();
    world.app("rel", "name: rel\npipeline:\n  stages:\n    - { name: STEP }\n");
    // Queued from the config's directory with a relative path…
    let out = world.bare_command().current_dir(world.dir.path()).args(["--config", "rel.yaml", "deploy", "apps/rel", "--detach"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let host = world.host().await;
    let d = host.store.deployment("rel-1").unwrap().unwrap();
    let source = host.source(&d.target_snapshot).unwrap();
    assert!(source.is_absolute() && source.starts_with(&state), "{}", source.display());
    // …and run by an agent started elsewhere.
    let _agent = AgentProcess(agent_command(&world, &world.dir.path().join("rel.yaml")).current_dir("/").spawn().unwrap());
    let started = Instant::now();
    while !host.store.deployment("rel-1").unwrap().unwrap().status.is_final() {
        assert!(started.elapsed() < Duration::from_secs(30), "the deployment did not finish");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let d = host.store.deployment("rel-1").unwrap().unwrap();
    assert_eq!(d.status, DeploymentStatus::Success, "{d:?}");
}

#[tokio::test]
async fn concurrent_deploys_of_one_application_each_get_their_own_snapshot() {
    const PROCESSES: usize = 6;
    const EACH: usize = 5;
    let world = World::new();
    let app = world.app("race", "name: race\npipeline:\n  stages:\n    - { name: STEP }\n");
    // What a killed upload left: swept by the next trigger.
    let snapshots = world.dir.path().join("state/snapshots");
    std::fs::create_dir_all(snapshots.join(".upload-killed/tree")).unwrap();
    std::fs::write(snapshots.join(".upload-killed/.owner"), "").unwrap();
    let children: Vec<_> = (0..PROCESSES)
        .map(|_| {
            let commands: Vec<_> = (0..EACH).map(|_| world.command(&["deploy", app.to_str().unwrap(), "--detach"])).collect();
            std::thread::spawn(move || commands.into_iter().map(|mut c| c.output().unwrap()).collect::<Vec<_>>())
        })
        .collect();
    for child in children {
        for out in child.join().unwrap() {
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
    }
    let host = world.host().await;
    let deployments = host.store.deployments(Some("race"), usize::MAX).unwrap();
    assert_eq!(deployments.len(), PROCESSES * EACH);
    for d in &deployments {
        assert!(host.source(&d.target_snapshot).unwrap().join("app.cordon.yaml").exists(), "{} has no snapshot", d.id);
    }
    let mut left: Vec<String> = std::fs::read_dir(&snapshots).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    left.retain(|n| n.starts_with('.'));
    assert!(left.is_empty(), "staging left behind: {left:?}");
    // A shared store keeps one snapshot per content, fetched here once.
    let expected = if cordon_tests::on_postgres() { 1 } else { PROCESSES * EACH };
    assert_eq!(std::fs::read_dir(&snapshots).unwrap().count(), expected);
}

#[test]
fn a_follower_says_when_the_agent_is_gone() {
    let world = World::new();
    let app = world.app("gone", "name: gone\npipeline:\n  stages:\n    - { id: soak, name: STEP, with: { sleep_ms: 60000 } }\n");
    let mut agent = start_agent(&world);
    let started = Instant::now();
    let reported = || cordon_pipeline::open_store(&world.agent_config()).is_ok_and(|s| !s.agents().unwrap().is_empty());
    while !reported() {
        assert!(started.elapsed() < Duration::from_secs(30), "the agent never reported");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut follower = world
        .command(&["deploy", app.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines = lines_of(follower.stdout.take().unwrap());
    let mut seen = Vec::new();
    expect_line(&lines, "stage soak running", Duration::from_secs(30), &mut seen);
    assert!(seen.iter().any(|l| l.contains("an agent is running")), "{seen:?}");
    assert!(!seen.iter().any(|l| l.contains("warning")), "a live agent is not reported as gone: {seen:?}");
    agent.0.kill().unwrap();
    agent.0.wait().unwrap();
    expect_line(&lines, "warning: no agent has reported for", Duration::from_secs(20), &mut seen);
    let _agent = start_agent(&world);
    expect_line(&lines, "an agent that may run it is reporting", Duration::from_secs(20), &mut seen);
    follower.kill().unwrap();
    follower.wait().unwrap();
}

/// Issue #18 item 3: a running agent loaded its plugins when it started, so
/// it cannot run a deployment that needs a plugin added to the config
/// since. On the embedded database, whose only agent it is, `deploy`
/// refuses such a deployment (exit 2, nothing recorded) naming the fix;
/// on a shared one (where another agent may have the plugin) it is queued
/// with a warning naming what the live agent lacks.
#[tokio::test]
async fn a_deployment_the_running_agent_cannot_run_is_refused_or_announced() {
    let world = World::custom(&[("wait", "executor")], |_| String::new());
    let host = world.host().await;
    let _agent = start_agent(&world);
    let started = Instant::now();
    while !host.store.agents().unwrap().iter().any(|beat| cordon_pipeline::agent::silence(beat, cordon_store::now_ms()) < cordon_pipeline::agent::STALE) {
        assert!(started.elapsed() < Duration::from_secs(30), "the agent never reported");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let newer = world.dir.path().join("newer.yaml");
    let text = std::fs::read_to_string(&world.config).unwrap() + &cordon_tests::plugin_entry("spin", "executor", "");
    std::fs::write(&newer, text).unwrap();
    let app = world.app("s", "name: s\npipeline:\n  stages:\n    - { name: SPIN, timeout: 1s }\n");
    let out = world.bare_command().arg("--config").arg(&newer).args(["deploy", app.to_str().unwrap(), "--detach"]).output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    if cordon_tests::on_postgres() {
        assert!(out.status.success(), "{said}");
        assert!(said.contains("no live agent may run this deployment") && said.contains("lacks stage SPIN"), "{said}");
    } else {
        assert_eq!(out.status.code(), Some(2), "{said}");
        assert!(said.contains("the running agent cannot run this deployment") && said.contains("lacks stage SPIN") && said.contains("restart it"), "{said}");
        assert!(host.store.deployments(Some("s"), 10).unwrap().is_empty(), "a refused deployment was recorded");
    }
    // What the running agent can run is queued as before.
    let app = world.app("w", "name: w\npipeline:\n  stages:\n    - { name: WAIT, with: { duration: 0 } }\n");
    let out = world.bare_command().arg("--config").arg(&newer).args(["deploy", app.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Retention (`keep-deployments: 2`): after each deployment the agent
/// deletes the application's finished deployments beyond the newest two,
/// with their stages, logs and snapshot directories — never the last
/// success, whose snapshot the next deployment runs against — and a new
/// deployment never takes a deleted one's number. `cordon prune` applies
/// it on demand (through a server, as an admin), and names what it deleted
/// (with `--dry-run`, what it would delete).
#[tokio::test(flavor = "multi_thread")]
async fn retention_deletes_old_history_and_keeps_what_is_needed() {
    let world = World::with(|_| "retention: { keep-deployments: 2 }\n".into());
    let host = world.host().await;
    let state = world.dir.path().join("state");
    let yaml = |status: &str| format!("name: site\nplanner: {{ alwaysUsePipeline: true }}\npipeline:\n  stages:\n    - {{ id: one, name: STEP, with: {{ status: {status} }} }}\n");
    let app = world.app("site", &yaml("success"));
    let ids = |host: &Host| -> Vec<String> { host.store.deployments(Some("site"), 100).unwrap().into_iter().map(|d| d.id).collect() };
    for status in ["success", "success", "failure", "failure", "failure"] {
        std::fs::write(app.join("app.cordon.yaml"), yaml(status)).unwrap();
        deploy(&host, &state, &app, message(status)).await;
    }
    assert_eq!(ids(&host), ["site-5", "site-4", "site-2"], "the newest two finished and the last success stay");
    for gone in ["site-1", "site-3"] {
        assert_eq!(host.store.deployment(gone).unwrap(), None);
        // A server refuses to read rows of a deployment it does not know.
        if world.replicas.is_none() {
            assert!(host.store.stages(gone).unwrap().is_empty() && host.store.logs(gone, None, 0, 10).unwrap().is_empty());
        }
    }
    let snapshots = state.join("snapshots");
    let local = |id: &str| snapshots.join(id).exists();
    if !cordon_tests::on_postgres() {
        assert!(!local("site-1") && !local("site-3") && !snapshots.join("site-1.lock").exists());
        assert!(local("site-2") && local("site-4") && local("site-5"));
    }
    let leftovers: Vec<_> = std::fs::read_dir(&snapshots).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().starts_with('.')).collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // A new success: site-2 is no longer needed, and numbers go on.
    std::fs::write(app.join("app.cordon.yaml"), yaml("success")).unwrap();
    let sixth = deploy(&host, &state, &app, message("six")).await;
    assert_eq!((sixth.id.as_str(), sixth.status), ("site-6", DeploymentStatus::Success));
    assert_eq!(ids(&host), ["site-6", "site-5"]);
    if !cordon_tests::on_postgres() {
        assert!(!local("site-2") && local("site-6"));
    }

    let out = world.cordon(&["prune", "--keep", "1", "--dry-run"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("site: would delete 1 deployment(s) (site-5) and 1 snapshot(s) only they use"), "{stdout}");
    assert_eq!(ids(&host), ["site-6", "site-5"], "a dry run deletes nothing");
    let out = world.cordon(&["prune", "--keep", "1"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("site: deleted 1 deployment(s) (site-5)"), "{stdout}");
    assert_eq!(ids(&host), ["site-6"]);
    let out = world.cordon(&["prune", "--keep", "3", "nope"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("no application `nope`") && stderr.contains("cordon status"), "{stderr}");
    if let Some(replicas) = &world.replicas {
        // An agent of the server leaves retention to the server.
        let out = agent_command(&world, &world.config).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains("set `retention:` in the server's config"), "{stderr}");
        let audit = replicas.audit();
        assert!(audit.iter().any(|a| a.action == "delete_deployments" && a.target == "application site" && a.outcome == "ok"), "{audit:#?}");
    }
    // A later deployment still runs against the last success's snapshot.
    let seventh = deploy(&host, &state, &app, message("seven")).await;
    assert_eq!((seventh.id.as_str(), seventh.status), ("site-7", DeploymentStatus::Success));
}
