//! Drives a migration: loads its plugins, opens its stores, and runs each
//! phase step by step from the ledger's last checkpoint, recording every
//! step before the next begins.
//!
//! Error policy: under `fail-fast` a step's error stops the migration as
//! `failed` (resumable: `cordon migrate resume` repeats the step from the
//! last checkpoint). Under `continue-and-report` the phase itself records
//! errors on single entries and goes on; a step that still fails ends that
//! phase as `failed`, and the migration goes on to the next phase and ends
//! `completed-with-errors`. `verify` is always fail-fast, and nothing is
//! deleted unless it passed.
//!
//! The unit's claim is released when the migration completes (with or
//! without errors); a failed migration keeps it until it is resumed to the
//! end or aborted ([`abort`]). A phase that failed and then succeeded on
//! resume leaves no error behind: only phases that end failed or with
//! failed entries make a migration `completed-with-errors`. `verify`
//! always starts over on resume, so it compares the stores as they are.
//! Any error, setup included, leaves the migration `failed`, never
//! `running`.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};

use super::ledger::{Ledger, Migration, Status, StepRecord};
use super::scope::{ScopedStores, Transform};
use super::spec::{ErrorPolicy, MigrationSpec};
use cordon_runtime::engine::Engine;
use cordon_runtime::plugin::{AgentConfig, Plugin};
use cordon_runtime::runner::{self, ItemActionSession, KeyFilterSession, StepRequest};
use cordon_runtime::sandbox::LogSink;

/// Progress of one step, for the display.
pub struct StepEvent<'a> {
    pub phase: &'a str,
    pub index: usize,
    pub phases: usize,
    pub done: bool,
    /// Totals of the phase so far.
    pub entries: u64,
    pub bytes: u64,
    pub failed: u64,
    pub summary: &'a str,
}

/// How a run ended.
pub struct Ended {
    pub status: Status,
    pub error: Option<String>,
}

fn new_id() -> String {
    let mut bytes = [0u8; 4];
    let _ = getrandom::fill(&mut bytes);
    format!("mig-{:x}-{}", cordon_store::now_ms(), hex::encode(bytes))
}

/// Validates the spec and records a new migration; returns its id.
pub fn create(config: &AgentConfig, ledger: &Ledger, spec_path: &Path) -> Result<String> {
    let spec = MigrationSpec::load(spec_path, config)?;
    let text = std::fs::read_to_string(spec_path)?;
    let path = spec_path.canonicalize().unwrap_or_else(|_| spec_path.to_path_buf());
    let id = new_id();
    let phases: Vec<String> = spec.phases.iter().map(|p| p.name.clone()).collect();
    ledger.create(&id, &path.to_string_lossy(), &text, &spec.unit(), &phases)?;
    Ok(id)
}

/// Holds a migration for one process: a second `run`/`resume` of the same
/// migration while this one lives is refused.
fn lock(state_dir: &Path, id: &str) -> Result<File> {
    if !cordon_store::is_safe_name(id) {
        bail!("{id:?} is not a migration id (they look like mig-18c2…-ab12cd34); `cordon migrate status` lists them");
    }
    let path = state_dir.join("migrations").join(format!("{id}.lock"));
    match cordon_store::lock::try_lock_file(&path)? {
        Some(file) => Ok(file),
        None => bail!("migration {id} is being run by another process; wait for it or stop it first"),
    }
}

async fn load(config: &AgentConfig, engine: &Engine, name: &str) -> Result<Plugin> {
    Plugin::load(engine, config.plugin(name)?).await
}

/// Runs (or resumes) migration `id` to its end or its first fail-fast error.
pub async fn run(
    config: &AgentConfig,
    engine: &Engine,
    ledger: Arc<Ledger>,
    id: &str,
    sink: Arc<dyn LogSink>,
    mut report: impl FnMut(&StepEvent<'_>),
) -> Result<Ended> {
    let _lock = lock(&config.state_dir, id)?;
    let m = unfinished(config, &ledger, id)?;
    ledger.set_status(id, Status::Running, None)?;
    match drive(config, engine, ledger.clone(), &m, sink, &mut report).await {
        Ok(ended) => Ok(ended),
        Err(e) => {
            ledger.set_status(id, Status::Failed, Some(&format!("{e:#}")))?;
            Err(e)
        }
    }
}

fn unfinished(config: &AgentConfig, ledger: &Ledger, id: &str) -> Result<Migration> {
    let m = ledger.get(id)?.with_context(|| format!("no migration {id} in {}; `cordon migrate status` lists them", config.state_dir.display()))?;
    if m.status.is_final() {
        bail!("migration {id} is already {}; there is nothing to resume", m.status.as_str());
    }
    Ok(m)
}

/// Gives migration `id` up: marks it `aborted` and releases its claim on
/// the unit, so a new migration of the unit may start. Refused while a
/// process runs it. Nothing in the stores is changed or undone.
pub fn abort(config: &AgentConfig, ledger: &Ledger, id: &str) -> Result<Migration> {
    let _lock = lock(&config.state_dir, id)?;
    let m = unfinished(config, ledger, id)?;
    ledger.set_status(id, Status::Aborted, m.error.as_deref())?;
    ledger.release(id)?;
    Ok(m)
}

async fn drive(
    config: &AgentConfig,
    engine: &Engine,
    ledger: Arc<Ledger>,
    m: &Migration,
    sink: Arc<dyn LogSink>,
    report: &mut impl FnMut(&StepEvent<'_>),
) -> Result<Ended> {
    let id = m.id.as_str();
    // The spec as recorded when the migration began: a changed file does
    // not change a running migration.
    let spec = MigrationSpec::parse(&m.spec, Path::new(&m.spec_path), config)?;

    let selector = load(config, engine, &spec.selector.plugin).await?;
    let filter = KeyFilterSession::open(engine, &selector, &spec.selector.options_json(), sink.clone())
        .await
        .map_err(|e| anyhow::anyhow!("selector `{}`: {e}", spec.selector.plugin))?;
    let transform = match &spec.transform {
        Some(t) => {
            let plugin = load(config, engine, &t.plugin).await?;
            let session = ItemActionSession::open(engine, &plugin, sink.clone()).await.map_err(|e| anyhow::anyhow!("transform `{}`: {e}", t.plugin))?;
            Some(Transform { session: tokio::sync::Mutex::new(session), options: t.options_json() })
        }
        None => None,
    };
    let source = spec.source.open().await.context("source")?;
    let destination = spec.destination.open().await.context("destination")?;
    let scope = Arc::new(ScopedStores::new(id, &m.unit, source, destination, filter, transform, spec.budget, ledger.clone(), m.verified)?);

    for index in m.phase..spec.phases.len() {
        let phase = &spec.phases[index];
        let plugin = load(config, engine, &phase.plugin).await?;
        let verify = phase.name == "verify";
        let resumed = index == m.phase;
        if resumed && verify {
            ledger.restart_phase(id, index)?;
        }
        let mut checkpoint = if resumed && !verify { m.checkpoint.clone() } else { None };
        let mut totals = ledger.phases(id)?.get(index).cloned().unwrap_or_default();
        ledger.set_phase_status(id, index, "running", None)?;
        loop {
            let request = StepRequest {
                migration_id: id.to_string(),
                phase: phase.name.clone(),
                options: super::spec::options_json(&phase.options),
                on_error: match phase.on_error {
                    ErrorPolicy::FailFast => runner::ErrorPolicy::FailFast,
                    ErrorPolicy::ContinueAndReport => runner::ErrorPolicy::ContinueAndReport,
                },
                checkpoint: checkpoint.clone(),
            };
            let step = runner::migration_step(engine, &plugin, scope.clone(), &request, sink.clone()).await.map_err(|e| e.to_string());
            let (record, outcome_checkpoint) = match &step {
                Ok(o) => (
                    StepRecord { done: o.done, checkpoint: o.checkpoint.as_deref(), entries: o.entries, bytes: o.bytes, failed: o.failed, summary: &o.summary, verify },
                    o.checkpoint.clone(),
                ),
                Err(e) if phase.on_error == ErrorPolicy::FailFast => {
                    let error = format!("phase {} ({}): {e}", phase.name, phase.plugin);
                    ledger.set_phase_status(id, index, "failed", Some(e))?;
                    ledger.set_status(id, Status::Failed, Some(&error))?;
                    return Ok(Ended { status: Status::Failed, error: Some(error) });
                }
                Err(e) => (StepRecord { done: true, checkpoint: None, entries: 0, bytes: 0, failed: 1, summary: e, verify: false }, None),
            };
            ledger.record_step(id, index, &record)?;
            totals.entries += record.entries;
            totals.bytes += record.bytes;
            totals.failed += record.failed;
            if step.is_err() {
                ledger.set_phase_status(id, index, "failed", None)?;
            }
            report(&StepEvent {
                phase: &phase.name,
                index,
                phases: spec.phases.len(),
                done: record.done,
                entries: totals.entries,
                bytes: totals.bytes,
                failed: totals.failed,
                summary: record.summary,
            });
            if record.done {
                if record.verify {
                    scope.mark_verified();
                }
                break;
            }
            checkpoint = outcome_checkpoint;
        }
    }
    let had_errors = ledger.phases(id)?.iter().any(|p| p.failed > 0 || p.status == "failed");
    let status = if had_errors { Status::CompletedWithErrors } else { Status::Completed };
    ledger.set_status(id, status, None)?;
    ledger.release(id)?;
    Ok(Ended { status, error: None })
}
