//! A driver domain's side of the manager's supervision protocol: one line per message on
//! stdout, nothing else there (diagnostics go to stderr). The manager's reader is
//! `device-manager`'s `manager/idd.rs`; each IDD program documents its own heartbeat fields.
//!
//! * `ready`: every channel is attached and served from now on;
//! * `hb N ...`: heartbeat `N` (from 1), at least once per period from the serving loop;
//! * `failed CHAN`: channel `CHAN` can no longer be served (said once per channel);
//! * `standby`: a hot standby is idle and may be promoted.
//!
//! stdout is the manager's pipe. If the reader goes away the guests still need their
//! driver: reporting stops (said once on stderr) and the program keeps serving.

use std::collections::BTreeSet;
use std::fmt::Display;
use std::io::Write;
use std::time::{Duration, Instant};

/// Writes the protocol's lines (see the module docs).
pub struct Reporter {
    program: &'static str,
    on: bool,
    period: Duration,
    beats: u64,
    last_beat: Instant,
    failed: BTreeSet<usize>,
}

impl Reporter {
    /// A reporter for `program` (named in its stderr messages), heartbeats every `period`.
    pub fn new(program: &'static str, period: Duration) -> Self {
        Self {
            program,
            on: true,
            period,
            beats: 0,
            last_beat: Instant::now(),
            failed: BTreeSet::new(),
        }
    }

    /// Print `line` (unless the reader is gone).
    pub fn say(&mut self, line: &str) {
        if !self.on {
            return;
        }
        let mut out = std::io::stdout().lock();
        if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
            eprintln!(
                "{}: stdout: {e}; no more reports, still serving",
                self.program
            );
            self.on = false;
        }
    }

    /// `ready`; heartbeats are counted from now.
    pub fn ready(&mut self) {
        self.say("ready");
        self.last_beat = Instant::now();
    }

    /// Channel `chan` failed because of `why`: `failed CHAN`, once per channel.
    pub fn failed(&mut self, chan: usize, why: &dyn Display) {
        if self.failed.insert(chan) {
            eprintln!("{}: channel {chan} failed: {why}", self.program);
            self.say(&format!("failed {chan}"));
        }
    }

    /// If a period passed since the last heartbeat, print the next one: `line(n)` builds
    /// the whole `hb N ...` line for heartbeat `n`.
    pub fn heartbeat(&mut self, line: impl FnOnce(u64) -> String) {
        if self.last_beat.elapsed() >= self.period {
            self.beats += 1;
            self.last_beat = Instant::now();
            let l = line(self.beats);
            self.say(&l);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_are_numbered_and_paced() {
        let mut r = Reporter::new("test", Duration::ZERO);
        let mut seen = Vec::new();
        r.heartbeat(|n| {
            seen.push(n);
            format!("hb {n}")
        });
        r.heartbeat(|n| {
            seen.push(n);
            format!("hb {n}")
        });
        assert_eq!(seen, [1, 2]);
        let mut slow = Reporter::new("test", Duration::from_secs(3600));
        slow.ready();
        slow.heartbeat(|_| panic!("no heartbeat is due"));
        assert!(slow.failed.is_empty());
        slow.failed(3, &"bad ring");
        slow.failed(3, &"bad ring");
        assert_eq!(slow.failed.len(), 1);
    }
}
