//! Network path benchmark: packets/s and Mbit/s through the IDD (guest netfront → netif
//! rings → netback → virtio-net driver → I/O Space → emulated virtio-net-pci → UDP wire, and
//! back) next to the same traffic sent straight over a UDP socket pair (baseline, same run);
//! copy receive next to page-exchange receive; and the recovery outage over many IDD crashes,
//! cold restart next to hot-standby promotion, seen by probes at 200/s from the wire.
//!
//! * transmit: the guest floods UDP frames of 64 B and 1514 B (MTU 1500) at the wire's far
//!   side for `BENCH_SECS` (default 3) seconds; the far side counts what arrives;
//! * receive: the far side floods the guest as fast as the socket takes frames; the guest
//!   counts what netfront delivers (copy and exchange receive);
//! * baseline: `netprobe` flood → count over a plain UDP socket pair (no IDD);
//! * recovery: `BENCH_CRASHES` (default 100) crashes cold, a fifth of that with a standby.
//!
//! Prints tables; writes `target/bench/net.json`.
//!
//! Run: `cargo bench -p device-manager --bench net` (`ci/bench.sh`).

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use device_manager::fault::Fault;
use device_manager::manager::{Manager, ManagerConfig};
use device_manager::recovery::Percentiles;
use netprobe::frame::{self, Endpoint, Mac};
use netprobe::probe::{Probe, ProbeConfig};
use netprobe::traffic::{self, CountConfig, FloodConfig};
use netprobe::wire::{Transport, UdpTransport};
use policy::Policy;

const GUEST: Endpoint = Endpoint {
    mac: Mac([0x02, 0, 0, 0, 0, 0x0a]),
    ip: Ipv4Addr::new(10, 0, 0, 1),
};
const PEER: Endpoint = Endpoint {
    mac: Mac([0x02, 0, 0, 0, 0, 0xfe]),
    ip: Ipv4Addr::new(10, 0, 0, 254),
};
const SIZES: [usize; 2] = [64, 1514];

fn secs() -> u64 {
    std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
}

fn crashes() -> usize {
    std::env::var("BENCH_CRASHES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100)
}

fn policy(extra_device: &str) -> Policy {
    let text = format!(
        r#"
[restart]
max_restarts = 100000
window = "600s"
heartbeat = "2s"

[[device]]
name = "net0"
kind = "virtio-net"
wire = "udp"
bind = "127.0.0.1:0"
{extra_device}

[[guest]]
name = "alice"
[[guest.net]]
device = "net0"
mac = "{}"
"#,
        GUEST.mac
    );
    Policy::parse(&text, "bench.toml").unwrap_or_else(|e| panic!("{}", e.render()))
}

fn config() -> ManagerConfig {
    ManagerConfig {
        idd_program: "idd-blk".into(), // no disk here
        guest_program: common::program("guest-frontends", "net-guest"),
        net_idd_program: common::program("idd-net", "idd-net"),
        heartbeat: None,
        verbose: false,
    }
}

/// A manager with alice running `args`, connected; and the wire's far side.
fn up(extra_device: &str, args: &[&str]) -> (Manager, Arc<UdpTransport>) {
    let mut m = Manager::start(&policy(extra_device), config()).unwrap();
    let dev = m.wire_addr("net0").unwrap().unwrap();
    let far = Arc::new(UdpTransport::bind("127.0.0.1:0".parse().unwrap(), Some(dev)).unwrap());
    // One frame so the device learns where its peer is.
    far.send(&frame::arp_request(PEER, GUEST.ip).unwrap())
        .unwrap();
    m.start_guest("alice", args).unwrap();
    m.connect(Duration::from_secs(30)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    'ready: loop {
        for l in m.guest_lines("alice").unwrap() {
            if l.starts_with("ready") {
                break 'ready;
            }
        }
        assert!(Instant::now() < deadline, "alice not ready");
        m.supervise(Duration::from_millis(5)).unwrap();
    }
    (m, far)
}

fn field(line: &str, key: &str) -> f64 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
        .parse()
        .unwrap()
}

/// (packets/s, Mbit/s).
type Rate = (f64, f64);

fn rate(frames: f64, bytes: f64, secs: f64) -> Rate {
    (frames / secs, bytes * 8.0 / secs / 1e6)
}

/// Guest → wire.
fn transmit(size: usize) -> Rate {
    let t = secs().to_string();
    let size_s = size.to_string();
    let (mut m, far) = up(
        "",
        &[
            "flood",
            "--ip",
            "10.0.0.1/24",
            "--dst-mac",
            "02:00:00:00:00:fe",
            "--dst-ip",
            "10.0.0.254",
            "--size",
            &size_s,
            "--secs",
            &t,
        ],
    );
    let stop = AtomicBool::new(false);
    let report = std::thread::scope(|s| {
        let h = s.spawn(|| {
            traffic::count(
                &CountConfig {
                    duration: Some(Duration::from_secs(secs() + 5)),
                    idle: Some(Duration::from_millis(500)),
                    dst: Some(PEER.mac),
                    ..CountConfig::default()
                },
                far.as_ref(),
                &stop,
            )
        });
        while !h.is_finished() {
            m.supervise(Duration::from_millis(10)).unwrap();
        }
        h.join().unwrap().unwrap()
    });
    (report.pps, report.mbps)
}

/// Wire → guest, received in `mode` (`copy` or `exchange`).
fn receive(size: usize, mode: &str) -> Rate {
    let t = (secs() + 3).to_string();
    let (mut m, far) = up(
        "",
        &[
            "echo",
            "--ip",
            "10.0.0.1/24",
            "--rx-mode",
            mode,
            "--secs",
            &t,
        ],
    );
    let stop = AtomicBool::new(false);
    let cfg = FloodConfig {
        source: PEER,
        target: GUEST,
        src_port: 40_000,
        dst_port: traffic::DISCARD_PORT,
        frame_len: size,
        rate: None,
        duration: Duration::from_secs(secs()),
        count: None,
    };
    let before = last_stats(&mut m);
    let flood = std::thread::scope(|s| {
        let h = s.spawn(|| traffic::flood(&cfg, far.as_ref(), &stop));
        while !h.is_finished() {
            m.supervise(Duration::from_millis(10)).unwrap();
        }
        h.join().unwrap().unwrap()
    });
    let (_, lines) = m.wait_guest("alice", Duration::from_secs(30)).unwrap();
    let summary = lines
        .iter()
        .rev()
        .find(|l| l.starts_with("summary"))
        .unwrap();
    let (rx, rxb) = (
        field(summary, "rx") - before.0,
        field(summary, "rxb") - before.1,
    );
    rate(rx, rxb, flood.secs.max(1e-3))
}

/// The guest's (rx, rxb) so far (its `stats` lines; zeros before the first).
fn last_stats(m: &mut Manager) -> (f64, f64) {
    let mut last = (0.0, 0.0);
    for l in m.guest_lines("alice").unwrap() {
        if l.starts_with("stats") {
            last = (field(&l, "rx"), field(&l, "rxb"));
        }
    }
    last
}

/// The same flood straight over a UDP socket pair.
fn baseline(size: usize) -> Rate {
    let b = UdpTransport::bind("127.0.0.1:0".parse().unwrap(), None).unwrap();
    let a = UdpTransport::bind(
        "127.0.0.1:0".parse().unwrap(),
        Some(b.local_addr().unwrap()),
    )
    .unwrap();
    let stop = AtomicBool::new(false);
    let cfg = FloodConfig {
        source: PEER,
        target: GUEST,
        src_port: 40_000,
        dst_port: traffic::DISCARD_PORT,
        frame_len: size,
        rate: None,
        duration: Duration::from_secs(secs()),
        count: None,
    };
    let counted = std::thread::scope(|s| {
        let h = s.spawn(|| {
            traffic::count(
                &CountConfig {
                    duration: Some(Duration::from_secs(secs() + 3)),
                    idle: Some(Duration::from_millis(500)),
                    dst: None,
                    ..CountConfig::default()
                },
                &b,
                &stop,
            )
        });
        std::thread::sleep(Duration::from_millis(50));
        traffic::flood(&cfg, &a, &stop).unwrap();
        h.join().unwrap().unwrap()
    });
    (counted.pps, counted.mbps)
}

/// Crash the IDD `n` times, `every` apart, with probes at 200/s; returns (manager outages,
/// probe outages in ms, probes sent, lost).
fn recovery(extra_device: &str, n: usize, every: Duration) -> (Vec<Duration>, Vec<f64>, u64, u64) {
    let (mut m, far) = up(extra_device, &["echo", "--ip", "10.0.0.1/24"]);
    let mut cfg = ProbeConfig::new(PEER, GUEST.ip);
    cfg.target_mac = Some(GUEST.mac);
    cfg.linger = Duration::from_millis(500);
    let probe = Probe::new(cfg, far).unwrap();
    let handle = probe.handle();
    let stop = AtomicBool::new(false);
    let report = std::thread::scope(|s| {
        let h = s.spawn(|| probe.run(&stop));
        while handle.received() < 20 {
            m.supervise(Duration::from_millis(5)).unwrap();
        }
        let mut next = Instant::now() + every;
        let mut injected = 0;
        while m.recoveries().len() < n {
            if injected < n && Instant::now() >= next && m.recoveries().len() == injected {
                let at = Instant::now();
                m.inject_into("net0", &Fault::Crash).unwrap();
                handle.mark_at(format!("crash {}", injected + 1), at);
                injected += 1;
                next = Instant::now() + every;
            }
            m.supervise(Duration::from_millis(2)).unwrap();
        }
        let calm = Instant::now() + every;
        while Instant::now() < calm {
            m.supervise(Duration::from_millis(5)).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        h.join().unwrap().unwrap()
    });
    let dir = bench_dir();
    let name = if extra_device.is_empty() {
        "net-recovery-cold.svg"
    } else {
        "net-recovery-standby.svg"
    };
    netprobe::plot::write_svg(&report, &dir.join(name)).unwrap();
    let outages = m.recoveries().iter().map(|r| r.outage()).collect();
    // Per crash: the reply gaps (over 3 probe intervals) that ended after it and before the
    // next one; 0 when replies never paused that long.
    let probe_out = report.per_mark.iter().map(|o| o.outage_ms).collect();
    (outages, probe_out, report.sent, report.lost)
}

fn bench_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let target = exe.parent().unwrap().parent().unwrap().parent().unwrap();
    let dir = target.join("bench");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn ms(d: f64) -> String {
    format!("{d:.1}")
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    println!("network path, {} s per measurement (BENCH_SECS)", secs());
    let mut json = serde_json::Map::new();
    println!();
    println!(
        "{:<28} {:>12} {:>10} {:>12} {:>10} {:>8}",
        "traffic", "IDD pkt/s", "IDD Mbit/s", "wire pkt/s", "wire Mbit/s", "ratio"
    );
    for size in SIZES {
        let base = baseline(size);
        let rows = [
            (format!("transmit {size} B"), transmit(size)),
            (format!("receive {size} B (copy)"), receive(size, "copy")),
            (
                format!("receive {size} B (exchange)"),
                receive(size, "exchange"),
            ),
        ];
        for (name, r) in rows {
            println!(
                "{name:<28} {:>12.0} {:>10.1} {:>12.0} {:>10.1} {:>7.1}%",
                r.0,
                r.1,
                base.0,
                base.1,
                100.0 * r.0 / base.0.max(1e-9)
            );
            json.insert(
                name,
                serde_json::json!({"pps": r.0, "mbps": r.1, "baseline_pps": base.0, "baseline_mbps": base.1}),
            );
        }
    }
    println!();
    let n = crashes();
    let cold = recovery("", n, Duration::from_millis(300));
    let hot = recovery("standby = true", (n / 5).max(5), Duration::from_millis(400));
    println!(
        "{:<22} {:>7} {:>9} {:>9} {:>9} {:>11} {:>11} {:>11} {:>13}",
        "recovery",
        "crashes",
        "p50 ms",
        "p99 ms",
        "max ms",
        "probe p50",
        "probe p99",
        "probe max",
        "probes lost"
    );
    for (name, (outages, probe_out, sent, lost)) in [("cold restart", cold), ("hot standby", hot)] {
        let p = Percentiles::of(&outages).unwrap();
        let st = netprobe::probe::Stats::of(probe_out.iter().copied());
        let (q50, q99, qmax) = (st.p50, st.p99, st.max);
        let msf = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "{name:<22} {:>7} {:>9} {:>9} {:>9} {:>11} {:>11} {:>11} {:>7}/{:<5}",
            outages.len(),
            ms(msf(p.p50)),
            ms(msf(p.p99)),
            ms(msf(p.max)),
            ms(q50),
            ms(q99),
            ms(qmax),
            lost,
            sent
        );
        json.insert(
            name.into(),
            serde_json::json!({
                "crashes": outages.len(),
                "manager_p50_ms": msf(p.p50), "manager_p99_ms": msf(p.p99), "manager_max_ms": msf(p.max),
                "probe_outage_p50_ms": q50, "probe_outage_p99_ms": q99, "probe_outage_max_ms": qmax,
                "probes_sent": sent, "probes_lost": lost,
            }),
        );
    }
    let dir = bench_dir();
    std::fs::write(
        dir.join("net.json"),
        serde_json::to_string_pretty(&serde_json::Value::Object(json)).unwrap(),
    )
    .unwrap();
    println!(
        "\nmanager outage: fault → first ring response; probe outage: per crash, the reply gaps over 15 ms (3 probe intervals) it caused.\nplots: {}/net-recovery-{{cold,standby}}.svg; JSON: {}/net.json",
        dir.display(),
        dir.display()
    );
}
