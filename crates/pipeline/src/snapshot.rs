//! Source snapshots. The target source is copied when a deployment is
//! triggered, so editing the application directory mid-deployment changes
//! nothing; the running source is the snapshot of the last deployment that
//! succeeded. `.git` is left out; symlinks are copied as symlinks (the
//! sandbox never follows them outside the mount).
//!
//! Where snapshots live depends on the store. On the embedded one, a
//! snapshot is a directory under the state directory and the record holds
//! its path. On a shared store, agents on other machines must reach it, so
//! it is kept in the store itself as a tar archive named by its digest
//! (`sha256:<hex>`, see [`store`]); an agent fetches it once into its own
//! state directory ([`local`]), checks the digest, and reuses it for every
//! deployment of the same source. Stored snapshots never change: an upload
//! into a paused deployment stores a new one and points the deployment at
//! it, and the agent takes it when it next starts a stage.

use std::fs::{File, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use cordon_store::StateStore;
use cordon_store::lock::{Staging, open_lock_file, place, staging};

use cordon_store::STORED_SNAPSHOT as STORED;
pub use cordon_store::MAX_SNAPSHOT as MAX_STORED;

/// The snapshots directory of a state directory: local snapshots, and
/// stored ones fetched here.
pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("snapshots")
}

/// Whether `reference` names a snapshot kept in the store (else a directory).
pub fn is_stored(reference: &str) -> bool {
    reference.starts_with(STORED)
}

/// A `Vec` that refuses to grow past its cap, so packing a huge tree fails
/// early instead of holding it all.
struct Capped(Vec<u8>);

impl Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > MAX_STORED {
            return Err(std::io::Error::other(format!("it is larger than {} MiB packed", MAX_STORED >> 20)));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Packs `tree` as a tar archive, keeps it in `store` under its digest and
/// returns that reference (`sha256:<hex>`). `source` names the tree in
/// messages.
pub fn store(store: &dyn StateStore, tree: &Path, source: &Path) -> Result<String> {
    let mut builder = tar::Builder::new(Capped(Vec::new()));
    builder.mode(tar::HeaderMode::Deterministic);
    builder.follow_symlinks(false);
    let packed = builder.append_dir_all(".", tree).and_then(|()| builder.into_inner());
    let archive = match packed {
        Ok(Capped(archive)) => archive,
        Err(e) => bail!(
            "cannot keep the source {} in the shared state: {e}; move large files out of the application directory",
            source.display()
        ),
    };
    let reference = cordon_store::snapshot_reference(&archive);
    store.snapshot_put(&reference, &archive)?;
    Ok(reference)
}

/// The directory holding snapshot `reference`: a directory reference as
/// it is; a stored one fetched from `store` into `snapshots` once (checked
/// against its digest, extracted in a staging directory, placed by one
/// rename) and read-only from then on.
pub fn local(store: &dyn StateStore, reference: &str, snapshots: &Path) -> Result<PathBuf> {
    if !is_stored(reference) {
        return Ok(PathBuf::from(reference));
    }
    let dest = cached(reference, snapshots).with_context(|| format!("the state store names a snapshot {reference:?} that is not a sha256 digest"))?;
    if dest.is_dir() {
        return Ok(dest);
    }
    let archive = store.snapshot_get(reference)?.with_context(|| format!("snapshot {reference} is missing from the state store"))?;
    if cordon_store::snapshot_reference(&archive) != reference {
        bail!("snapshot {reference} in the state store does not match its digest; it was altered");
    }
    std::fs::create_dir_all(snapshots).with_context(|| format!("cannot create {}", snapshots.display()))?;
    let staging = Staging::new(snapshots, staging::SNAPSHOT)?;
    let tree = staging.path().join("tree");
    std::fs::create_dir(&tree)?;
    tar::Archive::new(archive.as_slice()).unpack(&tree).with_context(|| format!("cannot extract snapshot {reference}"))?;
    // Another deployment of the same source may have placed it meanwhile.
    place(&tree, &dest)?;
    Ok(dest)
}

/// Where this machine keeps its copy of stored snapshot `reference`
/// (`None` if the reference is not a well-formed digest).
pub fn cached(reference: &str, snapshots: &Path) -> Option<PathBuf> {
    let hex = reference.strip_prefix(STORED).filter(|_| cordon_store::is_snapshot_reference(reference))?;
    Some(snapshots.join(format!("sha256-{hex}")))
}

/// A copy of an application directory, built in a staging directory of the
/// snapshots directory so a killed command leaves nothing half-copied in
/// place (and the agent sweeps what it leaves).
pub struct Staged {
    staging: Staging,
}

impl Staged {
    /// Copies `src` into a staging directory of `snapshots`.
    pub fn copy(src: &Path, snapshots: &Path) -> Result<Staged> {
        let staging = Staging::new(snapshots, staging::SNAPSHOT)?;
        let tree = staging.path().join("tree");
        std::fs::create_dir(&tree)?;
        copy_tree(src, &tree).with_context(|| format!("cannot snapshot {}", src.display()))?;
        Ok(Staged { staging })
    }

    /// The copy.
    pub fn tree(&self) -> PathBuf {
        self.staging.path().join("tree")
    }

    /// Moves the copy to `dest`, unless something is there (`Ok(false)`).
    pub fn place(&self, dest: &Path) -> Result<bool> {
        place(&self.tree(), dest)
    }

    /// Takes a placed copy back from `dest` (its record could not be written).
    pub fn take_back(&self, dest: &Path) -> Result<()> {
        std::fs::rename(dest, self.tree()).with_context(|| format!("cannot remove {}", dest.display()))
    }
}

/// Who may read or change a deployment's source snapshot: stages read it
/// holding the lock shared; an upload changes it holding the lock
/// exclusively. So an upload waits for running stages to finish, and no
/// stage starts (nor a breakpoint is passed) while an upload is under way —
/// every stage sees one tree from its start to its end. The lock is a file
/// next to the snapshot, `<id>.lock`.
pub struct SourceLock {
    path: PathBuf,
    held: Option<File>,
}

impl SourceLock {
    pub fn of(snapshot: &Path) -> SourceLock {
        let mut name = snapshot.file_name().unwrap_or_default().to_os_string();
        name.push(".lock");
        SourceLock { path: snapshot.with_file_name(name), held: None }
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Holds the lock shared so stages may read; `false` while an upload
    /// holds it (try again later).
    pub fn share(&mut self) -> Result<bool> {
        if self.held.is_none() {
            let file = open_lock_file(&self.path)?;
            match file.try_lock_shared() {
                Ok(()) => self.held = Some(file),
                Err(TryLockError::WouldBlock) => return Ok(false),
                Err(TryLockError::Error(e)) => return Err(e).with_context(|| format!("cannot lock {}", self.path.display())),
            }
        }
        Ok(true)
    }

    /// Lets an upload in (no stage reads now).
    pub fn release(&mut self) {
        self.held = None;
    }

    /// Holds the lock exclusively, waiting for readers (and other uploads);
    /// `waiting` is called once if it has to wait.
    pub fn exclusive(mut self, waiting: impl FnOnce()) -> Result<SourceLock> {
        let file = open_lock_file(&self.path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                waiting();
                file.lock().with_context(|| format!("cannot lock {}", self.path.display()))?;
            }
            Err(TryLockError::Error(e)) => return Err(e).with_context(|| format!("cannot lock {}", self.path.display())),
        }
        self.held = Some(file);
        Ok(self)
    }
}

fn copy_tree(src: &Path, dest: &Path) -> Result<()> {
    for entry in std::fs::read_dir(src).with_context(|| format!("cannot read {}", src.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        if name == ".git" {
            continue;
        }
        let (from, to) = (entry.path(), dest.join(&name));
        let kind = entry.file_type()?;
        if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&from)?, &to)?;
        } else if kind.is_dir() {
            std::fs::create_dir(&to)?;
            copy_tree(&from, &to)?;
        } else if kind.is_file() {
            std::fs::copy(&from, &to).with_context(|| format!("cannot copy {}", from.display()))?;
        }
    }
    Ok(())
}

fn files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            files(root, &entry.path(), out)?;
        } else {
            out.push(entry.path().strip_prefix(root)?.to_path_buf());
        }
    }
    Ok(())
}

/// Files added, removed or changed from `old` to `new` (all of `new` when
/// there is no `old`), as `/`-separated relative paths, sorted.
pub fn changed_files(old: Option<&Path>, new: &Path) -> Result<Vec<String>> {
    let mut new_files = Vec::new();
    files(new, new, &mut new_files)?;
    let mut changed: Vec<PathBuf> = Vec::new();
    match old {
        None => changed = new_files,
        Some(old) => {
            let mut old_files = Vec::new();
            files(old, old, &mut old_files)?;
            for f in &new_files {
                let (a, b) = (old.join(f), new.join(f));
                let same = match (std::fs::symlink_metadata(&a), std::fs::symlink_metadata(&b)) {
                    (Ok(ma), Ok(mb)) if ma.file_type().is_symlink() || mb.file_type().is_symlink() => {
                        std::fs::read_link(&a).ok() == std::fs::read_link(&b).ok()
                    }
                    (Ok(ma), Ok(mb)) => ma.len() == mb.len() && std::fs::read(&a)? == std::fs::read(&b)?,
                    _ => false,
                };
                if !same {
                    changed.push(f.clone());
                }
            }
            changed.extend(old_files.into_iter().filter(|f| new.join(f).symlink_metadata().is_err()));
        }
    }
    let mut out: Vec<String> = changed.iter().map(|p| p.to_string_lossy().replace('\\', "/")).collect();
    out.sort();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_snapshots_come_back_whole_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let store = cordon_store::SqliteStore::open(&dir.path().join("state.db")).unwrap();
        let src = dir.path().join("app");
        std::fs::create_dir_all(src.join("deep/er")).unwrap();
        std::fs::write(src.join("deep/er/file"), "x").unwrap();
        std::fs::create_dir(src.join("empty")).unwrap();
        std::os::unix::fs::symlink("deep/er/file", src.join("link")).unwrap();
        let reference = store_tree(&store, &src);
        assert!(is_stored(&reference) && reference == store_tree(&store, &src), "the same tree has one reference");

        let fetched = local(&store, &reference, &dir.path().join("agent")).unwrap();
        assert_eq!(std::fs::read_to_string(fetched.join("deep/er/file")).unwrap(), "x");
        assert!(fetched.join("empty").is_dir());
        assert_eq!(std::fs::read_link(fetched.join("link")).unwrap(), Path::new("deep/er/file"));
        assert_eq!(local(&store, &reference, &dir.path().join("agent")).unwrap(), fetched, "fetched once, then reused");

        // An archive stored under another digest is refused, and so is a missing one.
        let other = format!("{STORED}{}", "0".repeat(64));
        store.snapshot_put(&other, &store.snapshot_get(&reference).unwrap().unwrap()).unwrap();
        let err = format!("{:#}", local(&store, &other, &dir.path().join("agent")).unwrap_err());
        assert!(err.contains("does not match its digest"), "{err}");
        let err = format!("{:#}", local(&store, &format!("{STORED}{}", "1".repeat(64)), &dir.path().join("agent")).unwrap_err());
        assert!(err.contains("missing from the state store"), "{err}");
        assert!(local(&store, "sha256:../../etc", &dir.path().join("agent")).is_err());
        assert_eq!(local(&store, "/some/dir", &dir.path().join("agent")).unwrap(), Path::new("/some/dir"));
    }

    fn store_tree(state: &dyn StateStore, tree: &Path) -> String {
        store(state, tree, tree).unwrap()
    }

    #[test]
    fn snapshots_skip_git_and_changes_are_listed() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("app");
        std::fs::create_dir_all(src.join(".git")).unwrap();
        std::fs::create_dir_all(src.join("docs")).unwrap();
        std::fs::write(src.join("index.html"), "v1").unwrap();
        std::fs::write(src.join("docs/a.md"), "a").unwrap();
        std::fs::write(src.join(".git/HEAD"), "ref").unwrap();
        let snap = dir.path().join("snap");
        let one = snap.join("1");
        assert!(Staged::copy(&src, &snap).unwrap().place(&one).unwrap());
        assert!(!one.join(".git").exists() && one.join("docs/a.md").exists());
        assert_eq!(changed_files(None, &one).unwrap(), vec!["docs/a.md", "index.html"]);

        std::fs::write(src.join("docs/a.md"), "b").unwrap();
        std::fs::write(src.join("new.txt"), "n").unwrap();
        let two = snap.join("2");
        assert!(Staged::copy(&src, &snap).unwrap().place(&two).unwrap());
        assert_eq!(changed_files(Some(&one), &two).unwrap(), vec!["docs/a.md", "new.txt"]);
        assert!(!Staged::copy(&src, &snap).unwrap().place(&two).unwrap(), "an existing snapshot is never replaced");
        assert_eq!(std::fs::read_dir(&snap).unwrap().count(), 2, "staging directories are removed");
    }
}
