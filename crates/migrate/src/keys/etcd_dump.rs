//! The output of `etcdctl get --prefix -w json`: one JSON document whose
//! `kvs` array holds base64 keys and values. It is parsed as a stream —
//! entries become batches while the document is still being read — so a
//! dump of any size is filtered in constant memory.
//!
//! Selected entries are written as JSON lines,
//! `{"key":"<key>","value":"<base64 value>"}`.

use std::fmt;
use std::io::Read;

use anyhow::Result;
use base64::Engine;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::batch::{BATCH_BYTES, BATCH_KEYS, Batch};

/// Whether a buffer starts like an etcdctl JSON document: an object whose
/// first field is one of its top-level fields (`header`, `kvs`, `count`,
/// `more`).
pub fn looks_like_dump(head: &[u8]) -> bool {
    let text = String::from_utf8_lossy(&head[..head.len().min(64)]);
    let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    ["header", "kvs", "count", "more"].iter().any(|field| compact.starts_with(&format!("{{\"{field}\"")))
}

#[derive(Deserialize)]
struct Kv {
    key: String,
    #[serde(default)]
    value: String,
}

/// Collects entries into batches and hands full ones to `emit`.
struct Emitter<F> {
    batch: Batch,
    seq: u64,
    count: u64,
    emit: F,
    stopped: bool,
}

impl<F: FnMut(Batch) -> bool> Emitter<F> {
    fn push(&mut self, kv: Kv) -> Result<(), String> {
        if self.stopped {
            // Nobody reads the batches any more: stop parsing.
            return Err("the reader was stopped".to_string());
        }
        self.count += 1;
        let key = base64::engine::general_purpose::STANDARD
            .decode(kv.key.as_bytes())
            .map_err(|e| format!("entry {}: `key` is not base64: {e}", self.count))?;
        let shown = String::from_utf8(key.clone()).map_err(|_| format!("entry {}: the key is not UTF-8", self.count))?;
        let line = serde_json::json!({ "key": shown, "value": kv.value }).to_string();
        self.batch.push(&key, Some(line.as_bytes())).map_err(|e| e.to_string())?;
        if self.batch.len() >= BATCH_KEYS || self.batch.key_bytes() >= BATCH_BYTES {
            self.flush();
        }
        Ok(())
    }

    fn flush(&mut self) {
        if self.batch.len() == 0 || self.stopped {
            return;
        }
        let full = std::mem::replace(&mut self.batch, Batch::new(self.seq + 1));
        self.seq += 1;
        if !(self.emit)(full) {
            self.stopped = true;
        }
    }
}

struct Document<'a, F>(&'a mut Emitter<F>);
struct Entries<'a, F>(&'a mut Emitter<F>);

impl<'de, F: FnMut(Batch) -> bool> DeserializeSeed<'de> for Document<'_, F> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, F: FnMut(Batch) -> bool> Visitor<'de> for Document<'_, F> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an etcdctl JSON document with a `kvs` array")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<String>()? {
            if key == "kvs" {
                map.next_value_seed(Entries(&mut *self.0))?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

impl<'de, F: FnMut(Batch) -> bool> DeserializeSeed<'de> for Entries<'_, F> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, F: FnMut(Batch) -> bool> Visitor<'de> for Entries<'_, F> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of key/value entries")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(kv) = seq.next_element::<Kv>()? {
            self.0.push(kv).map_err(de::Error::custom)?;
        }
        Ok(())
    }
}

/// Streams the dump in `input` as batches to `emit` (which answers false
/// to stop early).
pub fn stream(input: impl Read, emit: impl FnMut(Batch) -> bool) -> Result<()> {
    let mut emitter = Emitter { batch: Batch::new(0), seq: 0, count: 0, emit, stopped: false };
    let mut reader = serde_json::Deserializer::from_reader(input);
    Document(&mut emitter)
        .deserialize(&mut reader)
        .map_err(|e| anyhow::anyhow!("the input is not a valid etcdctl JSON dump: {e}"))?;
    emitter.flush();
    Ok(())
}
