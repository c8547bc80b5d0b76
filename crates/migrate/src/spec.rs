//! The migration spec (YAML): what moves from where to where, selected by
//! which key filter, through which phase plugins, in pages of what size,
//! and what each phase does with errors. Validated whole before anything
//! runs; every error names the file and the field.
//!
//! ```yaml
//! source:      { etcd: { endpoints: ["http://127.0.0.1:2379"], prefix: "/registry/" } }
//! destination: { sqlite: { path: moved.sqlite } }        # relative to this file
//! selector:    { plugin: kcp-keys, with: { cluster: "root:org-a" } }
//! transform:   { plugin: registry-rewrite, with: { from: "old:5000", to: "new" } }   # optional
//! budget:      { entries: 1000, bytes: 4MiB }
//! phases:
//!   - { name: prepare,  plugin: migrate-prepare }
//!   - { name: copy,     plugin: migrate-copy }
//!   - { name: verify,   plugin: migrate-verify }
//!   - { name: cleanup,  plugin: migrate-cleanup, on-error: continue-and-report }
//!   - { name: finalize, plugin: migrate-finalize }
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytesize::ByteSize;
use serde::Deserialize;

use cordon_contract::World;
use cordon_runtime::plugin::AgentConfig;

/// Where keys live.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", rename_all_fields = "kebab-case", deny_unknown_fields)]
pub enum StoreSpec {
    Etcd {
        endpoints: Vec<String>,
        #[serde(default)]
        prefix: String,
        /// Operations per transaction (etcd's `--max-txn-ops`).
        #[serde(default = "default_txn_ops")]
        max_txn_ops: usize,
        /// How long one call may take before the step fails.
        #[serde(default = "default_timeout", with = "humantime_serde")]
        timeout: Duration,
    },
    Sqlite {
        path: PathBuf,
        #[serde(default = "default_timeout", with = "humantime_serde")]
        timeout: Duration,
    },
}

fn default_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_txn_ops() -> usize {
    128
}

impl StoreSpec {
    /// Which key space this is, for the unit identity and for refusing a
    /// migration from a store onto itself.
    pub fn identity(&self) -> String {
        match self {
            StoreSpec::Etcd { endpoints, prefix, .. } => {
                let mut e = endpoints.clone();
                e.sort();
                format!("etcd {} {prefix:?}", e.join(","))
            }
            StoreSpec::Sqlite { path, .. } => format!("sqlite {}", path.display()),
        }
    }

    /// Opens the store; every call on it is bounded by its `timeout`.
    pub async fn open(&self) -> Result<std::sync::Arc<dyn super::kv::KvStore>> {
        use super::kv::{Deadline, Etcd, KvStore, Sqlite};
        let (store, timeout): (std::sync::Arc<dyn KvStore>, Duration) = match self {
            StoreSpec::Etcd { endpoints, prefix, max_txn_ops, timeout } => (std::sync::Arc::new(Etcd::connect(endpoints, prefix, *max_txn_ops, *timeout).await?), *timeout),
            StoreSpec::Sqlite { path, timeout } => (std::sync::Arc::new(Sqlite::open(path)?), *timeout),
        };
        Ok(std::sync::Arc::new(Deadline::new(store, timeout)))
    }
}

/// A plugin named in the agent config, and its options.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginRef {
    pub plugin: String,
    #[serde(default, rename = "with")]
    pub options: serde_json::Value,
}

impl PluginRef {
    pub fn options_json(&self) -> String {
        options_json(&self.options)
    }
}

/// Options (`with:`) as the JSON text a plugin receives; absent is `{}`.
pub fn options_json(options: &serde_json::Value) -> String {
    if options.is_null() { "{}".to_string() } else { options.to_string() }
}

/// What a phase does with errors.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorPolicy {
    #[default]
    FailFast,
    ContinueAndReport,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PhaseSpec {
    pub name: String,
    pub plugin: String,
    #[serde(default, rename = "with")]
    pub options: serde_json::Value,
    #[serde(default)]
    pub on_error: ErrorPolicy,
}

/// Page budgets: a phase's pages are capped at these.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    #[serde(default = "default_entries")]
    pub entries: u32,
    #[serde(default = "default_bytes")]
    pub bytes: ByteSize,
}

fn default_entries() -> u32 {
    1000
}

fn default_bytes() -> ByteSize {
    ByteSize::mib(4)
}

impl Default for Budget {
    fn default() -> Self {
        Self { entries: default_entries(), bytes: default_bytes() }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct MigrationSpec {
    #[serde(with = "serde_yaml_ng::with::singleton_map")]
    pub source: StoreSpec,
    #[serde(with = "serde_yaml_ng::with::singleton_map")]
    pub destination: StoreSpec,
    pub selector: PluginRef,
    #[serde(default)]
    pub transform: Option<PluginRef>,
    #[serde(default)]
    pub budget: Budget,
    pub phases: Vec<PhaseSpec>,
}

impl MigrationSpec {
    pub fn load(path: &Path, agent: &AgentConfig) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read the migration spec {}", path.display()))?;
        Self::parse(&text, path, agent)
    }

    /// Parses and validates `text` read from `path` against the agent
    /// config's plugins.
    pub fn parse(text: &str, path: &Path, agent: &AgentConfig) -> Result<Self> {
        let file = path.display();
        let mut spec: MigrationSpec = serde_yaml_ng::from_str(text).with_context(|| format!("{file}: not a valid migration spec"))?;
        let base = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        for (field, store) in [("source", &mut spec.source), ("destination", &mut spec.destination)] {
            match store {
                StoreSpec::Etcd { endpoints, max_txn_ops, .. } => {
                    if endpoints.is_empty() {
                        bail!("{file}: {field}.etcd.endpoints is empty; list the cluster's client URLs, e.g. [\"http://127.0.0.1:2379\"]");
                    }
                    if let Some(bad) = endpoints.iter().find(|e| !(e.starts_with("http://") || e.starts_with("https://"))) {
                        bail!("{file}: {field}.etcd.endpoints: {bad:?} is not an http:// or https:// URL");
                    }
                    if *max_txn_ops == 0 {
                        bail!("{file}: {field}.etcd.max-txn-ops must be at least 1");
                    }
                }
                StoreSpec::Sqlite { path, .. } => {
                    if path.is_relative() {
                        *path = base.join(&*path);
                    }
                }
            }
        }
        if spec.source.identity() == spec.destination.identity() {
            bail!("{file}: source and destination are the same store ({}); a migration moves keys to another store", spec.source.identity());
        }
        if spec.budget.entries == 0 || spec.budget.bytes.as_u64() == 0 {
            bail!("{file}: budget.entries and budget.bytes must be more than zero");
        }
        let world_of = |field: &str, name: &str, world: World| -> Result<()> {
            let plugin = agent.plugin(name).map_err(|e| anyhow::anyhow!("{file}: {field}: {e:#}"))?;
            if plugin.world != world {
                bail!("{file}: {field}: plugin `{name}` is a {} plugin; this needs a {world} plugin", plugin.world);
            }
            Ok(())
        };
        world_of("selector.plugin", &spec.selector.plugin, World::KeyFilter)?;
        if let Some(t) = &spec.transform {
            world_of("transform.plugin", &t.plugin, World::ItemAction)?;
        }
        if spec.phases.is_empty() {
            bail!("{file}: `phases` is empty; list at least prepare, copy and verify");
        }
        let mut seen: Vec<&str> = Vec::new();
        for (i, phase) in spec.phases.iter().enumerate() {
            let field = format!("phases[{i}] ({})", phase.name);
            if phase.name.is_empty() || seen.contains(&phase.name.as_str()) {
                bail!("{file}: {field}: phase names must be non-empty and unique");
            }
            world_of(&field, &phase.plugin, World::MigrationPhase)?;
            if phase.name == "verify" && phase.on_error != ErrorPolicy::FailFast {
                bail!("{file}: {field}: verify must be fail-fast: a mismatch stops the migration");
            }
            if phase.name == "cleanup" && !seen.contains(&"verify") {
                bail!("{file}: {field}: cleanup deletes source keys, so a `verify` phase must come before it");
            }
            seen.push(&phase.name);
        }
        Ok(spec)
    }

    /// The migrated unit: the source key space and the selection. Two
    /// migrations of one unit cannot both hold its claim.
    pub fn unit(&self) -> String {
        format!("{} selected by {}({})", self.source.identity(), self.selector.plugin, self.selector.options_json())
    }
}
