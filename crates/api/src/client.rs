//! [`RemoteStore`]: the state store of an agent or a command that talks to
//! a `cordon server` instead of opening the database.
//!
//! Like the PostgreSQL store, it drives its connections on a small
//! runtime of its own and each call waits there, so the synchronous
//! [`StateStore`] works from any caller. Servers are stateless replicas:
//! given several URLs it sticks to one and moves to the next when one
//! cannot be reached. A request that never reached a server is always
//! tried again elsewhere; one cut off mid-way is tried again only when
//! repeating it is harmless (reads, and writes whose second attempt
//! changes nothing, which is every fenced write but appending log lines).
//! Every call gives up after [`CALL_TIMEOUT`], naming the servers.
//!
//! The token is sent as a bearer token and never appears in a message.
//! Plain `http://` is accepted for loopback addresses only, so a token
//! never crosses a network unencrypted.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use reqwest::{Method, StatusCode, Url};
use serde::de::DeserializeOwned;

use cordon_store::*;

use crate::{ApiError, Call, ErrorBody, PREFIX, SNAPSHOTS, Token, code};

/// The server(s) to use instead of a database: comma-separated URLs.
pub const SERVER_ENV: &str = "CORDON_SERVER";
/// A token itself.
pub const TOKEN_ENV: &str = "CORDON_TOKEN";
/// A file holding the token.
pub const TOKEN_FILE_ENV: &str = "CORDON_TOKEN_FILE";
/// A PEM file of the certificate authorities to trust for the server
/// (instead of the system's).
pub const CA_FILE_ENV: &str = "CORDON_CA_FILE";
/// Where `cordon login` keeps tokens by server (default
/// `~/.config/cordon/credentials`).
pub const CREDENTIALS_ENV: &str = "CORDON_CREDENTIALS";

/// Longest one call may take, tries on every server included.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a server is and how to prove who the caller is.
#[derive(Debug, Clone)]
pub struct Server {
    pub urls: Vec<Url>,
    pub token: Token,
    pub ca_file: Option<PathBuf>,
}

/// The URLs in `text` (comma-separated), each checked: `https://`, or
/// `http://` to a loopback address.
pub fn parse_urls(text: &str, source: &str) -> Result<Vec<Url>> {
    let urls = text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            let url = Url::parse(s).map_err(|e| anyhow!("{source}: `{s}` is not a URL ({e}); write https://HOST:PORT"))?;
            let host = url.host_str().unwrap_or_default().trim_matches(['[', ']']);
            let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
            match url.scheme() {
                "https" => Ok(url),
                "http" if loopback => Ok(url),
                "http" => bail!("{source}: `{s}` is plain HTTP to a host that is not loopback; tokens only travel over https://"),
                other => bail!("{source}: `{s}` has scheme {other}; write https://HOST:PORT"),
            }
        })
        .collect::<Result<Vec<_>>>()?;
    anyhow::ensure!(!urls.is_empty(), "{source} names no server; write https://HOST:PORT");
    Ok(urls)
}

/// The credentials file: `$CORDON_CREDENTIALS`, or
/// `~/.config/cordon/credentials`.
pub fn credentials_path() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(CREDENTIALS_ENV).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    let config = std::env::var_os("XDG_CONFIG_HOME").map(PathBuf::from).or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".config")))?;
    Some(config.join("cordon").join("credentials"))
}

/// The tokens of the credentials file, by server URL (none if there is
/// no file). A file others may read is refused, naming the fix.
pub fn read_credentials(path: &Path) -> Result<std::collections::BTreeMap<String, String>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Default::default()),
        Err(e) => return Err(e).with_context(|| format!("cannot read the credentials file {}", path.display())),
    };
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)?.permissions().mode();
    if mode & 0o077 != 0 {
        bail!("the credentials file {} may be read by others (mode {:o}); run `chmod 600 {}`", path.display(), mode & 0o777, path.display());
    }
    serde_json::from_str(&text).with_context(|| format!("the credentials file {} is not a JSON object of server URL to token", path.display()))
}

/// The token in `file` (as `cordon token create` printed it).
pub fn read_token_file(file: &Path) -> Result<Token> {
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read the token file {}", file.display()))?;
    Token::parse(&text).with_context(|| format!("the token file {}", file.display()))
}

/// Where the credentials file keeps the token for the servers `urls`:
/// under the first, without a trailing slash.
pub fn credentials_key(urls: &[Url]) -> String {
    urls[0].as_str().trim_end_matches('/').to_string()
}

impl Server {
    /// The servers `urls`, called with `token`, trusting the certificate
    /// authorities of `$CORDON_CA_FILE` if it is set.
    pub fn new(urls: Vec<Url>, token: Token) -> Server {
        let ca_file = std::env::var_os(CA_FILE_ENV).filter(|s| !s.is_empty()).map(PathBuf::from);
        Server { urls, token, ca_file }
    }

    /// The server the environment names (`CORDON_SERVER`), with its token
    /// from `CORDON_TOKEN`, `CORDON_TOKEN_FILE` or the credentials file;
    /// `None` when no server is named.
    pub fn from_env() -> Result<Option<Server>> {
        let Some(text) = std::env::var(SERVER_ENV).ok().filter(|s| !s.is_empty()) else { return Ok(None) };
        let urls = parse_urls(&text, &format!("${SERVER_ENV}"))?;
        let token = if let Some(token) = std::env::var(TOKEN_ENV).ok().filter(|s| !s.is_empty()) {
            Token::parse(&token).with_context(|| format!("${TOKEN_ENV}"))?
        } else if let Some(file) = std::env::var_os(TOKEN_FILE_ENV).filter(|s| !s.is_empty()) {
            read_token_file(Path::new(&file))?
        } else {
            let path = credentials_path().context("no home directory for the credentials file; set CORDON_TOKEN_FILE")?;
            let credentials = read_credentials(&path)?;
            let key = credentials_key(&urls);
            let token = credentials.get(&key).with_context(|| {
                format!("no token for {key}: give --token-file (or ${TOKEN_ENV}), or run `cordon login --server {key} --token-file FILE`")
            })?;
            Token::parse(token).with_context(|| format!("the credentials file {} for {key}", path.display()))?
        };
        Ok(Some(Server::new(urls, token)))
    }
}

/// A [`StateStore`] served by `cordon server`.
pub struct RemoteStore {
    client: reqwest::Client,
    urls: Vec<Url>,
    /// The server calls go to first (the last one that answered).
    current: AtomicUsize,
    bearer: String,
    /// Runs every request; `None` only while dropping.
    runtime: Option<tokio::runtime::Runtime>,
    describe: String,
}

impl Drop for RemoteStore {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// How a request failed.
enum Failure {
    /// It never reached the server, or the server said its store did not
    /// answer: another server may do.
    Unreached(String),
    /// Cut off mid-way: it may or may not have happened.
    InFlight(String),
    /// The server answered with a refusal.
    Refused(ApiError),
}

impl RemoteStore {
    /// A store that calls `server`; nothing is sent until the first call.
    pub fn open(server: &Server) -> Result<RemoteStore> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(5)).timeout(CALL_TIMEOUT).no_proxy();
        if let Some(ca) = &server.ca_file {
            let pem = std::fs::read(ca).with_context(|| format!("cannot read the CA file {} (${CA_FILE_ENV})", ca.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("the CA file {} holds no PEM certificates", ca.display()))?;
            anyhow::ensure!(!certs.is_empty(), "the CA file {} holds no PEM certificates", ca.display());
            builder = builder.tls_certs_only(certs);
        }
        let client = builder.build().context("cannot set up the HTTP client")?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("cordon-client")
            .enable_all()
            .build()
            .context("cannot start the HTTP client's threads")?;
        let describe = format!("server {}", server.urls.iter().map(|u| u.as_str().trim_end_matches('/')).collect::<Vec<_>>().join(","));
        Ok(RemoteStore {
            client,
            urls: server.urls.clone(),
            current: AtomicUsize::new(0),
            bearer: format!("Bearer {}", server.token.reveal()),
            runtime: Some(runtime),
            describe,
        })
    }

    /// Calls `call` and reads its result.
    fn call<T: DeserializeOwned>(&self, call: Call) -> Result<T> {
        let repeatable = !matches!(call, Call::InsertDeployment { .. } | Call::AddCommand { .. } | Call::Claim { .. } | Call::TokenInsert { .. } | Call::AppendLogs { .. });
        // To report a refusal as fenced as the store would: as [`Fenced`].
        let fence = call.fence().cloned();
        let (name, args) = call.parts();
        let body = serde_json::to_vec(&args).expect("calls serialise");
        match self.send(Method::POST, &format!("{PREFIX}/{name}"), body, repeatable) {
            Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| format!("{}: unreadable answer to {name}", self.describe)),
            Err(e) => match (e.downcast_ref::<ApiError>(), fence) {
                (Some(api), Some(fence)) if api.code == code::FENCED => Err(Fenced(fence).into()),
                _ => Err(e),
            },
        }
    }

    /// Sends one request, moving to the next server while they cannot be
    /// reached (and, if `repeatable`, while requests are cut off), until
    /// [`CALL_TIMEOUT`]. The error of a refusal is an [`ApiError`].
    fn send(&self, method: Method, path: &str, body: Vec<u8>, repeatable: bool) -> Result<Vec<u8>> {
        let deadline = Instant::now() + CALL_TIMEOUT;
        let mut tries = 0;
        loop {
            let at = self.current.load(Ordering::Relaxed) % self.urls.len();
            let url = self.urls[at].join(path).expect("paths are relative to the server");
            match self.request(method.clone(), url, body.clone()) {
                Ok(bytes) => return Ok(bytes),
                Err(Failure::Refused(api)) => return Err(anyhow::Error::new(api).context(format!("{} refused the request", self.describe))),
                Err(Failure::InFlight(e)) if !repeatable => bail!("{}: the request was cut off ({e}); check whether it took effect", self.describe),
                Err(Failure::Unreached(e) | Failure::InFlight(e)) if Instant::now() >= deadline => {
                    bail!("{} did not answer within {}s ({e}); is it running and reachable?", self.describe, CALL_TIMEOUT.as_secs())
                }
                Err(Failure::Unreached(_) | Failure::InFlight(_)) => {}
            }
            tries += 1;
            let _ = self.current.compare_exchange(at, at + 1, Ordering::Relaxed, Ordering::Relaxed);
            if tries % self.urls.len() == 0 {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }

    fn request(&self, method: Method, url: Url, body: Vec<u8>) -> Result<Vec<u8>, Failure> {
        let (send, receive) = std::sync::mpsc::sync_channel(1);
        let request = self.client.request(method, url).header(reqwest::header::AUTHORIZATION, &self.bearer).body(body);
        self.runtime.as_ref().expect("the runtime lives as long as the store").spawn(async move {
            let out = async {
                let response = request.send().await.map_err(|e| {
                    let text = error_text(&e);
                    if e.is_connect() { Failure::Unreached(text) } else { Failure::InFlight(text) }
                })?;
                let status = response.status();
                let bytes = response.bytes().await.map_err(|e| Failure::InFlight(error_text(&e)))?;
                if status.is_success() {
                    return Ok(bytes.to_vec());
                }
                let api = serde_json::from_slice::<ErrorBody>(&bytes).map(|b| b.error).unwrap_or_else(|_| ApiError {
                    code: format!("http_{}", status.as_u16()),
                    message: format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes[..bytes.len().min(200)])),
                });
                match status {
                    StatusCode::SERVICE_UNAVAILABLE | StatusCode::BAD_GATEWAY => Err(Failure::Unreached(api.to_string())),
                    _ => Err(Failure::Refused(api)),
                }
            }
            .await;
            let _ = send.send(out);
        });
        receive.recv().unwrap_or_else(|_| Err(Failure::Unreached("the HTTP client stopped".into())))
    }
}

/// `e` with its causes (reqwest's own text says little).
fn error_text(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// A limit as the API takes it (`usize::MAX`, "all", is above what JSON
/// numbers the server accepts; it caps listings anyway).
fn wire(limit: usize) -> usize {
    limit.min(i64::MAX as usize)
}

fn s(text: &str) -> String {
    text.to_string()
}

impl StateStore for RemoteStore {
    fn describe(&self) -> String {
        self.describe.clone()
    }
    fn through_server(&self) -> bool {
        true
    }
    fn upsert_application(&self, name: &str, dir: &str) -> Result<()> {
        self.call(Call::UpsertApplication { name: s(name), dir: s(dir) })
    }
    fn application(&self, name: &str) -> Result<Option<ApplicationRecord>> {
        self.call(Call::Application { name: s(name) })
    }
    fn applications(&self) -> Result<Vec<ApplicationRecord>> {
        self.call(Call::Applications {})
    }
    fn insert_deployment(&self, deployment: &DeploymentRecord) -> Result<()> {
        self.call(Call::InsertDeployment { deployment: deployment.clone() })
    }
    fn deployment(&self, id: &str) -> Result<Option<DeploymentRecord>> {
        self.call(Call::Deployment { id: s(id) })
    }
    fn deployments(&self, application: Option<&str>, limit: usize) -> Result<Vec<DeploymentRecord>> {
        self.call(Call::Deployments { application: application.map(s), limit: wire(limit) })
    }
    fn unfinished_deployments(&self) -> Result<Vec<DeploymentRecord>> {
        self.call(Call::UnfinishedDeployments {})
    }
    fn save_plan(&self, fence: &Fence, plan: &str, running_snapshot: &str, stages: &[StageRecord], at: u64) -> Result<()> {
        self.call(Call::SavePlan { fence: fence.clone(), plan: s(plan), running_snapshot: s(running_snapshot), stages: stages.to_vec(), at })
    }
    fn set_deployment_status(&self, fence: &Fence, status: DeploymentStatus, reason: &str, at: u64) -> Result<()> {
        self.call(Call::SetDeploymentStatus { fence: fence.clone(), status, reason: s(reason), at })
    }
    fn complete_success(&self, fence: &Fence, reason: &str, at: u64) -> Result<()> {
        self.call(Call::CompleteSuccess { fence: fence.clone(), reason: s(reason), at })
    }
    fn replace_target_snapshot(&self, deployment: &str, from: &str, to: &str) -> Result<bool> {
        self.call(Call::ReplaceTargetSnapshot { deployment: s(deployment), from: s(from), to: s(to) })
    }
    fn delete_deployments(&self, application: &str, ids: &[String], grace: Duration) -> Result<Deleted> {
        self.call(Call::DeleteDeployments { application: s(application), ids: ids.to_vec(), grace_ms: grace.as_millis() as u64 })
    }
    fn snapshot_put(&self, reference: &str, archive: &[u8]) -> Result<()> {
        self.send(Method::PUT, &format!("{SNAPSHOTS}/{reference}"), archive.to_vec(), true)?;
        Ok(())
    }
    fn snapshot_get(&self, reference: &str) -> Result<Option<Vec<u8>>> {
        match self.send(Method::GET, &format!("{SNAPSHOTS}/{reference}"), Vec::new(), true) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.downcast_ref::<ApiError>().is_some_and(|a| a.code == code::NOT_FOUND) => Ok(None),
            Err(e) => Err(e),
        }
    }
    fn claimable(&self) -> Result<Vec<DeploymentRecord>> {
        self.call(Call::Claimable {})
    }
    fn claim(&self, deployment: &str, agent: &str, ttl: Duration) -> Result<Option<Fence>> {
        self.call(Call::Claim { deployment: s(deployment), agent: s(agent), ttl_ms: ms(ttl) })
    }
    fn renew(&self, agent: &str, fences: &[Fence], ttl: Duration) -> Result<Vec<Fence>> {
        self.call(Call::Renew { agent: s(agent), fences: fences.to_vec(), ttl_ms: ms(ttl) })
    }
    fn release(&self, fence: &Fence) -> Result<()> {
        self.call(Call::Release { fence: fence.clone() })
    }
    fn expire_leases(&self) -> Result<usize> {
        self.call(Call::ExpireLeases {})
    }
    fn refused_writes(&self, deployment: &str) -> Result<Vec<RefusedWrite>> {
        self.call(Call::RefusedWrites { deployment: s(deployment) })
    }
    fn lease(&self, deployment: &str) -> Result<Option<(Fence, Option<String>)>> {
        self.call(Call::Lease { deployment: s(deployment) })
    }
    fn stages(&self, deployment: &str) -> Result<Vec<StageRecord>> {
        self.call(Call::Stages { deployment: s(deployment) })
    }
    fn start_stage(&self, fence: &Fence, stage: &str, at: u64) -> Result<()> {
        self.call(Call::StartStage { fence: fence.clone(), stage: s(stage), at })
    }
    fn transition_stage(&self, fence: &Fence, stage: &str, from: &[StageStatus], to: StageStatus, message: &str, at: u64) -> Result<bool> {
        self.call(Call::TransitionStage { fence: fence.clone(), stage: s(stage), from: from.to_vec(), to, message: s(message), at })
    }
    fn reset_running_stages(&self, fence: &Fence) -> Result<usize> {
        self.call(Call::ResetRunningStages { fence: fence.clone() })
    }
    fn append_logs(&self, fence: &Fence, lines: &[LogRecord]) -> Result<()> {
        self.call(Call::AppendLogs { fence: fence.clone(), lines: lines.to_vec() })
    }
    fn logs(&self, deployment: &str, stage: Option<&str>, after_seq: i64, limit: usize) -> Result<Vec<LogRecord>> {
        self.call(Call::Logs { deployment: s(deployment), stage: stage.map(s), after_seq, limit: wire(limit), wait_ms: 0 })
    }
    fn metadata_get(&self, deployment: &str, stage: &str, key: &str) -> Result<Option<String>> {
        self.call(Call::MetadataGet { deployment: s(deployment), stage: s(stage), key: s(key) })
    }
    fn metadata_put(&self, fence: &Fence, stage: &str, key: &str, value: &str) -> Result<()> {
        self.call(Call::MetadataPut { fence: fence.clone(), stage: s(stage), key: s(key), value: s(value) })
    }
    fn metadata_put_within(&self, fence: &Fence, stage: &str, key: &str, value: &str, quota: Quota) -> Result<bool> {
        self.call(Call::MetadataPutWithin { fence: fence.clone(), stage: s(stage), key: s(key), value: s(value), quota })
    }
    fn metadata_entries(&self, deployment: &str, stage: &str) -> Result<Vec<(String, String)>> {
        self.call(Call::MetadataEntries { deployment: s(deployment), stage: s(stage) })
    }
    fn blob_get(&self, application: &str, plugin: &str, key: &str) -> Result<Option<Vec<u8>>> {
        let value: Option<String> = self.call(Call::BlobGet { application: s(application), plugin: s(plugin), key: s(key) })?;
        value.map(|v| STANDARD.decode(v).with_context(|| format!("{}: a blob that is not base64", self.describe))).transpose()
    }
    fn blob_put_within(&self, fence: &Fence, application: &str, plugin: &str, key: &str, value: &[u8], quota: Quota) -> Result<bool> {
        let value = STANDARD.encode(value);
        self.call(Call::BlobPutWithin { fence: fence.clone(), application: s(application), plugin: s(plugin), key: s(key), value, quota })
    }
    fn blob_delete(&self, fence: &Fence, application: &str, plugin: &str, key: &str) -> Result<()> {
        self.call(Call::BlobDelete { fence: fence.clone(), application: s(application), plugin: s(plugin), key: s(key) })
    }
    fn add_command(&self, command: &CommandRecord) -> Result<()> {
        self.call(Call::AddCommand { command: command.clone() })
    }
    fn commands(&self, deployment: &str, stage: Option<&str>) -> Result<Vec<CommandRecord>> {
        self.call(Call::Commands { deployment: s(deployment), stage: stage.map(s) })
    }
    fn answer_command(&self, fence: &Fence, stage: &str, id: &str, answer: &Answer) -> Result<()> {
        self.call(Call::AnswerCommand { fence: fence.clone(), stage: s(stage), id: s(id), answer: answer.clone() })
    }
    fn heartbeat(&self, beat: &AgentBeat) -> Result<()> {
        self.call(Call::Heartbeat { beat: beat.clone() })
    }
    fn agents(&self) -> Result<Vec<AgentBeat>> {
        self.call(Call::Agents {})
    }
    fn token_insert(&self, token: &TokenRecord) -> Result<()> {
        self.call(Call::TokenInsert { token: token.clone() })
    }
    fn token(&self, id: &str) -> Result<Option<TokenRecord>> {
        Ok(self.tokens()?.into_iter().find(|t| t.id == id))
    }
    fn tokens(&self) -> Result<Vec<TokenRecord>> {
        self.call(Call::Tokens {})
    }
    fn token_revoke(&self, id: &str, _at: u64) -> Result<bool> {
        self.call(Call::TokenRevoke { id: s(id) })
    }
    fn audit_append(&self, _entry: &AuditRecord) -> Result<()> {
        bail!("{}: the audit log is written by the server alone", self.describe)
    }
    fn audit(&self, after_seq: i64, limit: usize) -> Result<Vec<AuditRecord>> {
        self.call(Call::Audit { after_seq, limit: wire(limit) })
    }
}
