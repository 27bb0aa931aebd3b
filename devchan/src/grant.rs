//! Grant tables, version 1 (`xen/include/public/grant_table.h`).
//!
//! A domain shares a page by writing a [`GrantEntryV1`] into its grant table: which domain may
//! use it (`domid`), which of its frames (`frame`), and how (`flags`). The index of the entry is
//! the *grant reference* the peer uses. The hypervisor sets `GTF_READING`/`GTF_WRITING` while
//! the peer holds a mapping; the granting domain must not reuse the entry until both are clear.

/// A grant reference: an index into the granting domain's grant table (`grant_ref_t`).
pub type GrantRef = u32;

/// A domain id (`domid_t`).
pub type DomId = u16;

/// The id of the first domain, the trusted controller.
pub const DOMID_0: DomId = 0;
/// `DOMID_SELF`: names the calling domain in grant-copy operations.
pub const DOMID_SELF: DomId = 0x7FF0;

/// One version-1 grant entry, exactly `grant_entry_v1_t` (8 bytes).
///
/// Lives in memory shared between the granting domain and the hypervisor, so fields are read and
/// written with atomics by whoever touches them; this struct is the layout, not a value to keep.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GrantEntryV1 {
    /// `GTF_*` type and flag bits.
    pub flags: u16,
    /// The domain allowed to use the grant.
    pub domid: DomId,
    /// The granted frame (or, for transfers, the frame received).
    pub frame: u32,
}

const _: () = assert!(core::mem::size_of::<GrantEntryV1>() == 8);

/// Entry type mask (`GTF_type_mask`).
pub const GTF_TYPE_MASK: u16 = 3;
/// Entry is unused (`GTF_invalid`).
pub const GTF_INVALID: u16 = 0;
/// The named domain may map or copy the frame (`GTF_permit_access`).
pub const GTF_PERMIT_ACCESS: u16 = 1;
/// The named domain may transfer a page to us (`GTF_accept_transfer`).
pub const GTF_ACCEPT_TRANSFER: u16 = 2;
/// Transitive grant, v2 only; reserved here so the value is never reused (`GTF_transitive`).
pub const GTF_TRANSITIVE: u16 = 3;
/// Peer may only read (`_GTF_readonly` bit 2).
pub const GTF_READONLY: u16 = 1 << 2;
/// Hypervisor: peer holds a read mapping (`_GTF_reading` bit 3).
pub const GTF_READING: u16 = 1 << 3;
/// Hypervisor: peer holds a write mapping (`_GTF_writing` bit 4).
pub const GTF_WRITING: u16 = 1 << 4;
/// Transfer: the peer has committed to the transfer (`_GTF_transfer_committed` bit 2).
pub const GTF_TRANSFER_COMMITTED: u16 = 1 << 2;
/// Transfer: the frame field now holds the received frame (`_GTF_transfer_completed` bit 3).
pub const GTF_TRANSFER_COMPLETED: u16 = 1 << 3;

/// Grant operation status codes (`GNTST_*`), as returned per operation.
pub mod status {
    /// Success.
    pub const OKAY: i16 = 0;
    /// Unspecified error.
    pub const GENERAL_ERROR: i16 = -1;
    /// Unrecognised domain id.
    pub const BAD_DOMAIN: i16 = -2;
    /// Unrecognised or inappropriate grant reference.
    pub const BAD_GNTREF: i16 = -3;
    /// Unrecognised or inappropriate map handle.
    pub const BAD_HANDLE: i16 = -4;
    /// Inappropriate virtual address to map.
    pub const BAD_VIRT_ADDR: i16 = -5;
    /// Inappropriate device address to unmap.
    pub const BAD_DEV_ADDR: i16 = -6;
    /// Out of space in I/O MMU.
    pub const NO_DEVICE_SPACE: i16 = -7;
    /// Not enough privilege for the operation.
    pub const PERMISSION_DENIED: i16 = -8;
    /// Specified page was invalid for the operation.
    pub const BAD_PAGE: i16 = -9;
    /// Copy arguments cross a page boundary.
    pub const BAD_COPY_ARG: i16 = -10;
    /// Page address size too large.
    pub const ADDRESS_TOO_BIG: i16 = -11;
    /// Operation not done; try again.
    pub const EAGAIN: i16 = -12;
    /// Out of space (handles, etc.).
    pub const NO_SPACE: i16 = -13;
}

/// Size of a page, and so of a grant, in bytes.
pub const PAGE_SIZE: usize = 4096;

/// What this module claims about Xen's `grant_table.h`.
pub fn abi_checks() -> Vec<crate::abi::AbiCheck> {
    use crate::abi::AbiCheck;
    let mut v = crate::abi_layout!("grant_entry_v1_t", GrantEntryV1 { flags, domid, frame });
    for (name, ours) in [
        ("GTF_invalid", GTF_INVALID),
        ("GTF_permit_access", GTF_PERMIT_ACCESS),
        ("GTF_accept_transfer", GTF_ACCEPT_TRANSFER),
        ("GTF_transitive", GTF_TRANSITIVE),
        ("GTF_type_mask", GTF_TYPE_MASK),
        ("GTF_readonly", GTF_READONLY),
        ("GTF_reading", GTF_READING),
        ("GTF_writing", GTF_WRITING),
        ("GTF_transfer_committed", GTF_TRANSFER_COMMITTED),
        ("GTF_transfer_completed", GTF_TRANSFER_COMPLETED),
    ] {
        v.push(AbiCheck::new(name, ours));
    }
    for (name, ours) in [
        ("GNTST_okay", status::OKAY),
        ("GNTST_general_error", status::GENERAL_ERROR),
        ("GNTST_bad_domain", status::BAD_DOMAIN),
        ("GNTST_bad_gntref", status::BAD_GNTREF),
        ("GNTST_bad_handle", status::BAD_HANDLE),
        ("GNTST_bad_virt_addr", status::BAD_VIRT_ADDR),
        ("GNTST_bad_dev_addr", status::BAD_DEV_ADDR),
        ("GNTST_no_device_space", status::NO_DEVICE_SPACE),
        ("GNTST_permission_denied", status::PERMISSION_DENIED),
        ("GNTST_bad_page", status::BAD_PAGE),
        ("GNTST_bad_copy_arg", status::BAD_COPY_ARG),
        ("GNTST_address_too_big", status::ADDRESS_TOO_BIG),
        ("GNTST_eagain", status::EAGAIN),
        ("GNTST_no_space", status::NO_SPACE),
    ] {
        v.push(AbiCheck::new(name, ours));
    }
    v.push(AbiCheck::new("DOMID_SELF", DOMID_SELF));
    v
}
