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
//! 3. the result must hold a valid `app.cordon.yaml` of the same
//!    application, and the deployment must still be paused;
//! 4. only then is the clone swapped with the workspace in one atomic
//!    `renameat2(RENAME_EXCHANGE)`.
//!
//! A refused or interrupted upload therefore leaves the workspace exactly as
//! it was (and the agent sweeps the staging a killed upload leaves). An
//! upload holds the deployment's [`SourceLock`] exclusively from start to
//! end: it waits for running stages to finish, no stage starts and no
//! breakpoint is passed until it is in, and two uploads run one after the
//! other, the second on top of the first. Uploads merge by default;
//! [`Mode::Mirror`] (`--delete`) makes `--to` hold exactly the upload.
//! [`Limits`] bound the workspace after the upload, not one upload.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, bail};
use cap_std::ambient_authority;
use cap_std::fs::Dir;
use cordon_store::lock::{Staging, staging};
use cordon_store::{DeploymentRecord, StageRecord, StateStore};

use crate::config::AppConfig;
use crate::control;
use crate::snapshot::{self, SourceLock};

/// What the workspace may hold once an upload is in: the limits count what
/// was there before plus what the upload adds, so repeated uploads cannot
/// grow a source without bound (every upload clones the workspace, so this
/// also bounds what one upload costs).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Total bytes of file content.
    pub max_bytes: u64,
    /// Entries (files, directories, links).
    pub max_entries: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_bytes: 2 << 30, max_entries: 100_000 }
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

/// What a clone of the workspace holds: entries, content bytes, and the
/// size of each non-directory (relative path → bytes): writing one of those
/// must replace it, not write through the hard link.
#[derive(Default)]
struct Cloned {
    entries: u64,
    bytes: u64,
    files: HashMap<PathBuf, u64>,
}

/// Clones `from` into `to`: directories created, files hard-linked,
/// symlinks copied as symlinks; `skip` (relative) is left out.
fn clone_tree(from: &Path, to: &Path, skip: Option<&Path>) -> Result<Cloned> {
    fn walk(from: &Path, to: &Path, rel: &Path, skip: Option<&Path>, out: &mut Cloned) -> Result<()> {
        std::fs::create_dir_all(to)?;
        for entry in std::fs::read_dir(from).with_context(|| format!("cannot read {}", from.display()))? {
            let entry = entry?;
            let (src, dst, rel) = (entry.path(), to.join(entry.file_name()), rel.join(entry.file_name()));
            if Some(rel.as_path()) == skip {
                continue;
            }
            out.entries += 1;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                walk(&src, &dst, &rel, skip, out)?;
                continue;
            }
            let size = if kind.is_symlink() {
                std::os::unix::fs::symlink(std::fs::read_link(&src)?, &dst)?;
                0
            } else {
                std::fs::hard_link(&src, &dst).or_else(|_| std::fs::copy(&src, &dst).map(drop))?;
                entry.metadata()?.len()
            };
            out.bytes += size;
            out.files.insert(rel, size);
        }
        Ok(())
    }
    let mut out = Cloned::default();
    walk(from, to, Path::new(""), skip, &mut out)?;
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

/// How an upload lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Files of the upload are added or replaced; others stay.
    Merge,
    /// `--to` ends up holding exactly the upload: files it does not have
    /// are removed.
    Mirror,
}

/// An upload extracted into a staging copy of the workspace, not yet in
/// place: [`Prepared::commit`] swaps it in; dropping it changes nothing.
pub struct Prepared {
    staging: Staging,
    workspace: PathBuf,
    pub summary: Summary,
}

impl Prepared {
    /// The workspace as it will be.
    pub fn tree(&self) -> PathBuf {
        self.staging.path().join("tree")
    }

    /// Swaps the new tree with the workspace in one step.
    pub fn commit(self) -> Result<Summary> {
        exchange(&self.tree(), &self.workspace)?;
        // `tree` now holds the old workspace; dropping the staging removes it.
        Ok(self.summary)
    }
}

/// Extracts a tar archive into a staging copy of `workspace`, under `to`.
pub fn prepare(archive: impl Read, workspace: &Path, to: &Path, mode: Mode, limits: &Limits) -> Result<Prepared> {
    let to = confined(to, "--to")?;
    let parent = workspace.parent().context("the workspace has no parent directory")?;
    let staging = Staging::new(parent, staging::UPLOAD)?;
    let tree = staging.path().join("tree");
    let cloned = match mode {
        Mode::Mirror if to.as_os_str().is_empty() => std::fs::create_dir(&tree).map(|()| Cloned::default()).map_err(Into::into),
        Mode::Mirror => clone_tree(workspace, &tree, Some(&to)),
        Mode::Merge => clone_tree(workspace, &tree, None),
    }
    .context("cannot stage the workspace")?;
    let (mut entries, mut bytes) = (cloned.entries, cloned.bytes);
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
        let kind = entry.header().entry_type();
        if kind == tar::EntryType::XGlobalHeader {
            continue; // `git archive` records its commit here
        }
        let raw = entry.path().with_context(|| format!("archive entry {}: unreadable path", n + 1))?.into_owned();
        let path = confined(&raw, "archive entry")?;
        if path.as_os_str().is_empty() {
            continue;
        }
        let existing = cloned.files.get(&to.join(&path)).copied();
        if existing.is_none() {
            entries += 1;
            if entries > limits.max_entries {
                bail!("the workspace would hold more than {} entries, the upload limit (at entry {}); upload less or use --delete", limits.max_entries, raw.display());
            }
        }
        if to.join(&path).as_os_str().len() > MAX_PATH {
            bail!("archive entry {}…: its path is longer than {MAX_PATH} bytes, the upload limit; shorten it", raw.display().to_string().chars().take(80).collect::<String>());
        }
        match kind {
            tar::EntryType::Directory => {
                dest.create_dir_all(&path).with_context(|| format!("archive entry {}: cannot create the directory", raw.display()))?;
                summary.dirs += 1;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                // The size the archive reader uses: a PAX `size` record
                // overrides the header's; a sparse file's is its full size
                // (holes are written as zeros).
                let size = entry.size();
                summary.bytes += size;
                bytes = (bytes + size).saturating_sub(existing.unwrap_or(0));
                if bytes > limits.max_bytes {
                    bail!("the workspace would hold more than {} bytes, the upload limit (at entry {}); upload less or use --delete", limits.max_bytes, raw.display());
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
                let replace = existing.is_some();
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
    Ok(Prepared { staging, workspace: workspace.to_path_buf(), summary })
}

/// The files and directories an upload of `dir` contains, relative to it:
/// `.gitignore` files honoured at every level, `ignore` patterns added,
/// `.git` left out. A socket, pipe or device file is an error (a tar
/// stream cannot carry it).
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
        if entry.file_type().is_some_and(|t| !(t.is_file() || t.is_dir() || t.is_symlink())) {
            bail!("{}: sockets, pipes and device files cannot be uploaded; add it to .gitignore or --ignore", entry.path().display());
        }
        let rel = entry.path().strip_prefix(dir)?.to_path_buf();
        if !rel.as_os_str().is_empty() {
            out.push(rel);
        }
    }
    Ok(out)
}

/// Prepares an upload of `dir` into `workspace/to`: the tar stream is
/// produced by one thread and extracted by this one, so nothing is
/// buffered in full. Anything the local side cannot read (a socket, a FIFO,
/// an unreadable file) fails the upload before anything is swapped in.
pub fn prepare_dir(dir: &Path, ignore: &[String], workspace: &Path, to: &Path, mode: Mode, limits: &Limits) -> Result<Prepared> {
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
    let prepared = prepare(std::io::BufReader::with_capacity(1 << 20, reader), workspace, to, mode, limits);
    let produced = producer.join().map_err(|_| anyhow::anyhow!("the archive writer panicked"))?;
    // The writer's error first: a failed writer still ends its archive
    // cleanly (tar's builder does on drop), so the extraction may look whole.
    produced?;
    prepared
}

/// Where an upload comes from.
pub enum Source<'a> {
    /// A local directory, walked with [`walk`]'s rules.
    Dir { dir: &'a Path, ignore: &'a [String] },
    /// A tar archive.
    Archive(&'a mut dyn Read),
}

/// What to upload, where and how.
pub struct Request<'a> {
    pub source: Source<'a>,
    /// Where inside the deployment's source.
    pub to: &'a Path,
    pub mode: Mode,
    pub limits: &'a Limits,
}

fn prepare_source(source: Source, workspace: &Path, to: &Path, mode: Mode, limits: &Limits) -> Result<Prepared> {
    match source {
        Source::Dir { dir, ignore } => prepare_dir(dir, ignore, workspace, to, mode, limits),
        Source::Archive(archive) => prepare(archive, workspace, to, mode, limits),
    }
}

/// The prepared source must hold a valid config of the same application.
fn check_app(prepared: &Prepared, record: &DeploymentRecord) -> Result<()> {
    let app = AppConfig::load(&prepared.tree()).context("the upload would leave an invalid application config; nothing was changed")?;
    if app.name != record.application {
        bail!("the upload renames the application from `{}` to `{}` in app.cordon.yaml; nothing was changed", record.application, app.name);
    }
    Ok(())
}

/// Uploads into the source of deployment `id`, which must be paused (and
/// still be when the upload is ready to swap in — a `debug continue` sent
/// meanwhile is applied after it, to the new source). It waits for the
/// deployment's running stages (`waiting` is called if it has to) and for
/// other uploads, so none is lost; the resulting source must hold a valid
/// `app.cordon.yaml` of the same application. Returns the paused stage.
///
/// A deployment on a shared store has a stored snapshot, which never
/// changes: the upload is applied to a copy fetched into `snapshots`, the
/// result is stored as a new snapshot, and the deployment is pointed at it
/// only if it is still paused and no other upload got there first (else
/// nothing changes and the error says so); its next stage reads it.
pub fn into_deployment(store: &dyn StateStore, snapshots: &Path, id: &str, request: Request, waiting: impl FnOnce()) -> Result<(Summary, StageRecord)> {
    let Request { source, to, mode, limits } = request;
    let mut record = control::deployment(store, id)?;
    control::paused_stage(store, id)?;
    // The lock is the local directory's: on one machine it orders uploads
    // and stages as described above; across machines the store's check
    // below is what keeps a stored source consistent.
    let mut waiting = Some(waiting);
    let (workspace, _lock) = loop {
        let workspace = snapshot::local(store, &record.target_snapshot, snapshots)?;
        let lock = SourceLock::of(&workspace).exclusive(|| waiting.take().map_or((), |w| w()))?;
        let now = control::deployment(store, id)?;
        if now.target_snapshot == record.target_snapshot {
            break (workspace, lock);
        }
        // Another upload stored a new source meanwhile: build on that one.
        record = now;
    };
    let prepared = prepare_source(source, &workspace, to, mode, limits)?;
    check_app(&prepared, &record)?;
    let stage = control::paused_stage(store, id).context("it was resumed during the upload; nothing was changed")?;
    if !snapshot::is_stored(&record.target_snapshot) {
        return Ok((prepared.commit()?, stage));
    }
    let reference = snapshot::store(store, &prepared.tree(), Path::new(id))?;
    if !store.replace_target_snapshot(id, &record.target_snapshot, &reference)? {
        bail!("{id} was resumed, or another upload changed its source, while this one was prepared; nothing was changed: see `cordon status {id}` and upload again");
    }
    Ok((prepared.summary.clone(), stage))
}
