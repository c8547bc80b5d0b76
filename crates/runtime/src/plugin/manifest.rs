//! A plugin's manifest: what the plugin says it is and what it needs,
//! embedded by its author in the `cordon:manifest` custom section (the SDK's
//! `manifest!` macro writes it).
//!
//! At load time the host compares the requested capabilities with the
//! operator's grants and refuses the plugin, naming every missing grant,
//! when it needs more than it was given — instead of letting it fail at
//! its first denied call in the middle of a deployment. The manifest only
//! ever *narrows* what loads: the grants alone decide what a plugin can do.

use serde::Deserialize;

use cordon_contract as contract;
use crate::sandbox::Grants;
use crate::sandbox::fs::Access;
use crate::sandbox::net::{Destination, Scheme};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    pub version: String,
    /// The contract version the plugin was written for.
    pub contract: String,
    #[serde(default)]
    pub stages: Vec<String>,
    #[serde(default)]
    pub capabilities: Capabilities,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capabilities {
    #[serde(default)]
    pub mounts: Vec<MountRequest>,
    /// `http`, `https` or `tcp` (some destination of that scheme, chosen by
    /// the operator), or a full `scheme://host[:port]` destination.
    #[serde(default)]
    pub network: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub secrets: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountRequest {
    pub guest: String,
    pub access: Access,
}

impl Manifest {
    pub fn parse(bytes: &[u8]) -> Result<Manifest, String> {
        let manifest: Manifest = serde_json::from_slice(bytes).map_err(|e| format!("its {} section is not a valid manifest: {e}", contract::MANIFEST_SECTION))?;
        if manifest.contract != contract::VERSION {
            return Err(format!(
                "its manifest says contract {}@{}, but this host implements {}@{}",
                contract::PACKAGE,
                manifest.contract,
                contract::PACKAGE,
                contract::VERSION
            ));
        }
        for request in &manifest.capabilities.network {
            if request.parse::<Scheme>().is_err() {
                request.parse::<Destination>().map_err(|e| format!("its manifest requests {e}"))?;
            }
        }
        Ok(manifest)
    }

    /// The requested capabilities `grants` do not give, one line each.
    pub fn missing_grants(&self, grants: &Grants) -> Vec<String> {
        let caps = &self.capabilities;
        let mut missing = Vec::new();
        for m in &caps.mounts {
            let granted = grants.mounts.iter().any(|g| g.guest == m.guest && (g.access == Access::ReadWrite || m.access == Access::ReadOnly));
            if !granted {
                missing.push(format!("mount {} ({})", m.guest, m.access.as_str()));
            }
        }
        for request in &caps.network {
            let granted = match request.parse::<Scheme>() {
                Ok(scheme) => grants.network.allow.iter().any(|d| d.scheme() == scheme),
                Err(_) => request.parse::<Destination>().is_ok_and(|want| grants.network.allow.iter().any(|d| d.covers(&want))),
            };
            if !granted {
                missing.push(format!("network {request}"));
            }
        }
        for name in &caps.env {
            if !grants.env.contains_key(name) && !grants.inherit_env.contains(name) {
                missing.push(format!("env {name}"));
            }
        }
        for name in &caps.secrets {
            if !grants.secrets.contains_key(name) {
                missing.push(format!("secret {name:?}"));
            }
        }
        missing
    }
}
