//! Retention on this machine: the store's [`cordon_store::retention`] with
//! the snapshot directories it names removed here. A directory is moved
//! into a staging directory before it is removed, so one half-removed by
//! a killed command is swept, never left half there under its name.

use std::num::NonZeroUsize;
use std::path::Path;

use anyhow::{Context, Result};
use cordon_store::lock::{Staging, staging};
use cordon_store::{Deleted, StateStore};

use crate::{Host, snapshot};

/// Applies retention `keep` to `application`: its finished deployments
/// beyond the newest `keep` go, with their snapshot directories under
/// `snapshots` and this machine's copies of the stored snapshots deleted
/// (`None`: a server's state, which names no directory of this machine).
pub fn prune(store: &dyn StateStore, snapshots: Option<&Path>, application: &str, keep: NonZeroUsize) -> Result<Deleted> {
    let Some(snapshots) = snapshots else { return cordon_store::retention::prune(store, application, keep, |_| Ok(())) };
    let deleted = cordon_store::retention::prune(store, application, keep, |reference| remove(snapshots, Path::new(reference)))?;
    for reference in &deleted.snapshots {
        if let Some(copy) = snapshot::cached(reference, snapshots) {
            remove(snapshots, &copy)?;
        }
    }
    Ok(deleted)
}

/// Retention after deployment `id` finished, on the agent: what went is
/// logged; a failure is logged too and does not stop the agent (the next
/// deployment tries again).
pub fn after(host: &Host, id: &str, keep: NonZeroUsize) {
    let pruned = host
        .store
        .deployment(id)
        .and_then(|d| d.map(|d| prune(host.store.as_ref(), Some(&host.snapshots_dir()), &d.application, keep).map(|gone| (d.application, gone))).transpose());
    match pruned {
        Ok(Some((application, gone))) if !gone.deployments.is_empty() || !gone.snapshots.is_empty() => tracing::info!(
            "retention (keep {keep}): deleted {} deployment(s) of {application} ({}) and {} stored snapshot(s)",
            gone.deployments.len(),
            gone.deployments.join(", "),
            gone.snapshots.len()
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!("retention after {id}: {e:#}"),
    }
}

/// Removes snapshot directory `dir`, and its source lock, if it is one of
/// `snapshots` (a record naming a directory elsewhere is left alone).
fn remove(snapshots: &Path, dir: &Path) -> Result<()> {
    if dir.parent() != Some(snapshots) {
        return Ok(());
    }
    let gone = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
    if dir.symlink_metadata().is_ok() {
        let bin = Staging::new(snapshots, staging::PRUNED)?;
        match std::fs::rename(dir, bin.path().join("tree")) {
            // Another prune took it first.
            Err(e) if !gone(&e) => return Err(e).with_context(|| format!("cannot remove the snapshot {}", dir.display())),
            _ => {}
        }
    }
    match std::fs::remove_file(snapshot::SourceLock::of(dir).path()) {
        Err(e) if !gone(&e) => Err(e).with_context(|| format!("cannot remove the lock of {}", dir.display())),
        _ => Ok(()),
    }
}
