//! The process-domain platform: the trusted core that runs inside domain 0.
//!
//! Domains are processes. Each has memfd-backed memory that the hypervisor maps too, a grant
//! table and a shared-info page (event-channel bitmaps) inside that memory, an upcall eventfd,
//! and a link to the hypervisor for hypercalls. See `docs/hypervisor.md`.
//!
//! # Decisions the other layers rely on (CONTRACT-level)
//!
//! * **Entry point.** [`system::System`] is the trusted core, shared as `Arc<System>`. Every
//!   hypercall method takes the *calling* domain first and validates every other argument: a bad
//!   reference, port, frame or domain is a [`system::SystemError`] or a `GNTST_*` status, never
//!   a panic, never another domain's memory.
//! * **Memory layout** ([`memory::layout`]): frame 0 `shared_info`, 1..=4 the v1 grant table
//!   (2048 entries, refs 0..8 reserved), 5 the hypercall page, 6 the XenStore ring, 7.. free RAM;
//!   shareable pages from `alloc_shared_page` are frames `nr_frames + i`, each its own sealed
//!   one-page memfd. All memfds are sealed against shrink/grow, so a domain cannot make the
//!   hypervisor fault by truncating its memory.
//! * **What can be granted.** Frames below `FIRST_FREE_FRAME` (the platform's own pages) are
//!   never usable through a grant (`GNTST_bad_page`). Only shareable pages can be *mapped*; any
//!   other frame can be copied, pinned or transferred. Read-only mappers get a read-only file
//!   description, so they cannot map the page writable.
//! * **Statuses follow Xen**: wrong type/domid/readonly → `GNTST_general_error`, ref outside the
//!   table → `GNTST_bad_gntref`, bad frame → `GNTST_bad_page`, copy crossing a page →
//!   `GNTST_bad_copy_arg`, pin by a domain without an IOMMU → `GNTST_permission_denied`,
//!   IOMMU full → `GNTST_no_device_space`, unknown map handle → `GNTST_bad_handle`, unknown
//!   IOVA → `GNTST_bad_dev_addr`.
//! * **Transfers (exchange).** The receiver posts a `GTF_accept_transfer` grant whose `frame`
//!   field names the frame that will receive the page (a deviation from Xen, where the field is
//!   only written on completion). The hypervisor swaps the two shareable pages when nobody else
//!   holds either (no mapping, pin, copy, or in-process page handle: checked by reference
//!   count under both page-table locks) and copies otherwise; the result says which. A process
//!   that has `mmap`ed one of the two pages would keep seeing the old page after a swap, so
//!   `process::ProcessPlatform` maps the frame's new memfd over it in place (the sender after a
//!   `Remapped` transfer, the receiver in `end_transfer`; control op `SHARED_PAGE`).
//! * **Event channels.** Sending on a port that is not interdomain (unbound, closed, never
//!   allocated) is an error here, where Xen silently drops it. Binding marks the new local port
//!   pending, as Xen does (notifications to the unbound port may have been lost). Port 0 is
//!   reserved; ports are below `EVTCHN_2L_NR_CHANNELS` (4096). Upcalls are an eventfd
//!   (non-blocking) per domain, signalled only when `EventPage::set_pending`/`unmask` says so.
//! * **Domain ids** start at 0 (the first domain created is domain 0) and are never reused;
//!   ids from `DOMID_FIRST_RESERVED` (0x7FF0) up are never handed out.
//! * **Revocation.** The manager sets deadlines (`set_grant_deadline`, `set_holder_deadline`);
//!   `revoke_overdue` removes overdue pins from the IOMMU, drops overdue copies, and reports
//!   overdue mappings as `Unrevocable`: the manager then destroys their holder, which releases
//!   them. `destroy_domain` releases everything the domain held and strips every use others
//!   held of its grants (mappings of its shareable pages stay valid for their holders).
//! * **XenStore.** Frame 6 of every domain is its `xenstore_domain_interface` page (Xen's
//!   `store_mfn`). [`xenstored::domains::DomainStores`] introduces a domain: its store port is
//!   allocated unbound in the domain for the store domain (Xen's `store_evtchn`), passed to
//!   its process as `PDOM_STORE_PORT`, and bound by xenstored, which serves the ring until the
//!   domain is released or destroyed. The domain side is [`store_link`].
//! * **Locking.** The domain table is an `RwLock` read on every call; per-domain mutexes guard
//!   ports, the active grant table and holdings. Copies move bytes with no lock held.

pub mod memory;
pub mod domain;
pub mod grant_table;
pub mod evtchn;
pub mod system;
pub mod local;
pub mod hypercall;
pub mod process;
pub mod launch;
pub mod limits;
pub mod sandbox;
pub mod store_link;
pub mod xenstored;
pub mod fuzzing;
