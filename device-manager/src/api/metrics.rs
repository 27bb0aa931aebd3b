//! `/metrics`: the snapshot in the Prometheus text exposition format (version 0.0.4).
//!
//! Hand-formatted rather than through `prometheus-client`: every value is read from the
//! service's [`Snapshot`] at scrape time (the manager owns the counters; there is nothing to
//! instrument or register here), so a registry would only copy the snapshot into metric
//! objects and back out. The format is a `# HELP`/`# TYPE` pair per family and one
//! `name{label="value"} number` line per sample; label values are escaped as the format says
//! (`\\`, `\"`, `\n`), which [`escape`] does and the unit tests check.
//!
//! Families (all labelled by `idd`; channel families also by `guest` and `kind`):
//!
//! | metric | type | meaning |
//! |---|---|---|
//! | `idd_up` | gauge | 1 while the IDD serves |
//! | `idd_state` | gauge | 1 for the current `state` label |
//! | `idd_restarts_total` | counter | recoveries so far |
//! | `idd_faults_injected_total` | counter | faults injected through the API |
//! | `idd_recovery_outage_seconds_total` | counter | sum of recovery outages |
//! | `idd_last_recovery_phase_seconds` | gauge | last recovery, by `phase` |
//! | `idd_uptime_seconds` | gauge | since the current process started |
//! | `idd_iommu_entries` | gauge | pins the device holds |
//! | `nic_tx_frames_total`, `nic_rx_frames_total`, `nic_tx_dropped_total`, `nic_rx_no_buffer_total`, `nic_rx_dropped_total` | counter | a NIC's device counters (survive IDD restarts) |
//! | `channel_requests_total`, `channel_responses_total` | counter | ring producer indexes |
//! | `channel_in_flight` | gauge | requests without a response |
//! | `channel_failed` | gauge | 1 when the IDD refused the ring |
//! | `guest_running` | gauge | 1 while the guest's process runs |

use std::fmt::Write;

use crate::service::{ChannelStats, IddState, NicCounters, Snapshot};

/// The content type of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Escape a label value.
pub fn escape(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], v: f64) {
        let l: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
            .collect();
        let _ = writeln!(self.0, "{name}{{{}}} {v}", l.join(","));
    }
}

fn secs_us(us: u64) -> f64 {
    us as f64 / 1e6
}

/// A NIC counter family: name, help, and the counter.
type NicFamily = (&'static str, &'static str, fn(&NicCounters) -> u64);

/// Render the snapshot.
pub fn render(s: &Snapshot) -> String {
    let mut o = Out(String::new());
    o.family("idd_up", "gauge", "1 while the IDD serves");
    for i in &s.idds {
        o.sample(
            "idd_up",
            &[("idd", &i.name)],
            f64::from(u8::from(i.state == IddState::Running)),
        );
    }
    o.family("idd_state", "gauge", "1 for the IDD's current state");
    for i in &s.idds {
        let st = serde_json::to_value(i.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        o.sample("idd_state", &[("idd", &i.name), ("state", &st)], 1.0);
    }
    o.family("idd_restarts_total", "counter", "IDD recoveries so far");
    for i in &s.idds {
        o.sample(
            "idd_restarts_total",
            &[("idd", &i.name)],
            f64::from(i.restarts),
        );
    }
    o.family(
        "idd_faults_injected_total",
        "counter",
        "faults injected through the API",
    );
    for i in &s.idds {
        o.sample(
            "idd_faults_injected_total",
            &[("idd", &i.name)],
            i.faults_injected as f64,
        );
    }
    o.family(
        "idd_recovery_outage_seconds_total",
        "counter",
        "sum of recovery outages (fault to first response)",
    );
    for i in &s.idds {
        o.sample(
            "idd_recovery_outage_seconds_total",
            &[("idd", &i.name)],
            secs_us(i.outage_total_us),
        );
    }
    o.family(
        "idd_last_recovery_phase_seconds",
        "gauge",
        "the last recovery's phases",
    );
    for i in &s.idds {
        if let Some(r) = &i.last_recovery {
            for (phase, v) in [
                ("detect", r.detect_us),
                ("revoke", r.revoke_us),
                ("spawn", r.spawn_us),
                ("reattach", r.reattach_us),
                ("first_response", r.first_response_us),
                ("outage", r.outage_us),
            ] {
                o.sample(
                    "idd_last_recovery_phase_seconds",
                    &[("idd", &i.name), ("phase", phase)],
                    secs_us(v),
                );
            }
        }
    }
    o.family(
        "idd_uptime_seconds",
        "gauge",
        "time since the IDD's current process started",
    );
    for i in &s.idds {
        o.sample(
            "idd_uptime_seconds",
            &[("idd", &i.name)],
            i.uptime_ms as f64 / 1e3,
        );
    }
    o.family(
        "idd_iommu_entries",
        "gauge",
        "IOMMU entries (pins) the device holds",
    );
    for i in &s.idds {
        o.sample(
            "idd_iommu_entries",
            &[("idd", &i.name)],
            i.iommu_entries as f64,
        );
    }
    // A NIC's device counters, one family per counter, labelled by `idd`.
    let nic_families: [NicFamily; 5] = [
        (
            "nic_tx_frames_total",
            "frames the NIC put on the wire",
            |c| c.tx_frames,
        ),
        (
            "nic_rx_frames_total",
            "frames the NIC delivered into receive buffers",
            |c| c.rx_frames,
        ),
        (
            "nic_tx_dropped_total",
            "transmits the NIC returned unsent",
            |c| c.tx_dropped,
        ),
        (
            "nic_rx_no_buffer_total",
            "frames dropped for want of a posted receive buffer",
            |c| c.rx_no_buffer,
        ),
        ("nic_rx_dropped_total", "frames dropped as too long", |c| {
            c.rx_dropped
        }),
    ];
    for (name, help, get) in nic_families {
        o.family(name, "counter", help);
        for i in &s.idds {
            if let Some(c) = &i.nic {
                o.sample(name, &[("idd", &i.name)], get(c) as f64);
            }
        }
    }
    o.family(
        "channel_requests_total",
        "counter",
        "requests the guest produced",
    );
    let chans: Vec<_> = s.channels.iter().collect();
    for c in &chans {
        if let ChannelStats::VirtioBlk(b) = &c.stats {
            if let Some(r) = b.requests {
                o.sample(
                    "channel_requests_total",
                    &[("idd", &c.idd), ("guest", &c.guest), ("kind", "virtio-blk")],
                    r as f64,
                );
            }
        }
    }
    o.family(
        "channel_responses_total",
        "counter",
        "responses the IDD produced",
    );
    for c in &chans {
        if let ChannelStats::VirtioBlk(b) = &c.stats {
            if let Some(r) = b.responses {
                o.sample(
                    "channel_responses_total",
                    &[("idd", &c.idd), ("guest", &c.guest), ("kind", "virtio-blk")],
                    r as f64,
                );
            }
        }
    }
    o.family(
        "channel_in_flight",
        "gauge",
        "requests in the ring without a response",
    );
    for c in &chans {
        if let ChannelStats::VirtioBlk(b) = &c.stats {
            if let Some(r) = b.in_flight {
                o.sample(
                    "channel_in_flight",
                    &[("idd", &c.idd), ("guest", &c.guest), ("kind", "virtio-blk")],
                    r as f64,
                );
            }
        }
    }
    o.family(
        "channel_failed",
        "gauge",
        "1 when the IDD refused the channel's ring",
    );
    for c in &chans {
        let kind = match c.stats {
            ChannelStats::VirtioBlk(_) => "virtio-blk",
            ChannelStats::VirtioNet(_) => "virtio-net",
        };
        o.sample(
            "channel_failed",
            &[("idd", &c.idd), ("guest", &c.guest), ("kind", kind)],
            f64::from(u8::from(c.failed)),
        );
    }
    o.family("guest_running", "gauge", "1 while the guest's process runs");
    for g in &s.guests {
        o.sample(
            "guest_running",
            &[("guest", &g.name)],
            f64::from(u8::from(g.running)),
        );
    }
    o.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::{IddView, RecoveryView};

    #[test]
    fn escapes_label_values() {
        assert_eq!(
            escape(
                r#"a"b\c
d"#
            ),
            r#"a\"b\\c\nd"#
        );
    }

    #[test]
    fn every_line_is_a_comment_or_a_sample() {
        let s = Snapshot {
            idds: vec![IddView {
                name: "idd-\"x\"".into(),
                device: "x".into(),
                kind: "virtio-blk".into(),
                domid: Some(1),
                state: IddState::Running,
                reason: None,
                pid: Some(7),
                restarts: 2,
                uptime_ms: 1500,
                faults_injected: 2,
                outage_total_us: 3000,
                last_recovery: Some(RecoveryView {
                    seq: 2,
                    cause: "exited".into(),
                    detect_us: 1,
                    revoke_us: 2,
                    mappings_released: 0,
                    pins_revoked: 0,
                    spawn_us: 3,
                    reattach_us: 4,
                    first_response_us: 5,
                    outage_us: 15,
                }),
                iommu_entries: 3,
                nic: Some(NicCounters {
                    rx_no_buffer: 4,
                    ..Default::default()
                }),
            }],
            ..Snapshot::default()
        };
        let text = render(&s);
        assert!(
            text.contains("nic_rx_no_buffer_total{idd=\"idd-\\\"x\\\"\"} 4\n"),
            "{text}"
        );
        assert!(
            text.contains("idd_restarts_total{idd=\"idd-\\\"x\\\"\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("idd_last_recovery_phase_seconds{idd=\"idd-\\\"x\\\"\",phase=\"outage\"} 0.000015\n"), "{text}");
        for line in text.lines() {
            let ok = line.starts_with("# HELP ")
                || line.starts_with("# TYPE ")
                || (line.contains("} ") && line.rsplit(' ').next().unwrap().parse::<f64>().is_ok());
            assert!(ok, "bad line {line:?}");
        }
    }

    proptest::proptest! {
        /// An escaped value never ends a label early: no bare quote, no newline.
        #[test]
        fn escaped_values_stay_inside_their_quotes(v in "\\PC{0,40}") {
            let e = escape(&v);
            proptest::prop_assert!(!e.contains('\n'));
            let mut chars = e.chars();
            while let Some(c) = chars.next() {
                if c == '\\' {
                    let n = chars.next();
                    proptest::prop_assert!(matches!(n, Some('\\' | '"' | 'n')), "{e}");
                } else {
                    proptest::prop_assert!(c != '"', "{e}");
                }
            }
        }
    }
}
