//! [`XenPlatform`]: `devchan::platform::Platform` for a userspace backend in a Xen domain.
//!
//! | trait operation | on Xen |
//! |---|---|
//! | `domid` | given (dom0: 0; read from XenStore `domid` by the program) |
//! | `map_grant` | `/dev/xen/gntdev` map + `mmap`, unmapped on drop ([`crate::gntdev`]) |
//! | `grant_copy` | `IOCTL_GNTDEV_GRANT_COPY`; our side is a frame of [`LocalMemory`] |
//! | `pin_grant` / `unpin_grant` | a gntdev mapping entered in a software IOMMU (below) |
//! | `read_local` / `write_local` | [`LocalMemory`], a tmpfs file that outlives the process |
//! | `evtchn_*` | `/dev/xen/evtchn` ([`crate::evtchn`]) |
//! | `grant_access`, `end_access` to *ourselves* | a local handle on a frame of [`LocalMemory`] (below) |
//! | `alloc_shared_page`; `grant_access` to another domain | not provided: [`PlatformError::Link`] |
//! | `accept_transfer`, `end_transfer`, `transfer` | not provided: [`PlatformError::Link`] |
//!
//! # What an IOVA is here
//!
//! A backend process in dom0 drives no hardware behind an IOMMU: its "device" is code in the
//! same process (idd-blk's `FileDevice`, or an emulated virtio-blk device), and that code
//! reaches memory only through an [`iospace::iommu::IommuDevice`]. So the platform keeps one
//! software [`Iommu`] ([`XenPlatform::dma`] hands the device its view): `pin_grant` maps the
//! guest's page through gntdev and enters that mapping in the IOMMU; the returned IOVA is the
//! entry's. The device's DMA reaches the guest page through the mapping, and nothing else of
//! the process can be named by an IOVA (but our own frames we grant ourselves, below). The
//! entry's `frame` is the grant reference (the guest's frame number is not visible to a
//! backend).
//!
//! # Persistent grants (blkif `feature-persistent`)
//!
//! Mapping a grant is a hypercall plus page-table work; Linux's blkfront, when the backend
//! offers `feature-persistent` and it agrees, reuses a fixed pool of granted pages and never
//! revokes them while connected. With [`XenPlatform::set_persistent`] on, an unpinned grant
//! stays mapped (and in the IOMMU, under the same IOVA) so the next pin of the same
//! `(domain, gref)` costs a table lookup. At most `max_persistent` grants stay mapped; beyond
//! that, the least recently used unpinned one is unmapped. With it off (a frontend without
//! persistent grants revokes each grant after the response), an unpinned grant is unmapped at
//! once, as the frontend's `gnttab_end_foreign_access` requires. A persistent entry mapped
//! writable serves read-only pins too, so the device may write a page the guest granted
//! writable even for a write request: the same trust Linux's blkback gives its persistent
//! grants.
//!
//! # Granting our own pages
//!
//! A driver gives its device DMA access to its *own* pages (a virtqueue, a receive pool) the
//! way it does for a guest's: `grant_access` to its own domain id, then `pin_grant` of that
//! grant (idd-blk's virtio driver and idd-net's pool do this). Here such a self-grant is a
//! local handle on a frame of [`LocalMemory`], and pinning it enters that page in the same
//! IOMMU; no hypervisor grant exists (nothing outside this process can use it). `end_access`
//! refuses while the handle is pinned ([`PlatformError::GrantInUse`]).
//!
//! Granting to *another* domain is not provided: backends map and copy the frontend's pages
//! (rings and data pages are the frontend's); it would need `/dev/xen/gntalloc`. Page exchange
//! (`GNTTABOP_transfer`) is not available to a Linux userspace process at all (and Linux's
//! netfront only uses copy: `feature-rx-copy`). These fail with a [`PlatformError::Link`]
//! that says so.

use crate::evtchn::Evtchn;
use crate::gntdev::{CopySeg, CopySide, GntMapping, Gntdev};
use crate::memory::LocalMemory;
use crate::pins::PinCache;
pub use crate::pins::PinStats;
use devchan::grant::{status, DomId, GrantRef};
use devchan::platform::{
    CopyPtr, Frame, GrantCopyOp, Platform, PlatformError, Port, Result, SharedPage, TransferMode,
};
use iospace::iommu::{DmaPage, Iommu, IommuDevice};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use vm_memory::volatile_memory::VolatileSlice;

/// Linux blkback's default `max_persistent_grants`.
pub const DEFAULT_MAX_PERSISTENT: usize = 1056;

/// A page we cannot have: backends on Xen do not allocate grantable pages (see the module docs).
#[derive(Debug)]
pub enum NoPage {}

impl SharedPage for NoPage {
    fn as_ptr(&self) -> *mut u8 {
        match *self {}
    }
    fn frame(&self) -> Frame {
        match *self {}
    }
}

/// A peer's page mapped through gntdev (the ring).
#[derive(Debug)]
pub struct XenMapping(GntMapping);

impl SharedPage for XenMapping {
    fn as_ptr(&self) -> *mut u8 {
        self.0.as_ptr()
    }
    /// The grant reference (a backend cannot see the granter's frame number).
    fn frame(&self) -> Frame {
        Frame::from(self.0.gref())
    }
}

/// A gntdev mapping as the IOMMU's page: volatile copies only (the guest may change it).
struct GrantDma(GntMapping);

impl DmaPage for GrantDma {
    fn read(&self, offset: usize, buf: &mut [u8]) {
        // The IOMMU checked that offset + len lies within the page.
        // SAFETY: the mapping is one live page owned by `self`; the range is within it.
        let s = unsafe { VolatileSlice::new(self.0.as_ptr().add(offset), buf.len()) };
        s.copy_to(buf);
    }
    fn write(&self, offset: usize, data: &[u8]) {
        // The IOMMU refuses writes to entries not marked writable, and only writable
        // mappings are entered as writable.
        // SAFETY: as in `read`; the page is mapped writable.
        let s = unsafe { VolatileSlice::new(self.0.as_ptr().add(offset), data.len()) };
        s.copy_from(data);
    }
}

/// One of our own frames as the IOMMU's page (a pinned self-grant).
struct LocalDma {
    memory: Arc<LocalMemory>,
    frame: Frame,
}

impl DmaPage for LocalDma {
    fn read(&self, offset: usize, buf: &mut [u8]) {
        // The frame was checked at grant time and the IOMMU keeps offset + len in the page.
        let _ = self.memory.read(self.frame, offset, buf);
    }
    fn write(&self, offset: usize, data: &[u8]) {
        let _ = self.memory.write(self.frame, offset, data);
    }
}

/// Our grants to ourselves: handle → (frame, read-only).
#[derive(Debug, Default)]
struct SelfGrants {
    by_ref: HashMap<GrantRef, (Frame, bool)>,
    next: GrantRef,
}

/// The platform on Xen's userspace devices.
pub struct XenPlatform {
    domid: DomId,
    gntdev: Gntdev,
    evtchn: Evtchn,
    memory: Arc<LocalMemory>,
    iommu: Arc<Iommu>,
    self_grants: Mutex<SelfGrants>,
    pins: PinCache,
    persistent: AtomicBool,
}

impl std::fmt::Debug for XenPlatform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XenPlatform")
            .field("domid", &self.domid)
            .field("pins", &self.pin_stats())
            .finish_non_exhaustive()
    }
}

fn unsupported(what: &str) -> PlatformError {
    PlatformError::Link(format!(
        "{what} is not available to a userspace backend on Xen (backends map and copy the \
         frontend's grants; they never grant or exchange pages)"
    ))
}

fn link(e: impl std::error::Error) -> PlatformError {
    PlatformError::Link(link_text(&e))
}

impl XenPlatform {
    /// A platform for domain `domid` over the opened devices and memory, keeping at most
    /// `max_persistent` grants mapped for DMA (the IOMMU has room for twice that plus 64).
    pub fn new(
        domid: DomId,
        gntdev: Gntdev,
        evtchn: Evtchn,
        memory: LocalMemory,
        max_persistent: usize,
    ) -> Self {
        let max_persistent = max_persistent.max(1);
        // Room for every persistent mapping plus as many pinned beyond them.
        let iommu = Iommu::new(2 * max_persistent as u64 + 64);
        Self {
            domid,
            gntdev,
            evtchn,
            memory: Arc::new(memory),
            self_grants: Mutex::new(SelfGrants::default()),
            pins: PinCache::new(iommu.clone(), max_persistent),
            iommu,
            persistent: AtomicBool::new(false),
        }
    }

    /// The device's view of the IOMMU (what the in-process device does DMA through).
    pub fn dma(&self) -> IommuDevice {
        self.iommu.device()
    }

    /// Keep unpinned grants mapped (the frontend uses persistent grants) or not.
    pub fn set_persistent(&self, on: bool) {
        self.persistent.store(on, Ordering::Relaxed);
        if !on {
            self.pins.drop_idle();
        }
    }

    /// Counters of the pin cache.
    pub fn pin_stats(&self) -> PinStats {
        self.pins.stats()
    }

    fn self_grants(&self) -> MutexGuard<'_, SelfGrants> {
        self.self_grants.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Platform for XenPlatform {
    type Page = NoPage;
    type Mapping = XenMapping;

    fn domid(&self) -> DomId {
        self.domid
    }

    fn alloc_shared_page(&self) -> Result<NoPage> {
        Err(unsupported("allocating a grantable page (gntalloc)"))
    }

    fn grant_access(&self, peer: DomId, frame: Frame, readonly: bool) -> Result<GrantRef> {
        if peer != self.domid {
            return Err(unsupported(
                "granting our memory to another domain (gntalloc)",
            ));
        }
        if frame >= self.memory.frames() {
            return Err(PlatformError::BadFrame(frame));
        }
        let mut g = self.self_grants();
        if g.by_ref.len() >= 4096 {
            return Err(PlatformError::Exhausted("grants to ourselves"));
        }
        // Handles start at 1 and skip any still in use after a wrap.
        let gref = loop {
            g.next = g.next.wrapping_add(1).max(1);
            if !g.by_ref.contains_key(&g.next) {
                break g.next;
            }
        };
        g.by_ref.insert(gref, (frame, readonly));
        Ok(gref)
    }

    fn end_access(&self, gref: GrantRef) -> Result<()> {
        let mut g = self.self_grants();
        if !g.by_ref.contains_key(&gref) {
            return Err(PlatformError::Grant(status::BAD_GNTREF));
        }
        if !self.pins.forget(self.domid, gref) {
            return Err(PlatformError::GrantInUse(gref));
        }
        g.by_ref.remove(&gref);
        Ok(())
    }

    fn accept_transfer(&self, _peer: DomId, _frame: Frame) -> Result<GrantRef> {
        Err(unsupported("page transfer (GNTTABOP_transfer)"))
    }

    fn end_transfer(&self, _gref: GrantRef) -> Result<Option<Frame>> {
        Err(unsupported("page transfer (GNTTABOP_transfer)"))
    }

    fn map_grant(&self, peer: DomId, gref: GrantRef, readonly: bool) -> Result<XenMapping> {
        self.gntdev
            .map(peer, gref, !readonly)
            .map(XenMapping)
            .map_err(|e| {
                tracing::warn!(peer, gref, error = %link_text(&e), "grant map failed");
                PlatformError::Grant(status::GENERAL_ERROR)
            })
    }

    fn grant_copy(&self, ops: &[GrantCopyOp]) -> Result<Vec<i16>> {
        // Local sides outside our memory fail their op with GNTST_bad_virt_addr; the rest
        // go to the hypervisor in one batch.
        let mut statuses = vec![status::OKAY; ops.len()];
        let mut segs = Vec::with_capacity(ops.len());
        let mut which = Vec::with_capacity(ops.len());
        for (i, op) in ops.iter().enumerate() {
            let side = |p: CopyPtr| -> Option<CopySide> {
                match p {
                    CopyPtr::Grant {
                        domid,
                        gref,
                        offset,
                    } => (usize::from(offset) + usize::from(op.len) <= 4096).then_some(
                        CopySide::Grant {
                            domid,
                            gref,
                            offset,
                        },
                    ),
                    CopyPtr::Local { frame, offset } => self
                        .memory
                        .ptr(frame, usize::from(offset), usize::from(op.len))
                        .ok()
                        .map(CopySide::Local),
                }
            };
            match (side(op.src), side(op.dst)) {
                (Some(src), Some(dst)) => {
                    segs.push(CopySeg {
                        src,
                        dst,
                        len: op.len,
                    });
                    which.push(i);
                }
                _ => statuses[i] = status::BAD_VIRT_ADDR,
            }
        }
        let got = self.gntdev.copy(&segs).map_err(link)?;
        for (i, st) in which.into_iter().zip(got) {
            statuses[i] = st;
        }
        Ok(statuses)
    }

    fn pin_grant(&self, peer: DomId, gref: GrantRef, writable: bool) -> Result<u64> {
        if peer == self.domid {
            let (frame, readonly) = *self
                .self_grants()
                .by_ref
                .get(&gref)
                .ok_or(PlatformError::Grant(status::BAD_GNTREF))?;
            let memory = self.memory.clone();
            return self.pins.pin(peer, gref, writable, move |_| {
                Ok((
                    Arc::new(LocalDma { memory, frame }) as Arc<dyn DmaPage>,
                    !readonly,
                ))
            });
        }
        self.pins.pin(peer, gref, writable, |want_writable| {
            // Writable first, so one mapping serves both directions; a read-only grant then
            // fails that and, for a read-only pin, is mapped read-only.
            let mapping = match self.gntdev.map(peer, gref, true) {
                Ok(m) => m,
                Err(_) if !want_writable => self.gntdev.map(peer, gref, false).map_err(|e| {
                    tracing::debug!(peer, gref, error = %link_text(&e), "pin: map failed");
                    PlatformError::Grant(status::GENERAL_ERROR)
                })?,
                Err(e) => {
                    tracing::debug!(peer, gref, error = %link_text(&e), "pin: map failed");
                    return Err(PlatformError::Grant(status::GENERAL_ERROR));
                }
            };
            let w = mapping.writable();
            Ok((Arc::new(GrantDma(mapping)) as Arc<dyn DmaPage>, w))
        })
    }

    fn unpin_grant(&self, iova: u64) -> Result<()> {
        self.pins
            .unpin(iova, self.persistent.load(Ordering::Relaxed))
    }

    fn transfer(&self, _frame: Frame, _peer: DomId, _gref: GrantRef) -> Result<TransferMode> {
        Err(unsupported("page transfer (GNTTABOP_transfer)"))
    }

    fn read_local(&self, frame: Frame, offset: usize, buf: &mut [u8]) -> Result<()> {
        self.memory
            .read(frame, offset, buf)
            .map_err(|_| PlatformError::BadFrame(frame))
    }

    fn write_local(&self, frame: Frame, offset: usize, data: &[u8]) -> Result<()> {
        self.memory
            .write(frame, offset, data)
            .map_err(|_| PlatformError::BadFrame(frame))
    }

    fn evtchn_alloc_unbound(&self, remote: DomId) -> Result<Port> {
        self.evtchn.bind_unbound(remote).map_err(link)
    }

    fn evtchn_bind_interdomain(&self, remote: DomId, remote_port: Port) -> Result<Port> {
        self.evtchn
            .bind_interdomain(remote, remote_port)
            .map_err(|e| {
                tracing::warn!(remote, remote_port, error = %link_text(&e), "bind failed");
                PlatformError::BadPort(remote_port)
            })
    }

    fn evtchn_notify(&self, port: Port) -> Result<()> {
        self.evtchn
            .notify(port)
            .map_err(|_| PlatformError::BadPort(port))
    }

    fn evtchn_unmask(&self, port: Port) -> Result<()> {
        self.evtchn
            .unmask(port)
            .map_err(|_| PlatformError::BadPort(port))
    }

    fn evtchn_close(&self, port: Port) -> Result<()> {
        self.evtchn
            .unbind(port)
            .map_err(|_| PlatformError::BadPort(port))
    }

    fn evtchn_wait(&self, timeout: Option<Duration>) -> Result<Vec<Port>> {
        self.evtchn.wait(timeout).map_err(link)
    }
}

/// `e` and its sources, `: `-separated.
pub fn link_text(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// A platform whose devices are `/dev/null` (every ioctl fails): what does not need Xen.
    fn offline(dir: &Path) -> XenPlatform {
        XenPlatform::new(
            0,
            Gntdev::open(Path::new("/dev/null")).unwrap(),
            Evtchn::open(Path::new("/dev/null")).unwrap(),
            LocalMemory::open(&dir.join("mem"), 4).unwrap(),
            4,
        )
    }

    #[test]
    fn what_backends_cannot_do_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = offline(dir.path());
        for e in [
            p.alloc_shared_page().err(),
            p.grant_access(1, 0, false).err(),
            p.transfer(0, 1, 2).err(),
        ] {
            assert!(
                matches!(e, Some(PlatformError::Link(ref m)) if m.contains("userspace backend"))
            );
        }
        assert!(p.accept_transfer(1, 0).is_err() && p.end_transfer(1).is_err());
        assert!(p.end_access(1).is_err());
    }

    #[test]
    fn our_own_frames_reach_the_device_through_self_grants() {
        let dir = tempfile::tempdir().unwrap();
        let p = offline(dir.path());
        assert_eq!(p.grant_access(0, 4, false), Err(PlatformError::BadFrame(4)));
        let g = p.grant_access(0, 2, false).unwrap();
        let ro = p.grant_access(0, 3, true).unwrap();
        let iova = p.pin_grant(0, g, true).unwrap();
        p.dma().dma_write(iova + 100, b"queue").unwrap();
        let mut b = [0u8; 5];
        p.read_local(2, 100, &mut b).unwrap();
        assert_eq!(&b, b"queue");
        // Read-only for the device.
        let riova = p.pin_grant(0, ro, false).unwrap();
        assert!(p.dma().dma_write(riova, b"x").is_err());
        assert_eq!(
            p.pin_grant(0, ro, true),
            Err(PlatformError::Grant(status::PERMISSION_DENIED))
        );
        // Pinned: cannot end; unpinned: ends, and the device loses it.
        assert_eq!(p.end_access(g), Err(PlatformError::GrantInUse(g)));
        p.unpin_grant(iova).unwrap();
        p.end_access(g).unwrap();
        assert!(p.dma().dma_write(iova, b"x").is_err());
        assert!(p.pin_grant(0, g, true).is_err());
        assert!(p.end_access(g).is_err());
    }

    #[test]
    fn local_memory_and_failed_maps() {
        let dir = tempfile::tempdir().unwrap();
        let p = offline(dir.path());
        p.write_local(3, 10, b"journal").unwrap();
        let mut b = [0u8; 7];
        p.read_local(3, 10, &mut b).unwrap();
        assert_eq!(&b, b"journal");
        assert_eq!(p.write_local(4, 0, b"x"), Err(PlatformError::BadFrame(4)));
        // gntdev ioctls fail on /dev/null: a clean grant error, nothing cached.
        assert_eq!(
            p.pin_grant(1, 8, true),
            Err(PlatformError::Grant(status::GENERAL_ERROR))
        );
        assert!(p.map_grant(1, 8, false).is_err());
        assert_eq!(p.pin_stats(), PinStats::default());
        assert!(p.unpin_grant(iospace::iommu::IOVA_BASE).is_err());
        assert!(p.evtchn_notify(1).is_err());
    }

    #[test]
    fn copies_with_a_local_side_outside_our_memory_fail_alone() {
        let dir = tempfile::tempdir().unwrap();
        let p = offline(dir.path());
        let op = |frame, len| GrantCopyOp {
            src: CopyPtr::Grant {
                domid: 1,
                gref: 9,
                offset: 0,
            },
            dst: CopyPtr::Local { frame, offset: 100 },
            len,
        };
        // Every op is refused before the hypervisor: nothing reaches the (null) device.
        let st = p.grant_copy(&[op(4, 8), op(0, 4000)]).unwrap();
        assert_eq!(st, vec![status::BAD_VIRT_ADDR; 2]);
        assert_eq!(p.grant_copy(&[]).unwrap(), Vec::<i16>::new());
    }
}
