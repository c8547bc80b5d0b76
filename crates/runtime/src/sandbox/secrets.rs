//! Secrets capability.
//!
//! Grant: named secrets, each read from an environment variable of the agent
//! or a file (`{ env: VAR }` or `{ file: PATH }`); values never sit in the
//! agent config itself and never enter the guest's environment. Per run:
//! the values, read when the run starts, fetched one by one by name through
//! the `secrets` import; an ungranted name is refused and recorded as a
//! denial. Every granted value is masked by the run's [`StageLog`] before
//! anything it carries is stored or printed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::Deserialize;
use wasmtime::component::{HasSelf, Linker};

use cordon_contract::bindings::cordon::plugin::secrets;

use super::RunState;
use super::output::StageLog;

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

/// Checks secret grants; relative secret files resolve against `base`.
/// Whether a secret can be read is checked when its plugin loads.
pub fn validate(secrets: &mut BTreeMap<String, SecretSource>, base: &Path) -> Result<(), String> {
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

/// The secrets of one run: each granted name with its value, or why it
/// cannot be read.
pub struct Secrets {
    values: BTreeMap<String, Result<String, String>>,
    log: StageLog,
}

/// Reads every granted secret now, for one run.
pub fn read_all(grants: &BTreeMap<String, SecretSource>) -> BTreeMap<String, Result<String, String>> {
    grants.iter().map(|(name, source)| (name.clone(), source.read())).collect()
}

impl Secrets {
    /// The run's secrets; `log` records refused names.
    pub fn new(values: BTreeMap<String, Result<String, String>>, log: StageLog) -> Self {
        Self { values, log }
    }
}

pub(super) fn add_to_linker(linker: &mut Linker<RunState>) -> wasmtime::Result<()> {
    secrets::add_to_linker::<_, HasSelf<Secrets>>(linker, |s| &mut s.secrets)
}

impl secrets::Host for Secrets {
    fn get(&mut self, name: String) -> wasmtime::Result<Result<String, secrets::Error>> {
        Ok(match self.values.get(&name) {
            None => {
                self.log.record_denial(format!("secret {name:?}: not granted to this plugin"));
                Err(secrets::Error::NotGranted)
            }
            Some(Ok(value)) => Ok(value.clone()),
            Some(Err(why)) => Err(secrets::Error::Unavailable(why.clone())),
        })
    }
}
