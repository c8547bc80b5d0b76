//! Log capability: every line a plugin writes, through the `log` import or
//! its stdout and stderr, lands in the run's [`StageLog`].
//!
//! One byte budget covers all three sinks, so a flood on any of them is
//! caught; past the budget the write traps and the stage fails with
//! [`Violation::LogBytes`]. Values of the plugin's secrets are masked before
//! a line leaves this module. Lines go to a [`LogSink`] (the terminal for
//! `cordon stage run`, the state store for deployments).

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError, StreamResult};

use anyhow::Result;
use cordon_contract::bindings::cordon::plugin::log;
use wasmtime::component::{HasSelf, Linker};

use super::RunState;
use super::limits::Violation;

/// Where a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The `log` import, at this level.
    Log(Level),
    Stdout,
    Stderr,
    /// The host itself (denials, limits); not charged to the plugin.
    Host,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Source::Log(Level::Debug) => "debug",
            Source::Log(Level::Info) => "info",
            Source::Log(Level::Warn) => "warn",
            Source::Log(Level::Error) => "error",
            Source::Stdout => "stdout",
            Source::Stderr => "stderr",
            Source::Host => "cordon",
        })
    }
}

/// Receives finished, masked lines.
pub trait LogSink: Send + Sync {
    fn line(&self, source: Source, text: &str);
}

/// Discards every line.
pub struct NullSink;

impl LogSink for NullSink {
    fn line(&self, _: Source, _: &str) {}
}

/// A partial stdout or stderr line is emitted once it reaches this size.
const MAX_LINE: usize = 16 * 1024;
/// How many stderr lines are kept to explain a trap (a Rust panic message).
const STDERR_TAIL: usize = 8;

struct State {
    used: u64,
    exceeded: bool,
    partial: [Vec<u8>; 2],
    stderr_tail: VecDeque<String>,
    denials: Vec<String>,
}

struct Inner {
    budget: u64,
    secrets: Vec<String>,
    sink: Arc<dyn LogSink>,
    state: Mutex<State>,
}

/// A cheap handle to one run's log; clones share the budget.
#[derive(Clone)]
pub struct StageLog {
    inner: Arc<Inner>,
}

impl StageLog {
    /// A log with `budget` bytes for the plugin, masking `secrets`.
    pub fn new(budget: u64, secrets: Vec<String>, sink: Arc<dyn LogSink>) -> Self {
        let secrets = secrets.into_iter().filter(|s| !s.is_empty()).collect();
        let state = State {
            used: 0,
            exceeded: false,
            partial: [Vec::new(), Vec::new()],
            stderr_tail: VecDeque::new(),
            denials: Vec::new(),
        };
        Self { inner: Arc::new(Inner { budget, secrets, sink, state: Mutex::new(state) }) }
    }

    /// A log that discards everything, for tests of other modules.
    pub fn detached() -> Self {
        Self::new(u64::MAX, Vec::new(), Arc::new(NullSink))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces every secret value in `text` with `***`.
    pub fn mask(&self, text: &str) -> String {
        let mut out = text.to_string();
        for secret in &self.inner.secrets {
            if out.contains(secret.as_str()) {
                out = out.replace(secret.as_str(), "***");
            }
        }
        out
    }

    fn emit(&self, state: &mut State, source: Source, raw: &str) {
        let text = self.mask(raw.trim_end_matches(['\n', '\r']));
        if source == Source::Stderr {
            if state.stderr_tail.len() == STDERR_TAIL {
                state.stderr_tail.pop_front();
            }
            state.stderr_tail.push_back(text.clone());
        }
        self.inner.sink.line(source, &text);
    }

    /// Charges `n` bytes; past the budget, reports the violation once.
    fn charge(&self, state: &mut State, n: usize) -> Result<(), Violation> {
        let limit = self.inner.budget;
        if state.exceeded {
            return Err(Violation::LogBytes { limit });
        }
        state.used = state.used.saturating_add(n as u64);
        if state.used > limit {
            state.exceeded = true;
            self.inner.sink.line(
                Source::Host,
                &format!("log output passed the plugin's limit of {limit} bytes; the stage is stopped"),
            );
            return Err(Violation::LogBytes { limit });
        }
        Ok(())
    }

    /// A line from the `log` import.
    pub fn write_line(&self, level: Level, text: &str) -> Result<(), Violation> {
        let mut state = self.lock();
        self.charge(&mut state, text.len() + 1)?;
        for line in text.split('\n') {
            self.emit(&mut state, Source::Log(level), line);
        }
        Ok(())
    }

    /// Raw bytes from stdout or stderr; complete lines are emitted.
    pub fn write_bytes(&self, source: Source, bytes: &[u8]) -> Result<(), Violation> {
        let slot = if source == Source::Stderr { 1 } else { 0 };
        let mut state = self.lock();
        self.charge(&mut state, bytes.len())?;
        let mut buf = std::mem::take(&mut state.partial[slot]);
        buf.extend_from_slice(bytes);
        let mut start = 0;
        while let Some(pos) = buf[start..].iter().position(|&b| b == b'\n') {
            let line = String::from_utf8_lossy(&buf[start..start + pos]).into_owned();
            self.emit(&mut state, source, &line);
            start += pos + 1;
        }
        while buf.len() - start >= MAX_LINE {
            let line = String::from_utf8_lossy(&buf[start..start + MAX_LINE]).into_owned();
            self.emit(&mut state, source, &line);
            start += MAX_LINE;
        }
        buf.drain(..start);
        state.partial[slot] = buf;
        Ok(())
    }

    /// Emits what is left of unfinished stdout and stderr lines.
    pub fn flush(&self) {
        let mut state = self.lock();
        for (slot, source) in [(0, Source::Stdout), (1, Source::Stderr)] {
            let rest = std::mem::take(&mut state.partial[slot]);
            if !rest.is_empty() {
                self.emit(&mut state, source, &String::from_utf8_lossy(&rest));
            }
        }
    }

    /// A line from the host about this run; not charged to the plugin.
    pub fn host_line(&self, text: &str) {
        let masked = self.mask(text);
        self.inner.sink.line(Source::Host, &masked);
    }

    /// Remembers something the sandbox refused, for the failure reason.
    pub fn record_denial(&self, what: String) {
        self.lock().denials.push(what);
    }

    pub fn denials(&self) -> Vec<String> {
        self.lock().denials.clone()
    }

    /// The last lines of stderr (where a Rust guest's panic message goes).
    pub fn stderr_tail(&self) -> Vec<String> {
        self.flush();
        self.lock().stderr_tail.iter().cloned().collect()
    }

    /// An stdout or stderr stream for the guest that writes into this log.
    pub fn stream(&self, source: Source) -> GuestOutput {
        GuestOutput { log: self.clone(), source }
    }
}

pub(super) fn add_to_linker(linker: &mut Linker<RunState>) -> wasmtime::Result<()> {
    log::add_to_linker::<_, HasSelf<StageLog>>(linker, |s| &mut s.log)
}

impl log::Host for StageLog {
    fn write(&mut self, level: log::Level, message: String) -> wasmtime::Result<()> {
        let level = match level {
            log::Level::Debug => Level::Debug,
            log::Level::Info => Level::Info,
            log::Level::Warn => Level::Warn,
            log::Level::Error => Level::Error,
        };
        self.write_line(level, &message).map_err(wasmtime::Error::new)
    }
}

/// The guest's stdout or stderr.
#[derive(Clone)]
pub struct GuestOutput {
    log: StageLog,
    source: Source,
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for GuestOutput {
    async fn ready(&mut self) {}
}

impl OutputStream for GuestOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.log.write_bytes(self.source, &bytes).map_err(|v| StreamError::Trap(wasmtime::Error::new(v)))
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

impl tokio::io::AsyncWrite for GuestOutput {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Poll::Ready(
            self.log
                .write_bytes(self.source, buf)
                .map(|()| buf.len())
                .map_err(|v| std::io::Error::other(v.to_string())),
        )
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Collect(Mutex<Vec<(Source, String)>>);

    impl LogSink for Collect {
        fn line(&self, source: Source, text: &str) {
            self.0.lock().unwrap().push((source, text.to_string()));
        }
    }

    #[test]
    fn splits_lines_masks_secrets_and_enforces_the_budget() {
        let sink = Arc::new(Collect::default());
        let log = StageLog::new(40, vec!["hunter2".into()], sink.clone());
        log.write_bytes(Source::Stdout, b"pass=hunter2\npart").unwrap();
        log.write_bytes(Source::Stdout, b"ial\n").unwrap();
        log.write_line(Level::Warn, "x").unwrap();
        assert_eq!(log.write_bytes(Source::Stderr, &[b'y'; 64]), Err(Violation::LogBytes { limit: 40 }));
        assert_eq!(log.write_line(Level::Info, "more"), Err(Violation::LogBytes { limit: 40 }));
        let lines = sink.0.lock().unwrap().clone();
        assert_eq!(lines[0], (Source::Stdout, "pass=***".to_string()));
        assert_eq!(lines[1], (Source::Stdout, "partial".to_string()));
        assert_eq!(lines[2], (Source::Log(Level::Warn), "x".to_string()));
        assert_eq!(lines[3].0, Source::Host);
        assert_eq!(lines.len(), 4);
    }
}
