//! A driver domain's side of the manager's *control* protocol: the manager writes one
//! command per line on the IDD's stdin while it serves, and the IDD answers each on stdout
//! (through its [`super::report::Reporter`], the same pipe the supervision lines use).
//!
//! # Wire format
//!
//! ```text
//! manager → IDD (stdin):   ID VERB ARG ...           e.g. `7 credit 1 61440/100000`
//! IDD → manager (stdout):  ctl ID ok
//!                          ctl ID err REASON
//! ```
//!
//! `ID` is a decimal `u64` the manager picks (one per command) so that a late answer to a
//! command it stopped waiting for can never be taken for the answer to the next one. The
//! verbs and their arguments are the program's (each IDD documents its own); this module
//! only splits lines and frames answers.
//!
//! # Why polled, not a thread
//!
//! The sandbox forbids new threads (`clone`) and `fcntl`, so stdin cannot be made
//! non-blocking or read by a helper thread. Instead the serving loop calls
//! [`ControlIn::poll_lines`] once per round: `poll(2)` with a zero timeout, and only if the
//! pipe is readable one `read(2)`, which then returns at once. A closed stdin (`/dev/null`
//! for a program started by hand, or the manager gone) is seen once and never polled again.
//!
//! Lines are bounded ([`MAX_LINE`]): the manager is trusted, but a bug there must cost one
//! refused command, never the IDD's memory.

use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};

/// Longest control line, newline excluded. Longer lines are dropped whole and answered as
/// [`ControlError::TooLong`].
pub const MAX_LINE: usize = 4096;

/// Why a control line could not be taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// The line exceeded [`MAX_LINE`] bytes.
    #[error("control line longer than {MAX_LINE} bytes")]
    TooLong,
    /// The line is not UTF-8.
    #[error("control line is not UTF-8")]
    NotUtf8,
    /// The line does not start with a decimal command id and a verb.
    #[error("control line {0:?} is not `ID VERB ARG...`")]
    Malformed(String),
}

/// One command: its id, verb and arguments (whitespace-separated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The manager's command id (echoed in the answer).
    pub id: u64,
    /// What to do.
    pub verb: String,
    /// Its arguments.
    pub args: Vec<String>,
}

impl Request {
    /// Parse `ID VERB ARG...`.
    pub fn parse(line: &str) -> Result<Self, ControlError> {
        let mut words = line.split_ascii_whitespace();
        let shown = || ControlError::Malformed(line.chars().take(80).collect());
        let id = words
            .next()
            .and_then(|w| w.parse::<u64>().ok())
            .ok_or_else(shown)?;
        let verb = words.next().ok_or_else(shown)?.to_owned();
        Ok(Self {
            id,
            verb,
            args: words.map(str::to_owned).collect(),
        })
    }
}

/// The answer line to command `id`: `ctl ID ok` or `ctl ID err REASON` (the reason on one
/// line, at most 200 characters).
pub fn answer(id: u64, result: &Result<(), String>) -> String {
    match result {
        Ok(()) => format!("ctl {id} ok"),
        Err(e) => {
            let one: String = e
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .take(200)
                .collect();
            format!("ctl {id} err {one}")
        }
    }
}

/// Serve one control line read by [`ControlIn`] (the IDD's side): parse it, `run` the
/// request, say the outcome on stderr (prefixed with `program`) and return the answer line
/// to print. `None` for a line that could not be read or has no id (said on stderr: no
/// answer could be matched to it).
pub fn serve(
    program: &str,
    line: Result<String, ControlError>,
    run: impl FnOnce(&Request) -> Result<(), String>,
) -> Option<String> {
    let req = match line.and_then(|l| Request::parse(&l)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{program}: control: {e}");
            return None;
        }
    };
    let result = run(&req);
    eprintln!(
        "{program}: control {} {}: {result:?}",
        req.verb,
        req.args.join(" ")
    );
    Some(answer(req.id, &result))
}

/// Parse an answer line (the manager's side): `Some((id, result))` for `ctl ID ok|err ...`.
/// The line comes from a driver domain: the reason is cut to 200 characters and stripped of
/// control characters, whatever the IDD printed.
pub fn parse_answer(line: &str) -> Option<(u64, Result<(), String>)> {
    let rest = line.strip_prefix("ctl ")?;
    let (id, rest) = rest.split_once(' ')?;
    let id = id.parse().ok()?;
    match rest.split_once(' ') {
        None if rest == "ok" => Some((id, Ok(()))),
        Some(("err", why)) => Some((
            id,
            Err(why.chars().filter(|c| !c.is_control()).take(200).collect()),
        )),
        None if rest == "err" => Some((id, Err(String::new()))),
        _ => None,
    }
}

/// Splits a byte stream into bounded lines (see [`MAX_LINE`]).
#[derive(Debug, Default)]
pub struct LineBuf {
    buf: Vec<u8>,
    /// The current line already exceeded the bound: drop until its newline.
    overlong: bool,
}

impl LineBuf {
    /// Feed `bytes`; returns every line they complete, in order.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Result<String, ControlError>> {
        let mut out = Vec::new();
        for &b in bytes {
            if b == b'\n' {
                if std::mem::take(&mut self.overlong) {
                    out.push(Err(ControlError::TooLong));
                } else {
                    let line = std::mem::take(&mut self.buf);
                    out.push(String::from_utf8(line).map_err(|_| ControlError::NotUtf8));
                }
                self.buf.clear();
            } else if self.overlong {
                continue;
            } else if self.buf.len() == MAX_LINE {
                self.overlong = true;
                self.buf = Vec::new();
            } else {
                self.buf.push(b);
            }
        }
        out
    }
}

/// The control input: a file descriptor (stdin) read without blocking (module docs).
pub struct ControlIn<R: Read + AsRawFd> {
    input: R,
    lines: LineBuf,
    closed: bool,
}

/// File descriptor 0, read with plain `read(2)`: `std::io::Stdin` keeps its own buffer,
/// which `poll(2)` cannot see (a line left there would wait for the next write).
#[derive(Debug)]
pub struct RawStdin;

impl Read for RawStdin {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        // SAFETY: reads at most `buf.len()` bytes into `buf`, which we borrow mutably.
        let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
        usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
    }
}

impl AsRawFd for RawStdin {
    fn as_raw_fd(&self) -> RawFd {
        0
    }
}

impl ControlIn<RawStdin> {
    /// The process's stdin (never read through `std::io::stdin()` as well).
    pub fn stdin() -> Self {
        Self::new(RawStdin)
    }
}

impl<R: Read + AsRawFd> ControlIn<R> {
    /// Read control lines from `input`.
    pub fn new(input: R) -> Self {
        Self {
            input,
            lines: LineBuf::default(),
            closed: false,
        }
    }

    /// Whether the input ended (or failed): no more commands will come.
    pub fn closed(&self) -> bool {
        self.closed
    }

    /// The lines complete now, without waiting (empty if nothing arrived).
    pub fn poll_lines(&mut self) -> Vec<Result<String, ControlError>> {
        self.wait_lines(0)
    }

    /// The lines complete after waiting up to `timeout_ms` for input (`-1`: until some
    /// arrives or the input ends).
    pub fn wait_lines(&mut self, timeout_ms: i32) -> Vec<Result<String, ControlError>> {
        if self.closed || !readable(self.input.as_raw_fd(), timeout_ms) {
            return Vec::new();
        }
        let mut buf = [0u8; 4096];
        match self.input.read(&mut buf) {
            Ok(0) | Err(_) => {
                self.closed = true;
                Vec::new()
            }
            Ok(n) => self.lines.push(&buf[..n]),
        }
    }
}

/// Whether `fd` has data (or end of file, or an error) to read within `timeout_ms`.
fn readable(fd: RawFd, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid `pollfd` on our stack, count 1.
    let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    r > 0 && p.revents != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    #[test]
    fn serve_answers_lines_with_an_id_only() {
        let ok = |r: &Request| {
            assert_eq!(
                (r.verb.as_str(), r.args.as_slice()),
                ("credit", &["1".to_owned()][..])
            );
            Ok(())
        };
        assert_eq!(
            serve("t", Ok("5 credit 1".into()), ok),
            Some("ctl 5 ok".into())
        );
        assert_eq!(
            serve("t", Ok("6 x".into()), |_| Err("no".into())),
            Some("ctl 6 err no".into())
        );
        assert_eq!(serve("t", Ok("credit 1".into()), |_| unreachable!()), None);
        assert_eq!(
            serve("t", Err(ControlError::TooLong), |_| unreachable!()),
            None
        );
    }

    #[test]
    fn requests_and_answers() {
        let r = Request::parse("7 credit 1 61440/100000").unwrap();
        assert_eq!((r.id, r.verb.as_str()), (7, "credit"));
        assert_eq!(r.args, ["1", "61440/100000"]);
        assert!(Request::parse("credit 1").is_err());
        assert!(Request::parse("7").is_err());
        assert!(Request::parse("").is_err());
        assert!(Request::parse("-1 x").is_err());
        assert_eq!(answer(3, &Ok(())), "ctl 3 ok");
        assert_eq!(answer(3, &Err("no\nway".into())), "ctl 3 err no way");
        assert_eq!(parse_answer("ctl 3 ok"), Some((3, Ok(()))));
        assert_eq!(
            parse_answer("ctl 4 err no way"),
            Some((4, Err("no way".into())))
        );
        assert_eq!(parse_answer("hb 3 ctl"), None);
        assert_eq!(parse_answer("ctl x ok"), None);
        assert_eq!(parse_answer("ctl 3 okay"), None);
    }

    #[test]
    fn lines_are_bounded_and_split_across_reads() {
        let mut l = LineBuf::default();
        assert!(l.push(b"1 cre").is_empty());
        assert_eq!(
            l.push(b"dit 0 none\n2 x\n"),
            [Ok("1 credit 0 none".into()), Ok("2 x".into())]
        );
        let long = vec![b'a'; MAX_LINE + 10];
        assert!(l.push(&long).is_empty());
        assert_eq!(
            l.push(b"\n3 y\n"),
            [Err(ControlError::TooLong), Ok("3 y".into())]
        );
        assert_eq!(l.push(b"\xff\n"), [Err(ControlError::NotUtf8)]);
    }

    #[test]
    fn polling_never_blocks_and_sees_the_end() {
        let (mut w, r) = UnixStream::pair().unwrap();
        let mut c = ControlIn::new(r);
        assert!(c.poll_lines().is_empty(), "nothing written: no wait");
        w.write_all(b"1 go\n2 half").unwrap();
        assert_eq!(c.poll_lines(), [Ok("1 go".into())]);
        assert!(c.poll_lines().is_empty());
        w.write_all(b"\n").unwrap();
        assert_eq!(c.poll_lines(), [Ok("2 half".into())]);
        drop(w);
        assert!(c.poll_lines().is_empty());
        assert!(c.closed());
    }

    proptest! {
        #[test]
        fn hostile_bytes_never_panic_and_lines_stay_bounded(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..3000), 0..8)
        ) {
            let mut l = LineBuf::default();
            for c in &chunks {
                for line in l.push(c).into_iter().flatten() {
                    prop_assert!(line.len() <= MAX_LINE);
                    prop_assert!(!line.contains('\n'));
                    let _ = Request::parse(&line);
                }
            }
        }

        #[test]
        fn hostile_answers_are_bounded(line in "\\PC{0,1000}") {
            if let Some((_, Err(why))) = parse_answer(&format!("ctl 1 err {line}")) {
                prop_assert!(why.chars().count() <= 200);
            }
            let _ = parse_answer(&line);
        }

        #[test]
        fn answers_round_trip(id in any::<u64>(), why in proptest::option::of(".{0,300}")) {
            let r = why.map_or(Ok(()), Err);
            let line = answer(id, &r);
            prop_assert!(!line.contains('\n'));
            let (got_id, got) = parse_answer(&line).unwrap();
            prop_assert_eq!(got_id, id);
            prop_assert_eq!(got.is_ok(), r.is_ok());
        }

        #[test]
        fn requests_round_trip(id in any::<u64>(), verb in "[a-z]{1,10}", args in proptest::collection::vec("[!-~]{1,20}", 0..5)) {
            let line = format!("{id} {verb} {}", args.join(" "));
            let r = Request::parse(&line).unwrap();
            prop_assert_eq!(r, Request { id, verb, args });
        }
    }
}
