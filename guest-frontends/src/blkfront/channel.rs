//! One connection to one backend: the ring page, its grant, the event channel, and the data
//! pages granted per request.
//!
//! # Data pages
//!
//! Request data lives in pages of a [`PagePool`] that outlives every connection: shareable
//! pages ([`Platform::alloc_shared_page`], so a backend may map, copy or pin them), allocated on
//! first use up to a limit. A piece of `n` sectors uses `ceil(n / 8)` pages, filled from offset
//! 0: segment `i` is sectors `0..=k` of page `i`. Each page is granted to the backend for the
//! request only (read-only for writes) and the grant is ended when the answer arrives. A grant
//! the backend still holds (`GrantInUse`) is *quarantined*: its page is not reused until a later
//! [`PagePool::retry_quarantine`] ends it, so a late write by a dead or slow backend can never
//! land in a page that now belongs to another request.
//!
//! # Indirect requests
//!
//! A piece needing more than 11 pages is sent as `BLKIF_OP_INDIRECT` when the backend
//! advertised `feature-max-indirect-segments`: its segment descriptors fill extra pool pages
//! (512 per page), granted read-only.
//!
//! # Trust
//!
//! Responses are copied out of the ring ([`devchan::ring::FrontRing::get_response`], which
//! also rejects a response producer index that runs ahead of our requests); the caller matches
//! them against the shadow table. Read data is copied out of our own pages after the answer.

use std::sync::Arc;

use devchan::blkif::{
    BlkRequest, BlkifFrontRing, BlkifRequestSegment, BlkifResponse, DiscardRequest, IndirectOp,
    IndirectRequest, RwRequest, Segment, Segments, BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST,
    BLKIF_MAX_SEGMENTS_PER_REQUEST, BLKIF_OP_INDIRECT, SECTOR_SIZE, SEGS_PER_INDIRECT_FRAME,
};
use devchan::grant::{DomId, GrantRef, PAGE_SIZE};
use devchan::platform::{Platform, PlatformError, Port, SharedPage};
use devchan::ring::{FrontRing, RingError};
use vm_memory::{Bytes, VolatileSlice};
use zerocopy::IntoBytes;

use super::shadow::{direct_op, Piece, PieceOp};

/// Sectors per data page.
const SECTORS_PER_PAGE: u64 = (PAGE_SIZE / SECTOR_SIZE) as u64;

/// Errors of one connection.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// A platform call failed.
    #[error("Platform operation {0} failed")]
    Platform(&'static str, #[source] PlatformError),
    /// The ring's indexes are broken (the backend is faulty or hostile).
    #[error("Ring failed")]
    Ring(#[from] RingError),
    /// A data page could not be read or written.
    #[error("Data page access failed")]
    Memory,
    /// A piece too large for any request the backend accepts.
    #[error("Piece of {0} pages does not fit a request")]
    TooLarge(usize),
}

type Result<T> = std::result::Result<T, ChannelError>;

/// Data pages shared by every connection of one frontend (see the module docs).
pub struct PagePool<P: Platform> {
    pages: Vec<P::Page>,
    free: Vec<usize>,
    max: usize,
    quarantine: Vec<(GrantRef, usize)>,
}

impl<P: Platform> PagePool<P> {
    /// A pool of at most `max` pages.
    pub fn new(max: usize) -> Self {
        Self {
            pages: Vec::new(),
            free: Vec::new(),
            max,
            quarantine: Vec::new(),
        }
    }

    /// Pages that could be handed out now (free plus not yet allocated).
    pub fn available(&self) -> usize {
        self.free.len() + (self.max - self.pages.len())
    }

    /// Pages held by grants a backend has not released.
    pub fn quarantined(&self) -> usize {
        self.quarantine.len()
    }

    fn alloc(&mut self, platform: &P, n: usize) -> Result<Vec<usize>> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            if let Some(i) = self.free.pop() {
                out.push(i);
            } else if self.pages.len() < self.max {
                match platform.alloc_shared_page() {
                    Ok(p) => {
                        self.pages.push(p);
                        out.push(self.pages.len() - 1);
                    }
                    Err(e) => {
                        self.free.extend(out);
                        return Err(ChannelError::Platform("alloc_shared_page", e));
                    }
                }
            } else {
                self.free.extend(out);
                return Err(ChannelError::Platform(
                    "alloc data page",
                    PlatformError::Exhausted("data pages"),
                ));
            }
        }
        Ok(out)
    }

    /// End `gref` and give `page` back, or quarantine both if the backend still holds it.
    fn release(&mut self, platform: &P, gref: GrantRef, page: usize) {
        match platform.end_access(gref) {
            Ok(()) => self.free.push(page),
            Err(e) => {
                tracing::debug!(gref, error = %e, "grant still in use; page quarantined");
                self.quarantine.push((gref, page));
            }
        }
    }

    /// Try again to end quarantined grants.
    pub fn retry_quarantine(&mut self, platform: &P) {
        let q = std::mem::take(&mut self.quarantine);
        for (gref, page) in q {
            self.release(platform, gref, page);
        }
    }

    fn slice(&self, page: usize) -> Result<VolatileSlice<'_>> {
        let p = self.pages.get(page).ok_or(ChannelError::Memory)?;
        // SAFETY: a pool page is a 4 KiB shareable page that stays mapped while its handle
        // (owned by `self.pages`) lives, which outlives the returned slice (it borrows `self`).
        // The backend may access it concurrently; VolatileSlice only does volatile accesses.
        Ok(unsafe { VolatileSlice::new(p.as_ptr(), PAGE_SIZE) })
    }

    fn write(&self, page: usize, data: &[u8]) -> Result<()> {
        self.slice(page)?
            .write_slice(data, 0)
            .map_err(|_| ChannelError::Memory)
    }

    fn read(&self, page: usize, buf: &mut [u8]) -> Result<()> {
        self.slice(page)?
            .read_slice(buf, 0)
            .map_err(|_| ChannelError::Memory)
    }

    fn frame(&self, page: usize) -> u64 {
        self.pages.get(page).map_or(0, SharedPage::frame)
    }
}

/// Grants and pages one in-flight request holds.
#[derive(Debug, Default)]
struct Held {
    /// (grant, pool page) for data pages, then indirect pages.
    grants: Vec<(GrantRef, usize)>,
    /// How many of `grants` are data pages.
    data: usize,
}

/// A connection to one backend.
pub struct Channel<P: Platform> {
    platform: Arc<P>,
    backend: DomId,
    // Declared before `page`: the ring points into it and must go first.
    ring: BlkifFrontRing,
    page: P::Page,
    ring_gref: GrantRef,
    port: Port,
    handle: u16,
    max_indirect: u32,
    held: Vec<Option<Held>>,
}

impl<P: Platform> Channel<P> {
    /// Set up a fresh ring for `backend`: a page (a new one unless `reuse` is given), its grant
    /// and an unbound event-channel port.
    pub fn new(platform: Arc<P>, backend: DomId, reuse: Option<P::Page>) -> Result<Self> {
        let page = match reuse {
            Some(p) => p,
            None => platform
                .alloc_shared_page()
                .map_err(|e| ChannelError::Platform("alloc_shared_page", e))?,
        };
        let base = core::ptr::NonNull::new(page.as_ptr()).ok_or(ChannelError::Memory)?;
        // SAFETY: `page` is a page-aligned 4 KiB shareable page that stays mapped while its
        // handle lives; the handle is stored in the same struct as the ring and dropped after
        // it (field order), and this process touches the page only through this ring.
        let ring = unsafe { FrontRing::init(base, PAGE_SIZE) }?;
        let ring_gref = platform
            .grant_access(backend, page.frame(), false)
            .map_err(|e| ChannelError::Platform("grant_access", e))?;
        let port = match platform.evtchn_alloc_unbound(backend) {
            Ok(p) => p,
            Err(e) => {
                let _ = platform.end_access(ring_gref);
                return Err(ChannelError::Platform("evtchn_alloc_unbound", e));
            }
        };
        let size = ring.size() as usize;
        Ok(Self {
            platform,
            backend,
            ring,
            page,
            ring_gref,
            port,
            handle: 0,
            max_indirect: 0,
            held: (0..size).map(|_| None).collect(),
        })
    }

    /// Ring entries.
    pub fn ring_size(&self) -> u32 {
        self.ring.size()
    }

    /// The ring's grant reference (`ring-ref`).
    pub fn ring_ref(&self) -> GrantRef {
        self.ring_gref
    }

    /// The event-channel port (`event-channel`).
    pub fn port(&self) -> Port {
        self.port
    }

    /// The backend domain.
    pub fn backend(&self) -> DomId {
        self.backend
    }

    /// Set the features read from the backend once it is connected.
    pub fn set_features(&mut self, handle: u16, max_indirect: u32) {
        self.handle = handle;
        self.max_indirect = max_indirect.min(u32::from(devchan::blkif::MAX_INDIRECT_SEGMENTS));
    }

    /// The most data pages one request may carry on this connection.
    pub fn max_pages(&self) -> usize {
        BLKIF_MAX_SEGMENTS_PER_REQUEST.max(self.max_indirect as usize)
    }

    /// A free request slot exists.
    pub fn has_room(&self) -> bool {
        !self.ring.is_full()
    }

    /// Pool pages `piece` needs (data plus indirect descriptor pages).
    pub fn pages_needed(&self, piece: &Piece) -> usize {
        let data = piece_pages(piece);
        if data > BLKIF_MAX_SEGMENTS_PER_REQUEST {
            data + data.div_ceil(SEGS_PER_INDIRECT_FRAME)
        } else {
            data
        }
    }

    /// The `operation` a request for `piece` carries.
    pub fn wire_op(&self, piece: &Piece) -> u8 {
        if piece_pages(piece) > BLKIF_MAX_SEGMENTS_PER_REQUEST {
            BLKIF_OP_INDIRECT
        } else {
            direct_op(&piece.op)
        }
    }

    /// Put `piece` on the ring as request `id` (not yet pushed). On error nothing is held.
    pub fn issue(&mut self, pool: &mut PagePool<P>, id: u32, piece: &Piece) -> Result<()> {
        let data_pages = piece_pages(piece);
        let indirect = data_pages > BLKIF_MAX_SEGMENTS_PER_REQUEST;
        if indirect && data_pages > self.max_indirect as usize {
            return Err(ChannelError::TooLarge(data_pages));
        }
        if !matches!(self.held.get(id as usize), Some(None)) {
            return Err(ChannelError::Memory);
        }
        let mut held = Held::default();
        let pages = pool.alloc(&self.platform, self.pages_needed(piece))?;
        let readonly = !matches!(piece.op, PieceOp::Read { .. });
        let result = (|| -> Result<BlkRequest> {
            let mut segs = Vec::with_capacity(data_pages);
            let total = piece.sectors();
            for (i, &page) in pages[..data_pages].iter().enumerate() {
                let first = i as u64 * SECTORS_PER_PAGE;
                let n = (total - first).min(SECTORS_PER_PAGE);
                if let PieceOp::Write(data) = &piece.op {
                    let start = i * PAGE_SIZE;
                    let end = start + n as usize * SECTOR_SIZE;
                    pool.write(page, data.get(start..end).ok_or(ChannelError::Memory)?)?;
                }
                let gref = self
                    .platform
                    .grant_access(self.backend, pool.frame(page), readonly)
                    .map_err(|e| ChannelError::Platform("grant_access", e))?;
                held.grants.push((gref, page));
                // n is 1..=8, so last_sect is 0..=7.
                segs.push(Segment {
                    gref,
                    first_sect: 0,
                    last_sect: u8::try_from(n - 1).unwrap_or(7),
                });
            }
            held.data = held.grants.len();
            if !indirect {
                return Ok(self.direct(id, piece, &segs));
            }
            let mut grefs = [0; BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST];
            for (chunk, (&page, g)) in segs
                .chunks(SEGS_PER_INDIRECT_FRAME)
                .zip(pages[data_pages..].iter().zip(grefs.iter_mut()))
            {
                let raw: Vec<BlkifRequestSegment> = chunk.iter().map(Segment::encode).collect();
                pool.write(page, raw.as_slice().as_bytes())?;
                *g = self
                    .platform
                    .grant_access(self.backend, pool.frame(page), true)
                    .map_err(|e| ChannelError::Platform("grant_access", e))?;
                held.grants.push((*g, page));
            }
            Ok(BlkRequest::Indirect(IndirectRequest {
                id: u64::from(id),
                handle: self.handle,
                sector: piece.sector,
                op: if readonly {
                    IndirectOp::Write
                } else {
                    IndirectOp::Read
                },
                // At most max_indirect <= MAX_INDIRECT_SEGMENTS (a u16), checked above.
                nr_segments: u16::try_from(data_pages).unwrap_or(u16::MAX),
                indirect_grefs: grefs,
            }))
        })();
        let req = match result {
            Ok(r) => r,
            Err(e) => {
                let granted: Vec<usize> = held.grants.iter().map(|(_, p)| *p).collect();
                for (g, p) in held.grants {
                    pool.release(&self.platform, g, p);
                }
                pool.free
                    .extend(pages.into_iter().filter(|p| !granted.contains(p)));
                return Err(e);
            }
        };
        // Cannot fail: the caller checked has_room and ids are < ring size.
        if let Err(e) = self.ring.put_request(&req.encode()) {
            for (g, p) in held.grants {
                pool.release(&self.platform, g, p);
            }
            return Err(e.into());
        }
        *slot_mut(&mut self.held, id) = Some(held);
        Ok(())
    }

    fn direct(&self, id: u32, piece: &Piece, segs: &[Segment]) -> BlkRequest {
        let rw = RwRequest {
            id: u64::from(id),
            handle: self.handle,
            sector: piece.sector,
            // At most 11 here (the caller chose direct).
            segments: Segments::new(segs).unwrap_or_default(),
        };
        match &piece.op {
            PieceOp::Read { .. } => BlkRequest::Read(rw),
            PieceOp::Write(_) => BlkRequest::Write(rw),
            PieceOp::Flush => BlkRequest::Flush(RwRequest { sector: 0, ..rw }),
            PieceOp::Discard { sectors, secure } => BlkRequest::Discard(DiscardRequest {
                id: u64::from(id),
                handle: self.handle,
                sector: piece.sector,
                nr_sectors: *sectors,
                secure: *secure,
            }),
        }
    }

    /// Publish queued requests and notify the backend if it asked for it.
    pub fn push(&mut self) -> Result<()> {
        if self.ring.push_requests() {
            self.platform
                .evtchn_notify(self.port)
                .map_err(|e| ChannelError::Platform("evtchn_notify", e))?;
        }
        Ok(())
    }

    /// Copy every published response out of the ring; when none is left, ask for an event on
    /// the next one and check once more (so no wake-up is lost).
    pub fn take_responses(&mut self) -> Result<Vec<BlkifResponse>> {
        let mut out = Vec::new();
        loop {
            while let Some(r) = self.ring.get_response()? {
                out.push(r);
            }
            if !self.ring.final_check_for_responses()? {
                return Ok(out);
            }
        }
    }

    /// Request `id` was answered: copy read data into `out` (if given) and release its
    /// grants and pages.
    pub fn finish(
        &mut self,
        pool: &mut PagePool<P>,
        id: u32,
        out: Option<&mut [u8]>,
    ) -> Result<()> {
        let Some(held) = self.held.get_mut(id as usize).and_then(Option::take) else {
            return Ok(());
        };
        // End the grants first: once ended, the backend can no longer write the pages, so the
        // bytes we copy are the ones it answered with.
        let mut pages = Vec::with_capacity(held.data);
        for (i, (g, p)) in held.grants.into_iter().enumerate() {
            if i < held.data {
                pages.push(p);
            }
            pool.release(&self.platform, g, p);
        }
        if let Some(out) = out {
            for (chunk, page) in out.chunks_mut(PAGE_SIZE).zip(pages) {
                pool.read(page, chunk)?;
            }
        }
        Ok(())
    }

    /// Drop the connection without reading anything more from the ring: release every held
    /// grant (quarantining what the backend still uses), close the port and end the ring's
    /// grant. Returns the ring page if it can be reused for the next connection.
    pub fn teardown(mut self, pool: &mut PagePool<P>) -> Option<P::Page> {
        for held in self.held.drain(..).flatten() {
            for (g, p) in held.grants {
                pool.release(&self.platform, g, p);
            }
        }
        let _ = self.platform.evtchn_close(self.port);
        let reusable = self.platform.end_access(self.ring_gref).is_ok();
        reusable.then_some(self.page)
    }
}

fn slot_mut(held: &mut [Option<Held>], id: u32) -> &mut Option<Held> {
    &mut held[id as usize]
}

/// Data pages a piece occupies.
fn piece_pages(piece: &Piece) -> usize {
    match piece.op {
        PieceOp::Read { .. } | PieceOp::Write(_) => {
            usize::try_from(piece.sectors().div_ceil(SECTORS_PER_PAGE)).unwrap_or(usize::MAX)
        }
        PieceOp::Flush | PieceOp::Discard { .. } => 0,
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use devchan::blkif::{BlkStatus, BlkifBackRing, BlkifResponse, BLKIF_OP_WRITE};
    use devchan::platform::{CopyPtr, GrantCopyOp};
    use hypervisor::domain::DomainConfig;
    use hypervisor::local::LocalPlatform;
    use hypervisor::system::System;

    struct Pair {
        front: Arc<LocalPlatform>,
        back: LocalPlatform,
    }

    fn pair() -> Pair {
        let sys = System::new();
        let cfg = |n: &str| DomainConfig {
            name: n.into(),
            nr_frames: 16,
            iommu: None,
        };
        let f = sys.create_domain(cfg("front")).unwrap();
        let b = sys.create_domain(cfg("back")).unwrap();
        Pair {
            front: Arc::new(LocalPlatform::new(sys.clone(), f).unwrap()),
            back: LocalPlatform::new(sys, b).unwrap(),
        }
    }

    fn write_piece(sector: u64, pages: usize) -> Piece {
        let data = (0..pages * PAGE_SIZE).map(|i| (i % 253) as u8).collect();
        Piece {
            token: 1,
            seq: 0,
            sector,
            offset: 0,
            op: PieceOp::Write(data),
        }
    }

    /// Copy one granted page of the frontend into a buffer, as a backend would.
    fn copy_out(p: &Pair, gref: GrantRef) -> Vec<u8> {
        let st = p
            .back
            .grant_copy(&[GrantCopyOp {
                src: CopyPtr::Grant {
                    domid: p.front.domid(),
                    gref,
                    offset: 0,
                },
                dst: CopyPtr::Local {
                    frame: 8,
                    offset: 0,
                },
                len: 4096,
            }])
            .unwrap();
        assert_eq!(st, vec![0]);
        let mut b = vec![0u8; 4096];
        p.back.read_local(8, 0, &mut b).unwrap();
        b
    }

    fn back_ring(p: &Pair, ch: &Channel<LocalPlatform>) -> (BlkifBackRing, impl Sized) {
        let map = p
            .back
            .map_grant(p.front.domid(), ch.ring_ref(), false)
            .unwrap();
        let base = core::ptr::NonNull::new(map.as_ptr()).unwrap();
        // SAFETY: the mapping is a live 4 KiB page returned alongside the ring, which the
        // test keeps alive at least as long as the ring; only rings access it.
        let ring = unsafe { BlkifBackRing::attach(base, PAGE_SIZE).unwrap() };
        p.back
            .evtchn_bind_interdomain(p.front.domid(), ch.port())
            .unwrap();
        (ring, map)
    }

    #[test]
    fn direct_write_request_names_granted_data() {
        let p = pair();
        let mut pool = PagePool::new(64);
        let mut ch = Channel::new(p.front.clone(), p.back.domid(), None).unwrap();
        ch.set_features(7, 0);
        let piece = write_piece(100, 3);
        assert_eq!(ch.pages_needed(&piece), 3);
        assert_eq!(ch.wire_op(&piece), BLKIF_OP_WRITE);
        ch.issue(&mut pool, 5, &piece).unwrap();
        let (mut back, _map) = back_ring(&p, &ch);
        ch.push().unwrap();
        let raw = back.get_request().unwrap().unwrap();
        let BlkRequest::Write(r) = BlkRequest::decode(&raw, 0).unwrap() else {
            panic!("not a write")
        };
        assert_eq!((r.id, r.handle, r.sector, r.segments.len()), (5, 7, 100, 3));
        let PieceOp::Write(data) = &piece.op else {
            unreachable!()
        };
        for (i, s) in r.segments.iter().enumerate() {
            assert_eq!((s.first_sect, s.last_sect), (0, 7));
            assert_eq!(
                copy_out(&p, s.gref),
                data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]
            );
        }
        // Writes are granted read-only: the backend cannot write into them.
        let st = p
            .back
            .grant_copy(&[GrantCopyOp {
                src: CopyPtr::Local {
                    frame: 8,
                    offset: 0,
                },
                dst: CopyPtr::Grant {
                    domid: p.front.domid(),
                    gref: r.segments[0].gref,
                    offset: 0,
                },
                len: 16,
            }])
            .unwrap();
        assert_ne!(st, vec![0]);
        back.put_response(&BlkifResponse::new(5, BLKIF_OP_WRITE, BlkStatus::Okay))
            .unwrap();
        back.push_responses();
        let rsps = ch.take_responses().unwrap();
        assert_eq!(rsps.len(), 1);
        assert_eq!(pool.available(), 64 - 3);
        ch.finish(&mut pool, 5, None).unwrap();
        assert_eq!(pool.available(), 64, "pages back in the pool");
        // The grants are gone.
        let st = p
            .back
            .grant_copy(&[GrantCopyOp {
                src: CopyPtr::Grant {
                    domid: p.front.domid(),
                    gref: r.segments[0].gref,
                    offset: 0,
                },
                dst: CopyPtr::Local {
                    frame: 8,
                    offset: 0,
                },
                len: 16,
            }])
            .unwrap();
        assert_ne!(st, vec![0]);
    }

    #[test]
    fn large_pieces_go_indirect_only_when_offered() {
        let p = pair();
        let mut pool = PagePool::new(64);
        let mut ch = Channel::new(p.front.clone(), p.back.domid(), None).unwrap();
        let piece = write_piece(8, 20);
        assert!(matches!(
            ch.issue(&mut pool, 0, &piece),
            Err(ChannelError::TooLarge(20))
        ));
        assert_eq!(pool.available(), 64, "nothing held after a refusal");
        ch.set_features(0, 32);
        assert_eq!(ch.pages_needed(&piece), 21);
        assert_eq!(ch.wire_op(&piece), BLKIF_OP_INDIRECT);
        ch.issue(&mut pool, 0, &piece).unwrap();
        let (mut back, _map) = back_ring(&p, &ch);
        ch.push().unwrap();
        let raw = back.get_request().unwrap().unwrap();
        let BlkRequest::Indirect(r) = BlkRequest::decode(&raw, 32).unwrap() else {
            panic!("not indirect")
        };
        assert_eq!((r.op, r.nr_segments, r.pages()), (IndirectOp::Write, 20, 1));
        let segs_page = copy_out(&p, r.grefs()[0]);
        let segs = r.segments(&segs_page).unwrap();
        assert_eq!(segs.len(), 20);
        let PieceOp::Write(data) = &piece.op else {
            unreachable!()
        };
        assert_eq!(copy_out(&p, segs[19].gref), data[19 * PAGE_SIZE..]);
    }

    #[test]
    fn reads_copy_answered_data_and_teardown_releases_everything() {
        let p = pair();
        let mut pool = PagePool::new(8);
        let mut ch = Channel::new(p.front.clone(), p.back.domid(), None).unwrap();
        let piece = Piece {
            token: 1,
            seq: 0,
            sector: 0,
            offset: 0,
            op: PieceOp::Read { sectors: 9 },
        };
        assert_eq!(ch.pages_needed(&piece), 2);
        ch.issue(&mut pool, 1, &piece).unwrap();
        ch.issue(&mut pool, 2, &piece).unwrap();
        let (mut back, map) = back_ring(&p, &ch);
        ch.push().unwrap();
        let BlkRequest::Read(r) =
            BlkRequest::decode(&back.get_request().unwrap().unwrap(), 0).unwrap()
        else {
            panic!("not a read")
        };
        assert_eq!(r.segments[1].last_sect, 0, "9 sectors: 8 + 1");
        // The backend fills the pages.
        p.back.write_local(8, 0, &[0x77; 4096]).unwrap();
        for s in r.segments.iter() {
            let st = p
                .back
                .grant_copy(&[GrantCopyOp {
                    src: CopyPtr::Local {
                        frame: 8,
                        offset: 0,
                    },
                    dst: CopyPtr::Grant {
                        domid: p.front.domid(),
                        gref: s.gref,
                        offset: 0,
                    },
                    len: 4096,
                }])
                .unwrap();
            assert_eq!(st, vec![0]);
        }
        let mut out = vec![0u8; 9 * 512];
        ch.finish(&mut pool, 1, Some(&mut out)).unwrap();
        assert!(out.iter().all(|b| *b == 0x77));
        // Request 2 is never answered: teardown ends its grants; the ring page is still
        // mapped by the backend, so it is not offered for reuse.
        assert_eq!(pool.available(), 6);
        assert!(ch.teardown(&mut pool).is_none());
        assert_eq!(pool.available(), 8);
        let _ = back;
        drop(map);
    }
}
