//! The hypercall path of process domains: a batched-operation page with a doorbell, and a
//! control socket for the operations that hand over a file descriptor.
//!
//! In the spirit of exceptionless system calls, a domain does not trap into the hypervisor for
//! each operation: it writes up to [`MAX_OPS`] operation records into its *hypercall page*
//! (frame [`HYPERCALL_FRAME`] of its memory), publishes the batch and rings a *doorbell*
//! eventfd once. The hypervisor's server thread for that domain copies the records out of the
//! page, validates and executes each with the domain's id as the caller, writes a status (and a
//! result) into each record, publishes completion and signals the *completion* eventfd.
//!
//! # Wire layout of the hypercall page (4096 bytes, little-endian, x86-64)
//!
//! | offset | size | field | written by |
//! |---|---|---|---|
//! | 0 | 4 | `req_seq`: sequence number of the published batch | domain (release) |
//! | 4 | 4 | `nr_ops`: records in the batch, 1..=[`MAX_OPS`] | domain |
//! | 8 | 4 | `rsp_seq`: `req_seq` of the last completed batch | hypervisor (release) |
//! | 12 | 4 | `batch_status`: 0, or a negative errno if the batch was refused | hypervisor |
//! | 16 | 48 | reserved, zero | |
//! | 64 + 64·i | 64 | [`OpRecord`] `i` | domain (op, args); hypervisor (status, result) |
//!
//! [`OpRecord`]: `op: u32`, `status: i32`, `result: u64`, `args: [u64; 6]`.
//!
//! # Protocol
//!
//! 1. The domain writes records `0..n`, then `nr_ops = n`, then `req_seq = s + 1` with release
//!    ordering, then writes 1 to the doorbell eventfd.
//! 2. The hypervisor reads `req_seq` with acquire ordering; if it equals the last sequence it
//!    served, the doorbell was spurious and is ignored. Otherwise it reads `nr_ops` (refusing
//!    the batch with `-EINVAL` if it is 0 or above [`MAX_OPS`]), copies the `n` records into its
//!    own memory, decodes and executes each (an undecodable record gets its error status and
//!    the batch goes on), writes `status`/`result` back, then `rsp_seq = req_seq` with release
//!    ordering, and writes 1 to the completion eventfd.
//! 3. The domain waits on the completion eventfd until `rsp_seq` (acquire) equals its
//!    sequence, then reads the statuses.
//!
//! A domain may also *post* a batch: publish it, ring the doorbell and carry on without
//! waiting; before it publishes the next batch it waits for `rsp_seq` to reach the posted one
//! (usually long done), since the records are reused.
//!
//! The domain owns the page and may scribble on it at any time: the hypervisor reads each byte
//! once, into a copy, and never trusts a value it read before. A domain that never waits for
//! completion only hurts itself; the eventfd writes never block the server.
//!
//! # Operations ([`Op`])
//!
//! | code | op | args | status | result |
//! |---|---|---|---|---|
//! | 1 | grant copy | see [`Op::GrantCopy`] encoding | `GNTST_*` | |
//! | 2 | pin grant | granter, gref, writable | `GNTST_*` | IOVA |
//! | 3 | unpin | IOVA | `GNTST_*` | |
//! | 4 | evtchn send | port | 0 / -errno | |
//! | 5 | evtchn unmask | port | 0 / -errno | |
//! | 6 | evtchn alloc unbound | remote domid | 0 / -errno | port |
//! | 7 | evtchn bind interdomain | remote domid, remote port | 0 / -errno | port |
//! | 8 | evtchn close | port | 0 / -errno | |
//! | 9 | transfer (exchange) | our frame, peer domid, peer gref | `GNTST_*` | |
//!
//! Grant copy args: `args[0]` = flags (bit 0 `GNTCOPY_source_gref`, bit 1 `GNTCOPY_dest_gref`,
//! no other bit) | `len << 16`; `args[1]` = source domid | source offset `<< 16`; `args[2]` =
//! source gref or frame; `args[3]`, `args[4]` the same for the destination. A side that is not
//! a grant names one of the caller's own frames, so its domid must be `DOMID_SELF`. Unknown op codes get `-ENOSYS`; bad arguments `GNTST_general_error` (grant
//! ops) or `-EINVAL` (event-channel ops).
//!
//! # Control socket
//!
//! A `SOCK_SEQPACKET` Unix socket pair; one message is one [`CtlRequest`] (32 bytes: `op: u32`,
//! reserved `u32`, `args: [u64; 3]`) or one [`CtlReply`] (24 bytes: `status: i32`, reserved
//! `u32`, `result: [u64; 2]`) with at most one descriptor in `SCM_RIGHTS`.
//!
//! | code | op | args | reply result | fd |
//! |---|---|---|---|---|
//! | 1 | alloc shared page | | frame | one-page memfd |
//! | 2 | map grant | granter, gref, readonly | map handle, granter's frame (0 if unknown) | one-page memfd |
//! | 3 | unmap grant | map handle | | |
//! | 4 | shared page | own shareable frame | frame | one-page memfd (read-write) |
//!
//! Op 4 serves a restarted process of a domain (its shareable pages, e.g. ring pages, live on
//! with the domain and are mapped again by frame) and a process whose page a transfer swapped
//! (the frame now names another memfd, which it maps over the old one).

use devchan::grant::{status as gntst, DomId, GrantRef, DOMID_SELF, PAGE_SIZE};
use devchan::platform::{CopyPtr, Frame, GrantCopyOp, Port};
use std::sync::atomic::{AtomicU32, Ordering};

mod control;
mod server;

pub use control::*;
pub use server::*;

/// The frame of a domain's memory that holds its hypercall page.
pub const HYPERCALL_FRAME: Frame = 5;
/// Bytes of the page header before the first record.
pub const HEADER_SIZE: usize = 64;
/// Bytes of one operation record.
pub const RECORD_SIZE: usize = 64;
/// Records per batch: as many as fit in the page after the header.
pub const MAX_OPS: usize = (PAGE_SIZE - HEADER_SIZE) / RECORD_SIZE;

/// Errors of the hypercall protocol layer.
#[derive(Debug, thiserror::Error)]
pub enum HypercallError {
    /// A record's op code is not one of [`Op`]'s.
    #[error("Unknown hypercall op {0}")]
    UnknownOp(u32),
    /// A record's arguments are out of range.
    #[error("Bad arguments for hypercall op {0}")]
    BadArgs(u32),
    /// A control message had the wrong size or an unknown op.
    #[error("Malformed control message")]
    BadMessage,
    /// The peer closed the control socket.
    #[error("Control socket closed")]
    Closed,
    /// Sending or receiving on the control socket failed.
    #[error("Control socket I/O failed")]
    Io(#[source] std::io::Error),
}

/// Operation codes of the hypercall page.
pub mod opcode {
    /// Grant copy.
    pub const GRANT_COPY: u32 = 1;
    /// Pin a grant for device DMA.
    pub const PIN: u32 = 2;
    /// Unpin.
    pub const UNPIN: u32 = 3;
    /// Event-channel send.
    pub const EVTCHN_SEND: u32 = 4;
    /// Event-channel unmask.
    pub const EVTCHN_UNMASK: u32 = 5;
    /// Event-channel alloc unbound.
    pub const EVTCHN_ALLOC_UNBOUND: u32 = 6;
    /// Event-channel bind interdomain.
    pub const EVTCHN_BIND_INTERDOMAIN: u32 = 7;
    /// Event-channel close.
    pub const EVTCHN_CLOSE: u32 = 8;
    /// Page transfer (exchange).
    pub const TRANSFER: u32 = 9;
}

/// `GNTCOPY_source_gref`: the source is a grant reference.
pub const GNTCOPY_SOURCE_GREF: u64 = 1;
/// `GNTCOPY_dest_gref`: the destination is a grant reference.
pub const GNTCOPY_DEST_GREF: u64 = 2;

/// The header of the hypercall page. Shared with an untrusted domain: accessed only through the
/// atomics in [`HypercallPage`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct HypercallHeader {
    /// Sequence number of the published batch.
    pub req_seq: u32,
    /// Records in the batch.
    pub nr_ops: u32,
    /// Sequence number of the last completed batch.
    pub rsp_seq: u32,
    /// 0, or a negative errno if the whole batch was refused.
    pub batch_status: i32,
    /// Zero.
    pub reserved: [u32; 12],
}

/// One operation record, as it sits in the page.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpRecord {
    /// The op code ([`opcode`]).
    pub op: u32,
    /// Written back: `GNTST_*` or 0 / negative errno.
    pub status: i32,
    /// Written back: a port or an IOVA.
    pub result: u64,
    /// Arguments, per op.
    pub args: [u64; 6],
}

const _: () = assert!(core::mem::size_of::<HypercallHeader>() == HEADER_SIZE);
const _: () = assert!(core::mem::size_of::<OpRecord>() == RECORD_SIZE);
const _: () = assert!(core::mem::offset_of!(HypercallHeader, req_seq) == 0);
const _: () = assert!(core::mem::offset_of!(HypercallHeader, nr_ops) == 4);
const _: () = assert!(core::mem::offset_of!(HypercallHeader, rsp_seq) == 8);
const _: () = assert!(core::mem::offset_of!(HypercallHeader, batch_status) == 12);
const _: () = assert!(core::mem::offset_of!(OpRecord, status) == 4);
const _: () = assert!(core::mem::offset_of!(OpRecord, result) == 8);
const _: () = assert!(core::mem::offset_of!(OpRecord, args) == 16);
const _: () = assert!(HEADER_SIZE + MAX_OPS * RECORD_SIZE <= PAGE_SIZE);

/// A decoded, validated operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// One grant copy.
    GrantCopy(GrantCopyOp),
    /// Pin `granter`'s `gref` for device DMA.
    Pin {
        /// The granting domain.
        granter: DomId,
        /// Its grant reference.
        gref: GrantRef,
        /// Whether the device may write.
        writable: bool,
    },
    /// Undo a pin.
    Unpin {
        /// The IOVA the pin returned.
        iova: u64,
    },
    /// Notify the other end of `port`.
    EvtchnSend(Port),
    /// Unmask `port`.
    EvtchnUnmask(Port),
    /// Allocate a port `remote` may bind.
    EvtchnAllocUnbound(DomId),
    /// Bind to `remote`'s unbound `port`.
    EvtchnBindInterdomain {
        /// The remote domain.
        remote: DomId,
        /// Its unbound port.
        port: Port,
    },
    /// Close `port`.
    EvtchnClose(Port),
    /// Give our `frame` to `peer` through its accept-transfer grant `gref`.
    Transfer {
        /// Our frame.
        frame: Frame,
        /// The receiving domain.
        peer: DomId,
        /// Its accept-transfer grant.
        gref: GrantRef,
    },
}

fn u16_of(v: u64, op: u32) -> Result<u16, HypercallError> {
    u16::try_from(v).map_err(|_| HypercallError::BadArgs(op))
}

fn u32_of(v: u64, op: u32) -> Result<u32, HypercallError> {
    u32::try_from(v).map_err(|_| HypercallError::BadArgs(op))
}

fn bool_of(v: u64, op: u32) -> Result<bool, HypercallError> {
    match v {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(HypercallError::BadArgs(op)),
    }
}

fn encode_side(p: CopyPtr) -> (bool, u64, u64) {
    match p {
        CopyPtr::Grant {
            domid,
            gref,
            offset,
        } => (
            true,
            u64::from(domid) | u64::from(offset) << 16,
            u64::from(gref),
        ),
        CopyPtr::Local { frame, offset } => (
            false,
            u64::from(DOMID_SELF) | u64::from(offset) << 16,
            frame,
        ),
    }
}

fn decode_side(is_gref: bool, word: u64, target: u64, op: u32) -> Result<CopyPtr, HypercallError> {
    if word >> 32 != 0 {
        return Err(HypercallError::BadArgs(op));
    }
    let domid = (word & 0xFFFF) as u16;
    let offset = ((word >> 16) & 0xFFFF) as u16;
    if usize::from(offset) >= PAGE_SIZE {
        return Err(HypercallError::BadArgs(op));
    }
    if is_gref {
        Ok(CopyPtr::Grant {
            domid,
            gref: u32_of(target, op)?,
            offset,
        })
    } else if domid == DOMID_SELF {
        Ok(CopyPtr::Local {
            frame: target,
            offset,
        })
    } else {
        // A frame of another domain's memory is never named directly.
        Err(HypercallError::BadArgs(op))
    }
}

impl Op {
    /// The record a domain writes for this op (status and result zero).
    pub fn encode(&self) -> OpRecord {
        let mut r = OpRecord::default();
        match *self {
            Op::GrantCopy(c) => {
                r.op = opcode::GRANT_COPY;
                let (sg, s1, s2) = encode_side(c.src);
                let (dg, d1, d2) = encode_side(c.dst);
                let flags = if sg { GNTCOPY_SOURCE_GREF } else { 0 }
                    | if dg { GNTCOPY_DEST_GREF } else { 0 };
                r.args = [flags | u64::from(c.len) << 16, s1, s2, d1, d2, 0];
            }
            Op::Pin {
                granter,
                gref,
                writable,
            } => {
                r.op = opcode::PIN;
                r.args[..3].copy_from_slice(&[granter.into(), gref.into(), writable.into()]);
            }
            Op::Unpin { iova } => {
                r.op = opcode::UNPIN;
                r.args[0] = iova;
            }
            Op::EvtchnSend(p) => (r.op, r.args[0]) = (opcode::EVTCHN_SEND, p.into()),
            Op::EvtchnUnmask(p) => (r.op, r.args[0]) = (opcode::EVTCHN_UNMASK, p.into()),
            Op::EvtchnAllocUnbound(d) => {
                (r.op, r.args[0]) = (opcode::EVTCHN_ALLOC_UNBOUND, d.into())
            }
            Op::EvtchnBindInterdomain { remote, port } => {
                r.op = opcode::EVTCHN_BIND_INTERDOMAIN;
                r.args[..2].copy_from_slice(&[remote.into(), port.into()]);
            }
            Op::EvtchnClose(p) => (r.op, r.args[0]) = (opcode::EVTCHN_CLOSE, p.into()),
            Op::Transfer { frame, peer, gref } => {
                r.op = opcode::TRANSFER;
                r.args[..3].copy_from_slice(&[frame, peer.into(), gref.into()]);
            }
        }
        r
    }

    /// Decode and validate a record copied out of a domain's page. Every field is checked;
    /// unused arguments must be zero so that garbage is refused rather than half-understood.
    pub fn decode(r: &OpRecord) -> Result<Op, HypercallError> {
        let op = r.op;
        let a = r.args;
        let unused_zero = |from: usize| {
            if a[from..].iter().all(|&x| x == 0) {
                Ok(())
            } else {
                Err(HypercallError::BadArgs(op))
            }
        };
        match op {
            opcode::GRANT_COPY => {
                unused_zero(5)?;
                let flags = a[0] & 0xFFFF;
                if flags & !(GNTCOPY_SOURCE_GREF | GNTCOPY_DEST_GREF) != 0 || a[0] >> 32 != 0 {
                    return Err(HypercallError::BadArgs(op));
                }
                let len = ((a[0] >> 16) & 0xFFFF) as u16;
                let src = decode_side(flags & GNTCOPY_SOURCE_GREF != 0, a[1], a[2], op)?;
                let dst = decode_side(flags & GNTCOPY_DEST_GREF != 0, a[3], a[4], op)?;
                Ok(Op::GrantCopy(GrantCopyOp { src, dst, len }))
            }
            opcode::PIN => {
                unused_zero(3)?;
                Ok(Op::Pin {
                    granter: u16_of(a[0], op)?,
                    gref: u32_of(a[1], op)?,
                    writable: bool_of(a[2], op)?,
                })
            }
            opcode::UNPIN => {
                unused_zero(1)?;
                Ok(Op::Unpin { iova: a[0] })
            }
            opcode::EVTCHN_SEND | opcode::EVTCHN_UNMASK | opcode::EVTCHN_CLOSE => {
                unused_zero(1)?;
                let port = u32_of(a[0], op)?;
                Ok(match op {
                    opcode::EVTCHN_SEND => Op::EvtchnSend(port),
                    opcode::EVTCHN_UNMASK => Op::EvtchnUnmask(port),
                    _ => Op::EvtchnClose(port),
                })
            }
            opcode::EVTCHN_ALLOC_UNBOUND => {
                unused_zero(1)?;
                Ok(Op::EvtchnAllocUnbound(u16_of(a[0], op)?))
            }
            opcode::EVTCHN_BIND_INTERDOMAIN => {
                unused_zero(2)?;
                Ok(Op::EvtchnBindInterdomain {
                    remote: u16_of(a[0], op)?,
                    port: u32_of(a[1], op)?,
                })
            }
            opcode::TRANSFER => {
                unused_zero(3)?;
                Ok(Op::Transfer {
                    frame: a[0],
                    peer: u16_of(a[1], op)?,
                    gref: u32_of(a[2], op)?,
                })
            }
            other => Err(HypercallError::UnknownOp(other)),
        }
    }

    /// Whether this op reports a `GNTST_*` status (else 0 / negative errno).
    pub fn is_grant_op(op: u32) -> bool {
        matches!(
            op,
            opcode::GRANT_COPY | opcode::PIN | opcode::UNPIN | opcode::TRANSFER
        )
    }
}

/// The status a record gets when it cannot be decoded.
pub fn decode_error_status(op: u32, e: &HypercallError) -> i32 {
    match e {
        HypercallError::UnknownOp(_) => -libc::ENOSYS,
        _ if Op::is_grant_op(op) => i32::from(gntst::GENERAL_ERROR),
        _ => -libc::EINVAL,
    }
}

/// A view of a hypercall page, used by both sides.
///
/// Every access is atomic or volatile: the page is shared with the other side, which may write
/// to it at any time.
pub struct HypercallPage {
    base: *mut u8,
}

// SAFETY: the view only holds a pointer to shared memory that every access treats as
// concurrently modified (atomics and volatile copies), so moving it across threads is sound.
unsafe impl Send for HypercallPage {}

impl HypercallPage {
    /// View the page at `base`.
    ///
    /// # Safety
    ///
    /// `base` must be 8-byte aligned and point to [`PAGE_SIZE`] bytes that stay mapped and
    /// writable for as long as the view (or anything it returns) lives.
    pub unsafe fn new(base: *mut u8) -> Self {
        Self { base }
    }

    fn header_u32(&self, offset: usize) -> &AtomicU32 {
        debug_assert!(offset < HEADER_SIZE && offset % 4 == 0);
        // SAFETY: `offset` is a 4-aligned offset inside the header, the page is mapped for the
        // view's lifetime (constructor contract), and AtomicU32 has the layout of u32 and may
        // alias memory that others write concurrently.
        unsafe { &*self.base.add(offset).cast::<AtomicU32>() }
    }

    fn record_ptr(&self, i: usize) -> *mut OpRecord {
        assert!(i < MAX_OPS, "record index out of the page");
        // SAFETY: i < MAX_OPS keeps the record inside the page (checked at compile time above).
        unsafe {
            self.base
                .add(HEADER_SIZE + i * RECORD_SIZE)
                .cast::<OpRecord>()
        }
    }

    fn read_record(&self, i: usize) -> OpRecord {
        // SAFETY: record_ptr is in bounds and aligned (64-byte slots from an 8-aligned base);
        // OpRecord is plain integers, valid for any bytes; volatile because the peer writes the
        // page concurrently and we want exactly one copy.
        unsafe { std::ptr::read_volatile(self.record_ptr(i)) }
    }

    fn write_record(&self, i: usize, r: OpRecord) {
        // SAFETY: as in read_record; the write may race with the peer's scribbling, which only
        // corrupts that peer's own view of its statuses.
        unsafe { std::ptr::write_volatile(self.record_ptr(i), r) }
    }

    /// The sequence number of the last published batch (where a new client or server starts:
    /// a batch left over by a previous process of the domain is never executed).
    pub fn current_req_seq(&self) -> u32 {
        self.header_u32(0).load(Ordering::Acquire)
    }

    // --- Domain side -----------------------------------------------------------------------

    /// Domain: write `records` (at most [`MAX_OPS`]) and publish them as batch `seq`.
    pub fn publish(&self, seq: u32, records: &[OpRecord]) {
        assert!(
            !records.is_empty() && records.len() <= MAX_OPS,
            "batch size out of range"
        );
        for (i, r) in records.iter().enumerate() {
            self.write_record(i, *r);
        }
        let n = u32::try_from(records.len()).expect("at most MAX_OPS records");
        self.header_u32(4).store(n, Ordering::Relaxed);
        // Release: the records and nr_ops above are visible before the new sequence number.
        self.header_u32(0).store(seq, Ordering::Release);
    }

    /// Domain: whether batch `seq` is complete.
    pub fn is_complete(&self, seq: u32) -> bool {
        // Acquire: pairs with the hypervisor's release store, so the statuses read after this
        // are the ones it wrote for this batch.
        self.header_u32(8).load(Ordering::Acquire) == seq
    }

    /// Domain: the batch status and the records `0..n` with their statuses.
    pub fn results(&self, n: usize) -> (i32, Vec<OpRecord>) {
        let batch = i32::from_ne_bytes(self.header_u32(12).load(Ordering::Relaxed).to_ne_bytes());
        (
            batch,
            (0..n.min(MAX_OPS)).map(|i| self.read_record(i)).collect(),
        )
    }

    // --- Hypervisor side -------------------------------------------------------------------

    /// Hypervisor: the published batch if it is new (its sequence differs from `last_seq`):
    /// `(seq, Ok(records copied out))`, or `(seq, Err(()))` if `nr_ops` is out of range.
    #[allow(clippy::result_unit_err)]
    pub fn take_batch(&self, last_seq: u32) -> Option<(u32, Result<Vec<OpRecord>, ()>)> {
        // Acquire: pairs with the domain's release store of req_seq; a well-behaved domain's
        // records are visible after it. A hostile one gets whatever it wrote, validated below.
        let seq = self.header_u32(0).load(Ordering::Acquire);
        if seq == last_seq {
            return None;
        }
        let n = self.header_u32(4).load(Ordering::Relaxed) as usize;
        if n == 0 || n > MAX_OPS {
            return Some((seq, Err(())));
        }
        Some((seq, Ok((0..n).map(|i| self.read_record(i)).collect())))
    }

    /// Hypervisor: write back statuses/results for `records` and complete batch `seq`.
    pub fn complete(&self, seq: u32, batch_status: i32, records: &[OpRecord]) {
        for (i, r) in records.iter().take(MAX_OPS).enumerate() {
            self.write_record(i, *r);
        }
        self.header_u32(12).store(
            u32::from_ne_bytes(batch_status.to_ne_bytes()),
            Ordering::Relaxed,
        );
        // Release: statuses and batch_status are visible before the completion sequence.
        self.header_u32(8).store(seq, Ordering::Release);
    }
}

/// Sequence of the last batch a fresh page has completed.
pub const INITIAL_SEQ: u32 = 0;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn any_ptr() -> impl Strategy<Value = CopyPtr> {
        prop_oneof![
            (any::<u16>(), any::<u32>(), 0u16..4096).prop_map(|(domid, gref, offset)| {
                CopyPtr::Grant {
                    domid,
                    gref,
                    offset,
                }
            }),
            (any::<u64>(), 0u16..4096).prop_map(|(frame, offset)| CopyPtr::Local { frame, offset }),
        ]
    }

    fn any_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (any_ptr(), any_ptr(), any::<u16>())
                .prop_map(|(src, dst, len)| Op::GrantCopy(GrantCopyOp { src, dst, len })),
            (any::<u16>(), any::<u32>(), any::<bool>()).prop_map(|(granter, gref, writable)| {
                Op::Pin {
                    granter,
                    gref,
                    writable,
                }
            }),
            any::<u64>().prop_map(|iova| Op::Unpin { iova }),
            any::<u32>().prop_map(Op::EvtchnSend),
            any::<u32>().prop_map(Op::EvtchnUnmask),
            any::<u16>().prop_map(Op::EvtchnAllocUnbound),
            (any::<u16>(), any::<u32>())
                .prop_map(|(remote, port)| Op::EvtchnBindInterdomain { remote, port }),
            any::<u32>().prop_map(Op::EvtchnClose),
            (any::<u64>(), any::<u16>(), any::<u32>())
                .prop_map(|(frame, peer, gref)| Op::Transfer { frame, peer, gref }),
        ]
    }

    proptest! {
        #[test]
        fn ops_round_trip(op in any_op()) {
            prop_assert_eq!(Op::decode(&op.encode()).unwrap(), op);
        }

        #[test]
        fn garbage_records_never_panic(op in 0u32..12, status: i32, result: u64,
                                       args in proptest::array::uniform6(any::<u64>())) {
            let r = OpRecord { op, status, result, args };
            if let Err(e) = Op::decode(&r) {
                let s = decode_error_status(op, &e);
                prop_assert!(s < 0);
            }
        }

    }

    #[test]
    fn unused_args_must_be_zero() {
        let mut r = Op::EvtchnSend(3).encode();
        r.args[1] = 1;
        assert!(matches!(
            Op::decode(&r),
            Err(HypercallError::BadArgs(opcode::EVTCHN_SEND))
        ));
        let mut r = Op::Pin {
            granter: 1,
            gref: 2,
            writable: true,
        }
        .encode();
        r.args[2] = 2;
        assert!(Op::decode(&r).is_err());
        assert_eq!(
            decode_error_status(opcode::PIN, &Op::decode(&r).unwrap_err()),
            -1
        );
        let r = OpRecord {
            op: 77,
            ..Default::default()
        };
        assert_eq!(
            decode_error_status(77, &Op::decode(&r).unwrap_err()),
            -libc::ENOSYS
        );
    }

    #[test]
    fn copy_offsets_past_the_page_are_refused() {
        let op = Op::GrantCopy(GrantCopyOp {
            src: CopyPtr::Local {
                frame: 7,
                offset: 0,
            },
            dst: CopyPtr::Local {
                frame: 8,
                offset: 0,
            },
            len: 8,
        });
        let mut r = op.encode();
        r.args[1] |= 4096 << 16;
        assert!(Op::decode(&r).is_err());
    }

    #[test]
    fn page_protocol_round_trip_and_hostile_count() {
        let mut mem = vec![0u64; PAGE_SIZE / 8];
        // SAFETY: `mem` is 8-aligned, PAGE_SIZE bytes, and outlives `page`.
        let page = unsafe { HypercallPage::new(mem.as_mut_ptr().cast()) };
        assert!(page.take_batch(INITIAL_SEQ).is_none());
        let recs = [Op::EvtchnSend(1).encode(), Op::EvtchnClose(2).encode()];
        page.publish(1, &recs);
        let (seq, got) = page.take_batch(INITIAL_SEQ).unwrap();
        assert_eq!((seq, got.unwrap()), (1, recs.to_vec()));
        let mut done = recs;
        done[0].status = -22;
        page.complete(1, 0, &done);
        assert!(page.is_complete(1));
        assert_eq!(page.results(2), (0, done.to_vec()));
        // A hostile count is refused as a whole.
        page.header_u32(4).store(1000, Ordering::Relaxed);
        page.header_u32(0).store(2, Ordering::Release);
        assert!(matches!(page.take_batch(1), Some((2, Err(())))));
    }
}
