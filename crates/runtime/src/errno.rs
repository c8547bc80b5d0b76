//! WASI error numbers in plugin messages, said in words.
//!
//! A plugin built for WASI formats an I/O error as Rust's standard library
//! does: `No such file or directory (os error 44)`. The number is WASI's
//! (ENOENT is 2 on Linux, 44 in WASI), so on the host it misleads, and the
//! usual cause inside a sandbox — a host path where the plugin sees only
//! its mounts — goes unsaid. [`explain`] rewrites `(os error N)` in a
//! stage's message into the WASI name and, where one helps, that hint —
//! the first [`MOST`] of them only: the message is the plugin's, already
//! checked against its result limit, and a plugin must not make the host
//! keep many times that by repeating the pattern.

use std::borrow::Cow;

/// The WASI name of `errno` (preview 1 numbering, which WASI's libc and
/// Rust's standard library report), with a hint for errors a sandbox
/// commonly causes.
fn name(errno: u32) -> Option<(&'static str, &'static str)> {
    Some(match errno {
        2 => ("EACCES", "; the plugin's grants may not allow it"),
        8 => ("EBADF", ""),
        20 => ("EEXIST", ""),
        28 => ("EINVAL", ""),
        31 => ("EISDIR", ""),
        44 => ("ENOENT", "; paths are the plugin's own (its mounts, /source, /running, /scratch), not the host's"),
        51 => ("ENOSPC", "; the plugin's disk budget may be spent"),
        54 => ("ENOTDIR", ""),
        55 => ("ENOTEMPTY", ""),
        58 => ("ENOTSUP", ""),
        63 => ("EPERM", "; the plugin's grants may not allow it"),
        69 => ("EROFS", "; the mount is read-only"),
        76 => ("ENOTCAPABLE", "; not granted to the plugin"),
        _ => return None,
    })
}

/// How many errors of one message are said in words.
pub const MOST: usize = 4;

/// `message` with its first [`MOST`] `(os error N)` said as `(WASI ENAME; hint)`.
pub fn explain(message: &str) -> Cow<'_, str> {
    const OPEN: &str = "(os error ";
    if !message.contains(OPEN) {
        return Cow::Borrowed(message);
    }
    let mut out = String::with_capacity(message.len() + 64);
    let mut rest = message;
    let mut said = 0;
    while said < MOST
        && let Some(at) = rest.find(OPEN)
    {
        out.push_str(&rest[..at]);
        let after = &rest[at + OPEN.len()..];
        let digits = after.len() - after.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        match (after[..digits].parse::<u32>().ok().and_then(name), after[digits..].starts_with(')')) {
            (Some((errno, hint)), true) => {
                out.push_str(&format!("(WASI {errno}{hint})"));
                rest = &after[digits + 1..];
                said += 1;
            }
            _ => {
                out.push_str(OPEN);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::explain;

    #[test]
    fn wasi_numbers_become_names_and_hints() {
        assert_eq!(
            explain("create /srv/www/releases/1: No such file or directory (os error 44)"),
            "create /srv/www/releases/1: No such file or directory (WASI ENOENT; paths are the plugin's own (its mounts, /source, /running, /scratch), not the host's)"
        );
        assert_eq!(explain("a (os error 69) b (os error 76)"), "a (WASI EROFS; the mount is read-only) b (WASI ENOTCAPABLE; not granted to the plugin)");
        // Unknown numbers, malformed text and plain messages stay as they are.
        for same in ["x (os error 999)", "(os error )", "(os error 44", "(os error 44x)", "fine", "(os error 4444444444444)"] {
            assert_eq!(explain(same), same);
        }
        // A plugin repeating the pattern gets only the first few said.
        let flood = "(os error 44)".repeat(10_000);
        let said = explain(&flood);
        assert_eq!(said.matches("WASI ENOENT").count(), super::MOST);
        assert!(said.len() < flood.len() + 512, "{} bytes from {}", said.len(), flood.len());
    }
}
