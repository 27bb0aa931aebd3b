//! netfront against a hand-written backend that drives the rings directly, both in-process on
//! `LocalPlatform` domains of one `System`, connected through the real XenStore daemon (over
//! its socket). The test plays the manager's part (it writes both XenStore directories and
//! moves the backend's `state`), and the backend's (it maps the rings, reads transmits with
//! devchan's validating parser, grant-copies or transfers received frames).
//!
//! Covered: the handshake keys, multi-slot transmit byte for byte, copy and exchange receive
//! (single- and multi-slot), hostile responses refused (unknown or duplicate id, data past the
//! page, unknown status, unrequested extra info, a runaway producer index), and reconnects
//! (backend `Closing`→`Closed`→`InitWait`, and `backend`/`backend-id` rewritten to a new
//! domain) with fresh rings, reposted buffers and unanswered transmits sent again.
#![allow(clippy::cast_possible_truncation, missing_docs)]

use std::collections::VecDeque;
use std::os::unix::net::UnixStream;
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devchan::grant::{DomId, PAGE_SIZE};
use devchan::netif::{
    read_tx_packet, NetifRxBackRing, NetifRxRequest, NetifRxResponse, NetifStatus, NetifTxBackRing,
    NetifTxResponse, TxPacket, NETRXF_EXTRA_INFO, NETRXF_MORE_DATA,
};
use devchan::platform::{CopyPtr, GrantCopyOp, Platform, SharedPage};
use devchan::ring::BackRing;
use devchan::xenstore::client::NO_TX;
use devchan::xenstore::Client;
use guest_frontends::netfront::{NetFront, NetFrontConfig, RxMode};
use hypervisor::domain::DomainConfig;
use hypervisor::local::{LocalMapping, LocalPlatform};
use hypervisor::system::System;
use hypervisor::xenstored::socket::{self, ServerHandle, SocketServer};
use hypervisor::xenstored::Xenstored;

const DEVID: u32 = 0;
const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x11];
const RX_BUFFERS: usize = 16;
/// Guest RAM: the platform's frames (0..7), then the frontend's buffers.
const FIRST: u64 = 7;
const GUEST_FRAMES: u64 = 64;
/// The backend's scratch frames.
const SCRATCH: u64 = 8;

type Front = NetFront<LocalPlatform, Client<UnixStream>>;

struct World {
    sys: Arc<System>,
    xs: ServerHandle,
    _dir: tempfile::TempDir,
    guest: DomId,
    guest_plat: Arc<LocalPlatform>,
    ctl: Client<UnixStream>,
}

impl World {
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
        let guest = sys
            .create_domain(DomainConfig {
                name: "guest".into(),
                nr_frames: GUEST_FRAMES,
                iommu: None,
            })
            .unwrap();
        let guest_plat = Arc::new(LocalPlatform::new(sys.clone(), guest).unwrap());
        let ctl = socket::connect(xs.path()).unwrap();
        Self {
            sys,
            xs,
            _dir: dir,
            guest,
            guest_plat,
            ctl,
        }
    }

    fn front_dir(&self) -> String {
        format!("/local/domain/{}/device/vif/{DEVID}", self.guest)
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

    /// The manager's part: a new backend domain, its directory in `InitWait`, and the frontend
    /// pointed at it.
    fn new_backend(&mut self, flip: bool) -> Backend {
        let idd = self
            .sys
            .create_domain(DomainConfig {
                name: "idd-net".into(),
                nr_frames: 64,
                iommu: None,
            })
            .unwrap();
        let plat = Arc::new(LocalPlatform::new(self.sys.clone(), idd).unwrap());
        let fd = self.front_dir();
        let bd = format!("/local/domain/{idd}/backend/vif/{}/{DEVID}", self.guest);
        let g = self.guest.to_string();
        for (k, v) in [
            ("frontend", fd.as_str()),
            ("frontend-id", g.as_str()),
            ("handle", "0"),
            ("mac", "02:00:00:00:00:11"),
            ("online", "1"),
            ("feature-sg", "1"),
            ("feature-rx-copy", "1"),
            ("feature-rx-flip", if flip { "1" } else { "0" }),
            ("state", "2"),
        ] {
            self.w(&format!("{bd}/{k}"), v);
        }
        self.w(&format!("{fd}/handle"), "0");
        self.w(&format!("{fd}/mac"), "02:00:00:00:00:11");
        self.w(&format!("{fd}/backend-id"), &idd.to_string());
        self.w(&format!("{fd}/backend"), &bd);
        Backend {
            plat,
            idd,
            dir: bd,
            rings: None,
        }
    }

    fn config(&self, mode: RxMode) -> NetFrontConfig {
        let mut cfg = NetFrontConfig::new(self.guest, DEVID, FIRST..GUEST_FRAMES);
        cfg.rx_mode = mode;
        cfg.rx_buffers = RX_BUFFERS;
        cfg.poll_interval = Duration::from_millis(20);
        cfg.connect_timeout = Some(Duration::from_secs(20));
        cfg
    }

    /// Connect a frontend to `b`: the frontend publishes its rings, the backend attaches and
    /// goes `Connected`.
    fn connect(&mut self, b: &mut Backend, mode: RxMode) -> Front {
        let plat = self.guest_plat.clone();
        let xs = socket::connect(self.xs.path()).unwrap();
        let cfg = self.config(mode);
        let t = std::thread::spawn(move || NetFront::connect(plat, xs, cfg));
        self.attach(b, None);
        t.join().unwrap().unwrap()
    }

    /// Wait for the frontend to be `Connected` with rings for `b` (running `front` meanwhile,
    /// if given), attach, go `Connected`.
    fn attach(&mut self, b: &mut Backend, mut front: Option<&mut Front>) {
        let fd = self.front_dir();
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.r(&format!("{fd}/state")).as_deref() != Some("4") {
            assert!(
                Instant::now() < deadline,
                "frontend never published its rings"
            );
            match front.as_mut() {
                Some(f) => f.poll(Duration::from_millis(5)).unwrap(),
                None => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        let n =
            |w: &mut Self, k: &str| -> u32 { w.r(&format!("{fd}/{k}")).unwrap().parse().unwrap() };
        let (tx, rx, port) = (
            n(self, "tx-ring-ref"),
            n(self, "rx-ring-ref"),
            n(self, "event-channel"),
        );
        b.rings = Some(Rings::attach(&b.plat, self.guest, tx, rx, port));
        let bd = b.dir.clone();
        self.w(&format!("{bd}/state"), "4");
    }
}

/// Run the frontend until `cond` holds (bounded so a broken frontend fails instead of hanging).
fn until(f: &mut Front, what: &str, mut cond: impl FnMut(&mut Front) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond(f) {
        assert!(Instant::now() < deadline, "gave up waiting for: {what}");
        f.poll(Duration::from_millis(5)).unwrap();
    }
}

struct Backend {
    plat: Arc<LocalPlatform>,
    idd: DomId,
    dir: String,
    rings: Option<Rings>,
}

impl Backend {
    fn rings(&mut self) -> &mut Rings {
        self.rings.as_mut().unwrap()
    }
}

/// The backend's ends of the two rings.
struct Rings {
    plat: Arc<LocalPlatform>,
    guest: DomId,
    tx: NetifTxBackRing,
    rx: NetifRxBackRing,
    _tx_map: LocalMapping,
    _rx_map: LocalMapping,
    port: u32,
    posted: VecDeque<NetifRxRequest>,
}

impl Rings {
    fn attach(plat: &Arc<LocalPlatform>, guest: DomId, tx: u32, rx: u32, port: u32) -> Self {
        let tx_map = plat.map_grant(guest, tx, false).unwrap();
        let rx_map = plat.map_grant(guest, rx, false).unwrap();
        // SAFETY: live 4 KiB mappings, kept in the same struct (dropped after the rings, field
        // order), accessed only through these rings.
        let txr =
            unsafe { BackRing::attach(NonNull::new(tx_map.as_ptr()).unwrap(), PAGE_SIZE) }.unwrap();
        // SAFETY: as above.
        let rxr =
            unsafe { BackRing::attach(NonNull::new(rx_map.as_ptr()).unwrap(), PAGE_SIZE) }.unwrap();
        let port = plat.evtchn_bind_interdomain(guest, port).unwrap();
        Self {
            plat: plat.clone(),
            guest,
            tx: txr,
            rx: rxr,
            _tx_map: tx_map,
            _rx_map: rx_map,
            port,
            posted: VecDeque::new(),
        }
    }

    fn notify(&self) {
        self.plat.evtchn_notify(self.port).unwrap();
    }

    /// Copy `len` bytes at `offset` of the guest's granted page through scratch frame `SCRATCH`.
    fn copy_from_guest(&self, gref: u32, offset: u16, len: u16) -> Vec<u8> {
        let st = self
            .plat
            .grant_copy(&[GrantCopyOp {
                src: CopyPtr::Grant {
                    domid: self.guest,
                    gref,
                    offset,
                },
                dst: CopyPtr::Local {
                    frame: SCRATCH,
                    offset: 0,
                },
                len,
            }])
            .unwrap();
        assert_eq!(st, vec![0]);
        let mut b = vec![0; usize::from(len)];
        self.plat.read_local(SCRATCH, 0, &mut b).unwrap();
        b
    }

    /// The next transmit packet and its bytes.
    fn take_tx(&mut self) -> Option<(TxPacket, Vec<u8>)> {
        let tx = &mut self.tx;
        let p = read_tx_packet(|| tx.get_request(), 18).unwrap()?;
        let mut data = Vec::new();
        for f in &p.fragments {
            data.extend(self.copy_from_guest(f.gref, f.offset, f.size));
        }
        Some((p, data))
    }

    /// All transmit packets waiting now.
    fn take_all_tx(&mut self) -> Vec<(TxPacket, Vec<u8>)> {
        std::iter::from_fn(|| self.take_tx()).collect()
    }

    fn answer_tx(&mut self, p: &TxPacket, status: NetifStatus) {
        for r in p.responses(status) {
            self.tx.put_response(&r).unwrap();
        }
        self.tx.push_responses();
        self.notify();
    }

    fn raw_tx_response(&mut self, r: NetifTxResponse) {
        self.tx.put_response(&r).unwrap();
        self.tx.push_responses();
        self.notify();
    }

    /// Pull every posted receive buffer off the ring.
    fn pull_rx(&mut self) -> usize {
        while let Some(r) = self.rx.get_request().unwrap() {
            self.posted.push_back(r);
        }
        self.posted.len()
    }

    /// The id of the buffer the next response will consume.
    fn peek_id(&mut self) -> u16 {
        self.pull_rx();
        self.posted.front().expect("no receive buffer posted").id
    }

    fn next_buffer(&mut self) -> NetifRxRequest {
        self.pull_rx();
        self.posted.pop_front().expect("no receive buffer posted")
    }

    /// Deliver `data` by grant copy, the first fragment at `offset`, further ones at 0.
    fn deliver_copy(&mut self, data: &[u8], offset: u16) {
        let mut rest = data;
        let mut off = offset;
        loop {
            let n = rest.len().min(PAGE_SIZE - usize::from(off));
            let buf = self.next_buffer();
            self.plat.write_local(SCRATCH, 0, &rest[..n]).unwrap();
            let st = self
                .plat
                .grant_copy(&[GrantCopyOp {
                    src: CopyPtr::Local {
                        frame: SCRATCH,
                        offset: 0,
                    },
                    dst: CopyPtr::Grant {
                        domid: self.guest,
                        gref: buf.gref,
                        offset: off,
                    },
                    len: n as u16,
                }])
                .unwrap();
            assert_eq!(st, vec![0]);
            rest = &rest[n..];
            let flags = if rest.is_empty() { 0 } else { NETRXF_MORE_DATA };
            self.rx
                .put_response(&NetifRxResponse {
                    id: buf.id,
                    offset: off,
                    flags,
                    status: n as i16,
                })
                .unwrap();
            off = 0;
            if rest.is_empty() {
                break;
            }
        }
        self.rx.push_responses();
        self.notify();
    }

    /// Deliver `data` (at most a page) by page exchange: fill a frame of ours and transfer it.
    fn deliver_exchange(&mut self, data: &[u8], offset: u16, frame: u64) {
        let buf = self.next_buffer();
        self.plat
            .write_local(frame, usize::from(offset), data)
            .unwrap();
        self.plat.transfer(frame, self.guest, buf.gref).unwrap();
        self.rx
            .put_response(&NetifRxResponse {
                id: buf.id,
                offset,
                flags: 0,
                status: data.len() as i16,
            })
            .unwrap();
        self.rx.push_responses();
        self.notify();
    }

    /// Consume the next posted buffer and answer it with `r` (whatever `r` says).
    fn raw_rx_response(&mut self, r: NetifRxResponse) {
        self.next_buffer();
        self.rx.put_response(&r).unwrap();
        self.rx.push_responses();
        self.notify();
    }
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect();
    f[..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&MAC);
    f
}

#[test]
fn handshake_writes_linux_netfront_keys_and_posts_buffers() {
    let mut w = World::new();
    let mut b = w.new_backend(false);
    let mut f = w.connect(&mut b, RxMode::Copy);
    until(&mut f, "backend connected", |f| f.is_connected());
    let fd = w.front_dir();
    for (k, v) in [
        ("request-rx-copy", "1"),
        ("feature-rx-notify", "1"),
        ("feature-sg", "1"),
        ("state", "4"),
    ] {
        assert_eq!(w.r(&format!("{fd}/{k}")).as_deref(), Some(v), "{k}");
    }
    assert_eq!(f.mac(), MAC);
    assert_eq!(f.rx_mode(), RxMode::Copy);
    assert_eq!(f.rx_posted(), RX_BUFFERS);
    assert_eq!(b.rings().pull_rx(), RX_BUFFERS);
    assert_eq!(f.stats().connects, 1);
    // Dropping the frontend closes the device.
    drop(f);
    assert_eq!(w.r(&format!("{fd}/state")).as_deref(), Some("6"));
}

#[test]
fn transmit_multi_slot_frames_byte_exact() {
    let mut w = World::new();
    let mut b = w.new_backend(false);
    let mut f = w.connect(&mut b, RxMode::Copy);
    until(&mut f, "backend connected", |f| f.is_connected());
    let sizes = [60usize, 4096, 4097, 9000, 1514, 65535];
    for (i, n) in sizes.iter().enumerate() {
        f.send(&frame(*n, i as u8)).unwrap();
    }
    assert!(f.send(&[0; 13]).is_err() && f.send(&vec![0; 65536]).is_err());
    let mut got = Vec::new();
    until(&mut f, "all transmits on the ring", |_| {
        got.extend(b.rings().take_all_tx());
        got.len() == sizes.len()
    });
    for (i, ((p, data), n)) in got.iter().zip(sizes).enumerate() {
        assert_eq!(usize::from(p.size), n);
        assert_eq!(
            p.fragments.len(),
            n.div_ceil(PAGE_SIZE),
            "slots of frame {i}"
        );
        assert!(p.extras.is_empty());
        assert_eq!(*data, frame(n, i as u8), "bytes of frame {i}");
    }
    // Answer out of order: the last packet first, one with an error.
    let r = b.rings();
    r.answer_tx(&got[5].0, NetifStatus::Okay);
    r.answer_tx(&got[1].0, NetifStatus::Dropped);
    for (p, _) in got.iter().take(5).filter(|(p, _)| p != &got[1].0) {
        r.answer_tx(p, NetifStatus::Okay);
    }
    until(&mut f, "all answered", |f| f.tx_pending() == 0);
    let st = f.stats();
    assert_eq!((st.tx_packets, st.tx_errors), (5, 1));
    assert_eq!(st.tx_bytes, (sizes.iter().sum::<usize>() - 4096) as u64);
    assert_eq!(f.quarantined(), 0, "every grant ended");
}

#[test]
fn receive_by_copy_single_and_multi_slot() {
    let mut w = World::new();
    let mut b = w.new_backend(false);
    let mut f = w.connect(&mut b, RxMode::Copy);
    until(&mut f, "backend connected", |f| f.is_connected());
    let frames = [
        (frame(60, 1), 0u16),
        (frame(1514, 2), 100),
        (frame(9000, 3), 2),
    ];
    for (data, off) in &frames {
        b.rings().deliver_copy(data, *off);
    }
    for (data, _) in &frames {
        assert!(f.wait(Duration::from_secs(20)).unwrap());
        assert_eq!(f.recv().unwrap(), *data);
    }
    // Every buffer came back to the ring.
    until(&mut f, "buffers reposted", |f| f.rx_posted() == RX_BUFFERS);
    assert_eq!(b.rings().pull_rx(), RX_BUFFERS);
    let st = f.stats();
    assert_eq!((st.rx_packets, st.rx_errors, st.protocol_errors), (3, 0, 0));
    // A failed response drops its packet only.
    let id = b.rings().peek_id();
    b.rings().raw_rx_response(NetifRxResponse {
        id,
        offset: 0,
        flags: 0,
        status: -1,
    });
    b.rings().deliver_copy(&frame(100, 4), 0);
    assert!(f.wait(Duration::from_secs(20)).unwrap());
    assert_eq!(f.recv().unwrap(), frame(100, 4));
    assert_eq!((f.stats().rx_errors, f.stats().protocol_errors), (1, 0));
}

#[test]
fn receive_by_page_exchange() {
    let mut w = World::new();
    let mut b = w.new_backend(true);
    let mut f = w.connect(&mut b, RxMode::Exchange);
    until(&mut f, "backend connected", |f| f.is_connected());
    assert_eq!(f.rx_mode(), RxMode::Exchange);
    assert_eq!(
        w.r(&format!("{}/request-rx-copy", w.front_dir()))
            .as_deref(),
        Some("0")
    );
    for i in 0..(RX_BUFFERS as u8 * 2) {
        let data = frame(60 + usize::from(i) * 50, i);
        b.rings()
            .deliver_exchange(&data, u16::from(i) * 8, 20 + u64::from(i % 4));
        assert!(f.wait(Duration::from_secs(20)).unwrap());
        assert_eq!(f.recv().unwrap(), data, "frame {i}");
    }
    assert_eq!(f.stats().rx_packets, RX_BUFFERS as u64 * 2);
    assert_eq!(f.quarantined(), 0);
}

#[test]
fn exchange_falls_back_to_copy_without_rx_flip() {
    let mut w = World::new();
    let mut b = w.new_backend(false);
    let mut f = w.connect(&mut b, RxMode::Exchange);
    assert_eq!(f.rx_mode(), RxMode::Copy);
    until(&mut f, "backend connected", |f| f.is_connected());
    b.rings().deliver_copy(&frame(70, 9), 0);
    assert!(f.wait(Duration::from_secs(20)).unwrap());
    assert_eq!(f.recv().unwrap(), frame(70, 9));
}

/// How a hostile backend answers.
#[derive(Clone, Copy, Debug)]
enum Lie {
    RxUnknownId,
    RxDuplicateId,
    RxPastPage,
    RxBadStatus,
    RxBadFlags,
    RxExtraInfo,
    RxOverflow,
    TxUnknownId,
    TxBadStatus,
}

#[test]
fn hostile_responses_are_refused() {
    for lie in [
        Lie::RxUnknownId,
        Lie::RxDuplicateId,
        Lie::RxPastPage,
        Lie::RxBadStatus,
        Lie::RxBadFlags,
        Lie::RxExtraInfo,
        Lie::RxOverflow,
        Lie::TxUnknownId,
        Lie::TxBadStatus,
    ] {
        let mut w = World::new();
        let mut b = w.new_backend(false);
        let mut f = w.connect(&mut b, RxMode::Copy);
        until(&mut f, "backend connected", |f| f.is_connected());
        let r = b.rings();
        let rsp = |id, offset, flags, status| NetifRxResponse {
            id,
            offset,
            flags,
            status,
        };
        match lie {
            Lie::RxUnknownId => r.raw_rx_response(rsp(200, 0, 0, 60)),
            Lie::RxDuplicateId => {
                let id = r.peek_id();
                r.deliver_copy(&frame(60, 1), 0);
                r.raw_rx_response(rsp(id, 0, 0, 60));
            }
            Lie::RxPastPage => {
                let id = r.peek_id();
                r.raw_rx_response(rsp(id, 4000, 0, 200));
            }
            Lie::RxBadStatus => {
                let id = r.peek_id();
                r.raw_rx_response(rsp(id, 0, 0, -9));
            }
            Lie::RxBadFlags => {
                let id = r.peek_id();
                r.raw_rx_response(rsp(id, 0, 0x4000, 60));
            }
            Lie::RxExtraInfo => {
                let id = r.peek_id();
                r.raw_rx_response(rsp(id, 0, NETRXF_EXTRA_INFO, 60));
            }
            Lie::RxOverflow => {
                // rsp_prod (offset 8 of the shared header) far ahead of any request.
                // SAFETY: offset 8 is the aligned rsp_prod word inside the live mapping; the
                // frontend reads it atomically; this is what a hostile peer's store looks like.
                unsafe {
                    r._rx_map
                        .as_ptr()
                        .add(8)
                        .cast::<u32>()
                        .write_volatile(1 << 20);
                }
                r.notify();
            }
            Lie::TxUnknownId => {
                f.send(&frame(60, 1)).unwrap();
                r.take_tx().unwrap();
                r.raw_tx_response(NetifTxResponse { id: 99, status: 0 });
            }
            Lie::TxBadStatus => {
                f.send(&frame(60, 1)).unwrap();
                let (p, _) = r.take_tx().unwrap();
                r.raw_tx_response(NetifTxResponse {
                    id: p.fragments[0].id,
                    status: 5,
                });
            }
        }
        until(&mut f, "the lie noticed", |f| f.stats().protocol_errors > 0);
        let st = f.stats();
        assert_eq!(st.protocol_errors, 1, "{lie:?}");
        assert!(!f.is_connected(), "{lie:?}: connection dropped");
        // Only the one honest frame of the duplicate case was delivered.
        let honest = usize::from(matches!(lie, Lie::RxDuplicateId));
        let mut n = 0;
        while f.recv().is_some() {
            n += 1;
        }
        assert_eq!(n, honest, "{lie:?}");
        // The frontend told the manager (Closing, then Closed once the backend follows).
        let state = w.r(&format!("{}/state", w.front_dir())).unwrap();
        assert!(state == "5" || state == "6", "{lie:?}: state {state}");
    }
}

/// The backend side of a reconnect: `Closing`, `Closed`, then `InitWait` again.
fn close_and_reopen(w: &mut World, b: &mut Backend, f: &mut Front) {
    let bd = b.dir.clone();
    let fd = w.front_dir();
    w.w(&format!("{bd}/state"), "5");
    until(f, "frontend closed", |f| {
        !f.is_connected() && w.r(&format!("{fd}/state")).as_deref() == Some("6")
    });
    b.rings = None;
    w.w(&format!("{bd}/state"), "6");
    f.poll(Duration::from_millis(50)).unwrap();
    w.w(&format!("{bd}/state"), "2");
}

#[test]
fn reconnect_after_backend_close_reposts_and_resends() {
    let mut w = World::new();
    let mut b = w.new_backend(false);
    let mut f = w.connect(&mut b, RxMode::Copy);
    until(&mut f, "backend connected", |f| f.is_connected());
    let fd = w.front_dir();
    let old_refs = (
        w.r(&format!("{fd}/tx-ring-ref")),
        w.r(&format!("{fd}/rx-ring-ref")),
    );
    // Three transmits: the backend answers the first, takes the second without answering,
    // and never sees the third before it closes.
    for i in 0..2u8 {
        f.send(&frame(5000, i)).unwrap();
    }
    let mut got = Vec::new();
    until(&mut f, "two on the ring", |_| {
        got.extend(b.rings().take_all_tx());
        got.len() == 2
    });
    b.rings().answer_tx(&got[0].0, NetifStatus::Okay);
    until(&mut f, "first answered", |f| f.stats().tx_packets == 1);
    f.send(&frame(60, 2)).unwrap();
    b.rings().pull_rx();
    close_and_reopen(&mut w, &mut b, &mut f);
    // The frontend comes back with fresh rings, the backend attaches again.
    w.attach(&mut b, Some(&mut f));
    until(&mut f, "reconnected", |f| f.is_connected());
    let new_refs = (
        w.r(&format!("{fd}/tx-ring-ref")),
        w.r(&format!("{fd}/rx-ring-ref")),
    );
    assert_ne!(old_refs, new_refs, "fresh rings");
    assert_eq!(b.rings().pull_rx(), RX_BUFFERS, "buffers reposted");
    let mut again = Vec::new();
    until(&mut f, "unanswered transmits resent", |_| {
        again.extend(b.rings().take_all_tx());
        again.len() == 2
    });
    assert_eq!(again[0].1, frame(5000, 1), "the unanswered one first");
    assert_eq!(again[1].1, frame(60, 2));
    for (p, _) in &again {
        b.rings().answer_tx(p, NetifStatus::Okay);
    }
    until(&mut f, "all answered", |f| f.tx_pending() == 0);
    b.rings().deliver_copy(&frame(80, 7), 0);
    assert!(f.wait(Duration::from_secs(20)).unwrap());
    assert_eq!(f.recv().unwrap(), frame(80, 7));
    let st = f.stats();
    assert_eq!((st.connects, st.disconnects, st.tx_packets), (2, 1, 3));
    assert_eq!(
        st.resent, 2,
        "the taken-unanswered one and the queued-behind one"
    );
}

#[test]
fn reconnect_to_a_new_backend_domain() {
    let mut w = World::new();
    let mut b = w.new_backend(false);
    let mut f = w.connect(&mut b, RxMode::Copy);
    until(&mut f, "backend connected", |f| f.is_connected());
    f.send(&frame(3000, 1)).unwrap();
    until(&mut f, "on the ring", |_| b.rings().pull_rx() > 0);
    // The old backend domain dies without answering; the manager names a new one.
    let old = b.idd;
    drop(b);
    w.sys.destroy_domain(old).unwrap();
    let mut b2 = w.new_backend(false);
    until(&mut f, "frontend restarted", |f| {
        f.backend_domain() == Some(b2.idd) && !f.is_connected()
    });
    w.attach(&mut b2, Some(&mut f));
    until(&mut f, "reconnected", |f| f.is_connected());
    assert_eq!(b2.rings().pull_rx(), RX_BUFFERS);
    let mut got = Vec::new();
    until(&mut f, "resent to the new backend", |_| {
        got.extend(b2.rings().take_all_tx());
        !got.is_empty()
    });
    assert_eq!(got[0].1, frame(3000, 1));
    b2.rings().answer_tx(&got[0].0, NetifStatus::Okay);
    until(&mut f, "answered", |f| f.tx_pending() == 0);
    b2.rings().deliver_copy(&frame(90, 3), 10);
    assert!(f.wait(Duration::from_secs(20)).unwrap());
    assert_eq!(f.recv().unwrap(), frame(90, 3));
    assert_eq!(f.stats().connects, 2);
}
