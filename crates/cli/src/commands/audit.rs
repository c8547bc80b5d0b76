//! `cordon audit`: the server's audit log — every attempt at a change and
//! every refusal, oldest first.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;

use crate::print::{escape, json_line};

use super::token::Direct;

/// The audit log (admins).
#[derive(clap::Args)]
pub struct Audit {
    /// Only entries after this sequence number.
    #[arg(long, default_value_t = 0)]
    after: i64,
    /// At most this many entries.
    #[arg(long, default_value_t = 100)]
    limit: usize,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    direct: Direct,
}

impl Audit {
    pub fn run(self, config_path: &Path) -> Result<ExitCode> {
        let entries = self.direct.store(config_path)?.audit(self.after, self.limit)?;
        let mut out = std::io::stdout().lock();
        if !self.json {
            writeln!(out, "{:>6}  {:<24} {:<16} {:<24} {:<28} {:<22} OUTCOME", "SEQ", "TIME", "SUBJECT", "ACTION", "TARGET", "CLIENT")?;
        }
        for e in entries {
            if self.json {
                json_line(&mut out, &e)?;
                continue;
            }
            let time = humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(e.at));
            writeln!(
                out,
                "{:>6}  {:<24} {:<16} {:<24} {:<28} {:<22} {}",
                e.seq,
                time,
                escape(&e.subject),
                escape(&e.action),
                escape(&e.target),
                escape(&e.client),
                escape(&e.outcome)
            )?;
        }
        Ok(ExitCode::SUCCESS)
    }
}
