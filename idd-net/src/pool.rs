//! Pages of the IDD's own memory that the device reaches: receive buffers and transmit
//! header copies.
//!
//! Each page is granted to the IDD itself and pinned for the device (`grant_access` +
//! `pin_grant` on our own domain, as idd-blk's driver does for its queue), so the device
//! reaches it only through its IOMMU and netback reads it with `Platform::read_local`.
//!
//! # The record (for the next process of the domain)
//!
//! Self-grants and pins outlive a crashed process (the grant table is in the domain's RAM,
//! the pins in its IOMMU until the manager revokes them). Each page's grant and IOVA are
//! recorded in [`RECORD_FRAMES`] frames starting at the record frame, so the next process
//! releases them ([`release_previous`]) before it pins anything, and grant references do not
//! leak across restarts:
//!
//! | off | size | field |
//! |---|---|---|
//! | 0 | 4 | magic [`MAGIC`] (`"NBP1"`) |
//! | 16 k (k ≥ 1) | 4 | entry `k - 1`: grant reference, then 4 reserved |
//! | 16 k + 8 | 8 | entry `k - 1`: IOVA, 0 = not pinned |
//!
//! continued in the next frame with entry `255` at offset 16 (the first 16 bytes of every
//! frame are the header; only the first frame's magic counts).

use devchan::grant::GrantRef;
use devchan::platform::{Frame, Platform, PlatformError};

/// `"NBP1"`.
pub const MAGIC: u32 = u32::from_le_bytes(*b"NBP1");
/// Frames of the record.
pub const RECORD_FRAMES: u64 = RECORD_FRAME_COUNT as u64;
const RECORD_FRAME_COUNT: usize = 2;
/// Entries per record frame.
pub const PER_FRAME: usize = 4096 / 16 - 1;
/// Most pages one pool may record.
pub const MAX_PAGES: usize = PER_FRAME * RECORD_FRAME_COUNT;

/// Why a pool operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// Granting, pinning or recording failed.
    #[error("Own page setup failed")]
    Platform(#[from] PlatformError),
    /// More pages than the record holds.
    #[error("Pool of {0} pages exceeds the record's {MAX_PAGES}")]
    TooMany(usize),
}

/// One page of ours pinned for the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OwnPage {
    /// Our frame.
    pub frame: Frame,
    /// Its self-grant.
    pub gref: GrantRef,
    /// Where the device reaches it (0: unpinned now).
    pub iova: u64,
}

fn entry_at(k: usize) -> (u64, usize) {
    ((k / PER_FRAME) as u64, 16 * (k % PER_FRAME + 1))
}

/// Unpin and un-grant every page an earlier process of the domain recorded at
/// `record_frame`, and clear the record; returns how many entries there were.
pub fn release_previous<P: Platform>(p: &P, record_frame: Frame) -> Result<usize, PoolError> {
    let mut magic = [0u8; 4];
    p.read_local(record_frame, 0, &mut magic)?;
    if u32::from_le_bytes(magic) != MAGIC {
        return Ok(0);
    }
    let mut n = 0;
    for f in 0..RECORD_FRAMES {
        let mut page = vec![0u8; 4096];
        p.read_local(record_frame + f, 0, &mut page)?;
        for rec in page.chunks_exact(16).skip(1) {
            let gref = u32::from_le_bytes([rec[0], rec[1], rec[2], rec[3]]);
            let iova = u64::from_le_bytes(rec[8..16].try_into().unwrap_or([0; 8]));
            if gref == 0 && iova == 0 {
                continue;
            }
            n += 1;
            // Either may be gone already (revoked by the manager): both outcomes are fine.
            if iova != 0 {
                let _ = p.unpin_grant(iova);
            }
            if gref != 0 {
                let _ = p.end_access(gref);
            }
        }
        p.write_local(record_frame + f, 0, &[0u8; 4096])?;
    }
    Ok(n)
}

/// The pool's record: where each page's grant and pin are written down.
pub struct Record {
    frame: Frame,
}

impl Record {
    /// Start an empty record at `frame` (call [`release_previous`] first).
    pub fn new<P: Platform>(p: &P, frame: Frame) -> Result<Self, PoolError> {
        for f in 0..RECORD_FRAMES {
            p.write_local(frame + f, 0, &[0u8; 4096])?;
        }
        p.write_local(frame, 0, &MAGIC.to_le_bytes())?;
        Ok(Self { frame })
    }

    /// Write entry `k`.
    pub fn set<P: Platform>(&self, p: &P, k: usize, page: &OwnPage) -> Result<(), PoolError> {
        if k >= MAX_PAGES {
            return Err(PoolError::TooMany(k + 1));
        }
        let (f, off) = entry_at(k);
        let mut rec = [0u8; 16];
        rec[..4].copy_from_slice(&page.gref.to_le_bytes());
        rec[8..].copy_from_slice(&page.iova.to_le_bytes());
        p.write_local(self.frame + f, off, &rec)?;
        Ok(())
    }

    /// Grant `frame` to ourselves, pin it writable for the device, and record it as entry `k`.
    pub fn pin_own<P: Platform>(
        &self,
        p: &P,
        k: usize,
        frame: Frame,
    ) -> Result<OwnPage, PoolError> {
        if k >= MAX_PAGES {
            return Err(PoolError::TooMany(k + 1));
        }
        let gref = p.grant_access(p.domid(), frame, false)?;
        let mut page = OwnPage {
            frame,
            gref,
            iova: 0,
        };
        // Recorded before the pin: a crash in between leaves a grant to end, not a leak.
        self.set(p, k, &page)?;
        page.iova = p.pin_grant(p.domid(), gref, true)?;
        self.set(p, k, &page)?;
        Ok(page)
    }

    /// Unpin entry `k`'s page (before it is given away), keeping the grant.
    pub fn unpin<P: Platform>(&self, p: &P, k: usize, page: &mut OwnPage) -> Result<(), PoolError> {
        if page.iova != 0 {
            p.unpin_grant(page.iova)?;
            page.iova = 0;
            self.set(p, k, page)?;
        }
        Ok(())
    }

    /// Pin entry `k`'s page again (after an exchange left another page at its frame).
    pub fn repin<P: Platform>(&self, p: &P, k: usize, page: &mut OwnPage) -> Result<(), PoolError> {
        if page.iova == 0 {
            page.iova = p.pin_grant(p.domid(), page.gref, true)?;
            self.set(p, k, page)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypervisor::domain::DomainConfig;
    use hypervisor::local::LocalPlatform;
    use hypervisor::system::System;
    use iospace::iommu::Iommu;

    #[test]
    fn pins_are_recorded_and_released_by_the_next_process() {
        let sys = System::new();
        let iommu = Iommu::new(64);
        let d = sys
            .create_domain(DomainConfig {
                name: "idd".into(),
                nr_frames: 32,
                iommu: Some(iommu.clone()),
            })
            .unwrap();
        let p = LocalPlatform::new(sys, d).unwrap();
        assert_eq!(release_previous(&p, 8).unwrap(), 0);
        let rec = Record::new(&p, 8).unwrap();
        let mut pages: Vec<_> = (0..4)
            .map(|k| rec.pin_own(&p, k, 12 + k as u64).unwrap())
            .collect();
        assert_eq!(iommu.len(), 4);
        rec.unpin(&p, 1, &mut pages[1]).unwrap();
        assert_eq!(iommu.len(), 3);
        rec.repin(&p, 1, &mut pages[1]).unwrap();
        assert_eq!(iommu.len(), 4);
        // The "next process": everything released, grants ended, the record cleared.
        assert_eq!(release_previous(&p, 8).unwrap(), 4);
        assert_eq!(iommu.len(), 0);
        assert_eq!(release_previous(&p, 8).unwrap(), 0);
        assert!(p.end_access(pages[0].gref).is_err(), "grant already ended");
        assert!(rec.set(&p, MAX_PAGES, &pages[0]).is_err());
        let (f, off) = entry_at(PER_FRAME);
        assert_eq!((f, off), (1, 16));
    }
}
