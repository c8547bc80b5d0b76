//! The unit of work of key filtering: keys packed the way the key-filter
//! world takes them, with the input lines to write out for them. Every
//! reader (plain lines, JSON lines, etcdctl dumps) fills batches; the filter
//! drives them through plugin sessions.

use anyhow::{Context, Result};

use cordon_runtime::runner::KeyBatch;

/// Keys per batch, and bytes of key data per batch, at most.
pub const BATCH_KEYS: usize = 4096;
pub const BATCH_BYTES: usize = 256 * 1024;
/// One batch of input.
pub struct Batch {
    pub(super) seq: u64,
    pub(super) keys: KeyBatch,
    /// The input lines, for JSON-lines output (empty for plain keys).
    lines: Vec<u8>,
    pub(super) line_ends: Vec<u32>,
}

impl Batch {
    pub(super) fn new(seq: u64) -> Self {
        Batch {
            seq,
            keys: KeyBatch { data: Vec::with_capacity(BATCH_BYTES + 4096), ends: Vec::with_capacity(BATCH_KEYS) },
            lines: Vec::new(),
            line_ends: Vec::new(),
        }
    }

    /// Adds a key, and the line to write out for it when one is kept.
    pub(super) fn push(&mut self, key: &[u8], line: Option<&[u8]>) -> Result<()> {
        self.keys.data.extend_from_slice(key);
        self.keys.ends.push(u32::try_from(self.keys.data.len()).context("batch too large")?);
        if let Some(line) = line {
            self.lines.extend_from_slice(line);
            self.line_ends.push(u32::try_from(self.lines.len()).context("batch too large")?);
        }
        Ok(())
    }

    pub(super) fn len(&self) -> usize {
        self.keys.ends.len()
    }

    pub(super) fn key_bytes(&self) -> usize {
        self.keys.data.len()
    }

    pub(super) fn key(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.keys.ends[i - 1] as usize };
        &self.keys.data[start..self.keys.ends[i] as usize]
    }

    pub(super) fn line(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.line_ends[i - 1] as usize };
        &self.lines[start..self.line_ends[i] as usize]
    }
}
