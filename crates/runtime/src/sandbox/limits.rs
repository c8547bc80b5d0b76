//! Resource limits of one plugin call, and the typed [`Violation`] that a
//! breached limit produces.
//!
//! Memory is capped by a [`ResourceLimiter`] on the store, for all of a
//! plugin's memories together; wall-clock time
//! by a tokio timeout around the whole call, which guest code cannot hold
//! off because it yields at every epoch tick and host calls are async; log
//! output by [`super::output::StageLog`]; disk by [`super::disk`];
//! durable state by [`super::services`]; returned data after the call.
//! Every breach surfaces as a `Violation`, so the runner can name the cause
//! instead of printing a bare trap.

use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;
use wasmtime::ResourceLimiter;

/// Per-plugin limits, from the agent config (`limits:`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Limits {
    /// Linear memory of the whole component instance: all its memories
    /// together.
    pub memory: ByteSize,
    /// Wall-clock time of one call (a stage, a planner call, a batch).
    /// A pipeline stage's own `timeout` can only shorten it.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Bytes of log lines, stdout and stderr together; each line also costs
    /// [`LINE_COST`] bytes, so a flood of empty lines is charged too.
    pub log_bytes: ByteSize,
    /// Log lines (from `log`, stdout and stderr together).
    pub log_lines: u64,
    /// Host-side handles a call may hold at once: open files and
    /// directories (each a descriptor), sockets, HTTP requests, fields,
    /// bodies and streams, pollables.
    pub handles: u32,
    /// Bytes of the data a call returns (messages, planned stages...).
    pub result_bytes: ByteSize,
    /// Disk a call's `/scratch` may take (see [`super::disk`]).
    pub scratch: ByteSize,
    /// Metadata entries of one scope: a stage's own, or its deployment's.
    pub metadata_entries: u64,
    /// Bytes of metadata keys and values of one scope.
    pub metadata_bytes: ByteSize,
    /// Blobs of one application and plugin.
    pub blobs: u64,
    /// Bytes of blob keys and values of one application and plugin.
    pub blob_bytes: ByteSize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory: ByteSize::mib(256),
            timeout: Duration::from_secs(3600),
            log_bytes: ByteSize::mib(4),
            log_lines: 100_000,
            handles: 1024,
            result_bytes: ByteSize::mib(1),
            scratch: ByteSize::mib(512),
            metadata_entries: 1000,
            metadata_bytes: ByteSize::mib(4),
            blobs: 64,
            blob_bytes: ByteSize::mib(64),
        }
    }
}

/// A limit the plugin ran into. Carried inside the `wasmtime::Error` of a
/// trapped call, so the runner can tell it from other traps.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("memory limit exceeded: the plugin asked for {requested} bytes of memory (all its memories together), its limit is {limit} bytes (raise `limits.memory`)")]
    Memory { limit: u64, requested: u64 },
    #[error("table limit exceeded: the plugin asked for {requested} table elements, the limit is {limit}")]
    Table { limit: u64, requested: u64 },
    #[error("timed out after {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("log output passed the plugin's limit of {limit} bytes (raise `limits.log-bytes`)")]
    LogBytes { limit: u64 },
    #[error("log output passed the plugin's limit of {limit} lines (raise `limits.log-lines`)")]
    LogLines { limit: u64 },
    #[error("handle limit exceeded: the plugin held as many host handles (open files, sockets, HTTP resources) at once as `limits.handles` allows (raise it)")]
    Handles,
    #[error("HTTP header limit exceeded: one header map passed the host's limit of {limit} bytes")]
    HttpFields { limit: u64 },
    #[error("disk budget exceeded: {guest} took {used} bytes, its limit is {limit} bytes (raise {})", disk_fix(.guest))]
    Disk { guest: String, used: u64, limit: u64 },
    #[error("returned {size} bytes, above the plugin's limit of {limit} bytes (raise `limits.result-bytes`)")]
    ResultBytes { size: u64, limit: u64 },
}

/// What raises the disk budget of the directory at guest path `guest`.
fn disk_fix(guest: &str) -> String {
    if guest == super::fs::SCRATCH { "`limits.scratch`".to_string() } else { format!("the `quota` of the mount at {guest}") }
}

/// Bytes each log line costs besides its text: what storing it costs the
/// host, whatever its length.
pub const LINE_COST: u64 = 64;

/// Table elements a component instance may hold, all tables together;
/// generous for any real plugin.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

/// The most a component may be made of (checked from its bytes at load,
/// and again by the store when it is instantiated). Real plugins have one
/// memory, two tables and a few dozen core instances (a Python plugin: one
/// memory, 14 modules); the maxima keep one plugin from taking the instance
/// pool's slots, or multiplying its memory limit, by being made of many
/// parts.
pub const MAX_MEMORIES: u32 = 2;
pub const MAX_TABLES: u32 = 16;
pub const MAX_CORE_INSTANCES: u32 = 256;

/// The store's limiter: refuses growth of the memories (tables) past the
/// plugin's limit for all of them together, with a trap that carries a
/// [`Violation`], and caps how many memories, tables and instances a store
/// may create.
pub struct Limiter {
    memory_limit: usize,
    memory: usize,
    table_elements: usize,
}

impl Limiter {
    pub fn new(limits: &Limits) -> Self {
        Self { memory_limit: usize::try_from(limits.memory.as_u64()).unwrap_or(usize::MAX), memory: 0, table_elements: 0 }
    }
}

impl ResourceLimiter for Limiter {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let total = self.memory.saturating_sub(current).saturating_add(desired);
        if total > self.memory_limit {
            return Err(wasmtime::Error::new(Violation::Memory { limit: self.memory_limit as u64, requested: total as u64 }));
        }
        self.memory = total;
        Ok(true)
    }

    fn table_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let total = self.table_elements.saturating_sub(current).saturating_add(desired);
        if total > MAX_TABLE_ELEMENTS {
            return Err(wasmtime::Error::new(Violation::Table { limit: MAX_TABLE_ELEMENTS as u64, requested: total as u64 }));
        }
        self.table_elements = total;
        Ok(true)
    }

    fn instances(&self) -> usize {
        MAX_CORE_INSTANCES as usize
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES as usize
    }

    fn tables(&self) -> usize {
        MAX_TABLES as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Memory is one budget for all of a plugin's memories: two memories
    /// of 40 MiB exceed a 64 MiB limit, as one of 80 MiB would.
    #[test]
    fn memory_is_counted_over_all_memories() {
        let mut limiter = Limiter::new(&Limits { memory: ByteSize::mib(64), ..Limits::default() });
        let mib = 1 << 20;
        assert!(limiter.memory_growing(0, 40 * mib, None).unwrap());
        assert!(limiter.memory_growing(0, 20 * mib, None).unwrap());
        let err = limiter.memory_growing(20 * mib, 30 * mib, None).unwrap_err();
        assert_eq!(err.downcast_ref::<Violation>(), Some(&Violation::Memory { limit: 64 * mib as u64, requested: 70 * mib as u64 }));
        assert!(limiter.memory_growing(40 * mib, 44 * mib, None).unwrap(), "growing the first memory within the total is fine");
    }
}
