//! One module per command: each parses its arguments (a clap struct or
//! subcommand enum), calls the layer that owns the work, and prints.

pub mod agent;
pub mod agents;
pub mod completions;
pub mod control;
pub mod debug;
pub mod deploy;
pub mod keys;
pub mod logs;
pub mod migrate;
pub mod plan;
pub mod plugin;
pub mod stage;
pub mod status;
pub mod transfer;
pub mod trigger;
pub mod upload;

use std::path::Path;

use cordon_runtime::plugin::AgentConfig;

/// The agent config at `path`, with every plugin from a registry fetched
/// into its cache: what commands that load all plugins start from.
pub async fn load_with_plugins(path: &Path) -> anyhow::Result<AgentConfig> {
    let config = AgentConfig::load(path)?;
    cordon_registry::fetch_all(&config).await?;
    Ok(config)
}
