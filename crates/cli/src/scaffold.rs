//! `cordon plugin new`: writes a buildable plugin project from
//! `examples/plugin-template`, which is embedded in the binary so that an
//! installed `cordon` needs no checkout of the template.
//!
//! The template is plain files with `{{…}}` placeholders: the project's
//! name, its crate name, the stage name derived from it, the SDK
//! dependency lines, and the world and grants of its agent config. One
//! source file per kind (`kinds/<kind>.rs`) becomes `src/lib.rs`, and the
//! kind's guide (`kinds/<kind>.md`) the README's "Run it" step, with the
//! files it uses (`app/`, `try/`): every kind's README works when followed
//! verbatim (`tests/publishing.rs` follows each).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// What kind of plugin to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    Stage,
    Deployment,
    KeyFilter,
    ItemAction,
    MigrationPhase,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Stage => "stage",
            Kind::Deployment => "deployment",
            Kind::KeyFilter => "key-filter",
            Kind::ItemAction => "item-action",
            Kind::MigrationPhase => "migration-phase",
        }
    }

    fn world(self) -> &'static str {
        match self {
            Kind::Stage => "executor",
            other => other.name(),
        }
    }

    fn sdk_trait(self) -> &'static str {
        match self {
            Kind::Stage => "StagePlugin",
            Kind::Deployment => "DeploymentPlugin",
            Kind::KeyFilter => "KeyFilter",
            Kind::ItemAction => "ItemAction",
            Kind::MigrationPhase => "MigrationPhase",
        }
    }

    fn source(self) -> &'static str {
        match self {
            Kind::Stage => include_str!("../../../examples/plugin-template/kinds/stage.rs"),
            Kind::Deployment => include_str!("../../../examples/plugin-template/kinds/deployment.rs"),
            Kind::KeyFilter => include_str!("../../../examples/plugin-template/kinds/key-filter.rs"),
            Kind::ItemAction => include_str!("../../../examples/plugin-template/kinds/item-action.rs"),
            Kind::MigrationPhase => include_str!("../../../examples/plugin-template/kinds/migration-phase.rs"),
        }
    }

    /// The README's "Run it" step for this kind.
    fn guide(self) -> &'static str {
        match self {
            Kind::Stage => include_str!("../../../examples/plugin-template/kinds/stage.md"),
            Kind::Deployment => include_str!("../../../examples/plugin-template/kinds/deployment.md"),
            Kind::KeyFilter => include_str!("../../../examples/plugin-template/kinds/key-filter.md"),
            Kind::ItemAction => include_str!("../../../examples/plugin-template/kinds/item-action.md"),
            Kind::MigrationPhase => include_str!("../../../examples/plugin-template/kinds/migration-phase.md"),
        }
    }

    /// The files the guide uses: (path in the project, template text).
    fn try_files(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Kind::Stage => &[("app/app.cordon.yaml", include_str!("../../../examples/plugin-template/app/app.cordon.yaml"))],
            Kind::Deployment => &[
                ("app/app.cordon.yaml", include_str!("../../../examples/plugin-template/app/deployment.cordon.yaml")),
                ("app/index.html", include_str!("../../../examples/plugin-template/app/index.html")),
                ("target-dir/.keep", ""),
            ],
            Kind::KeyFilter => &[("try/keys.txt", include_str!("../../../examples/plugin-template/try/keys.txt"))],
            Kind::ItemAction => &[("try/items.jsonl", include_str!("../../../examples/plugin-template/try/items.jsonl"))],
            Kind::MigrationPhase => &[("try/migration.yaml", include_str!("../../../examples/plugin-template/try/migration.yaml"))],
        }
    }
}

/// The template's files other than the per-kind sources: (path, text).
const COMMON: [(&str, &str); 4] = [
    ("Cargo.toml", include_str!("../../../examples/plugin-template/Cargo.toml")),
    (".cargo/config.toml", include_str!("../../../examples/plugin-template/.cargo/config.toml")),
    ("README.md", include_str!("../../../examples/plugin-template/README.md")),
    ("cordon.yaml", include_str!("../../../examples/plugin-template/cordon.yaml")),
];

/// The SDK version a project asks for: the one built with this binary, for
/// the contract it implements. Cargo refuses an SDK at `path` whose version
/// does not match, naming both.
const SDK_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The SDK of the checkout this binary was built from, when it is still there.
fn default_sdk() -> Option<PathBuf> {
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guests/sdk");
    sdk.join("Cargo.toml").is_file().then(|| sdk.canonicalize().ok()).flatten()
}

/// What `plugin new` was asked for.
pub struct Request<'a> {
    pub name: &'a str,
    pub kind: Kind,
    /// Where to write; `./NAME` when absent.
    pub dir: Option<&'a Path>,
    /// The `cordon-sdk` crate directory; the build checkout's when absent.
    pub sdk: Option<&'a Path>,
}

/// Writes the project and returns its directory. Nothing is written when
/// an input is refused; a failure while writing removes what was written.
pub fn new_plugin(request: &Request<'_>) -> Result<PathBuf> {
    let name = request.name;
    if name.is_empty()
        || name.len() > 64
        || !name.starts_with(|c: char| c.is_ascii_lowercase())
        || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        bail!("plugin name {name:?}: use 1-64 characters of a-z, 0-9 and '-', starting with a letter (e.g. `hello-check`)");
    }
    let dir = request.dir.map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from(name));
    if dir.exists() && std::fs::read_dir(&dir).map(|mut d| d.next().is_some()).unwrap_or(true) {
        bail!("{}: already exists and is not empty; pick another --dir or remove it", dir.display());
    }
    let sdk = match request.sdk {
        Some(p) => p.canonicalize().with_context(|| format!("--sdk {}: not found", p.display()))?,
        None => default_sdk().context("this cordon binary was not built from a checkout that still has guests/sdk; pass --sdk PATH (the guests/sdk directory of a Cordon checkout)")?,
    };
    if !sdk.join("Cargo.toml").is_file() {
        bail!("--sdk {}: no Cargo.toml there; pass the guests/sdk directory of a Cordon checkout", sdk.display());
    }
    let dependency = |name: &str, path: &Path| format!("{name} = {{ version = \"{SDK_VERSION}\", path = {:?} }}", path.display().to_string());
    let mut sdk_lines = dependency("cordon-sdk", &sdk);
    if request.kind == Kind::Deployment {
        let deployment = sdk.parent().map(|p| p.join("sdk-deployment")).filter(|p| p.join("Cargo.toml").is_file());
        let deployment = deployment.with_context(|| format!("{}: no sdk-deployment crate beside the SDK; pass --sdk of a full Cordon checkout", sdk.display()))?;
        sdk_lines.push('\n');
        sdk_lines.push_str(&dependency("cordon-sdk-deployment", &deployment));
    }
    let grants = match request.kind {
        Kind::Deployment => "    grants:\n      mounts:\n        - { host: target-dir, guest: /target, access: read-write }\n",
        _ => "",
    };
    let stage = name.to_ascii_uppercase().replace('-', "_");
    let fill = |text: &str| {
        text.replace("{{try}}", request.kind.guide().trim_end())
            .replace("{{name}}", name)
            .replace("{{crate}}", &name.replace('-', "_"))
            .replace("{{STAGE}}", &stage)
            .replace("{{kind}}", request.kind.name())
            .replace("{{trait}}", request.kind.sdk_trait())
            .replace("{{world}}", request.kind.world())
            .replace("{{grants}}", grants)
            .replace("{{sdk}}", &sdk_lines)
    };
    let mut files: Vec<(&str, String)> = COMMON.iter().map(|(path, text)| (*path, fill(text))).collect();
    files.push(("src/lib.rs", fill(request.kind.source())));
    files.push((".gitignore", "/target\n/.cordon-state\n/target-dir\n*-key\n/keys\n/try/*.sqlite\n".to_string()));
    files.extend(request.kind.try_files().iter().map(|(path, text)| (*path, fill(text))));
    let existed = dir.exists();
    let write = || -> Result<()> {
        for (path, text) in &files {
            let path = dir.join(path);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
            }
            std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
        }
        Ok(())
    };
    if let Err(e) = write() {
        if !existed {
            let _ = std::fs::remove_dir_all(&dir);
        }
        return Err(e);
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_bad_names_and_non_empty_dirs_without_writing() {
        let tmp = tempfile::tempdir().unwrap();
        for bad in ["", "Hello", "9lives", "a/b", "a_b"] {
            let dir = tmp.path().join("x");
            let e = new_plugin(&Request { name: bad, kind: Kind::Stage, dir: Some(&dir), sdk: None }).unwrap_err();
            assert!(e.to_string().contains("plugin name"), "{e}");
            assert!(!dir.exists());
        }
        std::fs::write(tmp.path().join("keep"), "").unwrap();
        let e = new_plugin(&Request { name: "ok", kind: Kind::Stage, dir: Some(tmp.path()), sdk: None }).unwrap_err();
        assert!(e.to_string().contains("not empty"), "{e}");
    }

    #[test]
    fn projects_ask_for_the_sdk_version_of_the_checkout() {
        let guests = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guests/Cargo.toml")).unwrap();
        assert!(guests.contains(&format!("\nversion = \"{SDK_VERSION}\"\n")), "guests/Cargo.toml's version differs from the host's {SDK_VERSION}");
    }

    #[test]
    fn fills_every_placeholder_for_every_kind() {
        let tmp = tempfile::tempdir().unwrap();
        for kind in [Kind::Stage, Kind::Deployment, Kind::KeyFilter, Kind::ItemAction, Kind::MigrationPhase] {
            let dir = tmp.path().join(kind.name());
            new_plugin(&Request { name: "hello-there", kind, dir: Some(&dir), sdk: None }).unwrap();
            for entry in ignore::Walk::new(&dir) {
                let entry = entry.unwrap();
                if entry.file_type().is_some_and(|t| t.is_file()) {
                    let text = std::fs::read_to_string(entry.path()).unwrap();
                    assert!(!text.contains("{{"), "{} keeps a placeholder", entry.path().display());
                }
            }
            let lib = std::fs::read_to_string(dir.join("src/lib.rs")).unwrap();
            assert!(lib.contains("hello-there"), "{kind:?}");
            let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
            assert!(manifest.contains(&format!("cordon-sdk = {{ version = \"{SDK_VERSION}\", path = ")), "{manifest}");
            let config = std::fs::read_to_string(dir.join("cordon.yaml")).unwrap();
            assert!(config.contains(&format!("world: {}", kind.world())), "{config}");
        }
    }
}
