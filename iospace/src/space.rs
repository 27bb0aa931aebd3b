//! The I/O Space of one device: everything a driver domain may touch, and the gate it must
//! pass through to touch it.
//!
//! An [`IoSpace`] is computed from the device's config space when the manager hands the
//! device to a driver domain:
//!
//! * **ports**: a 64 Ki-bit [`PortBitmap`], set for the ports of its I/O BARs;
//! * **MMIO**: the set of 4 KiB pages ([`MmioPages`]) of its memory BARs; an access must also
//!   lie inside one BAR;
//! * **interrupts**: an [`IrqSet`]: its INTx line (when the interrupt pin is non-zero) and
//!   its MSI-X vectors `0..table_size`;
//! * **config space**: a virtualized view of its own function only. Reads pass through,
//!   except the BARs, which read from a shadow so that the write-ones sizing protocol works
//!   without the real register ever changing. Writes are checked byte by byte against the
//!   register map below; anything else is refused.
//!
//! | bytes | register | a write is |
//! |---|---|---|
//! | `0x04..0x06` | command | allowed unless it changes I/O-, memory-decode or bus-master enable (the manager's policy) |
//! | `0x06..0x08` | status | passed through (write-one-to-clear bits) |
//! | `0x0c..0x0e` | cache line, latency | passed through |
//! | `0x10..0x28` | BARs | emulated: a whole-dword write of all ones starts sizing, a write of the assigned address ends it; any other value would move the BAR and is refused |
//! | `0x30..0x34` | expansion ROM | ignored (no ROM is exposed; reads 0) |
//! | capability bodies | MSI, MSI-X, PCIe, vendor-specific (not their id/next bytes) | passed through |
//! | anything else | identifiers, header type, BIST, interrupt line/pin, capability links, unused space | refused if it would change the byte |
//!
//! Every refused access (a port, page or interrupt outside the tables, a config access to
//! another function, a misaligned or out-of-range config access, a forbidden write) returns
//! a [`SpaceError`], increments the violation counter ([`IoSpace::violations`]) and calls the
//! manager's hook ([`IoSpace::on_violation`]). Nothing reaches the device.

use crate::emu::{lock, valid_config_access, DeviceConfig, EmuError, PciDevice};
use crate::pci::bar::{bar_offset, BarKind, BarRegisters};
use crate::pci::{
    caps::Capability, command, Bdf, DeviceInfo, PciError, BAR0, CACHE_LINE_SIZE, COMMAND,
    CONFIG_SPACE_SIZE, LATENCY_TIMER, NUM_BARS, ROM_ADDRESS, STATUS,
};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use vmm_sys_util::eventfd::EventFd;

/// Bytes per MMIO page.
pub const MMIO_PAGE_SIZE: u64 = 4096;
/// Longest single MMIO or port access.
pub const MAX_ACCESS: usize = 8;
/// Command bits whose value the manager fixes.
pub const COMMAND_POLICY_BITS: u16 =
    command::IO_SPACE | command::MEMORY_SPACE | command::BUS_MASTER;

/// An interrupt a device can raise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Irq {
    /// Legacy INTx on this line.
    Line(u8),
    /// MSI-X vector.
    MsiX(u16),
}

/// A refused access (each one is also counted as a violation).
#[derive(Debug, thiserror::Error)]
pub enum SpaceError {
    /// Ports outside the bitmap.
    #[error("Port access {port:#x}+{len} outside the I/O Space")]
    Port {
        /// First port.
        port: u16,
        /// Bytes.
        len: usize,
    },
    /// MMIO outside the device's BARs.
    #[error("MMIO access {addr:#x}+{len} outside the I/O Space")]
    Mmio {
        /// Address.
        addr: u64,
        /// Bytes.
        len: usize,
    },
    /// An interrupt the device does not have.
    #[error("Interrupt {0:?} outside the I/O Space")]
    Irq(Irq),
    /// Config access to another function.
    #[error("Config access to {0}, which is not this device")]
    OtherDevice(Bdf),
    /// Misaligned, wrongly sized or out-of-range config access.
    #[error("Config access of {len} bytes at {offset:#x} is malformed")]
    ConfigOffset {
        /// Offset.
        offset: u16,
        /// Bytes.
        len: usize,
    },
    /// A write that would move a BAR (or a partial BAR write).
    #[error("Write {value:#x} would move BAR register {offset:#x}")]
    MoveBar {
        /// Register.
        offset: u16,
        /// Value written.
        value: u32,
    },
    /// A command write that changes the manager's decode/bus-master policy.
    #[error("Command write {0:#x} changes the decode/bus-master policy")]
    CommandPolicy(u16),
    /// A write that changes a protected register.
    #[error("Write to protected config byte {0:#x}")]
    Protected(u16),
    /// The device's config space could not be parsed.
    #[error("Probing the device")]
    Probe(#[source] PciError),
    /// The device refused an operation.
    #[error("Device operation failed")]
    Device(#[source] EmuError),
}

/// A set of I/O ports.
#[derive(Clone, PartialEq, Eq)]
pub struct PortBitmap(Box<[u64; 1024]>);

impl std::fmt::Debug for PortBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PortBitmap({} ports)", self.count())
    }
}

impl Default for PortBitmap {
    fn default() -> Self {
        Self(Box::new([0; 1024]))
    }
}

impl PortBitmap {
    /// Allow `start..start+len` (clipped to the 64 Ki port space).
    pub fn allow(&mut self, start: u64, len: u64) {
        for p in start..start.saturating_add(len).min(0x1_0000) {
            let p = usize::try_from(p).unwrap_or(0);
            self.0[p / 64] |= 1 << (p % 64);
        }
    }
    /// Whether every port of `port..port+len` is allowed.
    pub fn allowed(&self, port: u16, len: usize) -> bool {
        let start = usize::from(port);
        len > 0
            && start + len <= 0x1_0000
            && (start..start + len).all(|p| self.0[p / 64] & (1 << (p % 64)) != 0)
    }
    /// Allowed ports.
    pub fn count(&self) -> u32 {
        self.0.iter().map(|w| w.count_ones()).sum()
    }
}

/// A set of MMIO pages (page numbers).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MmioPages(BTreeSet<u64>);

impl MmioPages {
    /// Allow the pages overlapping `start..start+len`.
    pub fn allow(&mut self, start: u64, len: u64) {
        if len == 0 {
            return;
        }
        let last = start.saturating_add(len - 1) / MMIO_PAGE_SIZE;
        self.0.extend(start / MMIO_PAGE_SIZE..=last);
    }
    /// Whether every page of `addr..addr+len` is allowed.
    pub fn allowed(&self, addr: u64, len: u64) -> bool {
        let Some(last) = len.checked_sub(1).and_then(|l| addr.checked_add(l)) else {
            return false;
        };
        (addr / MMIO_PAGE_SIZE..=last / MMIO_PAGE_SIZE).all(|p| self.0.contains(&p))
    }
    /// The pages, in order.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.0.iter().copied()
    }
}

/// The interrupts of a device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IrqSet {
    /// INTx line, when the device has an interrupt pin.
    pub line: Option<u8>,
    /// Number of MSI-X vectors.
    pub msix_vectors: u16,
}

impl IrqSet {
    /// Whether `irq` belongs to the device.
    pub fn contains(&self, irq: Irq) -> bool {
        match irq {
            Irq::Line(l) => self.line == Some(l),
            Irq::MsiX(v) => v < self.msix_vectors,
        }
    }
}

/// The permission tables of a device, computed from its parsed config space.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tables {
    /// Ports of its I/O BARs.
    pub ports: PortBitmap,
    /// Pages of its memory BARs.
    pub mmio: MmioPages,
    /// Its interrupts.
    pub irqs: IrqSet,
    /// The command policy bits the manager sets: decode for the BAR kinds present, and bus
    /// mastering.
    pub command: u16,
}

impl Tables {
    /// Compute the tables (works for real devices from sysfs as for emulated ones).
    pub fn from_info(info: &DeviceInfo) -> Self {
        let mut t = Self {
            command: command::BUS_MASTER,
            ..Self::default()
        };
        for b in &info.bars {
            if b.kind == BarKind::Io {
                t.ports.allow(b.address, b.size);
                t.command |= command::IO_SPACE;
            } else {
                t.mmio.allow(b.address, b.size);
                t.command |= command::MEMORY_SPACE;
            }
        }
        t.irqs = IrqSet {
            line: (info.header.interrupt_pin != 0).then_some(info.header.interrupt_line),
            msix_vectors: info.msix().map_or(0, |m| m.table_size),
        };
        t
    }
}

/// What the virtualized view does with a config byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    Protected,
    Command,
    PassThrough,
    Bar,
    Rom,
}

/// A manager callback told of every violation.
pub type ViolationHook = Box<dyn Fn(&SpaceError) + Send + Sync>;

/// One device's I/O Space.
pub struct IoSpace {
    bdf: Bdf,
    device: Arc<dyn PciDevice>,
    info: DeviceInfo,
    ports: PortBitmap,
    mmio: MmioPages,
    irqs: IrqSet,
    classes: Box<[Class; CONFIG_SPACE_SIZE]>,
    assigned: BarRegisters,
    shadow: Mutex<BarRegisters>,
    command_fixed: u16,
    violations: AtomicU64,
    hook: Mutex<Option<ViolationHook>>,
}

impl std::fmt::Debug for IoSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoSpace")
            .field("bdf", &self.bdf)
            .field("ports", &self.ports)
            .field("mmio", &self.mmio)
            .field("irqs", &self.irqs)
            .finish_non_exhaustive()
    }
}

fn config_classes(info: &DeviceInfo) -> Box<[Class; CONFIG_SPACE_SIZE]> {
    let mut c = Box::new([Class::Protected; CONFIG_SPACE_SIZE]);
    let mut set = |from: u16, len: u16, class| {
        let f = usize::from(from);
        let e = (f + usize::from(len)).min(CONFIG_SPACE_SIZE);
        c[f..e].fill(class);
    };
    set(COMMAND, 2, Class::Command);
    set(STATUS, 2, Class::PassThrough);
    set(CACHE_LINE_SIZE, 1, Class::PassThrough);
    set(LATENCY_TIMER, 1, Class::PassThrough);
    set(BAR0, 4 * 6, Class::Bar);
    set(ROM_ADDRESS, 4, Class::Rom);
    for cap in &info.capabilities {
        if !matches!(cap, Capability::Other { .. }) {
            let len = u16::from(cap.len()).saturating_sub(2);
            set(u16::from(cap.offset()) + 2, len, Class::PassThrough);
        }
    }
    c
}

impl IoSpace {
    /// Compute the I/O Space of the device at `bdf` from its config space (probing BARs by the
    /// sizing protocol), and set its command register to the manager's policy: decode enabled
    /// for the BAR kinds it has, bus mastering on (every DMA goes through the IOMMU).
    pub fn new(bdf: Bdf, device: Arc<dyn PciDevice>) -> Result<Self, SpaceError> {
        let info =
            DeviceInfo::probe(&mut DeviceConfig(device.as_ref())).map_err(SpaceError::Probe)?;
        let Tables {
            ports,
            mmio,
            irqs,
            command: fixed,
        } = Tables::from_info(&info);
        let cmd = (info.header.command & !COMMAND_POLICY_BITS) | fixed;
        device.config_write(COMMAND, &cmd.to_le_bytes());
        let assigned = BarRegisters::new(&info.bars);
        Ok(Self {
            bdf,
            classes: config_classes(&info),
            shadow: Mutex::new(assigned.clone()),
            assigned,
            device,
            info,
            ports,
            mmio,
            irqs,
            command_fixed: fixed,
            violations: AtomicU64::new(0),
            hook: Mutex::new(None),
        })
    }

    /// The device's address.
    pub fn bdf(&self) -> Bdf {
        self.bdf
    }
    /// What was parsed from its config space.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }
    /// Its ports.
    pub fn ports(&self) -> &PortBitmap {
        &self.ports
    }
    /// Its MMIO pages.
    pub fn mmio_pages(&self) -> &MmioPages {
        &self.mmio
    }
    /// Its interrupts.
    pub fn irqs(&self) -> IrqSet {
        self.irqs
    }
    /// Refused accesses so far.
    pub fn violations(&self) -> u64 {
        self.violations.load(Ordering::Relaxed)
    }
    /// Call `hook` on every future violation.
    pub fn on_violation(&self, hook: ViolationHook) {
        *lock(&self.hook) = Some(hook);
    }

    fn refuse<T>(&self, e: SpaceError) -> Result<T, SpaceError> {
        self.violations.fetch_add(1, Ordering::Relaxed);
        if let Some(h) = lock(&self.hook).as_ref() {
            h(&e);
        }
        Err(e)
    }

    fn mmio_target(&self, addr: u64, len: usize) -> Result<(usize, u64), SpaceError> {
        let l = len as u64;
        if (1..=MAX_ACCESS).contains(&len) && self.mmio.allowed(addr, l) {
            let hit = self
                .info
                .bars
                .iter()
                .find(|b| b.kind != BarKind::Io && b.contains(addr, l));
            if let Some(b) = hit {
                return Ok((b.index, addr - b.address));
            }
        }
        self.refuse(SpaceError::Mmio { addr, len })
    }

    fn port_target(&self, port: u16, len: usize) -> Result<(usize, u64), SpaceError> {
        let (p, l) = (u64::from(port), len as u64);
        if (1..=4).contains(&len) && self.ports.allowed(port, len) {
            let hit = self
                .info
                .bars
                .iter()
                .find(|b| b.kind == BarKind::Io && b.contains(p, l));
            if let Some(b) = hit {
                return Ok((b.index, p - b.address));
            }
        }
        self.refuse(SpaceError::Port { port, len })
    }

    /// MMIO read (1..=8 bytes) inside one memory BAR.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> Result<(), SpaceError> {
        let (bar, off) = self.mmio_target(addr, data.len())?;
        self.device.bar_read(bar, off, data);
        Ok(())
    }
    /// MMIO write (1..=8 bytes) inside one memory BAR.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> Result<(), SpaceError> {
        let (bar, off) = self.mmio_target(addr, data.len())?;
        self.device.bar_write(bar, off, data);
        Ok(())
    }
    /// Port read (1..=4 bytes) inside one I/O BAR.
    pub fn port_read(&self, port: u16, data: &mut [u8]) -> Result<(), SpaceError> {
        let (bar, off) = self.port_target(port, data.len())?;
        self.device.bar_read(bar, off, data);
        Ok(())
    }
    /// Port write (1..=4 bytes) inside one I/O BAR.
    pub fn port_write(&self, port: u16, data: &[u8]) -> Result<(), SpaceError> {
        let (bar, off) = self.port_target(port, data.len())?;
        self.device.bar_write(bar, off, data);
        Ok(())
    }

    /// Deliver the device's `irq` to `fd` (`None` disconnects it).
    pub fn bind_irq(&self, irq: Irq, fd: Option<EventFd>) -> Result<(), SpaceError> {
        if !self.irqs.contains(irq) {
            return self.refuse(SpaceError::Irq(irq));
        }
        self.device
            .set_irq_notifier(irq, fd)
            .map_err(SpaceError::Device)
    }

    fn check_config(&self, bdf: Bdf, offset: u16, len: usize) -> Result<(), SpaceError> {
        if bdf != self.bdf {
            return self.refuse(SpaceError::OtherDevice(bdf));
        }
        if !valid_config_access(offset, len) {
            return self.refuse(SpaceError::ConfigOffset { offset, len });
        }
        Ok(())
    }

    /// The dword at aligned `offset` as the view shows it.
    fn view_dword(&self, offset: u16) -> u32 {
        match self.classes[usize::from(offset)] {
            Class::Bar => lock(&self.shadow).raw[usize::from((offset - BAR0) / 4)],
            Class::Rom => 0,
            _ => self.device.config_read(offset),
        }
    }

    /// Read `len` (1, 2 or 4) bytes of config space at `offset` of function `bdf`.
    pub fn config_read(&self, bdf: Bdf, offset: u16, len: usize) -> Result<u32, SpaceError> {
        self.check_config(bdf, offset, len)?;
        let d = self.view_dword(offset & !3);
        let v = d >> ((offset & 3) * 8);
        Ok(match len {
            4 => v,
            2 => v & 0xffff,
            _ => v & 0xff,
        })
    }

    /// Write `data` (1, 2 or 4 bytes, aligned) to config space at `offset` of function `bdf`.
    pub fn config_write(&self, bdf: Bdf, offset: u16, data: &[u8]) -> Result<(), SpaceError> {
        self.check_config(bdf, offset, data.len())?;
        let o = usize::from(offset);
        match self.classes[o] {
            Class::Bar => return self.write_bar(offset, data),
            Class::Rom => return Ok(()),
            _ => {}
        }
        let base = offset & !3;
        let current = self.device.config_read(base).to_le_bytes();
        let mut new = current;
        let at = o % 4;
        new[at..at + data.len()].copy_from_slice(data);
        for i in at..at + data.len() {
            let byte_off = base + u16::try_from(i).unwrap_or(0);
            match self.classes[usize::from(byte_off)] {
                Class::Protected if new[i] != current[i] => {
                    return self.refuse(SpaceError::Protected(byte_off));
                }
                Class::Command => {
                    let c = usize::from(COMMAND - base);
                    let cmd = u16::from_le_bytes([new[c], new[c + 1]]);
                    if cmd & COMMAND_POLICY_BITS != self.command_fixed {
                        return self.refuse(SpaceError::CommandPolicy(cmd));
                    }
                }
                _ => {}
            }
        }
        self.device.config_write(offset, data);
        Ok(())
    }

    fn write_bar(&self, offset: u16, data: &[u8]) -> Result<(), SpaceError> {
        let Ok(d) = <[u8; 4]>::try_from(data) else {
            let value = data.iter().rev().fold(0u32, |a, b| a << 8 | u32::from(*b));
            return self.refuse(SpaceError::MoveBar { offset, value });
        };
        let value = u32::from_le_bytes(d);
        let idx = usize::from((offset - BAR0) / 4);
        let w = self.assigned.writable[idx];
        let sizing = value & w == w;
        let restoring = value & w == self.assigned.raw[idx] & w;
        if !sizing && !restoring {
            return self.refuse(SpaceError::MoveBar { offset, value });
        }
        lock(&self.shadow).write(idx, value);
        Ok(())
    }

    /// Config offsets of the BAR dwords (for callers building access patterns).
    pub fn bar_offsets() -> impl Iterator<Item = u16> {
        (0..NUM_BARS).map(bar_offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emu::{PciBus, StubDevice};
    use crate::pci::bar::size_bars;
    use crate::pci::{ConfigAccess, Result as PciResult};

    fn space() -> (Arc<StubDevice>, IoSpace) {
        let bus = PciBus::new();
        let dev = Arc::new(StubDevice::new(StubDevice::example_config()));
        let bdf = bus.plug(2, dev.clone()).unwrap();
        let s = IoSpace::new(bdf, dev.clone()).unwrap();
        (dev, s)
    }

    /// A driver's view of config space through the I/O Space (so it can run the sizing code).
    struct View<'a>(&'a IoSpace);
    impl ConfigAccess for View<'_> {
        fn read_u32(&self, offset: u16) -> PciResult<u32> {
            self.0
                .config_read(self.0.bdf(), offset, 4)
                .map_err(|_| PciError::BadOffset(offset))
        }
        fn write_u32(&mut self, offset: u16, value: u32) -> PciResult<()> {
            self.0
                .config_write(self.0.bdf(), offset, &value.to_le_bytes())
                .map_err(|_| PciError::ReadOnly)
        }
    }

    fn mask_size(v: &View<'_>, i: usize) -> u64 {
        let off = bar_offset(i);
        v.0.config_write(v.0.bdf(), off, &u32::MAX.to_le_bytes())
            .unwrap();
        let m = v.read_u32(off).unwrap() & !0xf;
        v.0.config_write(v.0.bdf(), off, &v.0.assigned.raw[i].to_le_bytes())
            .unwrap();
        u64::from((!m).wrapping_add(1))
    }

    #[test]
    fn tables_from_config() {
        let (_, s) = space();
        assert_eq!(s.ports().count(), 0x40);
        assert!(s.ports().allowed(0xc000, 4) && !s.ports().allowed(0xc03e, 4));
        assert_eq!(s.mmio_pages().pages().count(), 0x20 + 4);
        assert_eq!(
            s.irqs(),
            IrqSet {
                line: Some(10),
                msix_vectors: 4
            }
        );
        let cmd = s.config_read(s.bdf(), COMMAND, 2).unwrap();
        assert_eq!(
            cmd & u32::from(COMMAND_POLICY_BITS),
            u32::from(COMMAND_POLICY_BITS)
        );
    }

    #[test]
    fn sizing_through_the_view_never_moves_the_bar() {
        let (dev, s) = space();
        let before: Vec<u32> = IoSpace::bar_offsets().map(|o| dev.config_read(o)).collect();
        // The generic sizing code toggles decode, which the policy refuses (and counts).
        assert!(size_bars(&mut View(&s)).is_err());
        assert_eq!(s.violations(), 1);
        // Sizing each BAR by hand, as a driver does with decode left on, works.
        let mut v = View(&s);
        for (i, off) in IoSpace::bar_offsets().enumerate() {
            let orig = v.read_u32(off).unwrap();
            v.write_u32(off, u32::MAX).unwrap();
            let mask = v.read_u32(off).unwrap();
            v.write_u32(off, orig).unwrap();
            assert_eq!(v.read_u32(off).unwrap(), orig);
            assert_eq!(
                mask,
                s.assigned.writable[i] | (orig & !s.assigned.writable[i])
            );
        }
        assert_eq!(mask_size(&v, 0), 0x2_0000);
        let after: Vec<u32> = IoSpace::bar_offsets().map(|o| dev.config_read(o)).collect();
        assert_eq!(before, after);
        assert_eq!(s.violations(), 1);
    }

    #[test]
    fn refusals_are_counted_and_reported() {
        let (dev, s) = space();
        let seen = Arc::new(AtomicU64::new(0));
        let s2 = seen.clone();
        s.on_violation(Box::new(move |_| {
            s2.fetch_add(1, Ordering::Relaxed);
        }));
        let me = s.bdf();
        let other = Bdf::new(0, 3, 0).unwrap();
        assert!(matches!(
            s.config_read(other, 0, 4),
            Err(SpaceError::OtherDevice(_))
        ));
        assert!(matches!(
            s.config_read(me, 2, 4),
            Err(SpaceError::ConfigOffset { .. })
        ));
        assert!(matches!(
            s.config_write(me, 0x100, &[0]),
            Err(SpaceError::ConfigOffset { .. })
        ));
        assert!(matches!(
            s.config_write(me, BAR0, &0x1234_0000u32.to_le_bytes()),
            Err(SpaceError::MoveBar { .. })
        ));
        assert!(matches!(
            s.config_write(me, BAR0, &[0xff, 0xff]),
            Err(SpaceError::MoveBar { .. })
        ));
        assert!(matches!(
            s.config_write(me, COMMAND, &[0]),
            Err(SpaceError::CommandPolicy(_))
        ));
        assert!(matches!(
            s.config_write(me, 0, &[0x34, 0x12]),
            Err(SpaceError::Protected(0))
        ));
        assert!(matches!(
            s.config_write(me, 0x3c, &[5]),
            Err(SpaceError::Protected(0x3c))
        ));
        assert!(matches!(
            s.mmio_read(0x1000, &mut [0; 4]),
            Err(SpaceError::Mmio { .. })
        ));
        assert!(matches!(
            s.port_write(0x60, &[0]),
            Err(SpaceError::Port { .. })
        ));
        assert!(matches!(
            s.bind_irq(Irq::MsiX(4), None),
            Err(SpaceError::Irq(_))
        ));
        assert!(matches!(
            s.bind_irq(Irq::Line(3), None),
            Err(SpaceError::Irq(_))
        ));
        assert_eq!(s.violations(), 12);
        assert_eq!(seen.load(Ordering::Relaxed), 12);
        // Allowed things are not counted and reach the device.
        let cmd = s.config_read(me, COMMAND, 2).unwrap();
        let with_intx = u16::try_from(cmd).unwrap() | command::INTX_DISABLE;
        s.config_write(me, COMMAND, &with_intx.to_le_bytes())
            .unwrap();
        assert_eq!(dev.config_read(COMMAND) & 0xffff, u32::from(with_intx));
        s.config_write(me, 0x0c, &[0x10]).unwrap();
        s.config_write(me, 0, &[0x86, 0x80]).unwrap(); // unchanged bytes are fine
        let b0 = s.info().bars[0].address;
        s.mmio_write(b0 + 8, &[1, 2, 3, 4]).unwrap();
        let mut r = [0; 4];
        s.mmio_read(b0 + 8, &mut r).unwrap();
        assert_eq!(r, [1, 2, 3, 4]);
        s.port_write(0xc000, &[7]).unwrap();
        let fd = EventFd::new(0).unwrap();
        s.bind_irq(Irq::MsiX(3), Some(fd.try_clone().unwrap()))
            .unwrap();
        assert!(dev.raise(Irq::MsiX(3)));
        assert_eq!(fd.read().unwrap(), 1);
        assert_eq!(s.violations(), 12);
    }

    #[test]
    fn maps() {
        let mut m = MmioPages::default();
        m.allow(0x1000, 0x10);
        assert!(m.allowed(0x1ff8, 8) && !m.allowed(0x1ff8, 9) && !m.allowed(u64::MAX, 2));
        assert!(!m.allowed(0x1000, 0));
        let mut p = PortBitmap::default();
        p.allow(0xfff0, 0x100);
        assert_eq!(p.count(), 0x10);
        assert!(!p.allowed(0xffff, 2) && p.allowed(0xffff, 1));
    }
}
