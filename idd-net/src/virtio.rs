//! A virtio-net driver (virtio 1.2, modern PCI transport, one receive and one transmit
//! split virtqueue) that programs its NIC only through the device's I/O Space and lets it
//! reach only memory pinned for it. It implements [`NetDevice`] for netback.
//!
//! # Why our own driver
//!
//! As for idd-blk's virtio-blk driver: `virtio-drivers`' network API copies frames through
//! buffers in the driver's address space, and its transport expects BARs mapped into the
//! driver's memory. Here transmitted frames reach the device as IOVAs of guest grants netback
//! pinned (the IDD never maps them), and receive buffers are pages netback owns and posts.
//! The transport and queue mechanics are shared with every IDD in [`iospace::driver`]; this
//! module adds only virtio-net's requests.
//!
//! # Memory
//!
//! Three frames of the IDD's own RAM ([`DriverFrames`]), granted to the IDD itself and pinned
//! for the device (`grant_access` + `pin_grant` on our own domain):
//!
//! | frame | offset | what |
//! |---|---|---|
//! | `rx_ring` | 0 | receiveq (queue 0): descriptors, available and used rings ([`iospace::driver`] layout), up to [`QUEUE_SIZE`] entries |
//! | `tx_ring` | 0 | transmitq (queue 1), same layout |
//! | `hdr` | 0 | the 12-byte `virtio_net_hdr_v1` every transmit starts with: all zero (no offloads), read-only to the device, shared by all chains |
//! | `hdr` | [`PIN_RECORD`] | the driver's own pins and self-grants, released by the next process of the domain |
//!
//! # Requests
//!
//! * Transmit: one chain, device-readable: the shared zero header, then the caller's
//!   [`TxSeg`]s in order (so `segments + 1` descriptors). The doorbell is skipped while the
//!   device has `VRING_USED_F_NO_NOTIFY` set (it is draining the ring and re-checks it). The device's used length for a
//!   transmit is 0 and carries no status: a used chain is a [`NetEvent::TxDone`] with `ok`.
//! * Receive: one device-writable descriptor per posted page (4096 bytes at the buffer's
//!   IOVA). The device writes the 12-byte header then the frame; a used length `n` becomes
//!   [`NetEvent::Rx`] with `offset` 12 and `len` `n − 12`. A length outside `12..=4096` is a
//!   broken device.
//!
//! Receive buffers are made available without a doorbell each; one notify covers all those
//! posted since, rung at the next [`NetDevice::poll`] or [`NetDevice::wait`].
//!
//! # Interrupts and failure
//!
//! MSI-X vector 0 is the receiveq, 1 the transmitq, 2 configuration changes; they are waited
//! for through [`IoAccess::wait_irq`]. A config interrupt with `DEVICE_NEEDS_RESET` set, or a
//! used ring that breaks the protocol, fails the driver: every later call returns
//! [`NetDevError::Failed`] and the IDD restarts (a new process probes again, which resets the
//! device). The device is reset when the driver is dropped, before its pins go away.

use crate::device::{NetDevError, NetDevice, NetEvent, RxBuffer, TxSeg};
use devchan::grant::GrantRef;
use devchan::platform::{Frame, Platform, PlatformError};
use iospace::driver::{Buf, DriverError, QueueMemory, SplitQueue, Transport};
use iospace::link::IoAccess;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use virtio_bindings::virtio_config::{VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS};

/// Entries we ask for per queue (the rings of 128 fit one page).
pub const QUEUE_SIZE: u16 = 128;
/// Most segments of one transmit (Linux netfront's slot limit).
pub const MAX_TX_SEGMENTS: usize = 18;
/// Length of `virtio_net_hdr_v1`.
pub const NET_HDR_LEN: usize = 12;
/// Size of a receive buffer (one page).
pub const RX_BUF_LEN: usize = 4096;
/// The same lengths in the widths of descriptors and events.
const HDR_LEN_U32: u32 = 12;
const HDR_LEN_U16: u16 = 12;
const RX_BUF_LEN_U32: u32 = 4096;
const _: () = assert!(HDR_LEN_U32 as usize == NET_HDR_LEN && HDR_LEN_U16 as usize == NET_HDR_LEN);
const _: () = assert!(RX_BUF_LEN_U32 as usize == RX_BUF_LEN);
/// Ethernet header plus one VLAN tag beyond the MTU.
const FRAME_OVERHEAD: usize = 18;
/// Smallest frame (an Ethernet header).
const MIN_FRAME: usize = 14;
/// Frame size when the device does not state an MTU (1500 + header + VLAN tag).
pub const DEFAULT_MAX_FRAME: usize = 1518;
/// Where the shared transmit header lives in the hdr frame.
const TX_HDR: usize = 0;
/// Where in the hdr frame the driver records its pins: `magic: le32`, `_pad: le32`, three
/// `gref: le32` (rx ring, tx ring, hdr), `_pad: le32`, three `iova: le64`.
pub const PIN_RECORD: usize = 4096 - 48;
/// `"VNP1"`: the pin record is valid.
const PIN_MAGIC: u32 = u32::from_le_bytes(*b"VNP1");
const _: () = assert!(PIN_RECORD >= TX_HDR + NET_HDR_LEN && PIN_RECORD + 48 <= 4096);
/// `struct virtio_net_config` offsets we read.
mod net_cfg {
    pub const MAC: u64 = 0;
    pub const MTU: u64 = 10;
}
/// MSI-X vectors.
const RX_VECTOR: u16 = 0;
const TX_VECTOR: u16 = 1;
const CONFIG_VECTOR: u16 = 2;
const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;
/// How long transmits may sit unused before the doorbell is rung again.
const KICK_AFTER: Duration = Duration::from_millis(200);

/// Frames of the IDD's own RAM the driver uses (reserved by whoever starts the IDD).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DriverFrames {
    /// The receiveq.
    pub rx_ring: Frame,
    /// The transmitq.
    pub tx_ring: Frame,
    /// The transmit header and the pin record.
    pub hdr: Frame,
}

/// Why bringing the device up failed.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// The transport refused (capability, feature, status, queue, vector, I/O Space).
    #[error("Virtio transport")]
    Transport(#[from] DriverError),
    /// Pinning or granting our own memory failed.
    #[error("Pinning driver memory failed")]
    Platform(#[from] PlatformError),
}

struct Pinned {
    frame: Frame,
    gref: GrantRef,
    iova: u64,
}

/// One of our frames as a queue's page.
struct FrameMem<'a, P: Platform> {
    p: &'a P,
    frame: Frame,
}

impl<P: Platform> QueueMemory for FrameMem<'_, P> {
    fn read(&self, offset: usize, buf: &mut [u8]) -> Result<(), DriverError> {
        self.p
            .read_local(self.frame, offset, buf)
            .map_err(|e| DriverError::Memory(e.to_string()))
    }
    fn write(&self, offset: usize, data: &[u8]) -> Result<(), DriverError> {
        self.p
            .write_local(self.frame, offset, data)
            .map_err(|e| DriverError::Memory(e.to_string()))
    }
}

fn pin_own<P: Platform>(p: &P, frame: Frame, writable: bool) -> Result<Pinned, VirtioError> {
    p.write_local(frame, 0, &[0u8; 4096])?;
    let gref = p.grant_access(p.domid(), frame, !writable)?;
    match p.pin_grant(p.domid(), gref, writable) {
        Ok(iova) => Ok(Pinned { frame, gref, iova }),
        Err(e) => {
            let _ = p.end_access(gref);
            Err(e.into())
        }
    }
}

fn unpin<P: Platform>(p: &P, pin: &Pinned) {
    let _ = p.unpin_grant(pin.iova);
    let _ = p.end_access(pin.gref);
}

/// Release the pins and self-grants an earlier process of this domain recorded in `hdr`.
fn release_previous<P: Platform>(p: &P, hdr: Frame) -> Result<(), VirtioError> {
    let mut r = [0u8; 48];
    p.read_local(hdr, PIN_RECORD, &mut r)?;
    let u32_at = |o: usize| u32::from_le_bytes([r[o], r[o + 1], r[o + 2], r[o + 3]]);
    let u64_at = |o: usize| u64::from(u32_at(o)) | u64::from(u32_at(o + 4)) << 32;
    if u32_at(0) == PIN_MAGIC {
        for k in 0..3 {
            // Either may be gone already (the manager revoked it); both outcomes are fine.
            let _ = p.unpin_grant(u64_at(24 + 8 * k));
            let _ = p.end_access(u32_at(8 + 4 * k));
        }
        p.write_local(hdr, PIN_RECORD, &[0u8; 48])?;
    }
    Ok(())
}

fn record_pins<P: Platform>(p: &P, pins: [&Pinned; 3], hdr: Frame) -> Result<(), VirtioError> {
    let mut r = [0u8; 48];
    r[0..4].copy_from_slice(&PIN_MAGIC.to_le_bytes());
    for (k, pin) in pins.iter().enumerate() {
        r[8 + 4 * k..12 + 4 * k].copy_from_slice(&pin.gref.to_le_bytes());
        r[24 + 8 * k..32 + 8 * k].copy_from_slice(&pin.iova.to_le_bytes());
    }
    Ok(p.write_local(hdr, PIN_RECORD, &r)?)
}

fn failed(e: impl std::fmt::Display) -> NetDevError {
    NetDevError::Failed(e.to_string())
}

/// The driver: a [`NetDevice`] over a virtio-net-pci device's I/O Space.
pub struct VirtioNetDriver<P: Platform, I: IoAccess> {
    platform: Arc<P>,
    t: Transport<I>,
    rx_ring: Pinned,
    tx_ring: Pinned,
    hdr: Pinned,
    rxq: SplitQueue,
    txq: SplitQueue,
    /// Receive chain head → the buffer posted there.
    rx_bufs: BTreeMap<u16, RxBuffer>,
    /// Transmit chain head → the caller's token.
    tx_tokens: BTreeMap<u16, u64>,
    mac: [u8; 6],
    max_frame: usize,
    /// Receive buffers made available since the last doorbell.
    rx_kick: bool,
    /// MSI-X vectors seen firing and not yet handled.
    irq_bits: u32,
    /// When the device last used a transmit (or we last rang for them).
    tx_progress: Instant,
    broken: Option<String>,
}

impl<P: Platform, I: IoAccess> VirtioNetDriver<P, I> {
    /// Bring up the virtio-net device behind `io`, with its queues in `frames`.
    pub fn probe(platform: Arc<P>, io: I, frames: DriverFrames) -> Result<Self, VirtioError> {
        let t = Transport::open(io, 3)?;
        // Reset before touching the queue memory: a device still running a previous
        // process's queues (a restart) could otherwise write into pages we are clearing.
        t.reset()?;
        let p = &*platform;
        release_previous(p, frames.hdr)?;
        let rx_ring = pin_own(p, frames.rx_ring, true)?;
        let tx_ring = pin_own(p, frames.tx_ring, true).inspect_err(|_| unpin(p, &rx_ring))?;
        // The device only reads the header: its frame is pinned read-only.
        let hdr = pin_own(p, frames.hdr, false).inspect_err(|_| {
            unpin(p, &rx_ring);
            unpin(p, &tx_ring);
        })?;
        if let Err(e) = record_pins(p, [&rx_ring, &tx_ring, &hdr], frames.hdr) {
            [&rx_ring, &tx_ring, &hdr]
                .iter()
                .for_each(|pin| unpin(p, pin));
            return Err(e);
        }
        let (rxq, txq) = (
            SplitQueue::new(QUEUE_SIZE, rx_ring.iova)?,
            SplitQueue::new(QUEUE_SIZE, tx_ring.iova)?,
        );
        let mut d = Self {
            platform,
            t,
            rx_ring,
            tx_ring,
            hdr,
            rxq,
            txq,
            rx_bufs: BTreeMap::new(),
            tx_tokens: BTreeMap::new(),
            mac: [0; 6],
            max_frame: DEFAULT_MAX_FRAME,
            rx_kick: false,
            irq_bits: 0,
            tx_progress: Instant::now(),
            broken: None,
        };
        // From here on, Drop resets the device and releases the pins.
        d.init()?;
        Ok(d)
    }

    fn init(&mut self) -> Result<(), VirtioError> {
        let wanted = 1u64 << VIRTIO_NET_F_MTU | 1u64 << VIRTIO_NET_F_STATUS;
        let features = self.t.negotiate(
            &[
                VIRTIO_F_VERSION_1,
                VIRTIO_F_ACCESS_PLATFORM,
                VIRTIO_NET_F_MAC,
            ],
            wanted,
            CONFIG_VECTOR,
        )?;
        for (index, vector) in [(RX_QUEUE, RX_VECTOR), (TX_QUEUE, TX_VECTOR)] {
            let size = self.t.queue_size(index, QUEUE_SIZE)?;
            let (pin, q) = if index == RX_QUEUE {
                (&self.rx_ring, &mut self.rxq)
            } else {
                (&self.tx_ring, &mut self.txq)
            };
            *q = SplitQueue::new(size, pin.iova)?;
            q.clear(&FrameMem {
                p: &*self.platform,
                frame: pin.frame,
            })?;
            self.t.setup_queue(index, q, vector)?;
        }
        let mut b = [0u8; 8];
        self.t.read_config(net_cfg::MAC, &mut b)?;
        self.mac.copy_from_slice(&b[..6]);
        if features & (1 << VIRTIO_NET_F_MTU) != 0 {
            let mut m = [0u8; 2];
            self.t.read_config(net_cfg::MTU, &mut m)?;
            let mtu = usize::from(u16::from_le_bytes(m));
            // A lying MTU cannot make frames larger than a receive page holds, nor tiny.
            self.max_frame = (mtu + FRAME_OVERHEAD).clamp(64, RX_BUF_LEN - NET_HDR_LEN);
        }
        self.t.driver_ok()?;
        Ok(())
    }

    /// A one-line description of the queues (for stall reports).
    pub fn describe(&self) -> String {
        format!(
            "status {:#x}, rx posted {}, tx in flight {} ({} free descriptors), irqs {:#x}{}",
            self.t.status().unwrap_or(0xff),
            self.rx_bufs.len(),
            self.tx_tokens.len(),
            self.txq.free_descriptors(),
            self.irq_bits,
            self.broken
                .as_ref()
                .map_or(String::new(), |b| format!(", failed: {b}"))
        )
    }

    fn check(&mut self) -> Result<(), NetDevError> {
        if self.irq_bits & (1 << CONFIG_VECTOR) != 0 {
            self.irq_bits &= !(1 << CONFIG_VECTOR);
            if self.t.needs_reset().map_err(failed)? {
                self.broken = Some("device needs reset".into());
            }
        }
        match &self.broken {
            Some(b) => Err(NetDevError::Failed(b.clone())),
            None => Ok(()),
        }
    }

    /// Note a failure that leaves the queues in an unknown state.
    fn fail(&mut self, e: impl std::fmt::Display) -> NetDevError {
        let msg = e.to_string();
        self.broken = Some(msg.clone());
        NetDevError::Failed(msg)
    }

    fn kick_rx(&mut self) -> Result<(), NetDevError> {
        if self.rx_kick {
            self.rx_kick = false;
            if let Err(e) = self.t.notify(&self.rxq) {
                return Err(self.fail(e));
            }
        }
        Ok(())
    }
}

impl<P: Platform, I: IoAccess> NetDevice for VirtioNetDriver<P, I> {
    fn mac(&self) -> [u8; 6] {
        self.mac
    }
    fn max_frame(&self) -> usize {
        self.max_frame
    }
    fn max_tx_segments(&self) -> usize {
        MAX_TX_SEGMENTS.min(usize::from(self.txq.size()) - 1)
    }
    fn tx_in_flight(&self) -> usize {
        self.tx_tokens.len()
    }
    fn rx_posted(&self) -> usize {
        self.rx_bufs.len()
    }
    fn rx_capacity(&self) -> usize {
        usize::from(self.rxq.size())
    }

    fn transmit(&mut self, token: u64, segs: &[TxSeg]) -> Result<(), NetDevError> {
        self.check()?;
        if segs.is_empty() || segs.len() > self.max_tx_segments() {
            return Err(NetDevError::Malformed("segment count"));
        }
        if segs
            .iter()
            .any(|s| s.len == 0 || s.len as usize > RX_BUF_LEN)
        {
            return Err(NetDevError::Malformed("segment length"));
        }
        let len: usize = segs.iter().map(|s| s.len as usize).sum();
        if !(MIN_FRAME..=self.max_frame).contains(&len) {
            return Err(NetDevError::Malformed("frame length"));
        }
        let bufs: Vec<Buf> = std::iter::once(Buf {
            addr: self.hdr.iova + TX_HDR as u64,
            len: HDR_LEN_U32,
            device_writes: false,
        })
        .chain(segs.iter().map(|s| Buf {
            addr: s.iova,
            len: s.len,
            device_writes: false,
        }))
        .collect();
        let mem = FrameMem {
            p: &*self.platform,
            frame: self.tx_ring.frame,
        };
        let head = match self.txq.push(&mem, &bufs) {
            Ok(h) => h,
            Err(DriverError::Full) => return Err(NetDevError::Full),
            Err(e) => return Err(self.fail(e)),
        };
        if self.tx_tokens.is_empty() {
            self.tx_progress = Instant::now();
        }
        self.tx_tokens.insert(head, token);
        let mem = FrameMem {
            p: &*self.platform,
            frame: self.tx_ring.frame,
        };
        // Skip the doorbell while the device says it is draining the ring anyway.
        let ring =
            self.txq
                .needs_notify(&mem)
                .and_then(|n| if n { self.t.notify(&self.txq) } else { Ok(()) });
        if let Err(e) = ring {
            return Err(self.fail(e));
        }
        Ok(())
    }

    fn post_rx(&mut self, buf: RxBuffer) -> Result<(), NetDevError> {
        self.check()?;
        if self.rx_bufs.values().any(|b| b.iova == buf.iova) {
            return Err(NetDevError::Malformed("buffer already posted"));
        }
        let mem = FrameMem {
            p: &*self.platform,
            frame: self.rx_ring.frame,
        };
        let b = Buf {
            addr: buf.iova,
            len: RX_BUF_LEN_U32,
            device_writes: true,
        };
        let head = match self.rxq.push(&mem, &[b]) {
            Ok(h) => h,
            Err(DriverError::Full) => return Err(NetDevError::Full),
            Err(e) => return Err(self.fail(e)),
        };
        self.rx_bufs.insert(head, buf);
        self.rx_kick = true;
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<NetEvent>) -> Result<(), NetDevError> {
        self.check()?;
        self.kick_rx()?;
        loop {
            let mem = FrameMem {
                p: &*self.platform,
                frame: self.tx_ring.frame,
            };
            let used = self.txq.pop_used(&mem);
            match used {
                Ok(Some((head, _))) => {
                    self.tx_progress = Instant::now();
                    if let Some(token) = self.tx_tokens.remove(&head) {
                        out.push(NetEvent::TxDone { token, ok: true });
                    }
                }
                Ok(None) => break,
                Err(e) => return Err(self.fail(e)),
            }
        }
        loop {
            let mem = FrameMem {
                p: &*self.platform,
                frame: self.rx_ring.frame,
            };
            let used = self.rxq.pop_used(&mem);
            match used {
                Ok(Some((head, len))) => {
                    let Some(buf) = self.rx_bufs.remove(&head) else {
                        return Err(self.fail("receive chain without a buffer"));
                    };
                    let len = len as usize;
                    if !(NET_HDR_LEN..=RX_BUF_LEN).contains(&len) {
                        return Err(self.fail(format!("receive length {len}")));
                    }
                    out.push(NetEvent::Rx {
                        buf,
                        offset: HDR_LEN_U16,
                        len: u16::try_from(len - NET_HDR_LEN).unwrap_or(0),
                    });
                }
                Ok(None) => break,
                Err(e) => return Err(self.fail(e)),
            }
        }
        self.check()
    }

    fn wait(&mut self, timeout: Duration) -> Result<(), NetDevError> {
        self.check()?;
        self.kick_rx()?;
        // Transmits outstanding and nothing used for a while: ring again. A notification is
        // idempotent, and this recovers from one lost while the device was being reset.
        if !self.tx_tokens.is_empty() && self.tx_progress.elapsed() > KICK_AFTER {
            self.tx_progress = Instant::now();
            if let Err(e) = self.t.notify(&self.txq) {
                return Err(self.fail(e));
            }
        }
        let queues = 1u32 << RX_VECTOR | 1u32 << TX_VECTOR;
        if self.irq_bits & queues == 0 {
            self.irq_bits |= self.t.wait_irq(timeout).map_err(failed)?;
        }
        self.irq_bits &= !queues;
        Ok(())
    }
}

impl<P: Platform, I: IoAccess> Drop for VirtioNetDriver<P, I> {
    fn drop(&mut self) {
        // Reset first: once the device has stopped, no DMA can reach the pinned pages.
        let _ = self.t.reset();
        let p = &*self.platform;
        for pin in [&self.rx_ring, &self.tx_ring, &self.hdr] {
            unpin(p, pin);
        }
        let _ = p.write_local(self.hdr.frame, PIN_RECORD, &[0u8; 48]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypervisor::domain::DomainConfig;
    use hypervisor::local::LocalPlatform;
    use hypervisor::system::System;
    use iospace::emu::{PciBus, StubDevice};
    use iospace::link::LocalIo;
    use iospace::space::IoSpace;

    #[test]
    fn a_device_without_virtio_capabilities_is_refused_and_nothing_is_pinned() {
        let stub = Arc::new(StubDevice::new(StubDevice::example_config()));
        let bus = PciBus::new();
        let bdf = bus.plug(3, stub.clone()).unwrap();
        let space = Arc::new(IoSpace::new(bdf, stub).unwrap());
        let sys = System::new();
        let iommu = iospace::iommu::Iommu::new(8);
        let d = sys
            .create_domain(DomainConfig {
                name: "idd".into(),
                nr_frames: 16,
                iommu: Some(iommu.clone()),
            })
            .unwrap();
        let p = Arc::new(LocalPlatform::new(sys, d).unwrap());
        let frames = DriverFrames {
            rx_ring: 8,
            tx_ring: 9,
            hdr: 10,
        };
        let r = VirtioNetDriver::probe(p, LocalIo::new(space), frames);
        assert!(matches!(
            r,
            Err(VirtioError::Transport(DriverError::MissingCapability(_)))
        ));
        assert!(iommu.is_empty());
    }
}
