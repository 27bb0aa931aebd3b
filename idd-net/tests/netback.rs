//! netback end to end on the in-process platform: guest domains with real rings and grants,
//! an IDD domain with an IOMMU, and the in-memory NIC reaching memory only through it.

mod netback_front;

use devchan::netif::{
    NetifRxRequest, NetifTxRequest, TxFlags, NETIF_RSP_DROPPED, NETIF_RSP_ERROR, NETIF_RSP_OKAY,
    NETTXF_MORE_DATA,
};
use devchan::platform::{Frame, Platform, SharedPage};
use hypervisor::domain::DomainConfig;
use hypervisor::local::LocalPlatform;
use hypervisor::system::System;
use idd_net::credit::Credit;
use idd_net::filter::{parse_nets, Mac};
use idd_net::journal::{ChannelId, Journal, Opened};
use idd_net::mem::{MemNic, MemWire};
use idd_net::netback::{release_previous, BackendConfig, Netback};
use iospace::iommu::Iommu;
use netback_front::{frame_from, Front, PEER};
use std::sync::Arc;
use std::time::Duration;

const RECORD: Frame = 7;
const HEADER: Frame = 9;
const RX_FIRST: Frame = 10;
const RX_FRAMES: u64 = 24;
const JOURNAL_FIRST: Frame = RX_FIRST + RX_FRAMES;
const DEV_RX: usize = 16;

fn journal_frame(i: u64) -> Frame {
    JOURNAL_FIRST + 3 * i
}

struct Rig {
    sys: Arc<System>,
    idd: Arc<LocalPlatform>,
    iommu: Arc<Iommu>,
    wire: MemWire,
}

impl Rig {
    fn new() -> Self {
        let sys = System::new();
        let iommu = Iommu::new(512);
        let d = sys
            .create_domain(DomainConfig {
                name: "idd-net".into(),
                nr_frames: journal_frame(4),
                iommu: Some(iommu.clone()),
            })
            .unwrap();
        let idd = Arc::new(LocalPlatform::new(sys.clone(), d).unwrap());
        Self {
            sys,
            idd,
            iommu,
            wire: MemWire::default(),
        }
    }

    fn backend(&self) -> Netback<LocalPlatform, MemNic> {
        self.backend_with(8)
    }

    fn backend_with(&self, batch: usize) -> Netback<LocalPlatform, MemNic> {
        release_previous(&*self.idd, RECORD, (0..4).map(journal_frame)).unwrap();
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
                batch,
            },
        )
        .unwrap()
    }

    fn guest(&self, name: &str, mac: u8) -> Front {
        Front::new(&self.sys, self.idd.domid(), name, mac)
    }

    fn inject(&self, frame: &[u8]) -> bool {
        self.wire.inject(&self.iommu.device(), frame)
    }
}

fn run<F: FnMut(&mut Netback<LocalPlatform, MemNic>) -> bool>(
    nb: &mut Netback<LocalPlatform, MemNic>,
    mut done: F,
) {
    for _ in 0..20_000 {
        nb.run_once(Duration::from_millis(1)).unwrap();
        if done(nb) {
            return;
        }
    }
    panic!("condition not reached");
}

#[test]
fn multi_slot_transmit_is_byte_exact_and_leaves_no_pins() {
    let rig = Rig::new();
    let mut nb = rig.backend();
    let pool_pins = rig.iommu.len();
    let mut g = rig.guest("g", 1);
    let ch = nb.attach(g.channel(journal_frame(0), true)).unwrap();
    // 1400 bytes over three pages: a 20-byte first fragment at the end of a page (so the
    // 128-byte header copy spans fragments), then 1000, then 380.
    let data = frame_from(PEER, g.mac, [10, 0, 0, 2], 1400, 3);
    let ids = g.send_frags(&data, &[(0, 4076, 20), (1, 0, 1000), (2, 100, 380)]);
    let one = frame_from(PEER, g.mac, [10, 0, 0, 2], 60, 4);
    let id1 = g.send(&one, 3);
    run(&mut nb, |_| nb_answered(&mut g) >= 4);
    for id in ids.iter().chain([&id1]) {
        assert_eq!(g.tx_seen.get(id), Some(&vec![NETIF_RSP_OKAY]), "id {id}");
    }
    assert_eq!(rig.wire.take_sent(), vec![data, one]);
    let s = nb.stats(ch).unwrap();
    assert_eq!((s.tx, s.txb, s.spoof, s.errors), (2, 1460, 0, 0));
    assert_eq!(rig.iommu.len(), pool_pins, "every fragment pin released");
    assert_eq!(nb.in_flight(), 0);
}

#[test]
fn spoofed_and_malformed_transmits_are_answered_and_never_sent() {
    let rig = Rig::new();
    let mut nb = rig.backend();
    let mut g = rig.guest("g", 1);
    let mut cfg = g.channel(journal_frame(0), true);
    cfg.nets = parse_nets("10.0.0.0/24").unwrap();
    let ch = nb.attach(cfg).unwrap();
    let other = Mac([2, 0, 0, 0, 0, 7]);
    let bad_mac = g.send(&frame_from(PEER, other, [10, 0, 0, 2], 100, 0), 0);
    let bad_ip = g.send(&frame_from(PEER, g.mac, [10, 0, 9, 2], 100, 0), 1);
    let runt = g.send(&[0u8; 10], 2);
    // A chain that announces more than was published, then a good packet.
    let (_, gref) = g.pages[3];
    g.put_raw(&[NetifTxRequest {
        gref,
        offset: 0,
        flags: NETTXF_MORE_DATA,
        id: 500,
        size: 100,
    }]);
    for _ in 0..10 {
        nb.poll().unwrap();
    }
    assert_eq!(nb_answered(&mut g), 4, "{:?}", g.tx_seen);
    let good_frame = frame_from(PEER, g.mac, [10, 0, 0, 2], 100, 1);
    let good = g.send(&good_frame, 4);
    run(&mut nb, |_| nb_answered(&mut g) >= 5);
    assert_eq!(g.tx_seen[&bad_mac], [NETIF_RSP_DROPPED]);
    assert_eq!(g.tx_seen[&bad_ip], [NETIF_RSP_DROPPED]);
    assert_eq!(g.tx_seen[&runt], [NETIF_RSP_ERROR]);
    // The chain ended at what was published: its slot is answered with an error, and the
    // next packet is read on its own.
    assert_eq!(g.tx_seen[&500], [NETIF_RSP_ERROR]);
    assert_eq!(g.tx_seen[&good], [NETIF_RSP_OKAY]);
    assert_eq!(rig.wire.take_sent(), vec![good_frame]);
    let s = nb.stats(ch).unwrap();
    assert_eq!((s.tx, s.spoof, s.errors), (1, 2, 2));
    assert!(nb.failed().is_empty());
}

fn nb_answered(g: &mut Front) -> usize {
    g.tx_responses();
    g.tx_seen.values().map(Vec::len).sum()
}

#[test]
fn receive_demux_broadcast_copy_and_exchange() {
    let rig = Rig::new();
    let mut nb = rig.backend();
    let mut a = rig.guest("a", 1);
    let mut b = rig.guest("b", 2);
    let mut c = rig.guest("c", 3);
    let ca = nb.attach(a.channel(journal_frame(0), true)).unwrap();
    let cb = nb.attach(b.channel(journal_frame(1), false)).unwrap();
    let cc = nb.attach(c.channel(journal_frame(2), false)).unwrap();
    a.post_rx(0..4, false);
    b.post_rx(0..4, true);
    c.post_rx(0..4, true);
    nb.poll().unwrap();
    let to_a = frame_from(a.mac, PEER, [10, 0, 0, 9], 300, 1);
    let to_b = frame_from(b.mac, PEER, [10, 0, 0, 9], 1500, 2);
    let nobody = frame_from(Mac([2, 0, 0, 0, 0, 0x55]), PEER, [10, 0, 0, 9], 80, 3);
    let bcast = frame_from(Mac::BROADCAST, PEER, [10, 0, 0, 9], 120, 4);
    for f in [&to_a, &to_b, &nobody, &bcast] {
        assert!(rig.inject(f));
        nb.poll().unwrap();
    }
    let got_a: Vec<_> = a.received().into_iter().map(Result::unwrap).collect();
    let got_b: Vec<_> = b.received().into_iter().map(Result::unwrap).collect();
    let got_c: Vec<_> = c.received().into_iter().map(Result::unwrap).collect();
    assert_eq!(got_a, vec![to_a, bcast.clone()]);
    assert_eq!(got_b, vec![to_b, bcast.clone()]);
    assert_eq!(got_c, vec![bcast]);
    assert_eq!(nb.unclaimed(), 1);
    assert_eq!(nb.stats(ca).unwrap().rx, 2);
    assert_eq!(nb.stats(cb).unwrap().rxb, 1620);
    assert_eq!(nb.stats(cc).unwrap().rx, 1);
    // The pool is whole again: every page back at the device or spare, pinned.
    for _ in 0..3 {
        nb.poll().unwrap();
    }
    assert_eq!(rig.wire.posted(), DEV_RX);
}

#[test]
fn no_posted_buffer_means_dropped_and_counted() {
    let rig = Rig::new();
    let mut nb = rig.backend();
    let mut a = rig.guest("a", 1);
    let ca = nb.attach(a.channel(journal_frame(0), true)).unwrap();
    a.post_rx(0..1, false);
    nb.poll().unwrap();
    for i in 0..3 {
        assert!(rig.inject(&frame_from(a.mac, PEER, [10, 0, 0, 9], 64, i)));
        nb.poll().unwrap();
    }
    assert_eq!(a.received().len(), 1);
    let s = nb.stats(ca).unwrap();
    assert_eq!((s.rx, s.drop), (1, 2));
    // Buffers come back to the device after drops too.
    assert_eq!(rig.wire.posted(), DEV_RX);
}

#[test]
fn credit_splits_a_saturated_link_in_the_configured_ratio() {
    let rig = Rig::new();
    // A batch large enough that one round can use a whole window's credit: the loop must
    // never be what limits a channel.
    let mut nb = rig.backend_with(64);
    let mut a = rig.guest("a", 1);
    let mut b = rig.guest("b", 2);
    let mut ca = a.channel(journal_frame(0), true);
    ca.credit = Some(Credit::new(20_000, 4_000).unwrap());
    let mut cb = b.channel(journal_frame(1), true);
    cb.credit = Some(Credit::new(60_000, 4_000).unwrap());
    let ia = nb.attach(ca).unwrap();
    let ib = nb.attach(cb).unwrap();
    let fa = frame_from(PEER, a.mac, [10, 0, 0, 1], 1000, 0);
    let fb = frame_from(PEER, b.mac, [10, 0, 0, 2], 1000, 0);
    // Keep 120 packets outstanding per guest (more than a window's worth); stop when 4000
    // went out in total.
    let (mut out_a, mut out_b) = (0usize, 0usize);
    let mut total = 0;
    while total < 4000 {
        out_a -= a.tx_responses().len();
        out_b -= b.tx_responses().len();
        while out_a < 120 {
            a.send(&fa, out_a % 8);
            out_a += 1;
        }
        while out_b < 120 {
            b.send(&fb, out_b % 8);
            out_b += 1;
        }
        nb.run_once(Duration::from_millis(1)).unwrap();
        total += rig.wire.take_sent().len();
    }
    let (sa, sb) = (nb.stats(ia).unwrap(), nb.stats(ib).unwrap());
    let ratio = sb.txb as f64 / sa.txb as f64;
    eprintln!(
        "credit split: {} vs {} bytes, ratio {ratio:.3} (configured 3)",
        sb.txb, sa.txb
    );
    assert!(
        (ratio - 3.0).abs() <= 0.3,
        "ratio {ratio} ({} vs {} bytes)",
        sb.txb,
        sa.txb
    );
    assert!(sa.wait > 0 && sb.wait > 0, "both waited for credit");
    assert_eq!(sa.errors + sb.errors + sa.spoof + sb.spoof, 0);
}

#[test]
fn restarted_backend_replays_in_flight_transmits_and_keeps_posted_buffers() {
    let rig = Rig::new();
    let mut nb = rig.backend();
    let mut g = rig.guest("g", 1);
    let cfg = g.channel(journal_frame(0), true);
    nb.attach(cfg.clone()).unwrap();
    g.post_rx(10..14, false);
    // Two frames received and answered before the crash.
    for i in 0..2 {
        assert!(rig.inject(&frame_from(g.mac, PEER, [10, 0, 0, 9], 100, i)));
    }
    nb.poll().unwrap();
    assert_eq!(g.received().len(), 2);
    // Three transmits acknowledged, then five at the device when the process dies.
    let frames: Vec<Vec<u8>> = (0..8)
        .map(|i| {
            frame_from(
                PEER,
                g.mac,
                [10, 0, 0, 2],
                200 + i,
                u8::try_from(i).unwrap(),
            )
        })
        .collect();
    let early: Vec<u16> = (0..3).map(|i| g.send(&frames[i], i)).collect();
    run(&mut nb, |_| nb_answered(&mut g) >= 3);
    rig.wire.hold_tx(true);
    let late: Vec<u16> = (3..8).map(|i| g.send(&frames[i], i)).collect();
    for _ in 0..5 {
        nb.poll().unwrap();
    }
    assert_eq!(nb.in_flight(), 5);
    assert_eq!(rig.wire.take_sent().len(), 8, "all went to the device once");
    // The process dies: nothing is cleaned up.
    std::mem::forget(nb);
    rig.wire.hold_tx(false);
    let mut nb = rig.backend();
    let ch = nb.attach(cfg).unwrap();
    run(&mut nb, |_| nb_answered(&mut g) >= 8);
    // Every transmit answered exactly once; the unanswered ones went out again.
    for id in early.iter().chain(&late) {
        assert_eq!(g.tx_seen[id], [NETIF_RSP_OKAY], "id {id}");
    }
    assert_eq!(rig.wire.take_sent(), frames[3..].to_vec());
    assert_eq!(nb.stats(ch).unwrap().replayed, 5);
    // The two receive buffers still posted are used after the restart.
    for i in 0..3 {
        rig.inject(&frame_from(g.mac, PEER, [10, 0, 0, 9], 100, 10 + i));
        nb.poll().unwrap();
    }
    assert_eq!(g.received().len(), 2);
    assert_eq!(nb.stats(ch).unwrap().drop, 1);
    // No pin of the dead process is left: only the new pool's.
    assert_eq!(rig.iommu.len(), 1 + usize::try_from(RX_FRAMES).unwrap());
}

#[test]
fn guests_on_one_idd_reach_each_other_and_broadcasts_reach_the_wire() {
    let rig = Rig::new();
    let mut nb = rig.backend();
    let mut a = rig.guest("a", 1);
    let mut b = rig.guest("b", 2);
    let mut c = rig.guest("c", 3);
    let ia = nb.attach(a.channel(journal_frame(0), true)).unwrap();
    let ib = nb.attach(b.channel(journal_frame(1), true)).unwrap();
    nb.attach(c.channel(journal_frame(2), false)).unwrap();
    a.post_rx(20..24, false);
    b.post_rx(20..24, false);
    c.post_rx(20..24, true);
    // Unicast a → b, multi-slot: stays off the wire.
    let to_b = frame_from(b.mac, a.mac, [10, 0, 0, 1], 1000, 5);
    a.send_frags(&to_b, &[(0, 4000, 60), (1, 0, 940)]);
    // Broadcast from a: every other guest and the wire, not a itself.
    let bcast = frame_from(Mac::BROADCAST, a.mac, [10, 0, 0, 1], 90, 6);
    a.send(&bcast, 2);
    run(&mut nb, |_| nb_answered(&mut a) >= 3);
    nb.poll().unwrap();
    let got_b: Vec<_> = b.received().into_iter().map(Result::unwrap).collect();
    let got_c: Vec<_> = c.received().into_iter().map(Result::unwrap).collect();
    assert_eq!(got_b, vec![to_b, bcast.clone()]);
    assert_eq!(got_c, vec![bcast.clone()]);
    assert!(a.received().is_empty());
    assert_eq!(rig.wire.take_sent(), vec![bcast]);
    assert!(a.tx_seen.values().all(|s| s == &[NETIF_RSP_OKAY]));
    assert_eq!(nb.stats(ia).unwrap().tx, 2);
    assert_eq!(nb.stats(ib).unwrap().rx, 2);
    // The pool is whole again.
    nb.poll().unwrap();
    assert_eq!(rig.wire.posted(), DEV_RX);
}

/// A UDP/IPv4 frame from `src` with a zero checksum and `payload`.
fn udp_frame(src: Mac, payload: &[u8]) -> Vec<u8> {
    let mut f = PEER.0.to_vec();
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = u16::try_from(28 + payload.len()).unwrap();
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&total.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
    let ulen = u16::try_from(8 + payload.len()).unwrap();
    f.extend_from_slice(&[0x30, 0x39, 0, 7]);
    f.extend_from_slice(&ulen.to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    f
}

#[test]
fn blank_checksums_are_completed_before_the_wire() {
    let rig = Rig::new();
    let mut nb = rig.backend();
    let mut g = rig.guest("g", 1);
    let ch = nb.attach(g.channel(journal_frame(0), true)).unwrap();
    let payload: Vec<u8> = (0..1000u32)
        .map(|i| u8::try_from(i % 253).unwrap())
        .collect();
    let frame = udp_frame(g.mac, &payload);
    // Multi-slot, the checksum field inside the first 128 bytes.
    let ids = g.send_with(&frame, &[(0, 0, 500), (1, 0, 542)], TxFlags::CSUM_BLANK);
    let mut icmp = udp_frame(g.mac, b"ping");
    icmp[23] = 1; // not TCP or UDP: nothing to complete
    let bad = g.send_with(&icmp, &[(2, 0, 46)], TxFlags::CSUM_BLANK)[0];
    run(&mut nb, |_| nb_answered(&mut g) >= 3);
    assert_eq!(g.tx_seen[&ids[0]], [NETIF_RSP_OKAY]);
    assert_eq!(g.tx_seen[&bad], [NETIF_RSP_ERROR]);
    let sent = rig.wire.take_sent();
    assert_eq!(sent.len(), 1);
    let mut expect = frame.clone();
    idd_net::csum::complete(&mut expect).unwrap();
    assert_ne!(expect[40..42], [0, 0]);
    assert_eq!(sent[0], expect, "only the checksum bytes changed");
    assert_eq!(nb.stats(ch).unwrap().errors, 1);
}

#[test]
fn receive_requests_consumed_by_a_dead_process_stay_posted() {
    let rig = Rig::new();
    let mut nb = rig.backend();
    let mut g = rig.guest("g", 1);
    let cfg = g.channel(journal_frame(0), true);
    nb.attach(cfg.clone()).unwrap();
    g.post_rx(10..13, false);
    nb.poll().unwrap();
    std::mem::forget(nb);
    // The dead process had consumed receive request 0 (journaled it) and put a response
    // into its slot that it never pushed: the slot no longer holds the request.
    let (&id0, &(_, gref0, _)) = g.rx_posted.iter().next().unwrap();
    let chan = ChannelId {
        guest: cfg.guest,
        tx_ring_ref: cfg.tx_ring_ref,
        rx_ring_ref: cfg.rx_ring_ref,
        remote_port: cfg.remote_port,
    };
    let (j, opened) = Journal::open(&*rig.idd, cfg.journal_frame, chan, 0, 0).unwrap();
    assert!(matches!(opened, Opened::Resume { .. }));
    let raw = NetifRxRequest {
        id: id0,
        pad: 0,
        gref: gref0,
    };
    j.rx_consumed(&*rig.idd, 0, &raw, 1).unwrap();
    g.plat
        .write_local(
            g._rx_page.frame(),
            64,
            &[0xad, 0xde, 0, 0, 0xff, 0xff, 0xff, 0xff],
        )
        .unwrap();
    // The new process keeps request 0 as a posted buffer and takes 1 and 2 from the ring.
    let mut nb = rig.backend();
    let ch = nb.attach(cfg).unwrap();
    let frames: Vec<_> = (0..4)
        .map(|i| {
            frame_from(
                g.mac,
                PEER,
                [10, 0, 0, 9],
                100 + i,
                u8::try_from(i).unwrap(),
            )
        })
        .collect();
    for f in &frames {
        assert!(rig.inject(f));
        nb.poll().unwrap();
    }
    let got: Vec<_> = g.received().into_iter().map(Result::unwrap).collect();
    assert_eq!(
        got,
        frames[..3].to_vec(),
        "delivered in posting order, request 0 first"
    );
    let s = nb.stats(ch).unwrap();
    assert_eq!((s.rx, s.drop, s.errors), (3, 1, 0));
}

#[test]
fn a_broken_ring_fails_its_channel_only() {
    let rig = Rig::new();
    let mut nb = rig.backend();
    let mut a = rig.guest("a", 1);
    let mut b = rig.guest("b", 2);
    nb.attach(a.channel(journal_frame(0), true)).unwrap();
    let ib = nb.attach(b.channel(journal_frame(1), true)).unwrap();
    // Guest a claims 1000 requests on a 256-entry ring.
    a.plat
        .write_local(a._tx_page.frame(), 0, &1000u32.to_le_bytes())
        .unwrap();
    a.plat.evtchn_notify(a.port).unwrap();
    let f = frame_from(PEER, b.mac, [10, 0, 0, 2], 80, 1);
    b.send(&f, 0);
    run(&mut nb, |_| nb_answered(&mut b) >= 1);
    let failed = nb.failed();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].0, 0);
    assert_eq!(rig.wire.take_sent(), vec![f]);
    assert_eq!(nb.stats(ib).unwrap().tx, 1);
    // Frames for the failed channel are not delivered (and nothing panics).
    a.post_rx(0..1, false);
    assert!(rig.inject(&frame_from(a.mac, PEER, [10, 0, 0, 9], 64, 0)));
    nb.poll().unwrap();
    assert_eq!(nb.unclaimed(), 1);
}
