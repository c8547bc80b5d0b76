//! The host's services as plain Rust calls. Each is scoped by the host to
//! the running stage, its deployment and its application.

use crate::executor::cordon::plugin as api;

/// Lines in the stage log (counted against the plugin's log budget).
pub mod log {
    use super::api::log::{Level, write};

    pub fn debug(message: impl AsRef<str>) {
        write(Level::Debug, message.as_ref());
    }
    pub fn info(message: impl AsRef<str>) {
        write(Level::Info, message.as_ref());
    }
    pub fn warn(message: impl AsRef<str>) {
        write(Level::Warn, message.as_ref());
    }
    pub fn error(message: impl AsRef<str>) {
        write(Level::Error, message.as_ref());
    }
}

/// Key/value state that survives agent restarts: per stage (a re-run after
/// a restart sees what the first run stored) and per deployment.
pub mod metadata {
    use super::api::metadata::{Scope, entries, get, put};

    pub fn stage_get(key: &str) -> Option<String> {
        get(Scope::Stage, key)
    }
    pub fn stage_put(key: &str, value: &str) -> Result<(), String> {
        put(Scope::Stage, key, value)
    }
    pub fn deployment_get(key: &str) -> Option<String> {
        get(Scope::Deployment, key)
    }
    pub fn deployment_put(key: &str, value: &str) -> Result<(), String> {
        put(Scope::Deployment, key, value)
    }
    pub fn stage_entries() -> Vec<(String, String)> {
        entries(Scope::Stage)
    }
}

/// Commands operators addressed to this stage (`cordon approve`, `cordon skip`).
pub mod commands {
    pub use super::api::commands::{Command, CommandKind};

    /// Every command so far, oldest first.
    pub fn all() -> Vec<Command> {
        super::api::commands::received()
    }

    /// The approvals so far, oldest first.
    pub fn approvals() -> Vec<Command> {
        all().into_iter().filter(|c| c.kind == CommandKind::Approve).collect()
    }

    /// Tells the sender that `command` took effect (`cordon approve`
    /// waits for this). The first answer to a command counts.
    pub fn accept(command: &Command) {
        super::api::commands::answer(&command.id, Ok(()));
    }

    /// Tells the sender that `command` was refused and why; `cordon
    /// approve` then fails with `reason`.
    pub fn refuse(command: &Command, reason: &str) {
        super::api::commands::answer(&command.id, Err(reason));
    }
}

/// Objects kept per application across deployments.
pub mod blobs {
    pub fn get(key: &str) -> Option<Vec<u8>> {
        super::api::blobs::get(key)
    }
    pub fn put(key: &str, value: &[u8]) -> Result<(), String> {
        super::api::blobs::put(key, value)
    }
    pub fn delete(key: &str) {
        super::api::blobs::delete(key)
    }
}

/// Secrets the operator granted; their values are masked in every log line.
pub mod secrets {
    pub fn get(name: &str) -> Result<String, String> {
        super::api::secrets::get(name).map_err(|e| match e {
            super::api::secrets::Error::NotGranted => format!("secret {name:?} was not granted to this plugin"),
            super::api::secrets::Error::Unavailable(why) => format!("secret {name:?} is unavailable: {why}"),
        })
    }
}
