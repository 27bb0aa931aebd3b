//! Bulk traffic: `flood` sends UDP frames of one size as fast as the wire takes them (or at a
//! set rate), `count` receives and counts frames and bytes. Together they are the
//! benchmark's generator and, wired straight to each other over a UDP socket pair, its
//! baseline: the same traffic without an IDD in the path.
//!
//! # Frames
//!
//! A flood frame is Ethernet/IPv4/UDP from `source:src_port` to `target:dst_port` (9, the
//! discard service, by default), `frame_len` bytes in all (Ethernet header included, no
//! FCS: 60 to 1514), its payload starting with a [`ProbeTag`] (run id, frame index) so
//! `count` can tell how many frames of a flood went missing.
//!
//! # Units
//!
//! Bytes are Ethernet frame bytes without preamble and FCS (what the wire and the NIC's
//! queues carry); Mbit/s is `bytes × 8 / seconds / 10^6`. `count` measures from its first
//! frame to its last, so time spent waiting for the flood to start does not dilute the rate.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::frame::{self, Endpoint, FrameError, Mac, Payload, ProbeTag, MAX_FRAME_LEN};
use crate::sched::{Lateness, SchedError, Schedule, Step};
use crate::wire::Transport;

/// Why a flood or count failed.
#[derive(Debug, thiserror::Error)]
pub enum TrafficError {
    /// The frame size is outside what a flood frame can be.
    #[error("Frame size {0} is not in {MIN_FLOOD_FRAME}..={MAX_FRAME_LEN}")]
    FrameSize(usize),
    /// The rate gives no schedule.
    #[error("Bad flood rate")]
    Rate(#[from] SchedError),
    /// Building a frame failed.
    #[error("Cannot build flood frame")]
    Frame(#[from] FrameError),
    /// Receiving from the wire failed.
    #[error("Wire receive failed")]
    Recv(#[source] io::Error),
}

/// Smallest flood frame: the minimum Ethernet frame without FCS.
pub const MIN_FLOOD_FRAME: usize = 60;
/// The discard service's UDP port (RFC 863).
pub const DISCARD_PORT: u16 = 9;
/// Largest single wait, so the stop flag is seen promptly.
const POLL: Duration = Duration::from_millis(20);

/// A flood.
#[derive(Clone, Debug)]
pub struct FloodConfig {
    /// Sender.
    pub source: Endpoint,
    /// Receiver.
    pub target: Endpoint,
    /// UDP source port.
    pub src_port: u16,
    /// UDP destination port (9).
    pub dst_port: u16,
    /// Bytes per frame, Ethernet header included (60..=1514).
    pub frame_len: usize,
    /// Frames per second; `None`: as fast as the wire takes them.
    pub rate: Option<f64>,
    /// How long to send.
    pub duration: Duration,
    /// Stop after this many frames (`None`: the duration decides).
    pub count: Option<u64>,
}

/// What a flood sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FloodReport {
    /// The flood's run id (in every frame's tag).
    pub run: u32,
    /// Frames the wire took.
    pub frames: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Sends the wire refused (not counted in `frames`).
    pub send_errors: u64,
    /// Seconds from the first send to the last.
    pub secs: f64,
    /// Frames per second.
    pub pps: f64,
    /// Megabits per second.
    pub mbps: f64,
}

fn rates(frames: u64, bytes: u64, secs: f64) -> (f64, f64) {
    if secs <= 0.0 {
        return (0.0, 0.0);
    }
    (frames as f64 / secs, bytes as f64 * 8.0 / secs / 1e6)
}

/// Sends the flood `cfg` describes on `wire` until its duration or count, or `stop`.
pub fn flood(
    cfg: &FloodConfig,
    wire: &dyn Transport,
    stop: &AtomicBool,
) -> Result<FloodReport, TrafficError> {
    if !(MIN_FLOOD_FRAME..=MAX_FRAME_LEN).contains(&cfg.frame_len) {
        return Err(TrafficError::FrameSize(cfg.frame_len));
    }
    let data_len = cfg.frame_len - frame::udp_frame_len(0);
    let start = Instant::now();
    let schedule = cfg
        .rate
        .map(|r| Schedule::from_rate(start, r, Lateness::CatchUp))
        .transpose()?;
    let run = start.elapsed().subsec_nanos() ^ std::process::id().rotate_left(16);
    let until = start + cfg.duration;
    let mut report = FloodReport {
        run,
        ..FloodReport::default()
    };
    let mut index = 0u64;
    let mut last_send = start;
    loop {
        if cfg.count.is_some_and(|c| index >= c) || stop.load(Ordering::Relaxed) {
            break;
        }
        let now = Instant::now();
        if now >= until {
            break;
        }
        if let Some(s) = &schedule {
            if let Step::Wait(d) = s.step(index, now) {
                std::thread::sleep(d.min(POLL));
                continue;
            }
        }
        let data = ProbeTag { run, index }.payload(data_len);
        let f = frame::udp(cfg.source, cfg.target, cfg.src_port, cfg.dst_port, &data)?;
        match wire.send(&f) {
            Ok(()) => {
                report.frames += 1;
                report.bytes += f.len() as u64;
            }
            Err(_) => report.send_errors += 1,
        }
        last_send = Instant::now();
        index += 1;
    }
    report.secs = last_send.duration_since(start).as_secs_f64();
    (report.pps, report.mbps) = rates(report.frames, report.bytes, report.secs);
    Ok(report)
}

/// A count.
#[derive(Clone, Debug, Default)]
pub struct CountConfig {
    /// Stop after this long (`None`: the other limits or the stop flag).
    pub duration: Option<Duration>,
    /// Stop after this many frames.
    pub frames: Option<u64>,
    /// Stop when no frame came for this long after the first one.
    pub idle: Option<Duration>,
    /// Count only frames to this MAC (and broadcast/multicast); `None`: every frame.
    pub dst: Option<Mac>,
}

/// What a count saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CountReport {
    /// Frames counted.
    pub frames: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Frames skipped by the destination filter.
    pub filtered: u64,
    /// Counted frames that carried a flood tag.
    pub tagged: u64,
    /// Tagged frames missing from the flood seen most (highest index + 1 − distinct indexes
    /// seen; frames lost at the flood's tail are not visible).
    pub tag_missing: u64,
    /// Seconds from the first frame to the last.
    pub secs: f64,
    /// Frames per second over `secs`.
    pub pps: f64,
    /// Megabits per second over `secs`.
    pub mbps: f64,
}

/// Per flood run: (highest index + 1, distinct indexes seen).
#[derive(Default)]
struct TagSeen {
    end: u64,
    seen: std::collections::HashSet<u64>,
}

/// Receives frames from `wire` and counts them until a limit in `cfg` or `stop`.
pub fn count(
    cfg: &CountConfig,
    wire: &dyn Transport,
    stop: &AtomicBool,
) -> Result<CountReport, TrafficError> {
    let start = Instant::now();
    let until = cfg.duration.map(|d| start + d);
    let mut report = CountReport::default();
    let mut first: Option<Instant> = None;
    let mut last = start;
    let mut runs: HashMap<u32, TagSeen> = HashMap::new();
    let mut buf = vec![0u8; MAX_FRAME_LEN + 64];
    loop {
        if stop.load(Ordering::Relaxed) || cfg.frames.is_some_and(|n| report.frames >= n) {
            break;
        }
        let now = Instant::now();
        if until.is_some_and(|u| now >= u)
            || (first.is_some() && cfg.idle.is_some_and(|i| now - last >= i))
        {
            break;
        }
        let mut wait = POLL;
        if let Some(u) = until {
            wait = wait.min(u - now);
        }
        let Some(n) = wire
            .recv(&mut buf, Some(wait))
            .map_err(TrafficError::Recv)?
        else {
            continue;
        };
        let at = Instant::now();
        let f = &buf[..n];
        if let Some(want) = cfg.dst {
            let dst = f
                .get(..6)
                .and_then(|d| <[u8; 6]>::try_from(d).ok())
                .map(Mac);
            if !dst.is_some_and(|d| d == want || d.is_group()) {
                report.filtered += 1;
                continue;
            }
        }
        first.get_or_insert(at);
        last = at;
        report.frames += 1;
        report.bytes += n as u64;
        if let Ok(frame::Frame {
            payload: Payload::Udp { data, .. },
            ..
        }) = frame::parse(f)
        {
            if let Some(tag) = ProbeTag::from_payload(data) {
                report.tagged += 1;
                let seen = runs.entry(tag.run).or_default();
                // Bound memory against a peer sending arbitrary tags: indexes beyond what a
                // flood could have sent in this count are not tracked.
                if tag.index < report.frames.saturating_mul(1024) {
                    seen.end = seen.end.max(tag.index + 1);
                    seen.seen.insert(tag.index);
                }
            }
        }
    }
    if let Some(first) = first {
        report.secs = last.duration_since(first).as_secs_f64();
    }
    (report.pps, report.mbps) = rates(report.frames, report.bytes, report.secs);
    report.tag_missing = runs
        .values()
        .max_by_key(|s| s.seen.len())
        .map_or(0, |s| s.end - s.seen.len() as u64);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::UdpTransport;
    use std::net::Ipv4Addr;
    use std::sync::Arc;

    fn ep(last: u8) -> Endpoint {
        Endpoint {
            mac: Mac([2, 0, 0, 0, 0, last]),
            ip: Ipv4Addr::new(192, 0, 2, last),
        }
    }

    fn pair() -> (Arc<UdpTransport>, Arc<UdpTransport>) {
        let rx = UdpTransport::bind("127.0.0.1:0".parse().unwrap(), None).unwrap();
        let tx = UdpTransport::bind(
            "127.0.0.1:0".parse().unwrap(),
            Some(rx.local_addr().unwrap()),
        )
        .unwrap();
        (Arc::new(tx), Arc::new(rx))
    }

    fn cfg(len: usize, count: u64) -> FloodConfig {
        FloodConfig {
            source: ep(1),
            target: ep(2),
            src_port: 4000,
            dst_port: DISCARD_PORT,
            frame_len: len,
            rate: Some(5000.0),
            duration: Duration::from_secs(30),
            count: Some(count),
        }
    }

    #[test]
    fn sizes_outside_ethernet_are_refused() {
        let (tx, _) = pair();
        let stop = AtomicBool::new(false);
        for len in [0, 59, 1515] {
            assert!(matches!(
                flood(&cfg(len, 1), &*tx, &stop),
                Err(TrafficError::FrameSize(_))
            ));
        }
    }

    #[test]
    fn flood_frames_have_the_size_and_tags() {
        let (tx, rx) = pair();
        let stop = AtomicBool::new(false);
        let sent = flood(&cfg(60, 3), &*tx, &stop).unwrap();
        assert_eq!((sent.frames, sent.bytes), (3, 180));
        let mut buf = [0u8; 2000];
        for i in 0..3 {
            let n = rx
                .recv(&mut buf, Some(Duration::from_secs(5)))
                .unwrap()
                .unwrap();
            assert_eq!(n, 60);
            match frame::parse(&buf[..n]).unwrap().payload {
                Payload::Udp { dst_port, data, .. } => {
                    assert_eq!(dst_port, DISCARD_PORT);
                    assert_eq!(
                        ProbeTag::from_payload(data),
                        Some(ProbeTag {
                            run: sent.run,
                            index: i
                        })
                    );
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn count_filters_and_reports_missing_tags() {
        let (tx, rx) = pair();
        let stop = AtomicBool::new(false);
        // Frames 0, 1, 3 of a flood reach the counter (2 is "lost"), plus one for another MAC.
        for i in [0u64, 1, 3] {
            let data = ProbeTag { run: 7, index: i }.payload(20);
            tx.send(&frame::udp(ep(1), ep(2), 1, 9, &data).unwrap())
                .unwrap();
        }
        tx.send(&frame::udp(ep(1), ep(3), 1, 9, b"x").unwrap())
            .unwrap();
        let c = CountConfig {
            idle: Some(Duration::from_millis(300)),
            dst: Some(ep(2).mac),
            ..CountConfig::default()
        };
        let r = count(&c, &*rx, &stop).unwrap();
        assert_eq!(
            (r.frames, r.tagged, r.tag_missing, r.filtered),
            (3, 3, 1, 1)
        );
        assert_eq!(r.bytes, 3 * frame::udp_frame_len(20) as u64);
    }
}
