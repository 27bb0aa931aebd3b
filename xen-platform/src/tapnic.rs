//! [`TapNic`]: idd-net's [`NetDevice`] over a TAP interface of the backend domain, doing its
//! "DMA" through the platform's software IOMMU ([`crate::XenPlatform::dma`]).
//!
//! In dom0 there is no NIC behind our backend: the far side of a guest's vif is dom0's own
//! network stack (normally a bridge or a routed `vifD.N`). A TAP interface is that far side
//! here: every frame the guest sends comes out of it into dom0's stack, every frame dom0's
//! stack sends to it goes to the guest; dom0 gives the TAP the peer address. The frame bytes
//! go through [`iospace::emu::wire`]'s TAP (`WireConfig::Tap`), not TAP code of our own.
//!
//! # DMA
//!
//! The device reaches memory only through its [`IommuDevice`]: a transmit's segments are
//! IOVAs netback pinned (its header copy in our own memory, then the guest's granted
//! fragments, each a persistent gntdev mapping entered in the IOMMU), read with `dma_read`
//! and written to the TAP as one frame. A frame read from the TAP is written with
//! `dma_write` into a receive buffer netback posted (a page of our own memory, pinned
//! through a self-grant) at offset 0, and returned in [`NetEvent::Rx`]; netback then
//! grant-copies it into the guest's buffer. Transmits complete at once (a TAP write either
//! took the frame or failed: `ok` is false then, and netback answers the guest with
//! `NETIF_RSP_ERROR`).
//!
//! # Receiving, and sleeping on two things at once
//!
//! A receive thread reads the TAP (iospace's wire, which blocks in `recv`) into a queue of
//! at most [`RX_QUEUE`] frames and bumps an eventfd per frame; [`NetDevice::poll`] moves queued
//! frames into posted buffers. The eventfd ([`TapNic::wake_fd`]) lets the backend's main loop
//! sleep in one `poll(2)` on the event channel *and* the TAP when idle (`xen-netback` does),
//! instead of netback's `run_once`, which alternates 0.5 ms waits on each.
//!
//! # Frames from the TAP are untrusted
//!
//! Anything in dom0 may write to the interface. A frame shorter than an Ethernet header or
//! longer than [`MAX_FRAME`] is dropped and counted ([`TapStats::rx_bad`]); one that arrives
//! while [`RX_QUEUE`] frames wait is dropped and counted ([`TapStats::rx_overflow`]), as a NIC
//! with a full receive ring drops.
//!
//! # Outliving the process
//!
//! [`make_persistent`] sets `TUNSETPERSIST` on the interface: it then stays (with dom0's
//! address and routes on it) when the backend process dies, frames to it are dropped while
//! no process is attached, and the next process attaches to the same interface. `ip link del
//! IFNAME` removes it.

use idd_net::device::{NetDevError, NetDevice, NetEvent, RxBuffer, TxSeg};
use iospace::emu::wire::{self, Wire, WireConfig};
use iospace::iommu::IommuDevice;
use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Largest frame carried: a 1500-byte MTU plus the Ethernet header (no VLAN tag, no FCS).
pub const MAX_FRAME: usize = 1514;
/// Ethernet header length: the shortest frame accepted.
pub const MIN_FRAME: usize = 14;
/// Most segments one transmit may carry (netback's header copy plus up to 18 guest slots).
pub const MAX_TX_SEGMENTS: usize = 20;
/// Frames moved from the TAP per [`NetDevice::poll`] (so a flood cannot starve transmits).
const RX_PER_POLL: usize = 64;

/// Why the TAP could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The interface name is not 1..=15 bytes without NUL or `/`.
    #[error("Bad interface name {0:?}")]
    Name(String),
    /// `/dev/net/tun` or one of its ioctls failed (needs CAP_NET_ADMIN).
    #[error("TAP {ifname}: {what}")]
    Tun {
        /// The interface.
        ifname: String,
        /// Which step.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Opening the wire failed.
    #[error("Opening TAP {0}")]
    Wire(String, #[source] iospace::emu::EmuError),
}

/// Counters of the device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TapStats {
    /// Frames written to the TAP.
    pub tx: u64,
    /// Transmits that failed (an IOVA not mapped, or the TAP write failed).
    pub tx_failed: u64,
    /// Frames delivered into posted buffers.
    pub rx: u64,
    /// Frames from the TAP dropped as too short or too long.
    pub rx_bad: u64,
    /// Frames from the TAP dropped because [`RX_QUEUE`] frames were waiting already.
    pub rx_overflow: u64,
}

/// Validate an interface name as the kernel takes it.
fn check_name(ifname: &str) -> Result<(), TapError> {
    let b = ifname.as_bytes();
    if b.is_empty() || b.len() >= libc::IFNAMSIZ || b.iter().any(|c| *c == 0 || *c == b'/') {
        return Err(TapError::Name(ifname.to_string()));
    }
    Ok(())
}

/// Create TAP interface `ifname` if missing and make it persistent (it outlives every process
/// attached to it). Call it before [`TapNic::open`]; it fails with `EBUSY` while another
/// process is attached.
///
/// Not in `iospace::emu::wire`: there a TAP lives as long as its device; only a Xen backend
/// needs the interface (and dom0's address on it) to survive its process.
pub fn make_persistent(ifname: &str) -> Result<(), TapError> {
    check_name(ifname)?;
    let tun = |what, source| TapError::Tun {
        ifname: ifname.to_string(),
        what,
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(|e| tun("opening /dev/net/tun", e))?;
    // SAFETY: `ifreq` is a plain C struct for which all-zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(ifname.as_bytes()) {
        *d = libc::c_char::from_ne_bytes([*s]);
    }
    // IFF_TAP | IFF_NO_PI = 0x1002 fits a c_short.
    #[allow(clippy::cast_possible_truncation)]
    {
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    }
    // SAFETY: TUNSETIFF reads and writes the `ifreq` `req`, which outlives the call; the
    // descriptor is an open tun device.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
        return Err(tun("TUNSETIFF", std::io::Error::last_os_error()));
    }
    // SAFETY: TUNSETPERSIST takes its argument by value; the descriptor is attached above.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
        return Err(tun("TUNSETPERSIST", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Frames read from the TAP and not yet delivered, at most (beyond: dropped and counted, as
/// a NIC drops when its receive ring is full).
pub const RX_QUEUE: usize = 256;
/// How long the receive thread's `recv` waits before checking whether to stop.
const RECV_SLICE: Duration = Duration::from_millis(100);

/// What the receive thread and the device share.
struct Shared {
    queue: Mutex<VecDeque<Vec<u8>>>,
    /// An eventfd written once per frame queued (and on a wire error): readable while frames
    /// wait, so a caller can sleep on it together with the event channel ([`TapNic::wake_fd`]).
    wake: OwnedFd,
    stop: AtomicBool,
    bad: AtomicU64,
    overflow: AtomicU64,
    error: Mutex<Option<String>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, VecDeque<Vec<u8>>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn signal(&self) {
        // A full counter is still readable: nothing to handle on failure.
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from `one`, which lives for the call, to our eventfd.
        let _ = unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }

    fn drain_wake(&self) {
        let mut v = [0u8; 8];
        // SAFETY: reads at most 8 bytes into `v`; the eventfd is non-blocking.
        let _ = unsafe { libc::read(self.wake.as_raw_fd(), v.as_mut_ptr().cast(), v.len()) };
    }
}

/// The receive thread: frames from the wire into the queue, bounded and validated.
fn receive(wire: &Arc<dyn Wire>, shared: &Shared) {
    let mut buf = vec![0u8; wire::MAX_WIRE_FRAME];
    while !shared.stop.load(Ordering::Relaxed) {
        match wire.recv(&mut buf, Some(RECV_SLICE)) {
            Ok(Some(n)) if (MIN_FRAME..=MAX_FRAME).contains(&n) => {
                let mut q = shared.lock();
                if q.len() >= RX_QUEUE {
                    shared.overflow.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                q.push_back(buf[..n].to_vec());
                drop(q);
                shared.signal();
            }
            Ok(Some(_)) => {
                shared.bad.fetch_add(1, Ordering::Relaxed);
            }
            Ok(None) => {}
            Err(e) => {
                *shared.error.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(format!("{}: {e}", wire.describe()));
                shared.signal();
                return;
            }
        }
    }
}

/// A TAP interface as netback's NIC.
pub struct TapNic {
    dev: IommuDevice,
    wire: Arc<dyn Wire>,
    mac: [u8; 6],
    posted: VecDeque<RxBuffer>,
    rx_capacity: usize,
    events: Vec<NetEvent>,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
    frame: Vec<u8>,
    stats: TapStats,
}

impl std::fmt::Debug for TapNic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TapNic")
            .field("wire", &self.wire.describe())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl TapNic {
    /// Attach to TAP `ifname` (created and set up if missing), reaching memory through `dev`,
    /// holding at most `rx_capacity` receive buffers. `mac` is what [`NetDevice::mac`]
    /// reports (the TAP interface itself has its own, dom0's).
    pub fn open(
        ifname: &str,
        dev: IommuDevice,
        mac: [u8; 6],
        rx_capacity: usize,
    ) -> Result<Self, TapError> {
        check_name(ifname)?;
        let wire = wire::open(&WireConfig::Tap {
            ifname: ifname.to_string(),
        })
        .map_err(|e| TapError::Wire(ifname.to_string(), e))?;
        Self::over(wire, dev, mac, rx_capacity)
    }

    /// The same over any wire (tests use a UDP wire). Starts the receive thread.
    pub fn over(
        wire: Arc<dyn Wire>,
        dev: IommuDevice,
        mac: [u8; 6],
        rx_capacity: usize,
    ) -> Result<Self, TapError> {
        // SAFETY: plain eventfd(2); the result is checked and owned below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(TapError::Tun {
                ifname: wire.describe(),
                what: "eventfd",
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let wake = unsafe { OwnedFd::from_raw_fd(fd) };
        let shared = Arc::new(Shared {
            queue: Mutex::new(VecDeque::new()),
            wake,
            stop: AtomicBool::new(false),
            bad: AtomicU64::new(0),
            overflow: AtomicU64::new(0),
            error: Mutex::new(None),
        });
        let (w, sh) = (wire.clone(), shared.clone());
        let thread = std::thread::Builder::new()
            .name("tap-rx".into())
            .spawn(move || receive(&w, &sh))
            .map_err(|source| TapError::Tun {
                ifname: wire.describe(),
                what: "starting the receive thread",
                source,
            })?;
        Ok(Self {
            dev,
            wire,
            mac,
            posted: VecDeque::new(),
            rx_capacity: rx_capacity.max(1),
            events: Vec::new(),
            shared,
            thread: Some(thread),
            frame: Vec::with_capacity(MAX_FRAME),
            stats: TapStats::default(),
        })
    }

    /// The counters.
    pub fn stats(&self) -> TapStats {
        TapStats {
            rx_bad: self.shared.bad.load(Ordering::Relaxed),
            rx_overflow: self.shared.overflow.load(Ordering::Relaxed),
            ..self.stats
        }
    }

    /// A descriptor that is readable while frames wait for delivery: sleep on it together
    /// with the event channel (`poll(2)`), then let netback poll.
    pub fn wake_fd(&self) -> BorrowedFd<'_> {
        self.shared.wake.as_fd()
    }

    /// Deliver queued frames into posted buffers.
    fn deliver(&mut self) -> Result<(), NetDevError> {
        if let Some(e) = self
            .shared
            .error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return Err(NetDevError::Failed(e));
        }
        self.shared.drain_wake();
        for _ in 0..RX_PER_POLL {
            if self.posted.is_empty() {
                break;
            }
            let Some(frame) = self.shared.lock().pop_front() else {
                break;
            };
            let Some(buf) = self.posted.pop_front() else {
                break;
            };
            if self.dev.dma_write(buf.iova, &frame).is_err() {
                // The buffer is no longer mapped for us: a driver bug, not the guest's.
                return Err(NetDevError::Failed(format!(
                    "receive buffer at IOVA {:#x} (frame {}) is not mapped",
                    buf.iova, buf.frame
                )));
            }
            self.stats.rx += 1;
            // The thread queues only frames of at most MAX_FRAME bytes: fits u16.
            let len = u16::try_from(frame.len()).unwrap_or(u16::MAX);
            self.events.push(NetEvent::Rx {
                buf,
                offset: 0,
                len,
            });
        }
        // Frames left (no buffer): stay readable for the next wait.
        if !self.shared.lock().is_empty() {
            self.shared.signal();
        }
        Ok(())
    }
}

impl Drop for TapNic {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.wire.shut_down();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl NetDevice for TapNic {
    fn mac(&self) -> [u8; 6] {
        self.mac
    }
    fn max_frame(&self) -> usize {
        MAX_FRAME
    }
    fn max_tx_segments(&self) -> usize {
        MAX_TX_SEGMENTS
    }
    fn tx_in_flight(&self) -> usize {
        self.events
            .iter()
            .filter(|e| matches!(e, NetEvent::TxDone { .. }))
            .count()
    }
    fn rx_posted(&self) -> usize {
        self.posted.len()
    }
    fn rx_capacity(&self) -> usize {
        self.rx_capacity
    }
    fn transmit(&mut self, token: u64, segs: &[TxSeg]) -> Result<(), NetDevError> {
        if segs.is_empty() || segs.len() > MAX_TX_SEGMENTS {
            return Err(NetDevError::Malformed("segment count"));
        }
        let total: u64 = segs.iter().map(|s| u64::from(s.len)).sum();
        if total > MAX_FRAME as u64 || total < MIN_FRAME as u64 {
            return Err(NetDevError::Malformed("frame length"));
        }
        self.frame.clear();
        let mut ok = true;
        for s in segs {
            let start = self.frame.len();
            self.frame.resize(start + s.len as usize, 0);
            if self.dev.dma_read(s.iova, &mut self.frame[start..]).is_err() {
                ok = false;
                break;
            }
        }
        ok = ok && self.wire.send(&self.frame).is_ok();
        if ok {
            self.stats.tx += 1;
        } else {
            self.stats.tx_failed += 1;
        }
        self.events.push(NetEvent::TxDone { token, ok });
        Ok(())
    }
    fn post_rx(&mut self, buf: RxBuffer) -> Result<(), NetDevError> {
        if self.posted.len() >= self.rx_capacity {
            return Err(NetDevError::Full);
        }
        self.posted.push_back(buf);
        Ok(())
    }
    fn poll(&mut self, out: &mut Vec<NetEvent>) -> Result<(), NetDevError> {
        self.deliver()?;
        out.append(&mut self.events);
        Ok(())
    }
    fn wait(&mut self, timeout: Duration) -> Result<(), NetDevError> {
        if !self.events.is_empty() || !self.shared.lock().is_empty() {
            return Ok(());
        }
        wait_readable(&[self.shared.wake.as_fd()], timeout)
            .map_err(|e| NetDevError::Failed(format!("waiting for the TAP: {e}")))
    }
}

/// Sleep until one of `fds` is readable or `timeout` passes (`EINTR` counts as a wake-up).
pub fn wait_readable(fds: &[BorrowedFd<'_>], timeout: Duration) -> std::io::Result<()> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    let n = libc::nfds_t::try_from(p.len()).unwrap_or(0);
    // SAFETY: `p` holds `n` initialised pollfds and outlives the call.
    let rc = unsafe { libc::poll(p.as_mut_ptr(), n, ms) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // small test patterns
mod tests {
    use super::*;
    use iospace::iommu::{DmaPage, Iommu, IommuEntry};
    use std::net::UdpSocket;

    /// A plain page as an IOMMU entry.
    struct Page(Mutex<Vec<u8>>);
    impl DmaPage for Page {
        fn read(&self, offset: usize, buf: &mut [u8]) {
            let p = self.0.lock().unwrap();
            buf.copy_from_slice(&p[offset..offset + buf.len()]);
        }
        fn write(&self, offset: usize, data: &[u8]) {
            let mut p = self.0.lock().unwrap();
            p[offset..offset + data.len()].copy_from_slice(data);
        }
    }

    fn page(iommu: &Iommu, fill: u8) -> (u64, Arc<Page>) {
        let pg = Arc::new(Page(Mutex::new(vec![fill; 4096])));
        let iova = iommu
            .map(IommuEntry {
                domain: 0,
                frame: 42,
                writable: true,
                page: pg.clone(),
            })
            .unwrap();
        (iova, pg)
    }

    fn udp_nic(rx_capacity: usize) -> (TapNic, UdpSocket, Arc<Iommu>) {
        let far = UdpSocket::bind("127.0.0.1:0").unwrap();
        far.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let w = wire::open(&WireConfig::Udp {
            bind: "127.0.0.1:0".parse().unwrap(),
            peer: Some(far.local_addr().unwrap()),
        })
        .unwrap();
        let iommu = Iommu::new(64);
        let nic = TapNic::over(w, iommu.device(), [2, 0, 0, 0, 0, 1], rx_capacity).unwrap();
        (nic, far, iommu)
    }

    fn frame(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
    }

    #[test]
    fn transmit_gathers_segments_through_the_iommu() {
        let (mut nic, far, iommu) = udp_nic(4);
        let (a, pa) = page(&iommu, 0);
        let (b, pb) = page(&iommu, 0);
        let f = frame(1200, 7);
        pa.write(4000, &f[..96]);
        pb.write(0, &f[96..]);
        nic.transmit(
            5,
            &[
                TxSeg {
                    iova: a + 4000,
                    len: 96,
                },
                TxSeg { iova: b, len: 1104 },
            ],
        )
        .unwrap();
        let mut got = [0u8; 2048];
        let n = far.recv(&mut got).unwrap();
        assert_eq!(&got[..n], &f[..]);
        let mut ev = Vec::new();
        nic.poll(&mut ev).unwrap();
        assert_eq!(ev, [NetEvent::TxDone { token: 5, ok: true }]);
        // An IOVA nobody mapped: completes with ok = false, nothing sent.
        nic.transmit(
            6,
            &[TxSeg {
                iova: 0x7777_0000,
                len: 60,
            }],
        )
        .unwrap();
        ev.clear();
        nic.poll(&mut ev).unwrap();
        assert_eq!(
            ev,
            [NetEvent::TxDone {
                token: 6,
                ok: false
            }]
        );
        assert_eq!(nic.stats().tx_failed, 1);
        // Malformed requests are refused, not completed.
        assert!(matches!(
            nic.transmit(7, &[]),
            Err(NetDevError::Malformed(_))
        ));
        assert!(matches!(
            nic.transmit(8, &[TxSeg { iova: a, len: 2000 }]),
            Err(NetDevError::Malformed(_))
        ));
        assert!(matches!(
            nic.transmit(9, &[TxSeg { iova: a, len: 4 }]),
            Err(NetDevError::Malformed(_))
        ));
    }

    #[test]
    fn receive_fills_posted_buffers_and_drops_bad_lengths() {
        let (mut nic, far, iommu) = udp_nic(2);
        let (a, pa) = page(&iommu, 0xee);
        let to = nic.wire.bound_addr().unwrap();
        // Too short, too long, then two good frames; one buffer posted.
        far.send_to(&[1, 2, 3], to).unwrap();
        far.send_to(&frame(1600, 1), to).unwrap();
        let f1 = frame(60, 2);
        let f2 = frame(1514, 3);
        far.send_to(&f1, to).unwrap();
        far.send_to(&f2, to).unwrap();
        nic.post_rx(RxBuffer { frame: 1, iova: a }).unwrap();
        let mut ev = Vec::new();
        for _ in 0..100 {
            nic.wait(Duration::from_millis(100)).unwrap();
            nic.poll(&mut ev).unwrap();
            if !ev.is_empty() {
                break;
            }
        }
        assert_eq!(
            ev,
            [NetEvent::Rx {
                buf: RxBuffer { frame: 1, iova: a },
                offset: 0,
                len: 60
            }]
        );
        let mut got = vec![0u8; 60];
        pa.read(0, &mut got);
        assert_eq!(got, f1);
        assert_eq!(nic.stats().rx_bad, 2);
        // The second good frame waits for a buffer.
        ev.clear();
        nic.wait(Duration::from_millis(500)).unwrap();
        nic.poll(&mut ev).unwrap();
        assert!(ev.is_empty());
        nic.post_rx(RxBuffer { frame: 1, iova: a }).unwrap();
        nic.poll(&mut ev).unwrap();
        assert_eq!(ev.len(), 1);
        let mut got = vec![0u8; 1514];
        pa.read(0, &mut got);
        assert_eq!(got, f2);
        // Capacity is enforced.
        nic.post_rx(RxBuffer { frame: 1, iova: a }).unwrap();
        nic.post_rx(RxBuffer { frame: 1, iova: a }).unwrap();
        assert!(matches!(
            nic.post_rx(RxBuffer { frame: 1, iova: a }),
            Err(NetDevError::Full)
        ));
        assert_eq!(nic.rx_posted(), 2);
    }

    #[test]
    fn wake_fd_is_readable_while_frames_wait_and_the_queue_is_bounded() {
        let (mut nic, far, iommu) = udp_nic(1);
        let (a, _pa) = page(&iommu, 0);
        let to = nic.wire.bound_addr().unwrap();
        for i in 0..(RX_QUEUE + 40) {
            far.send_to(&frame(64, i as u8), to).unwrap();
        }
        // Readable once the thread queued something.
        wait_readable(&[nic.wake_fd()], Duration::from_secs(10)).unwrap();
        let mut ev = Vec::new();
        nic.post_rx(RxBuffer { frame: 1, iova: a }).unwrap();
        nic.poll(&mut ev).unwrap();
        assert_eq!(ev.len(), 1);
        // Frames still queued without a buffer: the descriptor stays readable, so an idle
        // loop does not sleep on them.
        let mut p = libc::pollfd {
            fd: nic.wake_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        assert_eq!(unsafe { libc::poll(&mut p, 1, 0) }, 1);
        // Without buffers the queue fills to RX_QUEUE and the thread drops the rest, counted
        // (sent paced: a loopback socket drops datagrams sent faster than they are read).
        // The first burst may have overflowed already: wait for an overflow after the poll
        // above took one frame out, so the queue is full again.
        let before = nic.stats().rx_overflow;
        for i in 0..(4 * RX_QUEUE) {
            if nic.stats().rx_overflow > before {
                break;
            }
            far.send_to(&frame(64, i as u8), to).unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(nic.stats().rx_overflow > 0);
        assert_eq!(nic.shared.lock().len(), RX_QUEUE);
        assert_eq!(nic.stats().rx, 1);
    }

    #[test]
    fn bad_names_are_refused() {
        for n in ["", "a/b", "sixteen-bytes-xx", "nul\0"] {
            assert!(matches!(make_persistent(n), Err(TapError::Name(_))));
            assert!(matches!(
                TapNic::open(n, Iommu::new(1).device(), [0; 6], 1),
                Err(TapError::Name(_))
            ));
        }
    }

    #[test]
    fn persistent_tap_carries_frames_both_ways_when_root() {
        if !rustix_is_root() || !std::path::Path::new("/dev/net/tun").exists() {
            println!("SKIP: TAP needs root and /dev/net/tun");
            return;
        }
        let ifname = format!("xnt{}", std::process::id() % 100_000);
        make_persistent(&ifname).unwrap();
        let iommu = Iommu::new(16);
        let (a, pa) = page(&iommu, 0);
        // The interface outlives a device attached and dropped.
        drop(TapNic::open(&ifname, iommu.device(), [2, 0, 0, 0, 0, 1], 4).unwrap());
        assert!(std::path::Path::new(&format!("/sys/class/net/{ifname}")).exists());
        let mut nic = TapNic::open(&ifname, iommu.device(), [2, 0, 0, 0, 0, 1], 4).unwrap();
        // Host -> device: a raw frame sent on the interface arrives in a posted buffer.
        let sock = PacketSocket::bind(&ifname);
        let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x88, 0xb5];
        f.extend((0..80u8).map(|i| i ^ 0x3c));
        nic.post_rx(RxBuffer { frame: 3, iova: a }).unwrap();
        sock.send(&f);
        let mut ev = Vec::new();
        for _ in 0..50 {
            nic.wait(Duration::from_millis(100)).unwrap();
            nic.poll(&mut ev).unwrap();
            // Host chatter (IPv6 router solicitations) may come first: keep only ours.
            if ev
                .iter()
                .any(|e| matches!(e, NetEvent::Rx { len, .. } if usize::from(*len) == f.len()))
            {
                break;
            }
            for e in ev.drain(..) {
                if let NetEvent::Rx { buf, .. } = e {
                    nic.post_rx(buf).unwrap();
                }
            }
        }
        let mut got = vec![0u8; f.len()];
        pa.read(0, &mut got);
        assert_eq!(got, f, "the frame did not reach the posted buffer");
        // Device -> host.
        f[13] = 0xb6;
        pa.write(100, &f);
        nic.transmit(
            1,
            &[TxSeg {
                iova: a + 100,
                len: f.len() as u32,
            }],
        )
        .unwrap();
        assert!(
            sock.recv_matching(&f),
            "the frame did not come out of the TAP"
        );
        drop(nic);
        // Cleanup: delete the persistent interface.
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &ifname])
            .status();
    }

    fn rustix_is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    /// An `AF_PACKET` socket on an interface: dom0's side of the TAP.
    struct PacketSocket(std::os::fd::OwnedFd);

    impl PacketSocket {
        fn bind(ifname: &str) -> Self {
            use std::os::fd::FromRawFd;
            let proto = u16::try_from(libc::ETH_P_ALL).unwrap().to_be();
            // SAFETY: plain socket(2); the result is checked and owned below.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
            assert!(fd >= 0, "{}", std::io::Error::last_os_error());
            // SAFETY: `fd` is a fresh descriptor nobody else owns.
            let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
            let name = std::ffi::CString::new(ifname).unwrap();
            // SAFETY: `name` is a valid NUL-terminated string.
            let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
            assert_ne!(index, 0);
            // SAFETY: all-zero is a valid `sockaddr_ll`.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = u16::try_from(libc::AF_PACKET).unwrap();
            sll.sll_protocol = proto;
            sll.sll_ifindex = i32::try_from(index).unwrap();
            // SAFETY: `sll` is a `sockaddr_ll` of the length passed.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    std::ptr::addr_of!(sll).cast(),
                    u32::try_from(std::mem::size_of::<libc::sockaddr_ll>()).unwrap(),
                )
            };
            assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
            let tv = libc::timeval {
                tv_sec: 5,
                tv_usec: 0,
            };
            // SAFETY: SO_RCVTIMEO takes a `timeval` of the length passed.
            let rc = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    std::ptr::addr_of!(tv).cast(),
                    u32::try_from(std::mem::size_of::<libc::timeval>()).unwrap(),
                )
            };
            assert_eq!(rc, 0);
            Self(fd)
        }

        fn send(&self, f: &[u8]) {
            // SAFETY: `f` is readable for its length.
            let n = unsafe { libc::send(self.0.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) };
            assert_eq!(usize::try_from(n).unwrap(), f.len());
        }

        fn recv_matching(&self, f: &[u8]) -> bool {
            let mut buf = [0u8; 2048];
            (0..100).any(|_| {
                // SAFETY: `buf` is writable for its length.
                let n = unsafe {
                    libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
                };
                n > 0 && buf[..usize::try_from(n).unwrap()] == *f
            })
        }
    }
}
