//! One module per command: each parses its arguments (a clap struct or
//! subcommand enum), calls the layer that owns the work, and prints.

pub mod agent;
pub mod agents;
pub mod audit;
pub mod completions;
pub mod control;
pub mod debug;
pub mod deploy;
pub mod keys;
pub mod login;
pub mod logs;
pub mod migrate;
pub mod plan;
pub mod plugin;
pub mod prune;
pub mod server;
pub mod stage;
pub mod status;
pub mod token;
pub mod transfer;
pub mod trigger;
pub mod upload;

use std::path::Path;
use std::sync::Arc;

use cordon_store::StateStore;

use cordon_runtime::plugin::AgentConfig;

/// The agent config at `path`, with every plugin from a registry fetched
/// into its cache: what commands that load all plugins start from.
pub async fn load_with_plugins(path: &Path) -> anyhow::Result<AgentConfig> {
    let config = AgentConfig::load(path)?;
    cordon_registry::fetch_all(&config).await?;
    Ok(config)
}

/// The state that commands which only read or send commands act on: the
/// server `--server` (or `$CORDON_SERVER`) names, which needs no agent
/// config, else the agent config's.
pub fn state(config_path: &Path) -> anyhow::Result<Arc<dyn StateStore>> {
    match cordon_pipeline::open_server()? {
        Some(store) => Ok(store),
        None => cordon_pipeline::open_store(&AgentConfig::load(config_path)?),
    }
}
