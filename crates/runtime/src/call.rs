//! One call of a plugin export in a fresh sandbox, and the typed
//! [`RunError`] for every way it can fail.
//!
//! This sits below both plugin loading (which asks a component for its
//! stages) and the [`crate::runner`] (which offers the calls of each world),
//! so neither needs the other to run guest code. Nothing a guest does
//! escapes its call: a trap or panic fails that call only, the store is
//! dropped, and the next call starts from a fresh instance.

use std::sync::Arc;
use std::time::Duration;

use cordon_contract::World;
use wasmtime::component::ResourceTableError;
use wasmtime_wasi_http::FieldMapError;
use wasmtime::{Engine, Store, Trap, WasmBacktrace};

use crate::admission::Admission;
use crate::sandbox::disk::DiskBudgets;
use crate::sandbox::net::FIELD_SIZE_LIMIT;
use crate::sandbox::{LogSink, MemoryServices, RunContext, RunDirs, RunState, Sandbox, StageLog, Violation};

/// Why a plugin call did not produce a usable answer. `Display` is the
/// one-line reason that operators see in stage results and errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunError {
    /// The plugin's world does not offer this call.
    #[error("plugin `{plugin}` is a {world} plugin and {lacks}")]
    WrongWorld { plugin: String, world: World, lacks: &'static str },
    /// The sandbox could not be built (a granted directory vanished...).
    #[error("cannot prepare the sandbox: {0}")]
    Sandbox(String),
    /// The plugin ran into one of its limits.
    #[error("{0}")]
    Limit(Violation),
    /// The guest trapped or panicked.
    #[error("{0}")]
    Trap(String),
    /// The plugin answered with an error of its own (refused options, a
    /// failed migration step...).
    #[error("{0}")]
    Plugin(String),
    /// The plugin's answer breaks the contract (its shape, names or sizes).
    #[error("{0}")]
    Contract(String),
    /// Any of the above, with what the sandbox refused during the call.
    #[error("{}", with_denied(&.cause.to_string(), .denied))]
    Denied { cause: Box<RunError>, denied: String },
}

/// `reason` with what the sandbox refused appended: the one wording of
/// every failure reason that names a denial.
pub fn with_denied(reason: &str, denied: &str) -> String {
    if reason.is_empty() { format!("sandbox denied {denied}") } else { format!("{reason} (sandbox denied {denied})") }
}

/// What bounds a call from outside its code — its wall-clock limit and its
/// disk budgets — and the log that says what the sandbox refused.
pub struct Guard {
    pub log: StageLog,
    pub timeout: Duration,
    disk: DiskBudgets,
}

impl Guard {
    /// Runs `call` under the wall-clock limit and the disk budgets, and maps
    /// every failure to a [`RunError`] that names the cause and what the
    /// sandbox refused.
    pub async fn run<T>(&self, call: impl Future<Output = wasmtime::Result<T>>) -> Result<T, RunError> {
        let result = tokio::select! {
            result = tokio::time::timeout(self.timeout, call) => match result {
                Err(_) => Err(RunError::Limit(Violation::Timeout(self.timeout))),
                Ok(Ok(value)) => Ok(value),
                Ok(Err(e)) => Err(explain(&e, self.timeout, &self.log)),
            },
            violation = self.disk.exceeded() => Err(RunError::Limit(violation)),
        };
        // What the plugin wrote to a mount after the last walk counts too.
        let result = match result {
            Ok(value) => self.disk.check_lasting().await.map(|()| value).map_err(RunError::Limit),
            Err(e) => Err(e),
        };
        self.log.flush();
        result.map_err(|cause| with_denials(cause, &self.log))
    }
}

/// A fresh store for one call, with its guard and budgets.
pub struct Call {
    pub store: Store<RunState>,
    pub guard: Guard,
    result_limit: u64,
    /// Declared after the store, so the instance is gone before its pool
    /// slots are given back.
    _admission: Admission,
}

impl Call {
    /// Builds the store for one call of a plugin with `sandbox`, once the
    /// plugin's pool slots are free (waiting at most the call's timeout).
    pub async fn open(engine: &Engine, sandbox: &Sandbox, context: RunContext) -> Result<Call, RunError> {
        let timeout = sandbox.timeout(context.timeout);
        let admission = tokio::time::timeout(timeout, sandbox.slots().admit()).await.map_err(|_| {
            RunError::Sandbox(format!(
                "no instance slot became free within {}: the plugin's calls already hold its share of the instance pool",
                humantime::format_duration(timeout)
            ))
        })?;
        let disk = sandbox.disk_budgets(&context.dirs);
        let context = RunContext { timeout: Some(timeout), ..context };
        let store = sandbox.store(engine, context).map_err(|e| RunError::Sandbox(format!("{e:#}")))?;
        let log = store.data().log().clone();
        Ok(Call { store, guard: Guard { log, timeout, disk }, result_limit: sandbox.limits().result_bytes.as_u64(), _admission: admission })
    }

    /// A call that uses no store-backed services (planning, listing stages,
    /// key-filter and item-action sessions, migration steps).
    pub async fn detached(engine: &Engine, sandbox: &Sandbox, dirs: RunDirs, sink: Arc<dyn LogSink>) -> Result<Call, RunError> {
        let context = RunContext { dirs, services: Arc::new(MemoryServices::default()), sink, timeout: None };
        Call::open(engine, sandbox, context).await
    }

    /// The call's log.
    pub fn log(&self) -> &StageLog {
        &self.guard.log
    }

    /// The plugin's own error, masked: it may quote a secret it was given.
    pub fn plugin_error(&self, message: String) -> RunError {
        RunError::Plugin(self.guard.log.mask(&message))
    }

    /// A broken answer, masked: the reason may quote what the plugin sent.
    pub fn contract_error(&self, message: String) -> RunError {
        RunError::Contract(self.guard.log.mask(&message))
    }

    /// The plugin's result limit, in bytes.
    pub fn result_limit(&self) -> u64 {
        self.result_limit
    }

    /// Refuses answers larger than the plugin's result limit.
    pub fn check_size(&self, size: usize) -> Result<(), RunError> {
        if size as u64 > self.result_limit {
            return Err(RunError::Limit(Violation::ResultBytes { size: size as u64, limit: self.result_limit }));
        }
        Ok(())
    }
}

/// Wraps `cause` with what the sandbox refused during the call, if anything.
pub fn with_denials(cause: RunError, log: &StageLog) -> RunError {
    match denials(log) {
        None => cause,
        Some(denied) => RunError::Denied { cause: Box::new(cause), denied },
    }
}

/// What the sandbox refused during the call, joined for a reason and
/// masked (a refused name or URL may carry a secret's value).
pub fn denials(log: &StageLog) -> Option<String> {
    let denials = log.denials();
    (!denials.is_empty()).then(|| log.mask(&denials.join("; ")))
}

/// Innermost frames of one function that make a trap a runaway recursion.
const RECURSION_FRAMES: usize = 16;

/// Whether the innermost frames of a trap are all the same function.
fn is_recursion(backtrace: &WasmBacktrace) -> bool {
    let frames = backtrace.frames();
    frames.len() >= RECURSION_FRAMES
        && frames[..RECURSION_FRAMES].iter().all(|f| f.func_index() == frames[0].func_index() && f.module().name() == frames[0].module().name())
}

/// Finds a value of type `E` anywhere in an error's chain.
fn find<E: std::error::Error + 'static>(e: &wasmtime::Error) -> Option<&E> {
    e.chain().find_map(|c| c.downcast_ref::<E>())
}

/// Turns a failed call into the error that names its cause.
fn explain(e: &wasmtime::Error, timeout: Duration, log: &StageLog) -> RunError {
    if let Some(v) = find::<Violation>(e) {
        return RunError::Limit(v.clone());
    }
    if let Some(ResourceTableError::Full) = find::<ResourceTableError>(e) {
        return RunError::Limit(Violation::Handles);
    }
    if let Some(FieldMapError::TotalSizeTooBig) = find::<FieldMapError>(e) {
        return RunError::Limit(Violation::HttpFields { limit: FIELD_SIZE_LIMIT as u64 });
    }
    let trap = |reason: &str| RunError::Trap(reason.to_string());
    match find::<Trap>(e) {
        Some(Trap::Interrupt) => RunError::Limit(Violation::Timeout(timeout)),
        Some(Trap::StackOverflow) => trap("stack overflow: the plugin recursed deeper than its 1 MiB wasm stack allows"),
        Some(Trap::UnreachableCodeReached) => {
            let tail = log.stderr_tail();
            match tail.iter().position(|l| l.contains("panicked at")) {
                Some(i) => {
                    let message: Vec<&str> = tail[i + 1..]
                        .iter()
                        .map(String::as_str)
                        .take_while(|l| !l.starts_with("note: run with"))
                        .collect();
                    RunError::Trap(format!("plugin panicked: {} {}", tail[i].trim(), message.join(" ").trim()))
                }
                None => trap("plugin trapped: it reached an `unreachable` instruction (an abort)"),
            }
        }
        Some(Trap::MemoryOutOfBounds) if e.downcast_ref::<WasmBacktrace>().is_some_and(is_recursion) => {
            // Rust and C guests keep a shadow stack at the bottom of linear
            // memory; running off its end is an out-of-bounds access deep
            // inside a recursion rather than a native stack overflow.
            trap("stack overflow: the plugin recursed without bound and ran off the end of its stack (an out-of-bounds memory access)")
        }
        Some(t) => RunError::Trap(format!("plugin trapped: {t}")),
        None => RunError::Trap(log.mask(&format!("{e:#}"))),
    }
}
