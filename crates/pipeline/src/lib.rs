//! The pipeline engine: application configs, planning, the stage DAG and
//! its scheduler, rollback, timeouts and commands, on durable state.
//!
//! Data flows one way: `trigger` snapshots the application and queues a
//! deployment; [`run::run_deployment`] plans it (once), then drives its
//! stages from the store, recording each result exactly once, and resumes
//! from the store after a crash.

pub mod agent;
pub mod config;
pub mod control;
pub mod debug;
pub mod plan;
pub mod retention;
pub mod run;
pub mod services;
pub mod snapshot;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use cordon_runtime::engine::Engine;
use cordon_runtime::plugin::{AgentConfig, Plugins};
use cordon_runtime::runner::{Deployment, Trigger};
use cordon_store::lock::sweep_state_dir;
use cordon_store::{AgentBeat, DeploymentRecord, PostgresStore, SqliteStore, StateStore, database_path, now_ms};
use config::AppConfig;
use plan::TriggerInfo;

/// What deployments run against: the engine, the plugins, the state store
/// and the state directory.
pub struct Host {
    pub engine: Arc<Engine>,
    pub plugins: Arc<Plugins>,
    pub store: Arc<dyn StateStore>,
    pub state_dir: PathBuf,
    /// Many agents may share the store (PostgreSQL); otherwise the agent
    /// holding the state directory's lock is the only one.
    pub shared: bool,
    /// How long a claim on a deployment lasts without renewal.
    pub lease: Duration,
    /// Most deployments the agent runs at once.
    pub max_deployments: usize,
    /// Finished deployments kept per application (`None`: all).
    pub retention: Option<std::num::NonZeroUsize>,
    /// What the agent says it is in its heartbeat (name, labels, the
    /// stages and plugins it has); its `id`, `pid` and times are filled in
    /// by the agent loop that beats.
    pub offer: AgentBeat,
}

pub use cordon_store::DATABASE_URL_ENV;

/// How long a claim lasts when the config does not say.
const DEFAULT_LEASE: Duration = Duration::from_secs(15);

/// Whether `config` (or the environment) puts the state in a shared
/// PostgreSQL database rather than the embedded SQLite one.
pub fn is_shared(config: &AgentConfig) -> bool {
    config.state.postgres.is_some()
        || [DATABASE_URL_ENV, cordon_api::SERVER_ENV].iter().any(|var| std::env::var(var).is_ok_and(|url| !url.is_empty()))
}

/// Opens the shared PostgreSQL database `config` (or the environment) names, if any.
fn open_postgres(config: &AgentConfig) -> Result<Option<PostgresStore>> {
    let file = config.source.display().to_string();
    PostgresStore::open_configured(config.state.postgres.as_ref().map(|p| cordon_store::postgres::Configured {
        file: &file,
        url: p.url.as_deref(),
        password_file: p.password_file.as_deref(),
    }))
}

/// Opens the state store `config` names: the shared PostgreSQL database,
/// or the embedded SQLite one in the state directory. Without `create`, a
/// missing SQLite database is an error (commands that only read or send
/// commands have nothing to act on).
fn open_state(config: &AgentConfig, create: bool) -> Result<Arc<dyn StateStore>> {
    if let Some(store) = open_server()? {
        return Ok(store);
    }
    if let Some(store) = open_postgres(config)? {
        return Ok(Arc::new(store));
    }
    let db = database_path(&config.state_dir);
    if !create && !db.exists() {
        anyhow::bail!("no state at {}: nothing was deployed with {} yet", db.display(), config.source.display());
    }
    Ok(Arc::new(SqliteStore::open(&db)?))
}

/// The `cordon server` the environment names (`CORDON_SERVER`, with a
/// token), if any: it wins over the config's own state.
pub fn open_server() -> Result<Option<Arc<dyn StateStore>>> {
    match cordon_api::Server::from_env()? {
        Some(server) => Ok(Some(Arc::new(cordon_api::RemoteStore::open(&server)?))),
        None => Ok(None),
    }
}

/// Opens the state store named by the agent config, without loading
/// plugins (for commands that only read or record commands).
pub fn open_store(config: &AgentConfig) -> Result<Arc<dyn StateStore>> {
    open_state(config, false)
}

impl Host {
    /// Opens the state store and loads every plugin of `config`.
    pub async fn open(config: &AgentConfig) -> Result<Host> {
        let engine = Arc::new(config.engine()?);
        Self::open_with(engine, config).await
    }

    /// Like [`Host::open`], on an existing engine (tests share one).
    pub async fn open_with(engine: Arc<Engine>, config: &AgentConfig) -> Result<Host> {
        let plugins = Arc::new(Plugins::load(&engine, config).await?);
        let (store, shared) = (open_state(config, true)?, is_shared(config));
        let lease = config.state.postgres.as_ref().map_or(DEFAULT_LEASE, |p| p.lease);
        let host_name = rustix::system::uname().nodename().to_string_lossy().into_owned();
        let mut offer = AgentBeat {
            name: config.name.clone().unwrap_or_else(|| host_name.clone()),
            host: host_name,
            labels: config.labels.clone(),
            stages: plugins.stage_names(),
            plugins: plugins.all().iter().map(|p| p.name.clone()).collect(),
            ..Default::default()
        };
        offer.plugins.sort();
        let max_deployments = config.max_deployments;
        let retention = config.retention.keep_deployments;
        if retention.is_some() && store.through_server() {
            bail!(
                "{}: retention: the state is kept by the server this agent uses ({}); set `retention:` in the server's config instead",
                config.source.display(),
                store.describe()
            );
        }
        Ok(Host { engine, plugins, store, state_dir: config.state_dir.clone(), shared, lease, max_deployments, retention, offer })
    }

    pub fn snapshot_dir(&self, deployment: &str) -> PathBuf {
        self.snapshots_dir().join(deployment)
    }

    pub fn snapshots_dir(&self) -> PathBuf {
        snapshot::dir(&self.state_dir)
    }

    /// The local directory of snapshot `reference` (fetched from a shared
    /// store into this agent's state directory if need be).
    pub fn source(&self, reference: &str) -> Result<PathBuf> {
        snapshot::local(self.store.as_ref(), reference, &self.snapshots_dir())
    }

    /// The running source of `application` (the source of its last
    /// successful deployment): its reference as stored and its local
    /// directory; `None` on a first deployment, or when a local snapshot
    /// is gone.
    pub fn running_source(&self, application: &str) -> Result<Option<(String, PathBuf)>> {
        let Some(reference) = self.store.application(application)?.and_then(|a| a.running_snapshot) else { return Ok(None) };
        let dir = self.source(&reference)?;
        Ok(dir.is_dir().then_some((reference, dir)))
    }

    /// `record` with its snapshot references replaced by local
    /// directories ([`Host::source`]).
    pub fn localise(&self, mut record: DeploymentRecord) -> Result<DeploymentRecord> {
        record.target_snapshot = self.source(&record.target_snapshot)?.to_string_lossy().into_owned();
        if !record.running_snapshot.is_empty() {
            record.running_snapshot = self.source(&record.running_snapshot)?.to_string_lossy().into_owned();
        }
        Ok(record)
    }

    pub fn scratch_dir(&self, deployment: &str) -> PathBuf {
        self.state_dir.join("scratch").join(deployment)
    }
}

/// The deployment as plugins see it.
pub fn deployment_info(d: &DeploymentRecord, app: &AppConfig, trigger: &TriggerInfo) -> Deployment {
    Deployment {
        id: d.id.clone(),
        application_id: app.name.clone(),
        application_name: app.name.clone(),
        labels: app.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        trigger: Trigger {
            commit_hash: trigger.commit_hash.clone(),
            commit_message: trigger.commit_message.clone(),
            commander: trigger.commander.clone(),
        },
        created_at: d.created_at / 1000,
    }
}

/// Validates the application in `app_dir` — its config, and the options
/// and settings it gives the plugins — snapshots it and queues a
/// deployment. Nothing is written unless all of it is valid.
pub async fn trigger(host: &Host, app_dir: &Path, trigger: TriggerInfo) -> Result<DeploymentRecord> {
    let app = AppConfig::load(app_dir)?;
    plan::check_app(&app, &host.plugins)?;
    plan::check_configured(&host.engine, &app, &host.plugins).await?;
    check_breakpoints(&app, &host.plugins, &trigger.breakpoints)?;
    let requires = app.requirements();
    // On the embedded database this agent config is the only agent; on a
    // shared one another agent may have the labels (followers say when
    // none that is alive does).
    let unmet = requires.unmet_by(&host.offer);
    if !host.shared && !unmet.is_empty() {
        bail!(
            "{}: agents: no agent can run this application: it needs {}, and the agent config's labels are {}; add them to `labels:` there or change `agents:`",
            app.file.display(),
            unmet.join(", "),
            labels_text(&host.offer.labels)
        );
    }
    // The embedded database has one agent. One that is running (it holds
    // the state directory's lock) loaded its plugins when it started: a
    // deployment needing a plugin or stage added to the config since would
    // wait for ever, so it is refused here.
    if !host.shared
        && cordon_store::lock::AgentLock::try_acquire(&host.state_dir)?.is_none()
        && let Some(agent::Stale::Ineligible { lacking }) = agent::nobody_meets(host.store.as_ref(), &requires)?
    {
        let each: Vec<String> = lacking.iter().map(|(agent, unmet)| format!("{agent} lacks {}", unmet.join(", "))).collect();
        bail!(
            "{}: the running agent cannot run this deployment ({}): it read the agent config when it started; restart it (`systemctl restart cordon-agent`, or stop `cordon agent` and start it again) so it loads the current config, then deploy again",
            app.file.display(),
            each.join("; ")
        );
    }
    let dir = std::fs::canonicalize(app_dir).with_context(|| format!("cannot resolve {}", app_dir.display()))?;
    let trigger_json = serde_json::to_string(&trigger)?;
    // The copy is made once. On the embedded store it is then placed under
    // the first free id (placing never replaces, so concurrent triggers of
    // one application each take their own id); a shared store keeps it.
    let snapshots = host.snapshots_dir();
    sweep_state_dir(&host.state_dir)?;
    let staged = snapshot::Staged::copy(app_dir, &snapshots)?;
    let stored = if host.shared { Some(snapshot::store(host.store.as_ref(), &staged.tree(), &dir)?) } else { None };
    // Only once the source is copied (and kept), so a refused one records nothing.
    host.store.upsert_application(&app.name, &dir.to_string_lossy())?;
    // After the highest number: retention may have deleted older ones, and
    // a number is never given twice.
    let mut n = host.store.deployments(Some(&app.name), usize::MAX)?.iter().filter_map(|d| cordon_store::retention::number(&app.name, &d.id)).max().unwrap_or(0) + 1;
    loop {
        let id = format!("{}-{n}", app.name);
        n += 1;
        if host.store.deployment(&id)?.is_some() {
            continue;
        }
        let target = match &stored {
            Some(reference) => reference.clone(),
            None => {
                let snapshot = host.snapshot_dir(&id);
                if !staged.place(&snapshot)? {
                    continue;
                }
                snapshot.to_string_lossy().into_owned()
            }
        };
        let queued = DeploymentRecord::queued(&id, &app.name, trigger_json.clone(), target.clone(), now_ms());
        let record = DeploymentRecord { requires: requires.clone(), ..queued };
        if let Err(e) = host.store.insert_deployment(&record) {
            if stored.is_none() {
                staged.take_back(Path::new(&target))?;
            }
            if host.store.deployment(&id)?.is_some() {
                continue;
            }
            return Err(e);
        }
        return Ok(record);
    }
}

/// Labels as `k=v, k=v` (`none` when there are none), for messages and listings.
pub fn labels_text(labels: &std::collections::BTreeMap<String, String>) -> String {
    if labels.is_empty() { "none".to_string() } else { labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", ") }
}

/// Every breakpoint must name a configured stage (by id or name) or a stage
/// some plugin defines (for stages planners add).
fn check_breakpoints(app: &AppConfig, plugins: &Plugins, cli: &crate::debug::Breakpoints) -> Result<()> {
    let from_app = app.debug.clone().unwrap_or_default();
    for (source, reference) in cli.references().map(|r| ("--break", r)).chain(from_app.references().map(|r| ("debug", r))) {
        let configured = app.stages().iter().any(|s| s.key() == reference || s.name == *reference);
        if !configured && plugins.route(reference).is_err() {
            let known: Vec<&str> = app.stages().iter().map(|s| s.key()).collect();
            anyhow::bail!(
                "{}: breakpoint `{reference}` ({source}) names no stage of the pipeline (stages: {}) and no stage any plugin defines",
                app.file.display(),
                if known.is_empty() { "none".to_string() } else { known.join(", ") }
            );
        }
    }
    Ok(())
}
