//! `cordon plugin push`: a component becomes a Wasm OCI artifact, and with
//! a key, a cosign-layout signature of its manifest digest.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use oci_client::Reference;
use serde_json::json;

use cordon_contract as contract;
use cordon_runtime::plugin::Manifest;
use cordon_runtime::plugin::artifact::{
    CONFIG_MEDIA_TYPE, COSIGN_SIGNATURE_ANNOTATION, LAYER_MEDIA_TYPE, MANIFEST_MEDIA_TYPE, OciReference, OciSource, PLUGIN_MANIFEST_ANNOTATION,
    SIMPLE_SIGNING_MEDIA_TYPE, digest_of, signature_payload,
};
use cordon_runtime::plugin::signature;

use crate::Registry;

/// The config media type of a cosign signature manifest.
const IMAGE_CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";

/// What to publish, and where.
pub struct Publish<'a> {
    pub component: &'a Path,
    /// `oci://REGISTRY/REPO:TAG` (or without a tag: pushed by digest only).
    pub reference: &'a OciReference,
    pub plain_http: bool,
    /// A private key from `cordon plugin keygen`, to sign the pushed digest.
    pub sign: Option<&'a Path>,
    /// `org.opencontainers.image.*` annotations (source, authors,
    /// description…); version and title default to the plugin manifest's.
    pub annotations: BTreeMap<String, String>,
}

/// The creation time to record: `$SOURCE_DATE_EPOCH` when set, else none,
/// so that pushing the same component with the same annotations gives the
/// same digest (and pushing it again with `--sign` signs the digest
/// operators already pinned).
fn created() -> Result<Option<String>> {
    let Ok(epoch) = std::env::var("SOURCE_DATE_EPOCH") else { return Ok(None) };
    let seconds: u64 = epoch.trim().parse().with_context(|| format!("SOURCE_DATE_EPOCH={epoch:?} is not a number of seconds since 1970"))?;
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(seconds);
    Ok(Some(humantime::format_rfc3339_seconds(at).to_string()))
}

/// The world a component is published as: the most specific it satisfies.
fn target_world(summary: &contract::Summary) -> Result<contract::World> {
    summary
        .worlds()
        .into_iter()
        .max_by_key(|w| w.required_exports().len())
        .with_context(|| format!("it is not a plugin of contract {}@{} (it matches no world)", contract::PACKAGE, contract::VERSION))
}

/// What a push made: the two pins an agent config needs.
pub struct Pushed {
    /// The manifest, pinned by digest.
    pub source: OciSource,
    /// The component's sha256 (hex).
    pub sha256: String,
}

/// Pushes the component.
pub async fn push(publish: Publish<'_>) -> Result<Pushed> {
    let file = publish.component.display();
    let bytes = std::fs::read(publish.component).with_context(|| format!("cannot read {file}"))?;
    let summary = contract::summarize(&bytes).map_err(|e| anyhow::anyhow!("{file} {e}"))?;
    let world = target_world(&summary).map_err(|e| anyhow::anyhow!("{file}: {e:#}"))?;
    let layer = digest_of(&bytes);

    let mut annotations = BTreeMap::new();
    let created = created()?;
    if let Some(created) = &created {
        annotations.insert("org.opencontainers.image.created".to_string(), created.clone());
    }
    if let Some(raw) = &summary.manifest {
        let manifest = Manifest::parse(raw).map_err(|e| anyhow::anyhow!("{file}: {e}"))?;
        annotations.insert("org.opencontainers.image.title".to_string(), manifest.name);
        annotations.insert("org.opencontainers.image.version".to_string(), manifest.version);
        annotations.insert(PLUGIN_MANIFEST_ANNOTATION.to_string(), String::from_utf8_lossy(raw).into_owned());
    }
    annotations.extend(publish.annotations);

    let mut config = json!({
        "architecture": "wasm",
        "os": "wasip2",
        "layerDigests": [layer],
        "component": {
            "exports": summary.exports,
            "imports": summary.imports,
            "target": format!("{}/{}@{}", contract::PACKAGE, world.name(), contract::VERSION),
        },
    });
    if let Some(created) = created {
        config["created"] = created.into();
    }
    let config = serde_json::to_vec(&config)?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": { "mediaType": CONFIG_MEDIA_TYPE, "digest": digest_of(&config), "size": config.len() },
        "layers": [{ "mediaType": LAYER_MEDIA_TYPE, "digest": layer, "size": bytes.len() }],
        "annotations": annotations,
    }))?;

    let reference = publish.reference;
    if reference.digest.is_some() {
        bail!("push to a tag (`{}`) or to the bare repository; a digest is what the push produces", reference);
    }
    let registry = Registry::connect(&reference.registry, publish.plain_http)?;
    let digest = digest_of(&manifest);
    let target = match &reference.tag {
        Some(tag) => registry.by_tag(&reference.repository, tag),
        None => registry.by_digest(&reference.repository, &digest),
    };
    let what = format!("cannot push to {reference}");
    put_blobs(&registry, &target, &what, [config, bytes]).await?;
    put_manifest(&registry, &target, &what, manifest).await?;
    let source = reference.pinned(&digest);
    if let Some(key) = publish.sign {
        sign(&registry, &source, key).await?;
    }
    Ok(Pushed { source, sha256: layer.trim_start_matches("sha256:").to_string() })
}

async fn put_blobs(registry: &Registry, target: &Reference, what: &str, blobs: impl IntoIterator<Item = Vec<u8>>) -> Result<()> {
    registry.client.store_auth_if_needed(target.resolve_registry(), &registry.auth).await;
    for blob in blobs {
        let digest = digest_of(&blob);
        let present = registry.client.blob_exists(target, &digest).await.map_err(|e| registry.explain(what, e))?;
        if !present {
            registry.client.push_blob(target, blob, &digest).await.map_err(|e| registry.explain(what, e))?;
        }
    }
    Ok(())
}

async fn put_manifest(registry: &Registry, target: &Reference, what: &str, manifest: Vec<u8>) -> Result<()> {
    let content_type = http::HeaderValue::from_static(MANIFEST_MEDIA_TYPE);
    registry.client.push_manifest_raw(target, manifest, content_type).await.map_err(|e| registry.explain(what, e))?;
    Ok(())
}

/// Signs `source` with `key` and stores the signature under cosign's tag.
/// The signature manifest holds this one signature (a new push replaces
/// an earlier one).
async fn sign(registry: &Registry, source: &OciSource, key: &Path) -> Result<()> {
    let payload = signature_payload(&format!("{}/{}", source.registry, source.repository), &source.digest);
    let (signature, _) = signature::sign_bytes(&payload, key)?;
    let config = serde_json::to_vec(&json!({
        "architecture": "",
        "os": "",
        "config": {},
        "rootfs": { "type": "layers", "diff_ids": [digest_of(&payload)] },
    }))?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": { "mediaType": IMAGE_CONFIG_MEDIA_TYPE, "digest": digest_of(&config), "size": config.len() },
        "layers": [{
            "mediaType": SIMPLE_SIGNING_MEDIA_TYPE,
            "digest": digest_of(&payload),
            "size": payload.len(),
            "annotations": { COSIGN_SIGNATURE_ANNOTATION: B64.encode(signature.to_bytes()) },
        }],
    }))?;
    let target = registry.by_tag(&source.repository, &source.signature_tag());
    let what = format!("cannot push the signature of {source}");
    put_blobs(registry, &target, &what, [config, payload]).await?;
    put_manifest(registry, &target, &what, manifest).await
}
