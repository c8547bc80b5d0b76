//! The embedded SQLite state store.
//!
//! One database file under the state directory, opened in WAL mode so that
//! CLI commands (approve, cancel, logs) in other processes can read and
//! write while the agent runs. `synchronous = NORMAL`: a committed
//! transaction survives the agent being killed at any moment (the case
//! resume is built for); after a power loss the last transactions may be
//! lost, and resume then re-runs the stages they recorded.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, Result};
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::*;

/// Schema changes in order: entry `i` takes a database at version `i` to
/// version `i + 1`, so an existing database is brought forward on open.
const MIGRATIONS: &[&str] = &[
    SCHEMA,
    // 2: stages answer commands (approvals accepted or refused).
    "ALTER TABLE commands ADD COLUMN verdict TEXT;
     ALTER TABLE commands ADD COLUMN reason TEXT NOT NULL DEFAULT '';",
    // 3: agents' heartbeats.
    "CREATE TABLE agents (
         id TEXT PRIMARY KEY,
         host TEXT NOT NULL,
         pid INTEGER NOT NULL,
         started_at INTEGER NOT NULL,
         beat_at INTEGER NOT NULL
     );",
];
const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Writes one metadata entry, host's or plugin's.
const METADATA_UPSERT: &str = "INSERT INTO metadata (deployment, stage, key, value) VALUES (?1, ?2, ?3, ?4)
     ON CONFLICT (deployment, stage, key) DO UPDATE SET value = excluded.value";

const SCHEMA: &str = r#"
CREATE TABLE applications (
    name TEXT PRIMARY KEY,
    dir TEXT NOT NULL,
    last_success TEXT,
    running_snapshot TEXT
);
CREATE TABLE deployments (
    id TEXT PRIMARY KEY,
    application TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT NOT NULL,
    trigger TEXT NOT NULL,
    plan TEXT NOT NULL,
    target_snapshot TEXT NOT NULL,
    running_snapshot TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    started_at INTEGER,
    finished_at INTEGER,
    seq INTEGER NOT NULL
);
CREATE INDEX deployments_app ON deployments (application, seq);
CREATE TABLE stages (
    deployment TEXT NOT NULL,
    id TEXT NOT NULL,
    ordinal INTEGER NOT NULL,
    name TEXT NOT NULL,
    desc TEXT NOT NULL,
    idx INTEGER NOT NULL,
    rollback INTEGER NOT NULL,
    options TEXT NOT NULL,
    needs TEXT NOT NULL,
    plugin TEXT NOT NULL,
    timeout_ms INTEGER NOT NULL,
    status TEXT NOT NULL,
    message TEXT NOT NULL,
    started_at INTEGER,
    finished_at INTEGER,
    attempts INTEGER NOT NULL,
    PRIMARY KEY (deployment, id)
);
CREATE TABLE logs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    deployment TEXT NOT NULL,
    stage TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    source TEXT NOT NULL,
    text TEXT NOT NULL
);
CREATE INDEX logs_deployment ON logs (deployment, stage, seq);
CREATE TABLE metadata (
    deployment TEXT NOT NULL,
    stage TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (deployment, stage, key)
);
CREATE TABLE blobs (
    application TEXT NOT NULL,
    plugin TEXT NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (application, plugin, key)
);
CREATE TABLE commands (
    id TEXT PRIMARY KEY,
    deployment TEXT NOT NULL,
    stage TEXT NOT NULL,
    kind TEXT NOT NULL,
    commander TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    seq INTEGER NOT NULL
);
CREATE INDEX commands_deployment ON commands (deployment, stage, seq);
"#;

/// The SQLite-backed [`StateStore`].
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let mut conn = Connection::open(path).with_context(|| format!("cannot open the state database {}", path.display()))?;
        conn.busy_timeout(Duration::from_secs(10))?;
        // Several processes (the agent, `cordon deploy`, `cordon approve`)
        // may open a new database at the same moment: switching to WAL can
        // report "busy" without waiting, so retry it; the schema is created
        // in an IMMEDIATE transaction, which waits for the write lock
        // instead of failing on a read-to-write upgrade.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get::<_, String>(0)) {
                Ok(_) => break,
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if e.code == rusqlite::ErrorCode::DatabaseBusy && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e).with_context(|| format!("cannot open the state database {}", path.display())),
            }
        }
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if !(0..=SCHEMA_VERSION).contains(&version) {
            anyhow::bail!(
                "the state database {} has schema version {version}, this cordon understands up to {SCHEMA_VERSION}; use a matching cordon release",
                path.display()
            );
        }
        for migration in &MIGRATIONS[version as usize..] {
            tx.execute_batch(migration).with_context(|| format!("cannot bring the state database {} up to date", path.display()))?;
        }
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        tx.commit()?;
        Ok(Self { conn: Mutex::new(conn) })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Upserts `(scope…, value)` with `upsert` if what `usage` counts of the
/// scope's other entries leaves room for `added` bytes under `quota`; one
/// IMMEDIATE transaction, so concurrent writers cannot both pass.
fn put_within(
    conn: &mut Connection,
    usage: &str,
    upsert: &str,
    scope: [&str; 3],
    value: &dyn rusqlite::ToSql,
    quota: Quota,
    added: u64,
) -> Result<bool> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let (entries, bytes): (i64, i64) = tx.query_row(usage, params![scope[0], scope[1], scope[2]], |r| Ok((r.get(0)?, r.get(1)?)))?;
    if !quota.admits(entries as u64, bytes as u64, added) {
        return Ok(false);
    }
    tx.execute(upsert, params![scope[0], scope[1], scope[2], value])?;
    tx.commit()?;
    Ok(true)
}

fn application_row(r: &Row<'_>) -> rusqlite::Result<ApplicationRecord> {
    Ok(ApplicationRecord { name: r.get(0)?, dir: r.get(1)?, last_success: r.get(2)?, running_snapshot: r.get(3)? })
}

fn deployment_row(r: &Row<'_>) -> rusqlite::Result<(DeploymentRecord, String)> {
    Ok((
        DeploymentRecord {
            id: r.get(0)?,
            application: r.get(1)?,
            status: DeploymentStatus::Queued,
            reason: r.get(3)?,
            trigger: r.get(4)?,
            plan: r.get(5)?,
            target_snapshot: r.get(6)?,
            running_snapshot: r.get(7)?,
            created_at: r.get(8)?,
            started_at: r.get(9)?,
            finished_at: r.get(10)?,
        },
        r.get(2)?,
    ))
}

const DEPLOYMENT_COLUMNS: &str = "id, application, status, reason, trigger, plan, target_snapshot, running_snapshot, created_at, started_at, finished_at";

fn finish_deployment((mut d, status): (DeploymentRecord, String)) -> Result<DeploymentRecord> {
    d.status = status.parse()?;
    Ok(d)
}

fn stage_row(r: &Row<'_>) -> rusqlite::Result<(StageRecord, String, String)> {
    Ok((
        StageRecord {
            deployment: r.get(0)?,
            id: r.get(1)?,
            ordinal: r.get(2)?,
            name: r.get(3)?,
            desc: r.get(4)?,
            index: r.get(5)?,
            rollback: r.get(6)?,
            options: r.get(7)?,
            needs: Vec::new(),
            plugin: r.get(9)?,
            timeout_ms: r.get(10)?,
            status: StageStatus::NotStarted,
            message: r.get(12)?,
            started_at: r.get(13)?,
            finished_at: r.get(14)?,
            attempts: r.get(15)?,
        },
        r.get(8)?,
        r.get(11)?,
    ))
}

fn command_row(r: &Row<'_>) -> rusqlite::Result<(CommandRecord, String)> {
    Ok((
        CommandRecord {
            id: r.get(0)?,
            deployment: r.get(1)?,
            stage: r.get(2)?,
            kind: CommandKind::Approve,
            commander: r.get(4)?,
            created_at: r.get(5)?,
            answer: match r.get::<_, Option<String>>(6)?.as_deref() {
                None => None,
                Some("accepted") => Some(Answer::Accepted),
                Some(_) => Some(Answer::Refused(r.get(7)?)),
            },
        },
        r.get(3)?,
    ))
}

impl StateStore for SqliteStore {
    fn upsert_application(&self, name: &str, dir: &str) -> Result<()> {
        self.conn().execute(
            "INSERT INTO applications (name, dir) VALUES (?1, ?2) ON CONFLICT (name) DO UPDATE SET dir = excluded.dir",
            params![name, dir],
        )?;
        Ok(())
    }

    fn application(&self, name: &str) -> Result<Option<ApplicationRecord>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT name, dir, last_success, running_snapshot FROM applications WHERE name = ?1",
                [name],
                application_row,
            )
            .optional()?)
    }

    fn applications(&self) -> Result<Vec<ApplicationRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT name, dir, last_success, running_snapshot FROM applications ORDER BY name")?;
        let rows = stmt.query_map([], application_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn insert_deployment(&self, d: &DeploymentRecord) -> Result<()> {
        self.conn().execute(
            "INSERT INTO deployments (id, application, status, reason, trigger, plan, target_snapshot, running_snapshot, created_at, started_at, finished_at, seq)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, (SELECT COALESCE(MAX(seq), 0) + 1 FROM deployments))",
            params![
                d.id, d.application, d.status.as_str(), d.reason, d.trigger, d.plan, d.target_snapshot, d.running_snapshot,
                d.created_at, d.started_at, d.finished_at
            ],
        )?;
        Ok(())
    }

    fn deployment(&self, id: &str) -> Result<Option<DeploymentRecord>> {
        let row = self
            .conn()
            .query_row(&format!("SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE id = ?1"), [id], deployment_row)
            .optional()?;
        row.map(finish_deployment).transpose()
    }

    fn deployments(&self, application: Option<&str>, limit: usize) -> Result<Vec<DeploymentRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE (?1 IS NULL OR application = ?1) ORDER BY seq DESC LIMIT ?2"
        ))?;
        let rows = stmt.query_map(params![application, limit as i64], deployment_row)?;
        rows.map(|r| finish_deployment(r?)).collect()
    }

    fn unfinished_deployments(&self) -> Result<Vec<DeploymentRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE status IN ('queued', 'running', 'rolling-back') ORDER BY seq"
        ))?;
        let rows = stmt.query_map([], deployment_row)?;
        rows.map(|r| finish_deployment(r?)).collect()
    }

    fn save_plan(&self, id: &str, plan: &str, running_snapshot: &str, stages: &[StageRecord], at: u64) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute("DELETE FROM stages WHERE deployment = ?1", [id])?;
        {
            let mut insert = tx.prepare(
                "INSERT INTO stages (deployment, id, ordinal, name, desc, idx, rollback, options, needs, plugin, timeout_ms, status, message, started_at, finished_at, attempts)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, '', NULL, NULL, 0)",
            )?;
            for s in stages {
                insert.execute(params![
                    id, s.id, s.ordinal, s.name, s.desc, s.index, s.rollback, s.options,
                    serde_json::to_string(&s.needs)?, s.plugin, s.timeout_ms as i64, s.status.as_str()
                ])?;
            }
        }
        tx.execute(
            "UPDATE deployments SET plan = ?2, running_snapshot = ?4, status = 'running', reason = '', started_at = COALESCE(started_at, ?3) WHERE id = ?1",
            params![id, plan, at, running_snapshot],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn set_deployment_status(&self, id: &str, status: DeploymentStatus, reason: &str, at: u64) -> Result<()> {
        let finished = status.is_final().then_some(at);
        self.conn().execute(
            "UPDATE deployments SET status = ?2, reason = ?3, finished_at = COALESCE(?4, finished_at),
             started_at = CASE WHEN ?2 IN ('running', 'rolling-back') THEN COALESCE(started_at, ?5) ELSE started_at END
             WHERE id = ?1",
            params![id, status.as_str(), reason, finished, at],
        )?;
        Ok(())
    }

    fn complete_success(&self, id: &str, reason: &str, at: u64) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "UPDATE deployments SET status = 'success', reason = ?2, finished_at = ?3 WHERE id = ?1",
            params![id, reason, at],
        )?;
        tx.execute(
            "UPDATE applications SET last_success = ?1,
             running_snapshot = (SELECT target_snapshot FROM deployments WHERE id = ?1)
             WHERE name = (SELECT application FROM deployments WHERE id = ?1)",
            [id],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn stages(&self, deployment: &str) -> Result<Vec<StageRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT deployment, id, ordinal, name, desc, idx, rollback, options, needs, plugin, timeout_ms, status, message, started_at, finished_at, attempts
             FROM stages WHERE deployment = ?1 ORDER BY ordinal",
        )?;
        let rows = stmt.query_map([deployment], stage_row)?;
        rows.map(|r| {
            let (mut s, needs, status) = r?;
            s.needs = serde_json::from_str(&needs)?;
            s.status = status.parse()?;
            Ok(s)
        })
        .collect()
    }

    fn start_stage(&self, deployment: &str, stage: &str, at: u64) -> Result<()> {
        let n = self.conn().execute(
            "UPDATE stages SET status = 'running', started_at = ?3, attempts = attempts + 1
             WHERE deployment = ?1 AND id = ?2 AND status = 'not-started'",
            params![deployment, stage, at],
        )?;
        anyhow::ensure!(n == 1, "stage {stage} of {deployment} was not waiting to start");
        Ok(())
    }

    fn transition_stage(&self, deployment: &str, stage: &str, from: &[StageStatus], to: StageStatus, message: &str, at: u64) -> Result<bool> {
        let from: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
        let finished = to.is_final().then_some(at);
        let n = self.conn().execute(
            "UPDATE stages SET status = ?3, message = ?4, finished_at = ?5
             WHERE deployment = ?1 AND id = ?2 AND status IN (SELECT value FROM json_each(?6))",
            params![deployment, stage, to.as_str(), message, finished, serde_json::to_string(&from)?],
        )?;
        Ok(n == 1)
    }

    fn reset_running_stages(&self, deployment: &str) -> Result<usize> {
        Ok(self.conn().execute(
            "UPDATE stages SET status = 'not-started' WHERE deployment = ?1 AND status = 'running'",
            [deployment],
        )?)
    }

    fn append_logs(&self, lines: &[LogRecord]) -> Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        {
            let mut insert =
                tx.prepare_cached("INSERT INTO logs (deployment, stage, at_ms, source, text) VALUES (?1, ?2, ?3, ?4, ?5)")?;
            for l in lines {
                insert.execute(params![l.deployment, l.stage, l.at_ms as i64, l.source, l.text])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn logs(&self, deployment: &str, stage: Option<&str>, after_seq: i64, limit: usize) -> Result<Vec<LogRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT seq, deployment, stage, at_ms, source, text FROM logs
             WHERE deployment = ?1 AND (?2 IS NULL OR stage = ?2) AND seq > ?3 ORDER BY seq LIMIT ?4",
        )?;
        let rows = stmt.query_map(params![deployment, stage, after_seq, limit as i64], |r| {
            Ok(LogRecord { seq: r.get(0)?, deployment: r.get(1)?, stage: r.get(2)?, at_ms: r.get(3)?, source: r.get(4)?, text: r.get(5)? })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn metadata_get(&self, deployment: &str, stage: &str, key: &str) -> Result<Option<String>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT value FROM metadata WHERE deployment = ?1 AND stage = ?2 AND key = ?3",
                params![deployment, stage, key],
                |r| r.get(0),
            )
            .optional()?)
    }

    fn metadata_put(&self, deployment: &str, stage: &str, key: &str, value: &str) -> Result<()> {
        self.conn().execute(
            METADATA_UPSERT,
            params![deployment, stage, key, value],
        )?;
        Ok(())
    }

    fn metadata_put_within(&self, deployment: &str, stage: &str, key: &str, value: &str, quota: Quota) -> Result<bool> {
        put_within(
            &mut self.conn(),
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(CAST(key AS BLOB)) + LENGTH(CAST(value AS BLOB))), 0) FROM metadata
             WHERE deployment = ?1 AND stage = ?2 AND key <> ?3",
            METADATA_UPSERT,
            [deployment, stage, key],
            &value,
            quota,
            (key.len() + value.len()) as u64,
        )
    }

    fn metadata_entries(&self, deployment: &str, stage: &str) -> Result<Vec<(String, String)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT key, value FROM metadata WHERE deployment = ?1 AND stage = ?2 ORDER BY key")?;
        let rows = stmt.query_map(params![deployment, stage], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn blob_get(&self, application: &str, plugin: &str, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT value FROM blobs WHERE application = ?1 AND plugin = ?2 AND key = ?3",
                params![application, plugin, key],
                |r| r.get(0),
            )
            .optional()?)
    }

    fn blob_put_within(&self, application: &str, plugin: &str, key: &str, value: &[u8], quota: Quota) -> Result<bool> {
        put_within(
            &mut self.conn(),
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(CAST(key AS BLOB)) + LENGTH(value)), 0) FROM blobs
             WHERE application = ?1 AND plugin = ?2 AND key <> ?3",
            "INSERT INTO blobs (application, plugin, key, value) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (application, plugin, key) DO UPDATE SET value = excluded.value",
            [application, plugin, key],
            &value,
            quota,
            (key.len() + value.len()) as u64,
        )
    }

    fn blob_delete(&self, application: &str, plugin: &str, key: &str) -> Result<()> {
        self.conn().execute(
            "DELETE FROM blobs WHERE application = ?1 AND plugin = ?2 AND key = ?3",
            params![application, plugin, key],
        )?;
        Ok(())
    }

    fn add_command(&self, c: &CommandRecord) -> Result<()> {
        self.conn().execute(
            "INSERT INTO commands (id, deployment, stage, kind, commander, created_at, seq)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, (SELECT COALESCE(MAX(seq), 0) + 1 FROM commands))",
            params![c.id, c.deployment, c.stage, c.kind.as_str(), c.commander, c.created_at],
        )?;
        Ok(())
    }

    fn heartbeat(&self, b: &AgentBeat) -> Result<()> {
        self.conn().execute(
            "INSERT INTO agents (id, host, pid, started_at, beat_at) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (id) DO UPDATE SET beat_at = excluded.beat_at",
            params![b.id, b.host, b.pid, b.started_at, b.beat_at],
        )?;
        Ok(())
    }

    fn agents(&self) -> Result<Vec<AgentBeat>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached("SELECT id, host, pid, started_at, beat_at FROM agents ORDER BY beat_at DESC")?;
        let rows = stmt.query_map([], |r| Ok(AgentBeat { id: r.get(0)?, host: r.get(1)?, pid: r.get(2)?, started_at: r.get(3)?, beat_at: r.get(4)? }))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn answer_command(&self, deployment: &str, stage: &str, id: &str, answer: &Answer) -> Result<()> {
        let (verdict, reason) = match answer {
            Answer::Accepted => ("accepted", ""),
            Answer::Refused(reason) => ("refused", reason.as_str()),
        };
        self.conn().execute(
            "UPDATE commands SET verdict = ?4, reason = ?5 WHERE id = ?3 AND deployment = ?1 AND stage = ?2 AND verdict IS NULL",
            params![deployment, stage, id, verdict, reason],
        )?;
        Ok(())
    }

    fn commands(&self, deployment: &str, stage: Option<&str>) -> Result<Vec<CommandRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT id, deployment, stage, kind, commander, created_at, verdict, reason FROM commands
             WHERE deployment = ?1 AND (?2 IS NULL OR stage = ?2) ORDER BY seq",
        )?;
        let rows = stmt.query_map(params![deployment, stage], command_row)?;
        rows.map(|r| {
            let (mut c, kind) = r?;
            c.kind = kind.parse()?;
            Ok(c)
        })
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(id: &str, ordinal: u32) -> StageRecord {
        StageRecord {
            deployment: "d1".into(),
            id: id.into(),
            ordinal,
            name: "WAIT".into(),
            desc: String::new(),
            index: ordinal,
            rollback: false,
            options: "{}".into(),
            needs: vec![],
            plugin: "wait".into(),
            timeout_ms: 1000,
            status: StageStatus::NotStarted,
            message: String::new(),
            started_at: None,
            finished_at: None,
            attempts: 0,
        }
    }

    /// A scope's quota counts its other entries plus the new one, so a
    /// key can be rewritten in place at the limit; a refused write leaves
    /// nothing behind.
    #[test]
    fn plugin_writes_stay_within_their_quota() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("state.db")).unwrap();
        let quota = Quota { entries: 2, bytes: 20 };
        assert!(store.metadata_put_within("d1", "s", "a", "12345678", quota).unwrap());
        assert!(store.metadata_put_within("d1", "s", "b", "1234567", quota).unwrap());
        assert!(!store.metadata_put_within("d1", "s", "c", "1", quota).unwrap(), "a third entry");
        assert!(store.metadata_put_within("d1", "s", "a", "123456789", quota).unwrap(), "rewriting within the bytes");
        assert!(!store.metadata_put_within("d1", "s", "a", "123456789012", quota).unwrap(), "passing the bytes");
        assert_eq!(store.metadata_get("d1", "s", "c").unwrap(), None);
        assert_eq!(store.metadata_get("d1", "s", "a").unwrap().as_deref(), Some("123456789"));
        assert!(store.metadata_put_within("d1", "other", "c", "1", quota).unwrap(), "another scope has its own quota");
        assert!(store.blob_put_within("app", "p", "k", &[0u8; 19], quota).unwrap());
        assert!(!store.blob_put_within("app", "p", "j", &[0u8; 1], quota).unwrap());
        assert!(store.blob_put_within("app", "q", "j", &[0u8; 1], quota).unwrap());
    }

    /// A stage answers only its own commands, once; a database made by the
    /// previous schema is brought forward on open with its commands intact.
    #[test]
    fn stages_answer_their_own_commands_once_and_old_databases_upgrade() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let old = Connection::open(&path).unwrap();
        old.execute_batch(SCHEMA).unwrap();
        old.pragma_update(None, "user_version", 1).unwrap();
        old.execute("INSERT INTO commands VALUES ('c0', 'd1', 's1', 'approve', 'alice', 1, 1)", []).unwrap();
        drop(old);

        let store = SqliteStore::open(&path).unwrap();
        let command = |id: &str| CommandRecord {
            id: id.into(),
            deployment: "d1".into(),
            stage: "s1".into(),
            kind: CommandKind::Approve,
            commander: "mallory".into(),
            created_at: 2,
            answer: None,
        };
        store.add_command(&command("c1")).unwrap();
        store.answer_command("d1", "s2", "c1", &Answer::Accepted).unwrap();
        store.answer_command("d1", "s1", "c1", &Answer::Refused("not an approver".into())).unwrap();
        store.answer_command("d1", "s1", "c1", &Answer::Accepted).unwrap();
        store.answer_command("d1", "s1", "c0", &Answer::Accepted).unwrap();
        let answers: Vec<_> = store.commands("d1", Some("s1")).unwrap().into_iter().map(|c| (c.id, c.answer)).collect();
        assert_eq!(
            answers,
            [("c0".to_string(), Some(Answer::Accepted)), ("c1".to_string(), Some(Answer::Refused("not an approver".into())))]
        );
        drop(store);
        SqliteStore::open(&path).unwrap().conn().pragma_update(None, "user_version", SCHEMA_VERSION + 1).unwrap();
        let err = SqliteStore::open(&path).err().unwrap().to_string();
        assert!(err.contains(&format!("schema version {}", SCHEMA_VERSION + 1)) && err.contains("matching cordon release"), "{err}");
    }

    #[test]
    fn many_processes_can_create_the_database_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let path = path.clone();
                std::thread::spawn(move || SqliteStore::open(&path).map(|s| s.applications().unwrap().len()))
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap().unwrap(), 0);
        }
    }

    #[test]
    fn a_stage_result_is_recorded_once_and_resume_resets_running_stages() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("state.db")).unwrap();
        store.upsert_application("app", "/apps/app").unwrap();
        let d = DeploymentRecord {
            id: "d1".into(),
            application: "app".into(),
            status: DeploymentStatus::Queued,
            reason: String::new(),
            trigger: "{}".into(),
            plan: String::new(),
            target_snapshot: "/snap/d1".into(),
            running_snapshot: String::new(),
            created_at: 1,
            started_at: None,
            finished_at: None,
        };
        store.insert_deployment(&d).unwrap();
        store.save_plan("d1", "{}", "", &[stage("s0", 0), stage("s1", 1)], 2).unwrap();
        store.start_stage("d1", "s0", 3).unwrap();
        assert!(store.transition_stage("d1", "s0", &[StageStatus::Running], StageStatus::Success, "", 4).unwrap());
        assert!(!store.transition_stage("d1", "s0", &[StageStatus::Running], StageStatus::Failure, "again", 5).unwrap(), "recorded twice");
        store.start_stage("d1", "s1", 6).unwrap();
        assert_eq!(store.reset_running_stages("d1").unwrap(), 1);
        let stages = store.stages("d1").unwrap();
        assert_eq!((stages[0].status, stages[1].status), (StageStatus::Success, StageStatus::NotStarted));
        assert_eq!(stages[1].attempts, 1);
        store.complete_success("d1", "", 7).unwrap();
        let app = store.application("app").unwrap().unwrap();
        assert_eq!(app.running_snapshot.as_deref(), Some("/snap/d1"));
        assert!(store.unfinished_deployments().unwrap().is_empty());
    }
}
