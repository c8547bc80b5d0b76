//! The `options` export: a plugin's option types, described as JSON Schema
//! (with [`schemars`]) and checked by the same serde code that reads them
//! when the stage runs, so `cordon plan` refuses a misspelt or mistyped
//! option before any stage runs, and `cordon plugin inspect` documents the
//! options — field doc comments become descriptions, serde defaults become
//! `default`s.
//!
//! [`stage_plugin!`](crate::stage_plugin) (and `deployment_plugin!`) export
//! it from [`StagePlugin::Options`](crate::StagePlugin::Options) and, when
//! given `settings: Type`, from the plugin's per-application settings.
//!
//! A string field that is a path inside the sandbox says so, and the host
//! checks it at plan time against the plugin's grants (an operator writing
//! a host path there gets the guest path to use instead):
//! `#[schemars(extend("format" = "guest-path"))]` for a path in some
//! granted directory, `#[schemars(extend("format" = "guest-mount"))]` for
//! exactly a mount's guest path, and `guest-path-rw` / `guest-mount-rw`
//! where the plugin writes (a read-write mount, or `/scratch`) — at any
//! depth (nested structs, lists, maps, `Option`s).

use schemars::JsonSchema;
use serde::de::DeserializeOwned;

/// The raw bindings of the `described` world (the `options` export).
pub mod bindings {
    include!("bindings/described.rs");
}

pub use bindings::exports::cordon::plugin::options::Subject;

/// The JSON Schema of `T`, as JSON text.
pub fn schema<T: JsonSchema>() -> String {
    serde_json::to_string(&schemars::schema_for!(T)).unwrap_or_default()
}

/// Reads `value` as `T`, the way the plugin will.
pub fn parse<T: DeserializeOwned>(value: &str) -> Result<T, String> {
    serde_json::from_str(value).map_err(|e| e.to_string())
}

/// Whether the plugin defines stage `name`.
pub fn defines<P: crate::StagePlugin>(name: &str) -> bool {
    P::STAGES.iter().any(|(n, _)| *n == name)
}

/// Exports the `options` interface for a [`StagePlugin`](crate::StagePlugin)
/// and, optionally, its settings type; used by `stage_plugin!`.
#[doc(hidden)]
#[macro_export]
macro_rules! describe_options {
    ($plugin:ty $(, $settings:ty)?) => {
        const _: () = {
            use $crate::options::bindings::exports::cordon::plugin::options::{Guest, Subject};
            struct CordonOptions;
            impl Guest for CordonOptions {
                fn schema(of: Subject) -> ::std::option::Option<::std::string::String> {
                    match of {
                        Subject::Stage(name) => $crate::options::defines::<$plugin>(&name)
                            .then(|| $crate::options::schema::<<$plugin as $crate::StagePlugin>::Options>()),
                        Subject::Settings => ::std::option::Option::<::std::string::String>::None
                            $(.or(::std::option::Option::Some($crate::options::schema::<$settings>())))?,
                    }
                }
                fn check(of: Subject, value: ::std::string::String) -> ::std::result::Result<(), ::std::string::String> {
                    match of {
                        Subject::Stage(name) if $crate::options::defines::<$plugin>(&name) => {
                            $crate::stage::parse_options::<$plugin>(&value).map(drop)
                        }
                        Subject::Stage(name) => ::std::result::Result::Err(::std::format!("the plugin defines no stage `{name}`")),
                        Subject::Settings => {
                            let _ = &value;
                            ::std::result::Result::Ok(())
                                $(.and_then(|()| $crate::options::parse::<$settings>(&value).map(drop)))?
                        }
                    }
                }
            }
            $crate::options::bindings::export_described!(CordonOptions);
        };
    };
}
