//! The capability list.
//!
//! # Layout
//!
//! When status bit `CAP_LIST` is set, the byte at `0x34` points at the first capability. Each
//! capability starts with `[id: u8, next: u8]`; `next == 0` ends the list. Pointers are
//! dword-aligned (the low two bits are ignored, as hardware does) and must lie in
//! `0x40..=0xfc`. Bodies used here:
//!
//! | id | capability | body |
//! |---|---|---|
//! | `0x05` | MSI | `+2` control (bit 0 enable, 3:1 multiple-message capable, 7 64-bit, 8 per-vector mask); 10/14/20/24 bytes long |
//! | `0x09` | vendor-specific | `+2` length; virtio (vendor `0x1af4`): `+3` cfg_type, `+4` bar, `+5` id, `+8` offset (le32), `+12` length (le32), notify adds `+16` notify_off_multiplier |
//! | `0x10` | PCI Express | `+2` capabilities (3:0 version, 7:4 device/port type); 0x3c bytes (v2) |
//! | `0x11` | MSI-X | `+2` control (10:0 table size − 1, 14 function mask, 15 enable), `+4` table offset \| BIR, `+8` PBA offset \| BIR; 12 bytes |
//!
//! The list comes from the device, so the walk is bounded (at most 48 entries, the number of
//! dwords above the header), refuses a pointer it has seen (a loop), a pointer outside the
//! capability area, and a capability whose body overlaps another's.

use super::{
    status, ConfigAccess, PciError, Result, CAPABILITIES_POINTER, CONFIG_SPACE_SIZE, HEADER_END,
    NUM_BARS, STATUS, VENDOR_ID,
};

/// Capability ID: power management.
pub const CAP_ID_PM: u8 = 0x01;
/// Capability ID: MSI.
pub const CAP_ID_MSI: u8 = 0x05;
/// Capability ID: vendor-specific.
pub const CAP_ID_VENDOR: u8 = 0x09;
/// Capability ID: PCI Express.
pub const CAP_ID_PCIE: u8 = 0x10;
/// Capability ID: MSI-X.
pub const CAP_ID_MSIX: u8 = 0x11;

/// Offset of the next pointer within a capability.
pub const CAP_NEXT: u8 = 1;
/// MSI: control register.
pub const MSI_CONTROL: u8 = 2;
/// MSI control: enable.
pub const MSI_CTL_ENABLE: u16 = 1 << 0;
/// MSI control: 64-bit address.
pub const MSI_CTL_64BIT: u16 = 1 << 7;
/// MSI control: per-vector masking.
pub const MSI_CTL_PER_VECTOR_MASK: u16 = 1 << 8;
/// MSI-X: control register.
pub const MSIX_CONTROL: u8 = 2;
/// MSI-X: table offset and BIR.
pub const MSIX_TABLE: u8 = 4;
/// MSI-X: PBA offset and BIR.
pub const MSIX_PBA: u8 = 8;
/// MSI-X control: table size minus one.
pub const MSIX_CTL_TABLE_SIZE: u16 = 0x07ff;
/// MSI-X control: all vectors masked.
pub const MSIX_CTL_FUNCTION_MASK: u16 = 1 << 14;
/// MSI-X control: enable.
pub const MSIX_CTL_ENABLE: u16 = 1 << 15;
/// MSI-X table/PBA register: BAR indicator bits.
pub const MSIX_BIR_MASK: u32 = 0x7;
/// Bytes per MSI-X table entry (address lo, address hi, data, vector control).
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// MSI-X length.
pub const MSIX_CAP_LEN: u8 = 12;
/// PCIe: capabilities register.
pub const PCIE_CAPS: u8 = 2;
/// PCIe (v2) capability length.
pub const PCIE_CAP_LEN_V2: u8 = 0x3c;
/// PCIe (v1) capability length.
pub const PCIE_CAP_LEN_V1: u8 = 0x24;
/// Vendor-specific: length byte.
pub const VENDOR_CAP_LEN: u8 = 2;
/// The virtio vendor ID.
pub const VIRTIO_VENDOR_ID: u16 = 0x1af4;

/// Virtio PCI capability fields (virtio 1.2 §4.1.4).
pub mod virtio {
    /// `cfg_type`.
    pub const CFG_TYPE: u8 = 3;
    /// `bar`.
    pub const BAR: u8 = 4;
    /// `id`.
    pub const ID: u8 = 5;
    /// `offset` (le32).
    pub const OFFSET: u8 = 8;
    /// `length` (le32).
    pub const LENGTH: u8 = 12;
    /// `notify_off_multiplier` (le32, notify capability only).
    pub const NOTIFY_OFF_MULTIPLIER: u8 = 16;
    /// Length of `struct virtio_pci_cap`.
    pub const CAP_LEN: u8 = 16;
    /// Length of `struct virtio_pci_notify_cap`.
    pub const NOTIFY_CAP_LEN: u8 = 20;
    /// Common configuration.
    pub const COMMON_CFG: u8 = 1;
    /// Notifications.
    pub const NOTIFY_CFG: u8 = 2;
    /// ISR status.
    pub const ISR_CFG: u8 = 3;
    /// Device-specific configuration.
    pub const DEVICE_CFG: u8 = 4;
    /// PCI configuration access.
    pub const PCI_CFG: u8 = 5;
}

/// An MSI capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Msi {
    /// Where it is.
    pub offset: u8,
    /// Control register.
    pub control: u16,
}

impl Msi {
    /// 64-bit message address.
    pub fn is_64bit(&self) -> bool {
        self.control & MSI_CTL_64BIT != 0
    }
    /// Per-vector masking.
    pub fn per_vector_mask(&self) -> bool {
        self.control & MSI_CTL_PER_VECTOR_MASK != 0
    }
    /// Vectors the function can request (1, 2, 4, .. 32).
    pub fn vectors(&self) -> u32 {
        1 << ((self.control >> 1) & 0x7).min(5)
    }
    /// Byte length of the capability.
    pub fn len(&self) -> u8 {
        match (self.is_64bit(), self.per_vector_mask()) {
            (false, false) => 10,
            (true, false) => 14,
            (false, true) => 20,
            (true, true) => 24,
        }
    }
    /// Never empty; present for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// An MSI-X capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiX {
    /// Where it is.
    pub offset: u8,
    /// Control register.
    pub control: u16,
    /// Number of table entries (1..=2048).
    pub table_size: u16,
    /// BAR holding the table.
    pub table_bar: u8,
    /// Offset of the table in that BAR.
    pub table_offset: u32,
    /// BAR holding the pending-bit array.
    pub pba_bar: u8,
    /// Offset of the PBA in that BAR.
    pub pba_offset: u32,
}

/// A virtio PCI capability (a vendor-specific capability of a virtio device).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioCap {
    /// Structure type (`virtio::COMMON_CFG` ...).
    pub cfg_type: u8,
    /// BAR it lives in.
    pub bar: u8,
    /// Instance id.
    pub id: u8,
    /// Offset within the BAR.
    pub offset: u32,
    /// Length of the structure.
    pub length: u32,
    /// Notify capability's multiplier (0 otherwise).
    pub notify_off_multiplier: u32,
}

/// One capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capability {
    /// MSI.
    Msi(Msi),
    /// MSI-X.
    MsiX(MsiX),
    /// PCI Express.
    PciExpress {
        /// Where it is.
        offset: u8,
        /// Capability version.
        version: u8,
        /// Device/port type.
        device_type: u8,
    },
    /// Vendor-specific.
    Vendor {
        /// Where it is.
        offset: u8,
        /// Its length byte.
        len: u8,
        /// Decoded, when the device is a virtio device.
        virtio: Option<VirtioCap>,
    },
    /// Any other capability (only its header is known).
    Other {
        /// Capability ID.
        id: u8,
        /// Where it is.
        offset: u8,
    },
}

impl Capability {
    /// Offset of the capability.
    pub fn offset(&self) -> u8 {
        match *self {
            Self::Msi(m) => m.offset,
            Self::MsiX(m) => m.offset,
            Self::PciExpress { offset, .. }
            | Self::Vendor { offset, .. }
            | Self::Other { offset, .. } => offset,
        }
    }

    /// Bytes the capability occupies (its header only when unknown).
    pub fn len(&self) -> u8 {
        match *self {
            Self::Msi(m) => m.len(),
            Self::MsiX(_) => MSIX_CAP_LEN,
            Self::PciExpress { version, .. } if version >= 2 => PCIE_CAP_LEN_V2,
            Self::PciExpress { .. } => PCIE_CAP_LEN_V1,
            Self::Vendor { len, .. } => len,
            Self::Other { .. } => 2,
        }
    }

    /// Never empty; present for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        false
    }
}

fn cfg_u8(cfg: &dyn ConfigAccess, at: u8, plus: u8) -> Result<u8> {
    cfg.read_u8(u16::from(at) + u16::from(plus))
}

fn cfg_u16(cfg: &dyn ConfigAccess, at: u8, plus: u8) -> Result<u16> {
    cfg.read_u16(u16::from(at) + u16::from(plus))
}

fn cfg_u32(cfg: &dyn ConfigAccess, at: u8, plus: u8) -> Result<u32> {
    // Capabilities are dword-aligned and all 32-bit fields used are at multiples of 4.
    cfg.read_u32(u16::from(at) + u16::from(plus))
}

fn parse_one(cfg: &dyn ConfigAccess, at: u8, id: u8, virtio_dev: bool) -> Result<Capability> {
    let bad = |reason| PciError::CapMalformed { offset: at, reason };
    Ok(match id {
        CAP_ID_MSI => Capability::Msi(Msi {
            offset: at,
            control: cfg_u16(cfg, at, MSI_CONTROL)?,
        }),
        CAP_ID_MSIX => {
            let control = cfg_u16(cfg, at, MSIX_CONTROL)?;
            let table = cfg_u32(cfg, at, MSIX_TABLE)?;
            let pba = cfg_u32(cfg, at, MSIX_PBA)?;
            let table_bar = u8::try_from(table & MSIX_BIR_MASK).unwrap_or(u8::MAX);
            let pba_bar = u8::try_from(pba & MSIX_BIR_MASK).unwrap_or(u8::MAX);
            if usize::from(table_bar) >= NUM_BARS || usize::from(pba_bar) >= NUM_BARS {
                return Err(bad("MSI-X BIR names no BAR"));
            }
            Capability::MsiX(MsiX {
                offset: at,
                control,
                table_size: (control & MSIX_CTL_TABLE_SIZE) + 1,
                table_bar,
                table_offset: table & !MSIX_BIR_MASK,
                pba_bar,
                pba_offset: pba & !MSIX_BIR_MASK,
            })
        }
        CAP_ID_PCIE => {
            let caps = cfg_u16(cfg, at, PCIE_CAPS)?;
            Capability::PciExpress {
                offset: at,
                version: u8::try_from(caps & 0xf).unwrap_or(0),
                device_type: u8::try_from((caps >> 4) & 0xf).unwrap_or(0),
            }
        }
        CAP_ID_VENDOR => {
            let len = cfg_u8(cfg, at, VENDOR_CAP_LEN)?;
            if len < 3 {
                return Err(bad("vendor capability shorter than its header"));
            }
            let virtio = if virtio_dev && len >= virtio::CAP_LEN {
                let cfg_type = cfg_u8(cfg, at, virtio::CFG_TYPE)?;
                let notify = cfg_type == virtio::NOTIFY_CFG;
                if notify && len < virtio::NOTIFY_CAP_LEN {
                    return Err(bad("virtio notify capability too short"));
                }
                let bar = cfg_u8(cfg, at, virtio::BAR)?;
                Some(VirtioCap {
                    cfg_type,
                    bar,
                    id: cfg_u8(cfg, at, virtio::ID)?,
                    offset: cfg_u32(cfg, at, virtio::OFFSET)?,
                    length: cfg_u32(cfg, at, virtio::LENGTH)?,
                    notify_off_multiplier: if notify {
                        cfg_u32(cfg, at, virtio::NOTIFY_OFF_MULTIPLIER)?
                    } else {
                        0
                    },
                })
            } else {
                None
            };
            Capability::Vendor {
                offset: at,
                len,
                virtio,
            }
        }
        _ => Capability::Other { id, offset: at },
    })
}

/// Most capabilities a conventional config space can hold.
pub const MAX_CAPS: usize = (CONFIG_SPACE_SIZE - HEADER_END as usize) / 4;

/// Walk the capability list (empty when the status register says there is none).
pub fn walk(cfg: &dyn ConfigAccess) -> Result<Vec<Capability>> {
    let mut caps = Vec::new();
    if cfg.read_u16(STATUS)? & status::CAP_LIST == 0 {
        return Ok(caps);
    }
    let virtio_dev = cfg.read_u16(VENDOR_ID)? == VIRTIO_VENDOR_ID;
    let mut used = [false; CONFIG_SPACE_SIZE];
    let mut ptr = cfg.read_u8(CAPABILITIES_POINTER)? & !3;
    while ptr != 0 {
        if u16::from(ptr) < HEADER_END || usize::from(ptr) + 4 > CONFIG_SPACE_SIZE {
            return Err(PciError::CapPointer(ptr));
        }
        // A revisit is a loop; the count bound is a second guard (48 distinct dwords exist).
        if caps.len() >= MAX_CAPS || caps.iter().any(|c: &Capability| c.offset() == ptr) {
            return Err(PciError::CapLoop(ptr));
        }
        let id = cfg.read_u8(u16::from(ptr))?;
        let cap = parse_one(cfg, ptr, id, virtio_dev)?;
        let end = usize::from(ptr) + usize::from(cap.len());
        if end > CONFIG_SPACE_SIZE {
            return Err(PciError::CapMalformed {
                offset: ptr,
                reason: "runs past config space",
            });
        }
        let span = &mut used[usize::from(ptr)..end];
        if span.iter().any(|u| *u) {
            return Err(PciError::CapOverlap(ptr));
        }
        span.fill(true);
        caps.push(cap);
        ptr = cfg_u8(cfg, ptr, CAP_NEXT)? & !3;
    }
    Ok(caps)
}

#[cfg(test)]
mod tests {
    use super::super::{ConfigDump, COMMAND};
    use super::*;

    fn space(caps: &[(u8, &[u8])]) -> Vec<u8> {
        let mut b = vec![0u8; 256];
        b[0..2].copy_from_slice(&VIRTIO_VENDOR_ID.to_le_bytes());
        b[usize::from(STATUS)] = u8::try_from(status::CAP_LIST).unwrap();
        b[usize::from(COMMAND)] = 0;
        if let Some((first, _)) = caps.first() {
            b[usize::from(CAPABILITIES_POINTER)] = *first;
        }
        for (i, (at, body)) in caps.iter().enumerate() {
            let at = usize::from(*at);
            b[at..at + body.len()].copy_from_slice(body);
            b[at + 1] = caps.get(i + 1).map_or(0, |c| c.0);
        }
        b
    }

    #[test]
    fn walks_msix_pcie_virtio() {
        let mut vcap = vec![CAP_ID_VENDOR, 0, 20, virtio::NOTIFY_CFG, 4, 0, 0, 0];
        vcap.extend_from_slice(&0x3000u32.to_le_bytes());
        vcap.extend_from_slice(&0x1000u32.to_le_bytes());
        vcap.extend_from_slice(&4u32.to_le_bytes());
        let mut msix = vec![CAP_ID_MSIX, 0, 3, 0];
        msix.extend_from_slice(&(0x2000u32 | 1).to_le_bytes());
        msix.extend_from_slice(&(0x2800u32 | 1).to_le_bytes());
        let b = space(&[
            (0x40, &vcap),
            (0x60, &msix),
            (0x70, &[CAP_ID_PCIE, 0, 0x02, 0]),
        ]);
        let caps = walk(&ConfigDump::new(&b).unwrap()).unwrap();
        assert_eq!(caps.len(), 3);
        let Capability::Vendor {
            virtio: Some(v), ..
        } = caps[0]
        else {
            panic!("{caps:?}")
        };
        assert_eq!(
            (
                v.cfg_type,
                v.bar,
                v.offset,
                v.length,
                v.notify_off_multiplier
            ),
            (2, 4, 0x3000, 0x1000, 4)
        );
        let Capability::MsiX(m) = caps[1] else {
            panic!()
        };
        assert_eq!(
            (m.table_size, m.table_bar, m.table_offset, m.pba_offset),
            (4, 1, 0x2000, 0x2800)
        );
        assert!(matches!(caps[2], Capability::PciExpress { version: 2, .. }));
    }

    #[test]
    fn refuses_loops_bad_pointers_and_overlap() {
        let mut b = space(&[(0x40, &[CAP_ID_PM, 0]), (0x50, &[CAP_ID_PM, 0])]);
        b[0x51] = 0x40;
        assert_eq!(
            walk(&ConfigDump::new(&b).unwrap()),
            Err(PciError::CapLoop(0x40))
        );
        let mut b = space(&[(0x40, &[CAP_ID_PM, 0])]);
        b[0x41] = 0x41; // low bits ignored: points at itself
        assert_eq!(
            walk(&ConfigDump::new(&b).unwrap()),
            Err(PciError::CapLoop(0x40))
        );
        let b = space(&[(0x20, &[CAP_ID_PM, 0])]);
        assert_eq!(
            walk(&ConfigDump::new(&b).unwrap()),
            Err(PciError::CapPointer(0x20))
        );
        let b = space(&[(0x40, &[CAP_ID_VENDOR, 0, 0x20]), (0x50, &[CAP_ID_PM, 0])]);
        assert_eq!(
            walk(&ConfigDump::new(&b).unwrap()),
            Err(PciError::CapOverlap(0x50))
        );
        let b = space(&[(0xf0, &[CAP_ID_VENDOR, 0, 0x20])]);
        assert!(matches!(
            walk(&ConfigDump::new(&b).unwrap()),
            Err(PciError::CapMalformed { .. })
        ));
        let mut b = space(&[]);
        b[usize::from(STATUS)] = 0;
        assert_eq!(walk(&ConfigDump::new(&b).unwrap()), Ok(vec![]));
    }
}
