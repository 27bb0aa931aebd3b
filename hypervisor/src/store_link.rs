//! XenStore from inside a domain: a [`Client`] over the domain's ring page and store event
//! channel (the domain side of `xenstored::domains`).
//!
//! A process domain finds its store the way a Xen PV guest finds it in `start_info`: the page
//! is frame 6 of its RAM (`memory::layout::XENSTORE_FRAME`, `store_mfn`), and the port is in
//! the environment variable [`ENV_STORE_PORT`] (`store_evtchn`), set by the launcher next to
//! `PDOM_DOMID`.
//!
//! # Sharing the event channel wait
//!
//! A sandboxed domain is single-threaded and [`Platform::evtchn_wait`] returns (and masks)
//! every pending port at once. [`EventMux`] sits between the platform and its users: a wait
//! for some ports keeps the ones nobody asked for in a set of seen-but-unclaimed ports (still
//! masked, as the platform left them) and hands them out on the next wait that asks for them.
//! So the XenStore client waiting for a reply never swallows a device channel's event, and a
//! device loop waiting for its ring never swallows the store's. Ports are unmasked when they
//! are handed out; the caller then re-checks its ring, so no event is lost.
//!
//! # Restart
//!
//! A new process of an existing domain finds the ring as its predecessor left it (perhaps
//! half a message in either direction). [`StoreTransport::reconnect`] asks the daemon for a
//! fresh ring (`XENSTORE_RECONNECT`, when the daemon advertises the feature); the old
//! process's watches and transactions are dropped with it. The store port is unmasked first:
//! a process that died between a wait and its unmask left it masked.

use std::collections::BTreeSet;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devchan::platform::{Platform, PlatformError, Port};
use devchan::xenstore::ring::{
    RingPage, XENSTORE_CONNECTED, XENSTORE_ERROR_NONE, XENSTORE_SERVER_FEATURE_RECONNECTION,
};
use devchan::xenstore::Client;

use crate::process::ProcessPlatform;

/// Environment variable with the domain's XenStore event-channel port (decimal).
pub const ENV_STORE_PORT: &str = "PDOM_STORE_PORT";

/// How long a store request may wait for the daemon by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors while setting up a domain's store link.
#[derive(Debug, thiserror::Error)]
pub enum StoreLinkError {
    /// [`ENV_STORE_PORT`] is missing or not a port number.
    #[error("Environment variable PDOM_STORE_PORT is missing or malformed")]
    Env,
    /// The platform has no XenStore page.
    #[error("The domain has no XenStore ring page")]
    NoPage,
    /// The daemon did not complete a reconnect.
    #[error("XenStore reconnect failed")]
    Reconnect(#[source] io::Error),
    /// An event-channel operation failed.
    #[error("Event-channel operation failed")]
    Platform(#[from] PlatformError),
}

/// Shares a single-threaded domain's event wait between its users (see the module docs).
pub struct EventMux<P: Platform> {
    platform: Arc<P>,
    unclaimed: Mutex<BTreeSet<Port>>,
}

impl<P: Platform> EventMux<P> {
    /// A multiplexer over `platform`'s event channels.
    pub fn new(platform: Arc<P>) -> Arc<Self> {
        Arc::new(Self {
            platform,
            unclaimed: Mutex::new(BTreeSet::new()),
        })
    }

    /// The platform.
    pub fn platform(&self) -> &Arc<P> {
        &self.platform
    }

    fn claim(&self, ports: &[Port]) -> Vec<Port> {
        let mut set = self.unclaimed.lock().unwrap_or_else(|p| p.into_inner());
        ports.iter().copied().filter(|p| set.remove(p)).collect()
    }

    /// Block until one of `ports` fired or `timeout` passes ([`PlatformError::TimedOut`]).
    /// Returns every one of `ports` that fired (sorted), unmasked; other ports that fire
    /// meanwhile are kept, masked, for a later wait that asks for them.
    pub fn wait_any(
        &self,
        ports: &[Port],
        timeout: Option<Duration>,
    ) -> Result<Vec<Port>, PlatformError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut mine = self.claim(ports);
        // Whether the claim above already includes everything the platform had pending.
        let mut fresh = false;
        loop {
            if !mine.is_empty() {
                if !fresh {
                    // Remembered from an earlier wait: pick up whatever else is pending now,
                    // without blocking, so that one wait reports every port asked for that
                    // fired. The claimed ports are still masked, so none comes back twice.
                    match self.platform.evtchn_wait(Some(Duration::ZERO)) {
                        Ok(fired) => {
                            self.remember(fired);
                            mine.extend(self.claim(ports));
                        }
                        Err(PlatformError::TimedOut) => {}
                        Err(e) => return Err(e),
                    }
                }
                mine.sort_unstable();
                mine.dedup();
                for p in &mine {
                    self.platform.evtchn_unmask(*p)?;
                }
                return Ok(mine);
            }
            // With no time left this is a non-blocking look, so every wait looks at least once.
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let fired = self.platform.evtchn_wait(left)?;
            self.remember(fired);
            mine = self.claim(ports);
            fresh = true;
            if mine.is_empty() && left.is_some_and(|l| l.is_zero()) {
                return Err(PlatformError::TimedOut);
            }
        }
    }

    fn remember(&self, fired: Vec<Port>) {
        self.unclaimed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(fired);
    }

    /// Whether `port` fired and is waiting to be claimed (without blocking or claiming it).
    pub fn has_fired(&self, port: Port) -> bool {
        self.unclaimed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&port)
    }
}

/// The domain's side of its XenStore ring as a byte stream for [`Client`]: requests go to
/// `req`, replies and watch events come from `rsp`, and the store event channel signals both
/// ways. A wait longer than the timeout is an `io::ErrorKind::TimedOut` error.
pub struct StoreTransport<P: Platform> {
    page: RingPage,
    port: Port,
    mux: Arc<EventMux<P>>,
    timeout: Duration,
}

/// A XenStore client of a domain.
pub type StoreClient<P> = Client<StoreTransport<P>>;

impl<P: Platform> StoreTransport<P> {
    /// A transport over `page` (whose mapping must live as long as `mux`'s platform: it is a
    /// page of the domain's own memory) signalling on `port`.
    pub fn new(page: RingPage, port: Port, mux: Arc<EventMux<P>>) -> Self {
        Self {
            page,
            port,
            mux,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The store port.
    pub fn port(&self) -> Port {
        self.port
    }

    /// The ring page.
    pub fn page(&self) -> &RingPage {
        &self.page
    }

    /// Change how long one wait for the daemon may take.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Whether reply or event bytes are waiting in the ring (a watch event may be read
    /// without blocking long).
    pub fn readable(&self) -> bool {
        self.page.responses_pending()
    }

    fn notify(&self) -> io::Result<()> {
        self.mux
            .platform()
            .evtchn_notify(self.port)
            .map_err(io::Error::other)
    }

    fn wait(&self) -> io::Result<()> {
        match self.mux.wait_any(&[self.port], Some(self.timeout)) {
            Ok(_) => Ok(()),
            Err(PlatformError::TimedOut) => Err(io::ErrorKind::TimedOut.into()),
            Err(e) => Err(io::Error::other(e)),
        }
    }

    fn check_daemon(&self) -> io::Result<()> {
        match self.page.error() {
            XENSTORE_ERROR_NONE => Ok(()),
            e => Err(devchan::xenstore::ring::RingError::Daemon(e).into()),
        }
    }

    /// Unmask the port and, if the daemon supports it, ask for a fresh ring: what a new
    /// process of a domain does before its first request.
    pub fn reconnect(&self) -> io::Result<()> {
        self.mux
            .platform()
            .evtchn_unmask(self.port)
            .map_err(io::Error::other)?;
        if self.page.server_features() & XENSTORE_SERVER_FEATURE_RECONNECTION == 0 {
            return Ok(());
        }
        self.page.request_reconnect();
        self.notify()?;
        while self.page.connection() != XENSTORE_CONNECTED {
            self.check_daemon()?;
            self.wait()?;
        }
        Ok(())
    }
}

impl<P: Platform> io::Read for StoreTransport<P> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let n = self.page.read_response(buf)?;
            if n > 0 {
                // The daemon may be waiting for room to write more.
                self.notify()?;
                return Ok(n);
            }
            self.check_daemon()?;
            self.wait()?;
        }
    }
}

impl<P: Platform> io::Write for StoreTransport<P> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            self.check_daemon()?;
            let n = self.page.write_request(buf)?;
            if n > 0 {
                self.notify()?;
                return Ok(n);
            }
            self.wait()?;
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The store port from [`ENV_STORE_PORT`].
pub fn port_from_env() -> Result<Port, StoreLinkError> {
    std::env::var(ENV_STORE_PORT)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|p| *p != 0)
        .ok_or(StoreLinkError::Env)
}

/// A process domain's XenStore client: the page at frame 6 of its RAM, the port from
/// [`ENV_STORE_PORT`], reconnected (see the module docs). Use `mux` for every other event
/// wait of the domain too.
pub fn process_client(
    mux: &Arc<EventMux<ProcessPlatform>>,
) -> Result<StoreClient<ProcessPlatform>, StoreLinkError> {
    let port = port_from_env()?;
    let ptr = mux
        .platform()
        .xenstore_page()
        .ok_or(StoreLinkError::NoPage)?;
    // SAFETY: the page is frame XENSTORE_FRAME of the platform's RAM mapping, page-aligned,
    // which lives as long as the platform; the transport holds the platform (through `mux`)
    // for as long as the view exists. The page is only accessed through `RingPage`.
    let page = unsafe { RingPage::new(ptr.as_ptr().cast()) }.ok_or(StoreLinkError::NoPage)?;
    client_on(page, port, mux)
}

/// A client over `page` (in the memory of `mux`'s platform) and `port`, reconnected.
pub fn client_on<P: Platform>(
    page: RingPage,
    port: Port,
    mux: &Arc<EventMux<P>>,
) -> Result<StoreClient<P>, StoreLinkError> {
    let t = StoreTransport::new(page, port, Arc::clone(mux));
    t.reconnect().map_err(StoreLinkError::Reconnect)?;
    Ok(Client::new(t))
}

/// An in-process domain's client (a [`crate::local::LocalPlatform`], for tests and domain 0
/// helpers): the page at frame 6 of its RAM and the given port, reconnected.
pub fn local_client(
    mux: &Arc<EventMux<crate::local::LocalPlatform>>,
    port: Port,
) -> Result<StoreClient<crate::local::LocalPlatform>, StoreLinkError> {
    let ptr = mux
        .platform()
        .domain()
        .memory()
        .ram_frame_ptr(crate::memory::layout::XENSTORE_FRAME)
        .map_err(|_| StoreLinkError::NoPage)?;
    // SAFETY: a page of the domain's RAM mapping, kept alive by the platform's `Arc<Domain>`,
    // which the transport holds through `mux`; accessed only through `RingPage`.
    let page = unsafe { RingPage::new(ptr.cast()) }.ok_or(StoreLinkError::NoPage)?;
    client_on(page, port, mux)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::DomainConfig;
    use crate::local::LocalPlatform;
    use crate::system::System;
    use crate::xenstored::domains::DomainStores;
    use crate::xenstored::Xenstored;

    fn setup() -> (
        Arc<System>,
        DomainStores,
        Arc<EventMux<LocalPlatform>>,
        Port,
    ) {
        let sys = System::new();
        for n in ["dom0", "guest", "peer"] {
            sys.create_domain(DomainConfig {
                name: n.into(),
                nr_frames: 16,
                iommu: None,
            })
            .unwrap();
        }
        let stores = DomainStores::start(Arc::clone(&sys), Xenstored::new(), 0).unwrap();
        let port = stores.introduce(1).unwrap();
        let mux = EventMux::new(Arc::new(LocalPlatform::new(Arc::clone(&sys), 1).unwrap()));
        (sys, stores, mux, port)
    }

    #[test]
    fn client_reads_and_writes_its_home() {
        let (_sys, _stores, mux, port) = setup();
        let mut c = local_client(&mux, port).unwrap();
        assert_eq!(c.get_domain_path(1).unwrap(), "/local/domain/1");
        c.write(0, "/local/domain/1/data/x", b"v").unwrap();
        assert_eq!(c.read(0, "/local/domain/1/data/x").unwrap(), b"v");
    }

    #[test]
    fn store_waits_keep_other_ports_for_their_owner() {
        let (sys, _stores, mux, port) = setup();
        // A device channel between domain 2 and our domain 1.
        let theirs = sys.evtchn_alloc_unbound(2, 1).unwrap();
        let dev = mux.platform().evtchn_bind_interdomain(2, theirs).unwrap();
        // Binding marks `dev` pending; a store round trip must not swallow it.
        let mut c = local_client(&mux, port).unwrap();
        c.write(0, "/local/domain/1/data/y", b"1").unwrap();
        sys.evtchn_send(2, theirs).unwrap();
        c.read(0, "/local/domain/1/data/y").unwrap();
        // The device port's events survive the store's waits: it is delivered to its owner,
        // once or twice (the send may land while the bind's event is still unclaimed).
        assert_eq!(
            mux.wait_any(&[dev], Some(Duration::from_secs(1))).unwrap(),
            [dev]
        );
        let mut extra = 0;
        while mux
            .wait_any(&[dev], Some(Duration::from_millis(50)))
            .is_ok()
        {
            extra += 1;
            assert!(extra <= 1, "more device events than were sent");
        }
        assert!(!mux.has_fired(dev));
    }

    /// A platform whose only working part is a 2-level event-channel model: `fire` sets a
    /// port pending; a wait returns (and masks) the pending unmasked ports, or times out at
    /// once; unmask clears the mask (a port still pending is returned by the next wait).
    #[derive(Default)]
    struct FakeEvents {
        st: Mutex<(BTreeSet<Port>, BTreeSet<Port>)>,
    }

    impl FakeEvents {
        fn fire(&self, p: Port) {
            self.st.lock().unwrap().0.insert(p);
        }
    }

    fn no<T>() -> devchan::platform::Result<T> {
        Err(PlatformError::Link("fake".into()))
    }

    /// A page type the fake never hands out.
    struct NoPage;
    impl devchan::platform::SharedPage for NoPage {
        fn as_ptr(&self) -> *mut u8 {
            std::ptr::null_mut()
        }
        fn frame(&self) -> devchan::platform::Frame {
            0
        }
    }

    impl Platform for FakeEvents {
        type Page = NoPage;
        type Mapping = NoPage;
        fn domid(&self) -> devchan::grant::DomId {
            1
        }
        fn alloc_shared_page(&self) -> devchan::platform::Result<NoPage> {
            no()
        }
        fn grant_access(&self, _: u16, _: u64, _: bool) -> devchan::platform::Result<u32> {
            no()
        }
        fn end_access(&self, _: u32) -> devchan::platform::Result<()> {
            no()
        }
        fn accept_transfer(&self, _: u16, _: u64) -> devchan::platform::Result<u32> {
            no()
        }
        fn end_transfer(&self, _: u32) -> devchan::platform::Result<Option<u64>> {
            no()
        }
        fn map_grant(&self, _: u16, _: u32, _: bool) -> devchan::platform::Result<NoPage> {
            no()
        }
        fn grant_copy(
            &self,
            _: &[devchan::platform::GrantCopyOp],
        ) -> devchan::platform::Result<Vec<i16>> {
            no()
        }
        fn pin_grant(&self, _: u16, _: u32, _: bool) -> devchan::platform::Result<u64> {
            no()
        }
        fn unpin_grant(&self, _: u64) -> devchan::platform::Result<()> {
            no()
        }
        fn transfer(
            &self,
            _: u64,
            _: u16,
            _: u32,
        ) -> devchan::platform::Result<devchan::platform::TransferMode> {
            no()
        }
        fn read_local(&self, _: u64, _: usize, _: &mut [u8]) -> devchan::platform::Result<()> {
            no()
        }
        fn write_local(&self, _: u64, _: usize, _: &[u8]) -> devchan::platform::Result<()> {
            no()
        }
        fn evtchn_alloc_unbound(&self, _: u16) -> devchan::platform::Result<Port> {
            no()
        }
        fn evtchn_bind_interdomain(&self, _: u16, _: Port) -> devchan::platform::Result<Port> {
            no()
        }
        fn evtchn_notify(&self, _: Port) -> devchan::platform::Result<()> {
            no()
        }
        fn evtchn_unmask(&self, p: Port) -> devchan::platform::Result<()> {
            self.st.lock().unwrap().1.remove(&p);
            Ok(())
        }
        fn evtchn_close(&self, _: Port) -> devchan::platform::Result<()> {
            no()
        }
        fn evtchn_wait(&self, _: Option<Duration>) -> devchan::platform::Result<Vec<Port>> {
            let mut st = self.st.lock().unwrap();
            let (pending, masked) = &mut *st;
            let ready: Vec<Port> = pending.difference(masked).copied().collect();
            if ready.is_empty() {
                return Err(PlatformError::TimedOut);
            }
            for p in &ready {
                pending.remove(p);
                masked.insert(*p);
            }
            Ok(ready)
        }
    }

    proptest::proptest! {
        /// Whatever mix of events and waits for subsets of ports: a wait returns only ports it
        /// asked for, and every port that fired and was not yet delivered is delivered to the
        /// first wait that asks for it (nothing is swallowed by a wait for other ports).
        #[test]
        fn no_event_is_lost_or_misdelivered(
            ops in proptest::collection::vec((proptest::bool::ANY, 1u32..7, 1u8..64), 1..64)
        ) {
            let fake = Arc::new(FakeEvents::default());
            let mux = EventMux::new(Arc::clone(&fake));
            let mut owed = BTreeSet::new();
            for (fire, port, set) in ops {
                if fire {
                    fake.fire(port);
                    owed.insert(port);
                    continue;
                }
                let asked: Vec<Port> = (1..7).filter(|p| set & (1 << (p - 1)) != 0).collect();
                let got = match mux.wait_any(&asked, Some(Duration::from_millis(1))) {
                    Ok(v) => v,
                    Err(PlatformError::TimedOut) => Vec::new(),
                    Err(e) => panic!("{e}"),
                };
                for p in &got {
                    proptest::prop_assert!(asked.contains(p), "{p} delivered to a wait for {asked:?}");
                }
                for p in asked.iter().filter(|p| owed.contains(*p)) {
                    proptest::prop_assert!(got.contains(p), "{p} fired but not delivered to {asked:?}");
                }
                for p in &got {
                    owed.remove(p);
                }
            }
        }
    }

    #[test]
    fn missing_env_is_an_error() {
        std::env::remove_var(ENV_STORE_PORT);
        assert!(matches!(port_from_env(), Err(StoreLinkError::Env)));
    }
}
