//! `cordon transfer backup|restore`: moves a control plane's own state —
//! applications, deployment history (stages, logs, commands, the source
//! snapshots they ran), metadata and blobs — to another state directory.
//!
//! The backup is one tar file: `cordon-transfer.json` (format, origin,
//! counts), `records.jsonl` (one table row per line) and `snapshots/<id>/`.
//! The origin identifies the source control plane (its host name and state
//! directory), so restoring a later backup of the same origin adds only
//! what is new: every restored deployment is recorded in the target's
//! `transfer_ids` table in the same transaction as its rows, and a second
//! restore adds nothing twice. The mapping from old to new deployment ids
//! (ids that are taken in the target get the target's next free id) is also
//! written to `transfer-ids-<origin>.json` (mode 0600) in the target.
//!
//! What fails fast (nothing written): an unreadable or foreign archive, a
//! malformed record, a target where an agent is running. What continues
//! and is reported: an application that already exists in the target (the
//! target's record is kept), a deployment whose rows cannot be inserted
//! (rolled back alone), a blob whose key holds a different value in the
//! target (the target's value is kept), and deployments that were
//! unfinished at backup time (restored as cancelled, so that the target's
//! agent does not resume them).

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use rusqlite::{Connection, OptionalExtension, params_from_iter};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use cordon_store::lock::{Staging, place, staging, sweep_state_dir};
use cordon_store::{DeploymentStatus, now_ms};

const FORMAT: &str = "cordon-transfer-v1";
const TABLES: [&str; 7] = ["applications", "deployments", "stages", "logs", "metadata", "blobs", "commands"];

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    format: String,
    origin: String,
    state_dir: String,
    created_at: u64,
    counts: BTreeMap<String, usize>,
}

/// One table row, as the archive holds it.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    table: String,
    row: Map<String, Value>,
}

fn to_json(v: rusqlite::types::ValueRef<'_>) -> Value {
    use rusqlite::types::ValueRef::*;
    match v {
        Null => Value::Null,
        Integer(i) => Value::from(i),
        Real(f) => Value::from(f),
        Text(t) => Value::String(String::from_utf8_lossy(t).into_owned()),
        Blob(b) => serde_json::json!({ "base64": B64.encode(b) }),
    }
}

fn to_sql(v: &Value) -> Result<rusqlite::types::Value> {
    use rusqlite::types::Value as S;
    Ok(match v {
        Value::Null => S::Null,
        Value::Bool(b) => S::Integer(*b as i64),
        Value::Number(n) => n.as_i64().map(S::Integer).or_else(|| n.as_f64().map(S::Real)).context("a number out of range")?,
        Value::String(s) => S::Text(s.clone()),
        Value::Object(o) => S::Blob(B64.decode(o.get("base64").and_then(Value::as_str).context("an object that is not a blob")?)?),
        Value::Array(_) => bail!("an array where a column value belongs"),
    })
}

fn open_db(state_dir: &Path) -> Result<Connection> {
    let path = cordon_store::database_path(state_dir);
    // Creates the schema when the target is new.
    drop(cordon_store::SqliteStore::open(&path)?);
    let conn = Connection::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    Ok(conn)
}

fn origin_of(state_dir: &Path) -> String {
    use sha2::{Digest, Sha256};
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    let dir = state_dir.canonicalize().unwrap_or_else(|_| state_dir.to_path_buf());
    hex::encode(&Sha256::new().chain_update(host.trim()).chain_update([0]).chain_update(dir.to_string_lossy().as_bytes()).finalize()[..8])
}


/// What a backup holds.
#[derive(Debug)]
pub struct BackupReport {
    pub origin: String,
    pub counts: BTreeMap<String, usize>,
}

/// Writes a backup of `state_dir` to `output` (atomically).
pub fn backup(state_dir: &Path, output: &Path) -> Result<BackupReport> {
    let db = cordon_store::database_path(state_dir);
    if !db.exists() {
        bail!("{}: no Cordon state there (no {}); pass the agent config of the control plane to back up", state_dir.display(), db.display());
    }
    let conn = open_db(state_dir)?;
    // One read transaction: a consistent view while an agent writes.
    conn.execute_batch("BEGIN")?;
    let mut records = Vec::new();
    let mut counts = BTreeMap::new();
    for table in TABLES {
        let mut stmt = conn.prepare(&format!("SELECT * FROM {table}"))?;
        let names: Vec<String> = stmt.column_names().into_iter().map(str::to_string).collect();
        let mut rows = stmt.query([])?;
        let mut n = 0;
        while let Some(r) = rows.next()? {
            let mut row = Map::new();
            for (i, name) in names.iter().enumerate() {
                row.insert(name.clone(), to_json(r.get_ref(i)?));
            }
            records.push(Record { table: table.to_string(), row });
            n += 1;
        }
        counts.insert(table.to_string(), n);
    }
    conn.execute_batch("COMMIT")?;
    let origin = origin_of(state_dir);
    let header = Header { format: FORMAT.into(), origin: origin.clone(), state_dir: state_dir.to_string_lossy().into(), created_at: now_ms(), counts: counts.clone() };

    let tmp = output.with_extension("partial");
    let file = std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    let mut tar = tar::Builder::new(std::io::BufWriter::new(file));
    let mut add = |name: &str, bytes: &[u8]| -> Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o600);
        h.set_cksum();
        tar.append_data(&mut h, name, bytes).with_context(|| format!("cannot write {}", tmp.display()))
    };
    add("cordon-transfer.json", &serde_json::to_vec_pretty(&header)?)?;
    let mut lines = Vec::new();
    for r in &records {
        serde_json::to_writer(&mut lines, r)?;
        lines.push(b'\n');
    }
    add("records.jsonl", &lines)?;
    for r in records.iter().filter(|r| r.table == "deployments") {
        let id = r.row.get("id").and_then(Value::as_str).unwrap_or_default();
        let dir = state_dir.join("snapshots").join(id);
        if !id.is_empty() && dir.is_dir() {
            tar.append_dir_all(format!("snapshots/{id}"), &dir).with_context(|| format!("cannot archive {}", dir.display()))?;
        }
    }
    let mut out = tar.into_inner().context("cannot finish the archive")?;
    out.flush()?;
    out.get_ref().sync_all()?;
    drop(out);
    std::fs::rename(&tmp, output).with_context(|| format!("cannot write {}", output.display()))?;
    Ok(BackupReport { origin, counts })
}

/// What a restore did, per kind of record.
#[derive(Debug, Default)]
pub struct RestoreReport {
    pub origin: String,
    pub applications_added: usize,
    pub deployments_added: usize,
    pub deployments_skipped: usize,
    pub blobs_added: usize,
    /// Things kept as they were, or refused, with why.
    pub notes: Vec<String>,
    pub id_map: PathBuf,
}

/// Reads an archive: its header, its records, and its snapshots extracted under `staging`.
/// The backup's header, read from its first entry.
fn read_archive_header(input: &Path) -> Result<Header> {
    let file = std::fs::File::open(input).with_context(|| format!("cannot read {}", input.display()))?;
    let mut archive = tar::Archive::new(std::io::BufReader::new(file));
    let first = archive.entries().ok().and_then(|mut e| e.next()).and_then(Result::ok);
    let Some(mut entry) = first.filter(|e| e.path().is_ok_and(|p| p.to_str() == Some("cordon-transfer.json"))) else {
        return Err(not_a_backup(input));
    };
    parse_header(&mut entry, input)
}

fn not_a_backup(input: &Path) -> anyhow::Error {
    anyhow::anyhow!("{}: not a Cordon transfer archive (it does not begin with cordon-transfer.json); write one with `cordon transfer backup`", input.display())
}

fn parse_header(entry: impl Read, input: &Path) -> Result<Header> {
    let header: Header = serde_json::from_reader(entry).with_context(|| format!("{}: cordon-transfer.json is malformed", input.display()))?;
    if header.format != FORMAT {
        bail!("{}: format {:?}, this cordon reads {FORMAT}", input.display(), header.format);
    }
    Ok(header)
}

fn read_archive(input: &Path, staging: &Path) -> Result<(Header, Vec<Record>)> {
    let file = std::fs::File::open(input).with_context(|| format!("cannot read {}", input.display()))?;
    let mut archive = tar::Archive::new(std::io::BufReader::new(file));
    let (mut header, mut records) = (None, Vec::new());
    for entry in archive.entries().with_context(|| format!("{}: not a Cordon transfer archive", input.display()))? {
        let mut entry = entry.with_context(|| format!("{}: a damaged archive", input.display()))?;
        let path = entry.path()?.into_owned();
        // The backup writes its header first: anything else is not one.
        if header.is_none() && path.to_str() != Some("cordon-transfer.json") {
            return Err(not_a_backup(input));
        }
        match path.to_str() {
            Some("cordon-transfer.json") => header = Some(parse_header(&mut entry, input)?),
            Some("records.jsonl") => {
                let mut text = String::new();
                entry.read_to_string(&mut text)?;
                for (i, line) in text.lines().enumerate() {
                    let r: Record = serde_json::from_str(line).with_context(|| format!("{}: records.jsonl line {}: malformed", input.display(), i + 1))?;
                    if !TABLES.contains(&r.table.as_str()) {
                        bail!("{}: records.jsonl line {}: unknown table {:?}", input.display(), i + 1, r.table);
                    }
                    records.push(r);
                }
            }
            _ if path.starts_with("snapshots") => {
                // `unpack_in` refuses paths that leave `staging`.
                if !entry.unpack_in(staging)? {
                    bail!("{}: entry {} points outside the archive", input.display(), path.display());
                }
            }
            _ => bail!("{}: unexpected entry {:?}", input.display(), path.display().to_string().chars().take(80).collect::<String>()),
        }
    }
    let header = header.with_context(|| format!("{}: not a Cordon transfer archive (no cordon-transfer.json)", input.display()))?;
    Ok((header, records))
}

/// A snapshot path of the source state (`<old_root>/<id>/…`) as the
/// target holds it (`<new_root>/<new id>/…`); `new_id` maps restored ids.
/// Paths outside the old snapshots stay as they are.
fn rebase(path: &str, old_root: &Path, new_root: &Path, new_id: impl Fn(&str) -> Option<String>) -> String {
    let Ok(rest) = Path::new(path).strip_prefix(old_root) else { return path.to_string() };
    let mut parts = rest.components();
    let id = parts.next().map(|c| c.as_os_str().to_string_lossy().into_owned()).unwrap_or_default();
    let id = new_id(&id).unwrap_or(id);
    new_root.join(id).join(parts.as_path()).to_string_lossy().into_owned()
}

fn text<'a>(row: &'a Map<String, Value>, col: &str) -> &'a str {
    row.get(col).and_then(Value::as_str).unwrap_or_default()
}

fn insert(tx: &Connection, table: &str, row: &Map<String, Value>, skip: &[&str]) -> Result<usize> {
    let cols: Vec<&String> = row.keys().filter(|c| !skip.contains(&c.as_str())).collect();
    let sql = format!(
        "INSERT OR IGNORE INTO {table} ({}) VALUES ({})",
        cols.iter().map(|c| format!("\"{c}\"")).collect::<Vec<_>>().join(", "),
        vec!["?"; cols.len()].join(", ")
    );
    let values = cols.iter().map(|c| to_sql(&row[c.as_str()])).collect::<Result<Vec<_>>>()?;
    Ok(tx.execute(&sql, params_from_iter(values))?)
}

/// Restores the backup `input` into `state_dir`.
pub fn restore(input: &Path, state_dir: &Path) -> Result<RestoreReport> {
    // Refuse what is not a backup before the state directory is touched.
    read_archive_header(input)?;
    let Some(_lock) = cordon_store::lock::AgentLock::try_acquire(state_dir)? else {
        bail!("an agent is running on {}; stop it before restoring into that state", state_dir.display());
    };
    sweep_state_dir(state_dir)?;
    let staging = Staging::new(state_dir, staging::RESTORE)?;
    let (header, records) = read_archive(input, staging.path())?;
    // Ids and application names become snapshot paths: a backup that
    // carries `..` or a separator in one is refused before anything moves.
    for r in records.iter().filter(|r| r.table == "deployments") {
        for col in ["id", "application"] {
            let value = text(&r.row, col);
            if !cordon_store::is_safe_name(value) {
                bail!("{}: deployment {col} {value:?} is not a valid name; the backup is damaged or was not written by `cordon transfer backup`", input.display());
            }
        }
    }
    let mut conn = open_db(state_dir)?;
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    tx.execute_batch("CREATE TABLE IF NOT EXISTS transfer_ids (origin TEXT NOT NULL, old TEXT NOT NULL, new TEXT NOT NULL, at INTEGER NOT NULL, PRIMARY KEY (origin, old))")?;
    let mut report = RestoreReport { origin: header.origin.clone(), ..Default::default() };
    let mut by_table: HashMap<&str, Vec<&Map<String, Value>>> = HashMap::new();
    for r in &records {
        by_table.entry(r.table.as_str()).or_default().push(&r.row);
    }
    let rows = |t: &str| by_table.get(t).cloned().unwrap_or_default();
    let old_snapshots = Path::new(&header.state_dir).join("snapshots");
    let new_snapshots = state_dir.join("snapshots");

    // Deployments, oldest first, each with its rows, atomically.
    let mut map: BTreeMap<String, String> = BTreeMap::new();
    let mut deployments = rows("deployments");
    deployments.sort_by_key(|d| d.get("seq").and_then(Value::as_i64).unwrap_or(0));
    let mut copied = Vec::new();
    for d in deployments {
        let old = text(d, "id").to_string();
        let known: Option<String> = tx.query_row("SELECT new FROM transfer_ids WHERE origin = ?1 AND old = ?2", [&header.origin, &old], |r| r.get(0)).optional()?;
        let new = match known {
            Some(new) if !superseded(&tx, &new, d)? => {
                map.insert(old, new);
                report.deployments_skipped += 1;
                continue;
            }
            // Restored unfinished from an older backup; this one has its end.
            Some(new) => {
                for table in ["stages", "logs", "metadata", "commands"] {
                    tx.execute(&format!("DELETE FROM {table} WHERE deployment = ?1"), [&new])?;
                }
                tx.execute("DELETE FROM deployments WHERE id = ?1", [&new])?;
                report.notes.push(format!("deployment {old} ended after the earlier backup: its whole history replaces the partial one"));
                new
            }
            None => {
                // Ids are taken by rows only: a snapshot directory without a
                // row was left by a restore killed before its commit, and is
                // replaced below — so a rerun picks the same ids.
                let app = text(d, "application").to_string();
                let taken = |id: &str| -> Result<bool> { Ok(tx.query_row("SELECT 1 FROM deployments WHERE id = ?1", [id], |_| Ok(())).optional()?.is_some()) };
                let mut new = old.clone();
                // After the highest number, as new deployments are numbered.
                let ids = tx.prepare("SELECT id FROM deployments WHERE application = ?1")?.query_map([&app], |r| r.get::<_, String>(0))?.collect::<rusqlite::Result<Vec<_>>>()?;
                let mut n = ids.iter().filter_map(|id| cordon_store::retention::number(&app, id)).max().unwrap_or(0) + 1;
                while taken(&new)? {
                    new = format!("{app}-{n}");
                    n += 1;
                }
                new
            }
        };
        let remap = |path: &str| rebase(path, &old_snapshots, &new_snapshots, |id| if id == old { Some(new.clone()) } else { map.get(id).cloned() });
        tx.execute_batch("SAVEPOINT deployment")?;
        let result = (|| -> Result<()> {
            let mut row = d.clone();
            row.insert("id".into(), Value::String(new.clone()));
            for col in ["target_snapshot", "running_snapshot"] {
                let p = remap(text(d, col));
                row.insert(col.into(), Value::String(p));
            }
            // Leases belong to the agents of the origin, not to this state.
            for col in ["lease_owner", "lease_epoch", "lease_until"] {
                row.remove(col);
            }
            let seq: i64 = tx.query_row("SELECT COALESCE(MAX(seq), 0) + 1 FROM deployments", [], |r| r.get(0))?;
            row.insert("seq".into(), Value::from(seq));
            let unfinished = !ended(d);
            if unfinished {
                row.insert("status".into(), Value::String("cancelled".into()));
                row.insert("reason".into(), Value::String(format!("{UNFINISHED} {}; not resumed here", text(d, "status"))));
                report.notes.push(format!("deployment {old} was {} at backup time: restored as cancelled", text(d, "status")));
            }
            insert(&tx, "deployments", &row, &[])?;
            for table in ["stages", "logs", "metadata", "commands"] {
                for r in rows(table).into_iter().filter(|r| text(r, "deployment") == old) {
                    let mut r = r.clone();
                    r.insert("deployment".into(), Value::String(new.clone()));
                    if table == "commands" {
                        r.insert("id".into(), Value::String(format!("{new}/{}", text(&r, "id"))));
                    }
                    if table == "stages" && unfinished && matches!(text(&r, "status"), "running" | "not-started" | "paused") {
                        r.insert("status".into(), Value::String("cancelled".into()));
                    }
                    insert(&tx, table, &r, if table == "logs" { &["seq"] } else { &[] })?;
                }
            }
            tx.execute("INSERT OR REPLACE INTO transfer_ids VALUES (?1, ?2, ?3, ?4)", rusqlite::params![header.origin, old, new, now_ms() as i64])?;
            let staged = staging.path().join("snapshots").join(&old);
            if staged.is_dir() {
                let dest = new_snapshots.join(&new);
                std::fs::create_dir_all(&new_snapshots)?;
                if !place(&staged, &dest)? {
                    std::fs::remove_dir_all(&dest).with_context(|| format!("cannot replace the unrecorded {}", dest.display()))?;
                    if !place(&staged, &dest)? {
                        bail!("cannot place the snapshot of {old} at {}: something else created it meanwhile", dest.display());
                    }
                }
                copied.push(dest);
            }
            Ok(())
        })();
        match result {
            Ok(()) => {
                tx.execute_batch("RELEASE deployment")?;
                map.insert(old, new);
                report.deployments_added += 1;
            }
            Err(e) => {
                tx.execute_batch("ROLLBACK TO deployment; RELEASE deployment")?;
                report.notes.push(format!("deployment {old} not restored: {e:#}"));
            }
        }
    }

    for a in rows("applications") {
        let name = text(a, "name");
        let here: Option<Option<String>> = tx.query_row("SELECT last_success FROM applications WHERE name = ?1", [name], |r| r.get(0)).optional()?;
        if let Some(last_here) = here {
            // The backup's last success, if restored and newer than ours,
            // is the running one (an older backup restored first left it
            // behind).
            let theirs = map.get(text(a, "last_success"));
            let seq = |id: &str| -> Result<i64> { Ok(tx.query_row("SELECT seq FROM deployments WHERE id = ?1", [id], |r| r.get(0)).optional()?.unwrap_or(0)) };
            match theirs {
                Some(new) if seq(new)? > seq(last_here.as_deref().unwrap_or_default())? => {
                    tx.execute(
                        "UPDATE applications SET last_success = ?2, running_snapshot = (SELECT target_snapshot FROM deployments WHERE id = ?2) WHERE name = ?1",
                        [name, new.as_str()],
                    )?;
                    report.notes.push(format!("application {name}: its last success is now {new}, from this backup"));
                }
                _ if report.deployments_added > 0 || report.deployments_skipped == 0 => {
                    report.notes.push(format!("application {name} exists here: kept this control plane's record"));
                }
                _ => {}
            }
            continue;
        }
        let mut a = a.clone();
        if let Some(running) = a.get("running_snapshot").and_then(Value::as_str) {
            let running = rebase(running, &old_snapshots, &new_snapshots, |id| map.get(id).cloned());
            a.insert("running_snapshot".into(), Value::String(running));
        }
        let last = text(&a, "last_success").to_string();
        if let Some(new) = map.get(&last) {
            a.insert("last_success".into(), Value::String(new.clone()));
        }
        report.applications_added += insert(&tx, "applications", &a, &[])?;
    }

    for b in rows("blobs") {
        let value = to_sql(b.get("value").unwrap_or(&Value::Null))?;
        let existing: Option<Vec<u8>> = tx
            .query_row("SELECT value FROM blobs WHERE application = ?1 AND plugin = ?2 AND key = ?3", [text(b, "application"), text(b, "plugin"), text(b, "key")], |r| r.get(0))
            .optional()?;
        match existing {
            None => report.blobs_added += insert(&tx, "blobs", b, &[])?,
            Some(v) if matches!(&value, rusqlite::types::Value::Blob(b) if *b == v) => {}
            Some(_) => report.notes.push(format!("blob {}/{}/{} differs here: kept this control plane's value", text(b, "application"), text(b, "plugin"), text(b, "key"))),
        }
    }

    let mapping: Vec<(String, String)> = {
        let mut stmt = tx.prepare("SELECT old, new FROM transfer_ids WHERE origin = ?1 ORDER BY old")?;
        stmt.query_map([&header.origin], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<rusqlite::Result<_>>()?
    };
    if let Err(e) = tx.commit() {
        for dir in copied {
            let _ = std::fs::remove_dir_all(dir);
        }
        return Err(e).context("cannot commit the restore; nothing was restored");
    }
    report.id_map = state_dir.join(format!("transfer-ids-{}.json", header.origin));
    let doc = serde_json::json!({ "origin": header.origin, "from": header.state_dir, "deployments": mapping.into_iter().collect::<BTreeMap<_, _>>() });
    write_private(&report.id_map, &serde_json::to_vec_pretty(&doc)?)?;
    Ok(report)
}

/// Whether the deployment restored as `id` was unfinished in an earlier
/// backup (restored cancelled) and `row`, from this backup, has its end.
fn superseded(tx: &Connection, id: &str, row: &Map<String, Value>) -> Result<bool> {
    let reason: Option<String> = tx.query_row("SELECT reason FROM deployments WHERE id = ?1", [id], |r| r.get(0)).optional()?;
    Ok(reason.is_some_and(|r| r.starts_with(UNFINISHED)) && ended(row) && !text(row, "reason").starts_with(UNFINISHED))
}

/// Whether a backed-up deployment row had ended.
fn ended(row: &Map<String, Value>) -> bool {
    text(row, "status").parse::<DeploymentStatus>().is_ok_and(DeploymentStatus::is_final)
}

/// How the reason of a deployment restored unfinished begins.
const UNFINISHED: &str = "transferred while";

/// Writes `bytes` to `path` atomically, readable by the owner only.
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}
