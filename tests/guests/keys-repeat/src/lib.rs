//! A hostile key filter: for every batch it reports key 0 as unclassified
//! 100,000 times, which would make the host count and write out one input
//! key 100,000 times. The host must refuse the answer.
use cordon_sdk::key_filter::exports::cordon::plugin::key_selection::{Guest, KeyBatch, Selection};

struct KeysRepeat;

impl Guest for KeysRepeat {
    fn configure(_options: String) -> Result<(), String> {
        Ok(())
    }

    fn select(batch: KeyBatch) -> Result<Selection, String> {
        Ok(Selection { selected: vec![0; batch.ends.len().div_ceil(8)], unclassified: vec![0; 100_000] })
    }

    fn delete_prefixes(_batch: KeyBatch) -> Vec<String> {
        Vec::new()
    }
}

cordon_sdk::key_filter::export_key_filter!(KeysRepeat);
