//! `cordon server`: the authenticated HTTP API between people, agents and
//! the state database.
//!
//! Without it, anyone who can open the database can do anything as
//! anyone. With it, agents and people hold tokens ([`cordon_api::Token`])
//! instead of database credentials; the server checks each request
//! against its token's role and applications, enforces that an agent
//! writes only deployments whose lease it holds (the store still checks
//! the lease's epoch on every write), records who approved, skipped or
//! cancelled, and keeps an append-only audit log. Each method is one of
//! the state store's ([`cordon_api::Call`]).
//!
//! The server keeps no state of its own: tokens, the audit log and
//! everything else live in the store, so any number of replicas can serve
//! one PostgreSQL database behind one address (or be named together in
//! `CORDON_SERVER`, which clients fail over between).
//!
//! Layout: [`config`] (the server config), [`auth`] (tokens → callers),
//! [`api`] (one request: authorization, checks, the store call, audit),
//! [`openapi`] (the document), and here the routes and the listener
//! (rustls; every connection gets 10 s to finish its handshake and its
//! request headers, so a client that hangs holds nothing for long).

pub mod api;
pub mod auth;
pub mod config;
pub mod openapi;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::Value;
use tokio::net::TcpListener;

use cordon_api::{ApiError, ErrorBody, code};
use cordon_store::{StateStore, is_fenced};

pub use config::ServerConfig;

/// How long a connection may take for its TLS handshake and for each
/// request's headers.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A refused request: its HTTP status and the JSON error it answers with.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub status: u16,
    pub code: String,
    pub message: String,
}

impl Refusal {
    pub fn new(status: u16, code: &str, message: &str) -> Refusal {
        Refusal { status, code: code.to_string(), message: message.to_string() }
    }

    pub fn bad(message: &str) -> Refusal {
        Refusal::new(400, code::BAD_REQUEST, message)
    }

    pub fn forbidden(message: &str) -> Refusal {
        Refusal::new(403, code::FORBIDDEN, message)
    }

    /// The store failed: a write under a lease another agent has taken
    /// over (409), or the store itself (500, its message).
    pub fn store(e: anyhow::Error) -> Refusal {
        if is_fenced(&e) {
            Refusal::new(409, code::FENCED, &e.to_string())
        } else {
            tracing::error!("state store: {e:#}");
            Refusal::new(500, code::INTERNAL, &format!("the state store failed: {e:#}"))
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, axum::Json(ErrorBody { error: ApiError { code: self.code, message: self.message } })).into_response()
    }
}

/// What every request handler shares.
struct Shared {
    store: Arc<dyn StateStore>,
    max_body: usize,
    openapi: Value,
}

/// The server's routes over `store`.
pub fn router(store: Arc<dyn StateStore>, max_body: usize) -> Router {
    let shared = Arc::new(Shared { store, max_body, openapi: openapi::document() });
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route(cordon_api::OPENAPI, get(|State(s): State<Arc<Shared>>| async move { axum::Json(s.openapi.clone()) }))
        .route(&format!("{}/{{reference}}", cordon_api::SNAPSHOTS), get(snapshot_get).put(snapshot_put))
        .route(&format!("{}/{{method}}", cordon_api::PREFIX), post(call))
        .fallback(|| async { Refusal::new(404, code::NOT_FOUND, &format!("no such endpoint; the API is described at {}", cordon_api::OPENAPI)) })
        .method_not_allowed_fallback(|| async {
            Refusal::new(405, "method_not_allowed", "wrong HTTP method: every API method is POST (snapshots: GET or PUT)")
        })
        .with_state(shared)
}

/// Ready when the state store answers.
async fn ready(State(s): State<Arc<Shared>>) -> Response {
    let store = s.store.clone();
    match tokio::task::spawn_blocking(move || store.agents().map(|_| ())).await {
        Ok(Ok(())) => "ready\n".into_response(),
        Ok(Err(e)) => Refusal::new(503, code::UNAVAILABLE, &format!("the state store does not answer: {e:#}")).into_response(),
        Err(_) => Refusal::new(503, code::UNAVAILABLE, "the readiness check stopped").into_response(),
    }
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    headers.get(header::AUTHORIZATION).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// The body, at most `limit` bytes.
async fn body(body: Body, limit: usize) -> Result<axum::body::Bytes, Refusal> {
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| Refusal::new(413, code::TOO_LARGE, &format!("the body is larger than this server accepts ({limit} bytes)")))
}

/// Runs `work` (store calls block) off the async threads.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> Result<T, Refusal> + Send + 'static) -> Result<T, Refusal> {
    tokio::task::spawn_blocking(work).await.unwrap_or_else(|_| Err(Refusal::new(500, code::INTERNAL, "the request's handler stopped")))
}

async fn call(
    State(s): State<Arc<Shared>>,
    Path(method): Path<String>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    raw: Body,
) -> Response {
    let auth = bearer(&headers);
    let store = s.store.clone();
    let bytes = match body(raw, s.max_body).await {
        Ok(bytes) => bytes,
        Err(refusal) => {
            let known = cordon_api::method(&method).is_some();
            return blocking(move || {
                if known {
                    api::audit(store.as_ref(), "-", &method, "-", &peer.to_string(), Some(&refusal));
                }
                Err::<(), _>(refusal)
            })
            .await
            .unwrap_err()
            .into_response();
        }
    };
    match blocking(move || api::handle(store.as_ref(), &method, auth.as_deref(), &bytes, &peer.to_string())).await {
        Ok(value) => axum::Json(value).into_response(),
        Err(refusal) => refusal.into_response(),
    }
}

async fn snapshot_get(State(s): State<Arc<Shared>>, Path(reference): Path<String>, ConnectInfo(peer): ConnectInfo<SocketAddr>, headers: HeaderMap) -> Response {
    let (auth, store) = (bearer(&headers), s.store.clone());
    let out = blocking(move || {
        let mut subject = "-".to_string();
        let outcome = (|| {
            let caller = auth::authenticate(store.as_ref(), auth.as_deref())?;
            subject = caller.subject.clone();
            api::check_reference("reference", &reference)?;
            let gate = api::Gate { store: store.as_ref(), caller: &caller };
            if !gate.may_read_snapshot(&reference)? {
                return Err(Refusal::new(404, code::NOT_FOUND, &format!("no snapshot {reference} that this token reaches")));
            }
            store.snapshot_get(&reference).map_err(Refusal::store)?.ok_or_else(|| Refusal::new(404, code::NOT_FOUND, &format!("no snapshot {reference}")))
        })();
        if let Err(refusal) = &outcome
            && refusal.status != 404
        {
            api::audit(store.as_ref(), &subject, "snapshot_get", &format!("snapshot {reference}"), &peer.to_string(), Some(refusal));
        }
        outcome
    })
    .await;
    match out {
        Ok(bytes) => ([(header::CONTENT_TYPE, "application/x-tar")], bytes).into_response(),
        Err(refusal) => refusal.into_response(),
    }
}

async fn snapshot_put(
    State(s): State<Arc<Shared>>,
    Path(reference): Path<String>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    raw: Body,
) -> Response {
    let (auth, store) = (bearer(&headers), s.store.clone());
    let bytes = body(raw, cordon_store::MAX_SNAPSHOT).await;
    let out = blocking(move || {
        let mut subject = "-".to_string();
        let outcome = (|| {
            let caller = auth::authenticate(store.as_ref(), auth.as_deref())?;
            subject = caller.subject.clone();
            if !caller.role.includes(cordon_api::Role::Deployer) {
                return Err(Refusal::forbidden(&format!("{} has role {}; storing a snapshot needs deployer or above", caller.subject, caller.role)));
            }
            api::check_reference("reference", &reference)?;
            let bytes = bytes?;
            let digest = cordon_store::snapshot_reference(&bytes);
            if digest != reference {
                return Err(Refusal::bad(&format!("the archive's digest is {digest}, not {reference}; send the archive under its own digest")));
            }
            store.snapshot_put(&reference, &bytes).map_err(Refusal::store)
        })();
        api::audit(store.as_ref(), &subject, "snapshot_put", &format!("snapshot {reference}"), &peer.to_string(), outcome.as_ref().err());
        outcome
    })
    .await;
    match out {
        Ok(()) => axum::Json(Value::Null).into_response(),
        Err(refusal) => refusal.into_response(),
    }
}

/// Serves `config`'s API on its listen address until SIGTERM or SIGINT.
pub async fn serve(config: &ServerConfig, store: Arc<dyn StateStore>) -> Result<()> {
    let listener = TcpListener::bind(config.listen).await.with_context(|| format!("cannot listen on {}", config.listen))?;
    let tls = config.tls.as_ref().map(tls_acceptor).transpose()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    eprintln!("cordon server: listening on {scheme}://{} for {}", listener.local_addr()?, store.describe());
    if let Some(keep) = config.retention {
        tokio::spawn(retention(store.clone(), keep));
    }
    let app = router(store, config.max_body);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    continue;
                }
            },
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        };
        let (app, tls) = (app.clone(), tls.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(ConnectInfo(peer));
                tower::ServiceExt::oneshot(app.clone(), request)
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            builder.http1().timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(HANDSHAKE_TIMEOUT);
            let served = match tls {
                Some(acceptor) => match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service).await,
                    _ => return,
                },
                None => builder.serve_connection(hyper_util::rt::TokioIo::new(tcp), service).await,
            };
            if let Err(e) = served {
                tracing::debug!("connection from {peer}: {e}");
            }
        });
    }
    eprintln!("cordon server: stopped accepting; requests under way finish");
    Ok(())
}

/// How often the server applies its retention.
const RETENTION_EVERY: Duration = Duration::from_secs(600);

/// Applies retention `keep` to every application now and every
/// [`RETENTION_EVERY`]; what it deletes is in the audit log (subject
/// `server`). Agents reach the server's state only through it, so there
/// are no snapshot directories to remove here, only records and stored
/// snapshots.
async fn retention(store: Arc<dyn StateStore>, keep: std::num::NonZeroUsize) {
    let mut every = tokio::time::interval(RETENTION_EVERY);
    loop {
        every.tick().await;
        let store = store.clone();
        let pass = tokio::task::spawn_blocking(move || -> Result<()> {
            for app in store.applications()? {
                let deleted = cordon_store::retention::prune(store.as_ref(), &app.name, keep, |_| Ok(()))?;
                if !deleted.deployments.is_empty() || !deleted.snapshots.is_empty() {
                    let target = format!("application {}: {} and {} stored snapshot(s)", app.name, deleted.deployments.join(", "), deleted.snapshots.len());
                    api::audit(store.as_ref(), "server", "delete_deployments", &target, "retention", None);
                }
            }
            Ok(())
        });
        match pass.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("retention: {e:#}"),
            Err(e) => tracing::warn!("retention: {e}"),
        }
    }
}

/// The TLS acceptor of the certificate chain and key in `tls`'s files.
fn tls_acceptor(tls: &config::Tls) -> Result<tokio_rustls::TlsAcceptor> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(&tls.cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("tls.cert {}: not a readable PEM certificate chain", tls.cert.display()))?;
    anyhow::ensure!(!certs.is_empty(), "tls.cert {} holds no certificate", tls.cert.display());
    let key = PrivateKeyDer::from_pem_file(&tls.key).with_context(|| format!("tls.key {}: not a readable PEM private key", tls.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .with_context(|| format!("tls.cert {} and tls.key {} do not make a usable certificate", tls.cert.display(), tls.key.display()))?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(server)))
}
