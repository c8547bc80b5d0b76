//! `cordon plugin new|inspect|keygen|sign|verify`: writing, looking at and
//! signing plugin components.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Subcommand;
use sha2::{Digest, Sha256};

use cordon_contract::{self as contract, World};
use cordon_runtime::engine::{Engine, EngineOptions};
use cordon_runtime::plugin::{AgentConfig, Manifest, Plugin, PluginConfig, StageInfo, signature};

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
        writeln!(out, "stages:")?;
        for stage in list_stages(file, &bytes, world).await? {
            writeln!(out, "  {:<20} {}", stage.name, escape(&stage.description))?;
        }
    }
    Ok(())
}

/// Loads the component with no grants to ask which stages it defines.
async fn list_stages(file: &Path, bytes: &[u8], world: World) -> Result<Vec<StageInfo>> {
    let engine = Engine::new(EngineOptions { cache_dir: None, pooling: false, ..Default::default() })?;
    let config = PluginConfig {
        name: "inspected".into(),
        path: file.to_path_buf(),
        sha256: hex::encode(Sha256::digest(bytes)),
        world,
        grants: Default::default(),
        limits: Default::default(),
        signature: None,
        signature_file: None,
        trust: Default::default(),
    };
    Ok(Plugin::load_for_inspection(&engine, &config).await?.stages)
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
