//! Everything the CLI writes for people, and the files it writes for them.
//!
//! Text that comes from plugins (log lines, reasons, versions) is printed
//! through [`escape`], so a guest cannot move the cursor, overwrite a line
//! with a carriage return or send a terminal escape sequence.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use cordon_runtime::sandbox::LogSink;
use cordon_runtime::sandbox::output::Source;

/// How long ago a stored time (milliseconds since the epoch) was: `12s ago`.
pub fn ago(ms: u64) -> String {
    let secs = cordon_store::now_ms().saturating_sub(ms) / 1000;
    match secs {
        0..=59 => format!("{secs}s ago"),
        60..=3599 => format!("{}m ago", secs / 60),
        _ => format!("{}h ago", secs / 3600),
    }
}

/// `text` with control characters shown as `\x1b`-style escapes (tabs
/// kept), so it prints as one inert line.
pub fn escape(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(|c| c.is_control() && c != '\t') {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() && c != '\t' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Where plugin log lines are printed: standard output for stage runs,
/// standard error for key and item commands (whose standard output carries
/// only data).
pub enum PrintSink {
    Stdout,
    Stderr,
}

impl LogSink for PrintSink {
    fn line(&self, source: Source, text: &str) {
        let text = escape(text);
        match self {
            PrintSink::Stdout => println!("{source:>7} | {text}"),
            PrintSink::Stderr => eprintln!("{source:>7} | {text}"),
        }
    }
}

/// Writes `value` as one line of JSON (`--json` output: control
/// characters arrive escaped, so no terminal escaping is needed).
pub fn json_line(out: &mut impl Write, value: &impl serde::Serialize) -> Result<()> {
    writeln!(out, "{}", serde_json::to_string(value)?)?;
    Ok(())
}

/// Checks that a flag's value is JSON.
pub fn check_json(flag: &str, value: &str) -> Result<()> {
    if let Err(e) = serde_json::from_str::<serde_json::Value>(value) {
        bail!("{flag} {value:?} is not valid JSON ({e})");
    }
    Ok(())
}

/// An input file, or standard input for `None` and `-`.
pub fn open_input(input: Option<&Path>) -> Result<Box<dyn std::io::BufRead + Send>> {
    Ok(match input {
        None => Box::new(std::io::BufReader::new(std::io::stdin())),
        Some(p) if p == Path::new("-") => Box::new(std::io::BufReader::new(std::io::stdin())),
        Some(p) => Box::new(std::io::BufReader::with_capacity(
            1 << 20,
            std::fs::File::open(p).with_context(|| format!("cannot open input {}", p.display()))?,
        )),
    })
}

/// An output file written through a temporary file and renamed into place
/// only when the command succeeds, or standard output.
pub enum Output {
    Stdout(std::io::BufWriter<std::io::Stdout>),
    File(std::io::BufWriter<tempfile::NamedTempFile>, PathBuf),
}

impl Output {
    pub fn open(path: Option<&Path>) -> Result<Output> {
        Ok(match path {
            None => Output::Stdout(std::io::BufWriter::with_capacity(1 << 20, std::io::stdout())),
            Some(p) => {
                let dir = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
                let tmp = tempfile::NamedTempFile::new_in(dir).with_context(|| format!("cannot write into {}", dir.display()))?;
                Output::File(std::io::BufWriter::with_capacity(1 << 20, tmp), p.to_path_buf())
            }
        })
    }

    pub fn writer(&mut self) -> &mut (dyn Write + Send) {
        match self {
            Output::Stdout(w) => w,
            Output::File(w, _) => w,
        }
    }

    pub fn commit(self) -> Result<()> {
        match self {
            Output::Stdout(mut w) => Ok(w.flush()?),
            Output::File(w, path) => {
                let tmp = w.into_inner().map_err(|e| e.into_error())?;
                tmp.persist(&path).with_context(|| format!("cannot write {}", path.display()))?;
                Ok(())
            }
        }
    }
}

/// A spinner counting `unit` on standard error, hidden when it is not a
/// terminal.
pub fn progress_bar(unit: &'static str) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(indicatif::ProgressStyle::with_template(&format!("{{spinner}} {{pos}} {unit} ({{per_sec}}) {{elapsed}}")).expect("valid template"));
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn control_characters_are_shown_not_obeyed() {
        assert_eq!(escape("plain\ttext"), "plain\ttext");
        assert_eq!(escape("a\rcordon | fake"), "a\\rcordon | fake");
        assert_eq!(escape("\u{1b}]0;title\u{7}x"), "\\u{1b}]0;title\\u{7}x");
    }
}
