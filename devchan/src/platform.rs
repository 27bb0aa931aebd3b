//! The platform trait: what a driver domain or a frontend needs from the hypervisor.
//!
//! IDDs and frontends are written against [`Platform`] only, so the same code runs on the
//! process-domain hypervisor (`hypervisor::process`), on an in-process platform for unit tests,
//! and on Xen (`/dev/xen/gntdev`, `/dev/xen/evtchn`, xenbus). The trait has no I/O of its own.
//!
//! Pages are named by *frame*: the index of a 4 KiB page in the calling domain's own memory
//! (a guest frame number). A page a peer should map (a ring) must come from
//! [`Platform::alloc_shared_page`]; any frame of the domain's memory may be granted for copy.
//!
//! Device DMA never maps a peer's page into the driver domain: [`Platform::pin_grant`] puts the
//! page in the device's IOMMU and returns an IOVA for the device descriptor. The exchange path
//! ([`Platform::transfer`] into a peer's [`Platform::accept_transfer`] grant) moves a page by
//! swapping pages where the platform can, by copying where it cannot ([`TransferMode`]).

use crate::grant::{DomId, GrantRef};
use std::time::Duration;

/// A guest frame number: the index of a page in a domain's own memory.
pub type Frame = u64;

/// An event-channel port (`evtchn_port_t`).
pub type Port = u32;

/// Why a platform operation failed. Statuses that Xen reports per operation (`GNTST_*`) travel
/// as [`PlatformError::Grant`] with the raw status.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum PlatformError {
    /// A grant operation failed with this `GNTST_*` status.
    #[error("Grant operation failed with status {0}")]
    Grant(i16),
    /// The grant reference is still mapped, pinned or being copied by the peer.
    #[error("Grant {0} is still in use by its peer")]
    GrantInUse(GrantRef),
    /// No such event-channel port, or not in a state that allows the operation.
    #[error("Bad event-channel port {0}")]
    BadPort(Port),
    /// The named domain does not exist or may not be used this way.
    #[error("Bad domain {0}")]
    BadDomain(DomId),
    /// A frame outside the domain's memory, or not usable for the operation.
    #[error("Bad frame {0}")]
    BadFrame(Frame),
    /// A table or pool is full.
    #[error("Out of {0}")]
    Exhausted(&'static str),
    /// The link to the hypervisor failed; the domain should treat the platform as gone.
    #[error("Hypervisor link failed: {0}")]
    Link(String),
    /// The wait ended because its timeout passed.
    #[error("Timed out")]
    TimedOut,
}

/// Result of platform operations.
pub type Result<T> = std::result::Result<T, PlatformError>;

/// A page shared between domains: one of ours that we may grant, or a peer's mapped through a
/// grant. The memory stays valid until the handle is dropped (which unmaps it).
///
/// The page is shared with another, untrusted domain: it may change at any time, so callers
/// access it only through atomics or volatile copies (see `ring`), never through references.
pub trait SharedPage: Send {
    /// Start of the 4 KiB page in this process.
    fn as_ptr(&self) -> *mut u8;
    /// The page's frame in its owner's memory (ours for an allocated page, the granter's for a
    /// mapping).
    fn frame(&self) -> Frame;
}

/// One side of a grant copy: a peer's granted page, or a frame of our own memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyPtr {
    /// Bytes in a page the peer `domid` granted us as `gref`.
    Grant {
        /// The granting domain.
        domid: DomId,
        /// Its grant reference.
        gref: GrantRef,
        /// Byte offset within the page.
        offset: u16,
    },
    /// Bytes in one of our own frames.
    Local {
        /// Our frame.
        frame: Frame,
        /// Byte offset within the page.
        offset: u16,
    },
}

/// One grant copy (`gnttab_copy_t`): `len` bytes from `src` to `dst`, neither crossing a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GrantCopyOp {
    /// Where to read.
    pub src: CopyPtr,
    /// Where to write.
    pub dst: CopyPtr,
    /// Bytes to copy.
    pub len: u16,
}

/// How a page transfer (`GNTTABOP_transfer`, the exchange path) moved the page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransferMode {
    /// The platform swapped the two pages: no byte was copied, and the sender got the
    /// receiver's old page in exchange.
    Remapped,
    /// The platform copied the page's bytes (the fallback when it cannot remap).
    Copied,
}

/// What a domain needs from its hypervisor to run a device channel.
pub trait Platform: Send + Sync {
    /// A page of our own memory that peers may map.
    type Page: SharedPage;
    /// A peer's page mapped into our address space through a grant.
    type Mapping: SharedPage;

    /// Our own domain id.
    fn domid(&self) -> DomId;

    // --- Granting side -------------------------------------------------------------------

    /// Allocate a zeroed page of our memory that can be granted for mapping (for rings).
    fn alloc_shared_page(&self) -> Result<Self::Page>;
    /// Let `peer` use our `frame` (read-only if `readonly`); returns the grant reference.
    fn grant_access(&self, peer: DomId, frame: Frame, readonly: bool) -> Result<GrantRef>;
    /// Withdraw a grant. Fails with [`PlatformError::GrantInUse`] while the peer still maps,
    /// pins or copies it: the reference stays valid and the caller must try again later.
    fn end_access(&self, gref: GrantRef) -> Result<()>;

    /// Offer to receive a page from `peer` into our `frame` (an accept-transfer grant);
    /// returns the grant reference to post to the peer.
    fn accept_transfer(&self, peer: DomId, frame: Frame) -> Result<GrantRef>;
    /// Withdraw or complete an accept-transfer grant: `Some(frame)` if a page arrived (its
    /// content is now at `frame`), `None` if none did (the grant is withdrawn). Fails with
    /// [`PlatformError::GrantInUse`] while a transfer is under way; try again.
    fn end_transfer(&self, gref: GrantRef) -> Result<Option<Frame>>;

    // --- Using side ----------------------------------------------------------------------

    /// Map the page `peer` granted us as `gref`. Dropping the mapping unmaps it.
    fn map_grant(&self, peer: DomId, gref: GrantRef, readonly: bool) -> Result<Self::Mapping>;
    /// Run a batch of grant copies; one `GNTST_*` status per operation, in order. The batch
    /// itself fails only if the hypervisor could not be reached.
    fn grant_copy(&self, ops: &[GrantCopyOp]) -> Result<Vec<i16>>;
    /// Pin the page `peer` granted us as `gref` for our device's DMA: the device's IOMMU
    /// translates the returned IOVA (page-aligned) to that page until [`Platform::unpin_grant`].
    fn pin_grant(&self, peer: DomId, gref: GrantRef, writable: bool) -> Result<u64>;
    /// Remove a pin made by [`Platform::pin_grant`].
    fn unpin_grant(&self, iova: u64) -> Result<()>;
    /// Give our `frame` to `peer` through its accept-transfer grant `gref` (the exchange path);
    /// says whether the platform swapped pages or copied.
    fn transfer(&self, frame: Frame, peer: DomId, gref: GrantRef) -> Result<TransferMode>;
    /// Read `buf.len()` bytes of our own memory at `frame`/`offset` (not crossing the page).
    fn read_local(&self, frame: Frame, offset: usize, buf: &mut [u8]) -> Result<()>;
    /// Write `data` into our own memory at `frame`/`offset` (not crossing the page).
    fn write_local(&self, frame: Frame, offset: usize, data: &[u8]) -> Result<()>;

    // --- Event channels ------------------------------------------------------------------

    /// Allocate a port that `remote` may bind to.
    fn evtchn_alloc_unbound(&self, remote: DomId) -> Result<Port>;
    /// Bind a new local port to `remote`'s unbound `remote_port`.
    fn evtchn_bind_interdomain(&self, remote: DomId, remote_port: Port) -> Result<Port>;
    /// Notify the other end of `port`.
    fn evtchn_notify(&self, port: Port) -> Result<()>;
    /// Unmask `port`; if it was pending meanwhile, an upcall is raised again.
    fn evtchn_unmask(&self, port: Port) -> Result<()>;
    /// Close `port`.
    fn evtchn_close(&self, port: Port) -> Result<()>;
    /// Block until at least one of our ports is pending (or `timeout` passes), then return
    /// the pending, unmasked ports, clearing their pending bits and masking them; the caller
    /// unmasks each after handling it.
    fn evtchn_wait(&self, timeout: Option<Duration>) -> Result<Vec<Port>>;
}
