//! Planning: choose the sync strategy and build the stages of a
//! deployment, with the host — not plugins — assigning stage ids, the DAG
//! and timeouts.
//!
//! Strategy, in PipeCD's order: an explicit trigger → no pipeline ⇒ quick
//! sync → `alwaysUsePipeline` → commit-message matchers → the first
//! deployment ⇒ quick sync → the planners' vote ("unsupported" answers are
//! ignored). Quick sync needs a planner; an application whose stages are
//! all plain executor stages runs its pipeline. If nothing decides, planning
//! fails with a message saying what to configure.
//!
//! The index contract is checked on every planner answer: pipeline stages
//! reuse the indexes of the configured stages they were given (each exactly
//! once, under the same name), rollback stages reuse one of them and receive
//! that configured stage's options, and quick-sync stages use index 0.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use regex::Regex;
use serde::{Deserialize, Serialize};

use super::config::{AppConfig, DEFAULT_STAGE_TIMEOUT};
use cordon_runtime::engine::Engine;
use cordon_runtime::call::RunError;
use cordon_runtime::plugin::{Plugin, Plugins, Subject};
use cordon_runtime::runner::{self, Deployment, PlanCall, PlannedStage, StageConfig, SyncStrategy};
use cordon_runtime::sandbox::{LogSink, RunDirs};
use cordon_store::{StageRecord, StageStatus};

/// The two ways to deploy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    QuickSync,
    PipelineSync,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::QuickSync => "quick-sync",
            Strategy::PipelineSync => "pipeline-sync",
        }
    }
}

impl From<SyncStrategy> for Strategy {
    fn from(s: SyncStrategy) -> Self {
        match s {
            SyncStrategy::QuickSync => Strategy::QuickSync,
            SyncStrategy::PipelineSync => Strategy::PipelineSync,
        }
    }
}

/// What caused a deployment, as stored with it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TriggerInfo {
    pub commit_hash: String,
    pub commit_message: String,
    pub commander: String,
    /// An explicitly requested strategy (`cordon deploy --sync`).
    pub sync: Option<Strategy>,
    /// Breakpoints from `cordon deploy --break-*`.
    #[serde(default)]
    pub breakpoints: crate::debug::Breakpoints,
}

/// A version a planner reported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Version {
    pub plugin: String,
    pub kind: String,
    pub name: String,
    pub version: String,
    pub url: String,
}

/// The plan of a deployment, stored with it as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanSummary {
    pub strategy: Strategy,
    /// Why this strategy.
    pub summary: String,
    pub versions: Vec<Version>,
    /// Files changed since the running source (skip rules read this).
    pub changed: Vec<String>,
    pub auto_rollback: bool,
    /// Deployment timeout in milliseconds.
    pub timeout_ms: u64,
}

/// A plan and its stages.
#[derive(Debug, Clone)]
pub struct Planned {
    pub summary: PlanSummary,
    pub stages: Vec<StageRecord>,
}

/// Everything planning reads.
pub struct PlanInput<'a> {
    pub engine: &'a Engine,
    pub plugins: &'a Plugins,
    pub app: &'a AppConfig,
    pub trigger: &'a TriggerInfo,
    pub deployment: Deployment,
    pub target: PathBuf,
    pub running: Option<PathBuf>,
    pub scratch: PathBuf,
    pub changed: Vec<String>,
    pub sink: Arc<dyn LogSink>,
}

/// Checks the app config against the loaded plugins: every configured stage
/// has a plugin, every plugin named under `plugins:` exists.
pub fn check_app(app: &AppConfig, plugins: &Plugins) -> Result<()> {
    let file = app.file.display();
    for (i, stage) in app.stages().iter().enumerate() {
        plugins.route(&stage.name).map_err(|e| anyhow::anyhow!("{file}: pipeline.stages[{i}]: {e:#}; add the plugin that defines it to the agent config"))?;
    }
    for name in app.plugins.keys() {
        if plugins.get(name).is_none() {
            bail!("{file}: plugins.{name}: no plugin named `{name}` in the agent config");
        }
    }
    if app.stages().is_empty() && app_planners(app, plugins).is_empty() {
        bail!("{file}: {NOTHING_TO_DEPLOY}");
    }
    Ok(())
}

/// Why an application with neither a pipeline nor a planner is refused.
const NOTHING_TO_DEPLOY: &str =
    "nothing to deploy: there is no pipeline and no planner plugin serves the application; add `pipeline.stages` or name a planner under `plugins`";

/// The planners that serve an application: those named under `plugins:`,
/// else those that plan one of its configured stages.
fn app_planners<'p>(app: &AppConfig, plugins: &'p Plugins) -> Vec<&'p Arc<Plugin>> {
    let mut out: Vec<&Arc<Plugin>> = if app.plugins.is_empty() {
        app.stages().iter().filter_map(|s| plugins.planner_for(&s.name)).collect()
    } else {
        app.plugins.keys().filter_map(|n| plugins.get(n)).filter(|p| p.world.plans()).collect()
    };
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out.dedup_by(|a, b| a.name == b.name);
    out
}

impl PlanInput<'_> {
    fn call(&self, plugin: &Plugin) -> PlanCall {
        PlanCall {
            deployment: self.deployment.clone(),
            dirs: RunDirs { target: Some(self.target.clone()), running: self.running.clone(), scratch: Some(self.scratch.clone()) },
            app_config: self.app.plugin_settings(&plugin.name),
            sink: self.sink.clone(),
        }
    }
}

fn planner_error(plugin: &Plugin, what: &str, e: RunError) -> anyhow::Error {
    anyhow::anyhow!("planner `{}` failed to {what}: {e}", plugin.name)
}

/// Chooses the strategy, and says why.
async fn choose_strategy(input: &PlanInput<'_>, planners: &[&Arc<Plugin>]) -> Result<(Strategy, String)> {
    let app = input.app;
    let quick = |why: String| -> Result<(Strategy, String)> {
        if planners.is_empty() {
            if app.stages().is_empty() {
                bail!("{}: {NOTHING_TO_DEPLOY}", app.file.display());
            }
            return Ok((Strategy::PipelineSync, format!("{why}, but quick sync needs a planner and none serves this application: running the pipeline")));
        }
        Ok((Strategy::QuickSync, why))
    };
    if let Some(sync) = input.trigger.sync {
        return match sync {
            Strategy::QuickSync if planners.is_empty() => bail!("quick sync was requested, but no planner plugin serves application `{}`", app.name),
            Strategy::PipelineSync if app.stages().is_empty() => bail!("pipeline sync was requested, but {} has no pipeline", app.file.display()),
            s => Ok((s, format!("{} requested by the trigger", s.as_str()))),
        };
    }
    if app.stages().is_empty() {
        return quick("no pipeline is configured".to_string());
    }
    if app.planner.always_use_pipeline {
        return Ok((Strategy::PipelineSync, "planner.alwaysUsePipeline is set".to_string()));
    }
    let message = &input.trigger.commit_message;
    let matcher = &app.planner.commit_matcher;
    if let Some(p) = &matcher.quick_sync
        && Regex::new(p)?.is_match(message)
    {
        return quick(format!("the commit message matches commitMatcher.quickSync {p:?}"));
    }
    if let Some(p) = &matcher.pipeline
        && Regex::new(p)?.is_match(message)
    {
        return Ok((Strategy::PipelineSync, format!("the commit message matches commitMatcher.pipeline {p:?}")));
    }
    if input.running.is_none() {
        return quick("first deployment of the application".to_string());
    }
    for planner in planners {
        match runner::determine_strategy(input.engine, planner, &input.call(planner)).await {
            Ok(Some((strategy, summary))) => {
                return Ok((strategy.into(), format!("planner `{}` chose it: {summary}", planner.name)));
            }
            Ok(None) => {}
            Err(e) => return Err(planner_error(planner, "determine the strategy", e)),
        }
    }
    if planners.is_empty() {
        return Ok((Strategy::PipelineSync, "no planner serves the application: running the pipeline".to_string()));
    }
    let names: Vec<&str> = planners.iter().map(|p| p.name.as_str()).collect();
    bail!(
        "no strategy was decided: planners {} answered \"unsupported\"; set planner.alwaysUsePipeline, a planner.commitMatcher, or pass --sync",
        names.join(", ")
    )
}

fn stage_record(ordinal: u32, id: String, planned: &PlannedStage, options: String, needs: Vec<String>, plugin: &Plugin, timeout: Duration) -> StageRecord {
    StageRecord {
        deployment: String::new(),
        id,
        ordinal,
        name: planned.name.clone(),
        desc: planned.desc.clone(),
        index: planned.index,
        rollback: planned.rollback,
        options,
        needs,
        plugin: plugin.name.clone(),
        timeout_ms: plugin.sandbox.timeout(Some(timeout)).as_millis() as u64,
        status: StageStatus::NotStarted,
        message: String::new(),
        started_at: None,
        finished_at: None,
        attempts: 0,
    }
}

/// Plans the deployment.
pub async fn plan(input: &PlanInput<'_>) -> Result<Planned> {
    let app = input.app;
    check_app(app, input.plugins)?;
    let planners = app_planners(app, input.plugins);
    check_settings(input.engine, app, &planners).await?;
    let (strategy, summary) = choose_strategy(input, &planners).await?;
    let mut versions = Vec::new();
    for planner in &planners {
        let found = runner::determine_versions(input.engine, planner, &input.call(planner))
            .await
            .map_err(|e| planner_error(planner, "determine versions", e))?;
        versions.extend(found.into_iter().map(|v| Version { plugin: planner.name.clone(), kind: v.kind, name: v.name, version: v.version, url: v.url }));
    }
    let stages = match strategy {
        Strategy::QuickSync => quick_sync_stages(input, &planners).await?,
        Strategy::PipelineSync => pipeline_sync_stages(input).await?,
    };
    check_stages(input, &planners, &stages).await?;
    let summary = with_left_out(app, strategy, summary, &stages);
    check_planned_breakpoints(input, strategy, &summary, &stages)?;
    let summary = PlanSummary {
        strategy,
        summary,
        versions,
        changed: input.changed.clone(),
        auto_rollback: app.planner.auto_rollback,
        timeout_ms: app.deployment_timeout().as_millis() as u64,
    };
    Ok(Planned { summary, stages })
}

/// Has the plugins check what the plan gives them (see
/// [`runner::check_options`]), so a misspelt or mistyped option, or a host
/// path where a guest path belongs, fails the plan instead of a stage
/// after earlier stages changed things: first the settings of the planners
/// (before they are asked anything), then each stage's options and the
/// settings of the plugins that perform them.
async fn check_settings(engine: &Engine, app: &AppConfig, plugins: &[&Arc<Plugin>]) -> Result<()> {
    for plugin in plugins {
        let verdict = runner::check_options(engine, plugin, &Subject::Settings, &app.plugin_settings(&plugin.name))
            .await
            .map_err(|e| anyhow::anyhow!("plugin `{}` failed to check its settings: {e}", plugin.name))?;
        if let Err(why) = verdict {
            bail!(
                "{}: plugins.{}: invalid settings for plugin `{}`: {why}; `cordon plugin inspect {}` lists the settings it takes",
                app.file.display(),
                plugin.name,
                plugin.name,
                plugin.path.display()
            );
        }
    }
    Ok(())
}

/// See [`check_settings`].
async fn check_stage(engine: &Engine, app: &AppConfig, plugin: &Plugin, id: &str, name: &str, options: &str) -> Result<()> {
    let verdict = runner::check_options(engine, plugin, &Subject::Stage(name.to_string()), options)
        .await
        .map_err(|e| anyhow::anyhow!("plugin `{}` failed to check the options of stage `{id}`: {e}", plugin.name))?;
    if let Err(why) = verdict {
        bail!(
            "{}: stage `{id}` ({name} of plugin `{}`) has invalid options: {why}; `cordon plugin inspect {}` lists the options it takes",
            app.file.display(),
            plugin.name,
            plugin.path.display()
        );
    }
    Ok(())
}

/// See [`check_settings`]; `planners` were checked already.
async fn check_stages(input: &PlanInput<'_>, planners: &[&Arc<Plugin>], stages: &[StageRecord]) -> Result<()> {
    let mut executors: Vec<&Arc<Plugin>> = Vec::new();
    let mut checked = std::collections::HashSet::new();
    for stage in stages {
        let plugin = input.plugins.get(&stage.plugin).with_context(|| format!("internal: stage `{}` names no loaded plugin", stage.id))?;
        if !planners.iter().chain(&executors).any(|p| p.name == plugin.name) {
            executors.push(plugin);
        }
        if checked.insert((&stage.plugin, &stage.name, &stage.options)) {
            check_stage(input.engine, input.app, plugin, &stage.id, &stage.name, &stage.options).await?;
        }
    }
    check_settings(input.engine, input.app, &executors).await
}

/// The same checks on the app config as written — the configured stages'
/// `with:` and the settings of every plugin serving the application — so
/// `cordon deploy` refuses, recording nothing, what its plan would fail on.
/// Call after [`check_app`].
pub async fn check_configured(engine: &Engine, app: &AppConfig, plugins: &Plugins) -> Result<()> {
    let mut serving = app_planners(app, plugins);
    for (i, stage) in app.stages().iter().enumerate() {
        let plugin = plugins.route(&stage.name)?;
        if !serving.iter().any(|p| p.name == plugin.name) {
            serving.push(plugin);
        }
        let id = stage.id.clone().unwrap_or_else(|| format!("s{i}-{}", stage.name));
        check_stage(engine, app, plugin, &id, &stage.name, &stage.with.to_string()).await?;
    }
    check_settings(engine, app, &serving).await
}

/// `why` (the strategy's reason), plus the configured stages the plan
/// leaves out: a quick sync skips the pipeline, approvals included, and
/// people must not learn that only from what did not happen.
fn with_left_out(app: &AppConfig, strategy: Strategy, why: String, stages: &[StageRecord]) -> String {
    let left: Vec<&str> = app.stages().iter().map(|s| s.key()).filter(|key| !stages.iter().any(|p| p.id == *key || p.name == *key)).collect();
    if left.is_empty() {
        return why;
    }
    let fix = match strategy {
        Strategy::QuickSync => " (deploy with --sync pipeline to run them)",
        Strategy::PipelineSync => "",
    };
    format!("{why}; it leaves out the configured stage(s) {}{fix}", left.join(", "))
}

/// Every breakpoint (`--break-*` and the application's `debug:`) must name
/// a forward stage of the plan: one on a stage the strategy leaves out, or
/// on a rollback stage (breakpoints never pause those), would never pause,
/// and the deployment would run straight through.
fn check_planned_breakpoints(input: &PlanInput<'_>, strategy: Strategy, why: &str, stages: &[StageRecord]) -> Result<()> {
    let from_app = input.app.debug.clone().unwrap_or_default();
    for (source, reference) in input.trigger.breakpoints.references().map(|r| ("--break", r)).chain(from_app.references().map(|r| ("debug", r))) {
        if !stages.iter().any(|s| !s.rollback && (s.id == *reference || s.name == *reference)) {
            bail!(
                "breakpoint `{reference}` ({source}) names no stage this deployment runs: the strategy is {} ({why}); deploy with --sync pipeline to run the configured pipeline, or drop the breakpoint",
                strategy.as_str()
            );
        }
    }
    Ok(())
}

/// A planner plans only stages it defines itself (besides the configured
/// stages at their indexes): otherwise a planner could make another
/// plugin, with grants the planner lacks, run a stage with options the
/// planner chose (a confused deputy).
fn check_own_stage(planner: &Plugin, planned: &PlannedStage) -> Result<()> {
    if planner.stages.iter().any(|s| s.name == planned.name) {
        return Ok(());
    }
    let own: Vec<&str> = planner.stages.iter().map(|s| s.name.as_str()).collect();
    bail!(
        "planner `{}` broke the index contract: it returned {}stage `{}`, which it does not define (it defines: {}); a planner plans only its own stages and the configured stages at their indexes",
        planner.name,
        if planned.rollback { "rollback " } else { "" },
        planned.name,
        if own.is_empty() { "none".to_string() } else { own.join(", ") }
    )
}

/// Appends rollback stages as one chain, each receiving `options_for`.
fn push_rollbacks(
    stages: &mut Vec<StageRecord>,
    rollbacks: Vec<(PlannedStage, &Arc<Plugin>)>,
    plugins: &Plugins,
    options_for: impl Fn(&PlannedStage) -> String,
) -> Result<()> {
    let mut previous: Option<String> = None;
    for (n, (planned, planner)) in rollbacks.into_iter().enumerate() {
        let executor = plugins
            .route(&planned.name)
            .map_err(|e| anyhow::anyhow!("planner `{}` returned rollback stage `{}`: {e:#}", planner.name, planned.name))?;
        let id = format!("rb{n}-{}", planned.name);
        let needs = previous.iter().cloned().collect();
        let options = options_for(&planned);
        stages.push(stage_record(stages.len() as u32, id.clone(), &planned, options, needs, executor, DEFAULT_STAGE_TIMEOUT));
        previous = Some(id);
    }
    Ok(())
}

async fn quick_sync_stages(input: &PlanInput<'_>, planners: &[&Arc<Plugin>]) -> Result<Vec<StageRecord>> {
    let rollback = input.app.planner.auto_rollback;
    let mut forward = Vec::new();
    let mut rollbacks = Vec::new();
    for planner in planners {
        let returned = runner::build_quick_sync_stages(input.engine, planner, &input.call(planner), rollback)
            .await
            .map_err(|e| planner_error(planner, "build quick-sync stages", e))?;
        for planned in returned {
            check_own_stage(planner, &planned)?;
            if planned.index != 0 {
                bail!("planner `{}` broke the index contract: quick-sync stage `{}` has index {}, quick-sync stages use index 0", planner.name, planned.name, planned.index);
            }
            if planned.rollback {
                rollbacks.push((planned, *planner));
            } else {
                forward.push((planned, *planner));
            }
        }
    }
    if forward.is_empty() {
        bail!("the planners returned no quick-sync stages for application `{}`", input.app.name);
    }
    let mut stages = Vec::new();
    for (n, (planned, planner)) in forward.into_iter().enumerate() {
        let executor = input
            .plugins
            .route(&planned.name)
            .map_err(|e| anyhow::anyhow!("planner `{}` returned stage `{}`: {e:#}", planner.name, planned.name))?;
        let id = format!("q{n}-{}", planned.name);
        let needs = stages.last().map(|s: &StageRecord| vec![s.id.clone()]).unwrap_or_default();
        let options = planned.options.clone();
        stages.push(stage_record(n as u32, id, &planned, options, needs, executor, DEFAULT_STAGE_TIMEOUT));
    }
    push_rollbacks(&mut stages, rollbacks, input.plugins, |p| p.options.clone())?;
    Ok(stages)
}

async fn pipeline_sync_stages(input: &PlanInput<'_>) -> Result<Vec<StageRecord>> {
    let app = input.app;
    let configured = app.stages();
    let deps = app.dependencies()?;
    let options: Vec<String> = configured.iter().map(|s| s.with.to_string()).collect();
    // Group the configured stages by the planner that plans them.
    let mut groups: BTreeMap<String, (Arc<Plugin>, Vec<u32>)> = BTreeMap::new();
    let mut planned: Vec<Option<PlannedStage>> = vec![None; configured.len()];
    for (i, stage) in configured.iter().enumerate() {
        match input.plugins.planner_for(&stage.name) {
            Some(p) => groups.entry(p.name.clone()).or_insert_with(|| (p.clone(), Vec::new())).1.push(i as u32),
            None => {
                planned[i] = Some(PlannedStage {
                    index: i as u32,
                    name: stage.name.clone(),
                    desc: stage.desc.clone(),
                    rollback: false,
                    options: options[i].clone(),
                })
            }
        }
    }
    let mut rollbacks = Vec::new();
    for (planner, indexes) in groups.values() {
        let given: Vec<StageConfig> = indexes
            .iter()
            .map(|&i| StageConfig {
                index: i,
                name: configured[i as usize].name.clone(),
                desc: configured[i as usize].desc.clone(),
                options: options[i as usize].clone(),
            })
            .collect();
        let returned = runner::build_pipeline_sync_stages(input.engine, planner, &input.call(planner), given, app.planner.auto_rollback)
            .await
            .map_err(|e| planner_error(planner, "build pipeline-sync stages", e))?;
        let broke = |what: String| anyhow::anyhow!("planner `{}` broke the index contract: {what} (it was given indexes {indexes:?})", planner.name);
        for stage in returned {
            if !indexes.contains(&stage.index) {
                return Err(broke(format!("stage `{}` has index {}", stage.name, stage.index)));
            }
            if stage.rollback {
                check_own_stage(planner, &stage)?;
                rollbacks.push((stage, planner));
                continue;
            }
            let i = stage.index as usize;
            if stage.name != configured[i].name {
                return Err(broke(format!("stage `{}` reuses index {i}, which is configured as `{}`", stage.name, configured[i].name)));
            }
            if planned[i].is_some() {
                return Err(broke(format!("index {i} was returned twice")));
            }
            planned[i] = Some(stage);
        }
        if let Some(&missing) = indexes.iter().find(|&&i| planned[i as usize].is_none()) {
            return Err(broke(format!("configured stage {missing} (`{}`) was not returned", configured[missing as usize].name)));
        }
    }
    // A configured `id` becomes the stage id; other stages get `s<index>-<NAME>`.
    let ids: Vec<String> =
        configured.iter().enumerate().map(|(i, s)| s.id.clone().unwrap_or_else(|| format!("s{i}-{}", s.name))).collect();
    let mut unique = std::collections::HashSet::new();
    if let Some(dup) = ids.iter().find(|id| !unique.insert(id.as_str())) {
        bail!("{}: stage id `{dup}` is used twice (a configured `id` equals a generated one); choose another `id`", app.file.display());
    }
    let mut stages = Vec::new();
    for (i, stage) in planned.into_iter().enumerate() {
        let stage = stage.context("internal: a configured stage was not planned")?;
        let executor = input.plugins.route(&stage.name)?;
        let needs = deps[i].iter().map(|&j| ids[j].clone()).collect();
        let timeout = configured[i].timeout.unwrap_or(DEFAULT_STAGE_TIMEOUT);
        let opts = stage.options.clone();
        stages.push(stage_record(i as u32, ids[i].clone(), &stage, opts, needs, executor, timeout));
    }
    // A rollback stage gets the options of the configured stage whose index it reuses.
    push_rollbacks(&mut stages, rollbacks, input.plugins, |p| options[p.index as usize].clone())?;
    Ok(stages)
}
