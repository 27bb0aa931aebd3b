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

use core::ops::Deref;

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::grant::{GrantRef, PAGE_SIZE};
use crate::ring::{BackRing, FrontRing};

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

/// A validated data segment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    /// Grant of the data page.
    pub gref: GrantRef,
    /// First sector within the page, `<= last_sect`.
    pub first_sect: u8,
    /// Last sector within the page, `< 8`.
    pub last_sect: u8,
}

impl Segment {
    /// Validate a raw descriptor; `index` is its position, for the error.
    pub fn decode(raw: &BlkifRequestSegment, index: usize) -> Result<Self, BlkifError> {
        if raw.first_sect > raw.last_sect || raw.last_sect >= SECTORS_PER_PAGE {
            return Err(BlkifError::BadSegment {
                index,
                first: raw.first_sect,
                last: raw.last_sect,
            });
        }
        Ok(Self {
            gref: raw.gref,
            first_sect: raw.first_sect,
            last_sect: raw.last_sect,
        })
    }

    /// The wire descriptor.
    pub fn encode(&self) -> BlkifRequestSegment {
        BlkifRequestSegment {
            gref: self.gref,
            first_sect: self.first_sect,
            last_sect: self.last_sect,
            _pad: [0; 2],
        }
    }

    /// Number of sectors (1..=8).
    pub fn sectors(&self) -> u64 {
        u64::from(self.last_sect - self.first_sect) + 1
    }

    /// Byte offset of the data within the page.
    pub fn offset(&self) -> usize {
        usize::from(self.first_sect) * SECTOR_SIZE
    }

    /// Length of the data in bytes.
    pub fn len(&self) -> usize {
        (usize::from(self.last_sect - self.first_sect) + 1) * SECTOR_SIZE
    }

    /// Always false: a segment holds at least one sector.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// Up to [`BLKIF_MAX_SEGMENTS_PER_REQUEST`] validated segments, inline (no allocation on the
/// request path). Dereferences to a slice.
#[derive(Clone, Copy, Default)]
pub struct Segments {
    len: u8,
    segs: [Segment; BLKIF_MAX_SEGMENTS_PER_REQUEST],
}

impl Segments {
    /// Segments from a slice of at most 11.
    pub fn new(segs: &[Segment]) -> Result<Self, BlkifError> {
        let mut out = Self::default();
        if segs.len() > BLKIF_MAX_SEGMENTS_PER_REQUEST {
            return Err(BlkifError::TooManySegments {
                nr: u32::try_from(segs.len()).unwrap_or(u32::MAX),
                max: 11,
            });
        }
        out.segs[..segs.len()].copy_from_slice(segs);
        // Cannot truncate: at most 11.
        #[allow(clippy::cast_possible_truncation)]
        {
            out.len = segs.len() as u8;
        }
        Ok(out)
    }
}

impl Deref for Segments {
    type Target = [Segment];
    fn deref(&self) -> &[Segment] {
        &self.segs[..usize::from(self.len)]
    }
}

impl PartialEq for Segments {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}
impl Eq for Segments {}

impl core::fmt::Debug for Segments {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// A read, write, barrier or flush with direct segments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RwRequest {
    /// Echoed in the response.
    pub id: u64,
    /// Virtual device.
    pub handle: u16,
    /// First sector on the disk.
    pub sector: u64,
    /// Data segments, consecutive on the disk.
    pub segments: Segments,
}

/// A discard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiscardRequest {
    /// Echoed in the response.
    pub id: u64,
    /// Virtual device.
    pub handle: u16,
    /// First sector to discard.
    pub sector: u64,
    /// Number of sectors.
    pub nr_sectors: u64,
    /// `BLKIF_DISCARD_SECURE` was set.
    pub secure: bool,
}

/// The data direction of an indirect request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IndirectOp {
    /// `BLKIF_OP_READ`.
    Read,
    /// `BLKIF_OP_WRITE`.
    Write,
}

/// A read or write whose segments are in indirect pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndirectRequest {
    /// Echoed in the response.
    pub id: u64,
    /// Virtual device.
    pub handle: u16,
    /// First sector on the disk.
    pub sector: u64,
    /// Read or write.
    pub op: IndirectOp,
    /// Number of segments, 1..=the backend's limit.
    pub nr_segments: u16,
    /// Grants of the segment pages; the first [`Self::pages`] are used, the rest are zero.
    pub indirect_grefs: [GrantRef; BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST],
}

impl IndirectRequest {
    /// Number of indirect pages the segments occupy.
    pub fn pages(&self) -> usize {
        usize::from(self.nr_segments).div_ceil(SEGS_PER_INDIRECT_FRAME)
    }

    /// Grants of the indirect pages in use.
    pub fn grefs(&self) -> &[GrantRef] {
        &self.indirect_grefs[..self.pages()]
    }

    /// Decode and validate the segments from the indirect pages' contents, copied (one page
    /// after the other) into `pages` by the backend. Also checks the sector range.
    pub fn segments(&self, pages: &[u8]) -> Result<Vec<Segment>, BlkifError> {
        let n = usize::from(self.nr_segments);
        let needed = n * core::mem::size_of::<BlkifRequestSegment>();
        let bytes = pages.get(..needed).ok_or(BlkifError::IndirectPagesShort {
            needed,
            got: pages.len(),
        })?;
        let raw = <[BlkifRequestSegment]>::ref_from_bytes(bytes).map_err(|_| {
            BlkifError::IndirectPagesShort {
                needed,
                got: pages.len(),
            }
        })?;
        let segs = raw
            .iter()
            .enumerate()
            .map(|(i, s)| Segment::decode(s, i))
            .collect::<Result<Vec<_>, _>>()?;
        check_range(self.sector, segs.iter().map(Segment::sectors).sum())?;
        Ok(segs)
    }
}

/// A validated block request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkRequest {
    /// `BLKIF_OP_READ`, 1..=11 segments.
    Read(RwRequest),
    /// `BLKIF_OP_WRITE`, 1..=11 segments.
    Write(RwRequest),
    /// `BLKIF_OP_WRITE_BARRIER`, 0..=11 segments.
    WriteBarrier(RwRequest),
    /// `BLKIF_OP_FLUSH_DISKCACHE`, 0..=11 segments (data to write before the flush).
    Flush(RwRequest),
    /// `BLKIF_OP_DISCARD`.
    Discard(DiscardRequest),
    /// `BLKIF_OP_INDIRECT`.
    Indirect(IndirectRequest),
}

fn check_range(sector: u64, sectors: u64) -> Result<(), BlkifError> {
    match sector.checked_add(sectors) {
        Some(_) => Ok(()),
        None => Err(BlkifError::SectorOverflow { sector, sectors }),
    }
}

impl BlkRequest {
    /// Decode a request slot copied out of the ring. `max_indirect_segments` is the limit the
    /// backend advertised in `feature-max-indirect-segments` (at most [`MAX_INDIRECT_SEGMENTS`]).
    pub fn decode(raw: &BlkifRequest, max_indirect_segments: u16) -> Result<Self, BlkifError> {
        match raw.operation {
            BLKIF_OP_READ => Ok(Self::Read(Self::decode_rw(raw, 1)?)),
            BLKIF_OP_WRITE => Ok(Self::Write(Self::decode_rw(raw, 1)?)),
            BLKIF_OP_WRITE_BARRIER => Ok(Self::WriteBarrier(Self::decode_rw(raw, 0)?)),
            BLKIF_OP_FLUSH_DISKCACHE => Ok(Self::Flush(Self::decode_rw(raw, 0)?)),
            BLKIF_OP_DISCARD => {
                let (d, _) = BlkifRequestDiscard::read_from_prefix(raw.as_bytes())
                    .map_err(|_| BlkifError::BadOperation(raw.operation))?;
                if d.flag & !BLKIF_DISCARD_SECURE != 0 {
                    return Err(BlkifError::BadDiscardFlags(d.flag));
                }
                check_range(d.sector_number, d.nr_sectors)?;
                Ok(Self::Discard(DiscardRequest {
                    id: d.id,
                    handle: d.handle,
                    sector: d.sector_number,
                    nr_sectors: d.nr_sectors,
                    secure: d.flag & BLKIF_DISCARD_SECURE != 0,
                }))
            }
            BLKIF_OP_INDIRECT => {
                let (r, _) = BlkifRequestIndirect::read_from_prefix(raw.as_bytes())
                    .map_err(|_| BlkifError::BadOperation(raw.operation))?;
                let op = match r.indirect_op {
                    BLKIF_OP_READ => IndirectOp::Read,
                    BLKIF_OP_WRITE => IndirectOp::Write,
                    other => return Err(BlkifError::BadIndirectOp(other)),
                };
                let max = max_indirect_segments.min(MAX_INDIRECT_SEGMENTS);
                if r.nr_segments == 0 {
                    return Err(BlkifError::NoSegments);
                }
                if r.nr_segments > max {
                    return Err(BlkifError::TooManySegments {
                        nr: r.nr_segments.into(),
                        max: max.into(),
                    });
                }
                // Each segment is at most 8 sectors: reject a range that cannot fit early.
                check_range(r.sector_number, u64::from(r.nr_segments) * 8)?;
                let mut req = IndirectRequest {
                    id: r.id,
                    handle: r.handle,
                    sector: r.sector_number,
                    op,
                    nr_segments: r.nr_segments,
                    indirect_grefs: [0; BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST],
                };
                let pages = req.pages();
                req.indirect_grefs[..pages].copy_from_slice(&r.indirect_grefs[..pages]);
                Ok(Self::Indirect(req))
            }
            other => Err(BlkifError::BadOperation(other)),
        }
    }

    fn decode_rw(raw: &BlkifRequest, min_segments: u8) -> Result<RwRequest, BlkifError> {
        let nr = raw.nr_segments;
        if nr < min_segments {
            return Err(BlkifError::NoSegments);
        }
        if usize::from(nr) > BLKIF_MAX_SEGMENTS_PER_REQUEST {
            return Err(BlkifError::TooManySegments {
                nr: nr.into(),
                max: 11,
            });
        }
        let mut segments = Segments {
            len: nr,
            ..Segments::default()
        };
        for (i, raw_seg) in raw.seg[..usize::from(nr)].iter().enumerate() {
            segments.segs[i] = Segment::decode(raw_seg, i)?;
        }
        check_range(
            raw.sector_number,
            segments.iter().map(Segment::sectors).sum(),
        )?;
        Ok(RwRequest {
            id: raw.id,
            handle: raw.handle,
            sector: raw.sector_number,
            segments,
        })
    }

    /// The request slot a frontend puts on the ring.
    pub fn encode(&self) -> BlkifRequest {
        let rw = |op: u8, r: &RwRequest| {
            let mut raw = BlkifRequest {
                operation: op,
                nr_segments: r.segments.len,
                handle: r.handle,
                id: r.id,
                sector_number: r.sector,
                ..BlkifRequest::default()
            };
            for (dst, s) in raw.seg.iter_mut().zip(r.segments.iter()) {
                *dst = s.encode();
            }
            raw
        };
        let overlay = |bytes: &[u8]| {
            let mut raw = BlkifRequest::default();
            raw.as_mut_bytes()[..bytes.len()].copy_from_slice(bytes);
            raw
        };
        match self {
            Self::Read(r) => rw(BLKIF_OP_READ, r),
            Self::Write(r) => rw(BLKIF_OP_WRITE, r),
            Self::WriteBarrier(r) => rw(BLKIF_OP_WRITE_BARRIER, r),
            Self::Flush(r) => rw(BLKIF_OP_FLUSH_DISKCACHE, r),
            Self::Discard(d) => overlay(
                BlkifRequestDiscard {
                    operation: BLKIF_OP_DISCARD,
                    flag: if d.secure { BLKIF_DISCARD_SECURE } else { 0 },
                    handle: d.handle,
                    _pad1: 0,
                    id: d.id,
                    sector_number: d.sector,
                    nr_sectors: d.nr_sectors,
                }
                .as_bytes(),
            ),
            Self::Indirect(r) => overlay(
                BlkifRequestIndirect {
                    operation: BLKIF_OP_INDIRECT,
                    indirect_op: match r.op {
                        IndirectOp::Read => BLKIF_OP_READ,
                        IndirectOp::Write => BLKIF_OP_WRITE,
                    },
                    nr_segments: r.nr_segments,
                    id: r.id,
                    sector_number: r.sector,
                    handle: r.handle,
                    indirect_grefs: r.indirect_grefs,
                    ..BlkifRequestIndirect::default()
                }
                .as_bytes(),
            ),
        }
    }

    /// The frontend's `id`.
    pub fn id(&self) -> u64 {
        match self {
            Self::Read(r) | Self::Write(r) | Self::WriteBarrier(r) | Self::Flush(r) => r.id,
            Self::Discard(d) => d.id,
            Self::Indirect(r) => r.id,
        }
    }

    /// The wire `operation` code.
    pub fn operation(&self) -> u8 {
        match self {
            Self::Read(_) => BLKIF_OP_READ,
            Self::Write(_) => BLKIF_OP_WRITE,
            Self::WriteBarrier(_) => BLKIF_OP_WRITE_BARRIER,
            Self::Flush(_) => BLKIF_OP_FLUSH_DISKCACHE,
            Self::Discard(_) => BLKIF_OP_DISCARD,
            Self::Indirect(_) => BLKIF_OP_INDIRECT,
        }
    }

    /// The response slot answering this request.
    pub fn response(&self, status: BlkStatus) -> BlkifResponse {
        BlkifResponse::new(self.id(), self.operation(), status)
    }
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

    fn seg(gref: u32, first: u8, last: u8) -> BlkifRequestSegment {
        BlkifRequestSegment {
            gref,
            first_sect: first,
            last_sect: last,
            _pad: [0; 2],
        }
    }

    fn raw_rw(op: u8, nsegs: u8) -> BlkifRequest {
        let mut r = BlkifRequest {
            operation: op,
            nr_segments: nsegs,
            handle: 51712,
            id: 77,
            sector_number: 1000,
            ..Default::default()
        };
        for (i, s) in r.seg.iter_mut().enumerate() {
            *s = seg(100 + u32::try_from(i).unwrap(), 0, 7);
        }
        r
    }

    #[test]
    fn read_decodes_and_round_trips() {
        let raw = raw_rw(BLKIF_OP_READ, 3);
        let BlkRequest::Read(r) = BlkRequest::decode(&raw, 0).unwrap() else {
            panic!()
        };
        assert_eq!(
            (r.id, r.handle, r.sector, r.segments.len()),
            (77, 51712, 1000, 3)
        );
        assert_eq!(
            r.segments[2],
            Segment {
                gref: 102,
                first_sect: 0,
                last_sect: 7
            }
        );
        assert_eq!(r.segments[0].len(), 4096);
        let req = BlkRequest::Read(r);
        let back = BlkRequest::decode(&req.encode(), 0).unwrap();
        assert_eq!(back, req);
        assert_eq!(
            req.response(BlkStatus::Okay),
            BlkifResponse::new(77, 0, BlkStatus::Okay)
        );
    }

    #[test]
    fn rejects_bad_requests() {
        let dec = |r: &BlkifRequest| BlkRequest::decode(r, 256);
        assert_eq!(
            dec(&raw_rw(BLKIF_OP_RESERVED_1, 1)),
            Err(BlkifError::BadOperation(4))
        );
        assert_eq!(dec(&raw_rw(200, 1)), Err(BlkifError::BadOperation(200)));
        assert_eq!(dec(&raw_rw(BLKIF_OP_WRITE, 0)), Err(BlkifError::NoSegments));
        assert!(dec(&raw_rw(BLKIF_OP_FLUSH_DISKCACHE, 0)).is_ok());
        assert!(dec(&raw_rw(BLKIF_OP_WRITE_BARRIER, 0)).is_ok());
        assert_eq!(
            dec(&raw_rw(BLKIF_OP_READ, 12)),
            Err(BlkifError::TooManySegments { nr: 12, max: 11 })
        );
        let mut r = raw_rw(BLKIF_OP_READ, 2);
        r.seg[1] = seg(1, 5, 4);
        assert_eq!(
            dec(&r),
            Err(BlkifError::BadSegment {
                index: 1,
                first: 5,
                last: 4
            })
        );
        r.seg[1] = seg(1, 0, 8);
        assert_eq!(
            dec(&r),
            Err(BlkifError::BadSegment {
                index: 1,
                first: 0,
                last: 8
            })
        );
        // Segments past nr_segments are not looked at.
        r.nr_segments = 1;
        assert!(dec(&r).is_ok());
        r.sector_number = u64::MAX - 7;
        assert_eq!(
            dec(&r),
            Err(BlkifError::SectorOverflow {
                sector: u64::MAX - 7,
                sectors: 8
            })
        );
    }

    #[test]
    fn discard_overlay() {
        let d = BlkifRequestDiscard {
            operation: BLKIF_OP_DISCARD,
            flag: BLKIF_DISCARD_SECURE,
            handle: 3,
            _pad1: 0,
            id: 9,
            sector_number: 64,
            nr_sectors: 128,
        };
        let mut raw = BlkifRequest::default();
        raw.as_mut_bytes()[..32].copy_from_slice(d.as_bytes());
        let req = BlkRequest::decode(&raw, 0).unwrap();
        assert_eq!(
            req,
            BlkRequest::Discard(DiscardRequest {
                id: 9,
                handle: 3,
                sector: 64,
                nr_sectors: 128,
                secure: true
            })
        );
        assert_eq!(req.encode(), raw);
        raw.nr_segments = 0x82; // the flag byte
        assert_eq!(
            BlkRequest::decode(&raw, 0),
            Err(BlkifError::BadDiscardFlags(0x82))
        );
    }

    #[test]
    fn indirect_request_and_pages() {
        let ind = BlkifRequestIndirect {
            operation: BLKIF_OP_INDIRECT,
            indirect_op: BLKIF_OP_WRITE,
            nr_segments: 513,
            id: 5,
            sector_number: 8,
            handle: 1,
            indirect_grefs: [10, 11, 12, 13, 14, 15, 16, 17],
            ..Default::default()
        };
        let mut raw = BlkifRequest::default();
        raw.as_mut_bytes()[..64].copy_from_slice(ind.as_bytes());
        assert_eq!(
            BlkRequest::decode(&raw, 256),
            Err(BlkifError::TooManySegments { nr: 513, max: 256 })
        );
        let BlkRequest::Indirect(r) = BlkRequest::decode(&raw, MAX_INDIRECT_SEGMENTS).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            (r.op, r.pages(), r.grefs()),
            (IndirectOp::Write, 2, &[10, 11][..])
        );
        let mut pages = vec![0u8; 2 * PAGE_SIZE];
        for (i, chunk) in pages.chunks_exact_mut(8).enumerate() {
            chunk.copy_from_slice(seg(u32::try_from(i).unwrap(), 1, 2).as_bytes());
        }
        let segs = r.segments(&pages).unwrap();
        assert_eq!(segs.len(), 513);
        assert_eq!(segs[512].gref, 512);
        assert_eq!(
            r.segments(&pages[..4096]),
            Err(BlkifError::IndirectPagesShort {
                needed: 4104,
                got: 4096
            })
        );
        pages[512 * 8 + 5] = 9; // last_sect of segment 512
        assert_eq!(
            r.segments(&pages),
            Err(BlkifError::BadSegment {
                index: 512,
                first: 1,
                last: 9
            })
        );
        // Encoding keeps only the pages in use.
        let BlkRequest::Indirect(e) =
            BlkRequest::decode(&BlkRequest::Indirect(r).encode(), 4096).unwrap()
        else {
            panic!()
        };
        assert_eq!(e.indirect_grefs, [10, 11, 0, 0, 0, 0, 0, 0]);
        let mut bad = ind;
        bad.indirect_op = BLKIF_OP_FLUSH_DISKCACHE;
        raw.as_mut_bytes()[..64].copy_from_slice(bad.as_bytes());
        assert_eq!(
            BlkRequest::decode(&raw, 4096),
            Err(BlkifError::BadIndirectOp(3))
        );
        bad.indirect_op = BLKIF_OP_READ;
        bad.nr_segments = 0;
        raw.as_mut_bytes()[..64].copy_from_slice(bad.as_bytes());
        assert_eq!(BlkRequest::decode(&raw, 4096), Err(BlkifError::NoSegments));
    }

    #[test]
    fn status_codes() {
        for s in [BlkStatus::Okay, BlkStatus::Error, BlkStatus::NotSupported] {
            assert_eq!(BlkStatus::try_from(i16::from(s)), Ok(s));
        }
        assert_eq!(BlkStatus::try_from(5), Err(5));
        assert_eq!(BLKIF_RING_SIZE, 32);
    }
}
