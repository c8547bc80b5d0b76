//! The path of a third-party author, through the binary as they run it:
//! `cordon plugin new`, build, `stage run`, keygen/sign/verify, then the
//! signed plugin in a pipeline of an agent that requires signatures — and
//! refused once its signature is gone. Follows the template's README.

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
    edit(&config, "PASTE-THE-SHA256", &sha256_file(&project.join(wasm)));

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

/// Every kind the scaffold writes builds into a component of its world.
#[test]
fn every_kind_of_template_builds_into_its_world() {
    let tmp = tempfile::tempdir().unwrap();
    for (kind, world) in [("deployment", "deployment"), ("key-filter", "key-filter"), ("item-action", "item-action"), ("migration-phase", "migration-phase")] {
        let name = format!("scaffold-{kind}");
        ok(cordon(tmp.path(), &["plugin", "new", &name, "--kind", kind]));
        let project = tmp.path().join(&name);
        let crate_name = name.replace('-', "_");
        build(&project, &crate_name);
        let inspect = ok(cordon(&project, &["plugin", "inspect", &format!("target/wasm32-wasip2/release/{crate_name}.wasm")]));
        assert!(inspect.lines().any(|l| l.starts_with("worlds:") && l.contains(world)), "{kind}: {inspect}");
        assert!(inspect.contains(&name), "{kind}: the manifest names the plugin: {inspect}");
    }
}
