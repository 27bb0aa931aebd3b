//! The shadow table: every request the caller submitted that has no answer yet, kept in the
//! frontend's own memory so it survives the loss of the ring.
//!
//! A caller's operation is cut into *pieces*, each small enough for one ring request. A piece is
//! either *waiting* (not on any ring: the ring is full, pages are short, an overlapping write is
//! still in flight, or there is no backend) or *in flight* under a ring id (a slot of the
//! [`IdAllocator`], whose ids are what the backend echoes). Nothing about a piece lives only in
//! shared memory: on a reconnect [`ShadowTable::requeue_inflight`] moves every in-flight piece
//! back to the waiting queue, in submission order, and the new ring gets them again.
//!
//! # Ordering rules (why a reissue never changes data)
//!
//! * Two *mutations* (write, discard) whose sector ranges overlap are never in flight at the
//!   same time, and a later one never overtakes an earlier one. So when a reconnect reissues a
//!   write that the old backend may already have executed, no acknowledged write to the same
//!   sectors can have happened after it: executing it again writes the same bytes again.
//! * A read never overtakes an earlier, still waiting, overlapping mutation (read-your-writes
//!   for callers who queue both).
//! * A flush is issued only when every mutation submitted before it has been answered: a
//!   flush's acknowledgement then covers all of them, as the block layer expects.
//!
//! # Response validation
//!
//! [`ShadowTable::complete`] accepts a response only for an id in flight whose `operation` is
//! the one the request carried; anything else (an unknown or already answered id, a wrong
//! operation) is a [`ShadowError`], which the channel treats as a broken backend.

use std::collections::VecDeque;

use devchan::blkif::{BLKIF_OP_DISCARD, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_INDIRECT};
use devchan::blkif::{BLKIF_OP_READ, BLKIF_OP_WRITE};
use devchan::ring::{IdAllocator, RingError};

/// Identifies a caller's operation; all its pieces carry it.
pub type Token = u64;

/// What a piece does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PieceOp {
    /// Read `sectors` sectors.
    Read {
        /// Sectors to read.
        sectors: u32,
    },
    /// Write these bytes (a whole number of sectors), kept here until answered.
    Write(Vec<u8>),
    /// Flush the backend's write cache.
    Flush,
    /// Discard sectors.
    Discard {
        /// Sectors to discard.
        sectors: u64,
        /// Ask for a secure discard.
        secure: bool,
    },
}

/// One ring request's worth of a caller's operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    /// The caller's operation.
    pub token: Token,
    /// Submission order (assigned by [`ShadowTable::push`]).
    pub seq: u64,
    /// First sector.
    pub sector: u64,
    /// Byte offset of this piece within the caller's buffer (reads).
    pub offset: usize,
    /// The operation.
    pub op: PieceOp,
}

impl Piece {
    /// Sectors the piece covers (0 for a flush).
    pub fn sectors(&self) -> u64 {
        match &self.op {
            PieceOp::Read { sectors } => u64::from(*sectors),
            PieceOp::Write(d) => (d.len() / devchan::blkif::SECTOR_SIZE) as u64,
            PieceOp::Flush => 0,
            PieceOp::Discard { sectors, .. } => *sectors,
        }
    }

    /// Whether the piece changes data on the disk.
    pub fn is_mutation(&self) -> bool {
        matches!(self.op, PieceOp::Write(_) | PieceOp::Discard { .. })
    }

    fn overlaps(&self, other: &Piece) -> bool {
        let (a0, b0) = (self.sector, other.sector);
        let a1 = a0.saturating_add(self.sectors());
        let b1 = b0.saturating_add(other.sectors());
        a0 < b1 && b0 < a1
    }
}

/// A response the shadow table rejected.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum ShadowError {
    /// The response names an id that is not in flight (never issued, or already answered).
    #[error("Response for request id {0}, which is not in flight")]
    UnknownId(u64),
    /// The response's operation is not the request's.
    #[error("Response for request id {id} has operation {got}, expected {expected}")]
    WrongOperation {
        /// The id.
        id: u64,
        /// Operation in the response.
        got: u8,
        /// Operation of the request.
        expected: u8,
    },
    /// No ring id is free (callers check [`ShadowTable::has_free_id`] first).
    #[error("Every ring id is in flight")]
    NoFreeId,
    /// No waiting piece at that position.
    #[error("No waiting piece {0}")]
    NoSuchPiece(usize),
}

#[derive(Debug)]
struct InFlightPiece {
    piece: Piece,
    /// The `operation` the request carried on the ring.
    wire_op: u8,
}

/// Waiting and in-flight pieces (see the module docs).
#[derive(Debug)]
pub struct ShadowTable {
    waiting: VecDeque<Piece>,
    inflight: IdAllocator<InFlightPiece>,
    capacity: u32,
    next_seq: u64,
}

impl ShadowTable {
    /// A table for a ring of `ring_size` ids.
    pub fn new(ring_size: u32) -> Self {
        Self {
            waiting: VecDeque::new(),
            inflight: IdAllocator::new(ring_size),
            capacity: ring_size,
            next_seq: 0,
        }
    }

    /// Queue a piece (its `seq` is assigned here).
    pub fn push(&mut self, mut piece: Piece) {
        piece.seq = self.next_seq;
        self.next_seq += 1;
        self.waiting.push_back(piece);
    }

    /// Pieces waiting for the ring.
    pub fn waiting_len(&self) -> usize {
        self.waiting.len()
    }

    /// Pieces in flight on the ring.
    pub fn inflight_len(&self) -> usize {
        self.inflight.len()
    }

    /// No piece at all.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty() && self.inflight.is_empty()
    }

    /// A ring id is free.
    pub fn has_free_id(&self) -> bool {
        self.inflight.len() < self.capacity as usize
    }

    /// The waiting piece at `idx`.
    pub fn waiting(&self, idx: usize) -> Option<&Piece> {
        self.waiting.get(idx)
    }

    /// The in-flight piece with ring id `id`.
    pub fn inflight(&self, id: u64) -> Option<&Piece> {
        self.inflight.get(id).map(|p| &p.piece)
    }

    /// Position of the oldest waiting piece the ordering rules allow on the ring now.
    pub fn next_issuable(&self) -> Option<usize> {
        let mut skipped: Vec<&Piece> = Vec::new();
        for (i, p) in self.waiting.iter().enumerate() {
            let ok = match p.op {
                PieceOp::Flush => !self.mutation_before(p.seq),
                _ if p.is_mutation() => {
                    !self
                        .inflight
                        .iter()
                        .any(|(_, f)| f.piece.is_mutation() && f.piece.overlaps(p))
                        && !skipped.iter().any(|s| s.is_mutation() && s.overlaps(p))
                }
                _ => !skipped.iter().any(|s| s.is_mutation() && s.overlaps(p)),
            };
            if ok {
                return Some(i);
            }
            skipped.push(p);
        }
        None
    }

    /// A mutation submitted before `seq` is still unanswered.
    fn mutation_before(&self, seq: u64) -> bool {
        self.waiting.iter().any(|p| p.seq < seq && p.is_mutation())
            || self
                .inflight
                .iter()
                .any(|(_, f)| f.piece.seq < seq && f.piece.is_mutation())
    }

    /// Move waiting piece `idx` in flight; `wire_op` is the `operation` its ring request
    /// carries. Returns the ring id.
    pub fn start(&mut self, idx: usize, wire_op: u8) -> Result<u32, ShadowError> {
        if !self.has_free_id() {
            return Err(ShadowError::NoFreeId);
        }
        let piece = self
            .waiting
            .remove(idx)
            .ok_or(ShadowError::NoSuchPiece(idx))?;
        self.inflight
            .alloc(InFlightPiece { piece, wire_op })
            .map_err(|_| ShadowError::NoFreeId)
    }

    /// A response for `id` with `operation` arrived: validate it and hand back the piece.
    pub fn complete(&mut self, id: u64, operation: u8) -> Result<Piece, ShadowError> {
        let expected = self
            .inflight
            .get(id)
            .ok_or(ShadowError::UnknownId(id))?
            .wire_op;
        if !op_answers(expected, operation) {
            return Err(ShadowError::WrongOperation {
                id,
                got: operation,
                expected,
            });
        }
        match self.inflight.complete(id) {
            Ok(f) => Ok(f.piece),
            Err(RingError::UnknownId(i)) => Err(ShadowError::UnknownId(i)),
            Err(_) => Err(ShadowError::UnknownId(id)),
        }
    }

    /// Undo [`Self::start`] (the request could not be put on the ring): the piece waits again
    /// at its place in submission order.
    pub fn unstart(&mut self, id: u32) -> Result<(), ShadowError> {
        let f = self
            .inflight
            .complete(u64::from(id))
            .map_err(|_| ShadowError::UnknownId(u64::from(id)))?;
        let pos = self
            .waiting
            .iter()
            .position(|p| p.seq > f.piece.seq)
            .unwrap_or(self.waiting.len());
        self.waiting.insert(pos, f.piece);
        Ok(())
    }

    /// The ring is gone: every in-flight piece goes back to the waiting queue, which stays in
    /// submission order. Returns the ids that were in flight (their resources are released by
    /// the caller) and how many pieces were requeued.
    pub fn requeue_inflight(&mut self) -> Vec<u32> {
        let drained = self.inflight.drain();
        let ids = drained.iter().map(|(id, _)| *id).collect();
        let mut all: Vec<Piece> = drained.into_iter().map(|(_, f)| f.piece).collect();
        all.extend(self.waiting.drain(..));
        all.sort_by_key(|p| p.seq);
        self.waiting = all.into();
        ids
    }

    /// Split waiting reads and writes longer than `max_sectors` (a new backend accepts smaller
    /// requests than the one they were cut for). Returns, per token, how many pieces were added.
    pub fn split_waiting(&mut self, max_sectors: u64) -> Vec<(Token, usize)> {
        let max = max_sectors.max(1);
        let mut added = Vec::new();
        let mut out = VecDeque::with_capacity(self.waiting.len());
        for p in self.waiting.drain(..) {
            let n = p.sectors();
            if n <= max || !matches!(p.op, PieceOp::Read { .. } | PieceOp::Write(_)) {
                out.push_back(p);
                continue;
            }
            let mut count = 0;
            let mut done = 0u64;
            while done < n {
                let k = max.min(n - done);
                // Both below n, the sectors of a piece held in memory: they fit a usize.
                let off = usize::try_from(done).unwrap_or(0) * devchan::blkif::SECTOR_SIZE;
                let len = usize::try_from(k).unwrap_or(0) * devchan::blkif::SECTOR_SIZE;
                let op = match &p.op {
                    PieceOp::Write(d) => PieceOp::Write(d[off..off + len].to_vec()),
                    _ => PieceOp::Read {
                        sectors: u32::try_from(k).unwrap_or(u32::MAX),
                    },
                };
                out.push_back(Piece {
                    token: p.token,
                    seq: p.seq,
                    sector: p.sector + done,
                    offset: p.offset + off,
                    op,
                });
                count += 1;
                done += k;
            }
            added.push((p.token, count - 1));
        }
        self.waiting = out;
        added
    }

    /// Remove and return the waiting pieces `pred` selects (in submission order).
    pub fn take_waiting(&mut self, pred: impl Fn(&Piece) -> bool) -> Vec<Piece> {
        let (taken, kept): (VecDeque<Piece>, VecDeque<Piece>) =
            self.waiting.drain(..).partition(|p| pred(p));
        self.waiting = kept;
        taken.into()
    }

    /// Remove every piece of `token` (the caller gave up on it after an error); in-flight
    /// pieces stay, their answers are then discarded by the caller.
    pub fn cancel_waiting(&mut self, token: Token) {
        self.waiting.retain(|p| p.token != token);
    }
}

/// Whether a response `operation` answers a request that carried `request_op`. An indirect
/// request may be answered with `BLKIF_OP_INDIRECT` or with its inner read/write (Linux's
/// blkback echoes the inner operation).
fn op_answers(request_op: u8, response_op: u8) -> bool {
    request_op == response_op
        || (request_op == BLKIF_OP_INDIRECT
            && (response_op == BLKIF_OP_READ || response_op == BLKIF_OP_WRITE))
}

/// The ring `operation` for a piece sent as a direct request.
pub fn direct_op(op: &PieceOp) -> u8 {
    match op {
        PieceOp::Read { .. } => BLKIF_OP_READ,
        PieceOp::Write(_) => BLKIF_OP_WRITE,
        PieceOp::Flush => BLKIF_OP_FLUSH_DISKCACHE,
        PieceOp::Discard { .. } => BLKIF_OP_DISCARD,
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    fn w(token: Token, sector: u64, sectors: usize) -> Piece {
        Piece {
            token,
            seq: 0,
            sector,
            offset: 0,
            op: PieceOp::Write(vec![token as u8; sectors * 512]),
        }
    }

    fn r(token: Token, sector: u64, sectors: u32) -> Piece {
        Piece {
            token,
            seq: 0,
            sector,
            offset: 0,
            op: PieceOp::Read { sectors },
        }
    }

    fn issue_all(t: &mut ShadowTable) -> Vec<(u32, Token)> {
        let mut out = Vec::new();
        while let Some(i) = t.next_issuable() {
            if !t.has_free_id() {
                break;
            }
            let tok = t.waiting(i).unwrap().token;
            let op = direct_op(&t.waiting(i).unwrap().op);
            out.push((t.start(i, op).unwrap(), tok));
        }
        out
    }

    #[test]
    fn overlapping_writes_are_serialised_in_order() {
        let mut t = ShadowTable::new(8);
        t.push(w(1, 0, 8));
        t.push(w(2, 4, 8));
        t.push(w(3, 100, 1));
        t.push(r(4, 6, 1));
        t.push(r(5, 200, 1));
        let issued = issue_all(&mut t);
        // 2 overlaps 1 (in flight); 4 reads what 2 will write; 3 and 5 are independent.
        assert_eq!(
            issued.iter().map(|x| x.1).collect::<Vec<_>>(),
            vec![1, 3, 5]
        );
        let id1 = issued[0].0;
        assert_eq!(t.complete(u64::from(id1), BLKIF_OP_WRITE).unwrap().token, 1);
        let issued = issue_all(&mut t);
        assert_eq!(issued.iter().map(|x| x.1).collect::<Vec<_>>(), vec![2, 4]);
    }

    #[test]
    fn flush_waits_for_earlier_mutations() {
        let mut t = ShadowTable::new(8);
        t.push(w(1, 0, 1));
        t.push(Piece {
            token: 2,
            seq: 0,
            sector: 0,
            offset: 0,
            op: PieceOp::Flush,
        });
        t.push(w(3, 10, 1));
        let issued = issue_all(&mut t);
        assert_eq!(issued.iter().map(|x| x.1).collect::<Vec<_>>(), vec![1, 3]);
        t.complete(u64::from(issued[0].0), BLKIF_OP_WRITE).unwrap();
        // Write 3 came after the flush: the flush does not wait for it.
        let issued = issue_all(&mut t);
        assert_eq!(issued.iter().map(|x| x.1).collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn bad_responses_are_errors() {
        let mut t = ShadowTable::new(4);
        t.push(r(1, 0, 1));
        let (id, _) = issue_all(&mut t)[0];
        assert_eq!(t.complete(3, BLKIF_OP_READ), Err(ShadowError::UnknownId(3)));
        assert_eq!(
            t.complete(u64::MAX, BLKIF_OP_READ),
            Err(ShadowError::UnknownId(u64::MAX))
        );
        assert_eq!(
            t.complete(u64::from(id), BLKIF_OP_WRITE),
            Err(ShadowError::WrongOperation {
                id: u64::from(id),
                got: BLKIF_OP_WRITE,
                expected: BLKIF_OP_READ
            })
        );
        assert!(t.complete(u64::from(id), BLKIF_OP_READ).is_ok());
        assert_eq!(
            t.complete(u64::from(id), BLKIF_OP_READ),
            Err(ShadowError::UnknownId(u64::from(id))),
            "duplicate response"
        );
        assert!(t.is_empty());
    }

    #[test]
    fn indirect_answers_accept_inner_op() {
        assert!(op_answers(BLKIF_OP_INDIRECT, BLKIF_OP_READ));
        assert!(op_answers(BLKIF_OP_INDIRECT, BLKIF_OP_INDIRECT));
        assert!(!op_answers(BLKIF_OP_INDIRECT, BLKIF_OP_FLUSH_DISKCACHE));
        assert!(!op_answers(BLKIF_OP_READ, BLKIF_OP_INDIRECT));
    }

    #[test]
    fn take_waiting_keeps_the_rest_in_order() {
        let mut t = ShadowTable::new(4);
        for i in 0..6 {
            t.push(r(i, i * 10, 1));
        }
        let taken = t.take_waiting(|p| p.token % 2 == 0);
        assert_eq!(
            taken.iter().map(|p| p.token).collect::<Vec<_>>(),
            vec![0, 2, 4]
        );
        let left: Vec<_> = (0..t.waiting_len())
            .map(|i| t.waiting(i).unwrap().token)
            .collect();
        assert_eq!(left, vec![1, 3, 5]);
    }

    #[test]
    fn requeue_restores_submission_order() {
        let mut t = ShadowTable::new(2);
        for i in 0..5 {
            t.push(r(i, i * 10, 1));
        }
        let issued = issue_all(&mut t);
        assert_eq!(issued.len(), 2, "ring of 2");
        // Answer the first, then lose the ring.
        t.complete(u64::from(issued[0].0), BLKIF_OP_READ).unwrap();
        let ids = t.requeue_inflight();
        assert_eq!(ids, vec![issued[1].0]);
        assert_eq!(t.inflight_len(), 0);
        let order: Vec<_> = (0..t.waiting_len())
            .map(|i| t.waiting(i).unwrap().token)
            .collect();
        assert_eq!(order, vec![1, 2, 3, 4]);
    }
}
