//! Writing a key filter in plain Rust: implement [`KeyFilter`] and register
//! it with [`key_filter_plugin!`](crate::key_filter_plugin!).
//!
//! The host configures one instance with the filter's options, then sends
//! keys in packed batches ([`Keys`]); the filter answers with a bitmap. Only
//! [`KeyFilter::classify`] is required; a filter that can reject most keys
//! without looking at each one (a substring search over the whole batch,
//! say) overrides [`KeyFilter::select`].
//!
//! ```
//! use cordon_sdk::Verdict;
//!
//! #[derive(serde::Deserialize)]
//! struct Options { tenant: String }
//! struct Tenant(Vec<u8>);
//! impl cordon_sdk::KeyFilter for Tenant {
//!     type Options = Options;
//!     fn new(o: Options) -> Result<Self, String> { Ok(Tenant(format!("/{}/", o.tenant).into_bytes())) }
//!     fn classify(&self, key: &[u8]) -> Verdict {
//!         if key.starts_with(&self.0) { Verdict::Selected } else { Verdict::Rejected }
//!     }
//! }
//! cordon_sdk::key_filter_plugin!(Tenant);
//! # fn main() {}
//! ```

use std::collections::BTreeSet;

use serde::de::DeserializeOwned;

pub use crate::key_filter::exports::cordon::plugin::key_selection::{KeyBatch, Selection};

/// How one key is classified. Unclassified keys are neither selected nor
/// dropped: the host counts and reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Selected,
    Rejected,
    Unclassified,
}

/// A packed batch of keys: key `i` is `data[ends[i-1]..ends[i]]`.
pub struct Keys<'a> {
    pub data: &'a [u8],
    pub ends: &'a [u32],
}

impl<'a> Keys<'a> {
    /// Checks that `ends` are ascending offsets within `data`.
    pub fn new(data: &'a [u8], ends: &'a [u32]) -> Result<Self, String> {
        if ends.windows(2).any(|w| w[0] > w[1]) || ends.last().is_some_and(|&e| e as usize > data.len()) {
            return Err("malformed key batch: `ends` must be ascending offsets within `data`".to_string());
        }
        Ok(Self { data, ends })
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Key `i`.
    pub fn get(&self, i: usize) -> &'a [u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        &self.data[start..self.ends[i] as usize]
    }

    pub fn iter(&self) -> impl Iterator<Item = &'a [u8]> + '_ {
        (0..self.len()).map(|i| self.get(i))
    }
}

/// An empty selection for `n` keys.
pub fn selection(n: usize) -> Selection {
    Selection { selected: vec![0; n.div_ceil(8)], unclassified: Vec::new() }
}

/// Records the verdict of key `i` in `s`.
pub fn mark(s: &mut Selection, i: usize, verdict: Verdict) {
    match verdict {
        Verdict::Selected => s.selected[i / 8] |= 1 << (i % 8),
        Verdict::Unclassified => s.unclassified.push(i as u32),
        Verdict::Rejected => {}
    }
}

/// A key filter: one configured instance per host session.
pub trait KeyFilter: Sized + 'static {
    /// The filter's options, parsed with serde.
    type Options: DeserializeOwned;

    /// Builds the filter; an error names the bad option.
    fn new(options: Self::Options) -> Result<Self, String>;

    fn classify(&self, key: &[u8]) -> Verdict;

    /// The delete prefix (ending in `/`) of a selected key, when the
    /// selection can be expressed as prefixes.
    fn delete_prefix(&self, _key: &[u8]) -> Option<String> {
        None
    }

    /// Classifies a whole batch.
    fn select(&self, keys: &Keys<'_>) -> Selection {
        let mut s = selection(keys.len());
        for (i, key) in keys.iter().enumerate() {
            mark(&mut s, i, self.classify(key));
        }
        s
    }

    /// The distinct delete prefixes of a batch's selected keys.
    fn delete_prefixes(&self, keys: &Keys<'_>) -> Vec<String> {
        let prefixes: BTreeSet<String> =
            keys.iter().filter(|k| self.classify(k) == Verdict::Selected).filter_map(|k| self.delete_prefix(k)).collect();
        prefixes.into_iter().collect()
    }
}

#[doc(hidden)]
pub fn configure<F: KeyFilter>(options: &str) -> Result<F, String> {
    let options = serde_json::from_str(options).map_err(|e| format!("invalid key filter options: {e}"))?;
    F::new(options)
}

/// Registers a [`KeyFilter`] as the component's `key-selection` export.
#[macro_export]
macro_rules! key_filter_plugin {
    ($filter:ty) => {
        const _: () = {
            use $crate::key_filter::exports::cordon::plugin::key_selection::{Guest, KeyBatch, Selection};
            ::std::thread_local! {
                static FILTER: ::std::cell::RefCell<::std::option::Option<$filter>> = const { ::std::cell::RefCell::new(None) };
            }
            fn with<T>(f: impl FnOnce(&$filter) -> Result<T, String>) -> Result<T, String> {
                FILTER.with(|c| match c.borrow().as_ref() {
                    Some(filter) => f(filter),
                    None => Err("the key filter is not configured: the host must call `configure` first".to_string()),
                })
            }
            struct CordonKeyFilter;
            impl Guest for CordonKeyFilter {
                fn configure(options: String) -> Result<(), String> {
                    let filter = $crate::keys::configure::<$filter>(&options)?;
                    FILTER.with(|c| *c.borrow_mut() = Some(filter));
                    Ok(())
                }
                fn select(batch: KeyBatch) -> Result<Selection, String> {
                    with(|f| Ok($crate::KeyFilter::select(f, &$crate::keys::Keys::new(&batch.data, &batch.ends)?)))
                }
                fn delete_prefixes(batch: KeyBatch) -> ::std::vec::Vec<String> {
                    with(|f| Ok($crate::KeyFilter::delete_prefixes(f, &$crate::keys::Keys::new(&batch.data, &batch.ends)?)))
                        .unwrap_or_default()
                }
            }
            $crate::key_filter::export_key_filter!(CordonKeyFilter);
        };
    };
}
