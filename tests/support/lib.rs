//! Shared helpers of the end-to-end tests: the guests built by `make
//! guests`, one engine per test binary, agent configs written on the fly,
//! a log collector and tiny loopback servers.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use cordon_pipeline::agent::{ServeScope, serve};
use cordon_store::lock::AgentLock;
use cordon_runtime::engine::{Engine, EngineOptions};
use cordon_pipeline::Host;
use cordon_pipeline::plan::TriggerInfo;
use cordon_store::DeploymentRecord;
use cordon_runtime::plugin::{AgentConfig, Plugin};
use cordon_runtime::runner::{self, Deployment, Outcome, Stage, StageCall, Trigger};
use cordon_runtime::sandbox::output::{LogSink, Source};
use cordon_runtime::sandbox::{MemoryServices, RunDirs};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub mod replicas;
pub use replicas::Replicas;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// A guest component built by `make guests` (crate names use `_`).
pub fn guest(name: &str) -> PathBuf {
    let path = root().join("guests/target/wasm32-wasip2/release").join(format!("{}.wasm", name.replace('-', "_")));
    assert!(path.exists(), "{} is missing: run `make guests` (or `make test`, which builds them)", path.display());
    path
}

pub fn sha256_file(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

/// One engine per test binary, with a compile cache shared by its tests.
pub fn engine() -> &'static Arc<Engine> {
    static RUNTIME: OnceLock<Arc<Engine>> = OnceLock::new();
    static CACHE: OnceLock<tempfile::TempDir> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        let cache = CACHE.get_or_init(|| tempfile::tempdir().unwrap());
        Arc::new(Engine::new(EngineOptions { cache_dir: Some(cache.path().to_path_buf()), ..Default::default() }).unwrap())
    })
}

/// Writes an agent config with one plugin (`extra` is YAML for its
/// `grants:`/`limits:` keys, indented by four spaces) and parses it.
pub fn agent_config(dir: &Path, name: &str, file: &Path, world: &str, extra: &str) -> anyhow::Result<AgentConfig> {
    let yaml = format!(
        "state-dir: state\nplugins:\n  - name: {name}\n    path: {}\n    sha256: {}\n    world: {world}\n{extra}",
        file.display(),
        sha256_file(file),
    );
    let path = dir.join("agent.yaml");
    std::fs::write(&path, yaml).unwrap();
    AgentConfig::load(&path)
}

/// Loads the guest `guest_name` as plugin `name` with the given extra YAML.
pub async fn load(guest_name: &str, extra: &str) -> anyhow::Result<Plugin> {
    let dir = tempfile::tempdir().unwrap();
    let config = agent_config(dir.path(), guest_name, &guest(guest_name), "executor", extra)?;
    Plugin::load(engine(), &config.plugins[0]).await
}

/// Collects log lines.
#[derive(Default)]
pub struct Collect(pub Mutex<Vec<(Source, String)>>);

impl LogSink for Collect {
    fn line(&self, source: Source, text: &str) {
        self.0.lock().unwrap().push((source, text.to_string()));
    }
}

impl Collect {
    pub fn text(&self) -> String {
        self.0.lock().unwrap().iter().map(|(s, t)| format!("{s}: {t}\n")).collect()
    }
    pub fn bytes(&self) -> usize {
        self.0.lock().unwrap().iter().map(|(_, t)| t.len() + 1).sum()
    }
}

/// A stage call with a synthetic deployment.
pub fn call(stage: &str, options: &str, dirs: RunDirs, sink: Arc<Collect>) -> StageCall {
    StageCall {
        deployment: Deployment {
            id: "d-1".into(),
            application_id: "app-1".into(),
            application_name: "app".into(),
            labels: vec![],
            trigger: Trigger { commit_hash: String::new(), commit_message: String::new(), commander: "test".into() },
            created_at: 0,
        },
        stage: Stage { id: "s-1".into(), name: stage.into(), desc: String::new(), index: 0, rollback: false, options: options.into() },
        app_config: "{}".into(),
        dirs,
        services: Arc::new(MemoryServices::default()),
        sink,
        timeout: None,
    }
}

/// The per-run directories of a test: a target source with an
/// `index.html`, and a scratch directory.
pub struct Dirs {
    pub source: tempfile::TempDir,
    pub scratch: tempfile::TempDir,
}

impl Dirs {
    pub fn new() -> Self {
        let source = tempfile::tempdir().unwrap();
        std::fs::write(source.path().join("index.html"), "original").unwrap();
        Self { source, scratch: tempfile::tempdir().unwrap() }
    }

    pub fn run_dirs(&self) -> RunDirs {
        RunDirs {
            target: Some(self.source.path().to_path_buf()),
            running: None,
            scratch: Some(self.scratch.path().to_path_buf()),
        }
    }

    /// Names and contents of the source's files, for before/after checks.
    pub fn snapshot(&self) -> Vec<(String, Vec<u8>)> {
        let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(self.source.path())
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let content = std::fs::read(e.path()).unwrap_or_default();
                (e.file_name().to_string_lossy().into_owned(), content)
            })
            .collect();
        out.sort();
        out
    }
}

impl Default for Dirs {
    fn default() -> Self {
        Self::new()
    }
}

/// Runs `stage` of `plugin` and returns the outcome and the log.
pub async fn run(plugin: &Plugin, stage: &str, options: &str, dirs: RunDirs) -> (Outcome, Arc<Collect>) {
    let sink = Arc::new(Collect::default());
    let outcome = runner::execute_stage(engine(), plugin, call(stage, options, dirs, sink.clone())).await;
    (outcome, sink)
}

/// A loopback HTTP server answering every request with `response` (a full
/// HTTP/1.1 response); counts connections. Ends with the test's engine.
pub struct Server {
    pub port: u16,
    pub connections: Arc<AtomicUsize>,
}

impl Server {
    pub async fn start(response: impl Fn(u16) -> String + Send + Sync + 'static) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let counter = connections.clone();
        let response = Arc::new(response);
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let response = response.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 8192];
                    let mut seen = Vec::new();
                    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = socket.write_all(response(port).as_bytes()).await;
                    let _ = socket.shutdown().await;
                });
            }
        });
        Server { port, connections }
    }

    /// A server that answers `200 OK` with `body`.
    pub async fn ok(body: &'static str) -> Server {
        Server::start(move |_| {
            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len())
        })
        .await
    }

    pub fn hits(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// The middle of a benchmark's samples (the runs are noisy: benchmarks
/// report medians).
pub fn median<T: PartialOrd + Copy>(mut samples: Vec<T>) -> T {
    samples.sort_by(|a, b| a.partial_cmp(b).expect("samples are comparable"));
    samples[samples.len() / 2]
}

/// The `cordon` binary (built by `make test` before the tests run).
pub fn cordon_bin() -> PathBuf {
    let path = root().join("target/debug/cordon");
    assert!(path.exists(), "{} is missing: run `cargo build -p cordon` (make test does)", path.display());
    path
}

/// Set to `postgres` to run the pipeline tests on PostgreSQL: every
/// [`World`] then gets a fresh database of this process's test cluster,
/// with short leases; set to `server` to run them, on such a database,
/// through two `cordon server` replicas (`make test` runs those tests all
/// three ways).
pub const STATE_ENV: &str = "CORDON_TEST_STATE";

/// Whether this run's worlds share state on PostgreSQL (directly or
/// through a server).
pub fn on_postgres() -> bool {
    matches!(std::env::var(STATE_ENV).as_deref(), Ok("postgres" | "server"))
}

/// Whether this run's worlds are reached through `cordon server`.
pub fn on_server() -> bool {
    std::env::var(STATE_ENV).as_deref() == Ok("server")
}

/// A state directory with an agent config naming the pipeline test guests
/// (`step`, `test-deploy`, `wait`, `spin`), a read-write `/marks` mount
/// where stages count their runs, and a secret `token`.
pub struct World {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub marks: PathBuf,
    /// The servers between the world and its database, on a server run.
    pub replicas: Option<Replicas>,
}

pub const TOKEN_VALUE: &str = "tok-3141592653";

/// An agent-config entry for a built guest (`grants` is YAML at the
/// indentation of a plugin's keys, e.g. `    grants: {...}\n`).
pub fn plugin_entry(name: &str, world: &str, extra: &str) -> String {
    let file = guest(name);
    format!("  - name: {name}\n    path: {}\n    sha256: {}\n    world: {world}\n{extra}", file.display(), sha256_file(&file))
}

impl World {
    pub fn new() -> World {
        Self::with_plugins("")
    }

    /// A world whose agent config also lists `extra` plugin entries.
    pub fn with_plugins(extra: &str) -> World {
        Self::with(|_| extra.to_string())
    }

    /// A world whose extra plugin entries are made from its directory (for
    /// mounts that must live inside it).
    pub fn with(extra: impl FnOnce(&Path) -> String) -> World {
        Self::custom(&[("step", "executor"), ("test-deploy", "deployment"), ("wait", "executor"), ("spin", "executor")], extra)
    }

    /// A world with exactly the `base` guests (each with the `/marks` mount
    /// and the `token` secret) plus `extra` entries.
    pub fn custom(base: &[(&str, &str)], extra: impl FnOnce(&Path) -> String) -> World {
        let dir = tempfile::tempdir().unwrap();
        let extra = extra(dir.path());
        let marks = dir.path().join("marks");
        std::fs::create_dir_all(&marks).unwrap();
        let secret = dir.path().join("token.txt");
        std::fs::write(&secret, format!("{TOKEN_VALUE}\n")).unwrap();
        let database = on_postgres().then(|| cordon_store::test_cluster::Cluster::shared().database());
        let shared = database.as_ref().map(|url| format!("state: {{ postgres: {{ url: \"{url}\", lease: 1s }} }}\n")).unwrap_or_default();
        let mut yaml = format!("state-dir: {}\n{shared}plugins:\n", dir.path().join("state").display());
        for &(name, world) in base {
            let file = guest(name);
            yaml.push_str(&format!(
                "  - name: {name}\n    path: {}\n    sha256: {}\n    world: {world}\n    grants:\n      mounts: [{{ host: {}, guest: /marks, access: read-write }}]\n      secrets: {{ token: {{ file: {} }} }}\n",
                file.display(),
                sha256_file(&file),
                marks.display(),
                secret.display()
            ));
        }
        yaml.push_str(&extra);
        let config = dir.path().join("agent.yaml");
        std::fs::write(&config, yaml).unwrap();
        let replicas = database.filter(|_| on_server()).map(|url| Replicas::start(dir.path(), &url));
        World { dir, config, marks, replicas }
    }

    pub fn agent_config(&self) -> AgentConfig {
        AgentConfig::load(&self.config).unwrap()
    }

    /// A host on the world's config; on a server run, its store is the
    /// replicas' (queueing as a person, running as the agent).
    pub async fn host(&self) -> Arc<Host> {
        let mut host = Host::open_with(engine().clone(), &self.agent_config()).await.unwrap();
        if let Some(replicas) = &self.replicas {
            host.store = Arc::new(replicas.split());
        }
        Arc::new(host)
    }

    /// `cordon ARGS` as a person, without `--config`; on a server run
    /// through the replicas as [`replicas::PERSON`].
    pub fn bare_command(&self) -> std::process::Command {
        let mut command = std::process::Command::new(cordon_bin());
        if let Some(replicas) = &self.replicas {
            replicas.as_person(&mut command, replicas::PERSON);
        }
        command
    }

    /// `cordon --config WORLD ARGS` as a person. On a server run, where
    /// `--as` is refused, `--as NAME` becomes NAME's own token.
    pub fn command(&self, args: &[&str]) -> std::process::Command {
        let mut command = self.bare_command();
        command.arg("--config").arg(&self.config);
        match (&self.replicas, args.iter().position(|a| *a == "--as")) {
            (Some(replicas), Some(at)) if args.get(at + 1).is_some_and(|name| !name.is_empty()) => {
                replicas.as_person(&mut command, args[at + 1]);
                command.args(&args[..at]).args(&args[at + 2..]);
            }
            _ => {
                command.args(args);
            }
        }
        command
    }

    /// The commander a command sent through this world's host in the name
    /// of `given` is recorded as: a server records its caller instead.
    pub fn recorded_as<'a>(&self, given: &'a str) -> &'a str {
        if self.replicas.is_some() { replicas::PERSON } else { given }
    }

    /// Runs [`World::command`] to its end.
    pub fn cordon(&self, args: &[&str]) -> std::process::Output {
        self.command(args).output().unwrap()
    }

    /// Writes an application directory with `yaml` as its config.
    pub fn app(&self, name: &str, yaml: &str) -> PathBuf {
        let dir = self.dir.path().join("apps").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("app.cordon.yaml"), yaml).unwrap();
        std::fs::write(dir.join("VERSION"), "1.0.0").unwrap();
        dir
    }

    /// How many times a stage wrote its marker file.
    pub fn marks(&self, file: &str) -> Vec<String> {
        std::fs::read_to_string(self.marks.join(file)).unwrap_or_default().lines().map(str::to_string).collect()
    }
}

impl Default for World {
    fn default() -> Self {
        Self::new()
    }
}

/// Runs deployments in this process until none is left unfinished.
pub async fn serve_until_idle(host: &Arc<Host>, state_dir: &Path) {
    // A process another test spawns holds a copy of every descriptor
    // between its fork and its exec, so a lock just released may look
    // held for a moment: retry briefly.
    let started = Instant::now();
    let lock = loop {
        match AgentLock::try_acquire(state_dir).unwrap() {
            Some(lock) => break lock,
            None if started.elapsed() < Duration::from_secs(5) => tokio::time::sleep(Duration::from_millis(20)).await,
            None => panic!("another agent holds {}", state_dir.display()),
        }
    };
    let scope = ServeScope { until_idle: true, ..Default::default() };
    tokio::time::timeout(Duration::from_secs(120), serve(host.clone(), &lock, scope))
        .await
        .expect("deployments did not finish in 120 s")
        .unwrap();
}

/// Triggers a deployment of `app_dir` and runs it to its end.
pub async fn deploy(host: &Arc<Host>, state_dir: &Path, app_dir: &Path, trigger: TriggerInfo) -> DeploymentRecord {
    let record = cordon_pipeline::trigger(host, app_dir, trigger).await.unwrap();
    serve_until_idle(host, state_dir).await;
    host.store.deployment(&record.id).unwrap().unwrap()
}

/// The neighbour's application: one stage that runs for a while.
const NEIGHBOUR_APP: &str = "name: neighbour\nplanner: { alwaysUsePipeline: true }\npipeline:\n  stages:\n    - { id: one, name: STEP, with: { sleep_ms: 200 } }\n";

/// Memory limit of each of the neighbour's plugins.
pub const NEIGHBOUR_MEMORY: u64 = 16 << 20;

/// Runs `attack` while another application is deployed beside it — on the
/// same engine, so from the same instance pool and process — again and
/// again until the attack ends, and asserts that every one of those
/// deployments succeeded: what one plugin does must not reach another.
pub async fn beside_a_neighbour<T>(attack: impl Future<Output = T>) -> T {
    let limits = format!("    limits: {{ memory: {}MiB }}\n", NEIGHBOUR_MEMORY >> 20);
    let world = World::custom(&[], |_| plugin_entry("step", "executor", &limits) + &plugin_entry("test-deploy", "deployment", &limits));
    let host = world.host().await;
    let app = world.app("neighbour", NEIGHBOUR_APP);
    let state = world.dir.path().join("state");
    let done = std::sync::atomic::AtomicBool::new(false);
    let neighbour = async {
        let mut deployed = 0;
        while deployed == 0 || !done.load(Ordering::SeqCst) {
            let trigger = TriggerInfo { commander: "neighbour".into(), ..Default::default() };
            let d = deploy(&host, &state, &app, trigger).await;
            assert_eq!(d.status, cordon_store::DeploymentStatus::Success, "the neighbour's deployment failed beside the attack: {d:?}");
            deployed += 1;
        }
        deployed
    };
    let attack = async {
        let result = attack.await;
        done.store(true, Ordering::SeqCst);
        result
    };
    let (result, deployed) = tokio::join!(attack, neighbour);
    eprintln!("the neighbour deployed {deployed} time(s) beside the attack");
    result
}

/// Sends `signal` (`-STOP`, `-CONT`, …) to `child`; false if it is gone.
/// The lines `output` (a child's stdout or stderr) writes, as they come.
pub fn lines_of(output: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(output)).map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    lines
}

/// Waits up to `within` for a line of `lines` that contains `wanted`;
/// every line read is kept in `seen`.
pub fn expect_line(lines: &std::sync::mpsc::Receiver<String>, wanted: &str, within: Duration, seen: &mut Vec<String>) {
    let deadline = Instant::now() + within;
    while !seen.iter().any(|l| l.contains(wanted)) {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(_) => panic!("no line with {wanted:?} within {within:?}; saw:\n{}", seen.join("\n")),
        }
    }
}

pub fn signal(child: &std::process::Child, signal: &str) -> bool {
    std::process::Command::new("kill")
        .args([signal, &child.id().to_string()])
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// A `cordon agent` child process, killed when dropped.
pub struct AgentProcess(pub std::process::Child);

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `cordon agent` on the world's config (through the replicas on
/// a server run).
pub fn start_agent(world: &World) -> AgentProcess {
    AgentProcess(agent_command(world, &world.config).spawn().unwrap())
}

/// `cordon --config CONFIG agent` for `world` (through its replicas on a
/// server run); more arguments may follow.
pub fn agent_command(world: &World, config: &Path) -> std::process::Command {
    let mut command = std::process::Command::new(cordon_bin());
    command.arg("--config").arg(config).arg("agent");
    if let Some(replicas) = &world.replicas {
        replicas.as_agent(&mut command);
    }
    command
}

/// A single-member etcd server on loopback ports, stopped when dropped.
/// `make test` installs etcd from Debian's `etcd-server`.
pub struct EtcdServer {
    child: std::process::Child,
    pub endpoint: String,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl EtcdServer {
    pub async fn start() -> EtcdServer {
        Self::start_with(&[]).await
    }

    /// With extra etcd flags (e.g. `--max-txn-ops`).
    pub async fn start_with(extra: &[&str]) -> EtcdServer {
        let dir = tempfile::tempdir().unwrap();
        let (client, peer) = (free_port(), free_port());
        let endpoint = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let etcd = ["/usr/bin/etcd", "/usr/local/bin/etcd"].into_iter().find(|p| Path::new(p).exists()).expect("etcd is not installed: run `make test` (it installs Debian's etcd-server)");
        let child = std::process::Command::new(etcd)
            .args(["--name", "test", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &endpoint, "--advertise-client-urls", &endpoint])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("test={peer_url}"), "--log-level", "error", "--logger", "zap"])
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("etcd.log")).unwrap())
            .spawn()
            .unwrap();
        let server = EtcdServer { child, endpoint, _dir: dir };
        let started = Instant::now();
        loop {
            if let Ok(kv) = server.kv().await
                && cordon_migrate::kv::KvStore::get(&kv, b"probe").await.is_ok()
            {
                return server;
            }
            assert!(started.elapsed() < Duration::from_secs(30), "etcd did not start on {}", server.endpoint);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn kv(&self) -> anyhow::Result<cordon_migrate::kv::Etcd> {
        cordon_migrate::kv::Etcd::connect(std::slice::from_ref(&self.endpoint), "", 128, Duration::from_secs(10)).await
    }

    /// Stops the server's process (SIGSTOP): it hangs, answering nothing.
    pub fn freeze(&self) {
        assert!(signal(&self.child, "-STOP"));
    }

    /// Lets a frozen server go on (SIGCONT).
    pub fn thaw(&self) {
        assert!(signal(&self.child, "-CONT"));
    }

    /// Every key and value, in key order.
    pub async fn dump(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        use cordon_migrate::kv::KvStore;
        let kv = self.kv().await.unwrap();
        let (mut all, mut start) = (Vec::new(), Vec::new());
        loop {
            let (page, more) = kv.range(&start, 5000).await.unwrap();
            if let Some((last, _)) = page.last() {
                start = [last.as_slice(), &[0]].concat();
            }
            all.extend(page);
            if !more {
                return all;
            }
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Debian's `docker-registry` (CNCF distribution) on a loopback port with
/// its own storage, optionally behind htpasswd basic auth; stopped when
/// dropped. `make test` installs it.
pub struct RegistryServer {
    child: Option<std::process::Child>,
    /// `127.0.0.1:PORT`.
    pub host: String,
    dir: tempfile::TempDir,
}

impl RegistryServer {
    pub fn start() -> RegistryServer {
        Self::start_with(None)
    }

    /// A registry that only lets `user` with `password` in.
    pub fn with_login(user: &str, password: &str) -> RegistryServer {
        Self::start_with(Some((user, password)))
    }

    fn start_with(login: Option<(&str, &str)>) -> RegistryServer {
        let dir = tempfile::tempdir().unwrap();
        let host = format!("127.0.0.1:{}", free_port());
        let mut config = format!(
            "version: 0.1\nlog: {{ level: error }}\nstorage:\n  filesystem: {{ rootdirectory: {} }}\nhttp:\n  addr: {host}\n",
            dir.path().join("data").display()
        );
        if let Some((user, password)) = login {
            let out = std::process::Command::new("htpasswd").args(["-Bbn", user, password]).output().expect("htpasswd (apache2-utils) is not installed: run `make test`");
            std::fs::write(dir.path().join("htpasswd"), out.stdout).unwrap();
            config.push_str(&format!("auth:\n  htpasswd: {{ realm: cordon-tests, path: {} }}\n", dir.path().join("htpasswd").display()));
        }
        std::fs::write(dir.path().join("config.yml"), config).unwrap();
        let child = std::process::Command::new("docker-registry")
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("registry.log")).unwrap())
            .spawn()
            .expect("docker-registry is not installed: run `make test` (it installs Debian's docker-registry)");
        let server = RegistryServer { child: Some(child), host, dir };
        let started = Instant::now();
        while std::net::TcpStream::connect(&server.host).is_err() {
            assert!(started.elapsed() < Duration::from_secs(30), "docker-registry did not start on {}", server.host);
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    /// `oci://HOST/REPOSITORY_AND_TAG`.
    pub fn reference(&self, path: &str) -> String {
        format!("oci://{}/{path}", self.host)
    }

    /// The file the registry keeps blob `digest` (`sha256:…`) in.
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir.path().join("data/docker/registry/v2/blobs/sha256").join(&hex[..2]).join(hex).join("data")
    }

    /// Stops the registry (its storage stays until drop).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RegistryServer {
    fn drop(&mut self) {
        self.stop();
    }
}
