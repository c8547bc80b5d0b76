//! The agent config: where state lives and which plugins exist, each with
//! its file, digest pin, world, grants and limits.
//!
//! ```yaml
//! state-dir: .cordon-state        # relative to this file
//! plugins:
//!   - name: wait
//!     path: ../dist/plugins/wait.wasm
//!     sha256: 9f2c…               # required: the component is refused if it differs
//!     world: executor
//!     grants:
//!       mounts: [{ host: /srv/www, guest: /www, access: read-write }]
//!       network: { allow: ["http://127.0.0.1:8080"], name-lookup: false }
//!       env: { LOG_FORMAT: json }
//!       inherit-env: [TZ]
//!       secrets: { token: { env: DEPLOY_TOKEN } }
//!     limits: { memory: 128MiB, timeout: 10m, log-bytes: 4MiB, result-bytes: 1MiB }
//! ```
//!
//! `retention: { keep-deployments: N }` bounds the history kept per
//! application (default: everything is kept).
//!
//! `state:` chooses where the state lives: by default the embedded SQLite
//! database in `state-dir` (one agent); `state: { postgres: { url,
//! password-file, lease } }` (or `$CORDON_DATABASE_URL`, which wins) a
//! PostgreSQL database that many agents share. `state-dir` stays each
//! agent's own (caches, scratch, local snapshots).
//!
//! A plugin from a registry names `source: oci://REGISTRY/REPO@sha256:…`
//! (the manifest digest, see [`super::artifact`]) instead of `path:`; its
//! `sha256` still pins the component. `insecure-registries` lists the
//! registries (`host[:port]`) reached over plain HTTP besides loopback ones.
//!
//! Parsing is strict: unknown fields, a malformed pin, a duplicate plugin
//! name or a grant that cannot be honoured is one error naming the file,
//! the plugin and the fix, before anything is loaded.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use ed25519_dalek::VerifyingKey;
use serde::Deserialize;

use cordon_contract::World;
use super::artifact::{Cached, OciSource};
use crate::sandbox::{Grants, Limits};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AgentConfig {
    /// State directory (SQLite state, compiled-component cache, scratch).
    pub state_dir: PathBuf,
    #[serde(default)]
    pub plugins: Vec<PluginConfig>,
    /// Publisher keys whose signatures are trusted, by name
    /// (`cordon-public-key-v1 <base64>`, as `cordon plugin keygen` writes).
    #[serde(default)]
    pub trusted_keys: BTreeMap<String, String>,
    /// Require a trusted signature on every plugin.
    #[serde(default)]
    pub require_signatures: bool,
    /// Registries (`host[:port]`) reached over plain HTTP; loopback ones
    /// always are, every other one only over HTTPS.
    #[serde(default)]
    pub insecure_registries: Vec<String>,
    /// Where the state lives (default: SQLite in `state-dir`).
    #[serde(default)]
    pub state: StateConfig,
    /// Most deployments this agent runs at once; beyond them it claims no
    /// more, leaving them to other agents (or to later).
    #[serde(default = "default_max_deployments")]
    pub max_deployments: usize,
    /// The agent's name in `cordon agents` and `cordon status` (default:
    /// the host name).
    #[serde(default)]
    pub name: Option<String>,
    /// Labels applications choose agents by (`agents: { env: prod }` in
    /// `app.cordon.yaml`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// How much history the agent keeps (default: all of it).
    #[serde(default)]
    pub retention: Retention,
    /// The file this config was read from.
    #[serde(skip)]
    pub source: PathBuf,
}

/// `state:` of the agent config.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct StateConfig {
    pub postgres: Option<PostgresConfig>,
}

/// A PostgreSQL database that many agents share.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PostgresConfig {
    /// `postgres://USER@HOST:PORT/DATABASE`; `$CORDON_DATABASE_URL` wins.
    #[serde(default)]
    pub url: Option<String>,
    /// A file holding the password (relative to the config file), so the
    /// config itself holds no secret.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// How long an agent's claim on a deployment lasts without renewal:
    /// after it dies, another agent takes its deployments over this late.
    #[serde(default = "default_lease", with = "humantime_serde")]
    pub lease: std::time::Duration,
}

/// `retention:` of the agent config: after each deployment, the agent
/// deletes its application's finished deployments beyond the newest
/// `keep-deployments` ones, with their logs and snapshots (see
/// `cordon_store::retention`).
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Retention {
    pub keep_deployments: Option<std::num::NonZeroUsize>,
}

fn default_max_deployments() -> usize {
    16
}

fn default_lease() -> std::time::Duration {
    std::time::Duration::from_secs(15)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PluginConfig {
    pub name: String,
    /// The component file; for a plugin from a registry, its file in the
    /// cache (derived, not written in the config).
    #[serde(default)]
    pub path: PathBuf,
    /// The artifact in a registry, pinned by manifest digest.
    #[serde(default)]
    pub source: Option<OciSource>,
    /// Hex sha256 of the component file.
    pub sha256: String,
    pub world: World,
    #[serde(default)]
    pub grants: Grants,
    #[serde(default)]
    pub limits: Limits,
    /// `required` or `optional` (a signature that is present must still
    /// verify); default: `required` when `require-signatures` is set.
    #[serde(default)]
    pub signature: Option<SignatureMode>,
    /// The signature file; default `<path>.sig`.
    #[serde(default)]
    pub signature_file: Option<PathBuf>,
    /// What loading checks, resolved from the fields above.
    #[serde(skip)]
    pub trust: Trust,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SignatureMode {
    Required,
    Optional,
}

/// The signature check of one plugin.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    /// A signature must be present (one that is present must always verify).
    pub required: bool,
    /// The detached signature file of a local component (a registry's
    /// signature is in the artifact's cache directory).
    pub signature_file: PathBuf,
    pub keys: Arc<BTreeMap<String, VerifyingKey>>,
}

/// Whether a `host[:port]` names this machine.
pub fn is_loopback(registry: &str) -> bool {
    let host = match registry.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => registry.rsplit_once(':').map_or(registry, |(h, _)| h),
    };
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Checks agent labels (or an application's label selector) named `what`:
/// keys and values of 1 to 63 ASCII letters, digits, '-', '_' or '.', as
/// Kubernetes label values, so they read the same in every listing.
pub fn check_labels(what: &str, labels: &BTreeMap<String, String>) -> Result<()> {
    for (key, value) in labels {
        for (part, text) in [("key", key), ("value", value)] {
            if !is_label_text(text) {
                bail!("{what}: label {part} {text:?} must be 1-63 ASCII letters, digits, '-', '_' or '.'");
            }
        }
    }
    Ok(())
}

/// Whether `text` may be a label key or value, or an agent name.
fn is_label_text(text: &str) -> bool {
    (1..=63).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

impl AgentConfig {
    /// Reads and validates the config at `path`. The path is made
    /// canonical first, so the state directory and every path derived from
    /// it (and stored) are absolute whatever the working directory.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read agent config {}", path.display()))?;
        let path = std::fs::canonicalize(path).with_context(|| format!("cannot resolve agent config {}", path.display()))?;
        Self::parse(&text, &path)
    }

    /// Parses `text` as if read from `path` (relative paths resolve against
    /// its directory).
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let file = path.display();
        let mut config: AgentConfig =
            serde_yaml_ng::from_str(text).with_context(|| format!("{file}: not a valid agent config"))?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let base = if base.as_os_str().is_empty() { PathBuf::from(".") } else { base };
        config.source = path.to_path_buf();
        if config.state_dir.is_relative() {
            config.state_dir = base.join(&config.state_dir);
        }
        if config.max_deployments == 0 {
            bail!("{file}: max-deployments is 0, so this agent would run nothing; give at least 1 (default 16)");
        }
        if let Some(name) = config.name.as_deref().filter(|n| !is_label_text(n)) {
            bail!("{file}: name {name:?} must be 1-63 ASCII letters, digits, '-', '_' or '.'");
        }
        check_labels(&format!("{file}: labels"), &config.labels)?;
        if let Some(postgres) = &mut config.state.postgres {
            if let Some(file) = &mut postgres.password_file
                && file.is_relative()
            {
                *file = base.join(&*file);
            }
            if postgres.lease < std::time::Duration::from_secs(1) {
                bail!("{file}: state.postgres.lease is {:?}; give at least 1s (default 15s)", postgres.lease);
            }
        }
        let mut names: Vec<&str> = Vec::new();
        let artifacts = config.artifact_dir();
        for plugin in &mut config.plugins {
            let name = plugin.name.clone();
            if !valid_name(&name) {
                bail!("{file}: plugin name {name:?} must be 1-64 characters of a-z, 0-9, '-' or '_'");
            }
            match &plugin.source {
                Some(_) if !plugin.path.as_os_str().is_empty() => {
                    bail!("{file}: plugin `{name}` has both `path` and `source`; keep `source` for a plugin from a registry, or `path` for a local file")
                }
                Some(source) => plugin.path = Cached::new(source.cache_dir(&artifacts)).component(),
                None if plugin.path.as_os_str().is_empty() => {
                    bail!("{file}: plugin `{name}` needs `path:` (a component file) or `source:` (oci://REGISTRY/REPO@sha256:DIGEST)")
                }
                None if plugin.path.is_relative() => plugin.path = base.join(&plugin.path),
                None => {}
            }
            plugin.sha256 = plugin.sha256.trim().to_ascii_lowercase();
            if plugin.sha256.len() != 64 || !plugin.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                bail!(
                    "{file}: plugin `{name}`: sha256 {:?} is not a hex sha256 digest; set it to the output of `sha256sum {}` (or the sha256 that `cordon plugin inspect` prints)",
                    plugin.sha256,
                    plugin.path.display()
                );
            }
            if plugin.limits.memory.as_u64() < 1 << 20 || plugin.limits.memory.as_u64() > 4 << 30 {
                bail!("{file}: plugin `{name}`: limits.memory must be between 1MiB and 4GiB");
            }
            if plugin.limits.timeout.is_zero() {
                bail!("{file}: plugin `{name}`: limits.timeout must be more than zero");
            }
            plugin.grants.validate(&base).map_err(|e| anyhow::anyhow!("{file}: plugin `{name}`: {e}"))?;
        }
        let mut keys = BTreeMap::new();
        for (name, text) in &config.trusted_keys {
            let key = super::signature::parse_public(text).map_err(|e| anyhow::anyhow!("{file}: trusted-keys.{name}: {e:#}; use the line of a `.pub` file that `cordon plugin keygen` wrote"))?;
            keys.insert(name.clone(), key);
        }
        let keys = Arc::new(keys);
        for plugin in &mut config.plugins {
            let required = match plugin.signature {
                Some(SignatureMode::Required) => true,
                Some(SignatureMode::Optional) => false,
                None => config.require_signatures,
            };
            let signature_file = match &plugin.signature_file {
                Some(p) if p.is_relative() => base.join(p),
                Some(p) => p.clone(),
                None => super::signature::signature_path(&plugin.path),
            };
            if required && keys.is_empty() {
                bail!("{file}: plugin `{}` requires a signature, but `trusted-keys` is empty; add the publisher's public key", plugin.name);
            }
            plugin.trust = Trust { required, signature_file, keys: keys.clone() };
        }
        for plugin in &config.plugins {
            if names.contains(&plugin.name.as_str()) {
                bail!("{file}: two plugins are named `{}`; plugin names must be unique", plugin.name);
            }
            names.push(&plugin.name);
        }
        Ok(config)
    }

    pub fn plugin(&self, name: &str) -> Result<&PluginConfig> {
        self.plugins.iter().find(|p| p.name == name).with_context(|| {
            let known: Vec<&str> = self.plugins.iter().map(|p| p.name.as_str()).collect();
            format!(
                "{}: no plugin named `{name}` (configured: {})",
                self.source.display(),
                if known.is_empty() { "none".to_string() } else { known.join(", ") }
            )
        })
    }

    /// Directory of the compiled-component cache.
    pub fn cache_dir(&self) -> PathBuf {
        self.state_dir.join("cache").join("components")
    }

    /// Directory of the artifacts fetched from registries.
    pub fn artifact_dir(&self) -> PathBuf {
        self.state_dir.join("cache").join("oci")
    }

    /// Whether `registry` (`host[:port]`) is reached over plain HTTP:
    /// loopback, or listed in `insecure-registries`.
    pub fn plain_http(&self, registry: &str) -> bool {
        is_loopback(registry) || self.insecure_registries.iter().any(|r| r == registry)
    }

    /// The engine this config's plugins run on: pooled, compiling into the
    /// state directory's cache.
    pub fn engine(&self) -> Result<crate::engine::Engine> {
        crate::engine::Engine::new(crate::engine::EngineOptions { cache_dir: Some(self.cache_dir()), ..Default::default() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PIN: &str = "0000000000000000000000000000000000000000000000000000000000000000";

    fn parse(yaml: &str) -> Result<AgentConfig> {
        AgentConfig::parse(yaml, Path::new("/etc/cordon/agent.yaml"))
    }

    #[test]
    fn resolves_relative_paths_and_defaults() {
        let c = parse(&format!("state-dir: state\nplugins:\n  - {{name: wait, path: w.wasm, sha256: {PIN}, world: executor}}\n")).unwrap();
        assert_eq!(c.state_dir, Path::new("/etc/cordon/state"));
        assert_eq!(c.plugins[0].path, Path::new("/etc/cordon/w.wasm"));
        assert_eq!(c.plugins[0].limits, Limits::default());
        assert_eq!((c.name, c.labels.len()), (None, 0));
        let c = parse("state-dir: s\nname: prod-eu.1\nlabels: {env: prod, zone: eu-west-1}\n").unwrap();
        assert_eq!((c.name.as_deref(), c.labels["zone"].as_str()), (Some("prod-eu.1"), "eu-west-1"));
    }

    #[test]
    fn registry_plugins_live_in_the_cache_and_loopback_is_plain_http() {
        let c = parse(&format!("state-dir: state\ninsecure-registries: [lab:5000]\nplugins:\n  - {{name: a, source: oci://r.example/a@sha256:{PIN}, sha256: {PIN}, world: executor}}\n")).unwrap();
        assert_eq!(c.plugins[0].path, Path::new("/etc/cordon/state/cache/oci/sha256").join(PIN).join("component.wasm"));
        for (registry, plain) in [("127.0.0.1:5000", true), ("localhost", true), ("[::1]:5000", true), ("lab:5000", true), ("r.example", false), ("10.0.0.1:5000", false)] {
            assert_eq!(c.plain_http(registry), plain, "{registry}");
        }
    }

    #[test]
    fn names_file_plugin_and_fix() {
        let cases = [
            ("state-dir: s\nplugins:\n  - {name: a, path: a.wasm, sha256: abc, world: executor}\n".to_string(), "sha256sum"),
            (format!("state-dir: s\nplugins:\n  - {{name: a, path: a.wasm, sha256: {PIN}, world: executr}}\n"), "unknown variant"),
            (format!("state-dir: s\nplugins:\n  - {{name: a, path: a.wasm, sha256: {PIN}, world: executor, grant: {{}}}}\n"), "unknown field `grant`"),
            (format!("state-dir: s\nplugins:\n  - {{name: a, path: a.wasm, sha256: {PIN}, world: executor}}\n  - {{name: a, path: b.wasm, sha256: {PIN}, world: executor}}\n"), "two plugins are named `a`"),
            (format!("state-dir: s\nplugins:\n  - {{name: a, path: a.wasm, sha256: {PIN}, world: executor, grants: {{network: {{allow: [\"tcp://db\"]}}}}}}\n"), "tcp destinations need a port"),
            (format!("state-dir: s\nplugins:\n  - {{name: a, path: a.wasm, sha256: {PIN}, world: executor, grants: {{mounts: [{{host: /nonexistent-dir, guest: /x, access: read-only}}]}}}}\n"), "not an existing directory"),
            (format!("state-dir: s\nplugins:\n  - {{name: a, path: a.wasm, sha256: {PIN}, world: executor, grants: {{mounts: [{{host: /tmp, guest: /source, access: read-write}}]}}}}\n"), "reserves"),
            (format!("state-dir: s\nplugins:\n  - {{name: a, path: a.wasm, sha256: {PIN}, world: executor, limits: {{memory: 1KiB}}}}\n"), "limits.memory"),
            (format!("state-dir: s\nplugins:\n  - {{name: a, sha256: {PIN}, world: executor}}\n"), "needs `path:`"),
            (format!("state-dir: s\nplugins:\n  - {{name: a, path: a.wasm, source: oci://r/a@sha256:{PIN}, sha256: {PIN}, world: executor}}\n"), "both `path` and `source`"),
            (format!("state-dir: s\nplugins:\n  - {{name: a, source: oci://r/a:1.0, sha256: {PIN}, world: executor}}\n"), "cordon plugin pin"),
            ("state-dir: s\nname: 'prod eu'\n".to_string(), "name \"prod eu\" must be"),
            ("state-dir: s\nlabels: {env: 'prod/eu'}\n".to_string(), "labels: label value \"prod/eu\""),
            ("state-dir: s\nlabels: {'': prod}\n".to_string(), "label key \"\""),
            ("state-dir: s\nretention: {keep-deployments: 0}\n".to_string(), "keep-deployments"),
            ("state-dir: s\nretention: {keep: 3}\n".to_string(), "unknown field `keep`"),
        ];
        for (yaml, expected) in cases {
            let err = format!("{:#}", parse(&yaml).unwrap_err());
            assert!(err.contains("/etc/cordon/agent.yaml"), "{err}");
            assert!(err.contains(expected), "expected {expected:?} in: {err}");
        }
    }
}
