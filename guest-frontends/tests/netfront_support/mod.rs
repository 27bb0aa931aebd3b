//! The test side of netfront's tests: the manager's part (XenStore directories, the backend's
//! `state`) and a minimal backend that drives the rings directly (maps them, reads transmits
//! with devchan's validating parser, grant-copies or transfers received frames, and can write
//! whatever a hostile backend would).
#![allow(dead_code, missing_docs, clippy::cast_possible_truncation)]

use std::collections::VecDeque;
use std::os::unix::net::UnixStream;
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devchan::grant::{DomId, PAGE_SIZE};
use devchan::netif::{
    read_tx_packet, NetifRxBackRing, NetifRxRequest, NetifRxResponse, NetifStatus, NetifTxBackRing,
    NetifTxResponse, TxPacket, NETRXF_MORE_DATA,
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

pub const DEVID: u32 = 0;
pub const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x11];
pub const RX_BUFFERS: usize = 16;
/// Guest RAM: the platform's frames (0..7), then the frontend's buffers.
pub const FIRST: u64 = 7;
pub const GUEST_FRAMES: u64 = 64;
/// The backend's scratch frames.
pub const SCRATCH: u64 = 8;

pub type Front = NetFront<LocalPlatform, Client<UnixStream>>;

pub struct World {
    pub sys: Arc<System>,
    pub xs: ServerHandle,
    pub _dir: tempfile::TempDir,
    pub guest: DomId,
    pub guest_plat: Arc<LocalPlatform>,
    pub ctl: Client<UnixStream>,
}

impl World {
    pub fn new() -> Self {
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

    pub fn front_dir(&self) -> String {
        format!("/local/domain/{}/device/vif/{DEVID}", self.guest)
    }

    pub fn w(&mut self, path: &str, v: &str) {
        self.ctl.write(NO_TX, path, v.as_bytes()).unwrap();
    }

    pub fn r(&mut self, path: &str) -> Option<String> {
        self.ctl
            .read(NO_TX, path)
            .ok()
            .map(|v| String::from_utf8(v).unwrap())
    }

    /// The manager's part: a new backend domain, its directory in `InitWait`, and the frontend
    /// pointed at it.
    pub fn new_backend(&mut self, flip: bool) -> Backend {
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

    pub fn config(&self, mode: RxMode) -> NetFrontConfig {
        let mut cfg = NetFrontConfig::new(self.guest, DEVID, FIRST..GUEST_FRAMES);
        cfg.rx_mode = mode;
        cfg.rx_buffers = RX_BUFFERS;
        cfg.poll_interval = Duration::from_millis(20);
        cfg.connect_timeout = Some(Duration::from_secs(20));
        cfg
    }

    /// Connect a frontend to `b`: the frontend publishes its rings, the backend attaches and
    /// goes `Connected`.
    pub fn connect(&mut self, b: &mut Backend, mode: RxMode) -> Front {
        let plat = self.guest_plat.clone();
        let xs = socket::connect(self.xs.path()).unwrap();
        let cfg = self.config(mode);
        let t = std::thread::spawn(move || NetFront::connect(plat, xs, cfg));
        self.attach(b, None);
        t.join().unwrap().unwrap()
    }

    /// Wait for the frontend to be `Connected` with rings for `b` (running `front` meanwhile,
    /// if given), attach, go `Connected`.
    pub fn attach(&mut self, b: &mut Backend, mut front: Option<&mut Front>) {
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
pub fn until(f: &mut Front, what: &str, mut cond: impl FnMut(&mut Front) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond(f) {
        assert!(Instant::now() < deadline, "gave up waiting for: {what}");
        f.poll(Duration::from_millis(5)).unwrap();
    }
}

pub struct Backend {
    pub plat: Arc<LocalPlatform>,
    pub idd: DomId,
    pub dir: String,
    pub rings: Option<Rings>,
}

impl Backend {
    pub fn rings(&mut self) -> &mut Rings {
        self.rings.as_mut().unwrap()
    }
}

/// The backend's ends of the two rings.
pub struct Rings {
    pub plat: Arc<LocalPlatform>,
    pub guest: DomId,
    pub tx: NetifTxBackRing,
    pub rx: NetifRxBackRing,
    pub _tx_map: LocalMapping,
    pub _rx_map: LocalMapping,
    pub port: u32,
    pub posted: VecDeque<NetifRxRequest>,
}

impl Rings {
    pub fn attach(plat: &Arc<LocalPlatform>, guest: DomId, tx: u32, rx: u32, port: u32) -> Self {
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

    pub fn notify(&self) {
        self.plat.evtchn_notify(self.port).unwrap();
    }

    /// Copy `len` bytes at `offset` of the guest's granted page through scratch frame `SCRATCH`.
    pub fn copy_from_guest(&self, gref: u32, offset: u16, len: u16) -> Vec<u8> {
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
    pub fn take_tx(&mut self) -> Option<(TxPacket, Vec<u8>)> {
        let tx = &mut self.tx;
        let p = read_tx_packet(|| tx.get_request(), 18).unwrap()?;
        let mut data = Vec::new();
        for f in &p.fragments {
            data.extend(self.copy_from_guest(f.gref, f.offset, f.size));
        }
        Some((p, data))
    }

    /// All transmit packets waiting now.
    pub fn take_all_tx(&mut self) -> Vec<(TxPacket, Vec<u8>)> {
        std::iter::from_fn(|| self.take_tx()).collect()
    }

    pub fn answer_tx(&mut self, p: &TxPacket, status: NetifStatus) {
        for r in p.responses(status) {
            self.tx.put_response(&r).unwrap();
        }
        self.tx.push_responses();
        self.notify();
    }

    pub fn raw_tx_response(&mut self, r: NetifTxResponse) {
        self.tx.put_response(&r).unwrap();
        self.tx.push_responses();
        self.notify();
    }

    /// Pull every posted receive buffer off the ring.
    pub fn pull_rx(&mut self) -> usize {
        while let Some(r) = self.rx.get_request().unwrap() {
            self.posted.push_back(r);
        }
        self.posted.len()
    }

    /// The id of the buffer the next response will consume.
    pub fn peek_id(&mut self) -> u16 {
        self.pull_rx();
        self.posted.front().expect("no receive buffer posted").id
    }

    pub fn next_buffer(&mut self) -> NetifRxRequest {
        self.pull_rx();
        self.posted.pop_front().expect("no receive buffer posted")
    }

    /// Deliver `data` by grant copy, the first fragment at `offset`, further ones at 0.
    pub fn deliver_copy(&mut self, data: &[u8], offset: u16) {
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
    pub fn deliver_exchange(&mut self, data: &[u8], offset: u16, frame: u64) {
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
    pub fn raw_rx_response(&mut self, r: NetifRxResponse) {
        self.next_buffer();
        self.rx.put_response(&r).unwrap();
        self.rx.push_responses();
        self.notify();
    }
}

pub fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect();
    f[..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&MAC);
    f
}
