//! The network isolated driver domain: a virtio-net driver behind an I/O Space, and netback
//! serving Xen's `netif` protocol over device channels.
//!
//! * [`device`]: the [`device::NetDevice`] trait netback drives (transmit IOVA segments in,
//!   receive buffers of the IDD's own memory posted, completions and arrivals out).
//! * [`netback`]: the backend: multi-slot transmits with anti-spoofing on a private header
//!   copy, the credit scheduler, receive demultiplexing by MAC, copy or page-exchange
//!   receive, restart from the journal.
//! * [`credit`]: "x bytes every y µs" per channel, round robin among channels with credit.
//! * [`filter`]: MAC/IP anti-spoofing checks and the receive destination.
//! * [`journal`]: the in-flight journal in the domain's own RAM (transparent restart).
//! * [`pool`]: our own pages pinned for the device, recorded for the next process.
//! * [`mem`]: an in-memory NIC behind the IOMMU for tests and fuzzing.
//! * [`layout`]: the frames of the domain's RAM the `idd-net` program uses.
//!
//! Everything is generic over `devchan::platform::Platform`; the `idd-net` binary runs it in
//! a sandboxed process domain.

pub mod credit;
pub mod device;
pub mod filter;
pub mod journal;
pub mod mem;
pub mod netback;
pub mod pool;

/// Frames of the IDD domain's own RAM the `idd-net` program uses (the manager gives the
/// domain [`layout::frames_needed`] frames; see the program's docs for the table).
pub mod layout {
    use hypervisor::memory::layout::FIRST_FREE_FRAME;

    /// First of the frames reserved for the virtio-net driver's queues and headers.
    pub const DRIVER_FIRST_FRAME: u64 = FIRST_FREE_FRAME;
    /// Frames reserved for the driver.
    pub const DRIVER_FRAMES: u64 = 8;
    /// First of the pool record frames (`pool::RECORD_FRAMES`).
    pub const RECORD_FRAME: u64 = DRIVER_FIRST_FRAME + DRIVER_FRAMES;
    /// First transmit header frame.
    pub const HEADER_FIRST_FRAME: u64 = RECORD_FRAME + crate::pool::RECORD_FRAMES;
    /// Transmit header frames (32 headers each: 128 transmits at the device at once).
    pub const HEADER_FRAMES: u64 = 4;
    /// First receive pool frame.
    pub const RX_FIRST_FRAME: u64 = HEADER_FIRST_FRAME + HEADER_FRAMES;
    /// Receive pool frames: a full 256-entry device queue plus the spares.
    pub const RX_FRAMES: u64 = 256 + crate::netback::SPARES as u64;
    /// Channel `i`'s journal starts at `JOURNAL_FIRST_FRAME + journal::FRAMES × i`.
    pub const JOURNAL_FIRST_FRAME: u64 = RX_FIRST_FRAME + RX_FRAMES;

    /// First journal frame of channel `i`.
    pub const fn journal_frame(i: u64) -> u64 {
        JOURNAL_FIRST_FRAME + crate::journal::FRAMES * i
    }

    /// Frames a domain serving `channels` channels needs.
    pub const fn frames_needed(channels: u64) -> u64 {
        journal_frame(channels)
    }

    const _: () = assert!(HEADER_FRAMES + RX_FRAMES <= crate::pool::MAX_PAGES as u64);

    #[cfg(test)]
    mod tests {
        #[test]
        fn frames() {
            assert_eq!(super::RECORD_FRAME, 15);
            assert_eq!(super::JOURNAL_FIRST_FRAME, 281);
            assert_eq!(super::frames_needed(2), 287);
        }
    }
}
