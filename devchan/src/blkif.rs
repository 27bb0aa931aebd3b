//! Block device messages (`xen/include/public/io/blkif.h`), x86-64 layout.
//!
//! # Wire layout
//!
//! One ring (`DEFINE_RING_TYPES(blkif, ...)`) of 112-byte entries, 32 per page. Every request
//! slot starts with `operation`; the rest depends on it:
//!
//! `blkif_request` (read, write, write barrier, flush):
//!
//! | off | size | field |
//! |---|---|---|
//! | 0 | 1 | `operation`: `BLKIF_OP_*` |
//! | 1 | 1 | `nr_segments`: 1..=11 (0 allowed for flush/barrier) |
//! | 2 | 2 | `handle`: virtual device |
//! | 4 | 4 | padding (the `u64` `id` is 8-aligned on x86-64) |
//! | 8 | 8 | `id`: echoed in the response |
//! | 16 | 8 | `sector_number`: first 512-byte sector on the disk |
//! | 24 | 11 × 8 | `seg[]`: `gref` (4), `first_sect` (1), `last_sect` (1), padding (2) |
//!
//! A segment names sectors `first_sect..=last_sect` (each < 8) of the granted 4 KiB page; the
//! segments are consecutive on the disk from `sector_number`.
//!
//! `blkif_request_discard` (32 bytes): `operation` 0, `flag` 1 (`BLKIF_DISCARD_SECURE`),
//! `handle` 2, `id` 8, `sector_number` 16, `nr_sectors` 24.
//!
//! `blkif_request_indirect` (64 bytes): `operation` 0, `indirect_op` 1 (read or write),
//! `nr_segments` 2 (`u16`), `id` 8, `sector_number` 16, `handle` 24, `indirect_grefs[8]` 28. The
//! segments are in the granted pages, 512 `blkif_request_segment`s per page, as many pages as
//! `ceil(nr_segments / 512)`; the backend advertises its limit in
//! `feature-max-indirect-segments`.
//!
//! `blkif_response` (16 bytes): `id` 0, `operation` 8, `status` 10 (`BLKIF_RSP_*`).
//!
//! # Trust
//!
//! A backend copies a request out of the ring ([`crate::ring::BackRing::get_request`]) and then
//! decodes it with [`BlkRequest::decode`], which checks every field a frontend controls; only a
//! decoded [`BlkRequest`] should reach the disk. The sector range is checked for overflow here;
//! checking it against the disk size is the backend's job.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::grant::{GrantRef, PAGE_SIZE};
use crate::ring::{BackRing, FrontRing};

mod request;
pub use request::{
    BlkRequest, DiscardRequest, IndirectOp, IndirectRequest, RwRequest, Segment, Segments,
};

/// Read sectors into the segments' pages (`BLKIF_OP_READ`).
pub const BLKIF_OP_READ: u8 = 0;
/// Write the segments' pages to disk (`BLKIF_OP_WRITE`).
pub const BLKIF_OP_WRITE: u8 = 1;
/// A write ordered after every earlier write and before every later one (`feature-barrier`).
pub const BLKIF_OP_WRITE_BARRIER: u8 = 2;
/// Commit the device's volatile cache, optionally with data (`feature-flush-cache`).
pub const BLKIF_OP_FLUSH_DISKCACHE: u8 = 3;
/// Reserved (SLES device-specific packets); never valid here.
pub const BLKIF_OP_RESERVED_1: u8 = 4;
/// Discard a sector range (`feature-discard`).
pub const BLKIF_OP_DISCARD: u8 = 5;
/// Read or write with segments in indirect pages (`feature-max-indirect-segments`).
pub const BLKIF_OP_INDIRECT: u8 = 6;

/// Segments in a direct request.
pub const BLKIF_MAX_SEGMENTS_PER_REQUEST: usize = 11;
/// Indirect pages in an indirect request.
pub const BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST: usize = 8;
/// Segment descriptors per indirect page.
pub const SEGS_PER_INDIRECT_FRAME: usize = PAGE_SIZE / core::mem::size_of::<BlkifRequestSegment>();
/// The most segments an indirect request can name.
pub const MAX_INDIRECT_SEGMENTS: u16 = {
    let n = SEGS_PER_INDIRECT_FRAME * BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST;
    assert!(n <= u16::MAX as usize);
    // Cannot truncate: asserted just above.
    #[allow(clippy::cast_possible_truncation)]
    {
        n as u16
    }
};
/// Size of a sector in bytes (`sector_number`, `first_sect`, `last_sect` count these).
pub const SECTOR_SIZE: usize = 512;
/// Sectors in a segment's page: `last_sect` must be below this.
pub const SECTORS_PER_PAGE: u8 = 8;

/// Discard flag: make the discarded data unrecoverable (`BLKIF_DISCARD_SECURE`).
pub const BLKIF_DISCARD_SECURE: u8 = 1;

/// The operation succeeded (`BLKIF_RSP_OKAY`).
pub const BLKIF_RSP_OKAY: i16 = 0;
/// The operation failed (`BLKIF_RSP_ERROR`).
pub const BLKIF_RSP_ERROR: i16 = -1;
/// The operation is not supported (`BLKIF_RSP_EOPNOTSUPP`).
pub const BLKIF_RSP_EOPNOTSUPP: i16 = -2;

/// `info` bit: the disk is a CD-ROM (`VDISK_CDROM`).
pub const VDISK_CDROM: u32 = 0x1;
/// `info` bit: removable media (`VDISK_REMOVABLE`).
pub const VDISK_REMOVABLE: u32 = 0x2;
/// `info` bit: read-only (`VDISK_READONLY`).
pub const VDISK_READONLY: u32 = 0x4;

/// One segment descriptor, exactly `struct blkif_request_segment` (8 bytes).
#[repr(C)]
#[derive(
    FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub struct BlkifRequestSegment {
    /// Grant of the data page.
    pub gref: GrantRef,
    /// First sector of the page to transfer (inclusive).
    pub first_sect: u8,
    /// Last sector of the page to transfer (inclusive).
    pub last_sect: u8,
    /// Padding to 4-byte alignment; zero.
    pub _pad: [u8; 2],
}

/// A request slot, exactly `struct blkif_request` (112 bytes); the ring's request type.
#[repr(C)]
#[derive(
    FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub struct BlkifRequest {
    /// `BLKIF_OP_*`.
    pub operation: u8,
    /// Number of valid entries in `seg`.
    pub nr_segments: u8,
    /// Virtual device (`blkif_vdev_t`).
    pub handle: u16,
    /// Padding before the 8-aligned `id`; zero.
    pub _pad1: u32,
    /// Private frontend value, echoed in the response.
    pub id: u64,
    /// First sector on the disk.
    pub sector_number: u64,
    /// Data segments.
    pub seg: [BlkifRequestSegment; BLKIF_MAX_SEGMENTS_PER_REQUEST],
}

/// A discard request, `struct blkif_request_discard` (32 bytes), overlaid on a request slot.
#[repr(C)]
#[derive(
    FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub struct BlkifRequestDiscard {
    /// `BLKIF_OP_DISCARD`.
    pub operation: u8,
    /// `BLKIF_DISCARD_SECURE` or 0.
    pub flag: u8,
    /// Virtual device.
    pub handle: u16,
    /// Padding; zero.
    pub _pad1: u32,
    /// Echoed in the response.
    pub id: u64,
    /// First sector to discard.
    pub sector_number: u64,
    /// Number of sectors to discard.
    pub nr_sectors: u64,
}

/// An indirect request, `struct blkif_request_indirect` (64 bytes on x86-64), overlaid on a
/// request slot.
#[repr(C)]
#[derive(
    FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub struct BlkifRequestIndirect {
    /// `BLKIF_OP_INDIRECT`.
    pub operation: u8,
    /// `BLKIF_OP_READ` or `BLKIF_OP_WRITE`.
    pub indirect_op: u8,
    /// Number of segments in the indirect pages.
    pub nr_segments: u16,
    /// Padding; zero.
    pub _pad1: u32,
    /// Echoed in the response.
    pub id: u64,
    /// First sector on the disk.
    pub sector_number: u64,
    /// Virtual device.
    pub handle: u16,
    /// Padding; zero.
    pub _pad2: u16,
    /// Grants of the pages holding the segment descriptors.
    pub indirect_grefs: [GrantRef; BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST],
    /// Padding to 8-byte alignment; zero.
    pub _pad3: u32,
}

/// A response slot, exactly `struct blkif_response` (16 bytes); the ring's response type.
#[repr(C)]
#[derive(
    FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub struct BlkifResponse {
    /// The request's `id`.
    pub id: u64,
    /// The request's `operation`.
    pub operation: u8,
    /// Padding; zero.
    pub _pad1: u8,
    /// `BLKIF_RSP_*`.
    pub status: i16,
    /// Padding to 8-byte alignment; zero.
    pub _pad2: u32,
}

const _: () = assert!(core::mem::size_of::<BlkifRequestSegment>() == 8);
const _: () = assert!(core::mem::size_of::<BlkifRequest>() == 112);
const _: () = assert!(core::mem::size_of::<BlkifRequestDiscard>() == 32);
const _: () = assert!(core::mem::size_of::<BlkifRequestIndirect>() == 64);
const _: () = assert!(core::mem::size_of::<BlkifResponse>() == 16);

/// The frontend's end of a blkif ring.
pub type BlkifFrontRing = FrontRing<BlkifRequest, BlkifResponse>;
/// The backend's end of a blkif ring.
pub type BlkifBackRing = BackRing<BlkifRequest, BlkifResponse>;
/// Entries in a one-page blkif ring (`__CONST_RING_SIZE(blkif, 4096)`).
pub const BLKIF_RING_SIZE: u32 = crate::ring::page_ring_size::<BlkifRequest, BlkifResponse>();

/// Why a request from the frontend was rejected.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum BlkifError {
    /// Unknown or reserved `operation`.
    #[error("Unknown block operation {0}")]
    BadOperation(u8),
    /// A read or write without segments.
    #[error("Read or write request without segments")]
    NoSegments,
    /// More segments than the operation allows.
    #[error("{nr} segments, at most {max} allowed")]
    TooManySegments {
        /// Segments asked for.
        nr: u32,
        /// The limit.
        max: u32,
    },
    /// A segment with `first_sect > last_sect` or `last_sect >= 8`.
    #[error("Segment {index} has sectors {first}..={last} of an 8-sector page")]
    BadSegment {
        /// Position of the segment in the request.
        index: usize,
        /// Its `first_sect`.
        first: u8,
        /// Its `last_sect`.
        last: u8,
    },
    /// The sector range runs past the end of a 64-bit disk.
    #[error("Sector range {sector} + {sectors} overflows")]
    SectorOverflow {
        /// First sector.
        sector: u64,
        /// Length in sectors.
        sectors: u64,
    },
    /// Unknown discard flag bits.
    #[error("Unknown discard flags {0:#x}")]
    BadDiscardFlags(u8),
    /// An indirect request whose `indirect_op` is not read or write.
    #[error("Indirect request with operation {0}")]
    BadIndirectOp(u8),
    /// Fewer indirect-page bytes than the segments need.
    #[error("Indirect segments need {needed} bytes, got {got}")]
    IndirectPagesShort {
        /// Bytes needed.
        needed: usize,
        /// Bytes given.
        got: usize,
    },
}

/// A response status (`BLKIF_RSP_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkStatus {
    /// `BLKIF_RSP_OKAY`.
    Okay,
    /// `BLKIF_RSP_ERROR`.
    Error,
    /// `BLKIF_RSP_EOPNOTSUPP`.
    NotSupported,
}

impl From<BlkStatus> for i16 {
    fn from(s: BlkStatus) -> i16 {
        match s {
            BlkStatus::Okay => BLKIF_RSP_OKAY,
            BlkStatus::Error => BLKIF_RSP_ERROR,
            BlkStatus::NotSupported => BLKIF_RSP_EOPNOTSUPP,
        }
    }
}

impl TryFrom<i16> for BlkStatus {
    type Error = i16;
    /// Decode a status a backend sent; an unknown one is returned as the error.
    fn try_from(v: i16) -> Result<Self, i16> {
        match v {
            BLKIF_RSP_OKAY => Ok(Self::Okay),
            BLKIF_RSP_ERROR => Ok(Self::Error),
            BLKIF_RSP_EOPNOTSUPP => Ok(Self::NotSupported),
            other => Err(other),
        }
    }
}

impl BlkifResponse {
    /// A response slot.
    pub fn new(id: u64, operation: u8, status: BlkStatus) -> Self {
        Self {
            id,
            operation,
            _pad1: 0,
            status: status.into(),
            _pad2: 0,
        }
    }
}

/// What this module claims about Xen's `io/blkif.h`.
pub fn abi_checks() -> Vec<crate::abi::AbiCheck> {
    use crate::abi::AbiCheck;
    let mut v = crate::abi_layout!(
        "struct blkif_request_segment",
        BlkifRequestSegment {
            gref,
            first_sect,
            last_sect
        }
    );
    v.extend(crate::abi_layout!(
        "struct blkif_request",
        BlkifRequest {
            operation,
            nr_segments,
            handle,
            id,
            sector_number,
            seg
        }
    ));
    v.extend(crate::abi_layout!(
        "struct blkif_request_discard",
        BlkifRequestDiscard {
            operation,
            flag,
            handle,
            id,
            sector_number,
            nr_sectors
        }
    ));
    v.extend(crate::abi_layout!(
        "struct blkif_request_indirect",
        BlkifRequestIndirect {
            operation,
            indirect_op,
            nr_segments,
            id,
            sector_number,
            handle,
            indirect_grefs
        }
    ));
    v.extend(crate::abi_layout!(
        "struct blkif_response",
        BlkifResponse {
            id,
            operation,
            status
        }
    ));
    let entry = crate::ring::entry_size::<BlkifRequest, BlkifResponse>();
    v.push(AbiCheck::new("sizeof(union blkif_sring_entry)", entry));
    v.push(AbiCheck::new(
        "sizeof(struct blkif_sring)",
        crate::ring::RING_HEADER_SIZE + entry,
    ));
    v.push(AbiCheck::new(
        "offsetof(struct blkif_sring, ring)",
        crate::ring::RING_HEADER_SIZE,
    ));
    v.push(AbiCheck::new(
        "__CONST_RING_SIZE(blkif, 4096)",
        BLKIF_RING_SIZE,
    ));
    for (name, ours) in [
        ("BLKIF_OP_READ", BLKIF_OP_READ),
        ("BLKIF_OP_WRITE", BLKIF_OP_WRITE),
        ("BLKIF_OP_WRITE_BARRIER", BLKIF_OP_WRITE_BARRIER),
        ("BLKIF_OP_FLUSH_DISKCACHE", BLKIF_OP_FLUSH_DISKCACHE),
        ("BLKIF_OP_RESERVED_1", BLKIF_OP_RESERVED_1),
        ("BLKIF_OP_DISCARD", BLKIF_OP_DISCARD),
        ("BLKIF_OP_INDIRECT", BLKIF_OP_INDIRECT),
        ("BLKIF_DISCARD_SECURE", BLKIF_DISCARD_SECURE),
    ] {
        v.push(AbiCheck::new(name, ours));
    }
    for (name, ours) in [
        ("BLKIF_RSP_OKAY", BLKIF_RSP_OKAY),
        ("BLKIF_RSP_ERROR", BLKIF_RSP_ERROR),
        ("BLKIF_RSP_EOPNOTSUPP", BLKIF_RSP_EOPNOTSUPP),
    ] {
        v.push(AbiCheck::new(name, ours));
    }
    for (name, ours) in [
        (
            "BLKIF_MAX_SEGMENTS_PER_REQUEST",
            BLKIF_MAX_SEGMENTS_PER_REQUEST,
        ),
        (
            "BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST",
            BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST,
        ),
        (
            "4096 / sizeof(struct blkif_request_segment)",
            SEGS_PER_INDIRECT_FRAME,
        ),
    ] {
        v.push(AbiCheck::new(name, ours));
    }
    for (name, ours) in [
        ("VDISK_CDROM", VDISK_CDROM),
        ("VDISK_REMOVABLE", VDISK_REMOVABLE),
        ("VDISK_READONLY", VDISK_READONLY),
    ] {
        v.push(AbiCheck::new(name, ours));
    }
    v.push(AbiCheck::new("sizeof(blkif_sector_t)", 8));
    v.push(AbiCheck::new("sizeof(blkif_vdev_t)", 2));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes() {
        for s in [BlkStatus::Okay, BlkStatus::Error, BlkStatus::NotSupported] {
            assert_eq!(BlkStatus::try_from(i16::from(s)), Ok(s));
        }
        assert_eq!(BlkStatus::try_from(5), Err(5));
        assert_eq!(BLKIF_RING_SIZE, 32);
    }
}
