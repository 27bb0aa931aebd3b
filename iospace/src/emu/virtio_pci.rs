//! Virtio 1.x modern PCI transport (virtio 1.2 §4.1), wrapping any [`VirtioDevice`].
//!
//! # Layout
//!
//! | where | what |
//! |---|---|
//! | BAR 1 (32-bit memory, 4 KiB) | MSI-X table at `0x000` (16 bytes per vector), PBA at `0x800` |
//! | BAR 4 (64-bit memory, 16 KiB) `0x0000` | common configuration ([`common`] offsets), 0x38 bytes |
//! | BAR 4 `0x1000` | ISR status: bit 0 queue interrupt, bit 1 config change; reading clears |
//! | BAR 4 `0x2000` | device-specific configuration (up to 0x100 bytes) |
//! | BAR 4 `0x3000` | notifications: queue `q` is notified by writing its index at `0x3000 + 4 * q` (`notify_off_multiplier` = 4, `queue_notify_off` = q) |
//!
//! Each region is announced by a vendor-specific capability (`cfg_type` 1..=4, see
//! [`crate::pci::caps::virtio`]), and MSI-X by its capability (one vector per queue plus one
//! for config changes). A fifth vendor capability (`cfg_type` 5, PCI configuration access)
//! is a window onto the device's own BARs: the driver writes `bar`, `offset` and `length`
//! (1, 2 or 4) into it, then a dword access to its `pci_cfg_data` field at capability + 16
//! performs that BAR access.
//!
//! # Device status
//!
//! `ACKNOWLEDGE → DRIVER → FEATURES_OK → DRIVER_OK`; writing 0 resets. `FEATURES_OK` is only
//! accepted when the driver's features are a subset of the device's and include
//! `VIRTIO_F_VERSION_1` and `VIRTIO_F_ACCESS_PLATFORM` (every ring and buffer address is an
//! IOVA translated by the IOMMU). On `DRIVER_OK` each enabled queue is checked (size a power
//! of two no larger than the maximum, aligned ring addresses); a bad queue, or any DMA fault
//! later, sets `DEVICE_NEEDS_RESET` and raises the config interrupt. The driver is
//! untrusted: every register access is bounds-checked and odd accesses read as zero or are
//! dropped.

use super::interrupts::Interrupts;
use super::mem::IommuMemory;
use super::{lock, ConfigSpace, EmuError, PciDevice};
use crate::iommu::IommuDevice;
use crate::pci::bar::{Bar, BarKind};
use crate::pci::caps::{self, virtio as vcap, CAP_ID_MSIX, CAP_ID_VENDOR, MSIX_CTL_ENABLE};
use crate::pci::Header;
use crate::space::Irq;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1,
};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

/// Common configuration register offsets (`struct virtio_pci_common_cfg`).
pub mod common {
    /// le32 RW: which 32 feature bits `DEVICE_FEATURE` shows.
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    /// le32 RO: device features.
    pub const DEVICE_FEATURE: u64 = 0x04;
    /// le32 RW: which 32 feature bits `DRIVER_FEATURE` sets.
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    /// le32 RW: driver features.
    pub const DRIVER_FEATURE: u64 = 0x0c;
    /// le16 RW: MSI-X vector for config changes.
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    /// le16 RO: number of queues.
    pub const NUM_QUEUES: u64 = 0x12;
    /// u8 RW: device status.
    pub const DEVICE_STATUS: u64 = 0x14;
    /// u8 RO: config generation.
    pub const CONFIG_GENERATION: u64 = 0x15;
    /// le16 RW: queue the `QUEUE_*` registers refer to.
    pub const QUEUE_SELECT: u64 = 0x16;
    /// le16 RW: queue size.
    pub const QUEUE_SIZE: u64 = 0x18;
    /// le16 RW: queue MSI-X vector.
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    /// le16 RW: queue enable.
    pub const QUEUE_ENABLE: u64 = 0x1c;
    /// le16 RO: queue notify offset (in multiples of the notify multiplier).
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    /// le64 RW: descriptor table IOVA.
    pub const QUEUE_DESC: u64 = 0x20;
    /// le64 RW: available (driver) ring IOVA.
    pub const QUEUE_DRIVER: u64 = 0x28;
    /// le64 RW: used (device) ring IOVA.
    pub const QUEUE_DEVICE: u64 = 0x30;
    /// Length of the structure.
    pub const LEN: u64 = 0x38;
}

/// BAR holding the MSI-X table and PBA.
pub const MSIX_BAR: usize = 1;
/// Size of the MSI-X BAR.
pub const MSIX_BAR_SIZE: u64 = 0x1000;
/// Offset of the PBA in the MSI-X BAR.
pub const MSIX_PBA_OFFSET: u64 = 0x800;
/// BAR holding the virtio structures.
pub const VIRTIO_BAR: usize = 4;
/// Size of the virtio BAR.
pub const VIRTIO_BAR_SIZE: u64 = 0x4000;
/// Common configuration offset in the virtio BAR.
pub const COMMON_OFFSET: u64 = 0x0000;
/// ISR offset.
pub const ISR_OFFSET: u64 = 0x1000;
/// Device configuration offset.
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
/// Device configuration length.
pub const DEVICE_CFG_LEN: u64 = 0x100;
/// Notification area offset.
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// Notification area length.
pub const NOTIFY_LEN: u64 = 0x1000;
/// Bytes between two queues' notify addresses.
pub const NOTIFY_MULTIPLIER: u32 = 4;
/// "No vector" value of the MSI-X vector registers.
pub const NO_VECTOR: u16 = 0xffff;
/// ISR bit: a queue interrupt.
pub const ISR_QUEUE: u8 = 1;
/// ISR bit: a configuration change.
pub const ISR_CONFIG: u8 = 2;
/// Most queues a device may have (so MSI-X fits in 2048 vectors and notify in its window).
pub const MAX_QUEUES: u16 = 64;

/// The device behind the transport.
pub trait VirtioDevice: Send + Sync {
    /// Virtio device ID (1 = network, 2 = block).
    fn device_type(&self) -> u16;
    /// PCI class, subclass and programming interface.
    fn class(&self) -> (u8, u8, u8);
    /// Feature bits offered.
    fn features(&self) -> u64;
    /// Number of queues.
    fn num_queues(&self) -> u16;
    /// Largest queue size.
    fn queue_max_size(&self) -> u16;
    /// Read device configuration at `offset` (already bounded to `DEVICE_CFG_LEN`).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Write device configuration.
    fn write_config(&self, offset: u64, data: &[u8]);
    /// Start with these (validated) queues, indexed by queue number; `None` = not enabled.
    fn activate(
        &self,
        features: u64,
        queues: Vec<Option<Queue>>,
        mem: IommuMemory,
        irq: Arc<Interrupts>,
    ) -> Result<(), EmuError>;
    /// The driver notified queue `queue`.
    fn queue_notify(&self, queue: u16);
    /// Stop and drop all queue state; in-flight requests must not complete into the old
    /// queues.
    fn reset(&self);
}

/// A status bit from the bindings' u32 constant.
pub(crate) fn flag(bit: u32) -> u8 {
    u8::try_from(bit).unwrap_or(0)
}

#[derive(Clone, Copy, Default)]
struct QueueRegs {
    size: u16,
    enable: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueRegs {
    /// A queue's registers after a reset: virtio 1.x (4.1.4.3) has `queue_size` read back as
    /// the maximum the device supports until the driver writes a smaller one.
    fn reset(max_size: u16) -> Self {
        Self {
            size: max_size,
            ..Self::default()
        }
    }
}

struct State {
    cfg: ConfigSpace,
    msix_cap: u8,
    pci_cfg: u8,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    queue_select: u16,
    queues: Vec<QueueRegs>,
    generation: u8,
}

/// A virtio device on the PCI transport.
pub struct VirtioPci<D: VirtioDevice> {
    device: Arc<D>,
    iommu: IommuDevice,
    state: Mutex<State>,
    irq: Arc<Interrupts>,
}

fn le_bytes_into(v: u64, data: &mut [u8]) {
    let b = v.to_le_bytes();
    let n = data.len().min(8);
    data[..n].copy_from_slice(&b[..n]);
}

fn le_value(data: &[u8]) -> u64 {
    data.iter()
        .rev()
        .take(8)
        .fold(0u64, |a, b| a << 8 | u64::from(*b))
}

fn set_half(reg: &mut u64, offset_in_reg: u64, data: &[u8]) {
    // 32-bit halves of a 64-bit register (drivers write low then high).
    match (offset_in_reg, data.len()) {
        (0, 8) => *reg = le_value(data),
        (0, 4) => *reg = (*reg & !0xffff_ffff) | le_value(data),
        (4, 4) => *reg = (*reg & 0xffff_ffff) | le_value(data) << 32,
        _ => {}
    }
}

impl<D: VirtioDevice> VirtioPci<D> {
    /// Wrap `device`; its DMA goes through `iommu`; INTx (when MSI-X is off) uses `line`.
    pub fn new(device: Arc<D>, iommu: IommuDevice, line: u8) -> Result<Self, EmuError> {
        let max_size = device.queue_max_size();
        let nq = device.num_queues();
        if nq == 0 || nq > MAX_QUEUES {
            return Err(EmuError::Config("queue count"));
        }
        let (class, subclass, prog_if) = device.class();
        let ids = Header {
            vendor_id: caps::VIRTIO_VENDOR_ID,
            device_id: 0x1040 + device.device_type(),
            command: 0,
            status: 0,
            revision: 1,
            prog_if,
            subclass,
            class,
            header_type: 0,
            subsystem_vendor_id: caps::VIRTIO_VENDOR_ID,
            subsystem_id: 0x40,
            cap_pointer: 0,
            interrupt_line: line,
            interrupt_pin: 1,
        };
        let bars = [
            Bar {
                index: MSIX_BAR,
                kind: BarKind::Mem32,
                prefetchable: false,
                address: 0,
                size: MSIX_BAR_SIZE,
            },
            Bar {
                index: VIRTIO_BAR,
                kind: BarKind::Mem64,
                prefetchable: false,
                address: 0,
                size: VIRTIO_BAR_SIZE,
            },
        ];
        let mut cfg = ConfigSpace::new(&ids, &bars);
        let region = |cfg_type: u8, offset: u64, length: u64, extra: Option<u32>| {
            let len = if extra.is_some() {
                vcap::NOTIFY_CAP_LEN
            } else {
                vcap::CAP_LEN
            };
            let mut b = vec![CAP_ID_VENDOR, 0, len, cfg_type, 4, 0, 0, 0];
            b[usize::from(vcap::BAR)] = u8::try_from(VIRTIO_BAR).unwrap_or(0);
            b.extend_from_slice(&u32::try_from(offset).unwrap_or(0).to_le_bytes());
            b.extend_from_slice(&u32::try_from(length).unwrap_or(0).to_le_bytes());
            if let Some(m) = extra {
                b.extend_from_slice(&m.to_le_bytes());
            }
            b
        };
        let none: &[u8] = &[];
        for body in [
            region(vcap::COMMON_CFG, COMMON_OFFSET, common::LEN, None),
            region(vcap::ISR_CFG, ISR_OFFSET, 4, None),
            region(vcap::DEVICE_CFG, DEVICE_CFG_OFFSET, DEVICE_CFG_LEN, None),
            region(
                vcap::NOTIFY_CFG,
                NOTIFY_OFFSET,
                NOTIFY_LEN,
                Some(NOTIFY_MULTIPLIER),
            ),
        ] {
            cfg.add_capability(&body, none)
                .ok_or(EmuError::Config("capabilities"))?;
        }
        // The PCI configuration access window: bar, offset and length are writable, and so is
        // the data dword that performs the access.
        let mut window_w = vec![0u8; usize::from(vcap::NOTIFY_CAP_LEN)];
        window_w[usize::from(vcap::BAR)] = 0xff;
        window_w[usize::from(vcap::OFFSET)..].fill(0xff);
        let pci_cfg = cfg
            .add_capability(&region(vcap::PCI_CFG, 0, 0, Some(0)), &window_w)
            .ok_or(EmuError::Config("capabilities"))?;
        let vectors = nq + 1;
        let mut msix = vec![CAP_ID_MSIX, 0];
        msix.extend_from_slice(&(vectors - 1).to_le_bytes());
        msix.extend_from_slice(&u32::try_from(MSIX_BAR).unwrap_or(0).to_le_bytes());
        let pba =
            u32::try_from(MSIX_PBA_OFFSET).unwrap_or(0) | u32::try_from(MSIX_BAR).unwrap_or(0);
        msix.extend_from_slice(&pba.to_le_bytes());
        // Only the enable and function-mask bits of the control word are writable.
        let msix_cap = cfg
            .add_capability(&msix, &[0, 0, 0, 0xc0])
            .ok_or(EmuError::Config("capabilities"))?;
        Ok(Self {
            irq: Arc::new(Interrupts::new(vectors, nq, line)),
            device,
            iommu,
            state: Mutex::new(State {
                cfg,
                msix_cap,
                pci_cfg,
                device_feature_select: 0,
                driver_feature_select: 0,
                driver_features: 0,
                queue_select: 0,
                queues: vec![QueueRegs::reset(max_size); usize::from(nq)],
                generation: 0,
            }),
        })
    }

    /// The wrapped device.
    pub fn device(&self) -> &Arc<D> {
        &self.device
    }

    /// The device status register (including `DEVICE_NEEDS_RESET`).
    pub fn device_status(&self) -> u8 {
        self.irq.status()
    }

    fn reset(&self, st: &mut State) {
        self.device.reset();
        st.device_feature_select = 0;
        st.driver_feature_select = 0;
        st.driver_features = 0;
        st.queue_select = 0;
        let max = self.device.queue_max_size();
        st.queues
            .iter_mut()
            .for_each(|q| *q = QueueRegs::reset(max));
        *lock(&self.irq.vectors) = (NO_VECTOR, vec![NO_VECTOR; st.queues.len()]);
        self.irq.isr.store(0, Ordering::SeqCst);
        self.irq.status.store(0, Ordering::SeqCst);
    }

    fn common_read(&self, st: &State, off: u64, data: &mut [u8]) {
        let q = st.queues.get(usize::from(st.queue_select));
        let v: u64 = match off {
            common::DEVICE_FEATURE_SELECT => st.device_feature_select.into(),
            common::DEVICE_FEATURE => match st.device_feature_select {
                0 => self.device.features() & 0xffff_ffff,
                1 => self.device.features() >> 32,
                _ => 0,
            },
            common::DRIVER_FEATURE_SELECT => st.driver_feature_select.into(),
            common::DRIVER_FEATURE => match st.driver_feature_select {
                0 => st.driver_features & 0xffff_ffff,
                1 => st.driver_features >> 32,
                _ => 0,
            },
            common::CONFIG_MSIX_VECTOR => lock(&self.irq.vectors).0.into(),
            common::NUM_QUEUES => st.queues.len() as u64,
            common::DEVICE_STATUS => self.irq.status().into(),
            common::CONFIG_GENERATION => st.generation.into(),
            common::QUEUE_SELECT => st.queue_select.into(),
            common::QUEUE_SIZE => q.map_or(0, |q| q.size.into()),
            common::QUEUE_MSIX_VECTOR => lock(&self.irq.vectors)
                .1
                .get(usize::from(st.queue_select))
                .map_or(NO_VECTOR, |v| *v)
                .into(),
            common::QUEUE_ENABLE => q.map_or(0, |q| q.enable.into()),
            common::QUEUE_NOTIFY_OFF => st.queue_select.into(),
            o if (common::QUEUE_DESC..common::LEN).contains(&o) => {
                let q = q.copied().unwrap_or_default();
                let reg = match (o - common::QUEUE_DESC) / 8 {
                    0 => q.desc,
                    1 => q.driver,
                    _ => q.device,
                };
                reg >> (8 * (o % 8))
            }
            _ => 0,
        };
        le_bytes_into(v, data);
    }

    fn common_write(&self, st: &mut State, off: u64, data: &[u8]) {
        let v = le_value(data);
        let live = self.irq.status() & flag(VIRTIO_CONFIG_S_DRIVER_OK) != 0;
        let qs = usize::from(st.queue_select);
        match off {
            common::DEVICE_FEATURE_SELECT => {
                st.device_feature_select = u32::try_from(v).unwrap_or(u32::MAX)
            }
            common::DRIVER_FEATURE_SELECT => {
                st.driver_feature_select = u32::try_from(v).unwrap_or(u32::MAX)
            }
            common::DRIVER_FEATURE
                if self.irq.status() & flag(VIRTIO_CONFIG_S_FEATURES_OK) == 0 =>
            {
                match st.driver_feature_select {
                    0 => {
                        st.driver_features = (st.driver_features & !0xffff_ffff) | (v & 0xffff_ffff)
                    }
                    1 => {
                        st.driver_features =
                            (st.driver_features & 0xffff_ffff) | (v & 0xffff_ffff) << 32
                    }
                    _ => {}
                }
            }
            common::CONFIG_MSIX_VECTOR => lock(&self.irq.vectors).0 = self.checked_vector(v),
            common::DEVICE_STATUS => self.write_status(st, u8::try_from(v & 0xff).unwrap_or(0)),
            common::QUEUE_SELECT => st.queue_select = u16::try_from(v & 0xffff).unwrap_or(0),
            _ if live || qs >= st.queues.len() => {}
            common::QUEUE_SIZE => st.queues[qs].size = u16::try_from(v & 0xffff).unwrap_or(0),
            common::QUEUE_MSIX_VECTOR => {
                let vec = self.checked_vector(v);
                if let Some(slot) = lock(&self.irq.vectors).1.get_mut(qs) {
                    *slot = vec;
                }
            }
            common::QUEUE_ENABLE => st.queues[qs].enable = v == 1,
            o if (common::QUEUE_DESC..common::LEN).contains(&o) => {
                let q = &mut st.queues[qs];
                let reg = match (o - common::QUEUE_DESC) / 8 {
                    0 => &mut q.desc,
                    1 => &mut q.driver,
                    _ => &mut q.device,
                };
                set_half(reg, o % 8, data);
            }
            _ => {}
        }
    }

    /// A vector register value: in range, or `NO_VECTOR` (which the driver reads back to
    /// learn the assignment failed).
    fn checked_vector(&self, v: u64) -> u16 {
        let n = lock(&self.irq.msix).table.len() as u64;
        if v < n {
            u16::try_from(v).unwrap_or(NO_VECTOR)
        } else {
            NO_VECTOR
        }
    }

    fn write_status(&self, st: &mut State, new: u8) {
        if new == 0 {
            self.reset(st);
            return;
        }
        let old = self.irq.status();
        // Bits are only ever added by the driver; NEEDS_RESET is the device's.
        let mut set = (new & !old) & !flag(VIRTIO_CONFIG_S_NEEDS_RESET);
        if set & flag(VIRTIO_CONFIG_S_FEATURES_OK) != 0 && !self.features_ok(st.driver_features) {
            set &= !flag(VIRTIO_CONFIG_S_FEATURES_OK);
        }
        let driver_ok = flag(VIRTIO_CONFIG_S_DRIVER_OK);
        if set & driver_ok != 0 && (old | set) & flag(VIRTIO_CONFIG_S_FEATURES_OK) == 0 {
            set &= !driver_ok;
        }
        self.irq.status.fetch_or(set, Ordering::SeqCst);
        if set & driver_ok != 0 {
            self.activate(st);
        }
    }

    fn features_ok(&self, driver: u64) -> bool {
        let required = 1u64 << VIRTIO_F_VERSION_1 | 1u64 << VIRTIO_F_ACCESS_PLATFORM;
        driver & !self.device.features() == 0 && driver & required == required
    }

    fn activate(&self, st: &State) {
        let max = self.device.queue_max_size();
        let mem = IommuMemory::new(self.iommu.clone());
        let mut queues = Vec::with_capacity(st.queues.len());
        for r in &st.queues {
            if !r.enable {
                queues.push(None);
                continue;
            }
            match build_queue(r, max, &mem) {
                Some(q) => queues.push(Some(q)),
                None => return self.irq.needs_reset(),
            }
        }
        if self
            .device
            .activate(st.driver_features, queues, mem, self.irq.clone())
            .is_err()
        {
            self.irq.needs_reset();
        }
    }

    fn msix_bar_read(&self, off: u64, data: &mut [u8]) {
        data.fill(0);
        let m = lock(&self.irq.msix);
        if off < MSIX_PBA_OFFSET && data.len() == 4 && off % 4 == 0 {
            let (e, w) = (
                usize::try_from(off / 16).unwrap_or(usize::MAX),
                usize::try_from(off % 16 / 4).unwrap_or(0),
            );
            if let Some(entry) = m.table.get(e) {
                data.copy_from_slice(&entry[w].to_le_bytes());
            }
        } else if off >= MSIX_PBA_OFFSET && off % 8 == 0 && data.len() <= 8 {
            let base = usize::try_from((off - MSIX_PBA_OFFSET) * 8).unwrap_or(usize::MAX);
            let mut bits = 0u64;
            for i in 0..64 {
                if base
                    .checked_add(i)
                    .and_then(|b| m.pending.get(b))
                    .copied()
                    .unwrap_or(false)
                {
                    bits |= 1 << i;
                }
            }
            le_bytes_into(bits, data);
        }
    }

    fn msix_bar_write(&self, off: u64, data: &[u8]) {
        if off >= MSIX_PBA_OFFSET || data.len() != 4 || off % 4 != 0 {
            return; // the PBA is read-only; other widths are not supported
        }
        let (e, w) = (
            usize::try_from(off / 16).unwrap_or(usize::MAX),
            usize::try_from(off % 16 / 4).unwrap_or(0),
        );
        {
            let mut m = lock(&self.irq.msix);
            if let Some(entry) = m.table.get_mut(e) {
                entry[w] = u32::try_from(le_value(data)).unwrap_or(0);
            }
        }
        self.irq.flush_pending();
    }

    fn sync_msix_control(&self, st: &State) {
        let ctl = st
            .cfg
            .word(usize::from(st.msix_cap) + usize::from(caps::MSIX_CONTROL));
        {
            let mut m = lock(&self.irq.msix);
            m.enabled = ctl & MSIX_CTL_ENABLE != 0;
            m.function_masked = ctl & caps::MSIX_CTL_FUNCTION_MASK != 0;
        }
        self.irq.flush_pending();
    }
}

/// If `offset` addresses the data dword of the PCI configuration access capability, the
/// `(bar, offset, length)` it forwards to (length 1, 2 or 4, else no access).
fn window(st: &State, offset: u16, len: usize) -> Option<(usize, u64, usize)> {
    let data = usize::from(st.pci_cfg) + usize::from(vcap::CAP_LEN);
    if usize::from(offset) != data || len != 4 {
        return None;
    }
    let at = usize::from(st.pci_cfg);
    let dword = |o: usize| {
        u32::from_le_bytes([
            st.cfg.byte(o),
            st.cfg.byte(o + 1),
            st.cfg.byte(o + 2),
            st.cfg.byte(o + 3),
        ])
    };
    let bar = usize::from(st.cfg.byte(at + usize::from(vcap::BAR)));
    let off = u64::from(dword(at + usize::from(vcap::OFFSET)));
    let n = usize::try_from(dword(at + usize::from(vcap::LENGTH))).ok()?;
    matches!(n, 1 | 2 | 4).then_some((bar, off, n))
}

fn build_queue(r: &QueueRegs, max: u16, mem: &IommuMemory) -> Option<Queue> {
    if r.size == 0 || r.size > max || !r.size.is_power_of_two() {
        return None;
    }
    let mut q = Queue::new(max).ok()?;
    q.set_size(r.size);
    let split = |a: u64| {
        (
            Some(u32::try_from(a & 0xffff_ffff).unwrap_or(0)),
            Some(u32::try_from(a >> 32).unwrap_or(0)),
        )
    };
    let (lo, hi) = split(r.desc);
    q.set_desc_table_address(lo, hi);
    let (lo, hi) = split(r.driver);
    q.set_avail_ring_address(lo, hi);
    let (lo, hi) = split(r.device);
    q.set_used_ring_address(lo, hi);
    q.set_ready(true);
    // virtio-queue ignores misaligned addresses (keeping the old ones): catch that here.
    let placed = q.size() == r.size
        && q.desc_table() == r.desc
        && q.avail_ring() == r.driver
        && q.used_ring() == r.device;
    (placed && q.is_valid(mem)).then_some(q)
}

impl<D: VirtioDevice> PciDevice for VirtioPci<D> {
    fn config_read(&self, offset: u16) -> u32 {
        let st = lock(&self.state);
        match window(&st, offset, 4) {
            Some((bar, off, len)) => {
                drop(st); // the BAR access takes the state lock itself
                let mut d = [0u8; 4];
                self.bar_read(bar, off, &mut d[..len]);
                u32::from_le_bytes(d)
            }
            None => st.cfg.read(offset),
        }
    }

    fn config_write(&self, offset: u16, data: &[u8]) {
        let mut st = lock(&self.state);
        if let Some((bar, off, len)) = window(&st, offset, data.len()) {
            drop(st);
            self.bar_write(bar, off, &data[..len.min(data.len())]);
            return;
        }
        st.cfg.write(offset, data);
        let cap = u16::from(st.msix_cap);
        if (cap..cap + 4).contains(&offset) {
            self.sync_msix_control(&st);
        }
    }

    fn bar_read(&self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if data.is_empty() || data.len() > 8 {
            return;
        }
        let end = offset.saturating_add(data.len() as u64);
        match bar {
            MSIX_BAR if end <= MSIX_BAR_SIZE => self.msix_bar_read(offset, data),
            VIRTIO_BAR if end <= common::LEN => {
                let st = lock(&self.state);
                self.common_read(&st, offset, data);
            }
            VIRTIO_BAR if offset == ISR_OFFSET && data.len() == 1 => {
                data[0] = self.irq.isr.swap(0, Ordering::SeqCst);
            }
            VIRTIO_BAR
                if offset >= DEVICE_CFG_OFFSET && end <= DEVICE_CFG_OFFSET + DEVICE_CFG_LEN =>
            {
                self.device.read_config(offset - DEVICE_CFG_OFFSET, data);
            }
            _ => {}
        }
    }

    fn bar_write(&self, bar: usize, offset: u64, data: &[u8]) {
        if data.is_empty() || data.len() > 8 {
            return;
        }
        let end = offset.saturating_add(data.len() as u64);
        match bar {
            MSIX_BAR if end <= MSIX_BAR_SIZE => self.msix_bar_write(offset, data),
            VIRTIO_BAR if end <= common::LEN => {
                let mut st = lock(&self.state);
                self.common_write(&mut st, offset, data);
            }
            VIRTIO_BAR
                if offset >= DEVICE_CFG_OFFSET && end <= DEVICE_CFG_OFFSET + DEVICE_CFG_LEN =>
            {
                self.device.write_config(offset - DEVICE_CFG_OFFSET, data);
            }
            VIRTIO_BAR if offset >= NOTIFY_OFFSET && end <= NOTIFY_OFFSET + NOTIFY_LEN => {
                let q = (offset - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER);
                let live = self.irq.status() & flag(VIRTIO_CONFIG_S_DRIVER_OK) != 0
                    && self.irq.status() & flag(VIRTIO_CONFIG_S_NEEDS_RESET) == 0;
                if let (true, Ok(q)) = (live, u16::try_from(q)) {
                    if q < self.device.num_queues() {
                        self.device.queue_notify(q);
                    }
                }
            }
            _ => {}
        }
    }

    fn set_irq_notifier(&self, irq: Irq, fd: Option<EventFd>) -> Result<(), EmuError> {
        let ok = match irq {
            Irq::Line(l) => l == self.irq.line,
            Irq::MsiX(v) => usize::from(v) < lock(&self.irq.msix).table.len(),
        };
        if !ok {
            return Err(EmuError::NoIrq(irq));
        }
        let mut n = lock(&self.irq.notifiers);
        match fd {
            Some(fd) => n.insert(irq, fd),
            None => n.remove(&irq),
        };
        drop(n);
        self.irq.flush_pending();
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    /// Interrupt state with MSI-X off and nothing bound.
    pub(crate) fn interrupts() -> Arc<Interrupts> {
        Arc::new(Interrupts::new(2, 1, 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emu::DeviceConfig;
    use crate::iommu::Iommu;
    use crate::pci::caps::Capability;

    struct Dummy;
    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u16 {
            4
        }
        fn class(&self) -> (u8, u8, u8) {
            (0xff, 0, 0)
        }
        fn features(&self) -> u64 {
            1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_ACCESS_PLATFORM
        }
        fn num_queues(&self) -> u16 {
            2
        }
        fn queue_max_size(&self) -> u16 {
            16
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.fill(u8::try_from(offset).unwrap_or(0xee));
        }
        fn write_config(&self, _: u64, _: &[u8]) {}
        fn activate(
            &self,
            _: u64,
            _: Vec<Option<Queue>>,
            _: IommuMemory,
            _: Arc<Interrupts>,
        ) -> Result<(), EmuError> {
            Ok(())
        }
        fn queue_notify(&self, _: u16) {}
        fn reset(&self) {}
    }

    fn dev() -> VirtioPci<Dummy> {
        VirtioPci::new(Arc::new(Dummy), Iommu::new(1).device(), 5).unwrap()
    }

    #[test]
    fn capabilities_describe_the_layout() {
        let d = dev();
        let caps = caps::walk(&DeviceConfig(&d)).unwrap();
        let types: Vec<u8> = caps
            .iter()
            .filter_map(|c| match c {
                Capability::Vendor {
                    virtio: Some(v), ..
                } => Some(v.cfg_type),
                _ => None,
            })
            .collect();
        assert_eq!(types, vec![1, 3, 4, 2, 5]);
        let Some(Capability::MsiX(m)) = caps.last() else {
            panic!("{caps:?}")
        };
        assert_eq!((m.table_size, usize::from(m.table_bar)), (3, MSIX_BAR));
    }

    #[test]
    fn pci_cfg_window_reaches_the_bars() {
        let d = dev();
        let at = lock(&d.state).pci_cfg;
        let base = u16::from(at);
        d.config_write(base + 4, &[u8::try_from(VIRTIO_BAR).unwrap()]);
        d.config_write(
            base + 8,
            &u32::try_from(common::NUM_QUEUES).unwrap().to_le_bytes(),
        );
        d.config_write(base + 12, &2u32.to_le_bytes());
        assert_eq!(d.config_read(base + 16), 2);
        // Device config through the window.
        d.config_write(
            base + 8,
            &u32::try_from(DEVICE_CFG_OFFSET + 7).unwrap().to_le_bytes(),
        );
        d.config_write(base + 12, &1u32.to_le_bytes());
        assert_eq!(d.config_read(base + 16), 7);
        // A write through the window: select queue 1.
        d.config_write(
            base + 8,
            &u32::try_from(common::QUEUE_SELECT).unwrap().to_le_bytes(),
        );
        d.config_write(base + 12, &2u32.to_le_bytes());
        d.config_write(base + 16, &1u32.to_le_bytes());
        assert_eq!(lock(&d.state).queue_select, 1);
        // Length 3 performs nothing.
        d.config_write(base + 12, &3u32.to_le_bytes());
        d.config_write(base + 16, &0u32.to_le_bytes());
        assert_eq!(lock(&d.state).queue_select, 1);
    }

    #[test]
    fn msix_masking_and_pending() {
        let d = dev();
        let fd = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        d.set_irq_notifier(Irq::MsiX(2), Some(fd.try_clone().unwrap()))
            .unwrap();
        assert!(d.set_irq_notifier(Irq::MsiX(3), None).is_err());
        assert!(d.set_irq_notifier(Irq::Line(4), None).is_err());
        d.bar_write(VIRTIO_BAR, common::CONFIG_MSIX_VECTOR, &2u16.to_le_bytes());
        let mut v = [0u8; 2];
        d.bar_read(VIRTIO_BAR, common::CONFIG_MSIX_VECTOR, &mut v);
        assert_eq!(u16::from_le_bytes(v), 2);
        d.bar_write(VIRTIO_BAR, common::QUEUE_MSIX_VECTOR, &9u16.to_le_bytes());
        d.bar_read(VIRTIO_BAR, common::QUEUE_MSIX_VECTOR, &mut v);
        assert_eq!(
            u16::from_le_bytes(v),
            NO_VECTOR,
            "out-of-range vector reads back NO_VECTOR"
        );
        let ctl = u16::from(lock(&d.state).msix_cap) + u16::from(caps::MSIX_CONTROL);
        d.config_write(ctl, &MSIX_CTL_ENABLE.to_le_bytes());
        // Entry 2 starts masked: the interrupt is pending, not delivered.
        d.irq.signal_config();
        assert!(fd.read().is_err());
        let mut pba = [0u8; 8];
        d.bar_read(MSIX_BAR, MSIX_PBA_OFFSET, &mut pba);
        assert_eq!(u64::from_le_bytes(pba), 1 << 2);
        d.bar_write(MSIX_BAR, 2 * 16 + 12, &0u32.to_le_bytes());
        assert_eq!(fd.read().unwrap(), 1);
        d.bar_read(MSIX_BAR, MSIX_PBA_OFFSET, &mut pba);
        assert_eq!(u64::from_le_bytes(pba), 0);
        // Function mask holds it back too.
        d.config_write(
            ctl,
            &(MSIX_CTL_ENABLE | caps::MSIX_CTL_FUNCTION_MASK).to_le_bytes(),
        );
        d.irq.signal_config();
        assert!(fd.read().is_err());
        d.config_write(ctl, &MSIX_CTL_ENABLE.to_le_bytes());
        assert_eq!(fd.read().unwrap(), 1);
        // Odd MSI-X accesses are ignored.
        d.bar_write(MSIX_BAR, 2 * 16 + 13, &[1]);
        d.bar_write(MSIX_BAR, MSIX_PBA_OFFSET, &[0xff; 4]);
        d.bar_read(MSIX_BAR, 0x7fc, &mut pba[..4]);
        assert_eq!(&pba[..4], &[0; 4]);
    }

    #[test]
    fn intx_and_isr_when_msix_is_off() {
        let d = dev();
        let fd = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        d.set_irq_notifier(Irq::Line(5), Some(fd.try_clone().unwrap()))
            .unwrap();
        d.irq.signal_queue(0);
        d.irq.needs_reset();
        assert_eq!(fd.read().unwrap(), 2);
        let mut isr = [0u8];
        d.bar_read(VIRTIO_BAR, ISR_OFFSET, &mut isr);
        assert_eq!(isr[0], ISR_QUEUE | ISR_CONFIG);
        d.bar_read(VIRTIO_BAR, ISR_OFFSET, &mut isr);
        assert_eq!(isr[0], 0, "reading the ISR clears it");
        assert_ne!(d.device_status() & flag(VIRTIO_CONFIG_S_NEEDS_RESET), 0);
        // The driver cannot clear NEEDS_RESET except by a reset.
        d.bar_write(VIRTIO_BAR, common::DEVICE_STATUS, &[1]);
        assert_ne!(d.device_status() & flag(VIRTIO_CONFIG_S_NEEDS_RESET), 0);
        d.bar_write(VIRTIO_BAR, common::DEVICE_STATUS, &[0]);
        assert_eq!(d.device_status(), 0);
    }

    #[test]
    fn hostile_register_accesses_are_harmless() {
        let d = dev();
        for bar in [0, MSIX_BAR, 2, VIRTIO_BAR, 9] {
            for off in [
                0,
                1,
                0x37,
                0x38,
                0xfff,
                0x1000,
                0x2fff,
                0x3ffe,
                0x4000,
                u64::MAX - 1,
            ] {
                for len in [0, 1, 2, 3, 4, 8, 9] {
                    let mut b = vec![0u8; len];
                    d.bar_read(bar, off, &mut b);
                    d.bar_write(bar, off, &b);
                }
            }
        }
        for off in 0..=300u16 {
            let _ = d.config_read(off);
            d.config_write(off, &[0xff; 4]);
            d.config_write(off, &[0xff; 3]);
        }
    }
}
