//! Fuzz target bodies, shared by the cargo-fuzz crate (`guest-frontends/fuzz`) and the unit
//! tests below, which run them over random inputs.
//!
//! * [`nbd_session`]: the input is everything a client sends (handshake, options, requests,
//!   payloads) to an NBD server over a small in-memory export. The server must never panic,
//!   never touch bytes outside the export, and only ever answer with well-formed replies.
//! * [`shadow_ops`]: the input is a sequence of operations on blkfront's shadow table
//!   (submit, issue, answer with any id and operation, lose the ring). Every submitted piece
//!   must be answered exactly once, and two overlapping writes must never be in flight together.

use std::io::{self, Cursor, Read, Write};
use std::sync::{Arc, Mutex};

use crate::blkfront::shadow::{direct_op, Piece, PieceOp, ShadowTable};
use crate::block::{check, BlockDevice, DevResult};
use crate::nbd::{serve, Export};

/// An in-memory device.
pub struct MemDevice(pub Mutex<Vec<u8>>);

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).len() as u64
    }
    fn can_flush(&self) -> bool {
        true
    }
    fn can_trim(&self) -> bool {
        true
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> DevResult<()> {
        let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        check(m.len() as u64, offset, buf.len() as u64)?;
        // In bounds of the vector (checked), so it fits a usize.
        let o = usize::try_from(offset).unwrap_or(0);
        buf.copy_from_slice(&m[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> DevResult<()> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        check(m.len() as u64, offset, data.len() as u64)?;
        let o = usize::try_from(offset).unwrap_or(0);
        m[o..o + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64) -> DevResult<()> {
        self.write_zeroes(offset, len)
    }
}

/// A client connection replayed from bytes: reads come from the input, writes are kept.
struct Replay {
    input: Cursor<Vec<u8>>,
    output: Vec<u8>,
}

impl Read for Replay {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Replay {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Bound what a fuzz input can make the server produce.
        if self.output.len() > 1 << 22 {
            return Err(io::Error::other("output bound"));
        }
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Fuzz body: one NBD session whose client bytes are `data`. Returns the server's output.
pub fn nbd_session(data: &[u8]) -> Vec<u8> {
    let dev = Arc::new(MemDevice(Mutex::new(vec![0u8; 64 * 1024])));
    let export = Export {
        name: "disk".into(),
        device: dev.clone(),
    };
    let mut conn = Replay {
        input: Cursor::new(data.to_vec()),
        output: Vec::new(),
    };
    let _ = serve(&mut conn, &export);
    assert_eq!(dev.size(), 64 * 1024, "the export never changes size");
    assert!(conn.output.starts_with(b"NBDMAGICIHAVEOPT"));
    conn.output
}

/// Fuzz body: operations on the shadow table, decoded from `data`.
pub fn shadow_ops(data: &[u8]) {
    let mut t = ShadowTable::new(8);
    let mut submitted = 0u64;
    let mut answered = std::collections::HashSet::new();
    let mut it = data.chunks_exact(3);
    for op in it.by_ref() {
        match op[0] % 5 {
            0 | 1 => {
                let sector = u64::from(op[1] % 32);
                let sectors = u32::from(op[2] % 8) + 1;
                let op = if op[0] % 5 == 0 {
                    PieceOp::Write(vec![0; sectors as usize * 512])
                } else {
                    PieceOp::Read { sectors }
                };
                t.push(Piece {
                    token: submitted,
                    seq: 0,
                    sector,
                    offset: 0,
                    op,
                });
                submitted += 1;
            }
            2 => {
                while let Some(i) = t.next_issuable() {
                    if !t.has_free_id() {
                        break;
                    }
                    let Some(p) = t.waiting(i) else { break };
                    let wop = direct_op(&p.op);
                    t.start(i, wop).expect("a free id was checked");
                }
            }
            3 => {
                // Any id, any operation: must be an error unless it matches.
                if let Ok(p) = t.complete(u64::from(op[1] % 12), op[2] % 8) {
                    assert!(answered.insert(p.token), "answered twice");
                }
            }
            _ => {
                t.requeue_inflight();
            }
        }
        assert_no_overlapping_writes(&t);
    }
    // Drain: everything submitted gets answered exactly once.
    for _ in 0..10_000 {
        if t.is_empty() {
            break;
        }
        while let Some(i) = t.next_issuable() {
            if !t.has_free_id() {
                break;
            }
            let Some(p) = t.waiting(i) else { break };
            let wop = direct_op(&p.op);
            t.start(i, wop).expect("free id");
        }
        for id in 0..8u64 {
            let Some(p) = t.inflight(id) else { continue };
            let wop = direct_op(&p.op);
            let p = t.complete(id, wop).expect("in flight");
            assert!(answered.insert(p.token), "answered twice");
        }
    }
    assert!(t.is_empty(), "drained");
    assert_eq!(answered.len() as u64, submitted);
}

fn assert_no_overlapping_writes(t: &ShadowTable) {
    let writes: Vec<(u64, u64)> = (0..8u64)
        .filter_map(|id| t.inflight(id))
        .filter(|p| p.is_mutation())
        .map(|p| (p.sector, p.sector + p.sectors()))
        .collect();
    for (i, a) in writes.iter().enumerate() {
        for b in &writes[i + 1..] {
            assert!(
                a.1 <= b.0 || b.1 <= a.0,
                "overlapping writes in flight: {a:?} {b:?}"
            );
        }
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::nbd::proto::*;
    use proptest::prelude::*;

    fn opt(o: u32, data: &[u8]) -> Vec<u8> {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&o.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    fn go() -> Vec<u8> {
        let mut v = 3u32.to_be_bytes().to_vec();
        v.extend(opt(
            NBD_OPT_GO,
            &InfoRequest {
                name: b"disk".to_vec(),
                infos: vec![],
            }
            .encode(),
        ));
        v
    }

    fn req(kind: u16, flags: u16, offset: u64, length: u32) -> Vec<u8> {
        Request {
            flags,
            kind,
            cookie: 0x1234,
            offset,
            length,
        }
        .encode()
        .to_vec()
    }

    /// The error code of the last simple reply in `out`.
    fn last_error(out: &[u8]) -> u32 {
        let magic = SIMPLE_REPLY_MAGIC.to_be_bytes();
        let pos = out.windows(4).rposition(|w| w == magic).expect("a reply");
        u32::from_be_bytes(out[pos + 4..pos + 8].try_into().unwrap())
    }

    #[test]
    fn bad_requests_get_error_replies() {
        let size = 64 * 1024;
        for (r, want) in [
            (req(NBD_CMD_READ, 0, size - 512, 1024), NBD_EINVAL),
            (req(NBD_CMD_READ, 0, u64::MAX, 1), NBD_EINVAL),
            (req(NBD_CMD_READ, 0, 0, MAX_PAYLOAD + 1), NBD_EINVAL),
            (req(NBD_CMD_WRITE_ZEROES, 0, size, 1), NBD_ENOSPC),
            (req(NBD_CMD_TRIM, 0, u64::MAX - 1, 10), NBD_EINVAL),
            (req(77, 0, 0, 0), NBD_EINVAL),
            (req(NBD_CMD_FLUSH, 0x40, 0, 0), NBD_EINVAL),
            (req(NBD_CMD_READ, 0, 0, 512), 0),
            (req(NBD_CMD_FLUSH, 0, 0, 0), 0),
        ] {
            let mut input = go();
            input.extend(r.clone());
            let out = nbd_session(&input);
            assert_eq!(last_error(&out), want, "{r:?}");
        }
        // A write past the end: the payload is consumed, then ENOSPC.
        let mut input = go();
        input.extend(req(NBD_CMD_WRITE, 0, size - 1, 2));
        input.extend([1, 2]);
        input.extend(req(NBD_CMD_FLUSH, 0, 0, 0));
        let out = nbd_session(&input);
        assert!(out
            .windows(16)
            .any(|w| w == simple_reply(NBD_ENOSPC, 0x1234)));
        assert_eq!(last_error(&out), 0, "stream still in sync");
    }

    #[test]
    fn options_are_answered() {
        let mut input = 3u32.to_be_bytes().to_vec();
        input.extend(opt(NBD_OPT_LIST, b"x"));
        input.extend(opt(NBD_OPT_LIST, b""));
        input.extend(opt(99, b"abc"));
        input.extend(opt(NBD_OPT_INFO, b"\0\0"));
        input.extend(opt(
            NBD_OPT_INFO,
            &InfoRequest {
                name: b"other".to_vec(),
                infos: vec![],
            }
            .encode(),
        ));
        input.extend(opt(NBD_OPT_ABORT, b""));
        let out = nbd_session(&input);
        let types: Vec<u32> = out
            .windows(8)
            .enumerate()
            .filter(|(_, w)| *w == REPLY_MAGIC.to_be_bytes())
            .map(|(i, _)| u32::from_be_bytes(out[i + 12..i + 16].try_into().unwrap()))
            .collect();
        assert_eq!(
            types,
            vec![
                NBD_REP_ERR_INVALID,
                NBD_REP_SERVER,
                NBD_REP_ACK,
                NBD_REP_ERR_UNSUP,
                NBD_REP_ERR_INVALID,
                NBD_REP_ERR_UNKNOWN,
                NBD_REP_ACK
            ]
        );
        // Unknown client flags end the session at once.
        let out = nbd_session(&0x80u32.to_be_bytes());
        assert_eq!(out.len(), 18);
    }

    #[test]
    fn export_name_enters_transmission() {
        let mut input = 1u32.to_be_bytes().to_vec(); // fixed newstyle, zeroes wanted
        input.extend(opt(NBD_OPT_EXPORT_NAME, b"disk"));
        input.extend(req(NBD_CMD_WRITE, 0, 512, 4));
        input.extend(b"abcd");
        input.extend(req(NBD_CMD_READ, 0, 510, 8));
        input.extend(req(NBD_CMD_DISC, 0, 0, 0));
        let out = nbd_session(&input);
        // greeting 18 + size 8 + flags 2 + zeroes 124, then two replies (+8 bytes of data).
        assert_eq!(out.len(), 18 + 134 + 16 + 16 + 8);
        assert_eq!(&out[out.len() - 8..], b"\0\0abcd\0\0");
    }

    proptest! {
        #[test]
        fn nbd_session_survives_random_bytes(d in proptest::collection::vec(any::<u8>(), 0..512)) {
            nbd_session(&d);
        }

        #[test]
        fn nbd_session_survives_random_requests(
            reqs in proptest::collection::vec((0u16..10, any::<u16>(), any::<u64>(), 0u32..70_000), 0..16)
        ) {
            let mut input = go();
            for (kind, flags, offset, length) in reqs {
                let offset = offset % (128 * 1024);
                input.extend(req(kind, flags & 3, offset, length));
                if kind == NBD_CMD_WRITE {
                    input.extend(vec![0x5a; length as usize]);
                }
            }
            nbd_session(&input);
        }

        #[test]
        fn shadow_table_answers_everything_once(d in proptest::collection::vec(any::<u8>(), 0..600)) {
            shadow_ops(&d);
        }
    }
}
