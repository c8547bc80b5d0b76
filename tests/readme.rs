//! The README's example configs, read by the parsers that read real files,
//! so the documentation cannot drift from the code: every `yaml` block of
//! the README is an agent config, an application config, a server config
//! or a migration spec (told apart by its keys), and each must parse and
//! validate. Placeholders (`6c1f…`) become well-formed values first, and
//! mounts' host directories (which must exist) are made under a temporary
//! directory; other paths stay as written (nothing here opens them). The migration spec is
//! checked against an agent config of the first-party plugins as `make
//! guests` leaves them in `dist/plugins/`, each under its plugin name.

use std::path::Path;

use cordon_contract::World;
use cordon_migrate::spec::MigrationSpec;
use cordon_pipeline::config::AppConfig;
use cordon_runtime::plugin::AgentConfig;
use cordon_server::config::ServerConfig;
use cordon_tests::{root, sha256_file};

/// Every ```yaml block of `text`, dedented.
fn yaml_blocks(text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for line in text.lines() {
        let trimmed = line.trim_start();
        match &mut current {
            None if trimmed == "```yaml" => current = Some((line.len() - trimmed.len(), String::new())),
            Some(_) if trimmed == "```" => blocks.push(current.take().unwrap().1),
            Some((indent, block)) => {
                block.push_str(line.get(*indent..).unwrap_or(""));
                block.push('\n');
            }
            None => {}
        }
    }
    blocks
}

/// `6c1f…` → a 64-digit hex string starting `6c1f`; other text before `…` stays.
fn fill_placeholders(block: &str) -> String {
    let mut out = String::new();
    let mut rest = block;
    while let Some(at) = rest.find('…') {
        let head = &rest[..at];
        let start = head.rfind(|c: char| !c.is_ascii_alphanumeric()).map_or(0, |i| i + 1);
        let stem = &head[start..];
        out.push_str(head);
        if !stem.is_empty() && stem.bytes().all(|b| b.is_ascii_hexdigit()) {
            out.push_str(&"0".repeat(64 - stem.len()));
        }
        rest = &rest[at + '…'.len_utf8()..];
    }
    out.push_str(rest);
    out
}

/// Each mount's `host: /DIR` becomes `host: UNDER/DIR`, created.
fn with_mount_dirs(block: &str, under: &Path) -> String {
    let mut out = String::new();
    let mut rest = block;
    while let Some(at) = rest.find("host: /") {
        let start = at + "host: ".len();
        let end = rest[start..].find([',', ' ', '}']).map_or(rest.len(), |n| start + n);
        let moved = under.join(&rest[start + 1..end]);
        std::fs::create_dir_all(&moved).unwrap();
        out.push_str(&rest[..start]);
        out.push_str(&moved.to_string_lossy());
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// What a block configures, by its top-level keys.
#[derive(Debug, PartialEq)]
enum Kind {
    Agent,
    App,
    Server,
    Migration,
}

fn kind(block: &str) -> Kind {
    let keys: Vec<&str> = block.lines().filter(|l| !l.starts_with([' ', '#', '-']) && l.contains(':')).map(|l| l.split(':').next().unwrap()).collect();
    if keys.contains(&"listen") {
        Kind::Server
    } else if keys.contains(&"phases") {
        Kind::Migration
    } else if keys.iter().any(|k| ["pipeline", "planner", "agents", "timeout", "debug"].contains(k))
        || (keys.contains(&"name") && !keys.iter().any(|k| ["state-dir", "state", "trusted-keys", "insecure-registries"].contains(k)))
    {
        Kind::App
    } else {
        Kind::Agent
    }
}

/// An agent config of the first-party plugins in `dist/plugins/`.
fn first_party_agent(dir: &Path) -> AgentConfig {
    let plugins = root().join("dist/plugins");
    let mut yaml = format!("state-dir: {}\nplugins:\n", dir.join("state").display());
    for (name, world) in [
        ("kcp-keys", World::KeyFilter),
        ("registry-rewrite", World::ItemAction),
        ("migrate-prepare", World::MigrationPhase),
        ("migrate-copy", World::MigrationPhase),
        ("migrate-verify", World::MigrationPhase),
        ("migrate-cleanup", World::MigrationPhase),
        ("migrate-finalize", World::MigrationPhase),
    ] {
        let file = plugins.join(format!("{name}.wasm"));
        yaml.push_str(&format!("  - {{ name: {name}, path: {}, sha256: {}, world: {world} }}\n", file.display(), sha256_file(&file)));
    }
    AgentConfig::parse(&yaml, &dir.join("agent.yaml")).unwrap()
}

#[test]
fn every_example_config_in_the_readme_parses() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let agent = first_party_agent(dir.path());
    let mut seen = Vec::new();
    for (i, block) in yaml_blocks(&readme).iter().enumerate() {
        let text = with_mount_dirs(&fill_placeholders(block), dir.path());
        let kind = kind(&text);
        let file = dir.path().join(format!("block-{i}.yaml"));
        std::fs::write(&file, &text).unwrap();
        let parsed = match kind {
            // Fragments show a part of an agent config; they get the state-dir they leave out.
            Kind::Agent if !text.contains("\nstate-dir:") && !text.starts_with("state-dir:") => AgentConfig::parse(&format!("state-dir: state\n{text}"), &file).map(drop),
            Kind::Agent => AgentConfig::parse(&text, &file).map(drop),
            Kind::App => AppConfig::parse(&text, &file).and_then(|app| app.dependencies().map(drop)),
            Kind::Server => ServerConfig::load(&file).map(drop),
            Kind::Migration => MigrationSpec::parse(&text, &file, &agent).map(drop),
        };
        if let Err(e) = parsed {
            panic!("README yaml block {i} ({kind:?}) does not parse: {e:#}\n{text}");
        }
        seen.push(kind);
    }
    for kind in [Kind::Agent, Kind::App, Kind::Server, Kind::Migration] {
        assert!(seen.contains(&kind), "the README has no {kind:?} example any more: {seen:?}");
    }
    assert!(seen.len() >= 8, "{seen:?}");
}

#[test]
fn placeholders_become_well_formed_values() {
    assert_eq!(fill_placeholders("sha256: 6c1f…  # x"), format!("sha256: 6c1f{}  # x", "0".repeat(60)));
    assert_eq!(fill_placeholders("k: \"v1 …\""), "k: \"v1 \"");
}

/// `dist/plugins/` holds exactly the first-party plugins, each named after
/// itself (its manifest's name where it has one) — none of the test suite's
/// hostile guests, which stay in `guests/target/`.
#[test]
fn dist_plugins_holds_the_first_party_plugins_under_their_names() {
    let dist = root().join("dist/plugins");
    let mut names: Vec<String> = std::fs::read_dir(&dist).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    let expected = [
        "approval", "files", "http-check", "kcp-keys", "migrate-cleanup", "migrate-copy", "migrate-finalize", "migrate-prepare", "migrate-verify",
        "registry-rewrite", "wait", "wait-py",
    ];
    let mut files: Vec<String> = expected.iter().map(|n| format!("{n}.wasm")).collect();
    files.sort();
    assert_eq!(names, files);
    for name in expected {
        let bytes = std::fs::read(dist.join(format!("{name}.wasm"))).unwrap();
        let summary = cordon_contract::summarize(&bytes).unwrap();
        if let Some(manifest) = summary.manifest {
            let manifest = cordon_runtime::plugin::Manifest::parse(&manifest).unwrap();
            assert_eq!(manifest.name, name, "dist/plugins/{name}.wasm says it is {}", manifest.name);
        }
    }
}
