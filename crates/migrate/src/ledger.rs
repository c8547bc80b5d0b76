//! The durable record of migrations (`migrations.sqlite` in the state
//! directory): each migration's spec, where it stands (phase and
//! checkpoint), per-phase progress, whether `verify` passed, and the
//! claims on units. A checkpoint and the progress it stands for are
//! written in one transaction, so a crash never separates them.

use std::path::Path;
use std::sync::Mutex;

use anyhow::{Context, Result, bail};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use cordon_store::now_ms;

/// How a migration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Running,
    /// Stopped by an error or a crash; `resume` continues it.
    Failed,
    Completed,
    /// Finished, with errors a `continue-and-report` phase recorded.
    CompletedWithErrors,
    /// Given up with `cordon migrate abort`; its claim is released.
    Aborted,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Failed => "failed",
            Status::Completed => "completed",
            Status::CompletedWithErrors => "completed-with-errors",
            Status::Aborted => "aborted",
        }
    }

    fn parse(s: &str) -> Status {
        match s {
            "running" => Status::Running,
            "completed" => Status::Completed,
            "completed-with-errors" => Status::CompletedWithErrors,
            "aborted" => Status::Aborted,
            _ => Status::Failed,
        }
    }

    pub fn is_final(self) -> bool {
        matches!(self, Status::Completed | Status::CompletedWithErrors | Status::Aborted)
    }
}

#[derive(Debug, Clone)]
pub struct Migration {
    pub id: String,
    pub spec_path: String,
    pub spec: String,
    pub unit: String,
    pub status: Status,
    /// Index of the phase to run next (or running).
    pub phase: usize,
    pub checkpoint: Option<String>,
    pub verified: bool,
    pub error: Option<String>,
    pub created_at: u64,
    pub updated_at: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PhaseProgress {
    pub name: String,
    /// `pending`, `running`, `done`, `failed`, `done-with-errors`.
    pub status: String,
    pub steps: u64,
    pub entries: u64,
    pub bytes: u64,
    pub failed: u64,
    pub summary: String,
}

pub struct Ledger {
    conn: Mutex<Connection>,
}


impl Ledger {
    pub fn open(state_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(state_dir).with_context(|| format!("cannot create {}", state_dir.display()))?;
        let path = state_dir.join("migrations.sqlite");
        let mut conn = Connection::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=10000; PRAGMA foreign_keys=ON;")?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS migrations (
                id TEXT PRIMARY KEY, spec_path TEXT NOT NULL, spec TEXT NOT NULL, unit TEXT NOT NULL,
                status TEXT NOT NULL, phase INTEGER NOT NULL, checkpoint TEXT, verified INTEGER NOT NULL,
                error TEXT, created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS phases (
                migration TEXT NOT NULL REFERENCES migrations(id), idx INTEGER NOT NULL, name TEXT NOT NULL,
                status TEXT NOT NULL, steps INTEGER NOT NULL, entries INTEGER NOT NULL, bytes INTEGER NOT NULL,
                failed INTEGER NOT NULL, summary TEXT NOT NULL, PRIMARY KEY (migration, idx));
             CREATE TABLE IF NOT EXISTS claims (unit TEXT PRIMARY KEY, migration TEXT NOT NULL REFERENCES migrations(id), since INTEGER NOT NULL);",
        )?;
        tx.commit()?;
        Ok(Self { conn: Mutex::new(conn) })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn create(&self, id: &str, spec_path: &str, spec: &str, unit: &str, phases: &[String]) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let now = now_ms();
        tx.execute(
            "INSERT INTO migrations VALUES (?1, ?2, ?3, ?4, 'running', 0, NULL, 0, NULL, ?5, ?5)",
            params![id, spec_path, spec, unit, now as i64],
        )?;
        for (i, name) in phases.iter().enumerate() {
            tx.execute("INSERT INTO phases VALUES (?1, ?2, ?3, 'pending', 0, 0, 0, 0, '')", params![id, i as i64, name])?;
        }
        tx.commit()?;
        Ok(())
    }

    fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Migration> {
        Ok(Migration {
            id: r.get(0)?,
            spec_path: r.get(1)?,
            spec: r.get(2)?,
            unit: r.get(3)?,
            status: Status::parse(&r.get::<_, String>(4)?),
            phase: r.get::<_, i64>(5)? as usize,
            checkpoint: r.get(6)?,
            verified: r.get::<_, i64>(7)? != 0,
            error: r.get(8)?,
            created_at: r.get::<_, i64>(9)? as u64,
            updated_at: r.get::<_, i64>(10)? as u64,
        })
    }

    pub fn get(&self, id: &str) -> Result<Option<Migration>> {
        Ok(self.conn().query_row("SELECT * FROM migrations WHERE id = ?1", [id], Self::row).optional()?)
    }

    pub fn list(&self) -> Result<Vec<Migration>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT * FROM migrations ORDER BY created_at, id")?;
        Ok(stmt.query_map([], Self::row)?.collect::<rusqlite::Result<_>>()?)
    }

    pub fn phases(&self, id: &str) -> Result<Vec<PhaseProgress>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT name, status, steps, entries, bytes, failed, summary FROM phases WHERE migration = ?1 ORDER BY idx")?;
        let rows = stmt.query_map([id], |r| {
            Ok(PhaseProgress {
                name: r.get(0)?,
                status: r.get(1)?,
                steps: r.get::<_, i64>(2)? as u64,
                entries: r.get::<_, i64>(3)? as u64,
                bytes: r.get::<_, i64>(4)? as u64,
                failed: r.get::<_, i64>(5)? as u64,
                summary: r.get(6)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn set_status(&self, id: &str, status: Status, error: Option<&str>) -> Result<()> {
        self.conn().execute(
            "UPDATE migrations SET status = ?2, error = ?3, updated_at = ?4 WHERE id = ?1",
            params![id, status.as_str(), error, now_ms() as i64],
        )?;
        Ok(())
    }

    pub fn set_phase_status(&self, id: &str, phase: usize, status: &str, summary: Option<&str>) -> Result<()> {
        let conn = self.conn();
        conn.execute("UPDATE phases SET status = ?3 WHERE migration = ?1 AND idx = ?2", params![id, phase as i64, status])?;
        if let Some(summary) = summary {
            conn.execute("UPDATE phases SET summary = ?3 WHERE migration = ?1 AND idx = ?2", params![id, phase as i64, summary])?;
        }
        Ok(())
    }

    /// Starts phase `phase` over: its progress and the checkpoint cleared.
    pub fn restart_phase(&self, id: &str, phase: usize) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "UPDATE phases SET steps = 0, entries = 0, bytes = 0, failed = 0, summary = 'started over' WHERE migration = ?1 AND idx = ?2",
            params![id, phase as i64],
        )?;
        tx.execute("UPDATE migrations SET checkpoint = NULL, updated_at = ?2 WHERE id = ?1", params![id, now_ms() as i64])?;
        tx.commit()?;
        Ok(())
    }

    /// Records one step: its progress and the checkpoint to resume from,
    /// atomically; a finished phase moves the migration to the next one
    /// (and a finished `verify` marks it verified).
    pub fn record_step(&self, id: &str, phase: usize, step: &StepRecord<'_>) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let status = match (step.done, step.failed > 0) {
            (false, _) => "running",
            (true, false) => "done",
            (true, true) => "done-with-errors",
        };
        tx.execute(
            "UPDATE phases SET steps = steps + 1, entries = entries + ?3, bytes = bytes + ?4, failed = failed + ?5, summary = ?6, status = ?7
             WHERE migration = ?1 AND idx = ?2",
            params![id, phase as i64, step.entries as i64, step.bytes as i64, step.failed as i64, step.summary, status],
        )?;
        let (next_phase, checkpoint) = if step.done { (phase + 1, None) } else { (phase, step.checkpoint) };
        tx.execute(
            "UPDATE migrations SET phase = ?2, checkpoint = ?3, verified = verified OR ?4, updated_at = ?5 WHERE id = ?1",
            params![id, next_phase as i64, checkpoint, step.done && step.verify, now_ms() as i64],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Claims `unit` for migration `id`; refused, naming the holder, when
    /// another unfinished migration holds it.
    pub fn claim(&self, unit: &str, id: &str) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let holder: Option<String> = tx.query_row("SELECT migration FROM claims WHERE unit = ?1", [unit], |r| r.get(0)).optional()?;
        match holder {
            Some(h) if h == id => {}
            Some(h) => bail!("the unit is already being migrated by {h}: resume or finish that migration first (cordon migrate status {h})"),
            None => {
                tx.execute("INSERT INTO claims VALUES (?1, ?2, ?3)", params![unit, id, now_ms() as i64])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    pub fn holds_claim(&self, unit: &str, id: &str) -> Result<bool> {
        let holder: Option<String> = self.conn().query_row("SELECT migration FROM claims WHERE unit = ?1", [unit], |r| r.get(0)).optional()?;
        Ok(holder.as_deref() == Some(id))
    }

    pub fn release(&self, id: &str) -> Result<()> {
        self.conn().execute("DELETE FROM claims WHERE migration = ?1", [id])?;
        Ok(())
    }
}

/// What one step reported.
pub struct StepRecord<'a> {
    pub done: bool,
    pub checkpoint: Option<&'a str>,
    pub entries: u64,
    pub bytes: u64,
    pub failed: u64,
    pub summary: &'a str,
    /// This was the `verify` phase.
    pub verify: bool,
}
