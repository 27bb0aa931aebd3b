//! A virtio-blk driver (virtio 1.2, modern PCI transport, one split virtqueue) that programs
//! its device only through the device's I/O Space and gives it only memory pinned for it.
//!
//! # Why our own driver
//!
//! `virtio-drivers` was considered: its `Hal` DMA hooks (`dma_alloc`, `share`/`unshare`) do
//! map onto pin/unpin, but its block API moves data between the device and buffers *in the
//! driver's address space* (`read_blocks(&mut [u8])`), which is exactly what an IDD must not
//! have: guest data reaches the device as IOVAs of pinned guest grants that the IDD never
//! maps. Its PCI transport also expects BARs mapped into the driver's memory, while ours
//! goes through `IoSpace` calls that check and count every access. What remains to write is
//! small (a split queue with a free list), so the driver is ours.
//!
//! # Memory
//!
//! Two frames of the IDD's own RAM ([`DriverFrames`]), granted to the IDD itself and pinned
//! for the device (`grant_access` + `pin_grant` on our own domain), so the device reaches
//! them only through its IOMMU:
//!
//! | frame | offset | what |
//! |---|---|---|
//! | ring | 0 | descriptor table, [`QUEUE_SIZE`] × 16 bytes |
//! | ring | 1024 | available ring: `flags`, `idx`, `ring[QUEUE_SIZE]` (le16) |
//! | ring | 2048 | used ring: `flags`, `idx`, `ring[QUEUE_SIZE]` of `{id: le32, len: le32}` |
//! | hdr | 32 h | request header of the chain whose head is descriptor `h`: `type`, `reserved`, `sector`, then (discard) one `{sector: le64, num_sectors: le32, flags: le32}` |
//! | hdr | 2048 + h | status byte of that chain |
//! | hdr | 4064 | the driver's own pins and self-grants (`PIN_RECORD`), released by the next process of the domain |
//!
//! A request is one chain: header (device-readable), data segments (the pinned guest IOVAs;
//! device-writable for reads), status (device-writable), so it takes `segments + 2`
//! descriptors.
//!
//! # Descriptor budget
//!
//! [`BlockDevice::queue_depth`] (a quarter of the queue) bounds how many requests blkback
//! hands over, but a merged request may take up to `max_segments + 2` descriptors, so the
//! free list can run dry while the depth allows more. A request that does not fit is never
//! refused for that: it waits, in submission order, in the driver's hold queue and is put on
//! the ring as completions free descriptors (it counts as in flight meanwhile). Only a
//! request larger than the whole queue is refused, and [`BlockDevice::max_segments`] is
//! clamped so that none is.
//!
//! # Device access
//!
//! Capabilities come from the I/O Space's parsed config (`cfg_type` 1 common, 2 notify,
//! 3 ISR, 4 device config); MSI-X is enabled through the virtualised config view, vector 0
//! is the queue, vector 1 config changes, waited for through [`IoAccess::wait_irq`]. The I/O
//! Space is in this process ([`iospace::link::LocalIo`]) or in domain 0 ([`iospace::link::RemoteIo`]).
//! The device is reset when the driver is dropped, before the pins go away.

use crate::device::{check_request, BlockDevice, Completion, DevOp, DevRequest, DeviceError};
use iospace::link::{IoAccess, IoError};
use devchan::grant::GrantRef;
use devchan::platform::{Frame, Platform};
use iospace::pci::caps::{self, virtio as vcap, Capability};
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::Duration;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

/// Entries of our virtqueue (the descriptor table fills 1 KiB).
pub const QUEUE_SIZE: u16 = 64;
const AVAIL: usize = 1024;
const USED: usize = 2048;
const HDR_SLOT: usize = 32;
const STATUS_BASE: usize = 2048;
/// How long chains may sit unused before the doorbell is rung again.
const KICK_AFTER: Duration = Duration::from_millis(200);
/// Kicks without progress before the device is reset and the chains resubmitted.
const RESET_AFTER_KICKS: u32 = 3;
/// Most data segments per request we use (the device's `seg_max` may lower it).
pub const MAX_SEGMENTS: usize = 32;

/// Common configuration register offsets (virtio 1.2 §4.1.4.3): the spec's table, defined once
/// beside the device model that serves them.
use iospace::emu::virtio_pci::common;

/// `struct virtio_blk_config` offsets we read.
mod blk_cfg {
    pub const CAPACITY: u64 = 0;
    pub const SEG_MAX: u64 = 12;
}

/// MSI-X vector of the queue.
const QUEUE_VECTOR: u16 = 0;
/// MSI-X vector of configuration changes.
const CONFIG_VECTOR: u16 = 1;

/// Frames of the IDD's own RAM the driver uses (reserved by whoever starts the IDD).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DriverFrames {
    /// The virtqueue.
    pub ring: Frame,
    /// Request headers and status bytes.
    pub hdr: Frame,
}

/// Why bringing the device up failed.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// A capability the driver needs is missing.
    #[error("Device lacks the {0} capability")]
    MissingCapability(&'static str),
    /// The device does not offer a feature the driver requires.
    #[error("Device does not offer feature bit {0}")]
    MissingFeature(u32),
    /// The device refused `FEATURES_OK` or `DRIVER_OK`.
    #[error("Device refused status {0:#x}")]
    StatusRefused(u8),
    /// The device reports no request queue (queue size 0).
    #[error("Device has no request queue")]
    NoQueue,
    /// Pinning or granting our own memory failed.
    #[error("Pinning driver memory failed")]
    Platform(#[from] devchan::platform::PlatformError),
    /// An I/O Space access failed.
    #[error("I/O Space access failed")]
    Io(#[from] IoError),
}

struct Pinned {
    frame: Frame,
    gref: GrantRef,
    iova: u64,
}

/// The driver: a [`BlockDevice`] over a virtio-blk-pci device's I/O Space.
pub struct VirtioBlkDriver<P: Platform, I: IoAccess> {
    platform: Arc<P>,
    io: I,
    common: u64,
    notify: u64,
    device_cfg: u64,
    ring: Pinned,
    hdr: Pinned,
    qsize: u16,
    free: Vec<u16>,
    avail_idx: u16,
    used_seen: u16,
    /// Head descriptor → (token, descriptors of the chain).
    inflight: BTreeMap<u16, (DevRequest, Vec<u16>)>,
    /// Requests waiting for descriptors, in submission order (see the module docs).
    held: VecDeque<DevRequest>,
    notify_base: u64,
    notify_multiplier: u32,
    /// Kicks since the device last used a chain.
    stalled_kicks: u32,
    /// Device resets after a stall.
    resets: u64,
    capacity: u64,
    read_only: bool,
    seg_max: usize,
    /// MSI-X vectors seen firing and not yet handled.
    irq_bits: u32,
    /// When the device last used a chain (or we last kicked it).
    last_used: std::time::Instant,
    /// Doorbells rung again because nothing moved.
    kicks: u64,
    broken: bool,
}

fn pin_own<P: Platform>(p: &P, frame: Frame) -> Result<Pinned, VirtioError> {
    p.write_local(frame, 0, &[0u8; 4096])?;
    let gref = p.grant_access(p.domid(), frame, false)?;
    match p.pin_grant(p.domid(), gref, true) {
        Ok(iova) => Ok(Pinned { frame, gref, iova }),
        Err(e) => {
            let _ = p.end_access(gref);
            Err(e.into())
        }
    }
}

/// Where in the hdr frame the driver records its own pins (so a restarted process of the
/// domain releases the ones its predecessor left): `magic: le32`, `_pad: le32`,
/// `ring_gref: le32`, `hdr_gref: le32`, `ring_iova: le64`, `hdr_iova: le64`.
const PIN_RECORD: usize = 4096 - 32;
/// `"VQP1"`: the pin record is valid.
const PIN_MAGIC: u32 = u32::from_le_bytes(*b"VQP1");
const _: () = assert!(STATUS_BASE + QUEUE_SIZE as usize <= PIN_RECORD);

/// Release the pins and self-grants an earlier process of this domain recorded in `hdr`.
fn release_previous<P: Platform>(p: &P, hdr: Frame) -> Result<(), VirtioError> {
    let mut r = [0u8; 32];
    p.read_local(hdr, PIN_RECORD, &mut r)?;
    let u32_at = |o: usize| u32::from_le_bytes([r[o], r[o + 1], r[o + 2], r[o + 3]]);
    let u64_at = |o: usize| u64::from(u32_at(o)) | u64::from(u32_at(o + 4)) << 32;
    if u32_at(0) == PIN_MAGIC {
        for (gref, iova) in [(u32_at(8), u64_at(16)), (u32_at(12), u64_at(24))] {
            // Either may be gone already (the manager revoked it); both outcomes are fine.
            let _ = p.unpin_grant(iova);
            let _ = p.end_access(gref);
        }
        p.write_local(hdr, PIN_RECORD, &[0u8; 32])?;
    }
    Ok(())
}

fn record_pins<P: Platform>(p: &P, ring: &Pinned, hdr: &Pinned) -> Result<(), VirtioError> {
    let mut r = [0u8; 32];
    r[0..4].copy_from_slice(&PIN_MAGIC.to_le_bytes());
    r[8..12].copy_from_slice(&ring.gref.to_le_bytes());
    r[12..16].copy_from_slice(&hdr.gref.to_le_bytes());
    r[16..24].copy_from_slice(&ring.iova.to_le_bytes());
    r[24..32].copy_from_slice(&hdr.iova.to_le_bytes());
    Ok(p.write_local(hdr.frame, PIN_RECORD, &r)?)
}

fn access(e: impl std::fmt::Display) -> DeviceError {
    DeviceError::Access(e.to_string())
}

impl<P: Platform, I: IoAccess> VirtioBlkDriver<P, I> {
    /// Bring up the virtio-blk device behind `io`, with its queue in `frames`.
    pub fn probe(platform: Arc<P>, io: I, frames: DriverFrames) -> Result<Self, VirtioError> {
        let info = io.info();
        let find = |t: u8| {
            info.capabilities.iter().find_map(|c| match c {
                Capability::Vendor {
                    virtio: Some(v), ..
                } if v.cfg_type == t => Some(*v),
                _ => None,
            })
        };
        let bar = |c: caps::VirtioCap| {
            info.bar(usize::from(c.bar))
                .map(|b| b.address + u64::from(c.offset))
        };
        let cap = |t, name| {
            find(t)
                .and_then(|c| bar(c).map(|a| (c, a)))
                .ok_or(VirtioError::MissingCapability(name))
        };
        let (_, common) = cap(vcap::COMMON_CFG, "common config")?;
        let (ncap, notify_base) = cap(vcap::NOTIFY_CFG, "notify")?;
        let (_, device_cfg) = cap(vcap::DEVICE_CFG, "device config")?;
        let msix = *info.msix().ok_or(VirtioError::MissingCapability("MSI-X"))?;
        let msix_table = info
            .bar(usize::from(msix.table_bar))
            .map(|b| b.address + u64::from(msix.table_offset))
            .ok_or(VirtioError::MissingCapability("MSI-X table"))?;
        if msix.table_size < 2 {
            return Err(VirtioError::MissingCapability("two MSI-X vectors"));
        }
        let ctl = u16::from(msix.offset) + u16::from(caps::MSIX_CONTROL);
        io.config_write(ctl, &caps::MSIX_CTL_ENABLE.to_le_bytes())?;
        for v in [QUEUE_VECTOR, CONFIG_VECTOR] {
            // Vector control (offset 12 of the entry): bit 0 masks; clear it.
            let entry = msix_table + u64::from(v) * caps::MSIX_ENTRY_SIZE;
            io.mmio_write(entry + 12, &0u32.to_le_bytes())?;
        }
        // Reset before touching the queue memory: a device still running a previous
        // process's queue (a restart) could otherwise write its used ring into the page we
        // are about to clear. Reset returns only once the device has stopped all DMA.
        io.mmio_write(common + common::DEVICE_STATUS, &[0])?;
        let p = &*platform;
        release_previous(p, frames.hdr)?;
        let ring = pin_own(p, frames.ring)?;
        let hdr = match pin_own(p, frames.hdr) {
            Ok(h) => h,
            Err(e) => {
                let _ = p.unpin_grant(ring.iova);
                let _ = p.end_access(ring.gref);
                return Err(e);
            }
        };
        record_pins(p, &ring, &hdr)?;
        let mut d = Self {
            platform,
            io,
            common,
            notify: 0,
            device_cfg,
            ring,
            hdr,
            qsize: 0,
            free: Vec::new(),
            avail_idx: 0,
            used_seen: 0,
            inflight: BTreeMap::new(),
            held: VecDeque::new(),
            notify_base,
            notify_multiplier: ncap.notify_off_multiplier,
            stalled_kicks: 0,
            resets: 0,
            capacity: 0,
            read_only: false,
            seg_max: MAX_SEGMENTS,
            irq_bits: 0,
            last_used: std::time::Instant::now(),
            kicks: 0,
            broken: false,
        };
        // From here on, Drop resets the device and releases the pins.
        d.init(notify_base, ncap.notify_off_multiplier)?;
        Ok(d)
    }

    fn w(&self, off: u64, data: &[u8]) -> Result<(), VirtioError> {
        Ok(self.io.mmio_write(self.common + off, data)?)
    }

    fn r(&self, addr: u64, buf: &mut [u8]) -> Result<(), VirtioError> {
        Ok(self.io.mmio_read(addr, buf)?)
    }

    fn status(&self) -> Result<u8, VirtioError> {
        let mut b = [0u8];
        self.r(self.common + common::DEVICE_STATUS, &mut b)?;
        Ok(b[0])
    }

    fn set_status(&self, s: u32) -> Result<(), VirtioError> {
        // Status bits are all below 0x100.
        #[allow(clippy::cast_possible_truncation)]
        self.w(common::DEVICE_STATUS, &[s as u8])
    }

    fn init(&mut self, notify_base: u64, multiplier: u32) -> Result<(), VirtioError> {
        self.set_status(0)?;
        let mut s = VIRTIO_CONFIG_S_ACKNOWLEDGE;
        self.set_status(s)?;
        s |= VIRTIO_CONFIG_S_DRIVER;
        self.set_status(s)?;
        let mut offered = 0u64;
        for sel in 0..2u32 {
            self.w(common::DEVICE_FEATURE_SELECT, &sel.to_le_bytes())?;
            let mut b = [0u8; 4];
            self.r(self.common + common::DEVICE_FEATURE, &mut b)?;
            offered |= u64::from(u32::from_le_bytes(b)) << (32 * sel);
        }
        for need in [VIRTIO_F_VERSION_1, VIRTIO_F_ACCESS_PLATFORM] {
            if offered & (1 << need) == 0 {
                return Err(VirtioError::MissingFeature(need));
            }
        }
        let wanted = [
            VIRTIO_F_VERSION_1,
            VIRTIO_F_ACCESS_PLATFORM,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_RO,
            VIRTIO_BLK_F_SEG_MAX,
        ]
        .iter()
        .fold(0u64, |a, b| a | 1 << b);
        let features = offered & wanted;
        for sel in 0..2u32 {
            self.w(common::DRIVER_FEATURE_SELECT, &sel.to_le_bytes())?;
            // The shifted half fits 32 bits.
            #[allow(clippy::cast_possible_truncation)]
            let half = (features >> (32 * sel)) as u32;
            self.w(common::DRIVER_FEATURE, &half.to_le_bytes())?;
        }
        s |= VIRTIO_CONFIG_S_FEATURES_OK;
        self.set_status(s)?;
        let got = self.status()?;
        if u32::from(got) & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            return Err(VirtioError::StatusRefused(got));
        }
        self.w(common::CONFIG_MSIX_VECTOR, &CONFIG_VECTOR.to_le_bytes())?;
        self.w(common::QUEUE_SELECT, &0u16.to_le_bytes())?;
        let mut b2 = [0u8; 2];
        self.r(self.common + common::QUEUE_SIZE, &mut b2)?;
        // After a reset the device reports its maximum here; 0 means the queue does not
        // exist (virtio 1.x, 4.1.4.3).
        let max = match u16::from_le_bytes(b2) {
            0 => return Err(VirtioError::NoQueue),
            m => m,
        };
        // The largest power of two within both limits.
        let mut q = QUEUE_SIZE;
        while q > max {
            q /= 2;
        }
        self.qsize = q;
        self.free = (0..q).rev().collect();
        self.w(common::QUEUE_SIZE, &q.to_le_bytes())?;
        self.w(common::QUEUE_MSIX_VECTOR, &QUEUE_VECTOR.to_le_bytes())?;
        let r = self.ring.iova;
        self.w(common::QUEUE_DESC, &r.to_le_bytes())?;
        self.w(common::QUEUE_DRIVER, &(r + AVAIL as u64).to_le_bytes())?;
        self.w(common::QUEUE_DEVICE, &(r + USED as u64).to_le_bytes())?;
        self.r(self.common + common::QUEUE_NOTIFY_OFF, &mut b2)?;
        self.notify = notify_base + u64::from(u16::from_le_bytes(b2)) * u64::from(multiplier);
        self.w(common::QUEUE_ENABLE, &1u16.to_le_bytes())?;
        let mut b8 = [0u8; 8];
        self.r(self.device_cfg + blk_cfg::CAPACITY, &mut b8)?;
        self.capacity = u64::from_le_bytes(b8);
        if features & (1 << VIRTIO_BLK_F_SEG_MAX) != 0 {
            let mut b4 = [0u8; 4];
            self.r(self.device_cfg + blk_cfg::SEG_MAX, &mut b4)?;
            let seg_max = usize::try_from(u32::from_le_bytes(b4)).unwrap_or(1);
            self.seg_max = seg_max.clamp(1, MAX_SEGMENTS);
        }
        // Every request must fit an empty queue (header and status take two descriptors).
        self.seg_max = self.seg_max.min(usize::from(q).saturating_sub(2)).max(1);
        self.read_only = features & (1 << VIRTIO_BLK_F_RO) != 0;
        s |= VIRTIO_CONFIG_S_DRIVER_OK;
        self.set_status(s)?;
        let got = self.status()?;
        if u32::from(got) & VIRTIO_CONFIG_S_DRIVER_OK == 0
            || u32::from(got) & VIRTIO_CONFIG_S_NEEDS_RESET != 0
        {
            return Err(VirtioError::StatusRefused(got));
        }
        Ok(())
    }

    /// A one-line description of the queue and device state (for stall reports).
    pub fn describe(&self) -> String {
        let mut used = [0u8; 2];
        let _ = self
            .platform
            .read_local(self.ring.frame, USED + 2, &mut used);
        format!(
            "status {:#x}, avail {}, used seen {} (device {}), {} chains in flight, {} held, {} free descriptors, irqs {:#x}, {} kicks, {} resets",
            self.status().unwrap_or(0xff),
            self.avail_idx,
            self.used_seen,
            u16::from_le_bytes(used),
            self.inflight.len(),
            self.held.len(),
            self.free.len(),
            self.irq_bits,
            self.kicks,
            self.resets
        )
    }

    fn put(&self, frame: Frame, off: usize, data: &[u8]) -> Result<(), DeviceError> {
        self.platform.write_local(frame, off, data).map_err(access)
    }

    fn get(&self, frame: Frame, off: usize, buf: &mut [u8]) -> Result<(), DeviceError> {
        self.platform.read_local(frame, off, buf).map_err(access)
    }

    fn write_desc(
        &self,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> Result<(), DeviceError> {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        self.put(self.ring.frame, usize::from(i) * 16, &d)
    }

    /// The device stopped using chains: reset it (which stops all its DMA), rebuild the
    /// queue in the same pinned memory and resubmit every chain that was in flight. Requests
    /// in flight never conflict with each other (the elevator's rule), so running them again,
    /// in any order, is safe.
    fn restart(&mut self) -> Result<(), DeviceError> {
        self.resets += 1;
        tracing::warn!(
            resets = self.resets,
            "virtio-blk stalled; resetting the device"
        );
        let pending: Vec<DevRequest> = std::mem::take(&mut self.inflight)
            .into_values()
            .map(|(r, _)| r)
            .collect();
        self.set_status(0).map_err(access)?;
        self.put(self.ring.frame, 0, &[0u8; 4096])?;
        self.put(self.hdr.frame, 0, &[0u8; PIN_RECORD])?;
        self.avail_idx = 0;
        self.used_seen = 0;
        self.stalled_kicks = 0;
        self.irq_bits = 0;
        self.init(self.notify_base, self.notify_multiplier)
            .map_err(access)?;
        // In-flight chains go first; those held keep waiting behind them, in order.
        let held = std::mem::take(&mut self.held);
        for r in pending.into_iter().chain(held) {
            self.submit(r)?;
        }
        Ok(())
    }

    /// Put held requests on the ring while they fit; one the device path refuses
    /// completes as failed.
    fn release_held(&mut self, out: &mut Vec<Completion>) -> Result<(), DeviceError> {
        while self
            .held
            .front()
            .is_some_and(|r| r.segs.len() + 2 <= self.free.len())
        {
            let Some(r) = self.held.pop_front() else {
                break;
            };
            let token = r.token;
            match self.publish(r) {
                Ok(()) => {}
                Err(DeviceError::NeedsReset) => return Err(DeviceError::NeedsReset),
                Err(e) => {
                    tracing::warn!(error = %e, "held request refused");
                    out.push(Completion { token, ok: false });
                }
            }
        }
        Ok(())
    }

    /// Put `req` on the ring (its descriptors are free) and ring the doorbell.
    fn publish(&mut self, req: DevRequest) -> Result<(), DeviceError> {
        let need = req.segs.len() + 2;
        if self.free.len() < need {
            return Err(DeviceError::Busy);
        }
        let kind = match req.op {
            DevOp::Read => VIRTIO_BLK_T_IN,
            DevOp::Write => VIRTIO_BLK_T_OUT,
            DevOp::Flush => VIRTIO_BLK_T_FLUSH,
            DevOp::Discard => VIRTIO_BLK_T_DISCARD,
        };
        let mut h = [0u8; HDR_SLOT];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&req.sector.to_le_bytes());
        let mut hdr_len = 16u32;
        if req.op == DevOp::Discard {
            let n = u32::try_from(req.nr_sectors)
                .map_err(|_| DeviceError::Malformed("discard too long"))?;
            h[16..24].copy_from_slice(&req.sector.to_le_bytes());
            h[24..28].copy_from_slice(&n.to_le_bytes());
            hdr_len = 32;
        }
        // Taken only once nothing can fail before the chain is on the ring.
        let descs: Vec<u16> = (0..need).filter_map(|_| self.free.pop()).collect();
        let head = descs[0];
        let slot = usize::from(head);
        let result = (|| {
            self.put(self.hdr.frame, slot * HDR_SLOT, &h)?;
            self.put(self.hdr.frame, STATUS_BASE + slot, &[0xff])?;
            self.write_desc(
                descs[0],
                self.hdr.iova + (slot * HDR_SLOT) as u64,
                hdr_len,
                F_NEXT,
                descs[1],
            )?;
            let data_flags = if req.op == DevOp::Read { F_WRITE } else { 0 };
            for (k, s) in req.segs.iter().enumerate() {
                self.write_desc(
                    descs[k + 1],
                    s.iova,
                    s.len,
                    data_flags | F_NEXT,
                    descs[k + 2],
                )?;
            }
            let last = descs[need - 1];
            self.write_desc(
                last,
                self.hdr.iova + (STATUS_BASE + slot) as u64,
                1,
                F_WRITE,
                0,
            )?;
            let at = AVAIL + 4 + 2 * usize::from(self.avail_idx % self.qsize);
            self.put(self.ring.frame, at, &head.to_le_bytes())?;
            // Release: the descriptors and the ring entry are visible to the device before
            // the new available index (virtio's "driver writes idx after the ring").
            fence(Ordering::Release);
            let idx = self.avail_idx.wrapping_add(1);
            self.put(self.ring.frame, AVAIL + 2, &idx.to_le_bytes())?;
            self.avail_idx = idx;
            // Full fence: the index is visible before the doorbell write reaches the device.
            fence(Ordering::SeqCst);
            self.io
                .mmio_write(self.notify, &0u16.to_le_bytes())
                .map_err(access)
        })();
        if let Err(e) = result {
            // A failed publish leaves the device in an unknown state.
            self.broken = true;
            return Err(e);
        }
        if self.inflight.is_empty() {
            self.last_used = std::time::Instant::now();
        }
        self.inflight.insert(head, (req, descs));
        Ok(())
    }

    /// Take the chains the device used (completions into `out`), freeing their descriptors.
    fn reap(&mut self, out: &mut Vec<Completion>) -> Result<(), DeviceError> {
        let mut b = [0u8; 2];
        self.get(self.ring.frame, USED + 2, &mut b)?;
        // Acquire: the used elements the device wrote before its index are read after it.
        fence(Ordering::Acquire);
        let idx = u16::from_le_bytes(b);
        // The device cannot have used more chains than we have in flight.
        if usize::from(idx.wrapping_sub(self.used_seen)) > self.inflight.len() {
            self.broken = true;
            return Err(DeviceError::NeedsReset);
        }
        while self.used_seen != idx {
            let at = USED + 4 + 8 * usize::from(self.used_seen % self.qsize);
            let mut e = [0u8; 8];
            self.get(self.ring.frame, at, &mut e)?;
            self.used_seen = self.used_seen.wrapping_add(1);
            let id = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
            let Some((req, descs)) = u16::try_from(id)
                .ok()
                .and_then(|h| self.inflight.remove(&h))
            else {
                self.broken = true;
                return Err(DeviceError::NeedsReset);
            };
            let mut st = [0xffu8];
            self.get(self.hdr.frame, STATUS_BASE + usize::from(descs[0]), &mut st)?;
            self.free.extend(descs);
            self.last_used = std::time::Instant::now();
            self.stalled_kicks = 0;
            out.push(Completion {
                token: req.token,
                ok: st[0] == 0,
            });
        }
        Ok(())
    }

    fn check_config_irq(&mut self) -> Result<(), DeviceError> {
        if self.irq_bits & (1 << CONFIG_VECTOR) != 0 {
            self.irq_bits &= !(1 << CONFIG_VECTOR);
            let s = self.status().map_err(access)?;
            if u32::from(s) & VIRTIO_CONFIG_S_NEEDS_RESET != 0 {
                self.broken = true;
            }
        }
        if self.broken {
            return Err(DeviceError::NeedsReset);
        }
        Ok(())
    }
}

// Flag values fit 16 bits.
#[allow(clippy::cast_possible_truncation)]
const F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
#[allow(clippy::cast_possible_truncation)]
const F_WRITE: u16 = VRING_DESC_F_WRITE as u16;

impl<P: Platform, I: IoAccess> BlockDevice for VirtioBlkDriver<P, I> {
    fn capacity(&self) -> u64 {
        self.capacity
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn max_segments(&self) -> usize {
        self.seg_max
    }
    fn queue_depth(&self) -> usize {
        usize::from(self.qsize / 4).max(1)
    }
    fn in_flight(&self) -> usize {
        self.inflight.len() + self.held.len()
    }

    fn submit(&mut self, req: DevRequest) -> Result<(), DeviceError> {
        self.check_config_irq()?;
        check_request(&req, self.capacity)?;
        if req.segs.len() > self.seg_max {
            return Err(DeviceError::Malformed(
                "more segments than the device takes",
            ));
        }
        // Behind the held ones (order is kept), or when the free list is short: hold it.
        if !self.held.is_empty() || self.free.len() < req.segs.len() + 2 {
            self.held.push_back(req);
            return Ok(());
        }
        self.publish(req)
    }

    fn poll(&mut self, out: &mut Vec<Completion>) -> Result<(), DeviceError> {
        self.reap(out)?;
        self.release_held(out)?;
        self.check_config_irq()
    }
    fn wait(&mut self, timeout: Duration) -> Result<(), DeviceError> {
        // Chains outstanding and nothing used for a while: ring the doorbell again. A
        // notification is idempotent (the device pops only what it has not seen), and this
        // recovers from one lost while the device was being reset under us.
        if !self.inflight.is_empty() && self.last_used.elapsed() > KICK_AFTER {
            self.last_used = std::time::Instant::now();
            self.kicks += 1;
            self.stalled_kicks += 1;
            if self.stalled_kicks > RESET_AFTER_KICKS {
                return self.restart();
            }
            self.io
                .mmio_write(self.notify, &0u16.to_le_bytes())
                .map_err(access)?;
        }
        if self.irq_bits & (1 << QUEUE_VECTOR) != 0 {
            self.irq_bits &= !(1 << QUEUE_VECTOR);
            return Ok(());
        }
        self.irq_bits |= self.io.wait_irq(timeout).map_err(access)?;
        self.irq_bits &= !(1 << QUEUE_VECTOR);
        Ok(())
    }
}

impl<P: Platform, I: IoAccess> Drop for VirtioBlkDriver<P, I> {
    fn drop(&mut self) {
        // Reset first: once the device has stopped, no DMA can reach the pinned pages.
        let _ = self.set_status(0);
        let p = &*self.platform;
        for pin in [&self.ring, &self.hdr] {
            let _ = p.unpin_grant(pin.iova);
            let _ = p.end_access(pin.gref);
        }
        let _ = p.write_local(self.hdr.frame, PIN_RECORD, &[0u8; 32]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iospace::link::LocalIo;
    use hypervisor::domain::DomainConfig;
    use hypervisor::local::LocalPlatform;
    use hypervisor::system::System;
    use iospace::emu::{PciBus, StubDevice};
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
        let r = VirtioBlkDriver::probe(p, LocalIo::new(space), DriverFrames { ring: 8, hdr: 9 });
        assert!(matches!(r, Err(VirtioError::MissingCapability(_))));
        assert!(iommu.is_empty());
    }
}
