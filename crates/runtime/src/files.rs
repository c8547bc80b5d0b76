//! Files written so that a reader (or a crash) sees the old content or the
//! new, never a mix: compile-cache entries, signatures, pinned agent configs.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

/// Writes `data` to `path` atomically: a temp file in the same directory,
/// synced, then renamed over the target. A file that exists keeps its
/// permissions (the temp file alone would make it 0600).
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().context("path has no parent directory")?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    if let Ok(existing) = std::fs::metadata(path) {
        tmp.as_file().set_permissions(existing.permissions())?;
    }
    tmp.write_all(data)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)?;
    Ok(())
}
