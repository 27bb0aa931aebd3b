//! Decoding request slots into validated [`BlkRequest`]s, and encoding them back.

use core::ops::Deref;

use super::*;

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
}
