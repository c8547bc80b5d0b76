//! The server config (`server.yaml`): where to listen, the certificate,
//! and the state it serves — the same `state-dir` / `state.postgres`
//! settings an agent config has.
//!
//! ```yaml
//! listen: 0.0.0.0:8443
//! tls: { cert: server.crt, key: server.key }
//! state:
//!   postgres: { url: postgres://cordon@db:5432/cordon, password-file: db.password }
//! max-body: 16MiB
//! retention: { keep-deployments: 50 }
//! ```
//!
//! With `retention`, the server deletes each application's finished
//! deployments beyond the newest `keep-deployments` (with their logs and
//! stored snapshots) when it starts and every ten minutes; see
//! `cordon_store::retention`. Agents using the server leave it to it.
//!
//! TLS is required unless `plain-http: true`, which is accepted only for a
//! loopback `listen` address (a local reverse proxy, or tests): tokens
//! never cross a network in the clear.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use bytesize::ByteSize;
use serde::Deserialize;

use cordon_store::postgres::Configured;
use cordon_store::{PostgresStore, SqliteStore, StateStore, database_path};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Raw {
    listen: SocketAddr,
    #[serde(default)]
    tls: Option<Tls>,
    #[serde(default)]
    plain_http: bool,
    #[serde(default)]
    state_dir: Option<PathBuf>,
    #[serde(default)]
    state: RawState,
    #[serde(default = "default_max_body")]
    max_body: ByteSize,
    #[serde(default)]
    retention: RawRetention,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawRetention {
    keep_deployments: Option<NonZeroUsize>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawState {
    #[serde(default)]
    postgres: Option<RawPostgres>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawPostgres {
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    password_file: Option<PathBuf>,
}

/// The certificate chain and private key, PEM files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn default_max_body() -> ByteSize {
    ByteSize::mib(16)
}

/// A checked server config; relative paths are resolved against the
/// config file's directory.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub source: PathBuf,
    pub listen: SocketAddr,
    /// `None`: plain HTTP (loopback only).
    pub tls: Option<Tls>,
    /// Largest JSON request body; snapshot uploads may be up to
    /// [`cordon_store::MAX_SNAPSHOT`].
    pub max_body: usize,
    /// Finished deployments kept per application (`None`: all).
    pub retention: Option<NonZeroUsize>,
    state_dir: Option<PathBuf>,
    postgres: Option<RawPostgres>,
}

impl ServerConfig {
    pub fn load(path: &Path) -> Result<ServerConfig> {
        let file = path.display();
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read the server config {file}"))?;
        let raw: Raw = serde_yaml_ng::from_str(&text).with_context(|| format!("{file}: not a valid server config"))?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let resolve = |p: &Path| if p.is_absolute() { p.to_path_buf() } else { base.join(p) };
        let tls = match (raw.tls, raw.plain_http) {
            (Some(_), true) => bail!("{file}: give either tls or plain-http: true, not both"),
            (Some(tls), false) => Some(Tls { cert: resolve(&tls.cert), key: resolve(&tls.key) }),
            (None, true) if raw.listen.ip().is_loopback() => None,
            (None, true) => bail!(
                "{file}: plain-http is allowed only on a loopback listen address (got {}); give tls: {{ cert, key }} to listen on a network",
                raw.listen
            ),
            (None, false) => bail!("{file}: give tls: {{ cert: FILE, key: FILE }} (or plain-http: true with a loopback listen address)"),
        };
        if raw.state_dir.is_none() && raw.state.postgres.is_none() && std::env::var(cordon_store::DATABASE_URL_ENV).is_err() {
            bail!("{file}: name the state the server serves: state-dir: DIR (SQLite, one node) or state: {{ postgres: {{ url }} }}");
        }
        let postgres = raw.state.postgres.map(|p| RawPostgres { url: p.url, password_file: p.password_file.as_deref().map(resolve) });
        let max_body = usize::try_from(raw.max_body.as_u64()).unwrap_or(usize::MAX);
        if max_body < 64 << 10 {
            bail!("{file}: max-body is {}; give at least 64KiB (default 16MiB)", raw.max_body);
        }
        Ok(ServerConfig {
            source: path.to_path_buf(),
            listen: raw.listen,
            tls,
            max_body,
            retention: raw.retention.keep_deployments,
            state_dir: raw.state_dir.as_deref().map(resolve),
            postgres,
        })
    }

    /// Opens the state this server serves (creating an embedded database
    /// if need be): the PostgreSQL database, else SQLite in `state-dir`.
    pub fn open_store(&self) -> Result<Arc<dyn StateStore>> {
        let file = self.source.display().to_string();
        let configured = self.postgres.as_ref().map(|p| Configured { file: &file, url: p.url.as_deref(), password_file: p.password_file.as_deref() });
        if let Some(store) = PostgresStore::open_configured(configured)? {
            return Ok(Arc::new(store));
        }
        let dir = self.state_dir.as_ref().with_context(|| format!("{file}: give state-dir or state.postgres"))?;
        std::fs::create_dir_all(dir).with_context(|| format!("{file}: cannot create state-dir {}", dir.display()))?;
        Ok(Arc::new(SqliteStore::open(&database_path(dir))?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<ServerConfig> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.yaml");
        std::fs::write(&path, text).unwrap();
        ServerConfig::load(&path)
    }

    #[test]
    fn plain_http_only_on_loopback_and_only_when_asked() {
        let ok = load("listen: 127.0.0.1:0\nplain-http: true\nstate-dir: s\n").unwrap();
        assert!(ok.tls.is_none() && ok.state_dir.unwrap().ends_with("s"));
        let err = format!("{:#}", load("listen: 0.0.0.0:8443\nplain-http: true\nstate-dir: s\n").unwrap_err());
        assert!(err.contains("server.yaml") && err.contains("loopback") && err.contains("tls"), "{err}");
        let err = format!("{:#}", load("listen: 127.0.0.1:0\nstate-dir: s\n").unwrap_err());
        assert!(err.contains("give tls"), "{err}");
        let err = format!("{:#}", load("listen: 127.0.0.1:0\nplain-http: true\n").unwrap_err());
        assert!(err.contains("state-dir"), "{err}");
        let err = format!("{:#}", load("listen: 127.0.0.1:0\nplain-http: true\nstate-dir: s\nmax-body: 1KiB\n").unwrap_err());
        assert!(err.contains("max-body"), "{err}");
        let err = format!("{:#}", load("listen: 127.0.0.1:0\nplaintext: true\n").unwrap_err());
        assert!(err.contains("plaintext"), "{err}");
    }
}
