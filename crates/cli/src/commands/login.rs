//! `cordon login`: keeps a token for a server in the credentials file
//! (`~/.config/cordon/credentials`, mode 0600), so later commands need
//! only `--server`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};

use cordon_api::{RemoteStore, Server, client};
use cordon_store::StateStore;

/// Keep a token for a server (checked with the server first).
#[derive(clap::Args)]
pub struct Login {
    /// The file holding the token (as `cordon token create` printed it).
    #[arg(long = "token-file")]
    token_file: PathBuf,
}

impl Login {
    pub fn run(self, server: Option<&str>) -> Result<ExitCode> {
        let server = server.context("give --server https://HOST:PORT (the server to log in to)")?;
        let urls = client::parse_urls(server, "--server")?;
        let token = client::read_token_file(&self.token_file)?;
        let key = client::credentials_key(&urls);
        let store = RemoteStore::open(&Server::new(urls, token.clone()))?;
        store.agents().with_context(|| format!("{} did not accept the token {}", store.describe(), token.id))?;
        let path = client::credentials_path().context("no home directory for the credentials file; set CORDON_CREDENTIALS")?;
        let mut credentials = client::read_credentials(&path)?;
        credentials.insert(key.clone(), token.reveal());
        let dir = path.parent().context("the credentials file has no directory")?;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        // A new file is made 0600; an existing one keeps its mode, which
        // reading it just checked lets no one else read it.
        cordon_runtime::files::write_atomic(&path, serde_json::to_string_pretty(&credentials)?.as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("logged in to {key} with token {} (kept in {})", token.id, path.display());
        Ok(ExitCode::SUCCESS)
    }
}
