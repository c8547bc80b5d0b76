//! Exclusive locks on files of a state directory: one agent runs the
//! deployments of a state directory at a time, one process runs a migration
//! or restores into a state directory at a time. The lock is the operating
//! system's (`flock`), so it is released when its holder dies, however it
//! dies.

use std::fs::File;
use std::path::Path;

use anyhow::{Context, Result};

/// The exclusive right to run deployments from a state directory.
pub struct AgentLock {
    _file: File,
}

impl AgentLock {
    /// Takes the lock, or `None` if another agent holds it.
    pub fn try_acquire(state_dir: &Path) -> Result<Option<AgentLock>> {
        Ok(try_lock_file(&state_dir.join("agent.lock"))?.map(|file| AgentLock { _file: file }))
    }
}

/// Takes an exclusive lock on `path` (created with its directory), held
/// while the returned file lives; `None` when another process holds it.
pub fn try_lock_file(path: &Path) -> Result<Option<File>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let file = File::options().create(true).truncate(false).write(true).open(path).with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(e).with_context(|| format!("cannot lock {}", path.display())),
    }
}
