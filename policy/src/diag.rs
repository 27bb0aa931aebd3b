//! Diagnostics: every problem in a policy file, with its position, and their rendering.
//!
//! A [`Diagnostic`] carries a byte span into the source, the 1-based line and column of the span's
//! start (columns count characters, as editors do), a message, an optional hint and secondary
//! labels (for example the other half of an overlap). [`PolicyErrors`] holds all of them for one
//! file and renders them like a compiler does, through `codespan-reporting`:
//!
//! ```text
//! error: Region of `bob` overlaps the region of `alice` on `disk0`
//!    ┌─ my-policy.toml:13:38
//!    │
//!  9 │ disk = [{ device = "disk0", length = "40MiB" }]
//!    │                                      ------- `alice`'s region (0..40MiB, writable)
//!    ·
//! 13 │ disk = [{ device = "disk0", offset = "32MiB" }]
//!    │                                      ^^^^^^^
//!    │
//!    = hint: writable regions of one disk must not overlap (read-only regions may overlap each other)
//! ```

use std::fmt;
use std::ops::Range;

use codespan_reporting::diagnostic::{Diagnostic as CsDiagnostic, Label};
use codespan_reporting::files::SimpleFile;
use codespan_reporting::term::{self, Config, WriteStyle};

/// What kind of problem a diagnostic reports (stable, for tests and tools).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// The file is not valid TOML.
    Syntax,
    /// A value has the wrong TOML type, or a required key is missing.
    Type,
    /// A key the format does not know.
    UnknownKey,
    /// Two devices or two guests with one name.
    DuplicateName,
    /// Two guest NICs with one MAC address.
    DuplicateMac,
    /// An access entry names a device that is not declared.
    UnknownDevice,
    /// Disk access to a network device or the reverse.
    KindMismatch,
    /// A key that does not apply to this kind of device or wire, or two that exclude each other.
    NotForKind,
    /// A key this device needs is missing.
    Missing,
    /// A size, duration, rate or share that does not parse.
    BadUnit,
    /// A malformed, multicast or all-zero MAC address.
    BadMac,
    /// Another malformed value (IP network, socket address, PCI address, interface name).
    BadValue,
    /// Two regions of one disk overlap and at least one is writable.
    Overlap,
    /// A region that ends past the end of its disk, or is empty.
    PastEnd,
    /// A region offset or length that is not a whole number of 512-byte sectors.
    Misaligned,
    /// The shares on one network device add up to more than its link.
    ShareExceedsLink,
}

/// One problem, with where it is and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Diagnostic {
    /// What kind of problem.
    pub kind: ErrorKind,
    /// Byte range in the source.
    pub span: Range<usize>,
    /// 1-based line of the span's start.
    pub line: usize,
    /// 1-based column (in characters) of the span's start.
    pub column: usize,
    /// What is wrong.
    pub message: String,
    /// What to write instead, if there is something to say.
    pub hint: Option<String>,
    /// Other places involved: (span, what it is).
    pub related: Vec<(Range<usize>, String)>,
}

/// 1-based line and character column of byte `pos` in `src` (clamped to the text).
pub fn line_col(src: &str, pos: usize) -> (usize, usize) {
    let mut pos = pos.min(src.len());
    while !src.is_char_boundary(pos) {
        pos -= 1;
    }
    let before = &src[..pos];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// Collects diagnostics for one source text.
#[derive(Debug)]
pub(crate) struct Sink<'a> {
    src: &'a str,
    pub(crate) diags: Vec<Diagnostic>,
}

impl<'a> Sink<'a> {
    pub(crate) fn new(src: &'a str) -> Self {
        Self {
            src,
            diags: Vec::new(),
        }
    }

    /// Records a problem; returns it so the caller can add related labels.
    pub(crate) fn error(
        &mut self,
        kind: ErrorKind,
        span: Range<usize>,
        message: impl Into<String>,
        hint: Option<String>,
    ) -> &mut Diagnostic {
        let (line, column) = line_col(self.src, span.start);
        self.diags.push(Diagnostic {
            kind,
            span,
            line,
            column,
            message: message.into(),
            hint,
            related: Vec::new(),
        });
        self.diags.last_mut().expect("just pushed")
    }
}

/// Every problem found in one policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyErrors {
    /// The file name used in positions.
    pub file: String,
    /// The source text, for rendering.
    pub source: String,
    /// The problems, in source order.
    pub diagnostics: Vec<Diagnostic>,
}

impl PolicyErrors {
    fn to_codespan(&self, d: &Diagnostic) -> CsDiagnostic<()> {
        let clamp = |r: &Range<usize>| {
            let end = r.end.min(self.source.len());
            r.start.min(end)..end
        };
        let mut labels = vec![Label::primary((), clamp(&d.span))];
        labels.extend(
            d.related
                .iter()
                .map(|(s, m)| Label::secondary((), clamp(s)).with_message(m)),
        );
        let mut cs = CsDiagnostic::error()
            .with_message(&d.message)
            .with_labels(labels);
        if let Some(h) = &d.hint {
            cs = cs.with_notes(vec![format!("hint: {h}")]);
        }
        cs
    }

    /// Renders every diagnostic as plain text (file:line:col, source line, carets, hint).
    pub fn render(&self) -> String {
        let file = SimpleFile::new(&self.file, &self.source);
        let config = Config::default();
        let mut out = String::new();
        for d in &self.diagnostics {
            match term::emit_into_string(&config, &file, &self.to_codespan(d)) {
                Ok(s) => out.push_str(&s),
                // Spans come from our own parser and are clamped; fall back to a one-liner anyway.
                Err(_) => out.push_str(&format!(
                    "{}:{}:{}: {}\n",
                    self.file, d.line, d.column, d.message
                )),
            }
        }
        out.push_str(&format!(
            "{} error(s) in {}\n",
            self.diagnostics.len(),
            self.file
        ));
        out
    }

    /// Renders with styles (colour) into a codespan writer, e.g. a `StylesWriter` over a terminal.
    pub fn render_styled(
        &self,
        w: &mut dyn WriteStyle,
    ) -> Result<(), codespan_reporting::files::Error> {
        let file = SimpleFile::new(&self.file, &self.source);
        let config = Config::default();
        for d in &self.diagnostics {
            term::emit_to_write_style(w, &config, &file, &self.to_codespan(d))?;
        }
        Ok(())
    }

    /// The kinds of all diagnostics, in order (handy in tests).
    pub fn kinds(&self) -> Vec<ErrorKind> {
        self.diagnostics.iter().map(|d| d.kind).collect()
    }
}

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render())
    }
}

impl std::error::Error for PolicyErrors {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_chars() {
        let src = "a = 1\nµb = 2\n";
        assert_eq!(line_col(src, 0), (1, 1));
        assert_eq!(line_col(src, 6), (2, 1));
        // 'b' is after the two-byte 'µ': byte 8, column 2.
        assert_eq!(line_col(src, 8), (2, 2));
        assert_eq!(line_col(src, 7), (2, 1), "inside a char rounds down");
        assert_eq!(line_col(src, 999), (3, 1));
    }

    #[test]
    fn render_shows_position_caret_and_hint() {
        let src = "x = 1\nsize = \"64 parsecs\"\n";
        let mut sink = Sink::new(src);
        sink.error(
            ErrorKind::BadUnit,
            13..25,
            "Unknown unit",
            Some("write 64MiB".into()),
        );
        let e = PolicyErrors {
            file: "p.toml".into(),
            source: src.into(),
            diagnostics: sink.diags,
        };
        let r = e.render();
        assert!(r.contains("p.toml:2:8"), "{r}");
        assert!(r.contains(" ^^^^^^^^^^^^\n"), "{r}");
        assert!(r.contains("hint: write 64MiB"), "{r}");
        assert!(r.contains("size = \"64 parsecs\""), "{r}");
    }
}
