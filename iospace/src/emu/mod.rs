//! The emulated chipset: a PCI bus holding device models.
//!
//! A device model implements [`PciDevice`]: config-space reads/writes (with byte enables, as
//! real config cycles have), accesses to its BARs, and interrupt notifiers. [`ConfigSpace`]
//! is the register file most models build on: a 256-byte space, a per-byte writable mask,
//! BAR registers that answer the sizing protocol, and a capability-list builder. [`PciBus`]
//! plugs models into slots and plays firmware: it sizes each BAR and assigns it an address.
//!
//! Device models are driven by untrusted software (the driver domain): every offset and
//! length they receive is checked, and an access outside a register reads as all ones or is
//! dropped, as on real hardware, never a panic.

use crate::pci::bar::{size_bars, Bar, BarKind, BarRegisters};
use crate::pci::{
    self, caps, status, Bdf, ConfigAccess, DeviceInfo, PciError, BAR0, CAPABILITIES_POINTER,
    COMMAND, CONFIG_SPACE_SIZE, HEADER_END, NUM_BARS, ROM_ADDRESS, STATUS,
};
use crate::space::Irq;

pub mod interrupts;
pub mod mem;
pub mod virtio_blk;
pub mod virtio_net;
pub mod virtio_pci;
pub mod wire;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use vmm_sys_util::eventfd::EventFd;

/// Why an emulated-chipset operation failed.
#[derive(Debug, thiserror::Error)]
pub enum EmuError {
    /// The slot is taken or out of range.
    #[error("Slot {0} is not free")]
    SlotBusy(u8),
    /// BAR address space is exhausted.
    #[error("Out of {0} address space")]
    AddressSpace(&'static str),
    /// Probing the device's config space failed.
    #[error("Probing the device")]
    Probe(#[source] PciError),
    /// The device has no such interrupt.
    #[error("No interrupt {0:?}")]
    NoIrq(Irq),
    /// Opening or sizing the media failed.
    #[error("Opening the media")]
    Media(#[source] std::io::Error),
    /// Creating an eventfd or thread failed.
    #[error("Creating a worker resource")]
    Resource(#[source] std::io::Error),
    /// A configuration value is out of range.
    #[error("Invalid configuration: {0}")]
    Config(&'static str),
    /// Opening or configuring the NIC's wire failed.
    #[error("Opening the wire")]
    Wire(#[source] std::io::Error),
}

/// Lock a mutex, recovering from poisoning (a panicked holder leaves plain data behind).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A device model on the emulated bus.
pub trait PciDevice: Send + Sync {
    /// Read the dword at `offset` (aligned); out-of-range reads return all ones.
    fn config_read(&self, offset: u16) -> u32;
    /// Write `data` (1, 2 or 4 bytes, not crossing a dword) at `offset`.
    fn config_write(&self, offset: u16, data: &[u8]);
    /// Read `data.len()` bytes at `offset` of BAR `bar`.
    fn bar_read(&self, bar: usize, offset: u64, data: &mut [u8]);
    /// Write `data` at `offset` of BAR `bar`.
    fn bar_write(&self, bar: usize, offset: u64, data: &[u8]);
    /// Signal `fd` when the device raises `irq` (`None` disconnects it).
    fn set_irq_notifier(&self, irq: Irq, fd: Option<EventFd>) -> Result<(), EmuError>;
}

/// [`ConfigAccess`] over a device model (what the bus firmware and the I/O Space use).
pub struct DeviceConfig<'a>(pub &'a dyn PciDevice);

impl ConfigAccess for DeviceConfig<'_> {
    fn read_u32(&self, offset: u16) -> pci::Result<u32> {
        pci::check_dword(offset, CONFIG_SPACE_SIZE)?;
        Ok(self.0.config_read(offset))
    }
    fn write_u32(&mut self, offset: u16, value: u32) -> pci::Result<()> {
        pci::check_dword(offset, CONFIG_SPACE_SIZE)?;
        self.0.config_write(offset, &value.to_le_bytes());
        Ok(())
    }
}

/// Whether `offset..offset+len` is a legal config write: 1, 2 or 4 bytes, naturally aligned,
/// inside the 256-byte space.
pub fn valid_config_access(offset: u16, len: usize) -> bool {
    matches!(len, 1 | 2 | 4)
        && usize::from(offset) % len == 0
        && usize::from(offset) + len <= CONFIG_SPACE_SIZE
}

/// A device's config registers.
#[derive(Clone, Debug)]
pub struct ConfigSpace {
    bytes: [u8; CONFIG_SPACE_SIZE],
    writable: [u8; CONFIG_SPACE_SIZE],
    bars: BarRegisters,
    bar_list: Vec<Bar>,
    next_cap: u8,
    last_cap: Option<u8>,
}

impl ConfigSpace {
    /// A type-0 header with these identifiers and BARs (addresses are assigned later).
    pub fn new(ids: &pci::Header, bars: &[Bar]) -> Self {
        let mut s = Self {
            bytes: [0; CONFIG_SPACE_SIZE],
            writable: [0; CONFIG_SPACE_SIZE],
            bars: BarRegisters::new(bars),
            bar_list: bars.to_vec(),
            next_cap: u8::try_from(HEADER_END).unwrap_or(0x40),
            last_cap: None,
        };
        s.set16(pci::VENDOR_ID, ids.vendor_id);
        s.set16(pci::DEVICE_ID, ids.device_id);
        s.set8(pci::REVISION_ID, ids.revision);
        s.set8(pci::PROG_IF, ids.prog_if);
        s.set8(pci::SUBCLASS, ids.subclass);
        s.set8(pci::CLASS, ids.class);
        s.set8(
            pci::HEADER_TYPE,
            ids.header_type & pci::HEADER_TYPE_MULTIFUNCTION,
        );
        s.set16(pci::SUBSYSTEM_VENDOR_ID, ids.subsystem_vendor_id);
        s.set16(pci::SUBSYSTEM_ID, ids.subsystem_id);
        s.set8(pci::INTERRUPT_PIN, ids.interrupt_pin);
        s.set8(pci::INTERRUPT_LINE, ids.interrupt_line);
        let cmd = pci::command::IO_SPACE
            | pci::command::MEMORY_SPACE
            | pci::command::BUS_MASTER
            | pci::command::INTX_DISABLE;
        s.writable[usize::from(COMMAND)..usize::from(COMMAND) + 2]
            .copy_from_slice(&cmd.to_le_bytes());
        s.writable[usize::from(pci::CACHE_LINE_SIZE)] = 0xff;
        s.writable[usize::from(pci::LATENCY_TIMER)] = 0xff;
        s.writable[usize::from(pci::INTERRUPT_LINE)] = 0xff;
        s
    }

    /// The BARs this space was built with.
    pub fn bar_list(&self) -> &[Bar] {
        &self.bar_list
    }

    fn set8(&mut self, off: u16, v: u8) {
        self.bytes[usize::from(off)] = v;
    }

    fn set16(&mut self, off: u16, v: u16) {
        let o = usize::from(off);
        self.bytes[o..o + 2].copy_from_slice(&v.to_le_bytes());
    }

    /// Append a capability; `body` starts with the id byte (the next pointer is filled in),
    /// `writable` gives the writable bits of each body byte (shorter = rest read-only).
    /// Returns its offset, or `None` if config space is full.
    pub fn add_capability(&mut self, body: &[u8], writable: &[u8]) -> Option<u8> {
        let at = self.next_cap;
        let end = usize::from(at) + body.len();
        if body.len() < 2 || end > CONFIG_SPACE_SIZE {
            return None;
        }
        let a = usize::from(at);
        self.bytes[a..end].copy_from_slice(body);
        self.bytes[a + 1] = 0;
        for (i, w) in writable.iter().take(body.len()).enumerate().skip(2) {
            self.writable[a + i] = *w;
        }
        match self.last_cap {
            Some(prev) => self.bytes[usize::from(prev) + 1] = at,
            None => {
                self.bytes[usize::from(CAPABILITIES_POINTER)] = at;
                let st = u16::from_le_bytes([
                    self.bytes[usize::from(STATUS)],
                    self.bytes[usize::from(STATUS) + 1],
                ]) | status::CAP_LIST;
                self.set16(STATUS, st);
            }
        }
        self.last_cap = Some(at);
        self.next_cap = u8::try_from((end + 3) & !3).unwrap_or(0xfc);
        Some(at)
    }

    /// The byte at `offset` (0 outside the space).
    pub fn byte(&self, offset: usize) -> u8 {
        self.bytes.get(offset).copied().unwrap_or(0)
    }

    /// The little-endian word at `offset`.
    pub fn word(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.byte(offset), self.byte(offset + 1)])
    }

    /// Dword read as the device answers it.
    pub fn read(&self, offset: u16) -> u32 {
        let o = usize::from(offset);
        if o % 4 != 0 || o + 4 > CONFIG_SPACE_SIZE {
            return u32::MAX;
        }
        if (usize::from(BAR0)..usize::from(BAR0) + 4 * NUM_BARS).contains(&o) {
            return self.bars.raw[(o - usize::from(BAR0)) / 4];
        }
        if offset == ROM_ADDRESS {
            return 0;
        }
        u32::from_le_bytes([
            self.bytes[o],
            self.bytes[o + 1],
            self.bytes[o + 2],
            self.bytes[o + 3],
        ])
    }

    /// Write with byte enables; read-only bits keep their value. Illegal accesses are dropped.
    pub fn write(&mut self, offset: u16, data: &[u8]) {
        if !valid_config_access(offset, data.len()) {
            return;
        }
        let o = usize::from(offset);
        if (usize::from(BAR0)..usize::from(BAR0) + 4 * NUM_BARS).contains(&o) {
            let idx = (o - usize::from(BAR0)) / 4;
            let mut d = self.bars.raw[idx].to_le_bytes();
            let at = o % 4;
            d[at..at + data.len()].copy_from_slice(data);
            self.bars.write(idx, u32::from_le_bytes(d));
            return;
        }
        for (i, v) in data.iter().enumerate() {
            let w = self.writable[o + i];
            self.bytes[o + i] = (self.bytes[o + i] & !w) | (v & w);
        }
    }

    /// The BAR registers as currently programmed.
    pub fn bar_registers(&self) -> &BarRegisters {
        &self.bars
    }

    /// Which BAR (index, offset) the bus address `addr..addr+len` falls in, by the addresses
    /// currently programmed.
    pub fn bar_at(&self, addr: u64, len: u64, io: bool) -> Option<(usize, u64)> {
        self.bar_list.iter().find_map(|b| {
            if (b.kind == BarKind::Io) != io {
                return None;
            }
            let base = self.bar_address(b.index)?;
            let placed = Bar {
                address: base,
                ..*b
            };
            placed.contains(addr, len).then(|| (b.index, addr - base))
        })
    }

    /// The address BAR `index` is programmed with.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let b = self.bar_list.iter().find(|b| b.index == index)?;
        let low = *self.bars.raw.get(index)?;
        Some(match b.kind {
            BarKind::Io => u64::from(low & crate::pci::bar::BAR_IO_ADDR_MASK),
            BarKind::Mem32 => u64::from(low & crate::pci::bar::BAR_MEM_ADDR_MASK),
            BarKind::Mem64 => {
                u64::from(*self.bars.raw.get(index + 1)?) << 32
                    | u64::from(low & crate::pci::bar::BAR_MEM_ADDR_MASK)
            }
        })
    }

    /// The capability list, as a driver would walk it.
    pub fn capabilities(&self) -> Vec<caps::Capability> {
        let dump = crate::pci::ConfigDump::new(&self.bytes);
        dump.and_then(|d| caps::walk(&d)).unwrap_or_default()
    }
}

/// First address the bus firmware hands to memory BARs.
pub const MMIO_BASE: u64 = 0xe000_0000;
/// End of the 32-bit MMIO window.
pub const MMIO_END: u64 = 0xfec0_0000;
/// First I/O port the firmware hands out.
pub const IO_BASE: u64 = 0xc000;

/// An emulated PCI bus (bus 0): device models in slots, plus the firmware that places BARs.
pub struct PciBus {
    devices: Mutex<BTreeMap<Bdf, Arc<dyn PciDevice>>>,
    next: Mutex<(u64, u64)>,
}

impl Default for PciBus {
    fn default() -> Self {
        Self::new()
    }
}

impl PciBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self {
            devices: Mutex::new(BTreeMap::new()),
            next: Mutex::new((MMIO_BASE, IO_BASE)),
        }
    }

    /// Plug `dev` into `slot` (function 0): size its BARs, assign them naturally aligned
    /// addresses, and return its address.
    pub fn plug(&self, slot: u8, dev: Arc<dyn PciDevice>) -> Result<Bdf, EmuError> {
        let bdf = Bdf::new(0, slot, 0).ok_or(EmuError::SlotBusy(slot))?;
        let mut devs = lock(&self.devices);
        if devs.contains_key(&bdf) {
            return Err(EmuError::SlotBusy(slot));
        }
        let mut cfg = DeviceConfig(dev.as_ref());
        let bars = size_bars(&mut cfg).map_err(EmuError::Probe)?;
        let mut next = lock(&self.next);
        for b in bars {
            let (cursor, end, what) = match b.kind {
                BarKind::Io => (&mut next.1, 0x1_0000, "I/O"),
                _ => (&mut next.0, MMIO_END, "MMIO"),
            };
            let at = cursor
                .checked_add(b.size - 1)
                .map(|x| x & !(b.size - 1))
                .filter(|a| a.checked_add(b.size).is_some_and(|e| e <= end))
                .ok_or(EmuError::AddressSpace(what))?;
            *cursor = at + b.size;
            let off = pci::bar::bar_offset(b.index);
            let low = u32::try_from(at & 0xffff_ffff).unwrap_or(0);
            cfg.write_u32(off, low).map_err(EmuError::Probe)?;
            if b.kind == BarKind::Mem64 {
                let high = u32::try_from(at >> 32).unwrap_or(0);
                cfg.write_u32(off + 4, high).map_err(EmuError::Probe)?;
            }
        }
        devs.insert(bdf, dev);
        Ok(bdf)
    }

    /// The device at `bdf`.
    pub fn device(&self, bdf: Bdf) -> Option<Arc<dyn PciDevice>> {
        lock(&self.devices).get(&bdf).cloned()
    }

    /// Addresses of all plugged devices.
    pub fn devices(&self) -> Vec<Bdf> {
        lock(&self.devices).keys().copied().collect()
    }

    /// Every plugged function with what its config space says (header, sized BARs,
    /// capabilities), in slot order.
    pub fn scan(&self) -> Vec<(Bdf, pci::Result<DeviceInfo>)> {
        let devs: Vec<(Bdf, Arc<dyn PciDevice>)> = lock(&self.devices)
            .iter()
            .map(|(b, d)| (*b, d.clone()))
            .collect();
        devs.into_iter()
            .map(|(b, d)| (b, DeviceInfo::probe(&mut DeviceConfig(d.as_ref()))))
            .collect()
    }

    /// Config read as the bus answers it: all ones for an empty slot.
    pub fn config_read(&self, bdf: Bdf, offset: u16) -> u32 {
        self.device(bdf).map_or(u32::MAX, |d| d.config_read(offset))
    }
}

/// A device with only registers: config space as built, BAR contents as plain memory. For
/// tests and fuzzing of the config path.
pub struct StubDevice {
    cfg: Mutex<ConfigSpace>,
    bar_mem: Mutex<BTreeMap<usize, Vec<u8>>>,
    irqs: Mutex<BTreeMap<Irq, EventFd>>,
}

impl StubDevice {
    /// A stub with this config space; each BAR is backed by up to 64 KiB of memory.
    pub fn new(cfg: ConfigSpace) -> Self {
        let mem = cfg
            .bar_list()
            .iter()
            .map(|b| {
                (
                    b.index,
                    vec![0u8; usize::try_from(b.size.min(0x1_0000)).unwrap_or(0)],
                )
            })
            .collect();
        Self {
            cfg: Mutex::new(cfg),
            bar_mem: Mutex::new(mem),
            irqs: Mutex::new(BTreeMap::new()),
        }
    }

    /// An example config space: an e1000-like NIC with a 128 KiB memory BAR, 64 I/O ports,
    /// a 16 KiB 64-bit BAR holding a 4-vector MSI-X table, and INTx on line 10.
    pub fn example_config() -> ConfigSpace {
        let ids = crate::pci::Header {
            vendor_id: 0x8086,
            device_id: 0x100e,
            command: 0,
            status: 0,
            revision: 3,
            prog_if: 0,
            subclass: 0,
            class: 2,
            header_type: 0,
            subsystem_vendor_id: 0x8086,
            subsystem_id: 1,
            cap_pointer: 0,
            interrupt_line: 10,
            interrupt_pin: 1,
        };
        let bar = |index, kind, size| Bar {
            index,
            kind,
            prefetchable: false,
            address: 0,
            size,
        };
        let mut c = ConfigSpace::new(
            &ids,
            &[
                bar(0, BarKind::Mem32, 0x2_0000),
                bar(1, BarKind::Io, 0x40),
                bar(2, BarKind::Mem64, 0x4000),
            ],
        );
        let mut msix = vec![caps::CAP_ID_MSIX, 0, 3, 0];
        msix.extend_from_slice(&2u32.to_le_bytes());
        msix.extend_from_slice(&(0x800u32 | 2).to_le_bytes());
        c.add_capability(&msix, &[0, 0, 0, 0xc0]).unwrap();
        c
    }

    /// Raise `irq` (signals its notifier, if any).
    pub fn raise(&self, irq: Irq) -> bool {
        lock(&self.irqs)
            .get(&irq)
            .is_some_and(|fd| fd.write(1).is_ok())
    }
}

impl PciDevice for StubDevice {
    fn config_read(&self, offset: u16) -> u32 {
        lock(&self.cfg).read(offset)
    }
    fn config_write(&self, offset: u16, data: &[u8]) {
        lock(&self.cfg).write(offset, data);
    }
    fn bar_read(&self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if let Some(m) = lock(&self.bar_mem).get(&bar) {
            let o = usize::try_from(offset).unwrap_or(usize::MAX);
            if let Some(src) = o.checked_add(data.len()).and_then(|e| m.get(o..e)) {
                data.copy_from_slice(src);
            }
        }
    }
    fn bar_write(&self, bar: usize, offset: u64, data: &[u8]) {
        if let Some(m) = lock(&self.bar_mem).get_mut(&bar) {
            let o = usize::try_from(offset).unwrap_or(usize::MAX);
            if let Some(dst) = o.checked_add(data.len()).and_then(|e| m.get_mut(o..e)) {
                dst.copy_from_slice(data);
            }
        }
    }
    fn set_irq_notifier(&self, irq: Irq, fd: Option<EventFd>) -> Result<(), EmuError> {
        let mut irqs = lock(&self.irqs);
        match fd {
            Some(fd) => irqs.insert(irq, fd),
            None => irqs.remove(&irq),
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_plugs_sizes_and_places_bars() {
        let bus = PciBus::new();
        let dev = Arc::new(StubDevice::new(StubDevice::example_config()));
        let bdf = bus.plug(3, dev.clone()).unwrap();
        assert_eq!(bdf.to_string(), "0000:00:03.0");
        assert!(matches!(
            bus.plug(3, dev.clone()),
            Err(EmuError::SlotBusy(3))
        ));
        assert_eq!(bus.config_read(Bdf::new(0, 4, 0).unwrap(), 0), u32::MAX);
        let info = DeviceInfo::probe(&mut DeviceConfig(dev.as_ref())).unwrap();
        assert_eq!(info.bars.len(), 3);
        assert_eq!(
            (info.bars[0].address, info.bars[0].size),
            (MMIO_BASE, 0x2_0000)
        );
        assert_eq!(
            (info.bars[1].kind, info.bars[1].address, info.bars[1].size),
            (BarKind::Io, IO_BASE, 0x40)
        );
        assert_eq!(
            (info.bars[2].kind, info.bars[2].address),
            (BarKind::Mem64, MMIO_BASE + 0x2_0000)
        );
        assert_eq!(info.msix().unwrap().table_size, 4);
        assert_eq!(info.header.interrupt_pin, 1);
        let scan = bus.scan();
        assert_eq!(scan.len(), 1);
        assert_eq!(scan[0].0, bdf);
        assert_eq!(scan[0].1.as_ref().unwrap(), &info);
    }
}
