//! netback end to end on the in-process platform: guest domains with real rings and grants,
//! an IDD domain with an IOMMU, and the in-memory NIC reaching memory only through it.

use devchan::grant::{DomId, GrantRef, PAGE_SIZE};
use devchan::netif::{
    NetifRxFrontRing, NetifRxRequest, NetifRxResponse, NetifTxFrontRing, NetifTxRequest,
    NetifTxResponse, TxFlags, TxFragment, TxPacket, NETIF_RSP_DROPPED, NETIF_RSP_ERROR,
    NETIF_RSP_OKAY, NETTXF_MORE_DATA,
};
use devchan::platform::{Frame, Platform, Port, SharedPage};
use hypervisor::domain::DomainConfig;
use hypervisor::local::{LocalPage, LocalPlatform};
use hypervisor::system::System;
use idd_net::credit::Credit;
use idd_net::filter::{parse_nets, Mac};
use idd_net::mem::{MemNic, MemWire};
use idd_net::netback::{release_previous, BackendConfig, ChannelConfig, Netback};
use iospace::iommu::Iommu;
use std::collections::BTreeMap;
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::Duration;

const FREE: Frame = 7;
const RECORD: Frame = 7;
const HEADER: Frame = 9;
const RX_FIRST: Frame = 10;
const RX_FRAMES: u64 = 24;
const JOURNAL_FIRST: Frame = RX_FIRST + RX_FRAMES;
const DEV_RX: usize = 16;
const PAGES: u64 = 48;

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
                batch: 8,
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

/// A minimal netfront: two rings, one port, data pages granted to the backend.
struct Front {
    plat: LocalPlatform,
    tx: NetifTxFrontRing,
    rx: NetifRxFrontRing,
    _tx_page: LocalPage,
    _rx_page: LocalPage,
    tx_ref: GrantRef,
    rx_ref: GrantRef,
    port: Port,
    backend: DomId,
    mac: Mac,
    /// Data pages and their grants.
    pages: Vec<(Frame, GrantRef)>,
    next_id: u16,
    /// Transmit responses seen per id.
    tx_seen: BTreeMap<u16, Vec<i16>>,
    /// Receive buffers posted: id → (frame, gref, exchange).
    rx_posted: BTreeMap<u16, (Frame, GrantRef, bool)>,
}

impl Front {
    fn new(sys: &Arc<System>, backend: DomId, name: &str, mac: u8) -> Self {
        let d = sys
            .create_domain(DomainConfig {
                name: name.into(),
                nr_frames: FREE + PAGES + 4,
                iommu: None,
            })
            .unwrap();
        let plat = LocalPlatform::new(sys.clone(), d).unwrap();
        let tx_page = plat.alloc_shared_page().unwrap();
        let rx_page = plat.alloc_shared_page().unwrap();
        let tx_ref = plat.grant_access(backend, tx_page.frame(), false).unwrap();
        let rx_ref = plat.grant_access(backend, rx_page.frame(), false).unwrap();
        // SAFETY: both pages are live 4 KiB pages owned by this struct, dropped after the
        // rings (field order), and accessed only through them.
        let (tx, rx) = unsafe {
            (
                NetifTxFrontRing::init(NonNull::new(tx_page.as_ptr()).unwrap(), PAGE_SIZE).unwrap(),
                NetifRxFrontRing::init(NonNull::new(rx_page.as_ptr()).unwrap(), PAGE_SIZE).unwrap(),
            )
        };
        let port = plat.evtchn_alloc_unbound(backend).unwrap();
        let pages = (0..PAGES)
            .map(|i| {
                (
                    FREE + i,
                    plat.grant_access(backend, FREE + i, false).unwrap(),
                )
            })
            .collect();
        Self {
            plat,
            tx,
            rx,
            _tx_page: tx_page,
            _rx_page: rx_page,
            tx_ref,
            rx_ref,
            port,
            backend,
            mac: Mac([2, 0, 0, 0, 0, mac]),
            pages,
            next_id: 0,
            tx_seen: BTreeMap::new(),
            rx_posted: BTreeMap::new(),
        }
    }

    fn channel(&self, journal: u64, rx_copy: bool) -> ChannelConfig {
        ChannelConfig {
            guest: self.plat.domid(),
            tx_ring_ref: self.tx_ref,
            rx_ring_ref: self.rx_ref,
            remote_port: self.port,
            mac: self.mac,
            rx_copy,
            credit: None,
            nets: Vec::new(),
            journal_frame: journal_frame(journal),
        }
    }

    fn id(&mut self) -> u16 {
        self.next_id = self.next_id.wrapping_add(1);
        self.next_id
    }

    /// Put `data` on the ring as fragments: `(page, offset, len)` each.
    fn send_frags(&mut self, data: &[u8], frags: &[(usize, u16, u16)]) -> Vec<u16> {
        let mut at = 0;
        let mut fragments = Vec::new();
        for &(page, offset, len) in frags {
            let (frame, gref) = self.pages[page];
            self.plat
                .write_local(frame, usize::from(offset), &data[at..at + usize::from(len)])
                .unwrap();
            at += usize::from(len);
            fragments.push(TxFragment {
                id: self.id(),
                gref,
                offset,
                size: len,
            });
        }
        assert_eq!(at, data.len());
        let p = TxPacket {
            flags: TxFlags::empty(),
            size: u16::try_from(data.len()).unwrap(),
            fragments,
            extras: Vec::new(),
        };
        for r in p.encode() {
            self.tx.put_request(&r).unwrap();
        }
        self.push();
        p.fragments.iter().map(|f| f.id).collect()
    }

    /// Send a frame from data page `page` (one slot).
    fn send(&mut self, data: &[u8], page: usize) -> u16 {
        self.send_frags(data, &[(page, 0, u16::try_from(data.len()).unwrap())])[0]
    }

    fn put_raw(&mut self, reqs: &[NetifTxRequest]) {
        for r in reqs {
            self.tx.put_request(r).unwrap();
        }
        self.push();
    }

    fn push(&mut self) {
        if self.tx.push_requests() {
            self.plat.evtchn_notify(self.port).unwrap();
        }
    }

    /// Post receive buffers on data pages `pages`: copy (granted pages) or exchange
    /// (accept-transfer grants).
    fn post_rx(&mut self, pages: std::ops::Range<usize>, exchange: bool) {
        for page in pages {
            let frame = self.pages[page].0;
            let gref = if exchange {
                self.plat.accept_transfer(self.backend, frame).unwrap()
            } else {
                self.pages[page].1
            };
            let id = self.id();
            self.rx
                .put_request(&NetifRxRequest { id, pad: 0, gref })
                .unwrap();
            self.rx_posted.insert(id, (frame, gref, exchange));
        }
        if self.rx.push_requests() {
            self.plat.evtchn_notify(self.port).unwrap();
        }
    }

    /// Transmit responses now available (recorded per id).
    fn tx_responses(&mut self) -> Vec<NetifTxResponse> {
        let mut out = Vec::new();
        while let Some(r) = self.tx.get_response().unwrap() {
            self.tx_seen.entry(r.id).or_default().push(r.status);
            out.push(r);
        }
        out
    }

    /// Received frames (or failure statuses) now available.
    fn received(&mut self) -> Vec<Result<Vec<u8>, i16>> {
        let mut out = Vec::new();
        while let Some(r) = self.rx.get_response().unwrap() {
            out.push(self.read_rx(&r));
        }
        out
    }

    fn read_rx(&mut self, r: &NetifRxResponse) -> Result<Vec<u8>, i16> {
        let (frame, gref, exchange) = self
            .rx_posted
            .remove(&r.id)
            .expect("response to a posted id");
        let frame = if exchange {
            self.plat.end_transfer(gref).unwrap().unwrap_or(frame)
        } else {
            frame
        };
        if r.status < 0 {
            return Err(r.status);
        }
        let mut b = vec![0u8; usize::try_from(r.status).unwrap()];
        self.plat
            .read_local(frame, usize::from(r.offset), &mut b)
            .unwrap();
        Ok(b)
    }
}

fn frame_from(dst: Mac, src: Mac, src_ip: [u8; 4], len: usize, seed: u8) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&[0x45, 0, 0, 20, 0, 0, 0, 0, 64, 17, 0, 0]);
    f.extend_from_slice(&src_ip);
    f.extend_from_slice(&[10, 0, 0, 99]);
    while f.len() < len {
        f.push(u8::try_from(f.len() * 7 % 251).unwrap() ^ seed);
    }
    f.truncate(len);
    f
}

const PEER: Mac = Mac([2, 0, 0, 0, 0, 0x99]);

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
    let ch = nb.attach(g.channel(0, true)).unwrap();
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
    let mut cfg = g.channel(0, true);
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
    let ca = nb.attach(a.channel(0, true)).unwrap();
    let cb = nb.attach(b.channel(1, false)).unwrap();
    let cc = nb.attach(c.channel(2, false)).unwrap();
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
    let ca = nb.attach(a.channel(0, true)).unwrap();
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
    let mut nb = rig.backend();
    let mut a = rig.guest("a", 1);
    let mut b = rig.guest("b", 2);
    let mut ca = a.channel(0, true);
    ca.credit = Some(Credit::new(10_000, 2_000).unwrap());
    let mut cb = b.channel(1, true);
    cb.credit = Some(Credit::new(30_000, 2_000).unwrap());
    let ia = nb.attach(ca).unwrap();
    let ib = nb.attach(cb).unwrap();
    let fa = frame_from(PEER, a.mac, [10, 0, 0, 1], 1000, 0);
    let fb = frame_from(PEER, b.mac, [10, 0, 0, 2], 1000, 0);
    // Keep 32 packets outstanding per guest; stop when 1200 went out in total.
    let (mut out_a, mut out_b) = (0usize, 0usize);
    let mut total = 0;
    while total < 1200 {
        out_a -= a.tx_responses().len();
        out_b -= b.tx_responses().len();
        while out_a < 32 {
            a.send(&fa, out_a % 8);
            out_a += 1;
        }
        while out_b < 32 {
            b.send(&fb, out_b % 8);
            out_b += 1;
        }
        nb.run_once(Duration::from_millis(1)).unwrap();
        total += rig.wire.take_sent().len();
    }
    let (sa, sb) = (nb.stats(ia).unwrap(), nb.stats(ib).unwrap());
    let ratio = sb.txb as f64 / sa.txb as f64;
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
    let cfg = g.channel(0, true);
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
    let ia = nb.attach(a.channel(0, true)).unwrap();
    let ib = nb.attach(b.channel(1, true)).unwrap();
    nb.attach(c.channel(2, false)).unwrap();
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
