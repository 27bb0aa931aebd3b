//! Equally spaced send times from a monotonic clock.
//!
//! Slot `n` is due at `start + n × interval`, computed from the start every time (in
//! nanoseconds, so there is no rounding drift), never by sleeping an interval after the last
//! send: a late wake-up delays one send, not all the following ones.
//!
//! When the sender falls behind (it was descheduled past a whole interval), two policies:
//!
//! * [`Lateness::Skip`] (the probe): send only the latest due slot and count the ones passed
//!   over, so probes stay equally spaced on the wire and a stalled sender shows up as skipped
//!   slots, not as a burst that would disturb the inter-arrival series.
//! * [`Lateness::CatchUp`] (the flood at a set rate): send every slot, back to back until
//!   caught up, so the count over the run matches the rate.

use std::time::{Duration, Instant};

/// Why a schedule could not be made.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SchedError {
    /// The rate is not a positive finite number of at most one per nanosecond.
    #[error("Rate {0} per second is not in (0, 1e9]")]
    BadRate(f64),
}

/// What to do when the sender is late (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lateness {
    /// Send the latest due slot only; count the others as skipped.
    Skip,
    /// Send every slot in turn.
    CatchUp,
}

/// The next step of a sender.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing is due for this long.
    Wait(Duration),
    /// Send slot `slot` now; `skipped` earlier slots were passed over; the send is `late`
    /// after the slot's due time.
    Send {
        /// The slot to send.
        slot: u64,
        /// Slots passed over (always 0 with [`Lateness::CatchUp`]).
        skipped: u64,
        /// How late the send is.
        late: Duration,
    },
}

/// Equally spaced slots from `start`.
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    start: Instant,
    interval_ns: u128,
    lateness: Lateness,
}

impl Schedule {
    /// Slots every `interval` (at least 1 ns) from `start`.
    pub fn new(start: Instant, interval: Duration, lateness: Lateness) -> Self {
        Schedule {
            start,
            interval_ns: interval.as_nanos().max(1),
            lateness,
        }
    }

    /// Slots at `rate` per second from `start`.
    pub fn from_rate(start: Instant, rate: f64, lateness: Lateness) -> Result<Self, SchedError> {
        Ok(Self::new(start, interval_of(rate)?, lateness))
    }

    /// The first slot's due time.
    pub fn start(&self) -> Instant {
        self.start
    }

    /// The spacing.
    pub fn interval(&self) -> Duration {
        nanos(self.interval_ns)
    }

    /// When slot `n` is due.
    pub fn due(&self, n: u64) -> Instant {
        self.start + nanos(self.interval_ns * u128::from(n))
    }

    /// The latest slot due at or before `t` (0 before the start).
    pub fn slot_at(&self, t: Instant) -> u64 {
        let since = t.saturating_duration_since(self.start).as_nanos();
        u64::try_from(since / self.interval_ns).unwrap_or(u64::MAX)
    }

    /// What to do at `now` when `next` is the first slot not yet sent or skipped.
    pub fn step(&self, next: u64, now: Instant) -> Step {
        let due = self.due(next);
        if now < due {
            return Step::Wait(due - now);
        }
        let slot = match self.lateness {
            Lateness::CatchUp => next,
            Lateness::Skip => self.slot_at(now).max(next),
        };
        Step::Send {
            slot,
            skipped: slot - next,
            late: now - self.due(slot),
        }
    }
}

/// The interval of `rate` per second.
pub fn interval_of(rate: f64) -> Result<Duration, SchedError> {
    if !(rate.is_finite() && rate > 0.0 && rate <= 1e9) {
        return Err(SchedError::BadRate(rate));
    }
    Ok(Duration::from_secs_f64(1.0 / rate))
}

fn nanos(n: u128) -> Duration {
    let secs = u64::try_from(n / 1_000_000_000).unwrap_or(u64::MAX);
    // The remainder is below 1e9, so it fits.
    let sub = u32::try_from(n % 1_000_000_000).unwrap_or(0);
    Duration::new(secs, sub)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn slots_do_not_drift() {
        let t0 = Instant::now();
        // 200 per second, a day of slots: still exactly n × 5 ms.
        let s = Schedule::from_rate(t0, 200.0, Lateness::Skip).unwrap();
        assert_eq!(s.interval(), 5 * MS);
        let n = 200 * 86_400;
        assert_eq!(s.due(n) - t0, Duration::from_secs(86_400));
        // A rate whose interval is not a whole number of ns: error stays below one ns per slot
        // from the float conversion, not accumulated from sleeping.
        let s = Schedule::from_rate(t0, 3.0, Lateness::Skip).unwrap();
        assert_eq!(s.due(3) - t0, 3 * s.interval());
    }

    #[test]
    fn on_time_waits_then_sends() {
        let t0 = Instant::now();
        let s = Schedule::new(t0, 5 * MS, Lateness::Skip);
        assert_eq!(
            s.step(0, t0),
            Step::Send {
                slot: 0,
                skipped: 0,
                late: Duration::ZERO
            }
        );
        assert_eq!(s.step(1, t0 + MS), Step::Wait(4 * MS));
        assert_eq!(
            s.step(1, t0 + 6 * MS),
            Step::Send {
                slot: 1,
                skipped: 0,
                late: MS
            }
        );
    }

    #[test]
    fn late_sender_skips_or_catches_up() {
        let t0 = Instant::now();
        let now = t0 + 23 * MS; // slots 1..=4 due, slot 4 at 20 ms
        let skip = Schedule::new(t0, 5 * MS, Lateness::Skip);
        assert_eq!(
            skip.step(1, now),
            Step::Send {
                slot: 4,
                skipped: 3,
                late: 3 * MS
            }
        );
        assert_eq!(skip.step(5, now), Step::Wait(2 * MS));
        let catch = Schedule::new(t0, 5 * MS, Lateness::CatchUp);
        assert_eq!(
            catch.step(1, now),
            Step::Send {
                slot: 1,
                skipped: 0,
                late: 18 * MS
            }
        );
        assert_eq!(
            catch.step(4, now),
            Step::Send {
                slot: 4,
                skipped: 0,
                late: 3 * MS
            }
        );
    }

    #[test]
    fn bad_rates_are_refused() {
        for r in [0.0, -1.0, f64::NAN, f64::INFINITY, 2e9] {
            assert!(interval_of(r).is_err(), "{r}");
        }
    }

    proptest! {
        /// Whatever the wake-up times, slots go out in increasing order, each at or after its
        /// due time, and every slot is either sent or counted as skipped.
        #[test]
        fn any_wakeups_account_for_every_slot(interval_us in 1u64..10_000,
                                              wakeups in proptest::collection::vec(0u64..50_000, 1..200),
                                              skip: bool) {
            let t0 = Instant::now();
            let lateness = if skip { Lateness::Skip } else { Lateness::CatchUp };
            let s = Schedule::new(t0, Duration::from_micros(interval_us), lateness);
            let mut now = t0;
            let mut next = 0u64;
            let (mut sent, mut skipped) = (0u64, 0u64);
            for w in wakeups {
                now += Duration::from_micros(w);
                while let Step::Send { slot, skipped: k, late } = s.step(next, now) {
                    prop_assert!(slot >= next);
                    prop_assert_eq!(s.due(slot) + late, now);
                    if !skip { prop_assert_eq!(k, 0); }
                    sent += 1;
                    skipped += k;
                    next = slot + 1;
                }
                prop_assert!(s.due(next) > now);
            }
            prop_assert_eq!(sent + skipped, next);
            prop_assert_eq!(next, s.slot_at(now) + 1);
        }
    }
}
