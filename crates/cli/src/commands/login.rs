//! `cordon login`: keeps a token for a server in the credentials file
//! (`~/.config/cordon/credentials`, mode 0600), so later commands need
//! only `--server`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};

use cordon_api::{RemoteStore, Server, Token};
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
        let urls = cordon_api::client::parse_urls(server, "--server")?;
        let text = std::fs::read_to_string(&self.token_file).with_context(|| format!("cannot read the token file {}", self.token_file.display()))?;
        let token = Token::parse(&text).with_context(|| format!("the token file {}", self.token_file.display()))?;
        let ca_file = std::env::var_os(cordon_api::CA_FILE_ENV).filter(|s| !s.is_empty()).map(PathBuf::from);
        let store = RemoteStore::open(&Server { urls: urls.clone(), token: token.clone(), ca_file })?;
        store.agents().with_context(|| format!("{} did not accept the token {}", store.describe(), token.id))?;
        let path = cordon_api::client::credentials_path().context("no home directory for the credentials file; set CORDON_CREDENTIALS")?;
        let mut credentials = cordon_api::client::read_credentials(&path)?;
        let key = urls[0].as_str().trim_end_matches('/').to_string();
        credentials.insert(key.clone(), token.reveal());
        let dir = path.parent().context("the credentials file has no directory")?;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let staging = dir.join(".credentials.new");
        let _ = std::fs::remove_file(&staging);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&staging)
            .with_context(|| format!("cannot write {}", staging.display()))?;
        file.write_all(serde_json::to_string_pretty(&credentials)?.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&staging, &path).with_context(|| format!("cannot write {}", path.display()))?;
        println!("logged in to {key} with token {} (kept in {})", token.id, path.display());
        Ok(ExitCode::SUCCESS)
    }
}
