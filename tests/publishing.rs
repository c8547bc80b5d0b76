//! The path of a third-party author, through the binary as they run it:
//! `cordon plugin new`, build, `stage run`, keygen/sign/verify, then the
//! signed plugin in a pipeline of an agent that requires signatures — and
//! refused once its signature is gone; and every kind's generated README,
//! its shell blocks run verbatim.

use std::path::Path;
use std::process::{Command, Output};

use cordon_tests::{cordon_bin, root, sha256_file};

fn run(cmd: &mut Command) -> Output {
    cmd.env_remove("CORDON_LOG").output().unwrap()
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

fn cordon(dir: &Path, args: &[&str]) -> Output {
    run(Command::new(cordon_bin()).current_dir(dir).args(args))
}

fn ok(out: Output) -> String {
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    t
}

/// Builds a generated project in the guests' target dir (so the SDK's
/// dependencies are compiled once) with the guests' lock file, and puts the
/// component where the README says it is.
fn build(project: &Path, crate_name: &str) {
    std::fs::copy(root().join("guests/Cargo.lock"), project.join("Cargo.lock")).unwrap();
    let target = root().join("guests/target");
    ok(run(Command::new(env!("CARGO")).current_dir(project).args(["build", "--release"]).env("CARGO_TARGET_DIR", &target)));
    let built = target.join(format!("wasm32-wasip2/release/{crate_name}.wasm"));
    let dest = project.join(format!("target/wasm32-wasip2/release/{crate_name}.wasm"));
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    std::fs::rename(&built, &dest).unwrap();
}

fn edit(file: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(file).unwrap();
    assert!(text.contains(from), "{} has no {from:?}", file.display());
    std::fs::write(file, text.replacen(from, to, 1)).unwrap();
}

#[test]
fn from_plugin_new_to_a_signed_plugin_in_a_pipeline() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let out = ok(cordon(work, &["plugin", "new", "hello-e2e", "--kind", "stage"]));
    assert!(out.contains("cargo build --release"), "{out}");
    let project = work.join("hello-e2e");
    build(&project, "hello_e2e");
    let wasm = "target/wasm32-wasip2/release/hello_e2e.wasm";

    let inspect = ok(cordon(&project, &["plugin", "inspect", wasm]));
    assert!(inspect.contains("HELLO_E2E") && inspect.contains("hello-e2e"), "{inspect}");

    // Step 3: pin the build.
    let config = project.join("cordon.yaml");
    ok(cordon(&project, &["--config", "cordon.yaml", "plugin", "pin", "hello-e2e"]));
    assert!(std::fs::read_to_string(&config).unwrap().contains(&sha256_file(&project.join(wasm))));

    // Step 4: one stage, once.
    let staged = ok(cordon(&project, &["--config", "cordon.yaml", "stage", "run", "--plugin", "hello-e2e", "--stage", "HELLO_E2E", "--with", r#"{"greeting": "hi"}"#]));
    assert!(staged.contains("hi from hello-e2e"), "{staged}");
    let failed = cordon(&project, &["--config", "cordon.yaml", "stage", "run", "--plugin", "hello-e2e", "--stage", "HELLO_E2E", "--with", r#"{"fail": true}"#]);
    assert_eq!(failed.status.code(), Some(1), "{}", text(&failed));
    let bad = cordon(&project, &["--config", "cordon.yaml", "stage", "run", "--plugin", "hello-e2e", "--stage", "HELLO_E2E", "--with", r#"{"greting": "hi"}"#]);
    assert!(text(&bad).contains("invalid HELLO_E2E options") && text(&bad).contains("greting"), "{}", text(&bad));

    // Step 5: sign, verify, trust, require.
    ok(cordon(&project, &["plugin", "keygen", "hello-e2e-key"]));
    ok(cordon(&project, &["plugin", "sign", wasm, "--key", "hello-e2e-key"]));
    ok(cordon(&project, &["plugin", "verify", wasm, "--public-key", "hello-e2e-key.pub"]));
    let public = std::fs::read_to_string(project.join("hello-e2e-key.pub")).unwrap();
    edit(&config, "# trusted-keys:\n#   hello-e2e: \"cordon-public-key-v1 ...\"", &format!("trusted-keys:\n  hello-e2e: \"{}\"", public.trim()));
    edit(&config, "# signature: required", "signature: required");

    // Step 6: the pipeline.
    let deployed = ok(cordon(&project, &["--config", "cordon.yaml", "deploy", "app"]));
    assert!(deployed.contains("SUCCESS") || deployed.to_lowercase().contains("success"), "{deployed}");
    let status = ok(cordon(&project, &["--config", "cordon.yaml", "status"]));
    assert!(status.contains("hello-e2e-demo"), "{status}");

    // An operator who requires signatures does not run it unsigned.
    std::fs::remove_file(project.join(format!("{wasm}.sig"))).unwrap();
    let refused = cordon(&project, &["--config", "cordon.yaml", "deploy", "app"]);
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused));
    assert!(text(&refused).contains("must be signed"), "{}", text(&refused));
}

/// The ```sh blocks of a generated README, in order.
fn sh_blocks(readme: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in readme.lines() {
        match &mut current {
            None if line == "```sh" => current = Some(String::new()),
            Some(_) if line == "```" => blocks.push(current.take().unwrap()),
            Some(block) => {
                block.push_str(line);
                block.push('\n');
            }
            None => {}
        }
    }
    blocks
}

/// A directory with `cordon` and a `cargo` that builds in the guests'
/// target dir (so the SDK's dependencies are compiled once, with the
/// guests' lock file) and then puts the component where a project's README
/// says it is — everything else the READMEs run is the real thing.
fn tool_dir(dir: &Path) -> std::path::PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(cordon_bin(), bin.join("cordon")).unwrap();
    let shim = format!(
        "#!/bin/sh\nset -e\n[ -f Cargo.lock ] || cp {lock} Cargo.lock\nCARGO_TARGET_DIR={target} {cargo} \"$@\"\n\
         crate=$(sed -n 's/^name = \"\\(.*\\)\"/\\1/p' Cargo.toml | head -1 | tr - _)\n\
         mkdir -p target/wasm32-wasip2/release\nrm -f target/wasm32-wasip2/release/$crate.wasm\n\
         mv {target}/wasm32-wasip2/release/$crate.wasm target/wasm32-wasip2/release/\n",
        lock = root().join("guests/Cargo.lock").display(),
        target = root().join("guests/target").display(),
        cargo = env!("CARGO"),
    );
    std::fs::write(bin.join("cargo"), shim).unwrap();
    let mut permissions = std::fs::metadata(bin.join("cargo")).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
    std::fs::set_permissions(bin.join("cargo"), permissions).unwrap();
    bin
}

/// Issue #18 item 9: every kind's generated README works when followed
/// verbatim — each of its shell blocks, run in order by bash with `-e`,
/// succeeds — and does what it says; every kind builds into its world.
#[test]
fn every_kind_of_readme_works_when_followed_verbatim() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = tool_dir(tmp.path());
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    for (kind, world, says) in [
        ("stage", "executor", &["greeted readme-stage-demo", "deployment readme-stage-demo-1 success"][..]),
        ("deployment", "deployment", &["index.html", "deployment readme-deployment-demo-1 success"][..]),
        ("key-filter", "key-filter", &["/tenants/acme/config/db\n/tenants/acme/secrets/token\n/tenants/acme/config/cache\n", "/tenants/acme/"][..]),
        ("item-action", "item-action", &["\"migrated-by\":\"cordon\"", "1 modified, 1 unchanged"][..]),
        ("migration-phase", "migration-phase", &["completed"][..]),
    ] {
        let name = format!("readme-{kind}");
        ok(cordon(tmp.path(), &["plugin", "new", &name, "--kind", kind]));
        let project = tmp.path().join(&name);
        let readme = std::fs::read_to_string(project.join("README.md")).unwrap();
        let mut said = String::new();
        for block in sh_blocks(&readme) {
            let out = run(Command::new("bash").args(["-euo", "pipefail", "-c", &block]).current_dir(&project).env("PATH", &path));
            let t = text(&out);
            assert!(out.status.success(), "{kind}: README block failed:\n{block}\n{t}");
            said.push_str(&t);
        }
        for expected in says {
            assert!(said.contains(expected), "{kind}: the README's commands never said {expected:?}:\n{said}");
        }
        // The component is of its kind's world, and its manifest names it.
        let wasm = format!("target/wasm32-wasip2/release/{}.wasm", name.replace('-', "_"));
        let inspect = ok(cordon(&project, &["plugin", "inspect", &wasm]));
        assert!(inspect.lines().any(|l| l.starts_with("worlds:") && l.contains(world)), "{kind}: {inspect}");
        assert!(inspect.contains(&format!("manifest:  {name} ")), "{kind}: the manifest names the plugin: {inspect}");
        // Step 4 trusted the key: its signature verifies against the config.
        let verified = ok(cordon(&project, &["--config", "cordon.yaml", "plugin", "verify", &wasm]));
        assert!(verified.contains(&format!("signed by `{name}`")), "{kind}: {verified}");
    }
}
