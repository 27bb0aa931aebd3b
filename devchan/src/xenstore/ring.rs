//! The XenStore ring page (`struct xenstore_domain_interface`) and the domain's side of it.
//!
//! Every domain other than dom0 talks to xenstored through one page it shares with the daemon:
//!
//! ```text
//! offset  size  field
//!      0  1024  req[]            requests, domain -> daemon (a byte stream)
//!   1024  1024  rsp[]            replies and watch events, daemon -> domain
//!   2048     4  req_cons         advanced by the daemon
//!   2052     4  req_prod         advanced by the domain
//!   2056     4  rsp_cons         advanced by the domain
//!   2060     4  rsp_prod         advanced by the daemon
//!   2064     4  server_features  XENSTORE_SERVER_FEATURE_* bits the daemon supports
//!   2068     4  connection       XENSTORE_CONNECTED / XENSTORE_RECONNECT
//!   2072     4  error            XENSTORE_ERROR_* the daemon reports before giving up
//! ```
//!
//! Each ring is a byte stream carrying the messages of [`wire`](super::wire). Indexes are free
//! running `u32`s; the byte for index `i` is at `MASK_XENSTORE_IDX(i)`. A valid ring has
//! `prod - cons <= XENSTORE_RING_SIZE` (wrapping); anything else is a broken peer
//! ([`RingError::BadIndex`]). The producer writes bytes, then publishes the new `prod` (release);
//! the consumer reads `prod` (acquire), copies the bytes out, then publishes `cons` (release) so
//! the producer may reuse the space. After publishing, each side notifies the other on the
//! domain's XenStore event channel. To reconnect (feature `RECONNECTION`) the domain sets
//! `connection = XENSTORE_RECONNECT` and notifies; the daemon drops the domain's connection
//! state, zeroes the four indexes and sets `connection = XENSTORE_CONNECTED`.
//!
//! All accesses to the page are atomic (indexes and control words) or volatile (ring bytes):
//! the peer may change it at any moment, and nothing read from it is trusted.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU32, Ordering};

/// Ring index type (`XENSTORE_RING_IDX`).
pub type RingIdx = u32;
/// Size of each ring in bytes (`XENSTORE_RING_SIZE`).
pub const XENSTORE_RING_SIZE: usize = 1024;
/// Daemon can reconnect a ring (`XENSTORE_SERVER_FEATURE_RECONNECTION`).
pub const XENSTORE_SERVER_FEATURE_RECONNECTION: u32 = 1;
/// Daemon uses the `error` field (`XENSTORE_SERVER_FEATURE_ERROR`).
pub const XENSTORE_SERVER_FEATURE_ERROR: u32 = 2;
/// Steady state (`XENSTORE_CONNECTED`).
pub const XENSTORE_CONNECTED: u32 = 0;
/// Reconnect requested / in progress (`XENSTORE_RECONNECT`).
pub const XENSTORE_RECONNECT: u32 = 1;
/// No error (`XENSTORE_ERROR_NONE`).
pub const XENSTORE_ERROR_NONE: u32 = 0;
/// Communication problem (`XENSTORE_ERROR_COMM`).
pub const XENSTORE_ERROR_COMM: u32 = 1;
/// Invalid ring index (`XENSTORE_ERROR_RINGIDX`).
pub const XENSTORE_ERROR_RINGIDX: u32 = 2;
/// Protocol violation, e.g. payload too long (`XENSTORE_ERROR_PROTO`).
pub const XENSTORE_ERROR_PROTO: u32 = 3;

/// `MASK_XENSTORE_IDX(idx)`: the byte offset of a free-running index.
pub const fn mask_xenstore_idx(idx: RingIdx) -> usize {
    idx as usize & (XENSTORE_RING_SIZE - 1)
}

/// The page layout, exactly `struct xenstore_domain_interface`. Lives in shared memory: use
/// it through [`RingPage`], never by value.
#[repr(C)]
#[derive(Debug)]
pub struct XenstoreDomainInterface {
    /// Requests to the daemon.
    pub req: [u8; XENSTORE_RING_SIZE],
    /// Replies and watch events.
    pub rsp: [u8; XENSTORE_RING_SIZE],
    /// Request consumer index (daemon).
    pub req_cons: RingIdx,
    /// Request producer index (domain).
    pub req_prod: RingIdx,
    /// Response consumer index (domain).
    pub rsp_cons: RingIdx,
    /// Response producer index (daemon).
    pub rsp_prod: RingIdx,
    /// `XENSTORE_SERVER_FEATURE_*` bits.
    pub server_features: u32,
    /// `XENSTORE_CONNECTED` or `XENSTORE_RECONNECT`.
    pub connection: u32,
    /// `XENSTORE_ERROR_*`.
    pub error: u32,
}

const _: () = assert!(core::mem::size_of::<XenstoreDomainInterface>() == 2076);
const _: () = assert!(core::mem::offset_of!(XenstoreDomainInterface, req_cons) == 2048);
const _: () = assert!(core::mem::offset_of!(XenstoreDomainInterface, error) == 2072);
const _: () = assert!(core::mem::size_of::<XenstoreDomainInterface>() <= 4096);

/// Errors on the ring page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// The indexes say more bytes are in flight than the ring holds.
    #[error("Ring indexes out of range (cons {cons}, prod {prod})")]
    BadIndex {
        /// Consumer index read.
        cons: RingIdx,
        /// Producer index read.
        prod: RingIdx,
    },
    /// The daemon reported an error in the page and stopped serving it.
    #[error("XenStore daemon reported error {0}")]
    Daemon(u32),
}

impl From<RingError> for io::Error {
    fn from(e: RingError) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// A view of a ring page in shared memory. Both sides use it: the domain writes requests and
/// reads responses, the daemon the reverse.
#[derive(Debug)]
pub struct RingPage {
    ptr: NonNull<XenstoreDomainInterface>,
}

// SAFETY: the page is only accessed through atomics and volatile byte copies, which are sound
// to perform from any thread concurrently with the peer; `RingPage::new`'s caller guarantees
// the mapping outlives the view.
unsafe impl Send for RingPage {}
// SAFETY: as for `Send`: no method relies on exclusive access to the page.
unsafe impl Sync for RingPage {}

enum Word {
    ReqCons,
    ReqProd,
    RspCons,
    RspProd,
    Features,
    Connection,
    Error,
}

impl RingPage {
    /// A view of the page at `ptr`.
    ///
    /// # Safety
    ///
    /// `ptr` must point to a readable and writable mapping of at least
    /// `size_of::<XenstoreDomainInterface>()` bytes, 4-byte aligned, that stays mapped for the
    /// life of the returned value (and of every clone of it). Other parties may write to it
    /// concurrently, but only the peer and only through atomic or byte accesses.
    pub unsafe fn new(ptr: *mut XenstoreDomainInterface) -> Option<Self> {
        NonNull::new(ptr).map(|ptr| Self { ptr })
    }

    /// The raw pointer.
    pub fn as_ptr(&self) -> *mut XenstoreDomainInterface {
        self.ptr.as_ptr()
    }

    fn word(&self, w: Word) -> &AtomicU32 {
        let p = self.ptr.as_ptr();
        // SAFETY: `p` is valid and aligned for the whole struct (constructor contract), so
        // each field pointer is valid and 4-byte aligned for the life of `&self`; all accesses
        // to these words by either side are atomic.
        unsafe {
            AtomicU32::from_ptr(match w {
                Word::ReqCons => std::ptr::addr_of_mut!((*p).req_cons),
                Word::ReqProd => std::ptr::addr_of_mut!((*p).req_prod),
                Word::RspCons => std::ptr::addr_of_mut!((*p).rsp_cons),
                Word::RspProd => std::ptr::addr_of_mut!((*p).rsp_prod),
                Word::Features => std::ptr::addr_of_mut!((*p).server_features),
                Word::Connection => std::ptr::addr_of_mut!((*p).connection),
                Word::Error => std::ptr::addr_of_mut!((*p).error),
            })
        }
    }

    fn ring(&self, requests: bool) -> *mut u8 {
        let p = self.ptr.as_ptr();
        // SAFETY: field projections within the valid struct (constructor contract); no
        // reference is created, only a raw pointer.
        unsafe {
            if requests {
                (std::ptr::addr_of_mut!((*p).req)).cast::<u8>()
            } else {
                (std::ptr::addr_of_mut!((*p).rsp)).cast::<u8>()
            }
        }
    }

    fn produce(&self, requests: bool, data: &[u8]) -> Result<usize, RingError> {
        let (cons, prod) = if requests {
            (self.word(Word::ReqCons), self.word(Word::ReqProd))
        } else {
            (self.word(Word::RspCons), self.word(Word::RspProd))
        };
        // We are the only writer of `prod`. Acquire on `cons` pairs with the consumer's
        // release: its copies out of the slots it freed finish before we overwrite them.
        let p = prod.load(Ordering::Relaxed);
        let c = cons.load(Ordering::Acquire);
        let used = p.wrapping_sub(c) as usize;
        if used > XENSTORE_RING_SIZE {
            return Err(RingError::BadIndex { cons: c, prod: p });
        }
        let n = data.len().min(XENSTORE_RING_SIZE - used);
        let base = self.ring(requests);
        let mut count: RingIdx = 0;
        for b in &data[..n] {
            let off = mask_xenstore_idx(p.wrapping_add(count));
            // SAFETY: `off < XENSTORE_RING_SIZE`, inside the ring array of the valid page.
            unsafe { base.add(off).write_volatile(*b) };
            count += 1;
        }
        // Release (Xen's wmb() before the index update): the bytes are visible before the
        // new producer index that announces them.
        fence(Ordering::Release);
        prod.store(p.wrapping_add(count), Ordering::Release);
        Ok(n)
    }

    fn consume(&self, requests: bool, buf: &mut [u8]) -> Result<usize, RingError> {
        let (cons, prod) = if requests {
            (self.word(Word::ReqCons), self.word(Word::ReqProd))
        } else {
            (self.word(Word::RspCons), self.word(Word::RspProd))
        };
        // Acquire on `prod` (Xen's rmb()): the bytes it announces are read after it.
        let c = cons.load(Ordering::Relaxed);
        let p = prod.load(Ordering::Acquire);
        let avail = p.wrapping_sub(c) as usize;
        if avail > XENSTORE_RING_SIZE {
            return Err(RingError::BadIndex { cons: c, prod: p });
        }
        let n = buf.len().min(avail);
        let base = self.ring(requests);
        let mut count: RingIdx = 0;
        for b in &mut buf[..n] {
            let off = mask_xenstore_idx(c.wrapping_add(count));
            // SAFETY: `off < XENSTORE_RING_SIZE`, inside the ring array of the valid page.
            *b = unsafe { base.add(off).read_volatile() };
            count += 1;
        }
        // Release (Xen's mb() before the index update): our copies complete before the peer
        // sees the space as free and overwrites it.
        fence(Ordering::Release);
        cons.store(c.wrapping_add(count), Ordering::Release);
        Ok(n)
    }

    /// Domain side: queues request bytes; returns how many fit.
    pub fn write_request(&self, data: &[u8]) -> Result<usize, RingError> {
        self.produce(true, data)
    }

    /// Domain side: takes response bytes; returns how many were available.
    pub fn read_response(&self, buf: &mut [u8]) -> Result<usize, RingError> {
        self.consume(false, buf)
    }

    /// Daemon side: takes request bytes.
    pub fn read_request(&self, buf: &mut [u8]) -> Result<usize, RingError> {
        self.consume(true, buf)
    }

    /// Daemon side: queues response bytes.
    pub fn write_response(&self, data: &[u8]) -> Result<usize, RingError> {
        self.produce(false, data)
    }

    /// Daemon side: whether requests are waiting.
    pub fn requests_pending(&self) -> bool {
        self.word(Word::ReqProd).load(Ordering::Acquire)
            != self.word(Word::ReqCons).load(Ordering::Relaxed)
    }

    /// Domain side: whether responses are waiting.
    pub fn responses_pending(&self) -> bool {
        self.word(Word::RspProd).load(Ordering::Acquire)
            != self.word(Word::RspCons).load(Ordering::Relaxed)
    }

    /// Daemon side: free space in the response ring (0 if the indexes are broken).
    pub fn response_space(&self) -> usize {
        let used = self
            .word(Word::RspProd)
            .load(Ordering::Relaxed)
            .wrapping_sub(self.word(Word::RspCons).load(Ordering::Acquire))
            as usize;
        XENSTORE_RING_SIZE.saturating_sub(used)
    }

    /// Daemon side: resets the page to an empty, connected ring and advertises `features`.
    pub fn reset(&self, features: u32) {
        for w in [Word::ReqCons, Word::ReqProd, Word::RspCons, Word::RspProd] {
            self.word(w).store(0, Ordering::Relaxed);
        }
        self.word(Word::Error)
            .store(XENSTORE_ERROR_NONE, Ordering::Relaxed);
        self.word(Word::Features).store(features, Ordering::Relaxed);
        // Release: the cleared indexes are visible before the domain sees CONNECTED.
        self.word(Word::Connection)
            .store(XENSTORE_CONNECTED, Ordering::Release);
    }

    /// Daemon side: advertises `features` in `server_features`, leaving the rings alone.
    pub fn advertise(&self, features: u32) {
        self.word(Word::Features).store(features, Ordering::Release);
    }

    /// The `connection` word.
    pub fn connection(&self) -> u32 {
        self.word(Word::Connection).load(Ordering::Acquire)
    }

    /// Domain side: asks the daemon to reset the ring (`XENSTORE_RECONNECT`).
    pub fn request_reconnect(&self) {
        self.word(Word::Connection)
            .store(XENSTORE_RECONNECT, Ordering::Release);
    }

    /// The `server_features` word.
    pub fn server_features(&self) -> u32 {
        self.word(Word::Features).load(Ordering::Acquire)
    }

    /// The `error` word.
    pub fn error(&self) -> u32 {
        self.word(Word::Error).load(Ordering::Acquire)
    }

    /// Daemon side: reports an error in the page.
    pub fn set_error(&self, code: u32) {
        self.word(Word::Error).store(code, Ordering::Release);
    }
}

/// The domain side of the ring as a byte stream, for [`Client`](super::Client): writes go to
/// `req`, reads come from `rsp`. `notify` signals the daemon (the domain's XenStore event
/// channel); `wait` blocks until the daemon signals back. Both are called only when needed:
/// `notify` after publishing bytes or freeing space, `wait` when the ring is full (write) or
/// empty (read).
pub struct RingTransport<N: FnMut(), W: FnMut()> {
    page: RingPage,
    notify: N,
    wait: W,
}

impl<N: FnMut(), W: FnMut()> RingTransport<N, W> {
    /// A transport over `page`.
    pub fn new(page: RingPage, notify: N, wait: W) -> Self {
        Self { page, notify, wait }
    }

    /// The page.
    pub fn page(&self) -> &RingPage {
        &self.page
    }

    fn check_daemon(&self) -> io::Result<()> {
        match self.page.error() {
            XENSTORE_ERROR_NONE => Ok(()),
            e => Err(RingError::Daemon(e).into()),
        }
    }
}

impl<N: FnMut(), W: FnMut()> io::Read for RingTransport<N, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let n = self.page.read_response(buf)?;
            if n > 0 {
                (self.notify)();
                return Ok(n);
            }
            self.check_daemon()?;
            (self.wait)();
        }
    }
}

impl<N: FnMut(), W: FnMut()> io::Write for RingTransport<N, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            self.check_daemon()?;
            let n = self.page.write_request(buf)?;
            if n > 0 {
                (self.notify)();
                return Ok(n);
            }
            (self.wait)();
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A zeroed, page-aligned ring page in ordinary memory, for tests and in-process domains.
pub struct OwnedRingPage {
    mem: Box<Page>,
}

#[repr(C, align(4096))]
struct Page([u8; 4096]);

impl Default for OwnedRingPage {
    fn default() -> Self {
        Self::new()
    }
}

impl OwnedRingPage {
    /// A zeroed page.
    pub fn new() -> Self {
        Self {
            mem: Box::new(Page([0; 4096])),
        }
    }

    /// A pointer to the interface in it; valid while `self` lives.
    pub fn as_ptr(&self) -> *mut XenstoreDomainInterface {
        std::ptr::addr_of!(*self.mem).cast_mut().cast()
    }

    /// A view of the page; the caller keeps `self` alive as long as the view.
    pub fn view(&self) -> RingPage {
        // SAFETY: the box is a 4096-byte, 4096-aligned allocation, larger than the interface;
        // it lives as long as `self`, which the caller keeps alive (documented); all access
        // goes through `RingPage`'s atomics and volatile copies.
        unsafe { RingPage::new(self.as_ptr()) }.expect("Box pointers are non-null")
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn layout_matches_xs_wire() {
        assert_eq!(core::mem::offset_of!(XenstoreDomainInterface, rsp), 1024);
        assert_eq!(
            core::mem::offset_of!(XenstoreDomainInterface, rsp_prod),
            2060
        );
        assert_eq!(mask_xenstore_idx(1027), 3);
    }

    #[test]
    fn wraps_and_bounds() {
        let mem = OwnedRingPage::new();
        let page = mem.view();
        page.reset(XENSTORE_SERVER_FEATURE_ERROR);
        let data: Vec<u8> = (0..700u32).map(|i| i as u8).collect();
        let mut got = Vec::new();
        for _ in 0..5 {
            assert_eq!(page.write_request(&data).unwrap(), 700);
            assert_eq!(page.write_request(&data).unwrap(), 324);
            let mut buf = [0u8; 2000];
            let n = page.read_request(&mut buf).unwrap();
            assert_eq!(n, 1024);
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(&got[..700], &data[..]);
        assert_eq!(&got[1024..1724], &data[..]);
    }

    #[test]
    fn broken_indexes_are_errors() {
        let mem = OwnedRingPage::new();
        let page = mem.view();
        page.word(Word::ReqProd).store(5000, Ordering::Relaxed);
        assert!(matches!(
            page.read_request(&mut [0; 8]),
            Err(RingError::BadIndex { .. })
        ));
        page.word(Word::RspCons).store(10, Ordering::Relaxed);
        assert!(matches!(
            page.write_response(b"x"),
            Err(RingError::BadIndex { .. })
        ));
    }

    proptest! {
        #[test]
        fn stream_survives_any_chunking(
            start in any::<u32>(),
            chunks in prop::collection::vec((1usize..1500, 1usize..1500), 1..20),
        ) {
            let mem = OwnedRingPage::new();
            let page = mem.view();
            for w in [Word::RspCons, Word::RspProd] {
                page.word(w).store(start, Ordering::Relaxed);
            }
            let (mut sent, mut recvd) = (Vec::new(), Vec::new());
            let mut counter = 0u8;
            for (w, r) in chunks {
                let data: Vec<u8> = (0..w)
                    .map(|_| {
                        counter = counter.wrapping_add(1);
                        counter
                    })
                    .collect();
                let n = page.write_response(&data).unwrap();
                sent.extend_from_slice(&data[..n]);
                let mut buf = vec![0; r];
                let m = page.read_response(&mut buf).unwrap();
                recvd.extend_from_slice(&buf[..m]);
            }
            let mut buf = vec![0; 2048];
            let m = page.read_response(&mut buf).unwrap();
            recvd.extend_from_slice(&buf[..m]);
            prop_assert_eq!(sent, recvd);
        }
    }
}
