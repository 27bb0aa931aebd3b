//! The API under load while both IDDs are crashed repeatedly: 64 process guests
//! ([`MAX_CHANNELS`]), each with a disk region on one virtio-blk device and a NIC on one
//! virtio-net device, so one disk IDD and one NIC IDD serve 64 channels each.
//!
//! Every guest runs `net-guest echo --disk-blocks` (a domain runs one program, and this is
//! the one that drives both frontends): it answers pings on its NIC and checks its disk
//! (write a versioned pattern, read it back) between echo rounds; a disk error or mismatch
//! ends it, so a guest I/O error shows in the API as a guest that no longer runs (and a
//! `guest_exited` event). The test stands on the far side of the NIC's UDP wire (the policy
//! names both ends: the API does not show a device's wire address) and pings every guest
//! round robin, each ping numbered so that every answer is matched to its ping.
//!
//! The system is read through the API: all 64 guests running with both devices, 64
//! channels on each IDD, every disk channel's responses moving; every guest answers pings.
//! Then four client threads keep reading `/v1/idds`, `/v1/channels`, `/v1/guests` and
//! `/metrics` while each IDD is crashed [`CRASHES`] times through the API (alternating), each
//! recovery awaited on the event stream, and after each one every channel of both IDDs must
//! carry traffic again (disk: its ring's responses advance past the snapshot that shows the
//! recovery; NIC: the guest answers a ping sent after the recovery).
//!
//! A second test shows that the guests' disk check can fail: one such guest whose blocks are
//! overwritten behind its back (in the image file) ends with status 1.
//!
//! Asserted: every request succeeds, every crash is recovered, every channel of both IDDs
//! carries traffic after every recovery, no guest exits (no guest I/O error). Printed, never
//! asserted (timings belong to benchmarks): bring-up time, API read latency p50/p99/max, each
//! IDD's outages and the time until all 64 of its channels carried traffic again, pings
//! answered and their round trips with and without crashes, duplicate answers, drops.

mod common;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use device_manager::api::client::{Client, SseReader};
use device_manager::layout::MAX_CHANNELS;
use device_manager::manager::{Manager, ManagerConfig};
use device_manager::recovery::Percentiles;
use device_manager::service::{Service, ServiceConfig};
use netprobe::frame::{self, Endpoint, Mac, Payload};
use netprobe::wire::{Transport, UdpTransport};
use policy::Policy;
use serde_json::{json, Value};

/// Guests (each with a disk and a NIC).
const GUESTS: u64 = MAX_CHANNELS;
/// Crashes of each IDD.
const CRASHES: u32 = 10;
/// How long a channel may take to carry traffic again after a recovery before the test
/// fails (a correctness bound, far above any expected time).
const RECONNECT_DEADLINE: Duration = Duration::from_secs(60);
/// Pause after each recovery (see the crash loop).
const SETTLE: Duration = Duration::from_millis(300);
/// Pings per second to all guests together.
const PING_RATE: f64 = 400.0;
/// The wire peer (this test).
const PEER: Endpoint = Endpoint {
    mac: Mac([0x02, 0, 0, 0, 0, 0xfe]),
    ip: Ipv4Addr::new(10, 0, 0, 254),
};

fn guest_ep(i: u64) -> Endpoint {
    let n = u8::try_from(i + 1).unwrap();
    Endpoint {
        mac: Mac([0x02, 0, 0, 0, 1, n]),
        ip: Ipv4Addr::new(10, 0, 0, n),
    }
}

/// The policy; the NIC's UDP wire binds `wire` and sends to `peer` (this test).
fn policy_text(dir: &std::path::Path, wire: SocketAddr, peer: SocketAddr) -> String {
    let mut t = format!(
        r#"[restart]
max_restarts = 1000
window = "600s"
heartbeat = "2s"

[[device]]
name = "disk0"
kind = "virtio-blk"
image = "{}"
size = "{GUESTS}MiB"

[[device]]
name = "net0"
kind = "virtio-net"
wire = "udp"
bind = "{wire}"
peer = "{peer}"
link = "1Gbit/s"
"#,
        dir.join("disk0.img").display()
    );
    for i in 0..GUESTS {
        let ep = guest_ep(i);
        t.push_str(&format!(
            r#"
[[guest]]
name = "g{i}"
disk = [{{ device = "disk0", offset = "{i}MiB", length = "1MiB" }}]
[[guest.net]]
device = "net0"
mac = "{}"
ips = ["{}/32"]
"#,
            ep.mac, ep.ip
        ));
    }
    t
}

/// Pings every guest round robin from the wire. Each ping carries its number (in its data),
/// so an answer is matched to the ping it answers, whenever it comes.
#[derive(Default)]
struct Pinger {
    /// When each ping was sent (index: its number).
    sent: Mutex<Vec<Instant>>,
    /// Each answer: the ping's number and its round trip (the first answer to each ping).
    answers: Mutex<Vec<(usize, Duration)>>,
    /// Answers to a ping already answered (a reply transmitted again by a restarted NIC IDD
    /// replaying its journal).
    duplicates: Mutex<usize>,
    /// Which pings were answered.
    answered: Mutex<std::collections::HashSet<usize>>,
    /// Per guest, when the latest answered ping was *sent*.
    latest: Mutex<HashMap<Ipv4Addr, Instant>>,
}

impl Pinger {
    fn run(&self, wire: &UdpTransport, stop: &AtomicBool) {
        let gap = Duration::from_secs_f64(1.0 / PING_RATE);
        let mut next = Instant::now();
        let mut buf = vec![0u8; 2048];
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) {
            if Instant::now() >= next {
                let mut sent = self.sent.lock().unwrap();
                let n = sent.len() as u64;
                let data = n.to_be_bytes();
                let seq = u16::try_from(n % 65536).unwrap();
                let f = frame::icmp_echo(PEER, guest_ep(i), false, 0x10ad, seq, &data).unwrap();
                wire.send(&f).unwrap();
                sent.push(Instant::now());
                i = (i + 1) % GUESTS;
                next += gap;
            }
            let wait = next.saturating_duration_since(Instant::now());
            let Some(n) = wire.recv(&mut buf, Some(wait)).unwrap() else {
                continue;
            };
            let Ok(f) = frame::parse(&buf[..n]) else {
                continue;
            };
            let Payload::EchoReply {
                ip,
                id: 0x10ad,
                data,
                ..
            } = f.payload
            else {
                continue;
            };
            let Some(k) = data
                .try_into()
                .ok()
                .map(u64::from_be_bytes)
                .and_then(|k| usize::try_from(k).ok())
            else {
                continue;
            };
            let Some(at) = self.sent.lock().unwrap().get(k).copied() else {
                continue;
            };
            if !self.answered.lock().unwrap().insert(k) {
                *self.duplicates.lock().unwrap() += 1;
                continue;
            }
            self.answers.lock().unwrap().push((k, at.elapsed()));
            let mut latest = self.latest.lock().unwrap();
            let e = latest.entry(ip.src).or_insert(at);
            *e = (*e).max(at);
        }
    }

    /// Pings sent so far (the next ping's number).
    fn mark(&self) -> usize {
        self.sent.lock().unwrap().len()
    }

    /// Of the pings numbered `from..to`: how many, how many answered, and the round trips.
    fn window(&self, from: usize, to: usize) -> (usize, usize, Vec<Duration>) {
        let rtt: Vec<Duration> = self
            .answers
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| (from..to).contains(k))
            .map(|(_, d)| *d)
            .collect();
        (to - from, rtt.len(), rtt)
    }

    /// Guests that answered a ping sent after `since`.
    fn answered_since(&self, since: Instant) -> usize {
        let latest = self.latest.lock().unwrap();
        (0..GUESTS)
            .filter(|i| latest.get(&guest_ep(*i).ip).is_some_and(|t| *t > since))
            .count()
    }
}

/// The disk channels' response counters, by guest.
fn disk_responses(c: &Client) -> HashMap<String, u64> {
    let chans: Value = c.get("/v1/channels").unwrap();
    chans
        .as_array()
        .unwrap()
        .iter()
        .filter(|ch| ch["stats"]["kind"] == "virtio-blk")
        .map(|ch| {
            (
                ch["guest"].as_str().unwrap().to_owned(),
                ch["stats"]["responses"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// The NIC channels' drops (a frame for a guest that had no receive buffer posted).
fn net_drops(c: &Client) -> u64 {
    let chans: Value = c.get("/v1/channels").unwrap();
    chans
        .as_array()
        .unwrap()
        .iter()
        .filter(|ch| ch["stats"]["kind"] == "virtio-net")
        .map(|ch| ch["stats"]["drops"].as_u64().unwrap_or(0))
        .sum()
}

/// Wait (bounded) until every disk channel's responses went past `base`; returns how many
/// did and when the last one did.
fn disk_channels_moving(c: &Client, base: &HashMap<String, u64>) -> (usize, Duration) {
    let t = Instant::now();
    loop {
        let now = disk_responses(c);
        let moved = base
            .iter()
            .filter(|(g, b)| now.get(*g).is_some_and(|n| n > b))
            .count();
        if moved == base.len() || t.elapsed() > RECONNECT_DEADLINE {
            return (moved, t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Wait (bounded) until every guest answered a ping sent after `since`.
fn nics_answering(p: &Pinger, since: Instant) -> (usize, Duration) {
    loop {
        let n = p.answered_since(since);
        if n as u64 == GUESTS || since.elapsed() > RECONNECT_DEADLINE {
            return (n, since.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The next event of type `kind` for IDD `idd`; a guest that exits fails the test.
fn next_event(events: &mut SseReader<impl std::io::Read>, kind: &str, idd: &str) -> Value {
    loop {
        let m = events.next().expect("stream ended").unwrap();
        let v: Value = serde_json::from_str(&m.data).unwrap();
        assert_ne!(m.event, "lagged");
        assert_ne!(m.event, "guest_exited", "a guest ended (an I/O error): {v}");
        if m.event == kind && v["idd"] == idd {
            return v;
        }
    }
}

#[test]
#[allow(clippy::too_many_lines)]
fn api_stays_responsive_while_both_idds_are_crashed() {
    let dir = tempfile::tempdir().unwrap();
    // The far side of the NIC's wire. The API shows no device's wire address (`/v1/devices`
    // is the PCI enumeration), so the policy names both ends: a port free a moment ago for
    // the device, this socket for its peer.
    let wire_addr = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let wire = UdpTransport::bind("127.0.0.1:0".parse().unwrap(), Some(wire_addr)).unwrap();
    let text = policy_text(dir.path(), wire_addr, wire.local_addr().unwrap());
    let policy = Policy::parse(&text, "load.toml").unwrap_or_else(|e| panic!("{}", e.render()));
    let mut cfg = ServiceConfig::new(ManagerConfig {
        idd_program: common::idd_program(),
        guest_program: common::program("guest-frontends", "net-guest"),
        net_idd_program: common::program("idd-net", "idd-net"),
        heartbeat: None,
        verbose: false,
    });
    // `{seed}` is the guest's 1-based index in the policy: g{i} is 10.0.0.{i+1}.
    cfg.guest_args = [
        "echo",
        "--ip",
        "10.0.0.{seed}/24",
        "--disk-blocks",
        "16",
        "--disk-seed",
        "{seed}",
        "--disk-period-ms",
        "25",
    ]
    .map(str::to_owned)
    .to_vec();
    cfg.connect_timeout = Duration::from_secs(120);
    let t0 = Instant::now();
    let svc = Service::start(policy, "load.toml", text, cfg);
    let (rt, server) = common::serve_api(&svc);
    let url = server.url();
    let c = Client::new(&url, None, None).unwrap();

    // Up: both IDDs running.
    let mut events = c.events_since(Some(0)).unwrap();
    for idd in ["idd-disk0", "idd-net0"] {
        let v = next_event(&mut events, "idd_state", idd);
        assert_eq!(v["state"], "running", "{v}");
    }
    let bring_up = t0.elapsed();

    // Every guest runs with both devices; one channel per guest on each IDD.
    let guests: Value = c.get("/v1/guests").unwrap();
    let guests = guests.as_array().unwrap();
    assert_eq!(guests.len() as u64, GUESTS);
    for g in guests {
        assert_eq!(g["running"], true, "{g}");
        assert_eq!(g["devices"], json!(["disk0", "net0"]), "{g}");
    }
    let chans: Value = c.get("/v1/channels").unwrap();
    for (idd, kind) in [("idd-disk0", "virtio-blk"), ("idd-net0", "virtio-net")] {
        let n = chans
            .as_array()
            .unwrap()
            .iter()
            .filter(|ch| ch["idd"] == idd && ch["stats"]["kind"] == kind)
            .count();
        assert_eq!(n as u64, GUESTS, "{idd}: {chans}");
    }

    // The pinger.
    let pinger = Arc::new(Pinger::default());
    let stop = Arc::new(AtomicBool::new(false));
    let ping_thread = {
        let (p, stop) = (pinger.clone(), stop.clone());
        std::thread::spawn(move || p.run(&wire, &stop))
    };

    // Traffic on every channel before the first crash.
    let zero: HashMap<String, u64> = disk_responses(&c).into_keys().map(|g| (g, 0)).collect();
    let (moving, _) = disk_channels_moving(&c, &zero);
    assert_eq!(moving as u64, GUESTS, "disk channels with I/O");
    let (answering, _) = nics_answering(&pinger, t0);
    assert_eq!(answering as u64, GUESTS, "guests answering pings");

    // Two quiet seconds for comparison.
    let quiet_from = pinger.mark();
    std::thread::sleep(Duration::from_secs(2));
    let quiet_to = pinger.mark();
    let drops_quiet = net_drops(&c);

    // Readers.
    let readers: Vec<_> = (0..4)
        .map(|i| {
            let url = url.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let c = Client::new(&url, None, None).unwrap();
                let paths = ["/v1/idds", "/v1/channels", "/v1/guests", "/metrics"];
                let mut lat = Vec::new();
                let mut n = i;
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    c.get_text(paths[n % paths.len()]).unwrap();
                    lat.push(t.elapsed());
                    n += 1;
                }
                lat
            })
        })
        .collect();

    // Crashes, alternating, each recovery awaited and every channel of the IDD seen carrying
    // traffic again.
    let mut outages: HashMap<&str, Vec<Duration>> = HashMap::new();
    let mut all_back: HashMap<&str, Vec<Duration>> = HashMap::new();
    let mut reconnected: HashMap<&str, usize> = HashMap::new();
    let mut recoveries = 0;
    // The pings sent from a crash until all the IDD's channels were back, by IDD.
    let mut pings: HashMap<&str, Vec<(usize, usize)>> = HashMap::new();
    for _ in 0..CRASHES {
        for idd in ["idd-disk0", "idd-net0"] {
            let ping_from = pinger.mark();
            let r: Value = c
                .post(
                    &format!("/v1/idds/{idd}/faults"),
                    &json!({"fault": "crash"}),
                )
                .unwrap();
            assert_eq!(r["result"], "accepted");
            let rec = next_event(&mut events, "recovery", idd);
            let recovered_at = Instant::now();
            recoveries += 1;
            outages.entry(idd).or_default().push(Duration::from_micros(
                rec["recovery"]["outage_us"].as_u64().unwrap(),
            ));
            // Every channel of *both* IDDs carries traffic again (the crashed IDD's first, timed):
            // disk responses past those of the snapshot that shows the recovery, answers to
            // pings sent after it.
            let base = disk_responses(&c);
            let disk = || disk_channels_moving(&c, &base);
            let nics = || nics_answering(&pinger, recovered_at);
            let ((n, took), (other, _)) = if idd == "idd-disk0" {
                (disk(), nics())
            } else {
                (nics(), disk())
            };
            assert_eq!(
                n as u64, GUESTS,
                "{idd}: channels carrying traffic after its recovery"
            );
            assert_eq!(
                other as u64, GUESTS,
                "the other IDD's channels carrying traffic after {idd}'s recovery"
            );
            *reconnected.entry(idd).or_default() += n;
            all_back.entry(idd).or_default().push(took);
            pings
                .entry(idd)
                .or_default()
                .push((ping_from, pinger.mark()));
            // Let the pings of this window be answered before the next crash, so that each
            // window's numbers are its IDD's alone.
            std::thread::sleep(SETTLE);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let lat: Vec<Duration> = readers
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    ping_thread.join().unwrap();

    // No guest ended (a disk error or mismatch, or a netfront failure, ends it).
    let guests: Value = c.get("/v1/guests").unwrap();
    let stopped: Vec<&Value> = guests
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["running"] != true)
        .collect();
    assert!(stopped.is_empty(), "guests that ended: {stopped:?}");
    for idd in ["idd-disk0", "idd-net0"] {
        let v: Value = c.get(&format!("/v1/idds/{idd}")).unwrap();
        assert_eq!(v["restarts"], CRASHES, "{v}");
        assert_eq!(v["state"], "running", "{v}");
    }
    // The NIC's own counters (kept by the device across IDD restarts): the guests' answers
    // reached the wire, the probes reached the guests, in the view and in the metrics.
    let net: Value = c.get("/v1/idds/idd-net0").unwrap();
    let nic = &net["nic"];
    assert!(nic["tx_frames"].as_u64().unwrap() > 0, "{net}");
    assert!(nic["rx_frames"].as_u64().unwrap() > 0, "{net}");
    let metrics = c.get_text("/metrics").unwrap();
    // (the counter moves between the two reads: only its presence is checked here)
    assert!(
        metrics.contains("nic_rx_frames_total{idd=\"idd-net0\"} "),
        "{metrics}"
    );
    println!(
        "NIC device counters: tx {} frames, rx {} frames, rx dropped for want of a buffer {}",
        nic["tx_frames"], nic["rx_frames"], nic["rx_no_buffer"]
    );

    // Late answers to the last pings.
    std::thread::sleep(Duration::from_millis(500));
    println!("bring-up of {GUESTS} guests (disk + NIC each), both IDDs running: {bring_up:.2?}");
    println!(
        "API read latency under {recoveries} crashes: {}",
        Percentiles::of(&lat).unwrap()
    );
    for idd in ["idd-disk0", "idd-net0"] {
        println!(
            "{idd}: outage {}; all {GUESTS} channels carrying traffic again after {}; channels reconnected {} of {}",
            Percentiles::of(&outages[idd]).unwrap(),
            Percentiles::of(&all_back[idd]).unwrap(),
            reconnected[idd],
            u64::from(CRASHES) * GUESTS
        );
    }
    let report = |what: &str, windows: &[(usize, usize)]| {
        let (mut sent, mut answered, mut rtt) = (0, 0, Vec::new());
        for (from, to) in windows {
            let (s, a, r) = pinger.window(*from, *to);
            sent += s;
            answered += a;
            rtt.extend(r);
        }
        let rtt = Percentiles::of(&rtt).map_or_else(|| "-".to_owned(), |p| p.to_string());
        println!("pings {what}: {answered} of {sent} answered, round trip {rtt}");
    };
    report("in 2 s without crashes", &[(quiet_from, quiet_to)]);
    for idd in ["idd-disk0", "idd-net0"] {
        report(
            &format!("while {idd} was crashed and recovering"),
            &pings[idd],
        );
    }
    println!(
        "duplicate answers: {}; NIC channel drops (no receive buffer posted): {drops_quiet} before the crashes, {} at the end",
        pinger.duplicates.lock().unwrap(),
        net_drops(&c)
    );
    println!("guest I/O errors: {} (guests that ended)", stopped.len());
    rt.block_on(server.shutdown());
    svc.shutdown();
}

#[test]
fn a_guest_whose_disk_reads_back_wrong_data_ends() {
    let dir = tempfile::tempdir().unwrap();
    let wire_addr = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let text = policy_text(dir.path(), wire_addr, "127.0.0.1:9".parse().unwrap());
    // Only g0 of the load test's policy.
    let one = &text[..text.find("\n[[guest]]\nname = \"g1\"").unwrap()];
    let policy = Policy::parse(one, "one.toml").unwrap_or_else(|e| panic!("{}", e.render()));
    let mut m = Manager::start(
        &policy,
        ManagerConfig {
            idd_program: common::idd_program(),
            guest_program: common::program("guest-frontends", "net-guest"),
            net_idd_program: common::program("idd-net", "idd-net"),
            heartbeat: None,
            verbose: false,
        },
    )
    .unwrap();
    let args = [
        "echo",
        "--ip",
        "10.0.0.1/24",
        "--disk-blocks",
        "4",
        "--disk-period-ms",
        "1",
    ];
    m.start_guest("g0", &args).unwrap();
    m.connect(Duration::from_secs(60)).unwrap();
    // The check runs: a `disk ops=N` line with N > 0 (after a `stats` line, every second).
    let deadline = Instant::now() + Duration::from_secs(30);
    'ops: loop {
        for l in m.guest_lines("g0").unwrap() {
            if l.starts_with("disk ops=") && !l.starts_with("disk ops=0 ") {
                break 'ops;
            }
        }
        assert!(
            m.guest_running("g0").unwrap(),
            "g0 ended before its disk check ran"
        );
        assert!(Instant::now() < deadline, "no disk check progress from g0");
        m.supervise(Duration::from_millis(10)).unwrap();
    }
    // Overwrite its four blocks (region offset 0) until a read-back sees it.
    let image = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("disk0.img"))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while m.guest_running("g0").unwrap() {
        assert!(
            Instant::now() < deadline,
            "g0 never noticed its disk overwritten"
        );
        std::os::unix::fs::FileExt::write_all_at(&image, &[0xa5; 4 * 4096], 0).unwrap();
        m.supervise(Duration::from_millis(1)).unwrap();
    }
    let (exit, _) = m.wait_guest("g0", Duration::from_secs(10)).unwrap();
    assert_eq!(exit, hypervisor::launch::ExitReport::Exited(1));
}
