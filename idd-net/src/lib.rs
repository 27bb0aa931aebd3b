//! The network isolated driver domain: a virtio-net driver behind an I/O Space, and netback
//! serving Xen's `netif` protocol over device channels.
//!
//! * [`device`]: the [`device::NetDevice`] trait netback drives (transmit IOVA segments in,
//!   receive buffers of the IDD's own memory posted, completions and arrivals out).
//! * [`netback`]: the backend: multi-slot transmits with anti-spoofing on a private header
//!   copy, the credit scheduler, receive demultiplexing by MAC, copy or page-exchange
//!   receive, restart from the journal.
//! * [`credit`]: "x bytes every y µs" per channel, round robin among channels with credit.
//! * [`csum`]: completing the TCP/UDP checksum of a `csum_blank` transmit.
//! * [`filter`]: MAC/IP anti-spoofing checks and the receive destination.
//! * [`journal`]: the in-flight journal in the domain's own RAM (transparent restart).
//! * [`pool`]: our own pages pinned for the device, recorded for the next process.
//! * [`fuzzing`]: the body of the netback fuzz target (a hostile guest's ring operations).
//! * [`mem`]: an in-memory NIC behind the IOMMU for tests and fuzzing.
//! * [`virtio`]: the virtio-net driver ([`virtio::VirtioNetDriver`]), a [`device::NetDevice`]
//!   programmed only through the device's I/O Space.
//! * [`layout`]: the frames of the domain's RAM the `idd-net` program uses.
//!
//! Everything is generic over `devchan::platform::Platform`; the `idd-net` binary runs it in
//! a sandboxed process domain.

pub mod credit;
pub mod csum;
pub mod device;
pub mod filter;
pub mod fuzzing;
pub mod journal;
pub mod mem;
pub mod netback;
pub mod pool;
pub mod virtio;

/// Frames of the IDD domain's own RAM the `idd-net` program uses (the manager gives the
/// domain [`layout::frames_needed`] frames; see the program's docs for the table).
pub mod layout {
    use crate::virtio::DriverFrames;
    use hypervisor::memory::layout::FIRST_FREE_FRAME;

    /// The virtio-net driver's queues and transmit header.
    pub const DRIVER_FRAMES: DriverFrames = DriverFrames {
        rx_ring: FIRST_FREE_FRAME,
        tx_ring: FIRST_FREE_FRAME + 1,
        hdr: FIRST_FREE_FRAME + 2,
    };
    /// First of the pool record frames (`pool::RECORD_FRAMES`).
    pub const RECORD_FRAME: u64 = FIRST_FREE_FRAME + 3;
    /// First transmit header frame.
    pub const HEADER_FIRST_FRAME: u64 = RECORD_FRAME + crate::pool::RECORD_FRAMES;
    /// Transmit header frames (32 headers each: 128 transmits taken at once).
    pub const HEADER_FRAMES: u64 = 4;
    /// First receive pool frame.
    pub const RX_FIRST_FRAME: u64 = HEADER_FIRST_FRAME + HEADER_FRAMES;
    /// Receive pool frames: a full device receive queue (`virtio::QUEUE_SIZE`) plus the
    /// spares.
    pub const RX_FRAMES: u64 = crate::virtio::QUEUE_SIZE as u64 + crate::netback::SPARES as u64;
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
    const _: () = assert!(DRIVER_FRAMES.hdr < RECORD_FRAME);

    #[cfg(test)]
    mod tests {
        #[test]
        fn frames() {
            assert_eq!(super::RECORD_FRAME, 10);
            assert_eq!(super::HEADER_FIRST_FRAME, 12);
            assert_eq!(super::RX_FIRST_FRAME, 16);
            assert_eq!(super::JOURNAL_FIRST_FRAME, 148);
            assert_eq!(super::frames_needed(2), 154);
        }
    }
}
