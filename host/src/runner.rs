//! Performs one call of a plugin in a fresh sandbox and turns every way it
//! can end — a result, a trap, a breached limit, a timeout, a refused
//! import — into an [`Outcome`] with a one-line reason.
//!
//! Nothing a guest does escapes its call: a trap or panic fails that call
//! only, the store is dropped, and the next call starts from a fresh
//! instance.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use wasmtime::{Trap, WasmBacktrace};

use crate::contract::bindings::executor::{
    cordon::plugin::types,
    exports::cordon::plugin::execution::{StageRequest, StageResult},
    exports::cordon::plugin::stages::GuestIndices as StagesIndices,
};
use crate::contract::bindings::planner::{
    Planner,
    exports::cordon::plugin::planning::{self, PlanRequest},
};
use crate::engine::Runtime;
use crate::plugin::{Plugin, StageInfo};
use crate::sandbox::output::NullSink;
use crate::sandbox::{LogSink, MemoryServices, RunContext, RunDirs, StageLog, StageServices, Violation};

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
    fn failure(message: String) -> Self {
        Self { status: Status::Failure, message }
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

/// Innermost frames of one function that make a trap a runaway recursion.
const RECURSION_FRAMES: usize = 16;

/// Whether the innermost frames of a trap are all the same function.
fn is_recursion(backtrace: &WasmBacktrace) -> bool {
    let frames = backtrace.frames();
    frames.len() >= RECURSION_FRAMES
        && frames[..RECURSION_FRAMES].iter().all(|f| f.func_index() == frames[0].func_index() && f.module().name() == frames[0].module().name())
}

/// Finds a value of type `E` anywhere in an error's chain.
fn find<E: std::error::Error + 'static>(e: &wasmtime::Error) -> Option<&E> {
    e.chain().find_map(|c| c.downcast_ref::<E>())
}

/// Turns a failed call into a reason that names the cause.
fn explain(e: &wasmtime::Error, timeout: Duration, log: &StageLog) -> String {
    if let Some(v) = find::<Violation>(e) {
        return v.to_string();
    }
    match find::<Trap>(e) {
        Some(Trap::Interrupt) => Violation::Timeout(timeout).to_string(),
        Some(Trap::StackOverflow) => "stack overflow: the plugin recursed deeper than its 1 MiB wasm stack allows".to_string(),
        Some(Trap::UnreachableCodeReached) => {
            let tail = log.stderr_tail();
            match tail.iter().position(|l| l.contains("panicked at")) {
                Some(i) => {
                    let message: Vec<&str> = tail[i + 1..]
                        .iter()
                        .map(String::as_str)
                        .take_while(|l| !l.starts_with("note: run with"))
                        .collect();
                    format!("plugin panicked: {} {}", tail[i].trim(), message.join(" ").trim())
                }
                None => "plugin trapped: it reached an `unreachable` instruction (an abort)".to_string(),
            }
        }
        Some(Trap::MemoryOutOfBounds) if e.downcast_ref::<WasmBacktrace>().is_some_and(is_recursion) => {
            // Rust and C guests keep a shadow stack at the bottom of linear
            // memory; running off its end is an out-of-bounds access deep
            // inside a recursion rather than a native stack overflow.
            "stack overflow: the plugin recursed without bound and ran off the end of its stack (an out-of-bounds memory access)".to_string()
        }
        Some(trap) => format!("plugin trapped: {trap}"),
        None => format!("{e:#}"),
    }
}

/// Appends what the sandbox refused during the call.
fn with_denials(message: String, log: &StageLog) -> String {
    let denials = log.denials();
    if denials.is_empty() {
        return message;
    }
    let joined = denials.join("; ");
    if message.is_empty() { format!("sandbox denied {joined}") } else { format!("{message} (sandbox denied {joined})") }
}

/// Runs `call` under the wall-clock limit and maps every failure to a reason.
async fn guarded<T>(
    log: &StageLog,
    timeout: Duration,
    call: impl Future<Output = wasmtime::Result<T>>,
) -> Result<T, String> {
    let result = match tokio::time::timeout(timeout, call).await {
        Err(_) => Err(Violation::Timeout(timeout).to_string()),
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(explain(&e, timeout, log)),
    };
    log.flush();
    result.map_err(|reason| with_denials(reason, log))
}

/// Performs one stage in a fresh sandbox.
pub async fn execute_stage(runtime: &Runtime, plugin: &Plugin, call: StageCall) -> Outcome {
    let Some(pre) = plugin.executor() else {
        return Outcome::failure(format!("plugin `{}` is a {} plugin and performs no stages", plugin.name, plugin.world));
    };
    let timeout = plugin.sandbox.timeout(call.timeout);
    let sources = call.dirs_sources();
    let context = RunContext { dirs: call.dirs, services: call.services, sink: call.sink, timeout: Some(timeout) };
    let mut store = match plugin.sandbox.store(runtime.engine(), context) {
        Ok(store) => store,
        Err(e) => return Outcome::failure(format!("cannot prepare the sandbox: {e:#}")),
    };
    let log = store.data().log().clone();
    let request = StageRequest { deployment: call.deployment, stage: call.stage, sources, app_config: call.app_config };
    let result = guarded(&log, timeout, async {
        let bindings = pre.instantiate_async(&mut store).await?;
        bindings.cordon_plugin_execution().call_execute_stage(&mut store, &request).await
    })
    .await;
    match result {
        Err(reason) => Outcome::failure(reason),
        Ok(StageResult { status, message }) => {
            if let Err(too_big) = check_size(plugin, message.len()) {
                log.host_line(&too_big);
                return Outcome::failure(with_denials(too_big, &log));
            }
            let status = Status::from(status);
            let message = log.mask(&message);
            let message = if status.is_success() { message } else { with_denials(message, &log) };
            Outcome { status, message }
        }
    }
}

impl StageCall {
    /// Where the run's directories appear inside the sandbox.
    fn dirs_sources(&self) -> Sources {
        use crate::sandbox::fs::{RUNNING, SCRATCH, TARGET};
        Sources {
            target: TARGET.to_string(),
            running: self.dirs.running.as_ref().map(|_| RUNNING.to_string()),
            scratch: SCRATCH.to_string(),
        }
    }
}

/// Asks a plugin which stages it defines.
pub async fn defined_stages(runtime: &Runtime, plugin: &Plugin) -> Result<Vec<StageInfo>> {
    let timeout = plugin.sandbox.timeout(Some(Duration::from_secs(10)));
    let (mut store, log) = memory_store(runtime, plugin, RunDirs::default(), Arc::new(NullSink), timeout).map_err(anyhow::Error::msg)?;
    if !plugin.world.defines_stages() {
        anyhow::bail!("a {} plugin defines no stages", plugin.world);
    }
    // Every world that defines stages exports the same `stages` interface:
    // look it up on the component, whichever world it was loaded as.
    let pre = plugin.instance_pre();
    let stages_export = StagesIndices::new(pre)?;
    let stages: Vec<StageInfo> = guarded(&log, timeout, async {
        let instance = pre.instantiate_async(&mut store).await?;
        stages_export.load(&mut store, &instance)?.call_defined_stages(&mut store).await
    })
    .await
    .map_err(anyhow::Error::msg)?
    .into_iter()
    .map(|s| StageInfo { name: s.name, description: s.description })
    .collect();
    check_size(plugin, stages.iter().map(|s| s.name.len() + s.description.len()).sum()).map_err(anyhow::Error::msg)?;
    for stage in &stages {
        if stage.name.is_empty() || !stage.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
            anyhow::bail!("stage name {:?} must be non-empty ASCII letters, digits, '_' or '-'", stage.name);
        }
    }
    Ok(stages)
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
        let sources = Sources {
            target: crate::sandbox::fs::TARGET.to_string(),
            running: self.dirs.running.as_ref().map(|_| crate::sandbox::fs::RUNNING.to_string()),
            scratch: crate::sandbox::fs::SCRATCH.to_string(),
        };
        PlanRequest { deployment: self.deployment.clone(), sources, app_config: self.app_config.clone() }
    }
}

type CallFuture<'a, T> = std::pin::Pin<Box<dyn Future<Output = wasmtime::Result<T>> + Send + 'a>>;

/// Runs one planner export in a fresh sandbox; errors are reasons.
async fn planner_call<T: Send>(
    runtime: &Runtime,
    plugin: &Plugin,
    call: &PlanCall,
    f: impl for<'a> FnOnce(&'a mut wasmtime::Store<crate::sandbox::RunState>, Planner, PlanRequest) -> CallFuture<'a, T> + Send,
) -> Result<T, String> {
    let Some(pre) = plugin.planner() else {
        return Err(format!("plugin `{}` is a {} plugin and plans nothing", plugin.name, plugin.world));
    };
    let timeout = plugin.sandbox.timeout(None);
    let (mut store, log) = memory_store(runtime, plugin, call.dirs.clone(), call.sink.clone(), timeout)?;
    let request = call.request();
    guarded(&log, timeout, async {
        let bindings = pre.instantiate_async(&mut store).await?;
        f(&mut store, bindings, request).await
    })
    .await
}

/// Refuses planner results larger than the plugin's result limit.
fn check_size(plugin: &Plugin, size: usize) -> Result<(), String> {
    check_size_limit(plugin.sandbox.limits().result_bytes.as_u64(), size)
}

fn stages_size(stages: &[PlannedStage]) -> usize {
    stages.iter().map(|s| s.name.len() + s.desc.len() + s.options.len() + 16).sum()
}

/// The planner's vote: `None` for "unsupported".
pub async fn determine_strategy(
    runtime: &Runtime,
    plugin: &Plugin,
    call: &PlanCall,
) -> Result<Option<(SyncStrategy, String)>, String> {
    let answer = planner_call(runtime, plugin, call, |store, bindings, request| {
        Box::pin(async move { bindings.cordon_plugin_planning().call_determine_strategy(store, &request).await })
    })
    .await??;
    Ok(match answer {
        planning::StrategyAnswer::Unsupported => None,
        planning::StrategyAnswer::Decided(s) => {
            check_size(plugin, s.summary.len())?;
            Some((s.strategy, s.summary))
        }
    })
}

/// The versions the deployment will roll out.
pub async fn determine_versions(runtime: &Runtime, plugin: &Plugin, call: &PlanCall) -> Result<Vec<ArtifactVersion>, String> {
    let versions = planner_call(runtime, plugin, call, |store, bindings, request| {
        Box::pin(async move { bindings.cordon_plugin_planning().call_determine_versions(store, &request).await })
    })
    .await??;
    check_size(plugin, versions.iter().map(|v| v.kind.len() + v.name.len() + v.version.len() + v.url.len()).sum())?;
    Ok(versions)
}

/// Quick-sync stages, rollback stages included when `rollback`.
pub async fn build_quick_sync_stages(
    runtime: &Runtime,
    plugin: &Plugin,
    call: &PlanCall,
    rollback: bool,
) -> Result<Vec<PlannedStage>, String> {
    let stages = planner_call(runtime, plugin, call, move |store, bindings, request| {
        Box::pin(async move { bindings.cordon_plugin_planning().call_build_quick_sync_stages(store, &request, rollback).await })
    })
    .await??;
    check_size(plugin, stages_size(&stages))?;
    Ok(stages)
}

/// Pipeline-sync stages for the configured `stages` this plugin defines.
pub async fn build_pipeline_sync_stages(
    runtime: &Runtime,
    plugin: &Plugin,
    call: &PlanCall,
    stages: Vec<StageConfig>,
    rollback: bool,
) -> Result<Vec<PlannedStage>, String> {
    let planned = planner_call(runtime, plugin, call, move |store, bindings, request| {
        Box::pin(async move {
            bindings.cordon_plugin_planning().call_build_pipeline_sync_stages(store, &request, &stages, rollback).await
        })
    })
    .await??;
    check_size(plugin, stages_size(&planned))?;
    Ok(planned)
}

/// A sandboxed instance kept for a stream of calls (key-filter batches,
/// item-action items): one store, limits per call.
struct Session<B> {
    store: wasmtime::Store<crate::sandbox::RunState>,
    bindings: B,
    log: StageLog,
    timeout: Duration,
    result_limit: u64,
}

/// A fresh store for a call that uses no store-backed services (planning,
/// listing stages, key-filter and item-action sessions), and its log.
fn memory_store(
    runtime: &Runtime,
    plugin: &Plugin,
    dirs: RunDirs,
    sink: Arc<dyn LogSink>,
    timeout: Duration,
) -> Result<(wasmtime::Store<crate::sandbox::RunState>, StageLog), String> {
    let context = RunContext { dirs, services: Arc::new(MemoryServices::default()), sink, timeout: Some(timeout) };
    let store = plugin.sandbox.store(runtime.engine(), context).map_err(|e| format!("cannot prepare the sandbox: {e:#}"))?;
    let log = store.data().log().clone();
    Ok((store, log))
}

/// A key packing for [`KeyFilterSession::select`].
pub use crate::contract::bindings::key_filter::exports::cordon::plugin::key_selection::{KeyBatch, Selection};

/// A configured key-filter instance.
pub struct KeyFilterSession(Session<crate::contract::bindings::key_filter::KeyFilter>);

impl KeyFilterSession {
    /// Instantiates the plugin and configures it with `options` (JSON).
    pub async fn open(runtime: &Runtime, plugin: &Plugin, options: &str, sink: Arc<dyn LogSink>) -> Result<Self, String> {
        let pre = plugin.key_filter().ok_or_else(|| format!("plugin `{}` is a {} plugin, not a key filter", plugin.name, plugin.world))?;
        let timeout = plugin.sandbox.timeout(None);
        let (mut store, log) = memory_store(runtime, plugin, RunDirs::default(), sink, timeout)?;
        let bindings = guarded(&log, timeout, pre.instantiate_async(&mut store)).await?;
        let configured = guarded(&log, timeout, bindings.cordon_plugin_key_selection().call_configure(&mut store, options)).await?;
        configured.map_err(|e| format!("plugin `{}` refused its options: {e}", plugin.name))?;
        let result_limit = plugin.sandbox.limits().result_bytes.as_u64();
        Ok(Self(Session { store, bindings, log, timeout, result_limit }))
    }

    /// Classifies one batch; checks the answer's shape.
    pub async fn select(&mut self, batch: &KeyBatch) -> Result<Selection, String> {
        let s = &mut self.0;
        let selection = guarded(&s.log, s.timeout, s.bindings.cordon_plugin_key_selection().call_select(&mut s.store, batch)).await??;
        let n = batch.ends.len();
        if selection.selected.len() != n.div_ceil(8) {
            return Err(format!("the filter returned a bitmap of {} bytes for {n} keys", selection.selected.len()));
        }
        if let Some(&bad) = selection.unclassified.iter().find(|&&i| i as usize >= n || selection.selected[i as usize / 8] & (1 << (i % 8)) != 0) {
            return Err(format!("the filter reported key {bad} as unclassified, but it is out of range or also selected"));
        }
        Ok(selection)
    }

    /// The delete prefixes of the batch's selected keys.
    pub async fn delete_prefixes(&mut self, batch: &KeyBatch) -> Result<Vec<String>, String> {
        let s = &mut self.0;
        let prefixes = guarded(&s.log, s.timeout, s.bindings.cordon_plugin_key_selection().call_delete_prefixes(&mut s.store, batch)).await?;
        check_size_limit(s.result_limit, prefixes.iter().map(String::len).sum())?;
        if let Some(bad) = prefixes.iter().find(|p| !p.ends_with('/')) {
            return Err(format!("the filter returned delete prefix {bad:?}, which does not end with '/'"));
        }
        Ok(prefixes)
    }
}

fn check_size_limit(limit: u64, size: usize) -> Result<(), String> {
    if size as u64 > limit {
        return Err(Violation::ResultBytes { size: size as u64, limit }.to_string());
    }
    Ok(())
}

pub use crate::contract::bindings::item_action::exports::cordon::plugin::item_rewrite::{Outcome as ItemOutcome, Selector as ItemSelector};

/// An item-action instance.
pub struct ItemActionSession(Session<crate::contract::bindings::item_action::ItemAction>);

impl ItemActionSession {
    pub async fn open(runtime: &Runtime, plugin: &Plugin, sink: Arc<dyn LogSink>) -> Result<Self, String> {
        let pre = plugin.item_action().ok_or_else(|| format!("plugin `{}` is a {} plugin, not an item action", plugin.name, plugin.world))?;
        let timeout = plugin.sandbox.timeout(None);
        let (mut store, log) = memory_store(runtime, plugin, RunDirs::default(), sink, timeout)?;
        let bindings = guarded(&log, timeout, pre.instantiate_async(&mut store)).await?;
        let result_limit = plugin.sandbox.limits().result_bytes.as_u64();
        Ok(Self(Session { store, bindings, log, timeout, result_limit }))
    }

    /// Which items the action wants.
    pub async fn applies_to(&mut self, options: &str) -> Result<ItemSelector, String> {
        let s = &mut self.0;
        guarded(&s.log, s.timeout, s.bindings.cordon_plugin_item_rewrite().call_applies_to(&mut s.store, options)).await?
    }

    /// Runs the action on one item (JSON text).
    pub async fn execute(&mut self, options: &str, item: &str) -> Result<ItemOutcome, String> {
        let s = &mut self.0;
        let outcome = guarded(&s.log, s.timeout, s.bindings.cordon_plugin_item_rewrite().call_execute(&mut s.store, options, item)).await??;
        let size = match &outcome {
            ItemOutcome::Modified(m) => m.len(),
            ItemOutcome::WithAdditionalItems(w) => w.item.len() + w.additional.iter().map(String::len).sum::<usize>(),
            ItemOutcome::Unchanged | ItemOutcome::Skip => 0,
        };
        check_size_limit(s.result_limit, size)?;
        Ok(outcome)
    }
}

pub use crate::contract::bindings::migration_phase::exports::cordon::plugin::phase::{ErrorPolicy, StepOutcome, StepRequest};

/// Runs one step of a migration phase in a fresh instance whose store
/// handles are `stores`. The outcome's checkpoint is bounded by the
/// plugin's result limit.
pub async fn migration_step(
    runtime: &Runtime,
    plugin: &Plugin,
    stores: Arc<dyn crate::sandbox::stores::MigrationStores>,
    request: &StepRequest,
    sink: Arc<dyn LogSink>,
) -> Result<StepOutcome, String> {
    let pre = plugin.migration_phase().ok_or_else(|| format!("plugin `{}` is a {} plugin, not a migration phase", plugin.name, plugin.world))?;
    let timeout = plugin.sandbox.timeout(None);
    let (mut store, log) = memory_store(runtime, plugin, RunDirs::default(), sink, timeout)?;
    let handles = store.data_mut().grant_stores(stores).map_err(|e| format!("cannot hand out the store handles: {e:#}"))?;
    let bindings = guarded(&log, timeout, pre.instantiate_async(&mut store)).await?;
    let call = bindings.cordon_plugin_phase().call_step(&mut store, request, handles.source, handles.destination);
    let outcome = guarded(&log, timeout, call).await??;
    check_size_limit(plugin.sandbox.limits().result_bytes.as_u64(), outcome.checkpoint.as_ref().map_or(0, String::len) + outcome.summary.len())?;
    Ok(outcome)
}
