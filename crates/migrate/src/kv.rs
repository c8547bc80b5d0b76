//! Key/value stores that migrations read and write, behind one trait:
//! etcd v3 (over gRPC) and a SQLite file (the embedded default).
//!
//! A store is a sorted key space seen through an optional key prefix (an
//! etcd shard's `/registry/`, say); ranges never leave it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use etcd_client::{Compare, CompareOp, ConnectOptions, GetOptions, KvClient, Txn, TxnOp, TxnOpResponse};

/// One key and its value.
pub type Pair = (Vec<u8>, Vec<u8>);

/// A sorted key/value store.
#[async_trait::async_trait]
pub trait KvStore: Send + Sync {
    /// What the store is, for messages (`etcd http://…/registry/`).
    fn describe(&self) -> String;

    /// Up to `limit` entries with keys ≥ `start` in key order, and whether
    /// there are more after them.
    async fn range(&self, start: &[u8], limit: usize) -> Result<(Vec<Pair>, bool)>;

    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>>;

    /// Writes every entry (idempotent: an entry written twice is one entry).
    async fn put(&self, entries: &[Pair]) -> Result<()>;

    /// Deletes the keys; returns how many existed.
    async fn delete(&self, keys: &[Vec<u8>]) -> Result<u32>;

    /// Deletes each key only if it still holds the given value, in one
    /// compare-and-delete per key (a writer between the caller's read and
    /// this delete keeps the key). Returns how many were deleted and the
    /// keys that were kept because they changed (or vanished).
    async fn delete_unchanged(&self, entries: &[Pair]) -> Result<(u32, Vec<Vec<u8>>)>;
}

/// Bounds every call of a store: a hung store (a stopped process, a dead
/// network path) fails the step within `limit`, naming the store.
pub struct Deadline {
    inner: Arc<dyn KvStore>,
    limit: Duration,
}

impl Deadline {
    pub fn new(inner: Arc<dyn KvStore>, limit: Duration) -> Self {
        Self { inner, limit }
    }

    async fn bound<T>(&self, what: &str, call: impl Future<Output = Result<T>>) -> Result<T> {
        match tokio::time::timeout(self.limit, call).await {
            Ok(result) => result,
            Err(_) => anyhow::bail!(
                "{what} on {} did not answer within {} (the store's `timeout`); is it running and reachable?",
                self.inner.describe(),
                humantime::format_duration(self.limit)
            ),
        }
    }
}

#[async_trait::async_trait]
impl KvStore for Deadline {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    async fn range(&self, start: &[u8], limit: usize) -> Result<(Vec<Pair>, bool)> {
        self.bound("a range read", self.inner.range(start, limit)).await
    }

    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.bound("a get", self.inner.get(key)).await
    }

    async fn put(&self, entries: &[Pair]) -> Result<()> {
        self.bound("a put", self.inner.put(entries)).await
    }

    async fn delete(&self, keys: &[Vec<u8>]) -> Result<u32> {
        self.bound("a delete", self.inner.delete(keys)).await
    }

    async fn delete_unchanged(&self, entries: &[Pair]) -> Result<(u32, Vec<Vec<u8>>)> {
        self.bound("a delete", self.inner.delete_unchanged(entries)).await
    }
}

/// The first key after every key that starts with `prefix` (etcd's range
/// end); empty (no end) when there is none.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    Vec::new()
}

/// An etcd v3 cluster (one or more endpoints of the same cluster).
///
/// etcd 3.4 (Debian's) counts every key of a range before it applies the
/// limit, so a page costs time proportional to the keys left after its
/// start: use large page budgets (10,000 entries) for large units.
pub struct Etcd {
    client: KvClient,
    endpoints: Vec<String>,
    prefix: Vec<u8>,
    /// Operations per transaction; etcd refuses more than its `--max-txn-ops` (default 128).
    txn_ops: usize,
}

impl Etcd {
    /// Connects within `timeout` (requests are bounded by [`Deadline`]).
    pub async fn connect(endpoints: &[String], prefix: &str, txn_ops: usize, timeout: Duration) -> Result<Self> {
        let options = ConnectOptions::new().with_connect_timeout(timeout);
        let client = tokio::time::timeout(timeout, etcd_client::Client::connect(endpoints, Some(options)))
            .await
            .map_err(|_| anyhow::anyhow!("etcd at {} did not answer within {}", endpoints.join(","), humantime::format_duration(timeout)))?
            .with_context(|| format!("cannot connect to etcd at {}", endpoints.join(",")))?;
        Ok(Self { client: client.kv_client(), endpoints: endpoints.to_vec(), prefix: prefix.as_bytes().to_vec(), txn_ops: txn_ops.max(1) })
    }

    fn full(&self, key: &[u8]) -> Vec<u8> {
        [self.prefix.as_slice(), key].concat()
    }

    async fn txn(&self, ops: Vec<TxnOp>) -> Result<Vec<TxnOpResponse>> {
        let response = self.client.clone().txn(Txn::new().and_then(ops)).await.with_context(|| format!("etcd {}", self.describe()))?;
        Ok(response.op_responses())
    }
}

#[async_trait::async_trait]
impl KvStore for Etcd {
    fn describe(&self) -> String {
        format!("etcd {} prefix {:?}", self.endpoints.join(","), String::from_utf8_lossy(&self.prefix))
    }

    async fn range(&self, start: &[u8], limit: usize) -> Result<(Vec<Pair>, bool)> {
        let end = prefix_end(&self.prefix);
        // etcd returns a range in key order; asking it to sort would make it
        // read the whole range for every page.
        let mut options = GetOptions::new().with_limit(limit as i64);
        options = if end.is_empty() { options.with_from_key() } else { options.with_range(end) };
        let mut response = self.client.clone().get(self.full(start), Some(options)).await.with_context(|| format!("range over {}", self.describe()))?;
        let more = response.more();
        let pairs = response
            .take_kvs()
            .into_iter()
            .map(|kv| {
                let (mut key, value) = kv.into_key_value();
                key.drain(..self.prefix.len());
                (key, value)
            })
            .collect();
        Ok((pairs, more))
    }

    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let mut response = self.client.clone().get(self.full(key), None).await.with_context(|| format!("get from {}", self.describe()))?;
        Ok(response.take_kvs().into_iter().next().map(|kv| kv.into_key_value().1))
    }

    async fn put(&self, entries: &[Pair]) -> Result<()> {
        for chunk in entries.chunks(self.txn_ops) {
            self.txn(chunk.iter().map(|(k, v)| TxnOp::put(self.full(k), v.clone(), None)).collect()).await?;
        }
        Ok(())
    }

    async fn delete(&self, keys: &[Vec<u8>]) -> Result<u32> {
        let mut deleted = 0;
        for chunk in keys.chunks(self.txn_ops) {
            for response in self.txn(chunk.iter().map(|k| TxnOp::delete(self.full(k), None)).collect()).await? {
                if let TxnOpResponse::Delete(d) = response {
                    deleted += d.deleted() as u32;
                }
            }
        }
        Ok(deleted)
    }

    async fn delete_unchanged(&self, entries: &[Pair]) -> Result<(u32, Vec<Vec<u8>>)> {
        let (mut deleted, mut kept) = (0, Vec::new());
        for chunk in entries.chunks(self.txn_ops) {
            let compares: Vec<Compare> = chunk.iter().map(|(k, v)| Compare::value(self.full(k), CompareOp::Equal, v.clone())).collect();
            let deletes: Vec<TxnOp> = chunk.iter().map(|(k, _)| TxnOp::delete(self.full(k), None)).collect();
            let txn = Txn::new().when(compares).and_then(deletes);
            let response = self.client.clone().txn(txn).await.with_context(|| format!("etcd {}", self.describe()))?;
            if response.succeeded() {
                deleted += chunk.len() as u32;
                continue;
            }
            // Some key changed: decide key by key.
            for (k, v) in chunk {
                let txn = Txn::new().when([Compare::value(self.full(k), CompareOp::Equal, v.clone())]).and_then([TxnOp::delete(self.full(k), None)]);
                if self.client.clone().txn(txn).await.with_context(|| format!("etcd {}", self.describe()))?.succeeded() {
                    deleted += 1;
                } else {
                    kept.push(k.clone());
                }
            }
        }
        Ok((deleted, kept))
    }
}

/// A SQLite file holding one table of keys and values.
pub struct Sqlite {
    path: PathBuf,
    conn: Arc<Mutex<rusqlite::Connection>>,
}

impl Sqlite {
    pub fn open(path: &Path) -> Result<Self> {
        let conn = rusqlite::Connection::open(path).with_context(|| format!("cannot open the SQLite store {}", path.display()))?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=10000;
             CREATE TABLE IF NOT EXISTS kv (key BLOB PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;",
        )
        .with_context(|| format!("{}: not a usable SQLite key/value store", path.display()))?;
        Ok(Self { path: path.to_path_buf(), conn: Arc::new(Mutex::new(conn)) })
    }

    async fn with<T: Send + 'static>(&self, f: impl FnOnce(&mut rusqlite::Connection) -> rusqlite::Result<T> + Send + 'static) -> Result<T> {
        let conn = self.conn.clone();
        let what = self.describe();
        tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut conn)
        })
        .await?
        .with_context(|| what)
    }
}

#[async_trait::async_trait]
impl KvStore for Sqlite {
    fn describe(&self) -> String {
        format!("sqlite {}", self.path.display())
    }

    async fn range(&self, start: &[u8], limit: usize) -> Result<(Vec<Pair>, bool)> {
        let start = start.to_vec();
        self.with(move |c| {
            let mut stmt = c.prepare_cached("SELECT key, value FROM kv WHERE key >= ?1 ORDER BY key LIMIT ?2")?;
            let mut pairs: Vec<Pair> = stmt.query_map(rusqlite::params![start, limit as i64 + 1], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<rusqlite::Result<_>>()?;
            let more = pairs.len() > limit;
            pairs.truncate(limit);
            Ok((pairs, more))
        })
        .await
    }

    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let key = key.to_vec();
        self.with(move |c| {
            use rusqlite::OptionalExtension;
            c.prepare_cached("SELECT value FROM kv WHERE key = ?1")?.query_row([key], |r| r.get(0)).optional()
        })
        .await
    }

    async fn put(&self, entries: &[Pair]) -> Result<()> {
        let entries = entries.to_vec();
        self.with(move |c| {
            let tx = c.transaction()?;
            {
                let mut stmt = tx.prepare_cached("INSERT INTO kv (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value")?;
                for (k, v) in &entries {
                    stmt.execute(rusqlite::params![k, v])?;
                }
            }
            tx.commit()
        })
        .await
    }

    async fn delete(&self, keys: &[Vec<u8>]) -> Result<u32> {
        let keys = keys.to_vec();
        self.with(move |c| {
            let tx = c.transaction()?;
            let mut deleted = 0;
            {
                let mut stmt = tx.prepare_cached("DELETE FROM kv WHERE key = ?1")?;
                for k in &keys {
                    deleted += stmt.execute([k])? as u32;
                }
            }
            tx.commit()?;
            Ok(deleted)
        })
        .await
    }

    async fn delete_unchanged(&self, entries: &[Pair]) -> Result<(u32, Vec<Vec<u8>>)> {
        let entries = entries.to_vec();
        self.with(move |c| {
            let tx = c.transaction()?;
            let (mut deleted, mut kept) = (0, Vec::new());
            {
                let mut stmt = tx.prepare_cached("DELETE FROM kv WHERE key = ?1 AND value = ?2")?;
                for (k, v) in &entries {
                    match stmt.execute(rusqlite::params![k, v])? {
                        0 => kept.push(k.clone()),
                        _ => deleted += 1,
                    }
                }
            }
            tx.commit()?;
            Ok((deleted, kept))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_first_key_after_the_prefix() {
        assert_eq!(prefix_end(b"/registry/"), b"/registry0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), Vec::<u8>::new());
    }

    #[tokio::test]
    async fn sqlite_ranges_pages_and_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let kv = Sqlite::open(&dir.path().join("kv.sqlite")).unwrap();
        let pairs: Vec<Pair> = (0..5u8).map(|i| (vec![b'k', i], vec![i; 3])).collect();
        kv.put(&pairs).await.unwrap();
        kv.put(&pairs[..2]).await.unwrap();
        let (page, more) = kv.range(b"", 3).await.unwrap();
        assert_eq!((page.len(), more), (3, true));
        let (page, more) = kv.range(&[b'k', 3], 3).await.unwrap();
        assert_eq!((page.len(), more), (2, false));
        assert_eq!(kv.delete(&[vec![b'k', 0], vec![b'x']]).await.unwrap(), 1);
        assert_eq!(kv.get(&[b'k', 1]).await.unwrap(), Some(vec![1; 3]));
        assert_eq!(kv.get(&[b'k', 0]).await.unwrap(), None);
        // Compare-and-delete: a key whose value changed is kept.
        let (deleted, kept) = kv.delete_unchanged(&[(vec![b'k', 1], vec![1; 3]), (vec![b'k', 2], vec![9; 3]), (vec![b'k', 0], vec![0; 3])]).await.unwrap();
        assert_eq!((deleted, kept), (1, vec![vec![b'k', 2], vec![b'k', 0]]));
        assert_eq!(kv.get(&[b'k', 2]).await.unwrap(), Some(vec![2; 3]));
    }
}
