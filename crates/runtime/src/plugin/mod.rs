//! Plugins: loading a component named by the agent config, with every check
//! that must pass before its code is compiled, and routing stage names to
//! the one plugin that defines them.
//!
//! Loading order, each step refusing with an error that names the plugin,
//! the file and the fix: read the file → compare its sha256 with the pin
//! (a tampered file is refused before it is compiled) → for a plugin from a
//! registry, check the cached manifest against the pinned digest and its
//! layer against the file ([`artifact`]) → check its signature (a detached
//! `.sig` file, or the registry's cosign signature) where one is required
//! or present → check its shape (memories, tables,
//! core instances) against the maxima → check it is a
//! component of the declared world and contract version, and that the
//! grants give what its manifest requests → compile (or take
//! from the cache) → pre-link against the host imports → for stage
//! plugins, ask which stages it defines and, when it exports `options`,
//! the schemas of their options.

pub mod artifact;
pub mod config;
pub mod manifest;
pub mod options;
pub mod signature;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use wasmtime::component::InstancePre;

use cordon_contract::bindings::executor::ExecutorPre;
use cordon_contract::bindings::item_action::ItemActionPre;
use cordon_contract::bindings::key_filter::KeyFilterPre;
use cordon_contract::bindings::migration_phase::MigrationPhasePre;
use cordon_contract::bindings::planner::PlannerPre;
use cordon_contract::{self as contract, World};
use cordon_contract::bindings::executor::exports::cordon::plugin::stages::GuestIndices as StagesIndices;
use cordon_contract::bindings::described::exports::cordon::plugin::options::GuestIndices as OptionsIndices;

use crate::call::{Call, RunError};
use crate::engine::{Engine, Origin};
use crate::sandbox::{NullSink, RunDirs, RunState, Sandbox};
pub use config::{AgentConfig, PluginConfig};
pub use manifest::Manifest;
pub use options::{Described, Subject};

/// Checks a component's static shape against the maxima of one plugin.
fn check_shape(shape: &contract::Shape) -> Result<(), String> {
    use crate::sandbox::limits::{MAX_CORE_INSTANCES, MAX_MEMORIES, MAX_TABLES};
    for (what, n, max) in [("linear memories", shape.memories, MAX_MEMORIES), ("tables", shape.tables, MAX_TABLES), ("core instances", shape.core_instances, MAX_CORE_INSTANCES)] {
        if n > max {
            return Err(format!("defines {n} {what}; a plugin may define at most {max}"));
        }
    }
    Ok(())
}

/// How long a plugin may take to say which stages it defines, to describe
/// its options, or to check options at plan time.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// A stage a plugin defines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageInfo {
    pub name: String,
    pub description: String,
}

/// A loaded, verified and pre-linked plugin.
pub struct Plugin {
    pub name: String,
    pub world: World,
    pub path: PathBuf,
    pub sha256: String,
    pub sandbox: Sandbox,
    pub origin: Origin,
    pub stages: Vec<StageInfo>,
    /// What the plugin says it is and needs, when it carries a manifest.
    pub manifest: Option<Manifest>,
    /// Its option schemas, when it exports `options`.
    pub described: Option<Described>,
    /// Why its schemas could not be read, when loaded for inspection (a
    /// plugin loaded to run is refused instead).
    pub undescribed: Option<String>,
    options: Option<OptionsIndices>,
    pre: InstancePre<RunState>,
    executor: Option<ExecutorPre<RunState>>,
    planner: Option<PlannerPre<RunState>>,
    key_filter: Option<KeyFilterPre<RunState>>,
    item_action: Option<ItemActionPre<RunState>>,
    migration_phase: Option<MigrationPhasePre<RunState>>,
}

impl Plugin {
    /// Typed entry points for stage plugins; `None` for other worlds.
    pub fn executor(&self) -> Option<&ExecutorPre<RunState>> {
        self.executor.as_ref()
    }

    /// Typed entry points for planners; `None` for other worlds.
    pub fn planner(&self) -> Option<&PlannerPre<RunState>> {
        self.planner.as_ref()
    }

    /// Typed entry points for key filters; `None` for other worlds.
    pub fn key_filter(&self) -> Option<&KeyFilterPre<RunState>> {
        self.key_filter.as_ref()
    }

    /// Typed entry points for item actions; `None` for other worlds.
    pub fn item_action(&self) -> Option<&ItemActionPre<RunState>> {
        self.item_action.as_ref()
    }

    /// Typed entry points for migration phases; `None` for other worlds.
    pub fn migration_phase(&self) -> Option<&MigrationPhasePre<RunState>> {
        self.migration_phase.as_ref()
    }

    /// The instance pre-linked for this plugin and its `options` export, if any.
    pub(crate) fn options(&self) -> Option<(&InstancePre<RunState>, &OptionsIndices)> {
        self.options.as_ref().map(|o| (&self.pre, o))
    }

    /// The error for a call this plugin's world does not offer.
    pub fn wrong_world(&self, lacks: &'static str) -> RunError {
        RunError::WrongWorld { plugin: self.name.clone(), world: self.world, lacks }
    }

    /// Asks the component which stages it defines. Every world that defines
    /// stages exports the same `stages` interface, so it is looked up on the
    /// component whichever world it was loaded as.
    async fn defined_stages(&self, engine: &Engine) -> Result<Vec<StageInfo>> {
        if !self.world.defines_stages() {
            bail!("a {} plugin defines no stages", self.world);
        }
        let mut run = Call::detached(engine.wasmtime(), &self.sandbox, RunDirs::default(), Arc::new(NullSink)).await?;
        run.guard.timeout = run.guard.timeout.min(CHECK_TIMEOUT);
        let stages_export = StagesIndices::new(&self.pre)?;
        let Call { store, guard, .. } = &mut run;
        let stages: Vec<StageInfo> = guard.run(async {
            let instance = self.pre.instantiate_async(&mut *store).await?;
            stages_export.load(&mut *store, &instance)?.call_defined_stages(&mut *store).await
        })
        .await?
        .into_iter()
        .map(|s| StageInfo { name: s.name, description: s.description })
        .collect();
        run.check_size(stages.iter().map(|s| s.name.len() + s.description.len()).sum())?;
        if let Some(bad) = stages.iter().find(|s| s.name.is_empty() || !s.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')) {
            return Err(RunError::Contract(format!("stage name {:?} must be non-empty ASCII letters, digits, '_' or '-'", bad.name)).into());
        }
        Ok(stages)
    }

    /// Asks the component for the schema of each stage's options and of its
    /// settings; each must be a JSON object.
    async fn describe(&self, engine: &Engine, options: &OptionsIndices) -> Result<Described, RunError> {
        let mut run = Call::detached(engine.wasmtime(), &self.sandbox, RunDirs::default(), Arc::new(NullSink)).await?;
        run.guard.timeout = run.guard.timeout.min(CHECK_TIMEOUT);
        let subjects: Vec<Subject> = self.stages.iter().map(|s| Subject::Stage(s.name.clone())).chain([Subject::Settings]).collect();
        let limit = run.result_limit();
        let Call { store, guard, .. } = &mut run;
        // Checked as they come: a plugin of many stages cannot make the
        // host hold many large answers before the size is checked.
        let answers = guard
            .run(async {
                let instance = self.pre.instantiate_async(&mut *store).await?;
                let export = options.load(&mut *store, &instance)?;
                let (mut answers, mut size) = (Vec::new(), 0);
                for subject in &subjects {
                    let answer = export.call_schema(&mut *store, subject).await?;
                    size += answer.as_ref().map_or(0, String::len);
                    if size as u64 > limit {
                        break;
                    }
                    answers.push(answer);
                }
                Ok((answers, size))
            })
            .await
            .and_then(|(answers, size)| run.check_size(size).map(|()| answers))?;
        let mut described = Described::default();
        for (subject, answer) in subjects.into_iter().zip(answers) {
            let Some(text) = answer else { continue };
            let schema: serde_json::Value = serde_json::from_str(&text)
                .ok()
                .filter(serde_json::Value::is_object)
                .ok_or_else(|| run.contract_error(format!("the schema of its {} is not a JSON object", options::subject_name(&subject))))?;
            match subject {
                Subject::Stage(name) => {
                    described.stages.insert(name, schema);
                }
                Subject::Settings => described.settings = Some(schema),
            }
        }
        Ok(described)
    }

    /// Loads the plugin `config` describes.
    pub async fn load(engine: &Engine, config: &PluginConfig) -> Result<Plugin> {
        Self::load_with(engine, config, false).await
    }

    /// Loads a plugin only to look at it (`cordon plugin inspect`): its
    /// manifest's requests are not held against the (empty) grants, and
    /// schemas it cannot give are said in [`Plugin::undescribed`].
    pub async fn load_for_inspection(engine: &Engine, config: &PluginConfig) -> Result<Plugin> {
        Self::load_with(engine, config, true).await
    }

    /// `inspecting`: the manifest's requests are not held against the grants,
    /// and option schemas that cannot be read are reported, not refused.
    async fn load_with(engine: &Engine, config: &PluginConfig, inspecting: bool) -> Result<Plugin> {
        let name = &config.name;
        let file = config.path.display();
        let bytes = std::fs::read(&config.path).with_context(|| match &config.source {
            Some(source) => format!("plugin `{name}`: {source} is not in the cache ({file}); it is fetched when the agent (or any command that loads plugins) starts with the registry reachable"),
            None => format!("plugin `{name}`: cannot read {file}; build the component or fix `path` in the agent config"),
        })?;
        let sha256 = hex::encode(Sha256::digest(&bytes));
        if sha256 != config.sha256 {
            bail!(
                "plugin `{name}`: {file} has sha256 {sha256}, but the agent config pins {}; refusing to compile it. \
                 If you rebuilt or upgraded the plugin on purpose, check it and pin the new digest",
                config.sha256
            );
        }
        for (secret, source) in &config.grants.secrets {
            source.read().map_err(|e| anyhow::anyhow!("plugin `{name}`: secret {secret:?} cannot be read: {e}; fix its source or remove the grant"))?;
        }
        let trust = &config.trust;
        let signer = match &config.source {
            Some(source) => {
                let cached = artifact::Cached::new(config.path.parent().map(PathBuf::from).unwrap_or_default());
                cached.check(source, &sha256).with_context(|| format!("plugin `{name}`: refusing {source}"))?;
                cached.signer(source, trust.required, &trust.keys).with_context(|| format!("plugin `{name}`: refusing {source}"))?
            }
            None => (trust.required || trust.signature_file.exists())
                .then(|| signature::check(&config.path, &trust.signature_file, &sha256, &trust.keys))
                .transpose()
                .with_context(|| format!("plugin `{name}`: refusing {file}"))?,
        };
        if let Some(signer) = signer {
            tracing::info!("plugin `{name}`: {file} is signed by trusted key `{signer}`");
        }
        let summary = contract::summarize(&bytes).map_err(|e| anyhow::anyhow!("plugin `{name}`: {file} {e}"))?;
        check_shape(&summary.shape).map_err(|e| anyhow::anyhow!("plugin `{name}`: {file} {e}; Cordon refuses components of more parts than any real plugin needs"))?;
        summary.check(config.world).map_err(|e| anyhow::anyhow!("plugin `{name}`: {file} {e}"))?;
        let slots = engine.slots(&summary.shape).map_err(|e| anyhow::anyhow!("plugin `{name}`: {file}: {e}; Cordon refuses it so that other plugins keep their slots"))?;
        let manifest = match &summary.manifest {
            Some(bytes) => Some(Manifest::parse(bytes).map_err(|e| anyhow::anyhow!("plugin `{name}`: {file}: {e}"))?),
            None => None,
        };
        if let Some(m) = manifest.as_ref().filter(|_| !inspecting) {
            let missing = m.missing_grants(&config.grants);
            if !missing.is_empty() {
                bail!(
                    "plugin `{name}`: {file} needs grants it was not given: {}; add them under `grants:` for this plugin in the agent config (or use another plugin)",
                    missing.join(", ")
                );
            }
        }
        let (component, origin) = engine
            .load(&bytes, &sha256)
            .with_context(|| format!("plugin `{name}`: cannot compile {file}"))?;
        let pre = engine.instance_pre(&component).map_err(|e| {
            anyhow::anyhow!("plugin `{name}`: {file} needs an import this host does not provide: {e:#}")
        })?;
        let executor = if config.world.executes_stages() {
            Some(ExecutorPre::new(pre.clone()).map_err(anyhow::Error::from).with_context(|| format!("plugin `{name}`: {file} does not match world `executor`"))?)
        } else {
            None
        };
        let planner = if config.world.plans() {
            Some(PlannerPre::new(pre.clone()).map_err(anyhow::Error::from).with_context(|| format!("plugin `{name}`: {file} does not match world `planner`"))?)
        } else {
            None
        };
        let key_filter = if config.world == World::KeyFilter {
            Some(KeyFilterPre::new(pre.clone()).map_err(anyhow::Error::from).with_context(|| format!("plugin `{name}`: {file} does not match world `key-filter`"))?)
        } else {
            None
        };
        let item_action = if config.world == World::ItemAction {
            Some(ItemActionPre::new(pre.clone()).map_err(anyhow::Error::from).with_context(|| format!("plugin `{name}`: {file} does not match world `item-action`"))?)
        } else {
            None
        };
        let migration_phase = if config.world == World::MigrationPhase {
            Some(MigrationPhasePre::new(pre.clone()).map_err(anyhow::Error::from).with_context(|| format!("plugin `{name}`: {file} does not match world `migration-phase`"))?)
        } else {
            None
        };
        let mut plugin = Plugin {
            name: name.clone(),
            world: config.world,
            path: config.path.clone(),
            sha256,
            sandbox: Sandbox::new(config.grants.clone(), config.limits.clone(), slots),
            origin,
            stages: Vec::new(),
            manifest,
            described: None,
            undescribed: None,
            options: None,
            pre,
            executor,
            planner,
            key_filter,
            item_action,
            migration_phase,
        };
        if config.world.defines_stages() {
            plugin.stages = plugin
                .defined_stages(engine)
                .await
                .with_context(|| format!("plugin `{name}`: cannot list the stages it defines"))?;
            if let Some(m) = &plugin.manifest
                && let Some(extra) = m.stages.iter().find(|s| !plugin.stages.iter().any(|d| d.name == **s))
            {
                bail!("plugin `{name}`: {file}: its manifest lists stage `{extra}`, which the component does not define");
            }
            if let Ok(options) = OptionsIndices::new(&plugin.pre) {
                match plugin.describe(engine, &options).await {
                    Ok(described) => {
                        plugin.described = Some(described);
                        plugin.options = Some(options);
                    }
                    Err(e) if inspecting => plugin.undescribed = Some(e.to_string()),
                    Err(e) => bail!("plugin `{name}`: cannot read the schemas of its options: {e}"),
                }
            }
        }
        Ok(plugin)
    }
}

/// Every configured plugin, loaded, with stage routing.
pub struct Plugins {
    plugins: Vec<Arc<Plugin>>,
    /// Stage name → the plugin that performs it.
    executors: BTreeMap<String, Arc<Plugin>>,
    /// Stage name → the plugin that plans it.
    planners: BTreeMap<String, Arc<Plugin>>,
}

impl Plugins {
    /// Loads every plugin of `config`. Two plugins performing (or planning)
    /// the same stage is an error naming both, never "last one wins".
    pub async fn load(engine: &Engine, config: &AgentConfig) -> Result<Plugins> {
        let mut plugins = Vec::new();
        let mut executors: BTreeMap<String, Arc<Plugin>> = BTreeMap::new();
        let mut planners: BTreeMap<String, Arc<Plugin>> = BTreeMap::new();
        for plugin_config in &config.plugins {
            let plugin = Arc::new(Plugin::load(engine, plugin_config).await?);
            for (table, role, applies) in [
                (&mut executors, "performs", plugin.world.executes_stages()),
                (&mut planners, "plans", plugin.world.plans()),
            ] {
                if !applies {
                    continue;
                }
                for stage in &plugin.stages {
                    if let Some(other) = table.get(&stage.name) {
                        bail!(
                            "{}: stage `{}` is defined by both plugin `{}` and plugin `{}` (both {role} it); remove one of them from the agent config",
                            config.source.display(),
                            stage.name,
                            other.name,
                            plugin.name
                        );
                    }
                    table.insert(stage.name.clone(), plugin.clone());
                }
            }
            plugins.push(plugin);
        }
        Ok(Plugins { plugins, executors, planners })
    }

    pub fn all(&self) -> &[Arc<Plugin>] {
        &self.plugins
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Plugin>> {
        self.plugins.iter().find(|p| p.name == name)
    }

    /// The plugin that performs `stage`.
    pub fn route(&self, stage: &str) -> Result<&Arc<Plugin>> {
        self.executors.get(stage).with_context(|| {
            let known: Vec<&str> = self.executors.keys().map(String::as_str).collect();
            format!("no plugin defines stage `{stage}` (defined: {})", if known.is_empty() { "none".to_string() } else { known.join(", ") })
        })
    }

    /// The plugin that plans `stage`, if any does.
    pub fn planner_for(&self, stage: &str) -> Option<&Arc<Plugin>> {
        self.planners.get(stage)
    }

    /// Every stage some plugin performs (what [`Plugins::route`] routes), sorted.
    pub fn stage_names(&self) -> Vec<String> {
        self.executors.keys().cloned().collect()
    }
}
