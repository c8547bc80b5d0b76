//! The [`Engine`]: wasmtime set up for plugins, and the compiled-component
//! cache.
//!
//! One engine serves the whole agent: async, with epoch interruption (a
//! background thread ticks [`TICKS_PER_SECOND`] times a second and guest
//! code yields to the executor at every tick, so timeouts, skip and cancel
//! can stop any plugin), and the pooling allocator
//! with copy-on-write memory images so that a fresh instance per call costs
//! microseconds. Where the pool's virtual memory cannot be reserved (a tight
//! `ulimit -v`, a small address space) the engine falls back to on-demand
//! allocation and says so in the log.
//!
//! Compiling a component takes tens of milliseconds to seconds; the cache
//! keeps compiled code on disk under the state directory, keyed by the
//! component's sha256 *and* the engine's compatibility hash (wasmtime
//! version and every setting that affects code), so code compiled by another
//! wasmtime is never loaded. Entries are written atomically (temp file then
//! rename) with a digest beside them, and an entry that fails its digest or
//! fails to load is deleted and compiled again. Only the host writes cache
//! entries; publishers never supply native code.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use wasmtime::component::{Component, InstancePre, Linker};
use wasmtime::{Config, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::admission::{Pool, Slots};
use crate::files::write_atomic;
use crate::sandbox::{self, RunState, TICKS_PER_SECOND, limits};

/// How the engine is set up.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Where compiled components are cached; `None` compiles every time.
    pub cache_dir: Option<PathBuf>,
    /// Use the pooling allocator (falls back to on-demand when unavailable).
    pub pooling: bool,
    /// Instances (plugin calls) that may be alive at once with pooling.
    pub pool_size: u32,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self { cache_dir: None, pooling: true, pool_size: 256 }
    }
}

/// How a component was obtained by [`Engine::load`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Cache,
    Compiled,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Origin::Cache => "loaded from the compile cache",
            Origin::Compiled => "compiled",
        })
    }
}

/// The engine, its linker with every host import, and the compile cache.
pub struct Engine {
    engine: wasmtime::Engine,
    linker: Linker<RunState>,
    cache_dir: Option<PathBuf>,
    /// Admission to the instance pool; None without one.
    pool: Option<Pool>,
}

fn base_config() -> Config {
    let mut config = Config::new();
    config
        .wasm_component_model(true)
        .epoch_interruption(true)
        .concurrency_support(false)
        .max_wasm_stack(1 << 20)
        .memory_init_cow(true)
        .cranelift_opt_level(wasmtime::OptLevel::Speed);
    config
}

/// Bytes of each linear memory, table and fiber stack that stay resident
/// between instances. Where the kernel supports `PAGEMAP_SCAN` (Linux 6.7+)
/// only the pages an instance dirtied are reset, with `memset`, instead of
/// an `madvise` per instance and a page fault per page on the next one.
const KEEP_RESIDENT: usize = 2 << 20;

/// The pool's sizes for `pool_size` instances, as the allocator and
/// admission see them.
fn pool_sizes(pool_size: u32) -> Pool {
    Pool::new(pool_size, pool_size * 4, pool_size, pool_size * 4)
}

fn pooling(sizes: &Pool) -> PoolingAllocationConfig {
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(sizes.components)
        .total_core_instances(sizes.core_instances)
        .total_memories(sizes.memories)
        .total_tables(sizes.tables)
        .max_memories_per_component(limits::MAX_MEMORIES)
        .max_tables_per_component(limits::MAX_TABLES)
        .total_stacks(sizes.components)
        .max_memory_size(4 << 30)
        .pagemap_scan(wasmtime::Enabled::Auto)
        .linear_memory_keep_resident(KEEP_RESIDENT)
        .table_keep_resident(64 << 10)
        .async_stack_keep_resident(64 << 10);
    pool
}

impl Engine {
    pub fn new(options: EngineOptions) -> Result<Self> {
        let (engine, pool) = if options.pooling {
            let sizes = pool_sizes(options.pool_size);
            let mut config = base_config();
            config.allocation_strategy(InstanceAllocationStrategy::Pooling(pooling(&sizes)));
            match wasmtime::Engine::new(&config) {
                Ok(engine) => (engine, Some(sizes)),
                Err(e) => {
                    tracing::warn!("pooling allocator unavailable ({e:#}); falling back to on-demand instance allocation");
                    (wasmtime::Engine::new(&base_config())?, None)
                }
            }
        } else {
            (wasmtime::Engine::new(&base_config())?, None)
        };
        spawn_ticker(&engine);
        raise_descriptor_limit();
        let mut linker = Linker::new(&engine);
        sandbox::add_to_linker(&mut linker).context("cannot set up the host imports")?;
        if let Some(dir) = &options.cache_dir {
            create_private_dir(dir).with_context(|| format!("cannot create the component cache {}", dir.display()))?;
        }
        Ok(Self { engine, linker, cache_dir: options.cache_dir, pool })
    }

    /// The wasmtime engine underneath.
    pub fn wasmtime(&self) -> &wasmtime::Engine {
        &self.engine
    }

    /// Whether instances come from the pooling allocator.
    pub fn pooled(&self) -> bool {
        self.pool.is_some()
    }

    /// The pool slots of a plugin whose component has `shape` (see
    /// [`crate::admission`]).
    pub fn slots(&self, shape: &cordon_contract::Shape) -> Result<Slots, String> {
        self.pool.as_ref().map_or(Ok(Slots::unpooled()), |pool| pool.slots(shape))
    }

    fn cache_key(&self, digest: &str) -> String {
        let mut hasher = DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut hasher);
        format!("{digest}-{:016x}", hasher.finish())
    }

    /// A compiled component for `bytes`, whose sha256 (hex) is `digest`,
    /// from the cache when present. The caller has verified the digest.
    pub fn load(&self, bytes: &[u8], digest: &str) -> Result<(Component, Origin)> {
        let Some(dir) = &self.cache_dir else {
            return Ok((self.compile(bytes)?, Origin::Compiled));
        };
        let path = dir.join(format!("{}.cwasm", self.cache_key(digest)));
        if let Some(component) = self.read_cached(&path) {
            return Ok((component, Origin::Cache));
        }
        let component = self.compile(bytes)?;
        if let Err(e) = write_cached(&path, &component.serialize()?) {
            tracing::warn!("cannot write the component cache entry {}: {e:#}", path.display());
        }
        Ok((component, Origin::Compiled))
    }

    fn compile(&self, bytes: &[u8]) -> Result<Component> {
        Ok(Component::new(&self.engine, bytes)?)
    }

    fn read_cached(&self, path: &Path) -> Option<Component> {
        let code = std::fs::read(path).ok()?;
        let sidecar = digest_path(path);
        let expected = std::fs::read_to_string(&sidecar).unwrap_or_default();
        let discard = |why: &str| {
            tracing::warn!("discarding cache entry {}: {why}", path.display());
            let _ = std::fs::remove_file(path);
            let _ = std::fs::remove_file(&sidecar);
            None
        };
        if hex::encode(Sha256::digest(&code)) != expected.trim() {
            return discard("its content does not match its recorded digest");
        }
        // SAFETY: the bytes were produced by `Component::serialize` of an
        // engine with the same compatibility hash (it is in the file name),
        // written only by this host into its private state directory, and
        // checked against their digest just above.
        match unsafe { Component::deserialize(&self.engine, &code) } {
            Ok(component) => Some(component),
            Err(e) => discard(&format!("{e:#}")),
        }
    }

    /// Pre-links `component` against the host imports, once per plugin.
    pub fn instance_pre(&self, component: &Component) -> Result<InstancePre<RunState>> {
        Ok(self.linker.instantiate_pre(component)?)
    }
}

fn digest_path(path: &Path) -> PathBuf {
    path.with_extension("cwasm.sha256")
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

fn write_cached(path: &Path, code: &[u8]) -> Result<()> {
    write_atomic(&digest_path(path), hex::encode(Sha256::digest(code)).as_bytes())?;
    write_atomic(path, code)
}

/// Raises this process's soft limit on open descriptors to its hard limit:
/// each plugin call may hold up to `limits.handles` descriptors, and the
/// process's own (state database, listeners, logs) must not run out when
/// plugins use theirs. What stays shared is the hard limit: concurrent
/// calls × `limits.handles` should stay below it (see the README).
fn raise_descriptor_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            tracing::warn!("cannot raise the open-descriptor limit to its hard limit: {e}");
        }
    }
}

/// Increments the engine's epoch until the engine is dropped.
fn spawn_ticker(engine: &wasmtime::Engine) {
    let weak = engine.weak();
    let period = Duration::from_nanos(1_000_000_000 / TICKS_PER_SECOND);
    std::thread::Builder::new()
        .name("cordon-epoch".into())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(period);
            }
        })
        .expect("cannot start the epoch thread");
}
