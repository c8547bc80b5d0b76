//! What a plugin says about its options, through the optional `options`
//! export: a JSON Schema per stage and for its per-application settings,
//! read once when the plugin loads (for `cordon plugin inspect`), and the
//! checks a plan runs before any stage does — the plugin's own (its serde
//! types, so nothing drifts) and the host's, that every path the schema
//! marks as a guest path lies in a directory the plugin is granted.
//!
//! The host does not validate values against the schema itself: the
//! plugin's `check` reads them with the very code its stage will, which is
//! stricter than any schema and says what is wrong in the plugin's terms.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::sandbox::Grants;
use crate::sandbox::fs::{RUNNING, SCRATCH, TARGET};

pub use cordon_contract::bindings::described::exports::cordon::plugin::options::Subject;

/// A plugin's option schemas.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Described {
    /// Stage name → the JSON Schema of its `with:`.
    pub stages: BTreeMap<String, Value>,
    /// The JSON Schema of `plugins.<name>` in the app config.
    pub settings: Option<Value>,
}

impl Described {
    /// The schema of `subject`, if the plugin describes it.
    pub fn schema(&self, subject: &Subject) -> Option<&Value> {
        match subject {
            Subject::Stage(name) => self.stages.get(name),
            Subject::Settings => self.settings.as_ref(),
        }
    }
}

/// How a subject is named in messages: `stage WAIT` or `settings`.
pub fn subject_name(subject: &Subject) -> String {
    match subject {
        Subject::Stage(name) => format!("stage {name}"),
        Subject::Settings => "settings".to_string(),
    }
}

/// A string in the value that must be a path inside the sandbox.
enum PathKind {
    /// `"format": "guest-path"`: in a granted directory.
    InGrant,
    /// `"format": "guest-mount"`: exactly a mount's guest path.
    Mount,
}

fn path_kind(schema: &Value) -> Option<PathKind> {
    match schema.get("format").and_then(Value::as_str) {
        Some("guest-path") => Some(PathKind::InGrant),
        Some("guest-mount") => Some(PathKind::Mount),
        _ => schema.get("items").and_then(path_kind),
    }
}

/// Checks every top-level property the schema marks as a guest path (a
/// string, or an array of strings) against the grants; the error names the
/// property, the value and the guest path to use — most often the operator
/// wrote the host side of a mount.
pub fn check_guest_paths(schema: &Value, value: &Value, grants: &Grants) -> Result<(), String> {
    let (Some(properties), Some(given)) = (schema.get("properties").and_then(Value::as_object), value.as_object()) else {
        return Ok(());
    };
    for (key, property) in properties {
        let Some(kind) = path_kind(property) else { continue };
        let paths: Vec<&str> = match given.get(key) {
            Some(Value::String(s)) => vec![s.as_str()],
            Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
            _ => continue,
        };
        for path in paths {
            check_path(key, path, &kind, grants)?;
        }
    }
    Ok(())
}

fn check_path(key: &str, path: &str, kind: &PathKind, grants: &Grants) -> Result<(), String> {
    let trimmed = path.trim_end_matches('/');
    let within = |dir: &str| trimmed == dir || trimmed.strip_prefix(dir).is_some_and(|rest| rest.starts_with('/'));
    let ok = match kind {
        // The plugin opens it by name among its preopened directories.
        PathKind::Mount => grants.mounts.iter().any(|m| m.guest == path),
        PathKind::InGrant => grants.mounts.iter().any(|m| within(m.guest.trim_end_matches('/'))) || [TARGET, RUNNING, SCRATCH].into_iter().any(within),
    };
    if ok {
        return Ok(());
    }
    let what = match kind {
        PathKind::Mount => "the guest path of a mount",
        PathKind::InGrant => "a path inside the plugin's sandbox",
    };
    let host_side = grants.mounts.iter().find(|m| {
        let host = m.host.to_string_lossy();
        let host = host.trim_end_matches('/');
        trimmed == host || (matches!(kind, PathKind::InGrant) && trimmed.strip_prefix(host).is_some_and(|rest| rest.starts_with('/')))
    });
    let fix = match host_side {
        Some(m) => {
            let host = m.host.to_string_lossy();
            let guest = format!("{}{}", m.guest.trim_end_matches('/'), &trimmed[host.trim_end_matches('/').len()..]);
            format!("{path} is the host side of the mount {} → {}; write `{key}: {guest}`", m.host.display(), m.guest)
        }
        None if grants.mounts.is_empty() => "the plugin is granted no mounts; grant one under `grants.mounts` in the agent config and use its `guest` path".to_string(),
        None => {
            let mounts: Vec<String> = grants.mounts.iter().map(|m| format!("{} (host {})", m.guest, m.host.display())).collect();
            format!("it is granted {}; use one of those guest paths, or grant a mount at {path}", mounts.join(", "))
        }
    };
    Err(format!("`{key}` must be {what}, but {path:?} is not granted: {fix}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::fs::{Access, Mount};
    use serde_json::json;

    fn grants() -> Grants {
        Grants {
            mounts: vec![Mount { host: "/srv/www".into(), guest: "/www".into(), access: Access::ReadWrite, quota: None }],
            ..Grants::default()
        }
    }

    fn schema() -> Value {
        json!({"properties": {
            "target": {"type": "string", "format": "guest-mount"},
            "logs": {"type": ["string", "null"], "format": "guest-path"},
            "extra": {"type": "array", "items": {"type": "string", "format": "guest-path"}},
            "name": {"type": "string"}
        }})
    }

    #[test]
    fn guest_paths_in_grants_pass() {
        let ok = json!({"target": "/www", "logs": "/www/logs", "extra": ["/scratch/x", "/source"], "name": "/srv/www"});
        assert_eq!(check_guest_paths(&schema(), &ok, &grants()), Ok(()));
        assert_eq!(check_guest_paths(&schema(), &json!({"logs": null}), &grants()), Ok(()));
    }

    #[test]
    fn a_host_path_is_refused_naming_the_guest_path() {
        let err = check_guest_paths(&schema(), &json!({"target": "/srv/www"}), &grants()).unwrap_err();
        assert!(err.contains("`target` must be the guest path of a mount") && err.contains("write `target: /www`"), "{err}");
        let err = check_guest_paths(&schema(), &json!({"logs": "/srv/www/logs"}), &grants()).unwrap_err();
        assert!(err.contains("write `logs: /www/logs`"), "{err}");
        let err = check_guest_paths(&schema(), &json!({"extra": ["/scratch", "/etc"]}), &grants()).unwrap_err();
        assert!(err.contains("\"/etc\" is not granted") && err.contains("/www (host /srv/www)"), "{err}");
    }

    #[test]
    fn a_mount_must_be_named_exactly_and_prefixes_do_not_count() {
        for near in ["/www/site", "/www/"] {
            let err = check_guest_paths(&schema(), &json!({"target": near}), &grants()).unwrap_err();
            assert!(err.contains("must be the guest path of a mount"), "{err}");
        }
        assert!(check_guest_paths(&schema(), &json!({"logs": "/wwwx"}), &grants()).is_err());
        let err = check_guest_paths(&schema(), &json!({"target": "/www"}), &Grants::default()).unwrap_err();
        assert!(err.contains("granted no mounts"), "{err}");
    }
}
