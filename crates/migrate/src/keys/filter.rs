//! Key filtering: reads keys (one per line, JSON lines with a `key` field,
//! or the JSON document of `etcdctl get --prefix -w json`), feeds them to key-filter instances in packed
//! batches — several instances on several cores for large inputs — and
//! writes the selected ones out in input order.
//!
//! Keys the filter cannot classify are counted, the first ones kept for the
//! report, and all of them written to a separate sink when asked; they are
//! never selected and never dropped silently.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use tokio::sync::{Mutex, mpsc};

use super::batch::{BATCH_BYTES, BATCH_KEYS, Batch};
use cordon_runtime::runner::{KeyBatch, Selection};

/// Unclassified keys kept in memory for the report.
const REPORTED_UNCLASSIFIED: usize = 20;

/// How input lines carry keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One key per line.
    Lines,
    /// One JSON object per line with a string `key` (other fields, such as
    /// `value`, are passed through untouched).
    JsonLines,
}

/// Something that classifies batches: a key-filter component session, or
/// (for the benchmark) a native classifier.
pub trait Selector: Send + 'static {
    fn select(&mut self, batch: &KeyBatch) -> impl Future<Output = Result<Selection, String>> + Send;
}

impl Selector for cordon_runtime::runner::KeyFilterSession {
    async fn select(&mut self, batch: &KeyBatch) -> Result<Selection, String> {
        cordon_runtime::runner::KeyFilterSession::select(self, batch).await.map_err(|e| e.to_string())
    }
}

/// What a filter run counted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub keys: u64,
    pub selected: u64,
    pub unclassified: u64,
    /// The first unclassified keys, for the report.
    pub unclassified_sample: Vec<String>,
}

/// Reads batches from `input` (blocking; run on a blocking thread).
struct Reader<R> {
    input: R,
    lines: LineParser,
    seq: u64,
    /// The start of a line that continues in the next buffer.
    partial: Vec<u8>,
    eof: bool,
}

/// Turns input lines into keys.
struct LineParser {
    format: Option<Format>,
    line_no: u64,
}

impl LineParser {
    /// Adds one input line (without its newline) to `batch`.
    fn push(&mut self, batch: &mut Batch, mut line: &[u8]) -> Result<()> {
        self.line_no += 1;
        if let [rest @ .., b'\r'] = line {
            line = rest;
        }
        if line.is_empty() {
            return Ok(());
        }
        let format = *self.format.get_or_insert(if line[0] == b'{' { Format::JsonLines } else { Format::Lines });
        match format {
            Format::Lines => batch.push(line, None),
            Format::JsonLines => {
                #[derive(serde::Deserialize)]
                struct Entry {
                    key: String,
                }
                let entry: Entry = serde_json::from_slice(line)
                    .with_context(|| format!("input line {}: not a JSON object with a string `key`", self.line_no))?;
                batch.push(entry.key.as_bytes(), Some(line))
            }
        }
    }
}

impl<R: BufRead> Reader<R> {
    fn new(input: R) -> Self {
        Self { input, lines: LineParser { format: None, line_no: 0 }, seq: 0, partial: Vec::new(), eof: false }
    }

    /// The next batch: whole lines split out of the input's buffer with
    /// `memchr`, no per-line read calls.
    fn next_batch(&mut self) -> Result<Option<Batch>> {
        let mut batch = Batch::new(self.seq);
        let full = |b: &Batch| b.keys.ends.len() >= BATCH_KEYS || b.keys.data.len() >= BATCH_BYTES;
        while !self.eof && !full(&batch) {
            let buf = self.input.fill_buf().context("cannot read the input")?;
            if buf.is_empty() {
                self.eof = true;
                let last = std::mem::take(&mut self.partial);
                self.lines.push(&mut batch, &last)?;
                break;
            }
            let mut consumed = 0;
            while !full(&batch) {
                let Some(nl) = memchr::memchr(b'\n', &buf[consumed..]) else {
                    // The rest starts a line that ends in a later buffer.
                    self.partial.extend_from_slice(&buf[consumed..]);
                    consumed = buf.len();
                    break;
                };
                let line = &buf[consumed..consumed + nl];
                if self.partial.is_empty() {
                    self.lines.push(&mut batch, line)?;
                } else {
                    self.partial.extend_from_slice(line);
                    let whole = std::mem::take(&mut self.partial);
                    self.lines.push(&mut batch, &whole)?;
                }
                consumed += nl + 1;
            }
            self.input.consume(consumed);
        }
        if batch.keys.ends.is_empty() {
            return Ok(None);
        }
        self.seq += 1;
        Ok(Some(batch))
    }
}

/// Where results go.
pub struct Sinks<'a> {
    pub selected: &'a mut (dyn Write + Send),
    pub unclassified: Option<&'a mut (dyn Write + Send)>,
    /// Called with the number of keys done so far.
    pub progress: &'a (dyn Fn(u64) + Sync),
}

/// Filters `input` through `selectors` (one per worker) into `sinks`.
pub async fn run<S: Selector, R: BufRead + Send + 'static>(input: R, selectors: Vec<S>, sinks: Sinks<'_>) -> Result<Stats> {
    anyhow::ensure!(!selectors.is_empty(), "at least one selector is needed");
    let workers = selectors.len();
    let (batch_rx, reader) = spawn_reader(input, workers * 2);
    let (done_tx, mut done_rx) = mpsc::channel::<Result<(Batch, Selection)>>(workers * 2);
    let batch_rx = Arc::new(Mutex::new(batch_rx));
    let mut handles = Vec::new();
    for mut selector in selectors {
        let batch_rx = batch_rx.clone();
        let done_tx = done_tx.clone();
        handles.push(tokio::spawn(async move {
            loop {
                let Some(batch) = batch_rx.lock().await.recv().await else { break };
                let result = selector.select(&batch.keys).await.map(|s| (batch, s)).map_err(|e| anyhow::anyhow!("the key filter failed: {e}"));
                let failed = result.is_err();
                if done_tx.send(result).await.is_err() || failed {
                    break;
                }
            }
        }));
    }
    drop(done_tx);

    let Sinks { selected: out, mut unclassified, progress } = sinks;
    let mut stats = Stats::default();
    let mut pending: BTreeMap<u64, (Batch, Selection)> = BTreeMap::new();
    let mut next = 0u64;
    while let Some(result) = done_rx.recv().await {
        let (batch, selection) = result?;
        pending.insert(batch.seq, (batch, selection));
        while let Some((batch, selection)) = pending.remove(&next) {
            next += 1;
            let json = !batch.line_ends.is_empty();
            for i in 0..batch.keys.ends.len() {
                if selection.selected[i / 8] & (1 << (i % 8)) != 0 {
                    stats.selected += 1;
                    out.write_all(if json { batch.line(i) } else { batch.key(i) })?;
                    out.write_all(b"\n")?;
                }
            }
            for &i in &selection.unclassified {
                let key = batch.key(i as usize);
                stats.unclassified += 1;
                if stats.unclassified_sample.len() < REPORTED_UNCLASSIFIED {
                    stats.unclassified_sample.push(String::from_utf8_lossy(key).into_owned());
                }
                if let Some(w) = unclassified.as_mut() {
                    w.write_all(if json { batch.line(i as usize) } else { key })?;
                    w.write_all(b"\n")?;
                }
            }
            stats.keys += batch.keys.ends.len() as u64;
            progress(stats.keys);
        }
    }
    out.flush()?;
    if let Some(w) = unclassified.as_mut() {
        w.flush()?;
    }
    reader.await.context("the input reader panicked")??;
    for handle in handles {
        handle.await.context("a filter worker panicked")?;
    }
    if !pending.is_empty() {
        bail!("internal: {} batches were never written", pending.len());
    }
    Ok(stats)
}

/// The union of delete prefixes over the whole input.
pub async fn delete_prefixes<R: BufRead + Send + 'static>(input: R, session: &mut cordon_runtime::runner::KeyFilterSession) -> Result<Vec<String>> {
    let mut prefixes = std::collections::BTreeSet::new();
    let (mut batches, reader) = spawn_reader(input, 2);
    while let Some(batch) = batches.recv().await {
        let found = session.delete_prefixes(&batch.keys).await.map_err(|e| anyhow::anyhow!("the key filter failed: {e}"))?;
        prefixes.extend(found);
    }
    reader.await.context("the input reader panicked")??;
    Ok(prefixes.into_iter().collect())
}

/// Reads `input` in whichever format it is on a blocking thread; batches
/// arrive in order on the returned channel, at most `capacity` ahead.
fn spawn_reader<R: BufRead + Send + 'static>(input: R, capacity: usize) -> (mpsc::Receiver<Batch>, tokio::task::JoinHandle<Result<()>>) {
    let (tx, rx) = mpsc::channel::<Batch>(capacity);
    let reader = tokio::task::spawn_blocking(move || -> Result<()> {
        let mut input = input;
        if super::etcd_dump::looks_like_dump(input.fill_buf().context("cannot read the input")?) {
            return super::etcd_dump::stream(input, |batch| tx.blocking_send(batch).is_ok());
        }
        let mut reader = Reader::new(input);
        while let Some(batch) = reader.next_batch()? {
            if tx.blocking_send(batch).is_err() {
                break;
            }
        }
        Ok(())
    });
    (rx, reader)
}
