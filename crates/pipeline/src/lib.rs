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
pub mod run;
pub mod services;
pub mod snapshot;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};

use cordon_runtime::engine::Engine;
use cordon_runtime::plugin::{AgentConfig, Plugins};
use cordon_runtime::runner::{Deployment, Trigger};
use cordon_store::lock::sweep_state_dir;
use cordon_store::{DeploymentRecord, SqliteStore, StateStore, database_path, now_ms};
use config::AppConfig;
use plan::TriggerInfo;

/// What deployments run against: the engine, the plugins, the state store
/// and the state directory.
pub struct Host {
    pub engine: Arc<Engine>,
    pub plugins: Arc<Plugins>,
    pub store: Arc<dyn StateStore>,
    pub state_dir: PathBuf,
}

/// Opens the state store named by the agent config, without loading
/// plugins (for commands that only read or record commands).
pub fn open_store(config: &AgentConfig) -> Result<SqliteStore> {
    let db = database_path(&config.state_dir);
    if !db.exists() {
        anyhow::bail!("no state at {}: nothing was deployed with {} yet", db.display(), config.source.display());
    }
    SqliteStore::open(&db)
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
        let store: Arc<dyn StateStore> = Arc::new(SqliteStore::open(&database_path(&config.state_dir))?);
        Ok(Host { engine, plugins, store, state_dir: config.state_dir.clone() })
    }

    pub fn snapshot_dir(&self, deployment: &str) -> PathBuf {
        self.state_dir.join("snapshots").join(deployment)
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

/// Validates the application in `app_dir`, snapshots it and queues a
/// deployment. Nothing is written unless the config is valid.
pub fn trigger(host: &Host, app_dir: &Path, trigger: TriggerInfo) -> Result<DeploymentRecord> {
    let app = AppConfig::load(app_dir)?;
    plan::check_app(&app, &host.plugins)?;
    check_breakpoints(&app, &host.plugins, &trigger.breakpoints)?;
    let dir = std::fs::canonicalize(app_dir).with_context(|| format!("cannot resolve {}", app_dir.display()))?;
    host.store.upsert_application(&app.name, &dir.to_string_lossy())?;
    let trigger_json = serde_json::to_string(&trigger)?;
    // The copy is made once, then placed under the first free id: placing
    // never replaces, so concurrent triggers of one application each take
    // their own id.
    let snapshots = host.state_dir.join("snapshots");
    sweep_state_dir(&host.state_dir)?;
    let staged = snapshot::Staged::copy(app_dir, &snapshots)?;
    let mut n = host.store.deployments(Some(&app.name), usize::MAX)?.len() + 1;
    loop {
        let id = format!("{}-{n}", app.name);
        n += 1;
        let snapshot = host.snapshot_dir(&id);
        if host.store.deployment(&id)?.is_some() || !staged.place(&snapshot)? {
            continue;
        }
        let record = DeploymentRecord::queued(&id, &app.name, trigger_json.clone(), snapshot.to_string_lossy().into_owned(), now_ms());
        if let Err(e) = host.store.insert_deployment(&record) {
            staged.take_back(&snapshot)?;
            if host.store.deployment(&id)?.is_some() {
                continue;
            }
            return Err(e);
        }
        return Ok(record);
    }
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
