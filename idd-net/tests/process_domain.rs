//! The `idd-net` binary as a sandboxed process domain: this test is domain 0 (the System, the
//! emulated virtio-net-pci behind its I/O Space server, the far end of its UDP wire) and two
//! guests whose netfronts are written here (one receiving by copy, one by page exchange).
//! Frames cross both ways byte for byte, guests reach each other through the IDD, spoofed
//! frames never reach the wire, the heartbeat follows the protocol, and the IDD process is
//! SIGKILLed with transmits in flight and restarted in the same domain (`spawn_in`) several
//! times: the guests never reconnect, and every transmit is answered exactly once.

mod netback_front;

use devchan::netif::{NETIF_RSP_DROPPED, NETIF_RSP_OKAY};
use devchan::platform::Platform;
use hypervisor::domain::DomainConfig;
use hypervisor::launch::{spawn_in, LaunchConfig, RunningDomain};
use hypervisor::system::System;
use idd_net::filter::Mac;
use idd_net::layout::{frames_needed, journal_frame};
use iospace::emu::virtio_net::{NetConfig, VirtioNet};
use iospace::emu::virtio_pci::VirtioPci;
use iospace::emu::wire::UdpWire;
use iospace::emu::PciBus;
use iospace::iommu::Iommu;
use iospace::space::IoSpace;
use netback_front::{frame_from, Front, PEER};
use std::io::{BufRead, Write};
use std::net::UdpSocket;
use std::os::unix::net::UnixListener;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

const NIC_MAC: [u8; 6] = [2, 0, 0, 0, 0x10, 1];

struct Idd {
    running: RunningDomain,
    lines: mpsc::Receiver<String>,
}

fn start(sys: &Arc<System>, idd: u16, socket: &std::path::Path, channels: &[String]) -> Idd {
    start_with(sys, idd, socket, channels, &[], "ready")
}

fn start_with(
    sys: &Arc<System>,
    idd: u16,
    socket: &std::path::Path,
    channels: &[String],
    extra: &[&str],
    first_line: &str,
) -> Idd {
    let mut args = vec!["--device-socket", socket.to_str().unwrap()];
    for c in channels {
        args.extend(["--channel", c.as_str()]);
    }
    args.extend(extra);
    let mut cfg = LaunchConfig::new("idd-net", 0, env!("CARGO_BIN_EXE_idd-net"), &args);
    cfg.stderr = std::process::Stdio::inherit();
    // A standby gets its channels on stdin; every IDD its control commands.
    cfg.stdin = std::process::Stdio::piped();
    let mut running = spawn_in(sys, idd, cfg).unwrap();
    let out = running.child_mut().stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(out).lines() {
            let Ok(l) = l else { return };
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    let first = lines.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(first, first_line, "idd-net did not come up");
    Idd { running, lines }
}

fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn recv_far(far: &UdpSocket) -> Vec<u8> {
    let mut b = vec![0u8; 65536];
    let (n, _) = far.recv_from(&mut b).unwrap();
    b.truncate(n);
    b
}

struct Nic {
    far: UdpSocket,
    wire_addr: std::net::SocketAddr,
    iommu: Arc<Iommu>,
    socket: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// Domain 0's side of the NIC: the emulated virtio-net-pci on a UDP wire whose far end is
/// `far`, and its I/O Space server (one IDD process at a time, in connection order).
fn nic() -> Nic {
    let far = UdpSocket::bind("127.0.0.1:0").unwrap();
    far.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let wire = UdpWire::bind(
        "127.0.0.1:0".parse().unwrap(),
        Some(far.local_addr().unwrap()),
    )
    .unwrap();
    let wire_addr = wire.local_addr().unwrap();
    let net = VirtioNet::new(NetConfig::new(NIC_MAC, Arc::new(wire))).unwrap();
    let iommu = Iommu::new(1024);
    let dev = Arc::new(VirtioPci::new(Arc::new(net), iommu.device(), 11).unwrap());
    let bus = PciBus::new();
    let bdf = bus.plug(4, dev.clone()).unwrap();
    let space = Arc::new(IoSpace::new(bdf, dev).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("iospace.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(s) = s else { return };
            let _ = iospace::link::serve(&space, s);
        }
    });

    Nic {
        far,
        wire_addr,
        iommu,
        socket,
        _dir: dir,
    }
}

/// `front`'s channel as the IDD's `--channel` and `attach` take it, followed by `extra`
/// (`,key=value` options).
fn channel_spec(front: &Front, extra: &str) -> String {
    format!(
        "guest={},tx={},rx={},port={},mac={}{extra}",
        front.plat.domid(),
        front.tx_ref,
        front.rx_ref,
        front.port,
        front.mac
    )
}

#[test]
fn idd_net_process_serves_two_guests_and_survives_kills() {
    let Nic {
        far,
        wire_addr,
        iommu,
        socket,
        _dir,
    } = nic();
    let sys = System::new();
    let idd = sys
        .create_domain(DomainConfig {
            name: "idd-net".into(),
            nr_frames: frames_needed(2),
            iommu: Some(iommu.clone()),
        })
        .unwrap();
    let mut a = Front::new(&sys, idd, "guest-a", 1);
    let mut b = Front::new(&sys, idd, "guest-b", 2);
    let spec = |g: &Front, copy: u8| channel_spec(g, &format!(",rx-copy={copy},ips=10.0.0.0/24"));
    let channels = [spec(&a, 1), spec(&b, 0)];
    // The journals are where the layout says.
    assert_eq!(
        a.channel(journal_frame(0), true).journal_frame,
        journal_frame(0)
    );
    let mut running = start(&sys, idd, &socket, &channels);
    a.post_rx(20..36, false);
    b.post_rx(20..36, true);

    // Guest → wire, byte for byte (multi-slot).
    let out = frame_from(PEER, a.mac, [10, 0, 0, 1], 1400, 1);
    a.send_frags(&out, &[(0, 3000, 1000), (1, 0, 400)]);
    assert_eq!(recv_far(&far), out);
    // Wire → guests: unicast to each, then a broadcast to both.
    let to_a = frame_from(a.mac, PEER, [10, 0, 0, 9], 200, 2);
    let to_b = frame_from(b.mac, PEER, [10, 0, 0, 9], 1500, 3);
    let bcast = frame_from(Mac::BROADCAST, PEER, [10, 0, 0, 9], 64, 4);
    for f in [&to_a, &to_b, &bcast] {
        far.send_to(f, wire_addr).unwrap();
    }
    let mut got_a = Vec::new();
    let mut got_b = Vec::new();
    wait_for("frames at the guests", || {
        got_a.extend(a.received().into_iter().map(Result::unwrap));
        got_b.extend(b.received().into_iter().map(Result::unwrap));
        (got_a.len() >= 2 && got_b.len() >= 2).then_some(())
    });
    assert_eq!(got_a, vec![to_a, bcast.clone()]);
    assert_eq!(got_b, vec![to_b, bcast]);
    // Guest → guest through the IDD; a spoofed frame is answered DROPPED and never sent.
    let a_to_b = frame_from(b.mac, a.mac, [10, 0, 0, 1], 300, 5);
    a.send(&a_to_b, 2);
    let spoofed = a.send(&frame_from(PEER, a.mac, [192, 168, 0, 1], 100, 6), 3);
    let got = wait_for("guest to guest", || b.received().pop());
    assert_eq!(got.unwrap(), a_to_b);
    wait_for("spoof answer", || {
        a.tx_responses();
        a.tx_seen.contains_key(&spoofed).then_some(())
    });
    assert_eq!(a.tx_seen[&spoofed], [NETIF_RSP_DROPPED]);
    // The heartbeat: per channel counters in the contract's format.
    let hb = wait_for("a heartbeat with the spoof counted", || {
        let l = running.lines.recv_timeout(Duration::from_secs(5)).ok()?;
        (l.starts_with("hb ") && l.contains("spoof=1")).then_some(l)
    });
    let chans = hb.split(" channels=").nth(1).unwrap();
    let parts: Vec<&str> = chans.split(';').collect();
    assert_eq!(parts.len(), 2, "{hb}");
    assert!(
        parts[0].starts_with("tx=") && parts[0].contains(",spoof=1,wait=0"),
        "{hb}"
    );
    assert!(parts[1].contains("rx=3,"), "{hb}");

    // Kill the IDD with transmits in flight, restart it in the same domain, repeatedly.
    let mut sent_ids = Vec::new();
    let mut sent_frames = 0;
    for round in 0..4u8 {
        for i in 0..6u8 {
            let f = frame_from(
                PEER,
                a.mac,
                [10, 0, 0, 1],
                100 + usize::from(i),
                round * 10 + i,
            );
            sent_ids.push(a.send(&f, 4 + usize::from(i)));
            sent_frames += 1;
        }
        // Kill at different points: before, while, after the IDD takes them.
        std::thread::sleep(Duration::from_micros(400 * u64::from(round)));
        running.running.kill().unwrap();
        running.running.stop_server();
        drop(running);
        // The manager's recovery: revoke every pin the dead process's domain holds.
        sys.set_holder_deadline(idd, Instant::now()).unwrap();
        sys.revoke_overdue();
        let t0 = Instant::now();
        running = start(&sys, idd, &socket, &channels);
        eprintln!("cold restart {round}: ready in {:?}", t0.elapsed());
        wait_for("every transmit answered", || {
            a.tx_responses();
            sent_ids
                .iter()
                .all(|id| a.tx_seen.contains_key(id))
                .then_some(())
        });
    }
    for id in &sent_ids {
        assert_eq!(
            a.tx_seen[id],
            [NETIF_RSP_OKAY],
            "id {id} answered once, sent"
        );
    }
    // Each went to the wire at least once (perhaps twice: replayed after a kill).
    let mut seen = 0;
    far.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut b2 = vec![0u8; 65536];
    while far.recv_from(&mut b2).is_ok() {
        seen += 1;
    }
    assert!(
        seen >= sent_frames,
        "{seen} frames on the wire for {sent_frames} sent"
    );
    // Each process released its predecessor's pins: only the live driver's three frames and
    // netback's header and receive pages remain in the IOMMU.
    let own = idd_net::layout::HEADER_FRAMES + idd_net::layout::RX_FRAMES;
    assert_eq!(iommu.len() as u64, 3 + own, "pins leaked across restarts");
    // Receive still works after the restarts, into the buffers posted before them.
    let late = frame_from(a.mac, PEER, [10, 0, 0, 9], 500, 9);
    far.send_to(&late, wire_addr).unwrap();
    let got = wait_for("a frame after the restarts", || a.received().pop());
    assert_eq!(got.unwrap(), late);
    running.running.kill().unwrap();
}

#[test]
fn a_hot_standby_is_promoted_and_serves_the_reconnected_guests() {
    let Nic {
        far,
        wire_addr,
        iommu,
        socket,
        _dir,
    } = nic();
    let sys = System::new();
    let mk = |name: &str| {
        sys.create_domain(DomainConfig {
            name: name.into(),
            nr_frames: frames_needed(1),
            iommu: Some(iommu.clone()),
        })
        .unwrap()
    };
    let (primary_dom, standby_dom) = (mk("idd-net"), mk("idd-net-standby"));
    let spec = |g: &Front| channel_spec(g, "");
    let mut a = Front::new(&sys, primary_dom, "guest-a", 1);
    let mut primary = start(&sys, primary_dom, &socket, &[spec(&a)]);
    let out = frame_from(PEER, a.mac, [10, 0, 0, 1], 200, 1);
    a.send(&out, 0);
    assert_eq!(recv_far(&far), out);
    // The standby: sandboxed and connected, idle.
    let mut standby = start_with(&sys, standby_dom, &socket, &[], &["--standby"], "standby");
    let mut ctl = standby.running.child_mut().stdin.take().unwrap();
    // The primary fails; the guest sets up fresh rings for the standby's domain (what the
    // reconnect protocol does), and the manager promotes the standby with them.
    primary.running.kill().unwrap();
    primary.running.stop_server();
    drop(primary);
    sys.set_holder_deadline(primary_dom, Instant::now())
        .unwrap();
    sys.revoke_overdue();
    let t0 = Instant::now();
    let mut b = Front::new(&sys, standby_dom, "guest-a-reconnected", 1);
    writeln!(ctl, "channel {}\ngo", spec(&b)).unwrap();
    let ready = standby.lines.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(ready, "ready");
    eprintln!("standby promoted in {:?}", t0.elapsed());
    b.post_rx(20..24, false);
    let out = frame_from(PEER, b.mac, [10, 0, 0, 1], 300, 2);
    b.send(&out, 0);
    assert_eq!(recv_far(&far), out);
    let back = frame_from(b.mac, PEER, [10, 0, 0, 9], 400, 3);
    far.send_to(&back, wire_addr).unwrap();
    let got = wait_for("a frame through the promoted standby", || {
        b.received().pop()
    });
    assert_eq!(got.unwrap(), back);
    // The promoted standby's stdin goes on as its control input.
    writeln!(ctl, "9 ips 0 10.0.0.0/24").unwrap();
    let a = wait_for("the control answer", || {
        standby
            .lines
            .try_recv()
            .ok()
            .filter(|l| l.starts_with("ctl "))
    });
    assert_eq!(a, "ctl 9 ok");
    standby.running.kill().unwrap();
}

#[test]
fn control_commands_change_a_channels_policy_while_serving() {
    let Nic {
        far,
        iommu,
        socket,
        _dir,
        ..
    } = nic();
    let sys = System::new();
    let idd = sys
        .create_domain(DomainConfig {
            name: "idd-net".into(),
            nr_frames: frames_needed(2),
            iommu: Some(iommu.clone()),
        })
        .unwrap();
    let mut a = Front::new(&sys, idd, "guest-a", 1);
    let spec = channel_spec(&a, ",ips=10.0.0.1/32");
    let mut idd_run = start(&sys, idd, &socket, &[spec]);
    let mut ctl = idd_run.running.child_mut().stdin.take().unwrap();
    let mut say = |line: &str| {
        ctl.write_all(line.as_bytes()).unwrap();
        ctl.flush().unwrap();
    };
    let answer = |idd_run: &mut Idd, id: u64| {
        let want = format!("ctl {id} ");
        wait_for("a control answer", || {
            idd_run
                .lines
                .try_recv()
                .ok()
                .filter(|l| l.starts_with(&want))
        })
    };
    let tx_status = |a: &mut Front, id: u16| {
        wait_for("a transmit answer", || {
            a.tx_responses();
            a.tx_seen.get(&id).cloned()
        })
    };
    // 10.0.0.7 is not allowed: dropped.
    let from7 = frame_from(PEER, a.mac, [10, 0, 0, 7], 200, 1);
    let id = a.send(&from7, 0);
    assert_eq!(tx_status(&mut a, id), [NETIF_RSP_DROPPED]);
    // Bad commands: err, or ignored without an id; the channel is unchanged.
    say("1 ips 3 10.0.0.0/24\n");
    assert!(answer(&mut idd_run, 1).starts_with("ctl 1 err"));
    say("2 ips 0 10.0.0.0/99\n");
    assert!(answer(&mut idd_run, 2).starts_with("ctl 2 err"));
    say("3 credit 0 0/0\n");
    assert!(answer(&mut idd_run, 3).starts_with("ctl 3 err"));
    say("4 region 0 100\n");
    assert!(answer(&mut idd_run, 4).starts_with("ctl 4 err"));
    say("ips 0 10.0.0.0/24\nthis is not a command at all\n");
    // Allow the /24: the same source now goes out.
    say("5 ips 0 10.0.0.0/24\n");
    assert_eq!(answer(&mut idd_run, 5), "ctl 5 ok");
    let id = a.send(&from7, 1);
    assert_eq!(tx_status(&mut a, id), [NETIF_RSP_OKAY]);
    assert_eq!(recv_far(&far), from7);
    // A credit, then none again: answered, and frames still flow.
    say("6 credit 0 10000/1000\n7 credit 0 none\n");
    assert_eq!(answer(&mut idd_run, 6), "ctl 6 ok");
    assert_eq!(answer(&mut idd_run, 7), "ctl 7 ok");
    let id = a.send(&from7, 2);
    assert_eq!(tx_status(&mut a, id), [NETIF_RSP_OKAY]);
    assert_eq!(recv_far(&far), from7);
    // No filter at all: any source.
    say("8 ips 0 none\n");
    assert_eq!(answer(&mut idd_run, 8), "ctl 8 ok");
    let other = frame_from(PEER, a.mac, [192, 168, 9, 9], 200, 3);
    let id = a.send(&other, 3);
    assert_eq!(tx_status(&mut a, id), [NETIF_RSP_OKAY]);
    assert_eq!(recv_far(&far), other);
    // A second guest attached while serving: channel 1, its own filter.
    let mut b = Front::new(&sys, idd, "guest-b", 2);
    say(&format!(
        "10 attach {}\n",
        channel_spec(&b, ",ips=10.0.0.2/32")
    ));
    assert_eq!(answer(&mut idd_run, 10), "ctl 10 ok");
    let from_b = frame_from(PEER, b.mac, [10, 0, 0, 2], 300, 4);
    let id = b.send(&from_b, 0);
    assert_eq!(tx_status(&mut b, id), [NETIF_RSP_OKAY]);
    assert_eq!(recv_far(&far), from_b);
    say("11 credit 1 1000/1000\n12 attach guest=1\n");
    assert_eq!(answer(&mut idd_run, 11), "ctl 11 ok");
    assert!(answer(&mut idd_run, 12).starts_with("ctl 12 err"));
    idd_run.running.kill().unwrap();
}
