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
    // 4: leases (who runs a deployment, until when, and its fencing epoch).
    "ALTER TABLE deployments ADD COLUMN lease_owner TEXT;
     ALTER TABLE deployments ADD COLUMN lease_epoch INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE deployments ADD COLUMN lease_until INTEGER;
     CREATE TABLE refused_writes (
         deployment TEXT NOT NULL,
         epoch INTEGER NOT NULL,
         write TEXT NOT NULL,
         at INTEGER NOT NULL,
         PRIMARY KEY (deployment, epoch, write)
     );",
    // 5: what a deployment needs of its agent, and what each agent offers.
    "ALTER TABLE deployments ADD COLUMN requires TEXT NOT NULL DEFAULT '{}';
     ALTER TABLE agents ADD COLUMN name TEXT NOT NULL DEFAULT '';
     ALTER TABLE agents ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';
     ALTER TABLE agents ADD COLUMN stages TEXT NOT NULL DEFAULT '[]';
     ALTER TABLE agents ADD COLUMN plugins TEXT NOT NULL DEFAULT '[]';",
    // 6: snapshots kept in the store, by digest.
    "CREATE TABLE snapshots (digest TEXT PRIMARY KEY, archive BLOB NOT NULL);",
    // 7: the server's tokens and its append-only audit log.
    "CREATE TABLE tokens (
         id TEXT PRIMARY KEY,
         hash TEXT NOT NULL,
         subject TEXT NOT NULL,
         role TEXT NOT NULL,
         applications TEXT NOT NULL,
         created_at INTEGER NOT NULL,
         created_by TEXT NOT NULL,
         expires_at INTEGER,
         revoked_at INTEGER
     );
     CREATE TABLE audit (
         seq INTEGER PRIMARY KEY AUTOINCREMENT,
         at INTEGER NOT NULL,
         subject TEXT NOT NULL,
         action TEXT NOT NULL,
         target TEXT NOT NULL,
         client TEXT NOT NULL,
         outcome TEXT NOT NULL
     );
     CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
     CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;",
    // 8: when a snapshot was last stored (retention spares young ones).
    "ALTER TABLE snapshots ADD COLUMN stored_at INTEGER NOT NULL DEFAULT 0;",
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

    /// Runs `write` (the store method `what`) in one IMMEDIATE transaction
    /// after checking that `fence` is still the deployment's lease: the
    /// check and the write cannot be separated by another agent's claim. A
    /// refused write is recorded (in its own transaction).
    fn fenced<T>(&self, fence: &Fence, what: &str, write: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T>) -> Result<T> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let epoch: Option<i64> =
            tx.query_row("SELECT lease_epoch FROM deployments WHERE id = ?1", [&fence.deployment], |r| r.get(0)).optional()?;
        match epoch {
            None => anyhow::bail!("no deployment `{}`", fence.deployment),
            Some(epoch) if epoch != fence.epoch => {
                drop(tx);
                record_refusal(&conn, fence, what)?;
                return Err(Fenced(fence.clone()).into());
            }
            Some(_) => {}
        }
        let out = write(&tx)?;
        tx.commit()?;
        Ok(out)
    }
}

fn record_refusal(conn: &Connection, fence: &Fence, what: &str) -> Result<()> {
    conn.execute(
        "INSERT OR IGNORE INTO refused_writes (deployment, epoch, write, at) VALUES (?1, ?2, ?3, ?4)",
        params![fence.deployment, fence.epoch, what, now_ms() as i64],
    )?;
    Ok(())
}

/// Upserts `(scope…, value)` with `upsert` if what `usage` counts of the
/// scope's other entries leaves room for `added` bytes under `quota`; in
/// the caller's IMMEDIATE transaction, so concurrent writers cannot both pass.
fn put_within(
    tx: &rusqlite::Transaction<'_>,
    usage: &str,
    upsert: &str,
    scope: [&str; 3],
    value: &dyn rusqlite::ToSql,
    quota: Quota,
    added: u64,
) -> Result<bool> {
    let (entries, bytes): (i64, i64) = tx.query_row(usage, params![scope[0], scope[1], scope[2]], |r| Ok((r.get(0)?, r.get(1)?)))?;
    if !quota.admits(entries as u64, bytes as u64, added) {
        return Ok(false);
    }
    tx.execute(upsert, params![scope[0], scope[1], scope[2], value])?;
    Ok(true)
}

fn application_row(r: &Row<'_>) -> rusqlite::Result<ApplicationRecord> {
    Ok(ApplicationRecord { name: r.get(0)?, dir: r.get(1)?, last_success: r.get(2)?, running_snapshot: r.get(3)? })
}

fn deployment_row(r: &Row<'_>) -> rusqlite::Result<(DeploymentRecord, String, String)> {
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
            requires: Requirements::default(),
            created_at: r.get(8)?,
            started_at: r.get(9)?,
            finished_at: r.get(10)?,
        },
        r.get(2)?,
        r.get(11)?,
    ))
}

fn finish_deployment((mut d, status, requires): (DeploymentRecord, String, String)) -> Result<DeploymentRecord> {
    d.status = status.parse()?;
    d.requires = from_json_column("deployment requirements", &requires)?;
    Ok(d)
}

fn agent_row(r: &Row<'_>) -> rusqlite::Result<(AgentBeat, [String; 3])> {
    let beat = AgentBeat { id: r.get(0)?, name: r.get(1)?, host: r.get(2)?, pid: r.get(3)?, started_at: r.get(4)?, beat_at: r.get(5)?, ..Default::default() };
    Ok((beat, [r.get(6)?, r.get(7)?, r.get(8)?]))
}

fn finish_agent((mut beat, [labels, stages, plugins]): (AgentBeat, [String; 3])) -> Result<AgentBeat> {
    beat.labels = from_json_column("agent labels", &labels)?;
    beat.stages = from_json_column("agent stages", &stages)?;
    beat.plugins = from_json_column("agent plugins", &plugins)?;
    Ok(beat)
}

fn token_row(r: &Row<'_>) -> rusqlite::Result<(TokenRecord, String)> {
    let token = TokenRecord {
        id: r.get(0)?,
        hash: r.get(1)?,
        subject: r.get(2)?,
        role: r.get(3)?,
        applications: Vec::new(),
        created_at: r.get(5)?,
        created_by: r.get(6)?,
        expires_at: r.get(7)?,
        revoked_at: r.get(8)?,
    };
    Ok((token, r.get(4)?))
}

fn finish_token((mut token, applications): (TokenRecord, String)) -> Result<TokenRecord> {
    token.applications = from_json_column("token applications", &applications)?;
    Ok(token)
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
            answer: Answer::from_columns(r.get::<_, Option<String>>(6)?.as_deref(), r.get(7)?),
        },
        r.get(3)?,
    ))
}

impl StateStore for SqliteStore {
    fn describe(&self) -> String {
        self.conn().path().map_or_else(|| "the embedded state database".to_string(), |p| p.to_string())
    }

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
            "INSERT INTO deployments (id, application, status, reason, trigger, plan, target_snapshot, running_snapshot, created_at, started_at, finished_at, requires, seq)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, (SELECT COALESCE(MAX(seq), 0) + 1 FROM deployments))",
            params![
                d.id, d.application, d.status.as_str(), d.reason, d.trigger, d.plan, d.target_snapshot, d.running_snapshot,
                d.created_at, d.started_at, d.finished_at, json_column(&d.requires)
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

    fn save_plan(&self, fence: &Fence, plan: &str, running_snapshot: &str, stages: &[StageRecord], at: u64) -> Result<()> {
        let id = fence.deployment.as_str();
        self.fenced(fence, "save_plan", |tx| {
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
            Ok(())
        })
    }

    fn set_deployment_status(&self, fence: &Fence, status: DeploymentStatus, reason: &str, at: u64) -> Result<()> {
        let finished = status.is_final().then_some(at);
        let id = fence.deployment.as_str();
        self.fenced(fence, "set_deployment_status", |tx| {
            tx.execute(
                "UPDATE deployments SET status = ?2, reason = ?3, finished_at = COALESCE(?4, finished_at),
                 started_at = CASE WHEN ?2 IN ('running', 'rolling-back') THEN COALESCE(started_at, ?5) ELSE started_at END
                 WHERE id = ?1",
                params![id, status.as_str(), text(reason), finished, at],
            )?;
            Ok(())
        })
    }

    fn complete_success(&self, fence: &Fence, reason: &str, at: u64) -> Result<()> {
        let id = fence.deployment.as_str();
        self.fenced(fence, "complete_success", |tx| {
            tx.execute(
                "UPDATE deployments SET status = 'success', reason = ?2, finished_at = ?3 WHERE id = ?1",
                params![id, text(reason), at],
            )?;
            tx.execute(
                "UPDATE applications SET last_success = ?1,
                 running_snapshot = (SELECT target_snapshot FROM deployments WHERE id = ?1)
                 WHERE name = (SELECT application FROM deployments WHERE id = ?1)",
                [id],
            )?;
            Ok(())
        })
    }

    fn claimable(&self) -> Result<Vec<DeploymentRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {DEPLOYMENT_COLUMNS} FROM deployments d WHERE {HEAD_OF_APPLICATION}
             AND (lease_until IS NULL OR lease_until < ?1) ORDER BY seq"
        ))?;
        let rows = stmt.query_map([now_ms() as i64], deployment_row)?;
        rows.map(|r| finish_deployment(r?)).collect()
    }

    fn claim(&self, deployment: &str, agent: &str, ttl: Duration) -> Result<Option<Fence>> {
        let now = now_ms() as i64;
        let epoch = self
            .conn()
            .query_row(
                &format!(
                    "UPDATE deployments SET lease_owner = ?2, lease_epoch = lease_epoch + 1, lease_until = ?3 + ?4
                     WHERE id = ?1 AND (lease_until IS NULL OR lease_until < ?3)
                     AND id IN (SELECT id FROM deployments d WHERE {HEAD_OF_APPLICATION})
                     RETURNING lease_epoch"
                ),
                params![deployment, agent, now, ttl.as_millis() as i64],
                |r| r.get(0),
            )
            .optional()?;
        Ok(epoch.map(|epoch| Fence { deployment: deployment.to_string(), epoch }))
    }

    fn renew(&self, agent: &str, fences: &[Fence], ttl: Duration) -> Result<Vec<Fence>> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut lost = Vec::new();
        for fence in fences {
            let n = tx.execute(
                "UPDATE deployments SET lease_until = ?4 WHERE id = ?1 AND lease_epoch = ?2 AND lease_owner = ?3",
                params![fence.deployment, fence.epoch, agent, (now_ms() + ttl.as_millis() as u64) as i64],
            )?;
            if n == 0 {
                lost.push(fence.clone());
            }
        }
        tx.commit()?;
        for fence in &lost {
            record_refusal(&conn, fence, "renew")?;
        }
        Ok(lost)
    }

    fn release(&self, fence: &Fence) -> Result<()> {
        self.conn().execute("UPDATE deployments SET lease_until = NULL WHERE id = ?1 AND lease_epoch = ?2", params![fence.deployment, fence.epoch])?;
        Ok(())
    }

    fn expire_leases(&self) -> Result<usize> {
        Ok(self.conn().execute("UPDATE deployments SET lease_until = NULL WHERE lease_until IS NOT NULL", [])?)
    }

    fn refused_writes(&self, deployment: &str) -> Result<Vec<RefusedWrite>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT epoch, write, at FROM refused_writes WHERE deployment = ?1 ORDER BY rowid")?;
        let rows = stmt.query_map([deployment], |r| Ok(RefusedWrite { epoch: r.get(0)?, write: r.get(1)?, at: r.get(2)? }))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn lease(&self, deployment: &str) -> Result<Option<(Fence, Option<String>)>> {
        Ok(self
            .conn()
            .query_row("SELECT lease_epoch, lease_owner FROM deployments WHERE id = ?1", [deployment], |r| {
                Ok((Fence { deployment: deployment.to_string(), epoch: r.get(0)? }, r.get(1)?))
            })
            .optional()?)
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

    fn start_stage(&self, fence: &Fence, stage: &str, at: u64) -> Result<()> {
        let deployment = fence.deployment.as_str();
        let n = self.fenced(fence, "start_stage", |tx| Ok(tx.execute(
            "UPDATE stages SET status = 'running', started_at = ?3, attempts = attempts + 1
             WHERE deployment = ?1 AND id = ?2 AND status = 'not-started'",
            params![deployment, stage, at],
        )?))?;
        anyhow::ensure!(n == 1, "stage {stage} of {deployment} was not waiting to start");
        Ok(())
    }

    fn transition_stage(&self, fence: &Fence, stage: &str, from: &[StageStatus], to: StageStatus, message: &str, at: u64) -> Result<bool> {
        let from: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
        let finished = to.is_final().then_some(at);
        let deployment = fence.deployment.as_str();
        let n = self.fenced(fence, "transition_stage", |tx| Ok(tx.execute(
            "UPDATE stages SET status = ?3, message = ?4, finished_at = ?5
             WHERE deployment = ?1 AND id = ?2 AND status IN (SELECT value FROM json_each(?6))",
            params![deployment, stage, to.as_str(), text(message), finished, serde_json::to_string(&from)?],
        )?))?;
        Ok(n == 1)
    }

    fn reset_running_stages(&self, fence: &Fence) -> Result<usize> {
        self.fenced(fence, "reset_running_stages", |tx| {
            Ok(tx.execute("UPDATE stages SET status = 'not-started' WHERE deployment = ?1 AND status = 'running'", [&fence.deployment])?)
        })
    }

    fn append_logs(&self, fence: &Fence, lines: &[LogRecord]) -> Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        self.fenced(fence, "append_logs", |tx| {
            let mut insert =
                tx.prepare_cached("INSERT INTO logs (deployment, stage, at_ms, source, text) VALUES (?1, ?2, ?3, ?4, ?5)")?;
            for l in lines {
                insert.execute(params![fence.deployment, l.stage, l.at_ms as i64, l.source, text(&l.text)])?;
            }
            Ok(())
        })
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

    fn metadata_put(&self, fence: &Fence, stage: &str, key: &str, value: &str) -> Result<()> {
        self.fenced(fence, "metadata_put", |tx| {
            tx.execute(METADATA_UPSERT, params![fence.deployment, stage, exact("metadata key", key)?, exact("metadata value", value)?])?;
            Ok(())
        })
    }

    fn metadata_put_within(&self, fence: &Fence, stage: &str, key: &str, value: &str, quota: Quota) -> Result<bool> {
        let deployment = fence.deployment.as_str();
        let (key, value) = (exact("metadata key", key)?, exact("metadata value", value)?);
        self.fenced(fence, "metadata_put_within", |tx| put_within(
            tx,
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(CAST(key AS BLOB)) + LENGTH(CAST(value AS BLOB))), 0) FROM metadata
             WHERE deployment = ?1 AND stage = ?2 AND key <> ?3",
            METADATA_UPSERT,
            [deployment, stage, key],
            &value,
            quota,
            (key.len() + value.len()) as u64,
        ))
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

    fn blob_put_within(&self, fence: &Fence, application: &str, plugin: &str, key: &str, value: &[u8], quota: Quota) -> Result<bool> {
        let key = exact("blob key", key)?;
        self.fenced(fence, "blob_put_within", |tx| put_within(
            tx,
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(CAST(key AS BLOB)) + LENGTH(value)), 0) FROM blobs
             WHERE application = ?1 AND plugin = ?2 AND key <> ?3",
            "INSERT INTO blobs (application, plugin, key, value) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (application, plugin, key) DO UPDATE SET value = excluded.value",
            [application, plugin, key],
            &value,
            quota,
            (key.len() + value.len()) as u64,
        ))
    }

    fn blob_delete(&self, fence: &Fence, application: &str, plugin: &str, key: &str) -> Result<()> {
        self.fenced(fence, "blob_delete", |tx| {
            tx.execute("DELETE FROM blobs WHERE application = ?1 AND plugin = ?2 AND key = ?3", params![application, plugin, key])?;
            Ok(())
        })
    }

    fn add_command(&self, c: &CommandRecord) -> Result<()> {
        self.conn().execute(
            "INSERT INTO commands (id, deployment, stage, kind, commander, created_at, seq)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, (SELECT COALESCE(MAX(seq), 0) + 1 FROM commands))",
            params![c.id, c.deployment, c.stage, c.kind.as_str(), c.commander, c.created_at],
        )?;
        Ok(())
    }

    fn replace_target_snapshot(&self, deployment: &str, from: &str, to: &str) -> Result<bool> {
        let changed = self.conn().execute(
            "UPDATE deployments SET target_snapshot = ?3 WHERE id = ?1 AND target_snapshot = ?2
             AND EXISTS (SELECT 1 FROM stages WHERE deployment = ?1 AND status = 'paused')",
            params![deployment, from, to],
        )?;
        Ok(changed == 1)
    }

    fn snapshot_put(&self, reference: &str, archive: &[u8]) -> Result<()> {
        self.conn().execute(
            "INSERT INTO snapshots (digest, archive, stored_at) VALUES (?1, ?2, ?3) ON CONFLICT (digest) DO UPDATE SET stored_at = excluded.stored_at",
            params![reference, archive, now_ms() as i64],
        )?;
        Ok(())
    }

    fn delete_deployments(&self, application: &str, ids: &[String], grace: Duration) -> Result<Deleted> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut deleted = Deleted::default();
        for id in ids {
            if tx.execute(&format!("DELETE FROM deployments WHERE {}", deletable("?1", "?2")), params![id, application])? == 1 {
                for table in PER_DEPLOYMENT {
                    tx.execute(&format!("DELETE FROM {table} WHERE deployment = ?1"), [id])?;
                }
                deleted.deployments.push(id.clone());
            }
        }
        let before = now_ms().saturating_sub(u64::try_from(grace.as_millis()).unwrap_or(u64::MAX)) as i64;
        deleted.snapshots = tx.prepare(&unreferenced_snapshots("?1"))?.query_map([before], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
        for digest in &deleted.snapshots {
            tx.execute("DELETE FROM snapshots WHERE digest = ?1", [digest])?;
        }
        tx.commit()?;
        Ok(deleted)
    }

    fn snapshot_get(&self, reference: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.conn().query_row("SELECT archive FROM snapshots WHERE digest = ?1", [reference], |r| r.get(0)).optional()?)
    }

    fn heartbeat(&self, b: &AgentBeat) -> Result<()> {
        self.conn().execute(
            &format!(
                "INSERT INTO agents ({AGENT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT (id) DO UPDATE SET beat_at = excluded.beat_at, name = excluded.name, labels = excluded.labels,
                     stages = excluded.stages, plugins = excluded.plugins"
            ),
            params![b.id, b.name, b.host, b.pid, b.started_at, b.beat_at, json_column(&b.labels), json_column(&b.stages), json_column(&b.plugins)],
        )?;
        Ok(())
    }

    fn agents(&self) -> Result<Vec<AgentBeat>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!("SELECT {AGENT_COLUMNS} FROM agents ORDER BY beat_at DESC"))?;
        let rows = stmt.query_map([], agent_row)?;
        rows.map(|r| finish_agent(r?)).collect()
    }

    fn token_insert(&self, t: &TokenRecord) -> Result<()> {
        self.conn().execute(
            &format!("INSERT INTO tokens ({TOKEN_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"),
            params![t.id, t.hash, t.subject, t.role, json_column(&t.applications), t.created_at, t.created_by, t.expires_at, t.revoked_at],
        )?;
        Ok(())
    }

    fn token(&self, id: &str) -> Result<Option<TokenRecord>> {
        let conn = self.conn();
        let row = conn.query_row(&format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE id = ?1"), [id], token_row).optional()?;
        row.map(finish_token).transpose()
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!("SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY created_at, id"))?;
        let rows = stmt.query_map([], token_row)?;
        rows.map(|r| finish_token(r?)).collect()
    }

    fn token_revoke(&self, id: &str, at: u64) -> Result<bool> {
        let n = self.conn().execute("UPDATE tokens SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL", params![id, at])?;
        Ok(n == 1)
    }

    fn audit_append(&self, e: &AuditRecord) -> Result<()> {
        self.conn().execute(
            "INSERT INTO audit (at, subject, action, target, client, outcome) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![e.at, text(&e.subject), text(&e.action), text(&e.target), text(&e.client), text(&e.outcome)],
        )?;
        Ok(())
    }

    fn audit(&self, after_seq: i64, limit: usize) -> Result<Vec<AuditRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!("SELECT {AUDIT_COLUMNS} FROM audit WHERE seq > ?1 ORDER BY seq LIMIT ?2"))?;
        let rows = stmt.query_map(params![after_seq, limit as i64], |r| {
            Ok(AuditRecord { seq: r.get(0)?, at: r.get(1)?, subject: r.get(2)?, action: r.get(3)?, target: r.get(4)?, client: r.get(5)?, outcome: r.get(6)? })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn answer_command(&self, fence: &Fence, stage: &str, id: &str, answer: &Answer) -> Result<()> {
        let (verdict, reason) = answer.columns();
        self.fenced(fence, "answer_command", |tx| {
            tx.execute(
                "UPDATE commands SET verdict = ?4, reason = ?5 WHERE id = ?3 AND deployment = ?1 AND stage = ?2 AND verdict IS NULL",
                params![fence.deployment, stage, id, verdict, text(reason)],
            )?;
            Ok(())
        })
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

    /// A database made by the first schema is brought forward on open with
    /// its rows intact; a newer one is refused by name.
    #[test]
    fn old_databases_upgrade_and_newer_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let old = Connection::open(&path).unwrap();
        old.execute_batch(SCHEMA).unwrap();
        old.pragma_update(None, "user_version", 1).unwrap();
        old.execute("INSERT INTO commands VALUES ('c0', 'd1', 's1', 'approve', 'alice', 1, 1)", []).unwrap();
        old.execute("INSERT INTO deployments VALUES ('d1', 'app', 'running', '', '{}', '{}', '/s', '', 1, 2, NULL, 1)", []).unwrap();
        drop(old);

        let store = SqliteStore::open(&path).unwrap();
        let fence = store.claim("d1", "agent", Duration::from_secs(5)).unwrap().expect("an old deployment is claimable");
        store.answer_command(&fence, "s1", "c0", &Answer::Accepted).unwrap();
        assert_eq!(store.commands("d1", None).unwrap()[0].answer, Some(Answer::Accepted));
        drop(store);
        SqliteStore::open(&path).unwrap().conn().pragma_update(None, "user_version", SCHEMA_VERSION + 1).unwrap();
        let err = SqliteStore::open(&path).err().unwrap().to_string();
        assert!(err.contains(&format!("schema version {}", SCHEMA_VERSION + 1)) && err.contains("matching cordon release"), "{err}");
    }

    /// The audit log cannot be edited or shortened, even with SQL.
    #[test]
    fn the_audit_log_is_append_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("state.db")).unwrap();
        let entry = AuditRecord { seq: 0, at: 1, subject: "a".into(), action: "cancel".into(), target: "t".into(), client: "c".into(), outcome: "ok".into() };
        store.audit_append(&entry).unwrap();
        for sql in ["UPDATE audit SET outcome = 'forbidden'", "DELETE FROM audit"] {
            let err = store.conn().execute(sql, []).unwrap_err().to_string();
            assert!(err.contains("append-only"), "{sql}: {err}");
        }
        assert_eq!(store.audit(0, 10).unwrap().len(), 1);
    }
}
