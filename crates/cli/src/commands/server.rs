//! `cordon server`: serves the API over the state its config names (see
//! [`cordon_server`]).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;

use cordon_server::ServerConfig;

/// Serve the authenticated API for people and agents.
#[derive(clap::Args)]
pub struct Server {
    /// The server config (listen address, TLS files, state).
    #[arg(long = "server-config", env = "CORDON_SERVER_CONFIG", default_value = "server.yaml")]
    server_config: PathBuf,
}

impl Server {
    pub async fn run(self) -> Result<ExitCode> {
        let config = ServerConfig::load(&self.server_config)?;
        let store = tokio::task::block_in_place(|| config.open_store())?;
        cordon_server::serve(&config, store).await?;
        Ok(ExitCode::SUCCESS)
    }
}
