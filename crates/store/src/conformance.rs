//! One suite, every backend: each test here runs against SQLite (a
//! temporary file) and against PostgreSQL (its own throwaway cluster), so
//! the two cannot drift apart in what agents rely on.

use std::num::NonZeroUsize;
use std::time::Duration;

use super::*;

/// Opens another handle on the same state (another process, in effect).
type Open<'a> = &'a (dyn Fn() -> Box<dyn StateStore> + Sync);

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[test]
                fn $name() {
                    let dir = tempfile::tempdir().unwrap();
                    let path = dir.path().join("state.db");
                    super::$name(&|| Box::new(crate::SqliteStore::open(&path).unwrap()));
                }
            )*
        }
        mod postgres {
            $(
                #[test]
                fn $name() {
                    let url = crate::test_cluster::Cluster::shared().database();
                    super::$name(&|| Box::new(crate::PostgresStore::open(&url, None, "the test database").unwrap()));
                }
            )*
        }
    };
}

conformance!(
    plugin_writes_stay_within_their_quota,
    stages_answer_their_own_commands_once,
    many_agents_can_open_a_new_database_at_once,
    a_stage_result_is_recorded_once_and_resume_resets_running_stages,
    a_deployment_is_claimed_once_in_application_order,
    a_stale_lease_can_write_nothing,
    concurrent_log_writers_never_hide_a_line_from_a_follower,
    text_with_nul_is_kept_readable_or_refused_alike,
    stored_snapshots_and_a_paused_target_swap,
    tokens_and_the_audit_log,
    retention_deletes_finished_history_and_spares_the_rest,
);

/// Retention deletes an application's finished deployments beyond the
/// newest (by number) with all their rows, never an unfinished one, the
/// last success or another application's; stored snapshots go only when
/// nothing names them and they are older than the grace.
fn retention_deletes_finished_history_and_spares_the_rest(open: Open) {
    let store = open();
    let ran = |id: &str, app: &str, target: &str, running: &str, success: bool| {
        store.insert_deployment(&DeploymentRecord::queued(id, app, "{}".into(), target.into(), 1)).unwrap();
        let f = store.claim(id, "a", LEASE).unwrap().expect("claimable");
        store.save_plan(&f, "{}", running, &[StageRecord { deployment: id.into(), ..stage("s1", 0) }], 2).unwrap();
        store.start_stage(&f, "s1", 3).unwrap();
        let line = LogRecord { seq: 0, deployment: id.into(), stage: "s1".into(), at_ms: 4, source: "plugin".into(), text: "hi".into() };
        store.append_logs(&f, &[line]).unwrap();
        store.metadata_put(&f, "s1", "k", "v").unwrap();
        let command = CommandRecord { id: format!("c-{id}"), deployment: id.into(), stage: "s1".into(), kind: CommandKind::Approve,
            commander: "ann".into(), created_at: 5, answer: None };
        store.add_command(&command).unwrap();
        if success { store.complete_success(&f, "", 6).unwrap() } else { store.set_deployment_status(&f, DeploymentStatus::Failure, "", 6).unwrap() }
        store.release(&f).unwrap();
    };
    store.upsert_application("web", "/apps/web").unwrap();
    store.upsert_application("api", "/apps/api").unwrap();
    store.snapshot_put("sha256:two", b"2").unwrap();
    ran("web-1", "web", "/snap/web-1", "", true);
    ran("web-2", "web", "sha256:two", "/snap/web-1", false);
    ran("web-3", "web", "/snap/web-3", "/snap/web-1", false);
    ran("web-9", "web", "/snap/web-9", "/snap/web-1", true);
    ran("web-10", "web", "/snap/web-10", "/snap/web-9", false);
    ran("api-1", "api", "/snap/api-1", "", false);
    store.insert_deployment(&DeploymentRecord::queued("web-11", "web", "{}".into(), "/snap/web-11".into(), 7)).unwrap();

    // Keeping one: web-10 is the newest finished (by number, not by
    // name), web-9 the last success, web-11 unfinished.
    let mut removed = Vec::new();
    let deleted = retention::prune(store.as_ref(), "web", NonZeroUsize::new(1).unwrap(), |r| {
        removed.push(r.to_string());
        Ok(())
    })
    .unwrap();
    assert_eq!(deleted.deployments, ["web-3", "web-2", "web-1"]);
    assert_eq!(removed, ["/snap/web-1", "/snap/web-3"], "finished web-9 naming web-1 as its running source does not keep it");
    assert!(deleted.snapshots.is_empty(), "sha256:two is younger than the grace");
    for id in ["web-1", "web-2", "web-3"] {
        assert_eq!(store.deployment(id).unwrap(), None);
        assert!(store.stages(id).unwrap().is_empty() && store.logs(id, None, 0, 10).unwrap().is_empty());
        assert!(store.metadata_entries(id, "s1").unwrap().is_empty() && store.commands(id, None).unwrap().is_empty());
    }
    let left: Vec<String> = store.deployments(None, 10).unwrap().into_iter().map(|d| d.id).collect();
    assert_eq!(left, ["web-11", "api-1", "web-10", "web-9"]);

    // The store refuses on its own what must stay, whatever it is asked.
    let ids: Vec<String> = ["web-9", "web-11", "api-1", "nope"].map(String::from).to_vec();
    assert_eq!(store.delete_deployments("web", &ids, Duration::ZERO).unwrap(), Deleted { deployments: vec![], snapshots: vec!["sha256:two".into()] });
    assert_eq!(store.snapshot_get("sha256:two").unwrap(), None, "no longer named and past a zero grace");
    assert_eq!(store.deployments(None, 10).unwrap().len(), 4);
    let again = retention::prune(store.as_ref(), "web", NonZeroUsize::new(1).unwrap(), |_| panic!("nothing to remove")).unwrap();
    assert_eq!(again, Deleted::default());
    store.snapshot_put("sha256:young", b"y").unwrap();
    assert!(store.delete_deployments("web", &[], Duration::from_secs(60)).unwrap().snapshots.is_empty());
    assert!(store.snapshot_get("sha256:young").unwrap().is_some());
}

/// Tokens come back as stored and are revoked once; audit entries come
/// back in order, each with its own sequence number.
fn tokens_and_the_audit_log(open: Open) {
    let store = open();
    let token = TokenRecord {
        id: "tok-000000000001".into(),
        hash: "ab".repeat(32),
        subject: "alice".into(),
        role: "approver".into(),
        applications: vec!["web-*".into(), "api".into()],
        created_at: 5,
        created_by: "root".into(),
        expires_at: Some(99),
        revoked_at: None,
    };
    store.token_insert(&token).unwrap();
    assert!(store.token_insert(&token).is_err(), "ids are unique");
    assert_eq!(store.token(&token.id).unwrap().as_ref(), Some(&token));
    assert_eq!(store.token("tok-nope").unwrap(), None);
    assert!(store.token_revoke(&token.id, 7).unwrap());
    assert!(!store.token_revoke(&token.id, 8).unwrap(), "revoked once");
    assert_eq!(store.tokens().unwrap()[0].revoked_at, Some(7));

    for (i, outcome) in ["ok", "forbidden", "ok"].iter().enumerate() {
        let entry = AuditRecord {
            seq: 0,
            at: i as u64,
            subject: "alice".into(),
            action: "approve".into(),
            target: "deployment d1".into(),
            client: "127.0.0.1:5".into(),
            outcome: outcome.to_string(),
        };
        open().audit_append(&entry).unwrap();
    }
    let all = store.audit(0, 10).unwrap();
    assert_eq!(all.iter().map(|e| e.outcome.as_str()).collect::<Vec<_>>(), ["ok", "forbidden", "ok"]);
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(store.audit(all[0].seq, 1).unwrap(), all[1..2]);
    assert_eq!(store.audit(0, usize::MAX).unwrap(), all, "no limit");
}

/// Snapshots are kept by reference, once; a deployment's target moves to
/// another snapshot only from the one expected and while a stage is paused.
fn stored_snapshots_and_a_paused_target_swap(open: Open) {
    let store = open();
    store.snapshot_put("sha256:a", b"one").unwrap();
    store.snapshot_put("sha256:a", b"other").unwrap();
    assert_eq!(store.snapshot_get("sha256:a").unwrap().as_deref(), Some(&b"one"[..]), "a reference keeps its first archive");
    assert_eq!(store.snapshot_get("sha256:b").unwrap(), None);

    let fence = queued_and_claimed(store.as_ref(), "d1", "app");
    store.save_plan(&fence, "{}", "", &[stage("s1", 0)], 1).unwrap();
    assert!(!store.replace_target_snapshot("d1", "/snap/d1", "sha256:a").unwrap(), "nothing is paused");
    store.start_stage(&fence, "s1", 2).unwrap();
    assert!(store.transition_stage(&fence, "s1", &[StageStatus::Running], StageStatus::Paused, "", 3).unwrap());
    assert!(!store.replace_target_snapshot("d1", "sha256:other", "sha256:a").unwrap(), "not from the snapshot expected");
    assert!(store.replace_target_snapshot("d1", "/snap/d1", "sha256:a").unwrap());
    assert_eq!(store.deployment("d1").unwrap().unwrap().target_snapshot, "sha256:a");
}

fn stage(id: &str, ordinal: u32) -> StageRecord {
    StageRecord {
        deployment: "d1".into(),
        id: id.into(),
        ordinal,
        name: "WAIT".into(),
        desc: String::new(),
        index: ordinal,
        rollback: false,
        options: "{}".into(),
        needs: vec![],
        plugin: "wait".into(),
        timeout_ms: 1000,
        status: StageStatus::NotStarted,
        message: String::new(),
        started_at: None,
        finished_at: None,
        attempts: 0,
    }
}

/// Queues `id` of `app` and claims it for agent `a`.
fn queued_and_claimed(store: &dyn StateStore, id: &str, app: &str) -> Fence {
    store.insert_deployment(&DeploymentRecord::queued(id, app, "{}".into(), format!("/snap/{id}"), 1)).unwrap();
    store.claim(id, "a", Duration::from_secs(60)).unwrap().expect("claimable")
}

const LEASE: Duration = Duration::from_secs(60);

/// A scope's quota counts its other entries plus the new one, so a key
/// can be rewritten in place at the limit; a refused write leaves nothing.
fn plugin_writes_stay_within_their_quota(open: Open) {
    let store = open();
    let f = queued_and_claimed(store.as_ref(), "d1", "app");
    let quota = Quota { entries: 2, bytes: 20 };
    assert!(store.metadata_put_within(&f, "s", "a", "12345678", quota).unwrap());
    assert!(store.metadata_put_within(&f, "s", "b", "1234567", quota).unwrap());
    assert!(!store.metadata_put_within(&f, "s", "c", "1", quota).unwrap(), "a third entry");
    assert!(store.metadata_put_within(&f, "s", "a", "123456789", quota).unwrap(), "rewriting within the bytes");
    assert!(!store.metadata_put_within(&f, "s", "a", "123456789012", quota).unwrap(), "passing the bytes");
    assert_eq!(store.metadata_get("d1", "s", "c").unwrap(), None);
    assert_eq!(store.metadata_get("d1", "s", "a").unwrap().as_deref(), Some("123456789"));
    assert!(store.metadata_put_within(&f, "other", "c", "1", quota).unwrap(), "another scope has its own quota");
    assert_eq!(store.metadata_entries("d1", "s").unwrap().len(), 2);
    assert!(store.blob_put_within(&f, "app", "p", "k", &[0u8; 19], quota).unwrap());
    assert!(!store.blob_put_within(&f, "app", "p", "j", &[0u8; 1], quota).unwrap());
    assert!(store.blob_put_within(&f, "app", "q", "j", &[0u8; 1], quota).unwrap());
    assert_eq!(store.blob_get("app", "p", "k").unwrap(), Some(vec![0u8; 19]));
    store.blob_delete(&f, "app", "p", "k").unwrap();
    assert_eq!(store.blob_get("app", "p", "k").unwrap(), None);

    // Many writers of one scope at once: the quota still holds.
    let quota = Quota { entries: 5, bytes: 1 << 20 };
    std::thread::scope(|s| {
        for t in 0..8 {
            let f = f.clone();
            s.spawn(move || {
                let store = open();
                for k in 0..4 {
                    store.metadata_put_within(&f, "race", &format!("{t}-{k}"), "v", quota).unwrap();
                }
            });
        }
    });
    assert_eq!(store.metadata_entries("d1", "race").unwrap().len(), 5, "concurrent writers passed the quota together");
}

/// A stage answers only its own commands, once.
fn stages_answer_their_own_commands_once(open: Open) {
    let store = open();
    let f = queued_and_claimed(store.as_ref(), "d1", "app");
    let command = |id: &str| CommandRecord {
        id: id.into(),
        deployment: "d1".into(),
        stage: "s1".into(),
        kind: CommandKind::Approve,
        commander: "mallory".into(),
        created_at: 2,
        answer: None,
    };
    store.add_command(&command("c0")).unwrap();
    store.add_command(&command("c1")).unwrap();
    store.answer_command(&f, "s2", "c1", &Answer::Accepted).unwrap();
    store.answer_command(&f, "s1", "c1", &Answer::Refused("not an approver".into())).unwrap();
    store.answer_command(&f, "s1", "c1", &Answer::Accepted).unwrap();
    store.answer_command(&f, "s1", "c0", &Answer::Accepted).unwrap();
    let answers: Vec<_> = store.commands("d1", Some("s1")).unwrap().into_iter().map(|c| (c.id, c.answer)).collect();
    assert_eq!(
        answers,
        [("c0".to_string(), Some(Answer::Accepted)), ("c1".to_string(), Some(Answer::Refused("not an approver".into())))]
    );
    assert!(store.commands("d1", Some("s2")).unwrap().is_empty());
    assert_eq!(store.commands("d1", None).unwrap().len(), 2);
}

fn many_agents_can_open_a_new_database_at_once(open: Open) {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..8).map(|_| s.spawn(|| open().applications().unwrap().len())).collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), 0);
        }
    });
}

fn a_stage_result_is_recorded_once_and_resume_resets_running_stages(open: Open) {
    let store = open();
    store.upsert_application("app", "/apps/app").unwrap();
    store.upsert_application("app", "/apps/moved").unwrap();
    assert_eq!(store.applications().unwrap().len(), 1);
    let f = queued_and_claimed(store.as_ref(), "d1", "app");
    store.save_plan(&f, "{}", "", &[stage("s0", 0), stage("s1", 1)], 2).unwrap();
    assert_eq!(store.deployment("d1").unwrap().unwrap().status, DeploymentStatus::Running);
    store.start_stage(&f, "s0", 3).unwrap();
    assert!(store.start_stage(&f, "s0", 3).is_err(), "started twice");
    assert!(store.transition_stage(&f, "s0", &[StageStatus::Running], StageStatus::Success, "", 4).unwrap());
    assert!(!store.transition_stage(&f, "s0", &[StageStatus::Running], StageStatus::Failure, "again", 5).unwrap(), "recorded twice");
    store.start_stage(&f, "s1", 6).unwrap();
    assert_eq!(store.reset_running_stages(&f).unwrap(), 1);
    let stages = store.stages("d1").unwrap();
    assert_eq!((stages[0].status, stages[1].status), (StageStatus::Success, StageStatus::NotStarted));
    assert_eq!((stages[1].attempts, stages[0].finished_at), (1, Some(4)));
    store.set_deployment_status(&f, DeploymentStatus::RollingBack, "why", 7).unwrap();
    let d = store.deployment("d1").unwrap().unwrap();
    assert_eq!((d.status, d.reason.as_str(), d.started_at, d.finished_at), (DeploymentStatus::RollingBack, "why", Some(2), None));
    store.complete_success(&f, "", 8).unwrap();
    let app = store.application("app").unwrap().unwrap();
    assert_eq!((app.running_snapshot.as_deref(), app.last_success.as_deref(), app.dir.as_str()), (Some("/snap/d1"), Some("d1"), "/apps/moved"));
    assert!(store.unfinished_deployments().unwrap().is_empty());
    assert_eq!(store.deployment("d1").unwrap().unwrap().finished_at, Some(8));
    assert_eq!(store.deployments(Some("app"), 10).unwrap().len(), 1);
    assert!(store.deployments(Some("other"), 10).unwrap().is_empty());

    let beat = AgentBeat {
        id: "h/1".into(),
        name: "prod-eu".into(),
        host: "h".into(),
        pid: 1,
        started_at: 1,
        beat_at: 2,
        labels: [("env".to_string(), "prod".to_string())].into(),
        stages: vec!["WAIT".into()],
        plugins: vec!["wait".into()],
    };
    store.heartbeat(&beat).unwrap();
    store.heartbeat(&AgentBeat { beat_at: 5, ..beat.clone() }).unwrap();
    assert_eq!(store.agents().unwrap(), [AgentBeat { beat_at: 5, ..beat.clone() }], "labels, stages and plugins come back as written");

    let requires = Requirements { labels: [("env".to_string(), "prod".to_string())].into(), stages: vec!["WAIT".into()], plugins: vec![] };
    let d2 = DeploymentRecord { requires: requires.clone(), ..DeploymentRecord::queued("d2", "app", "{}".into(), String::new(), 9) };
    store.insert_deployment(&d2).unwrap();
    assert_eq!(store.deployment("d2").unwrap().unwrap().requires, requires);
    assert_eq!(store.claimable().unwrap()[0].requires, requires, "claimable deployments carry their requirements");
    assert!(requires.unmet_by(&beat).is_empty());
}

/// One agent at a time holds a deployment; an application's deployments
/// are claimable one after another in order; an expired lease is claimed
/// again with a higher epoch.
fn a_deployment_is_claimed_once_in_application_order(open: Open) {
    let store = open();
    for (id, app) in [("a-1", "a"), ("a-2", "a"), ("b-1", "b")] {
        store.insert_deployment(&DeploymentRecord::queued(id, app, "{}".into(), String::new(), 1)).unwrap();
    }
    let claimable = |store: &dyn StateStore| store.claimable().unwrap().into_iter().map(|d| d.id).collect::<Vec<_>>();
    assert_eq!(claimable(store.as_ref()), ["a-1", "b-1"]);
    assert_eq!(store.claim("a-2", "x", LEASE).unwrap(), None, "a-2 waits for a-1");

    // Many agents race for a-1: exactly one wins.
    let winners: Vec<Fence> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6).map(|i| s.spawn(move || open().claim("a-1", &format!("agent{i}"), LEASE).unwrap())).collect();
        handles.into_iter().filter_map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(winners.len(), 1, "{winners:?}");
    let a1 = winners[0].clone();
    assert_eq!(a1.epoch, 1);
    assert_eq!(claimable(store.as_ref()), ["b-1"]);
    assert!(store.lease("a-1").unwrap().unwrap().1.is_some_and(|owner| owner.starts_with("agent")));

    // A short lease runs out and another agent takes the deployment over.
    let b1 = store.claim("b-1", "x", Duration::from_millis(50)).unwrap().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(store.renew("x", std::slice::from_ref(&b1), LEASE).unwrap(), Vec::<Fence>::new(), "nobody took it yet");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(store.claim("b-1", "y", LEASE).unwrap(), None, "renewed: still x's");
    store.release(&b1).unwrap();
    let taken = store.claim("b-1", "y", LEASE).unwrap().unwrap();
    assert_eq!(taken.epoch, b1.epoch + 1);
    assert_eq!(store.renew("x", std::slice::from_ref(&b1), LEASE).unwrap(), std::slice::from_ref(&b1), "x lost it");
    assert_eq!(store.lease("b-1").unwrap().unwrap(), (taken.clone(), Some("y".to_string())));

    // Finished: the next of the application becomes claimable.
    store.complete_success(&a1, "", 2).unwrap();
    store.release(&a1).unwrap();
    assert_eq!(claimable(store.as_ref()), ["a-2"]);
    assert_eq!(store.expire_leases().unwrap(), 1, "b-1's lease");
    assert_eq!(claimable(store.as_ref()), ["a-2", "b-1"]);
}

/// Once another agent has claimed a deployment, nothing the previous
/// holder writes for it lands.
fn a_stale_lease_can_write_nothing(open: Open) {
    let store = open();
    let old = queued_and_claimed(store.as_ref(), "d1", "app");
    store.save_plan(&old, "{}", "", &[stage("s0", 0), stage("s1", 1)], 2).unwrap();
    store.start_stage(&old, "s0", 3).unwrap();
    store.add_command(&CommandRecord {
        id: "c".into(),
        deployment: "d1".into(),
        stage: "s0".into(),
        kind: CommandKind::Approve,
        commander: "alice".into(),
        created_at: 3,
        answer: None,
    })
    .unwrap();
    store.release(&old).unwrap();
    let new = store.claim("d1", "b", LEASE).unwrap().unwrap();
    assert!(new.epoch > old.epoch);

    let quota = Quota { entries: 10, bytes: 1000 };
    let line = LogRecord { seq: 0, deployment: "d1".into(), stage: "s0".into(), at_ms: 4, source: "stdout".into(), text: "late".into() };
    let refusals: Vec<(&str, anyhow::Error)> = vec![
        ("save_plan", store.save_plan(&old, "{}", "", &[], 4).unwrap_err()),
        ("set_deployment_status", store.set_deployment_status(&old, DeploymentStatus::Failure, "late", 4).unwrap_err()),
        ("complete_success", store.complete_success(&old, "late", 4).unwrap_err()),
        ("start_stage", store.start_stage(&old, "s1", 4).unwrap_err()),
        ("transition_stage", store.transition_stage(&old, "s0", &[StageStatus::Running], StageStatus::Success, "", 4).unwrap_err()),
        ("reset_running_stages", store.reset_running_stages(&old).unwrap_err()),
        ("append_logs", store.append_logs(&old, std::slice::from_ref(&line)).unwrap_err()),
        ("metadata_put", store.metadata_put(&old, "", "k", "late").unwrap_err()),
        ("metadata_put_within", store.metadata_put_within(&old, "s0", "k", "late", quota).unwrap_err()),
        ("blob_put_within", store.blob_put_within(&old, "app", "p", "k", b"late", quota).unwrap_err()),
        ("blob_delete", store.blob_delete(&old, "app", "p", "k").unwrap_err()),
        ("answer_command", store.answer_command(&old, "s0", "c", &Answer::Accepted).unwrap_err()),
    ];
    let attempted: Vec<&str> = refusals.iter().map(|(write, _)| *write).collect();
    for (write, e) in &refusals {
        assert!(is_fenced(e), "{write}: {e:#}");
        assert!(e.to_string().contains("taken over"), "{write}: {e}");
    }
    assert_eq!(store.renew("a", std::slice::from_ref(&old), LEASE).unwrap(), std::slice::from_ref(&old));
    let recorded = store.refused_writes("d1").unwrap();
    assert!(recorded.iter().all(|r| r.epoch == old.epoch), "{recorded:?}");
    let mut recorded: Vec<&str> = recorded.iter().map(|r| r.write.as_str()).collect();
    let mut want = attempted.clone();
    want.push("renew");
    recorded.sort();
    want.sort();
    assert_eq!(recorded, want, "every refused write is recorded");
    // Refused again and again: still one row per kind of write.
    for _ in 0..50 {
        assert!(is_fenced(&store.append_logs(&old, &[LogRecord { text: "again".into(), ..line.clone() }]).unwrap_err()));
    }
    assert_eq!(store.refused_writes("d1").unwrap().len(), want.len(), "a row per refused line");
    let d = store.deployment("d1").unwrap().unwrap();
    assert_eq!((d.status, d.reason.as_str()), (DeploymentStatus::Running, ""));
    let stages = store.stages("d1").unwrap();
    assert_eq!((stages.len(), stages[0].status, stages[1].status), (2, StageStatus::Running, StageStatus::NotStarted));
    assert!(store.logs("d1", None, 0, 10).unwrap().is_empty());
    assert!(store.metadata_entries("d1", "").unwrap().is_empty() && store.metadata_entries("d1", "s0").unwrap().is_empty());
    assert_eq!(store.blob_get("app", "p", "k").unwrap(), None);
    assert_eq!(store.commands("d1", None).unwrap()[0].answer, None);
    // The new holder writes.
    assert_eq!(store.reset_running_stages(&new).unwrap(), 1);
    store.metadata_put(&new, "", "k", "v").unwrap();
}

/// Stages of one deployment log at once while a follower reads "after
/// the last line I saw": it sees every line.
fn concurrent_log_writers_never_hide_a_line_from_a_follower(open: Open) {
    const WRITERS: usize = 4;
    const BATCHES: usize = 50;
    let store = open();
    let fence = queued_and_claimed(store.as_ref(), "d1", "app");
    let done = std::sync::atomic::AtomicUsize::new(0);
    let seen = std::thread::scope(|s| {
        for w in 0..WRITERS {
            let (fence, done) = (fence.clone(), &done);
            s.spawn(move || {
                let store = open();
                for b in 0..BATCHES {
                    let lines: Vec<LogRecord> = (0..3)
                        .map(|i| LogRecord {
                            seq: 0,
                            deployment: String::new(),
                            stage: format!("s{w}"),
                            at_ms: 1,
                            source: "stdout".into(),
                            text: format!("{w}/{b}/{i}"),
                        })
                        .collect();
                    store.append_logs(&fence, &lines).unwrap();
                }
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
        let follower = open();
        let mut seen = Vec::new();
        let mut after = 0;
        loop {
            let finished = done.load(std::sync::atomic::Ordering::SeqCst) == WRITERS;
            let lines = follower.logs("d1", None, after, 1000).unwrap();
            if let Some(last) = lines.last() {
                after = last.seq;
            }
            seen.extend(lines.into_iter().map(|l| (l.deployment, l.text)));
            if finished && follower.logs("d1", None, after, 1).unwrap().is_empty() {
                break seen;
            }
        }
    });
    assert_eq!(seen.len(), WRITERS * BATCHES * 3, "the follower missed lines");
    assert!(seen.iter().all(|(d, _)| d == "d1"));
    for w in 0..WRITERS {
        let mine: Vec<&String> = seen.iter().map(|(_, t)| t).filter(|t| t.starts_with(&format!("{w}/"))).collect();
        let want: Vec<String> = (0..BATCHES).flat_map(|b| (0..3).map(move |i| format!("{w}/{b}/{i}"))).collect();
        assert_eq!(mine, want.iter().collect::<Vec<_>>(), "writer {w}'s lines out of order");
    }
}

/// Plugins can put NUL in what they write; PostgreSQL text cannot hold it.
/// Every backend keeps free text with U+FFFD instead and refuses keys and
/// values that must come back exactly, with a message saying so.
fn text_with_nul_is_kept_readable_or_refused_alike(open: Open) {
    let store = open();
    let f = queued_and_claimed(store.as_ref(), "d1", "app");
    store.save_plan(&f, "{}", "", &[stage("s0", 0)], 2).unwrap();
    let line = LogRecord { seq: 0, deployment: String::new(), stage: "s0".into(), at_ms: 1, source: "stdout".into(), text: "a\0b".into() };
    store.append_logs(&f, &[line]).unwrap();
    assert_eq!(store.logs("d1", None, 0, 10).unwrap()[0].text, "a\u{FFFD}b");
    store.start_stage(&f, "s0", 3).unwrap();
    assert!(store.transition_stage(&f, "s0", &[StageStatus::Running], StageStatus::Failure, "bad\0", 4).unwrap());
    assert_eq!(store.stages("d1").unwrap()[0].message, "bad\u{FFFD}");
    store.set_deployment_status(&f, DeploymentStatus::Failure, "x\0", 5).unwrap();
    assert_eq!(store.deployment("d1").unwrap().unwrap().reason, "x\u{FFFD}");
    let quota = Quota { entries: 10, bytes: 1000 };
    for e in [
        store.metadata_put_within(&f, "s0", "k\0", "v", quota).unwrap_err(),
        store.metadata_put_within(&f, "s0", "k", "v\0", quota).unwrap_err(),
        store.metadata_put(&f, "s0", "k", "v\0").unwrap_err(),
        store.blob_put_within(&f, "app", "p", "k\0", b"\0 is fine in bytes", quota).unwrap_err(),
    ] {
        assert!(e.to_string().contains("NUL"), "{e:#}");
    }
    assert!(store.blob_put_within(&f, "app", "p", "k", b"\0 is fine in bytes", quota).unwrap());
    assert!(store.metadata_entries("d1", "s0").unwrap().is_empty());
}
