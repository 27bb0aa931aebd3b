//! The XenStore wire protocol (`xen/include/public/io/xs_wire.h`).
//!
//! Every message, in either direction and over either transport (a Unix socket or the shared
//! ring page), is a 16-byte header followed by `len` payload bytes:
//!
//! ```text
//! offset  size  field
//!      0     4  type    enum xsd_sockmsg_type (XS_READ, XS_WRITE, ...), native endian
//!      4     4  req_id  chosen by the client, echoed in the reply
//!      8     4  tx_id   transaction id, 0 outside a transaction
//!     12     4  len     payload length, at most XENSTORE_PAYLOAD_MAX (4096)
//!     16   len  payload generally NUL-terminated strings (see `request`)
//! ```
//!
//! A reply has the request's type, `req_id` and `tx_id`, or type `XS_ERROR` with an errno name
//! such as `"ENOENT\0"` as payload. `XS_WATCH_EVENT` messages (`"path\0token\0"`) arrive at any
//! time, interleaved with replies, with `req_id` 0.
//!
//! [`Decoder`] reassembles messages from bytes that arrive in arbitrary pieces. A header whose
//! `len` exceeds [`XENSTORE_PAYLOAD_MAX`] is a fatal framing error (the byte stream cannot be
//! resynchronised); an unknown type is reported with the request id so the server can answer
//! `EINVAL` and carry on.

use std::collections::VecDeque;

/// Size of [`XsdSockmsg`], the header in front of every message.
pub const HEADER_LEN: usize = 16;
/// Largest payload a message may carry (`XENSTORE_PAYLOAD_MAX`).
pub const XENSTORE_PAYLOAD_MAX: usize = 4096;
/// Longest absolute path (`XENSTORE_ABS_PATH_MAX`).
pub const XENSTORE_ABS_PATH_MAX: usize = 3072;
/// Longest relative path (`XENSTORE_REL_PATH_MAX`).
pub const XENSTORE_REL_PATH_MAX: usize = 2048;

/// The number `XS_RESTRICT` had before it was removed; never reuse it.
pub const XS_RESTRICT_RESERVED: u32 = 20;
/// Number of message type values, including the reserved one (`XS_TYPE_COUNT`).
pub const XS_TYPE_COUNT: u32 = 23;
/// A type value guaranteed never to be valid (`XS_INVALID`).
pub const XS_INVALID: u32 = 0xffff;

/// `XS_WRITE_NONE`, `XS_WRITE_CREATE`, `XS_WRITE_CREATE_EXCL`: flags of the historical write
/// protocol, kept for reference; modern clients never send them.
pub const XS_WRITE_NONE: &str = "NONE";
/// See [`XS_WRITE_NONE`].
pub const XS_WRITE_CREATE: &str = "CREATE";
/// See [`XS_WRITE_NONE`].
pub const XS_WRITE_CREATE_EXCL: &str = "CREATE|EXCL";

/// Index of the path in a `XS_WATCH_EVENT` payload (`XS_WATCH_PATH`).
pub const XS_WATCH_PATH: u32 = 0;
/// Index of the token in a `XS_WATCH_EVENT` payload (`XS_WATCH_TOKEN`).
pub const XS_WATCH_TOKEN: u32 = 1;

/// The message header, exactly `struct xsd_sockmsg`. Fields are native-endian `u32`s.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XsdSockmsg {
    /// `enum xsd_sockmsg_type` as a raw integer.
    pub r#type: u32,
    /// Request identifier, echoed in the reply.
    pub req_id: u32,
    /// Transaction id, 0 if none.
    pub tx_id: u32,
    /// Payload length.
    pub len: u32,
}

const _: () = assert!(core::mem::size_of::<XsdSockmsg>() == HEADER_LEN);

impl XsdSockmsg {
    /// Parses a header from its 16 wire bytes.
    pub fn from_bytes(b: &[u8; HEADER_LEN]) -> Self {
        let word = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Self {
            r#type: word(0),
            req_id: word(4),
            tx_id: word(8),
            len: word(12),
        }
    }

    /// The 16 wire bytes of this header.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&self.r#type.to_ne_bytes());
        b[4..8].copy_from_slice(&self.req_id.to_ne_bytes());
        b[8..12].copy_from_slice(&self.tx_id.to_ne_bytes());
        b[12..16].copy_from_slice(&self.len.to_ne_bytes());
        b
    }
}

macro_rules! msg_types {
    ($($(#[$doc:meta])* $name:ident = $value:expr, $c:literal;)*) => {
        /// A message type (`enum xsd_sockmsg_type`). Decode raw values with `TryFrom<u32>`;
        /// the removed `XS_RESTRICT` (20) is not a variant and decodes as an error.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum MsgType {
            $($(#[$doc])* $name = $value,)*
        }

        impl MsgType {
            /// Every type with the name Xen's header gives it.
            pub const ALL: &'static [(MsgType, &'static str)] = &[$((MsgType::$name, $c),)*];
        }

        impl TryFrom<u32> for MsgType {
            type Error = u32;
            fn try_from(v: u32) -> Result<Self, u32> {
                match v {
                    $($value => Ok(MsgType::$name),)*
                    other => Err(other),
                }
            }
        }
    };
}

msg_types! {
    /// `XS_CONTROL` (alias `XS_DEBUG`): daemon control commands.
    Control = 0, "XS_CONTROL";
    /// `XS_DIRECTORY`: list a node's children.
    Directory = 1, "XS_DIRECTORY";
    /// `XS_READ`: read a node's value.
    Read = 2, "XS_READ";
    /// `XS_GET_PERMS`: read a node's permissions.
    GetPerms = 3, "XS_GET_PERMS";
    /// `XS_WATCH`: register a watch.
    Watch = 4, "XS_WATCH";
    /// `XS_UNWATCH`: remove a watch.
    Unwatch = 5, "XS_UNWATCH";
    /// `XS_TRANSACTION_START`.
    TransactionStart = 6, "XS_TRANSACTION_START";
    /// `XS_TRANSACTION_END`: commit (`T`) or abort (`F`).
    TransactionEnd = 7, "XS_TRANSACTION_END";
    /// `XS_INTRODUCE`: the toolstack announces a domain's ring page and event channel.
    Introduce = 8, "XS_INTRODUCE";
    /// `XS_RELEASE`: the toolstack forgets a domain.
    Release = 9, "XS_RELEASE";
    /// `XS_GET_DOMAIN_PATH`: `/local/domain/<domid>`.
    GetDomainPath = 10, "XS_GET_DOMAIN_PATH";
    /// `XS_WRITE`: write a node's value, creating it and missing parents.
    Write = 11, "XS_WRITE";
    /// `XS_MKDIR`: create a node with an empty value.
    Mkdir = 12, "XS_MKDIR";
    /// `XS_RM`: remove a node and its subtree.
    Rm = 13, "XS_RM";
    /// `XS_SET_PERMS`: replace a node's permissions.
    SetPerms = 14, "XS_SET_PERMS";
    /// `XS_WATCH_EVENT`: asynchronous watch notification from the daemon.
    WatchEvent = 15, "XS_WATCH_EVENT";
    /// `XS_ERROR`: error reply, payload is an errno name.
    Error = 16, "XS_ERROR";
    /// `XS_IS_DOMAIN_INTRODUCED`: `T` or `F`.
    IsDomainIntroduced = 17, "XS_IS_DOMAIN_INTRODUCED";
    /// `XS_RESUME`: clear a domain's shutdown flag.
    Resume = 18, "XS_RESUME";
    /// `XS_SET_TARGET`: let a (device-model) domain act for a target domain.
    SetTarget = 19, "XS_SET_TARGET";
    /// `XS_RESET_WATCHES`: drop all of the connection's watches and transactions.
    ResetWatches = 21, "XS_RESET_WATCHES";
    /// `XS_DIRECTORY_PART`: a directory listing in pieces, for large directories.
    DirectoryPart = 22, "XS_DIRECTORY_PART";
}

/// Errors of the byte-stream decoder.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The header announces more payload than the protocol allows. Fatal: the stream is lost.
    #[error("Payload length {0} exceeds XENSTORE_PAYLOAD_MAX")]
    TooLong(u32),
    /// The header names no known message type. The message was skipped; answer `EINVAL`.
    #[error("Unknown message type {ty} (request {req_id})")]
    UnknownType {
        /// The raw type value.
        ty: u32,
        /// The request id, to address the error reply.
        req_id: u32,
        /// The transaction id of the message.
        tx_id: u32,
    },
}

impl WireError {
    /// Whether the stream can continue after this error.
    pub fn is_fatal(&self) -> bool {
        matches!(self, WireError::TooLong(_))
    }
}

/// One complete message, header decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Message type.
    pub ty: MsgType,
    /// Request id.
    pub req_id: u32,
    /// Transaction id.
    pub tx_id: u32,
    /// Payload, at most [`XENSTORE_PAYLOAD_MAX`] bytes.
    pub payload: Vec<u8>,
}

impl Message {
    /// A message; the payload must fit [`XENSTORE_PAYLOAD_MAX`] for [`Message::encode`].
    pub fn new(ty: MsgType, req_id: u32, tx_id: u32, payload: impl Into<Vec<u8>>) -> Self {
        Self {
            ty,
            req_id,
            tx_id,
            payload: payload.into(),
        }
    }

    /// A reply to `req` with the given type and payload.
    pub fn reply_to(req: &Message, ty: MsgType, payload: impl Into<Vec<u8>>) -> Self {
        Self::new(ty, req.req_id, req.tx_id, payload)
    }

    /// A payload of NUL-terminated strings.
    pub fn strings(parts: &[&[u8]]) -> Vec<u8> {
        let mut v = Vec::new();
        for p in parts {
            v.extend_from_slice(p);
            v.push(0);
        }
        v
    }

    /// Header plus payload, ready to send. Payloads longer than the maximum are truncated
    /// (callers bound them; this keeps the wire well-formed whatever happens).
    pub fn encode(&self) -> Vec<u8> {
        let len = self.payload.len().min(XENSTORE_PAYLOAD_MAX);
        let hdr = XsdSockmsg {
            r#type: self.ty as u32,
            req_id: self.req_id,
            tx_id: self.tx_id,
            len: u32::try_from(len).unwrap_or(0),
        };
        let mut v = Vec::with_capacity(HEADER_LEN + len);
        v.extend_from_slice(&hdr.to_bytes());
        v.extend_from_slice(&self.payload[..len]);
        v
    }
}

/// Incremental decoder: feed bytes with [`Decoder::push`] as they arrive, take messages with
/// [`Decoder::next_message`]. Buffers at most one partial message plus what was pushed.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: VecDeque<u8>,
    failed: Option<WireError>,
}

impl Decoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.failed.is_none() {
            self.buf.extend(bytes);
        }
    }

    /// Bytes buffered but not yet returned as a message.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// How many more bytes the decoder needs before the current message is complete.
    pub fn wanted(&self) -> usize {
        if self.buf.len() < HEADER_LEN {
            return HEADER_LEN - self.buf.len();
        }
        let len = self.header().len as usize;
        (HEADER_LEN + len.min(XENSTORE_PAYLOAD_MAX))
            .saturating_sub(self.buf.len())
            .max(1)
    }

    fn header(&self) -> XsdSockmsg {
        let mut h = [0u8; HEADER_LEN];
        for (d, s) in h.iter_mut().zip(self.buf.iter()) {
            *d = *s;
        }
        XsdSockmsg::from_bytes(&h)
    }

    /// The next complete message, `Ok(None)` if more bytes are needed. After a fatal error the
    /// decoder keeps returning it.
    pub fn next_message(&mut self) -> Result<Option<Message>, WireError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let hdr = self.header();
        let len = hdr.len as usize;
        if len > XENSTORE_PAYLOAD_MAX {
            let e = WireError::TooLong(hdr.len);
            self.failed = Some(e.clone());
            self.buf.clear();
            return Err(e);
        }
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        self.buf.drain(..HEADER_LEN);
        let payload: Vec<u8> = self.buf.drain(..len).collect();
        match MsgType::try_from(hdr.r#type) {
            Ok(ty) => Ok(Some(Message {
                ty,
                req_id: hdr.req_id,
                tx_id: hdr.tx_id,
                payload,
            })),
            Err(ty) => Err(WireError::UnknownType {
                ty,
                req_id: hdr.req_id,
                tx_id: hdr.tx_id,
            }),
        }
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn header_round_trip_and_layout() {
        let h = XsdSockmsg {
            r#type: 2,
            req_id: 7,
            tx_id: 9,
            len: 5,
        };
        assert_eq!(XsdSockmsg::from_bytes(&h.to_bytes()), h);
        assert_eq!(core::mem::offset_of!(XsdSockmsg, len), 12);
    }

    #[test]
    fn type_numbers_match_header() {
        assert_eq!(MsgType::try_from(19), Ok(MsgType::SetTarget));
        assert_eq!(MsgType::try_from(XS_RESTRICT_RESERVED), Err(20));
        assert_eq!(MsgType::try_from(21), Ok(MsgType::ResetWatches));
        assert_eq!(MsgType::try_from(XS_TYPE_COUNT), Err(23));
        assert_eq!(MsgType::ALL.len() as u32, XS_TYPE_COUNT - 1);
    }

    #[test]
    fn decodes_in_pieces() {
        let m = Message::new(MsgType::Write, 3, 0, b"/a\0b".to_vec());
        let bytes = m.encode();
        let mut d = Decoder::new();
        for b in &bytes[..bytes.len() - 1] {
            d.push(&[*b]);
            assert_eq!(d.next_message(), Ok(None));
        }
        d.push(&bytes[bytes.len() - 1..]);
        assert_eq!(d.next_message(), Ok(Some(m)));
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn rejects_oversized_and_unknown() {
        let mut d = Decoder::new();
        let h = XsdSockmsg {
            r#type: 2,
            req_id: 1,
            tx_id: 0,
            len: 4097,
        };
        d.push(&h.to_bytes());
        assert_eq!(d.next_message(), Err(WireError::TooLong(4097)));
        assert!(d.next_message().unwrap_err().is_fatal());

        let mut d = Decoder::new();
        let h = XsdSockmsg {
            r#type: 20,
            req_id: 5,
            tx_id: 0,
            len: 1,
        };
        d.push(&h.to_bytes());
        d.push(b"x");
        d.push(&Message::new(MsgType::Read, 6, 0, b"/\0".to_vec()).encode());
        let e = d.next_message().unwrap_err();
        assert_eq!(
            e,
            WireError::UnknownType {
                ty: 20,
                req_id: 5,
                tx_id: 0
            }
        );
        assert!(!e.is_fatal());
        assert_eq!(d.next_message().unwrap().unwrap().req_id, 6);
    }

    fn arb_msg() -> impl Strategy<Value = Message> {
        (
            prop::sample::select(MsgType::ALL.iter().map(|(t, _)| *t).collect::<Vec<_>>()),
            any::<u32>(),
            any::<u32>(),
            prop::collection::vec(any::<u8>(), 0..300),
        )
            .prop_map(|(ty, r, t, p)| Message::new(ty, r, t, p))
    }

    proptest! {
        #[test]
        fn split_points_do_not_matter(
            msgs in prop::collection::vec(arb_msg(), 1..6),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
        ) {
            let stream: Vec<u8> = msgs.iter().flat_map(|m| m.encode()).collect();
            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
            points.push(0);
            points.push(stream.len());
            points.sort_unstable();
            let mut d = Decoder::new();
            let mut out = Vec::new();
            for w in points.windows(2) {
                d.push(&stream[w[0]..w[1]]);
                while let Some(m) = d.next_message().unwrap() {
                    out.push(m);
                }
            }
            prop_assert_eq!(out, msgs);
            prop_assert_eq!(d.buffered(), 0);
        }
    }
}
