//! `System`: the trusted core's entry points, one per hypercall, shared as `Arc<System>`.
//!
//! Every method that performs a domain's hypercall takes the *calling* domain first and treats
//! every other argument as untrusted: a bad reference, port, frame or domain id becomes a
//! [`SystemError`] (or a per-operation `GNTST_*` status for grant copies), never a panic and
//! never an access to memory the caller was not granted.
//!
//! # Locking
//!
//! The domain table is an `RwLock` taken for reading on every call (lookups only); each domain
//! has its own locks (event-channel table, active grant table, holdings). No call holds two
//! domains' grant locks at once; the event-channel code locks two port tables in domain-id
//! order. The grant-copy hot path takes the granter's active-table lock twice (acquire, release)
//! and copies with no lock held.

use crate::domain::{Domain, DomainConfig, DomainState};
use crate::grant_table::{self, MapHandle, Revocation, TransferMode};
use crate::{evtchn, memory::layout};
use devchan::grant::{DomId, GrantRef, DOMID_SELF};
use devchan::platform::{Frame, GrantCopyOp, PlatformError, Port};
use std::collections::HashMap;
use std::fs::File;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Instant;

/// Why a hypercall failed.
#[derive(Debug, thiserror::Error)]
pub enum SystemError {
    /// No such domain, or the domain may not be named here.
    #[error("No such domain {0}")]
    NoSuchDomain(DomId),
    /// The domain is being destroyed.
    #[error("Domain {0} is dying")]
    Dying(DomId),
    /// A grant operation failed with this `GNTST_*` status.
    #[error("Grant operation failed with status {0}")]
    Grant(i16),
    /// The grant is still mapped, pinned or copied by its peer.
    #[error("Grant {0} is in use")]
    GrantInUse(GrantRef),
    /// No such port, or the port is not in a state that allows the operation.
    #[error("Bad event-channel port {0}")]
    BadPort(Port),
    /// A frame outside the domain's memory or unusable for the operation.
    #[error("Bad frame {0}")]
    BadFrame(Frame),
    /// A table or pool is full.
    #[error("Out of {0}")]
    Exhausted(&'static str),
    /// Creating or mapping domain memory failed.
    #[error("Domain memory")]
    Memory(#[from] crate::memory::MemoryError),
    /// Signalling or another OS operation failed.
    #[error("System call failed")]
    Io(#[from] std::io::Error),
}

/// Result of `System` calls.
pub type Result<T> = std::result::Result<T, SystemError>;

impl From<SystemError> for PlatformError {
    fn from(e: SystemError) -> Self {
        match e {
            SystemError::NoSuchDomain(d) | SystemError::Dying(d) => PlatformError::BadDomain(d),
            SystemError::Grant(s) => PlatformError::Grant(s),
            SystemError::GrantInUse(r) => PlatformError::GrantInUse(r),
            SystemError::BadPort(p) => PlatformError::BadPort(p),
            SystemError::BadFrame(f) => PlatformError::BadFrame(f),
            SystemError::Exhausted(w) => PlatformError::Exhausted(w),
            SystemError::Memory(m) => PlatformError::Link(m.to_string()),
            SystemError::Io(e) => PlatformError::Link(e.to_string()),
        }
    }
}

/// The trusted core: all domains and the operations between them.
pub struct System {
    domains: RwLock<Domains>,
}

struct Domains {
    live: HashMap<DomId, Arc<Domain>>,
    next_id: DomId,
}

impl System {
    /// An empty system. Domain 0 is created by the first `create_domain` call.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            domains: RwLock::new(Domains {
                live: HashMap::new(),
                next_id: 0,
            }),
        })
    }

    fn read(&self) -> RwLockReadGuard<'_, Domains> {
        self.domains.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Domains> {
        self.domains.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The live, not dying domain `dom`.
    pub(crate) fn lookup(&self, dom: DomId) -> Result<Arc<Domain>> {
        let d = self.lookup_any(dom)?;
        if d.state() == DomainState::Dying {
            return Err(SystemError::Dying(dom));
        }
        Ok(d)
    }

    /// Domain `dom` even while it is being destroyed (for releases and teardown).
    pub(crate) fn lookup_any(&self, dom: DomId) -> Result<Arc<Domain>> {
        self.read()
            .live
            .get(&dom)
            .cloned()
            .ok_or(SystemError::NoSuchDomain(dom))
    }

    /// Every domain in the table (a snapshot).
    pub(crate) fn all_domains(&self) -> Vec<Arc<Domain>> {
        self.read().live.values().cloned().collect()
    }

    /// Ids of the live domains, ascending.
    pub fn domain_ids(&self) -> Vec<DomId> {
        let mut v: Vec<DomId> = self.read().live.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Create a domain with zeroed memory; the first domain created gets id 0.
    pub fn create_domain(&self, cfg: DomainConfig) -> Result<DomId> {
        let mut t = self.write();
        let id = t.next_id;
        // Ids are never reused (a stale id held by a peer must not name a new domain), and
        // the reserved range from DOMID_FIRST_RESERVED (= DOMID_SELF) up is never handed out.
        if id >= DOMID_SELF {
            return Err(SystemError::Exhausted("domain ids"));
        }
        let d = Arc::new(Domain::new(id, cfg)?);
        t.next_id += 1;
        t.live.insert(id, d);
        Ok(id)
    }

    /// Destroy `dom`: close its ports, drop everything it holds (maps, pins, copies) and every
    /// use others hold of its grants (pins are removed from their IOMMUs; mappings of its
    /// shareable pages stay valid for the mapper, who keeps the page alive).
    pub fn destroy_domain(&self, dom: DomId) -> Result<()> {
        let d = self.lookup(dom)?;
        {
            // Under the holdings lock: `add_holding` checks the state under it.
            let _h = d.lock_holdings();
            d.set_state(DomainState::Dying);
        }
        evtchn::close_all(&d);
        grant_table::destroy(self, &d);
        self.write().live.remove(&dom);
        tracing::debug!(dom, "domain destroyed");
        Ok(())
    }

    /// Mark `dom` paused (the process layer stops serving its hypercalls).
    pub fn pause(&self, dom: DomId) -> Result<()> {
        let d = self.lookup(dom)?;
        d.set_state(DomainState::Paused);
        Ok(())
    }

    /// Mark `dom` running again.
    pub fn unpause(&self, dom: DomId) -> Result<()> {
        let d = self.lookup(dom)?;
        d.set_state(DomainState::Running);
        Ok(())
    }

    /// The live domain `dom`.
    pub fn domain(&self, dom: DomId) -> Result<Arc<Domain>> {
        self.lookup(dom)
    }

    /// Allocate a zeroed shareable page for `caller`: returns its frame (`>= nr_frames`) and
    /// the page's own memfd (for the caller's process to map).
    pub fn alloc_shared_page(&self, caller: DomId) -> Result<(Frame, File)> {
        let d = self.lookup(caller)?;
        let (frame, page) = d.memory().alloc_shared(&format!("{}-shared", d.name()))?;
        Ok((frame, page.reopen(false)?))
    }

    /// A new read-write file description of `caller`'s own shareable page `frame`: for a
    /// restarted process of the domain to map its pages again, and for a process to map a
    /// frame again after a transfer swapped the page behind it.
    pub fn shared_page_file(&self, caller: DomId, frame: Frame) -> Result<File> {
        let d = self.lookup(caller)?;
        let page = d
            .memory()
            .shared_page(frame)
            .ok_or(SystemError::BadFrame(frame))?;
        Ok(page.reopen(false)?)
    }

    /// The process of `dom` is gone (the caller saw it exit): release every grant mapping it
    /// held, since they went with its address space, so the granters can end those grants.
    /// The domain, its memory, its own grants, ports and DMA pins stay for a restarted
    /// process. Must not be called while a process of `dom` still runs (it could keep using
    /// pages whose grants were released). Returns how many mappings were released.
    pub fn release_mappings(&self, dom: DomId) -> Result<usize> {
        let d = self.lookup_any(dom)?;
        Ok(grant_table::release_mappings(self, &d))
    }

    /// Map `granter`'s grant `gref` for `caller`. Only shareable pages can be mapped
    /// (`GNTST_bad_page` otherwise). Returns a handle for `unmap_grant` and the page's memfd,
    /// opened read-only when `readonly` (a read-only mapper cannot map it writable).
    pub fn map_grant(
        &self,
        caller: DomId,
        granter: DomId,
        gref: GrantRef,
        readonly: bool,
    ) -> Result<(MapHandle, File)> {
        grant_table::map(self, caller, granter, gref, readonly)
    }

    /// The granter, reference and granter's frame behind `caller`'s mapping `handle`.
    pub fn mapping_info(
        &self,
        caller: DomId,
        handle: MapHandle,
    ) -> Result<(DomId, GrantRef, Frame)> {
        grant_table::mapped(self, caller, handle)
    }

    /// Drop a mapping made by `map_grant`.
    pub fn unmap_grant(&self, caller: DomId, handle: MapHandle) -> Result<()> {
        grant_table::unmap(self, caller, handle)
    }

    /// `GNTTABOP_copy`: run each op in order, one `GNTST_*` status per op. An op that fails
    /// does not stop the batch.
    pub fn grant_copy(&self, caller: DomId, ops: &[GrantCopyOp]) -> Vec<i16> {
        grant_table::copy(self, caller, ops)
    }

    /// Pin `granter`'s grant `gref` for device DMA by `caller`'s device: adds an entry to
    /// `caller`'s IOMMU and returns its IOVA.
    pub fn pin_grant(
        &self,
        caller: DomId,
        granter: DomId,
        gref: GrantRef,
        writable: bool,
    ) -> Result<u64> {
        grant_table::pin(self, caller, granter, gref, writable)
    }

    /// Undo a `pin_grant`.
    pub fn unpin_grant(&self, caller: DomId, iova: u64) -> Result<()> {
        grant_table::unpin(self, caller, iova)
    }

    /// `GNTTABOP_transfer`: give `caller`'s `frame` to `receiver` through `receiver`'s
    /// accept-transfer grant `gref`, whose `frame` field names the receiving frame. Swaps the
    /// two pages where both are shareable and unused (the caller gets the receiver's old page),
    /// copies the page otherwise; says which happened.
    pub fn transfer(
        &self,
        caller: DomId,
        frame: Frame,
        receiver: DomId,
        gref: GrantRef,
    ) -> Result<TransferMode> {
        grant_table::transfer(self, caller, frame, receiver, gref)
    }

    /// Allocate a port of `caller` that `remote` may bind to.
    pub fn evtchn_alloc_unbound(&self, caller: DomId, remote: DomId) -> Result<Port> {
        evtchn::alloc_unbound(self, caller, remote)
    }

    /// Bind a new port of `caller` to `remote`'s unbound `remote_port` (which must have been
    /// allocated for `caller`).
    pub fn evtchn_bind_interdomain(
        &self,
        caller: DomId,
        remote: DomId,
        remote_port: Port,
    ) -> Result<Port> {
        evtchn::bind_interdomain(self, caller, remote, remote_port)
    }

    /// Notify the other end of `caller`'s `port`: sets it pending in the peer's `shared_info`
    /// page and signals the peer's upcall eventfd if that raised an upcall.
    pub fn evtchn_send(&self, caller: DomId, port: Port) -> Result<()> {
        evtchn::send(self, caller, port)
    }

    /// Unmask `caller`'s `port`; if it was pending, raise the upcall again.
    pub fn evtchn_unmask(&self, caller: DomId, port: Port) -> Result<()> {
        evtchn::unmask(self, caller, port)
    }

    /// Close `caller`'s `port`; the peer's port becomes unbound (bindable by `caller` again).
    pub fn evtchn_close(&self, caller: DomId, port: Port) -> Result<()> {
        evtchn::close(self, caller, port)
    }

    /// Manager: every use of `granter`'s `gref` must end by `deadline`.
    /// Returns whether the reference had any use to put a deadline on.
    pub fn set_grant_deadline(
        &self,
        granter: DomId,
        gref: GrantRef,
        deadline: Instant,
    ) -> Result<bool> {
        let g = self.lookup_any(granter)?;
        if gref >= layout::NR_GRANT_ENTRIES {
            return Err(SystemError::Grant(devchan::grant::status::BAD_GNTREF));
        }
        Ok(grant_table::set_grant_deadline(&g, gref, deadline))
    }

    /// Manager: every grant `holder` uses must be released by `deadline`.
    pub fn set_holder_deadline(&self, holder: DomId, deadline: Instant) -> Result<()> {
        let h = self.lookup_any(holder)?;
        grant_table::set_holder_deadline(&h, deadline);
        Ok(())
    }

    /// Enforce the deadlines that have passed: drop overdue pins and copies, and report
    /// overdue mappings, which cannot be forced back (the manager destroys their holder).
    pub fn revoke_overdue(&self) -> Vec<Revocation> {
        grant_table::revoke_overdue(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(n: &str) -> DomainConfig {
        DomainConfig {
            name: n.into(),
            nr_frames: layout::MIN_FRAMES,
            iommu: None,
        }
    }

    #[test]
    fn ids_start_at_zero_and_are_not_reused() {
        let sys = System::new();
        assert_eq!(sys.create_domain(cfg("dom0")).unwrap(), 0);
        assert_eq!(sys.create_domain(cfg("a")).unwrap(), 1);
        sys.destroy_domain(1).unwrap();
        assert_eq!(sys.create_domain(cfg("b")).unwrap(), 2);
        assert_eq!(sys.domain_ids(), vec![0, 2]);
        assert!(matches!(sys.domain(1), Err(SystemError::NoSuchDomain(1))));
    }

    #[test]
    fn bad_memory_size_is_an_error() {
        let sys = System::new();
        let r = sys.create_domain(DomainConfig {
            name: "x".into(),
            nr_frames: 3,
            iommu: None,
        });
        assert!(matches!(r, Err(SystemError::Memory(_))));
        assert!(sys.domain_ids().is_empty());
    }

    #[test]
    fn pause_unpause_and_dying_is_final() {
        let sys = System::new();
        let d = sys.create_domain(cfg("a")).unwrap();
        sys.pause(d).unwrap();
        assert_eq!(sys.domain(d).unwrap().state(), DomainState::Paused);
        sys.unpause(d).unwrap();
        let dom = sys.domain(d).unwrap();
        assert_eq!(dom.state(), DomainState::Running);
        sys.destroy_domain(d).unwrap();
        assert_eq!(dom.state(), DomainState::Dying);
        dom.set_state(DomainState::Running);
        assert_eq!(dom.state(), DomainState::Dying);
        assert!(sys.pause(d).is_err());
    }

    #[test]
    fn shared_pages_come_with_their_memfd() {
        let sys = System::new();
        let d = sys.create_domain(cfg("a")).unwrap();
        let (frame, file) = sys.alloc_shared_page(d).unwrap();
        assert_eq!(frame, layout::MIN_FRAMES);
        std::os::unix::fs::FileExt::write_at(&file, b"x", 0).unwrap();
        let mut b = [0u8];
        sys.domain(d)
            .unwrap()
            .memory()
            .read(frame, 0, &mut b)
            .unwrap();
        assert_eq!(&b, b"x");
        assert!(file.set_len(0).is_err(), "sealed");
    }

    #[test]
    fn errors_map_to_platform_errors() {
        assert_eq!(
            PlatformError::from(SystemError::BadPort(3)),
            PlatformError::BadPort(3)
        );
        assert_eq!(
            PlatformError::from(SystemError::Grant(-3)),
            PlatformError::Grant(-3)
        );
        assert_eq!(
            PlatformError::from(SystemError::Dying(4)),
            PlatformError::BadDomain(4)
        );
    }
}
