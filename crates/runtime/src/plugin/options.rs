//! What a plugin says about its options, through the optional `options`
//! export: a JSON Schema per stage and for its per-application settings,
//! read once when the plugin loads (for `cordon plugin inspect`), and the
//! checks a plan runs before any stage does — the plugin's own (its serde
//! types, so nothing drifts) and the host's, that every path the schema
//! marks as a guest path lies in a directory the plugin is granted, with
//! write access where the schema says the plugin writes.
//!
//! The host does not validate values against the schema itself: the
//! plugin's `check` reads them with the very code its stage will, which is
//! stricter than any schema and says what is wrong in the plugin's terms.

use std::cell::Cell;
use std::collections::BTreeMap;

use serde_json::Value;

use crate::sandbox::Grants;
use crate::sandbox::fs::{Access, Mount, RUNNING, SCRATCH, TARGET};

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
struct PathKind {
    /// Exactly a mount's guest path (`guest-mount…`), or anywhere in a
    /// granted directory (`guest-path…`).
    mount: bool,
    /// The plugin writes there (`…-rw`): a read-write mount, or `/scratch`.
    writable: bool,
}

fn path_kind(schema: &Value) -> Option<PathKind> {
    let (mount, writable) = match schema.get("format").and_then(Value::as_str)? {
        "guest-path" => (false, false),
        "guest-path-rw" => (false, true),
        "guest-mount" => (true, false),
        "guest-mount-rw" => (true, true),
        _ => return None,
    };
    Some(PathKind { mount, writable })
}

/// Schema steps (`$ref`, `anyOf`, …) followed in a row without descending
/// into the value: the schema is the plugin's, and `{"$ref": "#"}` must not
/// loop.
const MAX_HOPS: usize = 16;

/// Schema steps one check may take without descending into the value:
/// alternatives of alternatives multiply, and the walk runs in the host,
/// outside the plugin's budgets. Steps that descend are bounded by the
/// value, which is the operator's, and are not counted.
const MAX_VISITS: usize = 100_000;

/// Checks every string the schema marks as a guest path — at any depth:
/// in nested objects (`properties`, `additionalProperties`), arrays
/// (`items`), definitions (`$ref` to `#/...`, which is how schemars writes
/// nested types) and alternatives (`anyOf`/`oneOf`: one must accept the
/// value; `allOf`: all) — against the grants. The error names the field
/// (`sites[1].root`), the value and the guest path to use: most often the
/// operator wrote the host side of a mount.
pub fn check_guest_paths(schema: &Value, value: &Value, grants: &Grants) -> Result<(), String> {
    let walk = Walk { root: schema, grants, visits: Cell::new(0) };
    let checked = walk.check(schema, value, "", 0);
    if walk.visits.get() > MAX_VISITS {
        return Err(format!("the plugin's option schema is too intricate to check its guest paths (over {MAX_VISITS} steps); its author should simplify it"));
    }
    checked
}

struct Walk<'a> {
    root: &'a Value,
    grants: &'a Grants,
    visits: Cell<usize>,
}

impl Walk<'_> {
    fn check(&self, schema: &Value, value: &Value, at: &str, hops: usize) -> Result<(), String> {
        self.visits.set(self.visits.get() + usize::from(hops > 0));
        if self.visits.get() > MAX_VISITS {
            // The caller says why.
            return Err(String::new());
        }
        if hops < MAX_HOPS {
            if let Some(target) = self.referenced(schema) {
                self.check(target, value, at, hops + 1)?;
            }
            for branch in schema.get("allOf").and_then(Value::as_array).into_iter().flatten() {
                self.check(branch, value, at, hops + 1)?;
            }
            for alternatives in ["anyOf", "oneOf"] {
                let Some(branches) = schema.get(alternatives).and_then(Value::as_array) else { continue };
                // Among the branches for this kind of value (`Option<T>` is
                // `anyOf: [T, {"type": "null"}]`), one must accept it.
                let mut refusal = None;
                for branch in branches.iter().filter(|b| self.admits(b, value, hops + 1)) {
                    match self.check(branch, value, at, hops + 1) {
                        Ok(()) => {
                            refusal = None;
                            break;
                        }
                        Err(e) => _ = refusal.get_or_insert(e),
                    }
                }
                if let Some(e) = refusal {
                    return Err(e);
                }
            }
        }
        match value {
            Value::String(path) => match path_kind(schema) {
                Some(kind) => check_path(at, path, &kind, self.grants),
                None => Ok(()),
            },
            Value::Array(items) => match schema.get("items").filter(|s| s.is_object()) {
                Some(item) => items.iter().enumerate().try_for_each(|(i, v)| self.check(item, v, &format!("{at}[{i}]"), 0)),
                None => Ok(()),
            },
            Value::Object(fields) => fields.iter().try_for_each(|(key, v)| {
                let field = schema.get("properties").and_then(|p| p.get(key)).or_else(|| schema.get("additionalProperties").filter(|s| s.is_object()));
                match field {
                    Some(field) => self.check(field, v, &if at.is_empty() { key.clone() } else { format!("{at}.{key}") }, 0),
                    None => Ok(()),
                }
            }),
            _ => Ok(()),
        }
    }

    /// The schema `schema`'s `$ref` names inside this document, if any
    /// (`#/$defs/Site`; references to other documents are not followed).
    fn referenced(&self, schema: &Value) -> Option<&Value> {
        let pointer = schema.get("$ref")?.as_str()?.strip_prefix('#')?;
        self.root.pointer(pointer)
    }

    /// Whether `schema`'s `type` (through `$ref`s) allows `value`'s JSON
    /// type; a schema that names no type allows any.
    fn admits(&self, schema: &Value, value: &Value, hops: usize) -> bool {
        if let (Some(target), true) = (self.referenced(schema), hops < MAX_HOPS) {
            return self.admits(target, value, hops + 1);
        }
        let is = |name: &str| match value {
            Value::Null => name == "null",
            Value::Bool(_) => name == "boolean",
            Value::Number(n) => name == "number" || (name == "integer" && (n.is_i64() || n.is_u64())),
            Value::String(_) => name == "string",
            Value::Array(_) => name == "array",
            Value::Object(_) => name == "object",
        };
        match schema.get("type") {
            Some(Value::String(name)) => is(name),
            Some(Value::Array(names)) => names.iter().filter_map(Value::as_str).any(is),
            _ => true,
        }
    }
}

fn check_path(key: &str, path: &str, kind: &PathKind, grants: &Grants) -> Result<(), String> {
    let trimmed = path.trim_end_matches('/');
    let within = |dir: &str| trimmed.strip_prefix(dir.trim_end_matches('/')).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
    // The plugin opens a mount by name among its preopened directories.
    let names = |m: &Mount| if kind.mount { m.guest == path } else { within(&m.guest) };
    let fixed = |dirs: &[&str]| !kind.mount && dirs.iter().any(|d| within(d));
    let granted = grants.mounts.iter().any(names) || fixed(&[TARGET, RUNNING, SCRATCH]);
    let what = match kind.mount {
        true => "the guest path of a mount",
        false => "a path inside the plugin's sandbox",
    };
    if granted {
        if !kind.writable || grants.mounts.iter().any(|m| names(m) && m.access == Access::ReadWrite) || fixed(&[SCRATCH]) {
            return Ok(());
        }
        let fix = match grants.mounts.iter().find(|m| names(m)) {
            Some(m) => format!("set `access: read-write` on the mount {} → {} in the agent config", m.host.display(), m.guest),
            None => format!("{TARGET} and {RUNNING} are read-only; use {SCRATCH} or a read-write mount"),
        };
        return Err(format!("`{key}` must be {what} the plugin may write to, but {path:?} is granted read-only: {fix}"));
    }
    let host_side = grants.mounts.iter().find(|m| {
        let host = m.host.to_string_lossy();
        let host = host.trim_end_matches('/');
        trimmed == host || (!kind.mount && trimmed.strip_prefix(host).is_some_and(|rest| rest.starts_with('/')))
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

    /// `…-rw`: the plugin writes there, so a read-only grant is refused at
    /// plan time instead of failing the stage with EROFS.
    #[test]
    fn a_path_written_to_needs_a_writable_grant() {
        let mut grants = grants();
        grants.mounts.push(Mount { host: "/srv/archive".into(), guest: "/archive".into(), access: Access::ReadOnly, quota: None });
        let schema = json!({"properties": {
            "target": {"type": "string", "format": "guest-mount-rw"},
            "out": {"type": "string", "format": "guest-path-rw"}
        }});
        for ok in [json!({"target": "/www"}), json!({"out": "/www/logs"}), json!({"out": "/scratch/x"})] {
            assert_eq!(check_guest_paths(&schema, &ok, &grants), Ok(()), "{ok}");
        }
        let err = check_guest_paths(&schema, &json!({"target": "/archive"}), &grants).unwrap_err();
        assert!(err.contains("`target` must be the guest path of a mount the plugin may write to") && err.contains("set `access: read-write` on the mount /srv/archive → /archive"), "{err}");
        let err = check_guest_paths(&schema, &json!({"out": "/archive/x"}), &grants).unwrap_err();
        assert!(err.contains("granted read-only") && err.contains("/srv/archive"), "{err}");
        let err = check_guest_paths(&schema, &json!({"out": "/source/x"}), &grants).unwrap_err();
        assert!(err.contains("/source and /running are read-only; use /scratch"), "{err}");
        let err = check_guest_paths(&schema, &json!({"target": "/srv/www"}), &grants).unwrap_err();
        assert!(err.contains("write `target: /www`"), "{err}");
        // Without `-rw`, reading is all the plugin asks for.
        let read = json!({"properties": {"from": {"type": "string", "format": "guest-mount"}}});
        assert_eq!(check_guest_paths(&read, &json!({"from": "/archive"}), &grants), Ok(()));
    }

    /// The shapes schemars writes for nested types: `$ref`s into `$defs`,
    /// `Option<T>` as `anyOf` with null, maps as `additionalProperties`.
    #[test]
    fn guest_paths_are_checked_at_any_depth() {
        let schema = json!({
            "type": "object",
            "properties": {
                "sites": {"type": "array", "items": {"$ref": "#/$defs/Site"}},
                "backup": {"anyOf": [{"$ref": "#/$defs/Site"}, {"type": "null"}]},
                "byName": {"type": "object", "additionalProperties": {"$ref": "#/$defs/Site"}}
            },
            "$defs": {"Site": {"type": "object", "properties": {"root": {"type": "string", "format": "guest-path"}}}}
        });
        let ok = json!({"sites": [{"root": "/www/a"}], "backup": null, "byName": {"x": {"root": "/scratch/x"}}});
        assert_eq!(check_guest_paths(&schema, &ok, &grants()), Ok(()));
        let err = check_guest_paths(&schema, &json!({"sites": [{"root": "/www/a"}, {"root": "/srv/www/b"}]}), &grants()).unwrap_err();
        assert!(err.contains("`sites[1].root` must be a path inside") && err.contains("write `sites[1].root: /www/b`"), "{err}");
        let err = check_guest_paths(&schema, &json!({"backup": {"root": "/etc"}}), &grants()).unwrap_err();
        assert!(err.contains("`backup.root`") && err.contains("\"/etc\" is not granted"), "{err}");
        let err = check_guest_paths(&schema, &json!({"byName": {"x": {"root": "/srv/www"}}}), &grants()).unwrap_err();
        assert!(err.contains("`byName.x.root`"), "{err}");
    }

    /// The schema is the plugin's: references that loop, and alternatives
    /// of alternatives, end (the walk runs in the host).
    #[test]
    fn a_hostile_schema_cannot_make_the_walk_loop_or_explode() {
        let value = json!({"a": {"b": ["c"]}});
        assert_eq!(check_guest_paths(&json!({"$ref": "#"}), &value, &grants()), Ok(()));
        assert_eq!(check_guest_paths(&json!({"allOf": [{"$ref": "#"}]}), &value, &grants()), Ok(()));
        let wide = json!({"anyOf": vec![json!({"$ref": "#"}); 50], "format": "guest-path"});
        let err = check_guest_paths(&wide, &json!("/etc"), &grants()).unwrap_err();
        assert!(err.contains("too intricate"), "{err}");
        // A large value under a plain schema is not "intricate".
        let list = json!({"properties": {"paths": {"type": "array", "items": {"anyOf": [{"type": "string", "format": "guest-path"}, {"type": "null"}]}}}});
        let many = json!({"paths": vec![json!("/www/x"); 40_000]});
        assert_eq!(check_guest_paths(&list, &many, &grants()), Ok(()));
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
