//! PCI configuration space: registers, the type-0 header, BARs and the capability list.
//!
//! # Type-0 header layout (PCI Local Bus 3.0, §6.1)
//!
//! | offset | size | register |
//! |---|---|---|
//! | 0x00 | 2 | vendor ID (`0xffff` = no device) |
//! | 0x02 | 2 | device ID |
//! | 0x04 | 2 | command ([`command`] bits) |
//! | 0x06 | 2 | status ([`status`] bits; `CAP_LIST` = capability list present) |
//! | 0x08 | 1 | revision ID |
//! | 0x09 | 3 | class code: programming interface, subclass, base class |
//! | 0x0c | 1 | cache line size |
//! | 0x0d | 1 | latency timer |
//! | 0x0e | 1 | header type (bit 7 = multi-function; low 7 bits 0 = endpoint) |
//! | 0x0f | 1 | BIST |
//! | 0x10 | 24 | BAR0..BAR5 (see [`bar`]) |
//! | 0x28 | 4 | CardBus CIS pointer |
//! | 0x2c | 2 | subsystem vendor ID |
//! | 0x2e | 2 | subsystem ID |
//! | 0x30 | 4 | expansion ROM base address |
//! | 0x34 | 1 | capabilities pointer (see [`caps`]) |
//! | 0x3c | 1 | interrupt line |
//! | 0x3d | 1 | interrupt pin (0 = none, 1..=4 = INTA#..INTD#) |
//! | 0x3e | 1 | min grant |
//! | 0x3f | 1 | max latency |
//!
//! Config space is accessed through [`ConfigAccess`], dword-aligned, little-endian; byte and
//! word reads are derived from the dword that holds them. Everything read from a device (or a
//! dump of one) is untrusted: the parsers bound every pointer and never panic.

pub mod bar;
pub mod caps;
pub mod sysfs;
pub mod names;

pub use bar::{Bar, BarKind};
pub use caps::{Capability, VirtioCap};

/// Size of the conventional config space every function has.
pub const CONFIG_SPACE_SIZE: usize = 256;
/// Size of the PCIe extended config space.
pub const EXT_CONFIG_SPACE_SIZE: usize = 4096;

/// Vendor ID.
pub const VENDOR_ID: u16 = 0x00;
/// Device ID.
pub const DEVICE_ID: u16 = 0x02;
/// Command register.
pub const COMMAND: u16 = 0x04;
/// Status register.
pub const STATUS: u16 = 0x06;
/// Revision ID.
pub const REVISION_ID: u16 = 0x08;
/// Programming interface (low byte of the class code).
pub const PROG_IF: u16 = 0x09;
/// Subclass.
pub const SUBCLASS: u16 = 0x0a;
/// Base class.
pub const CLASS: u16 = 0x0b;
/// Cache line size.
pub const CACHE_LINE_SIZE: u16 = 0x0c;
/// Latency timer.
pub const LATENCY_TIMER: u16 = 0x0d;
/// Header type.
pub const HEADER_TYPE: u16 = 0x0e;
/// BIST.
pub const BIST: u16 = 0x0f;
/// BAR0; BAR n is at `BAR0 + 4 * n`.
pub const BAR0: u16 = 0x10;
/// Number of BARs in a type-0 header.
pub const NUM_BARS: usize = 6;
/// CardBus CIS pointer.
pub const CARDBUS_CIS: u16 = 0x28;
/// Subsystem vendor ID.
pub const SUBSYSTEM_VENDOR_ID: u16 = 0x2c;
/// Subsystem ID.
pub const SUBSYSTEM_ID: u16 = 0x2e;
/// Expansion ROM base address.
pub const ROM_ADDRESS: u16 = 0x30;
/// Capabilities pointer.
pub const CAPABILITIES_POINTER: u16 = 0x34;
/// Interrupt line.
pub const INTERRUPT_LINE: u16 = 0x3c;
/// Interrupt pin.
pub const INTERRUPT_PIN: u16 = 0x3d;
/// Min grant.
pub const MIN_GNT: u16 = 0x3e;
/// Max latency.
pub const MAX_LAT: u16 = 0x3f;
/// First byte after the type-0 header (capabilities live at or above it).
pub const HEADER_END: u16 = 0x40;

/// Vendor ID read from an empty slot.
pub const VENDOR_NONE: u16 = 0xffff;
/// Header type bit: the device has more than one function.
pub const HEADER_TYPE_MULTIFUNCTION: u8 = 0x80;
/// Header layout mask of the header type register.
pub const HEADER_TYPE_MASK: u8 = 0x7f;
/// Header layout: endpoint (type 0).
pub const HEADER_TYPE_NORMAL: u8 = 0;

/// Command register bits.
pub mod command {
    /// Respond to I/O space accesses.
    pub const IO_SPACE: u16 = 1 << 0;
    /// Respond to memory space accesses.
    pub const MEMORY_SPACE: u16 = 1 << 1;
    /// May master the bus (DMA, MSI).
    pub const BUS_MASTER: u16 = 1 << 2;
    /// Parity error response.
    pub const PARITY_ERROR_RESPONSE: u16 = 1 << 6;
    /// SERR# enable.
    pub const SERR_ENABLE: u16 = 1 << 8;
    /// INTx emulation disabled.
    pub const INTX_DISABLE: u16 = 1 << 10;
}

/// Status register bits.
pub mod status {
    /// INTx asserted.
    pub const INTERRUPT: u16 = 1 << 3;
    /// The capability list is present.
    pub const CAP_LIST: u16 = 1 << 4;
}

/// Why a config-space operation failed.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum PciError {
    /// Offset not dword-aligned or beyond the config space.
    #[error("Config offset {0:#x} is not an aligned dword inside config space")]
    BadOffset(u16),
    /// The accessor does not allow writes.
    #[error("Config space is read-only")]
    ReadOnly,
    /// Vendor ID is `0xffff`.
    #[error("No device present")]
    NoDevice,
    /// The header type is not 0.
    #[error("Unsupported header type {0:#x}")]
    UnsupportedHeader(u8),
    /// A BAR is malformed.
    #[error("BAR{index}: {reason}")]
    BadBar {
        /// BAR number.
        index: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// A capability pointer leads outside the capability area.
    #[error("Capability pointer {0:#x} out of range")]
    CapPointer(u8),
    /// The capability list visits a capability twice.
    #[error("Capability list loops at {0:#x}")]
    CapLoop(u8),
    /// Two capabilities overlap.
    #[error("Capability at {0:#x} overlaps another")]
    CapOverlap(u8),
    /// A capability's fields are inconsistent.
    #[error("Malformed capability at {offset:#x}: {reason}")]
    CapMalformed {
        /// Where it is.
        offset: u8,
        /// What is wrong.
        reason: &'static str,
    },
    /// A config dump is too short.
    #[error("Config dump of {0} bytes is shorter than 64")]
    ShortDump(usize),
    /// Reading sysfs failed.
    #[error("Reading {path}")]
    Sysfs {
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: IoError,
    },
    /// A sysfs file had unexpected contents.
    #[error("Malformed sysfs file {0}")]
    SysfsFormat(String),
}

/// An I/O error that can be cloned and compared (by kind), so [`PciError`] can be too.
#[derive(Debug, Clone, thiserror::Error)]
#[error(transparent)]
pub struct IoError(#[from] pub std::sync::Arc<std::io::Error>);

impl PartialEq for IoError {
    fn eq(&self, other: &Self) -> bool {
        self.0.kind() == other.0.kind()
    }
}
impl Eq for IoError {}

/// Result of config-space operations.
pub type Result<T> = std::result::Result<T, PciError>;

/// Read (and possibly write) a function's config space, one aligned dword at a time.
pub trait ConfigAccess {
    /// Bytes of config space (256 or 4096).
    fn size(&self) -> usize {
        CONFIG_SPACE_SIZE
    }
    /// The dword at `offset` (4-byte aligned, below `size()`).
    fn read_u32(&self, offset: u16) -> Result<u32>;
    /// Write the dword at `offset`.
    fn write_u32(&mut self, offset: u16, value: u32) -> Result<()>;

    /// The word at `offset` (2-byte aligned).
    fn read_u16(&self, offset: u16) -> Result<u16> {
        if offset % 2 != 0 {
            return Err(PciError::BadOffset(offset));
        }
        let d = self.read_u32(offset & !3)?;
        Ok(u16::try_from((d >> ((offset & 2) * 8)) & 0xffff).unwrap_or(0))
    }
    /// The byte at `offset`.
    fn read_u8(&self, offset: u16) -> Result<u8> {
        let d = self.read_u32(offset & !3)?;
        Ok(u8::try_from((d >> ((offset & 3) * 8)) & 0xff).unwrap_or(0))
    }
}

/// Check a dword offset against a config space of `size` bytes.
pub fn check_dword(offset: u16, size: usize) -> Result<usize> {
    let o = usize::from(offset);
    if o % 4 != 0 || o + 4 > size {
        return Err(PciError::BadOffset(offset));
    }
    Ok(o)
}

/// A read-only config space held in memory (a dump from sysfs or a test).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigDump {
    bytes: Vec<u8>,
}

impl ConfigDump {
    /// A dump of at least the 64-byte header; longer dumps are cut to 4096 bytes and shorter
    /// tails read as zero up to 256 bytes (like a device without capabilities there).
    pub fn new(bytes: &[u8]) -> Result<Self> {
        if bytes.len() < usize::from(HEADER_END) {
            return Err(PciError::ShortDump(bytes.len()));
        }
        let len = if bytes.len() > CONFIG_SPACE_SIZE {
            EXT_CONFIG_SPACE_SIZE
        } else {
            CONFIG_SPACE_SIZE
        };
        let mut b = vec![0u8; len];
        let n = bytes.len().min(len);
        b[..n].copy_from_slice(&bytes[..n]);
        Ok(Self { bytes: b })
    }

    /// The raw bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

impl ConfigAccess for ConfigDump {
    fn size(&self) -> usize {
        self.bytes.len()
    }
    fn read_u32(&self, offset: u16) -> Result<u32> {
        let o = check_dword(offset, self.bytes.len())?;
        let mut d = [0u8; 4];
        d.copy_from_slice(&self.bytes[o..o + 4]);
        Ok(u32::from_le_bytes(d))
    }
    fn write_u32(&mut self, _offset: u16, _value: u32) -> Result<()> {
        Err(PciError::ReadOnly)
    }
}

/// The identifying fields of a type-0 header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Command register.
    pub command: u16,
    /// Status register.
    pub status: u16,
    /// Revision ID.
    pub revision: u8,
    /// Programming interface.
    pub prog_if: u8,
    /// Subclass.
    pub subclass: u8,
    /// Base class.
    pub class: u8,
    /// Header type as read (including the multi-function bit).
    pub header_type: u8,
    /// Subsystem vendor ID.
    pub subsystem_vendor_id: u16,
    /// Subsystem ID.
    pub subsystem_id: u16,
    /// Capabilities pointer (meaningful when `status` has `CAP_LIST`).
    pub cap_pointer: u8,
    /// Interrupt line.
    pub interrupt_line: u8,
    /// Interrupt pin (0 = none).
    pub interrupt_pin: u8,
}

impl Header {
    /// Parse a type-0 header.
    pub fn parse(cfg: &dyn ConfigAccess) -> Result<Self> {
        let vendor_id = cfg.read_u16(VENDOR_ID)?;
        if vendor_id == VENDOR_NONE {
            return Err(PciError::NoDevice);
        }
        let header_type = cfg.read_u8(HEADER_TYPE)?;
        if header_type & HEADER_TYPE_MASK != HEADER_TYPE_NORMAL {
            return Err(PciError::UnsupportedHeader(header_type));
        }
        Ok(Self {
            vendor_id,
            device_id: cfg.read_u16(DEVICE_ID)?,
            command: cfg.read_u16(COMMAND)?,
            status: cfg.read_u16(STATUS)?,
            revision: cfg.read_u8(REVISION_ID)?,
            prog_if: cfg.read_u8(PROG_IF)?,
            subclass: cfg.read_u8(SUBCLASS)?,
            class: cfg.read_u8(CLASS)?,
            header_type,
            subsystem_vendor_id: cfg.read_u16(SUBSYSTEM_VENDOR_ID)?,
            subsystem_id: cfg.read_u16(SUBSYSTEM_ID)?,
            cap_pointer: cfg.read_u8(CAPABILITIES_POINTER)?,
            interrupt_line: cfg.read_u8(INTERRUPT_LINE)?,
            interrupt_pin: cfg.read_u8(INTERRUPT_PIN)?,
        })
    }

    /// Whether the device has more than one function.
    pub fn multifunction(&self) -> bool {
        self.header_type & HEADER_TYPE_MULTIFUNCTION != 0
    }

    /// Whether a capability list is present.
    pub fn has_capabilities(&self) -> bool {
        self.status & status::CAP_LIST != 0
    }

    /// The vendor's name from the system's PCI ID database ([`names`]).
    pub fn vendor_name(&self) -> Option<&'static str> {
        names::db()?.vendors.get(&self.vendor_id).map(|v| v.name.as_str())
    }

    /// The device's name from the system's PCI ID database.
    pub fn device_name(&self) -> Option<&'static str> {
        let vendor = names::db()?.vendors.get(&self.vendor_id)?;
        vendor.devices.get(&self.device_id).map(|d| d.name.as_str())
    }

    /// The class/subclass name from the system's PCI ID database.
    pub fn class_name(&self) -> Option<&'static str> {
        let class = names::db()?.classes.get(&self.class)?;
        class.subclasses.get(&self.subclass).map(|s| s.name.as_str())
    }

    /// "vendor device" as lspci would print it, with hex ids where the database has no name.
    pub fn display_name(&self) -> String {
        let v = self
            .vendor_name()
            .map_or_else(|| format!("{:04x}", self.vendor_id), str::to_owned);
        let d = self
            .device_name()
            .map_or_else(|| format!("{:04x}", self.device_id), str::to_owned);
        format!("{v} {d}")
    }
}

/// A function's address on a PCI segment: bus, device (0..32), function (0..8).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bdf {
    /// Bus.
    pub bus: u8,
    /// Device (5 bits).
    pub device: u8,
    /// Function (3 bits).
    pub function: u8,
}

impl Bdf {
    /// A checked address.
    pub fn new(bus: u8, device: u8, function: u8) -> Option<Self> {
        (device < 32 && function < 8).then_some(Self {
            bus,
            device,
            function,
        })
    }
}

impl std::fmt::Display for Bdf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "0000:{:02x}:{:02x}.{:x}",
            self.bus, self.device, self.function
        )
    }
}

/// Everything parsed from one function's config space.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The header.
    pub header: Header,
    /// Its BARs (implemented ones only).
    pub bars: Vec<Bar>,
    /// Its capabilities, in list order.
    pub capabilities: Vec<Capability>,
}

impl DeviceInfo {
    /// Parse the header and capability list and size the BARs by the write-ones protocol
    /// (restoring every BAR and the command register afterwards).
    pub fn probe(cfg: &mut dyn ConfigAccess) -> Result<Self> {
        let header = Header::parse(cfg)?;
        let capabilities = caps::walk(cfg)?;
        let bars = bar::size_bars(cfg)?;
        Ok(Self {
            header,
            bars,
            capabilities,
        })
    }

    /// The MSI-X capability, if any.
    pub fn msix(&self) -> Option<&caps::MsiX> {
        self.capabilities.iter().find_map(|c| match c {
            Capability::MsiX(m) => Some(m),
            _ => None,
        })
    }

    /// The BAR with this index.
    pub fn bar(&self, index: usize) -> Option<&Bar> {
        self.bars.iter().find(|b| b.index == index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dump() -> Vec<u8> {
        let mut b = vec![0u8; 256];
        b[0..2].copy_from_slice(&0x1af4u16.to_le_bytes());
        b[2..4].copy_from_slice(&0x1042u16.to_le_bytes());
        b[4..6].copy_from_slice(&(command::MEMORY_SPACE | command::BUS_MASTER).to_le_bytes());
        b[8] = 1;
        b[0x0a] = 0x00;
        b[0x0b] = 0x01;
        b[0x2c..0x2e].copy_from_slice(&0x1af4u16.to_le_bytes());
        b[0x2e..0x30].copy_from_slice(&2u16.to_le_bytes());
        b[0x3c] = 11;
        b[0x3d] = 1;
        b
    }

    #[test]
    fn parses_header_and_names() {
        let d = ConfigDump::new(&dump()).unwrap();
        let h = Header::parse(&d).unwrap();
        assert_eq!((h.vendor_id, h.device_id, h.revision), (0x1af4, 0x1042, 1));
        assert_eq!((h.class, h.subclass), (1, 0));
        assert_eq!((h.subsystem_vendor_id, h.subsystem_id), (0x1af4, 2));
        assert_eq!((h.interrupt_line, h.interrupt_pin), (11, 1));
        assert!(!h.has_capabilities() && !h.multifunction());
        assert_eq!(h.vendor_name(), Some("Red Hat, Inc."));
        assert!(h.device_name().unwrap().contains("block"), "{h:?}");
        assert_eq!(h.class_name(), Some("SCSI storage controller"));
        assert_eq!(d.read_u16(3).unwrap_err(), PciError::BadOffset(3));
        assert_eq!(d.read_u32(256).unwrap_err(), PciError::BadOffset(256));
    }

    #[test]
    fn rejects_empty_bridge_and_short() {
        let mut b = dump();
        b[0] = 0xff;
        b[1] = 0xff;
        assert_eq!(
            Header::parse(&ConfigDump::new(&b).unwrap()),
            Err(PciError::NoDevice)
        );
        let mut b = dump();
        b[usize::from(HEADER_TYPE)] = 0x81;
        assert_eq!(
            Header::parse(&ConfigDump::new(&b).unwrap()),
            Err(PciError::UnsupportedHeader(0x81))
        );
        assert_eq!(ConfigDump::new(&[0; 10]), Err(PciError::ShortDump(10)));
        assert_eq!(ConfigDump::new(&[0; 64]).unwrap().size(), 256);
        assert_eq!(ConfigDump::new(&[0; 300]).unwrap().size(), 4096);
    }
}
