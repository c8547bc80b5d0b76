//! The calls of each world: a stage of an executor, the exports of a
//! planner, batches of a key filter, items of an item action, steps of a
//! migration phase. Each runs through [`crate::call`], so every way a call
//! can end — a result, a trap, a breached limit, a timeout, a refused
//! import — is an [`Outcome`] or a [`RunError`] with a one-line reason.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use cordon_contract::bindings::executor::{
    cordon::plugin::types,
    exports::cordon::plugin::execution::{StageRequest, StageResult},
};
use cordon_contract::bindings::planner::{
    Planner,
    exports::cordon::plugin::planning::{self, PlanRequest},
};
use crate::call::{Call, RunError, denials, with_denied, with_denials};
use crate::engine::Engine;
use crate::plugin::{Plugin, Subject};
use crate::sandbox::fs::{RUNNING, SCRATCH, TARGET};
use crate::sandbox::{LogSink, MemoryServices, RunContext, RunDirs, StageLog, StageServices};

pub use planning::{ArtifactVersion, PlannedStage};
pub use types::{Deployment, Sources, Stage, StageConfig, SyncStrategy, Trigger};

/// How a stage ended, as the host records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    Success,
    Failure,
    Cancelled,
    Skipped,
    /// Success, and the pipeline stops.
    Exited,
}

impl Status {
    pub fn is_success(self) -> bool {
        matches!(self, Status::Success | Status::Exited | Status::Skipped)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Success => "success",
            Status::Failure => "failure",
            Status::Cancelled => "cancelled",
            Status::Skipped => "skipped",
            Status::Exited => "exited",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<types::StageStatus> for Status {
    fn from(s: types::StageStatus) -> Self {
        match s {
            types::StageStatus::Success => Status::Success,
            types::StageStatus::Failure => Status::Failure,
            types::StageStatus::Cancelled => Status::Cancelled,
            types::StageStatus::Skipped => Status::Skipped,
            types::StageStatus::Exited => Status::Exited,
        }
    }
}

/// The result of one stage call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub status: Status,
    /// Why, in one line; empty on a plain success.
    pub message: String,
}

impl Outcome {
    fn failure(error: &RunError) -> Self {
        Self { status: Status::Failure, message: error.to_string() }
    }
}

/// Everything one stage call needs.
pub struct StageCall {
    pub deployment: Deployment,
    pub stage: Stage,
    /// The plugin's settings for the application, as JSON text.
    pub app_config: String,
    pub dirs: RunDirs,
    pub services: Arc<dyn StageServices>,
    pub sink: Arc<dyn LogSink>,
    /// The stage's own timeout; the plugin's limit caps it.
    pub timeout: Option<Duration>,
}

/// Performs one stage in a fresh sandbox. The message is masked last, so
/// no granted secret reaches the result, whatever part of it carries one.
pub async fn execute_stage(engine: &Engine, plugin: &Plugin, call: StageCall) -> Outcome {
    let Some(pre) = plugin.executor() else {
        return Outcome::failure(&plugin.wrong_world("performs no stages"));
    };
    let sources = sources(&call.dirs);
    let context = RunContext { dirs: call.dirs, services: call.services, sink: call.sink, timeout: call.timeout };
    let mut run = match Call::open(engine.wasmtime(), &plugin.sandbox, context).await {
        Ok(run) => run,
        Err(e) => return Outcome::failure(&e),
    };
    let request = StageRequest { deployment: call.deployment, stage: call.stage, sources, app_config: call.app_config };
    let Call { store, guard, .. } = &mut run;
    let result = guard.run(async {
        let bindings = pre.instantiate_async(&mut *store).await?;
        bindings.cordon_plugin_execution().call_execute_stage(&mut *store, &request).await
    })
    .await;
    // The guard already names what the sandbox denied; a refused result
    // size is named here, with the denials.
    let checked = result.and_then(|r| match run.check_size(r.message.len()) {
        Ok(()) => Ok(r),
        Err(too_big) => {
            run.log().host_line(&too_big.to_string());
            Err(with_denials(too_big, run.log()))
        }
    });
    let outcome = match checked {
        Err(e) => Outcome::failure(&e),
        Ok(StageResult { status, message }) => {
            let status = Status::from(status);
            let message = match denials(run.log()) {
                Some(denied) if !status.is_success() => with_denied(&message, &denied),
                _ => message,
            };
            Outcome { status, message }
        }
    };
    Outcome { message: run.log().mask(&crate::errno::explain(&outcome.message)), ..outcome }
}

/// Where a run's directories appear inside the sandbox.
fn sources(dirs: &RunDirs) -> Sources {
    Sources { target: TARGET.to_string(), running: dirs.running.as_ref().map(|_| RUNNING.to_string()), scratch: SCRATCH.to_string() }
}

impl StageCall {
    /// A stage run on its own, outside any deployment (`cordon stage run`):
    /// a made-up deployment of the application named after `target`, its
    /// metadata and blobs kept in memory for this call only.
    pub fn standalone(stage: &str, options: &str, dirs: RunDirs, sink: Arc<dyn LogSink>) -> StageCall {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let app = dirs.target.as_deref().and_then(|t| t.file_name()).map_or_else(|| "app".to_string(), |n| n.to_string_lossy().into_owned());
        let id = format!("run-{now}");
        StageCall {
            deployment: Deployment {
                id: id.clone(),
                application_id: app.clone(),
                application_name: app,
                labels: Vec::new(),
                trigger: Trigger { commit_hash: String::new(), commit_message: String::new(), commander: "cordon stage run".into() },
                created_at: now,
            },
            stage: Stage { id: format!("{id}-0"), name: stage.to_string(), desc: String::new(), index: 0, rollback: false, options: options.to_string() },
            app_config: "{}".into(),
            dirs,
            services: Arc::new(MemoryServices::default()),
            sink,
            timeout: None,
        }
    }
}

/// Checks `value` (JSON text), the options of `subject`, before a
/// deployment uses them: the plugin reads them as its stage will (when it
/// exports `options`), and every path its schema marks as a guest path must
/// lie in its grants. `Ok(Err(why))` is a refusal, to show the operator;
/// `Err` a call that failed. Plugins that describe nothing pass.
pub async fn check_options(engine: &Engine, plugin: &Plugin, subject: &Subject, value: &str) -> Result<Result<(), String>, RunError> {
    let Some((pre, export)) = plugin.options() else {
        return Ok(Ok(()));
    };
    let mut run = Call::detached(engine.wasmtime(), &plugin.sandbox, RunDirs::default(), Arc::new(crate::sandbox::NullSink)).await?;
    // A plan waits on this: a check gets seconds, not the stage's hour.
    run.guard.timeout = run.guard.timeout.min(crate::plugin::CHECK_TIMEOUT);
    let Call { store, guard, .. } = &mut run;
    let verdict = guard
        .run(async {
            let instance = pre.instantiate_async(&mut *store).await?;
            export.load(&mut *store, &instance)?.call_check(&mut *store, subject, value).await
        })
        .await?;
    if let Err(why) = verdict {
        run.check_size(why.len())?;
        return Ok(Err(run.log().mask(&why)));
    }
    let schema = plugin.described.as_ref().and_then(|d| d.schema(subject));
    match (schema, serde_json::from_str::<serde_json::Value>(value)) {
        (Some(schema), Ok(value)) => Ok(crate::plugin::options::check_guest_paths(schema, &value, plugin.sandbox.grants())),
        _ => Ok(Ok(())),
    }
}

/// What a planner call needs: the deployment, its sources, the plugin's
/// settings for the application, and where its log lines go.
pub struct PlanCall {
    pub deployment: Deployment,
    pub dirs: RunDirs,
    pub app_config: String,
    pub sink: Arc<dyn LogSink>,
}

impl PlanCall {
    fn request(&self) -> PlanRequest {
        PlanRequest { deployment: self.deployment.clone(), sources: sources(&self.dirs), app_config: self.app_config.clone() }
    }
}

type CallFuture<'a, T> = std::pin::Pin<Box<dyn Future<Output = wasmtime::Result<T>> + Send + 'a>>;

/// A planner's answer: its size against the result limit, and a copy with
/// every granted secret masked — answers are stored and printed (plan,
/// status), so none may carry a value in clear.
trait Answer {
    fn size(&self) -> usize;
    fn masked(self, log: &StageLog) -> Self;
}

impl Answer for planning::StrategyAnswer {
    fn size(&self) -> usize {
        match self {
            planning::StrategyAnswer::Decided(s) => s.summary.len(),
            planning::StrategyAnswer::Unsupported => 0,
        }
    }
    fn masked(self, log: &StageLog) -> Self {
        match self {
            planning::StrategyAnswer::Decided(s) => planning::StrategyAnswer::Decided(planning::Strategy { summary: log.mask(&s.summary), ..s }),
            unsupported => unsupported,
        }
    }
}

impl Answer for Vec<ArtifactVersion> {
    fn size(&self) -> usize {
        self.iter().map(|v| v.kind.len() + v.name.len() + v.version.len() + v.url.len()).sum()
    }
    fn masked(self, log: &StageLog) -> Self {
        self.into_iter()
            .map(|v| ArtifactVersion { kind: log.mask(&v.kind), name: log.mask(&v.name), version: log.mask(&v.version), url: log.mask(&v.url) })
            .collect()
    }
}

impl Answer for Vec<PlannedStage> {
    fn size(&self) -> usize {
        self.iter().map(|s| s.name.len() + s.desc.len() + s.options.len() + 16).sum()
    }
    fn masked(self, log: &StageLog) -> Self {
        self.into_iter().map(|s| PlannedStage { desc: log.mask(&s.desc), options: log.mask(&s.options), ..s }).collect()
    }
}

/// Runs one planner export in a fresh sandbox; the answer is checked
/// against the result limit and masked, and so is the plugin's error.
async fn planner_call<T: Answer + Send>(
    engine: &Engine,
    plugin: &Plugin,
    call: &PlanCall,
    f: impl for<'a> FnOnce(&'a mut wasmtime::Store<crate::sandbox::RunState>, Planner, PlanRequest) -> CallFuture<'a, Result<T, String>> + Send,
) -> Result<T, RunError> {
    let Some(pre) = plugin.planner() else {
        return Err(plugin.wrong_world("plans nothing"));
    };
    let mut run = Call::detached(engine.wasmtime(), &plugin.sandbox, call.dirs.clone(), call.sink.clone()).await?;
    let request = call.request();
    let Call { store, guard, .. } = &mut run;
    let answer = guard.run(async {
        let bindings = pre.instantiate_async(&mut *store).await?;
        f(store, bindings, request).await
    })
    .await?
    .map_err(|e| match run.check_size(e.len()) {
        Err(too_big) => too_big,
        Ok(()) => run.plugin_error(e),
    })?;
    run.check_size(answer.size())?;
    Ok(answer.masked(run.log()))
}

/// The planner's vote: `None` for "unsupported".
pub async fn determine_strategy(engine: &Engine, plugin: &Plugin, call: &PlanCall) -> Result<Option<(SyncStrategy, String)>, RunError> {
    let answer = planner_call(
        engine,
        plugin,
        call,
        |store, bindings, request| Box::pin(async move { bindings.cordon_plugin_planning().call_determine_strategy(store, &request).await }),
    )
    .await?;
    Ok(match answer {
        planning::StrategyAnswer::Unsupported => None,
        planning::StrategyAnswer::Decided(s) => Some((s.strategy, s.summary)),
    })
}

/// The versions the deployment will roll out.
pub async fn determine_versions(engine: &Engine, plugin: &Plugin, call: &PlanCall) -> Result<Vec<ArtifactVersion>, RunError> {
    planner_call(
        engine,
        plugin,
        call,
        |store, bindings, request| Box::pin(async move { bindings.cordon_plugin_planning().call_determine_versions(store, &request).await }),
    )
    .await
}

/// Quick-sync stages, rollback stages included when `rollback`.
pub async fn build_quick_sync_stages(engine: &Engine, plugin: &Plugin, call: &PlanCall, rollback: bool) -> Result<Vec<PlannedStage>, RunError> {
    planner_call(
        engine,
        plugin,
        call,
        move |store, bindings, request| {
            Box::pin(async move { bindings.cordon_plugin_planning().call_build_quick_sync_stages(store, &request, rollback).await })
        },
    )
    .await
}

/// Pipeline-sync stages for the configured `stages` this plugin defines.
pub async fn build_pipeline_sync_stages(
    engine: &Engine,
    plugin: &Plugin,
    call: &PlanCall,
    stages: Vec<StageConfig>,
    rollback: bool,
) -> Result<Vec<PlannedStage>, RunError> {
    planner_call(
        engine,
        plugin,
        call,
        move |store, bindings, request| {
            Box::pin(async move { bindings.cordon_plugin_planning().call_build_pipeline_sync_stages(store, &request, &stages, rollback).await })
        },
    )
    .await
}

/// A sandboxed instance kept for a stream of calls (key-filter batches,
/// item-action items): one store, limits per call.
struct Session<B> {
    run: Call,
    bindings: B,
}

/// A key packing for [`KeyFilterSession::select`].
pub use cordon_contract::bindings::key_filter::exports::cordon::plugin::key_selection::{KeyBatch, Selection};

/// A configured key-filter instance.
pub struct KeyFilterSession(Session<cordon_contract::bindings::key_filter::KeyFilter>);

impl KeyFilterSession {
    /// Instantiates the plugin and configures it with `options` (JSON).
    pub async fn open(engine: &Engine, plugin: &Plugin, options: &str, sink: Arc<dyn LogSink>) -> Result<Self, RunError> {
        let pre = plugin.key_filter().ok_or_else(|| plugin.wrong_world("is not a key filter"))?;
        let mut run = Call::detached(engine.wasmtime(), &plugin.sandbox, RunDirs::default(), sink).await?;
        let bindings = run.guard.run(pre.instantiate_async(&mut run.store)).await?;
        let configured = run.guard.run(bindings.cordon_plugin_key_selection().call_configure(&mut run.store, options)).await?;
        configured.map_err(|e| run.plugin_error(format!("plugin `{}` refused its options: {e}", plugin.name)))?;
        Ok(Self(Session { run, bindings }))
    }

    /// Classifies one batch; checks the answer's shape.
    pub async fn select(&mut self, batch: &KeyBatch) -> Result<Selection, RunError> {
        let Session { run, bindings } = &mut self.0;
        let selection = run.guard.run(bindings.cordon_plugin_key_selection().call_select(&mut run.store, batch)).await?.map_err(|e| run.plugin_error(e))?;
        let n = batch.ends.len();
        if selection.selected.len() != n.div_ceil(8) {
            return Err(run.contract_error(format!("the filter returned a bitmap of {} bytes for {n} keys", selection.selected.len())));
        }
        if let Some(&bad) = selection.unclassified.iter().find(|&&i| i as usize >= n || selection.selected[i as usize / 8] & (1 << (i % 8)) != 0) {
            return Err(run.contract_error(format!("the filter reported key {bad} as unclassified, but it is out of range or also selected")));
        }
        // Each key is reported at most once, in order: a filter cannot make
        // the host report (and write out) more keys than it was given.
        if let Some(pair) = selection.unclassified.windows(2).find(|w| w[0] >= w[1]) {
            return Err(run.contract_error(format!(
                "the filter reported unclassified keys out of order or twice ({} then {}); each key at most once, in batch order",
                pair[0], pair[1]
            )));
        }
        Ok(selection)
    }

    /// The delete prefixes of the batch's selected keys.
    pub async fn delete_prefixes(&mut self, batch: &KeyBatch) -> Result<Vec<String>, RunError> {
        let Session { run, bindings } = &mut self.0;
        let prefixes = run.guard.run(bindings.cordon_plugin_key_selection().call_delete_prefixes(&mut run.store, batch)).await?;
        run.check_size(prefixes.iter().map(String::len).sum())?;
        if let Some(bad) = prefixes.iter().find(|p| !p.ends_with('/')) {
            return Err(run.contract_error(format!("the filter returned delete prefix {bad:?}, which does not end with '/'")));
        }
        Ok(prefixes)
    }
}

pub use cordon_contract::bindings::item_action::exports::cordon::plugin::item_rewrite::{Outcome as ItemOutcome, Selector as ItemSelector};

/// An item-action instance.
pub struct ItemActionSession(Session<cordon_contract::bindings::item_action::ItemAction>);

impl ItemActionSession {
    pub async fn open(engine: &Engine, plugin: &Plugin, sink: Arc<dyn LogSink>) -> Result<Self, RunError> {
        let pre = plugin.item_action().ok_or_else(|| plugin.wrong_world("is not an item action"))?;
        let mut run = Call::detached(engine.wasmtime(), &plugin.sandbox, RunDirs::default(), sink).await?;
        let bindings = run.guard.run(pre.instantiate_async(&mut run.store)).await?;
        Ok(Self(Session { run, bindings }))
    }

    /// Which items the action wants.
    pub async fn applies_to(&mut self, options: &str) -> Result<ItemSelector, RunError> {
        let Session { run, bindings } = &mut self.0;
        run.guard.run(bindings.cordon_plugin_item_rewrite().call_applies_to(&mut run.store, options)).await?.map_err(|e| run.plugin_error(e))
    }

    /// Runs the action on one item (JSON text).
    pub async fn execute(&mut self, options: &str, item: &str) -> Result<ItemOutcome, RunError> {
        let Session { run, bindings } = &mut self.0;
        let outcome = run.guard.run(bindings.cordon_plugin_item_rewrite().call_execute(&mut run.store, options, item)).await?.map_err(|e| run.plugin_error(e))?;
        let size = match &outcome {
            ItemOutcome::Modified(m) => m.len(),
            ItemOutcome::WithAdditionalItems(w) => w.item.len() + w.additional.iter().map(String::len).sum::<usize>(),
            ItemOutcome::Unchanged | ItemOutcome::Skip => 0,
        };
        run.check_size(size)?;
        Ok(outcome)
    }
}

pub use cordon_contract::bindings::migration_phase::exports::cordon::plugin::phase::{ErrorPolicy, StepOutcome, StepRequest};

/// Runs one step of a migration phase in a fresh instance whose store
/// handles are `stores`. The outcome's checkpoint is bounded by the
/// plugin's result limit.
pub async fn migration_step(
    engine: &Engine,
    plugin: &Plugin,
    stores: Arc<dyn crate::sandbox::stores::MigrationStores>,
    request: &StepRequest,
    sink: Arc<dyn LogSink>,
) -> Result<StepOutcome, RunError> {
    let pre = plugin.migration_phase().ok_or_else(|| plugin.wrong_world("is not a migration phase"))?;
    let mut run = Call::detached(engine.wasmtime(), &plugin.sandbox, RunDirs::default(), sink).await?;
    let handles = run.store.data_mut().grant_stores(stores);
    let bindings = run.guard.run(pre.instantiate_async(&mut run.store)).await?;
    let step = bindings.cordon_plugin_phase().call_step(&mut run.store, request, handles.source, handles.destination);
    let outcome = run.guard.run(step).await?.map_err(|e| run.plugin_error(e))?;
    run.check_size(outcome.checkpoint.as_ref().map_or(0, String::len) + outcome.summary.len())?;
    Ok(outcome)
}
