//! The network path with Linux as the guest OS (root only): the NIC's wire is a TAP
//! interface in the host's namespace (the wire peer, 10.77.0.254), and each guest's netfront
//! is a TAP interface `eth0` in its own network namespace (the `net-guest tap` adapter), so
//! the kernel's own stack in each namespace is the guest. `ping` and plain sockets run over
//! netfront → netif rings → idd-net → virtio-net → the wire; `ping`, `iperf3` and a TCP
//! stream across an IDD crash.
//!
//! Skips (and says so) without root or without `ip`.

mod common;

use std::io::Write;
use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use device_manager::fault::Fault;
use device_manager::manager::{Manager, ManagerConfig};
use policy::Policy;

/// Why this machine cannot run the test, if it cannot.
fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (TAP devices and network namespaces)".into());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("needs `ip` (iproute2)".into());
    }
    if Command::new("iperf3").arg("-v").output().is_err() {
        return Some("needs iperf3 (ci/setup.sh installs it)".into());
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("needs /dev/net/tun".into());
    }
    None
}

fn ip(args: &[&str]) -> std::process::Output {
    Command::new("ip").args(args).output().expect("running ip")
}

/// Namespaces and the wire's TAP, removed on drop.
struct Net {
    namespaces: Vec<String>,
    tap: String,
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = ip(&["netns", "del", ns]);
        }
        let _ = ip(&["link", "del", &self.tap]);
    }
}

fn ping(ns: Option<&str>, to: &str, count: u32) -> std::process::Output {
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "ping"]);
            c
        }
        None => Command::new("ping"),
    };
    cmd.args(["-c", &count.to_string(), "-i", "0.2", "-W", "2", to])
        .output()
        .expect("running ping")
}

/// Run an iperf3 server (in `server_ns`, or the host) on `server_ip` and a 2-second client
/// in `client_ns`; returns the receiver's Mbit/s. `None` when iperf3 is missing.
fn iperf3(server_ns: Option<&str>, server_ip: &str, client_ns: &str) -> f64 {
    let mut server = match server_ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "iperf3"]);
            c
        }
        None => Command::new("iperf3"),
    };
    let mut server = server
        .args(["-s", "-1", "-B", server_ip, "-p", "5299"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("iperf3 server");
    std::thread::sleep(Duration::from_millis(300));
    let out = Command::new("ip")
        .args([
            "netns", "exec", client_ns, "iperf3", "-c", server_ip, "-p", "5299", "-t", "2", "-J",
        ])
        .output()
        .expect("iperf3 client");
    let _ = server.wait();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "iperf3 output: {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("no throughput in {json}"))
        / 1e6
}

fn wait_ready(m: &mut Manager, g: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if m.guest_lines(g)
            .unwrap()
            .iter()
            .any(|l| l.starts_with("ready"))
        {
            return;
        }
        assert!(m.guest_running(g).unwrap(), "guest {g} ended");
        assert!(Instant::now() < deadline, "guest {g} not ready");
        m.supervise(Duration::from_millis(10)).unwrap();
    }
}

/// Run `f` (a blocking command) while the manager is supervised.
fn supervised<T: Send>(m: &mut Manager, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        let h = s.spawn(f);
        while !h.is_finished() {
            m.supervise(Duration::from_millis(10)).unwrap();
        }
        h.join().unwrap()
    })
}

#[test]
fn linux_stacks_in_namespaces_talk_through_one_idd() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIP: {why}");
        return;
    }
    let tag = std::process::id() % 10_000;
    let tap = format!("iddw{tag}");
    let (ns_a, ns_b) = (format!("idd-a-{tag}"), format!("idd-b-{tag}"));
    let _net = Net {
        namespaces: vec![ns_a.clone(), ns_b.clone()],
        tap: tap.clone(),
    };
    for ns in [&ns_a, &ns_b] {
        let out = ip(&["netns", "add", ns]);
        assert!(out.status.success(), "ip netns add: {out:?}");
    }
    let text = format!(
        r#"
[restart]
max_restarts = 1000
window = "600s"
heartbeat = "500ms"

[[device]]
name = "net0"
kind = "virtio-net"
wire = "tap"
ifname = "{tap}"

[[guest]]
name = "alice"
[[guest.net]]
device = "net0"
mac = "02:00:00:00:00:0a"
ips = ["10.77.0.1/32"]

[[guest]]
name = "bob"
[[guest.net]]
device = "net0"
mac = "02:00:00:00:00:0b"
ips = ["10.77.0.2/32"]
"#
    );
    let p = Policy::parse(&text, "tap.toml").unwrap_or_else(|e| panic!("{}", e.render()));
    let cfg = ManagerConfig {
        idd_program: "idd-blk".into(),
        guest_program: common::program("guest-frontends", "net-guest"),
        net_idd_program: common::program("idd-net", "idd-net"),
        heartbeat: None,
        verbose: std::env::var_os("DM_DEBUG").is_some(),
    };
    let mut m = Manager::start(&p, cfg).unwrap();
    // The wire peer: the host's end of the NIC's TAP.
    for args in [
        vec!["addr", "add", "10.77.0.254/24", "dev", tap.as_str()],
        vec!["link", "set", tap.as_str(), "up"],
    ] {
        let out = ip(&args);
        assert!(out.status.success(), "ip {args:?}: {out:?}");
    }
    m.start_guest(
        "alice",
        &[
            "tap",
            "--netns",
            &ns_a,
            "--ifname",
            "eth0",
            "--ip",
            "10.77.0.1/24",
        ],
    )
    .unwrap();
    m.start_guest(
        "bob",
        &[
            "tap",
            "--netns",
            &ns_b,
            "--ifname",
            "eth0",
            "--ip",
            "10.77.0.2/24",
        ],
    )
    .unwrap();
    m.connect(Duration::from_secs(30)).unwrap();
    wait_ready(&mut m, "alice");
    wait_ready(&mut m, "bob");

    // Guest to guest (local switching in the IDD), and each guest to the wire peer.
    let (a, b) = (ns_a.clone(), ns_b.clone());
    for (ns, to) in [
        (&a, "10.77.0.2"),
        (&b, "10.77.0.1"),
        (&a, "10.77.0.254"),
        (&b, "10.77.0.254"),
    ] {
        let out = supervised(&mut m, || ping(Some(ns), to, 3));
        assert!(
            out.status.success(),
            "ping from {ns} to {to}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // The wire peer to a guest.
    let out = supervised(&mut m, || ping(None, "10.77.0.1", 3));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // iperf3 from alice's namespace to the wire peer, and between the two guests.
    for (server_ns, server_ip, client_ns) in [
        (None, "10.77.0.254", &ns_a),
        (Some(&ns_b), "10.77.0.2", &ns_a),
    ] {
        let mbps = supervised(&mut m, || {
            iperf3(server_ns.map(String::as_str), server_ip, client_ns)
        });
        eprintln!("iperf3 {client_ns} -> {server_ip}: {mbps:.0} Mbit/s");
        assert!(mbps > 1.0, "iperf3 moved almost nothing");
    }

    // A plain TCP conversation, 8 MiB from the host to bob, across an IDD crash.
    let listener = TcpListener::bind("10.77.0.254:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let payload: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(7) + i / 4096).to_le_bytes()[0])
        .collect();
    let want = payload.clone();
    let ns = ns_b.clone();
    let received = std::thread::scope(|s| {
        let server = s.spawn(move || {
            let (mut c, _) = listener.accept().unwrap();
            c.write_all(&payload).unwrap();
        });
        let client = s.spawn(move || {
            // `nc` from busybox or netcat may be missing: use bash's /dev/tcp in the netns.
            Command::new("ip")
                .args(["netns", "exec", &ns, "bash", "-c"])
                .arg(format!("exec 3<>/dev/tcp/10.77.0.254/{port}; cat <&3"))
                .output()
                .unwrap()
        });
        // Crash once the transfer is under way (bob's TAP has seen traffic).
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_millis(30));
        m.inject_into("net0", &Fault::Crash).unwrap();
        while !client.is_finished() {
            m.supervise(Duration::from_millis(5)).unwrap();
        }
        let took = t0.elapsed();
        eprintln!(
            "8 MiB over TCP in {took:?} across {} recovery(ies): {:?}",
            m.recoveries().len(),
            m.recoveries().first().map(ToString::to_string)
        );
        assert!(
            !m.recoveries().is_empty(),
            "the transfer ended before the crash was even recovered: not a test of the crash"
        );
        server.join().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while m.recoveries().is_empty() && Instant::now() < deadline {
            m.supervise(Duration::from_millis(5)).unwrap();
        }
        client.join().unwrap()
    });
    assert_eq!(m.recoveries().len(), 1, "the crash was recovered");
    assert!(received.status.success(), "{received:?}");
    assert!(
        received.stdout == want,
        "TCP stream corrupted across the crash ({} bytes)",
        received.stdout.len()
    );
}
