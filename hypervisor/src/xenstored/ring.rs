//! The daemon over a domain's ring page (`struct xenstore_domain_interface`).
//!
//! [`serve_ring`] runs one domain's connection until the domain is released or breaks the
//! protocol. Each round it: handles a reconnect request (`connection == XENSTORE_RECONNECT`:
//! drop the connection's watches and transactions, zero the indexes, set `CONNECTED`); copies
//! whatever requests are in `req` into the connection's decoder; moves queued output (replies,
//! watch events) into `rsp` as space allows; notifies the domain if it moved anything; and
//! otherwise waits for a signal. Output for the domain that does not fit waits in a bounded
//! backlog ([`MAX_BACKLOG`]); a domain that lets it overflow, breaks the indexes, or sends an
//! unframeable stream gets `error` set in its page (`XENSTORE_ERROR_*`) and is no longer
//! served.
//!
//! The signal is abstract ([`RingSignal`]): the platform's event channel, or in tests two
//! eventfds ([`EventFdSignal`]).

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;

use devchan::grant::DomId;
use devchan::xenstore::ring::{
    RingError, RingPage, XENSTORE_ERROR_COMM, XENSTORE_ERROR_PROTO, XENSTORE_ERROR_RINGIDX,
    XENSTORE_RECONNECT, XENSTORE_SERVER_FEATURE_ERROR, XENSTORE_SERVER_FEATURE_RECONNECTION,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{Connection, Output, Xenstored, XenstoredError};

/// Most bytes of output that may wait for a domain to make room in its ring.
pub const MAX_BACKLOG: usize = 1 << 20;

/// How the daemon and a domain signal each other about its ring.
pub trait RingSignal: Send + Sync {
    /// Tells the domain the ring changed (its event channel).
    fn notify(&self) -> io::Result<()>;
    /// Blocks until the domain signalled or [`RingSignal::kick`] was called (at least once
    /// since the last wait; spurious returns are fine).
    fn wait(&self) -> io::Result<()>;
    /// Wakes [`RingSignal::wait`] from another thread (output was queued).
    fn kick(&self);
}

/// A [`RingSignal`] over two eventfds: `to_domain` is written to notify the domain,
/// `from_domain` is what the domain writes to notify us (and what `kick` writes too).
pub struct EventFdSignal {
    /// Written by the daemon; the domain waits on it.
    pub to_domain: EventFd,
    /// Written by the domain (and by `kick`); the daemon waits on it.
    pub from_domain: EventFd,
}

impl EventFdSignal {
    /// A fresh pair.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            to_domain: EventFd::new(0)?,
            from_domain: EventFd::new(0)?,
        })
    }

    /// A nonblocking pair (for callers that poll).
    pub fn new_nonblocking() -> io::Result<Self> {
        Ok(Self {
            to_domain: EventFd::new(EFD_NONBLOCK)?,
            from_domain: EventFd::new(EFD_NONBLOCK)?,
        })
    }
}

impl EventFdSignal {
    /// The domain's side of the pair as the `notify` and `wait` callbacks of
    /// [`devchan::xenstore::ring::RingTransport`] (for in-process domains and tests).
    pub fn domain_side(self: &Arc<Self>) -> (impl FnMut() + Send, impl FnMut() + Send) {
        let (n, w) = (Arc::clone(self), Arc::clone(self));
        // Errors only mean the counter is saturated (a wake-up is pending) or the fd is gone;
        // either way the next wait/read sorts it out.
        (
            move || {
                let _ = n.from_domain.write(1);
            },
            move || {
                let _ = w.to_domain.read();
            },
        )
    }
}

impl RingSignal for EventFdSignal {
    fn notify(&self) -> io::Result<()> {
        self.to_domain.write(1)
    }

    fn wait(&self) -> io::Result<()> {
        match self.from_domain.read() {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn kick(&self) {
        // Only fails if the counter would overflow, i.e. a wake-up is already pending.
        let _ = self.from_domain.write(1);
    }
}

/// Why [`serve_ring`] stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum RingExit {
    /// The domain was released (`XS_RELEASE`) or closed ([`Xenstored::close_domain`]).
    Released,
}

struct RingConn<'a, S: RingSignal + ?Sized> {
    server: &'a Arc<Xenstored>,
    domid: DomId,
    page: &'a RingPage,
    signal: &'a Arc<S>,
    conn: Connection,
    backlog: VecDeque<u8>,
}

impl<S: RingSignal + ?Sized + 'static> RingConn<'_, S> {
    fn open(server: &Arc<Xenstored>, domid: DomId, signal: &Arc<S>) -> Connection {
        let s = Arc::clone(signal);
        server.connect(domid, Some(Arc::new(move || s.kick())))
    }

    /// One round; returns whether anything moved, or `Some(exit)` to stop.
    fn round(&mut self) -> Result<(bool, Option<RingExit>), XenstoredError> {
        let mut moved = false;
        if self.page.connection() == XENSTORE_RECONNECT {
            self.conn = Self::open(self.server, self.domid, self.signal);
            self.backlog.clear();
            self.page.reset(FEATURES);
            moved = true;
        }
        let mut buf = [0u8; 4096];
        let n = self.page.read_request(&mut buf)?;
        if n > 0 {
            moved = true;
            self.conn.feed(&buf[..n])?;
        }
        while let Some(out) = self.conn.try_output() {
            match out {
                Output::Bytes(b) => self.backlog.extend(b),
                Output::Close => return Ok((moved, Some(RingExit::Released))),
            }
        }
        if self.backlog.len() > MAX_BACKLOG {
            return Err(XenstoredError::Backlog(self.backlog.len()));
        }
        while !self.backlog.is_empty() {
            let (a, b) = self.backlog.as_slices();
            let chunk = if a.is_empty() { b } else { a };
            let w = self.page.write_response(chunk)?;
            if w == 0 {
                break;
            }
            self.backlog.drain(..w);
            moved = true;
        }
        Ok((moved, None))
    }
}

/// The features this daemon advertises in `server_features`.
pub const FEATURES: u32 = XENSTORE_SERVER_FEATURE_RECONNECTION | XENSTORE_SERVER_FEATURE_ERROR;

/// Serves `domid` over its ring page until it is released or misbehaves. The page is taken
/// as it is (zeroed by whoever built the domain, or left by a previous daemon, so a restarted
/// daemon carries on where the last one stopped); only `server_features` is set.
pub fn serve_ring<S: RingSignal + ?Sized + 'static>(
    server: &Arc<Xenstored>,
    domid: DomId,
    page: &RingPage,
    signal: &Arc<S>,
) -> Result<RingExit, XenstoredError> {
    page.advertise(FEATURES);
    let conn = RingConn::open(server, domid, signal);
    let mut rc = RingConn {
        server,
        domid,
        page,
        signal,
        conn,
        backlog: VecDeque::new(),
    };
    loop {
        match rc.round() {
            Ok((_, Some(exit))) => return Ok(exit),
            Ok((true, None)) => signal.notify()?,
            Ok((false, None)) => signal.wait()?,
            Err(e) => {
                let code = match &e {
                    XenstoredError::Ring(RingError::BadIndex { .. }) => XENSTORE_ERROR_RINGIDX,
                    XenstoredError::Wire(_) => XENSTORE_ERROR_PROTO,
                    _ => XENSTORE_ERROR_COMM,
                };
                page.set_error(code);
                // Best effort: the domain learns of the error from the page.
                let _ = signal.notify();
                return Err(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devchan::xenstore::ring::{OwnedRingPage, RingTransport};
    use devchan::xenstore::wire::XsdSockmsg;
    use devchan::xenstore::{Client, ClientError, MsgType, WireError};

    #[test]
    fn broken_indexes_set_the_error_word() {
        let xs = Xenstored::new();
        let mem = OwnedRingPage::new();
        let page = mem.view();
        let signal = Arc::new(EventFdSignal::new_nonblocking().unwrap());
        let xs2 = Arc::clone(&xs);
        let sig2 = Arc::clone(&signal);
        let server_page = mem.view();
        let t = std::thread::spawn(move || serve_ring(&xs2, 3, &server_page, &sig2));
        std::thread::sleep(std::time::Duration::from_millis(20));
        // A producer index far ahead of the consumer.
        let p = mem.as_ptr();
        // SAFETY: `p` is valid; the atomic view matches how the server reads the word.
        unsafe { std::sync::atomic::AtomicU32::from_ptr(std::ptr::addr_of_mut!((*p).req_prod)) }
            .store(5000, std::sync::atomic::Ordering::Release);
        signal.from_domain.write(1).unwrap();
        let r = t.join().unwrap();
        assert!(matches!(
            r,
            Err(XenstoredError::Ring(RingError::BadIndex { .. }))
        ));
        assert_eq!(page.error(), XENSTORE_ERROR_RINGIDX);
        assert!(xs.with_store(|s| s.conns_of(3).is_empty()));
    }

    fn start(
        xs: &Arc<Xenstored>,
        mem: &Arc<OwnedRingPage>,
        domid: DomId,
    ) -> (
        Arc<EventFdSignal>,
        std::thread::JoinHandle<Result<RingExit, XenstoredError>>,
    ) {
        let signal = Arc::new(EventFdSignal::new().unwrap());
        let (xs, mem2, sig) = (Arc::clone(xs), Arc::clone(mem), Arc::clone(&signal));
        let t = std::thread::spawn(move || serve_ring(&xs, domid, &mem2.view(), &sig));
        (signal, t)
    }

    fn client(
        mem: &OwnedRingPage,
        signal: &Arc<EventFdSignal>,
    ) -> Client<RingTransport<impl FnMut(), impl FnMut()>> {
        let (notify, wait) = signal.domain_side();
        Client::new(RingTransport::new(mem.view(), notify, wait))
    }

    #[test]
    fn reconnect_resets_the_ring_and_the_connection() {
        let xs = Xenstored::new();
        let mem = Arc::new(OwnedRingPage::new());
        let (signal, t) = start(&xs, &mem, 4);
        let mut c = client(&mem, &signal);
        c.watch("@releaseDomain", "w").unwrap();
        assert_eq!(xs.with_store(|s| s.watch_count(4)), 1);
        let page = mem.view();
        assert_eq!(page.server_features(), FEATURES);
        // Drain the initial watch event so the ring is idle, then ask for a reconnect.
        assert_eq!(c.next_event().unwrap().path, "@releaseDomain");
        page.request_reconnect();
        signal.from_domain.write(1).unwrap();
        while page.connection() == XENSTORE_RECONNECT {
            std::thread::yield_now();
        }
        let mut c = client(&mem, &signal);
        assert_eq!(c.get_domain_path(4).unwrap(), "/local/domain/4");
        assert_eq!(xs.with_store(|s| s.watch_count(4)), 0);
        xs.close_domain(4);
        assert_eq!(t.join().unwrap().unwrap(), RingExit::Released);
    }

    #[test]
    fn oversized_message_is_a_protocol_error() {
        let xs = Xenstored::new();
        let mem = Arc::new(OwnedRingPage::new());
        let (signal, t) = start(&xs, &mem, 6);
        let hdr = XsdSockmsg {
            r#type: MsgType::Read as u32,
            req_id: 1,
            tx_id: 0,
            len: 4097,
        };
        // Wait until the server has reset the page, then send the bad header.
        while mem.view().server_features() != FEATURES {
            std::thread::yield_now();
        }
        mem.view().write_request(&hdr.to_bytes()).unwrap();
        signal.from_domain.write(1).unwrap();
        let r = t.join().unwrap();
        assert!(
            matches!(r, Err(XenstoredError::Wire(WireError::TooLong(4097)))),
            "{r:?}"
        );
        assert_eq!(mem.view().error(), XENSTORE_ERROR_PROTO);
        let mut c = client(&mem, &signal);
        assert!(matches!(c.read(0, "/"), Err(ClientError::Io(_))));
    }
}
