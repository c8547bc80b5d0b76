//! `cordon plugin new|inspect|keygen|sign|verify|push|pin`: writing,
//! looking at, signing and publishing plugin components, and pinning them
//! in the agent config.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use sha2::{Digest, Sha256};

use cordon_contract::{self as contract, World};
use cordon_runtime::engine::{Engine, EngineOptions};
use cordon_registry::Publish;
use cordon_runtime::plugin::artifact::OciReference;
use cordon_runtime::plugin::config::is_loopback;
use cordon_runtime::plugin::{AgentConfig, Manifest, Plugin, PluginConfig, signature};

use crate::print::escape;
use crate::scaffold;

#[derive(Subcommand)]
pub enum PluginCommand {
    /// Write a new plugin project (Rust, on the SDK) to build, try and sign.
    New {
        /// The plugin's name: a-z, 0-9 and '-'.
        name: String,
        #[arg(long, value_enum, default_value = "stage")]
        kind: scaffold::Kind,
        /// Where to write it (default: ./NAME).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The `guests/sdk` directory of a Cordon checkout (default: the one this binary was built from).
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// Show a component's worlds, imports, exports, contract version, size and sha256.
    Inspect {
        /// The component (.wasm) to inspect.
        file: PathBuf,
    },
    /// Create a signing key pair: KEY (private, mode 0600) and KEY.pub.
    Keygen { key: PathBuf },
    /// Sign a component: writes FILE.sig (ed25519 over its sha256).
    Sign {
        file: PathBuf,
        /// The private key from `cordon plugin keygen`.
        #[arg(long)]
        key: PathBuf,
    },
    /// Verify FILE.sig against public keys (or the agent config's trusted keys).
    Verify {
        file: PathBuf,
        /// A `.pub` file to trust (repeatable); without it, the agent config's `trusted-keys`.
        #[arg(long = "public-key")]
        public_keys: Vec<PathBuf>,
    },
    /// Publish a component to an OCI registry as a Wasm artifact; prints its digest.
    Push {
        file: PathBuf,
        /// Where: oci://REGISTRY/REPOSITORY:TAG.
        reference: String,
        /// Sign the pushed digest with this private key (cosign's signature layout).
        #[arg(long)]
        sign: Option<PathBuf>,
        /// Where the plugin's source lives (org.opencontainers.image.source).
        #[arg(long)]
        source: Option<String>,
        /// Who wrote it (org.opencontainers.image.authors).
        #[arg(long)]
        authors: Option<String>,
        /// What it does (org.opencontainers.image.description).
        #[arg(long)]
        description: Option<String>,
        /// Use plain HTTP for a registry that is not on loopback.
        #[arg(long)]
        insecure: bool,
    },
    /// Pin plugin NAME in the agent config: resolve REF (a tag) once to its
    /// digest, or without REF, re-pin the sha256 of its rebuilt local file.
    ///
    /// After a rebuild, `cargo build --release && cordon plugin pin NAME
    /// --sign KEY` re-pins and re-signs it in one line.
    Pin {
        name: String,
        /// oci://REGISTRY/REPOSITORY:TAG (or @sha256:DIGEST).
        reference: Option<String>,
        /// Sign the local file too, with this private key (`plugin keygen`).
        #[arg(long)]
        sign: Option<PathBuf>,
    },
}

impl PluginCommand {
    pub async fn run(self, config: &Path) -> Result<ExitCode> {
        match self {
            PluginCommand::New { name, kind, dir, sdk } => {
                let request = scaffold::Request { name: &name, kind, dir: dir.as_deref(), sdk: sdk.as_deref() };
                let dir = scaffold::new_plugin(&request)?;
                println!("wrote {}; next: cd {} && cargo build --release (then follow its README.md)", dir.display(), dir.display());
            }
            PluginCommand::Inspect { file } => inspect(&file).await?,
            PluginCommand::Keygen { key } => {
                let (public, _) = signature::keygen(&key)?;
                println!("private key {} (keep it secret), public key {}", key.display(), public.display());
                let name = key.file_name().unwrap_or_default().to_string_lossy();
                println!("trust it in the agent config:\n  trusted-keys:\n    {name}: \"{}\"", std::fs::read_to_string(&public)?.trim());
            }
            PluginCommand::Sign { file, key } => {
                let sig = signature::sign(&file, &key)?;
                println!("signed {} -> {}", file.display(), sig.display());
            }
            PluginCommand::Verify { file, public_keys } => verify(config, &file, &public_keys)?,
            PluginCommand::Push { file, reference, sign, source, authors, description, insecure } => {
                let reference = OciReference::parse(&reference).map_err(anyhow::Error::msg)?;
                let annotations = [("source", source), ("authors", authors), ("description", description)]
                    .into_iter()
                    .filter_map(|(key, value)| Some((format!("org.opencontainers.image.{key}"), value?)))
                    .collect();
                let publish = Publish { component: &file, reference: &reference, plain_http: insecure || is_loopback(&reference.registry), sign: sign.as_deref(), annotations };
                let pushed = cordon_registry::push(publish).await?;
                println!("pushed {} to {reference}{}", file.display(), if sign.is_some() { ", signed" } else { "" });
                println!("digest: {}", pushed.source.digest);
                println!("pin it in the agent config:\n    source: {}\n    sha256: {}", pushed.source, pushed.sha256);
            }
            PluginCommand::Pin { name, reference, sign } => pin(config, &name, reference.as_deref(), sign.as_deref()).await?,
        }
        Ok(ExitCode::SUCCESS)
    }
}

async fn inspect(file: &Path) -> Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let summary = contract::summarize(&bytes).map_err(|e| anyhow::anyhow!("{} {e}", file.display()))?;
    let worlds = summary.worlds();
    let versions = summary.contract_versions();
    let mut out = std::io::stdout().lock();
    writeln!(out, "file:      {}", file.display())?;
    writeln!(out, "size:      {} bytes", bytes.len())?;
    writeln!(out, "sha256:    {}", hex::encode(Sha256::digest(&bytes)))?;
    let shape = summary.shape;
    writeln!(
        out,
        "shape:     {} core modules, {} core instances, {} memories, {} tables",
        shape.core_modules, shape.core_instances, shape.memories, shape.tables
    )?;
    let compat = if versions.iter().all(|v| v == contract::VERSION) { "compatible" } else { "NOT compatible" };
    let found = if versions.is_empty() { "(none)".to_string() } else { escape(&versions.join(", ")).into_owned() };
    writeln!(out, "contract:  {} {found} ({compat} with this host's {})", contract::PACKAGE, contract::VERSION)?;
    let names: Vec<&str> = worlds.iter().map(|w| w.name()).collect();
    writeln!(out, "worlds:    {}", if names.is_empty() { "none of this contract".to_string() } else { names.join(", ") })?;
    writeln!(out, "imports:")?;
    for import in &summary.imports {
        writeln!(out, "  {}", escape(import))?;
    }
    writeln!(out, "exports:")?;
    for export in &summary.exports {
        writeln!(out, "  {}", escape(export))?;
    }
    match summary.manifest.as_deref().map(Manifest::parse) {
        None => writeln!(out, "manifest:  none (the plugin requests no capabilities up front)")?,
        Some(Err(e)) => writeln!(out, "manifest:  INVALID: {}", escape(&e.to_string()))?,
        Some(Ok(m)) => {
            let line = format!("{} {} (contract {}), stages {}", m.name, m.version, m.contract, m.stages.join(", "));
            writeln!(out, "manifest:  {}", escape(&line))?;
            let caps = &m.capabilities;
            let mounts: Vec<String> = caps.mounts.iter().map(|r| format!("{} ({})", r.guest, r.access.as_str())).collect();
            for (what, list) in [("mounts", mounts), ("network", caps.network.clone()), ("env", caps.env.clone()), ("secrets", caps.secrets.clone())] {
                let list = if list.is_empty() { "none".to_string() } else { list.join(", ") };
                writeln!(out, "  requests {what}: {}", escape(&list))?;
            }
        }
    }
    if let Some(world) = worlds.iter().copied().find(|w| w.defines_stages()) {
        let plugin = load_to_inspect(file, &bytes, world).await?;
        writeln!(out, "stages:")?;
        for stage in &plugin.stages {
            writeln!(out, "  {:<20} {}", stage.name, escape(&stage.description))?;
            if let Some(schema) = plugin.described.as_ref().and_then(|d| d.stages.get(&stage.name)) {
                write_schema(&mut out, "options (with:)", schema)?;
            }
        }
        match &plugin.described {
            None if plugin.undescribed.is_some() => {
                writeln!(out, "options:   cannot be read: {} (an agent refuses to load the plugin)", escape(plugin.undescribed.as_deref().unwrap_or_default()))?
            }
            None => writeln!(out, "options:   not described (the plugin does not export `options`; they are checked only when a stage runs)")?,
            Some(described) => match &described.settings {
                Some(schema) => {
                    writeln!(out, "settings:")?;
                    write_schema(&mut out, "plugins.<name> in the app config", schema)?;
                }
                None => writeln!(out, "settings:  none")?,
            },
        }
    }
    Ok(())
}

/// One line per property of an options schema: name, type, whether it is
/// required or its default, then its description (the field's doc comment).
fn write_schema(out: &mut impl Write, title: &str, schema: &serde_json::Value) -> Result<()> {
    let strict = schema.get("additionalProperties") == Some(&serde_json::Value::Bool(false));
    writeln!(out, "    {title}{}", if strict { ", unknown fields refused:" } else { ":" })?;
    let properties = schema.get("properties").and_then(|p| p.as_object());
    let Some(properties) = properties.filter(|p| !p.is_empty()) else {
        writeln!(out, "      none")?;
        return Ok(());
    };
    let required: Vec<&str> = schema.get("required").and_then(|r| r.as_array()).map(|r| r.iter().filter_map(|v| v.as_str()).collect()).unwrap_or_default();
    for (name, property) in properties {
        let mut facts = vec![type_of(property)];
        if let Some(format) = property.get("format").and_then(|f| f.as_str()) {
            facts.push(format.to_string());
        }
        for (key, word) in [("minimum", "≥"), ("maximum", "≤")] {
            if let Some(bound) = property.get(key) {
                facts.push(format!("{word} {bound}"));
            }
        }
        if required.contains(&name.as_str()) {
            facts.push("required".to_string());
        } else if let Some(default) = property.get("default") {
            facts.push(format!("default {default}"));
        }
        let description = property.get("description").and_then(|d| d.as_str()).unwrap_or("").replace('\n', " ");
        let description = if description.is_empty() { String::new() } else { format!(" — {description}") };
        writeln!(out, "      {:<22} {}{}", escape(name), escape(&facts.join(", ")), escape(&description))?;
    }
    Ok(())
}

/// A property's JSON type, as the schema gives it (`string`, `string|null`, a `$ref`'s name).
fn type_of(property: &serde_json::Value) -> String {
    match (property.get("type"), property.get("$ref").and_then(|r| r.as_str())) {
        (Some(serde_json::Value::String(t)), _) => t.clone(),
        (Some(serde_json::Value::Array(ts)), _) => ts.iter().filter_map(|t| t.as_str()).collect::<Vec<_>>().join("|"),
        (None, Some(reference)) => reference.rsplit('/').next().unwrap_or(reference).to_string(),
        _ => "any".to_string(),
    }
}

/// Loads the component with no grants to ask which stages it defines and
/// how it describes their options.
async fn load_to_inspect(file: &Path, bytes: &[u8], world: World) -> Result<Plugin> {
    let engine = Engine::new(EngineOptions { cache_dir: None, pooling: false, ..Default::default() })?;
    let config = PluginConfig {
        name: "inspected".into(),
        path: file.to_path_buf(),
        source: None,
        sha256: hex::encode(Sha256::digest(bytes)),
        world,
        grants: Default::default(),
        limits: Default::default(),
        signature: None,
        signature_file: None,
        trust: Default::default(),
    };
    Plugin::load_for_inspection(&engine, &config).await
}

fn verify(config_path: &Path, file: &Path, public_keys: &[PathBuf]) -> Result<()> {
    let keys: BTreeMap<String, ed25519_dalek::VerifyingKey> = if public_keys.is_empty() {
        let config = AgentConfig::load(config_path)?;
        config.trusted_keys.iter().map(|(n, k)| Ok((n.clone(), signature::parse_public(k)?))).collect::<Result<_>>()?
    } else {
        public_keys
            .iter()
            .map(|p| {
                let text = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
                Ok((p.display().to_string(), signature::parse_public(&text).with_context(|| format!("{}", p.display()))?))
            })
            .collect::<Result<_>>()?
    };
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let sha = hex::encode(Sha256::digest(&bytes));
    let signer = signature::check(file, &signature::signature_path(file), &sha, &keys)?;
    println!("{}: sha256 {sha}, signed by `{signer}`", file.display());
    Ok(())
}

/// Rewrites plugin `name`'s pin in the agent config: `source` (when it
/// comes from a registry) and `sha256`. The file is edited in place, its
/// comments and layout kept, checked as a config before it is replaced.
async fn pin(config_path: &Path, name: &str, reference: Option<&str>, sign: Option<&Path>) -> Result<()> {
    let config = AgentConfig::load(config_path)?;
    let plugin = config.plugin(name)?;
    if let Some(key) = sign {
        if reference.is_some() || plugin.source.is_some() {
            bail!("--sign signs a local file; a plugin from a registry is signed when it is pushed (`cordon plugin push --sign KEY`)");
        }
        if plugin.trust.signature_file != signature::signature_path(&plugin.path) {
            bail!("plugin `{name}` has signature-file {}; sign with `cordon plugin sign` and place the signature there", plugin.trust.signature_file.display());
        }
        if !key.is_file() {
            bail!("--sign {}: no such key file; make one with `cordon plugin keygen {}`", key.display(), key.display());
        }
    }
    let (source, sha) = match (reference, &plugin.source) {
        (Some(text), _) => {
            let reference = OciReference::parse(text).map_err(anyhow::Error::msg)?;
            let plain_http = config.plain_http(&reference.registry);
            let source = cordon_registry::resolve(&reference, plain_http).await?;
            let cached = cordon_registry::fetch(&source, &config.artifact_dir(), plain_http).await?;
            (Some(source), hex::encode(Sha256::digest(std::fs::read(cached.component())?)))
        }
        (None, Some(source)) => bail!(
            "plugin `{name}` comes from {source}; name what to pin, e.g. `cordon plugin pin {name} oci://{}/{}:TAG`",
            source.registry,
            source.repository
        ),
        (None, None) => {
            let bytes = std::fs::read(&plugin.path).with_context(|| format!("cannot read {}; build the plugin first", plugin.path.display()))?;
            (None, hex::encode(Sha256::digest(bytes)))
        }
    };
    let file = &config.source;
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let edited = edit_pin(&text, name, &plugin.sha256, &sha, source.as_ref().map(ToString::to_string).as_deref())
        .map_err(|e| anyhow::anyhow!("{}: {e}; edit the entry of plugin `{name}` by hand", file.display()))?;
    AgentConfig::parse(&edited, file).context("the pinned config would not load; nothing was changed")?;
    cordon_runtime::files::write_atomic(file, edited.as_bytes())?;
    match &source {
        Some(source) => println!("pinned `{name}` to {source} (component sha256 {sha}) in {}", file.display()),
        None => println!("pinned `{name}` to sha256 {sha} of {} in {}", plugin.path.display(), file.display()),
    }
    if let Some(key) = sign {
        let sig = signature::sign(&plugin.path, key)?;
        println!("signed {} -> {}", plugin.path.display(), sig.display());
    }
    Ok(())
}

/// The config `text` with plugin `name`'s `sha256` (now `old_sha`) set to
/// `new_sha` and, given `source`, its `path:` or `source:` replaced by
/// `source: SOURCE`. Works on block and flow style entries.
fn edit_pin(text: &str, name: &str, old_sha: &str, new_sha: &str, source: Option<&str>) -> Result<String, String> {
    let key = |k: &str| regex::Regex::new(&format!(r"(?m)(?:^|[\s{{,]){k}:[ \t]*")).expect("a valid pattern");
    let entry = regex::Regex::new(&format!(r#"(?m)(?:^|[\s{{,])name:[ \t]*["']?{}["']?[ \t]*(?:$|[,}}#])"#, regex::escape(name))).expect("a valid pattern");
    let start = entry.find(text).ok_or(format!("cannot find the entry `name: {name}`"))?.end();
    let end = key("name").find_at(text, start).map_or(text.len(), |m| m.start());
    let in_entry = |k: &str| key(k).find_at(text, start).filter(|m| m.end() <= end);
    // A value runs to the end of its quotes, or to `,`, `}`, a comment or the line's end.
    let value_end = |from: usize| {
        let rest = &text[from..end];
        let len = match rest.chars().next() {
            Some(q @ ('"' | '\'')) => rest[1..].find(q).map_or(rest.len(), |i| i + 2),
            _ => rest.find([',', '}', '\n', '#']).unwrap_or(rest.len()),
        };
        from + rest[..len].trim_end().len()
    };
    let sha_at = in_entry("sha256").ok_or("cannot find its `sha256:`")?.end();
    let sha_span = sha_at..value_end(sha_at);
    if !text[sha_span.clone()].trim_matches(['"', '\'']).eq_ignore_ascii_case(old_sha) {
        return Err("its `sha256:` does not hold the pin the config loaded".to_string());
    }
    let mut edits = vec![(sha_span, new_sha.to_string())];
    if let Some(source) = source {
        let m = in_entry("path").or_else(|| in_entry("source")).ok_or("cannot find its `path:` or `source:`")?;
        let key_start = m.start() + m.as_str().find(|c: char| c.is_ascii_alphabetic()).unwrap_or(0);
        edits.push((key_start..value_end(m.end()), format!("source: {source}")));
    }
    edits.sort_by_key(|(span, _)| std::cmp::Reverse(span.start));
    let mut out = text.to_string();
    for (span, replacement) in edits {
        out.replace_range(span, &replacement);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = "1111111111111111111111111111111111111111111111111111111111111111";
    const NEW: &str = "2222222222222222222222222222222222222222222222222222222222222222";

    #[test]
    fn pins_are_edited_in_place_in_block_and_flow_entries() {
        let block = format!("# agent\nplugins:\n  - name: web\n    path: web.wasm   # local\n    sha256: {OLD}\n    world: executor\n  - name: other\n    path: o.wasm\n    sha256: {OLD}\n");
        let out = edit_pin(&block, "web", OLD, NEW, Some("oci://r/web@sha256:ab")).unwrap();
        assert_eq!(out, format!("# agent\nplugins:\n  - name: web\n    source: oci://r/web@sha256:ab   # local\n    sha256: {NEW}\n    world: executor\n  - name: other\n    path: o.wasm\n    sha256: {OLD}\n"));
        let flow = format!("plugins:\n  - {{ name: a, path: \"a b.wasm\", sha256: {OLD}, world: executor }}\n  - {{ name: web, source: oci://r/web@sha256:00, sha256: \"{OLD}\", world: executor }}\n");
        let out = edit_pin(&flow, "web", OLD, NEW, Some("oci://r/web@sha256:ff")).unwrap();
        assert!(out.contains(&format!("{{ name: web, source: oci://r/web@sha256:ff, sha256: {NEW}, world: executor }}")), "{out}");
        assert!(out.contains(&format!("name: a, path: \"a b.wasm\", sha256: {OLD}")), "{out}");
        let local = edit_pin(&flow, "a", OLD, NEW, None).unwrap();
        assert!(local.contains(&format!("name: a, path: \"a b.wasm\", sha256: {NEW}")), "{local}");
        assert!(edit_pin(&flow, "nope", OLD, NEW, None).unwrap_err().contains("name: nope"));
        assert!(edit_pin(&flow, "a", NEW, NEW, None).unwrap_err().contains("does not hold"));
    }
}
