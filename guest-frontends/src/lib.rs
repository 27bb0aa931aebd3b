//! Guest-side frontends that survive a driver-domain restart, and the adapter that lets real
//! programs use them.
//!
//! * [`blkfront`]: a Xen block frontend over any [`devchan::platform::Platform`], following
//!   XenBus as Linux's xen-blkfront does, plus the seed's reconnect protocol: when the backend
//!   is replaced it sets up a fresh ring and reissues every unanswered request from its shadow
//!   copy.
//! * [`netfront`]: a Xen network frontend (netif: multi-slot transmit, copy or page-exchange
//!   receive, every response validated) that also survives a replaced backend (fresh rings,
//!   receive buffers posted again, unanswered transmits sent again).
//! * [`echo`]: ARP / ICMP echo / UDP echo responder over raw frames (`etherparse`).
//! * [`tap`]: a TAP interface in a network namespace, so a Linux stack is the guest OS.
//! * [`block`]: the [`block::BlockDevice`] trait the adapters export (blkfront, a plain file).
//! * [`nbd`]: an NBD server (fixed newstyle handshake, simple replies) on a Unix socket, so
//!   `qemu-io`, `qemu-img` and `nbdcopy` can use a guest's disk.
//! * [`fuzzing`]: fuzz target bodies (NBD sessions, the shadow table), also run by the unit
//!   tests; `guest-frontends/fuzz` is the cargo-fuzz crate.
//!
//! The `blkfront-domain` program runs blkfront in a sandboxed process domain (XenStore over
//! its ring, events through `hypervisor::store_link::EventMux`) with a verifying workload.
//!
//! The `net-guest` program runs netfront in a process domain (echo, TAP bridge or flood).
//!
//! Tests: `tests/netfront.rs` (netfront against a hand-written ring backend: handshake,
//! multi-slot transmit, copy and exchange receive, hostile responses, reconnects),
//! `tests/nbd_clients.rs` (qemu-io, qemu-img, nbdcopy, nbdinfo against a file export),
//! `tests/blkfront_blkback.rs` (blkfront against the real blkback, including reconnects and a
//! hostile backend, and the NBD clients end to end), `tests/process_domain.rs` (blkfront in a
//! process domain across an IDD crash).

pub mod blkfront;
pub mod block;
pub mod echo;
pub mod fuzzing;
pub mod nbd;
pub mod netfront;
pub mod tap;
