//! A hostile item action: every item it sees comes back with nine new
//! items of ~100 KiB each (under its result limit per call), and it sees
//! those too — left alone, three input items would expand into gigabytes
//! of output. The host must stop it by its output budget.
use cordon_sdk::item_action::exports::cordon::plugin::item_rewrite::{Guest, Outcome, Selector, WithAdditional};
use serde_json::json;

struct ItemFlood;

impl Guest for ItemFlood {
    fn applies_to(_options: String) -> Result<Selector, String> {
        Ok(Selector { kinds: vec![], namespaces: vec![], labels: vec![] })
    }

    fn execute(_options: String, item: String) -> Result<Outcome, String> {
        let value: serde_json::Value = serde_json::from_str(&item).map_err(|e| e.to_string())?;
        let name = value.pointer("/metadata/name").and_then(|v| v.as_str()).unwrap_or("x").to_string();
        let padding = "x".repeat(100 * 1024);
        let additional = (0..9)
            .map(|i| json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"namespace": "flood", "name": format!("{name}-{i}")}, "data": {"pad": padding}}).to_string())
            .collect();
        Ok(Outcome::WithAdditionalItems(WithAdditional { item, additional }))
    }
}

cordon_sdk::item_action::export_item_action!(ItemFlood);
