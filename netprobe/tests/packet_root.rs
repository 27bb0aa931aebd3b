//! The `AF_PACKET` wire (`tap:IFNAME`), as root:
//!
//! * on a TAP interface whose other side (`/dev/net/tun`, where an emulated NIC would sit)
//!   is an echo host in this test, silent for 300 ms in the middle;
//! * on a veth pair whose far end is in a network namespace: the Linux stack there is the
//!   echo host (ARP resolution both ways, ICMP echo), and its link goes down for 300 ms.
//!
//! Without root or `ip`, each test prints `SKIP: reason` and passes.

mod common;

use netprobe::frame::{self, Endpoint, Mac, Payload};
use netprobe::probe::{Probe, ProbeConfig, ProbeReport};
use netprobe::wire::{self, WireSpec};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SILENCE: Duration = Duration::from_millis(300);

fn skip_reason() -> Option<&'static str> {
    if !rustix::process::geteuid().is_root() {
        return Some("needs root");
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("needs the ip command (iproute2)");
    }
    None
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ep(last: u8) -> Endpoint {
    Endpoint {
        mac: Mac([2, 0, 0, 0, 0x5e, last]),
        ip: Ipv4Addr::new(192, 0, 2, last),
    }
}

/// Deletes what a test created, whatever happens.
struct Cleanup(Vec<Vec<String>>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for args in &self.0 {
            let _ = Command::new("ip").args(args).output();
        }
    }
}

/// Opens the device side of TAP `name` (`IFF_TAP | IFF_NO_PI`).
fn open_tap(name: &str) -> File {
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .unwrap();
    // struct ifreq: the name (16 bytes, NUL-terminated), then the flags (a short).
    let mut ifr = [0u8; 40];
    ifr[..name.len()].copy_from_slice(name.as_bytes());
    let flags = i16::try_from(libc::IFF_TAP | libc::IFF_NO_PI).unwrap();
    ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq (40 bytes on Linux); `ifr` is 40
    // live bytes laid out as one.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, ifr.as_mut_ptr()) };
    assert!(rc >= 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
    tun
}

fn probe_with_silence(
    ifname: &str,
    target: Ipv4Addr,
    silence: impl FnOnce() + Send + 'static,
) -> ProbeReport {
    let wire = wire::open(&WireSpec::Tap {
        ifname: ifname.into(),
    })
    .unwrap();
    let mut cfg = ProbeConfig::new(ep(1), target);
    cfg.count = Some(400); // 2 s at 200/s
    cfg.threshold_intervals = 20.0; // 100 ms: above scheduling stalls, below the silence
    let probe = Probe::new(cfg, wire).unwrap();
    let handle = probe.handle();
    let t = std::thread::spawn(move || {
        while handle.received() < 100 {
            std::thread::sleep(Duration::from_millis(1));
        }
        handle.mark("silence");
        silence();
    });
    let report = probe.run(&AtomicBool::new(false)).unwrap();
    t.join().unwrap();
    report
}

fn check_one_outage(report: &ProbeReport) {
    let summary = format!(
        "sent={} received={} lost={} counters={:?} outages={:?} marks={:?}",
        report.sent, report.received, report.lost, report.counters, report.outages, report.marks
    );
    assert_eq!(report.outages.len(), 1, "{summary}");
    let o = &report.outages[0];
    assert!(o.end_s.is_some(), "replies came back: {o:?}");
    assert!(o.duration_ms >= SILENCE.as_secs_f64() * 1e3 - 5.0, "{o:?}");
    assert_eq!(
        o.probes_lost, report.lost,
        "every loss is in the outage: {summary}"
    );
    // How many probes fell in the silence depends on slots a busy machine skipped; that
    // some did is certain.
    assert!(report.lost > 0, "{summary}");
}

#[test]
fn probe_over_a_tap_to_an_echo_on_its_device_side() {
    if let Some(r) = skip_reason() {
        println!("SKIP: {r}");
        return;
    }
    let name = format!("npt{}", std::process::id() % 100_000);
    ip(&["tuntap", "add", "dev", &name, "mode", "tap"]);
    let _cleanup = Cleanup(vec![vec!["link".into(), "del".into(), name.clone()]]);
    let mut tap = open_tap(&name);
    ip(&["link", "set", &name, "up"]);

    let dropped = Arc::new(AtomicU64::new(0));
    let silent_from = Arc::new(AtomicU64::new(u64::MAX)); // ms since `t0`
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let echo = {
        let (dropped, silent_from, stop) = (dropped.clone(), silent_from.clone(), stop.clone());
        let mut out = tap.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                let mut fds = [rustix::event::PollFd::new(
                    &tap,
                    rustix::event::PollFlags::IN,
                )];
                let ts = rustix::event::Timespec {
                    tv_sec: 0,
                    tv_nsec: 20_000_000,
                };
                if rustix::event::poll(&mut fds, Some(&ts)).unwrap() == 0 {
                    continue;
                }
                let n = tap.read(&mut buf).unwrap();
                let f = &buf[..n];
                let is_probe = matches!(
                    frame::parse(f).map(|p| p.payload),
                    Ok(Payload::EchoRequest { .. })
                );
                let now_ms = u64::try_from(t0.elapsed().as_millis()).unwrap();
                let from = silent_from.load(Ordering::Relaxed);
                if is_probe && now_ms >= from && now_ms < from + 300 {
                    dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if let Some(a) = frame::echo_answer(ep(2), f) {
                    out.write_all(&a).unwrap();
                }
            }
        })
    };
    let sf = silent_from.clone();
    let report = probe_with_silence(&name, ep(2).ip, move || {
        sf.store(
            u64::try_from(t0.elapsed().as_millis()).unwrap(),
            Ordering::Relaxed,
        );
    });
    stop.store(true, Ordering::Relaxed);
    echo.join().unwrap();
    assert_eq!(
        report.lost,
        dropped.load(Ordering::Relaxed),
        "{:?}",
        report.outages
    );
    assert_eq!(
        report.run.target,
        format!("{}/{}", ep(2).mac, ep(2).ip),
        "resolved by ARP"
    );
    check_one_outage(&report);
}

#[test]
fn probe_over_a_veth_to_the_linux_stack_in_a_netns() {
    if let Some(r) = skip_reason() {
        println!("SKIP: {r}");
        return;
    }
    let id = std::process::id() % 100_000;
    let (ns, here, there) = (
        format!("netprobe-{id}"),
        format!("npa{id}"),
        format!("npb{id}"),
    );
    ip(&["netns", "add", &ns]);
    let _cleanup = Cleanup(vec![
        vec!["link".into(), "del".into(), here.clone()],
        vec!["netns".into(), "del".into(), ns.clone()],
    ]);
    ip(&[
        "link", "add", &here, "type", "veth", "peer", "name", &there, "netns", &ns,
    ]);
    ip(&["link", "set", &here, "up"]);
    ip(&["-n", &ns, "addr", "add", "192.0.2.2/24", "dev", &there]);
    ip(&["-n", &ns, "link", "set", &there, "up"]);

    let (ns2, there2) = (ns.clone(), there.clone());
    let report = probe_with_silence(&here, ep(2).ip, move || {
        ip(&["-n", &ns2, "link", "set", &there2, "down"]);
        std::thread::sleep(SILENCE);
        ip(&["-n", &ns2, "link", "set", &there2, "up"]);
    });
    check_one_outage(&report);
    assert!(report.received > 200, "received {}", report.received);
}
