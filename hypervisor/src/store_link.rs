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
    /// Returns those of `ports` that fired, unmasked; other ports that fire meanwhile are
    /// kept for a later wait.
    pub fn wait_any(
        &self,
        ports: &[Port],
        timeout: Option<Duration>,
    ) -> Result<Vec<Port>, PlatformError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let mine = self.claim(ports);
            if !mine.is_empty() {
                for p in &mine {
                    self.platform.evtchn_unmask(*p)?;
                }
                return Ok(mine);
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if left.is_some_and(|l| l.is_zero()) {
                return Err(PlatformError::TimedOut);
            }
            let fired = self.platform.evtchn_wait(left)?;
            self.unclaimed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(fired);
        }
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

    #[test]
    fn missing_env_is_an_error() {
        std::env::remove_var(ENV_STORE_PORT);
        assert!(matches!(port_from_env(), Err(StoreLinkError::Env)));
    }
}
