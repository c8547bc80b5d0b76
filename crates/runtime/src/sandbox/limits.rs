//! Resource limits of one plugin call, and the typed [`Violation`] that a
//! breached limit produces.
//!
//! Memory is capped by a [`ResourceLimiter`] on the store; wall-clock time
//! by a tokio timeout around the whole call, which guest code cannot hold
//! off because it yields at every epoch tick and host calls are async; log
//! output by [`super::output::StageLog`]; returned data after the call. Every breach surfaces as a `Violation`, so the runner can
//! name the cause instead of printing a bare trap.

use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;
use wasmtime::ResourceLimiter;

/// Per-plugin limits, from the agent config (`limits:`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Limits {
    /// Linear memory of the whole component instance.
    pub memory: ByteSize,
    /// Wall-clock time of one call (a stage, a planner call, a batch).
    /// A pipeline stage's own `timeout` can only shorten it.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Bytes of log lines, stdout and stderr together.
    pub log_bytes: ByteSize,
    /// Bytes of the data a call returns (messages, planned stages...).
    pub result_bytes: ByteSize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory: ByteSize::mib(256),
            timeout: Duration::from_secs(3600),
            log_bytes: ByteSize::mib(4),
            result_bytes: ByteSize::mib(1),
        }
    }
}

/// A limit the plugin ran into. Carried inside the `wasmtime::Error` of a
/// trapped call, so the runner can tell it from other traps.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("memory limit exceeded: the plugin asked for {requested} bytes of memory, its limit is {limit} bytes (raise `limits.memory`)")]
    Memory { limit: u64, requested: u64 },
    #[error("table limit exceeded: the plugin asked for {requested} table elements, the limit is {limit}")]
    Table { limit: u64, requested: u64 },
    #[error("timed out after {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("log output passed the plugin's limit of {limit} bytes (raise `limits.log-bytes`)")]
    LogBytes { limit: u64 },
    #[error("returned {size} bytes, above the plugin's limit of {limit} bytes (raise `limits.result-bytes`)")]
    ResultBytes { size: u64, limit: u64 },
}

/// Table elements a component may hold; generous for any real plugin.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

/// The store's limiter: refuses growth past the plugin's memory limit with a
/// trap that carries [`Violation::Memory`].
pub struct Limiter {
    memory: usize,
}

impl Limiter {
    pub fn new(limits: &Limits) -> Self {
        Self { memory: usize::try_from(limits.memory.as_u64()).unwrap_or(usize::MAX) }
    }
}

impl ResourceLimiter for Limiter {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.memory {
            return Err(wasmtime::Error::new(Violation::Memory { limit: self.memory as u64, requested: desired as u64 }));
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > MAX_TABLE_ELEMENTS {
            return Err(wasmtime::Error::new(Violation::Table {
                limit: MAX_TABLE_ELEMENTS as u64,
                requested: desired as u64,
            }));
        }
        Ok(true)
    }
}
