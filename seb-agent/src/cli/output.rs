//! Where a command's answer goes: standard output, as text for people or, with `--json`,
//! as JSON for programs. A reader that goes away (`seb-agent audit list | head`) ends the
//! command quietly instead of panicking.

use std::io::{self, Write};

use anyhow::Result;
use serde::Serialize;

/// The error a write to standard output fails with once the reader has gone.
#[derive(Debug, thiserror::Error)]
#[error("standard output was closed")]
pub struct StdoutClosed;

/// Whether `error` is (caused by) standard output having been closed: the command
/// ends without complaint, as `head` and friends expect.
pub fn is_stdout_closed(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause.downcast_ref::<io::Error>().and_then(|e| e.get_ref()).is_some_and(|inner| inner.is::<StdoutClosed>())
            || cause.is::<StdoutClosed>()
    })
}

/// Standard output, locked; a closed pipe becomes [`StdoutClosed`].
pub struct Stdout(io::StdoutLock<'static>);

impl Stdout {
    pub fn lock() -> Self {
        Self(io::stdout().lock())
    }
}

fn closed(error: io::Error) -> io::Error {
    if error.kind() == io::ErrorKind::BrokenPipe {
        io::Error::new(io::ErrorKind::BrokenPipe, StdoutClosed)
    } else {
        error
    }
}

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf).map_err(closed)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush().map_err(closed)
    }
}

/// How a command prints its answer.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    /// One JSON document (or one per line, for lists) instead of text.
    pub json: bool,
}

impl Output {
    /// Print `value` as one line of JSON, or as `text` renders it.
    pub fn show<T: Serialize + ?Sized>(
        &self,
        value: &T,
        text: impl FnOnce(&mut dyn Write) -> io::Result<()>,
    ) -> Result<()> {
        let mut out = Stdout::lock();
        if self.json {
            serde_json::to_writer(&mut out, value)?;
            writeln!(out)?;
        } else {
            text(&mut out)?;
        }
        out.flush()?;
        Ok(())
    }

    /// Print `text` as is, or `{key: text}` with `--json`.
    pub fn show_text(&self, key: &str, text: &str) -> Result<()> {
        self.show(&serde_json::json!({ key: text }), |out| write!(out, "{text}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_pipe_is_recognised_through_context() {
        let error = anyhow::Error::from(closed(io::ErrorKind::BrokenPipe.into())).context("listing records");
        assert!(is_stdout_closed(&error));
        let other = anyhow::Error::from(io::Error::from(io::ErrorKind::BrokenPipe)).context("calling the broker");
        assert!(!is_stdout_closed(&other), "a broken socket is not a closed stdout");
    }
}

/// `text` safe to print on a terminal: control characters (newlines, escape sequences)
/// and the marks that reorder text (bidirectional overrides) are written escaped, so a
/// field an outsider chose (a refused request's target, a process's `comm`) cannot forge
/// or erase lines of a listing.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    let hidden = |c: char| {
        c.is_control() || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !text.chars().any(hidden) {
        return text.into();
    }
    text.chars()
        .map(|c| if hidden(c) { c.escape_default().to_string() } else { c.to_string() })
        .collect::<String>()
        .into()
}

#[cfg(test)]
mod printable_tests {
    use super::printable;

    #[test]
    fn control_and_reordering_characters_are_escaped() {
        assert_eq!(printable("plain ümlaut text"), "plain ümlaut text");
        assert_eq!(printable("x\n   999  decision ADMIT"), "x\\n   999  decision ADMIT");
        assert_eq!(printable("\u{1b}[2K\r"), "\\u{1b}[2K\\r");
        assert_eq!(printable("a\u{202e}b"), "a\\u{202e}b");
    }
}
