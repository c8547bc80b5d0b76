//! Uploading local data into a paused deployment's source (TEP-0149).
//!
//! The client side walks a directory — honouring `.gitignore` files at every
//! level and `--ignore` patterns, leaving out `.git` (but not `.github` or
//! `.gitignore`) — and streams it as a tar archive. The host side extracts
//! the archive confined to the workspace:
//!
//! 1. the workspace is cloned into a staging directory next to it (files
//!    hard-linked, so this is cheap; every file the upload writes is a new
//!    file renamed into place, so the clone never writes through a link);
//! 2. every entry is checked and extracted into the clone with cap-std, so no
//!    path can leave it: `..`, absolute paths, hard links, device files and
//!    archives over the size limit are refused with an error naming the
//!    entry (sizes as the PAX records say, paths at most [`MAX_PATH`]
//!    bytes); symlinks are allowed only if, once everything is extracted,
//!    they resolve inside the workspace (chains included);
//! 3. only then is the clone swapped with the workspace in one atomic
//!    `renameat2(RENAME_EXCHANGE)`.
//!
//! A refused or interrupted upload therefore leaves the workspace exactly as
//! it was.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, bail};
use cap_std::ambient_authority;
use cap_std::fs::Dir;

/// What one upload may contain.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Total bytes of file content.
    pub max_bytes: u64,
    /// Entries (files, directories, links).
    pub max_entries: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_bytes: 2 << 30, max_entries: 1_000_000 }
    }
}

/// What an upload wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
}

/// Longest relative path an upload may create, in bytes: with the state
/// directory and the staging prefix in front it stays far below the
/// kernel's 4,096-byte limit, so no upload leaves a tree that later
/// uploads or deployments cannot copy.
pub const MAX_PATH: usize = 1024;

/// A relative path without `..`, or an error naming `what`.
fn confined(path: &Path, what: &str) -> Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir => bail!("{what} {}: `..` is refused; paths must stay inside the workspace", path.display()),
            Component::RootDir | Component::Prefix(_) => {
                bail!("{what} {}: absolute paths are refused; paths are relative to the workspace", path.display())
            }
        }
    }
    Ok(out)
}

/// Clones `from` into `to`: directories created, files hard-linked,
/// symlinks copied as symlinks. Returns the cloned non-directories,
/// relative to `to`: writing one of those must replace it, not write
/// through the link.
fn clone_tree(from: &Path, to: &Path) -> Result<HashSet<PathBuf>> {
    fn walk(from: &Path, to: &Path, rel: &Path, out: &mut HashSet<PathBuf>) -> Result<()> {
        std::fs::create_dir_all(to)?;
        for entry in std::fs::read_dir(from).with_context(|| format!("cannot read {}", from.display()))? {
            let entry = entry?;
            let (src, dst, rel) = (entry.path(), to.join(entry.file_name()), rel.join(entry.file_name()));
            let kind = entry.file_type()?;
            if kind.is_dir() {
                walk(&src, &dst, &rel, out)?;
                continue;
            }
            if kind.is_symlink() {
                std::os::unix::fs::symlink(std::fs::read_link(&src)?, &dst)?;
            } else {
                std::fs::hard_link(&src, &dst).or_else(|_| std::fs::copy(&src, &dst).map(drop))?;
            }
            out.insert(rel);
        }
        Ok(())
    }
    let mut out = HashSet::new();
    walk(from, to, Path::new(""), &mut out)?;
    Ok(out)
}

/// Swaps two directories atomically (falling back to two renames where the
/// filesystem cannot exchange).
fn exchange(a: &Path, b: &Path) -> Result<()> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    match renameat_with(CWD, a, CWD, b, RenameFlags::EXCHANGE) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => {
            let aside = a.with_extension("old");
            std::fs::rename(b, &aside)?;
            std::fs::rename(a, b)?;
            std::fs::rename(&aside, a)?;
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("cannot swap {} into place", b.display())),
    }
}

/// Extracts a tar archive into `workspace/to`, all or nothing.
pub fn extract(archive: impl Read, workspace: &Path, to: &Path, limits: &Limits) -> Result<Summary> {
    let to = confined(to, "--to")?;
    let parent = workspace.parent().context("the workspace has no parent directory")?;
    let staging = tempfile::Builder::new().prefix(".upload-").tempdir_in(parent)?;
    let tree = staging.path().join("tree");
    let cloned = clone_tree(workspace, &tree).context("cannot stage the workspace")?;
    let root = Dir::open_ambient_dir(&tree, ambient_authority())?;
    let dest = if to.as_os_str().is_empty() {
        root.open_dir(".")?
    } else {
        root.create_dir_all(&to).with_context(|| format!("--to {}: cannot be created in the workspace", to.display()))?;
        root.open_dir(&to).with_context(|| format!("--to {}: not a directory inside the workspace", to.display()))?
    };

    let mut summary = Summary::default();
    let mut links: Vec<PathBuf> = Vec::new();
    let mut created: HashSet<PathBuf> = HashSet::new();
    let mut archive = tar::Archive::new(archive);
    for (n, entry) in archive.entries().context("not a tar archive")?.enumerate() {
        let mut entry = entry.with_context(|| format!("archive entry {}: cannot be read (truncated or corrupt archive)", n + 1))?;
        if n as u64 + 1 > limits.max_entries {
            bail!("the archive has more than {} entries, the upload limit", limits.max_entries);
        }
        let raw = entry.path().with_context(|| format!("archive entry {}: unreadable path", n + 1))?.into_owned();
        let path = confined(&raw, "archive entry")?;
        if path.as_os_str().is_empty() {
            continue;
        }
        if to.join(&path).as_os_str().len() > MAX_PATH {
            bail!("archive entry {}…: its path is longer than {MAX_PATH} bytes, the upload limit; shorten it", raw.display().to_string().chars().take(80).collect::<String>());
        }
        let kind = entry.header().entry_type();
        match kind {
            tar::EntryType::Directory => {
                dest.create_dir_all(&path).with_context(|| format!("archive entry {}: cannot create the directory", raw.display()))?;
                summary.dirs += 1;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                // The size the archive reader uses: a PAX `size` record
                // overrides the header's.
                let size = entry.size();
                summary.bytes += size;
                if summary.bytes > limits.max_bytes {
                    bail!("the archive holds more than {} bytes, the upload limit (at entry {})", limits.max_bytes, raw.display());
                }
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
                    && created.insert(dir.to_path_buf())
                {
                    dest.create_dir_all(dir).with_context(|| format!("archive entry {}: cannot create its directory", raw.display()))?;
                }
                let mode = (entry.header().mode().unwrap_or(0o644) & 0o755) | 0o600;
                // A file that exists in the clone is hard-linked to the live
                // workspace: write a new file and rename it over, never
                // write through the link.
                let replace = cloned.contains(&to.join(&path));
                let tmp = path.with_file_name(format!(".{}.cordon-upload", path.file_name().unwrap_or_default().to_string_lossy()));
                let written = if replace { &tmp } else { &path };
                let mut options = cap_std::fs::OpenOptions::new();
                options.write(true).create_new(true);
                cap_std::fs::OpenOptionsExt::mode(&mut options, mode);
                let mut file = dest.open_with(written, &options).with_context(|| {
                    format!("archive entry {}: cannot be written (a directory or an earlier entry is in the way)", raw.display())
                })?;
                let copied = std::io::copy(&mut (&mut entry).take(size), &mut file)
                    .with_context(|| format!("archive entry {}: truncated archive", raw.display()))?;
                if copied != size {
                    bail!("archive entry {}: truncated archive ({copied} of {size} bytes)", raw.display());
                }
                drop(file);
                if replace {
                    dest.rename(&tmp, &dest, &path).with_context(|| format!("archive entry {}: cannot be put in place", raw.display()))?;
                }
                summary.files += 1;
            }
            tar::EntryType::Symlink => {
                let target = entry.link_name()?.with_context(|| format!("archive entry {}: a symlink without a target", raw.display()))?.into_owned();
                if target.is_absolute() {
                    bail!("archive entry {}: symlink to the absolute path {} is refused", raw.display(), target.display());
                }
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    dest.create_dir_all(dir)?;
                }
                let _ = dest.remove_file(&path);
                dest.symlink(&target, &path).with_context(|| format!("archive entry {}: cannot create the symlink", raw.display()))?;
                links.push(to.join(&path));
                summary.symlinks += 1;
            }
            tar::EntryType::Link => bail!("archive entry {}: hard links are refused", raw.display()),
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                bail!("archive entry {}: device files and pipes are refused", raw.display())
            }
            other => bail!("archive entry {}: entries of type {other:?} are refused", raw.display()),
        }
    }
    // Every symlink, chains included, must resolve inside the workspace.
    for link in &links {
        root.canonicalize(link).map_err(|e| {
            anyhow::anyhow!("archive entry {}: the symlink leads outside the workspace or nowhere ({e}); refused", link.display())
        })?;
    }
    drop(dest);
    drop(root);
    exchange(&tree, workspace)?;
    // `tree` now holds the old workspace; the temporary directory removes it.
    Ok(summary)
}

/// The files and directories an upload of `dir` contains, relative to it:
/// `.gitignore` files honoured at every level, `ignore` patterns added,
/// `.git` left out.
pub fn walk(dir: &Path, ignore: &[String]) -> Result<Vec<PathBuf>> {
    let mut overrides = ignore::overrides::OverrideBuilder::new(dir);
    for pattern in ignore {
        overrides.add(&format!("!{pattern}")).with_context(|| format!("--ignore {pattern:?} is not a valid pattern"))?;
    }
    let mut builder = ignore::WalkBuilder::new(dir);
    builder
        .hidden(false)
        .parents(false)
        .ignore(false)
        .git_global(false)
        .git_exclude(false)
        .git_ignore(true)
        .require_git(false)
        .follow_links(false)
        .sort_by_file_name(|a, b| a.cmp(b))
        .overrides(overrides.build()?)
        .filter_entry(|e| e.file_name() != ".git");
    let mut out = Vec::new();
    for entry in builder.build() {
        let entry = entry?;
        let rel = entry.path().strip_prefix(dir)?.to_path_buf();
        if !rel.as_os_str().is_empty() {
            out.push(rel);
        }
    }
    Ok(out)
}

/// Uploads `dir` into `workspace/to`: the tar stream is produced by one
/// thread and extracted by this one, so nothing is buffered in full.
pub fn upload_dir(dir: &Path, ignore: &[String], workspace: &Path, to: &Path, limits: &Limits) -> Result<Summary> {
    if !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    let entries = walk(dir, ignore)?;
    let (reader, writer) = std::io::pipe()?;
    let dir = dir.to_path_buf();
    let producer = std::thread::spawn(move || -> Result<()> {
        let mut builder = tar::Builder::new(std::io::BufWriter::with_capacity(1 << 20, writer));
        builder.follow_symlinks(false);
        for rel in entries {
            builder.append_path_with_name(dir.join(&rel), &rel).with_context(|| format!("cannot read {}", dir.join(&rel).display()))?;
        }
        builder.into_inner()?.flush()?;
        Ok(())
    });
    let result = extract(std::io::BufReader::with_capacity(1 << 20, reader), workspace, to, limits);
    let produced = producer.join().map_err(|_| anyhow::anyhow!("the archive writer panicked"))?;
    let summary = result?;
    produced?;
    Ok(summary)
}
