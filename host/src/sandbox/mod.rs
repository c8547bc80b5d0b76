//! The cordon around one plugin call: a *grant* (what the operator allowed)
//! becomes a fresh [`Store`] whose WASI context holds exactly that and
//! nothing more.
//!
//! Each capability lives in its own module with the same three parts — the
//! grant parsed from config, the per-run state built from it, and its wiring
//! into the store or linker: [`fs`] (preopens), [`net`] (socket and HTTP
//! allow-lists), [`env`] (environment and secrets), [`limits`] (memory,
//! time, output sizes), [`output`] (the stage log, guest stdout and stderr)
//! and [`services`] (the contract's host imports).
//!
//! Deny by default: a [`WasiCtxBuilder`] starts with no args, env, stdin,
//! sockets, name lookup or directories, and nothing here inherits from the
//! agent process unless a grant names it.

pub mod env;
pub mod fs;
pub mod limits;
pub mod net;
pub mod output;
pub mod services;
pub mod stores;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use serde::Deserialize;
use wasmtime::component::{HasSelf, Linker, ResourceTable};
use wasmtime::{Engine, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

use crate::contract::bindings::cordon::plugin as host_api;
use env::SecretSource;
pub use fs::{Mount, RunDirs};
pub use limits::{Limits, Violation};
use net::{HttpRoute, NetPolicy, NetworkGrant};
pub use output::{LogSink, StageLog};
pub use services::{MemoryServices, StageServices};

/// Everything the operator granted one plugin (`grants:` in the agent config).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Grants {
    #[serde(default)]
    pub mounts: Vec<Mount>,
    #[serde(default)]
    pub network: NetworkGrant,
    /// Environment variables with their values.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Environment variables passed through from the agent, when set there.
    #[serde(default)]
    pub inherit_env: Vec<String>,
    /// Secrets by the name the plugin asks for.
    #[serde(default)]
    pub secrets: BTreeMap<String, SecretSource>,
}

impl Grants {
    /// Validates the grants and resolves relative paths against `base`.
    pub fn validate(&mut self, base: &Path) -> Result<(), String> {
        fs::validate(&mut self.mounts, base)?;
        env::validate(&self.env, &self.inherit_env, &mut self.secrets, base)
    }
}

/// Engine epoch ticks per second: how often guest code yields to the
/// executor, and so the resolution of timeouts, skip and cancel.
pub const TICKS_PER_SECOND: u64 = 100;

/// The data of a run's [`Store`].
pub struct RunState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    hooks: HttpHooks,
    table: ResourceTable,
    limiter: limits::Limiter,
    log: StageLog,
    services: Arc<dyn StageServices>,
    secrets: BTreeMap<String, Result<String, String>>,
    stores: Option<Arc<dyn stores::MigrationStores>>,
}

impl RunState {
    pub fn log(&self) -> &StageLog {
        &self.log
    }

    /// Gives this run (a migration phase step) its scoped store handles.
    pub fn grant_stores(&mut self, stores: Arc<dyn stores::MigrationStores>) -> Result<stores::Handles> {
        let handles = stores::Handles {
            source: self.table.push(stores::SourceHandle)?,
            destination: self.table.push(stores::DestinationHandle)?,
        };
        self.stores = Some(stores);
        Ok(handles)
    }
}

impl WasiView for RunState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl WasiHttpView for RunState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView { ctx: &mut self.http, table: &mut self.table, hooks: &mut self.hooks }
    }
}

/// The outgoing-HTTP hook: every request (and so every redirect hop) is
/// checked against the network grant before anything is sent.
struct HttpHooks {
    policy: NetPolicy,
}

type HttpResponse = http::Response<wasmtime_wasi_http::WasiBody>;
type IoFuture = Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>;

impl WasiHttpHooks for HttpHooks {
    fn send_request(
        &mut self,
        mut request: http::Request<wasmtime_wasi_http::WasiBody>,
        options: Option<wasmtime_wasi_http::RequestOptions>,
        _fut: IoFuture,
    ) -> Box<dyn Future<Output = wasmtime_wasi_http::Result<(HttpResponse, IoFuture)>> + Send> {
        let policy = self.policy.clone();
        Box::new(async move {
            use http_body_util::BodyExt;
            let uri = request.uri();
            let scheme = match uri.scheme_str() {
                Some("https") => net::Scheme::Https,
                _ => net::Scheme::Http,
            };
            let host = uri.host().unwrap_or_default().to_string();
            let port = uri.port_u16().unwrap_or(if scheme == net::Scheme::Https { 443 } else { 80 });
            let route = policy
                .authorize_http(scheme, &host, port)
                .await
                .map_err(|_| wasmtime_wasi_http::Error::HttpRequestDenied)?;
            if let HttpRoute::Pinned(addr) = route {
                // Connect to the address that was checked; the Host header
                // still carries the name the guest asked for.
                let mut parts = request.uri().clone().into_parts();
                parts.authority = Some(addr.to_string().parse().map_err(|_| wasmtime_wasi_http::Error::HttpRequestUriInvalid)?);
                *request.uri_mut() = http::Uri::from_parts(parts).map_err(|_| wasmtime_wasi_http::Error::HttpRequestUriInvalid)?;
            }
            let (response, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            Ok((response.map(BodyExt::boxed_unsync), Box::new(io) as IoFuture))
        })
    }
}

/// Adds every import a plugin may use to `linker`: WASI p2, `wasi:http`
/// and the contract's host services. What a call may actually do is decided
/// per run by its store, not here.
pub fn add_to_linker(linker: &mut Linker<RunState>) -> Result<()> {
    wasmtime_wasi::p2::add_to_linker_async(linker)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(linker)?;
    host_api::log::add_to_linker::<_, HasSelf<RunState>>(linker, |s| s)?;
    host_api::metadata::add_to_linker::<_, HasSelf<RunState>>(linker, |s| s)?;
    host_api::commands::add_to_linker::<_, HasSelf<RunState>>(linker, |s| s)?;
    host_api::blobs::add_to_linker::<_, HasSelf<RunState>>(linker, |s| s)?;
    host_api::secrets::add_to_linker::<_, HasSelf<RunState>>(linker, |s| s)?;
    crate::contract::bindings::migration_phase::cordon::plugin::store::add_to_linker::<_, HasSelf<RunState>>(linker, |s| s)?;
    Ok(())
}

/// A plugin's validated grants and limits, shared by all its runs.
#[derive(Debug, Clone)]
pub struct Sandbox {
    grants: Arc<Grants>,
    network: Arc<NetworkGrant>,
    limits: Limits,
}

/// What one run needs besides the plugin's grants.
pub struct RunContext {
    pub dirs: RunDirs,
    pub services: Arc<dyn StageServices>,
    pub sink: Arc<dyn LogSink>,
    /// Wall-clock limit of this call; the plugin's own limit caps it. The
    /// caller enforces it (see `runner`); guest code yields at every epoch
    /// tick so that it can.
    pub timeout: Option<Duration>,
}

impl Sandbox {
    pub fn new(grants: Grants, limits: Limits) -> Self {
        let network = Arc::new(grants.network.clone());
        Self { grants: Arc::new(grants), network, limits }
    }

    pub fn grants(&self) -> &Grants {
        &self.grants
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The wall-clock limit of a call that asks for `requested`.
    pub fn timeout(&self, requested: Option<Duration>) -> Duration {
        requested.map_or(self.limits.timeout, |t| t.min(self.limits.timeout))
    }

    /// Builds a fresh store for one call.
    pub fn store(&self, engine: &Engine, run: RunContext) -> Result<Store<RunState>> {
        let secrets: BTreeMap<String, Result<String, String>> =
            self.grants.secrets.iter().map(|(name, source)| (name.clone(), source.read())).collect();
        let masked = secrets.values().filter_map(|v| v.as_ref().ok().cloned()).collect();
        let log = StageLog::new(self.limits.log_bytes.as_u64(), masked, run.sink);

        let mut wasi = WasiCtxBuilder::new();
        wasi.stdout(log.stream(output::Source::Stdout)).stderr(log.stream(output::Source::Stderr));
        let env = env::resolve_env(&self.grants.env, &self.grants.inherit_env);
        if !env.is_empty() {
            wasi.envs(&env);
        }
        fs::preopen(&mut wasi, &run.dirs, &self.grants.mounts)?;
        let policy = NetPolicy::new(self.network.clone(), log.clone());
        wasi.allow_tcp(self.network.allows_tcp())
            .allow_udp(false)
            .allow_ip_name_lookup(self.network.name_lookup);
        {
            let policy = policy.clone();
            wasi.socket_addr_check(move |addr, usage| {
                let policy = policy.clone();
                Box::pin(async move { policy.check_socket(addr, usage).await })
            });
        }

        let state = RunState {
            wasi: wasi.build(),
            http: WasiHttpCtx::new(),
            hooks: HttpHooks { policy },
            table: ResourceTable::new(),
            limiter: limits::Limiter::new(&self.limits),
            log,
            services: run.services,
            secrets,
            stores: None,
        };
        let mut store = Store::new(engine, state);
        store.limiter(|s| &mut s.limiter);
        // Guest code yields to the executor at every epoch tick, so a
        // CPU-bound plugin neither holds a worker thread nor outlives its
        // timeout, skip or cancel: the caller's tokio timeout (or abort)
        // drops the call at the next tick.
        store.set_epoch_deadline(1);
        store.epoch_deadline_async_yield_and_update(1);
        Ok(store)
    }
}
