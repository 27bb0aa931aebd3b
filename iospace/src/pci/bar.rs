//! Base address registers.
//!
//! # Encoding (PCI Local Bus 3.0, §6.2.5.1)
//!
//! | bits | memory BAR | I/O BAR |
//! |---|---|---|
//! | 0 | 0 | 1 |
//! | 2:1 | type: `00` 32-bit, `10` 64-bit (next BAR holds the high dword), `01` below 1 MiB (legacy, read as 32-bit), `11` reserved | bit 1 reserved |
//! | 3 | prefetchable | address |
//! | 31:4 | address | address (31:2) |
//!
//! # Sizing
//!
//! Software writes all ones to the BAR and reads back: address bits the device does not
//! decode read as zero, so `size = !(readback & address_mask) + 1`. A 64-bit BAR sizes both
//! dwords. An I/O BAR whose upper 16 bits read zero decodes 16 bits. Decoding is switched off
//! in the command register for the duration and every register is restored afterwards.

use super::{check_dword, command, ConfigAccess, PciError, Result, BAR0, COMMAND, NUM_BARS};

/// Bit 0: an I/O BAR.
pub const BAR_IO: u32 = 1 << 0;
/// Memory BAR type field.
pub const BAR_MEM_TYPE_MASK: u32 = 0b110;
/// Memory type: 32-bit.
pub const BAR_MEM_TYPE_32: u32 = 0b000;
/// Memory type: below 1 MiB (legacy).
pub const BAR_MEM_TYPE_1M: u32 = 0b010;
/// Memory type: 64-bit.
pub const BAR_MEM_TYPE_64: u32 = 0b100;
/// Memory BAR prefetchable bit.
pub const BAR_MEM_PREFETCH: u32 = 1 << 3;
/// Address bits of a memory BAR.
pub const BAR_MEM_ADDR_MASK: u32 = !0xf;
/// Address bits of an I/O BAR.
pub const BAR_IO_ADDR_MASK: u32 = !0x3;
/// Size of the x86 I/O port space.
pub const IO_SPACE_SIZE: u64 = 0x1_0000;

/// What a BAR maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BarKind {
    /// I/O ports.
    Io,
    /// 32-bit memory.
    Mem32,
    /// 64-bit memory (occupies this BAR and the next).
    Mem64,
}

/// One implemented BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Bar {
    /// BAR number (the low one for a 64-bit BAR).
    pub index: usize,
    /// What it maps.
    pub kind: BarKind,
    /// Prefetchable memory.
    pub prefetchable: bool,
    /// Base address (port number for I/O).
    pub address: u64,
    /// Size in bytes (a power of two).
    pub size: u64,
}

impl Bar {
    /// One past the last address, or `None` if the range wraps.
    pub fn end(&self) -> Option<u64> {
        self.address.checked_add(self.size)
    }

    /// Whether `addr..addr+len` lies inside the BAR.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        match (addr.checked_add(len), self.end()) {
            (Some(e), Some(end)) => addr >= self.address && e <= end,
            _ => false,
        }
    }

    /// Build a BAR from its raw register value(s) and a size from elsewhere (sysfs `resource`).
    pub fn from_raw(index: usize, low: u32, high: u32, size: u64) -> Result<Self> {
        let (kind, prefetchable) = decode(index, low)?;
        let address = match kind {
            BarKind::Io => u64::from(low & BAR_IO_ADDR_MASK),
            BarKind::Mem32 => u64::from(low & BAR_MEM_ADDR_MASK),
            BarKind::Mem64 => u64::from(high) << 32 | u64::from(low & BAR_MEM_ADDR_MASK),
        };
        let bar = Self {
            index,
            kind,
            prefetchable,
            address,
            size,
        };
        bar.validate()?;
        Ok(bar)
    }

    fn validate(&self) -> Result<()> {
        let bad = |reason| PciError::BadBar {
            index: self.index,
            reason,
        };
        if !self.size.is_power_of_two() {
            return Err(bad("size is not a power of two"));
        }
        let end = self.end().ok_or(bad("range wraps"))?;
        if self.kind == BarKind::Io && end > IO_SPACE_SIZE {
            return Err(bad("I/O range beyond 64 KiB"));
        }
        if self.kind == BarKind::Mem32 && end > 1 << 32 {
            return Err(bad("32-bit BAR beyond 4 GiB"));
        }
        Ok(())
    }
}

/// The kind and prefetchability encoded in a BAR's low dword.
pub fn decode(index: usize, low: u32) -> Result<(BarKind, bool)> {
    if low & BAR_IO != 0 {
        return Ok((BarKind::Io, false));
    }
    let prefetch = low & BAR_MEM_PREFETCH != 0;
    match low & BAR_MEM_TYPE_MASK {
        BAR_MEM_TYPE_32 | BAR_MEM_TYPE_1M => Ok((BarKind::Mem32, prefetch)),
        BAR_MEM_TYPE_64 if index + 1 < NUM_BARS => Ok((BarKind::Mem64, prefetch)),
        BAR_MEM_TYPE_64 => Err(PciError::BadBar {
            index,
            reason: "64-bit BAR in the last slot",
        }),
        _ => Err(PciError::BadBar {
            index,
            reason: "reserved memory type",
        }),
    }
}

/// Config offset of BAR `index`.
pub fn bar_offset(index: usize) -> u16 {
    // At most BAR0 + 4 * 5 = 0x24: the cast cannot truncate.
    BAR0 + u16::try_from(index.min(NUM_BARS - 1) * 4).unwrap_or(0)
}

/// Write all ones to the dword at `off`, read it back, restore it.
fn probe_mask(cfg: &mut dyn ConfigAccess, off: u16) -> Result<(u32, u32)> {
    check_dword(off, cfg.size())?;
    let orig = cfg.read_u32(off)?;
    cfg.write_u32(off, u32::MAX)?;
    let mask = cfg.read_u32(off);
    cfg.write_u32(off, orig)?;
    Ok((orig, mask?))
}

/// Size every BAR by the write-ones protocol, with decoding disabled meanwhile; restores the
/// BARs and the command register. Unimplemented BARs (reading back zero) are left out.
pub fn size_bars(cfg: &mut dyn ConfigAccess) -> Result<Vec<Bar>> {
    let cmd = cfg.read_u32(COMMAND & !3)?;
    let decode_bits = u32::from(command::IO_SPACE | command::MEMORY_SPACE);
    cfg.write_u32(COMMAND & !3, cmd & !decode_bits)?;
    let out = size_bars_inner(cfg);
    cfg.write_u32(COMMAND & !3, cmd)?;
    out
}

fn size_bars_inner(cfg: &mut dyn ConfigAccess) -> Result<Vec<Bar>> {
    let mut bars = Vec::new();
    let mut index = 0;
    while index < NUM_BARS {
        let (low, mask) = probe_mask(cfg, bar_offset(index))?;
        if mask == 0 {
            index += 1;
            continue;
        }
        let (kind, _) = decode(index, low)?;
        let (high, size) = match kind {
            BarKind::Io => {
                let mut m = mask & BAR_IO_ADDR_MASK;
                if m & 0xffff_0000 == 0 {
                    m |= 0xffff_0000;
                }
                (0, u64::from((!m).wrapping_add(1)))
            }
            BarKind::Mem32 => {
                let m = u64::from(mask & BAR_MEM_ADDR_MASK) | 0xffff_ffff_0000_0000;
                (0, (!m).wrapping_add(1))
            }
            BarKind::Mem64 => {
                let (high, mask_hi) = probe_mask(cfg, bar_offset(index + 1))?;
                let m = u64::from(mask_hi) << 32 | u64::from(mask & BAR_MEM_ADDR_MASK);
                (high, (!m).wrapping_add(1))
            }
        };
        if size != 0 {
            bars.push(Bar::from_raw(index, low, high, size)?);
        }
        index += if kind == BarKind::Mem64 { 2 } else { 1 };
    }
    Ok(bars)
}

/// A config space whose BARs answer the sizing protocol, for tests and the emulated devices:
/// a BAR register keeps only the address bits its size decodes plus its fixed type bits.
#[derive(Clone, Debug)]
pub struct BarRegisters {
    /// Raw values (low dwords and high dwords of 64-bit BARs).
    pub raw: [u32; NUM_BARS],
    /// Writable-bit mask of each dword.
    pub writable: [u32; NUM_BARS],
}

impl BarRegisters {
    /// Registers for `bars` (each of power-of-two size, naturally aligned).
    pub fn new(bars: &[Bar]) -> Self {
        let mut raw = [0u32; NUM_BARS];
        let mut writable = [0u32; NUM_BARS];
        for b in bars.iter().filter(|b| b.index < NUM_BARS) {
            let i = b.index;
            let mask = !(b.size.max(16).wrapping_sub(1));
            let lo_mask = u32::try_from(mask & 0xffff_ffff).unwrap_or(0);
            match b.kind {
                BarKind::Io => {
                    let m = u32::try_from(!(b.size.max(4) - 1) & 0xffff).unwrap_or(0);
                    writable[i] = m & BAR_IO_ADDR_MASK;
                    raw[i] = BAR_IO | (u32::try_from(b.address & 0xffff).unwrap_or(0) & m);
                }
                BarKind::Mem32 | BarKind::Mem64 => {
                    let ty = if b.kind == BarKind::Mem64 {
                        BAR_MEM_TYPE_64
                    } else {
                        BAR_MEM_TYPE_32
                    };
                    let pf = if b.prefetchable { BAR_MEM_PREFETCH } else { 0 };
                    writable[i] = lo_mask & BAR_MEM_ADDR_MASK;
                    raw[i] = ty
                        | pf
                        | (u32::try_from(b.address & 0xffff_ffff).unwrap_or(0) & writable[i]);
                    if b.kind == BarKind::Mem64 && i + 1 < NUM_BARS {
                        writable[i + 1] = u32::try_from(mask >> 32).unwrap_or(0);
                        raw[i + 1] = u32::try_from(b.address >> 32).unwrap_or(0) & writable[i + 1];
                    }
                }
            }
        }
        Self { raw, writable }
    }

    /// Store `value` into BAR dword `index`, keeping the read-only bits.
    pub fn write(&mut self, index: usize, value: u32) {
        if let (Some(r), Some(w)) = (self.raw.get_mut(index), self.writable.get(index)) {
            *r = (*r & !*w) | (value & *w);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_kinds() {
        assert_eq!(decode(0, 0x1).unwrap(), (BarKind::Io, false));
        assert_eq!(decode(0, 0x0).unwrap(), (BarKind::Mem32, false));
        assert_eq!(decode(0, 0x8).unwrap(), (BarKind::Mem32, true));
        assert_eq!(decode(0, 0xc).unwrap(), (BarKind::Mem64, true));
        assert!(matches!(
            decode(5, 0x4),
            Err(PciError::BadBar { index: 5, .. })
        ));
        assert!(matches!(decode(0, 0x6), Err(PciError::BadBar { .. })));
    }

    #[test]
    fn from_raw_validates() {
        let b = Bar::from_raw(2, 0xfe00_000c, 0x1, 0x4000).unwrap();
        assert_eq!(
            (b.kind, b.prefetchable, b.address),
            (BarKind::Mem64, true, 0x1_fe00_0000)
        );
        assert!(b.contains(0x1_fe00_0000, 0x4000) && !b.contains(0x1_fe00_0001, 0x4000));
        assert!(Bar::from_raw(0, 0xc001, 0, 0x3000).is_err());
        assert!(Bar::from_raw(0, 0xfff1, 0, 0x100).is_err());
        assert!(Bar::from_raw(0, 0xffff_f000, 0, 0x2000).is_err());
        let r = BarRegisters::new(&[b]);
        assert_eq!(r.raw[2], 0xfe00_000c);
        assert_eq!(r.raw[3], 1);
    }
}
