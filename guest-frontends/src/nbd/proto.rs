//! NBD wire format (the NetworkBlockDevice project's `doc/proto.md`): constants, and parsers
//! for everything a client sends. All integers are big-endian.
//!
//! # Handshake (fixed newstyle)
//!
//! ```text
//! S: u64 NBDMAGIC  u64 IHAVEOPT  u16 handshake flags (FIXED_NEWSTYLE | NO_ZEROES)
//! C: u32 client flags
//! C: u64 IHAVEOPT  u32 option  u32 length  [length bytes]          (repeated)
//! S: u64 REPLY_MAGIC  u32 option  u32 reply type  u32 length  [data] (per option)
//! ```
//!
//! `NBD_OPT_INFO`/`NBD_OPT_GO` data: u32 name length, name, u16 count, count × u16 info type.
//! The server answers `NBD_REP_INFO` (u16 `NBD_INFO_EXPORT`, u64 size, u16 transmission
//! flags; u16 `NBD_INFO_BLOCK_SIZE`, u32 min, u32 preferred, u32 max) then `NBD_REP_ACK`.
//! `NBD_OPT_EXPORT_NAME` data is the name; the reply is u64 size, u16 flags and 124 zero bytes
//! (left out when the client set `NBD_FLAG_C_NO_ZEROES`).
//!
//! # Transmission
//!
//! ```text
//! C: u32 REQUEST_MAGIC  u16 command flags  u16 type  u64 cookie  u64 offset  u32 length
//!    [length bytes for NBD_CMD_WRITE]
//! S: u32 SIMPLE_REPLY_MAGIC  u32 error  u64 cookie  [length bytes for a successful READ]
//! ```

/// First word of the server's greeting (`"NBDMAGIC"`).
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// Second word of the greeting and prefix of every option (`"IHAVEOPT"`).
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Prefix of option replies.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Prefix of transmission requests.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of simple replies.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flag: fixed newstyle.
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server may omit the 124 zero bytes.
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: omit the zero bytes.
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Options.
pub const NBD_OPT_EXPORT_NAME: u32 = 1;
/// Abort the handshake.
pub const NBD_OPT_ABORT: u32 = 2;
/// List exports.
pub const NBD_OPT_LIST: u32 = 3;
/// Describe an export.
pub const NBD_OPT_INFO: u32 = 6;
/// Describe an export and enter transmission.
pub const NBD_OPT_GO: u32 = 7;

/// Option reply: done.
pub const NBD_REP_ACK: u32 = 1;
/// Option reply: an export (to `NBD_OPT_LIST`).
pub const NBD_REP_SERVER: u32 = 2;
/// Option reply: information (to `NBD_OPT_INFO`/`GO`).
pub const NBD_REP_INFO: u32 = 3;
/// Option error: unknown option.
pub const NBD_REP_ERR_UNSUP: u32 = (1 << 31) + 1;
/// Option error: malformed option.
pub const NBD_REP_ERR_INVALID: u32 = (1 << 31) + 3;
/// Option error: no such export.
pub const NBD_REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

/// Info type: size and flags.
pub const NBD_INFO_EXPORT: u16 = 0;
/// Info type: block size constraints.
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flag: the flags field is valid.
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: read-only export.
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `NBD_CMD_FLUSH` supported.
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `NBD_CMD_FLAG_FUA` supported.
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: `NBD_CMD_TRIM` supported.
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `NBD_CMD_WRITE_ZEROES` supported.
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: several connections see each other's writes after a flush.
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Command: read.
pub const NBD_CMD_READ: u16 = 0;
/// Command: write.
pub const NBD_CMD_WRITE: u16 = 1;
/// Command: disconnect.
pub const NBD_CMD_DISC: u16 = 2;
/// Command: flush.
pub const NBD_CMD_FLUSH: u16 = 3;
/// Command: trim.
pub const NBD_CMD_TRIM: u16 = 4;
/// Command: write zeroes.
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;

/// Command flag: force unit access (durable before the reply).
pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: the zeroes need not be allocated (`WRITE_ZEROES`).
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// Error: operation not permitted.
pub const NBD_EPERM: u32 = 1;
/// Error: I/O error.
pub const NBD_EIO: u32 = 5;
/// Error: invalid argument.
pub const NBD_EINVAL: u32 = 22;
/// Error: no space (a write past the end).
pub const NBD_ENOSPC: u32 = 28;
/// Error: not supported.
pub const NBD_ENOTSUP: u32 = 95;

/// Size of a transmission request header.
pub const REQUEST_SIZE: usize = 28;
/// Largest option payload accepted (the spec bounds names to 4096 bytes).
pub const MAX_OPTION_LEN: u32 = 8192;
/// Largest read or write payload accepted (32 MiB, as qemu's server).
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// Malformed client input.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ProtoError {
    /// A request header without the request magic.
    #[error("Bad request magic {0:#x}")]
    BadMagic(u32),
    /// Option data that does not parse.
    #[error("Malformed option data")]
    BadOption,
}

/// A transmission request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// `NBD_CMD_FLAG_*`.
    pub flags: u16,
    /// `NBD_CMD_*`.
    pub kind: u16,
    /// Echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub length: u32,
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

impl Request {
    /// Parse a 28-byte header.
    pub fn parse(b: &[u8; REQUEST_SIZE]) -> Result<Self, ProtoError> {
        let magic = be32(&b[0..]);
        if magic != REQUEST_MAGIC {
            return Err(ProtoError::BadMagic(magic));
        }
        Ok(Self {
            flags: be16(&b[4..]),
            kind: be16(&b[6..]),
            cookie: be64(&b[8..]),
            offset: be64(&b[16..]),
            length: be32(&b[24..]),
        })
    }

    /// The wire header (what a client sends).
    pub fn encode(&self) -> [u8; REQUEST_SIZE] {
        let mut b = [0u8; REQUEST_SIZE];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Whether `offset..offset+length` lies within `size` bytes.
    pub fn in_bounds(&self, size: u64) -> bool {
        self.offset
            .checked_add(u64::from(self.length))
            .is_some_and(|end| end <= size)
    }
}

/// The data of `NBD_OPT_INFO`/`NBD_OPT_GO`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name.
    pub name: Vec<u8>,
    /// Requested info types.
    pub infos: Vec<u16>,
}

impl InfoRequest {
    /// Parse option data; lengths must add up exactly.
    pub fn parse(d: &[u8]) -> Result<Self, ProtoError> {
        let n = d.get(..4).map(be32).ok_or(ProtoError::BadOption)? as usize;
        let name = d.get(4..4usize.checked_add(n).ok_or(ProtoError::BadOption)?);
        let name = name.ok_or(ProtoError::BadOption)?.to_vec();
        let rest = &d[4 + n..];
        let count = rest.get(..2).map(be16).ok_or(ProtoError::BadOption)? as usize;
        let list = &rest[2..];
        if list.len() != count * 2 {
            return Err(ProtoError::BadOption);
        }
        Ok(Self {
            name,
            infos: list.chunks_exact(2).map(be16).collect(),
        })
    }

    /// The option data (what a client sends).
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&u32::try_from(self.name.len()).unwrap_or(0).to_be_bytes());
        v.extend_from_slice(&self.name);
        v.extend_from_slice(&u16::try_from(self.infos.len()).unwrap_or(0).to_be_bytes());
        for i in &self.infos {
            v.extend_from_slice(&i.to_be_bytes());
        }
        v
    }
}

/// An option reply.
pub fn option_reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + data.len());
    v.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&u32::try_from(data.len()).unwrap_or(0).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// A simple reply header.
pub fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn constants_match_the_spec_spelling() {
        assert_eq!(&NBDMAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
        assert_eq!(NBD_REP_ERR_UNSUP, 0x8000_0001);
        assert_eq!(NBD_REP_ERR_UNKNOWN, 0x8000_0006);
    }

    #[test]
    fn request_rejects_bad_magic() {
        let mut b = Request {
            flags: 0,
            kind: NBD_CMD_READ,
            cookie: 1,
            offset: 0,
            length: 512,
        }
        .encode();
        b[0] ^= 1;
        assert!(matches!(Request::parse(&b), Err(ProtoError::BadMagic(_))));
    }

    #[test]
    fn info_request_rejects_bad_lengths() {
        assert!(InfoRequest::parse(&[]).is_err());
        assert!(InfoRequest::parse(&[0, 0, 0, 5, b'a']).is_err());
        assert!(InfoRequest::parse(&[0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(
            InfoRequest::parse(&[0, 0, 0, 0, 0, 1]).is_err(),
            "count 1, no entry"
        );
        assert!(
            InfoRequest::parse(&[0, 0, 0, 0, 0, 0, 9]).is_err(),
            "trailing byte"
        );
        let ok = InfoRequest::parse(&[0, 0, 0, 1, b'x', 0, 1, 0, 3]).unwrap();
        assert_eq!(ok.name, b"x");
        assert_eq!(ok.infos, vec![NBD_INFO_BLOCK_SIZE]);
    }

    proptest! {
        #[test]
        fn request_round_trips(flags: u16, kind: u16, cookie: u64, offset: u64, length: u32) {
            let r = Request { flags, kind, cookie, offset, length };
            prop_assert_eq!(Request::parse(&r.encode()), Ok(r));
        }

        #[test]
        fn request_parse_never_panics(b in proptest::array::uniform28(any::<u8>())) {
            if let Ok(r) = Request::parse(&b) {
                prop_assert_eq!(r.encode(), b);
            }
        }

        #[test]
        fn bounds_never_overflow(offset: u64, length: u32, size: u64) {
            let r = Request { flags: 0, kind: 0, cookie: 0, offset, length };
            let expect = u128::from(offset) + u128::from(length) <= u128::from(size);
            prop_assert_eq!(r.in_bounds(size), expect);
        }

        #[test]
        fn info_request_round_trips(name in proptest::collection::vec(any::<u8>(), 0..64),
                                    infos in proptest::collection::vec(any::<u16>(), 0..8)) {
            let r = InfoRequest { name, infos };
            prop_assert_eq!(InfoRequest::parse(&r.encode()), Ok(r));
        }

        #[test]
        fn info_parse_never_panics(d in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(r) = InfoRequest::parse(&d) {
                prop_assert_eq!(r.encode(), d);
            }
        }
    }
}
