//! Retention: how much history is kept.
//!
//! Every deployment keeps its record, stages, logs, metadata, commands and
//! its source snapshot, so the state grows by one copy of the application
//! per deployment. With a retention of `keep` (the agent's or the server's
//! `retention: { keep-deployments: N }`), [`prune`] deletes an application's
//! finished deployments beyond its newest `keep` finished ones, with all of
//! that, and the snapshots nothing refers to any more. It never deletes an
//! unfinished deployment nor the application's last success: that one's
//! snapshot is the next deployment's `/running` and its rollback source.
//! Blobs (per application and plugin) and the audit log are not history of
//! one deployment and are never deleted.
//!
//! "Newest" is by deployment number (`app-12` after `app-9`), so the
//! newest deployment always stays and new deployments' numbers never
//! repeat a deleted one's.
//!
//! A snapshot directory (the embedded store's) is removed *before* its
//! record is deleted: killed in between, a finished deployment's record is
//! left without its source (which nothing reads) and the next prune deletes
//! it; the other way round a directory would be left that nothing names.

use std::num::NonZeroUsize;
use std::time::Duration;

use anyhow::Result;

use super::{Deleted, DeploymentRecord, StateStore};

/// How long a stored snapshot nothing refers to is spared: a command
/// queueing a deployment stores its snapshot first, then the record.
pub const SNAPSHOT_GRACE: Duration = Duration::from_secs(3600);

/// A deployment's number: `N` of `<application>-N`.
pub fn number(application: &str, id: &str) -> Option<u64> {
    id.strip_prefix(application)?.strip_prefix('-')?.parse().ok()
}

/// What retention would delete of one application now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Deployment ids, newest first.
    pub deployments: Vec<String>,
    /// Snapshot references only those deployments name.
    pub snapshots: Vec<String>,
}

/// What retention `keep` would delete of `application` (`cordon prune
/// --dry-run` shows it); reads only.
pub fn plan(store: &dyn StateStore, application: &str, keep: NonZeroUsize) -> Result<Plan> {
    let (go, snapshots) = doomed(store, application, keep)?;
    Ok(Plan { deployments: go.into_iter().map(|d| d.id).collect(), snapshots })
}

/// The finished deployments of `application` that retention `keep` lets
/// go, newest first, and the snapshot references only they name.
fn doomed(store: &dyn StateStore, application: &str, keep: NonZeroUsize) -> Result<(Vec<DeploymentRecord>, Vec<String>)> {
    let mut all = store.deployments(Some(application), usize::MAX)?;
    all.sort_by_key(|d| std::cmp::Reverse(number(application, &d.id)));
    let last_success = store.application(application)?.and_then(|a| a.last_success);
    let mut finished = 0;
    let (mut go, mut stay) = (Vec::new(), Vec::new());
    for d in all {
        if d.status.is_final() {
            finished += 1;
        }
        let spared = !d.status.is_final() || finished <= keep.get() || last_success.as_deref() == Some(d.id.as_str());
        if spared { stay.push(d) } else { go.push(d) }
    }
    // A snapshot is still needed as the source of a deployment kept, as
    // the running source an unfinished one rolls back to, or as the next
    // deployment's running source.
    let running = store.application(application)?.and_then(|a| a.running_snapshot);
    let named = |s: &String| {
        running.as_ref() == Some(s) || stay.iter().any(|d| d.target_snapshot == *s || (!d.status.is_final() && d.running_snapshot == *s))
    };
    let mut only_theirs: Vec<String> = go.iter().map(|d| d.target_snapshot.clone()).filter(|s| !s.is_empty() && !named(s)).collect();
    only_theirs.sort();
    only_theirs.dedup();
    Ok((go, only_theirs))
}

/// Applies retention `keep` to `application`: `remove` is called with each
/// snapshot reference that only deleted deployments name (a directory on
/// the embedded store; a stored one is deleted by the store itself) before
/// the records go. Answers what was deleted.
pub fn prune(store: &dyn StateStore, application: &str, keep: NonZeroUsize, mut remove: impl FnMut(&str) -> Result<()>) -> Result<Deleted> {
    let plan = plan(store, application, keep)?;
    for reference in plan.snapshots.iter().filter(|r| !r.starts_with(crate::STORED_SNAPSHOT)) {
        remove(reference)?;
    }
    store.delete_deployments(application, &plan.deployments, SNAPSHOT_GRACE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_read_after_the_application_name() {
        assert_eq!(number("site", "site-12"), Some(12));
        assert_eq!(number("site", "site-a-1"), None);
        assert_eq!(number("site-a", "site-a-1"), Some(1));
        assert_eq!(number("site", "other-1"), None);
    }
}
