//! Environment and secrets capabilities.
//!
//! A guest starts with an empty environment; only variables the operator
//! names reach it, either with a value from the agent config (`env`) or
//! passed through from the agent's own environment (`inherit-env`). Secrets
//! never enter the environment: a plugin fetches each by name through the
//! `secrets` import, and every granted secret's value is masked in the log.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where a granted secret's value comes from: `{ env: VAR }` (an
/// environment variable of the agent) or `{ file: PATH }` (a file's
/// content, without a trailing newline). Values never sit in the agent
/// config itself.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SecretSource {
    #[serde(default)]
    pub env: Option<String>,
    #[serde(default)]
    pub file: Option<PathBuf>,
}

impl SecretSource {
    /// Reads the current value.
    pub fn read(&self) -> Result<String, String> {
        match (&self.env, &self.file) {
            (Some(var), None) => std::env::var(var).map_err(|_| format!("environment variable {var} is not set")),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
                .map_err(|e| format!("cannot read {}: {e}", path.display())),
            _ => Err("give exactly one of `env: VAR` or `file: PATH`".to_string()),
        }
    }
}

fn valid_env_name(name: &str) -> bool {
    !name.is_empty() && !name.contains('=') && !name.contains('\0')
}

/// Checks env and secret grants; relative secret files resolve against
/// `base`. Whether a secret can be read is checked when its plugin loads.
pub fn validate(
    env: &BTreeMap<String, String>,
    inherit: &[String],
    secrets: &mut BTreeMap<String, SecretSource>,
    base: &Path,
) -> Result<(), String> {
    for name in env.keys().chain(inherit) {
        if !valid_env_name(name) {
            return Err(format!("environment variable name {name:?} is not valid"));
        }
    }
    for (name, source) in secrets.iter_mut() {
        if let Some(path) = &mut source.file
            && path.is_relative()
        {
            *path = base.join(&*path);
        }
        if source.env.is_some() == source.file.is_some() {
            return Err(format!("secret {name:?}: give exactly one of `env: VAR` or `file: PATH`"));
        }
    }
    Ok(())
}

/// The environment a run starts with: granted values, then inherited ones
/// that are set in the agent's environment.
pub fn resolve_env(env: &BTreeMap<String, String>, inherit: &[String]) -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    vars.extend(inherit.iter().filter_map(|k| std::env::var(k).ok().map(|v| (k.clone(), v))));
    vars
}
