//! The store handles a phase receives, scoped by the migration: only
//! selected keys are visible or writable, values come through the
//! migration's transform, writes need the unit's claim, deletes need a
//! passed `verify` and a destination holding the key as the source does,
//! and continue tokens are bound to the migration.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use super::kv::{KvStore, Pair};
use super::ledger::Ledger;
use cordon_runtime::runner::{ItemActionSession, ItemOutcome, KeyBatch, KeyFilterSession};
use cordon_runtime::sandbox::stores::{Budget, Entry, MigrationStores, Page};

/// Raw keys read per store round trip while filling a page.
const RAW_PAGE: usize = 1024;

/// An item action applied to values on their way out of the source.
pub struct Transform {
    pub session: Mutex<ItemActionSession>,
    pub options: String,
}

pub struct ScopedStores {
    pub id: String,
    pub unit: String,
    pub source: Arc<dyn KvStore>,
    pub destination: Arc<dyn KvStore>,
    pub filter: Mutex<KeyFilterSession>,
    pub transform: Option<Transform>,
    pub budget: super::spec::Budget,
    pub ledger: Arc<Ledger>,
    claimed: AtomicBool,
    verified: AtomicBool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Source,
    Destination,
}

impl Side {
    fn tag(self) -> &'static str {
        match self {
            Side::Source => "source",
            Side::Destination => "destination",
        }
    }
}

fn pack(keys: &[&[u8]]) -> KeyBatch {
    let mut batch = KeyBatch { data: Vec::with_capacity(keys.iter().map(|k| k.len()).sum()), ends: Vec::with_capacity(keys.len()) };
    for key in keys {
        batch.data.extend_from_slice(key);
        batch.ends.push(batch.data.len() as u32);
    }
    batch
}

fn show(key: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(key))
}

impl ScopedStores {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: &str,
        unit: &str,
        source: Arc<dyn KvStore>,
        destination: Arc<dyn KvStore>,
        filter: KeyFilterSession,
        transform: Option<Transform>,
        budget: super::spec::Budget,
        ledger: Arc<Ledger>,
        verified: bool,
    ) -> anyhow::Result<Self> {
        let claimed = ledger.holds_claim(unit, id)?;
        Ok(Self {
            id: id.to_string(),
            unit: unit.to_string(),
            source,
            destination,
            filter: Mutex::new(filter),
            transform,
            budget,
            ledger,
            claimed: AtomicBool::new(claimed),
            verified: AtomicBool::new(verified),
        })
    }

    /// `verify` passed: deletes are allowed from now on.
    pub fn mark_verified(&self) {
        self.verified.store(true, Ordering::SeqCst);
    }

    fn mac(&self, side: Side, key: &[u8]) -> String {
        let digest = Sha256::new().chain_update(self.id.as_bytes()).chain_update([0]).chain_update(side.tag()).chain_update([0]).chain_update(key).finalize();
        hex::encode(&digest[..8])
    }

    fn token(&self, side: Side, key: &[u8]) -> String {
        format!("{}.{}", URL_SAFE_NO_PAD.encode(key), self.mac(side, key))
    }

    fn untoken(&self, side: Side, token: &str) -> Result<Vec<u8>, String> {
        let refuse = || {
            format!(
                "invalid continue token {token:?}: it was not issued by a {} scan of migration {}; pass the `continue-from` of the previous page (or none to start over)",
                side.tag(),
                self.id
            )
        };
        let (key, mac) = token.split_once('.').ok_or_else(refuse)?;
        let key = URL_SAFE_NO_PAD.decode(key).map_err(|_| refuse())?;
        if self.mac(side, &key) != mac {
            return Err(refuse());
        }
        Ok(key)
    }

    /// Which of `keys` the selector selects; unclassified keys are an error
    /// (they must never be silently copied or left behind).
    async fn selected(&self, keys: &[&[u8]]) -> Result<Vec<bool>, String> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let selection = self.filter.lock().await.select(&pack(keys)).await.map_err(|e| e.to_string())?;
        if let Some(&i) = selection.unclassified.first() {
            return Err(format!(
                "the selector could not classify {} key(s), first {}: fix the selector's options before migrating",
                selection.unclassified.len(),
                show(keys[i as usize])
            ));
        }
        Ok((0..keys.len()).map(|i| selection.selected.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0)).collect())
    }

    async fn transformed(&self, key: &[u8], value: Vec<u8>) -> Result<Option<Vec<u8>>, String> {
        let Some(t) = &self.transform else { return Ok(Some(value)) };
        let text = std::str::from_utf8(&value).map_err(|_| format!("key {}: the value is not UTF-8 JSON, so the transform cannot read it", show(key)))?;
        match t.session.lock().await.execute(&t.options, text).await.map_err(|e| format!("key {}: transform: {e}", show(key)))? {
            ItemOutcome::Unchanged => Ok(Some(value)),
            ItemOutcome::Modified(v) => Ok(Some(v.into_bytes())),
            ItemOutcome::Skip => Ok(None),
            ItemOutcome::WithAdditionalItems(_) => Err(format!("key {}: the transform added items, which a key migration cannot place", show(key))),
        }
    }

    /// One page of selected entries of `side` from `token`, within `budget`
    /// capped by the spec's.
    async fn scan(&self, side: Side, token: Option<String>, budget: Budget) -> Result<Page, String> {
        let kv = match side {
            Side::Source => &self.source,
            Side::Destination => &self.destination,
        };
        let max_entries = budget.max_entries.clamp(1, self.budget.entries) as usize;
        let max_bytes = budget.max_bytes.clamp(1, self.budget.bytes.as_u64());
        let mut cursor = match &token {
            Some(t) => self.untoken(side, t)?,
            None => Vec::new(),
        };
        let mut entries = Vec::new();
        let mut bytes = 0u64;
        loop {
            let (raw, more) = kv.range(&cursor, RAW_PAGE.max(max_entries + 1)).await.map_err(|e| format!("{e:#}"))?;
            let keys: Vec<&[u8]> = raw.iter().map(|(k, _)| k.as_slice()).collect();
            let selected = self.selected(&keys).await?;
            let last = raw.last().map(|(k, _)| k.clone());
            for ((key, value), chosen) in raw.into_iter().zip(selected) {
                if !chosen {
                    continue;
                }
                let full = entries.len() == max_entries || bytes >= max_bytes;
                let size = (key.len() + value.len()) as u64;
                if full || (!entries.is_empty() && bytes + size > max_bytes) {
                    let next = self.token(side, &key);
                    return Ok(Page { entries, continue_from: Some(next) });
                }
                let value = match side {
                    Side::Source => match self.transformed(&key, value).await? {
                        Some(v) => v,
                        None => continue,
                    },
                    Side::Destination => value,
                };
                bytes += size;
                entries.push(Entry { key, value });
            }
            match last {
                Some(mut last) if more => {
                    last.push(0);
                    cursor = last;
                }
                _ => return Ok(Page { entries, continue_from: None }),
            }
        }
    }

    /// Refuses keys outside the selection.
    async fn check_selected(&self, keys: &[&[u8]], what: &str) -> Result<(), String> {
        let selected = self.selected(keys).await?;
        if let Some(i) = selected.iter().position(|s| !s) {
            return Err(format!("{what} of key {} refused: it is outside the migration's selection", show(keys[i])));
        }
        Ok(())
    }

    fn check_claimed(&self, what: &str) -> Result<(), String> {
        if !self.claimed.load(Ordering::SeqCst) {
            return Err(format!("{what} refused: migration {} does not hold the claim on its unit yet (a `prepare` phase claims it)", self.id));
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl MigrationStores for ScopedStores {
    async fn source_scan(&self, token: Option<String>, budget: Budget) -> Result<Page, String> {
        self.scan(Side::Source, token, budget).await
    }

    async fn source_get(&self, key: Vec<u8>) -> Result<Option<Vec<u8>>, String> {
        if !self.selected(&[&key]).await?[0] {
            return Ok(None);
        }
        match self.source.get(&key).await.map_err(|e| format!("{e:#}"))? {
            Some(v) => self.transformed(&key, v).await,
            None => Ok(None),
        }
    }

    /// Deletes a key only if the destination holds it as the source holds it
    /// now (its value through the transform), and only if the source still
    /// holds that value at the moment of the delete (compare-and-delete): a
    /// key written after it was copied — changed, or new — is kept, and the
    /// call fails naming it, so the operator copies again. Nothing a writer
    /// did meanwhile is lost.
    async fn source_delete(&self, keys: Vec<Vec<u8>>) -> Result<u32, String> {
        self.check_claimed("delete")?;
        if !self.verified.load(Ordering::SeqCst) {
            return Err(format!("delete refused: migration {} has not passed `verify`; source keys are deleted only after the copy is verified", self.id));
        }
        let refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        self.check_selected(&refs, "delete").await?;
        let (mut copied, mut changed) = (Vec::new(), Vec::new());
        for key in keys {
            let Some(value) = self.source.get(&key).await.map_err(|e| format!("{e:#}"))? else { continue };
            let expected = self.transformed(&key, value.clone()).await?;
            let held = self.destination.get(&key).await.map_err(|e| format!("{e:#}"))?;
            if expected.is_some() && held == expected {
                copied.push((key, value));
            } else {
                changed.push(key);
            }
        }
        let (deleted, kept) = self.source.delete_unchanged(&copied).await.map_err(|e| format!("{e:#}"))?;
        changed.extend(kept);
        if let Some(first) = changed.first() {
            return Err(format!(
                "{} key(s) changed in the source since they were copied (first {}): they were kept there ({deleted} unchanged key(s) deleted); \
                 stop the unit's writers, then `cordon migrate abort {}` and migrate the unit again",
                changed.len(),
                show(first),
                self.id
            ));
        }
        Ok(deleted)
    }

    async fn claim(&self) -> Result<(), String> {
        self.ledger.claim(&self.unit, &self.id).map_err(|e| format!("{e:#}"))?;
        self.claimed.store(true, Ordering::SeqCst);
        Ok(())
    }

    async fn destination_put(&self, entries: Vec<Entry>) -> Result<(), String> {
        self.check_claimed("put")?;
        let refs: Vec<&[u8]> = entries.iter().map(|e| e.key.as_slice()).collect();
        self.check_selected(&refs, "put").await?;
        let pairs: Vec<Pair> = entries.into_iter().map(|e| (e.key, e.value)).collect();
        self.destination.put(&pairs).await.map_err(|e| format!("{e:#}"))
    }

    async fn destination_get(&self, key: Vec<u8>) -> Result<Option<Vec<u8>>, String> {
        if !self.selected(&[&key]).await?[0] {
            return Ok(None);
        }
        self.destination.get(&key).await.map_err(|e| format!("{e:#}"))
    }

    async fn destination_scan(&self, token: Option<String>, budget: Budget) -> Result<Page, String> {
        self.scan(Side::Destination, token, budget).await
    }
}
