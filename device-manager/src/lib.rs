//! The device manager (domain 0): a TOML policy in, a supervised block driver domain and its
//! guests out.
//!
//! This is the slice of issue 3: one virtio-blk device, guests each with their own region.
//!
//! * [`manager::Manager`] builds domain 0's services (the [`hypervisor::system::System`],
//!   xenstored on a socket and on every domain's ring), the emulated virtio-blk-pci device on
//!   the emulated PCI bus with its image, its I/O Space (served to the IDD over a socket,
//!   `idd_blk::io`) and IOMMU, the IDD domain, and the guest domains; writes the XenStore
//!   device nodes ([`toolstack`]); starts the sandboxed IDD process (`idd-blk`, the
//!   `idd-blk` crate's program, whose stdout protocol the supervision reads) and guest
//!   processes (`blk-guest`); and supervises the IDD ([`manager::Manager::supervise`]).
//! * [`recovery`]: what one recovery took, phase by phase, and percentiles over many.
//! * [`fault`]: fault injection (crash, hang, ring corruption) against a running IDD.
//!
//! # Supervision
//!
//! Crash: the IDD process's pidfd becomes readable. Hang: the IDD prints a heartbeat line
//! (`hb N`) on its stdout at least every 50 ms from its serving loop; no line for the
//! policy's `restart.heartbeat` (the deadline) means it is hung: it is killed and handled as
//! a crash. Recovery (the IDD *domain* stays, with its memory, journal, ports and id):
//!
//! 1. *detect*: from the fault (when injected) to the manager seeing it;
//! 2. *revoke*: `System::release_mappings` (mappings died with the process), then every
//!    pin and copy the domain holds is revoked (holder deadline now, `revoke_overdue`);
//! 3. *spawn*: a fresh process in the same domain (`DomainStores::spawn_in`);
//! 4. *re-attach*: until it prints `ready` (device probed, every channel resumed from its
//!    journal, whose unanswered requests it replays first);
//! 5. *first response*: until the `rsp_prod` of a guest ring that had requests outstanding
//!    moves (read by domain 0 in the guest's ring page), or, with nothing outstanding, the
//!    first heartbeat.
//!
//! Before the new process starts, the manager also clears the journals' pin tables
//! (frame `JOURNAL_FIRST_FRAME + 2 i + 1`): those pins were just revoked and their IOVAs may be
//! handed out again, so the new process must not unpin them.
//!
//! A corrupted ring: the IDD refuses it (prints `failed CHAN`) and keeps serving the others;
//! the manager takes that backend through `Closing` → `Closed` → `InitWait`, blkfront drops
//! the ring and publishes a new one (reissuing what had no answer), and the IDD process is
//! restarted with the new ring ([`manager::Manager::reset_channel`]).
//!
//! Replacing the IDD *domain* itself (not needed by a process crash) is the frontends'
//! reconnect protocol: the manager rewrites `backend`/`backend-id` in each frontend directory
//! ([`toolstack::point_frontend`]), which blkfront takes as the signal to reconnect.

pub mod api;
pub mod demo;
pub mod devices;
pub mod fault;
pub mod manager;
pub mod recovery;
pub mod service;
pub mod toolstack;
pub mod xen;

/// The block size of the guests' workloads.
pub const BLOCK: usize = 4096;

/// The virtual device number of the guests' disk (`xvda`, 202:0 as Linux numbers it).
pub const VBD_DEVID: u16 = 51712;

/// Domain sizes (the IDD program's own frames are `idd_blk::layout`).
pub mod layout {
    pub use idd_blk::layout::JOURNAL_FIRST_FRAME;

    /// Most channels (guest disks) one IDD serves: as many as a NIC IDD
    /// (`manager::net::MAX_NICS`), so 64 guests can each have a disk and a NIC.
    ///
    /// Every disk IDD domain is sized for this many (its journals are two frames per
    /// channel): the RAM memfd is sparse and only the journals of the channels in use are
    /// ever written, so the frames of unused channels cost address space, not memory
    /// (142 frames, 568 KiB of address space, for 64; 8 channels needed 30).
    pub const MAX_CHANNELS: u64 = 64;
    /// RAM of the IDD domain.
    pub const IDD_FRAMES: u64 = idd_blk::layout::frames_needed(MAX_CHANNELS) + 2;
    /// XenStore quotas of every domain. A driver domain owns the backend nodes of every
    /// device it serves (a vbd directory is about 16 nodes, a vif one about 20): 64 of them
    /// exceed C xenstored's default of 1000 nodes per domain (`ENOSPC` at bring-up), so the
    /// manager's xenstored uses oxenstored's default of 8192, enough for [`MAX_CHANNELS`]
    /// disks and as many NICs on one IDD with room to spare.
    pub fn xenstore_quotas() -> devchan::xenstore::Quotas {
        devchan::xenstore::Quotas {
            nodes: 8192,
            ..Default::default()
        }
    }
    /// RAM of a guest domain: blkfront's data pages and ring, or netfront's buffers
    /// (`net-guest` wants 391).
    pub const GUEST_FRAMES: u64 = 512;
}

/// FNV-1a, 64 bits: the workload's digest of a region's expected content.
pub fn fnv64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The content of `block` at `version` in the workload seeded `seed` (a [`BLOCK`]-sized
/// pseudo-random pattern, different for every triple; starts with the triple, readable in a
/// hex dump).
pub fn pattern(seed: u64, block: u64, version: u64) -> Vec<u8> {
    let mut s = fnv64(
        &[
            seed.to_le_bytes(),
            block.to_le_bytes(),
            version.to_le_bytes(),
        ]
        .concat(),
    ) | 1;
    let mut out = Vec::with_capacity(BLOCK);
    out.extend_from_slice(&seed.to_le_bytes());
    out.extend_from_slice(&block.to_le_bytes());
    out.extend_from_slice(&version.to_le_bytes());
    while out.len() < BLOCK {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        out.extend_from_slice(&s.to_le_bytes());
    }
    out.truncate(BLOCK);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_differ_by_each_coordinate() {
        let a = pattern(1, 2, 3);
        assert_eq!(a.len(), BLOCK);
        assert_ne!(a, pattern(1, 2, 4));
        assert_ne!(a, pattern(1, 3, 3));
        assert_ne!(a, pattern(2, 2, 3));
        assert_eq!(a, pattern(1, 2, 3));
    }

    #[test]
    fn fnv_known_values() {
        assert_eq!(fnv64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
