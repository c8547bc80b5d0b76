//! Runs one deployment from the store: plan once, drive the stage DAG
//! (independent stages concurrently, each in a fresh sandbox), honour
//! commands and timeouts, roll back, record every result exactly once.
//!
//! Resume is the same code path: stages left `running` by a crash go back
//! to `not-started` and run again; finished stages are never re-run; a
//! deployment that was rolling back continues its rollback.
//!
//! Policies worth knowing:
//! - A failure stops the forward pipeline: running siblings are cancelled,
//!   not-started stages stay not-started, and rollback runs if
//!   `planner.autoRollback` is on and the planners returned rollback stages.
//! - `exited` stops starting new stages; stages already running finish, the
//!   rest are settled `skipped`, and the deployment succeeds.
//! - `skip` of a stage settles it `skipped` (interrupting it if running);
//!   `cancel` interrupts everything and ends the deployment `cancelled`,
//!   after rollback — and a cancel during rollback stops the rollback.
//! - The deployment timeout bounds the forward stages; each rollback stage
//!   is bounded by its own stage timeout.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::task::{AbortHandle, JoinSet};

use super::config::AppConfig;
use super::plan::{self, PlanInput, PlanSummary, TriggerInfo};
use super::services::{StoreLog, StoreServices};
use cordon_store::now_ms;
use super::snapshot::{self, SourceLock};
use super::{Host, deployment_info};
use cordon_runtime::runner::{self, Outcome, Stage, StageCall, Status};
use cordon_runtime::sandbox::RunDirs;
use crate::debug::{self, Breakpoints, Pause};
use cordon_store::{CommandKind, DeploymentRecord, DeploymentStatus, Fence, StageRecord, StageStatus};

/// How often commands are read while stages run.
const COMMAND_POLL: Duration = Duration::from_millis(100);

/// How a phase (forward or rollback) ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ending {
    Completed,
    Exited(String),
    Failed(String),
    Cancelled(String),
}

fn status_of(outcome: Status) -> StageStatus {
    match outcome {
        Status::Success => StageStatus::Success,
        Status::Failure => StageStatus::Failure,
        Status::Cancelled => StageStatus::Cancelled,
        Status::Skipped => StageStatus::Skipped,
        Status::Exited => StageStatus::Exited,
    }
}

/// Plans (if needed) and runs the deployment `fence` leases to its end;
/// every write carries the lease, so the run stops (with [`cordon_store::Fenced`])
/// once another agent has taken the deployment over.
pub async fn run_deployment(host: Arc<Host>, fence: Fence) -> Result<DeploymentStatus> {
    let id = fence.deployment.clone();
    let record = host.store.deployment(&id)?.with_context(|| format!("no deployment `{id}`"))?;
    if record.status.is_final() {
        return Ok(record.status);
    }
    let trigger: TriggerInfo = serde_json::from_str(&record.trigger).context("the stored trigger is not readable")?;
    let record = match host.localise(record) {
        Ok(record) => record,
        Err(e) => return fail(&host, &fence, &format!("its source cannot be read: {e:#}")),
    };
    let app = match AppConfig::load(&PathBuf::from(&record.target_snapshot)) {
        Ok(app) => app,
        Err(e) => return fail(&host, &fence, &format!("the application config in the snapshot is invalid: {e:#}")),
    };
    let record = if record.plan.is_empty() {
        match plan_deployment(&host, &fence, &record, &app, &trigger).await {
            Ok(record) => record,
            Err(e) if cordon_store::is_fenced(&e) => return Err(e),
            Err(e) => return fail(&host, &fence, &format!("planning failed: {e:#}")),
        }
    } else {
        let reset = host.store.reset_running_stages(&fence)?;
        if reset > 0 {
            tracing::info!("{id}: resuming; {reset} interrupted stage(s) will run again");
        }
        record
    };
    let summary: PlanSummary = serde_json::from_str(&record.plan).context("the stored plan is not readable")?;
    let mut run = Run::new(host.clone(), fence, record, app, trigger, summary)?;
    let status = run.drive().await?;
    let _ = std::fs::remove_dir_all(host.scratch_dir(&id));
    Ok(status)
}

fn fail(host: &Host, fence: &Fence, reason: &str) -> Result<DeploymentStatus> {
    host.store.set_deployment_status(fence, DeploymentStatus::Failure, reason, now_ms())?;
    Ok(DeploymentStatus::Failure)
}

async fn plan_deployment(host: &Arc<Host>, fence: &Fence, record: &DeploymentRecord, app: &AppConfig, trigger: &TriggerInfo) -> Result<DeploymentRecord> {
    let (running_ref, running) = host.running_source(&record.application)?.unzip();
    let target = PathBuf::from(&record.target_snapshot);
    let changed = snapshot::changed_files(running.as_deref(), &target)?;
    let scratch = host.scratch_dir(&record.id).join("plan");
    std::fs::create_dir_all(&scratch)?;
    let input = PlanInput {
        engine: &host.engine,
        plugins: &host.plugins,
        app,
        trigger,
        deployment: deployment_info(record, app, trigger),
        target,
        running: running.clone(),
        scratch,
        changed,
        sink: Arc::new(StoreLog { store: host.store.clone(), fence: fence.clone(), stage: String::new() }),
    };
    let mut planned = plan::plan(&input).await?;
    for stage in &mut planned.stages {
        stage.deployment = record.id.clone();
    }
    host.store.save_plan(fence, &serde_json::to_string(&planned.summary)?, &running_ref.unwrap_or_default(), &planned.stages, now_ms())?;
    host.localise(host.store.deployment(&record.id)?.context("the deployment vanished")?)
}

/// The call that performs `stage` of deployment `record`: its sources, a
/// fresh scratch directory named `scratch`, store-backed services.
pub fn stage_call(
    host: &Host,
    fence: &Fence,
    record: &DeploymentRecord,
    app: &AppConfig,
    stage: &StageRecord,
    scratch: &str,
    sink: Arc<dyn cordon_runtime::sandbox::LogSink>,
) -> Result<StageCall> {
    let trigger: TriggerInfo = serde_json::from_str(&record.trigger).context("the stored trigger is not readable")?;
    let scratch = host.scratch_dir(&record.id).join(scratch);
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch)?;
    }
    std::fs::create_dir_all(&scratch)?;
    let running = (!record.running_snapshot.is_empty()).then(|| PathBuf::from(&record.running_snapshot));
    Ok(StageCall {
        deployment: deployment_info(record, app, &trigger),
        stage: Stage {
            id: stage.id.clone(),
            name: stage.name.clone(),
            desc: stage.desc.clone(),
            index: stage.index,
            rollback: stage.rollback,
            options: stage.options.clone(),
        },
        app_config: app.plugin_settings(&stage.plugin),
        dirs: RunDirs { target: Some(PathBuf::from(&record.target_snapshot)), running, scratch: Some(scratch) },
        services: Arc::new(StoreServices {
            store: host.store.clone(),
            fence: fence.clone(),
            stage: stage.id.clone(),
            application: app.name.clone(),
            plugin: stage.plugin.clone(),
        }),
        sink,
        timeout: Some(Duration::from_millis(stage.timeout_ms)),
    })
}

/// One deployment being driven: its stages in memory, mirrored to the store.
struct Run {
    host: Arc<Host>,
    /// The lease every write carries.
    fence: Fence,
    record: DeploymentRecord,
    app: AppConfig,
    trigger: TriggerInfo,
    summary: PlanSummary,
    stages: Vec<StageRecord>,
    position: HashMap<String, usize>,
    seen_commands: HashSet<String>,
    cancel: Option<String>,
    skips: HashMap<String, String>,
    /// Debug resumes not yet applied: (fail, who).
    resumes: Vec<(bool, String)>,
    breakpoints: Breakpoints,
    /// Since when a stage has been paused, if one is.
    paused_since: Option<std::time::Instant>,
    /// Time spent paused before that, stored so it survives a restart.
    paused_ms: u64,
    last_poll: Option<std::time::Instant>,
    /// Held shared while stages may read the source (uploads wait for it).
    source: SourceLock,
    /// On a shared store, the stored snapshot `record.target_snapshot`
    /// was fetched from (empty until first looked at).
    target_ref: String,
}

impl Run {
    fn new(host: Arc<Host>, fence: Fence, record: DeploymentRecord, app: AppConfig, trigger: TriggerInfo, summary: PlanSummary) -> Result<Self> {
        let stages = host.store.stages(&record.id)?;
        let position = stages.iter().enumerate().map(|(i, s)| (s.id.clone(), i)).collect();
        let breakpoints = app.debug.clone().unwrap_or_default().merged(&trigger.breakpoints);
        let paused_ms = debug::paused_ms(host.store.as_ref(), &record.id)?;
        let source = SourceLock::of(Path::new(&record.target_snapshot));
        Ok(Self {
            target_ref: String::new(),
            host,
            fence,
            record,
            app,
            trigger,
            summary,
            stages,
            position,
            seen_commands: HashSet::new(),
            cancel: None,
            skips: HashMap::new(),
            resumes: Vec::new(),
            breakpoints,
            paused_since: None,
            paused_ms,
            last_poll: None,
            source,
        })
    }

    fn id(&self) -> &str {
        &self.record.id
    }

    async fn drive(&mut self) -> Result<DeploymentStatus> {
        let store = self.host.store.clone();
        let forward = if self.record.status == DeploymentStatus::RollingBack {
            // Resumed mid-rollback: the reason was stored when it began.
            let reason = self.record.reason.clone();
            if self.has_cancel_command()? { Ending::Cancelled(reason) } else { Ending::Failed(reason) }
        } else {
            self.phase(false).await?
        };
        let (status, reason) = match forward {
            Ending::Completed => (DeploymentStatus::Success, String::new()),
            Ending::Exited(stage) => (DeploymentStatus::Success, format!("stage {stage} exited the pipeline")),
            Ending::Failed(ref reason) | Ending::Cancelled(ref reason) => {
                let reason = reason.clone();
                let cancelled = matches!(forward, Ending::Cancelled(_));
                let final_status = if cancelled { DeploymentStatus::Cancelled } else { DeploymentStatus::Failure };
                let has_rollback = self.stages.iter().any(|s| s.rollback && !s.status.is_final());
                if self.summary.auto_rollback && has_rollback {
                    store.set_deployment_status(&self.fence, DeploymentStatus::RollingBack, &reason, now_ms())?;
                    // The cancel that stopped the pipeline does not stop its
                    // rollback; only a cancel issued from now on does.
                    self.last_poll = None;
                    self.poll_commands()?;
                    self.cancel = None;
                    match self.phase(true).await? {
                        Ending::Completed | Ending::Exited(_) => (final_status, format!("{reason}; rolled back")),
                        Ending::Failed(why) => (final_status, format!("{reason}; rollback failed: {why}")),
                        Ending::Cancelled(why) => (DeploymentStatus::Cancelled, format!("{reason}; rollback {why}")),
                    }
                } else {
                    (final_status, reason)
                }
            }
        };
        if status == DeploymentStatus::Success {
            store.complete_success(&self.fence, &reason, now_ms())?;
        } else {
            store.set_deployment_status(&self.fence, status, &reason, now_ms())?;
        }
        Ok(status)
    }

    fn has_cancel_command(&self) -> Result<bool> {
        Ok(self.host.store.commands(self.id(), None)?.iter().any(|c| c.kind == CommandKind::Cancel))
    }

    /// Reads new commands (at most every [`COMMAND_POLL`]).
    fn poll_commands(&mut self) -> Result<()> {
        if self.last_poll.is_some_and(|t| t.elapsed() < COMMAND_POLL) {
            return Ok(());
        }
        self.last_poll = Some(std::time::Instant::now());
        for command in self.host.store.commands(&self.record.id, None)? {
            if !self.seen_commands.insert(command.id.clone()) {
                continue;
            }
            match command.kind {
                CommandKind::Cancel => {
                    self.cancel.get_or_insert_with(|| format!("cancelled by {}", command.commander));
                }
                CommandKind::Skip => {
                    self.skips.insert(command.stage.clone(), command.commander.clone());
                }
                CommandKind::DebugContinue => self.resumes.push((false, command.commander.clone())),
                CommandKind::DebugFailContinue => self.resumes.push((true, command.commander.clone())),
                CommandKind::Approve => {}
            }
        }
        Ok(())
    }

    /// Records a final status of a stage, if nobody recorded one before.
    fn record(&mut self, stage: &str, status: StageStatus, message: &str, was_running: bool) -> Result<bool> {
        let from = if was_running { StageStatus::Running } else { StageStatus::NotStarted };
        self.transition(stage, &[from], status, message)
    }

    /// Moves a stage between statuses, in the store and in memory.
    fn transition(&mut self, stage: &str, from: &[StageStatus], to: StageStatus, message: &str) -> Result<bool> {
        let at = now_ms();
        let moved = self.host.store.transition_stage(&self.fence, stage, from, to, message, at)?;
        if moved {
            let s = &mut self.stages[self.position[stage]];
            s.status = to;
            s.message = message.to_string();
            if to.is_final() {
                s.finished_at = Some(at);
            }
        }
        Ok(moved)
    }

    /// Holds a stage at a breakpoint.
    fn pause(&mut self, stage: &str, from: StageStatus, pause: Pause) -> Result<()> {
        pause.save(self.host.store.as_ref(), &self.fence, stage)?;
        let how = match &pause {
            Pause::Before => "before it runs".to_string(),
            Pause::After { status, .. } => format!("after it ran ({status})"),
            Pause::OnFailure { .. } => "because it failed".to_string(),
        };
        let message = format!("paused {how}: cordon debug continue|fail-continue|run {}", self.id());
        self.transition(stage, &[from], StageStatus::Paused, &message)?;
        self.host.store.set_deployment_status(&self.fence, DeploymentStatus::Running, &format!("stage {stage} is paused"), now_ms())?;
        Ok(())
    }

    /// Applies `cordon debug continue|fail-continue` to every paused stage.
    fn apply_resumes(&mut self) -> Result<()> {
        let resumes = std::mem::take(&mut self.resumes);
        let Some((fail, who)) = resumes.into_iter().next_back() else { return Ok(()) };
        let paused: Vec<String> = self.stages.iter().filter(|s| s.status == StageStatus::Paused).map(|s| s.id.clone()).collect();
        for stage in paused {
            let pause = Pause::load(self.host.store.as_ref(), self.id(), &stage);
            let before = matches!(pause, Ok(Pause::Before));
            let (status, message) = Pause::resume(pause, fail, &who);
            if before && status == StageStatus::NotStarted {
                debug::mark_passed(self.host.store.as_ref(), &self.fence, &stage)?;
            }
            self.transition(&stage, &[StageStatus::Paused], status, &message)?;
        }
        self.host.store.set_deployment_status(&self.fence, DeploymentStatus::Running, "", now_ms())?;
        Ok(())
    }

    /// Keeps the deployment timeout from counting paused time.
    fn account_pause(&mut self) -> Result<()> {
        let paused = self.stages.iter().any(|s| s.status == StageStatus::Paused);
        match (paused, self.paused_since) {
            (true, None) => self.paused_since = Some(std::time::Instant::now()),
            (false, Some(since)) => {
                self.paused_ms += since.elapsed().as_millis() as u64;
                debug::set_paused_ms(self.host.store.as_ref(), &self.fence, self.paused_ms)?;
                self.paused_since = None;
            }
            _ => {}
        }
        Ok(())
    }

    fn call(&self, stage: &StageRecord) -> Result<StageCall> {
        let sink = Arc::new(StoreLog { store: self.host.store.clone(), fence: self.fence.clone(), stage: stage.id.clone() });
        stage_call(&self.host, &self.fence, &self.record, &self.app, stage, &stage.id, sink)
    }

    /// Why a ready stage is skipped without running, if it is.
    fn skip_reason(&self, stage: &StageRecord) -> Option<String> {
        if let Some(who) = self.skips.get(&stage.id) {
            return Some(format!("skipped by {who}"));
        }
        if stage.rollback {
            return None;
        }
        let configured = self.app.stages().get(stage.index as usize).filter(|c| c.name == stage.name)?;
        configured.skip_on.reason(&self.trigger.commit_message, &self.summary.changed)
    }

    /// On a shared store an upload points the deployment at a new stored
    /// snapshot (stored ones never change); stages started from now on
    /// read it, stages already running keep the tree they started with.
    fn refresh_source(&mut self) -> Result<()> {
        if !self.host.shared {
            return Ok(());
        }
        let reference = self.host.store.deployment(self.id())?.context("the deployment vanished")?.target_snapshot;
        if reference != self.target_ref {
            self.record.target_snapshot = self.host.source(&reference)?.to_string_lossy().into_owned();
            self.source = SourceLock::of(Path::new(&self.record.target_snapshot));
            self.target_ref = reference;
        }
        Ok(())
    }

    /// Drives the forward stages (`rollback = false`) or the rollback stages.
    async fn phase(&mut self, rollback: bool) -> Result<Ending> {
        // When the deployment times out if nothing is ever paused.
        let unpaused_deadline = self.record.started_at.unwrap_or_else(now_ms) + self.summary.timeout_ms;
        let mut tasks: JoinSet<(String, Outcome)> = JoinSet::new();
        let mut running: HashMap<String, AbortHandle> = HashMap::new();
        let mut exited: Option<String> = None;
        let ending = loop {
            self.poll_commands()?;
            if running.is_empty() {
                self.source.release();
            }
            // Passing a breakpoint and starting stages wait for an upload under way.
            if !self.resumes.is_empty() && self.source.share()? {
                self.apply_resumes()?;
            }
            self.account_pause()?;
            // The deployment timeout bounds the forward stages, paused time excluded.
            let deadline = match (rollback, self.paused_since) {
                (false, None) => Some(unpaused_deadline + self.paused_ms),
                _ => None,
            };
            // Skips of running stages interrupt them.
            let skipped: Vec<(String, String)> =
                self.skips.iter().filter(|(s, _)| running.contains_key(*s)).map(|(s, w)| (s.clone(), w.clone())).collect();
            for (stage, who) in skipped {
                if let Some(handle) = running.remove(&stage) {
                    handle.abort();
                }
                self.record(&stage, StageStatus::Skipped, &format!("skipped by {who}"), true)?;
            }
            // Cancel and the deployment timeout interrupt everything.
            let stop = match (&self.cancel, deadline) {
                (Some(why), _) => Some(Ending::Cancelled(why.clone())),
                (None, Some(deadline)) if now_ms() >= deadline => Some(Ending::Failed(format!(
                    "deployment timed out after {}",
                    humantime::format_duration(Duration::from_millis(self.summary.timeout_ms))
                ))),
                _ => None,
            };
            if let Some(stop) = stop {
                let why = match &stop {
                    Ending::Cancelled(w) | Ending::Failed(w) => w.clone(),
                    _ => unreachable!(),
                };
                self.interrupt(&mut running, &why)?;
                break stop;
            }
            let phase: Vec<usize> = (0..self.stages.len()).filter(|&i| self.stages[i].rollback == rollback).collect();
            if let Some(failed) = phase.iter().map(|&i| &self.stages[i]).find(|s| matches!(s.status, StageStatus::Failure | StageStatus::Cancelled)) {
                let why = format!("stage {} {}: {}", failed.id, failed.status, failed.message);
                let short = format!("stopped: stage {} {}", failed.id, failed.status);
                self.interrupt(&mut running, &short)?;
                break Ending::Failed(why);
            }
            if exited.is_none()
                && let Some(s) = phase.iter().map(|&i| &self.stages[i]).find(|s| s.status == StageStatus::Exited)
            {
                exited = Some(s.id.clone());
            }
            if let Some(stage) = &exited
                && running.is_empty()
            {
                let rest: Vec<String> = phase.iter().map(|&i| &self.stages[i]).filter(|s| s.status == StageStatus::NotStarted).map(|s| s.id.clone()).collect();
                for s in rest {
                    self.record(&s, StageStatus::Skipped, &format!("not run: stage {stage} exited the pipeline"), false)?;
                }
                break Ending::Exited(stage.clone());
            }
            if phase.iter().all(|&i| self.stages[i].status.is_final()) {
                break Ending::Completed;
            }
            let mut upload_under_way = false;
            if exited.is_none() {
                let ready: Vec<usize> = phase
                    .iter()
                    .copied()
                    .filter(|&i| self.ready(i))
                    .collect();
                if !ready.is_empty() {
                    self.refresh_source()?;
                }
                upload_under_way = !ready.is_empty() && !self.source.share()?;
                for i in ready.into_iter().filter(|_| !upload_under_way) {
                    let stage = self.stages[i].clone();
                    if let Some(why) = self.skip_reason(&stage) {
                        self.record(&stage.id, StageStatus::Skipped, &why, false)?;
                        continue;
                    }
                    if self.breakpoints.before(&stage) && !debug::passed(self.host.store.as_ref(), self.id(), &stage.id)? {
                        self.pause(&stage.id, StageStatus::NotStarted, Pause::Before)?;
                        continue;
                    }
                    let plugin = self.host.plugins.get(&stage.plugin).cloned().with_context(|| {
                        format!("stage {} needs plugin `{}`, which is no longer in the agent config", stage.id, stage.plugin)
                    });
                    let plugin = match plugin {
                        Ok(p) => p,
                        Err(e) => {
                            self.host.store.start_stage(&self.fence, &stage.id, now_ms())?;
                            self.record(&stage.id, StageStatus::Failure, &format!("{e:#}"), true)?;
                            continue;
                        }
                    };
                    let call = self.call(&stage)?;
                    self.host.store.start_stage(&self.fence, &stage.id, now_ms())?;
                    self.stages[i].status = StageStatus::Running;
                    let engine = self.host.engine.clone();
                    let stage_id = stage.id.clone();
                    let handle = tasks.spawn(async move {
                        let outcome = runner::execute_stage(&engine, &plugin, call).await;
                        (stage_id, outcome)
                    });
                    running.insert(stage.id.clone(), handle);
                }
            }
            let paused = phase.iter().any(|&i| self.stages[i].status == StageStatus::Paused);
            if running.is_empty() && (paused || upload_under_way) {
                tokio::time::sleep(COMMAND_POLL).await;
                continue;
            }
            if running.is_empty() {
                // Nothing runs and nothing could start: a stage waits on one
                // that will never let it run (a skipped-by-failure chain).
                if phase.iter().any(|&i| self.stages[i].status == StageStatus::NotStarted)
                    && !phase.iter().any(|&i| self.ready(i))
                {
                    break Ending::Failed("no stage can start: their dependencies did not succeed".to_string());
                }
                continue;
            }
            tokio::select! {
                joined = tasks.join_next() => {
                    if let Some(Ok((stage, outcome))) = joined
                        && running.remove(&stage).is_some()
                    {
                        let status = status_of(outcome.status);
                        let record = self.stages[self.position[&stage]].clone();
                        if !rollback && self.breakpoints.after(&record) {
                            self.pause(&stage, StageStatus::Running, Pause::After { status, message: outcome.message })?;
                        } else if !rollback && self.breakpoints.break_on_failure && status == StageStatus::Failure {
                            self.pause(&stage, StageStatus::Running, Pause::OnFailure { message: outcome.message })?;
                        } else {
                            self.record(&stage, status, &outcome.message, true)?;
                        }
                    }
                }
                _ = tokio::time::sleep(COMMAND_POLL) => {}
            }
        };
        tasks.abort_all();
        Ok(ending)
    }

    /// Whether stage `i` has not started and everything it needs let it run.
    fn ready(&self, i: usize) -> bool {
        let s = &self.stages[i];
        s.status == StageStatus::NotStarted
            && s.needs.iter().all(|n| self.position.get(n).is_some_and(|&j| self.stages[j].status.lets_dependents_run()))
    }

    /// Stops every running stage, and ends every paused one, recording them
    /// cancelled with `why`.
    fn interrupt(&mut self, running: &mut HashMap<String, AbortHandle>, why: &str) -> Result<()> {
        for (stage, handle) in running.drain().collect::<Vec<_>>() {
            handle.abort();
            self.record(&stage, StageStatus::Cancelled, why, true)?;
        }
        let paused: Vec<String> = self.stages.iter().filter(|s| s.status == StageStatus::Paused).map(|s| s.id.clone()).collect();
        for stage in paused {
            self.transition(&stage, &[StageStatus::Paused], StageStatus::Cancelled, why)?;
        }
        self.account_pause()
    }
}
