//! Registry credentials, in the order people expect: the environment
//! (`CORDON_REGISTRY_USERNAME` and `CORDON_REGISTRY_PASSWORD`, for agents
//! run by a service manager), then Docker's config file
//! (`$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`), whose
//! `auths` entry for the registry `docker login` wrote. Credential helpers
//! (`credsStore`, `credHelpers`) are not run: a registry that has only a
//! helper gets a warning naming the variables to set instead. Anonymous
//! otherwise.
//!
//! What is returned besides the credentials is where they came from, for
//! errors; the user name and password are never formatted anywhere.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

pub const USERNAME_VAR: &str = "CORDON_REGISTRY_USERNAME";
pub const PASSWORD_VAR: &str = "CORDON_REGISTRY_PASSWORD";

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, DockerAuth>,
    #[serde(default)]
    creds_store: Option<String>,
    #[serde(default)]
    cred_helpers: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
struct DockerAuth {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

fn docker_config_path() -> Option<PathBuf> {
    match std::env::var_os("DOCKER_CONFIG") {
        Some(dir) => Some(PathBuf::from(dir).join("config.json")),
        None => std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".docker").join("config.json")),
    }
}

/// `auths` keys may carry a scheme and a path (`https://index.docker.io/v1/`).
fn host_of(key: &str) -> &str {
    let key = key.split_once("://").map_or(key, |(_, rest)| rest);
    key.split('/').next().unwrap_or(key)
}

/// The credentials for `registry` (`host[:port]`), and where they came from.
pub fn for_registry(registry: &str) -> Result<(RegistryAuth, Option<String>)> {
    if let (Ok(user), Ok(password)) = (std::env::var(USERNAME_VAR), std::env::var(PASSWORD_VAR)) {
        return Ok((RegistryAuth::Basic(user, password), Some(format!("${USERNAME_VAR} and ${PASSWORD_VAR}"))));
    }
    let Some(path) = docker_config_path().filter(|p| p.exists()) else {
        return Ok((RegistryAuth::Anonymous, None));
    };
    let shown = path.display();
    let text = std::fs::read(&path).with_context(|| format!("cannot read the Docker config {shown}"))?;
    let config: DockerConfig = serde_json::from_slice(&text).with_context(|| format!("{shown} is not a Docker config file; fix it or set ${USERNAME_VAR} and ${PASSWORD_VAR}"))?;
    let Some(entry) = config.auths.iter().find(|(key, _)| host_of(key) == registry).map(|(_, entry)| entry) else {
        if config.cred_helpers.contains_key(registry) || config.creds_store.is_some() {
            tracing::warn!("{shown} keeps the credentials of {registry} in a credential helper, which Cordon does not run; set ${USERNAME_VAR} and ${PASSWORD_VAR}");
        }
        return Ok((RegistryAuth::Anonymous, None));
    };
    let origin = Some(format!("the `auths` entry for {registry} in {shown}"));
    if let (Some(user), Some(password)) = (&entry.username, &entry.password) {
        return Ok((RegistryAuth::Basic(user.clone(), password.clone()), origin));
    }
    let decoded = entry
        .auth
        .as_deref()
        .and_then(|auth| B64.decode(auth.trim()).ok())
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .and_then(|pair| pair.split_once(':').map(|(u, p)| (u.to_string(), p.to_string())))
        .with_context(|| format!("the `auths` entry for {registry} in {shown} has no base64 `user:password` in `auth`; run `docker login {registry}` again"))?;
    Ok((RegistryAuth::Basic(decoded.0, decoded.1), origin))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auths_keys_match_by_host() {
        assert_eq!(host_of("https://index.docker.io/v1/"), "index.docker.io");
        assert_eq!(host_of("127.0.0.1:5000"), "127.0.0.1:5000");
        assert_eq!(host_of("http://127.0.0.1:5000/v2"), "127.0.0.1:5000");
    }
}
