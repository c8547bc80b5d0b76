//! Plugins through OCI registries: `cordon plugin push` writes a component
//! as a CNCF Wasm OCI artifact (and its cosign-layout signature),
//! `cordon plugin pin` resolves a tag once to a manifest digest, and agents
//! fetch pinned artifacts into their cache before loading.
//!
//! This crate only moves bytes and checks digests on the way in. What an
//! artifact is, and every check a load repeats from the cache (manifest
//! digest → layer digest → `sha256` pin → signature), belongs to
//! [`cordon_runtime::plugin::artifact`], so a cached artifact is trusted
//! exactly as much as a fresh download, and an agent starts offline.
//!
//! Transport: HTTPS; plain HTTP only for loopback registries and those the
//! agent config lists in `insecure-registries`. Every request has a connect
//! and a read timeout, so a hung registry fails the command instead of
//! holding it. Credentials come from the environment or Docker's config
//! file ([`credentials`]) and never appear in output.

mod credentials;
mod fetch;
mod push;

use std::time::Duration;

use anyhow::anyhow;
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

pub use fetch::{fetch, fetch_all, fetch_plugin, resolve};
pub use push::{Publish, Pushed, push};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// A client for one registry, with its credentials.
struct Registry {
    client: Client,
    auth: RegistryAuth,
    /// Where the credentials came from, to name in errors (never the
    /// credentials themselves).
    auth_origin: Option<String>,
    name: String,
    plain_http: bool,
}

impl Registry {
    fn connect(registry: &str, plain_http: bool) -> anyhow::Result<Self> {
        // Installing fails only when a provider is already installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = oci_client::client::ClientConfig {
            protocol: if plain_http { oci_client::client::ClientProtocol::Http } else { oci_client::client::ClientProtocol::Https },
            connect_timeout: Some(CONNECT_TIMEOUT),
            read_timeout: Some(READ_TIMEOUT),
            platform_resolver: None,
            ..Default::default()
        };
        let (auth, auth_origin) = credentials::for_registry(registry)?;
        Ok(Self { client: Client::new(config), auth, auth_origin, name: registry.to_string(), plain_http })
    }

    fn by_digest(&self, repository: &str, digest: &str) -> Reference {
        Reference::with_digest(self.name.clone(), repository.to_string(), digest.to_string())
    }

    fn by_tag(&self, repository: &str, tag: &str) -> Reference {
        Reference::with_tag(self.name.clone(), repository.to_string(), tag.to_string())
    }

    /// One error for a failed request: what was asked, of which registry,
    /// and the fix, without credentials.
    fn explain(&self, what: &str, e: OciDistributionError) -> anyhow::Error {
        let registry = &self.name;
        let unauthorized = matches!(e, OciDistributionError::UnauthorizedError { .. } | OciDistributionError::AuthenticationFailure(_))
            || matches!(&e, OciDistributionError::RequestError(e) if e.status().is_some_and(|s| s.as_u16() == 401 || s.as_u16() == 403))
            || matches!(&e, OciDistributionError::ServerError { code: 401 | 403, .. })
            || matches!(&e, OciDistributionError::RegistryError { envelope, .. } if envelope.errors.iter().any(|e| matches!(e.code, OciErrorCode::Unauthorized | OciErrorCode::Denied)));
        if unauthorized {
            return match &self.auth_origin {
                Some(origin) => anyhow!("{what}: registry {registry} refused the credentials from {origin}; check the user name and password"),
                None => anyhow!(
                    "{what}: registry {registry} requires credentials; set CORDON_REGISTRY_USERNAME and CORDON_REGISTRY_PASSWORD, or log in with `docker login {registry}`"
                ),
            };
        }
        if let OciDistributionError::RequestError(e) = &e {
            let scheme = if self.plain_http { "http" } else { "https" };
            let hint = if self.plain_http { "" } else { " (a registry without TLS must be on loopback or listed in the agent config's `insecure-registries`)" };
            return anyhow!("{what}: cannot reach registry {registry} over {scheme}: {}{hint}", error_chain(e));
        }
        anyhow!("{what}: registry {registry}: {e}")
    }
}

/// Whether `e` says the manifest (or repository) does not exist.
fn not_found(e: &OciDistributionError) -> bool {
    match e {
        OciDistributionError::ImageManifestNotFoundError(_) => true,
        OciDistributionError::ServerError { code: 404, .. } => true,
        OciDistributionError::RegistryError { envelope, .. } => {
            envelope.errors.iter().any(|e| matches!(e.code, OciErrorCode::ManifestUnknown | OciErrorCode::NameUnknown))
        }
        _ => false,
    }
}

/// An error with its causes, on one line.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
