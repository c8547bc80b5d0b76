//! An item action for the host's tests: for an item whose annotation
//! `test/links` lists `Kind/namespace/name,...`, it returns the item with a
//! `test/seen: "true"` annotation and adds one minimal item per link, each
//! linking back — so the links form cycles that the host must end.
use cordon_sdk::item_action::exports::cordon::plugin::item_rewrite::{Guest, Outcome, Selector, WithAdditional};
use serde_json::{Value, json};

struct ItemLinks;

impl Guest for ItemLinks {
    fn applies_to(_options: String) -> Result<Selector, String> {
        Ok(Selector { kinds: vec!["ConfigMap".into()], namespaces: vec![], labels: vec![("test".into(), "links".into())] })
    }

    fn execute(_options: String, item: String) -> Result<Outcome, String> {
        let mut value: Value = serde_json::from_str(&item).map_err(|e| e.to_string())?;
        let me = format!(
            "ConfigMap/{}/{}",
            value.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or_default(),
            value.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default()
        );
        let links: Vec<String> = value
            .pointer("/metadata/annotations/test~1links")
            .and_then(Value::as_str)
            .map(|l| l.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect())
            .unwrap_or_default();
        if links.is_empty() {
            return Ok(Outcome::Unchanged);
        }
        value["metadata"]["annotations"]["test/seen"] = json!("true");
        let additional = links
            .iter()
            .map(|link| {
                let parts: Vec<&str> = link.splitn(3, '/').collect();
                json!({
                    "apiVersion": "v1",
                    "kind": parts.first().copied().unwrap_or("ConfigMap"),
                    "metadata": {
                        "namespace": parts.get(1).copied().unwrap_or_default(),
                        "name": parts.get(2).copied().unwrap_or_default(),
                        "labels": { "test": "links" },
                        "annotations": { "test/links": me }
                    }
                })
                .to_string()
            })
            .collect();
        Ok(Outcome::WithAdditionalItems(WithAdditional { item: value.to_string(), additional }))
    }
}

cordon_sdk::item_action::export_item_action!(ItemLinks);
