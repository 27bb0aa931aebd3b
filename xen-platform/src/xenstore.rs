//! A minimal XenStore client: read and write keys over `/dev/xen/xenbus` or xenstored's socket.
//!
//! # Wire (`xen/include/public/io/xs_wire.h`)
//!
//! Every message is a 16-byte header of native-endian `u32`s — `type`, `req_id` (echoed),
//! `tx_id` (0: no transaction), `len` — followed by `len` ≤ [`PAYLOAD_MAX`] payload bytes.
//! `XS_READ` sends `path\0` and gets the value (no terminator); `XS_WRITE` sends `path\0value`
//! and gets `OK\0`; `XS_SET_PERMS` sends `path\0` and one `\0`-terminated permission per entry
//! (`n5`: owner domain 5, no access for others; `r0`: domain 0 may read); a failure is `XS_ERROR` with an errno name such as `ENOENT\0`. Watch events
//! (`XS_WATCH_EVENT`) can arrive between replies; this client sets no watch and skips them.
//!
//! Why not a crate: the Rust XenStore crates bind `libxenstore` (C, not installed on the
//! build hosts); the two requests a backend needs are a few lines on the documented wire.
//!
//! Replies come from xenstored (dom0's, trusted by a dom0 backend), but they are still
//! bounded and checked: a wrong `req_id`, an oversized length or a short read is an error,
//! never a panic.

use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// `XS_READ`.
pub const XS_READ: u32 = 2;
/// `XS_WRITE`.
pub const XS_WRITE: u32 = 11;
/// `XS_RM`.
pub const XS_RM: u32 = 13;
/// `XS_SET_PERMS`.
pub const XS_SET_PERMS: u32 = 14;
/// `XS_WATCH_EVENT`.
pub const XS_WATCH_EVENT: u32 = 15;
/// `XS_ERROR`.
pub const XS_ERROR: u32 = 16;
/// `XENSTORE_PAYLOAD_MAX`.
pub const PAYLOAD_MAX: usize = 4096;

/// Why a XenStore request failed.
#[derive(Debug, thiserror::Error)]
pub enum XenStoreError {
    /// The connection could not be opened or broke.
    #[error("XenStore connection")]
    Io(#[from] io::Error),
    /// xenstored answered with an error (`ENOENT`, `EACCES`, ...).
    #[error("XenStore {op} {path}: {error}")]
    Refused {
        /// The request.
        op: &'static str,
        /// The key.
        path: String,
        /// xenstored's errno name.
        error: String,
    },
    /// The reply does not follow the protocol.
    #[error("Malformed XenStore reply: {0}")]
    Malformed(&'static str),
    /// The request is too long for one message.
    #[error("XenStore request too long ({0} bytes)")]
    TooLong(usize),
}

/// The header of a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Message type.
    pub ty: u32,
    /// Request id.
    pub req_id: u32,
    /// Transaction id.
    pub tx_id: u32,
    /// Payload length.
    pub len: u32,
}

impl Header {
    /// The 16 wire bytes.
    pub fn encode(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        for (i, v) in [self.ty, self.req_id, self.tx_id, self.len]
            .into_iter()
            .enumerate()
        {
            b[4 * i..4 * i + 4].copy_from_slice(&v.to_ne_bytes());
        }
        b
    }
    /// Parse 16 wire bytes.
    pub fn decode(b: &[u8; 16]) -> Self {
        let u = |i: usize| u32::from_ne_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]);
        Self {
            ty: u(0),
            req_id: u(1),
            tx_id: u(2),
            len: u(3),
        }
    }
}

trait Conn: Read + Write + Send {}
impl<T: Read + Write + Send> Conn for T {}

/// A XenStore connection.
pub struct XenStore {
    conn: Box<dyn Conn>,
    next_id: u32,
}

impl std::fmt::Debug for XenStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XenStore").finish_non_exhaustive()
    }
}

impl XenStore {
    /// Connect through `path`: a Unix socket (xenstored's) or a device (`/dev/xen/xenbus`).
    pub fn open(path: &Path) -> Result<Self, XenStoreError> {
        let conn: Box<dyn Conn> = match UnixStream::connect(path) {
            Ok(s) => Box::new(s),
            Err(_) => Box::new(OpenOptions::new().read(true).write(true).open(path)?),
        };
        Ok(Self::over(conn))
    }

    /// A client over any byte stream (for tests).
    pub fn over<T: Read + Write + Send + 'static>(conn: T) -> Self {
        Self {
            conn: Box::new(conn),
            next_id: 1,
        }
    }

    fn request(
        &mut self,
        ty: u32,
        op: &'static str,
        path: &str,
        payload: &[u8],
    ) -> Result<Vec<u8>, XenStoreError> {
        if payload.len() > PAYLOAD_MAX {
            return Err(XenStoreError::TooLong(payload.len()));
        }
        let req_id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let h = Header {
            ty,
            req_id,
            tx_id: 0,
            // Bounded by PAYLOAD_MAX above.
            len: u32::try_from(payload.len()).unwrap_or(0),
        };
        // One write per message: the xenbus device wants a whole message per write.
        let mut msg = h.encode().to_vec();
        msg.extend_from_slice(payload);
        self.conn.write_all(&msg)?;
        loop {
            let mut hb = [0u8; 16];
            self.conn.read_exact(&mut hb)?;
            let rh = Header::decode(&hb);
            let len = rh.len as usize;
            if len > PAYLOAD_MAX {
                return Err(XenStoreError::Malformed(
                    "payload longer than XENSTORE_PAYLOAD_MAX",
                ));
            }
            let mut body = vec![0u8; len];
            self.conn.read_exact(&mut body)?;
            if rh.ty == XS_WATCH_EVENT {
                continue;
            }
            if rh.req_id != req_id {
                return Err(XenStoreError::Malformed("reply to another request"));
            }
            if rh.ty == XS_ERROR {
                let name = body.split(|&b| b == 0).next().unwrap_or_default();
                return Err(XenStoreError::Refused {
                    op,
                    path: path.to_string(),
                    error: String::from_utf8_lossy(name).into_owned(),
                });
            }
            if rh.ty != ty {
                return Err(XenStoreError::Malformed("reply of another type"));
            }
            return Ok(body);
        }
    }

    /// The value of `path`, `None` if it does not exist.
    pub fn read(&mut self, path: &str) -> Result<Option<String>, XenStoreError> {
        let mut p = path.as_bytes().to_vec();
        p.push(0);
        match self.request(XS_READ, "read", path, &p) {
            Ok(v) => Ok(Some(String::from_utf8_lossy(&v).into_owned())),
            Err(XenStoreError::Refused { error, .. }) if error == "ENOENT" => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Read `path` as a number; `None` if missing, an error if present and not a number.
    pub fn read_u64(&mut self, path: &str) -> Result<Option<u64>, XenStoreError> {
        match self.read(path)? {
            None => Ok(None),
            Some(v) => v
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| XenStoreError::Malformed("a number key holds something else")),
        }
    }

    /// Set `path` to `value`.
    pub fn write(&mut self, path: &str, value: &str) -> Result<(), XenStoreError> {
        let mut p = path.as_bytes().to_vec();
        p.push(0);
        p.extend_from_slice(value.as_bytes());
        self.request(XS_WRITE, "write", path, &p).map(|_| ())
    }
}

impl XenStore {
    /// Set the permissions of `path`: the first names the owner (and everyone's default
    /// access), the others grant access to more domains (`r<dom>`, `w<dom>`, `b<dom>`).
    pub fn set_perms(&mut self, path: &str, perms: &[String]) -> Result<(), XenStoreError> {
        let mut p = path.as_bytes().to_vec();
        p.push(0);
        for perm in perms {
            p.extend_from_slice(perm.as_bytes());
            p.push(0);
        }
        self.request(XS_SET_PERMS, "set-perms", path, &p)
            .map(|_| ())
    }
}

/// An in-memory xenstored for the tests of this crate.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use std::collections::BTreeMap;
    use std::thread;

    /// A tiny in-memory xenstored on the other end of a socket pair.
    pub(crate) fn fake() -> XenStore {
        let (a, mut b) = UnixStream::pair().unwrap();
        thread::spawn(move || {
            let mut store = BTreeMap::<String, Vec<u8>>::new();
            loop {
                let mut hb = [0u8; 16];
                if b.read_exact(&mut hb).is_err() {
                    return;
                }
                let h = Header::decode(&hb);
                let mut body = vec![0u8; h.len as usize];
                b.read_exact(&mut body).unwrap();
                let nul = body.iter().position(|&c| c == 0).unwrap();
                let path = String::from_utf8(body[..nul].to_vec()).unwrap();
                // A stray watch event first, which the client must skip.
                let ev = Header {
                    ty: XS_WATCH_EVENT,
                    req_id: 0,
                    tx_id: 0,
                    len: 2,
                };
                b.write_all(&ev.encode()).unwrap();
                b.write_all(b"a\0").unwrap();
                let (ty, reply) = match h.ty {
                    XS_READ => match store.get(&path) {
                        Some(v) => (XS_READ, v.clone()),
                        None => (XS_ERROR, b"ENOENT\0".to_vec()),
                    },
                    XS_WRITE => {
                        // Like xenstored: missing parents are created, empty.
                        let mut at = 0;
                        while let Some(i) = path[at + 1..].find('/') {
                            at += i + 1;
                            store.entry(path[..at].to_string()).or_default();
                        }
                        store.insert(path, body[nul + 1..].to_vec());
                        (XS_WRITE, b"OK\0".to_vec())
                    }
                    XS_SET_PERMS if store.contains_key(&path) => {
                        store.insert(format!("{path}/@perms"), body[nul + 1..].to_vec());
                        (XS_SET_PERMS, b"OK\0".to_vec())
                    }
                    _ => (XS_ERROR, b"EINVAL\0".to_vec()),
                };
                let rh = Header {
                    ty,
                    req_id: h.req_id,
                    tx_id: 0,
                    len: u32::try_from(reply.len()).unwrap(),
                };
                b.write_all(&rh.encode()).unwrap();
                b.write_all(&reply).unwrap();
            }
        });
        XenStore::over(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::thread;

    #[test]
    fn read_write_and_missing_keys() {
        let mut xs = super::testing::fake();
        assert_eq!(xs.read("/a/b").unwrap(), None);
        xs.write("/a/b", "42").unwrap();
        assert_eq!(xs.read("/a/b").unwrap().as_deref(), Some("42"));
        assert_eq!(xs.read_u64("/a/b").unwrap(), Some(42));
        xs.write("/a/c", "x").unwrap();
        assert!(xs.read_u64("/a/c").is_err());
    }

    #[test]
    fn replies_that_break_the_protocol_are_errors() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut xs = XenStore::over(a);
        thread::spawn(move || {
            let mut hb = [0u8; 16];
            b.read_exact(&mut hb).unwrap();
            let h = Header::decode(&hb);
            let mut body = vec![0u8; h.len as usize];
            b.read_exact(&mut body).unwrap();
            let rh = Header {
                ty: XS_READ,
                req_id: h.req_id,
                tx_id: 0,
                len: 1 << 20,
            };
            b.write_all(&rh.encode()).unwrap();
        });
        assert!(matches!(xs.read("/x"), Err(XenStoreError::Malformed(_))));
        assert!(matches!(
            xs.write("/x", &"v".repeat(5000)),
            Err(XenStoreError::TooLong(_))
        ));
    }

    proptest! {
        #[test]
        fn headers_round_trip(ty: u32, req_id: u32, tx_id: u32, len: u32) {
            let h = Header { ty, req_id, tx_id, len };
            prop_assert_eq!(Header::decode(&h.encode()), h);
        }
    }

    #[test]
    fn on_xen_dom0_reads_its_domid() {
        let Ok(mut xs) = XenStore::open(Path::new("/dev/xen/xenbus")) else {
            eprintln!("SKIP: no /dev/xen/xenbus (not a Xen domain)");
            return;
        };
        let Ok(v) = xs.read("domid") else {
            eprintln!("SKIP: xenstored not reachable");
            return;
        };
        assert!(v.is_some());
    }
}
