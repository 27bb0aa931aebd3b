//! The transmit credit scheduler: each channel may send "x bytes every y microseconds".
//!
//! # Semantics (those of Linux/Xen netback's `credit_bytes`/`credit_usec`)
//!
//! A channel has a *bucket* of `remaining` bytes and a *window* that started at
//! `window_start`. A packet of `size` bytes may go when `size <= remaining`; sending it takes
//! `size` from the bucket. When a packet does not fit:
//!
//! * if the window has ended (`now >= window_start + period`), a new window starts where the
//!   old one ended (or at `now` after a whole idle period) and the bucket gets `bytes` more, capped at `max(bytes, MAX_BURST)` so that a packet of
//!   up to 128 KiB can always go eventually and an idle channel does not hoard credit;
//! * if the packet still does not fit, it **waits** (it is never dropped): the next window
//!   starts at `window_start + period`, and the caller tries again then
//!   ([`Verdict::WaitUntil`]).
//!
//! So over time a saturating channel sends `bytes` per `period`, and channels share a link
//! in the ratio of their rates. A channel without a [`Credit`] is never limited.
//!
//! # Fairness among channels
//!
//! Netback visits the channels in round robin, a different one first every round, and a
//! channel whose head packet is waiting for credit is skipped without losing its place:
//! [`RoundRobin`] gives the visiting order. A waiting channel is never starved: its window
//! ends at a fixed time, after which its packet fits (the cap is at least the packet size).
//!
//! Time is a `u64` of microseconds from any fixed origin, passed in by the caller, so the
//! scheduler is deterministic under test.

use std::fmt;
use std::str::FromStr;

/// Burst allowance (Linux netback's 128 KiB): the bucket never holds more than
/// `max(bytes, MAX_BURST)`.
pub const MAX_BURST: u64 = 128 * 1024;

/// Why a credit specification was rejected.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum CreditError {
    /// Not `BYTES/USEC`.
    #[error("Credit {0:?} is not BYTES/USEC")]
    Syntax(String),
    /// Zero bytes or a zero period.
    #[error("Credit must have non-zero bytes and period")]
    Zero,
}

/// A rate: `bytes` every `usec` microseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Credit {
    /// Bytes per period (at least 1).
    pub bytes: u64,
    /// Period in microseconds (at least 1).
    pub usec: u64,
}

impl Credit {
    /// A checked rate.
    pub fn new(bytes: u64, usec: u64) -> Result<Self, CreditError> {
        if bytes == 0 || usec == 0 {
            return Err(CreditError::Zero);
        }
        Ok(Self { bytes, usec })
    }
}

impl FromStr for Credit {
    type Err = CreditError;
    /// `BYTES/USEC`, e.g. `125000/1000` (1 Gbit/s).
    fn from_str(s: &str) -> Result<Self, CreditError> {
        let syntax = || CreditError::Syntax(s.to_owned());
        let (b, u) = s.split_once('/').ok_or_else(syntax)?;
        let bytes = b.trim().parse().map_err(|_| syntax())?;
        let usec = u.trim().parse().map_err(|_| syntax())?;
        Self::new(bytes, usec)
    }
}

impl fmt::Display for Credit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.bytes, self.usec)
    }
}

/// What the bucket says about a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Send it now ([`Bucket::charge`] it).
    Send,
    /// Over the credit: try again at this time (microseconds).
    WaitUntil(u64),
}

/// One channel's credit.
#[derive(Clone, Debug)]
pub struct Bucket {
    credit: Option<Credit>,
    remaining: u64,
    window_start: u64,
}

impl Bucket {
    /// A bucket with a full first window starting at `now`; `None`: unlimited.
    pub fn new(credit: Option<Credit>, now: u64) -> Self {
        Self {
            credit,
            remaining: credit.map_or(0, |c| c.bytes),
            window_start: now,
        }
    }

    /// The configured rate.
    pub fn credit(&self) -> Option<Credit> {
        self.credit
    }

    /// May a packet of `size` bytes go at `now`? Replenishes the bucket if its window ended.
    pub fn check(&mut self, size: u64, now: u64) -> Verdict {
        let Some(c) = self.credit else {
            return Verdict::Send;
        };
        if size <= self.remaining {
            return Verdict::Send;
        }
        let next = self.window_start.saturating_add(c.usec);
        if now >= next {
            // A saturated channel keeps its schedule: the new window starts when the old
            // one ended, not when we noticed (a late serving round must not cost it
            // credit, as Linux's timer-driven replenish does not). A channel idle for a
            // whole period or more starts afresh at `now`.
            self.window_start = if now - next < c.usec { next } else { now };
            let cap = c.bytes.max(MAX_BURST);
            self.remaining = self.remaining.saturating_add(c.bytes).min(cap);
        }
        // A packet larger than the cap could never fit: let it go on a full bucket (the
        // next charge empties it) rather than wait forever.
        let cap = c.bytes.max(MAX_BURST);
        if size <= self.remaining || (size > cap && self.remaining == cap) {
            return Verdict::Send;
        }
        Verdict::WaitUntil(self.window_start.saturating_add(c.usec))
    }

    /// Take `size` bytes of credit for a packet that [`Bucket::check`] let go.
    pub fn charge(&mut self, size: u64) {
        if self.credit.is_some() {
            self.remaining = self.remaining.saturating_sub(size);
        }
    }
}

/// The round-robin cursor over `n` channels: each round starts one channel later.
#[derive(Clone, Debug, Default)]
pub struct RoundRobin {
    next: usize,
}

impl RoundRobin {
    /// The visiting order of this round over `n` channels; advances the cursor.
    pub fn round(&mut self, n: usize) -> impl Iterator<Item = usize> {
        let start = if n == 0 { 0 } else { self.next % n };
        self.next = if n == 0 { 0 } else { (start + 1) % n };
        (0..n).map(move |k| (start + k) % n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parse_and_display() {
        let c: Credit = "125000/1000".parse().unwrap();
        assert_eq!((c.bytes, c.usec), (125_000, 1000));
        assert_eq!(c.to_string(), "125000/1000");
        for bad in ["", "1", "1/", "/1", "a/1", "1/b", "-1/5", "1/2/3"] {
            assert!(bad.parse::<Credit>().is_err(), "{bad}");
        }
        assert_eq!("0/5".parse::<Credit>(), Err(CreditError::Zero));
        assert_eq!("5/0".parse::<Credit>(), Err(CreditError::Zero));
    }

    #[test]
    fn a_packet_over_credit_waits_for_the_next_window() {
        let mut b = Bucket::new(Some(Credit::new(1000, 100).unwrap()), 0);
        assert_eq!(b.check(600, 0), Verdict::Send);
        b.charge(600);
        assert_eq!(b.check(600, 10), Verdict::WaitUntil(100));
        assert_eq!(b.check(600, 99), Verdict::WaitUntil(100));
        assert_eq!(b.check(600, 100), Verdict::Send);
        b.charge(600);
        // 400 + 1000 - 600 = 800 left.
        assert_eq!(b.check(800, 100), Verdict::Send);
        b.charge(800);
        assert_eq!(b.check(1, 150), Verdict::WaitUntil(200));
    }

    #[test]
    fn unlimited_and_oversized() {
        let mut u = Bucket::new(None, 0);
        for _ in 0..100 {
            assert_eq!(u.check(65_535, 0), Verdict::Send);
            u.charge(65_535);
        }
        // 10 bytes per period, 200 KiB packet: waits until the bucket is full (capped at
        // MAX_BURST), then goes.
        let mut b = Bucket::new(Some(Credit::new(100_000, 10).unwrap()), 0);
        let big = 200 * 1024;
        let mut t = 0;
        let mut waits = 0;
        while let Verdict::WaitUntil(at) = b.check(big, t) {
            t = at;
            waits += 1;
            assert!(waits < 10, "never sent");
        }
        b.charge(big);
    }

    #[test]
    fn round_robin_starts_one_later_each_round() {
        let mut rr = RoundRobin::default();
        assert_eq!(rr.round(3).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(rr.round(3).collect::<Vec<_>>(), [1, 2, 0]);
        assert_eq!(rr.round(3).collect::<Vec<_>>(), [2, 0, 1]);
        assert_eq!(rr.round(0).count(), 0);
        assert_eq!(rr.round(2).collect::<Vec<_>>(), [0, 1]);
    }

    /// Saturating channels, a batch per channel per visit, simulated time: returns the
    /// bytes each one sent and the longest time any waited between two sends.
    fn simulate(credits: &[(u64, u64)], size: u64, until: u64) -> (Vec<u64>, u64) {
        let mut buckets: Vec<Bucket> = credits
            .iter()
            .map(|&(b, u)| Bucket::new(Some(Credit::new(b, u).unwrap()), 0))
            .collect();
        let mut sent = vec![0u64; credits.len()];
        let mut last = vec![0u64; credits.len()];
        let mut gap = 0;
        let mut rr = RoundRobin::default();
        let mut now = 0;
        while now < until {
            let mut next = u64::MAX;
            let mut any = false;
            for c in rr.round(buckets.len()) {
                // A batch of up to 16 per visit: the link is never what limits a channel.
                for _ in 0..16 {
                    match buckets[c].check(size, now) {
                        Verdict::Send => {
                            buckets[c].charge(size);
                            sent[c] += size;
                            gap = gap.max(now - last[c]);
                            last[c] = now;
                            any = true;
                        }
                        Verdict::WaitUntil(t) => {
                            next = next.min(t);
                            break;
                        }
                    }
                }
            }
            // A round takes 1 µs; with nothing sent, jump to the next window.
            now = if any { now + 1 } else { next.max(now + 1) };
        }
        (sent, gap)
    }

    proptest! {
        #[test]
        fn saturating_channels_share_in_their_credit_ratio(
            rates in proptest::collection::vec((1_000u64..20_000, 100u64..1_000), 2..5),
            size in 64u64..1_500,
        ) {
            let until = 2_000_000;
            let (sent, gap) = simulate(&rates, size, until);
            for (i, &(b, u)) in rates.iter().enumerate() {
                // Expected: b per u, within one packet per window plus one window of slack.
                let expect = until as f64 * b as f64 / u as f64;
                let got = sent[i] as f64;
                let windows = until as f64 / u as f64;
                // Rounding to whole packets loses at most one packet per window.
                let slack = windows * size as f64 + (b + size) as f64;
                prop_assert!(got <= expect + (b + size) as f64, "chan {i}: {got} > {expect}");
                prop_assert!(got >= expect - slack, "chan {i}: {got} < {expect} - {slack}");
            }
            // No starvation: nobody waits longer than two of its windows (plus the visits).
            let longest = rates.iter().map(|&(_, u)| u).max().unwrap_or(0);
            prop_assert!(gap <= 2 * longest + rates.len() as u64);
        }

        #[test]
        fn never_over_the_rate(b in 1u64..10_000, u in 1u64..10_000, size in 1u64..3_000) {
            let (sent, _) = simulate(&[(b, u)], size, 200_000);
            // At most the first bucket, plus one refill per elapsed window (cap permitting).
            let bound = b.max(size) + (200_000 / u + 1) * b + size;
            prop_assert!(sent[0] <= bound);
        }
    }
}
