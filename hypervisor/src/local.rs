//! `LocalPlatform`: [`devchan::platform::Platform`] for a domain whose "process" is a thread
//! of domain 0 — the manager itself, and unit tests.
//!
//! It performs hypercalls by calling [`System`] directly and reaches its own memory directly
//! (its shared pages through the hypervisor's mappings, its RAM through `vm-memory`). Mappings
//! of peers' pages are real `mmap`s of the memfd `System::map_grant` returns (read-only
//! mappings are `PROT_READ` of a read-only file), exactly what a process domain gets.
//!
//! The guest-side grant allocator and event scan run over the domain's own grant-table and
//! `shared_info` pages, as in a process domain. At most one `LocalPlatform` may exist per
//! domain (two allocators over one table would hand out the same references).

use crate::domain::Domain;
use crate::memory::{layout, SharedPageMem};
use crate::system::{System, SystemError};
use devchan::grant::{DomId, GrantAllocator, GrantEntries, GrantError, GrantRef};
use devchan::platform::{
    Frame, GrantCopyOp, Platform, PlatformError, Port, Result, SharedPage, TransferMode,
};
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm_memory::mmap::MmapRegion;
use vm_memory::FileOffset;

/// A domain's in-process platform.
pub struct LocalPlatform {
    sys: Arc<System>,
    dom: Arc<Domain>,
    grants: GrantAllocator,
}

/// One of our shareable pages.
pub struct LocalPage {
    page: Arc<SharedPageMem>,
    frame: Frame,
}

impl SharedPage for LocalPage {
    fn as_ptr(&self) -> *mut u8 {
        self.page.as_ptr()
    }
    fn frame(&self) -> Frame {
        self.frame
    }
}

/// A peer's page mapped through a grant; unmapped (in the hypervisor too) on drop.
pub struct LocalMapping {
    map: MmapRegion,
    frame: Frame,
    handle: crate::grant_table::MapHandle,
    sys: Arc<System>,
    caller: DomId,
}

impl SharedPage for LocalMapping {
    fn as_ptr(&self) -> *mut u8 {
        self.map.as_ptr()
    }
    fn frame(&self) -> Frame {
        self.frame
    }
}

impl Drop for LocalMapping {
    fn drop(&mut self) {
        // The mmap itself goes with `self.map`; this ends the use in the granter's table. An
        // error means the hypervisor already dropped it (our domain is being destroyed).
        let _ = self.sys.unmap_grant(self.caller, self.handle);
    }
}

fn grant_err(e: GrantError) -> PlatformError {
    match e {
        GrantError::Exhausted => PlatformError::Exhausted("grant references"),
        GrantError::InUse(r) | GrantError::TransferInProgress(r) => PlatformError::GrantInUse(r),
        GrantError::OutOfRange(_) | GrantError::NotAllocated(_) | GrantError::Unstable(_) => {
            PlatformError::Grant(devchan::grant::status::BAD_GNTREF)
        }
    }
}

impl LocalPlatform {
    /// The platform of domain `dom`; fails if `dom` does not exist or already has a guest side.
    pub fn new(sys: Arc<System>, dom: DomId) -> std::result::Result<Self, SystemError> {
        let d = sys.domain(dom)?;
        if !d.claim_guest_side() {
            return Err(SystemError::Exhausted("guest sides of the domain"));
        }
        let base = NonNull::new(d.memory().ram_frame_ptr(layout::GRANT_TABLE_FRAME)?)
            .ok_or(SystemError::BadFrame(layout::GRANT_TABLE_FRAME))?;
        // SAFETY: the grant-table frames are 4 contiguous, page-aligned pages of the domain's
        // RAM mapping; `self.dom` keeps that mapping alive as long as the allocator (a field
        // of the same struct) exists; the hypervisor and the peer-facing code access it only
        // atomically.
        let entries = unsafe { GrantEntries::new(base, layout::NR_GRANT_ENTRIES) };
        Ok(Self {
            sys,
            dom: d,
            grants: GrantAllocator::new(entries),
        })
    }

    /// The system this platform calls.
    pub fn system(&self) -> &Arc<System> {
        &self.sys
    }

    /// Our domain.
    pub fn domain(&self) -> &Arc<Domain> {
        &self.dom
    }

    fn own_frame(&self, frame: Frame) -> Result<u32> {
        let ok = frame >= layout::FIRST_FREE_FRAME
            && (frame < self.dom.memory().nr_frames()
                || self.dom.memory().shared_page(frame).is_some());
        if !ok {
            return Err(PlatformError::BadFrame(frame));
        }
        u32::try_from(frame).map_err(|_| PlatformError::BadFrame(frame))
    }

    /// Wait until the upcall eventfd is readable or `deadline` passes.
    fn wait_upcall(&self, deadline: Option<Instant>) -> Result<bool> {
        let timeout_ms = match deadline {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                i32::try_from(left.as_millis().saturating_add(1)).unwrap_or(i32::MAX)
            }
        };
        let mut pfd = libc::pollfd {
            fd: self.dom.upcall().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(PlatformError::Link(e.to_string()));
        }
        Ok(n > 0)
    }
}

impl Platform for LocalPlatform {
    type Page = LocalPage;
    type Mapping = LocalMapping;

    fn domid(&self) -> DomId {
        self.dom.id()
    }

    fn alloc_shared_page(&self) -> Result<LocalPage> {
        let (frame, page) = self
            .dom
            .memory()
            .alloc_shared(&format!("{}-shared", self.dom.name()))
            .map_err(|e| PlatformError::from(SystemError::from(e)))?;
        Ok(LocalPage { page, frame })
    }

    fn grant_access(&self, peer: DomId, frame: Frame, readonly: bool) -> Result<GrantRef> {
        let f = self.own_frame(frame)?;
        self.grants
            .grant_access(peer, f, readonly)
            .map_err(grant_err)
    }

    fn end_access(&self, gref: GrantRef) -> Result<()> {
        self.grants.end_access(gref).map_err(grant_err)
    }

    fn accept_transfer(&self, peer: DomId, frame: Frame) -> Result<GrantRef> {
        let f = self.own_frame(frame)?;
        self.grants.grant_transfer(peer, f).map_err(grant_err)
    }

    fn end_transfer(&self, gref: GrantRef) -> Result<Option<Frame>> {
        Ok(self
            .grants
            .end_transfer(gref)
            .map_err(grant_err)?
            .map(Frame::from))
    }

    fn map_grant(&self, peer: DomId, gref: GrantRef, readonly: bool) -> Result<LocalMapping> {
        let me = self.dom.id();
        let (handle, file) = self.sys.map_grant(me, peer, gref, readonly)?;
        let unmap = |e: PlatformError| {
            let _ = self.sys.unmap_grant(me, handle);
            e
        };
        let (_, _, frame) = self
            .sys
            .mapping_info(me, handle)
            .map_err(|e| unmap(e.into()))?;
        let prot = if readonly {
            libc::PROT_READ
        } else {
            libc::PROT_READ | libc::PROT_WRITE
        };
        let map = MmapRegion::build(
            Some(FileOffset::new(file, 0)),
            layout::PAGE_SIZE,
            prot,
            libc::MAP_SHARED,
        )
        .map_err(|e| unmap(PlatformError::Link(e.to_string())))?;
        Ok(LocalMapping {
            map,
            frame,
            handle,
            sys: self.sys.clone(),
            caller: me,
        })
    }

    fn grant_copy(&self, ops: &[GrantCopyOp]) -> Result<Vec<i16>> {
        Ok(self.sys.grant_copy(self.dom.id(), ops))
    }

    fn pin_grant(&self, peer: DomId, gref: GrantRef, writable: bool) -> Result<u64> {
        Ok(self.sys.pin_grant(self.dom.id(), peer, gref, writable)?)
    }

    fn unpin_grant(&self, iova: u64) -> Result<()> {
        Ok(self.sys.unpin_grant(self.dom.id(), iova)?)
    }

    fn transfer(&self, frame: Frame, peer: DomId, gref: GrantRef) -> Result<TransferMode> {
        Ok(self.sys.transfer(self.dom.id(), frame, peer, gref)?)
    }

    fn read_local(&self, frame: Frame, offset: usize, buf: &mut [u8]) -> Result<()> {
        self.dom
            .memory()
            .read(frame, offset, buf)
            .map_err(|_| PlatformError::BadFrame(frame))
    }

    fn write_local(&self, frame: Frame, offset: usize, data: &[u8]) -> Result<()> {
        self.dom
            .memory()
            .write(frame, offset, data)
            .map_err(|_| PlatformError::BadFrame(frame))
    }

    fn evtchn_alloc_unbound(&self, remote: DomId) -> Result<Port> {
        Ok(self.sys.evtchn_alloc_unbound(self.dom.id(), remote)?)
    }

    fn evtchn_bind_interdomain(&self, remote: DomId, remote_port: Port) -> Result<Port> {
        Ok(self
            .sys
            .evtchn_bind_interdomain(self.dom.id(), remote, remote_port)?)
    }

    fn evtchn_notify(&self, port: Port) -> Result<()> {
        Ok(self.sys.evtchn_send(self.dom.id(), port)?)
    }

    fn evtchn_unmask(&self, port: Port) -> Result<()> {
        Ok(self.sys.evtchn_unmask(self.dom.id(), port)?)
    }

    fn evtchn_close(&self, port: Port) -> Result<()> {
        Ok(self.sys.evtchn_close(self.dom.id(), port)?)
    }

    fn evtchn_wait(&self, timeout: Option<Duration>) -> Result<Vec<Port>> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            // Drain the eventfd first, then scan: an upcall raised after the drain leaves the
            // eventfd readable, so the poll below cannot sleep through it.
            let _ = self.dom.upcall().read();
            let ports = self.dom.event_page().take_pending_masked();
            if !ports.is_empty() {
                return Ok(ports);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(PlatformError::TimedOut);
            }
            self.wait_upcall(deadline)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::DomainConfig;

    fn two() -> (LocalPlatform, LocalPlatform) {
        let sys = System::new();
        let cfg = |n: &str| DomainConfig {
            name: n.into(),
            nr_frames: 16,
            iommu: None,
        };
        let a = sys.create_domain(cfg("a")).unwrap();
        let b = sys.create_domain(cfg("b")).unwrap();
        (
            LocalPlatform::new(sys.clone(), a).unwrap(),
            LocalPlatform::new(sys, b).unwrap(),
        )
    }

    #[test]
    fn one_guest_side_per_domain() {
        let (a, _b) = two();
        assert!(LocalPlatform::new(a.system().clone(), a.domid()).is_err());
    }

    #[test]
    fn wait_times_out_and_wakes() {
        let (a, b) = two();
        let pa = a.evtchn_alloc_unbound(b.domid()).unwrap();
        let pb = b.evtchn_bind_interdomain(a.domid(), pa).unwrap();
        // The bind marks b's own port pending (lost-notification fix-up, as in Xen).
        assert_eq!(b.evtchn_wait(Some(Duration::ZERO)).unwrap(), vec![pb]);
        b.evtchn_unmask(pb).unwrap();
        assert_eq!(
            a.evtchn_wait(Some(Duration::from_millis(10))),
            Err(PlatformError::TimedOut)
        );
        b.evtchn_notify(pb).unwrap();
        assert_eq!(
            a.evtchn_wait(Some(Duration::from_secs(5))).unwrap(),
            vec![pa]
        );
    }

    #[test]
    fn mapping_and_local_access() {
        let (a, b) = two();
        let page = a.alloc_shared_page().unwrap();
        let g = a.grant_access(b.domid(), page.frame(), false).unwrap();
        let m = b.map_grant(a.domid(), g, false).unwrap();
        assert_eq!(m.frame(), page.frame());
        // SAFETY: both pointers are to live 4 KiB mappings of the same page; the test is the
        // only user.
        unsafe {
            m.as_ptr().write_volatile(42);
            assert_eq!(page.as_ptr().read_volatile(), 42);
        }
        assert_eq!(a.end_access(g), Err(PlatformError::GrantInUse(g)));
        drop(m);
        a.end_access(g).unwrap();
        assert!(
            a.grant_access(b.domid(), 3, false).is_err(),
            "platform frame"
        );
        assert!(a.grant_access(b.domid(), 1 << 40, false).is_err());
    }
}
