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
//!   I/O Space (`iospace::link`: in this process, or in domain 0 over a socket) and gives it only
//!   pinned memory.
//!
//! Everything is generic over `devchan::platform::Platform`; the `idd-blk` binary runs it in
//! a sandboxed process domain.

pub mod blkback;
pub mod device;
pub mod elevator;
pub mod journal;
pub mod virtio;

/// Frames of the IDD domain's own RAM the `idd-blk` program uses (the manager reserves
/// them; see the program's docs for the table).
pub mod layout {
    use crate::virtio::DriverFrames;

    /// Scratch page for indirect segment pages.
    pub const SCRATCH_FRAME: u64 = 7;
    /// The virtio driver's queue and request-header frames.
    pub const DRIVER_FRAMES: DriverFrames = DriverFrames { ring: 8, hdr: 9 };
    /// Channel `i`'s journal is at `JOURNAL_FIRST_FRAME + 2 i` and the frame after it.
    pub const JOURNAL_FIRST_FRAME: u64 = 10;

    /// Frames a domain serving `channels` channels needs.
    pub const fn frames_needed(channels: u64) -> u64 {
        JOURNAL_FIRST_FRAME + 2 * channels + 2
    }

    const _: () = assert!(SCRATCH_FRAME >= hypervisor::memory::layout::FIRST_FREE_FRAME);
    const _: () =
        assert!(SCRATCH_FRAME < DRIVER_FRAMES.ring && DRIVER_FRAMES.ring < DRIVER_FRAMES.hdr);
    const _: () = assert!(DRIVER_FRAMES.hdr < JOURNAL_FIRST_FRAME);
}
