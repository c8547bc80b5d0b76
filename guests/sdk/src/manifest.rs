//! The plugin manifest, built at compile time by [`manifest!`](crate::manifest!)
//! from the plugin's own declarations, so stage names are written once (in
//! `StagePlugin::STAGES`) and the contract version is the SDK's.

/// The contract version this SDK builds plugins against.
pub const CONTRACT: &str = "0.1.0";

/// What the manifest says.
#[doc(hidden)]
pub struct Parts {
    pub name: &'static str,
    pub version: &'static str,
    pub stages: &'static [(&'static str, &'static str)],
    /// A JSON object, written by the author.
    pub capabilities: &'static str,
}

/// Writes `bytes` at `at` when `out` has room, and returns the new end, so
/// the same walk measures the manifest (with an empty `out`) and writes it.
const fn put(out: &mut [u8], at: usize, bytes: &[u8]) -> usize {
    let mut i = 0;
    while i < bytes.len() {
        if at + i < out.len() {
            out[at + i] = bytes[i];
        }
        i += 1;
    }
    at + bytes.len()
}

/// A JSON string; names and versions need no escaping, so anything that
/// would is refused when the plugin compiles.
const fn put_str(out: &mut [u8], at: usize, s: &str) -> usize {
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        assert!(bytes[i] >= 0x20 && bytes[i] < 0x7f && bytes[i] != b'"' && bytes[i] != b'\\', "manifest names and versions are printable ASCII without quotes or backslashes");
        i += 1;
    }
    let at = put(out, at, b"\"");
    let at = put(out, at, bytes);
    put(out, at, b"\"")
}

/// Writes the manifest's JSON into `out` (if it fits) and returns its length.
#[doc(hidden)]
pub const fn write(parts: &Parts, out: &mut [u8]) -> usize {
    let mut at = put(out, 0, b"{\"name\": ");
    at = put_str(out, at, parts.name);
    at = put(out, at, b", \"version\": ");
    at = put_str(out, at, parts.version);
    at = put(out, at, b", \"contract\": ");
    at = put_str(out, at, CONTRACT);
    at = put(out, at, b", \"stages\": [");
    let mut i = 0;
    while i < parts.stages.len() {
        if i > 0 {
            at = put(out, at, b", ");
        }
        at = put_str(out, at, parts.stages[i].0);
        i += 1;
    }
    at = put(out, at, b"], \"capabilities\": ");
    at = put(out, at, parts.capabilities.as_bytes());
    put(out, at, b"}")
}

/// Embeds the plugin's manifest in the component as the custom section
/// `cordon:manifest`. The host compares the capabilities it requests with
/// the operator's grants when it loads the plugin, and `cordon plugin
/// inspect` shows it. `stages` is the plugin's `STAGES` (or `&[]` for
/// plugins that define none); `capabilities` is a JSON object:
///
/// ```
/// struct Check;
/// impl cordon_sdk::StagePlugin for Check {
///     const STAGES: &'static [(&'static str, &'static str)] = &[("HTTP_CHECK", "Checks a URL")];
///     type Options = serde_json::Value;
///     fn run(_: &cordon_sdk::Context, _: serde_json::Value) -> cordon_sdk::Outcome {
///         cordon_sdk::Outcome::Success(String::new())
///     }
/// }
/// cordon_sdk::manifest! {
///     name: "http-check",
///     version: "0.1.0",
///     stages: <Check as cordon_sdk::StagePlugin>::STAGES,
///     capabilities: r#"{
///         "mounts": [{"guest": "/data", "access": "read-write"}],
///         "network": ["http"],
///         "env": ["LOG_FORMAT"],
///         "secrets": ["token"]
///     }"#,
/// }
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! manifest {
    (name: $name:expr, version: $version:expr, stages: $stages:expr, capabilities: $capabilities:expr $(,)?) => {
        const _: () = {
            const PARTS: $crate::manifest::Parts =
                $crate::manifest::Parts { name: $name, version: $version, stages: $stages, capabilities: $capabilities };
            const LEN: usize = $crate::manifest::write(&PARTS, &mut []);
            #[unsafe(link_section = "cordon:manifest")]
            #[used]
            static CORDON_MANIFEST: [u8; LEN] = {
                let mut out = [0u8; LEN];
                $crate::manifest::write(&PARTS, &mut out);
                out
            };
        };
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_the_manifest_json() {
        let parts = Parts { name: "wait", version: "1.2.0", stages: &[("WAIT", "w"), ("HOLD", "h")], capabilities: "{}" };
        let len = write(&parts, &mut []);
        let mut out = vec![0u8; len];
        write(&parts, &mut out);
        let json: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(json["stages"], serde_json::json!(["WAIT", "HOLD"]));
        assert_eq!(json["contract"], CONTRACT);
        assert_eq!(json["version"], "1.2.0");
    }
}
