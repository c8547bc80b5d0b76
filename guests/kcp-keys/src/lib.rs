//! `kcp-keys`: selects the etcd keys of one kcp logical cluster.
//!
//! One source, two builds: the `key-filter` component (`wasm32-wasip2`) and
//! a native library, so the benchmark compares like with like.
//!
//! # Key layout
//!
//! After the storage prefix (and, when `shard` is configured, one shard
//! segment), a key is
//!
//! ```text
//! <group>/<resource>/<cluster>/[<namespace>/]<name>                    built-in
//! <group>/<resource>/customresources/<cluster>/[<namespace>/]<name>    from a CRD
//! <group>/<resource>/<identity>/<cluster>/[<namespace>/]<name>         from an APIExport
//! ```
//!
//! The group segment is always present (`core` for the core group).
//!
//! # Traps, and how each is handled
//!
//! - **A 5-segment key read both ways**: `g/r/a/b/c` is built-in namespaced
//!   (cluster `a`) *or* identity cluster-scoped (cluster `b`) when `a` is an
//!   identity. Every reading is evaluated; if they disagree about the target
//!   cluster the key is **unclassified** (counted and reported by the host,
//!   never silently dropped or selected).
//! - **An identity equal to a cluster name**: a configured identity is read
//!   only as an identity, except when it equals the target cluster's name;
//!   then both readings are tried and disagreement is unclassified.
//! - **An identity that was not configured**: a segment that looks like an
//!   identity hash (64 hex digits) in identity position gets the identity
//!   reading too, so an unlisted APIExport cannot hide the cluster's keys.
//! - **A namespace named like the target cluster**: only the cluster
//!   position counts, so `g/r/other/<target>/name` is not selected.
//! - **Cluster `X` versus `XY`**: segments are compared whole; delete
//!   prefixes always end with `/`.
//! - **Keys under another prefix** or of a shape the layout does not allow
//!   are rejected, unless they mention the target cluster as a segment, in
//!   which case they are unclassified.
//!
//! A key that does not contain `/<cluster>/` at all cannot belong to the
//! cluster under any reading; a substring search over a whole batch rejects
//! those without parsing them, which is what makes the filter fast.

use std::collections::{BTreeSet, HashSet};

use memchr::memmem::Finder;
use serde::Deserialize;

/// Options, as JSON: `{"prefix": "/registry", "cluster": "root:org",
/// "identities": ["<64 hex>", ...], "shard": "shard-1"}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {
    #[serde(default = "default_prefix")]
    pub prefix: String,
    pub cluster: String,
    #[serde(default)]
    pub identities: Vec<String>,
    /// A shard segment right after the prefix: its name, or `*` for any.
    #[serde(default)]
    pub shard: Option<String>,
}

fn default_prefix() -> String {
    "/registry".to_string()
}

/// How one key is classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Selected,
    Rejected,
    Unclassified,
}

/// The compiled selection of one cluster.
pub struct Classifier {
    /// The prefix with its trailing `/`.
    prefix: Vec<u8>,
    cluster: Vec<u8>,
    identities: HashSet<Vec<u8>>,
    shard: Option<Vec<u8>>,
    finder: Finder<'static>,
}

fn looks_like_identity(segment: &[u8]) -> bool {
    segment.len() == 64 && segment.iter().all(|b| b.is_ascii_hexdigit())
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty() && !s.contains('/')
}

/// At most this many segments are looked at after the prefix.
const MAX_SEGMENTS: usize = 8;

impl Classifier {
    pub fn new(options: &str) -> Result<Self, String> {
        Self::from_options(serde_json::from_str(options).map_err(|e| format!("invalid kcp-keys options: {e}"))?)
    }

    pub fn from_options(o: Options) -> Result<Self, String> {
        if !valid_segment(&o.cluster) {
            return Err(format!("invalid kcp-keys options: `cluster` {:?} must be a non-empty name without '/'", o.cluster));
        }
        if !o.prefix.starts_with('/') {
            return Err(format!("invalid kcp-keys options: `prefix` {:?} must start with '/'", o.prefix));
        }
        if let Some(bad) = o.identities.iter().find(|i| !valid_segment(i)) {
            return Err(format!("invalid kcp-keys options: identity {bad:?} must be a non-empty segment without '/'"));
        }
        if let Some(shard) = &o.shard
            && !valid_segment(shard)
        {
            return Err(format!("invalid kcp-keys options: `shard` {shard:?} must be a name or `*`"));
        }
        let mut prefix = o.prefix.trim_end_matches('/').as_bytes().to_vec();
        prefix.push(b'/');
        let needle = format!("/{}/", o.cluster).into_bytes();
        Ok(Self {
            prefix,
            cluster: o.cluster.into_bytes(),
            identities: o.identities.into_iter().map(String::into_bytes).collect(),
            shard: o.shard.map(String::into_bytes),
            finder: Finder::new(&needle).into_owned(),
        })
    }

    /// Classifies one key; `Some(len)` with a selected key is the length of
    /// its delete prefix (through the cluster segment and its `/`).
    pub fn classify(&self, key: &[u8]) -> (Verdict, usize) {
        if self.finder.find(key).is_none() {
            return (Verdict::Rejected, 0);
        }
        self.parse(key)
    }

    /// Full classification of a key that contains `/<cluster>/`.
    fn parse(&self, key: &[u8]) -> (Verdict, usize) {
        let malformed = (Verdict::Unclassified, 0);
        let Some(rest) = key.strip_prefix(self.prefix.as_slice()) else {
            return malformed;
        };
        // Segment boundaries: (start, end) offsets within `key`.
        let base = self.prefix.len();
        let mut segs = [(0usize, 0usize); MAX_SEGMENTS];
        let mut count = 0;
        let mut start = 0;
        for part in rest.split(|&b| b == b'/') {
            if count == MAX_SEGMENTS {
                return malformed;
            }
            segs[count] = (base + start, base + start + part.len());
            count += 1;
            start += part.len() + 1;
        }
        let seg = |i: usize| &key[segs[i].0..segs[i].1];
        let mut first = 0;
        if let Some(shard) = &self.shard {
            if count == 0 || (shard.as_slice() != b"*" && seg(0) != shard.as_slice()) {
                return (Verdict::Rejected, 0);
            }
            first = 1;
        }
        if (first..count).any(|i| seg(i).is_empty()) {
            return malformed;
        }
        // Relative to group: tail starts at first + 2.
        let tail = first + 2;
        let tail_len = count.saturating_sub(tail);
        let mut readings: [usize; 2] = [0; 2];
        let mut n = 0;
        let mut read = |cluster_index: usize| {
            readings[n] = cluster_index;
            n += 1;
        };
        if tail_len < 2 {
            return malformed;
        }
        let head = seg(tail);
        if head == b"customresources" {
            if !(3..=4).contains(&tail_len) {
                return malformed;
            }
            read(tail + 1);
        } else {
            // A configured identity is read as an identity only — unless it
            // equals the target cluster's name, when the built-in reading is
            // just as plausible.
            let known = self.identities.contains(head);
            let maybe_identity = known || looks_like_identity(head);
            let maybe_cluster = !known || head == self.cluster.as_slice();
            match tail_len {
                2 => read(tail),
                3 => {
                    if maybe_cluster {
                        read(tail);
                    }
                    if maybe_identity {
                        read(tail + 1);
                    }
                }
                4 if maybe_identity => read(tail + 1),
                _ => return malformed,
            }
        }
        let target = self.cluster.as_slice();
        let hits = readings[..n].iter().filter(|&&i| seg(i) == target).count();
        match hits {
            0 => (Verdict::Rejected, 0),
            h if h == n => (Verdict::Selected, segs[readings[0]].1 + 1),
            _ => (Verdict::Unclassified, 0),
        }
    }

    /// Classifies a packed batch: keys are `data[ends[i-1]..ends[i]]`.
    /// Sets bit `i` of `selected` for selected keys and lists unclassified
    /// indexes; `on_selected` sees each selected key and its prefix length.
    pub fn select_batch(
        &self,
        data: &[u8],
        ends: &[u32],
        selected: &mut Vec<u8>,
        unclassified: &mut Vec<u32>,
        mut on_selected: impl FnMut(&[u8], usize),
    ) -> Result<(), String> {
        selected.clear();
        selected.resize(ends.len().div_ceil(8), 0);
        unclassified.clear();
        if ends.windows(2).any(|w| w[0] > w[1]) || ends.last().is_some_and(|&e| e as usize > data.len()) {
            return Err("malformed key batch: `ends` must be ascending offsets within `data`".to_string());
        }
        let mut index = 0usize;
        let mut last_done = usize::MAX;
        // Every occurrence of `/<cluster>/` in the whole batch; keys with
        // none are rejected without being looked at.
        for pos in self.finder.find_iter(data) {
            while index < ends.len() && (ends[index] as usize) <= pos {
                index += 1;
            }
            if index == ends.len() {
                break;
            }
            if index == last_done || pos + self.finder.needle().len() > ends[index] as usize {
                continue;
            }
            last_done = index;
            let start = if index == 0 { 0 } else { ends[index - 1] as usize };
            let key = &data[start..ends[index] as usize];
            match self.parse(key) {
                (Verdict::Selected, len) => {
                    selected[index / 8] |= 1 << (index % 8);
                    on_selected(key, len);
                }
                (Verdict::Unclassified, _) => unclassified.push(index as u32),
                (Verdict::Rejected, _) => {}
            }
        }
        Ok(())
    }

    /// The delete prefixes of the selected keys of a batch.
    pub fn delete_prefixes(&self, data: &[u8], ends: &[u32]) -> Result<Vec<String>, String> {
        let mut prefixes = BTreeSet::new();
        let (mut selected, mut unclassified) = (Vec::new(), Vec::new());
        self.select_batch(data, ends, &mut selected, &mut unclassified, |key, len| {
            prefixes.insert(String::from_utf8_lossy(&key[..len]).into_owned());
        })?;
        Ok(prefixes.into_iter().collect())
    }
}

#[cfg(target_arch = "wasm32")]
mod component {
    use cordon_sdk::keys::{self, KeyFilter, Keys, Selection};

    use super::{Classifier, Options, Verdict};

    impl KeyFilter for Classifier {
        type Options = Options;

        fn new(options: Options) -> Result<Self, String> {
            Classifier::from_options(options)
        }

        fn classify(&self, key: &[u8]) -> keys::Verdict {
            match Classifier::classify(self, key).0 {
                Verdict::Selected => keys::Verdict::Selected,
                Verdict::Rejected => keys::Verdict::Rejected,
                Verdict::Unclassified => keys::Verdict::Unclassified,
            }
        }

        fn select(&self, batch: &Keys<'_>) -> Selection {
            let mut s = keys::selection(0);
            // `Keys::new` has checked the batch, so this cannot fail.
            let _ = self.select_batch(batch.data, batch.ends, &mut s.selected, &mut s.unclassified, |_, _| {});
            s
        }

        fn delete_prefixes(&self, batch: &Keys<'_>) -> Vec<String> {
            Classifier::delete_prefixes(self, batch.data, batch.ends).unwrap_or_default()
        }
    }

    cordon_sdk::key_filter_plugin!(Classifier);
}
