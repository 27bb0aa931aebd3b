//! The domain side of the process-domain platform: [`ProcessPlatform`] implements
//! [`devchan::platform::Platform`] inside a domain process.
//!
//! The process maps its own RAM memfd (layout in `memory::layout`: `shared_info` at frame 0,
//! the grant table at frames 1..=4, the hypercall page at frame 5) and talks to the hypervisor
//! through the descriptors [`crate::launch`] passed:
//!
//! * **Granting** writes the domain's own grant-table pages (`devchan::grant::GrantAllocator`);
//!   no hypercall is needed, as in Xen.
//! * **Copy, pin, transfer, event channels** are records in the batched hypercall page
//!   ([`crate::hypercall`]), one doorbell per batch of up to `MAX_OPS` records. Most calls wait
//!   for the batch to complete; [`ProcessPlatform::evtchn_notify_posted`] does not (the
//!   exceptionless path: the notify is published and the domain goes on; its status is checked
//!   when the page is next used), which saves two context switches per notification.
//! * **Mapping and shareable pages** go over the control socket, which hands back a one-page
//!   memfd (`SCM_RIGHTS`) that this process maps and then closes. Dropping a
//!   [`ProcessMapping`] unmaps it and tells the hypervisor.
//! * **Restart.** A new process of an existing domain resumes the grant allocator from the
//!   grant table in memory (live grants stay allocated and can be ended), lists its grants with
//!   [`ProcessPlatform::granted`] and maps its shareable pages again by frame with
//!   [`ProcessPlatform::reattach_page`] (see `launch` for what else survives).
//! * **Transfers.** A remapping transfer swaps the memfds behind two shareable frames; a
//!   process that maps one of them would keep seeing the old page. The platform keeps a
//!   registry of where each of its shareable frames is mapped, and re-fetches a frame's memfd
//!   (control op `SHARED_PAGE`) and maps it `MAP_FIXED` over the old mapping, at the same
//!   address, whenever the page behind the frame may have changed: the sender after
//!   [`Platform::transfer`] says `Remapped`, the receiver when [`Platform::end_transfer`]
//!   reports a page arrived. Pointers a ring holds stay valid. The sender keeps no access to
//!   the page it gave, unless it is hostile and skips this: a received page is as untrusted as
//!   any shared page, so the receiver copies data out before validating it.
//! * **Waiting for events** blocks on the upcall eventfd, then scans the domain's own
//!   `shared_info` page, where the hypervisor sets the pending bits (`devchan::evtchn`).
//!   Unmasking is local (clear the mask bit, re-check pending, self-signal the upcall eventfd),
//!   as a Xen guest does with the 2-level ABI.
//!
//! Everything here runs inside the sandbox: it only reads and writes descriptors it already
//! has, maps and unmaps memory, and waits.

use crate::hypercall::{
    ctl, drain_eventfd, recv_msg, send_msg, signal_eventfd, CtlReply, CtlRequest, HypercallPage,
    Op, OpRecord, CTL_REPLY_SIZE, HYPERCALL_FRAME, MAX_OPS,
};
use crate::launch::{ENV_DOMID, ENV_NR_FRAMES, FD_COMPLETION, FD_CONTROL, FD_DOORBELL};
use crate::launch::{FD_MEMORY, FD_UPCALL};
use crate::memory::layout;
use devchan::evtchn::EventPage;
use devchan::grant::{
    status as gntst, DomId, GrantAllocator, GrantEntries, GrantEntryV1, GrantError, GrantRef,
};
use devchan::platform::{
    Frame, GrantCopyOp, Platform, PlatformError, Port, Result, SharedPage, TransferMode,
};
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vm_memory::VolatileSlice;

pub mod control;
mod mmap;
pub mod report;
use mmap::{Mmap, PageRegistry};

const PAGE: usize = layout::PAGE_SIZE;
/// How long a hypercall may take before the link counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors while setting up the platform in a domain process.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// A launch environment variable is missing or malformed.
    #[error("Launch environment variable {0} is missing or malformed")]
    Env(&'static str),
    /// The domain's memory size is out of range.
    #[error("Bad memory size of {0} frames")]
    BadSize(u64),
    /// Mapping the domain's memory failed.
    #[error("Mapping domain memory failed")]
    Map(#[source] std::io::Error),
    /// A launch descriptor is not open in this process.
    #[error("Launch descriptor {0} is not open")]
    MissingFd(RawFd),
    /// The launch descriptors were already taken by an earlier call.
    #[error("Launch descriptors already taken")]
    AlreadyTaken,
    /// Confining the process failed.
    #[error("Entering the sandbox failed")]
    Sandbox(#[from] crate::sandbox::SandboxError),
}

/// The descriptors a domain process got from its launcher.
pub struct ProcessFds {
    /// The RAM memfd.
    pub memory: OwnedFd,
    /// The control socket.
    pub control: OwnedFd,
    /// The doorbell eventfd.
    pub doorbell: OwnedFd,
    /// The completion eventfd.
    pub completion: OwnedFd,
    /// The upcall eventfd.
    pub upcall: OwnedFd,
}

struct HypercallClient {
    page: HypercallPage,
    doorbell: OwnedFd,
    completion: OwnedFd,
    seq: u32,
    /// A posted batch not yet settled: its sequence and record count.
    posted: Option<(u32, usize)>,
    /// Posted batches in which some record failed.
    posted_failures: u64,
}

impl HypercallClient {
    /// Publish `chunk` (at most `MAX_OPS` records) as the next batch and ring the doorbell.
    fn publish(&mut self, chunk: &[OpRecord]) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.page.publish(self.seq, chunk);
        signal_eventfd(&self.doorbell);
        self.seq
    }

    /// Wait for batch `seq` of `n` records to complete; its records.
    fn complete(&mut self, seq: u32, n: usize) -> Result<Vec<OpRecord>> {
        let deadline = Instant::now() + CALL_TIMEOUT;
        while !self.page.is_complete(seq) {
            if !wait_readable(&self.completion, Some(deadline))? {
                return Err(PlatformError::Link("hypercall timed out".into()));
            }
            drain_eventfd(&self.completion);
        }
        let (batch, recs) = self.page.results(n);
        if batch != 0 {
            return Err(PlatformError::Link(format!("batch refused: {batch}")));
        }
        Ok(recs)
    }

    /// Settle a posted batch before the page is reused (usually it completed long ago).
    fn settle(&mut self) -> Result<()> {
        if let Some((seq, n)) = self.posted.take() {
            let recs = self.complete(seq, n)?;
            if recs.iter().any(|r| r.status != 0) {
                self.posted_failures += 1;
            }
        }
        Ok(())
    }

    /// Run `records` in batches; returns them with statuses and results.
    fn call(&mut self, records: &[OpRecord]) -> Result<Vec<OpRecord>> {
        self.settle()?;
        let mut out = Vec::with_capacity(records.len());
        for chunk in records.chunks(MAX_OPS) {
            let seq = self.publish(chunk);
            out.extend(self.complete(seq, chunk.len())?);
        }
        Ok(out)
    }

    /// Publish `records` (at most `MAX_OPS`) without waiting for them: the exceptionless path.
    /// Their statuses are checked when the page is next used.
    fn post(&mut self, records: &[OpRecord]) -> Result<()> {
        self.settle()?;
        if records.is_empty() || records.len() > MAX_OPS {
            return Err(PlatformError::Exhausted("hypercall records"));
        }
        let seq = self.publish(records);
        self.posted = Some((seq, records.len()));
        Ok(())
    }

    fn one(&mut self, op: Op) -> Result<OpRecord> {
        self.call(&[op.encode()])?
            .pop()
            .ok_or_else(|| PlatformError::Link("no result".into()))
    }
}

/// Wait until `fd` is readable or `deadline` passes; false on timeout.
fn wait_readable(fd: &OwnedFd, deadline: Option<Instant>) -> Result<bool> {
    loop {
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let ts = left.map(|l| Timespec {
            tv_sec: l.as_secs().try_into().unwrap_or(i64::MAX),
            tv_nsec: l.subsec_nanos().into(),
        });
        let mut pfd = [PollFd::new(fd, PollFlags::IN)];
        match poll(&mut pfd, ts.as_ref()) {
            Ok(0) if left.is_some_and(|l| l.is_zero()) => return Ok(false),
            Ok(0) | Err(rustix::io::Errno::INTR) => continue,
            Ok(_) => return Ok(true),
            Err(e) => return Err(PlatformError::Link(format!("poll: {e}"))),
        }
    }
}

/// The control-socket client, shared with live mappings (which unmap through it on drop).
struct Control(Mutex<OwnedFd>);

impl Control {
    fn request(&self, op: u32, args: [u64; 3]) -> Result<(CtlReply, Option<OwnedFd>)> {
        let sock = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let link = |e: crate::hypercall::HypercallError| PlatformError::Link(e.to_string());
        send_msg(
            sock.as_fd(),
            &CtlRequest { op, args }.to_bytes(),
            None,
            false,
        )
        .map_err(link)?;
        let mut buf = [0u8; CTL_REPLY_SIZE + 1];
        let (n, fd) = recv_msg(sock.as_fd(), &mut buf, false).map_err(link)?;
        Ok((CtlReply::from_bytes(&buf[..n]).map_err(link)?, fd))
    }
}

/// A page of our memory that peers may map (from [`Platform::alloc_shared_page`] or
/// [`ProcessPlatform::reattach_page`]).
pub struct ProcessPage {
    map: Mmap,
    frame: Frame,
    registry: Arc<PageRegistry>,
}

impl Drop for ProcessPage {
    fn drop(&mut self) {
        // Out of the registry before the mapping goes (field drop, after this), so a
        // concurrent re-map can never MAP_FIXED over an address that is no longer ours.
        self.registry.forget(self.frame, &self.map);
    }
}

impl SharedPage for ProcessPage {
    fn as_ptr(&self) -> *mut u8 {
        self.map.ptr.as_ptr()
    }
    fn frame(&self) -> Frame {
        self.frame
    }
}

/// A peer's page mapped through a grant; dropping it unmaps it and releases the grant.
pub struct ProcessMapping {
    // Field order is drop order: the page is unmapped from this process before the
    // hypervisor is told to release the grant, so the granter can never reuse a page that
    // is still mapped here.
    map: Mmap,
    frame: Frame,
    _release: GrantRelease,
}

/// Tells the hypervisor to release a mapping's grant when dropped.
struct GrantRelease {
    handle: u64,
    control: Arc<Control>,
}

impl Drop for GrantRelease {
    fn drop(&mut self) {
        let _ = self.control.request(ctl::UNMAP_GRANT, [self.handle, 0, 0]);
    }
}

impl SharedPage for ProcessMapping {
    fn as_ptr(&self) -> *mut u8 {
        self.map.ptr.as_ptr()
    }
    fn frame(&self) -> Frame {
        self.frame
    }
}

/// The process-domain platform, as seen from inside a domain process.
pub struct ProcessPlatform {
    domid: DomId,
    nr_frames: u64,
    events: EventPage,
    grants: GrantAllocator,
    hc: Mutex<HypercallClient>,
    control: Arc<Control>,
    pages: Arc<PageRegistry>,
    upcall: OwnedFd,
    // Declared last so the views above are dropped before the memory they point into.
    ram: Mmap,
}

fn env_u64(name: &'static str) -> std::result::Result<u64, ProcessError> {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .ok_or(ProcessError::Env(name))
}

impl ProcessPlatform {
    /// What a domain process runs first: take the platform from the launch environment, then
    /// confine the process with `sandbox` (stdio and the platform's descriptors are added to
    /// its `keep_fds`). Domain code runs after this returns.
    pub fn enter(
        mut sandbox: crate::sandbox::SandboxConfig,
    ) -> std::result::Result<(Self, crate::sandbox::SandboxReport), ProcessError> {
        let p = Self::from_launch_env()?;
        sandbox.keep_fds.extend([0, 1, 2]);
        sandbox.keep_fds.extend(crate::launch::PLATFORM_FDS);
        let report = crate::sandbox::apply(&sandbox)?;
        Ok((p, report))
    }

    /// Take the descriptors and environment [`crate::launch`] set up. Call once, early, in a
    /// process started by the launcher (before the sandbox, which then keeps the fds).
    pub fn from_launch_env() -> std::result::Result<Self, ProcessError> {
        let domid =
            DomId::try_from(env_u64(ENV_DOMID)?).map_err(|_| ProcessError::Env(ENV_DOMID))?;
        let nr_frames = env_u64(ENV_NR_FRAMES)?;
        static TAKEN: AtomicBool = AtomicBool::new(false);
        if TAKEN.swap(true, Ordering::SeqCst) {
            return Err(ProcessError::AlreadyTaken);
        }
        for fd in crate::launch::PLATFORM_FDS {
            // SAFETY: a borrow for one fcntl call; F_GETFD on a closed number just fails.
            let open = rustix::io::fcntl_getfd(unsafe { BorrowedFd::borrow_raw(fd) }).is_ok();
            if !open {
                return Err(ProcessError::MissingFd(fd));
            }
        }
        let take = |fd: RawFd| {
            // SAFETY: the launcher placed these descriptors at these numbers for this process
            // (checked open above), nothing else in it owns them, and the flag above lets only
            // one call take them.
            unsafe { OwnedFd::from_raw_fd(fd) }
        };
        Self::from_fds(
            domid,
            nr_frames,
            ProcessFds {
                memory: take(FD_MEMORY),
                control: take(FD_CONTROL),
                doorbell: take(FD_DOORBELL),
                completion: take(FD_COMPLETION),
                upcall: take(FD_UPCALL),
            },
        )
    }

    /// Build the platform from explicit descriptors.
    pub fn from_fds(
        domid: DomId,
        nr_frames: u64,
        fds: ProcessFds,
    ) -> std::result::Result<Self, ProcessError> {
        if !(layout::MIN_FRAMES..=layout::MAX_FRAMES).contains(&nr_frames) {
            return Err(ProcessError::BadSize(nr_frames));
        }
        let len = usize::try_from(nr_frames).map_err(|_| ProcessError::BadSize(nr_frames))? * PAGE;
        let ram = Mmap::map(&fds.memory, len, true).map_err(ProcessError::Map)?;
        drop(fds.memory);
        let page_of = |f: u64| {
            ram.page(f)
                .and_then(NonNull::new)
                .ok_or(ProcessError::BadSize(nr_frames))
        };
        // SAFETY: the pointer is a page-aligned page of `ram`, which the platform owns and
        // drops after the views (field order); the hypervisor and this process access the
        // shared_info page only atomically.
        let events = unsafe { EventPage::new(page_of(layout::SHARED_INFO_FRAME)?) };
        // SAFETY: as above; the grant table spans GRANT_TABLE_FRAMES pages of `ram`.
        let entries = unsafe {
            GrantEntries::new(
                page_of(layout::GRANT_TABLE_FRAME)?,
                layout::NR_GRANT_ENTRIES,
            )
        };
        // SAFETY: as above.
        let page = unsafe { HypercallPage::new(page_of(HYPERCALL_FRAME)?.as_ptr()) };
        let seq = page.current_req_seq();
        Ok(Self {
            domid,
            nr_frames,
            events,
            // A restarted process finds the grants of the previous one; a new domain's table
            // is all zero, which resumes to an empty allocator.
            grants: GrantAllocator::resume(entries),
            hc: Mutex::new(HypercallClient {
                page,
                doorbell: fds.doorbell,
                completion: fds.completion,
                seq,
                posted: None,
                posted_failures: 0,
            }),
            control: Arc::new(Control(Mutex::new(fds.control))),
            pages: Arc::default(),
            upcall: fds.upcall,
            ram,
        })
    }

    fn hc(&self) -> std::sync::MutexGuard<'_, HypercallClient> {
        self.hc.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The domain's XenStore ring page (frame `layout::XENSTORE_FRAME` of its RAM, Xen's
    /// `store_mfn`); the pointer is valid while `self` lives (`store_link` builds its client
    /// on it).
    pub fn xenstore_page(&self) -> Option<NonNull<u8>> {
        self.ram.page(layout::XENSTORE_FRAME).and_then(NonNull::new)
    }

    /// Notify the other end of `port` without waiting for the hypervisor: the send is posted
    /// in the hypercall page and the doorbell rung, and this returns at once. A failure (a bad
    /// port) is not returned but counted in [`ProcessPlatform::posted_failures`], as with Xen
    /// guests, which ignore the result of a notify. The next hypercall first settles it.
    pub fn evtchn_notify_posted(&self, port: Port) -> Result<()> {
        self.hc().post(&[Op::EvtchnSend(port).encode()])
    }

    /// Posted batches that had a failed record, so far.
    pub fn posted_failures(&self) -> Result<u64> {
        let mut hc = self.hc();
        hc.settle()?;
        Ok(hc.posted_failures)
    }

    /// Run a batch of raw ops (for callers that want several ops per doorbell).
    pub fn hypercall_batch(&self, ops: &[Op]) -> Result<Vec<OpRecord>> {
        let recs: Vec<OpRecord> = ops.iter().map(Op::encode).collect();
        self.hc().call(&recs)
    }

    /// The grants this domain has live (made by this process or found in the grant table by
    /// a restarted one), ascending by reference.
    pub fn granted(&self) -> Vec<(GrantRef, GrantEntryV1)> {
        self.grants.live()
    }

    /// The live access grant of our `frame` to `peer`, if any: how a restarted frontend finds
    /// its ring grant when it has no other record of it.
    pub fn find_grant(&self, peer: DomId, frame: Frame) -> Option<GrantRef> {
        self.grants.find_access(peer, u32::try_from(frame).ok()?)
    }

    /// Map our existing shareable page `frame` (allocated by this or an earlier process of
    /// the domain), e.g. the ring page a restarted frontend granted before it crashed.
    pub fn reattach_page(&self, frame: Frame) -> Result<ProcessPage> {
        let (rep, fd) = self.control.request(ctl::SHARED_PAGE, [frame, 0, 0])?;
        if rep.status != 0 {
            return Err(PlatformError::BadFrame(frame));
        }
        self.own_page(fd, frame)
    }

    /// Wrap a received page memfd as a registered `ProcessPage` of `frame`.
    fn own_page(&self, fd: Option<OwnedFd>, frame: Frame) -> Result<ProcessPage> {
        let map = self.map_fd(fd, true)?;
        self.pages.add(frame, &map);
        Ok(ProcessPage {
            map,
            frame,
            registry: self.pages.clone(),
        })
    }

    /// The page behind our shareable `frame` may have changed (a transfer swapped it): map
    /// the frame's current memfd over every mapping of it in this process. Nothing to do for
    /// RAM frames or frames not mapped here. An error means the control link failed, so this
    /// process's view of the frame may be stale: the domain should treat its link as broken.
    fn refresh_page(&self, frame: Frame) -> Result<()> {
        if frame < self.nr_frames {
            return Ok(());
        }
        // Held throughout: a page dropped meanwhile waits, so its address stays ours.
        let reg = self.pages.lock();
        let Some(addrs) = reg.get(&frame).filter(|v| !v.is_empty()) else {
            return Ok(());
        };
        let (rep, fd) = self.control.request(ctl::SHARED_PAGE, [frame, 0, 0])?;
        let fd = match (rep.status, fd) {
            (0, Some(fd)) => fd,
            _ => return Err(PlatformError::BadFrame(frame)),
        };
        for &addr in addrs {
            let ptr = NonNull::new(addr as *mut u8).ok_or(PlatformError::BadFrame(frame))?;
            let view = std::mem::ManuallyDrop::new(Mmap { ptr, len: PAGE });
            // SAFETY: `addr` is the live one-page mapping of a `ProcessPage`, which removes
            // itself from the registry (whose lock we hold) before it unmaps; `view` is never
            // dropped, so it does not unmap it either.
            unsafe { view.replace(&fd) }
                .map_err(|e| PlatformError::Link(format!("re-map after transfer: {e}")))?;
        }
        Ok(())
    }

    fn local(&self, frame: Frame, offset: usize, len: usize) -> Result<*mut u8> {
        if frame >= self.nr_frames || offset.checked_add(len).is_none_or(|e| e > PAGE) {
            return Err(PlatformError::BadFrame(frame));
        }
        let p = self.ram.page(frame).ok_or(PlatformError::BadFrame(frame))?;
        // SAFETY: offset + len <= PAGE was checked, so the range stays in the frame.
        Ok(unsafe { p.add(offset) })
    }

    fn map_fd(&self, fd: Option<OwnedFd>, writable: bool) -> Result<Mmap> {
        let fd = fd.ok_or_else(|| PlatformError::Link("no page descriptor in reply".into()))?;
        Mmap::map(&fd, PAGE, writable).map_err(|e| PlatformError::Link(format!("mmap: {e}")))
    }
}

fn grant_err(e: GrantError) -> PlatformError {
    match e {
        GrantError::InUse(r) | GrantError::TransferInProgress(r) => PlatformError::GrantInUse(r),
        GrantError::Exhausted => PlatformError::Exhausted("grant references"),
        GrantError::OutOfRange(_) | GrantError::NotAllocated(_) => {
            PlatformError::Grant(gntst::BAD_GNTREF)
        }
        GrantError::Unstable(_) => PlatformError::Grant(gntst::GENERAL_ERROR),
    }
}

/// A grant-op status as a result.
fn gnt_result(r: &OpRecord) -> Result<u64> {
    if r.status == 0 {
        Ok(r.result)
    } else {
        Err(PlatformError::Grant(
            i16::try_from(r.status).unwrap_or(gntst::GENERAL_ERROR),
        ))
    }
}

/// An event-channel status as a result; `dom`/`port` name what a failure is about.
fn evtchn_result(r: &OpRecord, dom: Option<DomId>, port: Port) -> Result<u64> {
    match -r.status {
        0 => Ok(r.result),
        libc::ESRCH => Err(PlatformError::BadDomain(dom.unwrap_or(DomId::MAX))),
        libc::EINVAL => Err(PlatformError::BadPort(port)),
        libc::ENOSPC => Err(PlatformError::Exhausted("event-channel ports")),
        e => Err(PlatformError::Link(format!(
            "event-channel op failed: errno {e}"
        ))),
    }
}

fn port_of(v: u64) -> Result<Port> {
    Port::try_from(v).map_err(|_| PlatformError::Link("bad port in reply".into()))
}

impl Platform for ProcessPlatform {
    type Page = ProcessPage;
    type Mapping = ProcessMapping;

    fn domid(&self) -> DomId {
        self.domid
    }

    fn alloc_shared_page(&self) -> Result<ProcessPage> {
        let (rep, fd) = self.control.request(ctl::ALLOC_SHARED_PAGE, [0; 3])?;
        if rep.status == -libc::ENOSPC {
            return Err(PlatformError::Exhausted("shareable pages"));
        }
        if rep.status != 0 {
            // Domain 0 could not create the page (its memfd): not this domain's quota.
            return Err(PlatformError::Exhausted(
                "shareable pages (domain 0 could not create one: see its log)",
            ));
        }
        self.own_page(fd, rep.result[0])
    }

    fn grant_access(&self, peer: DomId, frame: Frame, readonly: bool) -> Result<GrantRef> {
        let f = u32::try_from(frame).map_err(|_| PlatformError::BadFrame(frame))?;
        self.grants
            .grant_access(peer, f, readonly)
            .map_err(grant_err)
    }

    fn end_access(&self, gref: GrantRef) -> Result<()> {
        self.grants.end_access(gref).map_err(grant_err)
    }

    fn accept_transfer(&self, peer: DomId, frame: Frame) -> Result<GrantRef> {
        let f = u32::try_from(frame).map_err(|_| PlatformError::BadFrame(frame))?;
        self.grants.grant_transfer(peer, f).map_err(grant_err)
    }

    fn end_transfer(&self, gref: GrantRef) -> Result<Option<Frame>> {
        let got = self
            .grants
            .end_transfer(gref)
            .map_err(grant_err)?
            .map(Frame::from);
        if let Some(frame) = got {
            // The sender's page may now be behind this frame (a swap); see it where we map it.
            self.refresh_page(frame)?;
        }
        Ok(got)
    }

    fn map_grant(&self, peer: DomId, gref: GrantRef, readonly: bool) -> Result<ProcessMapping> {
        let args = [u64::from(peer), u64::from(gref), u64::from(readonly)];
        let (rep, fd) = self.control.request(ctl::MAP_GRANT, args)?;
        if rep.status != 0 {
            return Err(PlatformError::Grant(
                i16::try_from(rep.status).unwrap_or(gntst::GENERAL_ERROR),
            ));
        }
        let handle = rep.result[0];
        match self.map_fd(fd, !readonly) {
            Ok(map) => Ok(ProcessMapping {
                map,
                frame: rep.result[1],
                _release: GrantRelease {
                    handle,
                    control: self.control.clone(),
                },
            }),
            Err(e) => {
                let _ = self.control.request(ctl::UNMAP_GRANT, [handle, 0, 0]);
                Err(e)
            }
        }
    }

    fn grant_copy(&self, ops: &[GrantCopyOp]) -> Result<Vec<i16>> {
        let recs: Vec<OpRecord> = ops.iter().map(|c| Op::GrantCopy(*c).encode()).collect();
        let done = self.hc().call(&recs)?;
        Ok(done
            .iter()
            .map(|r| i16::try_from(r.status).unwrap_or(gntst::GENERAL_ERROR))
            .collect())
    }

    fn pin_grant(&self, peer: DomId, gref: GrantRef, writable: bool) -> Result<u64> {
        gnt_result(&self.hc().one(Op::Pin {
            granter: peer,
            gref,
            writable,
        })?)
    }

    fn unpin_grant(&self, iova: u64) -> Result<()> {
        gnt_result(&self.hc().one(Op::Unpin { iova })?).map(|_| ())
    }

    fn transfer(&self, frame: Frame, peer: DomId, gref: GrantRef) -> Result<TransferMode> {
        let r = gnt_result(&self.hc().one(Op::Transfer { frame, peer, gref })?)?;
        if r == 0 {
            // Our frame now names the receiver's old page: map it where we mapped the frame.
            self.refresh_page(frame)?;
            Ok(TransferMode::Remapped)
        } else {
            Ok(TransferMode::Copied)
        }
    }

    fn read_local(&self, frame: Frame, offset: usize, buf: &mut [u8]) -> Result<()> {
        let p = self.local(frame, offset, buf.len())?;
        // SAFETY: `local` checked that the range is inside our RAM mapping, which outlives
        // this call; the hypervisor (for peers) accesses that memory only volatilely.
        let slice = unsafe { VolatileSlice::new(p, buf.len()) };
        slice.copy_to(buf);
        Ok(())
    }

    fn write_local(&self, frame: Frame, offset: usize, data: &[u8]) -> Result<()> {
        let p = self.local(frame, offset, data.len())?;
        // SAFETY: as in read_local.
        let slice = unsafe { VolatileSlice::new(p, data.len()) };
        slice.copy_from(data);
        Ok(())
    }

    fn evtchn_alloc_unbound(&self, remote: DomId) -> Result<Port> {
        let r = self.hc().one(Op::EvtchnAllocUnbound(remote))?;
        port_of(evtchn_result(&r, Some(remote), 0)?)
    }

    fn evtchn_bind_interdomain(&self, remote: DomId, remote_port: Port) -> Result<Port> {
        let r = self.hc().one(Op::EvtchnBindInterdomain {
            remote,
            port: remote_port,
        })?;
        port_of(evtchn_result(&r, Some(remote), remote_port)?)
    }

    fn evtchn_notify(&self, port: Port) -> Result<()> {
        evtchn_result(&self.hc().one(Op::EvtchnSend(port))?, None, port).map(|_| ())
    }

    fn evtchn_unmask(&self, port: Port) -> Result<()> {
        // Local, as with Xen's 2-level ABI: clear the mask bit; if the port became pending
        // while masked, raise our own upcall so the next wait sees it.
        if self.events.unmask(port) {
            signal_eventfd(&self.upcall);
        }
        Ok(())
    }

    fn evtchn_close(&self, port: Port) -> Result<()> {
        evtchn_result(&self.hc().one(Op::EvtchnClose(port))?, None, port).map(|_| ())
    }

    fn evtchn_wait(&self, timeout: Option<Duration>) -> Result<Vec<Port>> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            // Scan before sleeping: the scan clears the upcall flag first, so an event raised
            // after it signals the eventfd again and the poll below returns.
            let ports = self.events.take_pending_masked();
            if !ports.is_empty() {
                return Ok(ports);
            }
            if !wait_readable(&self.upcall, deadline)? {
                return Err(PlatformError::TimedOut);
            }
            drain_eventfd(&self.upcall);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_platform_errors() {
        let rec = |status| OpRecord {
            status,
            ..Default::default()
        };
        assert_eq!(
            evtchn_result(&rec(-libc::ESRCH), Some(4), 0),
            Err(PlatformError::BadDomain(4))
        );
        assert_eq!(
            evtchn_result(&rec(-libc::EINVAL), None, 9),
            Err(PlatformError::BadPort(9))
        );
        assert_eq!(
            gnt_result(&rec(-3)),
            Err(PlatformError::Grant(gntst::BAD_GNTREF))
        );
        assert_eq!(
            gnt_result(&rec(-100_000)),
            Err(PlatformError::Grant(gntst::GENERAL_ERROR))
        );
        assert_eq!(
            grant_err(GrantError::InUse(9)),
            PlatformError::GrantInUse(9)
        );
    }

    #[test]
    fn bad_sizes_are_refused() {
        let fd = || rustix::fs::memfd_create("t", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        let fds = ProcessFds {
            memory: fd(),
            control: fd(),
            doorbell: fd(),
            completion: fd(),
            upcall: fd(),
        };
        assert!(matches!(
            ProcessPlatform::from_fds(1, 1, fds),
            Err(ProcessError::BadSize(1))
        ));
    }
}
