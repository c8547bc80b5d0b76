//! Durable-state capability: the contract's `metadata`, `commands` and
//! `blobs` imports, and the [`StageServices`] trait behind them that the
//! caller provides per run.
//!
//! The sandbox does not know where metadata or blobs live: `cordon stage run`
//! keeps them in memory ([`MemoryServices`]); the pipeline engine backs them
//! with the state store, scoped to one stage of one deployment.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use std::sync::Arc;

use anyhow::Result;
use wasmtime::component::{HasSelf, Linker};

use cordon_contract::bindings::cordon::plugin::{blobs, commands, metadata};

use super::RunState;
use super::limits::Limits;
use super::output::StageLog;

/// Largest metadata key and value, and blob, a plugin may store.
pub const MAX_METADATA_KEY: usize = 256;
pub const MAX_METADATA_VALUE: usize = 64 * 1024;
pub const MAX_BLOB: usize = 16 * 1024 * 1024;
/// Longest reason a plugin may give for refusing a command; longer ones are
/// cut, so an answer cannot make the store hold more.
pub const MAX_REFUSAL: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MetaScope {
    Stage,
    Deployment,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandKind {
    Approve,
    Skip,
}

/// A command addressed to the running stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageCommand {
    pub id: String,
    pub kind: CommandKind,
    pub commander: String,
    pub created_at: u64,
}

/// How much one scope of metadata (a stage's own, or its deployment's) or
/// the blobs of one application and plugin may hold: entries, and bytes of
/// keys and values together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub entries: u64,
    pub bytes: u64,
}

/// State a run's host services read and write. Errors are host faults (a
/// broken state store) and fail the stage; size checks happen before. A put
/// answers false, and writes nothing, when the scope would pass `quota`
/// (its other entries plus this one) — checked and written atomically.
pub trait StageServices: Send + Sync {
    fn metadata_get(&self, scope: MetaScope, key: &str) -> anyhow::Result<Option<String>>;
    fn metadata_put(&self, scope: MetaScope, key: &str, value: &str, quota: Quota) -> anyhow::Result<bool>;
    fn metadata_entries(&self, scope: MetaScope) -> anyhow::Result<Vec<(String, String)>>;
    fn commands(&self) -> anyhow::Result<Vec<StageCommand>>;
    /// Records the stage's answer to its command `id` (`Err` = refused,
    /// with the reason) unless it already has one; an id that is not one
    /// of this stage's commands changes nothing.
    fn answer_command(&self, id: &str, verdict: Result<(), String>) -> anyhow::Result<()>;
    fn blob_get(&self, key: &str) -> anyhow::Result<Option<Vec<u8>>>;
    fn blob_put(&self, key: &str, value: &[u8], quota: Quota) -> anyhow::Result<bool>;
    fn blob_delete(&self, key: &str) -> anyhow::Result<()>;
}

impl Quota {
    /// Whether a scope holding `entries` other entries of `bytes` bytes
    /// may take one more of `added` bytes (the rule `cordon_store::Quota`
    /// applies in the database).
    fn admits(&self, entries: u64, bytes: u64, added: u64) -> bool {
        entries < self.entries && bytes.saturating_add(added) <= self.bytes
    }

    /// [`Quota::admits`] for `key` with a value of `len` bytes, over a
    /// scope's `(key, value length)` entries.
    fn admits_in<'a>(&self, entries: impl Iterator<Item = (&'a str, usize)>, key: &str, len: usize) -> bool {
        let (count, bytes) = entries.filter(|(k, _)| *k != key).fold((0u64, 0u64), |(n, b), (k, v)| (n + 1, b + (k.len() + v) as u64));
        self.admits(count, bytes, (key.len() + len) as u64)
    }
}

/// In-memory services for one-off runs and tests.
#[derive(Default)]
pub struct MemoryServices {
    metadata: Mutex<BTreeMap<(MetaScope, String), String>>,
    blobs: Mutex<HashMap<String, Vec<u8>>>,
}

impl StageServices for MemoryServices {
    fn metadata_get(&self, scope: MetaScope, key: &str) -> anyhow::Result<Option<String>> {
        Ok(self.metadata.lock().unwrap().get(&(scope, key.to_string())).cloned())
    }
    fn metadata_put(&self, scope: MetaScope, key: &str, value: &str, quota: Quota) -> anyhow::Result<bool> {
        let mut map = self.metadata.lock().unwrap();
        let scoped = map.iter().filter(|((s, _), _)| *s == scope).map(|((_, k), v)| (k.as_str(), v.len()));
        if !quota.admits_in(scoped, key, value.len()) {
            return Ok(false);
        }
        map.insert((scope, key.to_string()), value.to_string());
        Ok(true)
    }
    fn metadata_entries(&self, scope: MetaScope) -> anyhow::Result<Vec<(String, String)>> {
        let map = self.metadata.lock().unwrap();
        Ok(map.iter().filter(|((s, _), _)| *s == scope).map(|((_, k), v)| (k.clone(), v.clone())).collect())
    }
    /// Nobody can address commands to a one-off run.
    fn commands(&self) -> anyhow::Result<Vec<StageCommand>> {
        Ok(Vec::new())
    }
    fn answer_command(&self, _id: &str, _verdict: Result<(), String>) -> anyhow::Result<()> {
        Ok(())
    }
    fn blob_get(&self, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(self.blobs.lock().unwrap().get(key).cloned())
    }
    fn blob_put(&self, key: &str, value: &[u8], quota: Quota) -> anyhow::Result<bool> {
        let mut blobs = self.blobs.lock().unwrap();
        if !quota.admits_in(blobs.iter().map(|(k, v)| (k.as_str(), v.len())), key, value.len()) {
            return Ok(false);
        }
        blobs.insert(key.to_string(), value.to_vec());
        Ok(true)
    }
    fn blob_delete(&self, key: &str) -> anyhow::Result<()> {
        self.blobs.lock().unwrap().remove(key);
        Ok(())
    }
}

/// The services of one run, as the guest reaches them. The run's log
/// knows its secrets: a value that contains one is refused, so no granted
/// secret is stored in clear (the plugin gets an error saying why).
pub struct Services {
    inner: Arc<dyn StageServices>,
    log: StageLog,
    metadata_quota: Quota,
    blob_quota: Quota,
}

impl Services {
    pub fn new(inner: Arc<dyn StageServices>, log: StageLog, limits: &Limits) -> Self {
        Self {
            inner,
            log,
            metadata_quota: Quota { entries: limits.metadata_entries, bytes: limits.metadata_bytes.as_u64() },
            blob_quota: Quota { entries: limits.blobs, bytes: limits.blob_bytes.as_u64() },
        }
    }

    /// The error a plugin gets for a write past a quota; the log names it
    /// too, so a stage that fails over it says why.
    fn full(&self, what: &str, quota: Quota, limits: &str) -> String {
        self.log.record_denial(format!("a write past the quota of {what} ({limits})"));
        format!("{what} may hold {} entries and {} bytes of keys and values ({limits}); the write was refused", quota.entries, quota.bytes)
    }

    fn refuse_secret(&self, what: &str, data: &[u8]) -> Option<String> {
        self.log.contains_secret(data).then(|| {
            self.log.record_denial(format!("storing a {what} that contains a granted secret"));
            format!("{what}s may not contain a granted secret's value; store a reference to the secret instead")
        })
    }
}

pub(super) fn add_to_linker(linker: &mut Linker<RunState>) -> wasmtime::Result<()> {
    metadata::add_to_linker::<_, HasSelf<Services>>(linker, |s| &mut s.services)?;
    commands::add_to_linker::<_, HasSelf<Services>>(linker, |s| &mut s.services)?;
    blobs::add_to_linker::<_, HasSelf<Services>>(linker, |s| &mut s.services)
}

/// A host fault becomes a trap that names the service.
fn host_fault(service: &str, e: anyhow::Error) -> wasmtime::Error {
    wasmtime::Error::msg(format!("host {service} service failed: {e:#}"))
}

fn scope(s: metadata::Scope) -> MetaScope {
    match s {
        metadata::Scope::Stage => MetaScope::Stage,
        metadata::Scope::Deployment => MetaScope::Deployment,
    }
}

impl metadata::Host for Services {
    fn get(&mut self, s: metadata::Scope, key: String) -> wasmtime::Result<Option<String>> {
        self.inner.metadata_get(scope(s), &key).map_err(|e| host_fault("metadata", e))
    }

    fn put(&mut self, s: metadata::Scope, key: String, value: String) -> wasmtime::Result<Result<(), String>> {
        if key.is_empty() || key.len() > MAX_METADATA_KEY {
            return Ok(Err(format!("metadata keys must be 1 to {MAX_METADATA_KEY} bytes")));
        }
        if value.len() > MAX_METADATA_VALUE {
            return Ok(Err(format!("metadata values are limited to {MAX_METADATA_VALUE} bytes; use blobs for more")));
        }
        if let Some(refused) = self.refuse_secret("metadata value", value.as_bytes()).or_else(|| self.refuse_secret("metadata key", key.as_bytes())) {
            return Ok(Err(refused));
        }
        if !self.inner.metadata_put(scope(s), &key, &value, self.metadata_quota).map_err(|e| host_fault("metadata", e))? {
            let what = match s {
                metadata::Scope::Stage => "the stage's metadata",
                metadata::Scope::Deployment => "the deployment's metadata",
            };
            return Ok(Err(self.full(what, self.metadata_quota, "`limits.metadata-entries`, `limits.metadata-bytes`")));
        }
        Ok(Ok(()))
    }

    fn entries(&mut self, s: metadata::Scope) -> wasmtime::Result<Vec<(String, String)>> {
        self.inner.metadata_entries(scope(s)).map_err(|e| host_fault("metadata", e))
    }
}

impl commands::Host for Services {
    fn received(&mut self) -> wasmtime::Result<Vec<commands::Command>> {
        let list = self.inner.commands().map_err(|e| host_fault("commands", e))?;
        Ok(list
            .into_iter()
            .map(|c| commands::Command {
                id: c.id,
                kind: match c.kind {
                    CommandKind::Approve => commands::CommandKind::Approve,
                    CommandKind::Skip => commands::CommandKind::Skip,
                },
                commander: c.commander,
                created_at: c.created_at,
            })
            .collect())
    }

    fn answer(&mut self, id: String, verdict: Result<(), String>) -> wasmtime::Result<()> {
        let verdict = verdict.map_err(|reason| {
            let mut reason = self.log.mask(&reason);
            if reason.len() > MAX_REFUSAL {
                let cut = (0..=MAX_REFUSAL - 3).rev().find(|&i| reason.is_char_boundary(i)).unwrap_or(0);
                reason.truncate(cut);
                reason.push('…');
            }
            reason
        });
        self.inner.answer_command(&id, verdict).map_err(|e| host_fault("commands", e))
    }
}

impl blobs::Host for Services {
    fn get(&mut self, key: String) -> wasmtime::Result<Option<Vec<u8>>> {
        self.inner.blob_get(&key).map_err(|e| host_fault("blobs", e))
    }

    fn put(&mut self, key: String, value: Vec<u8>) -> wasmtime::Result<Result<(), String>> {
        if key.is_empty() || key.len() > MAX_METADATA_KEY {
            return Ok(Err(format!("blob keys must be 1 to {MAX_METADATA_KEY} bytes")));
        }
        if value.len() > MAX_BLOB {
            return Ok(Err(format!("blobs are limited to {MAX_BLOB} bytes")));
        }
        if let Some(refused) = self.refuse_secret("blob", &value).or_else(|| self.refuse_secret("blob key", key.as_bytes())) {
            return Ok(Err(refused));
        }
        if !self.inner.blob_put(&key, &value, self.blob_quota).map_err(|e| host_fault("blobs", e))? {
            return Ok(Err(self.full("the blobs of this plugin and application", self.blob_quota, "`limits.blobs`, `limits.blob-bytes`")));
        }
        Ok(Ok(()))
    }

    fn delete(&mut self, key: String) -> wasmtime::Result<()> {
        self.inner.blob_delete(&key).map_err(|e| host_fault("blobs", e))
    }
}
