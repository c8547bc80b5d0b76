//! Item actions: JSON items (Kubernetes-style objects, one per line) pass
//! through an item-action component, in the manner of Velero's restore
//! item actions.
//!
//! The host evaluates the action's `applies-to` selector (kinds,
//! namespaces, labels; empty matches everything) and calls `execute` only
//! for matching items. An item the action leaves alone — not selected, or
//! answered `unchanged` — is written out byte for byte as it was read.
//! Additional items returned by the action are processed the same way,
//! after the item that produced them, and de-duplicated by identity
//! (apiVersion, kind, namespace, name) across the whole run, so cycles end.
//!
//! An action cannot make the host hold or write without bound: each input
//! item expands into at most [`MAX_ADDITIONAL`] items, the additional items
//! waiting to be processed hold at most [`MAX_PENDING`] bytes, the output of
//! a run is at most [`OUTPUT_SLACK`] plus [`OUTPUT_FACTOR`] times its input,
//! and de-duplication keeps a 32-byte digest per distinct item, for at most
//! [`MAX_DISTINCT`] items.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, Write};

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use cordon_runtime::runner::{ItemActionSession, ItemOutcome, ItemSelector};

/// Additional items one input item may expand into, at most.
pub const MAX_ADDITIONAL: usize = 10_000;
/// Bytes of additional items waiting to be processed, at most: what an
/// action can make the host hold at once besides the item in hand.
pub const MAX_PENDING: usize = 64 << 20;
/// Output bytes a run may write beyond [`OUTPUT_FACTOR`] times its input.
pub const OUTPUT_SLACK: u64 = 64 << 20;
/// How many times its input a run's output may be, besides the slack.
pub const OUTPUT_FACTOR: u64 = 8;
/// Distinct items one run de-duplicates, at most.
pub const MAX_DISTINCT: usize = 2_000_000;

/// The identities seen so far, as digests, so memory is bounded per item.
struct Seen(HashSet<[u8; 32]>);

impl Seen {
    /// Whether `identity` is new; errors past [`MAX_DISTINCT`].
    fn insert(&mut self, identity: &str) -> Result<bool> {
        let new = self.0.insert(Sha256::digest(identity.as_bytes()).into());
        if self.0.len() > MAX_DISTINCT {
            bail!("more than {MAX_DISTINCT} distinct items in one run; split the input");
        }
        Ok(new)
    }
}

/// Counts what a run reads and writes, and stops it past its output budget.
struct Volume<'a> {
    output: &'a mut dyn Write,
    read: u64,
    written: u64,
}

impl Volume<'_> {
    fn write(&mut self, text: &str) -> Result<()> {
        self.written += text.len() as u64 + 1;
        let budget = OUTPUT_SLACK + OUTPUT_FACTOR * self.read;
        if self.written > budget {
            bail!("the item action's output passed {budget} bytes ({OUTPUT_FACTOR} times the input plus {} MiB); refusing to write more", OUTPUT_SLACK >> 20);
        }
        writeln!(self.output, "{text}")?;
        Ok(())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub items: u64,
    pub modified: u64,
    pub skipped: u64,
    pub unchanged: u64,
    pub additional: u64,
    pub duplicates: u64,
}

/// What the host reads of an item to match selectors and de-duplicate.
/// Every other field is skipped unread, so values the host could not
/// represent (numbers beyond `f64`) never trouble it.
struct Meta {
    identity: String,
    kind: String,
    namespace: String,
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Head {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    metadata: HeadMetadata,
}

#[derive(Deserialize, Default)]
struct HeadMetadata {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// Reads an item's head; an item must be a JSON object.
fn meta(text: &str, what: &str) -> Result<Meta> {
    let head: Head = serde_json::from_str(text).with_context(|| format!("{what} is not a valid item (a JSON object with string kind, metadata.name, metadata.namespace and labels)"))?;
    let m = head.metadata;
    Ok(Meta {
        identity: format!("{}|{}|{}|{}", head.api_version, head.kind, m.namespace, m.name),
        kind: head.kind,
        namespace: m.namespace,
        labels: m.labels,
    })
}

fn applies(selector: &ItemSelector, m: &Meta) -> bool {
    (selector.kinds.is_empty() || selector.kinds.iter().any(|k| k.eq_ignore_ascii_case(&m.kind)))
        && (selector.namespaces.is_empty() || selector.namespaces.contains(&m.namespace))
        && selector.labels.iter().all(|(k, v)| m.labels.get(k) == Some(v))
}

/// Applies the action to every item of `input`, writing results to `output`.
pub async fn run(input: impl BufRead, output: &mut dyn Write, session: &mut ItemActionSession, options: &str) -> Result<Stats> {
    let selector = session.applies_to(options).await.map_err(|e| anyhow::anyhow!("applies-to failed: {e}"))?;
    let mut stats = Stats::default();
    let mut seen = Seen(HashSet::new());
    let mut out = Volume { output, read: 0, written: 0 };
    for (n, line) in input.lines().enumerate() {
        let line = line.context("cannot read the input")?;
        out.read += line.len() as u64 + 1;
        if line.trim().is_empty() {
            continue;
        }
        let what = format!("input line {}", n + 1);
        let m = meta(&line, &what)?;
        if !seen.insert(&m.identity)? {
            stats.duplicates += 1;
            continue;
        }
        stats.items += 1;
        // Depth-first: the item, then what it adds, then what those add.
        let mut queue: Vec<(String, Meta)> = vec![(line, m)];
        let mut expanded = 0usize;
        let mut pending = 0usize;
        while let Some((text, m)) = queue.pop() {
            pending = pending.saturating_sub(text.len());
            if !applies(&selector, &m) {
                stats.unchanged += 1;
                out.write(&text)?;
                continue;
            }
            let outcome = session.execute(options, &text).await.map_err(|e| anyhow::anyhow!("{what}: the item action failed: {e}"))?;
            let (result, additional) = match outcome {
                ItemOutcome::Unchanged => {
                    stats.unchanged += 1;
                    (Some(text), Vec::new())
                }
                ItemOutcome::Skip => {
                    stats.skipped += 1;
                    (None, Vec::new())
                }
                ItemOutcome::Modified(modified) => {
                    meta(&modified, &format!("{what}: the modified item"))?;
                    stats.modified += 1;
                    (Some(modified), Vec::new())
                }
                ItemOutcome::WithAdditionalItems(w) => {
                    meta(&w.item, &format!("{what}: the returned item"))?;
                    if w.item == text {
                        stats.unchanged += 1;
                    } else {
                        stats.modified += 1;
                    }
                    (Some(w.item), w.additional)
                }
            };
            if let Some(result) = result {
                out.write(&result)?;
            }
            // Reverse so that additional items come out in the order given.
            for extra in additional.into_iter().rev() {
                let m = meta(&extra, &format!("{what}: an additional item"))?;
                if !seen.insert(&m.identity)? {
                    stats.duplicates += 1;
                    continue;
                }
                expanded += 1;
                if expanded > MAX_ADDITIONAL {
                    bail!("{what}: the item action added more than {MAX_ADDITIONAL} items");
                }
                stats.additional += 1;
                pending += extra.len();
                if pending > MAX_PENDING {
                    bail!("{what}: the item action's pending additional items passed {MAX_PENDING} bytes; refusing to hold more");
                }
                queue.push((extra, m));
            }
        }
    }
    out.output.flush()?;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run writes at most the slack plus a multiple of what it read.
    #[test]
    fn output_is_bounded_by_the_input() {
        let mut sink = std::io::sink();
        let mut out = Volume { output: &mut sink, read: 1000, written: 0 };
        let line = "x".repeat(1 << 20);
        let mut written = 0u64;
        let err = loop {
            match out.write(&line) {
                Ok(()) => written += line.len() as u64 + 1,
                Err(e) => break e.to_string(),
            }
        };
        assert!(err.contains("output passed") && err.contains("times the input"), "{err}");
        assert!(written <= OUTPUT_SLACK + OUTPUT_FACTOR * 1000, "{written}");
    }
}
