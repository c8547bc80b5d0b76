//! The cordon around one plugin call: a *grant* (what the operator allowed)
//! becomes a fresh [`Store`] whose WASI context holds exactly that and
//! nothing more.
//!
//! Each capability lives in its own module with the same three parts — the
//! grant parsed from config, the per-run state built from it, and its wiring
//! into the WASI context or the linker: [`fs`] (preopens), [`disk`] (disk
//! budgets of the writable ones), [`net`] (socket and HTTP allow-lists),
//! [`env`] (environment), [`secrets`] (named secrets), [`limits`] (memory,
//! time, output sizes, state quotas), [`output`] (the stage
//! log, guest stdout and stderr), [`services`] (metadata, commands, blobs)
//! and [`stores`] (a migration phase's store handles). [`RunState`] holds
//! one field per capability; adding a capability means adding its module,
//! its field and its line in [`add_to_linker`].
//!
//! Deny by default: a [`WasiCtxBuilder`] starts with no args, env, stdin,
//! sockets, name lookup or directories, and nothing here inherits from the
//! agent process unless a grant names it.

pub mod disk;
pub mod env;
pub mod fs;
pub mod limits;
pub mod net;
pub mod output;
pub mod secrets;
pub mod services;
pub mod stores;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use serde::Deserialize;
use wasmtime::component::{Linker, ResourceTable};
use wasmtime::{Engine, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::admission::Slots;
use disk::DiskBudgets;
pub use fs::{Mount, RunDirs};
pub use limits::{Limits, Violation};
use net::{HttpHooks, NetPolicy, NetworkGrant};
pub use output::{LogSink, NullSink, StageLog};
use secrets::{SecretSource, Secrets};
pub use services::{MemoryServices, StageServices};
use services::Services;
use stores::Stores;

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
        env::validate(&self.env, &self.inherit_env)?;
        secrets::validate(&mut self.secrets, base)
    }
}

/// Engine epoch ticks per second: how often guest code yields to the
/// executor, and so the resolution of timeouts, skip and cancel.
pub const TICKS_PER_SECOND: u64 = 100;

/// The data of a run's [`Store`]: one part per capability.
pub struct RunState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    hooks: HttpHooks,
    table: ResourceTable,
    limiter: limits::Limiter,
    log: StageLog,
    services: Services,
    secrets: Secrets,
    stores: Stores,
}

impl RunState {
    pub fn log(&self) -> &StageLog {
        &self.log
    }

    /// Gives this run (a migration phase step) its scoped store handles.
    pub fn grant_stores(&mut self, stores: Arc<dyn stores::MigrationStores>) -> stores::Handles {
        self.stores.grant(stores)
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

/// Adds every import a plugin may use to `linker`: WASI p2, `wasi:http`
/// and the contract's host services. What a call may actually do is decided
/// per run by its store, not here.
pub fn add_to_linker(linker: &mut Linker<RunState>) -> Result<()> {
    wasmtime_wasi::p2::add_to_linker_async(linker)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(linker)?;
    output::add_to_linker(linker)?;
    services::add_to_linker(linker)?;
    secrets::add_to_linker(linker)?;
    stores::add_to_linker(linker)?;
    Ok(())
}

/// A plugin's validated grants and limits, shared by all its runs.
#[derive(Debug, Clone)]
pub struct Sandbox {
    grants: Arc<Grants>,
    network: Arc<NetworkGrant>,
    limits: Limits,
    slots: Slots,
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
    pub fn new(grants: Grants, limits: Limits, slots: Slots) -> Self {
        let network = Arc::new(grants.network.clone());
        Self { grants: Arc::new(grants), network, limits, slots }
    }

    /// The plugin's instance-pool slots, which each call waits for.
    pub fn slots(&self) -> &Slots {
        &self.slots
    }

    /// The disk budgets of a run in `dirs`.
    pub fn disk_budgets(&self, dirs: &RunDirs) -> DiskBudgets {
        fs::budgets(dirs, &self.grants.mounts, self.limits.scratch)
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
        let secret_values = secrets::read_all(&self.grants.secrets);
        let masked = secret_values.values().filter_map(|v| v.as_ref().ok().cloned()).collect();
        let log = StageLog::new(self.limits.log_bytes.as_u64(), self.limits.log_lines, masked, run.sink);

        let mut wasi = WasiCtxBuilder::new();
        wasi.stdout(log.stream(output::Source::Stdout)).stderr(log.stream(output::Source::Stderr));
        let env = env::resolve_env(&self.grants.env, &self.grants.inherit_env);
        if !env.is_empty() {
            wasi.envs(&env);
        }
        fs::preopen(&mut wasi, &run.dirs, &self.grants.mounts)?;
        let policy = NetPolicy::new(self.network.clone(), log.clone());
        net::configure(&mut wasi, &policy);

        let state = RunState {
            wasi: wasi.build(),
            http: {
                let mut http = WasiHttpCtx::new();
                http.set_field_size_limit(net::FIELD_SIZE_LIMIT);
                http
            },
            hooks: HttpHooks::new(policy),
            table: {
                let mut table = ResourceTable::new();
                table.set_max_capacity(self.limits.handles as usize);
                table
            },
            limiter: limits::Limiter::new(&self.limits),
            secrets: Secrets::new(secret_values, log.clone()),
            services: Services::new(run.services, log.clone(), &self.limits),
            log,
            stores: Stores::default(),
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
