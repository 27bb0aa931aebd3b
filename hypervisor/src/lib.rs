//! The process-domain platform: the trusted core that runs inside domain 0.
//!
//! Domains are processes. Each has memfd-backed memory that the hypervisor maps too, a grant
//! table and a shared-info page (event-channel bitmaps) inside that memory, an upcall eventfd,
//! and a link to the hypervisor for hypercalls. See `docs/hypervisor.md`.

pub mod memory;
pub mod domain;
pub mod grant_table;
pub mod evtchn;
pub mod system;
pub mod local;
pub mod hypercall;
pub mod process;
pub mod launch;
pub mod sandbox;
pub mod xenstored;
