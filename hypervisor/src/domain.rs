//! A domain: id, name, lifecycle state, memory, upcall eventfd, event-channel table, and its
//! active grant table (the uses others hold of its grants) plus what it holds of others'.
//!
//! The domain's `shared_info` page (frame 0) and grant-table pages (frames 1..=4) live in its
//! own memory; [`Domain::event_page`] and [`Domain::grant_entries`] are the hypervisor's atomic
//! views of them, borrowed from the domain so they cannot outlive its memory.

use crate::evtchn::PortTable;
use crate::grant_table::{ActiveGrantTable, Holdings};
use crate::memory::{layout, DomainMemory, MemoryError};
use devchan::evtchn::EventPage;
use devchan::grant::{DomId, GrantEntries};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// What `System::create_domain` needs.
#[derive(Clone, Default)]
pub struct DomainConfig {
    /// Human-readable name (for logs and memfd names).
    pub name: String,
    /// Frames of RAM, including the fixed frames of `memory::layout`.
    pub nr_frames: u64,
    /// The IOMMU of the domain's device, if it drives one (where `pin_grant` puts entries).
    pub iommu: Option<Arc<iospace::iommu::Iommu>>,
}

/// Lifecycle state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DomainState {
    /// Running: its hypercalls are served.
    Running,
    /// Paused by the manager (the process layer stops serving its hypercalls).
    Paused,
    /// Being destroyed: calls naming it fail.
    Dying,
}

/// One domain.
pub struct Domain {
    id: DomId,
    name: String,
    state: Mutex<DomainState>,
    memory: Arc<DomainMemory>,
    upcall: EventFd,
    iommu: Option<Arc<iospace::iommu::Iommu>>,
    events: EventPage,
    grants: GrantEntries,
    ports: Mutex<PortTable>,
    active: Mutex<ActiveGrantTable>,
    holdings: Mutex<Holdings>,
    guest_side: std::sync::atomic::AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a domain lock leaves plain bookkeeping behind, still consistent
    // enough to tear the domain down: do not propagate the poison.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Domain {
    pub(crate) fn new(id: DomId, cfg: DomainConfig) -> Result<Self, crate::system::SystemError> {
        let memory = Arc::new(DomainMemory::new(&cfg.name, cfg.nr_frames)?);
        let oob = |frame| MemoryError::OutOfRange {
            frame,
            offset: 0,
            len: layout::PAGE_SIZE,
        };
        let si = NonNull::new(memory.ram_frame_ptr(layout::SHARED_INFO_FRAME)?)
            .ok_or(oob(layout::SHARED_INFO_FRAME))?;
        let gt = NonNull::new(memory.ram_frame_ptr(layout::GRANT_TABLE_FRAME)?)
            .ok_or(oob(layout::GRANT_TABLE_FRAME))?;
        // SAFETY: frame 0 is a page-aligned page of the domain's RAM mapping, which `memory`
        // keeps mapped for the domain's lifetime; the view lives in the same struct and is
        // only lent out by reference. Others (the domain's process) access it atomically per
        // the 2-level ABI.
        let events = unsafe { EventPage::new(si) };
        // SAFETY: frames 1..=4 are contiguous in the single RAM mapping (nr_frames >=
        // MIN_FRAMES), page-aligned, kept mapped by `memory` as above; 2048 entries of 8 bytes
        // are exactly those 4 pages.
        let grants = unsafe { GrantEntries::new(gt, layout::NR_GRANT_ENTRIES) };
        Ok(Self {
            id,
            name: cfg.name,
            state: Mutex::new(DomainState::Running),
            memory,
            upcall: EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            iommu: cfg.iommu,
            events,
            grants,
            ports: Mutex::new(PortTable::default()),
            active: Mutex::new(ActiveGrantTable::default()),
            holdings: Mutex::new(Holdings::default()),
            guest_side: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Its id.
    pub fn id(&self) -> DomId {
        self.id
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its lifecycle state.
    pub fn state(&self) -> DomainState {
        *lock(&self.state)
    }

    /// Change state; a dying domain stays dying.
    pub(crate) fn set_state(&self, s: DomainState) {
        let mut st = lock(&self.state);
        if *st != DomainState::Dying {
            *st = s;
        }
    }

    /// Its memory (RAM memfd for the child process, shareable pages).
    pub fn memory(&self) -> &Arc<DomainMemory> {
        &self.memory
    }

    /// The eventfd signalled when an upcall is raised (an event became pending while
    /// unmasked). Non-blocking; each signal adds 1 to its counter.
    pub fn upcall(&self) -> &EventFd {
        &self.upcall
    }

    /// The IOMMU of its device, if any.
    pub fn iommu(&self) -> Option<&Arc<iospace::iommu::Iommu>> {
        self.iommu.as_ref()
    }

    /// The event-channel state in its `shared_info` page.
    pub fn event_page(&self) -> &EventPage {
        &self.events
    }

    /// Its shared grant table (frames 1..=4).
    pub fn grant_entries(&self) -> &GrantEntries {
        &self.grants
    }

    /// Signal its upcall eventfd.
    pub(crate) fn kick(&self) {
        // Only fails if the counter would overflow, i.e. the domain has ~2^64 unread
        // signals: it is awake anyway.
        let _ = self.upcall.write(1);
    }

    pub(crate) fn lock_active(&self) -> MutexGuard<'_, ActiveGrantTable> {
        lock(&self.active)
    }

    pub(crate) fn lock_holdings(&self) -> MutexGuard<'_, Holdings> {
        lock(&self.holdings)
    }

    pub(crate) fn lock_ports(&self) -> MutexGuard<'_, PortTable> {
        lock(&self.ports)
    }

    /// How many of its grant references others are using (mapped, pinned or being copied).
    pub fn grants_in_use(&self) -> usize {
        self.lock_active().len()
    }

    /// Claim the domain's guest side (its grant allocator and event scan): true the first
    /// time only.
    pub fn claim_guest_side(&self) -> bool {
        !self
            .guest_side
            .swap(true, std::sync::atomic::Ordering::AcqRel)
    }

    /// Record a holding unless the domain is dying (then false: the caller undoes the use).
    /// The state is checked under the holdings lock, which `destroy` takes after marking the
    /// domain dying, so no holding is added after destroy emptied them.
    pub(crate) fn add_holding(&self, f: impl FnOnce(&mut Holdings)) -> bool {
        let mut h = self.lock_holdings();
        if self.state() == DomainState::Dying {
            return false;
        }
        f(&mut h);
        true
    }
}
