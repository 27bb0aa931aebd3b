//! Grant tables, version 1 (`xen/include/public/grant_table.h`).
//!
//! A domain shares a page by writing a [`GrantEntryV1`] into its grant table: which domain may
//! use it (`domid`), which of its frames (`frame`), and how (`flags`). The index of the entry is
//! the *grant reference* the peer uses. The hypervisor sets `GTF_READING`/`GTF_WRITING` while
//! the peer holds a mapping; the granting domain must not reuse the entry until both are clear.
//!
//! # Wire layout
//!
//! The table is an array of 8-byte entries in pages of the granting domain's memory:
//!
//! | offset | field | written by |
//! |---|---|---|
//! | 0 | `flags: u16` (`GTF_*`) | granter (type, readonly), hypervisor (reading/writing, transfer bits) |
//! | 2 | `domid: u16` | granter |
//! | 4 | `frame: u32` | granter (access), hypervisor (completed transfer) |
//!
//! Both sides change `flags` concurrently, so every access is atomic ([`GrantEntries`]). The
//! first 4 bytes (`flags` and `domid`) are read and compare-exchanged as one `u32`, as Xen does,
//! so the hypervisor's "is this entry still granted to that domain" check and its setting of
//! `GTF_reading`/`GTF_writing` are one step.
//!
//! # Protocols
//!
//! * **Grant access** (granter): write `domid` and `frame`, then (release) `flags =
//!   GTF_permit_access | readonly`. The flags store publishes the entry.
//! * **Use** (hypervisor, for a map/copy/pin by domain *d*): compare-exchange `(flags, domid)`
//!   from a value with type `GTF_permit_access` and `domid == d` (and not `GTF_readonly` for
//!   a write use) to the same value with `GTF_reading` (and `GTF_writing`) added; then read the
//!   frame. The last use clears the bits again.
//! * **End access** (granter): compare-exchange `flags` from a value without
//!   `GTF_reading`/`GTF_writing` to 0. If either bit is set the peer still uses the page and the
//!   reference must not be reused ([`GrantError::InUse`]).
//! * **Transfer** (exchange): the receiver posts `GTF_accept_transfer` with the peer's domid
//!   and, on this platform, the receiving frame in `frame`. The hypervisor sets
//!   `GTF_transfer_committed`, moves the page, writes the received frame, then (release) sets
//!   `GTF_transfer_completed`. The receiver ends the grant: not committed → cmpxchg to 0 (no
//!   page came); committed but not completed → try again; completed → read `frame`.

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

/// The first grant reference a guest may use; 0..8 are reserved (Xen's `GNTTAB_NR_RESERVED_ENTRIES`;
/// ref 0 is the console's, ref 1 XenStore's by convention).
pub const NR_RESERVED_ENTRIES: GrantRef = 8;

/// Why a grant-table operation failed.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum GrantError {
    /// The reference is outside the table.
    #[error("Grant reference {0} out of range")]
    OutOfRange(GrantRef),
    /// The reference is reserved or not allocated by this allocator.
    #[error("Grant reference {0} is not allocated")]
    NotAllocated(GrantRef),
    /// All references are in use.
    #[error("Grant table full")]
    Exhausted,
    /// The peer still maps, pins or copies the granted page.
    #[error("Grant {0} is still in use by its peer")]
    InUse(GrantRef),
    /// The peer is transferring a page into this grant right now.
    #[error("Transfer into grant {0} under way")]
    TransferInProgress(GrantRef),
    /// The entry changed underneath a compare-exchange too many times in a row.
    #[error("Grant entry {0} is unstable")]
    Unstable(GrantRef),
}

/// An atomic view of a v1 grant table in shared memory.
///
/// Holds a raw pointer: the entries are written concurrently by the granting domain and the
/// hypervisor, so they are only ever touched through atomics. Every method checks the
/// reference against [`GrantEntries::len`].
///
/// Deliberately neither `Clone` nor `Copy`: a borrowed view cannot outlive its owner.
#[derive(Debug)]
pub struct GrantEntries {
    base: core::ptr::NonNull<u8>,
    len: u32,
}

// SAFETY: all accesses to the entries are atomic, which is safe from any thread, and
// `GrantEntries::new`'s contract keeps the memory mapped while the view is used.
unsafe impl Send for GrantEntries {}
// SAFETY: as above.
unsafe impl Sync for GrantEntries {}

use core::sync::atomic::{AtomicU16, AtomicU32, Ordering};

// The `(flags, domid)` word below is little-endian (flags in the low half), as on x86-64.
#[cfg(not(target_endian = "little"))]
compile_error!("GrantEntries assumes a little-endian target (x86-64 Xen ABI)");

/// Pack `(flags, domid)` as the `u32` at offset 0 of an entry (little-endian: flags low).
const fn header(flags: u16, domid: DomId) -> u32 {
    (flags as u32) | ((domid as u32) << 16)
}

/// Unpack the `u32` at offset 0 of an entry into `(flags, domid)`.
#[allow(clippy::cast_possible_truncation)] // Deliberate: the two halves of the word.
const fn split_header(h: u32) -> (u16, DomId) {
    (h as u16, (h >> 16) as u16)
}

/// How often a compare-exchange loop retries before reporting an unstable entry (a peer that
/// keeps rewriting its entry must not make the hypervisor spin).
const CMPXCHG_RETRIES: usize = 16;

impl GrantEntries {
    /// A view of `len` entries starting at `base`.
    ///
    /// # Safety
    ///
    /// `base` must be 8-byte aligned and point to `len * 8` bytes that stay mapped readable
    /// and writable while this view or a copy of it is used, and that others access only
    /// atomically (or not at all).
    pub unsafe fn new(base: core::ptr::NonNull<u8>, len: u32) -> Self {
        debug_assert_eq!(base.as_ptr() as usize % 8, 0);
        Self { base, len }
    }

    /// Number of entries.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// Whether the table has no entries.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn entry_ptr(&self, gref: GrantRef) -> Result<*mut u8, GrantError> {
        if gref >= self.len {
            return Err(GrantError::OutOfRange(gref));
        }
        // SAFETY: gref < len, so the entry lies within the `len * 8` bytes of `new`'s contract.
        Ok(unsafe { self.base.as_ptr().add(gref as usize * 8) })
    }

    fn head(&self, gref: GrantRef) -> Result<&AtomicU32, GrantError> {
        // SAFETY: the entry is 8-aligned, mapped and only accessed atomically (`new`).
        self.entry_ptr(gref)
            .map(|p| unsafe { &*p.cast::<AtomicU32>() })
    }

    fn flags_atomic(&self, gref: GrantRef) -> Result<&AtomicU16, GrantError> {
        // SAFETY: as `head`; `flags` is the low half of the first word on little-endian x86-64.
        self.entry_ptr(gref)
            .map(|p| unsafe { &*p.cast::<AtomicU16>() })
    }

    fn domid_atomic(&self, gref: GrantRef) -> Result<&AtomicU16, GrantError> {
        // SAFETY: as `head`; `domid` is at byte 2 of the entry, 2-aligned.
        self.entry_ptr(gref)
            .map(|p| unsafe { &*p.add(2).cast::<AtomicU16>() })
    }

    fn frame_atomic(&self, gref: GrantRef) -> Result<&AtomicU32, GrantError> {
        // SAFETY: as `head`; `frame` is at byte 4 of the entry, 4-aligned.
        self.entry_ptr(gref)
            .map(|p| unsafe { &*p.add(4).cast::<AtomicU32>() })
    }

    /// A snapshot of entry `gref` (`flags`/`domid` read together, acquire, then `frame`).
    pub fn read(&self, gref: GrantRef) -> Result<GrantEntryV1, GrantError> {
        let (flags, domid) = split_header(self.head(gref)?.load(Ordering::Acquire));
        let frame = self.frame_atomic(gref)?.load(Ordering::Acquire);
        Ok(GrantEntryV1 {
            flags,
            domid,
            frame,
        })
    }

    /// `(flags, domid)` of entry `gref`, read as one word.
    pub fn header(&self, gref: GrantRef) -> Result<(u16, DomId), GrantError> {
        Ok(split_header(self.head(gref)?.load(Ordering::Acquire)))
    }

    /// The `frame` field of entry `gref`.
    pub fn frame(&self, gref: GrantRef) -> Result<u32, GrantError> {
        Ok(self.frame_atomic(gref)?.load(Ordering::Acquire))
    }

    /// Compare-exchange `(flags, domid)` of `gref` from `old` to `(new_flags, old.1)`; on
    /// failure returns the current `(flags, domid)`.
    pub fn compare_exchange_flags(
        &self,
        gref: GrantRef,
        old: (u16, DomId),
        new_flags: u16,
    ) -> Result<Result<(), (u16, DomId)>, GrantError> {
        let h = self.head(gref)?;
        // AcqRel: acquire pairs with the granter's release store of the flags (so the frame
        // read after a successful exchange is the granted one); release publishes our bits.
        Ok(h.compare_exchange(
            header(old.0, old.1),
            header(new_flags, old.1),
            Ordering::AcqRel,
            Ordering::Acquire,
        )
        .map(|_| ())
        .map_err(split_header))
    }

    /// Atomically clear `bits` in the flags of `gref`; returns the previous flags.
    pub fn clear_flags(&self, gref: GrantRef, bits: u16) -> Result<u16, GrantError> {
        Ok(self.flags_atomic(gref)?.fetch_and(!bits, Ordering::AcqRel))
    }

    /// Atomically set `bits` in the flags of `gref`; returns the previous flags.
    pub fn set_flags(&self, gref: GrantRef, bits: u16) -> Result<u16, GrantError> {
        Ok(self.flags_atomic(gref)?.fetch_or(bits, Ordering::AcqRel))
    }

    /// Write the `frame` field of `gref`.
    pub fn set_frame(&self, gref: GrantRef, frame: u32) -> Result<(), GrantError> {
        // Release: a later release store of the flags publishes it; Relaxed would do, but the
        // cost is nil and it keeps the frame ordered before any later flag change.
        self.frame_atomic(gref)?.store(frame, Ordering::Release);
        Ok(())
    }

    /// Fill entry `gref` and publish it: `domid` and `frame` first, then `flags` with release
    /// ordering, so whoever sees the flags sees the rest.
    pub fn publish(
        &self,
        gref: GrantRef,
        domid: DomId,
        frame: u32,
        flags: u16,
    ) -> Result<(), GrantError> {
        self.domid_atomic(gref)?.store(domid, Ordering::Relaxed);
        self.frame_atomic(gref)?.store(frame, Ordering::Relaxed);
        // Release: orders the domid/frame stores above before the flags that make them valid.
        self.flags_atomic(gref)?.store(flags, Ordering::Release);
        Ok(())
    }

    /// End access to `gref` with the in-use check: set its flags to 0 only if neither
    /// `GTF_reading` nor `GTF_writing` is set.
    pub fn end_access(&self, gref: GrantRef) -> Result<(), GrantError> {
        let f = self.flags_atomic(gref)?;
        let mut cur = f.load(Ordering::Acquire);
        for _ in 0..CMPXCHG_RETRIES {
            if cur & (GTF_READING | GTF_WRITING) != 0 {
                return Err(GrantError::InUse(gref));
            }
            // AcqRel: we own the entry again after this; later writes to it must not move up.
            match f.compare_exchange(cur, 0, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(()),
                Err(now) => cur = now,
            }
        }
        Err(GrantError::Unstable(gref))
    }

    /// End an accept-transfer grant: `Ok(None)` if no transfer started (the entry is cleared),
    /// `Ok(Some(frame))` if one completed (the entry is cleared), `TransferInProgress` if the
    /// peer committed but has not completed.
    pub fn end_transfer(&self, gref: GrantRef) -> Result<Option<u32>, GrantError> {
        let f = self.flags_atomic(gref)?;
        let mut cur = f.load(Ordering::Acquire);
        for _ in 0..CMPXCHG_RETRIES {
            if cur & GTF_TRANSFER_COMMITTED == 0 {
                match f.compare_exchange(cur, 0, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => return Ok(None),
                    Err(now) => {
                        cur = now;
                        continue;
                    }
                }
            }
            if cur & GTF_TRANSFER_COMPLETED == 0 {
                return Err(GrantError::TransferInProgress(gref));
            }
            // Acquire (the load above) pairs with the hypervisor's release store of
            // GTF_transfer_completed, so the frame read here is the final one.
            let frame = self.frame(gref)?;
            f.store(0, Ordering::Release);
            return Ok(Some(frame));
        }
        Err(GrantError::Unstable(gref))
    }
}

/// The granting side: hands out grant references from a free list over a [`GrantEntries`]
/// table (references below [`NR_RESERVED_ENTRIES`] are never handed out).
pub struct GrantAllocator {
    entries: GrantEntries,
    state: std::sync::Mutex<AllocState>,
}

struct AllocState {
    free: Vec<GrantRef>,
    used: Vec<bool>,
}

impl GrantAllocator {
    /// An allocator over `entries`, all of which must be unused (zero).
    pub fn new(entries: GrantEntries) -> Self {
        let free = (NR_RESERVED_ENTRIES..entries.len()).rev().collect();
        let used = vec![false; entries.len() as usize];
        Self {
            entries,
            state: std::sync::Mutex::new(AllocState { free, used }),
        }
    }

    /// An allocator over a table that may already hold live entries: the one a restarted
    /// process of a domain finds in its memory (the domain, its memory and its grants outlive
    /// the process).
    ///
    /// Every entry outside the reserved range whose flags are not zero (a type of
    /// `GTF_permit_access` or `GTF_accept_transfer`, or any bit the hypervisor set) is taken:
    /// it stays allocated, is never handed out again, and can be ended with
    /// [`GrantAllocator::end_access`] / [`GrantAllocator::end_transfer`] as if this allocator
    /// had made it. Entries with zero flags are free. The table belongs to this domain (the
    /// previous process was the same principal), so its contents are taken as they are; the
    /// hypervisor never trusts them either way.
    pub fn resume(entries: GrantEntries) -> Self {
        let n = entries.len();
        let mut used = vec![false; n as usize];
        let mut free = Vec::new();
        // Free list in descending order, so `pop` hands out the lowest free reference first,
        // as `new` does.
        for gref in (NR_RESERVED_ENTRIES..n).rev() {
            match entries.header(gref) {
                Ok((0, _)) => free.push(gref),
                _ => used[gref as usize] = true,
            }
        }
        Self {
            entries,
            state: std::sync::Mutex::new(AllocState { free, used }),
        }
    }

    /// The references this allocator holds (made by it or found live by
    /// [`GrantAllocator::resume`]) with a snapshot of their entries, ascending. A restarted
    /// process uses this to find what it granted before, e.g. the ring page's grant to its
    /// backend (`domid` = the backend, `frame` = the ring's shareable frame).
    pub fn live(&self) -> Vec<(GrantRef, GrantEntryV1)> {
        let refs: Vec<GrantRef> = {
            let st = self.lock();
            (0..self.entries.len())
                .filter(|&g| st.used.get(g as usize).copied().unwrap_or(false))
                .collect()
        };
        refs.into_iter()
            .filter_map(|g| self.entries.read(g).ok().map(|e| (g, e)))
            .collect()
    }

    /// The live access grant of `frame` to `domid`, if any (the lowest such reference).
    pub fn find_access(&self, domid: DomId, frame: u32) -> Option<GrantRef> {
        self.live()
            .into_iter()
            .find(|(_, e)| {
                e.flags & GTF_TYPE_MASK == GTF_PERMIT_ACCESS && e.domid == domid && e.frame == frame
            })
            .map(|(g, _)| g)
    }

    /// The table.
    pub fn entries(&self) -> &GrantEntries {
        &self.entries
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AllocState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn alloc(&self) -> Result<GrantRef, GrantError> {
        let mut st = self.lock();
        let gref = st.free.pop().ok_or(GrantError::Exhausted)?;
        st.used[gref as usize] = true;
        Ok(gref)
    }

    fn free(&self, gref: GrantRef) {
        let mut st = self.lock();
        st.used[gref as usize] = false;
        st.free.push(gref);
    }

    fn check_allocated(&self, gref: GrantRef) -> Result<(), GrantError> {
        let st = self.lock();
        match st.used.get(gref as usize) {
            None => Err(GrantError::OutOfRange(gref)),
            Some(false) => Err(GrantError::NotAllocated(gref)),
            Some(true) => Ok(()),
        }
    }

    /// Let `domid` map or copy `frame` (read-only if `readonly`).
    pub fn grant_access(
        &self,
        domid: DomId,
        frame: u32,
        readonly: bool,
    ) -> Result<GrantRef, GrantError> {
        let gref = self.alloc()?;
        let flags = GTF_PERMIT_ACCESS | if readonly { GTF_READONLY } else { 0 };
        self.entries.publish(gref, domid, frame, flags)?;
        Ok(gref)
    }

    /// Withdraw an access grant; fails with [`GrantError::InUse`] (the reference stays
    /// allocated and granted) while the peer maps, pins or copies it.
    pub fn end_access(&self, gref: GrantRef) -> Result<(), GrantError> {
        self.check_allocated(gref)?;
        self.entries.end_access(gref)?;
        self.free(gref);
        Ok(())
    }

    /// Offer to receive a page from `domid` into our `frame`.
    pub fn grant_transfer(&self, domid: DomId, frame: u32) -> Result<GrantRef, GrantError> {
        let gref = self.alloc()?;
        self.entries
            .publish(gref, domid, frame, GTF_ACCEPT_TRANSFER)?;
        Ok(gref)
    }

    /// End an accept-transfer grant: `Some(frame)` if a page arrived, `None` if not. The
    /// reference is freed unless a transfer is under way.
    pub fn end_transfer(&self, gref: GrantRef) -> Result<Option<u32>, GrantError> {
        self.check_allocated(gref)?;
        let got = self.entries.end_transfer(gref)?;
        self.free(gref);
        Ok(got)
    }

    /// References currently handed out.
    pub fn in_use(&self) -> usize {
        self.lock().used.iter().filter(|u| **u).count()
    }
}

/// What this module claims about Xen's `grant_table.h`.
pub fn abi_checks() -> Vec<crate::abi::AbiCheck> {
    use crate::abi::AbiCheck;
    let mut v = crate::abi_layout!(
        "grant_entry_v1_t",
        GrantEntryV1 {
            flags,
            domid,
            frame
        }
    );
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

#[cfg(test)]
mod tests {
    use super::*;
    use core::sync::atomic::AtomicU64;
    use proptest::prelude::*;

    struct Table(Box<[AtomicU64]>);

    impl Table {
        fn new(n: usize) -> Self {
            Table((0..n).map(|_| AtomicU64::new(0)).collect())
        }
        fn view(&self) -> GrantEntries {
            let p = core::ptr::NonNull::new(self.0.as_ptr() as *mut u8).unwrap();
            // SAFETY: n 8-byte atomics, alive for the test, only accessed atomically.
            unsafe { GrantEntries::new(p, u32::try_from(self.0.len()).unwrap()) }
        }
    }

    /// The hypervisor's acquire, as the core does it, for tests here.
    fn acquire(e: &GrantEntries, gref: GrantRef, who: DomId, write: bool) -> bool {
        let (f, d) = e.header(gref).unwrap();
        if f & GTF_TYPE_MASK != GTF_PERMIT_ACCESS || d != who || (write && f & GTF_READONLY != 0) {
            return false;
        }
        let add = GTF_READING | if write { GTF_WRITING } else { 0 };
        e.compare_exchange_flags(gref, (f, d), f | add)
            .unwrap()
            .is_ok()
    }

    #[test]
    fn layout_is_little_endian_flags_domid_frame() {
        let t = Table::new(16);
        let e = t.view();
        e.publish(9, 0x1234, 0xdead_beef, GTF_PERMIT_ACCESS | GTF_READONLY)
            .unwrap();
        assert_eq!(t.0[9].load(Ordering::SeqCst), 0xdead_beef_1234_0005);
        assert_eq!(
            e.read(9).unwrap(),
            GrantEntryV1 {
                flags: 5,
                domid: 0x1234,
                frame: 0xdead_beef
            }
        );
    }

    #[test]
    fn reserved_refs_are_never_handed_out() {
        let t = Table::new(12);
        let a = GrantAllocator::new(t.view());
        let mut got: Vec<_> = (0..4)
            .map(|_| a.grant_access(1, 7, false).unwrap())
            .collect();
        got.sort_unstable();
        assert_eq!(got, vec![8, 9, 10, 11]);
        assert_eq!(a.grant_access(1, 7, false), Err(GrantError::Exhausted));
        assert_eq!(a.end_access(3), Err(GrantError::NotAllocated(3)));
        assert_eq!(a.end_access(99), Err(GrantError::OutOfRange(99)));
    }

    #[test]
    fn end_access_fails_while_in_use() {
        let t = Table::new(16);
        let a = GrantAllocator::new(t.view());
        let g = a.grant_access(3, 42, false).unwrap();
        assert!(acquire(a.entries(), g, 3, true));
        assert_eq!(a.end_access(g), Err(GrantError::InUse(g)));
        a.entries().clear_flags(g, GTF_WRITING).unwrap();
        assert_eq!(a.end_access(g), Err(GrantError::InUse(g)));
        a.entries().clear_flags(g, GTF_READING).unwrap();
        a.end_access(g).unwrap();
        assert_eq!(a.entries().header(g).unwrap().0, 0);
        assert_eq!(a.end_access(g), Err(GrantError::NotAllocated(g)));
    }

    #[test]
    fn acquire_checks_domid_type_and_readonly() {
        let t = Table::new(16);
        let a = GrantAllocator::new(t.view());
        let g = a.grant_access(3, 42, true).unwrap();
        assert!(!acquire(a.entries(), g, 4, false), "wrong domid");
        assert!(
            !acquire(a.entries(), g, 3, true),
            "write to read-only grant"
        );
        assert!(acquire(a.entries(), g, 3, false));
        let t2 = a.grant_transfer(3, 50).unwrap();
        assert!(
            !acquire(a.entries(), t2, 3, false),
            "transfer grant is not access"
        );
        assert!(a.entries().read(100).is_err());
    }

    #[test]
    fn transfer_protocol() {
        let t = Table::new(16);
        let a = GrantAllocator::new(t.view());
        let g = a.grant_transfer(3, 50).unwrap();
        assert_eq!(a.end_transfer(g), Ok(None));
        let g = a.grant_transfer(3, 50).unwrap();
        a.entries().set_flags(g, GTF_TRANSFER_COMMITTED).unwrap();
        assert_eq!(a.end_transfer(g), Err(GrantError::TransferInProgress(g)));
        a.entries().set_frame(g, 77).unwrap();
        a.entries().set_flags(g, GTF_TRANSFER_COMPLETED).unwrap();
        assert_eq!(a.end_transfer(g), Ok(Some(77)));
        assert_eq!(a.in_use(), 0);
    }

    #[test]
    fn resume_keeps_live_entries_and_frees_the_rest() {
        let t = Table::new(16);
        let a = GrantAllocator::new(t.view());
        let g1 = a.grant_access(3, 40, false).unwrap();
        let g2 = a.grant_access(3, 41, true).unwrap();
        let g3 = a.grant_transfer(4, 42).unwrap();
        a.end_access(g2).unwrap();
        assert!(acquire(a.entries(), g1, 3, true));
        drop(a);
        // A restarted process of the same domain.
        let b = GrantAllocator::resume(t.view());
        assert_eq!(b.in_use(), 2);
        let live: Vec<GrantRef> = b.live().iter().map(|l| l.0).collect();
        assert_eq!(live, vec![g1, g3]);
        assert_eq!(b.find_access(3, 40), Some(g1));
        assert_eq!(b.find_access(3, 41), None);
        assert_eq!(b.find_access(4, 42), None, "a transfer grant is not access");
        // New grants never reuse a live reference.
        let fresh: Vec<GrantRef> = (0..6)
            .map(|_| b.grant_access(5, 50, false).unwrap())
            .collect();
        assert!(!fresh.contains(&g1) && !fresh.contains(&g3));
        assert_eq!(b.grant_access(5, 50, false), Err(GrantError::Exhausted));
        // Old grants end as usual: in use while the peer holds it, then free.
        assert_eq!(b.end_access(g1), Err(GrantError::InUse(g1)));
        a_release(b.entries(), g1);
        b.end_access(g1).unwrap();
        assert_eq!(b.end_transfer(g3), Ok(None));
        assert_eq!(b.in_use(), 6);
    }

    fn a_release(e: &GrantEntries, g: GrantRef) {
        e.clear_flags(g, GTF_READING | GTF_WRITING).unwrap();
    }

    #[test]
    fn resume_of_an_empty_table_is_new() {
        let t = Table::new(12);
        let b = GrantAllocator::resume(t.view());
        assert_eq!(b.in_use(), 0);
        assert_eq!(b.grant_access(1, 7, false), Ok(NR_RESERVED_ENTRIES));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Grant { ro: bool },
        End(usize),
        Acquire { idx: usize, write: bool },
        Release(usize),
    }

    proptest! {
        /// Random grant/end/acquire/release sequences against a model: a reference is never
        /// handed out twice, never ended while acquired, and acquisitions respect readonly.
        #[test]
        fn allocator_matches_model(ops in prop::collection::vec(prop_oneof![
            any::<bool>().prop_map(|ro| Op::Grant { ro }),
            (0usize..8).prop_map(Op::End),
            ((0usize..8), any::<bool>()).prop_map(|(idx, write)| Op::Acquire { idx, write }),
            (0usize..8).prop_map(Op::Release),
        ], 1..100)) {
            let t = Table::new(14);
            let a = GrantAllocator::new(t.view());
            // Model: granted refs with (readonly, readers, writers).
            let mut live: Vec<(GrantRef, bool, u32, u32)> = Vec::new();
            for op in ops {
                match op {
                    Op::Grant { ro } => match a.grant_access(5, 7, ro) {
                        Ok(g) => {
                            prop_assert!(g >= NR_RESERVED_ENTRIES);
                            prop_assert!(live.iter().all(|l| l.0 != g));
                            live.push((g, ro, 0, 0));
                        }
                        Err(e) => {
                            prop_assert_eq!(e, GrantError::Exhausted);
                            prop_assert_eq!(live.len(), 6);
                        }
                    },
                    Op::End(i) if i < live.len() => {
                        let (g, _, r, w) = live[i];
                        let res = a.end_access(g);
                        if r + w > 0 {
                            prop_assert_eq!(res, Err(GrantError::InUse(g)));
                        } else {
                            prop_assert_eq!(res, Ok(()));
                            live.remove(i);
                        }
                    }
                    Op::Acquire { idx, write } if idx < live.len() => {
                        let (g, ro, r, w) = live[idx];
                        // Reference counting lives in the hypervisor; the shared flags only
                        // say "some reader/writer", so set them on first use like it does.
                        let ok = if write && ro {
                            acquire(a.entries(), g, 5, true)
                        } else if r + w == 0 || (write && w == 0) {
                            acquire(a.entries(), g, 5, write)
                        } else {
                            true
                        };
                        prop_assert_eq!(ok, !(write && ro));
                        if ok {
                            live[idx] = (g, ro, r + u32::from(!write), w + u32::from(write));
                        }
                    }
                    Op::Release(i) if i < live.len() => {
                        let (g, ro, r, w) = live[i];
                        if w > 0 {
                            live[i] = (g, ro, r, w - 1);
                            if w == 1 { a.entries().clear_flags(g, GTF_WRITING).unwrap(); }
                        } else if r > 0 {
                            live[i] = (g, ro, r - 1, w);
                        }
                        let (_, _, r, w) = live[i];
                        if r + w == 0 { a.entries().clear_flags(g, GTF_READING).unwrap(); }
                    }
                    _ => {}
                }
            }
            prop_assert_eq!(a.in_use(), live.len());
        }
    }
}
