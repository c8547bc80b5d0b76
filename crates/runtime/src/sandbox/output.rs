//! Log capability: every line a plugin writes, through the `log` import or
//! its stdout and stderr, lands in the run's [`StageLog`].
//!
//! One budget of bytes and one of lines cover all three sources, so a flood
//! on any of them is caught; every line costs [`LINE_COST`] bytes besides
//! its text, so a flood of empty lines is charged for what it costs to
//! store. A write is charged whole before any of its lines is stored, and
//! its lines are handed to the sink together (one transaction); past a
//! budget the write traps and the stage fails with [`Violation::LogBytes`]
//! or [`Violation::LogLines`]. Values of the plugin's secrets are masked
//! before a line leaves this module. Lines go to a [`LogSink`] (the terminal for
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
use super::limits::{LINE_COST, Violation};

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

    /// The lines of one write, in order; a sink that stores lines stores
    /// them together (one transaction, not one per line).
    fn lines(&self, lines: &[(Source, String)]) {
        for (source, text) in lines {
            self.line(*source, text);
        }
    }
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
/// Lines of a multi-line secret shorter than this are not masked on their
/// own (masking every `-----` or `}` would garble the log, and they give
/// nothing away).
const MIN_FRAGMENT: usize = 4;

/// The exact strings masked out of everything a run's log, results and
/// reasons carry: every granted secret value, and each line of a
/// multi-line value (so a PEM key printed line by line is masked too).
/// Longest first, so a value is masked whole before its parts.
#[derive(Default)]
struct Masker {
    needles: Vec<String>,
}

impl Masker {
    fn new(secrets: Vec<String>) -> Self {
        let mut needles: Vec<String> = Vec::new();
        for secret in secrets.into_iter().filter(|s| !s.is_empty()) {
            if secret.contains('\n') {
                needles.extend(secret.lines().map(|l| l.trim_end_matches('\r').to_string()).filter(|l| l.len() >= MIN_FRAGMENT));
            }
            needles.push(secret);
        }
        needles.sort_by_key(|n| std::cmp::Reverse(n.len()));
        needles.dedup();
        Self { needles }
    }

    fn mask(&self, text: &str) -> String {
        let mut out = text.to_string();
        for needle in &self.needles {
            if out.contains(needle.as_str()) {
                out = out.replace(needle.as_str(), "***");
            }
        }
        out
    }

    fn contains_any(&self, text: &[u8]) -> bool {
        self.needles.iter().any(|n| memchr::memmem::find(text, n.as_bytes()).is_some())
    }

    /// Where to cut an over-long partial line at or before `cut` so that no
    /// secret is split across the pieces (each piece is masked on its own):
    /// before an occurrence that spans the cut, or before the tail of `buf`
    /// that could still become one.
    fn safe_cut(&self, buf: &[u8], start: usize, mut cut: usize) -> usize {
        for needle in self.needles.iter().map(|n| n.as_bytes()) {
            let from = cut.saturating_sub(needle.len() - 1).max(start);
            for i in from..cut {
                let rest = &buf[i..];
                let spans = rest.len() >= needle.len() && rest.starts_with(needle);
                let may_become = rest.len() < needle.len() && needle.starts_with(rest);
                if (spans || may_become) && i > start {
                    cut = cut.min(i);
                    break;
                }
            }
        }
        cut
    }
}

struct State {
    used_bytes: u64,
    used_lines: u64,
    exceeded: Option<Violation>,
    partial: [Vec<u8>; 2],
    stderr_tail: VecDeque<String>,
    denials: Denials,
}

/// Distinct refusals kept for a run's reason (and logged once each).
const MAX_DENIALS: usize = 16;

/// What the sandbox refused during a run: the first [`MAX_DENIALS`]
/// distinct refusals with how often each happened, and how many others —
/// so a plugin that is refused in a loop makes the host hold and log
/// nothing more.
#[derive(Default)]
struct Denials {
    distinct: Vec<(String, u64)>,
    others: u64,
}

impl Denials {
    /// Counts `what`; true when it is new and kept.
    fn record(&mut self, what: String) -> bool {
        if let Some((_, n)) = self.distinct.iter_mut().find(|(d, _)| *d == what) {
            *n += 1;
            false
        } else if self.distinct.len() < MAX_DENIALS {
            self.distinct.push((what, 1));
            true
        } else {
            self.others += 1;
            false
        }
    }

    fn describe(&self) -> Vec<String> {
        let mut out: Vec<String> = self.distinct.iter().map(|(d, n)| if *n == 1 { d.clone() } else { format!("{d} ({n} times)") }).collect();
        if self.others > 0 {
            out.push(format!("{} other refusal(s)", self.others));
        }
        out
    }
}

struct Inner {
    budget_bytes: u64,
    budget_lines: u64,
    masker: Masker,
    sink: Arc<dyn LogSink>,
    state: Mutex<State>,
}

/// A cheap handle to one run's log; clones share the budget.
#[derive(Clone)]
pub struct StageLog {
    inner: Arc<Inner>,
}

impl StageLog {
    /// A log with `bytes` and `lines` for the plugin, masking `secrets`.
    pub fn new(bytes: u64, lines: u64, secrets: Vec<String>, sink: Arc<dyn LogSink>) -> Self {
        let state = State {
            used_bytes: 0,
            used_lines: 0,
            exceeded: None,
            partial: [Vec::new(), Vec::new()],
            stderr_tail: VecDeque::new(),
            denials: Denials::default(),
        };
        let inner = Inner { budget_bytes: bytes, budget_lines: lines, masker: Masker::new(secrets), sink, state: Mutex::new(state) };
        Self { inner: Arc::new(inner) }
    }

    /// A log that discards everything, for tests of other modules.
    pub fn detached() -> Self {
        Self::new(u64::MAX, u64::MAX, Vec::new(), Arc::new(NullSink))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces every secret value (and every line of a multi-line one) in
    /// `text` with `***`. Exact matches only: a value the plugin encodes or
    /// splits otherwise is not recognised.
    pub fn mask(&self, text: &str) -> String {
        self.inner.masker.mask(text)
    }

    /// Whether `data` contains a granted secret value (or a line of one).
    pub fn contains_secret(&self, data: &[u8]) -> bool {
        self.inner.masker.contains_any(data)
    }

    /// Masks a finished line and queues it for the sink.
    fn finish(&self, state: &mut State, out: &mut Vec<(Source, String)>, source: Source, raw: &str) {
        let text = self.mask(raw.trim_end_matches(['\n', '\r']));
        if source == Source::Stderr {
            if state.stderr_tail.len() == STDERR_TAIL {
                state.stderr_tail.pop_front();
            }
            state.stderr_tail.push_back(text.clone());
        }
        out.push((source, text));
    }

    /// Charges `bytes` and `lines` (each line also [`LINE_COST`] bytes);
    /// past either budget, reports the violation (once to the log).
    fn charge(&self, state: &mut State, bytes: usize, lines: u64) -> Result<(), Violation> {
        if let Some(v) = &state.exceeded {
            return Err(v.clone());
        }
        state.used_bytes = state.used_bytes.saturating_add(bytes as u64).saturating_add(lines.saturating_mul(LINE_COST));
        state.used_lines = state.used_lines.saturating_add(lines);
        let violation = if state.used_bytes > self.inner.budget_bytes {
            Violation::LogBytes { limit: self.inner.budget_bytes }
        } else if state.used_lines > self.inner.budget_lines {
            Violation::LogLines { limit: self.inner.budget_lines }
        } else {
            return Ok(());
        };
        self.inner.sink.line(Source::Host, &format!("{violation}; the stage is stopped"));
        state.exceeded = Some(violation.clone());
        Err(violation)
    }

    /// A message from the `log` import: one line per `\n`-separated part,
    /// all charged before any is stored.
    pub fn write_line(&self, level: Level, text: &str) -> Result<(), Violation> {
        let mut state = self.lock();
        let lines = memchr::memchr_iter(b'\n', text.as_bytes()).count() as u64 + 1;
        self.charge(&mut state, text.len() + 1, lines)?;
        let mut out = Vec::with_capacity(lines as usize);
        for line in text.split('\n') {
            self.finish(&mut state, &mut out, Source::Log(level), line);
        }
        drop(state);
        self.inner.sink.lines(&out);
        Ok(())
    }

    /// Raw bytes from stdout or stderr; complete lines are emitted, and a
    /// partial line once it reaches [`MAX_LINE`] bytes (never inside a
    /// secret).
    pub fn write_bytes(&self, source: Source, bytes: &[u8]) -> Result<(), Violation> {
        let slot = if source == Source::Stderr { 1 } else { 0 };
        let mut state = self.lock();
        self.charge(&mut state, bytes.len(), 0)?;
        let mut buf = std::mem::take(&mut state.partial[slot]);
        buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        let mut start = 0;
        let mut result = Ok(());
        while result.is_ok() {
            let end = match memchr::memchr(b'\n', &buf[start..]) {
                Some(pos) => start + pos,
                None if buf.len() - start >= MAX_LINE => self.inner.masker.safe_cut(&buf, start, start + MAX_LINE),
                None => break,
            };
            result = self.charge(&mut state, 0, 1);
            if result.is_ok() {
                let line = String::from_utf8_lossy(&buf[start..end]).into_owned();
                self.finish(&mut state, &mut out, source, &line);
            }
            start = if buf.get(end) == Some(&b'\n') { end + 1 } else { end };
        }
        buf.drain(..start);
        state.partial[slot] = buf;
        drop(state);
        self.inner.sink.lines(&out);
        result
    }

    /// Emits what is left of unfinished stdout and stderr lines.
    pub fn flush(&self) {
        let mut state = self.lock();
        let mut out = Vec::new();
        for (slot, source) in [(0, Source::Stdout), (1, Source::Stderr)] {
            let rest = std::mem::take(&mut state.partial[slot]);
            if !rest.is_empty() {
                self.finish(&mut state, &mut out, source, &String::from_utf8_lossy(&rest));
            }
        }
        drop(state);
        self.inner.sink.lines(&out);
    }

    /// A line from the host about this run; not charged to the plugin.
    pub fn host_line(&self, text: &str) {
        let masked = self.mask(text);
        self.inner.sink.line(Source::Host, &masked);
    }

    /// Remembers something the sandbox refused, for the failure reason,
    /// and says so in the log the first time; only the first 16 distinct
    /// refusals are kept, repeats counted.
    pub fn record_denial(&self, what: String) {
        let line = format!("sandbox denied {what}");
        if self.lock().denials.record(what) {
            self.host_line(&line);
        }
    }

    /// What the sandbox refused, each distinct refusal once.
    pub fn denials(&self) -> Vec<String> {
        self.lock().denials.describe()
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

    /// A refusal repeated in a loop is kept and logged once, with a count;
    /// past [`MAX_DENIALS`] distinct ones only a number is kept.
    #[test]
    fn denials_are_kept_once_and_bounded() {
        let sink = Arc::new(Collect::default());
        let log = StageLog::new(1024, 100, vec![], sink.clone());
        for _ in 0..1000 {
            log.record_denial("TCP connection to 10.0.0.1:80".to_string());
        }
        for i in 0..100 {
            log.record_denial(format!("secret \"s{i}\""));
        }
        let denials = log.denials();
        assert_eq!(denials.len(), MAX_DENIALS + 1);
        assert_eq!(denials[0], "TCP connection to 10.0.0.1:80 (1000 times)");
        assert_eq!(denials[MAX_DENIALS], "85 other refusal(s)");
        assert_eq!(sink.0.lock().unwrap().len(), MAX_DENIALS, "one host line per kept refusal");
    }

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
        let log = StageLog::new(400, 100, vec!["hunter2".into()], sink.clone());
        log.write_bytes(Source::Stdout, b"pass=hunter2\npart").unwrap();
        log.write_bytes(Source::Stdout, b"ial\n").unwrap();
        log.write_line(Level::Warn, "x").unwrap();
        assert_eq!(log.write_bytes(Source::Stderr, &[b'y'; 400]), Err(Violation::LogBytes { limit: 400 }));
        assert_eq!(log.write_line(Level::Info, "more"), Err(Violation::LogBytes { limit: 400 }));
        let lines = sink.0.lock().unwrap().clone();
        assert_eq!(lines[0], (Source::Stdout, "pass=***".to_string()));
        assert_eq!(lines[1], (Source::Stdout, "partial".to_string()));
        assert_eq!(lines[2], (Source::Log(Level::Warn), "x".to_string()));
        assert_eq!(lines[3].0, Source::Host);
        assert_eq!(lines.len(), 4);
    }

    /// A flood of empty lines in one call is charged per line, before any
    /// line is stored, and stops at the line limit.
    #[test]
    fn empty_lines_are_charged_and_counted() {
        let sink = Arc::new(Collect::default());
        let log = StageLog::new(1 << 30, 1000, Vec::new(), sink.clone());
        let flood = "\n".repeat(4_000_000);
        assert_eq!(log.write_line(Level::Info, &flood), Err(Violation::LogLines { limit: 1000 }));
        assert_eq!(sink.0.lock().unwrap().len(), 1, "only the host's note is stored");

        let log = StageLog::new(64 * 1024, u64::MAX, Vec::new(), Arc::new(NullSink));
        assert_eq!(log.write_bytes(Source::Stdout, &b"\n".repeat(2000)), Err(Violation::LogBytes { limit: 64 * 1024 }));
    }

    /// Every line of a multi-line secret is masked, and a partial line cut
    /// at the maximum length is never cut inside a secret.
    #[test]
    fn multi_line_secrets_and_cut_lines_stay_masked() {
        let pem = "-----BEGIN KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\nAQEAz9aXeEEzfaQ\n-----END KEY-----".to_string();
        let sink = Arc::new(Collect::default());
        let log = StageLog::new(u64::MAX, u64::MAX, vec![pem.clone(), "s3cr3t-value".into()], sink.clone());
        log.write_line(Level::Info, &format!("key:\n{pem}")).unwrap();
        let mut long = vec![b'a'; MAX_LINE - 5];
        long.extend_from_slice(b"s3cr3t-value and more\n");
        log.write_bytes(Source::Stdout, &long[..MAX_LINE + 2]).unwrap();
        log.write_bytes(Source::Stdout, &long[MAX_LINE + 2..]).unwrap();
        let lines = sink.0.lock().unwrap().clone();
        let all: String = lines.iter().map(|(_, t)| t.as_str()).collect::<Vec<_>>().join("\n");
        for needle in ["MIIEvQIBADANBgkqhkiG9w0BAQEFAASC", "AQEAz9aXeEEzfaQ", "BEGIN KEY", "s3cr3t", "cr3t-value"] {
            assert!(!all.contains(needle), "{needle} leaked: {all}");
        }
        assert!(all.contains("*** and more"), "{all}");
        assert!(log.contains_secret(b"x AQEAz9aXeEEzfaQ y"));
    }
}
