//! Environment capability.
//!
//! A guest starts with an empty environment; only variables the operator
//! names reach it, either with a value from the agent config (`env`) or
//! passed through from the agent's own environment (`inherit-env`). Secrets
//! never enter the environment (see [`super::secrets`]).

use std::collections::BTreeMap;

fn valid_env_name(name: &str) -> bool {
    !name.is_empty() && !name.contains('=') && !name.contains('\0')
}

/// Checks env grants.
pub fn validate(env: &BTreeMap<String, String>, inherit: &[String]) -> Result<(), String> {
    match env.keys().chain(inherit).find(|name| !valid_env_name(name)) {
        Some(name) => Err(format!("environment variable name {name:?} is not valid")),
        None => Ok(()),
    }
}

/// The environment a run starts with: granted values, then inherited ones
/// that are set in the agent's environment.
pub fn resolve_env(env: &BTreeMap<String, String>, inherit: &[String]) -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    vars.extend(inherit.iter().filter_map(|k| std::env::var(k).ok().map(|v| (k.clone(), v))));
    vars
}
