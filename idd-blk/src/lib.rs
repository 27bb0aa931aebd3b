//! The block isolated driver domain (IDD).
//!
//! * [`blkback`]: Xen's `blkif` protocol over device channels, one channel per guest disk:
//!   round-robin batches across guests, per-guest regions and read-only mode, flush, discard,
//!   indirect requests, errors for anything malformed; data moves only by device DMA to
//!   pinned grants (the IDD never maps guest data).
//! * [`elevator`]: conflict-ordered sort and merge in front of the device queue.
//! * [`journal`]: the in-flight journal that lets a restarted process re-attach to the same
//!   rings and replay what was consumed and not answered (transparent restart).
//! * [`device`]: the [`device::BlockDevice`] trait blkback drives (IOVA segments in,
//!   completions out) and [`device::FileDevice`], a raw image behind the IOMMU.
//! * [`virtio`]: a virtio-blk driver that programs a virtio-blk-pci device only through its
//!   I/O Space ([`io`]: in this process, or in domain 0 over a socket) and gives it only
//!   pinned memory.
//!
//! Everything is generic over `devchan::platform::Platform`; the `idd-blk` binary runs it in
//! a sandboxed process domain.

pub mod blkback;
pub mod device;
pub mod elevator;
pub mod io;
pub mod journal;
pub mod virtio;
