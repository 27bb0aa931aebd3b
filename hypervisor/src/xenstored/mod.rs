//! xenstored: the XenStore daemon, serving [`devchan::xenstore::Store`] to clients.
//!
//! One [`Xenstored`] holds the store behind a mutex and routes output: each client is a
//! [`Connection`] with its own outbox, so a request's reply and the watch events it causes for
//! other clients are queued in one critical section and every client sees them in the order
//! the store produced them. Two transports feed connections:
//!
//! * [`socket`]: a Unix socket, one thread per client (plus one writing its outbox). Every
//!   socket client is domain 0, the toolstack, as with Xen's own xenstored. Xen's client
//!   library finds the socket through `XENSTORED_PATH` (else `$XENSTORED_RUNDIR/socket`, else
//!   `/var/run/xenstored/socket`).
//! * [`ring`]: a domain's `xenstore_domain_interface` page, given as a pointer plus a
//!   [`ring::RingSignal`] (notify the domain, wait for it), which is how process domains and
//!   Xen guests talk to the daemon.
//!
//! Run it standalone with the `xenstored` binary (`xenstored /tmp/xs.sock`, then
//! `XENSTORED_PATH=/tmp/xs.sock xenstore-ls`); `tests/xenstore_interop.rs` drives Xen's tools
//! against it and a domain over its ring, `tests/xenstore_concurrency.rs` races transactions.
//!
//! Nothing a client sends can stop the daemon: malformed messages get `EINVAL` (unknown type)
//! or close that one connection (broken framing, broken ring indexes), and the store bounds
//! what each unprivileged domain can consume.

pub mod domains;
pub mod ring;
pub mod socket;

use std::collections::HashMap;
use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex, MutexGuard};

use devchan::grant::DomId;
use devchan::xenstore::store::error_reply;
use devchan::xenstore::{
    ConnId, Decoder, DomainAction, MsgType, Quotas, Store, WireError, XsError,
};

/// Errors of the daemon's connections.
#[derive(Debug, thiserror::Error)]
pub enum XenstoredError {
    /// The client's byte stream cannot be framed.
    #[error("Client sent a malformed message stream")]
    Wire(#[from] WireError),
    /// The client broke the ring page protocol.
    #[error("Client broke the ring protocol")]
    Ring(#[from] devchan::xenstore::ring::RingError),
    /// The client let too much output pile up.
    #[error("Client does not read its replies ({0} bytes pending)")]
    Backlog(usize),
    /// Socket or signal I/O failed.
    #[error("Connection I/O failed")]
    Io(#[from] std::io::Error),
}

/// Output queued for a connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Output {
    /// Bytes to send (one encoded message).
    Bytes(Vec<u8>),
    /// The server dropped the connection (its domain was released): close it.
    Close,
}

/// Wakes a connection's transport when output is queued for it.
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// Called with each [`DomainAction`] (`XS_INTRODUCE`, `XS_RELEASE`) after the store applied it.
pub type DomainHook = Box<dyn Fn(DomainAction) + Send>;

struct Outbox {
    tx: Sender<Output>,
    waker: Option<Waker>,
}

struct State {
    store: Store,
    outboxes: HashMap<ConnId, Outbox>,
    counts: HashMap<MsgType, u64>,
}

/// The daemon's shared state.
pub struct Xenstored {
    state: Mutex<State>,
    hook: Mutex<Option<DomainHook>>,
}

impl Xenstored {
    /// A daemon with an empty store and default quotas.
    pub fn new() -> Arc<Self> {
        Self::with_quotas(Quotas::default())
    }

    /// A daemon with an empty store and the given quotas.
    pub fn with_quotas(quotas: Quotas) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                store: Store::with_quotas(quotas),
                outboxes: HashMap::new(),
                counts: HashMap::new(),
            }),
            hook: Mutex::new(None),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the store half-changed in a way that
        // matters more than stopping service, so keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Installs the hook that hears about introduced and released domains (the platform maps
    /// or unmaps their ring pages).
    pub fn set_domain_hook(&self, hook: DomainHook) {
        *self.hook.lock().unwrap_or_else(|p| p.into_inner()) = Some(hook);
    }

    /// Runs `f` on the store directly (in-process dom0 use and tests).
    pub fn with_store<R>(&self, f: impl FnOnce(&mut Store) -> R) -> R {
        f(&mut self.lock().store)
    }

    /// How many requests of type `ty` the daemon has handled.
    pub fn request_count(&self, ty: MsgType) -> u64 {
        self.lock().counts.get(&ty).copied().unwrap_or(0)
    }

    /// Closes every connection of `domid` (the domain died or is being destroyed): ring
    /// servers for it return, socket clients are shut down.
    pub fn close_domain(&self, domid: DomId) {
        let st = self.lock();
        for c in st.store.conns_of(domid) {
            Self::post(&st, c, Output::Close);
        }
    }

    /// Opens a connection for `domid`. `waker` is called whenever output is queued for it.
    pub fn connect(self: &Arc<Self>, domid: DomId, waker: Option<Waker>) -> Connection {
        let (tx, rx) = channel();
        let mut st = self.lock();
        let id = st.store.connect(domid);
        st.outboxes.insert(id, Outbox { tx, waker });
        Connection {
            id,
            domid,
            server: Arc::clone(self),
            rx,
            decoder: Decoder::new(),
        }
    }

    fn disconnect(&self, id: ConnId) {
        let mut st = self.lock();
        st.store.disconnect(id);
        st.outboxes.remove(&id);
    }

    fn post(st: &State, id: ConnId, out: Output) {
        if let Some(ob) = st.outboxes.get(&id) {
            // A send fails only if the connection is being torn down; nothing to do then.
            let _ = ob.tx.send(out);
            if let Some(w) = &ob.waker {
                w();
            }
        }
    }

    fn dispatch(&self, id: ConnId, msg: &devchan::xenstore::Message) {
        let action = {
            let mut st = self.lock();
            tracing::trace!(conn = id, ty = ?msg.ty, req = msg.req_id, tx = msg.tx_id, "request");
            *st.counts.entry(msg.ty).or_insert(0) += 1;
            let resp = st.store.handle(id, msg);
            Self::post(&st, id, Output::Bytes(resp.reply.encode()));
            for (to, ev) in resp.events {
                Self::post(&st, to, Output::Bytes(ev.encode()));
            }
            if let Some(DomainAction::Released(d)) = resp.action {
                for c in st.store.conns_of(d) {
                    Self::post(&st, c, Output::Close);
                }
            }
            resp.action
        };
        if let Some(a) = action {
            if let Some(h) = self.hook.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                h(a);
            }
        }
    }

    fn reply_error(&self, id: ConnId, req_id: u32, tx_id: u32, e: XsError) {
        let st = self.lock();
        Self::post(
            &st,
            id,
            Output::Bytes(error_reply(req_id, tx_id, e).encode()),
        );
    }
}

/// One client of the daemon. Dropping it forgets the client's watches and transactions.
pub struct Connection {
    id: ConnId,
    domid: DomId,
    server: Arc<Xenstored>,
    rx: Receiver<Output>,
    decoder: Decoder,
}

impl Connection {
    /// The store's id for this connection.
    pub fn id(&self) -> ConnId {
        self.id
    }

    /// The client's domain.
    pub fn domid(&self) -> DomId {
        self.domid
    }

    /// How many bytes the decoder wants next (to size reads).
    pub fn wanted(&self) -> usize {
        self.decoder.wanted()
    }

    /// Feeds bytes received from the client and handles every complete request. An unknown
    /// message type is answered with `EINVAL`; broken framing is an error and the connection
    /// must be closed.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), XenstoredError> {
        self.decoder.push(bytes);
        loop {
            match self.decoder.next_message() {
                Ok(Some(msg)) => self.server.dispatch(self.id, &msg),
                Ok(None) => return Ok(()),
                Err(WireError::UnknownType { req_id, tx_id, .. }) => {
                    self.server
                        .reply_error(self.id, req_id, tx_id, XsError::Einval);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Output queued for the client, without blocking.
    pub fn try_output(&self) -> Option<Output> {
        match self.rx.try_recv() {
            Ok(o) => Some(o),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => Some(Output::Close),
        }
    }

    /// The receiving end of the outbox, for a writer thread.
    fn take_receiver(&mut self) -> Receiver<Output> {
        let (_tx, dummy) = channel();
        std::mem::replace(&mut self.rx, dummy)
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.server.disconnect(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devchan::xenstore::{Message, MsgType};

    fn next_msg(c: &Connection) -> Message {
        let Some(Output::Bytes(b)) = c.try_output() else {
            panic!("no output")
        };
        let mut d = Decoder::new();
        d.push(&b);
        d.next_message().unwrap().unwrap()
    }

    #[test]
    fn routes_replies_and_events() {
        let xs = Xenstored::new();
        let mut a = xs.connect(0, None);
        let mut b = xs.connect(0, None);
        b.feed(&Message::new(MsgType::Watch, 1, 0, b"/x\0t\0".to_vec()).encode())
            .unwrap();
        assert_eq!(next_msg(&b).ty, MsgType::Watch);
        assert_eq!(next_msg(&b).ty, MsgType::WatchEvent);
        a.feed(&Message::new(MsgType::Write, 2, 0, b"/x/y\0v".to_vec()).encode())
            .unwrap();
        assert_eq!(next_msg(&a).payload, b"OK\0");
        assert_eq!(next_msg(&b).payload, b"/x/y\0t\0");
        assert!(a.try_output().is_none());
    }

    #[test]
    fn unknown_type_gets_einval_and_bad_length_is_fatal() {
        let xs = Xenstored::new();
        let mut a = xs.connect(0, None);
        let mut bytes = devchan::xenstore::wire::XsdSockmsg {
            r#type: 20,
            req_id: 9,
            tx_id: 0,
            len: 0,
        }
        .to_bytes()
        .to_vec();
        a.feed(&bytes).unwrap();
        let m = next_msg(&a);
        assert_eq!(
            (m.ty, m.req_id, m.payload.as_slice()),
            (MsgType::Error, 9, &b"EINVAL\0"[..])
        );
        bytes = devchan::xenstore::wire::XsdSockmsg {
            r#type: 2,
            req_id: 1,
            tx_id: 0,
            len: 5000,
        }
        .to_bytes()
        .to_vec();
        assert!(matches!(
            a.feed(&bytes),
            Err(XenstoredError::Wire(WireError::TooLong(5000)))
        ));
    }

    #[test]
    fn release_closes_the_domains_connections_and_calls_the_hook() {
        let xs = Xenstored::new();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = Arc::clone(&seen);
        xs.set_domain_hook(Box::new(move |a| s2.lock().unwrap().push(a)));
        let mut dom0 = xs.connect(0, None);
        let guest = xs.connect(5, None);
        dom0.feed(&Message::new(MsgType::Introduce, 1, 0, b"5\x00100\x007\0".to_vec()).encode())
            .unwrap();
        dom0.feed(&Message::new(MsgType::Release, 2, 0, b"5\0".to_vec()).encode())
            .unwrap();
        assert_eq!(guest.try_output(), Some(Output::Close));
        assert_eq!(
            *seen.lock().unwrap(),
            [
                DomainAction::Introduced {
                    domid: 5,
                    mfn: 100,
                    port: 7
                },
                DomainAction::Released(5)
            ]
        );
        drop(guest);
        assert!(xs.with_store(|s| s.conns_of(5).is_empty()));
    }
}
