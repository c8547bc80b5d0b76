//! `verify`: compares the selected keys of the source (as the destination
//! should hold them) with the destination's: entry counts and a content
//! digest of every key and value. A mismatch fails the phase, and with it
//! the migration: nothing is deleted from the source unless this passed.
//!
//! The digest is the sum (mod 2^128) of a SHA-256 prefix of each entry, so
//! it is independent of page boundaries and fits in a checkpoint; each step
//! digests one page. Options: `{"page-entries": 1000}`.

use cordon_sdk::migrate::{Budget, Destination, MigrationPhase, Page, Source, Step, StepContext};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Options {
    #[serde(default = "default_entries")]
    page_entries: u32,
}

fn default_entries() -> u32 {
    u32::MAX
}

#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
struct Tally {
    entries: u64,
    bytes: u64,
    /// Hex of the 128-bit digest sum.
    digest: u128,
}

#[derive(Serialize, Deserialize)]
struct Checkpoint {
    /// `None`: the source is done and the destination is being read.
    source_token: Option<String>,
    destination_token: Option<String>,
    source: Tally,
    destination: Tally,
    on_destination: bool,
}

fn add(tally: &mut Tally, page: &Page) {
    for e in &page.entries {
        let mut h = Sha256::new();
        h.update((e.key.len() as u64).to_le_bytes());
        h.update(&e.key);
        h.update(&e.value);
        let d = h.finalize();
        tally.digest = tally.digest.wrapping_add(u128::from_le_bytes(d[..16].try_into().unwrap()));
        tally.entries += 1;
        tally.bytes += (e.key.len() + e.value.len()) as u64;
    }
}

fn scan_source(s: &Source, token: Option<&str>, budget: Budget) -> Result<Page, String> {
    s.scan(token, budget)
}

fn scan_destination(d: &Destination, token: Option<&str>, budget: Budget) -> Result<Page, String> {
    d.scan(token, budget)
}

struct Verify;

impl MigrationPhase for Verify {
    type Options = Options;
    type Checkpoint = Checkpoint;

    fn step(ctx: &StepContext<'_>, o: Options, at: Option<Checkpoint>) -> Result<Step<Checkpoint>, String> {
        let mut c = at.unwrap_or(Checkpoint { source_token: None, destination_token: None, source: Tally::default(), destination: Tally::default(), on_destination: false });
        let budget = Budget { max_entries: o.page_entries, max_bytes: u64::MAX };
        let page = if c.on_destination {
            scan_destination(ctx.destination, c.destination_token.as_deref(), budget)?
        } else {
            scan_source(ctx.source, c.source_token.as_deref(), budget)?
        };
        let (entries, bytes) = (page.entries.len() as u64, page.entries.iter().map(|e| (e.key.len() + e.value.len()) as u64).sum());
        if c.on_destination {
            add(&mut c.destination, &page);
            c.destination_token = page.continue_from;
        } else {
            add(&mut c.source, &page);
            c.source_token = page.continue_from;
        }
        let side_done = if c.on_destination { c.destination_token.is_none() } else { c.source_token.is_none() };
        if side_done && !c.on_destination {
            c.on_destination = true;
        } else if side_done {
            let (s, d) = (c.source, c.destination);
            if s != d {
                return Err(format!(
                    "verify failed: the source's selected keys ({} entries, {} bytes, digest {:032x}) differ from the destination's ({} entries, {} bytes, digest {:032x}); nothing was deleted",
                    s.entries, s.bytes, s.digest, d.entries, d.bytes, d.digest
                ));
            }
            return Ok(Step::done(format!("{} entries ({} bytes) match, digest {:032x}", s.entries, s.bytes, s.digest)).counted(entries, bytes));
        }
        let summary = format!("source {} entries, destination {} so far", c.source.entries, c.destination.entries);
        Ok(Step::more(c, summary).counted(entries, bytes))
    }
}

cordon_sdk::migration_phase_plugin!(Verify);
cordon_sdk::manifest! {
    name: "migrate-verify",
    version: env!("CARGO_PKG_VERSION"),
    stages: &[],
    capabilities: r#"{}"#,
}
