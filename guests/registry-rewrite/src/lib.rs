//! `registry-rewrite`: rewrites container image references from one
//! registry to another, for restores into a cluster that pulls from a
//! different registry (Velero's change-image-name action, as a component).
//!
//! Options: `{"from": "registry.old:5000", "to": "registry.new"}`. An image
//! `registry.old:5000/team/app:1.2` becomes `registry.new/team/app:1.2`;
//! only whole registry hosts match (`registry.old:50001/x` is left alone).
//!
//! Applies to Pods, Deployments, StatefulSets, DaemonSets, ReplicaSets,
//! ReplicationControllers, Jobs, CronJobs and PodTemplates; containers,
//! init containers and ephemeral containers are all rewritten. A Pod owned
//! by a controller is skipped: its controller is restored and recreates it.
//! An item with nothing to rewrite is answered `unchanged`, so the host
//! passes it on byte for byte; a rewritten item keeps its field order,
//! unknown fields and exact numbers. Needs no grants.

use cordon_sdk::item_action::exports::cordon::plugin::item_rewrite::{Guest, Outcome, Selector};
use serde::Deserialize;
use serde_json::Value;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    from: String,
    to: String,
}

fn options(text: &str) -> Result<Options, String> {
    let o: Options = serde_json::from_str(text).map_err(|e| format!("invalid registry-rewrite options: {e}; expected {{\"from\": REGISTRY, \"to\": REGISTRY}}"))?;
    if o.from.is_empty() || o.to.is_empty() || o.from.contains('/') || o.to.contains('/') {
        return Err("invalid registry-rewrite options: `from` and `to` must be registry hosts such as \"registry.example.com:5000\"".into());
    }
    Ok(o)
}

const KINDS: [&str; 9] = ["Pod", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "ReplicationController", "Job", "CronJob", "PodTemplate"];

/// Where the pod spec lives in each kind.
fn pod_spec<'a>(item: &'a mut Value, kind: &str) -> Option<&'a mut Value> {
    let path: &[&str] = match kind {
        "Pod" => &["spec"],
        "CronJob" => &["spec", "jobTemplate", "spec", "template", "spec"],
        "PodTemplate" => &["template", "spec"],
        _ => &["spec", "template", "spec"],
    };
    path.iter().try_fold(item, |v, key| v.get_mut(*key))
}

fn rewrite(image: &str, o: &Options) -> Option<String> {
    let rest = image.strip_prefix(o.from.as_str())?.strip_prefix('/')?;
    Some(format!("{}/{rest}", o.to))
}

struct RegistryRewrite;

impl Guest for RegistryRewrite {
    fn applies_to(text: String) -> Result<Selector, String> {
        options(&text)?;
        Ok(Selector { kinds: KINDS.iter().map(|k| k.to_string()).collect(), namespaces: vec![], labels: vec![] })
    }

    fn execute(text: String, item: String) -> Result<Outcome, String> {
        let o = options(&text)?;
        let mut value: Value = serde_json::from_str(&item).map_err(|e| format!("item is not JSON: {e}"))?;
        let kind = value.get("kind").and_then(Value::as_str).unwrap_or_default().to_string();
        if kind == "Pod" {
            let owned = value
                .pointer("/metadata/ownerReferences")
                .and_then(Value::as_array)
                .is_some_and(|refs| refs.iter().any(|r| r.get("controller").and_then(Value::as_bool) == Some(true)));
            if owned {
                return Ok(Outcome::Skip);
            }
        }
        let Some(spec) = pod_spec(&mut value, &kind) else {
            return Ok(Outcome::Unchanged);
        };
        let mut changed = false;
        for list in ["containers", "initContainers", "ephemeralContainers"] {
            let Some(containers) = spec.get_mut(list).and_then(Value::as_array_mut) else { continue };
            for container in containers {
                let Some(image) = container.get_mut("image") else { continue };
                if let Some(new) = image.as_str().and_then(|i| rewrite(i, &o)) {
                    *image = Value::String(new);
                    changed = true;
                }
            }
        }
        if !changed {
            return Ok(Outcome::Unchanged);
        }
        serde_json::to_string(&value).map(Outcome::Modified).map_err(|e| e.to_string())
    }
}

cordon_sdk::item_action::export_item_action!(RegistryRewrite);
