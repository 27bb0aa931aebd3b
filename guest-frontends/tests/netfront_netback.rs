//! netfront against the real netback (`idd-net`), both in-process on `LocalPlatform` domains
//! of one `System`, with idd-net's in-memory NIC behind the IDD's IOMMU as the device. The
//! test plays the manager: it writes both XenStore directories, reads the frontend's keys,
//! attaches the channel to netback, and moves the backend's `state`.
//!
//! Covered: transmit (one- and multi-slot) reaches the wire byte for byte from the guest's
//! MAC; receive by copy and by page exchange; a transparent restart of netback (the process
//! dies, a new one re-attaches to the same rings and replays its journal) that the frontend
//! does not notice except for the pause: nothing is lost, nothing reconnects.
#![allow(clippy::cast_possible_truncation, missing_docs)]

use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devchan::grant::DomId;
use devchan::platform::Platform;
use devchan::xenstore::client::NO_TX;
use devchan::xenstore::Client;
use guest_frontends::netfront::{NetFront, NetFrontConfig, RxMode};
use hypervisor::domain::DomainConfig;
use hypervisor::local::LocalPlatform;
use hypervisor::system::System;
use hypervisor::xenstored::socket::{self, ServerHandle, SocketServer};
use hypervisor::xenstored::Xenstored;
use idd_net::filter::Mac;
use idd_net::mem::{MemNic, MemWire};
use idd_net::netback::{release_previous, BackendConfig, ChannelConfig, Netback};
use iospace::iommu::Iommu;

const MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x21];
const PEER: [u8; 6] = [2, 0, 0, 0, 0, 0x99];
// The IDD's frames (after the platform's 7): pool record, transmit headers, receive pool,
// journal.
const RECORD: u64 = 7;
const HEADER: u64 = 9;
const RX_FIRST: u64 = 10;
const RX_FRAMES: u64 = 24;
const JOURNAL: u64 = RX_FIRST + RX_FRAMES;
const DEV_RX: usize = 16;

type Front = NetFront<LocalPlatform, Client<UnixStream>>;
type Back = Netback<LocalPlatform, MemNic>;

struct Rig {
    sys: Arc<System>,
    xs: ServerHandle,
    _dir: tempfile::TempDir,
    ctl: Client<UnixStream>,
    idd: Arc<LocalPlatform>,
    iommu: Arc<Iommu>,
    wire: MemWire,
    guest: DomId,
    guest_plat: Arc<LocalPlatform>,
}

impl Rig {
    fn new() -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let sys = System::new();
        let dir = tempfile::tempdir().unwrap();
        let xs = SocketServer::bind(dir.path().join("xs.sock"), Xenstored::new())
            .unwrap()
            .spawn()
            .unwrap();
        let ctl = socket::connect(xs.path()).unwrap();
        let iommu = Iommu::new(512);
        let d = sys
            .create_domain(DomainConfig {
                name: "idd-net".into(),
                nr_frames: JOURNAL + 8,
                iommu: Some(iommu.clone()),
            })
            .unwrap();
        let idd = Arc::new(LocalPlatform::new(sys.clone(), d).unwrap());
        let guest = sys
            .create_domain(DomainConfig {
                name: "guest".into(),
                nr_frames: 7 + 48,
                iommu: None,
            })
            .unwrap();
        let guest_plat = Arc::new(LocalPlatform::new(sys.clone(), guest).unwrap());
        Self {
            sys,
            xs,
            _dir: dir,
            ctl,
            idd,
            iommu,
            wire: MemWire::default(),
            guest,
            guest_plat,
        }
    }

    /// A netback process (a fresh one after a crash releases what the last one held).
    fn netback(&self) -> Back {
        release_previous(&*self.idd, RECORD, [JOURNAL]).unwrap();
        let nic = MemNic::new(
            self.iommu.device(),
            self.wire.clone(),
            [2, 0, 0, 0, 0, 0xee],
        )
        .with_rx_capacity(DEV_RX);
        Netback::new(
            self.idd.clone(),
            nic,
            BackendConfig {
                record_frame: RECORD,
                header_frames: vec![HEADER],
                rx_frames: (RX_FIRST..RX_FIRST + RX_FRAMES).collect(),
                batch: 8,
            },
        )
        .unwrap()
    }

    fn w(&mut self, path: &str, v: &str) {
        self.ctl.write(NO_TX, path, v.as_bytes()).unwrap();
    }

    fn r(&mut self, path: &str) -> Option<String> {
        self.ctl
            .read(NO_TX, path)
            .ok()
            .map(|v| String::from_utf8(v).unwrap())
    }

    /// The manager's whole connect: directories, netfront's handshake, netback's attach.
    fn connect(&mut self, mode: RxMode) -> (Front, Back, ChannelConfig) {
        let idd = self.idd.domid();
        let fd = format!("/local/domain/{}/device/vif/0", self.guest);
        let bd = format!("/local/domain/{idd}/backend/vif/{}/0", self.guest);
        for (k, v) in [
            ("frontend", fd.as_str()),
            ("feature-sg", "1"),
            ("feature-rx-copy", "1"),
            ("feature-rx-flip", "1"),
            ("state", "2"),
        ] {
            self.w(&format!("{bd}/{k}"), v);
        }
        self.w(&format!("{fd}/mac"), "02:00:00:00:00:21");
        self.w(&format!("{fd}/backend-id"), &idd.to_string());
        self.w(&format!("{fd}/backend"), &bd);
        let mut cfg = NetFrontConfig::new(self.guest, 0, 7..7 + 48);
        cfg.rx_mode = mode;
        cfg.rx_buffers = 16;
        cfg.poll_interval = Duration::from_millis(20);
        let (plat, xs) = (
            self.guest_plat.clone(),
            socket::connect(self.xs.path()).unwrap(),
        );
        let t = std::thread::spawn(move || NetFront::connect(plat, xs, cfg));
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.r(&format!("{fd}/state")).as_deref() != Some("4") {
            assert!(
                Instant::now() < deadline,
                "frontend never published its rings"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let guest = self.guest;
        let mut n = |k: &str| -> u32 { self.r(&format!("{fd}/{k}")).unwrap().parse().unwrap() };
        let ch = ChannelConfig {
            guest,
            tx_ring_ref: n("tx-ring-ref"),
            rx_ring_ref: n("rx-ring-ref"),
            remote_port: n("event-channel"),
            mac: Mac(MAC),
            rx_copy: n("request-rx-copy") == 1,
            credit: None,
            nets: Vec::new(),
            journal_frame: JOURNAL,
        };
        let mut nb = self.netback();
        nb.attach(ch.clone()).unwrap();
        self.w(&format!("{bd}/state"), "4");
        (t.join().unwrap().unwrap(), nb, ch)
    }
}

/// Run both ends until `cond` holds (bounded, so a broken path fails instead of hanging).
fn run(f: &mut Front, nb: &mut Back, what: &str, mut cond: impl FnMut(&mut Front) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond(f) {
        assert!(
            Instant::now() < deadline,
            "gave up waiting for: {what}; netback {:?} failed {:?}; netfront {:?} pending {}",
            nb.stats(0),
            nb.failed(),
            f.stats(),
            f.tx_pending()
        );
        nb.poll().unwrap();
        f.poll(Duration::from_millis(1)).unwrap();
    }
}

fn frame(dst: [u8; 6], src: [u8; 6], len: usize, seed: u8) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x88, 0xb5]); // local experimental EtherType
    while f.len() < len {
        f.push((f.len() as u8).wrapping_mul(13) ^ seed);
    }
    f
}

fn transmit_and_receive(mode: RxMode) {
    let mut rig = Rig::new();
    let (mut f, mut nb, _) = rig.connect(mode);
    run(&mut f, &mut nb, "connected", |f| f.is_connected());
    assert_eq!(f.rx_mode(), mode);
    // Transmit: frames packed one after the other, so the fourth crosses a page and goes out
    // in two slots (netback takes Ethernet frames up to 1514 bytes).
    let sent: Vec<Vec<u8>> = [60, 1514, 1514, 1514, 1000, 1514]
        .iter()
        .enumerate()
        .map(|(i, n)| frame(PEER, MAC, *n, i as u8))
        .collect();
    for s in &sent {
        f.send(s).unwrap();
    }
    let mut wire = Vec::new();
    run(&mut f, &mut nb, "all on the wire and answered", |f| {
        wire.extend(rig.wire.take_sent());
        wire.len() == sent.len() && f.tx_pending() == 0
    });
    assert_eq!(wire, sent, "byte for byte, in order");
    assert_eq!((f.stats().tx_packets, f.stats().tx_errors), (6, 0));
    // Receive: frames for our MAC from the wire.
    for i in 0..40u8 {
        let data = frame(MAC, PEER, 60 + usize::from(i) * 30, i);
        let dev = rig.iommu.device();
        let mut injected = false;
        run(&mut f, &mut nb, "device took the frame", |_| {
            injected = injected || rig.wire.inject(&dev, &data);
            injected
        });
        run(&mut f, &mut nb, "frame received", |f| {
            f.wait(Duration::ZERO).unwrap()
        });
        assert_eq!(f.recv().unwrap(), data, "frame {i}");
    }
    let st = f.stats();
    assert_eq!(
        (st.rx_packets, st.rx_errors, st.protocol_errors),
        (40, 0, 0)
    );
    assert_eq!(f.quarantined(), 0);
}

#[test]
fn transmit_and_receive_by_copy_through_netback() {
    transmit_and_receive(RxMode::Copy);
}

#[test]
fn transmit_and_receive_by_exchange_through_netback() {
    transmit_and_receive(RxMode::Exchange);
}

#[test]
fn netback_restart_is_transparent_to_netfront() {
    let mut rig = Rig::new();
    let (mut f, mut nb, ch) = rig.connect(RxMode::Copy);
    run(&mut f, &mut nb, "connected", |f| f.is_connected());
    let first = frame(PEER, MAC, 300, 1);
    f.send(&first).unwrap();
    run(&mut f, &mut nb, "first answered", |f| f.tx_pending() == 0);
    // Transmits taken by netback but held at the device when the process dies.
    rig.wire.hold_tx(true);
    let held: Vec<Vec<u8>> = (0..5)
        .map(|i| frame(PEER, MAC, 200 + i * 10, i as u8))
        .collect();
    for h in &held {
        f.send(h).unwrap();
    }
    for _ in 0..5 {
        nb.poll().unwrap();
        f.poll(Duration::from_millis(1)).unwrap();
    }
    assert!(f.tx_pending() > 0, "the crash catches transmits in flight");
    std::mem::forget(nb);
    rig.wire.hold_tx(false);
    // While no backend runs, the guest keeps sending.
    let during = frame(PEER, MAC, 500, 9);
    f.send(&during).unwrap();
    f.poll(Duration::from_millis(5)).unwrap();
    // The new process re-attaches to the same rings.
    let mut nb = rig.netback();
    nb.attach(ch).unwrap();
    run(&mut f, &mut nb, "everything answered", |f| {
        f.tx_pending() == 0
    });
    let wire = rig.wire.take_sent();
    for want in held.iter().chain([&first, &during]) {
        assert!(wire.contains(want), "a transmit was skipped");
    }
    // Receive still works on the same rings.
    let data = frame(MAC, PEER, 128, 7);
    let dev = rig.iommu.device();
    let mut injected = false;
    run(&mut f, &mut nb, "device took the frame", |_| {
        injected = injected || rig.wire.inject(&dev, &data);
        injected
    });
    run(&mut f, &mut nb, "frame received", |f| {
        f.wait(Duration::ZERO).unwrap()
    });
    assert_eq!(f.recv().unwrap(), data);
    let st = f.stats();
    assert_eq!(
        (st.connects, st.disconnects, st.protocol_errors),
        (1, 0, 0),
        "no reconnect"
    );
    let _ = &rig.sys;
}
