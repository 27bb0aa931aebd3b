//! A XenStore client over any byte stream: a Unix socket to the daemon, or a domain's ring
//! ([`RingTransport`](super::ring::RingTransport)).
//!
//! Requests are sent one at a time and the client waits for the reply with the matching
//! `req_id`. `XS_WATCH_EVENT` messages that arrive meanwhile are queued and handed out by
//! [`Client::next_event`] / [`Client::take_events`]. Everything the daemon sends is checked:
//! a reply of the wrong type or request id is a [`ClientError::Protocol`] error.

use std::collections::VecDeque;
use std::io::{Read, Write};

use super::perms::Perm;
use super::request::split_strings;
use super::watch::WatchEvent;
use super::wire::{Decoder, Message, MsgType, WireError, XENSTORE_PAYLOAD_MAX};
use super::XsError;
use crate::grant::DomId;

/// A transaction id; [`NO_TX`] outside transactions.
pub type TxId = u32;
/// "No transaction".
pub const NO_TX: TxId = 0;

/// Client errors.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The transport failed.
    #[error("XenStore transport failed")]
    Io(#[from] std::io::Error),
    /// The daemon sent bytes that are not a message.
    #[error("Malformed message from the daemon")]
    Wire(#[from] WireError),
    /// The daemon answered with an error.
    #[error("XenStore error")]
    Xs(#[from] XsError),
    /// The daemon's reply made no sense for the request.
    #[error("Unexpected reply: {0}")]
    Protocol(String),
    /// The connection closed.
    #[error("Connection closed by the daemon")]
    Closed,
    /// The request does not fit in one message.
    #[error("Request payload exceeds XENSTORE_PAYLOAD_MAX")]
    TooLong,
}

/// Client result.
pub type Result<T> = std::result::Result<T, ClientError>;

/// A XenStore client.
pub struct Client<T: Read + Write> {
    io: T,
    decoder: Decoder,
    next_req: u32,
    events: VecDeque<WatchEvent>,
}

impl<T: Read + Write> Client<T> {
    /// A client over a connected transport.
    pub fn new(io: T) -> Self {
        Self {
            io,
            decoder: Decoder::new(),
            next_req: 1,
            events: VecDeque::new(),
        }
    }

    /// The transport.
    pub fn get_ref(&self) -> &T {
        &self.io
    }

    fn receive(&mut self) -> Result<Message> {
        loop {
            if let Some(m) = self.decoder.next_message()? {
                return Ok(m);
            }
            let mut buf = [0u8; 4096];
            let want = self.decoder.wanted().min(buf.len());
            let n = self.io.read(&mut buf[..want])?;
            if n == 0 {
                return Err(ClientError::Closed);
            }
            self.decoder.push(&buf[..n]);
        }
    }

    fn queue_event(&mut self, m: &Message) -> Result<()> {
        let ev = WatchEvent::parse(&m.payload)
            .ok_or_else(|| ClientError::Protocol("malformed watch event".into()))?;
        self.events.push_back(ev);
        Ok(())
    }

    /// Sends one request and returns the reply payload.
    pub fn request(&mut self, ty: MsgType, tx: TxId, payload: Vec<u8>) -> Result<Vec<u8>> {
        if payload.len() > XENSTORE_PAYLOAD_MAX {
            return Err(ClientError::TooLong);
        }
        let req_id = self.next_req;
        self.next_req = self.next_req.wrapping_add(1);
        self.io
            .write_all(&Message::new(ty, req_id, tx, payload).encode())?;
        self.io.flush()?;
        loop {
            let m = self.receive()?;
            if m.ty == MsgType::WatchEvent {
                self.queue_event(&m)?;
                continue;
            }
            if m.req_id != req_id {
                return Err(ClientError::Protocol(format!(
                    "reply to {} for {req_id}",
                    m.req_id
                )));
            }
            return match m.ty {
                MsgType::Error => Err(XsError::from_name(&m.payload).into()),
                t if t == ty => Ok(m.payload),
                t => Err(ClientError::Protocol(format!("{t:?} reply to {ty:?}"))),
            };
        }
    }

    fn path_req(&mut self, ty: MsgType, tx: TxId, path: &str) -> Result<Vec<u8>> {
        self.request(ty, tx, Message::strings(&[path.as_bytes()]))
    }

    /// Reads a node's value.
    pub fn read(&mut self, tx: TxId, path: &str) -> Result<Vec<u8>> {
        self.path_req(MsgType::Read, tx, path)
    }

    /// Writes a node's value, creating it (and missing parents).
    pub fn write(&mut self, tx: TxId, path: &str, value: &[u8]) -> Result<()> {
        let mut p = Message::strings(&[path.as_bytes()]);
        p.extend_from_slice(value);
        self.request(MsgType::Write, tx, p).map(drop)
    }

    /// Creates a node with an empty value (no error if it exists).
    pub fn mkdir(&mut self, tx: TxId, path: &str) -> Result<()> {
        self.path_req(MsgType::Mkdir, tx, path).map(drop)
    }

    /// Removes a node and its subtree.
    pub fn rm(&mut self, tx: TxId, path: &str) -> Result<()> {
        self.path_req(MsgType::Rm, tx, path).map(drop)
    }

    /// Lists a node's children.
    pub fn directory(&mut self, tx: TxId, path: &str) -> Result<Vec<String>> {
        let p = self.path_req(MsgType::Directory, tx, path)?;
        if p.is_empty() {
            return Ok(Vec::new());
        }
        let parts = split_strings(&p).map_err(|_| ClientError::Protocol("bad listing".into()))?;
        Ok(parts
            .into_iter()
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect())
    }

    /// A node's permissions.
    pub fn get_perms(&mut self, tx: TxId, path: &str) -> Result<Vec<Perm>> {
        let p = self.path_req(MsgType::GetPerms, tx, path)?;
        let parts = split_strings(&p).map_err(|_| ClientError::Protocol("bad perms".into()))?;
        parts
            .into_iter()
            .map(|s| Perm::parse(s).map_err(|_| ClientError::Protocol("bad perm".into())))
            .collect()
    }

    /// Replaces a node's permissions.
    pub fn set_perms(&mut self, tx: TxId, path: &str, perms: &[Perm]) -> Result<()> {
        let strs: Vec<String> = perms.iter().map(Perm::encode).collect();
        let mut parts: Vec<&[u8]> = vec![path.as_bytes()];
        parts.extend(strs.iter().map(String::as_bytes));
        self.request(MsgType::SetPerms, tx, Message::strings(&parts))
            .map(drop)
    }

    /// Registers a watch. Its first event (the path itself) follows.
    pub fn watch(&mut self, path: &str, token: &str) -> Result<()> {
        let p = Message::strings(&[path.as_bytes(), token.as_bytes()]);
        self.request(MsgType::Watch, NO_TX, p).map(drop)
    }

    /// Removes a watch.
    pub fn unwatch(&mut self, path: &str, token: &str) -> Result<()> {
        let p = Message::strings(&[path.as_bytes(), token.as_bytes()]);
        self.request(MsgType::Unwatch, NO_TX, p).map(drop)
    }

    /// Starts a transaction.
    pub fn transaction_start(&mut self) -> Result<TxId> {
        let p = self.request(MsgType::TransactionStart, NO_TX, b"\0".to_vec())?;
        let s = p.strip_suffix(&[0]).unwrap_or(&p);
        std::str::from_utf8(s)
            .ok()
            .and_then(|s| s.parse().ok())
            .filter(|id| *id != NO_TX)
            .ok_or_else(|| ClientError::Protocol("bad transaction id".into()))
    }

    /// Ends a transaction; `commit = false` aborts. A conflict is `Xs(XsError::Eagain)`.
    pub fn transaction_end(&mut self, tx: TxId, commit: bool) -> Result<()> {
        let p = if commit { b"T\0" } else { b"F\0" };
        self.request(MsgType::TransactionEnd, tx, p.to_vec())
            .map(drop)
    }

    /// `/local/domain/<domid>` as the daemon says.
    pub fn get_domain_path(&mut self, domid: DomId) -> Result<String> {
        let p = self.request(
            MsgType::GetDomainPath,
            NO_TX,
            Message::strings(&[domid.to_string().as_bytes()]),
        )?;
        let s = p.strip_suffix(&[0]).unwrap_or(&p);
        Ok(String::from_utf8_lossy(s).into_owned())
    }

    /// Introduces a domain (privileged).
    pub fn introduce(&mut self, domid: DomId, mfn: u64, port: u32) -> Result<()> {
        let (d, m, p) = (domid.to_string(), mfn.to_string(), port.to_string());
        let payload = Message::strings(&[d.as_bytes(), m.as_bytes(), p.as_bytes()]);
        self.request(MsgType::Introduce, NO_TX, payload).map(drop)
    }

    /// Releases a domain (privileged).
    pub fn release(&mut self, domid: DomId) -> Result<()> {
        self.request(
            MsgType::Release,
            NO_TX,
            Message::strings(&[domid.to_string().as_bytes()]),
        )
        .map(drop)
    }

    /// Whether a domain is introduced.
    pub fn is_domain_introduced(&mut self, domid: DomId) -> Result<bool> {
        let p = self.request(
            MsgType::IsDomainIntroduced,
            NO_TX,
            Message::strings(&[domid.to_string().as_bytes()]),
        )?;
        Ok(p.first() == Some(&b'T'))
    }

    /// Events received so far, without blocking.
    pub fn take_events(&mut self) -> Vec<WatchEvent> {
        self.events.drain(..).collect()
    }

    /// The next watch event, blocking until one arrives. Replies cannot arrive here (no
    /// request is outstanding), so anything else is a protocol error.
    pub fn next_event(&mut self) -> Result<WatchEvent> {
        if let Some(e) = self.events.pop_front() {
            return Ok(e);
        }
        let m = self.receive()?;
        if m.ty != MsgType::WatchEvent {
            return Err(ClientError::Protocol(format!("unsolicited {:?}", m.ty)));
        }
        self.queue_event(&m)?;
        self.events.pop_front().ok_or(ClientError::Closed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xenstore::store::Store;
    use std::collections::VecDeque;
    use std::io;

    /// A transport that runs each complete request through a store in-line.
    struct Loopback {
        store: Store,
        conn: u64,
        inbox: Decoder,
        outbox: VecDeque<u8>,
    }

    impl Read for Loopback {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.outbox.len());
            for (d, s) in buf.iter_mut().zip(self.outbox.drain(..n)) {
                *d = s;
            }
            Ok(n)
        }
    }

    impl Write for Loopback {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.inbox.push(buf);
            while let Some(m) = self.inbox.next_message().unwrap() {
                let r = self.store.handle(self.conn, &m);
                self.outbox.extend(r.reply.encode());
                for (c, e) in r.events {
                    if c == self.conn {
                        self.outbox.extend(e.encode());
                    }
                }
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn client(domid: DomId) -> Client<Loopback> {
        let mut store = Store::new();
        let conn = store.connect(domid);
        Client::new(Loopback {
            store,
            conn,
            inbox: Decoder::new(),
            outbox: VecDeque::new(),
        })
    }

    #[test]
    fn basic_operations() {
        let mut c = client(0);
        c.write(NO_TX, "/a/b", b"hello").unwrap();
        assert_eq!(c.read(NO_TX, "/a/b").unwrap(), b"hello");
        assert_eq!(c.directory(NO_TX, "/a").unwrap(), ["b"]);
        c.set_perms(NO_TX, "/a/b", &[Perm::new(3, 1)]).unwrap();
        assert_eq!(c.get_perms(NO_TX, "/a/b").unwrap(), [Perm::new(3, 1)]);
        c.mkdir(NO_TX, "/a/c").unwrap();
        assert_eq!(c.directory(NO_TX, "/a").unwrap(), ["b", "c"]);
        c.rm(NO_TX, "/a").unwrap();
        assert!(matches!(
            c.read(NO_TX, "/a/b"),
            Err(ClientError::Xs(XsError::Enoent))
        ));
        assert_eq!(c.get_domain_path(5).unwrap(), "/local/domain/5");
        assert!(c.is_domain_introduced(0).unwrap());
    }

    #[test]
    fn watches_are_demultiplexed() {
        let mut c = client(0);
        c.watch("/w", "tok").unwrap();
        c.write(NO_TX, "/w/x", b"1").unwrap();
        // The initial event arrived while waiting for the write's reply; the write's event
        // follows the reply.
        assert_eq!(
            c.take_events(),
            [WatchEvent {
                path: "/w".into(),
                token: b"tok".to_vec()
            }]
        );
        assert_eq!(c.next_event().unwrap().path, "/w/x");
        c.unwatch("/w", "tok").unwrap();
        c.write(NO_TX, "/w/y", b"1").unwrap();
        c.read(NO_TX, "/w/y").unwrap();
        assert!(c.take_events().is_empty());
    }

    #[test]
    fn transactions() {
        let mut c = client(0);
        let tx = c.transaction_start().unwrap();
        c.write(tx, "/t", b"1").unwrap();
        assert!(matches!(
            c.read(NO_TX, "/t"),
            Err(ClientError::Xs(XsError::Enoent))
        ));
        c.transaction_end(tx, true).unwrap();
        assert_eq!(c.read(NO_TX, "/t").unwrap(), b"1");
        let t1 = c.transaction_start().unwrap();
        c.read(t1, "/t").unwrap();
        c.write(NO_TX, "/t", b"2").unwrap();
        c.write(t1, "/u", b"x").unwrap();
        assert!(matches!(
            c.transaction_end(t1, true),
            Err(ClientError::Xs(XsError::Eagain))
        ));
        assert!(matches!(
            c.read(NO_TX, "/u"),
            Err(ClientError::Xs(XsError::Enoent))
        ));
    }
}
