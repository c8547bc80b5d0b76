//! The PostgreSQL state store: many agents, one database.
//!
//! Driver: `tokio-postgres` with `deadpool-postgres`'s pool — async and
//! tokio-native like the rest of the host, plain SQL with no database
//! needed at build time (sqlx's checked queries need one), and small.
//!
//! [`StateStore`] is synchronous (SQLite is), and its callers run on any
//! thread: inside the agent's runtime, in a current-thread test runtime, or
//! in no runtime at all. So the store drives its connections on a small
//! runtime of its own and each call waits for its answer there; no caller
//! ever has to be inside a tokio context, and none can starve it. Every
//! call is bounded by [`CALL_TIMEOUT`], so a hung server fails the call
//! with a message instead of hanging the agent.
//!
//! Times of leases come from the database's clock, so agents on machines
//! whose clocks disagree still agree on when a lease ran out. Writes of a
//! deployment's progress lock its row (shared) and check the fence in the
//! same transaction; a claim locks it exclusively, so a claim and a write
//! of the lease it replaces cannot interleave. Log appends lock the row
//! exclusively: a deployment's log lines commit in `seq` order, so a
//! follower that reads after the last `seq` it saw misses none.
//!
//! Wake-ups: a change that can make a deployment claimable (one queued, a
//! status changed, a lease released) notifies the channel [`WORK_CHANNEL`]
//! from a trigger in the database, whoever wrote it; an agent's
//! [`StateStore::wake`] listens on one connection of its own (reconnecting
//! when it drops) and wakes the agent loop, which otherwise polls.
//!
//! Credentials: the URL may hold a password, and `password-file` can
//! supply one; neither is ever part of a message ([`PostgresStore::describe`]
//! names user, host, port and database only).

use std::collections::HashSet;
use std::future::Future;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::{NoTls, Row};

use super::*;

/// Longest a store call may take before it fails naming the server.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections kept per store (one process).
const POOL_SIZE: usize = 8;
/// The `LISTEN`/`NOTIFY` channel of changes that may make work claimable.
pub const WORK_CHANNEL: &str = "cordon_work";
/// The advisory lock that serialises schema changes of agents starting at once.
const MIGRATION_LOCK: i64 = 0x636f_7264_6f6e;
/// The database's clock, in milliseconds since the Unix epoch.
const DB_NOW: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

/// Schema changes in order; entry `i` takes version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[r#"
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
    created_at BIGINT NOT NULL,
    started_at BIGINT,
    finished_at BIGINT,
    seq BIGSERIAL NOT NULL,
    lease_owner TEXT,
    lease_epoch BIGINT NOT NULL DEFAULT 0,
    lease_until BIGINT
);
CREATE INDEX deployments_app ON deployments (application, seq);
CREATE INDEX deployments_unfinished ON deployments (seq) WHERE status IN ('queued', 'running', 'rolling-back');
CREATE TABLE stages (
    deployment TEXT NOT NULL,
    id TEXT NOT NULL,
    ordinal INTEGER NOT NULL,
    name TEXT NOT NULL,
    "desc" TEXT NOT NULL,
    idx INTEGER NOT NULL,
    rollback BOOLEAN NOT NULL,
    options TEXT NOT NULL,
    needs TEXT NOT NULL,
    plugin TEXT NOT NULL,
    timeout_ms BIGINT NOT NULL,
    status TEXT NOT NULL,
    message TEXT NOT NULL,
    started_at BIGINT,
    finished_at BIGINT,
    attempts INTEGER NOT NULL,
    PRIMARY KEY (deployment, id)
);
CREATE TABLE logs (
    seq BIGSERIAL PRIMARY KEY,
    deployment TEXT NOT NULL,
    stage TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
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
    value BYTEA NOT NULL,
    PRIMARY KEY (application, plugin, key)
);
CREATE TABLE commands (
    id TEXT PRIMARY KEY,
    deployment TEXT NOT NULL,
    stage TEXT NOT NULL,
    kind TEXT NOT NULL,
    commander TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    seq BIGSERIAL NOT NULL,
    verdict TEXT,
    reason TEXT NOT NULL DEFAULT ''
);
CREATE INDEX commands_deployment ON commands (deployment, stage, seq);
CREATE TABLE refused_writes (
    deployment TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    write TEXT NOT NULL,
    at BIGINT NOT NULL,
    PRIMARY KEY (deployment, epoch, write)
);
CREATE TABLE agents (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid BIGINT NOT NULL,
    started_at BIGINT NOT NULL,
    beat_at BIGINT NOT NULL
);
"#,
    // 2: what a deployment needs of its agent, and what each agent offers.
    "ALTER TABLE deployments ADD COLUMN requires TEXT NOT NULL DEFAULT '{}';
     ALTER TABLE agents ADD COLUMN name TEXT NOT NULL DEFAULT '';
     ALTER TABLE agents ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';
     ALTER TABLE agents ADD COLUMN stages TEXT NOT NULL DEFAULT '[]';
     ALTER TABLE agents ADD COLUMN plugins TEXT NOT NULL DEFAULT '[]';",
    // 3: wake listening agents when work may have become claimable.
    "CREATE FUNCTION cordon_notify_work() RETURNS trigger LANGUAGE plpgsql AS $$
     BEGIN PERFORM pg_notify('cordon_work', ''); RETURN NULL; END $$;
     CREATE TRIGGER deployments_queued AFTER INSERT ON deployments
         FOR EACH STATEMENT EXECUTE FUNCTION cordon_notify_work();
     CREATE TRIGGER deployments_changed AFTER UPDATE ON deployments FOR EACH ROW
         WHEN (OLD.status IS DISTINCT FROM NEW.status OR (OLD.lease_until IS NOT NULL AND NEW.lease_until IS NULL))
         EXECUTE FUNCTION cordon_notify_work();",
    // 4: snapshots kept in the store, by digest.
    "CREATE TABLE snapshots (digest TEXT PRIMARY KEY, archive BYTEA NOT NULL);",
    // 5: the server's tokens and its append-only audit log.
    "CREATE TABLE tokens (
         id TEXT PRIMARY KEY,
         hash TEXT NOT NULL,
         subject TEXT NOT NULL,
         role TEXT NOT NULL,
         applications TEXT NOT NULL,
         created_at BIGINT NOT NULL,
         created_by TEXT NOT NULL,
         expires_at BIGINT,
         revoked_at BIGINT
     );
     CREATE TABLE audit (
         seq BIGSERIAL PRIMARY KEY,
         at BIGINT NOT NULL,
         subject TEXT NOT NULL,
         action TEXT NOT NULL,
         target TEXT NOT NULL,
         client TEXT NOT NULL,
         outcome TEXT NOT NULL
     );
     CREATE FUNCTION cordon_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
     BEGIN RAISE EXCEPTION 'the audit log is append-only'; END $$;
     CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON audit
         FOR EACH STATEMENT EXECUTE FUNCTION cordon_audit_append_only();",
    // 6: when a snapshot was last stored (retention spares young ones).
    "ALTER TABLE snapshots ADD COLUMN stored_at BIGINT NOT NULL DEFAULT 0;",
];

const STAGE_COLUMNS: &str =
    r#"deployment, id, ordinal, name, "desc", idx, rollback, options, needs, plugin, timeout_ms, status, message, started_at, finished_at, attempts"#;
const METADATA_UPSERT: &str = "INSERT INTO metadata (deployment, stage, key, value) VALUES ($1, $2, $3, $4)
     ON CONFLICT (deployment, stage, key) DO UPDATE SET value = excluded.value";
const BLOB_UPSERT: &str = "INSERT INTO blobs (application, plugin, key, value) VALUES ($1, $2, $3, $4)
     ON CONFLICT (application, plugin, key) DO UPDATE SET value = excluded.value";

fn token_row(r: &Row) -> Result<TokenRecord> {
    Ok(TokenRecord {
        id: r.get(0),
        hash: r.get(1),
        subject: r.get(2),
        role: r.get(3),
        applications: from_json_column("token applications", r.get(4))?,
        created_at: r.get::<_, i64>(5) as u64,
        created_by: r.get(6),
        expires_at: opt_u64(r.get(7)),
        revoked_at: opt_u64(r.get(8)),
    })
}

/// The environment variable naming a shared PostgreSQL state database; it
/// wins over a config's `state.postgres.url`.
pub const DATABASE_URL_ENV: &str = "CORDON_DATABASE_URL";

/// The settings of a config's `state.postgres` section, for
/// [`PostgresStore::open_configured`].
pub struct Configured<'a> {
    /// The config file, for messages.
    pub file: &'a str,
    pub url: Option<&'a str>,
    pub password_file: Option<&'a std::path::Path>,
}

/// The PostgreSQL-backed [`StateStore`].
pub struct PostgresStore {
    pool: Pool,
    /// Runs the connections and every call; `None` only while dropping.
    runtime: Option<tokio::runtime::Runtime>,
    /// `postgres://user@host:port/database`, for messages.
    describe: String,
    /// For the listening connection (holds the password: never printed).
    config: tokio_postgres::Config,
    /// Notified on [`WORK_CHANNEL`]; the listener starts on first use.
    wake: std::sync::OnceLock<std::sync::Arc<tokio::sync::Notify>>,
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which tokio forbids inside another
        // runtime; the connections need no orderly goodbye.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// `postgres://user@host:port/database` of `config`: never the password.
fn describe(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
        None => "localhost".to_string(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("postgres://{}@{host}:{port}/{}", config.get_user().unwrap_or(""), config.get_dbname().unwrap_or(""))
}

impl PostgresStore {
    /// Connects to the database at `url` (a `postgres://` URL or a
    /// `key=value` string; `password`, when given, replaces the URL's) and
    /// brings its schema up to date. `source` names where the URL came
    /// from, for messages; the URL itself is never repeated.
    pub fn open(url: &str, password: Option<&str>, source: &str) -> Result<Self> {
        let mut config: tokio_postgres::Config = url.parse().map_err(|e: tokio_postgres::Error| {
            anyhow!("{source}: not a PostgreSQL connection URL ({e}); write it as postgres://USER@HOST:PORT/DATABASE")
        })?;
        if let Some(password) = password {
            config.password(password);
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        config.application_name("cordon");
        let describe = describe(&config);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("cordon-postgres")
            .enable_all()
            .build()
            .context("cannot start the PostgreSQL client's threads")?;
        let manager = Manager::from_config(config.clone(), NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = {
            let _entered = runtime.enter();
            Pool::builder(manager)
                .max_size(POOL_SIZE)
                .runtime(deadpool_postgres::Runtime::Tokio1)
                .create_timeout(Some(Duration::from_secs(10)))
                .wait_timeout(Some(CALL_TIMEOUT))
                .build()
                .context("cannot set up the PostgreSQL connection pool")?
        };
        let store = Self { pool, runtime: Some(runtime), describe, config, wake: Default::default() };
        let pool = store.pool.clone();
        store
            .run(async move { migrate(&pool).await })
            .with_context(|| format!("cannot open the state database {} ({source})", store.describe))?;
        Ok(store)
    }

    /// The shared database `$CORDON_DATABASE_URL` or else `configured`
    /// (a config's `state.postgres`) names, if any; the password from its
    /// `password-file` when given.
    pub fn open_configured(configured: Option<Configured>) -> Result<Option<Self>> {
        let (url, source) = match (std::env::var(DATABASE_URL_ENV), &configured) {
            (Ok(url), _) if !url.is_empty() => (url, format!("${DATABASE_URL_ENV}")),
            (_, None) => return Ok(None),
            (_, Some(c)) => match c.url {
                Some(url) => (url.to_string(), format!("{}: state.postgres.url", c.file)),
                None => anyhow::bail!("{}: state.postgres needs `url: postgres://USER@HOST:PORT/DATABASE` (or set ${DATABASE_URL_ENV})", c.file),
            },
        };
        let password = match configured.as_ref().and_then(|c| c.password_file.map(|p| (c.file, p))) {
            Some((file, path)) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("{file}: cannot read state.postgres.password-file {}", path.display()))?;
                Some(text.trim_end_matches(['\n', '\r']).to_string())
            }
            None => None,
        };
        Self::open(&url, password.as_deref(), &source).map(Some)
    }

    /// Runs `work` on the store's runtime and waits for it, at most
    /// [`CALL_TIMEOUT`].
    fn run<T: Send + 'static>(&self, work: impl Future<Output = Result<T>> + Send + 'static) -> Result<T> {
        let (send, receive) = std::sync::mpsc::sync_channel(1);
        let describe = self.describe.clone();
        self.runtime.as_ref().expect("the runtime lives as long as the store").spawn(async move {
            let out = match tokio::time::timeout(CALL_TIMEOUT, work).await {
                Ok(out) => out,
                Err(_) => Err(anyhow!(
                    "the state database {describe} did not answer within {}s; is PostgreSQL running and reachable?",
                    CALL_TIMEOUT.as_secs()
                )),
            };
            let _ = send.send(out);
        });
        receive.recv().map_err(|_| anyhow!("the PostgreSQL client of {} stopped", self.describe))?
    }

    /// Runs `write` (the store method `what`) in one transaction that
    /// first checks, under a `lock` on the deployment's row, that `fence`
    /// is still its lease; commits only if `write` succeeds.
    fn fenced<T: Send + 'static>(&self, fence: &Fence, lock: Lock, what: &'static str, write: Write<T>) -> Result<T> {
        let (pool, fence) = (self.pool.clone(), fence.clone());
        self.run(async move {
            let mut client = client(&pool).await?;
            let tx = client.transaction().await?;
            check_fence(&pool, &tx, &fence, lock, what).await?;
            let out = write(&tx, &fence.deployment).await?;
            tx.commit().await?;
            Ok(out)
        })
    }
}

/// Listens on [`WORK_CHANNEL`] and notifies `wake` for each notification,
/// for as long as the store lives: when the connection drops it connects
/// again (waking once, since changes may have been missed meanwhile).
async fn listen(config: tokio_postgres::Config, wake: std::sync::Arc<tokio::sync::Notify>) {
    loop {
        if let Ok((client, mut connection)) = config.connect(NoTls).await {
            let driver = async {
                loop {
                    match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                        Some(Ok(tokio_postgres::AsyncMessage::Notification(_))) => wake.notify_one(),
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => return,
                    }
                }
            };
            tokio::pin!(driver);
            let statement = format!("LISTEN {WORK_CHANNEL}");
            let listening = tokio::select! {
                listened = client.batch_execute(&statement) => listened.is_ok(),
                () = &mut driver => false,
            };
            if listening {
                wake.notify_one();
                driver.await;
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A write of a deployment's progress: given the transaction and the
/// deployment id, it returns what the store method returns.
type Write<T> = Box<dyn for<'t> FnOnce(&'t deadpool_postgres::Transaction<'t>, &'t str) -> BoxFuture<'t, Result<T>> + Send>;
type BoxFuture<'t, T> = std::pin::Pin<Box<dyn Future<Output = T> + Send + 't>>;

/// A pooled connection, or an error naming the database.
async fn client(pool: &Pool) -> Result<deadpool_postgres::Object> {
    pool.get().await.map_err(|e| match e {
        // The server's own words (wrong password, unknown database, …).
        deadpool_postgres::PoolError::Backend(e) => anyhow::Error::new(e).context("cannot connect to the state database"),
        e => anyhow!("cannot connect to the state database: {e}"),
    })
}

async fn migrate(pool: &Pool) -> Result<()> {
    let mut client = client(pool).await?;
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS cordon_schema (version INTEGER NOT NULL)").await?;
    let version: i32 = match tx.query_opt("SELECT version FROM cordon_schema", &[]).await? {
        Some(row) => row.get(0),
        None => {
            tx.execute("INSERT INTO cordon_schema (version) VALUES (0)", &[]).await?;
            0
        }
    };
    let known = MIGRATIONS.len() as i32;
    if !(0..=known).contains(&version) {
        anyhow::bail!("it has schema version {version}, this cordon understands up to {known}; use a matching cordon release");
    }
    for migration in &MIGRATIONS[version as usize..] {
        tx.batch_execute(migration).await?;
    }
    tx.execute("UPDATE cordon_schema SET version = $1", &[&known]).await?;
    tx.commit().await?;
    Ok(())
}

/// How a fenced write locks its deployment's row.
#[derive(Clone, Copy)]
enum Lock {
    /// Writes of other rows: many at once, none during a claim.
    Share,
    /// Writes of the deployment row itself, and log appends (in order).
    Update,
}

/// Checks in `tx` that `fence` is still its deployment's lease, holding
/// the row locked until `tx` ends; a refusal of the write `what` is
/// recorded on another connection (`tx` is rolled back).
async fn check_fence(pool: &Pool, tx: &deadpool_postgres::Transaction<'_>, fence: &Fence, lock: Lock, what: &str) -> Result<()> {
    let mode = match lock {
        Lock::Share => "SHARE",
        Lock::Update => "UPDATE",
    };
    let row = tx.query_opt(&format!("SELECT lease_epoch FROM deployments WHERE id = $1 FOR {mode}"), &[&fence.deployment]).await?;
    match row.map(|r| r.get::<_, i64>(0)) {
        None => anyhow::bail!("no deployment `{}`", fence.deployment),
        Some(epoch) if epoch != fence.epoch => {
            record_refusal(pool, fence, what).await?;
            Err(Fenced(fence.clone()).into())
        }
        Some(_) => Ok(()),
    }
}

async fn record_refusal(pool: &Pool, fence: &Fence, what: &str) -> Result<()> {
    client(pool)
        .await?
        .execute(
            &format!("INSERT INTO refused_writes (deployment, epoch, write, at) VALUES ($1, $2, $3, {DB_NOW})
             ON CONFLICT DO NOTHING"),
            &[&fence.deployment, &fence.epoch, &what],
        )
        .await?;
    Ok(())
}

/// A `LIMIT` for `limit` rows (`usize::MAX`, "all", would wrap negative).
fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

fn opt_u64(v: Option<i64>) -> Option<u64> {
    v.map(|v| v as u64)
}

fn opt_i64(v: Option<u64>) -> Option<i64> {
    v.map(|v| v as i64)
}

fn deployment_row(r: &Row) -> Result<DeploymentRecord> {
    Ok(DeploymentRecord {
        id: r.get(0),
        application: r.get(1),
        status: r.get::<_, &str>(2).parse()?,
        reason: r.get(3),
        trigger: r.get(4),
        plan: r.get(5),
        target_snapshot: r.get(6),
        running_snapshot: r.get(7),
        created_at: r.get::<_, i64>(8) as u64,
        started_at: opt_u64(r.get(9)),
        finished_at: opt_u64(r.get(10)),
        requires: from_json_column("deployment requirements", r.get(11))?,
    })
}

fn stage_row(r: &Row) -> Result<StageRecord> {
    Ok(StageRecord {
        deployment: r.get(0),
        id: r.get(1),
        ordinal: r.get::<_, i32>(2) as u32,
        name: r.get(3),
        desc: r.get(4),
        index: r.get::<_, i32>(5) as u32,
        rollback: r.get(6),
        options: r.get(7),
        needs: serde_json::from_str(r.get(8))?,
        plugin: r.get(9),
        timeout_ms: r.get::<_, i64>(10) as u64,
        status: r.get::<_, &str>(11).parse()?,
        message: r.get(12),
        started_at: opt_u64(r.get(13)),
        finished_at: opt_u64(r.get(14)),
        attempts: r.get::<_, i32>(15) as u32,
    })
}

fn application_row(r: &Row) -> ApplicationRecord {
    ApplicationRecord { name: r.get(0), dir: r.get(1), last_success: r.get(2), running_snapshot: r.get(3) }
}

/// Upserts with `upsert` if what `usage` counts of the scope's other
/// entries leaves room for `added` bytes under `quota`. The scope is
/// locked first (a transaction-scoped advisory lock on its name), so two
/// writers of one scope cannot both pass the check.
#[allow(clippy::too_many_arguments)]
async fn put_within(
    tx: &deadpool_postgres::Transaction<'_>,
    usage: &str,
    upsert: &str,
    scope: [&str; 3],
    value: &(dyn tokio_postgres::types::ToSql + Sync),
    quota: Quota,
    added: u64,
) -> Result<bool> {
    let lock_key = format!("{}/{}", scope[0], scope[1]);
    tx.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", &[&lock_key]).await?;
    let row = tx.query_one(usage, &[&scope[0], &scope[1], &scope[2]]).await?;
    let (entries, bytes): (i64, i64) = (row.get(0), row.get(1));
    if !quota.admits(entries as u64, bytes as u64, added) {
        return Ok(false);
    }
    tx.execute(upsert, &[&scope[0], &scope[1], &scope[2], value]).await?;
    Ok(true)
}

impl StateStore for PostgresStore {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn upsert_application(&self, name: &str, dir: &str) -> Result<()> {
        let (pool, name, dir) = (self.pool.clone(), name.to_string(), dir.to_string());
        self.run(async move {
            client(&pool)
                .await?
                .execute(
                    "INSERT INTO applications (name, dir) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET dir = excluded.dir",
                    &[&name, &dir],
                )
                .await?;
            Ok(())
        })
    }

    fn application(&self, name: &str) -> Result<Option<ApplicationRecord>> {
        let (pool, name) = (self.pool.clone(), name.to_string());
        self.run(async move {
            let row = client(&pool)
                .await?
                .query_opt("SELECT name, dir, last_success, running_snapshot FROM applications WHERE name = $1", &[&name])
                .await?;
            Ok(row.as_ref().map(application_row))
        })
    }

    fn applications(&self) -> Result<Vec<ApplicationRecord>> {
        let pool = self.pool.clone();
        self.run(async move {
            let rows =
                client(&pool).await?.query("SELECT name, dir, last_success, running_snapshot FROM applications ORDER BY name", &[]).await?;
            Ok(rows.iter().map(application_row).collect())
        })
    }

    fn insert_deployment(&self, d: &DeploymentRecord) -> Result<()> {
        let (pool, d) = (self.pool.clone(), d.clone());
        self.run(async move {
            client(&pool)
                .await?
                .execute(
                    "INSERT INTO deployments (id, application, status, reason, trigger, plan, target_snapshot, running_snapshot, created_at, started_at, finished_at, requires)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                    &[
                        &d.id, &d.application, &d.status.as_str(), &d.reason, &d.trigger, &d.plan, &d.target_snapshot,
                        &d.running_snapshot, &(d.created_at as i64), &opt_i64(d.started_at), &opt_i64(d.finished_at),
                        &json_column(&d.requires),
                    ],
                )
                .await?;
            Ok(())
        })
    }

    fn deployment(&self, id: &str) -> Result<Option<DeploymentRecord>> {
        let (pool, id) = (self.pool.clone(), id.to_string());
        self.run(async move {
            let row = client(&pool).await?.query_opt(&format!("SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE id = $1"), &[&id]).await?;
            row.as_ref().map(deployment_row).transpose()
        })
    }

    fn deployments(&self, application: Option<&str>, limit: usize) -> Result<Vec<DeploymentRecord>> {
        let (pool, application) = (self.pool.clone(), application.map(str::to_string));
        let limit = sql_limit(limit);
        self.run(async move {
            let rows = client(&pool)
                .await?
                .query(
                    &format!(
                        "SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE ($1::text IS NULL OR application = $1) ORDER BY seq DESC LIMIT $2"
                    ),
                    &[&application, &limit],
                )
                .await?;
            rows.iter().map(deployment_row).collect()
        })
    }

    fn unfinished_deployments(&self) -> Result<Vec<DeploymentRecord>> {
        let pool = self.pool.clone();
        self.run(async move {
            let rows = client(&pool)
                .await?
                .query(
                    &format!("SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE status IN ('queued', 'running', 'rolling-back') ORDER BY seq"),
                    &[],
                )
                .await?;
            rows.iter().map(deployment_row).collect()
        })
    }

    fn save_plan(&self, fence: &Fence, plan: &str, running_snapshot: &str, stages: &[StageRecord], at: u64) -> Result<()> {
        let (plan, running, stages) = (plan.to_string(), running_snapshot.to_string(), stages.to_vec());
        self.fenced(fence, Lock::Update, "save_plan", Box::new(move |tx, deployment| {
            Box::pin(async move {
                tx.execute("DELETE FROM stages WHERE deployment = $1", &[&deployment]).await?;
                let insert = tx
                    .prepare_cached(&format!(
                        "INSERT INTO stages ({STAGE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, '', NULL, NULL, 0)"
                    ))
                    .await?;
                for s in &stages {
                    tx.execute(
                        &insert,
                        &[
                            &deployment, &s.id, &(s.ordinal as i32), &s.name, &s.desc, &(s.index as i32), &s.rollback, &s.options,
                            &serde_json::to_string(&s.needs)?, &s.plugin, &(s.timeout_ms as i64), &s.status.as_str(),
                        ],
                    )
                    .await?;
                }
                tx.execute(
                    "UPDATE deployments SET plan = $2, running_snapshot = $4, status = 'running', reason = '', started_at = COALESCE(started_at, $3) WHERE id = $1",
                    &[&deployment, &plan, &(at as i64), &running],
                )
                .await?;
                Ok(())
            })
        }))
    }

    fn set_deployment_status(&self, fence: &Fence, status: DeploymentStatus, reason: &str, at: u64) -> Result<()> {
        let reason = text(reason).into_owned();
        let finished = status.is_final().then_some(at as i64);
        self.fenced(fence, Lock::Update, "set_deployment_status", Box::new(move |tx, deployment| {
            Box::pin(async move {
                tx.execute(
                    "UPDATE deployments SET status = $2, reason = $3, finished_at = COALESCE($4, finished_at),
                     started_at = CASE WHEN $2 IN ('running', 'rolling-back') THEN COALESCE(started_at, $5) ELSE started_at END
                     WHERE id = $1",
                    &[&deployment, &status.as_str(), &reason, &finished, &(at as i64)],
                )
                .await?;
                Ok(())
            })
        }))
    }

    fn complete_success(&self, fence: &Fence, reason: &str, at: u64) -> Result<()> {
        let reason = text(reason).into_owned();
        self.fenced(fence, Lock::Update, "complete_success", Box::new(move |tx, deployment| {
            Box::pin(async move {
                tx.execute(
                    "UPDATE deployments SET status = 'success', reason = $2, finished_at = $3 WHERE id = $1",
                    &[&deployment, &reason, &(at as i64)],
                )
                .await?;
                tx.execute(
                    "UPDATE applications SET last_success = $1,
                     running_snapshot = (SELECT target_snapshot FROM deployments WHERE id = $1)
                     WHERE name = (SELECT application FROM deployments WHERE id = $1)",
                    &[&deployment],
                )
                .await?;
                Ok(())
            })
        }))
    }

    fn claimable(&self) -> Result<Vec<DeploymentRecord>> {
        let pool = self.pool.clone();
        self.run(async move {
            let rows = client(&pool)
                .await?
                .query(
                    &format!(
                        "SELECT {DEPLOYMENT_COLUMNS} FROM deployments d WHERE {HEAD_OF_APPLICATION}
                         AND (lease_until IS NULL OR lease_until < {DB_NOW}) ORDER BY seq"
                    ),
                    &[],
                )
                .await?;
            rows.iter().map(deployment_row).collect()
        })
    }

    fn claim(&self, deployment: &str, agent: &str, ttl: Duration) -> Result<Option<Fence>> {
        let (pool, deployment, agent) = (self.pool.clone(), deployment.to_string(), agent.to_string());
        let ttl = ttl.as_millis() as i64;
        self.run(async move {
            let row = client(&pool)
                .await?
                .query_opt(
                    &format!(
                        "UPDATE deployments SET lease_owner = $2, lease_epoch = lease_epoch + 1, lease_until = {DB_NOW} + $3
                         WHERE id = (SELECT d.id FROM deployments d WHERE d.id = $1 AND {HEAD_OF_APPLICATION}
                                     AND (d.lease_until IS NULL OR d.lease_until < {DB_NOW})
                                     FOR UPDATE SKIP LOCKED)
                         RETURNING lease_epoch"
                    ),
                    &[&deployment, &agent, &ttl],
                )
                .await?;
            Ok(row.map(|r| Fence { deployment, epoch: r.get(0) }))
        })
    }

    fn renew(&self, agent: &str, fences: &[Fence], ttl: Duration) -> Result<Vec<Fence>> {
        if fences.is_empty() {
            return Ok(Vec::new());
        }
        let (pool, agent, fences) = (self.pool.clone(), agent.to_string(), fences.to_vec());
        let ttl = ttl.as_millis() as i64;
        self.run(async move {
            let ids: Vec<&str> = fences.iter().map(|f| f.deployment.as_str()).collect();
            let epochs: Vec<i64> = fences.iter().map(|f| f.epoch).collect();
            let rows = client(&pool)
                .await?
                .query(
                    &format!(
                        "UPDATE deployments SET lease_until = {DB_NOW} + $4
                         WHERE (id, lease_epoch) IN (SELECT * FROM unnest($1::text[], $2::bigint[])) AND lease_owner = $3
                         RETURNING id, lease_epoch"
                    ),
                    &[&ids, &epochs, &agent, &ttl],
                )
                .await?;
            let held: HashSet<(String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
            let lost: Vec<Fence> = fences.into_iter().filter(|f| !held.contains(&(f.deployment.clone(), f.epoch))).collect();
            for fence in &lost {
                record_refusal(&pool, fence, "renew").await?;
            }
            Ok(lost)
        })
    }

    fn release(&self, fence: &Fence) -> Result<()> {
        let (pool, fence) = (self.pool.clone(), fence.clone());
        self.run(async move {
            client(&pool)
                .await?
                .execute("UPDATE deployments SET lease_until = NULL WHERE id = $1 AND lease_epoch = $2", &[&fence.deployment, &fence.epoch])
                .await?;
            Ok(())
        })
    }

    fn expire_leases(&self) -> Result<usize> {
        let pool = self.pool.clone();
        self.run(async move {
            Ok(client(&pool).await?.execute("UPDATE deployments SET lease_until = NULL WHERE lease_until IS NOT NULL", &[]).await? as usize)
        })
    }

    fn refused_writes(&self, deployment: &str) -> Result<Vec<RefusedWrite>> {
        let (pool, deployment) = (self.pool.clone(), deployment.to_string());
        self.run(async move {
            let rows = client(&pool)
                .await?
                .query("SELECT epoch, write, at FROM refused_writes WHERE deployment = $1 ORDER BY at, write", &[&deployment])
                .await?;
            Ok(rows.iter().map(|r| RefusedWrite { epoch: r.get(0), write: r.get(1), at: r.get::<_, i64>(2) as u64 }).collect())
        })
    }

    fn lease(&self, deployment: &str) -> Result<Option<(Fence, Option<String>)>> {
        let (pool, deployment) = (self.pool.clone(), deployment.to_string());
        self.run(async move {
            let row = client(&pool).await?.query_opt("SELECT lease_epoch, lease_owner FROM deployments WHERE id = $1", &[&deployment]).await?;
            Ok(row.map(|r| (Fence { deployment, epoch: r.get(0) }, r.get(1))))
        })
    }

    fn stages(&self, deployment: &str) -> Result<Vec<StageRecord>> {
        let (pool, deployment) = (self.pool.clone(), deployment.to_string());
        self.run(async move {
            let rows = client(&pool)
                .await?
                .query(&format!("SELECT {STAGE_COLUMNS} FROM stages WHERE deployment = $1 ORDER BY ordinal"), &[&deployment])
                .await?;
            rows.iter().map(stage_row).collect()
        })
    }

    fn start_stage(&self, fence: &Fence, stage: &str, at: u64) -> Result<()> {
        let stage = stage.to_string();
        self.fenced(fence, Lock::Share, "start_stage", Box::new(move |tx, deployment| {
            Box::pin(async move {
                let n = tx
                    .execute(
                        "UPDATE stages SET status = 'running', started_at = $3, attempts = attempts + 1
                         WHERE deployment = $1 AND id = $2 AND status = 'not-started'",
                        &[&deployment, &stage, &(at as i64)],
                    )
                    .await?;
                anyhow::ensure!(n == 1, "stage {stage} of {deployment} was not waiting to start");
                Ok(())
            })
        }))
    }

    fn transition_stage(&self, fence: &Fence, stage: &str, from: &[StageStatus], to: StageStatus, message: &str, at: u64) -> Result<bool> {
        let (stage, message) = (stage.to_string(), text(message).into_owned());
        let from: Vec<&'static str> = from.iter().map(|s| s.as_str()).collect();
        let finished = to.is_final().then_some(at as i64);
        self.fenced(fence, Lock::Share, "transition_stage", Box::new(move |tx, deployment| {
            Box::pin(async move {
                let n = tx
                    .execute(
                        "UPDATE stages SET status = $3, message = $4, finished_at = $5
                         WHERE deployment = $1 AND id = $2 AND status = ANY($6)",
                        &[&deployment, &stage, &to.as_str(), &message, &finished, &from],
                    )
                    .await?;
                Ok(n == 1)
            })
        }))
    }

    fn reset_running_stages(&self, fence: &Fence) -> Result<usize> {
        self.fenced(fence, Lock::Share, "reset_running_stages", Box::new(move |tx, deployment| {
            Box::pin(async move {
                let n = tx.execute("UPDATE stages SET status = 'not-started' WHERE deployment = $1 AND status = 'running'", &[&deployment]).await?;
                Ok(n as usize)
            })
        }))
    }

    fn append_logs(&self, fence: &Fence, lines: &[LogRecord]) -> Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let lines = lines.to_vec();
        self.fenced(fence, Lock::Update, "append_logs", Box::new(move |tx, deployment| {
            Box::pin(async move {
                let stages: Vec<&str> = lines.iter().map(|l| l.stage.as_str()).collect();
                let at: Vec<i64> = lines.iter().map(|l| l.at_ms as i64).collect();
                let sources: Vec<&str> = lines.iter().map(|l| l.source.as_str()).collect();
                let texts: Vec<std::borrow::Cow<'_, str>> = lines.iter().map(|l| text(&l.text)).collect();
                tx.execute(
                    "INSERT INTO logs (deployment, stage, at_ms, source, text)
                     SELECT $1, l.stage, l.at_ms, l.source, l.text
                     FROM unnest($2::text[], $3::bigint[], $4::text[], $5::text[]) WITH ORDINALITY AS l(stage, at_ms, source, text, n)
                     ORDER BY n",
                    &[&deployment, &stages, &at, &sources, &texts],
                )
                .await?;
                Ok(())
            })
        }))
    }

    fn logs(&self, deployment: &str, stage: Option<&str>, after_seq: i64, limit: usize) -> Result<Vec<LogRecord>> {
        let (pool, deployment, stage) = (self.pool.clone(), deployment.to_string(), stage.map(str::to_string));
        let limit = sql_limit(limit);
        self.run(async move {
            let rows = client(&pool)
                .await?
                .query(
                    "SELECT seq, deployment, stage, at_ms, source, text FROM logs
                     WHERE deployment = $1 AND ($2::text IS NULL OR stage = $2) AND seq > $3 ORDER BY seq LIMIT $4",
                    &[&deployment, &stage, &after_seq, &limit],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| LogRecord {
                    seq: r.get(0),
                    deployment: r.get(1),
                    stage: r.get(2),
                    at_ms: r.get::<_, i64>(3) as u64,
                    source: r.get(4),
                    text: r.get(5),
                })
                .collect())
        })
    }

    fn metadata_get(&self, deployment: &str, stage: &str, key: &str) -> Result<Option<String>> {
        let (pool, deployment, stage, key) = (self.pool.clone(), deployment.to_string(), stage.to_string(), key.to_string());
        self.run(async move {
            let row = client(&pool)
                .await?
                .query_opt("SELECT value FROM metadata WHERE deployment = $1 AND stage = $2 AND key = $3", &[&deployment, &stage, &key])
                .await?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    fn metadata_put(&self, fence: &Fence, stage: &str, key: &str, value: &str) -> Result<()> {
        let (key, value) = (exact("metadata key", key)?.to_string(), exact("metadata value", value)?.to_string());
        let stage = stage.to_string();
        self.fenced(fence, Lock::Share, "metadata_put", Box::new(move |tx, deployment| {
            Box::pin(async move {
                tx.execute(METADATA_UPSERT, &[&deployment, &stage, &key, &value]).await?;
                Ok(())
            })
        }))
    }

    fn metadata_put_within(&self, fence: &Fence, stage: &str, key: &str, value: &str, quota: Quota) -> Result<bool> {
        let (key, value) = (exact("metadata key", key)?.to_string(), exact("metadata value", value)?.to_string());
        let stage = stage.to_string();
        self.fenced(fence, Lock::Share, "metadata_put_within", Box::new(move |tx, deployment| {
            Box::pin(async move {
                let added = (key.len() + value.len()) as u64;
                let stored = put_within(
                    tx,
                    "SELECT COUNT(*), COALESCE(SUM(octet_length(key) + octet_length(value)), 0)::bigint FROM metadata
                     WHERE deployment = $1 AND stage = $2 AND key <> $3",
                    METADATA_UPSERT,
                    [deployment, &stage, &key],
                    &value,
                    quota,
                    added,
                )
                .await?;
                Ok(stored)
            })
        }))
    }

    fn metadata_entries(&self, deployment: &str, stage: &str) -> Result<Vec<(String, String)>> {
        let (pool, deployment, stage) = (self.pool.clone(), deployment.to_string(), stage.to_string());
        self.run(async move {
            let rows = client(&pool)
                .await?
                .query("SELECT key, value FROM metadata WHERE deployment = $1 AND stage = $2 ORDER BY key", &[&deployment, &stage])
                .await?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    }

    fn blob_get(&self, application: &str, plugin: &str, key: &str) -> Result<Option<Vec<u8>>> {
        let (pool, application, plugin, key) = (self.pool.clone(), application.to_string(), plugin.to_string(), key.to_string());
        self.run(async move {
            let row = client(&pool)
                .await?
                .query_opt("SELECT value FROM blobs WHERE application = $1 AND plugin = $2 AND key = $3", &[&application, &plugin, &key])
                .await?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    fn blob_put_within(&self, fence: &Fence, application: &str, plugin: &str, key: &str, value: &[u8], quota: Quota) -> Result<bool> {
        let (application, plugin, key, value) = (application.to_string(), plugin.to_string(), exact("blob key", key)?.to_string(), value.to_vec());
        self.fenced(fence, Lock::Share, "blob_put_within", Box::new(move |tx, _| {
            Box::pin(async move {
                let added = (key.len() + value.len()) as u64;
                let stored = put_within(
                    tx,
                    "SELECT COUNT(*), COALESCE(SUM(octet_length(key) + octet_length(value)), 0)::bigint FROM blobs
                     WHERE application = $1 AND plugin = $2 AND key <> $3",
                    BLOB_UPSERT,
                    [&application, &plugin, &key],
                    &value,
                    quota,
                    added,
                )
                .await?;
                Ok(stored)
            })
        }))
    }

    fn blob_delete(&self, fence: &Fence, application: &str, plugin: &str, key: &str) -> Result<()> {
        let (application, plugin, key) = (application.to_string(), plugin.to_string(), key.to_string());
        self.fenced(fence, Lock::Share, "blob_delete", Box::new(move |tx, _| {
            Box::pin(async move {
                tx.execute("DELETE FROM blobs WHERE application = $1 AND plugin = $2 AND key = $3", &[&application, &plugin, &key]).await?;
                Ok(())
            })
        }))
    }

    fn add_command(&self, c: &CommandRecord) -> Result<()> {
        let (pool, c) = (self.pool.clone(), c.clone());
        self.run(async move {
            client(&pool)
                .await?
                .execute(
                    "INSERT INTO commands (id, deployment, stage, kind, commander, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
                    &[&c.id, &c.deployment, &c.stage, &c.kind.as_str(), &c.commander, &(c.created_at as i64)],
                )
                .await?;
            Ok(())
        })
    }

    fn commands(&self, deployment: &str, stage: Option<&str>) -> Result<Vec<CommandRecord>> {
        let (pool, deployment, stage) = (self.pool.clone(), deployment.to_string(), stage.map(str::to_string));
        self.run(async move {
            let rows = client(&pool)
                .await?
                .query(
                    "SELECT id, deployment, stage, kind, commander, created_at, verdict, reason FROM commands
                     WHERE deployment = $1 AND ($2::text IS NULL OR stage = $2) ORDER BY seq",
                    &[&deployment, &stage],
                )
                .await?;
            rows.iter()
                .map(|r| {
                    Ok(CommandRecord {
                        id: r.get(0),
                        deployment: r.get(1),
                        stage: r.get(2),
                        kind: r.get::<_, &str>(3).parse()?,
                        commander: r.get(4),
                        created_at: r.get::<_, i64>(5) as u64,
                        answer: Answer::from_columns(r.get(6), r.get(7)),
                    })
                })
                .collect()
        })
    }

    fn answer_command(&self, fence: &Fence, stage: &str, id: &str, answer: &Answer) -> Result<()> {
        let (stage, command) = (stage.to_string(), id.to_string());
        let (verdict, reason) = answer.columns();
        let reason = text(reason).into_owned();
        self.fenced(fence, Lock::Share, "answer_command", Box::new(move |tx, deployment| {
            Box::pin(async move {
                tx.execute(
                    "UPDATE commands SET verdict = $4, reason = $5 WHERE id = $3 AND deployment = $1 AND stage = $2 AND verdict IS NULL",
                    &[&deployment, &stage, &command, &verdict, &reason],
                )
                .await?;
                Ok(())
            })
        }))
    }

    fn replace_target_snapshot(&self, deployment: &str, from: &str, to: &str) -> Result<bool> {
        let (pool, args) = (self.pool.clone(), [deployment.to_string(), from.to_string(), to.to_string()]);
        self.run(async move {
            let changed = client(&pool)
                .await?
                .execute(
                    "UPDATE deployments SET target_snapshot = $3 WHERE id = $1 AND target_snapshot = $2
                     AND EXISTS (SELECT 1 FROM stages WHERE deployment = $1 AND status = 'paused')",
                    &[&args[0], &args[1], &args[2]],
                )
                .await?;
            Ok(changed == 1)
        })
    }

    fn snapshot_put(&self, reference: &str, archive: &[u8]) -> Result<()> {
        let (pool, reference, archive) = (self.pool.clone(), reference.to_string(), archive.to_vec());
        self.run(async move {
            client(&pool)
                .await?
                .execute(
                    &format!(
                        "INSERT INTO snapshots (digest, archive, stored_at) VALUES ($1, $2, {DB_NOW})
                         ON CONFLICT (digest) DO UPDATE SET stored_at = excluded.stored_at"
                    ),
                    &[&reference, &archive],
                )
                .await?;
            Ok(())
        })
    }

    fn delete_deployments(&self, application: &str, ids: &[String], grace: Duration) -> Result<Deleted> {
        let (pool, application, ids) = (self.pool.clone(), application.to_string(), ids.to_vec());
        let grace = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
        self.run(async move {
            let mut client = client(&pool).await?;
            let tx = client.transaction().await?;
            let mut deleted = Deleted::default();
            for id in ids {
                if tx.execute(&format!("DELETE FROM deployments WHERE {}", deletable("$1", "$2")), &[&id, &application]).await? == 1 {
                    for table in PER_DEPLOYMENT {
                        tx.execute(&format!("DELETE FROM {table} WHERE deployment = $1"), &[&id]).await?;
                    }
                    deleted.deployments.push(id);
                }
            }
            let unreferenced = unreferenced_snapshots(&format!("{DB_NOW} - $1"));
            let gone = tx.query(&format!("DELETE FROM snapshots WHERE digest IN ({unreferenced}) RETURNING digest"), &[&grace]).await?;
            deleted.snapshots = gone.iter().map(|r| r.get(0)).collect();
            tx.commit().await?;
            Ok(deleted)
        })
    }

    fn snapshot_get(&self, reference: &str) -> Result<Option<Vec<u8>>> {
        let (pool, reference) = (self.pool.clone(), reference.to_string());
        self.run(async move {
            let row = client(&pool).await?.query_opt("SELECT archive FROM snapshots WHERE digest = $1", &[&reference]).await?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    fn wake(&self) -> Option<std::sync::Arc<tokio::sync::Notify>> {
        let wake = self.wake.get_or_init(|| {
            let wake = std::sync::Arc::new(tokio::sync::Notify::new());
            let runtime = self.runtime.as_ref().expect("the runtime lives as long as the store");
            runtime.spawn(listen(self.config.clone(), wake.clone()));
            wake
        });
        Some(wake.clone())
    }

    fn heartbeat(&self, b: &AgentBeat) -> Result<()> {
        let (pool, b) = (self.pool.clone(), b.clone());
        self.run(async move {
            client(&pool)
                .await?
                .execute(
                    &format!(
                        "INSERT INTO agents ({AGENT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                         ON CONFLICT (id) DO UPDATE SET beat_at = excluded.beat_at, name = excluded.name, labels = excluded.labels,
                             stages = excluded.stages, plugins = excluded.plugins"
                    ),
                    &[
                        &b.id, &b.name, &b.host, &(b.pid as i64), &(b.started_at as i64), &(b.beat_at as i64),
                        &json_column(&b.labels), &json_column(&b.stages), &json_column(&b.plugins),
                    ],
                )
                .await?;
            Ok(())
        })
    }

    fn agents(&self) -> Result<Vec<AgentBeat>> {
        let pool = self.pool.clone();
        self.run(async move {
            let rows = client(&pool).await?.query(&format!("SELECT {AGENT_COLUMNS} FROM agents ORDER BY beat_at DESC"), &[]).await?;
            rows.iter()
                .map(|r| {
                    Ok(AgentBeat {
                        id: r.get(0),
                        name: r.get(1),
                        host: r.get(2),
                        pid: r.get::<_, i64>(3) as u32,
                        started_at: r.get::<_, i64>(4) as u64,
                        beat_at: r.get::<_, i64>(5) as u64,
                        labels: from_json_column("agent labels", r.get(6))?,
                        stages: from_json_column("agent stages", r.get(7))?,
                        plugins: from_json_column("agent plugins", r.get(8))?,
                    })
                })
                .collect()
        })
    }

    fn token_insert(&self, t: &TokenRecord) -> Result<()> {
        let (pool, t) = (self.pool.clone(), t.clone());
        self.run(async move {
            let (created, expires, revoked) = (t.created_at as i64, opt_i64(t.expires_at), opt_i64(t.revoked_at));
            client(&pool)
                .await?
                .execute(
                    &format!("INSERT INTO tokens ({TOKEN_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"),
                    &[&t.id, &t.hash, &t.subject, &t.role, &json_column(&t.applications), &created, &t.created_by, &expires, &revoked],
                )
                .await?;
            Ok(())
        })
    }
    fn token(&self, id: &str) -> Result<Option<TokenRecord>> {
        let (pool, id) = (self.pool.clone(), id.to_string());
        self.run(async move {
            let row = client(&pool).await?.query_opt(&format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE id = $1"), &[&id]).await?;
            row.as_ref().map(token_row).transpose()
        })
    }
    fn tokens(&self) -> Result<Vec<TokenRecord>> {
        let pool = self.pool.clone();
        self.run(async move {
            let rows = client(&pool).await?.query(&format!("SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY created_at, id"), &[]).await?;
            rows.iter().map(token_row).collect()
        })
    }
    fn token_revoke(&self, id: &str, at: u64) -> Result<bool> {
        let (pool, id) = (self.pool.clone(), id.to_string());
        self.run(async move {
            let n = client(&pool)
                .await?
                .execute("UPDATE tokens SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL", &[&id, &(at as i64)])
                .await?;
            Ok(n == 1)
        })
    }
    fn audit_append(&self, e: &AuditRecord) -> Result<()> {
        let (pool, e) = (self.pool.clone(), e.clone());
        self.run(async move {
            client(&pool)
                .await?
                .execute(
                    "INSERT INTO audit (at, subject, action, target, client, outcome) VALUES ($1, $2, $3, $4, $5, $6)",
                    &[&(e.at as i64), &text(&e.subject), &text(&e.action), &text(&e.target), &text(&e.client), &text(&e.outcome)],
                )
                .await?;
            Ok(())
        })
    }
    fn audit(&self, after_seq: i64, limit: usize) -> Result<Vec<AuditRecord>> {
        let pool = self.pool.clone();
        self.run(async move {
            let rows = client(&pool)
                .await?
                .query(&format!("SELECT {AUDIT_COLUMNS} FROM audit WHERE seq > $1 ORDER BY seq LIMIT $2"), &[&after_seq, &sql_limit(limit)])
                .await?;
            Ok(rows
                .iter()
                .map(|r| AuditRecord {
                    seq: r.get(0),
                    at: r.get::<_, i64>(1) as u64,
                    subject: r.get(2),
                    action: r.get(3),
                    target: r.get(4),
                    client: r.get(5),
                    outcome: r.get(6),
                })
                .collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits for `wake` at most `within`; whether it came.
    fn woken(store: &PostgresStore, wake: &tokio::sync::Notify, within: Duration) -> bool {
        let runtime = store.runtime.as_ref().unwrap();
        runtime.block_on(async { tokio::time::timeout(within, wake.notified()).await.is_ok() })
    }

    /// Another process's writes wake a listening agent: a deployment
    /// queued, its lease released, its end; a claim or a renewal does not.
    #[test]
    fn writes_that_make_work_claimable_wake_listeners() {
        let url = crate::test_cluster::Cluster::shared().database();
        let listener = PostgresStore::open(&url, None, "the test database").unwrap();
        let writer = PostgresStore::open(&url, None, "the test database").unwrap();
        let wake = listener.wake().unwrap();
        assert!(woken(&listener, &wake, Duration::from_secs(10)), "the listener never connected");

        writer.insert_deployment(&DeploymentRecord::queued("d1", "app", "{}".into(), String::new(), 1)).unwrap();
        assert!(woken(&listener, &wake, Duration::from_secs(10)), "a queued deployment woke nobody");
        let fence = writer.claim("d1", "a", Duration::from_secs(30)).unwrap().unwrap();
        writer.renew("a", std::slice::from_ref(&fence), Duration::from_secs(30)).unwrap();
        assert!(!woken(&listener, &wake, Duration::from_millis(500)), "a claim or a renewal woke a listener: nothing became claimable");
        writer.release(&fence).unwrap();
        assert!(woken(&listener, &wake, Duration::from_secs(10)), "a released lease woke nobody");
        let fence = writer.claim("d1", "a", Duration::from_secs(30)).unwrap().unwrap();
        writer.set_deployment_status(&fence, DeploymentStatus::Failure, "", 2).unwrap();
        assert!(woken(&listener, &wake, Duration::from_secs(10)), "a finished deployment woke nobody");
    }

    /// The audit log cannot be edited, shortened or emptied, even with SQL.
    #[test]
    fn the_audit_log_is_append_only() {
        let url = crate::test_cluster::Cluster::shared().database();
        let store = PostgresStore::open(&url, None, "the test database").unwrap();
        let entry = AuditRecord { seq: 0, at: 1, subject: "a".into(), action: "cancel".into(), target: "t".into(), client: "c".into(), outcome: "ok".into() };
        store.audit_append(&entry).unwrap();
        for sql in ["UPDATE audit SET outcome = 'forbidden'", "DELETE FROM audit", "TRUNCATE audit"] {
            let pool = store.pool.clone();
            let err = store.run(async move { Ok(client(&pool).await?.execute(sql, &[]).await?) }).unwrap_err();
            assert!(format!("{err:#}").contains("append-only"), "{sql}: {err:#}");
        }
        assert_eq!(store.audit(0, 10).unwrap().len(), 1);
    }
}
