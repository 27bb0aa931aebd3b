//! Grant-table enforcement: the active grant table, map/copy/pin/transfer, revocation.
//!
//! # The active grant table
//!
//! The shared grant table (in the granting domain's memory, [`devchan::grant::GrantEntries`])
//! says what a domain *offers*; the active grant table (here, per granting domain, private to
//! the hypervisor) records what is *in use*: for each reference with at least one use, who
//! holds it, the frame resolved at the first use, and each use: mappings (by handle), DMA pins
//! (by IOVA), and copies in progress (counted).
//!
//! The first use of a reference checks the shared entry — type `GTF_permit_access`, `domid`
//! equal to the user, not `GTF_readonly` for a write — and sets `GTF_reading` (and
//! `GTF_writing` for a write use) in one compare-exchange of `(flags, domid)`; then it reads the
//! frame. The first write use of an entry already in use adds `GTF_writing` the same way. When
//! the last write use ends `GTF_writing` is cleared, when the last use ends `GTF_reading` is
//! cleared and the active entry is dropped. Since the granter's end-access only succeeds while
//! both bits are clear, it cannot reuse a reference (or its page) while it is in use.
//!
//! Statuses follow Xen: a reference outside the table is `GNTST_bad_gntref`; an entry of the
//! wrong type, for another domain, or read-only for a write use is `GNTST_general_error`; a
//! frame that is not the granter's, or one of its platform frames (below `FIRST_FREE_FRAME`),
//! or a RAM frame for a mapping, is `GNTST_bad_page`; a copy crossing a page is
//! `GNTST_bad_copy_arg`.
//!
//! # Locking
//!
//! All of a granter's active entries are behind one mutex (`Domain::active`), held only for
//! bookkeeping, never while copying bytes. Holders record their maps and pins in their own
//! `Domain::holdings`; no code holds the active lock of one domain and the holdings lock of
//! another at once. IOMMU locks are leaves.
//!
//! # Revocation
//!
//! The manager sets a deadline on a `(granter, ref)` or on a holder. `System::revoke_overdue` then
//! removes overdue pins from the holder's IOMMU (so no DMA reaches the page any more), drops
//! overdue copies' use counts (their late release is ignored, by epoch), and reports overdue
//! mappings, which cannot be taken back from a process: the manager destroys their holder.

use crate::domain::{Domain, DomainState};
use crate::memory::{layout, PageRef};
use crate::system::{Result, System, SystemError};
use devchan::grant::{
    status, DomId, GrantEntries, GrantRef, DOMID_SELF, GTF_ACCEPT_TRANSFER, GTF_PERMIT_ACCESS,
    GTF_READING, GTF_READONLY, GTF_TRANSFER_COMMITTED, GTF_TRANSFER_COMPLETED, GTF_TYPE_MASK,
    GTF_WRITING,
};
use devchan::platform::{CopyPtr, Frame, GrantCopyOp};
use iospace::iommu::{DmaPage, Iommu, IommuEntry};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

pub use devchan::platform::TransferMode;

/// A mapping made by `System::map_grant`, for `unmap_grant`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MapHandle(pub u64);

/// One use of a grant forcibly ended (or found unrevocable) by `System::revoke_overdue`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revocation {
    /// The granting domain.
    pub granter: DomId,
    /// Its reference.
    pub gref: GrantRef,
    /// The domain that held the use.
    pub holder: DomId,
    /// What was revoked.
    pub kind: RevokedUse,
}

/// The kind of use revoked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RevokedUse {
    /// A DMA pin: its IOMMU entry was removed.
    Pin {
        /// The IOVA that no longer translates.
        iova: u64,
    },
    /// Copies in progress: their use counts were dropped.
    Copy,
    /// A mapping: cannot be forced back from a process; the manager must destroy the holder.
    Unrevocable {
        /// The mapping.
        handle: MapHandle,
    },
}

/// A page pinned for DMA, as the IOMMU sees it.
struct PinnedPage(PageRef);

impl DmaPage for PinnedPage {
    fn read(&self, offset: usize, buf: &mut [u8]) {
        // The IOMMU only passes in-page ranges; a failure would be an IOMMU bug, and then
        // reading nothing is the safe outcome.
        if let Ok(s) = self.0.slice(offset, buf.len()) {
            s.copy_to(buf);
        }
    }
    fn write(&self, offset: usize, data: &[u8]) {
        if let Ok(s) = self.0.slice(offset, data.len()) {
            s.copy_from(data);
        }
    }
}

/// A DMA pin held on an active entry.
struct PinUse {
    iova: u64,
    writable: bool,
    iommu: Arc<Iommu>,
}

/// One in-use reference of a granting domain.
struct ActiveEntry {
    holder: DomId,
    frame: Frame,
    page: PageRef,
    maps: Vec<(MapHandle, bool)>,
    pins: Vec<PinUse>,
    copies_ro: u32,
    copies_rw: u32,
    /// Copies acquired under another epoch were revoked; their release is ignored.
    copy_epoch: u64,
    deadline: Option<Instant>,
}

impl ActiveEntry {
    fn writers(&self) -> usize {
        self.maps.iter().filter(|m| m.1).count()
            + self.pins.iter().filter(|p| p.writable).count()
            + self.copies_rw as usize
    }
    fn uses(&self) -> usize {
        self.maps.len() + self.pins.len() + (self.copies_ro + self.copies_rw) as usize
    }
}

/// The uses others hold of one domain's grants.
#[derive(Default)]
pub struct ActiveGrantTable {
    entries: HashMap<GrantRef, ActiveEntry>,
}

impl ActiveGrantTable {
    /// References with at least one use.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no reference is in use.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn uses_frame(&self, frame: Frame) -> bool {
        self.entries.values().any(|a| a.frame == frame)
    }
}

/// A mapping a domain holds.
#[derive(Clone, Copy)]
struct MapRec {
    granter: DomId,
    gref: GrantRef,
    frame: Frame,
}

/// A pin a domain holds.
#[derive(Clone, Copy)]
struct PinRec {
    granter: DomId,
    gref: GrantRef,
}

/// The maps and pins one domain holds of others' grants.
#[derive(Default)]
pub struct Holdings {
    maps: HashMap<MapHandle, MapRec>,
    pins: HashMap<u64, PinRec>,
    deadline: Option<Instant>,
}

/// Source of copy epochs and map handles (unique across the process, so a stale epoch never
/// matches a new entry).
static COUNTER: AtomicU64 = AtomicU64::new(1);

fn next_id() -> u64 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// What a use is, for acquire/release.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Use {
    Map(MapHandle),
    Pin,
    Copy,
}

/// A successful acquisition.
struct Acquired {
    page: PageRef,
    frame: Frame,
    copy_epoch: u64,
}

/// The granter's shared grant table.
fn shared_table(d: &Domain) -> &GrantEntries {
    d.grant_entries()
}

/// Set `GTF_reading` (and `GTF_writing`) in `granter`'s shared entry after checking it offers
/// `holder` the access. Returns the frame it names.
fn set_status(
    d: &Domain,
    gref: GrantRef,
    holder: DomId,
    write: bool,
) -> std::result::Result<u32, i16> {
    let table = shared_table(d);
    let mut cur = table.header(gref).map_err(|_| status::BAD_GNTREF)?;
    // A granter rewriting its entry in a loop must not keep us here: give up after a few tries.
    for _ in 0..4 {
        let (flags, domid) = cur;
        if flags & GTF_TYPE_MASK != GTF_PERMIT_ACCESS || domid != holder {
            return Err(status::GENERAL_ERROR);
        }
        if write && flags & GTF_READONLY != 0 {
            return Err(status::GENERAL_ERROR);
        }
        let new = flags | GTF_READING | if write { GTF_WRITING } else { 0 };
        match table.compare_exchange_flags(gref, cur, new) {
            Ok(Ok(())) => return table.frame(gref).map_err(|_| status::BAD_GNTREF),
            Ok(Err(now)) => cur = now,
            Err(_) => return Err(status::BAD_GNTREF),
        }
    }
    Err(status::GENERAL_ERROR)
}

/// Bring the shared flags of `gref` in line with its active entry; drop the entry if unused.
fn settle(d: &Domain, active: &mut ActiveGrantTable, gref: GrantRef) {
    let table = shared_table(d);
    let Some(act) = active.entries.get(&gref) else {
        return;
    };
    if act.writers() == 0 {
        let _ = table.clear_flags(gref, GTF_WRITING);
    }
    if act.uses() == 0 {
        let _ = table.clear_flags(gref, GTF_READING);
        active.entries.remove(&gref);
    }
}

/// Take a use of `granter`'s `gref` for `holder`. `need_shared`: the use is a mapping, which
/// only shareable pages allow.
fn acquire(
    granter: &Domain,
    gref: GrantRef,
    holder: DomId,
    write: bool,
    what: Use,
    need_shared: bool,
) -> std::result::Result<Acquired, i16> {
    if gref >= layout::NR_GRANT_ENTRIES {
        return Err(status::BAD_GNTREF);
    }
    let mut active = granter.lock_active();
    // Checked under the lock: destroy_domain marks the domain dying before it empties this
    // table, so nothing is added after it was emptied.
    if granter.state() == DomainState::Dying {
        return Err(status::BAD_DOMAIN);
    }
    if let Some(act) = active.entries.get(&gref) {
        if act.holder != holder {
            return Err(status::GENERAL_ERROR);
        }
        let shared = act.page.is_shared();
        if write && act.writers() == 0 {
            set_status(granter, gref, holder, true)?;
        }
        if need_shared && !shared {
            // Drops the GTF_writing just added, if no other write use exists.
            settle(granter, &mut active, gref);
            return Err(status::BAD_PAGE);
        }
    } else {
        let frame = Frame::from(set_status(granter, gref, holder, write)?);
        let page = if frame < layout::FIRST_FREE_FRAME {
            Err(status::BAD_PAGE)
        } else {
            granter.memory().page(frame).map_err(|_| status::BAD_PAGE)
        };
        let page = match page {
            Ok(p) if need_shared && !p.is_shared() => Err(status::BAD_PAGE),
            other => other,
        };
        let page = match page {
            Ok(p) => p,
            Err(e) => {
                // Undo the bits we just set: no other use exists.
                let _ = shared_table(granter).clear_flags(gref, GTF_READING | GTF_WRITING);
                return Err(e);
            }
        };
        active.entries.insert(
            gref,
            ActiveEntry {
                holder,
                frame,
                page,
                maps: Vec::new(),
                pins: Vec::new(),
                copies_ro: 0,
                copies_rw: 0,
                copy_epoch: next_id(),
                deadline: None,
            },
        );
    }
    let act = active.entries.get_mut(&gref).ok_or(status::GENERAL_ERROR)?;
    match what {
        Use::Map(h) => act.maps.push((h, write)),
        Use::Copy if write => act.copies_rw += 1,
        Use::Copy => act.copies_ro += 1,
        // The pin is recorded by `pin` once the IOMMU entry exists; until then a copy-like
        // count keeps the entry alive.
        Use::Pin if write => act.copies_rw += 1,
        Use::Pin => act.copies_ro += 1,
    }
    let got = Acquired {
        page: act.page.clone(),
        frame: act.frame,
        copy_epoch: act.copy_epoch,
    };
    Ok(got)
}

/// End a copy-counted use taken under `epoch` (ignored if revoked meanwhile).
fn release_count(granter: &Domain, gref: GrantRef, write: bool, epoch: u64) {
    let mut active = granter.lock_active();
    if let Some(act) = active.entries.get_mut(&gref) {
        if act.copy_epoch == epoch {
            let c = if write {
                &mut act.copies_rw
            } else {
                &mut act.copies_ro
            };
            *c = c.saturating_sub(1);
        }
    }
    settle(granter, &mut active, gref);
}

/// Resolve a domain named in an operation (`DOMID_SELF` is the caller).
fn resolve(sys: &System, caller: &Arc<Domain>, dom: DomId) -> Option<Arc<Domain>> {
    if dom == DOMID_SELF || dom == caller.id() {
        Some(caller.clone())
    } else {
        sys.lookup(dom).ok()
    }
}

/// `System::map_grant`.
pub(crate) fn map(
    sys: &System,
    caller: DomId,
    granter: DomId,
    gref: GrantRef,
    readonly: bool,
) -> Result<(MapHandle, std::fs::File)> {
    let me = sys.lookup(caller)?;
    let g = resolve(sys, &me, granter).ok_or(SystemError::Grant(status::BAD_DOMAIN))?;
    let handle = MapHandle(next_id());
    let got =
        acquire(&g, gref, caller, !readonly, Use::Map(handle), true).map_err(SystemError::Grant)?;
    let file = match &got.page {
        PageRef::Shared(p) => p.reopen(readonly),
        PageRef::Ram { .. } => Err(std::io::Error::other("not shareable")),
    };
    let file = match file {
        Ok(f) => f,
        Err(e) => {
            release_map(&g, gref, handle);
            return Err(e.into());
        }
    };
    let rec = MapRec {
        granter: g.id(),
        gref,
        frame: got.frame,
    };
    if !me.add_holding(|h| {
        h.maps.insert(handle, rec);
    }) {
        release_map(&g, gref, handle);
        return Err(SystemError::Dying(caller));
    }
    Ok((handle, file))
}

fn release_map(granter: &Domain, gref: GrantRef, handle: MapHandle) {
    let mut active = granter.lock_active();
    if let Some(act) = active.entries.get_mut(&gref) {
        act.maps.retain(|m| m.0 != handle);
    }
    settle(granter, &mut active, gref);
}

/// `System::unmap_grant`.
pub(crate) fn unmap(sys: &System, caller: DomId, handle: MapHandle) -> Result<()> {
    let me = sys.lookup_any(caller)?;
    let rec = me
        .lock_holdings()
        .maps
        .remove(&handle)
        .ok_or(SystemError::Grant(status::BAD_HANDLE))?;
    // A granter that is gone has already dropped its active table.
    if let Ok(g) = sys.lookup_any(rec.granter) {
        release_map(&g, rec.gref, handle);
    }
    Ok(())
}

/// The granter's frame behind a mapping `caller` holds.
pub(crate) fn mapped(
    sys: &System,
    caller: DomId,
    handle: MapHandle,
) -> Result<(DomId, GrantRef, Frame)> {
    let me = sys.lookup_any(caller)?;
    let h = me.lock_holdings();
    let rec = h
        .maps
        .get(&handle)
        .ok_or(SystemError::Grant(status::BAD_HANDLE))?;
    Ok((rec.granter, rec.gref, rec.frame))
}

/// One side of a copy, resolved and acquired.
struct CopySide {
    page: PageRef,
    offset: usize,
    /// For a grant: the granter, the reference and the copy epoch, to release.
    grant: Option<(Arc<Domain>, GrantRef, u64)>,
}

fn copy_side(
    sys: &System,
    me: &Arc<Domain>,
    ptr: CopyPtr,
    write: bool,
) -> std::result::Result<CopySide, i16> {
    match ptr {
        CopyPtr::Local { frame, offset } => {
            let page = me.memory().page(frame).map_err(|_| status::BAD_PAGE)?;
            Ok(CopySide {
                page,
                offset: usize::from(offset),
                grant: None,
            })
        }
        CopyPtr::Grant {
            domid,
            gref,
            offset,
        } => {
            let g = resolve(sys, me, domid).ok_or(status::BAD_DOMAIN)?;
            let got = acquire(&g, gref, me.id(), write, Use::Copy, false)?;
            Ok(CopySide {
                page: got.page,
                offset: usize::from(offset),
                grant: Some((g, gref, got.copy_epoch)),
            })
        }
    }
}

fn release_side(side: CopySide, write: bool) {
    if let Some((g, gref, epoch)) = side.grant {
        release_count(&g, gref, write, epoch);
    }
}

fn copy_one(sys: &System, me: &Arc<Domain>, op: &GrantCopyOp) -> i16 {
    let len = usize::from(op.len);
    let off = |p: &CopyPtr| match p {
        CopyPtr::Grant { offset, .. } | CopyPtr::Local { offset, .. } => usize::from(*offset),
    };
    if off(&op.src) + len > layout::PAGE_SIZE || off(&op.dst) + len > layout::PAGE_SIZE {
        return status::BAD_COPY_ARG;
    }
    let src = match copy_side(sys, me, op.src, false) {
        Ok(s) => s,
        Err(e) => return e,
    };
    let dst = match copy_side(sys, me, op.dst, true) {
        Ok(d) => d,
        Err(e) => {
            release_side(src, false);
            return e;
        }
    };
    let st = match (
        src.page.slice(src.offset, len),
        dst.page.slice(dst.offset, len),
    ) {
        (Ok(s), Ok(d)) => {
            s.copy_to_volatile_slice(d);
            status::OKAY
        }
        _ => status::BAD_COPY_ARG,
    };
    release_side(src, false);
    release_side(dst, true);
    st
}

/// `System::grant_copy`.
pub(crate) fn copy(sys: &System, caller: DomId, ops: &[GrantCopyOp]) -> Vec<i16> {
    match sys.lookup(caller) {
        Ok(me) => ops.iter().map(|op| copy_one(sys, &me, op)).collect(),
        Err(_) => vec![status::BAD_DOMAIN; ops.len()],
    }
}

/// `System::pin_grant`.
pub(crate) fn pin(
    sys: &System,
    caller: DomId,
    granter: DomId,
    gref: GrantRef,
    writable: bool,
) -> Result<u64> {
    let me = sys.lookup(caller)?;
    let iommu = me
        .iommu()
        .cloned()
        .ok_or(SystemError::Grant(status::PERMISSION_DENIED))?;
    let g = resolve(sys, &me, granter).ok_or(SystemError::Grant(status::BAD_DOMAIN))?;
    let got = acquire(&g, gref, caller, writable, Use::Pin, false).map_err(SystemError::Grant)?;
    let entry = IommuEntry {
        domain: g.id(),
        frame: got.frame,
        writable,
        page: Arc::new(PinnedPage(got.page.clone())),
    };
    let iova = match iommu.map(entry) {
        Ok(i) => i,
        Err(_) => {
            release_count(&g, gref, writable, got.copy_epoch);
            return Err(SystemError::Grant(status::NO_DEVICE_SPACE));
        }
    };
    // Turn the provisional count into a recorded pin, unless revoked meanwhile.
    {
        let mut active = g.lock_active();
        let ok = match active.entries.get_mut(&gref) {
            Some(act) if act.copy_epoch == got.copy_epoch => {
                let c = if writable {
                    &mut act.copies_rw
                } else {
                    &mut act.copies_ro
                };
                *c = c.saturating_sub(1);
                act.pins.push(PinUse {
                    iova,
                    writable,
                    iommu: iommu.clone(),
                });
                true
            }
            _ => false,
        };
        if !ok {
            let _ = iommu.unmap(iova);
            settle(&g, &mut active, gref);
            return Err(SystemError::Grant(status::GENERAL_ERROR));
        }
    }
    if !me.add_holding(|h| {
        h.pins.insert(
            iova,
            PinRec {
                granter: g.id(),
                gref,
            },
        );
    }) {
        drop_pin(&g, gref, iova);
        return Err(SystemError::Dying(caller));
    }
    Ok(iova)
}

/// Remove pin `iova` from `granter`'s entry `gref` and from its IOMMU.
fn drop_pin(granter: &Domain, gref: GrantRef, iova: u64) {
    let mut active = granter.lock_active();
    if let Some(act) = active.entries.get_mut(&gref) {
        if let Some(i) = act.pins.iter().position(|p| p.iova == iova) {
            let p = act.pins.swap_remove(i);
            // Unmapped before the flags are settled: no DMA after the granter may reuse it.
            let _ = p.iommu.unmap(iova);
        }
    }
    settle(granter, &mut active, gref);
}

/// `System::unpin_grant`.
pub(crate) fn unpin(sys: &System, caller: DomId, iova: u64) -> Result<()> {
    let me = sys.lookup_any(caller)?;
    let rec = me
        .lock_holdings()
        .pins
        .remove(&iova)
        .ok_or(SystemError::Grant(status::BAD_DEV_ADDR))?;
    match sys.lookup_any(rec.granter) {
        Ok(g) => drop_pin(&g, rec.gref, iova),
        // Granter gone: its destruction removed the IOMMU entry already; make sure.
        Err(_) => {
            if let Some(io) = me.iommu() {
                let _ = io.unmap(iova);
            }
        }
    }
    Ok(())
}

/// `System::transfer`.
pub(crate) fn transfer(
    sys: &System,
    caller: DomId,
    frame: Frame,
    receiver: DomId,
    gref: GrantRef,
) -> Result<TransferMode> {
    let me = sys.lookup(caller)?;
    let rx = resolve(sys, &me, receiver).ok_or(SystemError::Grant(status::BAD_DOMAIN))?;
    if gref >= layout::NR_GRANT_ENTRIES {
        return Err(SystemError::Grant(status::BAD_GNTREF));
    }
    if frame < layout::FIRST_FREE_FRAME {
        return Err(SystemError::Grant(status::BAD_PAGE));
    }
    let src = me
        .memory()
        .page(frame)
        .map_err(|_| SystemError::Grant(status::BAD_PAGE))?;
    if me.lock_active().uses_frame(frame) {
        // Others map, pin or copy the page we would give away.
        return Err(SystemError::Grant(status::BAD_PAGE));
    }
    // Commit: the entry must accept a transfer from us and not be committed yet.
    let table = rx.grant_entries();
    let (flags, domid) = table
        .header(gref)
        .map_err(|_| SystemError::Grant(status::BAD_GNTREF))?;
    if flags & GTF_TYPE_MASK != GTF_ACCEPT_TRANSFER
        || flags & GTF_TRANSFER_COMMITTED != 0
        || domid != caller
    {
        return Err(SystemError::Grant(status::GENERAL_ERROR));
    }
    match table.compare_exchange_flags(gref, (flags, domid), flags | GTF_TRANSFER_COMMITTED) {
        Ok(Ok(())) => {}
        _ => return Err(SystemError::Grant(status::GENERAL_ERROR)),
    }
    let uncommit = |st: i16| {
        let _ = table.clear_flags(gref, GTF_TRANSFER_COMMITTED);
        SystemError::Grant(st)
    };
    let dst_frame = Frame::from(
        table
            .frame(gref)
            .map_err(|_| uncommit(status::BAD_GNTREF))?,
    );
    if dst_frame < layout::FIRST_FREE_FRAME || rx.lock_active().uses_frame(dst_frame) {
        return Err(uncommit(status::BAD_PAGE));
    }
    let dst = rx
        .memory()
        .page(dst_frame)
        .map_err(|_| uncommit(status::BAD_PAGE))?;
    let both_shared = src.is_shared() && dst.is_shared();
    // Our own handles would make the pages look in use to the swap.
    drop((src, dst));
    let remapped = both_shared
        && crate::memory::DomainMemory::swap_shared(me.memory(), frame, rx.memory(), dst_frame);
    let mode = if remapped {
        TransferMode::Remapped
    } else {
        let src = me
            .memory()
            .page(frame)
            .map_err(|_| uncommit(status::BAD_PAGE))?;
        let dst = rx
            .memory()
            .page(dst_frame)
            .map_err(|_| uncommit(status::BAD_PAGE))?;
        match (
            src.slice(0, layout::PAGE_SIZE),
            dst.slice(0, layout::PAGE_SIZE),
        ) {
            (Ok(s), Ok(d)) => s.copy_to_volatile_slice(d),
            _ => return Err(uncommit(status::BAD_PAGE)),
        }
        TransferMode::Copied
    };
    // The frame field already names the receiving frame; completing publishes the page (the
    // release in set_flags orders our writes to it before the flag).
    let _ = table.set_frame(gref, u32::try_from(dst_frame).unwrap_or(u32::MAX));
    let _ = table.set_flags(gref, GTF_TRANSFER_COMPLETED);
    Ok(mode)
}

/// Manager: deadline for every use of `granter`'s `gref`; false if it has no use.
pub(crate) fn set_grant_deadline(granter: &Domain, gref: GrantRef, deadline: Instant) -> bool {
    match granter.lock_active().entries.get_mut(&gref) {
        Some(act) => {
            act.deadline = Some(deadline);
            true
        }
        None => false,
    }
}

/// Manager: deadline for every use `holder` holds.
pub(crate) fn set_holder_deadline(holder: &Domain, deadline: Instant) {
    holder.lock_holdings().deadline = Some(deadline);
}

/// Force off the revocable uses of one active entry (pins: IOMMU entries removed; copies:
/// counts dropped under a new epoch); report them and the mappings that remain.
fn strip(
    granter: &Domain,
    active: &mut ActiveGrantTable,
    gref: GrantRef,
    out: &mut Vec<Revocation>,
) {
    let Some(act) = active.entries.get_mut(&gref) else {
        return;
    };
    let holder = act.holder;
    let rec = |kind| Revocation {
        granter: granter.id(),
        gref,
        holder,
        kind,
    };
    for p in act.pins.drain(..) {
        // Removed from the IOMMU before the shared flags are cleared in `settle`.
        let _ = p.iommu.unmap(p.iova);
        out.push(rec(RevokedUse::Pin { iova: p.iova }));
    }
    if act.copies_ro + act.copies_rw > 0 {
        act.copies_ro = 0;
        act.copies_rw = 0;
        act.copy_epoch = next_id();
        out.push(rec(RevokedUse::Copy));
    }
    for (handle, _) in &act.maps {
        out.push(rec(RevokedUse::Unrevocable { handle: *handle }));
    }
    act.deadline = None;
    settle(granter, active, gref);
}

/// Forget the pin records that `revs` revoked from their holders' holdings.
fn forget_pins(sys: &System, revs: &[Revocation]) {
    for r in revs {
        if let RevokedUse::Pin { iova } = r.kind {
            if let Ok(h) = sys.lookup_any(r.holder) {
                let mut hold = h.lock_holdings();
                if hold
                    .pins
                    .get(&iova)
                    .is_some_and(|p| p.granter == r.granter && p.gref == r.gref)
                {
                    hold.pins.remove(&iova);
                }
            }
        }
    }
}

/// `System::revoke_overdue`.
pub(crate) fn revoke_overdue(sys: &System) -> Vec<Revocation> {
    let now = Instant::now();
    let domains = sys.all_domains();
    let overdue_holders: Vec<DomId> = domains
        .iter()
        .filter(|d| d.lock_holdings().deadline.is_some_and(|t| t <= now))
        .map(|d| d.id())
        .collect();
    let mut out = Vec::new();
    for g in &domains {
        let mut active = g.lock_active();
        let due: Vec<GrantRef> = active
            .entries
            .iter()
            .filter(|(_, a)| {
                a.deadline.is_some_and(|t| t <= now) || overdue_holders.contains(&a.holder)
            })
            .map(|(r, _)| *r)
            .collect();
        for gref in due {
            strip(g, &mut active, gref, &mut out);
        }
    }
    forget_pins(sys, &out);
    for d in &domains {
        if overdue_holders.contains(&d.id()) {
            d.lock_holdings().deadline = None;
        }
    }
    out
}

/// `System::release_mappings`: drop every mapping `d` holds (its process is gone, and the
/// mappings with its address space). Pins stay: they belong to the domain's device, not to
/// the process. Returns how many mappings were released.
pub(crate) fn release_mappings(sys: &System, d: &Domain) -> usize {
    let maps = std::mem::take(&mut d.lock_holdings().maps);
    let n = maps.len();
    for (handle, m) in maps {
        if let Ok(g) = sys.lookup_any(m.granter) {
            release_map(&g, m.gref, handle);
        }
    }
    n
}

/// Part of `System::destroy_domain` for `d` (already marked dying and out of the table):
/// release what it holds of others' grants, and strip every use others hold of its grants.
pub(crate) fn destroy(sys: &System, d: &Domain) {
    let held = std::mem::take(&mut *d.lock_holdings());
    for (handle, m) in held.maps {
        if let Ok(g) = sys.lookup_any(m.granter) {
            release_map(&g, m.gref, handle);
        }
    }
    for (iova, p) in held.pins {
        match sys.lookup_any(p.granter) {
            Ok(g) => drop_pin(&g, p.gref, iova),
            Err(_) => {
                if let Some(io) = d.iommu() {
                    let _ = io.unmap(iova);
                }
            }
        }
    }
    let mut out = Vec::new();
    {
        let mut active = d.lock_active();
        let refs: Vec<GrantRef> = active.entries.keys().copied().collect();
        for gref in refs {
            strip(d, &mut active, gref, &mut out);
        }
        // Mappings of its shareable pages stay valid for their holders (they keep the page
        // alive); nothing more can be acquired since the domain is dying.
        active.entries.clear();
    }
    forget_pins(sys, &out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::DomainConfig;

    fn setup() -> (Arc<System>, Arc<Domain>, Arc<Domain>) {
        let sys = System::new();
        let cfg = |n: &str| DomainConfig {
            name: n.into(),
            nr_frames: 16,
            iommu: None,
        };
        let a = sys.create_domain(cfg("a")).unwrap();
        let b = sys.create_domain(cfg("b")).unwrap();
        let (da, db) = (sys.domain(a).unwrap(), sys.domain(b).unwrap());
        (sys, da, db)
    }

    #[test]
    fn copy_in_progress_is_revoked_and_its_late_release_ignored() {
        let (sys, a, b) = setup();
        a.grant_entries()
            .publish(9, b.id(), 10, GTF_PERMIT_ACCESS)
            .unwrap();
        // A copy that has acquired and not yet released (as if it were mid-memcpy).
        let got = acquire(&a, 9, b.id(), true, Use::Copy, false).unwrap();
        assert_eq!(
            a.grant_entries().header(9).unwrap().0,
            GTF_PERMIT_ACCESS | GTF_READING | GTF_WRITING
        );
        assert!(set_grant_deadline(&a, 9, Instant::now()));
        let rev = revoke_overdue(&sys);
        assert_eq!(
            rev,
            vec![Revocation {
                granter: a.id(),
                gref: 9,
                holder: b.id(),
                kind: RevokedUse::Copy
            }]
        );
        assert_eq!(a.grant_entries().header(9).unwrap().0, GTF_PERMIT_ACCESS);
        // A new copy starts a new entry; the old copy's release must not end it.
        let again = acquire(&a, 9, b.id(), false, Use::Copy, false).unwrap();
        release_count(&a, 9, true, got.copy_epoch);
        assert_eq!(a.lock_active().len(), 1);
        release_count(&a, 9, false, again.copy_epoch);
        assert!(a.lock_active().is_empty());
        assert!(a.grant_entries().end_access(9).is_ok());
    }

    #[test]
    fn second_writer_adds_writing_and_last_writer_clears_it() {
        let (_sys, a, b) = setup();
        a.grant_entries()
            .publish(9, b.id(), 10, GTF_PERMIT_ACCESS)
            .unwrap();
        let r = acquire(&a, 9, b.id(), false, Use::Copy, false).unwrap();
        assert_eq!(a.grant_entries().header(9).unwrap().0 & GTF_WRITING, 0);
        let w = acquire(&a, 9, b.id(), true, Use::Copy, false).unwrap();
        assert_eq!(
            a.grant_entries().header(9).unwrap().0 & GTF_WRITING,
            GTF_WRITING
        );
        release_count(&a, 9, true, w.copy_epoch);
        assert_eq!(
            a.grant_entries().header(9).unwrap().0,
            GTF_PERMIT_ACCESS | GTF_READING
        );
        release_count(&a, 9, false, r.copy_epoch);
        assert_eq!(a.grant_entries().header(9).unwrap().0, GTF_PERMIT_ACCESS);
    }

    #[test]
    fn in_use_entry_is_bound_to_its_holder_and_frame() {
        let (sys, a, b) = setup();
        let c = sys
            .domain(
                sys.create_domain(DomainConfig {
                    name: "c".into(),
                    nr_frames: 16,
                    iommu: None,
                })
                .unwrap(),
            )
            .unwrap();
        a.grant_entries()
            .publish(9, b.id(), 10, GTF_PERMIT_ACCESS)
            .unwrap();
        let got = acquire(&a, 9, b.id(), false, Use::Copy, false).unwrap();
        // The granter rewrites its entry while in use: the use keeps the frame it resolved,
        // and another domain named in the rewritten entry still cannot use it.
        a.grant_entries()
            .publish(9, c.id(), 11, GTF_PERMIT_ACCESS | GTF_READING)
            .unwrap();
        assert_eq!(
            acquire(&a, 9, c.id(), false, Use::Copy, false).err(),
            Some(status::GENERAL_ERROR)
        );
        let again = acquire(&a, 9, b.id(), false, Use::Copy, false).unwrap();
        assert_eq!((got.frame, again.frame), (10, 10));
    }

    #[test]
    fn dying_granter_grants_nothing() {
        let (_sys, a, b) = setup();
        a.grant_entries()
            .publish(9, b.id(), 10, GTF_PERMIT_ACCESS)
            .unwrap();
        a.set_state(DomainState::Dying);
        assert_eq!(
            acquire(&a, 9, b.id(), false, Use::Copy, false).err(),
            Some(status::BAD_DOMAIN)
        );
        assert_eq!(a.grant_entries().header(9).unwrap().0, GTF_PERMIT_ACCESS);
    }
}
