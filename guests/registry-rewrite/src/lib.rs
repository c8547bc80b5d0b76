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

use cordon_sdk::items::{Action, ItemAction, Selector};
use serde::Deserialize;
use serde_json::Value;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    from: String,
    to: String,
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

fn owned_by_controller(pod: &Value) -> bool {
    pod.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .is_some_and(|refs| refs.iter().any(|r| r.get("controller").and_then(Value::as_bool) == Some(true)))
}

struct RegistryRewrite;

impl ItemAction for RegistryRewrite {
    type Options = Options;

    fn check(o: &Options) -> Result<(), String> {
        if o.from.is_empty() || o.to.is_empty() || o.from.contains('/') || o.to.contains('/') {
            return Err("invalid registry-rewrite options: `from` and `to` must be registry hosts such as \"registry.example.com:5000\"".into());
        }
        Ok(())
    }

    fn applies_to(_: &Options) -> Selector {
        Selector::kinds(&KINDS)
    }

    fn execute(o: &Options, mut item: Value) -> Result<Action, String> {
        let kind = item.get("kind").and_then(Value::as_str).unwrap_or_default().to_string();
        if kind == "Pod" && owned_by_controller(&item) {
            return Ok(Action::Skip);
        }
        let Some(spec) = pod_spec(&mut item, &kind) else {
            return Ok(Action::Unchanged);
        };
        let mut changed = false;
        for list in ["containers", "initContainers", "ephemeralContainers"] {
            let Some(containers) = spec.get_mut(list).and_then(Value::as_array_mut) else { continue };
            for container in containers {
                let Some(image) = container.get_mut("image") else { continue };
                if let Some(new) = image.as_str().and_then(|i| rewrite(i, o)) {
                    *image = Value::String(new);
                    changed = true;
                }
            }
        }
        Ok(if changed { Action::Modified(item) } else { Action::Unchanged })
    }
}

cordon_sdk::item_action_plugin!(RegistryRewrite);
