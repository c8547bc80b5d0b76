//! Locks and staging in a state directory: one agent runs the deployments
//! of a state directory at a time, one process runs a migration or restores
//! into a state directory at a time; what a command builds it builds aside
//! and moves into place without replacing anything. The lock is the
//! operating system's (`flock`), so it is released when its holder dies,
//! however it dies — which is also how abandoned staging is recognised.

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
    let file = open_lock_file(path)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(e).with_context(|| format!("cannot lock {}", path.display())),
    }
}

/// Opens (creating it and its directory) the file a lock is taken on.
pub fn open_lock_file(path: &Path) -> Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    File::options().create(true).truncate(false).write(true).open(path).with_context(|| format!("cannot open {}", path.display()))
}

/// A directory a command builds before moving its content into place
/// (snapshots, uploads, restores), named `<prefix><random>`. While the
/// command lives it holds a lock on the directory's `.owner` file, so
/// [`sweep`] can tell a directory left by a killed command from one being
/// built right now. Dropping it removes the directory.
pub struct Staging {
    dir: tempfile::TempDir,
    _owner: File,
}

const OWNER: &str = ".owner";

impl Staging {
    pub fn new(parent: &Path, prefix: &str) -> Result<Staging> {
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(parent)
            .with_context(|| format!("cannot create a staging directory in {}", parent.display()))?;
        // Locked under another name, then renamed: a sweeper never sees an
        // owner file that is not locked yet.
        let unlocked = dir.path().join(".owner.new");
        let owner = try_lock_file(&unlocked)?.context("a new staging directory is locked by another process")?;
        std::fs::rename(&unlocked, dir.path().join(OWNER)).with_context(|| format!("cannot create {}", dir.path().join(OWNER).display()))?;
        Ok(Staging { dir, _owner: owner })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Renames `from` to `to` unless `to` exists (`Ok(false)` then), in one
/// step: two commands placing the same name cannot both succeed, and
/// neither replaces what the other placed.
pub fn place(from: &Path, to: &Path) -> Result<bool> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    match renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::EXIST) => Ok(false),
        // A filesystem without RENAME_NOREPLACE: check, then rename.
        Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) if to.symlink_metadata().is_ok() => Ok(false),
        Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => {
            std::fs::rename(from, to).with_context(|| format!("cannot move {} to {}", from.display(), to.display()))?;
            Ok(true)
        }
        Err(e) => Err(e).with_context(|| format!("cannot move {} to {}", from.display(), to.display())),
    }
}

/// Staging prefixes of the state directory's commands.
pub mod staging {
    /// A deployment's source snapshot being copied (`snapshots/`).
    pub const SNAPSHOT: &str = ".partial-";
    /// An upload being extracted (`snapshots/`).
    pub const UPLOAD: &str = ".upload-";
    /// A backup being restored (the state directory).
    pub const RESTORE: &str = ".transfer-";
    /// A snapshot retention let go, being removed (`snapshots/`).
    pub const PRUNED: &str = ".pruned-";
}

/// Removes what killed commands left in `state_dir` (see [`staging`]);
/// returns how many directories.
pub fn sweep_state_dir(state_dir: &Path) -> Result<usize> {
    Ok(sweep(&state_dir.join("snapshots"), &[staging::SNAPSHOT, staging::UPLOAD, staging::PRUNED])? + sweep(state_dir, &[staging::RESTORE])?)
}

/// Removes the staging directories in `parent` whose command died (their
/// `.owner` lock is free), and returns how many. A directory without an
/// owner file is removed only when older than a minute: its command may
/// still be creating it.
pub fn sweep(parent: &Path, prefixes: &[&str]) -> Result<usize> {
    let entries = match std::fs::read_dir(parent) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", parent.display())),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        if !prefixes.iter().any(|p| name.to_string_lossy().starts_with(p)) || !entry.file_type()?.is_dir() {
            continue;
        }
        let path = entry.path();
        // Another command may finish (and remove it) or sweep it meanwhile:
        // a directory that is gone is not an error.
        let dead = match File::options().write(true).open(path.join(OWNER)) {
            Ok(owner) => owner.try_lock().is_ok(),
            Err(_) => entry.metadata().ok().and_then(|m| m.modified().ok()).is_some_and(|t| t.elapsed().is_ok_and(|age| age.as_secs() > 60)),
        };
        if dead {
            match std::fs::remove_dir_all(&path) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("cannot remove the abandoned {}", path.display())),
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweeping_removes_only_what_a_dead_command_left() {
        let dir = tempfile::tempdir().unwrap();
        let live = Staging::new(dir.path(), ".upload-").unwrap();
        // A command killed mid-way: its directory stays, its lock is gone.
        let Staging { dir: dead, _owner } = Staging::new(dir.path(), ".upload-").unwrap();
        drop(_owner);
        let left = dead.keep();
        std::fs::create_dir(dir.path().join("site-1")).unwrap();
        assert_eq!(sweep(dir.path(), &[".upload-", ".partial-"]).unwrap(), 1);
        assert!(!left.exists() && live.path().exists() && dir.path().join("site-1").exists());
    }
}
