//! XenStore for process domains: the domain-0 side, as Xen does it with `start_info`'s
//! `store_mfn`/`store_evtchn`.
//!
//! # How a domain gets its store
//!
//! ```text
//!  toolstack (DomainStores::introduce)            xenstored (this module's hook)
//!  1. EVTCHNOP_alloc_unbound in the new domain,
//!     remote = the store domain: port P
//!  2. XS_INTRODUCE <domid> <mfn = 6> <P>  ──────▶  3. bind_interdomain(store domain, domid, P)
//!                                                     = our port Q; map frame 6 of the domain's
//!                                                     RAM; start serve_ring for it
//!  4. write /local/domain/<domid> (perms: owner dom0, domain may read) and
//!     /local/domain/<domid>/data (owned by the domain, private)
//!  5. start the process with PDOM_STORE_PORT=P (`crate::store_link` reads it)
//! ```
//!
//! Frame 6 (`memory::layout::XENSTORE_FRAME`) of every domain's RAM is its
//! `xenstore_domain_interface` page. The introduction message may name another RAM frame at or
//! above it (Xen's tools may); frames below it are platform pages and are refused.
//!
//! # Waking
//!
//! One dispatcher thread owns the store domain's event channels: it waits on that domain's
//! upcall eventfd, scans its `shared_info` page, and for each pending port kicks the
//! [`RingSignal`] of the domain bound to it, then unmasks the port. Each introduced domain is
//! served by its own [`serve_ring`] thread, which waits on that signal and notifies the domain
//! with `EVTCHNOP_send` on its port. Because the dispatcher takes every pending port of the
//! store domain, nothing else in the store domain may consume its events (run the toolstack's
//! own channels in another domain, or through this dispatcher).
//!
//! # Stopping
//!
//! `XS_RELEASE` (from [`DomainStores::release`], from Xen's tools over the socket, or from
//! [`DomainStores::destroy`]) closes the domain's connection: its server thread returns, closes
//! the store domain's port and records [`ServiceState::Stopped`]. A domain that disappears from
//! the [`System`] without a release (destroyed by someone else) is found by the dispatcher's
//! periodic scan, as Xen's xenstored finds dead domains on `VIRQ_DOM_EXC`, and released.
//! A domain that breaks its ring (bad indexes, unframeable bytes, unread output) gets the error
//! word set in its page and is no longer served ([`ServiceState::CutOff`]); nobody else is
//! affected.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use devchan::grant::DomId;
use devchan::platform::Port;
use devchan::xenstore::perms::{Perm, PERM_READ};
use devchan::xenstore::ring::RingPage;
use devchan::xenstore::{Decoder, DomainAction, Message, MsgType, XsError};
use vmm_sys_util::eventfd::EventFd;

use super::ring::{serve_ring, RingExit, RingSignal};
use super::{Connection, Output, Xenstored, XenstoredError};
use crate::domain::DomainConfig;
use crate::launch::{LaunchConfig, LaunchError, RunningDomain};
use crate::memory::{layout, DomainMemory};
use crate::store_link::ENV_STORE_PORT;
use crate::system::{System, SystemError};

/// How often the dispatcher looks for domains that vanished without a release.
const SCAN_INTERVAL: Duration = Duration::from_millis(100);

/// Errors of the domain-0 side of XenStore.
#[derive(Debug, thiserror::Error)]
pub enum DomainsError {
    /// The hypervisor refused an operation.
    #[error("Hypervisor operation failed")]
    System(#[from] SystemError),
    /// The store refused a request of the toolstack.
    #[error("XenStore refused {0:?}")]
    Store(MsgType, #[source] XsError),
    /// The store's reply to the toolstack made no sense.
    #[error("Unexpected XenStore reply to {0:?}")]
    Reply(MsgType),
    /// The domain is not served.
    #[error("Domain {0} has no XenStore service")]
    NotServed(DomId),
    /// Starting the domain's process failed.
    #[error("Starting the domain process failed")]
    Launch(#[from] LaunchError),
    /// A thread or eventfd could not be created.
    #[error("Starting the XenStore service failed")]
    Io(#[from] io::Error),
}

/// Where a domain's XenStore service is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceState {
    /// Its ring is being served.
    Serving,
    /// It broke the ring protocol (the reason): the error word is set, it is not served.
    CutOff(String),
    /// Released (or destroyed): not served.
    Stopped,
}

/// A domain's ring signal: the store domain's end of the domain's XenStore event channel.
/// `notify` sends on the port; `wait` sleeps on an eventfd that the dispatcher (an event on
/// the port) or the daemon (output queued) writes.
struct PortSignal {
    sys: Arc<System>,
    store_dom: DomId,
    port: Port,
    wake: EventFd,
}

impl RingSignal for PortSignal {
    fn notify(&self) -> io::Result<()> {
        self.sys
            .evtchn_send(self.store_dom, self.port)
            .map_err(io::Error::other)
    }

    fn wait(&self) -> io::Result<()> {
        // A blocking eventfd: returns once the counter is non-zero, and resets it.
        self.wake.read().map(drop)
    }

    fn kick(&self) {
        // Fails only if the counter would overflow: a wake-up is already pending.
        let _ = self.wake.write(1);
    }
}

struct Served {
    domain_port: Port,
    store_port: Option<Port>,
    signal: Option<Arc<PortSignal>>,
    state: ServiceState,
    thread: Option<JoinHandle<()>>,
}

struct Inner {
    sys: Arc<System>,
    xs: Arc<Xenstored>,
    store_dom: DomId,
    served: Mutex<HashMap<DomId, Served>>,
    admin: Mutex<Connection>,
    stop: AtomicBool,
}

/// XenStore service for every introduced process domain. Dropping it stops the dispatcher and
/// closes every domain's service.
pub struct DomainStores {
    inner: Arc<Inner>,
    dispatcher: Option<JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl DomainStores {
    /// Serve introduced domains of `sys` from `xs`, with `store_dom` (normally 0) as the
    /// domain xenstored runs in: it binds the domains' store ports and its events are taken
    /// by the dispatcher. Installs `xs`'s domain hook (replacing any other).
    pub fn start(
        sys: Arc<System>,
        xs: Arc<Xenstored>,
        store_dom: DomId,
    ) -> Result<Self, DomainsError> {
        let dom = sys.domain(store_dom)?;
        let admin = xs.connect(store_dom, None);
        let inner = Arc::new(Inner {
            sys,
            xs: Arc::clone(&xs),
            store_dom,
            served: Mutex::new(HashMap::new()),
            admin: Mutex::new(admin),
            stop: AtomicBool::new(false),
        });
        let weak: Weak<Inner> = Arc::downgrade(&inner);
        xs.set_domain_hook(Box::new(move |action| {
            if let Some(inner) = weak.upgrade() {
                inner.on_action(action);
            }
        }));
        let inner2 = Arc::clone(&inner);
        let dispatcher = std::thread::Builder::new()
            .name("xs-evtchn".into())
            .spawn(move || inner2.dispatch(&dom))?;
        Ok(Self {
            inner,
            dispatcher: Some(dispatcher),
        })
    }

    /// The daemon.
    pub fn xenstored(&self) -> &Arc<Xenstored> {
        &self.inner.xs
    }

    /// Set up `domid`'s store as the toolstack does: allocate its store port (unbound, for the
    /// store domain), introduce it (the daemon binds the port and serves frame 6), and create
    /// its home `/local/domain/<domid>` (owned by the store domain, readable by `domid`) and
    /// `/local/domain/<domid>/data` (the domain's own, private). Returns the domain's port,
    /// which its process gets as [`ENV_STORE_PORT`].
    pub fn introduce(&self, domid: DomId) -> Result<Port, DomainsError> {
        let inner = &self.inner;
        let port = inner.sys.evtchn_alloc_unbound(domid, inner.store_dom)?;
        let (d, m, p) = (
            domid.to_string(),
            layout::XENSTORE_FRAME.to_string(),
            port.to_string(),
        );
        let r = inner.admin(
            MsgType::Introduce,
            Message::strings(&[d.as_bytes(), m.as_bytes(), p.as_bytes()]),
        );
        if let Err(e) = r {
            let _ = inner.sys.evtchn_close(domid, port);
            return Err(e);
        }
        if let Some(ServiceState::CutOff(why)) = self.status(domid) {
            tracing::warn!(domid, why, "introduced domain could not be served");
            return Err(DomainsError::NotServed(domid));
        }
        let home = format!("/local/domain/{domid}");
        let store = Perm::new(inner.store_dom, 0).encode();
        let reader = Perm::new(domid, PERM_READ).encode();
        let owner = Perm::new(domid, 0).encode();
        inner.admin_write(&home, b"")?;
        inner.admin(
            MsgType::SetPerms,
            Message::strings(&[home.as_bytes(), store.as_bytes(), reader.as_bytes()]),
        )?;
        let data = format!("{home}/data");
        inner.admin_write(&data, b"")?;
        inner.admin(
            MsgType::SetPerms,
            Message::strings(&[data.as_bytes(), owner.as_bytes()]),
        )?;
        Ok(port)
    }

    /// Create a domain, introduce it, and start `cfg.program` in it with
    /// [`ENV_STORE_PORT`] set.
    pub fn launch(&self, cfg: LaunchConfig) -> Result<RunningDomain, DomainsError> {
        let domid = self.inner.sys.create_domain(DomainConfig {
            name: cfg.name.clone(),
            nr_frames: cfg.nr_frames,
            iommu: cfg.iommu.clone(),
        })?;
        let started = self
            .introduce(domid)
            .and_then(|_| self.spawn_in(domid, cfg));
        started.inspect_err(|_| {
            let _ = self.destroy(domid);
        })
    }

    /// Start `cfg.program` as a (new) process of the introduced domain `domid`, with
    /// [`ENV_STORE_PORT`] set: a restart keeps the domain's store, port and ring.
    pub fn spawn_in(
        &self,
        domid: DomId,
        mut cfg: LaunchConfig,
    ) -> Result<RunningDomain, DomainsError> {
        let port = self
            .store_port(domid)
            .ok_or(DomainsError::NotServed(domid))?;
        cfg.env
            .push((ENV_STORE_PORT.into(), port.to_string().into()));
        Ok(crate::launch::spawn_in(&self.inner.sys, domid, cfg)?)
    }

    /// The domain's end of its store event channel, while it is introduced.
    pub fn store_port(&self, domid: DomId) -> Option<Port> {
        lock(&self.inner.served)
            .get(&domid)
            .filter(|s| s.state != ServiceState::Stopped)
            .map(|s| s.domain_port)
    }

    /// Where `domid`'s service is (`None`: never introduced).
    pub fn status(&self, domid: DomId) -> Option<ServiceState> {
        lock(&self.inner.served)
            .get(&domid)
            .map(|s| s.state.clone())
    }

    /// Release `domid` (`XS_RELEASE`): fires `@releaseDomain`, stops its service and waits
    /// until its server thread has returned.
    pub fn release(&self, domid: DomId) -> Result<(), DomainsError> {
        let d = domid.to_string();
        self.inner
            .admin(MsgType::Release, Message::strings(&[d.as_bytes()]))?;
        self.inner.join(domid);
        Ok(())
    }

    /// Release `domid`'s store (if introduced) and destroy the domain.
    pub fn destroy(&self, domid: DomId) -> Result<(), DomainsError> {
        if self.store_port(domid).is_some() {
            // Best effort: the domain may have been released meanwhile.
            let _ = self.release(domid);
        }
        self.inner.sys.destroy_domain(domid)?;
        Ok(())
    }
}

impl Drop for DomainStores {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Release);
        let ids: Vec<DomId> = lock(&self.inner.served).keys().copied().collect();
        for d in ids {
            self.inner.xs.close_domain(d);
            self.inner.join(d);
        }
        if let Some(t) = self.dispatcher.take() {
            let _ = t.join();
        }
    }
}

impl Inner {
    /// Run one request on the toolstack's own connection; the reply payload.
    fn admin(&self, ty: MsgType, payload: Vec<u8>) -> Result<Vec<u8>, DomainsError> {
        let mut conn = lock(&self.admin);
        conn.feed(&Message::new(ty, 1, 0, payload).encode())
            .map_err(|_| DomainsError::Reply(ty))?;
        let mut dec = Decoder::new();
        while let Some(out) = conn.try_output() {
            let Output::Bytes(b) = out else {
                return Err(DomainsError::Reply(ty));
            };
            dec.push(&b);
            while let Ok(Some(m)) = dec.next_message() {
                match m.ty {
                    MsgType::WatchEvent => continue,
                    MsgType::Error => {
                        return Err(DomainsError::Store(ty, XsError::from_name(&m.payload)))
                    }
                    t if t == ty => return Ok(m.payload),
                    _ => return Err(DomainsError::Reply(ty)),
                }
            }
        }
        Err(DomainsError::Reply(ty))
    }

    fn admin_write(&self, path: &str, value: &[u8]) -> Result<(), DomainsError> {
        let mut p = Message::strings(&[path.as_bytes()]);
        p.extend_from_slice(value);
        self.admin(MsgType::Write, p).map(drop)
    }

    /// The daemon's domain hook.
    fn on_action(self: &Arc<Self>, action: DomainAction) {
        match action {
            DomainAction::Introduced { domid, mfn, port } => {
                let state = match self.serve(domid, mfn, port) {
                    Ok(()) => return,
                    Err(e) => ServiceState::CutOff(e.to_string()),
                };
                tracing::warn!(domid, ?state, "cannot serve introduced domain");
                lock(&self.served).insert(
                    domid,
                    Served {
                        domain_port: port,
                        store_port: None,
                        signal: None,
                        state,
                        thread: None,
                    },
                );
            }
            // The daemon already closed the domain's connection; its thread cleans up.
            DomainAction::Released(_) => {}
        }
    }

    /// Bind `domid`'s store port and start serving its ring page `mfn`.
    fn serve(self: &Arc<Self>, domid: DomId, mfn: u64, port: u32) -> Result<(), DomainsError> {
        let dom = self.sys.domain(domid)?;
        let mem: Arc<DomainMemory> = Arc::clone(dom.memory());
        if mfn < layout::XENSTORE_FRAME || mfn >= mem.nr_frames() {
            return Err(SystemError::BadFrame(mfn).into());
        }
        let ptr = mem.ram_frame_ptr(mfn).map_err(SystemError::from)?;
        let store_port = self
            .sys
            .evtchn_bind_interdomain(self.store_dom, domid, port)?;
        let signal = Arc::new(PortSignal {
            sys: Arc::clone(&self.sys),
            store_dom: self.store_dom,
            port: store_port,
            wake: EventFd::new(0)?,
        });
        let mut served = lock(&self.served);
        if let Some(old) = served.get(&domid) {
            if old.state == ServiceState::Serving {
                drop(served);
                let _ = self.sys.evtchn_close(self.store_dom, store_port);
                return Err(DomainsError::NotServed(domid));
            }
        }
        // SAFETY: `ptr` is a page of the domain's RAM mapping, which `mem` (moved into the
        // server thread with the view, and dropped after it) keeps alive; the page is 4 KiB
        // aligned (larger than the interface) and only accessed through `RingPage`'s atomics
        // and volatile copies.
        let page = unsafe { RingPage::new(ptr.cast()) };
        let (me, sig) = (Arc::clone(self), Arc::clone(&signal));
        let thread = std::thread::Builder::new()
            .name(format!("xs-dom{domid}"))
            .spawn(move || {
                let r = match page {
                    Some(page) => serve_ring(&me.xs, domid, &page, &sig),
                    None => Err(XenstoredError::Io(io::Error::other("null ring page"))),
                };
                // The view is gone (moved into the match above); now the memory may go.
                drop(mem);
                me.finished(domid, store_port, r);
            });
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                drop(served);
                let _ = self.sys.evtchn_close(self.store_dom, store_port);
                return Err(e.into());
            }
        };
        served.insert(
            domid,
            Served {
                domain_port: port,
                store_port: Some(store_port),
                signal: Some(signal),
                state: ServiceState::Serving,
                thread: Some(thread),
            },
        );
        drop(served);
        // Wait until the server has opened the domain's connection, so that a release right
        // after this introduction finds (and closes) it.
        let t0 = std::time::Instant::now();
        while self.xs.with_store(|s| s.conns_of(domid).is_empty())
            && t0.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        tracing::debug!(
            domid,
            mfn,
            port,
            store_port,
            "serving domain's XenStore ring"
        );
        Ok(())
    }

    /// A server thread returned: record why and close our end of the port.
    fn finished(&self, domid: DomId, store_port: Port, r: Result<RingExit, XenstoredError>) {
        let state = match r {
            Ok(RingExit::Released) => ServiceState::Stopped,
            Err(e) if self.sys.domain(domid).is_err() => {
                tracing::debug!(domid, error = %e, "domain gone");
                ServiceState::Stopped
            }
            Err(e) => {
                let why = format!(
                    "{e}: {}",
                    std::error::Error::source(&e).map_or_else(String::new, ToString::to_string)
                );
                tracing::warn!(domid, why, "domain cut off from XenStore");
                ServiceState::CutOff(why)
            }
        };
        // Closing may fail if the store domain is gone; nothing to do then.
        let _ = self.sys.evtchn_close(self.store_dom, store_port);
        let mut served = lock(&self.served);
        if let Some(s) = served.get_mut(&domid) {
            if s.store_port == Some(store_port) {
                s.state = state;
                s.signal = None;
            }
        }
    }

    /// Wait for `domid`'s server thread to return (after its connection was closed).
    fn join(&self, domid: DomId) {
        let t = lock(&self.served)
            .get_mut(&domid)
            .and_then(|s| s.thread.take());
        if let Some(t) = t {
            let _ = t.join();
        }
    }

    /// The dispatcher: route the store domain's events to the domains' ring servers.
    fn dispatch(&self, dom: &crate::domain::Domain) {
        let mut since_scan = std::time::Instant::now();
        while !self.stop.load(Ordering::Acquire) {
            // Drain, then scan: an event raised after the drain leaves the eventfd readable.
            let _ = dom.upcall().read();
            let ports = dom.event_page().take_pending_masked();
            for p in &ports {
                let sig = lock(&self.served)
                    .values()
                    .find(|s| s.store_port == Some(*p))
                    .and_then(|s| s.signal.clone());
                if let Some(sig) = sig {
                    sig.kick();
                }
                // Fails only for a port closed meanwhile.
                let _ = self.sys.evtchn_unmask(self.store_dom, *p);
            }
            if since_scan.elapsed() >= SCAN_INTERVAL {
                since_scan = std::time::Instant::now();
                self.release_vanished();
            }
            if ports.is_empty() {
                wait_readable(dom.upcall().as_raw_fd(), SCAN_INTERVAL);
            }
        }
    }

    /// Release domains that no longer exist in the system (destroyed without a release).
    fn release_vanished(&self) {
        let gone: Vec<DomId> = lock(&self.served)
            .iter()
            .filter(|(d, s)| s.state == ServiceState::Serving && self.sys.domain(**d).is_err())
            .map(|(d, _)| *d)
            .collect();
        for d in gone {
            let id = d.to_string();
            if let Err(e) = self.admin(MsgType::Release, Message::strings(&[id.as_bytes()])) {
                tracing::debug!(domid = d, error = %e, "release of a vanished domain");
                self.xs.close_domain(d);
            }
        }
    }
}

/// Poll `fd` for input for at most `timeout`.
fn wait_readable(fd: std::os::fd::RawFd, timeout: Duration) {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    // SAFETY: the fd belongs to the store domain, which the dispatcher's caller keeps alive
    // for the duration of this call.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let ts = Timespec {
        tv_sec: 0,
        tv_nsec: i64::from(timeout.subsec_nanos()),
    };
    let mut pfd = [PollFd::new(&fd, PollFlags::IN)];
    // A failed or interrupted poll just means another round.
    let _ = poll(&mut pfd, Some(&ts));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::DomainConfig;
    use devchan::xenstore::ring::XENSTORE_ERROR_NONE;

    fn system() -> (Arc<System>, DomainStores) {
        let sys = System::new();
        let cfg = |n: &str| DomainConfig {
            name: n.into(),
            nr_frames: 16,
            iommu: None,
        };
        sys.create_domain(cfg("dom0")).unwrap();
        sys.create_domain(cfg("guest")).unwrap();
        let stores = DomainStores::start(Arc::clone(&sys), Xenstored::new(), 0).unwrap();
        (sys, stores)
    }

    #[test]
    fn introduce_serves_and_release_stops() {
        let (sys, stores) = system();
        let port = stores.introduce(1).unwrap();
        assert_eq!(stores.status(1), Some(ServiceState::Serving));
        assert_eq!(stores.store_port(1), Some(port));
        assert!(stores.xenstored().with_store(|s| s.is_introduced(1)));
        let mem = Arc::clone(sys.domain(1).unwrap().memory());
        let ptr = mem.ram_frame_ptr(layout::XENSTORE_FRAME).unwrap();
        // SAFETY: a RAM page of the domain, alive while `mem` is.
        let page = unsafe { RingPage::new(ptr.cast()) }.unwrap();
        assert_eq!(page.server_features(), super::super::ring::FEATURES);
        stores.release(1).unwrap();
        assert_eq!(stores.status(1), Some(ServiceState::Stopped));
        assert_eq!(stores.store_port(1), None);
        assert_eq!(page.error(), XENSTORE_ERROR_NONE);
    }

    #[test]
    fn platform_frames_and_unknown_domains_are_refused() {
        let (_sys, stores) = system();
        assert!(matches!(
            stores.introduce(9),
            Err(DomainsError::System(SystemError::NoSuchDomain(9)))
        ));
        // An introduction naming the grant table as the ring page is refused.
        let p = stores.inner.sys.evtchn_alloc_unbound(1, 0).unwrap();
        stores
            .inner
            .admin(
                MsgType::Introduce,
                Message::strings(&[b"1", b"2", p.to_string().as_bytes()]),
            )
            .unwrap();
        assert!(matches!(stores.status(1), Some(ServiceState::CutOff(_))));
    }

    #[test]
    fn destroyed_domains_are_released_by_the_scan() {
        let (sys, stores) = system();
        stores.introduce(1).unwrap();
        sys.destroy_domain(1).unwrap();
        let t0 = std::time::Instant::now();
        while stores.status(1) != Some(ServiceState::Stopped) {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "{:?}",
                stores.status(1)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!stores.xenstored().with_store(|s| s.is_introduced(1)));
    }
}
