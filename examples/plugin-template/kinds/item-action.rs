//! `{{name}}`: a Cordon item action that adds a label to ConfigMaps.
//! Options: `{"label": "migrated-by", "value": "cordon"}`.

use cordon_sdk::items::{Action, ItemAction, Selector};
use serde::Deserialize;
use serde_json::Value;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    label: String,
    value: String,
}

struct AddLabel;

impl ItemAction for AddLabel {
    type Options = Options;

    fn check(o: &Options) -> Result<(), String> {
        if o.label.is_empty() {
            return Err("invalid {{name}} options: `label` must not be empty".into());
        }
        Ok(())
    }

    fn applies_to(_: &Options) -> Selector {
        Selector::kinds(&["ConfigMap"])
    }

    fn execute(o: &Options, mut item: Value) -> Result<Action, String> {
        let Some(metadata) = item.get_mut("metadata").and_then(Value::as_object_mut) else {
            return Ok(Action::Unchanged);
        };
        let labels = metadata.entry("labels").or_insert_with(|| Value::Object(Default::default()));
        let Some(labels) = labels.as_object_mut() else { return Err("metadata.labels is not an object".into()) };
        if labels.get(&o.label).and_then(Value::as_str) == Some(o.value.as_str()) {
            return Ok(Action::Unchanged);
        }
        labels.insert(o.label.clone(), Value::String(o.value.clone()));
        Ok(Action::Modified(item))
    }
}

cordon_sdk::item_action_plugin!(AddLabel);

cordon_sdk::manifest! {
    name: "{{name}}",
    version: env!("CARGO_PKG_VERSION"),
    stages: &[],
    capabilities: r#"{}"#,
}
