//! Equally spaced echo probes from the wire's far side, as in the seed paper's recovery
//! experiment (Fraser et al., Figure 6: a host sends 200 probes per second to a guest whose
//! network driver domain is crashed every few seconds, and plots reply inter-arrival times).
//!
//! # Protocol
//!
//! The probe sends from `source` (its MAC and IPv4 address) to the target every interval
//! (slot `n` due at `start + n / rate`, see [`crate::sched`]; slots passed over by a late
//! sender are counted as skipped, not sent): an ICMP echo request (id = low 16 bits of the
//! run id, seq = slot mod 2^16), or a UDP datagram to port 7 (from port 49152 + run id mod
//! 16384). The payload starts with a [`ProbeTag`] (run id, slot) that the echo returns, so
//! replies are matched by slot even after the 16-bit sequence wraps. A reply is an ICMP echo
//! reply or UDP datagram from the target's IP to ours whose tag has our run id; the first
//! reply per probe counts, later ones are duplicates.
//!
//! Meanwhile the probe behaves as a host: it answers ARP requests for its own address (a
//! Linux guest asks before it replies). If the target MAC is not given, it is resolved by ARP
//! before the first probe.
//!
//! After sending stops (duration, count, or the caller's stop flag), the probe keeps
//! receiving for `linger` (or until every probe is answered) and builds the
//! [`ProbeReport`] ([`report`] explains outages).
//!
//! Another thread marks events (crashes) through a [`ProbeHandle`]; they are kept with the
//! report and drawn on the plot.

pub mod report;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etherparse::ArpOperation;

use crate::frame::{self, Endpoint, FrameError, Mac, Payload, ProbeTag, MAX_FRAME_LEN};
use crate::sched::{self, Lateness, SchedError, Schedule, Step};
use crate::wire::{self, Transport, WireError, WireSpec};
pub use report::{Mark, MarkOutage, Outage, ProbeRecord, ProbeReport, RunCounters, RunInfo, Stats};

/// Why a probe run failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// A configuration value is out of range.
    #[error("Bad probe configuration: {0}")]
    BadConfig(String),
    /// The rate gives no schedule.
    #[error("Bad probe rate")]
    Rate(#[from] SchedError),
    /// The target's MAC could not be resolved by ARP.
    #[error("No ARP reply from {0}")]
    Unresolved(Ipv4Addr),
    /// Building a probe frame failed.
    #[error("Cannot build probe frame")]
    Frame(#[from] FrameError),
    /// The wire could not be opened.
    #[error("Cannot open the wire")]
    Wire(#[from] WireError),
}

/// What the probes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeMode {
    /// ICMP echo requests.
    Icmp,
    /// UDP datagrams to this port (7: the echo service).
    Udp {
        /// Destination port.
        port: u16,
    },
}

/// A probe run's configuration.
#[derive(Clone, Debug)]
pub struct ProbeConfig {
    /// Our MAC and IP.
    pub source: Endpoint,
    /// The target's IP.
    pub target_ip: Ipv4Addr,
    /// The target's MAC; `None`: resolved by ARP first.
    pub target_mac: Option<Mac>,
    /// ICMP or UDP.
    pub mode: ProbeMode,
    /// Probes per second (200).
    pub rate: f64,
    /// Bytes of ICMP/UDP payload (at least [`ProbeTag::LEN`]; 56 like ping).
    pub payload_len: usize,
    /// A reply gap longer than this many intervals is an outage (3).
    pub threshold_intervals: f64,
    /// Stop sending after this long (`None`: until the count or the stop flag).
    pub duration: Option<Duration>,
    /// Stop sending after this many slots (`None`: until the duration or the stop flag).
    pub count: Option<u64>,
    /// Keep receiving this long after the last probe (1 s).
    pub linger: Duration,
    /// Give up resolving the target MAC after this long (3 s).
    pub resolve_timeout: Duration,
}

impl ProbeConfig {
    /// ICMP probes at 200/s from `source` to `target_ip`, until stopped.
    pub fn new(source: Endpoint, target_ip: Ipv4Addr) -> Self {
        ProbeConfig {
            source,
            target_ip,
            target_mac: None,
            mode: ProbeMode::Icmp,
            rate: 200.0,
            payload_len: 56,
            threshold_intervals: 3.0,
            duration: None,
            count: None,
            linger: Duration::from_secs(1),
            resolve_timeout: Duration::from_secs(3),
        }
    }
}

/// Lets another thread mark events and watch progress while a probe runs.
#[derive(Clone, Debug, Default)]
pub struct ProbeHandle {
    marks: Arc<Mutex<Vec<(Instant, String)>>>,
    received: Arc<AtomicU64>,
}

impl ProbeHandle {
    /// Marks `label` now.
    pub fn mark(&self, label: impl Into<String>) {
        self.mark_at(label, Instant::now());
    }

    /// Marks `label` at `at` (an instant recorded elsewhere, e.g. a crash's).
    pub fn mark_at(&self, label: impl Into<String>, at: Instant) {
        self.marks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((at, label.into()));
    }

    /// Replies received so far in the current run.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

/// A probe ready to run over a wire.
pub struct Probe {
    cfg: ProbeConfig,
    wire: Arc<dyn Transport>,
    handle: ProbeHandle,
    run_id: u32,
}

/// Longest single wait, so the stop flag is seen promptly.
const POLL: Duration = Duration::from_millis(20);
/// Spacing of ARP requests while resolving the target.
const ARP_RETRY: Duration = Duration::from_millis(200);

impl Probe {
    /// Checks `cfg` and prepares a run over `wire`.
    pub fn new(cfg: ProbeConfig, wire: Arc<dyn Transport>) -> Result<Probe, ProbeError> {
        sched::interval_of(cfg.rate)?;
        if !(cfg.threshold_intervals.is_finite() && cfg.threshold_intervals >= 1.0) {
            return Err(ProbeError::BadConfig(
                "threshold must be at least one interval".into(),
            ));
        }
        let max_payload = MAX_FRAME_LEN - frame::udp_frame_len(0);
        if cfg.payload_len > max_payload {
            return Err(ProbeError::BadConfig(format!(
                "payload above {max_payload} bytes"
            )));
        }
        Ok(Probe {
            cfg,
            wire,
            handle: ProbeHandle::default(),
            run_id: fresh_run_id(),
        })
    }

    /// Opens the wire `spec` names and prepares a run over it.
    pub fn open(cfg: ProbeConfig, spec: &WireSpec) -> Result<Probe, ProbeError> {
        Probe::new(cfg, wire::open(spec)?)
    }

    /// A handle for marks and progress (clone it into other threads).
    pub fn handle(&self) -> ProbeHandle {
        self.handle.clone()
    }

    /// This run's id (in every probe's payload).
    pub fn run_id(&self) -> u32 {
        self.run_id
    }

    /// Runs until the duration or count is reached or `stop` is set, then lingers for late
    /// replies and reports. Fails only when the target cannot be resolved: send and receive
    /// errors of the wire are counted, not fatal, since a wire that misbehaves during a
    /// device restart is part of what the probe measures.
    pub fn run(&self, stop: &AtomicBool) -> Result<ProbeReport, ProbeError> {
        let target_mac = match self.cfg.target_mac {
            Some(m) => m,
            None => self.resolve(stop)?,
        };
        let target = Endpoint {
            mac: target_mac,
            ip: self.cfg.target_ip,
        };
        let mut run = Run::new(self, target);
        let start = Instant::now();
        let schedule = Schedule::from_rate(start, self.cfg.rate, Lateness::Skip)?;
        let send_until = self.cfg.duration.map(|d| start + d);
        let mut next = 0u64;
        let mut buf = vec![0u8; MAX_FRAME_LEN + 64];
        loop {
            let now = Instant::now();
            if stop.load(Ordering::Relaxed)
                || send_until.is_some_and(|u| now >= u)
                || self.cfg.count.is_some_and(|c| next >= c)
            {
                break;
            }
            match schedule.step(next, now) {
                Step::Send {
                    slot,
                    skipped,
                    late,
                } => {
                    if let Some(c) = self.cfg.count.filter(|&c| slot >= c) {
                        // A late sender skipped past the last slot of the run: the slots
                        // left are skipped, nothing beyond the count is sent.
                        run.counters.skipped += c - next;
                        break;
                    }
                    run.counters.skipped += skipped;
                    let late_ms = late.as_secs_f64() * 1e3;
                    run.counters.max_send_late_ms = run.counters.max_send_late_ms.max(late_ms);
                    run.send_probe(slot, start)?;
                    next = slot + 1;
                }
                Step::Wait(d) => run.receive(&mut buf, d.min(POLL), start)?,
            }
        }
        let end = Instant::now();
        let linger_until = end + self.cfg.linger;
        loop {
            let now = Instant::now();
            if now >= linger_until || run.unanswered == 0 {
                break;
            }
            run.receive(&mut buf, (linger_until - now).min(POLL), start)?;
        }
        Ok(run.finish(self, target, start, end, schedule.interval()))
    }

    /// Resolves the target's MAC by ARP.
    fn resolve(&self, stop: &AtomicBool) -> Result<Mac, ProbeError> {
        let request = frame::arp_request(self.cfg.source, self.cfg.target_ip)?;
        let deadline = Instant::now() + self.cfg.resolve_timeout;
        let mut buf = vec![0u8; MAX_FRAME_LEN + 64];
        let mut next_ask = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            if now >= next_ask {
                // A refused send (the device not up yet) is retried with the next request.
                let _ = self.wire.send(&request);
                next_ask = now + ARP_RETRY;
            }
            let wait = (next_ask.min(deadline) - now).min(POLL);
            let Some(n) = recv_or_wait(&*self.wire, &mut buf, wait, &mut 0) else {
                continue;
            };
            let Ok(f) = frame::parse(&buf[..n]) else {
                continue;
            };
            if let Payload::Arp(a) = f.payload {
                if a.operation == ArpOperation::REPLY && a.sender_ipv4_addr() == self.cfg.target_ip
                {
                    return Ok(Mac(a.sender_mac));
                }
                self.answer_arp(&a);
            }
        }
        Err(ProbeError::Unresolved(self.cfg.target_ip))
    }

    /// Answers an ARP request for our address; true if it was one.
    fn answer_arp(&self, a: &etherparse::ArpEthIpv4Packet) -> bool {
        if a.operation != ArpOperation::REQUEST || a.target_ipv4_addr() != self.cfg.source.ip {
            return false;
        }
        let asker = Endpoint {
            mac: Mac(a.sender_mac),
            ip: a.sender_ipv4_addr(),
        };
        if let Ok(reply) = frame::arp_reply(self.cfg.source, asker) {
            let _ = self.wire.send(&reply);
        }
        true
    }
}

/// A run's state.
struct Run<'p> {
    probe: &'p Probe,
    target: Endpoint,
    records: Vec<ProbeRecord>,
    by_slot: HashMap<u64, usize>,
    counters: RunCounters,
    unanswered: u64,
    udp_src_port: u16,
}

impl<'p> Run<'p> {
    fn new(probe: &'p Probe, target: Endpoint) -> Self {
        probe.handle.received.store(0, Ordering::Relaxed);
        let offset = u16::try_from(probe.run_id % 16384).unwrap_or(0);
        Run {
            probe,
            target,
            records: Vec::new(),
            by_slot: HashMap::new(),
            counters: RunCounters::default(),
            unanswered: 0,
            udp_src_port: 49152 + offset,
        }
    }

    fn send_probe(&mut self, slot: u64, start: Instant) -> Result<(), ProbeError> {
        let cfg = &self.probe.cfg;
        let data = ProbeTag {
            run: self.probe.run_id,
            index: slot,
        }
        .payload(cfg.payload_len);
        let frame = match cfg.mode {
            ProbeMode::Icmp => {
                // The wire fields are 16 bits; the tag carries the full values.
                let id = (self.probe.run_id & 0xffff) as u16;
                let seq = (slot & 0xffff) as u16;
                frame::icmp_echo(cfg.source, self.target, false, id, seq, &data)?
            }
            ProbeMode::Udp { port } => {
                frame::udp(cfg.source, self.target, self.udp_src_port, port, &data)?
            }
        };
        let sent_s = start.elapsed().as_secs_f64();
        // A refused send (a device whose wire is down, a full queue) is a lost probe: the
        // outage is what we measure, so it must not end the run.
        if self.probe.wire.send(&frame).is_err() {
            self.counters.send_errors += 1;
        }
        self.by_slot.insert(slot, self.records.len());
        self.records.push(ProbeRecord {
            index: slot,
            sent_s,
            reply_s: None,
        });
        self.unanswered += 1;
        Ok(())
    }

    fn receive(
        &mut self,
        buf: &mut [u8],
        wait: Duration,
        start: Instant,
    ) -> Result<(), ProbeError> {
        let errors = &mut self.counters.recv_errors;
        let Some(n) = recv_or_wait(&*self.probe.wire, buf, wait, errors) else {
            return Ok(());
        };
        let at = start.elapsed().as_secs_f64();
        let Ok(f) = frame::parse(&buf[..n]) else {
            self.counters.foreign += 1;
            return Ok(());
        };
        let me = self.probe.cfg.source;
        let data = match f.payload {
            Payload::Arp(a) => {
                if self.probe.answer_arp(&a) {
                    self.counters.arp_answered += 1;
                }
                return Ok(());
            }
            Payload::EchoReply { ip, data, .. } if self.probe.cfg.mode == ProbeMode::Icmp => {
                (ip.src == self.target.ip && ip.dst == me.ip).then_some(data)
            }
            Payload::Udp {
                ip,
                src_port,
                dst_port,
                data,
            } => match self.probe.cfg.mode {
                ProbeMode::Udp { port } => (ip.src == self.target.ip
                    && ip.dst == me.ip
                    && src_port == port
                    && dst_port == self.udp_src_port)
                    .then_some(data),
                ProbeMode::Icmp => None,
            },
            _ => None,
        };
        let tag = data
            .and_then(ProbeTag::from_payload)
            .filter(|t| t.run == self.probe.run_id);
        let record = tag
            .and_then(|t| self.by_slot.get(&t.index))
            .and_then(|&i| self.records.get_mut(i));
        match record {
            Some(r) if r.reply_s.is_none() => {
                r.reply_s = Some(at);
                self.unanswered -= 1;
                self.probe.handle.received.fetch_add(1, Ordering::Relaxed);
            }
            Some(_) => self.counters.duplicates += 1,
            None => self.counters.foreign += 1,
        }
        Ok(())
    }

    fn finish(
        self,
        probe: &Probe,
        target: Endpoint,
        start: Instant,
        end: Instant,
        interval: Duration,
    ) -> ProbeReport {
        let cfg = &probe.cfg;
        let marks = probe
            .handle
            .marks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(at, label)| Mark {
                label: label.clone(),
                t_s: signed_secs(start, *at),
            })
            .collect();
        let threshold_s = interval.as_secs_f64() * cfg.threshold_intervals;
        let info = RunInfo {
            mode: match cfg.mode {
                ProbeMode::Icmp => "icmp".into(),
                ProbeMode::Udp { port } => format!("udp:{port}"),
            },
            rate: cfg.rate,
            threshold_ms: threshold_s * 1e3,
            source: format!("{}/{}", cfg.source.mac, cfg.source.ip),
            target: format!("{}/{}", target.mac, target.ip),
            wire: probe.wire.describe(),
        };
        let end_s = end.duration_since(start).as_secs_f64();
        ProbeReport::analyze(info, self.records, marks, self.counters, end_s, threshold_s)
    }
}

/// Receives one frame within `wait`; on a receive error (an interface going down, a socket
/// error report) counts it in `errors` and sleeps out `wait` so a persistent error does not
/// spin.
fn recv_or_wait(
    wire: &dyn Transport,
    buf: &mut [u8],
    wait: Duration,
    errors: &mut u64,
) -> Option<usize> {
    match wire.recv(buf, Some(wait)) {
        Ok(n) => n,
        Err(_) => {
            *errors += 1;
            std::thread::sleep(wait);
            None
        }
    }
}

/// Seconds from `start` to `at`, negative when `at` is earlier.
fn signed_secs(start: Instant, at: Instant) -> f64 {
    match at.checked_duration_since(start) {
        Some(d) => d.as_secs_f64(),
        None => -start.duration_since(at).as_secs_f64(),
    }
}

/// A run id unlikely to repeat across processes and runs (not a secret).
fn fresh_run_id() -> u32 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let low = u32::try_from(n & 0xffff_ffff).unwrap_or(0);
    nanos ^ std::process::id().rotate_left(16) ^ low.wrapping_mul(0x9e37_79b9)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::sync::mpsc;

    /// A wire made of two channels; the peer side answers with `frame::echo_answer`.
    struct ChanWire {
        tx: Mutex<mpsc::Sender<Vec<u8>>>,
        rx: Mutex<mpsc::Receiver<Vec<u8>>>,
    }

    impl Transport for ChanWire {
        fn send(&self, frame: &[u8]) -> io::Result<()> {
            self.tx
                .lock()
                .unwrap()
                .send(frame.to_vec())
                .map_err(|_| io::ErrorKind::BrokenPipe.into())
        }
        fn recv(&self, buf: &mut [u8], timeout: Option<Duration>) -> io::Result<Option<usize>> {
            let rx = self.rx.lock().unwrap();
            let f = match timeout {
                Some(t) => match rx.recv_timeout(t) {
                    Ok(f) => f,
                    Err(mpsc::RecvTimeoutError::Timeout) => return Ok(None),
                    Err(_) => return Err(io::ErrorKind::BrokenPipe.into()),
                },
                None => rx
                    .recv()
                    .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))?,
            };
            let n = f.len().min(buf.len());
            buf[..n].copy_from_slice(&f[..n]);
            Ok(Some(n))
        }
        fn describe(&self) -> String {
            "chan".into()
        }
    }

    fn ep(last: u8) -> Endpoint {
        Endpoint {
            mac: Mac([2, 0, 0, 0, 0, last]),
            ip: Ipv4Addr::new(192, 0, 2, last),
        }
    }

    /// A probe wire whose peer answers as `peer` would, skipping requests `drop` selects.
    fn echo_wire(peer: Endpoint, drop: impl Fn(u64) -> bool + Send + 'static) -> Arc<ChanWire> {
        echo_wire_counting(peer, drop).0
    }

    /// [`echo_wire`] and the count of probes the peer dropped.
    fn echo_wire_counting(
        peer: Endpoint,
        drop: impl Fn(u64) -> bool + Send + 'static,
    ) -> (Arc<ChanWire>, Arc<AtomicU64>) {
        let dropped = Arc::new(AtomicU64::new(0));
        let counter = dropped.clone();
        let (to_peer, peer_rx) = mpsc::channel::<Vec<u8>>();
        let (peer_tx, from_peer) = mpsc::channel::<Vec<u8>>();
        std::thread::spawn(move || {
            let mut n = 0u64;
            for f in peer_rx {
                let is_probe = !matches!(frame::parse(&f).map(|p| p.payload), Ok(Payload::Arp(_)));
                if is_probe {
                    n += 1;
                    if drop(n - 1) {
                        counter.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                }
                if let Some(a) = frame::echo_answer(peer, &f) {
                    if peer_tx.send(a).is_err() {
                        return;
                    }
                }
            }
        });
        let wire = Arc::new(ChanWire {
            tx: Mutex::new(to_peer),
            rx: Mutex::new(from_peer),
        });
        (wire, dropped)
    }

    #[test]
    fn resolves_by_arp_and_counts_every_reply() {
        for mode in [ProbeMode::Icmp, ProbeMode::Udp { port: 7 }] {
            let wire = echo_wire(ep(2), |_| false);
            let mut cfg = ProbeConfig::new(ep(1), ep(2).ip);
            cfg.mode = mode;
            cfg.rate = 1000.0;
            cfg.count = Some(50);
            let probe = Probe::new(cfg, wire).unwrap();
            probe.handle().mark("m");
            let r = probe.run(&AtomicBool::new(false)).unwrap();
            assert_eq!(r.sent + r.counters.skipped, 50, "{mode:?}");
            assert_eq!(r.received, r.sent);
            assert_eq!(r.lost, 0);
            assert_eq!(r.run.target, format!("{}/{}", ep(2).mac, ep(2).ip));
            assert_eq!(r.marks.len(), 1);
            assert_eq!(probe.handle().received(), r.sent);
        }
    }

    #[test]
    fn dropped_replies_are_lost_probes() {
        // Drop every probe from the 10th to the 29th (by arrival at the peer).
        let (wire, dropped) = echo_wire_counting(ep(2), |n| (10..30).contains(&n));
        let mut cfg = ProbeConfig::new(ep(1), ep(2).ip);
        cfg.target_mac = Some(ep(2).mac);
        cfg.rate = 200.0;
        cfg.count = Some(60);
        cfg.linger = Duration::from_millis(200);
        let r = Probe::new(cfg, wire)
            .unwrap()
            .run(&AtomicBool::new(false))
            .unwrap();
        // Slots a busy machine skipped are not sent, so the peer may see fewer than 30.
        let dropped = dropped.load(Ordering::Relaxed);
        assert!(dropped > 0);
        assert_eq!(r.lost, dropped);
        assert_eq!(r.received, r.sent - dropped);
    }

    /// A wire whose first receives fail (an interface going down under the probe).
    struct Flaky(Arc<ChanWire>, AtomicU64);

    impl Transport for Flaky {
        fn send(&self, frame: &[u8]) -> io::Result<()> {
            self.0.send(frame)
        }
        fn recv(&self, buf: &mut [u8], timeout: Option<Duration>) -> io::Result<Option<usize>> {
            if self.1.fetch_sub(1, Ordering::Relaxed) > 0 {
                return Err(io::Error::from_raw_os_error(libc::ENETDOWN));
            }
            self.1.store(0, Ordering::Relaxed);
            self.0.recv(buf, timeout)
        }
        fn describe(&self) -> String {
            "flaky".into()
        }
    }

    #[test]
    fn receive_errors_are_counted_not_fatal() {
        let wire = Arc::new(Flaky(echo_wire(ep(2), |_| false), AtomicU64::new(5)));
        let mut cfg = ProbeConfig::new(ep(1), ep(2).ip);
        cfg.target_mac = Some(ep(2).mac);
        cfg.rate = 1000.0;
        cfg.count = Some(30);
        let r = Probe::new(cfg, wire)
            .unwrap()
            .run(&AtomicBool::new(false))
            .unwrap();
        assert_eq!(r.counters.recv_errors, 5);
        assert_eq!(r.lost, 0, "replies queued behind the errors still arrive");
    }

    /// A wire whose first receive stalls the probe for 100 ms (a descheduled sender).
    struct Stall(Arc<ChanWire>, AtomicBool);

    impl Transport for Stall {
        fn send(&self, frame: &[u8]) -> io::Result<()> {
            self.0.send(frame)
        }
        fn recv(&self, buf: &mut [u8], timeout: Option<Duration>) -> io::Result<Option<usize>> {
            if !self.1.swap(true, Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
            }
            self.0.recv(buf, timeout)
        }
        fn describe(&self) -> String {
            "stall".into()
        }
    }

    #[test]
    fn a_stall_past_the_last_slot_ends_the_run_without_extra_probes() {
        let wire = Arc::new(Stall(echo_wire(ep(2), |_| false), AtomicBool::new(false)));
        let mut cfg = ProbeConfig::new(ep(1), ep(2).ip);
        cfg.target_mac = Some(ep(2).mac);
        cfg.rate = 1000.0;
        cfg.count = Some(50); // 50 ms of slots, all past after the stall
        let r = Probe::new(cfg, wire)
            .unwrap()
            .run(&AtomicBool::new(false))
            .unwrap();
        assert_eq!(r.sent + r.counters.skipped, 50);
        assert!(r.sent < 50);
        assert!(r.probes.iter().all(|p| p.index < 50));
    }

    #[test]
    fn unresolvable_target_is_an_error() {
        let wire = echo_wire(ep(2), |_| false);
        let mut cfg = ProbeConfig::new(ep(1), ep(9).ip);
        cfg.resolve_timeout = Duration::from_millis(100);
        let err = Probe::new(cfg, wire)
            .unwrap()
            .run(&AtomicBool::new(false))
            .unwrap_err();
        assert!(matches!(err, ProbeError::Unresolved(_)), "{err}");
    }

    #[test]
    fn bad_configs_are_refused() {
        let wire = echo_wire(ep(2), |_| false);
        let mut cfg = ProbeConfig::new(ep(1), ep(2).ip);
        cfg.rate = 0.0;
        assert!(Probe::new(cfg.clone(), wire.clone()).is_err());
        cfg.rate = 200.0;
        cfg.threshold_intervals = 0.5;
        assert!(Probe::new(cfg.clone(), wire.clone()).is_err());
        cfg.threshold_intervals = 3.0;
        cfg.payload_len = 2000;
        assert!(Probe::new(cfg, wire).is_err());
    }

    #[test]
    fn stop_flag_ends_an_unbounded_run() {
        let wire = echo_wire(ep(2), |_| false);
        let mut cfg = ProbeConfig::new(ep(1), ep(2).ip);
        cfg.target_mac = Some(ep(2).mac);
        let stop = AtomicBool::new(true);
        let r = Probe::new(cfg, wire).unwrap().run(&stop).unwrap();
        assert_eq!(r.sent, 0);
    }
}
