//! Disk budgets of a call's writable directories: `/scratch` always
//! (`limits.scratch`), and each read-write mount that names a `quota`.
//!
//! WASI gives the host no hook on writes that covers every way to grow a
//! tree (writes through streams, `set-size`, new files and directories),
//! and a real filesystem quota needs root. So the host *measures*: while
//! the call runs, a watcher walks each budgeted directory — without
//! following links — summing the space its entries take on disk (allocated
//! blocks, so a sparse file counts what it holds) plus [`ENTRY_COST`] per
//! entry, so millions of empty files are charged too. When a directory
//! passes its budget the call is stopped like a timeout, naming the limit.
//! A granted mount outlives the call, so it is measured once more after
//! the call — otherwise a plugin that wrote fast and returned before a walk
//! would leave the next call to be blamed; `/scratch` is the call's own and
//! is not (that walk would cost every short call more than it runs).
//!
//! Worst-case overshoot: what the plugin writes between two walks — at
//! most [`INTERVAL`] (longer on a tree so large that walking it takes more
//! than a tenth of that; the watcher never spends more than ~10% of the
//! time walking) at the disk's write speed.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::limits::Violation;

/// Bytes each file, directory or link costs besides its blocks.
pub const ENTRY_COST: u64 = 1024;

/// Time between two walks of a budgeted directory.
pub const INTERVAL: Duration = Duration::from_millis(50);

/// One budgeted directory of a call.
#[derive(Debug, Clone)]
struct Budgeted {
    host: PathBuf,
    guest: String,
    quota: u64,
    /// Whether the tree outlives the call (a granted mount).
    lasting: bool,
}

/// The disk budgets of one call.
#[derive(Debug, Clone, Default)]
pub struct DiskBudgets(Vec<Budgeted>);

impl DiskBudgets {
    /// Budgets `host`, seen by the guest at `guest`, to `quota` bytes;
    /// `lasting` when the tree outlives the call.
    pub fn add(&mut self, host: &Path, guest: &str, quota: u64, lasting: bool) {
        self.0.push(Budgeted { host: host.to_path_buf(), guest: guest.to_string(), quota, lasting });
    }

    /// The first directory past its budget, if any.
    pub async fn check(&self) -> Result<(), Violation> {
        walk(self.0.clone()).await
    }

    /// The first lasting directory past its budget, if any: the check
    /// after a call.
    pub async fn check_lasting(&self) -> Result<(), Violation> {
        walk(self.0.iter().filter(|b| b.lasting).cloned().collect()).await
    }

    /// Resolves when a directory passes its budget; never, when nothing is
    /// budgeted. Meant to race the call.
    pub async fn exceeded(&self) -> Violation {
        if self.0.is_empty() {
            return std::future::pending().await;
        }
        let mut walk = Duration::ZERO;
        loop {
            tokio::time::sleep(INTERVAL.max(walk * 10)).await;
            let started = Instant::now();
            if let Err(violation) = self.check().await {
                return violation;
            }
            walk = started.elapsed();
        }
    }
}

async fn walk(dirs: Vec<Budgeted>) -> Result<(), Violation> {
    if dirs.is_empty() {
        return Ok(());
    }
    tokio::task::spawn_blocking(move || over_budget(&dirs)).await.unwrap_or(Ok(()))
}

fn over_budget(dirs: &[Budgeted]) -> Result<(), Violation> {
    for dir in dirs {
        let used = usage(&dir.host);
        if used > dir.quota {
            return Err(Violation::Disk { guest: dir.guest.clone(), used, limit: dir.quota });
        }
    }
    Ok(())
}

/// Bytes the tree under `dir` takes: allocated blocks plus
/// [`ENTRY_COST`] per entry. Links are not followed; entries that vanish
/// during the walk are skipped.
pub fn usage(dir: &Path) -> u64 {
    let mut total = 0u64;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let Ok(meta) = entry.path().symlink_metadata() else { continue };
            total = total.saturating_add(meta.blocks() * 512 + ENTRY_COST);
            if meta.is_dir() {
                pending.push(entry.path());
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Empty files and nested directories are charged per entry; a sparse
    /// file only for what it holds.
    #[test]
    fn usage_counts_entries_and_allocated_blocks() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..10 {
            std::fs::write(dir.path().join(format!("empty-{i}")), "").unwrap();
        }
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        let base = usage(dir.path());
        assert!(base >= 12 * ENTRY_COST, "{base}");
        std::fs::File::create(dir.path().join("sparse")).unwrap().set_len(1 << 30).unwrap();
        std::fs::write(dir.path().join("a/b/full"), vec![1u8; 1 << 20]).unwrap();
        let after = usage(dir.path());
        assert!(after >= base + (1 << 20), "{after}");
        assert!(after < base + (2 << 20), "a sparse file counts only its blocks: {after}");
    }

    #[tokio::test]
    async fn the_first_directory_past_its_budget_is_named() {
        let (small, big) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        std::fs::write(big.path().join("data"), vec![1u8; 256 << 10]).unwrap();
        let mut budgets = DiskBudgets::default();
        budgets.add(small.path(), "/scratch", 64 << 10, false);
        budgets.add(big.path(), "/www", 64 << 10, true);
        match budgets.check().await {
            Err(Violation::Disk { guest, used, limit }) => assert_eq!((guest.as_str(), used >= 256 << 10, limit), ("/www", true, 64 << 10)),
            other => panic!("{other:?}"),
        }
        let Violation::Disk { guest, .. } = budgets.exceeded().await else { panic!() };
        assert_eq!(guest, "/www");
        let mut scratch_only = DiskBudgets::default();
        scratch_only.add(big.path(), "/scratch", 64 << 10, false);
        assert!(scratch_only.check_lasting().await.is_ok(), "a call's own scratch is not walked after it");
    }
}
