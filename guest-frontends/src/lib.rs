//! Guest-side frontends that survive a driver-domain restart, and the adapter that lets real
//! programs use them.
//!
//! * [`blkfront`]: a Xen block frontend over any [`devchan::platform::Platform`], following
//!   XenBus as Linux's xen-blkfront does, plus the seed's reconnect protocol: when the backend
//!   is replaced it sets up a fresh ring and reissues every unanswered request from its shadow
//!   copy.
//! * [`block`]: the [`block::BlockDevice`] trait the adapters export (blkfront, a plain file).
//! * [`nbd`]: an NBD server (fixed newstyle handshake, simple replies) on a Unix socket, so
//!   `qemu-io`, `qemu-img` and `nbdcopy` can use a guest's disk.
//! * [`fuzzing`]: fuzz target bodies (NBD request parsing), also run by the unit tests.

pub mod blkfront;
pub mod block;
pub mod fuzzing;
pub mod nbd;
