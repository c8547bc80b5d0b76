//! Many agents on one PostgreSQL database: leases, take-over after a
//! crash, fencing of a frozen agent, per-application order.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cordon_pipeline::Host;
use cordon_pipeline::plan::TriggerInfo;
use cordon_runtime::plugin::AgentConfig;
use cordon_store::test_cluster::Cluster;
use cordon_store::{DeploymentStatus, StageStatus};
use cordon_tests::{AgentProcess, World, cordon_bin, engine, expect_line, lines_of, signal};

const APPS: usize = 15;
const PER_APP: usize = 4;
const LEASE: &str = "2s";

/// An agent config like `world`'s, on the database `url`, with its own
/// state directory `state`.
fn agent_config(world: &World, url: &str, state: &Path, file: &str) -> PathBuf {
    let text = std::fs::read_to_string(&world.config).unwrap();
    let mut yaml = format!("state-dir: {}\nstate: {{ postgres: {{ url: \"{url}\", lease: {LEASE} }} }}\n", state.display());
    yaml.extend(text.lines().filter(|l| !l.starts_with("state-dir:") && !l.starts_with("state:")).map(|l| format!("{l}\n")));
    let path = world.dir.path().join(file);
    std::fs::write(&path, yaml).unwrap();
    path
}

/// A `cordon agent` process logging to `<config>.log`; killed (SIGKILL,
/// which also ends a stopped process) when dropped.
struct Agent {
    config: PathBuf,
    process: AgentProcess,
}

impl Agent {
    fn start(config: &Path) -> Agent {
        let log = std::fs::File::options().create(true).append(true).open(config.with_extension("log")).unwrap();
        let child = Command::new(cordon_bin())
            .arg("--config")
            .arg(config)
            .arg("agent")
            .env("CORDON_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        Agent { config: config.to_path_buf(), process: AgentProcess(child) }
    }

    /// The id its leases carry (`HOST/PID`).
    fn id(&self) -> String {
        format!("{}/{}", rustix::system::uname().nodename().to_string_lossy(), self.process.0.id())
    }

    fn signal(&self, name: &str) -> bool {
        signal(&self.process.0, name)
    }
}

fn random(below: usize) -> usize {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    (h.finish() % below as u64) as usize
}

/// One PostgreSQL, three agents killed (-9) at random and restarted, a
/// fourth frozen past its lease: every deployment finishes, each once, in
/// order per application, and the frozen agent's late writes are refused.
#[tokio::test(flavor = "multi_thread")]
async fn agents_killed_and_frozen_lose_nothing_and_write_nothing_late() {
    let cluster = Cluster::shared();
    let url = cluster.database();
    let world = World::new();
    let trigger_config = agent_config(&world, &url, &world.dir.path().join("state"), "trigger.yaml");
    let host = Arc::new(Host::open_with(engine().clone(), &AgentConfig::load(&trigger_config).unwrap()).await.unwrap());
    assert!(host.shared);

    let mut ids = Vec::new();
    for a in 0..APPS {
        let app = world.app(
            &format!("soak{a}"),
            &format!("name: soak{a}\npipeline:\n  stages:\n    - {{ name: STEP, with: {{ marker: /marks/soak{a}, sleep_ms: 1500 }} }}\n"),
        );
        for _ in 0..PER_APP {
            let info = TriggerInfo { commander: "soak".into(), ..Default::default() };
            ids.push(cordon_pipeline::trigger(&host, &app, info).await.unwrap().id);
        }
    }
    let configs: Vec<PathBuf> =
        (0..4).map(|i| agent_config(&world, &url, &world.dir.path().join(format!("agent{i}")), &format!("agent{i}.yaml"))).collect();
    // The fourth agent starts first and is frozen while it runs a stage,
    // until another agent has taken that deployment over and finished it.
    let frozen = Agent::start(&configs[3]);
    let started = Instant::now();
    let held = loop {
        assert!(started.elapsed() < Duration::from_secs(60), "the fourth agent never ran a stage");
        let running = ids.iter().find(|id| {
            host.store.lease(id).unwrap().is_some_and(|(_, owner)| owner == Some(frozen.id()))
                && host.store.stages(id).unwrap().iter().any(|s| s.status == StageStatus::Running)
        });
        if let Some(id) = running {
            assert!(frozen.signal("-STOP"));
            break id.clone();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (stale, _) = host.store.lease(&held).unwrap().unwrap();
    eprintln!("froze {} holding {held} (epoch {})", frozen.id(), stale.epoch);
    let mut agents: Vec<Agent> = configs[..3].iter().map(|c| Agent::start(c)).collect();

    // Meanwhile, kill agents at random and restart them.
    let mut kills = 0;
    let mut last_kill = Instant::now();
    loop {
        let unfinished = host.store.unfinished_deployments().unwrap().len();
        let taken_over = host.store.deployment(&held).unwrap().unwrap().status.is_final();
        if unfinished == 0 && taken_over {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(240), "{unfinished} deployments left after {kills} kills");
        if taken_over {
            assert!(frozen.signal("-CONT"), "the frozen agent died");
        }
        if last_kill.elapsed() > Duration::from_millis(600) {
            // The replaced agent is killed (-9) as it is dropped.
            let victim = random(agents.len());
            agents[victim] = Agent::start(&agents[victim].config.clone());
            kills += 1;
            last_kill = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(frozen.signal("-CONT"), "the frozen agent died");
    let waited = Instant::now();
    while host.store.refused_writes(&held).unwrap().is_empty() {
        assert!(waited.elapsed() < Duration::from_secs(30), "the thawed agent wrote nothing it was refused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("{} deployments, {kills} kills, in {:?}", ids.len(), started.elapsed());
    assert!(kills >= 10, "only {kills} kills landed while deployments ran");

    // Every deployment succeeded, its stage ran to one result.
    let mut by_app: BTreeMap<String, Vec<cordon_store::DeploymentRecord>> = BTreeMap::new();
    for id in &ids {
        let d = host.store.deployment(id).unwrap().unwrap();
        assert_eq!(d.status, DeploymentStatus::Success, "{d:?}");
        let stages = host.store.stages(id).unwrap();
        assert_eq!(stages.len(), 1, "{id}: {stages:?}");
        assert_eq!(stages[0].status, StageStatus::Success, "{id}: {stages:?}");
        by_app.entry(d.application.clone()).or_default().push(d);
    }
    // Per application, each deployment started after the previous one ended.
    for (app, ds) in &by_app {
        for pair in ds.windows(2) {
            assert!(pair[1].started_at.unwrap() >= pair[0].finished_at.unwrap(), "{app}: {} started before {} ended", pair[1].id, pair[0].id);
        }
        assert!(world.marks(app).len() >= PER_APP, "{app} ran fewer stages than deployments");
    }
    // The frozen agent's late writes were refused, under its stale epoch,
    // and nothing of it landed after the take-over.
    let refused = host.store.refused_writes(&held).unwrap();
    assert!(refused.iter().all(|r| r.epoch == stale.epoch), "{refused:?}");
    let (current, owner) = host.store.lease(&held).unwrap().unwrap();
    assert!(current.epoch > stale.epoch && owner != Some(frozen.id()), "{current:?} {owner:?}");
    eprintln!("refused writes of the frozen agent: {:?}", refused.iter().map(|r| r.write.as_str()).collect::<Vec<_>>());
    let log = std::fs::read_to_string(configs[3].with_extension("log")).unwrap();
    assert!(log.contains("another agent took it over") || log.contains("the agent that took it over continues"), "{log}");
}

fn cordon(config: &Path, args: &[&str]) -> std::process::Output {
    Command::new(cordon_bin()).arg("--config").arg(config).args(args).env_remove("CORDON_DATABASE_URL").output().unwrap()
}

/// The database password reaches PostgreSQL and nothing else: not an
/// error, not a log line; a config that cannot work says why, naming the
/// field.
#[test]
fn database_credentials_never_appear_in_messages() {
    const PASSWORD: &str = "s3cret-Pa55word";
    let cluster = Cluster::with_password(PASSWORD);
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, state: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, format!("state-dir: state\nstate: {state}\nplugins: []\n")).unwrap();
        path
    };
    std::fs::write(dir.path().join("good"), format!("{PASSWORD}\n")).unwrap();
    std::fs::write(dir.path().join("bad"), "not-it\n").unwrap();

    let good = write("good.yaml", &format!("{{ postgres: {{ url: \"{}\", password-file: good }} }}", cluster.url()));
    let out = cordon(&good, &["status"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let refused = [
        write("bad.yaml", &format!("{{ postgres: {{ url: \"{}\", password-file: bad }} }}", cluster.url())),
        write("inline.yaml", &format!("{{ postgres: {{ url: \"{}\" }} }}", cluster.url_with_password().replace(PASSWORD, &format!("{PASSWORD}x")))),
    ];
    for config in &refused {
        let out = cordon(config, &["status"]);
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(!out.status.success(), "{text}");
        assert!(!text.contains(PASSWORD), "the password leaked: {text}");
        assert!(text.contains(&format!("postgres://cordon@127.0.0.1:{}/cordon", cluster.port)) && text.contains("password"), "{text}");
    }

    let no_url = write("nourl.yaml", "{ postgres: { password-file: good } }");
    let out = cordon(&no_url, &["status"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("state.postgres needs `url:"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = cordon(&good, &["transfer", "backup", "--output", "x.tar"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("pg_dump"), "{}", String::from_utf8_lossy(&out.stderr));
    let zero = dir.path().join("zero.yaml");
    std::fs::write(&zero, "state-dir: state\nmax-deployments: 0\n").unwrap();
    assert!(String::from_utf8_lossy(&cordon(&zero, &["status"]).stderr).contains("max-deployments is 0"));
}

/// An agent config from `world`'s (its plugins and grants) on the
/// database `url`, with a name and labels.
fn labelled_config(world: &World, url: &str, name: &str, labels: &str) -> PathBuf {
    let path = agent_config(world, url, &world.dir.path().join(name), &format!("{name}.yaml"));
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("name: {name}\nlabels: {labels}\n{text}")).unwrap();
    path
}

/// Waits until the deployment `id` ended; returns the agent that ran it.
async fn ran_by(host: &Host, id: &str) -> String {
    let started = Instant::now();
    loop {
        let d = host.store.deployment(id).unwrap().unwrap();
        if d.status.is_final() {
            assert_eq!(d.status, DeploymentStatus::Success, "{d:?}");
            return host.store.lease(id).unwrap().unwrap().1.unwrap();
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{id} never ended: {d:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Agents run only what they may: an application asking for `env: prod`
/// goes to the agent labelled so, one whose stage only that agent's
/// plugins define too, one asking for `env: dev` to the other; `cordon
/// agents` lists both with labels and stages; with the prod agent gone, a
/// follower and `cordon status` say that no live agent may run the
/// deployment, and it runs once such an agent is back.
#[tokio::test(flavor = "multi_thread")]
async fn agents_run_only_the_deployments_they_may() {
    let cluster = Cluster::shared();
    let url = cluster.database();
    let world = World::new();
    let step_only = World::custom(&[("step", "executor")], |_| String::new());
    let trigger_config = agent_config(&world, &url, &world.dir.path().join("state"), "trigger.yaml");
    let host = Arc::new(Host::open_with(engine().clone(), &AgentConfig::load(&trigger_config).unwrap()).await.unwrap());
    let prod_config = labelled_config(&world, &url, "prod-agent", "{ env: prod, zone: eu }");
    let dev_config = labelled_config(&step_only, &url, "dev-agent", "{ env: dev }");
    let mut prod = Agent::start(&prod_config);
    let dev = Agent::start(&dev_config);

    let step = "pipeline:\n  stages:\n    - { name: STEP, with: { sleep_ms: 1 } }\n";
    let to_prod = world.app("to-prod", &format!("name: to-prod\nagents: {{ env: prod }}\n{step}"));
    let to_dev = world.app("to-dev", &format!("name: to-dev\nagents: {{ env: dev }}\n{step}"));
    let waits = world.app("waits", "name: waits\npipeline:\n  stages:\n    - { name: WAIT, with: { duration: 0.01 } }\n");
    let mut expected = Vec::new();
    for _ in 0..3 {
        for (app, agent) in [(&to_prod, prod.id()), (&to_dev, dev.id()), (&waits, prod.id())] {
            expected.push((cordon_pipeline::trigger(&host, app, TriggerInfo::default()).await.unwrap().id, agent));
        }
    }
    for (id, agent) in &expected {
        assert_eq!(&ran_by(&host, id).await, agent, "{id} ran on the wrong agent");
    }

    let out = cordon(&trigger_config, &["agents"]);
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{listing}{}", String::from_utf8_lossy(&out.stderr));
    let line = |name: &str| listing.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name} not listed: {listing}")).to_string();
    let (prod_line, dev_line) = (line("prod-agent"), line("dev-agent"));
    assert!(prod_line.contains(&prod.id()) && prod_line.contains("alive") && prod_line.contains("env=prod, zone=eu"), "{prod_line}");
    assert!(prod_line.contains("STEP") && prod_line.contains("WAIT"), "{prod_line}");
    assert!(dev_line.contains("env=dev") && dev_line.contains("STEP") && !dev_line.contains("WAIT"), "{dev_line}");

    // The prod agent dies; a new deployment of `to-prod` waits, and says why.
    let old_prod = prod.id();
    drop(prod);
    let mut follower = Command::new(cordon_bin())
        .arg("--config")
        .arg(&trigger_config)
        .args(["deploy", to_prod.to_str().unwrap()])
        .env_remove("CORDON_DATABASE_URL")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines = lines_of(follower.stdout.take().unwrap());
    let mut seen = Vec::new();
    expect_line(&lines, "no live agent may run this deployment", Duration::from_secs(30), &mut seen);
    let warning = seen.iter().find(|l| l.contains("no live agent may run")).unwrap().clone();
    assert!(warning.contains("dev-agent") && warning.contains("lacks label env=prod"), "{warning}");
    assert!(!warning.contains(&old_prod), "the dead agent is not offered as a reason: {warning}");
    let status = String::from_utf8_lossy(&cordon(&trigger_config, &["status"]).stdout).into_owned();
    assert!(status.lines().any(|l| l.starts_with("to-prod-4") && l.contains("(none eligible)")), "{status}");

    prod = Agent::start(&prod_config);
    expect_line(&lines, "deployment to-prod-4 success", Duration::from_secs(30), &mut seen);
    let exit = follower.wait().unwrap();
    assert!(exit.success(), "{seen:?}");
    assert_eq!(ran_by(&host, "to-prod-4").await, prod.id());
    drop(dev);
}

/// On a shared database the source travels with the deployment: an agent
/// whose machine never saw the application directory (nor the snapshots
/// of the machine that queued it) runs it from the database, diffs it
/// against the running source from there, and refuses a stored snapshot
/// that was altered.
#[tokio::test(flavor = "multi_thread")]
async fn snapshots_reach_agents_through_the_database() {
    let cluster = Cluster::shared();
    let url = cluster.database();
    let world = World::new();
    let trigger_config = agent_config(&world, &url, &world.dir.path().join("laptop"), "laptop.yaml");
    let host = Arc::new(Host::open_with(engine().clone(), &AgentConfig::load(&trigger_config).unwrap()).await.unwrap());
    let app = world.app("far", "name: far\npipeline:\n  stages:\n    - { name: STEP, with: { sleep_ms: 1 } }\n");
    std::fs::write(app.join("index.html"), "v1").unwrap();
    let first = cordon_pipeline::trigger(&host, &app, TriggerInfo::default()).await.unwrap();
    std::fs::write(app.join("index.html"), "v2").unwrap();
    let second = cordon_pipeline::trigger(&host, &app, TriggerInfo::default()).await.unwrap();
    assert!(first.target_snapshot.starts_with("sha256:") && first.target_snapshot != second.target_snapshot, "{first:?}");
    // A source too large to keep in the database is refused, and nothing of it is recorded.
    let huge = world.app("huge", "name: huge\npipeline:\n  stages:\n    - { name: STEP }\n");
    std::fs::File::create(huge.join("disk.img")).unwrap().set_len(cordon_pipeline::snapshot::MAX_STORED as u64 + 1).unwrap();
    let err = format!("{:#}", cordon_pipeline::trigger(&host, &huge, TriggerInfo::default()).await.unwrap_err());
    assert!(err.contains("larger than 128 MiB packed") && err.contains(&huge.canonicalize().unwrap().display().to_string()), "{err}");
    assert!(host.store.application("huge").unwrap().is_none() && host.store.deployments(Some("huge"), 1).unwrap().is_empty());
    std::fs::remove_dir_all(&huge).unwrap();
    // Nothing of the queuing machine is left for the agent to read.
    let _ = std::fs::remove_dir_all(world.dir.path().join("laptop"));
    let hidden = world.dir.path().join("apps-elsewhere");
    std::fs::rename(&app, &hidden).unwrap();

    let agent = Agent::start(&agent_config(&world, &url, &world.dir.path().join("far-agent"), "far-agent.yaml"));
    ran_by(&host, &first.id).await;
    ran_by(&host, &second.id).await;
    let plan: serde_json::Value = serde_json::from_str(&host.store.deployment(&second.id).unwrap().unwrap().plan).unwrap();
    assert_eq!(plan["changed"], serde_json::json!(["index.html"]), "the running source came from the database too");
    let fetched = world.dir.path().join("far-agent/snapshots").join(first.target_snapshot.replace(':', "-"));
    assert_eq!(std::fs::read_to_string(fetched.join("index.html")).unwrap(), "v1");

    // A snapshot row altered in the database fails its deployment, naming why.
    std::fs::rename(&hidden, &app).unwrap();
    std::fs::write(app.join("index.html"), "v3").unwrap();
    let third = cordon_pipeline::trigger(&host, &app, TriggerInfo::default()).await.unwrap();
    drop(agent);
    let database = url.rsplit('/').next().unwrap();
    cluster.psql_in(database, &format!("UPDATE snapshots SET archive = archive || '\\x00'::bytea WHERE digest = '{}'", third.target_snapshot));
    let _agent = Agent::start(&agent_config(&world, &url, &world.dir.path().join("far-agent"), "far-agent.yaml"));
    let started = Instant::now();
    let d = loop {
        let d = host.store.deployment(&third.id).unwrap().unwrap();
        if d.status.is_final() {
            break d;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{d:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(d.status, DeploymentStatus::Failure);
    assert!(d.reason.contains("does not match its digest"), "{}", d.reason);
}
