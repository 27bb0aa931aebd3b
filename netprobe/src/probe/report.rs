//! What a probe run found: per-probe records, reply inter-arrival times, outages.
//!
//! Everything here is pure computation over a run's records (times in seconds since the first
//! probe's due time), so it is tested on synthetic series.
//!
//! # Outages
//!
//! The reference points are the arrivals of replies, in arrival order, preceded by the first
//! probe's send time (so a run whose first replies are late starts with an outage too). A gap
//! between two consecutive reference points longer than the threshold (by default 3 probe
//! intervals: at 200 probes/s, 15 ms) is an outage; its duration is the gap, as the seed paper
//! measures it (the time with no reply, one probe interval included). Its lost probes are the
//! unanswered probes sent after the probe whose reply opened the gap and before the one whose
//! reply closed it. If replies stop for good, the gap from the last reply to the end of
//! sending is an *open* outage (`end_s` absent). Losses outside any outage (a single dropped
//! probe) count in the totals only.

use serde::{Deserialize, Serialize};

/// One probe.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProbeRecord {
    /// Its slot in the schedule (probe index on the wire).
    pub index: u64,
    /// When it was sent.
    pub sent_s: f64,
    /// When its (first) reply arrived.
    pub reply_s: Option<f64>,
}

/// A labelled instant (a crash, a restart) shown on the plot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Mark {
    /// What happened.
    pub label: String,
    /// When, in seconds since the first probe.
    pub t_s: f64,
}

/// A time with no replies longer than the threshold.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Outage {
    /// The last reply before it (or the first send).
    pub start_s: f64,
    /// The first reply after it; absent when replies never came back.
    pub end_s: Option<f64>,
    /// Its length in milliseconds.
    pub duration_ms: f64,
    /// Probes sent during it that got no reply.
    pub probes_lost: u64,
}

/// The outages a mark (a crash) caused.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MarkOutage {
    /// The mark's label.
    pub label: String,
    /// The mark's time.
    pub t_s: f64,
    /// Outages that ended after this mark and no later than the next one.
    pub outages: u64,
    /// Their total length in milliseconds (0: recovered within the threshold).
    pub outage_ms: f64,
    /// Probes lost in them.
    pub lost: u64,
}

/// Order statistics of a series (nearest-rank percentiles).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Values.
    pub n: u64,
    /// Smallest.
    pub min: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

impl Stats {
    /// The statistics of `values` (all zero when empty; NaNs are ignored).
    pub fn of(values: impl IntoIterator<Item = f64>) -> Stats {
        let mut v: Vec<f64> = values.into_iter().filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return Stats::default();
        }
        v.sort_by(f64::total_cmp);
        let rank = |pct: usize| {
            // Nearest rank: the smallest value with at least pct % of the values at or below
            // it, rank ceil(pct × n / 100) counted from 1.
            let r = (pct * v.len()).div_ceil(100);
            v[r.clamp(1, v.len()) - 1]
        };
        Stats {
            n: v.len() as u64,
            min: v[0],
            p50: rank(50),
            p90: rank(90),
            p99: rank(99),
            max: v[v.len() - 1],
            mean: v.iter().sum::<f64>() / v.len() as f64,
        }
    }
}

/// How the run was set up (copied into the report so it stands alone).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    /// `icmp` or `udp:PORT`.
    pub mode: String,
    /// Probes per second.
    pub rate: f64,
    /// Outage threshold in milliseconds.
    pub threshold_ms: f64,
    /// Source `MAC/IP`.
    pub source: String,
    /// Target `MAC/IP`.
    pub target: String,
    /// The wire.
    pub wire: String,
}

/// Counters the run loop keeps besides the records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunCounters {
    /// Schedule slots passed over because the sender was late (not sent, not lost).
    pub skipped: u64,
    /// Sends the wire refused (counted as lost probes too: they have no reply).
    pub send_errors: u64,
    /// Receives that failed (the wire's interface down, a socket error).
    #[serde(default)]
    pub recv_errors: u64,
    /// Replies to a probe that already had one.
    pub duplicates: u64,
    /// Frames that were not replies to this run (other traffic, malformed frames).
    pub foreign: u64,
    /// ARP requests for our address we answered.
    pub arp_answered: u64,
    /// Largest lateness of a send after its due time, in milliseconds.
    pub max_send_late_ms: f64,
}

/// A probe run's results (JSON via serde).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProbeReport {
    /// The setup.
    pub run: RunInfo,
    /// Probes sent.
    pub sent: u64,
    /// Probes answered.
    pub received: u64,
    /// Probes not answered.
    pub lost: u64,
    /// From the first probe to the end of sending, in seconds.
    pub duration_s: f64,
    /// Other counters.
    pub counters: RunCounters,
    /// Round-trip times in milliseconds.
    pub rtt_ms: Stats,
    /// Reply inter-arrival times in milliseconds.
    pub inter_arrival_ms: Stats,
    /// Outage durations in milliseconds.
    pub outage_ms: Stats,
    /// The outages in time order.
    pub outages: Vec<Outage>,
    /// Marks (crashes) in time order.
    pub marks: Vec<Mark>,
    /// Per mark, the outages it caused (see [`per_mark`]).
    #[serde(default)]
    pub per_mark: Vec<MarkOutage>,
    /// Every probe in send order.
    pub probes: Vec<ProbeRecord>,
}

impl ProbeReport {
    /// Builds the report from a run's records (`probes` in send order) and `end_s`, the end
    /// of sending; `interval_s` is the probe interval, `threshold_s` the outage threshold.
    pub fn analyze(
        run: RunInfo,
        probes: Vec<ProbeRecord>,
        mut marks: Vec<Mark>,
        counters: RunCounters,
        end_s: f64,
        threshold_s: f64,
    ) -> ProbeReport {
        marks.sort_by(|a, b| a.t_s.total_cmp(&b.t_s));
        let sent = probes.len() as u64;
        let received = probes.iter().filter(|p| p.reply_s.is_some()).count() as u64;
        let rtt_ms = Stats::of(
            probes
                .iter()
                .filter_map(|p| p.reply_s.map(|r| (r - p.sent_s) * 1e3)),
        );
        let arrivals = arrivals(&probes);
        let inter_arrival_ms = Stats::of(arrivals.windows(2).map(|w| (w[1].0 - w[0].0) * 1e3));
        let outages = find_outages(&probes, &arrivals, end_s, threshold_s);
        ProbeReport {
            run,
            sent,
            received,
            lost: sent - received,
            duration_s: end_s,
            counters,
            rtt_ms,
            inter_arrival_ms,
            outage_ms: Stats::of(outages.iter().map(|o| o.duration_ms)),
            per_mark: per_mark(&marks, &outages, end_s),
            outages,
            marks,
            probes,
        }
    }

    /// `(arrival time s, inter-arrival ms)` for every reply after the first, in arrival order.
    pub fn inter_arrivals(&self) -> Vec<(f64, f64)> {
        arrivals(&self.probes)
            .windows(2)
            .map(|w| (w[1].0, (w[1].0 - w[0].0) * 1e3))
            .collect()
    }

    /// Unanswered probes that are not inside any outage.
    pub fn isolated_losses(&self) -> u64 {
        self.lost - self.outages.iter().map(|o| o.probes_lost).sum::<u64>()
    }
}

/// Attributes each outage to the last mark at or before its end (an open outage ends at
/// `end_s`): a crash's outage starts at the last reply before the crash, a little before the
/// mark, and ends when replies resume, before the next crash. Outages before the first mark
/// belong to none.
pub fn per_mark(marks: &[Mark], outages: &[Outage], end_s: f64) -> Vec<MarkOutage> {
    let mut out: Vec<MarkOutage> = marks
        .iter()
        .map(|m| MarkOutage {
            label: m.label.clone(),
            t_s: m.t_s,
            outages: 0,
            outage_ms: 0.0,
            lost: 0,
        })
        .collect();
    for o in outages {
        let end = o.end_s.unwrap_or(end_s);
        // `marks` is sorted by time: the last one at or before `end`.
        let Some(i) = marks.partition_point(|m| m.t_s <= end).checked_sub(1) else {
            continue;
        };
        let m = &mut out[i];
        m.outages += 1;
        m.outage_ms += o.duration_ms;
        m.lost += o.probes_lost;
    }
    out
}

/// `(arrival s, probe index)` of every reply, in arrival order.
fn arrivals(probes: &[ProbeRecord]) -> Vec<(f64, u64)> {
    let mut a: Vec<(f64, u64)> = probes
        .iter()
        .filter_map(|p| p.reply_s.map(|r| (r, p.index)))
        .collect();
    a.sort_by(|x, y| x.0.total_cmp(&y.0));
    a
}

fn find_outages(
    probes: &[ProbeRecord],
    arrivals: &[(f64, u64)],
    end_s: f64,
    threshold_s: f64,
) -> Vec<Outage> {
    let Some(first) = probes.first() else {
        return Vec::new();
    };
    // Lost probes sent strictly between probe indexes `after` (None: from the start) and
    // `before` (None: to the end).
    let lost_between = |after: Option<u64>, before: Option<u64>| {
        probes
            .iter()
            .filter(|p| p.reply_s.is_none())
            .filter(|p| after.is_none_or(|a| p.index > a) && before.is_none_or(|b| p.index < b))
            .count() as u64
    };
    let mut out = Vec::new();
    let mut prev: (f64, Option<u64>) = (first.sent_s, None);
    for &(t, index) in arrivals {
        if t - prev.0 > threshold_s {
            out.push(Outage {
                start_s: prev.0,
                end_s: Some(t),
                duration_ms: (t - prev.0) * 1e3,
                probes_lost: lost_between(prev.1, Some(index)),
            });
        }
        // A reordered reply (index below the last) keeps the later index as the boundary.
        let idx = prev.1.map_or(index, |p| p.max(index));
        prev = (t, Some(idx));
    }
    if end_s - prev.0 > threshold_s {
        let lost = lost_between(prev.1, None);
        if lost > 0 {
            out.push(Outage {
                start_s: prev.0,
                end_s: None,
                duration_ms: (end_s - prev.0) * 1e3,
                probes_lost: lost,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const IV: f64 = 0.005;

    /// Probes every 5 ms with a 1 ms RTT, replies missing for the indexes in `lost`.
    fn series(n: u64, lost: impl Fn(u64) -> bool) -> Vec<ProbeRecord> {
        (0..n)
            .map(|i| {
                let sent = i as f64 * IV;
                ProbeRecord {
                    index: i,
                    sent_s: sent,
                    reply_s: (!lost(i)).then_some(sent + 0.001),
                }
            })
            .collect()
    }

    fn analyze(p: Vec<ProbeRecord>) -> ProbeReport {
        let end = p.len() as f64 * IV;
        ProbeReport::analyze(
            RunInfo::default(),
            p,
            vec![],
            RunCounters::default(),
            end,
            3.0 * IV,
        )
    }

    #[test]
    fn steady_series_has_no_outage() {
        let r = analyze(series(1000, |_| false));
        assert_eq!((r.sent, r.received, r.lost), (1000, 1000, 0));
        assert!(r.outages.is_empty());
        assert!((r.inter_arrival_ms.p50 - 5.0).abs() < 1e-9);
        assert!((r.rtt_ms.max - 1.0).abs() < 1e-9);
    }

    #[test]
    fn one_gap_is_one_outage_with_its_losses() {
        // 60 probes (300 ms) lost from index 200.
        let r = analyze(series(1000, |i| (200..260).contains(&i)));
        assert_eq!(r.lost, 60);
        assert_eq!(r.outages.len(), 1);
        let o = &r.outages[0];
        assert_eq!(o.probes_lost, 60);
        // Last reply: probe 199; next: probe 260; gap 61 intervals.
        assert!((o.duration_ms - 305.0).abs() < 1e-6, "{o:?}");
        assert!((o.start_s - (199.0 * IV + 0.001)).abs() < 1e-9);
        assert_eq!(r.isolated_losses(), 0);
        assert!((r.inter_arrival_ms.max - 305.0).abs() < 1e-6);
    }

    #[test]
    fn short_gaps_are_isolated_losses_not_outages() {
        // Two lost in a row: a 15 ms gap, not above the 15 ms threshold.
        let r = analyze(series(100, |i| i == 10 || i == 11 || i == 50));
        assert!(r.outages.is_empty());
        assert_eq!(r.lost, 3);
        assert_eq!(r.isolated_losses(), 3);
    }

    #[test]
    fn silent_start_and_silent_end_are_outages() {
        let r = analyze(series(100, |i| !(10..90).contains(&i)));
        assert_eq!(r.outages.len(), 2);
        assert_eq!(r.outages[0].probes_lost, 10);
        assert_eq!(r.outages[0].start_s, 0.0);
        assert_eq!(r.outages[1].probes_lost, 10);
        assert_eq!(r.outages[1].end_s, None);
        let r = analyze(series(100, |_| true));
        assert_eq!(r.outages.len(), 1);
        assert_eq!(r.outages[0].probes_lost, 100);
    }

    #[test]
    fn outages_are_attributed_to_the_mark_before_their_end() {
        let o = |start_s: f64, end_s: Option<f64>| Outage {
            start_s,
            end_s,
            duration_ms: 1.0,
            probes_lost: 2,
        };
        let m = |t_s: f64| Mark {
            label: format!("{t_s}"),
            t_s,
        };
        let marks = [m(1.0), m(2.0), m(3.0)];
        // Before any mark; crash 1's (starts just before it); none for crash 2; crash 3's
        // open outage.
        let outages = [o(0.1, Some(0.2)), o(0.99, Some(1.3)), o(3.1, None)];
        let pm = per_mark(&marks, &outages, 4.0);
        let got: Vec<(u64, u64)> = pm.iter().map(|p| (p.outages, p.lost)).collect();
        assert_eq!(got, [(1, 2), (0, 0), (1, 2)]);
        assert!(per_mark(&[], &outages, 4.0).is_empty());
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let s = Stats::of((1..=100).map(f64::from));
        assert_eq!(
            (s.min, s.p50, s.p90, s.p99, s.max),
            (1.0, 50.0, 90.0, 99.0, 100.0)
        );
        assert_eq!(Stats::of([7.0]).p99, 7.0);
        assert_eq!(Stats::of([]), Stats::default());
        assert_eq!(Stats::of([f64::NAN, 2.0]).n, 1);
    }

    #[test]
    fn report_round_trips_through_json() {
        let mut r = analyze(series(50, |i| (20..30).contains(&i)));
        r.marks.push(Mark {
            label: "crash 1".into(),
            t_s: 0.1,
        });
        let back: ProbeReport = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        // serde_json's float parsing may differ in the last bit; compare the shape and values.
        assert_eq!(
            (back.sent, back.lost, back.marks.len()),
            (r.sent, r.lost, 1)
        );
        assert_eq!(back.outages.len(), r.outages.len());
        assert_eq!(back.outages[0].probes_lost, r.outages[0].probes_lost);
        assert!((back.outages[0].duration_ms - r.outages[0].duration_ms).abs() < 1e-9);
        for (a, b) in back.probes.iter().zip(&r.probes) {
            assert_eq!(a.index, b.index);
            assert!((a.sent_s - b.sent_s).abs() < 1e-12);
            assert_eq!(a.reply_s.is_some(), b.reply_s.is_some());
        }
    }

    proptest! {
        /// Every lost probe is counted once: in one outage or as isolated; outages do not
        /// overlap and each is longer than the threshold.
        #[test]
        fn losses_are_accounted_once(lost in proptest::collection::btree_set(0u64..400, 0..200)) {
            let r = analyze(series(400, |i| lost.contains(&i)));
            prop_assert_eq!(r.lost, lost.len() as u64);
            let in_outages: u64 = r.outages.iter().map(|o| o.probes_lost).sum();
            prop_assert!(in_outages <= r.lost);
            for w in r.outages.windows(2) {
                prop_assert!(w[0].end_s.unwrap() <= w[1].start_s);
            }
            for o in &r.outages {
                prop_assert!(o.duration_ms > 15.0 - 1e-9);
                prop_assert!(o.probes_lost >= 1);
            }
        }
    }
}
