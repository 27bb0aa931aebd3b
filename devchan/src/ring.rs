//! Xen's shared descriptor rings (`xen/include/public/io/ring.h`), generic over the messages.
//!
//! # Wire layout
//!
//! A ring lives in one shared page (or `2^order` contiguous pages) that the frontend allocates
//! and grants to the backend:
//!
//! | offset | size | field | written by |
//! |---|---|---|---|
//! | 0 | 4 | `req_prod`: requests produced (free-running `u32`) | frontend |
//! | 4 | 4 | `req_event`: notify the backend when `req_prod` passes this | backend |
//! | 8 | 4 | `rsp_prod`: responses produced | backend |
//! | 12 | 4 | `rsp_event`: notify the frontend when `rsp_prod` passes this | frontend |
//! | 16 | 4 | `pvt`: protocol-private bytes (netif `smartpoll_active`), zero here | — |
//! | 20 | 44 | `__pad`: zero, so the entries start at 64 | — |
//! | 64 | `n × E` | the entries, a C `union { req; rsp; }` each | both |
//!
//! `E` is the size of that union: the larger of the request and response sizes, rounded up to
//! their alignment ([`entry_size`]). `n` is the largest power of two of entries that fits after
//! the header (`__RING_SIZE`, [`ring_size`]): 256 for 8-byte entries in one page, 32 for blkif's
//! 112-byte entries. Indexes are free-running `u32`s; entry `i` lives in slot `i & (n - 1)`.
//!
//! # Protocol
//!
//! Requests and responses share the slots: the frontend writes a request into slot `req_prod_pvt`,
//! the backend copies it out, and later writes a response into the slot at `rsp_prod_pvt`, which
//! is never ahead of the requests it has consumed. So `req_prod - rsp_prod <= n` always holds for
//! an honest frontend, and `rsp_prod - rsp_cons` never exceeds the requests still outstanding for
//! an honest backend. Responses may be produced in any order; the message's `id` field (echoed
//! from the request) says which request a response answers ([`IdAllocator`], [`InFlight`]).
//!
//! *Publishing.* The producer writes the entries, then (release) stores the new producer index.
//! *Notification hold-off.* After publishing, the producer sends an event only if the new
//! producer index passed the consumer's `*_event` value since the last publish:
//! `new - event < new - old` in wrapping arithmetic (`RING_PUSH_*_AND_CHECK_NOTIFY`). A consumer
//! that runs out of work sets `*_event = cons + 1` and re-checks (`RING_FINAL_CHECK_FOR_*`);
//! with a full fence between the store and the re-check on both sides, either the producer
//! sees the new event index and notifies, or the consumer sees the new entries: no wake-up is
//! lost.
//!
//! # Trust
//!
//! The page is shared with another domain that may write anything at any time. Index words are
//! accessed only through atomics and entries only through volatile copies: a request or response
//! is copied out of the ring *before* it is looked at, then validated. A producer index that is
//! more than `n` ahead of what we may consume, or behind it, is [`RingError::Overflow`]: the caller
//! should mark the channel failed. Nothing here panics on peer data or reads outside the ring.
//!
//! # Example
//!
//! ```
//! use devchan::ring::{BackRing, FrontRing, OwnedPage};
//!
//! let page = OwnedPage::new();
//! // SAFETY: the page is 4 KiB, page-aligned, outlives both rings and is only accessed
//! // through them.
//! let (mut front, mut back) = unsafe {
//!     (
//!         FrontRing::<u64, u32>::init(page.as_non_null(), OwnedPage::SIZE).unwrap(),
//!         BackRing::<u64, u32>::attach_at(page.as_non_null(), OwnedPage::SIZE, 0, 0).unwrap(),
//!     )
//! };
//! front.put_request(&7).unwrap();
//! let notify_back = front.push_requests();
//! assert!(notify_back);
//! let req = back.get_request().unwrap().unwrap();
//! back.put_response(&(req as u32 * 2)).unwrap();
//! back.push_responses();
//! assert_eq!(front.get_response().unwrap(), Some(14));
//! ```

use core::marker::PhantomData;
use core::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU32, Ordering};

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::grant::PAGE_SIZE;

mod ids;
pub use ids::{IdAllocator, InFlight};

/// A free-running ring index (`RING_IDX`).
pub type RingIdx = u32;

/// A message that can travel on a ring: plain old data with no padding and no invalid bit
/// patterns, so it can be copied to and from shared memory byte for byte. Derive zerocopy's
/// `FromBytes`, `IntoBytes` and `Immutable` on a `#[repr(C)]` struct (which checks that it has
/// no padding) and this trait comes for free.
pub trait RingMessage: FromBytes + IntoBytes + Immutable + Copy + Send + 'static {}

impl<T: FromBytes + IntoBytes + Immutable + Copy + Send + 'static> RingMessage for T {}

/// The shared header of every ring: `struct X_sring` up to (not including) `ring[]`.
#[repr(C)]
#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, PartialEq, Eq)]
pub struct SringHeader {
    /// Requests produced by the frontend.
    pub req_prod: RingIdx,
    /// The backend wants an event when `req_prod` passes this.
    pub req_event: RingIdx,
    /// Responses produced by the backend.
    pub rsp_prod: RingIdx,
    /// The frontend wants an event when `rsp_prod` passes this.
    pub rsp_event: RingIdx,
    /// Protocol-private union (`pvt`: netif `smartpoll_active`, `pvt_pad[4]`).
    pub pvt: [u8; 4],
    /// Padding so the entries start at [`RING_HEADER_SIZE`].
    pub __pad: [u8; 44],
}

/// Offset of the first entry (`offsetof(struct X_sring, ring)`).
pub const RING_HEADER_SIZE: usize = 64;

const _: () = assert!(core::mem::size_of::<SringHeader>() == RING_HEADER_SIZE);
const _: () = assert!(core::mem::offset_of!(SringHeader, rsp_event) == 12);
const _: () = assert!(core::mem::offset_of!(SringHeader, pvt) == 16);
const _: () = assert!(core::mem::offset_of!(SringHeader, __pad) == 20);

/// Byte offsets of the index words in the header (checked against `io/ring.h` through
/// [`SringHeader`]'s ABI checks).
const REQ_PROD: usize = core::mem::offset_of!(SringHeader, req_prod);
const REQ_EVENT: usize = core::mem::offset_of!(SringHeader, req_event);
const RSP_PROD: usize = core::mem::offset_of!(SringHeader, rsp_prod);
const RSP_EVENT: usize = core::mem::offset_of!(SringHeader, rsp_event);

/// Required alignment of ring memory (a page in practice): covers the index words and any
/// entry alignment up to the header size.
pub const RING_ALIGN: usize = 64;

/// Round down to a power of two, 0 stays 0 (`__RD32`).
const fn round_down_pow2(x: usize) -> usize {
    if x == 0 {
        0
    } else {
        1 << (usize::BITS - 1 - x.leading_zeros())
    }
}

/// Size of one ring entry: `sizeof(union { Req req; Rsp rsp; })`.
pub const fn entry_size<Req, Rsp>() -> usize {
    let (sq, ss) = (core::mem::size_of::<Req>(), core::mem::size_of::<Rsp>());
    let (aq, as_) = (core::mem::align_of::<Req>(), core::mem::align_of::<Rsp>());
    let size = if sq > ss { sq } else { ss };
    let align = if aq > as_ { aq } else { as_ };
    size.div_ceil(align) * align
}

/// Number of entries of a ring in `bytes` of shared memory (`__CONST_RING_SIZE`): the largest
/// power of two that fits after the header, or 0 if none fits.
pub const fn ring_size<Req, Rsp>(bytes: usize) -> u32 {
    let entry = entry_size::<Req, Rsp>();
    if bytes <= RING_HEADER_SIZE || entry == 0 {
        return 0;
    }
    let n = round_down_pow2((bytes - RING_HEADER_SIZE) / entry);
    if n > (1 << 31) {
        1 << 31
    } else {
        // Cannot truncate: n <= 2^31 was checked just above.
        #[allow(clippy::cast_possible_truncation)]
        {
            n as u32
        }
    }
}

/// Number of entries of a one-page ring of these messages.
pub const fn page_ring_size<Req, Rsp>() -> u32 {
    ring_size::<Req, Rsp>(PAGE_SIZE)
}

/// Why a ring operation failed.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum RingError {
    /// The ring memory is not aligned to [`RING_ALIGN`].
    #[error("Ring memory is not {RING_ALIGN}-byte aligned")]
    Misaligned,
    /// The ring memory is too small for one entry.
    #[error("Ring memory of {0} bytes holds no entry")]
    TooSmall(usize),
    /// Private indexes given to an attach are more than the ring size apart.
    #[error("Private ring indexes are inconsistent: producer {prod}, consumer {cons}")]
    BadIndexes {
        /// Our producer index.
        prod: RingIdx,
        /// Our consumer index.
        cons: RingIdx,
    },
    /// The peer's producer index is more than the ring size ahead of what we may consume, or
    /// behind our consumer: the peer is broken or hostile.
    #[error("Peer's producer index {prod} is out of range for our consumer index {cons}")]
    Overflow {
        /// The producer index read from shared memory.
        prod: RingIdx,
        /// Our consumer index.
        cons: RingIdx,
    },
    /// Frontend: no free slot for another request.
    #[error("Ring is full")]
    Full,
    /// Backend: every consumed request already has a response.
    #[error("No consumed request is waiting for a response")]
    Unrequested,
    /// A request id that is already in flight.
    #[error("Request id {0} is already in flight")]
    DuplicateId(u64),
    /// A response or completion for an id that is not in flight.
    #[error("Request id {0} is not in flight")]
    UnknownId(u64),
    /// Every id of the table is in use.
    #[error("All {0} request ids are in flight")]
    IdsExhausted(usize),
}

/// The shared part of a ring: a pointer and the geometry, shared by both ends' types.
struct Sring<Req, Rsp> {
    base: NonNull<u8>,
    nr_ents: RingIdx,
    _msgs: PhantomData<fn() -> (Req, Rsp)>,
}

// SAFETY: `Sring` is a pointer to shared memory that the constructor's caller guarantees stays
// valid; all accesses through it are atomic or volatile and need no thread affinity, so moving
// it to another thread is sound (it is not `Sync`: one thread drives each end).
unsafe impl<Req, Rsp> Send for Sring<Req, Rsp> {}

impl<Req: RingMessage, Rsp: RingMessage> Sring<Req, Rsp> {
    /// Entry alignment must divide the header size so `RING_ALIGN`-aligned memory aligns entries.
    const ENTRY_FITS: () = assert!(
        RING_ALIGN % core::mem::align_of::<Req>() == 0
            && RING_ALIGN % core::mem::align_of::<Rsp>() == 0
            && core::mem::size_of::<Req>() > 0
            && core::mem::size_of::<Rsp>() > 0
    );

    /// # Safety
    /// As for [`FrontRing::init`].
    unsafe fn new(base: NonNull<u8>, bytes: usize) -> Result<Self, RingError> {
        let () = Self::ENTRY_FITS;
        if base.as_ptr() as usize % RING_ALIGN != 0 {
            return Err(RingError::Misaligned);
        }
        let nr_ents = ring_size::<Req, Rsp>(bytes);
        if nr_ents == 0 {
            return Err(RingError::TooSmall(bytes));
        }
        Ok(Self {
            base,
            nr_ents,
            _msgs: PhantomData,
        })
    }

    /// One of the four index words of the header.
    fn word(&self, offset: usize) -> &AtomicU32 {
        debug_assert!(offset <= RSP_EVENT && offset % 4 == 0);
        // SAFETY: the constructor's caller guarantees `base` points to at least one header plus
        // one entry of valid shared memory for our lifetime; `offset` is one of the four index
        // offsets (< 16), the base is 64-aligned so the word is 4-aligned, `AtomicU32` has the
        // layout of `u32`, and this process accesses these words only atomically.
        unsafe { &*self.base.as_ptr().add(offset).cast::<AtomicU32>() }
    }

    /// Pointer to the slot that holds entry `idx`.
    fn slot(&self, idx: RingIdx) -> *mut u8 {
        let i = (idx & (self.nr_ents - 1)) as usize;
        // SAFETY: `i < nr_ents` and `ring_size` guarantees `64 + nr_ents * entry_size <= bytes`,
        // so the offset stays inside the memory the constructor's caller vouched for.
        unsafe {
            self.base
                .as_ptr()
                .add(RING_HEADER_SIZE + i * entry_size::<Req, Rsp>())
        }
    }

    /// Copy the message in slot `idx` out of shared memory.
    fn read<T: RingMessage>(&self, idx: RingIdx) -> T {
        // SAFETY: the slot is inside the ring (see `slot`) and at least `size_of::<T>()` long (T
        // is Req or Rsp, and entries are as large as the larger); it is aligned for T because
        // the base is 64-aligned, entry_size is a multiple of T's alignment and that alignment
        // divides 64 (ENTRY_FITS). T is `FromBytes`, so whatever bytes the peer left there make
        // a valid T. Volatile: the peer may write at any time; we copy once and use the copy.
        unsafe { self.slot(idx).cast::<T>().read_volatile() }
    }

    /// Copy `msg` into slot `idx` of shared memory.
    fn write<T: RingMessage>(&self, idx: RingIdx, msg: &T) {
        // SAFETY: as in `read`, the slot is in bounds and aligned for T. T is `IntoBytes` (no
        // padding), so no uninitialised byte reaches the peer. Volatile: the memory is shared.
        unsafe { self.slot(idx).cast::<T>().write_volatile(*msg) }
    }

    /// `SHARED_RING_INIT`: producers 0, events 1, private bytes and padding zeroed.
    fn init_header(&self) {
        self.word(REQ_PROD).store(0, Ordering::Relaxed);
        self.word(RSP_PROD).store(0, Ordering::Relaxed);
        self.word(REQ_EVENT).store(1, Ordering::Relaxed);
        self.word(RSP_EVENT).store(1, Ordering::Relaxed);
        for off in core::mem::offset_of!(SringHeader, pvt)..RING_HEADER_SIZE {
            // SAFETY: bytes 16..64 are the `pvt` and `__pad` fields of the header, inside the
            // memory the constructor's caller vouched for; volatile because it is shared.
            unsafe { self.base.as_ptr().add(off).write_volatile(0) };
        }
        // Make the initialised header visible before the indexes are used by either end (the
        // peer learns of the page later, through a grant and XenStore, which also orders).
        fence(Ordering::Release);
    }

    /// Publish producer word `prod_off` = `new` and decide whether the consumer, whose event
    /// word is `event_off`, must be notified (`RING_PUSH_*_AND_CHECK_NOTIFY`).
    fn push(&self, prod_off: usize, event_off: usize, new: RingIdx) -> bool {
        let old = self.word(prod_off).load(Ordering::Relaxed);
        // Release (xen_wmb): the entries written into the slots become visible to the consumer
        // before the new producer index does; pairs with the consumer's acquire load of it.
        self.word(prod_off).store(new, Ordering::Release);
        // Full fence (xen_mb): the new producer index is visible before we read the consumer's
        // event index; pairs with the fence in `final_check` so that either we see the event
        // index the consumer set before sleeping, or it sees our new entries.
        fence(Ordering::SeqCst);
        let event = self.word(event_off).load(Ordering::Relaxed);
        new.wrapping_sub(event) < new.wrapping_sub(old)
    }
}

impl<Req, Rsp> core::fmt::Debug for Sring<Req, Rsp> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Sring")
            .field("base", &self.base)
            .field("nr_ents", &self.nr_ents)
            .finish()
    }
}

/// The frontend's end of a ring: produces requests, consumes responses.
#[derive(Debug)]
pub struct FrontRing<Req, Rsp> {
    sring: Sring<Req, Rsp>,
    req_prod_pvt: RingIdx,
    rsp_cons: RingIdx,
}

impl<Req: RingMessage, Rsp: RingMessage> FrontRing<Req, Rsp> {
    /// Initialise the shared header (`SHARED_RING_INIT`) and start with both private indexes at
    /// 0 (`FRONT_RING_INIT`): what the end that allocates a fresh ring page does.
    ///
    /// # Safety
    /// `page` must point to `bytes` bytes of memory, aligned to [`RING_ALIGN`], that stay valid
    /// (mapped) for as long as the returned ring exists. Within this process the memory may be
    /// accessed only through ring objects of this module (at most one front and one back),
    /// never through references; another domain may write it at any time.
    pub unsafe fn init(page: NonNull<u8>, bytes: usize) -> Result<Self, RingError> {
        // SAFETY: forwarded from our caller.
        let sring = unsafe { Sring::new(page, bytes)? };
        sring.init_header();
        Ok(Self {
            sring,
            req_prod_pvt: 0,
            rsp_cons: 0,
        })
    }

    /// Attach to a ring whose header is already initialised, with our private producer index
    /// at `req_prod_pvt` and consumer index at `rsp_cons` (`FRONT_RING_ATTACH`, generalised):
    /// how a frontend resumes with the indexes it kept.
    ///
    /// # Safety
    /// As for [`FrontRing::init`].
    pub unsafe fn attach_at(
        page: NonNull<u8>,
        bytes: usize,
        req_prod_pvt: RingIdx,
        rsp_cons: RingIdx,
    ) -> Result<Self, RingError> {
        // SAFETY: forwarded from our caller.
        let sring = unsafe { Sring::new(page, bytes)? };
        if req_prod_pvt.wrapping_sub(rsp_cons) > sring.nr_ents {
            return Err(RingError::BadIndexes {
                prod: req_prod_pvt,
                cons: rsp_cons,
            });
        }
        Ok(Self {
            sring,
            req_prod_pvt,
            rsp_cons,
        })
    }

    /// Number of entries (`RING_SIZE`).
    pub fn size(&self) -> u32 {
        self.sring.nr_ents
    }

    /// Our next request index, not yet visible to the backend before a push.
    pub fn req_prod_pvt(&self) -> RingIdx {
        self.req_prod_pvt
    }

    /// Index of the next response we will consume.
    pub fn rsp_cons(&self) -> RingIdx {
        self.rsp_cons
    }

    /// Slots free for new requests (`RING_FREE_REQUESTS`).
    pub fn free_requests(&self) -> u32 {
        self.sring.nr_ents - self.req_prod_pvt.wrapping_sub(self.rsp_cons)
    }

    /// No slot is free (`RING_FULL`).
    pub fn is_full(&self) -> bool {
        self.free_requests() == 0
    }

    /// Copy `req` into the next free slot; the backend sees it after [`Self::push_requests`].
    /// Returns the ring index used.
    pub fn put_request(&mut self, req: &Req) -> Result<RingIdx, RingError> {
        if self.is_full() {
            return Err(RingError::Full);
        }
        let idx = self.req_prod_pvt;
        self.sring.write(idx, req);
        self.req_prod_pvt = idx.wrapping_add(1);
        Ok(idx)
    }

    /// Publish the requests put so far; true if the backend must be sent an event
    /// (`RING_PUSH_REQUESTS_AND_CHECK_NOTIFY`).
    pub fn push_requests(&mut self) -> bool {
        self.sring.push(REQ_PROD, REQ_EVENT, self.req_prod_pvt)
    }

    /// Responses published and not yet consumed, after checking the backend's `rsp_prod`
    /// against the requests we have outstanding (stricter than `RING_RESPONSE_PROD_OVERFLOW`:
    /// a backend cannot answer a request it was never given).
    pub fn unconsumed_responses(&self) -> Result<u32, RingError> {
        // Acquire: pairs with the backend's release store of rsp_prod, so the responses it wrote
        // before publishing are visible to the slot reads that follow.
        let prod = self.sring.word(RSP_PROD).load(Ordering::Acquire);
        let avail = prod.wrapping_sub(self.rsp_cons);
        if avail > self.req_prod_pvt.wrapping_sub(self.rsp_cons) {
            return Err(RingError::Overflow {
                prod,
                cons: self.rsp_cons,
            });
        }
        Ok(avail)
    }

    /// Copy the next response out of the ring, if one is published.
    pub fn get_response(&mut self) -> Result<Option<Rsp>, RingError> {
        if self.unconsumed_responses()? == 0 {
            return Ok(None);
        }
        let rsp = self.sring.read::<Rsp>(self.rsp_cons);
        self.rsp_cons = self.rsp_cons.wrapping_add(1);
        Ok(Some(rsp))
    }

    /// Before waiting for an event: if no response is pending, ask the backend for an event on
    /// the next one and check again (`RING_FINAL_CHECK_FOR_RESPONSES`). False means it is safe
    /// to sleep until the next event.
    pub fn final_check_for_responses(&mut self) -> Result<bool, RingError> {
        if self.unconsumed_responses()? > 0 {
            return Ok(true);
        }
        self.sring
            .word(RSP_EVENT)
            .store(self.rsp_cons.wrapping_add(1), Ordering::Relaxed);
        // Full fence (xen_mb): the new rsp_event is visible before we re-read rsp_prod; pairs
        // with the backend's fence between publishing rsp_prod and reading rsp_event.
        fence(Ordering::SeqCst);
        Ok(self.unconsumed_responses()? > 0)
    }
}

/// The backend's end of a ring: consumes requests, produces responses.
#[derive(Debug)]
pub struct BackRing<Req, Rsp> {
    sring: Sring<Req, Rsp>,
    rsp_prod_pvt: RingIdx,
    req_cons: RingIdx,
}

impl<Req: RingMessage, Rsp: RingMessage> BackRing<Req, Rsp> {
    /// Initialise the shared header (`SHARED_RING_INIT`) and start at index 0: for the case where
    /// the backend end allocates the page.
    ///
    /// # Safety
    /// As for [`FrontRing::init`].
    pub unsafe fn init(page: NonNull<u8>, bytes: usize) -> Result<Self, RingError> {
        // SAFETY: forwarded from our caller.
        let sring = unsafe { Sring::new(page, bytes)? };
        sring.init_header();
        Ok(Self {
            sring,
            rsp_prod_pvt: 0,
            req_cons: 0,
        })
    }

    /// Attach to an initialised ring and resume from its shared indexes: both private indexes
    /// start at the shared `rsp_prod` (`BACK_RING_ATTACH` with `rsp_prod`). Right for a fresh
    /// connection (everything 0) and for a restarted backend whose predecessor answered in
    /// order; a backend that answers out of order must keep a journal and use
    /// [`Self::resume`], because slots of consumed, unanswered requests may already hold
    /// responses.
    ///
    /// # Safety
    /// As for [`FrontRing::init`].
    pub unsafe fn attach(page: NonNull<u8>, bytes: usize) -> Result<Self, RingError> {
        // SAFETY: forwarded from our caller.
        let sring = unsafe { Sring::new(page, bytes)? };
        let rsp_prod = sring.word(RSP_PROD).load(Ordering::Acquire);
        Ok(Self {
            sring,
            rsp_prod_pvt: rsp_prod,
            req_cons: rsp_prod,
        })
    }

    /// Resume a ring after a backend restart with an in-flight journal: responses continue
    /// from the shared `rsp_prod` (responses the old process put but never pushed are lost,
    /// so they must still be in the journal), and requests from `req_cons`, the journal's
    /// record of how far the old process had consumed. The journal's requests are exactly
    /// [`Self::unanswered`] and must be answered (replayed) by the new process.
    ///
    /// # Safety
    /// As for [`FrontRing::init`].
    pub unsafe fn resume(
        page: NonNull<u8>,
        bytes: usize,
        req_cons: RingIdx,
    ) -> Result<Self, RingError> {
        // SAFETY: forwarded from our caller.
        let sring = unsafe { Sring::<Req, Rsp>::new(page, bytes)? };
        let rsp_prod = sring.word(RSP_PROD).load(Ordering::Acquire);
        // SAFETY: forwarded from our caller.
        unsafe { Self::attach_at(page, bytes, rsp_prod, req_cons) }
    }

    /// Attach at given private indexes (`BACK_RING_ATTACH`, generalised): `rsp_prod_pvt` is the
    /// next response index (normally the shared `rsp_prod`), `req_cons` the next request to
    /// consume (from the in-flight journal).
    ///
    /// # Safety
    /// As for [`FrontRing::init`].
    pub unsafe fn attach_at(
        page: NonNull<u8>,
        bytes: usize,
        rsp_prod_pvt: RingIdx,
        req_cons: RingIdx,
    ) -> Result<Self, RingError> {
        // SAFETY: forwarded from our caller.
        let sring = unsafe { Sring::new(page, bytes)? };
        if req_cons.wrapping_sub(rsp_prod_pvt) > sring.nr_ents {
            return Err(RingError::BadIndexes {
                prod: rsp_prod_pvt,
                cons: req_cons,
            });
        }
        Ok(Self {
            sring,
            rsp_prod_pvt,
            req_cons,
        })
    }

    /// Number of entries (`RING_SIZE`).
    pub fn size(&self) -> u32 {
        self.sring.nr_ents
    }

    /// Index of the next request we will consume.
    pub fn req_cons(&self) -> RingIdx {
        self.req_cons
    }

    /// Our next response index, not yet visible to the frontend before a push.
    pub fn rsp_prod_pvt(&self) -> RingIdx {
        self.rsp_prod_pvt
    }

    /// Consumed requests that have no response yet.
    pub fn unanswered(&self) -> u32 {
        self.req_cons.wrapping_sub(self.rsp_prod_pvt)
    }

    /// Requests published and not yet consumed, after checking the frontend's `req_prod`:
    /// it may be at most one ring ahead of our responses (`RING_REQUEST_PROD_OVERFLOW`) and
    /// never behind what we consumed.
    pub fn unconsumed_requests(&self) -> Result<u32, RingError> {
        // Acquire: pairs with the frontend's release store of req_prod, so the requests it wrote
        // before publishing are visible to the slot reads that follow.
        let prod = self.sring.word(REQ_PROD).load(Ordering::Acquire);
        let avail = prod.wrapping_sub(self.rsp_prod_pvt);
        let consumed = self.unanswered();
        if avail > self.sring.nr_ents || avail < consumed {
            return Err(RingError::Overflow {
                prod,
                cons: self.req_cons,
            });
        }
        Ok(avail - consumed)
    }

    /// Copy the next request out of the ring, if one is published (`RING_COPY_REQUEST`).
    pub fn get_request(&mut self) -> Result<Option<Req>, RingError> {
        if self.unconsumed_requests()? == 0 {
            return Ok(None);
        }
        let req = self.sring.read::<Req>(self.req_cons);
        self.req_cons = self.req_cons.wrapping_add(1);
        Ok(Some(req))
    }

    /// Copy `rsp` into the next response slot; the frontend sees it after
    /// [`Self::push_responses`]. Returns the ring index used.
    pub fn put_response(&mut self, rsp: &Rsp) -> Result<RingIdx, RingError> {
        if self.unanswered() == 0 {
            return Err(RingError::Unrequested);
        }
        let idx = self.rsp_prod_pvt;
        self.sring.write(idx, rsp);
        self.rsp_prod_pvt = idx.wrapping_add(1);
        Ok(idx)
    }

    /// Publish the responses put so far; true if the frontend must be sent an event
    /// (`RING_PUSH_RESPONSES_AND_CHECK_NOTIFY`).
    pub fn push_responses(&mut self) -> bool {
        self.sring.push(RSP_PROD, RSP_EVENT, self.rsp_prod_pvt)
    }

    /// Before waiting for an event: if no request is pending, ask the frontend for an event on
    /// the next one and check again (`RING_FINAL_CHECK_FOR_REQUESTS`). False means it is safe
    /// to sleep until the next event.
    pub fn final_check_for_requests(&mut self) -> Result<bool, RingError> {
        if self.unconsumed_requests()? > 0 {
            return Ok(true);
        }
        self.sring
            .word(REQ_EVENT)
            .store(self.req_cons.wrapping_add(1), Ordering::Relaxed);
        // Full fence (xen_mb): the new req_event is visible before we re-read req_prod; pairs
        // with the frontend's fence between publishing req_prod and reading req_event.
        fence(Ordering::SeqCst);
        Ok(self.unconsumed_requests()? > 0)
    }
}

/// A zeroed, page-aligned 4 KiB allocation to hold a ring in-process (tests, benchmarks, fuzzing).
#[derive(Debug)]
pub struct OwnedPage(NonNull<u8>);

impl OwnedPage {
    /// Size of the page.
    pub const SIZE: usize = PAGE_SIZE;

    fn layout() -> std::alloc::Layout {
        // Cannot fail: the size is a non-zero multiple of a power-of-two alignment.
        std::alloc::Layout::from_size_align(PAGE_SIZE, PAGE_SIZE).expect("page layout")
    }

    /// Allocate a zeroed page.
    pub fn new() -> Self {
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(Self::layout()) };
        Self(NonNull::new(p).unwrap_or_else(|| std::alloc::handle_alloc_error(Self::layout())))
    }

    /// The page, for [`FrontRing::init`] and friends; valid while `self` lives.
    pub fn as_non_null(&self) -> NonNull<u8> {
        self.0
    }

    /// Overwrite the page with `bytes` (at most [`Self::SIZE`]; the rest is zeroed), as a
    /// hostile peer could. `&mut` so safe code cannot race it; rings built on the page must
    /// not run in other threads meanwhile (their constructors' contract).
    pub fn fill(&mut self, bytes: &[u8]) {
        for i in 0..PAGE_SIZE {
            // SAFETY: i < PAGE_SIZE, inside our allocation; volatile because ring objects may
            // hold pointers to this memory.
            unsafe {
                self.0
                    .as_ptr()
                    .add(i)
                    .write_volatile(bytes.get(i).copied().unwrap_or(0))
            };
        }
    }

    /// Overwrite `bytes.len()` bytes at `offset` (clipped to the page), as a hostile peer could.
    pub fn write_at(&mut self, offset: usize, bytes: &[u8]) {
        for (i, b) in (offset..PAGE_SIZE).zip(bytes) {
            // SAFETY: i < PAGE_SIZE, inside our allocation; volatile as in `fill`.
            unsafe { self.0.as_ptr().add(i).write_volatile(*b) };
        }
    }

    /// Copy the page out.
    pub fn snapshot(&self) -> Vec<u8> {
        // SAFETY: i < PAGE_SIZE, inside our allocation; volatile as in `fill`.
        (0..PAGE_SIZE)
            .map(|i| unsafe { self.0.as_ptr().add(i).read_volatile() })
            .collect()
    }
}

impl Default for OwnedPage {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for OwnedPage {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.0.as_ptr(), Self::layout()) }
    }
}

// SAFETY: an owned heap allocation with no thread affinity; access is through raw pointers by
// the ring objects, whose own rules govern concurrency.
unsafe impl Send for OwnedPage {}
// SAFETY: through `&OwnedPage` one can only get the pointer or read the page (writes need
// `&mut`), so shared references cannot race; rings built on it in several threads synchronise
// through the ring protocol's atomics.
unsafe impl Sync for OwnedPage {}

/// What this module claims about Xen's `io/ring.h`, using the `devchan_check` ring
/// (`DEFINE_RING_TYPES(devchan_check, uint64_t, uint32_t)` in `tests/xen_headers.rs`).
pub fn abi_checks() -> Vec<crate::abi::AbiCheck> {
    use crate::abi::AbiCheck;
    let s = "struct devchan_check_sring";
    let mut v = crate::abi_layout!(
        s,
        SringHeader {
            req_prod,
            req_event,
            rsp_prod,
            rsp_event,
            pvt,
            __pad
        }
    );
    // Our SringHeader has no `ring` member: its size is where the entries start.
    v[0] = AbiCheck::new(
        format!("offsetof({s}, ring)"),
        core::mem::size_of::<SringHeader>(),
    );
    v.push(AbiCheck::new(format!("sizeof((({s} *)0)->pvt)"), 4));
    v.push(AbiCheck::new(format!("sizeof((({s} *)0)->__pad)"), 44));
    v.push(AbiCheck::new(
        "sizeof(RING_IDX)",
        core::mem::size_of::<RingIdx>(),
    ));
    v.push(AbiCheck::new(
        "sizeof(union devchan_check_sring_entry)",
        entry_size::<u64, u32>(),
    ));
    for bytes in [PAGE_SIZE, 2 * PAGE_SIZE, 16 * PAGE_SIZE, 200] {
        v.push(AbiCheck::new(
            format!("__CONST_RING_SIZE(devchan_check, {bytes})"),
            ring_size::<u64, u32>(bytes),
        ));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    type Front = FrontRing<u64, u32>;
    type Back = BackRing<u64, u32>;

    fn pair(page: &OwnedPage) -> (Front, Back) {
        // SAFETY: the page is 4 KiB, aligned and outlives the rings in each test.
        unsafe {
            (
                Front::init(page.as_non_null(), OwnedPage::SIZE).unwrap(),
                Back::attach_at(page.as_non_null(), OwnedPage::SIZE, 0, 0).unwrap(),
            )
        }
    }

    fn word(page: &OwnedPage, off: usize) -> u32 {
        let s = page.snapshot();
        u32::from_ne_bytes(s[off..off + 4].try_into().unwrap())
    }

    fn set_word(page: &mut OwnedPage, off: usize, val: u32) {
        let mut s = page.snapshot();
        s[off..off + 4].copy_from_slice(&val.to_ne_bytes());
        page.fill(&s);
    }

    #[test]
    fn geometry_matches_ring_h() {
        assert_eq!(entry_size::<u64, u32>(), 8);
        assert_eq!(entry_size::<[u8; 12], u32>(), 12);
        assert_eq!(entry_size::<[u16; 5], u8>(), 10);
        assert_eq!(entry_size::<[u8; 3], u16>(), 4);
        assert_eq!(ring_size::<u64, u32>(4096), 256);
        assert_eq!(ring_size::<[u8; 112], u64>(4096), 32);
        assert_eq!(ring_size::<[u8; 12], u32>(4096), 256);
        assert_eq!(ring_size::<u64, u32>(64), 0);
        assert_eq!(ring_size::<u64, u32>(72), 1);
        assert_eq!(ring_size::<u64, u32>(4 * 4096), 1024);
    }

    #[test]
    fn init_writes_xen_initial_header() {
        let mut page = OwnedPage::new();
        page.fill(&[0xAA; 4096]);
        let _ = pair(&page);
        let s = page.snapshot();
        assert_eq!(word(&page, REQ_PROD), 0);
        assert_eq!(word(&page, RSP_PROD), 0);
        assert_eq!(word(&page, REQ_EVENT), 1);
        assert_eq!(word(&page, RSP_EVENT), 1);
        assert!(s[16..64].iter().all(|b| *b == 0));
        assert!(
            s[64..].iter().all(|b| *b == 0xAA),
            "entries are not touched"
        );
    }

    #[test]
    fn request_response_round_trip_and_notify() {
        let page = OwnedPage::new();
        let (mut f, mut b) = pair(&page);
        assert_eq!(f.size(), 256);
        assert_eq!(f.put_request(&0x1122_3344_5566_7788).unwrap(), 0);
        assert_eq!(b.get_request().unwrap(), None, "not pushed yet");
        assert!(f.push_requests(), "req_event starts at 1");
        // Entry bytes land at offset 64 in native order.
        assert_eq!(
            &page.snapshot()[64..72],
            &0x1122_3344_5566_7788u64.to_ne_bytes()
        );
        f.put_request(&2).unwrap();
        assert!(!f.push_requests(), "backend did not ask for another event");
        assert_eq!(b.get_request().unwrap(), Some(0x1122_3344_5566_7788));
        assert_eq!(b.get_request().unwrap(), Some(2));
        assert_eq!(b.get_request().unwrap(), None);
        assert!(!b.final_check_for_requests().unwrap());
        assert_eq!(word(&page, REQ_EVENT), 3);
        f.put_request(&3).unwrap();
        assert!(f.push_requests(), "backend asked for an event at 3");
        b.put_response(&10).unwrap();
        b.put_response(&20).unwrap();
        assert!(b.push_responses());
        assert_eq!(f.get_response().unwrap(), Some(10));
        assert_eq!(f.get_response().unwrap(), Some(20));
        assert_eq!(f.get_response().unwrap(), None);
        assert_eq!(b.unanswered(), 0);
        assert_eq!(b.put_response(&1), Err(RingError::Unrequested));
    }

    #[test]
    fn full_ring_refuses_requests() {
        let page = OwnedPage::new();
        let (mut f, _b) = pair(&page);
        for i in 0..256 {
            f.put_request(&i).unwrap();
        }
        assert!(f.is_full());
        assert_eq!(f.put_request(&0), Err(RingError::Full));
    }

    #[test]
    fn hostile_request_producer_is_overflow() {
        let mut page = OwnedPage::new();
        let (_f, mut b) = pair(&page);
        set_word(&mut page, REQ_PROD, 257);
        assert_eq!(
            b.get_request(),
            Err(RingError::Overflow { prod: 257, cons: 0 })
        );
        set_word(&mut page, REQ_PROD, 256);
        for _ in 0..256 {
            assert!(b.get_request().unwrap().is_some());
        }
        assert_eq!(b.get_request().unwrap(), None);
        // Going backwards is as bad as running ahead.
        set_word(&mut page, REQ_PROD, 100);
        assert!(matches!(b.get_request(), Err(RingError::Overflow { .. })));
        assert!(matches!(
            b.final_check_for_requests(),
            Err(RingError::Overflow { .. })
        ));
    }

    #[test]
    fn hostile_response_producer_is_overflow() {
        let mut page = OwnedPage::new();
        let (mut f, _b) = pair(&page);
        f.put_request(&1).unwrap();
        f.push_requests();
        set_word(&mut page, RSP_PROD, 2);
        assert_eq!(
            f.get_response(),
            Err(RingError::Overflow { prod: 2, cons: 0 })
        );
        set_word(&mut page, RSP_PROD, u32::MAX);
        assert!(f.get_response().is_err());
        set_word(&mut page, RSP_PROD, 1);
        assert!(f.get_response().unwrap().is_some());
    }

    #[test]
    fn indexes_wrap_around_u32() {
        let mut page = OwnedPage::new();
        let start = u32::MAX - 3;
        let _ = pair(&page); // initialise the header
                             // SAFETY: as in `pair`.
        let (mut f, mut b) = unsafe {
            (
                Front::attach_at(page.as_non_null(), 4096, start, start).unwrap(),
                Back::attach_at(page.as_non_null(), 4096, start, start).unwrap(),
            )
        };
        set_word(&mut page, REQ_PROD, start);
        set_word(&mut page, RSP_PROD, start);
        for round in 0..3u64 {
            for i in 0..5u64 {
                f.put_request(&(round * 10 + i)).unwrap();
            }
            f.push_requests();
            for i in 0..5u64 {
                let r = b.get_request().unwrap().unwrap();
                assert_eq!(r, round * 10 + i);
                b.put_response(&u32::try_from(r).unwrap()).unwrap();
            }
            b.push_responses();
            for i in 0..5u64 {
                assert_eq!(
                    f.get_response().unwrap(),
                    Some(u32::try_from(round * 10 + i).unwrap())
                );
            }
        }
        assert_eq!(f.req_prod_pvt(), start.wrapping_add(15));
    }

    #[test]
    fn attach_resumes_from_shared_rsp_prod() {
        let page = OwnedPage::new();
        let (mut f, mut b) = pair(&page);
        for i in 0..4 {
            f.put_request(&i).unwrap();
        }
        f.push_requests();
        b.get_request().unwrap();
        b.put_response(&0).unwrap();
        b.push_responses();
        b.get_request().unwrap(); // consumed, then the backend "crashes"
                                  // SAFETY: as in `pair`.
        let mut b2 = unsafe { Back::attach(page.as_non_null(), 4096).unwrap() };
        assert_eq!((b2.req_cons(), b2.rsp_prod_pvt()), (1, 1));
        assert_eq!(b2.get_request().unwrap(), Some(1));
        // Journal path: we know request 1 was consumed already.
        // SAFETY: as in `pair`.
        let mut b3 = unsafe { Back::attach_at(page.as_non_null(), 4096, 1, 2).unwrap() };
        assert_eq!(b3.get_request().unwrap(), Some(2));
        // SAFETY: as in `pair`.
        let bad = unsafe { Back::attach_at(page.as_non_null(), 4096, 0, 257) };
        assert_eq!(
            bad.unwrap_err(),
            RingError::BadIndexes { prod: 0, cons: 257 }
        );
    }

    #[test]
    fn constructor_rejects_bad_memory() {
        let page = OwnedPage::new();
        let odd = NonNull::new(page.as_non_null().as_ptr().wrapping_add(4)).unwrap();
        // SAFETY: the constructor fails before touching memory.
        unsafe {
            assert_eq!(Front::init(odd, 4000).unwrap_err(), RingError::Misaligned);
            assert_eq!(
                Front::init(page.as_non_null(), 64).unwrap_err(),
                RingError::TooSmall(64)
            );
        }
    }
}
