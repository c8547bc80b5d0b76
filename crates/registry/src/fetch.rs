//! Resolving tags and fetching pinned artifacts into the agent's cache.
//!
//! A fetch checks what it downloads against the digests that name it
//! (manifest against the pin, component against the manifest's layer,
//! signature payloads against their layers) and places the artifact's
//! directory in the cache by one rename, so the cache never holds half an
//! artifact. The load that follows checks the same chain again from the
//! cache, with the `sha256` pin and the signature, before compiling.

use std::path::Path;

use anyhow::{Context, Result, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use futures_util::StreamExt;
use oci_client::Reference;

use cordon_runtime::plugin::{AgentConfig, PluginConfig};
use cordon_runtime::plugin::artifact::{
    ArtifactManifest, COSIGN_SIGNATURE_ANNOTATION, Cached, CachedSignature, MANIFEST_MEDIA_TYPE, MAX_DOCUMENT_BYTES, OciReference, OciSource,
    SIMPLE_SIGNING_MEDIA_TYPE, digest_of,
};

use crate::{Registry, not_found};

/// The most signatures of one artifact that are fetched and tried; a
/// registry cannot make the agent hold more.
const MAX_SIGNATURES: usize = 16;

/// The manifest digest `reference` names now (a tag is resolved once; a
/// digest is returned as it is).
pub async fn resolve(reference: &OciReference, plain_http: bool) -> Result<OciSource> {
    if let Some(digest) = &reference.digest {
        return Ok(reference.pinned(digest));
    }
    let registry = Registry::connect(&reference.registry, plain_http)?;
    let tag = reference.tag.as_deref().unwrap_or("latest");
    let what = format!("cannot resolve {reference}");
    let bytes = pull_document(&registry, &registry.by_tag(&reference.repository, tag), &what)
        .await?
        .with_context(|| format!("{what}: the registry has no tag `{tag}` in {}", reference.repository))?;
    ArtifactManifest::parse(&bytes).map_err(|e| anyhow::anyhow!("{reference}: {e}"))?;
    Ok(reference.pinned(&digest_of(&bytes)))
}

/// Every registry plugin of `config` that is not in the cache yet.
pub async fn fetch_all(config: &AgentConfig) -> Result<()> {
    for plugin in &config.plugins {
        fetch_plugin(config, plugin).await?;
    }
    Ok(())
}

/// `plugin`'s artifact, when it comes from a registry and is not cached.
/// When the plugin needs a signature and the cached ones do not satisfy
/// the agent's `trusted-keys` (the publisher signed since, or rotated its
/// key), the signatures are fetched again; unreachable, the cache stays
/// and the load refuses it with the reason.
pub async fn fetch_plugin(config: &AgentConfig, plugin: &PluginConfig) -> Result<()> {
    let Some(source) = &plugin.source else { return Ok(()) };
    let plain_http = config.plain_http(&source.registry);
    let context = || format!("plugin `{}`", plugin.name);
    let cached = fetch(source, &config.artifact_dir(), plain_http).await.with_context(context)?;
    let trust = &plugin.trust;
    if cached.signer(source, trust.required, &trust.keys).is_err() {
        let refreshed = async {
            let registry = Registry::connect(&source.registry, plain_http)?;
            let signatures = pull_signatures(&registry, source).await?;
            if signatures.is_empty() {
                return Ok(());
            }
            cordon_runtime::files::write_atomic(&cached.signatures(), &serde_json::to_vec(&signatures)?)
        };
        if let Err(e) = refreshed.await {
            tracing::warn!("{}: cannot fetch the signatures of {source} again: {e:#}", context());
        }
    }
    Ok(())
}

/// Brings `source` into the cache under `cache_root` unless it is there.
pub async fn fetch(source: &OciSource, cache_root: &Path, plain_http: bool) -> Result<Cached> {
    let dir = source.cache_dir(cache_root);
    let cached = Cached::new(dir.clone());
    if cached.manifest().exists() {
        return Ok(cached);
    }
    let registry = Registry::connect(&source.registry, plain_http)?;
    let what = format!("cannot fetch {source}");
    let reference = registry.by_digest(&source.repository, &source.digest);
    let manifest = pull_document(&registry, &reference, &what).await?.with_context(|| format!("{what}: the registry does not have it"))?;
    let found = digest_of(&manifest);
    if found != source.digest {
        bail!("{what}: the registry served a manifest with digest {found}; refusing it");
    }
    let artifact = ArtifactManifest::parse(&manifest).map_err(|e| anyhow::anyhow!("{source}: {e}"))?;
    let component = pull_blob(&registry, &reference, &artifact.layer.digest, artifact.layer.size, &what).await?;
    let signatures = pull_signatures(&registry, source).await?;

    let parent = dir.parent().context("a cache directory has a parent")?;
    std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let staging = tempfile::Builder::new().prefix(".fetch-").tempdir_in(parent).with_context(|| format!("cannot stage in {}", parent.display()))?;
    let staged = Cached::new(staging.path().to_path_buf());
    std::fs::write(staged.manifest(), &manifest)?;
    std::fs::write(staged.component(), &component)?;
    if !signatures.is_empty() {
        std::fs::write(staged.signatures(), serde_json::to_vec(&signatures)?)?;
    }
    let staged_dir = staging.keep();
    if let Err(e) = std::fs::rename(&staged_dir, &dir) {
        // Another process placed the same artifact first: same digest, same bytes.
        let _ = std::fs::remove_dir_all(&staged_dir);
        if !cached.manifest().exists() {
            return Err(e).with_context(|| format!("cannot place {source} in the cache at {}", dir.display()));
        }
    }
    tracing::info!("fetched {source} into {}", dir.display());
    Ok(cached)
}

/// A manifest, or `None` when the registry has none under `reference`.
async fn pull_document(registry: &Registry, reference: &Reference, what: &str) -> Result<Option<Vec<u8>>> {
    match registry.client.pull_manifest_raw(reference, &registry.auth, &[MANIFEST_MEDIA_TYPE]).await {
        Ok((bytes, _)) if bytes.len() as u64 > MAX_DOCUMENT_BYTES => bail!("{what}: its manifest is {} bytes, more than any artifact needs", bytes.len()),
        Ok((bytes, _)) => Ok(Some(bytes.to_vec())),
        Err(e) if not_found(&e) => Ok(None),
        Err(e) => Err(registry.explain(what, e)),
    }
}

/// The blob `digest` of at most `size` bytes, checked against its digest.
async fn pull_blob(registry: &Registry, reference: &Reference, digest: &str, size: u64, what: &str) -> Result<Vec<u8>> {
    let mut stream = registry.client.pull_blob_stream(reference, digest).await.map_err(|e| registry.explain(what, e))?;
    let mut bytes = Vec::with_capacity(size.min(MAX_DOCUMENT_BYTES) as usize);
    while let Some(chunk) = stream.next().await {
        // The client checks the digest as the stream ends; an error here
        // is a broken connection or altered content.
        let chunk = chunk.map_err(|e| anyhow::anyhow!("{what}: blob {digest} did not arrive intact ({}); refusing it", crate::error_chain(&e)))?;
        if bytes.len() as u64 + chunk.len() as u64 > size {
            bail!("{what}: blob {digest} is longer than the {size} bytes its manifest says; refusing it");
        }
        bytes.extend_from_slice(&chunk);
    }
    let found = digest_of(&bytes);
    if found != digest {
        bail!("{what}: blob {digest} arrived with digest {found}: it was altered in the registry or on the way; refusing it");
    }
    Ok(bytes)
}

/// The cosign signatures stored for `source`, each payload checked against
/// its layer digest (whether they verify is the load's question).
async fn pull_signatures(registry: &Registry, source: &OciSource) -> Result<Vec<CachedSignature>> {
    let what = format!("cannot fetch the signature of {source}");
    let reference = registry.by_tag(&source.repository, &source.signature_tag());
    let Some(manifest) = pull_document(registry, &reference, &what).await? else {
        return Ok(Vec::new());
    };
    #[derive(serde::Deserialize)]
    struct Layers {
        layers: Vec<cordon_runtime::plugin::artifact::Descriptor>,
    }
    let doc: Layers = serde_json::from_slice(&manifest).with_context(|| format!("{what}: its manifest is not an OCI image manifest"))?;
    let mut signatures = Vec::new();
    for layer in doc.layers.iter().filter(|l| l.media_type == SIMPLE_SIGNING_MEDIA_TYPE).take(MAX_SIGNATURES) {
        let Some(signature) = layer.annotations.get(COSIGN_SIGNATURE_ANNOTATION) else { continue };
        if layer.size > MAX_DOCUMENT_BYTES {
            bail!("{what}: a signature payload of {} bytes is more than any signature needs", layer.size);
        }
        let payload = pull_blob(registry, &reference, &layer.digest, layer.size, &what).await?;
        signatures.push(CachedSignature { payload: B64.encode(payload), signature: signature.clone() });
    }
    Ok(signatures)
}
