//! Plugins through a real OCI registry (Debian's `docker-registry`):
//! push, pin by digest, pull, verify, run — and every way that must be
//! refused. `skopeo` is the independent client on both sides.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use base64::Engine;
use cordon_tests::{RegistryServer, cordon_bin, guest, sha256_file};

/// An operator's directory: an agent config whose plugin `wait` starts as
/// a local file (so `plugin pin` has something to rewrite).
struct Operator {
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Operator {
    /// `top` is YAML added at the top level (trusted keys and the like).
    fn new(top: &str) -> Operator {
        let dir = tempfile::tempdir().unwrap();
        let local = dir.path().join("wait.wasm");
        std::fs::copy(guest("wait"), &local).unwrap();
        let config = dir.path().join("agent.yaml");
        let yaml = format!(
            "# the operator's agent\nstate-dir: state\n{top}plugins:\n  - name: wait\n    path: wait.wasm   # a local build, for now\n    sha256: {}\n    world: executor\n",
            sha256_file(&local)
        );
        std::fs::write(&config, yaml).unwrap();
        Operator { dir, config }
    }

    /// `cordon --config AGENT ARGS` with no registry credentials but `env`.
    fn cordon(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut command = Command::new(cordon_bin());
        command
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .env_remove("CORDON_REGISTRY_USERNAME")
            .env_remove("CORDON_REGISTRY_PASSWORD")
            .env("DOCKER_CONFIG", self.dir.path().join("docker"));
        for (key, value) in env {
            command.env(key, value);
        }
        command.output().unwrap()
    }

    fn pin(&self, reference: &str) -> Output {
        self.cordon(&["plugin", "pin", "wait", reference], &[])
    }

    fn run_wait(&self) -> Output {
        self.cordon(&["stage", "run", "--plugin", "wait", "--stage", "WAIT", "--with", r#"{"duration": 0}"#], &[])
    }

    fn artifacts(&self) -> PathBuf {
        self.dir.path().join("state/cache/oci")
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[track_caller]
fn succeeded(out: &Output) -> String {
    assert!(out.status.success(), "exit {:?}\nstdout: {}\nstderr: {}", out.status.code(), text(&out.stdout), text(&out.stderr));
    text(&out.stdout)
}

#[track_caller]
fn refused(out: &Output, expected: &str) -> String {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stdout: {}\nstderr: {stderr}", text(&out.stdout));
    assert!(stderr.contains(expected), "expected {expected:?} in: {stderr}");
    stderr
}

/// Pushes `file` and returns the digest the push printed.
fn push(operator: &Operator, file: &Path, reference: &str, extra: &[&str]) -> String {
    let mut args = vec!["plugin", "push", file.to_str().unwrap(), reference];
    args.extend_from_slice(extra);
    let stdout = succeeded(&operator.cordon(&args, &[]));
    stdout.lines().find_map(|l| l.strip_prefix("digest: ")).unwrap_or_else(|| panic!("no digest in: {stdout}")).to_string()
}

fn skopeo_json(args: &[&str], reference: &str) -> serde_json::Value {
    let docker = reference.replace("oci://", "docker://");
    let out = Command::new("skopeo").args(["inspect", "--tls-verify=false"]).args(args).arg(&docker).output().expect("skopeo is not installed: run `make test`");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("skopeo inspect {docker}: {e}: {}", text(&out.stderr)))
}

#[test]
fn pushed_components_are_pinned_by_digest_pulled_verified_and_run_offline() {
    let mut registry = RegistryServer::start();
    let operator = Operator::new("");
    let tag = registry.reference("team/wait:1.0.0");
    let digest = push(&operator, &guest("wait"), &tag, &["--source", "https://example.com/wait", "--authors", "Cordon team"]);

    // An independent client sees the CNCF Wasm artifact.
    let manifest = skopeo_json(&["--raw"], &tag);
    assert_eq!(manifest["config"]["mediaType"], "application/vnd.wasm.config.v0+json", "{manifest}");
    assert_eq!(manifest["layers"].as_array().unwrap().len(), 1, "{manifest}");
    assert_eq!(manifest["layers"][0]["mediaType"], "application/wasm");
    let layer = format!("sha256:{}", sha256_file(&guest("wait")));
    assert_eq!(manifest["layers"][0]["digest"], layer.as_str());
    let annotations = &manifest["annotations"];
    assert_eq!(annotations["org.opencontainers.image.version"], "0.1.0");
    assert_eq!(annotations["org.opencontainers.image.source"], "https://example.com/wait");
    assert_eq!(annotations["org.opencontainers.image.authors"], "Cordon team");
    let plugin: serde_json::Value = serde_json::from_str(annotations["dev.cordon.plugin.manifest"].as_str().unwrap()).unwrap();
    assert_eq!(plugin["stages"][0], "WAIT");
    let config = skopeo_json(&["--config", "--raw"], &tag);
    assert_eq!((config["architecture"].as_str(), config["os"].as_str()), (Some("wasm"), Some("wasip2")), "{config}");
    assert_eq!(config["layerDigests"][0], layer.as_str());
    assert_eq!(config["component"]["target"], "cordon:plugin/executor@0.1.0");
    assert!(config["component"]["exports"].as_array().unwrap().iter().any(|e| e == "cordon:plugin/execution@0.1.0"), "{config}");

    // Without a reference, `plugin pin` re-pins a rebuilt local file.
    std::fs::copy(guest("approval"), operator.dir.path().join("wait.wasm")).unwrap();
    let stdout = succeeded(&operator.cordon(&["plugin", "pin", "wait"], &[]));
    assert!(stdout.contains(&sha256_file(&guest("approval"))), "{stdout}");
    std::fs::copy(guest("wait"), operator.dir.path().join("wait.wasm")).unwrap();
    succeeded(&operator.cordon(&["plugin", "pin", "wait"], &[]));

    // `plugin pin` resolves the tag once and rewrites the entry in place,
    // keeping the file's permissions (an agent running as another user
    // still reads it).
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&operator.config, std::fs::Permissions::from_mode(0o640)).unwrap();
    let stdout = succeeded(&operator.pin(&tag));
    assert_eq!(std::fs::metadata(&operator.config).unwrap().permissions().mode() & 0o777, 0o640);
    assert!(stdout.contains(&digest), "{stdout}");
    let yaml = std::fs::read_to_string(&operator.config).unwrap();
    let pinned = format!("source: {}@{digest}   # a local build, for now", registry.reference("team/wait"));
    assert!(yaml.starts_with("# the operator's agent\n") && yaml.contains(&pinned) && !yaml.contains("path:"), "{yaml}");
    assert!(succeeded(&operator.run_wait()).contains("WAIT: success"));

    // The tag moves to another component: the pinned digest still runs,
    // fetched again from the registry with an empty cache.
    push(&operator, &guest("approval"), &tag, &[]);
    assert_ne!(skopeo_json(&["--raw"], &tag)["layers"][0]["digest"], layer.as_str());
    std::fs::remove_dir_all(operator.artifacts()).unwrap();
    assert!(succeeded(&operator.run_wait()).contains("WAIT: success"));

    // No registry: the agent starts from its cache.
    registry.stop();
    assert!(succeeded(&operator.run_wait()).contains("WAIT: success"));

    // A cache file changed on disk is refused like a tampered download.
    let cached = operator.artifacts().join("sha256").join(digest.trim_start_matches("sha256:"));
    let manifest_file = cached.join("manifest.json");
    let original = std::fs::read(&manifest_file).unwrap();
    std::fs::write(&manifest_file, [original.as_slice(), b" "].concat()).unwrap();
    refused(&operator.run_wait(), "the cache was changed");
    std::fs::write(&manifest_file, &original).unwrap();
    let mut component = std::fs::read(cached.join("component.wasm")).unwrap();
    *component.last_mut().unwrap() ^= 1;
    std::fs::write(cached.join("component.wasm"), component).unwrap();
    refused(&operator.run_wait(), "refusing to compile it");
}

#[test]
fn a_blob_altered_in_the_registry_is_refused_before_compiling() {
    let registry = RegistryServer::start();
    let operator = Operator::new("");
    let tag = registry.reference("team/wait:1");
    push(&operator, &guest("wait"), &tag, &[]);
    succeeded(&operator.pin(&tag));
    std::fs::remove_dir_all(operator.artifacts()).unwrap();
    let blob = registry.blob_file(&format!("sha256:{}", sha256_file(&guest("wait"))));
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&blob, bytes).unwrap();
    let stderr = refused(&operator.run_wait(), "refusing it");
    assert!(stderr.contains("plugin `wait`") && stderr.contains("sha256:"), "{stderr}");
    assert!(!stderr.contains("compiled"), "{stderr}");
    let cached: Vec<_> = std::fs::read_dir(operator.artifacts().join("sha256")).map(|d| d.collect()).unwrap_or_default();
    assert!(cached.is_empty(), "nothing is cached from a refused download: {cached:?}");
}

#[test]
fn signatures_travel_with_the_artifact_and_are_checked_before_compiling() {
    let registry = RegistryServer::start();
    let keys = tempfile::tempdir().unwrap();
    let key = |name: &str| {
        let path = keys.path().join(name);
        succeeded(&Command::new(cordon_bin()).args(["plugin", "keygen"]).arg(&path).output().unwrap());
        path
    };
    let (release, stranger) = (key("release"), key("stranger"));
    let public = std::fs::read_to_string(keys.path().join("release.pub")).unwrap();
    let operator = Operator::new(&format!("require-signatures: true\ntrusted-keys:\n  release: \"{}\"\n", public.trim()));

    let unsigned = registry.reference("team/wait:unsigned");
    push(&operator, &guest("wait"), &unsigned, &[]);
    succeeded(&operator.pin(&unsigned));
    refused(&operator.run_wait(), "has no signature in its registry");

    // Each push differs (a description), so each tag names its own digest.
    let forged = registry.reference("team/wait:stranger");
    push(&operator, &guest("wait"), &forged, &["--sign", stranger.to_str().unwrap(), "--description", "forged"]);
    succeeded(&operator.pin(&forged));
    refused(&operator.run_wait(), "does not verify with any key in `trusted-keys`");

    // Pushed unsigned, pinned and cached; the same push again with
    // `--sign` signs that digest, and the agent fetches the new signature.
    let signed = registry.reference("team/wait:signed");
    let first = push(&operator, &guest("wait"), &signed, &["--description", "released"]);
    succeeded(&operator.pin(&signed));
    refused(&operator.run_wait(), "has no signature in its registry");
    let digest = push(&operator, &guest("wait"), &signed, &["--sign", release.to_str().unwrap(), "--description", "released"]);
    assert_eq!(digest, first, "pushes are reproducible");
    let signature = skopeo_json(&["--raw"], &registry.reference(&format!("team/wait:{}.sig", digest.replace(':', "-"))));
    assert_eq!(signature["layers"][0]["mediaType"], "application/vnd.dev.cosign.simplesigning.v1+json", "{signature}");
    assert!(signature["layers"][0]["annotations"]["dev.cosignproject.cosign/signature"].is_string(), "{signature}");
    succeeded(&operator.pin(&signed));
    assert!(succeeded(&operator.run_wait()).contains("WAIT: success"));
}

#[test]
fn registry_credentials_come_from_the_environment_or_docker_config_and_stay_secret() {
    const PASSWORD: &str = "s3cret-pw-7421";
    const WRONG: &str = "wrong-pw-9150";
    let registry = RegistryServer::with_login("alice", PASSWORD);
    let operator = Operator::new("");
    let tag = registry.reference("team/wait:1");
    let wasm = guest("wait");
    let push_as = |env: &[(&str, &str)]| operator.cordon(&["plugin", "push", wasm.to_str().unwrap(), &tag], env);

    refused(&push_as(&[]), "requires credentials");
    let stderr = refused(&push_as(&[("CORDON_REGISTRY_USERNAME", "alice"), ("CORDON_REGISTRY_PASSWORD", WRONG)]), "refused the credentials from $CORDON_REGISTRY_USERNAME");
    assert!(!stderr.contains(WRONG), "the password leaked: {stderr}");
    let out = push_as(&[("CORDON_REGISTRY_USERNAME", "alice"), ("CORDON_REGISTRY_PASSWORD", PASSWORD)]);
    assert!(!text(&out.stdout).contains(PASSWORD) && !text(&out.stderr).contains(PASSWORD));
    succeeded(&out);

    // What `docker login` writes works for pin and pull.
    let docker = operator.dir.path().join("docker");
    std::fs::create_dir_all(&docker).unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("alice:{PASSWORD}"));
    std::fs::write(docker.join("config.json"), format!(r#"{{"auths": {{"{}": {{"auth": "{auth}"}}}}}}"#, registry.host)).unwrap();
    succeeded(&operator.pin(&tag));
    assert!(succeeded(&operator.run_wait()).contains("WAIT: success"));
}

#[test]
fn components_pushed_by_another_client_are_pulled_and_run() {
    let registry = RegistryServer::start();
    let operator = Operator::new("");
    // An OCI layout as another tool writes it, with the older layer media
    // type wasmCloud and Spin use; skopeo pushes it.
    let layout = operator.dir.path().join("layout");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let blob = |bytes: &[u8]| {
        let hex = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(bytes));
        std::fs::write(blobs.join(&hex), bytes).unwrap();
        (format!("sha256:{hex}"), bytes.len())
    };
    let (layer, layer_size) = blob(&std::fs::read(guest("wait")).unwrap());
    let config = serde_json::json!({ "architecture": "wasm", "os": "wasip2", "layerDigests": [layer] }).to_string();
    let (config, config_size) = blob(config.as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.wasm.config.v0+json", "digest": config, "size": config_size },
        "layers": [{ "mediaType": "application/vnd.wasm.content.layer.v1+wasm", "digest": layer, "size": layer_size }],
    })
    .to_string();
    let (manifest, manifest_size) = blob(manifest.as_bytes());
    std::fs::write(layout.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let index = serde_json::json!({ "schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest, "size": manifest_size,
        "annotations": { "org.opencontainers.image.ref.name": "1.0" },
    }]});
    std::fs::write(layout.join("index.json"), index.to_string()).unwrap();
    let tag = registry.reference("elsewhere/wait:1.0");
    let out = Command::new("skopeo")
        .args(["--insecure-policy", "copy", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:1.0", layout.display()))
        .arg(tag.replace("oci://", "docker://"))
        .output()
        .unwrap();
    succeeded(&out);
    let stdout = succeeded(&operator.pin(&tag));
    assert!(stdout.contains(&manifest), "{stdout}");
    assert!(succeeded(&operator.run_wait()).contains("WAIT: success"));
}
