//! `{{name}}`: a Cordon key filter that selects the keys under one tenant's
//! prefix. Options: `{"prefix": "/tenants/acme/"}`.

use cordon_sdk::{KeyFilter, Verdict};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    prefix: String,
}

struct Filter {
    prefix: Vec<u8>,
}

impl KeyFilter for Filter {
    type Options = Options;

    fn new(options: Options) -> Result<Self, String> {
        if !options.prefix.ends_with('/') {
            return Err(format!("invalid {{name}} options: `prefix` {:?} must end with '/'", options.prefix));
        }
        Ok(Filter { prefix: options.prefix.into_bytes() })
    }

    fn classify(&self, key: &[u8]) -> Verdict {
        if key.starts_with(&self.prefix) { Verdict::Selected } else { Verdict::Rejected }
    }

    fn delete_prefix(&self, _key: &[u8]) -> Option<String> {
        Some(String::from_utf8_lossy(&self.prefix).into_owned())
    }
}

cordon_sdk::key_filter_plugin!(Filter);

cordon_sdk::manifest! {
    name: "{{name}}",
    version: env!("CARGO_PKG_VERSION"),
    stages: &[],
    capabilities: r#"{}"#,
}
