//! The SDK's raw bindings are generated from the contract (`wit/`) once,
//! here, and kept in the source tree, instead of by `wit_bindgen::generate!`
//! in every build: a plugin project then compiles neither wit-bindgen's
//! code generator nor the WIT parser (more than half of a new project's
//! cold build), and the crates carry the contract themselves, so they
//! package and build outside this repository.
//!
//! This test fails when a checked-in file differs from what the contract
//! generates; `CORDON_BLESS_BINDINGS=1` rewrites them.

use std::path::{Path, PathBuf};

use wit_bindgen_core::wit_parser::{PackageId, Resolve};
use wit_bindgen_core::{Files, WorldGenerator};
use wit_bindgen_rust::{Opts, WithOption};

/// One `generate!` of old: a world, where its bindings live and how they are
/// named from outside.
struct Bindings {
    world: &'static str,
    /// Relative to this crate's directory.
    file: &'static str,
    module: &'static str,
    export_macro: &'static str,
    /// Interfaces taken from bindings generated elsewhere.
    with: &'static [(&'static str, &'static str)],
}

const LOG: (&str, &str) = ("cordon:plugin/log@0.1.0", "crate::executor::cordon::plugin::log");

const ALL: &[Bindings] = &[
    Bindings { world: "executor", file: "src/bindings/executor.rs", module: "cordon_sdk::executor", export_macro: "export_executor", with: &[] },
    Bindings { world: "key-filter", file: "src/bindings/key_filter.rs", module: "cordon_sdk::key_filter", export_macro: "export_key_filter", with: &[] },
    Bindings { world: "item-action", file: "src/bindings/item_action.rs", module: "cordon_sdk::item_action", export_macro: "export_item_action", with: &[LOG] },
    Bindings {
        world: "migration-phase",
        file: "src/bindings/migration_phase.rs",
        module: "cordon_sdk::migration_phase",
        export_macro: "export_migration_phase",
        with: &[LOG],
    },
    Bindings { world: "described", file: "src/bindings/described.rs", module: "cordon_sdk::options::bindings", export_macro: "export_described", with: &[] },
    Bindings {
        world: "deployment",
        file: "../sdk-deployment/src/bindings/deployment.rs",
        module: "cordon_sdk_deployment::bindings",
        export_macro: "export_deployment",
        with: &[
            ("cordon:plugin/types@0.1.0", "cordon_sdk::executor::cordon::plugin::types"),
            ("cordon:plugin/log@0.1.0", "cordon_sdk::executor::cordon::plugin::log"),
            ("cordon:plugin/metadata@0.1.0", "cordon_sdk::executor::cordon::plugin::metadata"),
            ("cordon:plugin/commands@0.1.0", "cordon_sdk::executor::cordon::plugin::commands"),
            ("cordon:plugin/blobs@0.1.0", "cordon_sdk::executor::cordon::plugin::blobs"),
            ("cordon:plugin/secrets@0.1.0", "cordon_sdk::executor::cordon::plugin::secrets"),
        ],
    },
];

fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn generate(resolve: &Resolve, package: PackageId, bindings: &Bindings) -> String {
    let world = resolve.select_world(&[package], Some(bindings.world)).unwrap();
    let opts = Opts {
        format: true,
        pub_export_macro: true,
        export_macro_name: Some(bindings.export_macro.to_string()),
        default_bindings_module: Some(bindings.module.to_string()),
        with: bindings.with.iter().map(|(interface, path)| (interface.to_string(), WithOption::Path(path.to_string()))).collect(),
        ..Opts::default()
    };
    let mut files = Files::default();
    opts.build().generate(&mut resolve.clone(), world, &mut files).unwrap();
    let (_, source) = files.iter().next().expect("one file per world");
    String::from_utf8(source.to_vec()).unwrap()
}

#[test]
fn checked_in_bindings_are_what_the_contract_generates() {
    let mut resolve = Resolve::default();
    let (package, _) = resolve.push_path(crate_dir().join("../../wit")).unwrap();
    let bless = std::env::var_os("CORDON_BLESS_BINDINGS").is_some();
    let mut stale = Vec::new();
    for bindings in ALL {
        let path: PathBuf = crate_dir().join(bindings.file);
        let fresh = generate(&resolve, package, bindings);
        if std::fs::read_to_string(&path).ok().as_deref() == Some(fresh.as_str()) {
            continue;
        }
        if bless {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, fresh).unwrap();
        } else {
            stale.push(bindings.file);
        }
    }
    assert!(
        stale.is_empty(),
        "{stale:?} differ from what wit/ generates; after changing the contract run \
         `CORDON_BLESS_BINDINGS=1 cargo test -p cordon-sdk --test bindings` in guests/ and commit the result"
    );
}
