//! `net-guest echo` in a sandboxed process domain (XenStore over its ring, netif over grants
//! and event channels through the hypercall channels), against the test-side ring backend in
//! an in-process IDD domain: ARP, ping and UDP echo are answered byte-correct, and the
//! program's stdout follows the contract (`ready`, `stats`, `summary` on SIGTERM). Then the
//! backend closes and comes back (the reconnect protocol) and the guest says `reconnected`
//! and answers again. `net-guest tap` (root) puts a network namespace's Linux stack on
//! netfront (ARP, UDP and ping over the rings); `net-guest flood` sends sized UDP. These are
//! also the check that the sandbox allows everything netfront and the TAP bridge do.

#![allow(clippy::cast_possible_truncation, missing_docs)]

mod netfront_support;

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devchan::netif::NetifStatus;
use devchan::xenstore::client::NO_TX;
use devchan::xenstore::perms::{Perm, PERM_READ};
use devchan::xenstore::Client;
use etherparse::{
    ArpEthIpv4Packet, ArpOperation, ArpPacket, Icmpv4Type, NetSlice, PacketBuilder, SlicedPacket,
    TransportSlice,
};
use guest_frontends::netfront::{frames_needed, DEFAULT_RX_BUFFERS, DEFAULT_TX_FRAMES};
use hypervisor::domain::DomainConfig;
use hypervisor::launch::{ExitReport, LaunchConfig};
use hypervisor::local::LocalPlatform;
use hypervisor::system::System;
use hypervisor::xenstored::domains::DomainStores;
use hypervisor::xenstored::socket::{self, SocketServer};
use hypervisor::xenstored::Xenstored;
use netfront_support::{Rings, MAC};
use std::os::unix::net::UnixStream;

const PEER: [u8; 6] = [2, 0, 0, 0, 0, 0x99];
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const PEER_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 9);

fn wait_for(xs: &mut Client<UnixStream>, path: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while xs.read(NO_TX, path).ok().as_deref() != Some(want.as_bytes()) {
        assert!(Instant::now() < deadline, "{path} never became {want}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn num(xs: &mut Client<UnixStream>, path: &str) -> u32 {
    String::from_utf8(xs.read(NO_TX, path).unwrap())
        .unwrap()
        .parse()
        .unwrap()
}

fn attach(
    xs: &mut Client<UnixStream>,
    plat: &Arc<LocalPlatform>,
    guest: u16,
    fd: &str,
    bd: &str,
) -> Rings {
    wait_for(xs, &format!("{fd}/state"), "4");
    let tx = num(xs, &format!("{fd}/tx-ring-ref"));
    let rx = num(xs, &format!("{fd}/rx-ring-ref"));
    let port = num(xs, &format!("{fd}/event-channel"));
    let rings = Rings::attach(plat, guest, tx, rx, port);
    xs.write(NO_TX, &format!("{bd}/state"), b"4").unwrap();
    rings
}

/// Deliver `frame` and return the guest's answer (the next transmit), acknowledged.
fn exchange(r: &mut Rings, frame: &[u8]) -> Vec<u8> {
    r.deliver_copy(frame, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some((p, data)) = r.take_tx() {
            r.answer_tx(&p, NetifStatus::Okay);
            return data;
        }
        assert!(Instant::now() < deadline, "no answer from the guest");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn arp_request() -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(PEER, [0xff; 6])
        .arp(ArpPacket::from(ArpEthIpv4Packet {
            operation: ArpOperation::REQUEST,
            sender_mac: PEER,
            sender_ipv4: PEER_IP.octets(),
            target_mac: [0; 6],
            target_ipv4: GUEST_IP.octets(),
        }))
        .write(&mut out)
        .unwrap();
    out
}

fn ping(seq: u16) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(PEER, MAC)
        .ipv4(PEER_IP.octets(), GUEST_IP.octets(), 64)
        .icmpv4_echo_request(0x42, seq)
        .write(&mut out, &[seq as u8; 56])
        .unwrap();
    out
}

fn check_pong(reply: &[u8], seq: u16) {
    let p = SlicedPacket::from_ethernet(reply).unwrap();
    let Some(TransportSlice::Icmpv4(icmp)) = p.transport else {
        panic!("not ICMP: {reply:?}")
    };
    let Icmpv4Type::EchoReply(e) = icmp.icmp_type() else {
        panic!("not an echo reply")
    };
    assert_eq!((e.id, e.seq), (0x42, seq));
    assert_eq!(icmp.payload(), &[seq as u8; 56][..]);
    assert_eq!(
        &reply[..12],
        &[PEER, MAC].concat()[..],
        "addressed back, from the guest's MAC"
    );
}

/// The manager's part: the store (with the guest's ring), a guest domain of the RAM
/// net-guest asks for, an in-process IDD domain, and both XenStore directories.
struct Env {
    // Declared (so dropped) before the directory holding its socket: stopping the server
    // connects to it.
    _server: hypervisor::xenstored::socket::ServerHandle,
    _dir: tempfile::TempDir,
    _sys: Arc<System>,
    stores: DomainStores,
    admin: Client<UnixStream>,
    plat: Arc<LocalPlatform>,
    guest: u16,
    frames: u64,
    fd: String,
    bd: String,
}

fn setup() -> Env {
    let sys = System::new();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("xs.sock");
    let cfg = |name: &str, nr_frames| DomainConfig {
        name: name.into(),
        nr_frames,
        iommu: None,
    };
    let dom0 = sys.create_domain(cfg("dom0", 16)).unwrap();
    let xs = Xenstored::new();
    let _server = SocketServer::bind(&sock, Arc::clone(&xs))
        .unwrap()
        .spawn()
        .unwrap();
    let stores = DomainStores::start(Arc::clone(&sys), Arc::clone(&xs), dom0).unwrap();
    let frames = hypervisor::memory::layout::FIRST_FREE_FRAME
        + frames_needed(DEFAULT_RX_BUFFERS, DEFAULT_TX_FRAMES);
    let guest = sys.create_domain(cfg("guest", frames)).unwrap();
    stores.introduce(guest).unwrap();
    let idd = sys.create_domain(cfg("idd-net", 32)).unwrap();
    let plat = Arc::new(LocalPlatform::new(sys.clone(), idd).unwrap());
    // The toolstack: the guest owns its device directory; the backend's is readable to it.
    let mut admin = socket::connect(&sock).unwrap();
    let fd = format!("/local/domain/{guest}/device/vif/0");
    let bd = format!("/local/domain/{idd}/backend/vif/{guest}/0");
    for p in [
        format!("/local/domain/{guest}/device"),
        format!("/local/domain/{guest}/device/vif"),
        fd.clone(),
    ] {
        admin.write(NO_TX, &p, b"").unwrap();
        admin.set_perms(NO_TX, &p, &[Perm::new(guest, 0)]).unwrap();
    }
    for (k, v) in [
        ("state", "1"),
        ("handle", "0"),
        ("mac", "02:00:00:00:00:11"),
        ("backend-id", &idd.to_string()),
        ("backend", &bd),
    ] {
        admin
            .write(NO_TX, &format!("{fd}/{k}"), v.as_bytes())
            .unwrap();
    }
    admin.write(NO_TX, &bd, b"").unwrap();
    admin
        .set_perms(
            NO_TX,
            &bd,
            &[Perm::new(idd, 0), Perm::new(guest, PERM_READ)],
        )
        .unwrap();
    for (k, v) in [
        ("frontend", fd.as_str()),
        ("feature-rx-copy", "1"),
        ("feature-rx-flip", "1"),
        ("feature-sg", "1"),
        ("state", "2"),
    ] {
        admin
            .write(NO_TX, &format!("{bd}/{k}"), v.as_bytes())
            .unwrap();
    }

    Env {
        _sys: sys,
        _dir: dir,
        _server,
        stores,
        admin,
        plat,
        guest,
        frames,
        fd,
        bd,
    }
}

/// Start net-guest with `args`; its stdout lines arrive on the receiver.
fn spawn(
    env: &Env,
    args: &[&str],
) -> (
    hypervisor::launch::RunningDomain,
    mpsc::Receiver<String>,
    std::thread::JoinHandle<()>,
) {
    let prog = env!("CARGO_BIN_EXE_net-guest");
    let mut g = env
        .stores
        .spawn_in(
            env.guest,
            LaunchConfig::new("guest", env.frames, prog, args),
        )
        .unwrap();
    let out = g.child_mut().stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    (g, lines, reader)
}

/// The next line starting with `prefix` (earlier ones are skipped).
fn next_line(lines: &mpsc::Receiver<String>, prefix: &str) -> String {
    loop {
        let l = lines
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("no `{prefix}` line"));
        if l.starts_with(prefix) {
            return l;
        }
    }
}

#[test]
fn net_guest_echo_answers_through_a_process_domain_and_reconnects() {
    let env = setup();
    let (mut g, lines, reader) = spawn(&env, &["echo", "--ip", "10.0.0.2/24"]);
    let Env {
        mut admin,
        plat,
        guest,
        fd,
        bd,
        ..
    } = env;
    let next_line = |prefix: &str| next_line(&lines, prefix);

    let mut r = attach(&mut admin, &plat, guest, &fd, &bd);
    let ready = next_line("ready ");
    assert!(
        ready.starts_with("ready mac=02:00:00:00:00:11 mode=copy"),
        "{ready}"
    );
    assert_eq!(
        admin.read(NO_TX, &format!("{fd}/request-rx-copy")).unwrap(),
        b"1"
    );

    // ARP, ping, UDP echo.
    let reply = exchange(&mut r, &arp_request());
    let p = SlicedPacket::from_ethernet(&reply).unwrap();
    let Some(NetSlice::Arp(a)) = p.net else {
        panic!("not ARP: {reply:?}")
    };
    let a = a.to_packet().try_eth_ipv4().unwrap();
    assert_eq!(
        (a.operation, a.sender_mac, a.sender_ipv4, a.target_mac),
        (ArpOperation::REPLY, MAC, GUEST_IP.octets(), PEER)
    );
    check_pong(&exchange(&mut r, &ping(1)), 1);
    let udp =
        guest_frontends::echo::udp_frame((PEER, PEER_IP, 5555), (MAC, GUEST_IP, 7), 300, 0x33)
            .unwrap();
    let reply = exchange(&mut r, &udp);
    let p = SlicedPacket::from_ethernet(&reply).unwrap();
    let Some(TransportSlice::Udp(u)) = p.transport else {
        panic!("not UDP")
    };
    assert_eq!((u.source_port(), u.destination_port()), (7, 5555));
    assert_eq!(u.payload(), &[0x33; 300 - 42][..]);
    let stats = next_line("stats ");
    assert!(stats.contains(" arp=1 "), "{stats}");

    // The reconnect protocol: the backend closes, the guest closes, the backend comes back.
    admin.write(NO_TX, &format!("{bd}/state"), b"5").unwrap();
    wait_for(&mut admin, &format!("{fd}/state"), "6");
    drop(r);
    admin.write(NO_TX, &format!("{bd}/state"), b"6").unwrap();
    wait_for(&mut admin, &format!("{fd}/state"), "1");
    admin.write(NO_TX, &format!("{bd}/state"), b"2").unwrap();
    let mut r = attach(&mut admin, &plat, guest, &fd, &bd);
    assert_eq!(next_line("reconnected"), "reconnected n=1");
    check_pong(&exchange(&mut r, &ping(2)), 2);

    // SIGTERM: a summary, exit 0.
    // SAFETY: kill(2) on our own child's pid with SIGTERM; no memory is involved.
    unsafe { libc::kill(g.child_mut().id() as libc::pid_t, libc::SIGTERM) };
    let summary = next_line("summary ");
    let exit = g.wait_exit(Some(Duration::from_secs(30))).unwrap();
    assert_eq!(exit, Some(ExitReport::Exited(0)), "{summary}");
    for kv in [
        "arp=1",
        "icmp=2",
        "udp=1",
        "reconnects=1",
        "proto=0",
        "tx=4 ",
    ] {
        assert!(summary.contains(kv), "{kv} in {summary}");
    }
    drop(lines);
    reader.join().unwrap();
}

/// The next transmit for which `pred` holds (others are answered and skipped).
fn next_tx(r: &mut Rings, what: &str, pred: impl Fn(&SlicedPacket) -> bool) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some((p, data)) = r.take_tx() {
            r.answer_tx(&p, NetifStatus::Okay);
            if SlicedPacket::from_ethernet(&data).is_ok_and(|s| pred(&s)) {
                return data;
            }
            continue;
        }
        assert!(Instant::now() < deadline, "no {what} from the guest");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn run_cmd(args: &[&str]) -> bool {
    std::process::Command::new(args[0])
        .args(&args[1..])
        .status()
        .is_ok_and(|s| s.success())
}

/// Root only: `net-guest tap` makes netfront an interface of a network namespace, whose Linux
/// stack then resolves a neighbour, sends UDP and answers ping over the rings.
#[test]
fn net_guest_tap_puts_a_linux_stack_on_netfront() {
    if !rustix::process::geteuid().is_root() || !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("SKIP: needs root and /dev/net/tun");
        return;
    }
    let ns = format!("nfp{}", std::process::id() % 100_000);
    if !run_cmd(&["ip", "netns", "add", &ns]) {
        eprintln!("SKIP: ip netns add failed");
        return;
    }
    struct DelNs(String);
    impl Drop for DelNs {
        fn drop(&mut self) {
            run_cmd(&["ip", "netns", "del", &self.0]);
        }
    }
    let _del = DelNs(ns.clone());
    let env = setup();
    let (mut g, lines, reader) = spawn(
        &env,
        &[
            "tap",
            "--netns",
            &ns,
            "--ifname",
            "nf0",
            "--ip",
            "10.0.0.2/24",
        ],
    );
    let Env {
        mut admin,
        plat,
        guest,
        fd,
        bd,
        ..
    } = env;
    let mut r = attach(&mut admin, &plat, guest, &fd, &bd);
    let ready = next_line(&lines, "ready ");
    assert!(ready.starts_with("ready mac=02:00:00:00:00:11"), "{ready}");
    // The stack sends UDP to a neighbour: first it asks who that is.
    assert!(run_cmd(&[
        "ip",
        "netns",
        "exec",
        &ns,
        "bash",
        "-c",
        "echo hello > /dev/udp/10.0.0.9/9"
    ]));
    let arp = next_tx(&mut r, "ARP request", |p| {
        matches!(p.net, Some(NetSlice::Arp(_)))
    });
    assert_eq!(&arp[6..12], &MAC, "from netfront's MAC");
    let mut reply = Vec::new();
    PacketBuilder::ethernet2(PEER, MAC)
        .arp(ArpPacket::from(ArpEthIpv4Packet {
            operation: ArpOperation::REPLY,
            sender_mac: PEER,
            sender_ipv4: PEER_IP.octets(),
            target_mac: MAC,
            target_ipv4: GUEST_IP.octets(),
        }))
        .write(&mut reply)
        .unwrap();
    r.deliver_copy(&reply, 0);
    let udp = next_tx(
        &mut r,
        "UDP datagram",
        |p| matches!(&p.transport, Some(TransportSlice::Udp(u)) if u.destination_port() == 9),
    );
    assert_eq!(&udp[..12], &[PEER, MAC].concat()[..]);
    assert!(udp.ends_with(b"hello\n"));
    // A ping from the wire is answered by the namespace's stack.
    r.deliver_copy(&ping(3), 0);
    let pong = next_tx(
        &mut r,
        "echo reply",
        |p| matches!(&p.transport, Some(TransportSlice::Icmpv4(i)) if matches!(i.icmp_type(), Icmpv4Type::EchoReply(_))),
    );
    check_pong(&pong, 3);
    // SAFETY: kill(2) on our own child's pid with SIGTERM; no memory is involved.
    unsafe { libc::kill(g.child_mut().id() as libc::pid_t, libc::SIGTERM) };
    let summary = next_line(&lines, "summary ");
    let exit = g.wait_exit(Some(Duration::from_secs(30))).unwrap();
    assert_eq!(exit, Some(ExitReport::Exited(0)), "{summary}");
    assert!(summary.contains("proto=0"), "{summary}");
    drop(lines);
    reader.join().unwrap();
}

/// `net-guest flood` sends UDP datagrams of the asked size to the asked address as fast as
/// the backend answers, and its summary counts what was acknowledged.
#[test]
fn net_guest_flood_sends_sized_udp_until_time_is_up() {
    let env = setup();
    let (mut g, lines, reader) = spawn(
        &env,
        &[
            "flood",
            "--dst-mac",
            "02:00:00:00:00:99",
            "--dst-ip",
            "10.0.0.9",
            "--size",
            "1000",
            "--secs",
            "0.5",
        ],
    );
    let Env {
        mut admin,
        plat,
        guest,
        fd,
        bd,
        ..
    } = env;
    let mut r = attach(&mut admin, &plat, guest, &fd, &bd);
    next_line(&lines, "ready ");
    let mut seen = 0u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    let summary = loop {
        assert!(Instant::now() < deadline, "no summary");
        for (p, data) in r.take_all_tx() {
            r.answer_tx(&p, NetifStatus::Okay);
            assert_eq!(data.len(), 1000);
            let s = SlicedPacket::from_ethernet(&data).unwrap();
            let Some(TransportSlice::Udp(u)) = s.transport else {
                panic!("not UDP")
            };
            assert_eq!(u.destination_port(), 9);
            assert_eq!(&data[..12], &[PEER, MAC].concat()[..]);
            seen += 1;
        }
        match lines.try_recv() {
            Ok(l) if l.starts_with("summary ") => break l,
            _ => std::thread::sleep(Duration::from_millis(1)),
        }
    };
    let exit = g.wait_exit(Some(Duration::from_secs(30))).unwrap();
    assert_eq!(exit, Some(ExitReport::Exited(0)), "{summary}");
    let tx: u64 = summary
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("tx="))
        .unwrap()
        .parse()
        .unwrap();
    assert!(tx > 0 && tx <= seen, "tx={tx} seen={seen}: {summary}");
    assert!(summary.contains(&format!("txb={}", tx * 1000)), "{summary}");
    drop(lines);
    reader.join().unwrap();
}
