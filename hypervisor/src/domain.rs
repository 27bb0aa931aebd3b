//! A domain: id, name, lifecycle state, memory, upcall eventfd, event-channel table, and its
//! active grant table (the uses others hold of its grants) plus what it holds of others'.

use crate::evtchn::PortTable;
use crate::grant_table::{ActiveGrantTable, Holdings};
use crate::memory::DomainMemory;
use devchan::grant::DomId;
use std::sync::{Arc, Mutex};
use vmm_sys_util::eventfd::EventFd;

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
    /// Paused by the manager.
    Paused,
    /// Being destroyed: every call naming it fails.
    Dying,
}

/// One domain.
pub struct Domain {
    pub(crate) id: DomId,
    pub(crate) name: String,
    pub(crate) state: Mutex<DomainState>,
    pub(crate) memory: Arc<DomainMemory>,
    pub(crate) upcall: EventFd,
    pub(crate) iommu: Option<Arc<iospace::iommu::Iommu>>,
    pub(crate) ports: Mutex<PortTable>,
    pub(crate) active: Mutex<ActiveGrantTable>,
    pub(crate) holdings: Mutex<Holdings>,
}

impl Domain {
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
        *self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Its memory (RAM memfd for the child process, shareable pages).
    pub fn memory(&self) -> &Arc<DomainMemory> {
        &self.memory
    }

    /// The eventfd signalled when an upcall is raised (an event became pending and unmasked).
    pub fn upcall(&self) -> &EventFd {
        &self.upcall
    }

    /// The IOMMU of its device, if any.
    pub fn iommu(&self) -> Option<&Arc<iospace::iommu::Iommu>> {
        self.iommu.as_ref()
    }
}
