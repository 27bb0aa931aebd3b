//! Our IDDs as userspace Xen backends: [`XenPlatform`] implements `devchan::platform::Platform`
//! on Linux's Xen devices, so idd-blk's `Blkback` (and later idd-net) runs unchanged in a Xen
//! backend domain (dom0 here) against unmodified Linux frontends.
//!
//! * [`sys`]: the gntdev/evtchn ioctl structs and numbers (checked against the C headers by
//!   `tests/xen_headers.rs`).
//! * [`gntdev`]: grant map (`mmap`), unmap on drop, grant copy.
//! * [`evtchn`]: event channels; ports bound on a supervisor-held file survive the backend.
//! * [`xenstore`]: a minimal XenStore client (`/dev/xen/xenbus` or xenstored's socket).
//! * [`memory`]: the backend's frames, a tmpfs file that survives the process (the journal).
//! * [`platform`]: [`XenPlatform`], what an IOVA means without an IOMMU, persistent grants,
//!   and what a backend cannot do on Xen.
//! * [`pins`]: the persistent, reference-counted grant mappings behind `pin_grant`.
//! * [`handshake`]: the XenStore handshake steps every device shares (paths, states, the
//!   toolstack's directories, features, reading the frontend's keys).
//! * [`vbd`]: the blkif XenStore handshake of the `xen-blkback` program.
//! * [`vif`]: the netif XenStore handshake of the `xen-netback` program.
//! * [`program`]: what the `xen-blkback` and `xen-netback` programs do alike (start-up,
//!   opening the devices, waiting for the frontend, journal port rebind, stdout lines).
//! * [`tapnic`]: idd-net's `NetDevice` over a dom0 TAP interface, DMA through the platform's IOMMU.
//!
//! The `xen-blkback` program (`src/bin/xen-blkback.rs`) serves one guest disk from an image
//! file and re-attaches transparently when restarted; `xen-netback` (`src/bin/xen-netback.rs`)
//! serves one guest vif with idd-net's `Netback` onto a TAP interface, the same way.

pub mod evtchn;
pub mod gntdev;
pub mod handshake;
pub mod memory;
pub mod pins;
pub mod platform;
pub mod program;
pub mod sys;
pub mod tapnic;
pub mod vbd;
pub mod vif;
pub mod xenstore;

pub use platform::XenPlatform;
