//! Source snapshots. The target source is copied when a deployment is
//! triggered, so editing the application directory mid-deployment changes
//! nothing; the running source is the snapshot of the last deployment that
//! succeeded. `.git` is left out; symlinks are copied as symlinks (the
//! sandbox never follows them outside the mount).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// Copies `src` to `dest` (which must not exist) through a temporary
/// directory, so a crash never leaves a half-copied snapshot in place.
pub fn snapshot(src: &Path, dest: &Path) -> Result<()> {
    if dest.exists() {
        bail!("snapshot {} already exists", dest.display());
    }
    let parent = dest.parent().context("snapshot path has no parent")?;
    std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let tmp = tempfile::Builder::new().prefix(".partial-").tempdir_in(parent)?;
    copy_tree(src, tmp.path()).with_context(|| format!("cannot snapshot {}", src.display()))?;
    std::fs::rename(tmp.keep(), dest).with_context(|| format!("cannot move the snapshot into {}", dest.display()))?;
    Ok(())
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
    fn snapshots_skip_git_and_changes_are_listed() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("app");
        std::fs::create_dir_all(src.join(".git")).unwrap();
        std::fs::create_dir_all(src.join("docs")).unwrap();
        std::fs::write(src.join("index.html"), "v1").unwrap();
        std::fs::write(src.join("docs/a.md"), "a").unwrap();
        std::fs::write(src.join(".git/HEAD"), "ref").unwrap();
        let one = dir.path().join("snap/1");
        snapshot(&src, &one).unwrap();
        assert!(!one.join(".git").exists() && one.join("docs/a.md").exists());
        assert_eq!(changed_files(None, &one).unwrap(), vec!["docs/a.md", "index.html"]);

        std::fs::write(src.join("docs/a.md"), "b").unwrap();
        std::fs::write(src.join("new.txt"), "n").unwrap();
        let two = dir.path().join("snap/2");
        snapshot(&src, &two).unwrap();
        assert_eq!(changed_files(Some(&one), &two).unwrap(), vec!["docs/a.md", "new.txt"]);
        assert!(snapshot(&src, &two).is_err(), "an existing snapshot is never overwritten");
    }
}
