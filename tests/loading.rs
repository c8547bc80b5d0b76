//! Loading refuses bad plugins before their code runs — and, for a
//! tampered file, before it is compiled — with one error naming the plugin,
//! the file and the fix. Also: the compiled-component cache.

use std::path::Path;

use cordon_runtime::engine::{Origin, Engine, EngineOptions};
use cordon_runtime::plugin::{AgentConfig, Plugin, Plugins};
use cordon_tests::{agent_config, cordon_bin, engine, guest, sha256_file};

async fn load_err(name: &str, file: &Path, world: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let config = agent_config(dir.path(), name, file, world, "").unwrap();
    match Plugin::load(engine(), &config.plugins[0]).await {
        Ok(_) => panic!("{} loaded as {world}", file.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[tokio::test]
async fn missing_file_names_plugin_and_fix() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "state-dir: s\nplugins:\n  - {{name: ghost, path: nowhere.wasm, sha256: {}, world: executor}}\n",
        "0".repeat(64)
    );
    std::fs::write(dir.path().join("agent.yaml"), yaml).unwrap();
    let config = AgentConfig::load(&dir.path().join("agent.yaml")).unwrap();
    let err = format!("{:#}", Plugin::load(engine(), &config.plugins[0]).await.err().unwrap());
    assert!(err.contains("plugin `ghost`") && err.contains("nowhere.wasm") && err.contains("build the component"), "{err}");
}

#[tokio::test]
async fn tampered_component_is_refused_before_compiling() {
    let dir = tempfile::tempdir().unwrap();
    let original = guest("noop");
    let tampered = dir.path().join("noop.wasm");
    let mut bytes = std::fs::read(&original).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&tampered, &bytes).unwrap();
    let yaml = format!(
        "state-dir: state\nplugins:\n  - {{name: noop, path: noop.wasm, sha256: {}, world: executor}}\n",
        sha256_file(&original)
    );
    std::fs::write(dir.path().join("agent.yaml"), yaml).unwrap();
    let config = AgentConfig::load(&dir.path().join("agent.yaml")).unwrap();
    // A engine of its own, so its cache shows whether anything was compiled.
    let engine = Engine::new(EngineOptions { cache_dir: Some(config.cache_dir()), pooling: false, ..Default::default() }).unwrap();
    let err = format!("{:#}", Plugin::load(&engine, &config.plugins[0]).await.err().unwrap());
    assert!(err.contains("plugin `noop`") && err.contains("refusing to compile") && err.contains(&sha256_file(&original)), "{err}");
    assert_eq!(std::fs::read_dir(config.cache_dir()).unwrap().count(), 0, "something was compiled");
}

#[tokio::test]
async fn non_wasm_and_core_modules_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("notes.wasm");
    std::fs::write(&text, "not wasm at all").unwrap();
    let err = load_err("notes", &text, "executor").await;
    assert!(err.contains("is not a WebAssembly file"), "{err}");

    let core = dir.path().join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").unwrap();
    let err = load_err("core", &core, "executor").await;
    assert!(err.contains("core WebAssembly module, not a component") && err.contains("wasm32-wasip2"), "{err}");
}

#[tokio::test]
async fn wrong_world_names_the_missing_export() {
    let err = load_err("noop", &guest("noop"), "planner").await;
    assert!(err.contains("does not implement world `planner`") && err.contains("cordon:plugin/planning@0.1.0"), "{err}");
    let err = load_err("noop", &guest("noop"), "key-filter").await;
    assert!(err.contains("cordon:plugin/key-selection@0.1.0"), "{err}");
}

#[tokio::test]
async fn newer_contract_version_names_both_versions() {
    let err = load_err("newer", &guest("newer-contract"), "executor").await;
    assert!(err.contains("cordon:plugin@0.2.0") && err.contains("cordon:plugin@0.1.0"), "{err}");
}

#[tokio::test]
async fn a_stage_defined_twice_names_both_plugins() {
    let dir = tempfile::tempdir().unwrap();
    let noop = guest("noop");
    let sha = sha256_file(&noop);
    let yaml = format!(
        "state-dir: s\nplugins:\n  - {{name: first, path: {p}, sha256: {sha}, world: executor}}\n  - {{name: second, path: {p}, sha256: {sha}, world: executor}}\n",
        p = noop.display()
    );
    std::fs::write(dir.path().join("agent.yaml"), yaml).unwrap();
    let config = AgentConfig::load(&dir.path().join("agent.yaml")).unwrap();
    let err = format!("{:#}", Plugins::load(engine(), &config).await.err().unwrap());
    assert!(err.contains("stage `NOOP` is defined by both plugin `first` and plugin `second`"), "{err}");
}

#[tokio::test]
async fn routes_stages_to_their_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let (noop, wait) = (guest("noop"), guest("wait"));
    let yaml = format!(
        "state-dir: s\nplugins:\n  - {{name: noop, path: {}, sha256: {}, world: executor}}\n  - {{name: wait, path: {}, sha256: {}, world: executor}}\n",
        noop.display(),
        sha256_file(&noop),
        wait.display(),
        sha256_file(&wait)
    );
    std::fs::write(dir.path().join("agent.yaml"), yaml).unwrap();
    let config = AgentConfig::load(&dir.path().join("agent.yaml")).unwrap();
    let plugins = Plugins::load(engine(), &config).await.unwrap();
    assert_eq!(plugins.route("WAIT").unwrap().name, "wait");
    assert_eq!(plugins.route("NOOP").unwrap().name, "noop");
    let err = format!("{:#}", plugins.route("DEPLOY").err().unwrap());
    assert!(err.contains("no plugin defines stage `DEPLOY`") && err.contains("NOOP, WAIT"), "{err}");
}

#[tokio::test]
async fn cache_is_reused_and_a_corrupt_entry_is_recompiled() {
    let dir = tempfile::tempdir().unwrap();
    let config = agent_config(dir.path(), "noop", &guest("noop"), "executor", "").unwrap();
    let options = || EngineOptions { cache_dir: Some(config.cache_dir()), pooling: false, ..Default::default() };
    let first = Engine::new(options()).unwrap();
    assert_eq!(Plugin::load(&first, &config.plugins[0]).await.unwrap().origin, Origin::Compiled);
    let second = Engine::new(options()).unwrap();
    assert_eq!(Plugin::load(&second, &config.plugins[0]).await.unwrap().origin, Origin::Cache);

    // Corrupt the compiled code: the digest check catches it and it is rebuilt.
    let entry = std::fs::read_dir(config.cache_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .unwrap();
    let mut code = std::fs::read(&entry).unwrap();
    let last = code.len() - 1;
    code[last] ^= 0xff;
    std::fs::write(&entry, code).unwrap();
    let third = Engine::new(options()).unwrap();
    assert_eq!(Plugin::load(&third, &config.plugins[0]).await.unwrap().origin, Origin::Compiled);
    let fourth = Engine::new(options()).unwrap();
    assert_eq!(Plugin::load(&fourth, &config.plugins[0]).await.unwrap().origin, Origin::Cache);
}

fn cordon(args: &[&str]) -> std::process::Output {
    std::process::Command::new(cordon_tests::cordon_bin()).args(args).output().unwrap()
}

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// A signed copy of the `noop` guest and an agent config that requires
/// signatures from `trusted` (the public key file's line).
fn signed_setup(dir: &Path) -> (std::path::PathBuf, String) {
    let wasm = dir.join("noop.wasm");
    std::fs::copy(guest("noop"), &wasm).unwrap();
    let key = dir.join("publisher");
    let out = cordon(&["plugin", "keygen", key.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions()) & 0o777, 0o600);
    let out = cordon(&["plugin", "sign", wasm.to_str().unwrap(), "--key", key.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let public = std::fs::read_to_string(dir.join("publisher.pub")).unwrap().trim().to_string();
    (wasm, public)
}

fn signed_config(dir: &Path, wasm: &Path, trusted: &str) -> AgentConfig {
    let yaml = format!(
        "state-dir: state\nrequire-signatures: true\ntrusted-keys:\n  publisher: \"{trusted}\"\nplugins:\n  - {{name: noop, path: {}, sha256: {}, world: executor}}\n",
        wasm.display(),
        sha256_file(wasm)
    );
    std::fs::write(dir.join("agent.yaml"), yaml).unwrap();
    AgentConfig::load(&dir.join("agent.yaml")).unwrap()
}

async fn refused(config: &AgentConfig) -> String {
    let engine = Engine::new(EngineOptions { cache_dir: Some(config.cache_dir()), pooling: false, ..Default::default() }).unwrap();
    let err = format!("{:#}", Plugin::load(&engine, &config.plugins[0]).await.err().expect("refused"));
    assert_eq!(std::fs::read_dir(config.cache_dir()).unwrap().count(), 0, "something was compiled: {err}");
    err
}

#[tokio::test]
async fn signed_components_load_and_bad_signatures_are_refused_before_compiling() {
    let dir = tempfile::tempdir().unwrap();
    let (wasm, public) = signed_setup(dir.path());
    let config = signed_config(dir.path(), &wasm, &public);
    Plugin::load(engine(), &config.plugins[0]).await.expect("a signed component loads");
    let out = cordon(&["--config", dir.path().join("agent.yaml").to_str().unwrap(), "plugin", "verify", wasm.to_str().unwrap()]);
    assert!(out.status.success() && text(&out).contains("signed by `publisher`"), "{}", text(&out));

    // Signed by a key that is not trusted.
    let stranger = tempfile::tempdir().unwrap();
    let (_, other_public) = signed_setup(stranger.path());
    let config = signed_config(dir.path(), &wasm, &other_public);
    let err = refused(&config).await;
    assert!(err.contains("plugin `noop`") && err.contains("not in `trusted-keys`"), "{err}");

    // A forged signature line.
    let config = signed_config(dir.path(), &wasm, &public);
    let sig = dir.path().join("noop.wasm.sig");
    let original = std::fs::read_to_string(&sig).unwrap();
    let forged: String = original
        .lines()
        .map(|l| if let Some(rest) = l.strip_prefix("signature: ") { format!("signature: {}\n", rest.chars().rev().collect::<String>()) } else { format!("{l}\n") })
        .collect();
    std::fs::write(&sig, forged).unwrap();
    let err = refused(&config).await;
    assert!(err.contains("noop.wasm.sig"), "{err}");

    // Unsigned.
    std::fs::remove_file(&sig).unwrap();
    let err = refused(&config).await;
    assert!(err.contains("must be signed") && err.contains("cordon plugin sign"), "{err}");

    // Rebuilt and re-pinned, but the signature is for the old build.
    std::fs::write(&sig, original).unwrap();
    let mut bytes = std::fs::read(&wasm).unwrap();
    bytes.extend_from_slice(&[0, 4, b'n', b'o', b't', b'e']); // an extra (empty-named) custom section
    std::fs::write(&wasm, bytes).unwrap();
    let config = signed_config(dir.path(), &wasm, &public);
    let err = refused(&config).await;
    assert!(err.contains("the signature belongs to another build"), "{err}");
}

#[test]
fn requiring_signatures_without_trusted_keys_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!("state-dir: s\nrequire-signatures: true\nplugins:\n  - {{name: a, path: a.wasm, sha256: {}, world: executor}}\n", "0".repeat(64));
    let err = format!("{:#}", AgentConfig::parse(&yaml, &dir.path().join("agent.yaml")).unwrap_err());
    assert!(err.contains("requires a signature, but `trusted-keys` is empty"), "{err}");
    let yaml = "state-dir: s\ntrusted-keys:\n  x: \"not a key\"\n";
    let err = format!("{:#}", AgentConfig::parse(yaml, &dir.path().join("agent.yaml")).unwrap_err());
    assert!(err.contains("trusted-keys.x"), "{err}");
}

#[tokio::test]
async fn a_manifest_that_asks_for_more_than_the_grants_is_refused_naming_each_grant() {
    let dir = tempfile::tempdir().unwrap();
    let err = load_err("needs-grants", &guest("needs-grants"), "executor").await;
    for part in ["needs grants it was not given", "mount /data (read-write)", "network https://api.example.com", "network tcp", "env REGION", "secret \"db-password\""] {
        assert!(err.contains(part), "{part:?} missing from: {err}");
    }

    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let partial = format!("    grants:\n      mounts: [{{ host: {}, guest: /data, access: read-only }}]\n      env: {{ REGION: eu }}\n", data.display());
    let config = agent_config(dir.path(), "needs-grants", &guest("needs-grants"), "executor", &partial).unwrap();
    let err = format!("{:#}", Plugin::load(engine(), &config.plugins[0]).await.err().unwrap());
    assert!(err.contains("mount /data (read-write)") && !err.contains("env REGION"), "{err}");

    // SAFETY: the variable is unique to this test and set before it is read.
    unsafe { std::env::set_var("CORDON_TEST_DB_PASSWORD", "pw") };
    let full = format!(
        "    grants:\n      mounts: [{{ host: {}, guest: /data, access: read-write }}]\n      network: {{ allow: [\"https://*.example.com\", \"tcp://10.0.0.0/8:5432\"] }}\n      env: {{ REGION: eu }}\n      secrets: {{ db-password: {{ env: CORDON_TEST_DB_PASSWORD }} }}\n",
        data.display()
    );
    let config = agent_config(dir.path(), "needs-grants", &guest("needs-grants"), "executor", &full).unwrap();
    let plugin = Plugin::load(engine(), &config.plugins[0]).await.unwrap();
    assert_eq!(plugin.manifest.as_ref().map(|m| m.version.as_str()), Some("1.2.3"));
}

/// A component made of many parts, each with its own memory, would get the
/// memory limit once per memory and take that many slots of the shared
/// instance pool: it is refused from its bytes, before anything compiles.
#[tokio::test]
async fn components_of_many_memories_are_refused_before_compiling() {
    let memories: String = (0..16)
        .map(|i| format!("(core module $m{i} (memory 1000)) (core instance $i{i} (instantiate $m{i}))\n"))
        .collect();
    let bytes = wat::parse_str(format!("(component\n{memories})")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("many-memories.wasm");
    std::fs::write(&file, bytes).unwrap();
    let err = load_err("many", &file, "executor").await;
    assert!(err.contains("defines 16 linear memories; a plugin may define at most 2"), "{err}");
    let out = std::process::Command::new(cordon_bin()).arg("plugin").arg("inspect").arg(&file).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("16 memories"), "{text}");
}
