//! What one IDD recovery took, phase by phase, and percentiles over many.
//!
//! The phases (see the crate docs): detect → revoke → spawn → re-attach (journal replay
//! starts) → first response. [`Recovery::outage`] is their sum: from the fault to the first
//! response a guest got from the new process.

use std::fmt;
use std::time::Duration;

/// Why the IDD process was replaced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cause {
    /// The process ended (signal or exit code, as the pidfd reported it).
    Exited(String),
    /// No heartbeat for longer than the deadline; the manager killed it.
    Hung(Duration),
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exited(how) => write!(f, "exited ({how})"),
            Self::Hung(d) => write!(f, "hung (no heartbeat for {} ms)", d.as_millis()),
        }
    }
}

/// One recovery of the IDD.
#[derive(Clone, Debug)]
pub struct Recovery {
    /// 1 for the first recovery of this manager.
    pub seq: u32,
    /// The device whose IDD recovered (policy name).
    pub device: String,
    /// The channel whose refused ring was replaced by a reconnect, when that caused this
    /// recovery (`Manager::reset_channel`).
    pub channel: Option<usize>,
    /// Why.
    pub cause: Cause,
    /// Fault (when injected, else detection) to detection.
    pub detect: Duration,
    /// Releasing mappings and revoking pins and copies.
    pub revoke: Duration,
    /// Mappings released, pins/copies revoked.
    pub revoked: (usize, usize),
    /// Starting the new process.
    pub spawn: Duration,
    /// Until it reported every channel re-attached (`ready`).
    pub reattach: Duration,
    /// Until a guest ring with outstanding requests got a response (or the first heartbeat).
    pub first_response: Duration,
}

impl Recovery {
    /// From the fault to the first response.
    pub fn outage(&self) -> Duration {
        self.detect + self.revoke + self.spawn + self.reattach + self.first_response
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl fmt::Display for Recovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "recovery #{} of {}: {}; detect {:.2} ms, revoke {:.2} ms ({} mappings, {} pins/copies), spawn {:.2} ms, re-attach {:.2} ms, first response {:.2} ms; outage {:.2} ms",
            self.seq,
            self.device,
            self.cause,
            ms(self.detect),
            ms(self.revoke),
            self.revoked.0,
            self.revoked.1,
            ms(self.spawn),
            ms(self.reattach),
            ms(self.first_response),
            ms(self.outage())
        )
    }
}

/// p50, p99 and max of some durations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Percentiles {
    /// Median (nearest rank).
    pub p50: Duration,
    /// 99th percentile (nearest rank).
    pub p99: Duration,
    /// Largest.
    pub max: Duration,
    /// How many.
    pub count: usize,
}

impl Percentiles {
    /// Over `v`; `None` if empty.
    pub fn of(v: &[Duration]) -> Option<Self> {
        if v.is_empty() {
            return None;
        }
        let mut s = v.to_vec();
        s.sort_unstable();
        // Nearest rank: the smallest value with at least p% of the values at or below it.
        let rank = |p: usize| s[(s.len() * p).div_ceil(100).saturating_sub(1)];
        Some(Self {
            p50: rank(50),
            p99: rank(99),
            max: s[s.len() - 1],
            count: s.len(),
        })
    }
}

impl fmt::Display for Percentiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms over {}",
            ms(self.p50),
            ms(self.p99),
            ms(self.max),
            self.count
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_nearest_rank() {
        let v: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        let p = Percentiles::of(&v).unwrap();
        assert_eq!(p.p50, Duration::from_millis(50));
        assert_eq!(p.p99, Duration::from_millis(99));
        assert_eq!(p.max, Duration::from_millis(100));
        assert_eq!(p.count, 100);
        let one = Percentiles::of(&[Duration::from_millis(7)]).unwrap();
        assert_eq!(
            (one.p50, one.p99, one.max),
            (
                Duration::from_millis(7),
                Duration::from_millis(7),
                Duration::from_millis(7)
            )
        );
        assert!(Percentiles::of(&[]).is_none());
    }

    #[test]
    fn outage_is_the_sum_of_phases() {
        let r = Recovery {
            seq: 1,
            device: "disk0".into(),
            channel: None,
            cause: Cause::Hung(Duration::from_millis(300)),
            detect: Duration::from_millis(1),
            revoke: Duration::from_millis(2),
            revoked: (0, 3),
            spawn: Duration::from_millis(3),
            reattach: Duration::from_millis(4),
            first_response: Duration::from_millis(5),
        };
        assert_eq!(r.outage(), Duration::from_millis(15));
        assert!(r
            .to_string()
            .contains("recovery #1 of disk0: hung (no heartbeat for 300 ms)"));
    }
}
