//! Plugins distributed through OCI registries, in the CNCF TAG Runtime
//! "Wasm OCI artifact" layout, and their signatures in cosign's keyed
//! layout. This module owns the format and the checks; fetching over the
//! network is `cordon-registry`'s, which fills the cache this module reads.
//!
//! An artifact is an OCI image manifest whose config has media type
//! [`CONFIG_MEDIA_TYPE`] and whose one layer is the component
//! ([`LAYER_MEDIA_TYPE`], or the older [`LEGACY_LAYER_MEDIA_TYPE`] that
//! wasmCloud and Spin also accept). The agent config pins it by manifest
//! digest (`source: oci://REGISTRY/REPO@sha256:…`), never by tag, so a
//! moved tag changes nothing.
//!
//! The cache holds one directory per manifest digest
//! (`cache/oci/sha256/<hex>/`): `manifest.json` (the exact bytes the
//! digest names), `component.wasm`, and when the registry has one, the
//! signature's payload and value. Every load checks the chain again from
//! those files, before compiling: manifest bytes → pinned manifest digest,
//! manifest's layer digest → component bytes, component → `sha256` pin,
//! signature payload → manifest digest. So an agent starts from its cache
//! with no registry reachable, and a cache file changed on disk is refused
//! like a tampered download.
//!
//! Signatures: cosign's layout (tag `sha256-<hex>.sig`, one layer of
//! [`SIMPLE_SIGNING_MEDIA_TYPE`] whose payload names the manifest digest,
//! the signature in the [`COSIGN_SIGNATURE_ANNOTATION`] annotation), signed
//! with Cordon's ed25519 publisher keys — the same keys and `trusted-keys`
//! as local `.sig` files. The payload binds the manifest digest, which
//! binds the component.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signature, VerifyingKey};
use serde::Deserialize;
use sha2::{Digest, Sha256};

pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.wasm.config.v0+json";
pub const LAYER_MEDIA_TYPE: &str = "application/wasm";
pub const LEGACY_LAYER_MEDIA_TYPE: &str = "application/vnd.wasm.content.layer.v1+wasm";
/// The annotation that carries the plugin's own manifest (stages,
/// requested capabilities, contract version) as JSON.
pub const PLUGIN_MANIFEST_ANNOTATION: &str = "dev.cordon.plugin.manifest";
pub const SIMPLE_SIGNING_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
pub const COSIGN_SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// The largest component a registry may hand us; a bigger layer is refused
/// before it is downloaded.
pub const MAX_COMPONENT_BYTES: u64 = 256 << 20;
/// The largest manifest or signature payload read from a registry.
pub const MAX_DOCUMENT_BYTES: u64 = 1 << 20;

/// `oci://REGISTRY/REPOSITORY@sha256:<hex>`: an artifact pinned by the
/// digest of its manifest.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct OciSource {
    /// `host[:port]`.
    pub registry: String,
    pub repository: String,
    /// `sha256:<64 hex>`.
    pub digest: String,
}

/// A reference as people type it: by tag or by digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciReference {
    pub registry: String,
    pub repository: String,
    /// `:tag` or `@sha256:…`, without the separator.
    pub tag: Option<String>,
    pub digest: Option<String>,
}

fn is_digest(text: &str) -> bool {
    text.strip_prefix("sha256:").is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

impl OciReference {
    /// Parses `oci://REGISTRY/REPO[:TAG][@sha256:HEX]`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let fix = "write it as oci://REGISTRY/REPOSITORY:TAG or oci://REGISTRY/REPOSITORY@sha256:DIGEST";
        let rest = text.strip_prefix("oci://").ok_or_else(|| format!("`{text}` is not an oci:// reference; {fix}"))?;
        let (name, digest) = match rest.split_once('@') {
            Some((name, digest)) if is_digest(digest) => (name, Some(digest.to_string())),
            Some((_, digest)) => return Err(format!("`{digest}` in `{text}` is not a sha256:<64 lowercase hex> digest")),
            None => (rest, None),
        };
        let (registry, path) = name.split_once('/').ok_or_else(|| format!("`{text}` names no repository; {fix}"))?;
        let (repository, tag) = match path.rsplit_once(':') {
            Some((repo, tag)) => (repo, Some(tag.to_string())),
            None => (path, None),
        };
        let valid_repo = !repository.is_empty()
            && repository.split('/').all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)));
        if registry.is_empty() || !valid_repo {
            return Err(format!("`{text}`: registry or repository is malformed (repositories are lowercase letters, digits, '.', '_', '-' and '/'); {fix}"));
        }
        if let Some(tag) = &tag
            && (tag.is_empty() || tag.len() > 128 || !tag.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)))
        {
            return Err(format!("`{tag}` in `{text}` is not a valid tag"));
        }
        Ok(Self { registry: registry.to_string(), repository: repository.to_string(), tag, digest })
    }

    /// The same repository, pinned to `digest`.
    pub fn pinned(&self, digest: &str) -> OciSource {
        OciSource { registry: self.registry.clone(), repository: self.repository.clone(), digest: digest.to_string() }
    }
}

impl fmt::Display for OciReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "oci://{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl OciSource {
    /// Parses a pinned reference; a tag alone is refused, because what a
    /// tag names can change under the agent.
    pub fn parse(text: &str) -> Result<Self, String> {
        let reference = OciReference::parse(text)?;
        match &reference.digest {
            Some(digest) => Ok(reference.pinned(digest)),
            None => Err(format!("`{text}` is not pinned by digest; run `cordon plugin pin NAME {text}` to resolve the tag once and pin its digest")),
        }
    }

    /// Its cache directory under `cache_root`.
    pub fn cache_dir(&self, cache_root: &Path) -> PathBuf {
        cache_root.join("sha256").join(self.digest.trim_start_matches("sha256:"))
    }

    /// The tag cosign gives the signature of this manifest.
    pub fn signature_tag(&self) -> String {
        self.digest.replace(':', "-") + ".sig"
    }
}

impl TryFrom<String> for OciSource {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        Self::parse(&text)
    }
}

impl fmt::Display for OciSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "oci://{}/{}@{}", self.registry, self.repository, self.digest)
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ManifestDoc {
    #[serde(default)]
    media_type: Option<String>,
    config: Descriptor,
    layers: Vec<Descriptor>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

/// One blob a manifest names.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// What a Wasm artifact's manifest says.
#[derive(Debug, Clone)]
pub struct ArtifactManifest {
    pub config: Descriptor,
    /// The component's layer.
    pub layer: Descriptor,
    pub annotations: BTreeMap<String, String>,
}

impl ArtifactManifest {
    /// Parses a manifest and checks it is a Wasm component artifact: an
    /// image manifest, the Wasm config media type, exactly one layer, of
    /// a Wasm media type, no bigger than [`MAX_COMPONENT_BYTES`].
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let doc: ManifestDoc = serde_json::from_slice(bytes).map_err(|e| format!("its manifest is not an OCI image manifest: {e}"))?;
        if doc.media_type.as_deref().is_some_and(|m| m != MANIFEST_MEDIA_TYPE) {
            return Err(format!("its manifest has media type {}, not {MANIFEST_MEDIA_TYPE}", doc.media_type.unwrap_or_default()));
        }
        if doc.config.media_type != CONFIG_MEDIA_TYPE {
            return Err(format!("its config has media type {}, not {CONFIG_MEDIA_TYPE}: it is not a Wasm component artifact", doc.config.media_type));
        }
        let [layer] = <[Descriptor; 1]>::try_from(doc.layers).map_err(|layers| format!("it has {} layers; a Wasm component artifact has exactly one", layers.len()))?;
        if layer.media_type != LAYER_MEDIA_TYPE && layer.media_type != LEGACY_LAYER_MEDIA_TYPE {
            return Err(format!("its layer has media type {}, not {LAYER_MEDIA_TYPE}", layer.media_type));
        }
        if !is_digest(&layer.digest) {
            return Err(format!("its layer digest {:?} is not a sha256 digest", layer.digest));
        }
        if layer.size > MAX_COMPONENT_BYTES {
            return Err(format!("its component is {} bytes; Cordon loads components of at most {MAX_COMPONENT_BYTES} bytes", layer.size));
        }
        Ok(Self { config: doc.config, layer, annotations: doc.annotations })
    }
}

/// The cosign "simple signing" payload naming `manifest_digest` of
/// `repository` (`REGISTRY/REPO`).
pub fn signature_payload(repository: &str, manifest_digest: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "critical": {
            "identity": { "docker-reference": repository },
            "image": { "docker-manifest-digest": manifest_digest },
            "type": "cosign container image signature"
        },
        "optional": null
    }))
    .expect("a JSON value serializes")
}

#[derive(Deserialize)]
struct Payload {
    critical: Critical,
}

#[derive(Deserialize)]
struct Critical {
    image: Image,
}

#[derive(Deserialize)]
struct Image {
    #[serde(rename = "docker-manifest-digest")]
    digest: String,
}

/// An artifact in the cache, as `cordon-registry` leaves it.
pub struct Cached {
    dir: PathBuf,
}

impl Cached {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }
    pub fn manifest(&self) -> PathBuf {
        self.dir.join("manifest.json")
    }
    pub fn component(&self) -> PathBuf {
        self.dir.join("component.wasm")
    }
    /// The signatures the registry had for it, as [`CachedSignature`]s.
    pub fn signatures(&self) -> PathBuf {
        self.dir.join("signatures.json")
    }

    /// The trusted key that signed `source`: checked when a signature is
    /// `required` or the registry had one (a present signature must always
    /// verify); `None` for an unsigned artifact that need not be signed.
    pub fn signer(&self, source: &OciSource, required: bool, trusted: &BTreeMap<String, VerifyingKey>) -> Result<Option<String>> {
        if !required && !self.signatures().exists() {
            return Ok(None);
        }
        self.check_signature(source, trusted).map(Some)
    }

    /// Checks the chain from the pinned manifest digest to the component
    /// whose sha256 is `component_sha256` (hex).
    pub fn check(&self, source: &OciSource, component_sha256: &str) -> Result<ArtifactManifest> {
        let bytes = std::fs::read(self.manifest()).with_context(|| format!("{source} is not in the cache ({})", self.dir.display()))?;
        let found = digest_of(&bytes);
        if found != source.digest {
            bail!("the cached manifest of {source} has digest {found}: the cache was changed; delete {} to fetch it again", self.dir.display());
        }
        let manifest = ArtifactManifest::parse(&bytes).map_err(|e| anyhow::anyhow!("{source}: {e}"))?;
        let component = format!("sha256:{component_sha256}");
        if manifest.layer.digest != component {
            bail!("{source} names layer {}, but the component has digest {component}; refusing it", manifest.layer.digest);
        }
        Ok(manifest)
    }

    /// Checks the cached cosign signatures of `source` against `trusted`:
    /// one must name its manifest digest and verify with a trusted key,
    /// whose name is returned.
    fn check_signature(&self, source: &OciSource, trusted: &BTreeMap<String, VerifyingKey>) -> Result<String> {
        let text = std::fs::read(self.signatures()).with_context(|| {
            format!("{source} has no signature in its registry; sign it (`cordon plugin push FILE REF --sign KEY`) or set `signature: optional` for this plugin")
        })?;
        let signatures: Vec<CachedSignature> = serde_json::from_slice(&text).with_context(|| format!("the cached signatures of {source} are unreadable; delete {} to fetch them again", self.dir.display()))?;
        let mut why = Vec::new();
        for signature in &signatures {
            match signature.check(source, trusted) {
                Ok(name) => return Ok(name),
                Err(e) => why.push(e),
            }
        }
        bail!("no signature of {source} is valid: {}", if why.is_empty() { "there are none".to_string() } else { why.join("; ") })
    }
}

/// One cosign signature: the simple-signing payload and the ed25519
/// signature over it, both base64.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct CachedSignature {
    pub payload: String,
    pub signature: String,
}

impl CachedSignature {
    fn check(&self, source: &OciSource, trusted: &BTreeMap<String, VerifyingKey>) -> Result<String, String> {
        let payload = B64.decode(&self.payload).map_err(|_| "a payload is not base64".to_string())?;
        let bytes: [u8; 64] = B64
            .decode(self.signature.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or("a signature is not a base64 ed25519 signature")?;
        let signed: Payload = serde_json::from_slice(&payload).map_err(|_| "a payload is not a cosign simple-signing payload".to_string())?;
        if signed.critical.image.digest != source.digest {
            return Err(format!("a signature signs manifest {}: it belongs to another artifact", signed.critical.image.digest));
        }
        let signature = Signature::from_bytes(&bytes);
        trusted
            .iter()
            .find(|(_, key)| key.verify_strict(&payload, &signature).is_ok())
            .map(|(name, _)| name.clone())
            .ok_or_else(|| "a signature does not verify with any key in `trusted-keys`".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn references_parse_strictly() {
        let r = OciReference::parse("oci://127.0.0.1:5000/team/http-check:1.2.0").unwrap();
        assert_eq!((r.registry.as_str(), r.repository.as_str(), r.tag.as_deref(), r.digest.as_deref()), ("127.0.0.1:5000", "team/http-check", Some("1.2.0"), None));
        assert_eq!(r.to_string(), "oci://127.0.0.1:5000/team/http-check:1.2.0");
        let pinned = OciSource::parse(&format!("oci://reg.example/a/b@{DIGEST}")).unwrap();
        assert_eq!(pinned.signature_tag(), format!("sha256-{}.sig", &DIGEST[7..]));
        assert_eq!(pinned.to_string(), format!("oci://reg.example/a/b@{DIGEST}"));
        assert!(OciSource::parse("oci://reg.example/a/b:1.0").unwrap_err().contains("cordon plugin pin"));
        for bad in ["reg/a", "oci://reg", "oci://reg/A", "oci://reg/a@sha256:12", "oci://reg/a:", "oci:///a"] {
            assert!(OciReference::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn manifests_must_be_one_wasm_layer() {
        let manifest = |config: &str, layers: &str| format!(r#"{{"schemaVersion":2,"mediaType":"{MANIFEST_MEDIA_TYPE}","config":{{"mediaType":"{config}","digest":"{DIGEST}","size":2}},"layers":[{layers}]}}"#);
        let layer = |media: &str, size: u64| format!(r#"{{"mediaType":"{media}","digest":"{DIGEST}","size":{size}}}"#);
        assert!(ArtifactManifest::parse(manifest(CONFIG_MEDIA_TYPE, &layer(LAYER_MEDIA_TYPE, 10)).as_bytes()).is_ok());
        assert!(ArtifactManifest::parse(manifest(CONFIG_MEDIA_TYPE, &layer(LEGACY_LAYER_MEDIA_TYPE, 10)).as_bytes()).is_ok());
        let cases = [
            (manifest("application/vnd.oci.image.config.v1+json", &layer(LAYER_MEDIA_TYPE, 10)), "not a Wasm component artifact"),
            (manifest(CONFIG_MEDIA_TYPE, &format!("{},{}", layer(LAYER_MEDIA_TYPE, 1), layer(LAYER_MEDIA_TYPE, 1))), "2 layers"),
            (manifest(CONFIG_MEDIA_TYPE, &layer("application/vnd.oci.image.layer.v1.tar", 10)), "media type"),
            (manifest(CONFIG_MEDIA_TYPE, &layer(LAYER_MEDIA_TYPE, MAX_COMPONENT_BYTES + 1)), "at most"),
        ];
        for (doc, expected) in cases {
            let err = ArtifactManifest::parse(doc.as_bytes()).unwrap_err();
            assert!(err.contains(expected), "{expected:?} in {err}");
        }
    }
}
