//! Host services of a pipeline stage, backed by the state store: the stage
//! log, metadata scoped to the stage and the deployment, blobs scoped to
//! the application and plugin, and commands addressed to the stage.

use std::sync::Arc;

use cordon_runtime::sandbox::output::{LogSink, Source};
use cordon_runtime::sandbox::services::{CommandKind, MetaScope, Quota, StageCommand, StageServices};
use cordon_store::{self as store, Fence, LogRecord, StateStore, now_ms};

/// Writes log lines of one stage (or, with an empty stage, of planning)
/// into the store as they arrive, so `cordon logs --follow` streams them.
pub struct StoreLog {
    pub store: Arc<dyn StateStore>,
    /// The lease the lines are written under.
    pub fence: Fence,
    pub stage: String,
}

impl StoreLog {
    fn record(&self, source: Source, text: &str) -> LogRecord {
        LogRecord {
            seq: 0,
            deployment: self.fence.deployment.clone(),
            stage: self.stage.clone(),
            at_ms: now_ms(),
            source: source.to_string(),
            text: text.to_string(),
        }
    }

    fn store(&self, records: &[LogRecord]) {
        if let Err(e) = self.store.append_logs(&self.fence, records) {
            tracing::error!("cannot store {} log line(s) of {}/{}: {e:#}", records.len(), self.fence.deployment, self.stage);
        }
    }
}

impl LogSink for StoreLog {
    fn line(&self, source: Source, text: &str) {
        self.store(&[self.record(source, text)]);
    }

    /// One transaction for all the lines of one write.
    fn lines(&self, lines: &[(Source, String)]) {
        if !lines.is_empty() {
            self.store(&lines.iter().map(|(source, text)| self.record(*source, text)).collect::<Vec<_>>());
        }
    }
}

fn store_quota(quota: Quota) -> store::Quota {
    store::Quota { entries: quota.entries, bytes: quota.bytes }
}

/// Metadata, blobs and commands of one stage run.
pub struct StoreServices {
    pub store: Arc<dyn StateStore>,
    /// The lease the stage's writes carry.
    pub fence: Fence,
    pub stage: String,
    pub application: String,
    pub plugin: String,
}

impl StoreServices {
    fn scope(&self, scope: MetaScope) -> &str {
        match scope {
            MetaScope::Stage => &self.stage,
            MetaScope::Deployment => "",
        }
    }
}

impl StageServices for StoreServices {
    fn metadata_get(&self, scope: MetaScope, key: &str) -> anyhow::Result<Option<String>> {
        self.store.metadata_get(&self.fence.deployment, self.scope(scope), key)
    }
    fn metadata_put(&self, scope: MetaScope, key: &str, value: &str, quota: Quota) -> anyhow::Result<bool> {
        self.store.metadata_put_within(&self.fence, self.scope(scope), key, value, store_quota(quota))
    }
    fn metadata_entries(&self, scope: MetaScope) -> anyhow::Result<Vec<(String, String)>> {
        self.store.metadata_entries(&self.fence.deployment, self.scope(scope))
    }
    fn commands(&self) -> anyhow::Result<Vec<StageCommand>> {
        Ok(self
            .store
            .commands(&self.fence.deployment, Some(&self.stage))?
            .into_iter()
            .filter_map(|c| {
                let kind = match c.kind {
                    store::CommandKind::Approve => CommandKind::Approve,
                    store::CommandKind::Skip => CommandKind::Skip,
                    store::CommandKind::Cancel | store::CommandKind::DebugContinue | store::CommandKind::DebugFailContinue => return None,
                };
                Some(StageCommand { id: c.id, kind, commander: c.commander, created_at: c.created_at })
            })
            .collect())
    }
    fn answer_command(&self, id: &str, verdict: Result<(), String>) -> anyhow::Result<()> {
        let answer = verdict.map_or_else(store::Answer::Refused, |()| store::Answer::Accepted);
        self.store.answer_command(&self.fence, &self.stage, id, &answer)
    }
    fn blob_get(&self, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        self.store.blob_get(&self.application, &self.plugin, key)
    }
    fn blob_put(&self, key: &str, value: &[u8], quota: Quota) -> anyhow::Result<bool> {
        self.store.blob_put_within(&self.fence, &self.application, &self.plugin, key, value, store_quota(quota))
    }
    fn blob_delete(&self, key: &str) -> anyhow::Result<()> {
        self.store.blob_delete(&self.fence, &self.application, &self.plugin, key)
    }
}
