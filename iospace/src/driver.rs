//! The driver side of a virtio 1.x modern PCI device, programmed only through an
//! [`IoAccess`] handle: the transport ([`Transport`]: capability walk, MSI-X, reset,
//! feature negotiation, queue setup, notification) and a split virtqueue in one page of the
//! driver's memory ([`SplitQueue`]).
//!
//! Every IDD with a virtio device needs the same steps (virtio 1.2 §3.1.1 and §4.1.5), so they
//! live here once; the device-specific drivers (idd-net's virtio-net) add their requests.
//!
//! # Bring-up
//!
//! 1. [`Transport::open`]: find the common, notify and device-config structures through the
//!    vendor capabilities the I/O Space parsed (`cfg_type` 1, 2, 4), enable MSI-X through the
//!    virtualised config view and unmask the vectors the driver uses.
//! 2. [`Transport::negotiate`]: reset (the device stops all DMA before the reset write
//!    returns), `ACKNOWLEDGE`, `DRIVER`, read the 64 offered feature bits, refuse a device
//!    lacking a required one, write the accepted set, `FEATURES_OK`, check it stuck.
//! 3. [`Transport::setup_queue`] per queue: the size is the largest power of two within both
//!    the driver's wish and the device's maximum (`queue_size` reads back the maximum after a
//!    reset; 0 = no such queue); the MSI-X vector must read back as written (else the device
//!    refused it); addresses; `queue_notify_off`; enable.
//! 4. [`Transport::driver_ok`].
//!
//! # Split queue layout (in one 4 KiB page at `iova`)
//!
//! | offset | what |
//! |---|---|
//! | 0 | descriptor table: `size` × `{addr: le64, len: le32, flags: le16, next: le16}` |
//! | `16·size` | available ring: `flags: le16, idx: le16, ring[size]: le16, used_event: le16` |
//! | `align4(16·size + 6 + 2·size)` | used ring: `flags: le16, idx: le16, ring[size]: {id: le32, len: le32}, avail_event: le16` |
//!
//! The driver is the only writer of the descriptors and the available ring and keeps its
//! own copy of every index; the device's used index and elements are read once, checked
//! (no more chains used than in flight, every id the head of a chain in flight) and a
//! violation is reported as [`DriverError::DeviceBroken`], never trusted.

use crate::emu::virtio_pci::common;
use crate::link::{IoAccess, IoError};
use crate::pci::caps::{self, virtio as vcap, Capability};
use std::collections::BTreeMap;
use std::sync::atomic::{fence, Ordering};
use std::time::Duration;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY};

/// "No vector" value of the MSI-X vector registers.
pub const NO_VECTOR: u16 = 0xffff;
/// Most entries a [`SplitQueue`] may have (its rings must fit one page).
pub const MAX_QUEUE_SIZE: u16 = 128;
/// Bytes of one descriptor.
const DESC_LEN: usize = 16;
// Flag values fit 16 bits.
#[allow(clippy::cast_possible_truncation)]
const F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
#[allow(clippy::cast_possible_truncation)]
const F_WRITE: u16 = VRING_DESC_F_WRITE as u16;
#[allow(clippy::cast_possible_truncation)]
const USED_F_NO_NOTIFY: u16 = VRING_USED_F_NO_NOTIFY as u16;

/// Why a driver-side operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// A capability the driver needs is missing.
    #[error("Device lacks the {0} capability")]
    MissingCapability(&'static str),
    /// The device does not offer a feature the driver requires.
    #[error("Device does not offer feature bit {0}")]
    MissingFeature(u32),
    /// The device refused a status bit (`FEATURES_OK`, `DRIVER_OK`).
    #[error("Device refused status {0:#x}")]
    StatusRefused(u8),
    /// The device has no such queue (its size reads 0).
    #[error("Device has no queue {0}")]
    NoQueue(u16),
    /// The device did not accept an MSI-X vector.
    #[error("Device refused MSI-X vector {0}")]
    VectorRefused(u16),
    /// A queue size the ring layout cannot hold.
    #[error("Queue size {0} is not a power of two within 1..=128")]
    QueueSize(u16),
    /// No free descriptors for the chain.
    #[error("Queue full")]
    Full,
    /// The device violated the queue protocol.
    #[error("Device broke the queue protocol: {0}")]
    DeviceBroken(&'static str),
    /// Reading or writing the queue's page failed.
    #[error("Queue memory access failed: {0}")]
    Memory(String),
    /// An I/O Space access failed.
    #[error("I/O Space access failed")]
    Io(#[from] IoError),
}

/// The virtio-pci transport of one device, through its I/O Space.
pub struct Transport<I: IoAccess> {
    io: I,
    common: u64,
    notify_base: u64,
    notify_multiplier: u32,
    device_cfg: u64,
}

/// A status bit from the bindings' u32 constant (all fit a byte).
fn bit(b: u32) -> u8 {
    u8::try_from(b).unwrap_or(0)
}

impl<I: IoAccess> Transport<I> {
    /// Locate the virtio structures and enable MSI-X with vectors `0..vectors` unmasked.
    pub fn open(io: I, vectors: u16) -> Result<Self, DriverError> {
        let info = io.info();
        let find = |t: u8, name| {
            info.capabilities
                .iter()
                .find_map(|c| match c {
                    Capability::Vendor {
                        virtio: Some(v), ..
                    } if v.cfg_type == t => Some(*v),
                    _ => None,
                })
                .and_then(|c| {
                    info.bar(usize::from(c.bar))
                        .map(|b| (c, b.address.saturating_add(u64::from(c.offset))))
                })
                .ok_or(DriverError::MissingCapability(name))
        };
        let (_, common) = find(vcap::COMMON_CFG, "common config")?;
        let (ncap, notify_base) = find(vcap::NOTIFY_CFG, "notify")?;
        let (_, device_cfg) = find(vcap::DEVICE_CFG, "device config")?;
        let msix = *info.msix().ok_or(DriverError::MissingCapability("MSI-X"))?;
        let table = info
            .bar(usize::from(msix.table_bar))
            .map(|b| b.address.saturating_add(u64::from(msix.table_offset)))
            .ok_or(DriverError::MissingCapability("MSI-X table"))?;
        // The parser reports `table_size` as the number of vectors.
        if msix.table_size < vectors {
            return Err(DriverError::MissingCapability("enough MSI-X vectors"));
        }
        let ctl = u16::from(msix.offset) + u16::from(caps::MSIX_CONTROL);
        io.config_write(ctl, &caps::MSIX_CTL_ENABLE.to_le_bytes())?;
        for v in 0..vectors {
            // Vector control (offset 12 of the entry): bit 0 masks; clear it.
            let entry = table + u64::from(v) * caps::MSIX_ENTRY_SIZE;
            io.mmio_write(entry + 12, &0u32.to_le_bytes())?;
        }
        Ok(Self {
            io,
            common,
            notify_base,
            notify_multiplier: ncap.notify_off_multiplier,
            device_cfg,
        })
    }

    /// The I/O Space handle.
    pub fn io(&self) -> &I {
        &self.io
    }

    fn w(&self, off: u64, data: &[u8]) -> Result<(), DriverError> {
        Ok(self.io.mmio_write(self.common + off, data)?)
    }

    fn r(&self, off: u64, buf: &mut [u8]) -> Result<(), DriverError> {
        Ok(self.io.mmio_read(self.common + off, buf)?)
    }

    /// The device status register.
    pub fn status(&self) -> Result<u8, DriverError> {
        let mut b = [0u8];
        self.r(common::DEVICE_STATUS, &mut b)?;
        Ok(b[0])
    }

    /// Whether the device set `DEVICE_NEEDS_RESET`.
    pub fn needs_reset(&self) -> Result<bool, DriverError> {
        Ok(self.status()? & bit(VIRTIO_CONFIG_S_NEEDS_RESET) != 0)
    }

    /// Reset the device: when this returns, it does no more DMA into the old queues.
    pub fn reset(&self) -> Result<(), DriverError> {
        self.w(common::DEVICE_STATUS, &[0])
    }

    /// Reset and negotiate: accept `offered & wanted`, which must include `required`; the
    /// config-change interrupt goes to `config_vector`. Returns the accepted features.
    pub fn negotiate(
        &self,
        required: &[u32],
        wanted: u64,
        config_vector: u16,
    ) -> Result<u64, DriverError> {
        self.reset()?;
        let mut s = bit(VIRTIO_CONFIG_S_ACKNOWLEDGE);
        self.w(common::DEVICE_STATUS, &[s])?;
        s |= bit(VIRTIO_CONFIG_S_DRIVER);
        self.w(common::DEVICE_STATUS, &[s])?;
        let mut offered = 0u64;
        for sel in 0..2u32 {
            self.w(common::DEVICE_FEATURE_SELECT, &sel.to_le_bytes())?;
            let mut b = [0u8; 4];
            self.r(common::DEVICE_FEATURE, &mut b)?;
            offered |= u64::from(u32::from_le_bytes(b)) << (32 * sel);
        }
        if let Some(missing) = required.iter().find(|b| offered & (1u64 << *b) == 0) {
            return Err(DriverError::MissingFeature(*missing));
        }
        let features = offered & (wanted | required.iter().fold(0, |a, b| a | 1u64 << b));
        for sel in 0..2u32 {
            self.w(common::DRIVER_FEATURE_SELECT, &sel.to_le_bytes())?;
            let half = u32::try_from(features >> (32 * sel) & 0xffff_ffff).unwrap_or(0);
            self.w(common::DRIVER_FEATURE, &half.to_le_bytes())?;
        }
        s |= bit(VIRTIO_CONFIG_S_FEATURES_OK);
        self.w(common::DEVICE_STATUS, &[s])?;
        let got = self.status()?;
        if got & bit(VIRTIO_CONFIG_S_FEATURES_OK) == 0 {
            return Err(DriverError::StatusRefused(got));
        }
        self.w(common::CONFIG_MSIX_VECTOR, &config_vector.to_le_bytes())?;
        let mut v = [0u8; 2];
        self.r(common::CONFIG_MSIX_VECTOR, &mut v)?;
        if u16::from_le_bytes(v) != config_vector {
            return Err(DriverError::VectorRefused(config_vector));
        }
        Ok(features)
    }

    /// The size queue `index` will get for a driver wanting `want` entries.
    pub fn queue_size(&self, index: u16, want: u16) -> Result<u16, DriverError> {
        self.w(common::QUEUE_SELECT, &index.to_le_bytes())?;
        let mut b = [0u8; 2];
        self.r(common::QUEUE_SIZE, &mut b)?;
        let max = match u16::from_le_bytes(b) {
            0 => return Err(DriverError::NoQueue(index)),
            m => m,
        };
        let mut q = want.clamp(1, MAX_QUEUE_SIZE).next_power_of_two();
        while q > max || q > want {
            q /= 2;
        }
        if q == 0 {
            return Err(DriverError::NoQueue(index));
        }
        Ok(q)
    }

    /// Program queue `index` with `queue`'s ring addresses and `vector`, and enable it.
    pub fn setup_queue(
        &self,
        index: u16,
        queue: &mut SplitQueue,
        vector: u16,
    ) -> Result<(), DriverError> {
        self.w(common::QUEUE_SELECT, &index.to_le_bytes())?;
        self.w(common::QUEUE_SIZE, &queue.size.to_le_bytes())?;
        self.w(common::QUEUE_MSIX_VECTOR, &vector.to_le_bytes())?;
        let mut b = [0u8; 2];
        self.r(common::QUEUE_MSIX_VECTOR, &mut b)?;
        if u16::from_le_bytes(b) != vector {
            return Err(DriverError::VectorRefused(vector));
        }
        let (desc, avail, used) = queue.addresses();
        self.w(common::QUEUE_DESC, &desc.to_le_bytes())?;
        self.w(common::QUEUE_DRIVER, &avail.to_le_bytes())?;
        self.w(common::QUEUE_DEVICE, &used.to_le_bytes())?;
        self.r(common::QUEUE_NOTIFY_OFF, &mut b)?;
        let off = u64::from(u16::from_le_bytes(b)) * u64::from(self.notify_multiplier);
        queue.notify_addr = self.notify_base.saturating_add(off);
        queue.index = index;
        self.w(common::QUEUE_ENABLE, &1u16.to_le_bytes())
    }

    /// Set `DRIVER_OK` (after `negotiate` and the queues) and check it took.
    pub fn driver_ok(&self) -> Result<(), DriverError> {
        let s = self.status()? | bit(VIRTIO_CONFIG_S_DRIVER_OK);
        self.w(common::DEVICE_STATUS, &[s])?;
        let got = self.status()?;
        if got & bit(VIRTIO_CONFIG_S_DRIVER_OK) == 0 || got & bit(VIRTIO_CONFIG_S_NEEDS_RESET) != 0
        {
            return Err(DriverError::StatusRefused(got));
        }
        Ok(())
    }

    /// Ring `queue`'s doorbell.
    pub fn notify(&self, queue: &SplitQueue) -> Result<(), DriverError> {
        // Full fence: the available index is visible before the doorbell reaches the device.
        fence(Ordering::SeqCst);
        Ok(self
            .io
            .mmio_write(queue.notify_addr, &queue.index.to_le_bytes())?)
    }

    /// Read `buf.len()` (1..=8) bytes of device configuration at `offset`.
    pub fn read_config(&self, offset: u64, buf: &mut [u8]) -> Result<(), DriverError> {
        Ok(self.io.mmio_read(self.device_cfg + offset, buf)?)
    }

    /// Wait up to `timeout` for MSI-X vectors (bit `v` = vector `v` fired).
    pub fn wait_irq(&self, timeout: Duration) -> Result<u32, DriverError> {
        Ok(self.io.wait_irq(timeout)?)
    }
}

/// The page a [`SplitQueue`] lives in, as the driver reaches it (its own memory).
pub trait QueueMemory {
    /// Read `buf.len()` bytes at `offset` of the page.
    fn read(&self, offset: usize, buf: &mut [u8]) -> Result<(), DriverError>;
    /// Write `data` at `offset` of the page.
    fn write(&self, offset: usize, data: &[u8]) -> Result<(), DriverError>;
}

/// One buffer of a chain: `len` bytes at device address `addr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buf {
    /// Device address (IOVA).
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// The device writes it (receive buffers), else it reads it.
    pub device_writes: bool,
}

/// A split virtqueue in one page (see the module docs for the layout).
pub struct SplitQueue {
    size: u16,
    iova: u64,
    free: Vec<u16>,
    avail_idx: u16,
    used_seen: u16,
    /// Head → descriptors of the chain.
    inflight: BTreeMap<u16, Vec<u16>>,
    notify_addr: u64,
    index: u16,
}

impl SplitQueue {
    /// A queue of `size` entries in the page at device address `iova`.
    pub fn new(size: u16, iova: u64) -> Result<Self, DriverError> {
        if size == 0 || size > MAX_QUEUE_SIZE || !size.is_power_of_two() {
            return Err(DriverError::QueueSize(size));
        }
        Ok(Self {
            size,
            iova,
            free: (0..size).rev().collect(),
            avail_idx: 0,
            used_seen: 0,
            inflight: BTreeMap::new(),
            notify_addr: 0,
            index: 0,
        })
    }

    /// Entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    fn avail_off(&self) -> usize {
        DESC_LEN * usize::from(self.size)
    }

    fn used_off(&self) -> usize {
        (self.avail_off() + 6 + 2 * usize::from(self.size) + 3) & !3
    }

    /// Device addresses of the descriptor table, available ring and used ring.
    pub fn addresses(&self) -> (u64, u64, u64) {
        (
            self.iova,
            self.iova + self.avail_off() as u64,
            self.iova + self.used_off() as u64,
        )
    }

    /// Descriptors not in use.
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    /// Chains given to the device and not yet used.
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// Forget every chain and zero the rings (after a device reset).
    pub fn clear(&mut self, mem: &impl QueueMemory) -> Result<(), DriverError> {
        mem.write(
            0,
            &vec![0u8; self.used_off() + 6 + 8 * usize::from(self.size)],
        )?;
        self.free = (0..self.size).rev().collect();
        self.avail_idx = 0;
        self.used_seen = 0;
        self.inflight.clear();
        Ok(())
    }

    /// Make `bufs` one chain available to the device; its head. The doorbell is the
    /// caller's ([`Transport::notify`]), so several chains can share one.
    pub fn push(&mut self, mem: &impl QueueMemory, bufs: &[Buf]) -> Result<u16, DriverError> {
        if bufs.is_empty() || self.free.len() < bufs.len() {
            return Err(DriverError::Full);
        }
        let descs: Vec<u16> = self.free.split_off(self.free.len() - bufs.len());
        let result = (|| {
            for (k, b) in bufs.iter().enumerate() {
                let mut flags = if b.device_writes { F_WRITE } else { 0 };
                let next = descs.get(k + 1).copied();
                if next.is_some() {
                    flags |= F_NEXT;
                }
                let mut d = [0u8; DESC_LEN];
                d[..8].copy_from_slice(&b.addr.to_le_bytes());
                d[8..12].copy_from_slice(&b.len.to_le_bytes());
                d[12..14].copy_from_slice(&flags.to_le_bytes());
                d[14..].copy_from_slice(&next.unwrap_or(0).to_le_bytes());
                mem.write(usize::from(descs[k]) * DESC_LEN, &d)?;
            }
            let slot = self.avail_off() + 4 + 2 * usize::from(self.avail_idx % self.size);
            mem.write(slot, &descs[0].to_le_bytes())?;
            // Release: descriptors and ring entry are visible before the new index.
            fence(Ordering::Release);
            let idx = self.avail_idx.wrapping_add(1);
            mem.write(self.avail_off() + 2, &idx.to_le_bytes())
        })();
        if let Err(e) = result {
            self.free.extend(descs);
            return Err(e);
        }
        self.avail_idx = self.avail_idx.wrapping_add(1);
        let head = descs[0];
        self.inflight.insert(head, descs);
        Ok(head)
    }

    /// Whether the device wants a doorbell for chains just pushed: false while it has
    /// `VRING_USED_F_NO_NOTIFY` set in the used ring (it is draining the ring anyway and
    /// re-checks it after clearing the flag).
    pub fn needs_notify(&self, mem: &impl QueueMemory) -> Result<bool, DriverError> {
        // Full fence: the new available index is visible before we read the device's flag
        // (the device does the mirror image: clear the flag, fence, read the index).
        fence(Ordering::SeqCst);
        let mut f = [0u8; 2];
        mem.read(self.used_off(), &mut f)?;
        Ok(u16::from_le_bytes(f) & USED_F_NO_NOTIFY == 0)
    }

    /// The next chain the device used: `(head, bytes written)`; its descriptors are free again.
    pub fn pop_used(&mut self, mem: &impl QueueMemory) -> Result<Option<(u16, u32)>, DriverError> {
        let mut b = [0u8; 2];
        mem.read(self.used_off() + 2, &mut b)?;
        // Acquire: the elements the device wrote before its index are read after it.
        fence(Ordering::Acquire);
        let idx = u16::from_le_bytes(b);
        let pending = idx.wrapping_sub(self.used_seen);
        if pending == 0 {
            return Ok(None);
        }
        if usize::from(pending) > self.inflight.len() {
            return Err(DriverError::DeviceBroken("used more chains than in flight"));
        }
        let at = self.used_off() + 4 + 8 * usize::from(self.used_seen % self.size);
        let mut e = [0u8; 8];
        mem.read(at, &mut e)?;
        let id = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
        let len = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
        let descs = u16::try_from(id)
            .ok()
            .and_then(|h| self.inflight.remove(&h))
            .ok_or(DriverError::DeviceBroken("used id is no chain in flight"))?;
        self.used_seen = self.used_seen.wrapping_add(1);
        let head = descs[0];
        self.free.extend(descs);
        Ok(Some((head, len)))
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // offsets within one page
mod tests {
    use super::*;
    use std::cell::RefCell;

    struct Mem(RefCell<Vec<u8>>);
    impl QueueMemory for Mem {
        fn read(&self, offset: usize, buf: &mut [u8]) -> Result<(), DriverError> {
            let m = self.0.borrow();
            let src = m
                .get(offset..offset + buf.len())
                .ok_or_else(|| DriverError::Memory("out of page".into()))?;
            buf.copy_from_slice(src);
            Ok(())
        }
        fn write(&self, offset: usize, data: &[u8]) -> Result<(), DriverError> {
            let mut m = self.0.borrow_mut();
            m.get_mut(offset..offset + data.len())
                .ok_or_else(|| DriverError::Memory("out of page".into()))?
                .copy_from_slice(data);
            Ok(())
        }
    }

    fn mem() -> Mem {
        Mem(RefCell::new(vec![0; 4096]))
    }

    fn u16_at(m: &Mem, o: usize) -> u16 {
        let mut b = [0u8; 2];
        m.read(o, &mut b).unwrap();
        u16::from_le_bytes(b)
    }

    /// Play the device: use the next available chain with `len`.
    fn device_uses(m: &Mem, q: &SplitQueue, n: u16, len: u32) {
        let (_, avail, used) = q.addresses();
        let (avail, used) = ((avail - q.iova) as usize, (used - q.iova) as usize);
        let head = u16_at(m, avail + 4 + 2 * usize::from(n % q.size));
        let mut e = [0u8; 8];
        e[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        e[4..].copy_from_slice(&len.to_le_bytes());
        m.write(used + 4 + 8 * usize::from(n % q.size), &e).unwrap();
        m.write(used + 2, &n.wrapping_add(1).to_le_bytes()).unwrap();
    }

    #[test]
    fn layout_fits_a_page_and_is_aligned() {
        for size in [1u16, 2, 64, 128] {
            let q = SplitQueue::new(size, 0x1000).unwrap();
            let (d, a, u) = q.addresses();
            assert_eq!(d % 16, 0);
            assert_eq!(a % 2, 0);
            assert_eq!(u % 4, 0);
            assert!(u - 0x1000 + 6 + 8 * u64::from(size) <= 4096);
        }
        for bad in [0u16, 3, 256] {
            assert!(matches!(
                SplitQueue::new(bad, 0),
                Err(DriverError::QueueSize(_))
            ));
        }
    }

    #[test]
    fn chains_round_trip_and_free_their_descriptors() {
        let m = mem();
        let mut q = SplitQueue::new(4, 0x1000).unwrap();
        let b = |addr, w| Buf {
            addr,
            len: 100,
            device_writes: w,
        };
        let h1 = q.push(&m, &[b(0x10, false), b(0x20, true)]).unwrap();
        let h2 = q.push(&m, &[b(0x30, false), b(0x40, false)]).unwrap();
        assert!(matches!(
            q.push(&m, &[b(0x50, false)]),
            Err(DriverError::Full)
        ));
        assert_eq!(u16_at(&m, 64 + 2), 2, "available index");
        // The first chain's descriptors: NEXT on the first, WRITE on the second.
        let d = usize::from(h1) * 16;
        assert_eq!(u16_at(&m, d + 12), F_NEXT);
        let second = usize::from(u16_at(&m, d + 14)) * 16;
        assert_eq!(u16_at(&m, second + 12), F_WRITE);
        assert_eq!(q.pop_used(&m).unwrap(), None);
        device_uses(&m, &q, 0, 7);
        device_uses(&m, &q, 1, 9);
        assert_eq!(q.pop_used(&m).unwrap(), Some((h1, 7)));
        assert_eq!(q.pop_used(&m).unwrap(), Some((h2, 9)));
        assert_eq!((q.free_descriptors(), q.in_flight()), (4, 0));
        q.clear(&m).unwrap();
        assert_eq!(u16_at(&m, 64 + 2), 0);
        // The device's "do not notify" flag in the used ring.
        assert!(q.needs_notify(&m).unwrap());
        let used = (q.addresses().2 - q.iova) as usize;
        m.write(used, &USED_F_NO_NOTIFY.to_le_bytes()).unwrap();
        assert!(!q.needs_notify(&m).unwrap());
    }

    #[test]
    fn a_lying_device_is_caught() {
        let m = mem();
        let mut q = SplitQueue::new(4, 0).unwrap();
        let used = (q.addresses().2) as usize;
        // An index with nothing in flight.
        m.write(used + 2, &1u16.to_le_bytes()).unwrap();
        assert!(matches!(q.pop_used(&m), Err(DriverError::DeviceBroken(_))));
        // An id that is no chain's head.
        let mut q = SplitQueue::new(4, 0).unwrap();
        q.push(
            &m,
            &[Buf {
                addr: 0,
                len: 1,
                device_writes: false,
            }],
        )
        .unwrap();
        m.write(used + 4, &77u32.to_le_bytes()).unwrap();
        assert!(matches!(q.pop_used(&m), Err(DriverError::DeviceBroken(_))));
    }

    /// A page both the IOMMU (device side) and the queue code (driver side) reach.
    struct Shared(std::sync::Mutex<Vec<u8>>);
    impl crate::iommu::DmaPage for Shared {
        fn read(&self, offset: usize, buf: &mut [u8]) {
            buf.copy_from_slice(&self.0.lock().unwrap()[offset..offset + buf.len()]);
        }
        fn write(&self, offset: usize, data: &[u8]) {
            self.0.lock().unwrap()[offset..offset + data.len()].copy_from_slice(data);
        }
    }
    impl QueueMemory for Shared {
        fn read(&self, offset: usize, buf: &mut [u8]) -> Result<(), DriverError> {
            crate::iommu::DmaPage::read(self, offset, buf);
            Ok(())
        }
        fn write(&self, offset: usize, data: &[u8]) -> Result<(), DriverError> {
            crate::iommu::DmaPage::write(self, offset, data);
            Ok(())
        }
    }

    #[test]
    fn the_transport_drives_virtio_blk_too() {
        use crate::emu::virtio_blk::{BlkConfig, VirtioBlk};
        use crate::emu::virtio_pci::VirtioPci;
        use crate::emu::PciBus;
        use crate::iommu::{Iommu, IommuEntry};
        use crate::link::LocalIo;
        use crate::space::IoSpace;
        use std::sync::{Arc, Mutex};
        use virtio_bindings::virtio_blk::VIRTIO_BLK_T_GET_ID;
        use virtio_bindings::virtio_config::{VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1};

        let dir = tempfile::tempdir().unwrap();
        let blk = VirtioBlk::new(&BlkConfig {
            path: dir.path().join("d.img"),
            size: 1 << 20,
            read_only: false,
            serial: "shared-transport".into(),
            workers: 1,
        })
        .unwrap();
        let iommu = Iommu::new(8);
        let dev = Arc::new(VirtioPci::new(Arc::new(blk), iommu.device(), 11).unwrap());
        let bus = PciBus::new();
        let bdf = bus.plug(2, dev.clone()).unwrap();
        let space = Arc::new(IoSpace::new(bdf, dev).unwrap());
        let pages: Vec<Arc<Shared>> = (0..2)
            .map(|_| Arc::new(Shared(Mutex::new(vec![0; 4096]))))
            .collect();
        let iovas: Vec<u64> = pages
            .iter()
            .enumerate()
            .map(|(i, p)| {
                iommu
                    .map(IommuEntry {
                        domain: 1,
                        frame: i as u64,
                        writable: true,
                        page: p.clone(),
                    })
                    .unwrap()
            })
            .collect();
        let t = Transport::open(LocalIo::new(space), 2).unwrap();
        t.negotiate(&[VIRTIO_F_VERSION_1, VIRTIO_F_ACCESS_PLATFORM], 0, 1)
            .unwrap();
        let mut q = SplitQueue::new(t.queue_size(0, 64).unwrap(), iovas[0]).unwrap();
        t.setup_queue(0, &mut q, 0).unwrap();
        t.driver_ok().unwrap();
        // GET_ID: header (readable), 20 id bytes and a status byte (writable), in page 1.
        let data = &*pages[1];
        QueueMemory::write(data, 0, &VIRTIO_BLK_T_GET_ID.to_le_bytes()).unwrap();
        let b = iovas[1];
        let head = q
            .push(
                &*pages[0],
                &[
                    Buf {
                        addr: b,
                        len: 16,
                        device_writes: false,
                    },
                    Buf {
                        addr: b + 64,
                        len: 20,
                        device_writes: true,
                    },
                    Buf {
                        addr: b + 128,
                        len: 1,
                        device_writes: true,
                    },
                ],
            )
            .unwrap();
        assert!(q.needs_notify(&*pages[0]).unwrap());
        t.notify(&q).unwrap();
        let end = std::time::Instant::now() + Duration::from_secs(10);
        let used = loop {
            if let Some(u) = q.pop_used(&*pages[0]).unwrap() {
                break u;
            }
            assert!(std::time::Instant::now() < end, "nothing used");
            let _ = t.wait_irq(Duration::from_millis(20)).unwrap();
        };
        assert_eq!(used, (head, 21));
        let mut id = [0u8; 16];
        QueueMemory::read(data, 64, &mut id).unwrap();
        assert_eq!(&id, b"shared-transport");
        let mut st = [0xffu8];
        QueueMemory::read(data, 128, &mut st).unwrap();
        assert_eq!(st[0], 0);
        t.reset().unwrap();
    }

    proptest::proptest! {
        #[test]
        fn hostile_used_rings_never_panic(
            ops in proptest::collection::vec((0u8..3, proptest::num::u16::ANY, proptest::num::u32::ANY), 0..64)
        ) {
            let m = mem();
            let mut q = SplitQueue::new(8, 0).unwrap();
            let used = (q.addresses().2) as usize;
            for (op, a, b) in ops {
                match op {
                    0 => { let _ = q.push(&m, &[Buf { addr: u64::from(b), len: b, device_writes: a & 1 == 1 }]); }
                    1 => {
                        m.write(used + 2, &a.to_le_bytes()).unwrap();
                        m.write(used + 4 + 8 * usize::from(a % 8), &b.to_le_bytes()).unwrap();
                    }
                    _ => { let _ = q.pop_used(&m); }
                }
                proptest::prop_assert_eq!(q.free_descriptors() + q.inflight.values().map(Vec::len).sum::<usize>(), 8);
            }
        }
    }
}
