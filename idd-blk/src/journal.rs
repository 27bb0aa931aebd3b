//! The in-flight journal: what a restarted blkback process needs to carry on a ring without
//! the frontend noticing.
//!
//! A backend answers out of order, so once a response overwrites the slot of an earlier
//! request, that request exists only in the backend's memory. The journal keeps, for each
//! channel, every request that was consumed and not yet answered (its raw ring slot and ring
//! index), how far the ring was consumed, and the IOVAs pinned for each request, in memory
//! that outlives the backend process.
//!
//! # Where it lives
//!
//! In two consecutive frames of the IDD domain's own RAM per channel, named by the manager
//! ([`crate::blkback::ChannelConfig::journal_frame`]), read and written through
//! `Platform::read_local`/`write_local`. On the process-domain platform the RAM is a memfd
//! owned by the hypervisor (domain 0): it survives the IDD process and is found unchanged by
//! the next process of the same domain (`launch::spawn_in`). The manager reserves the frames
//! (the binary's default: channel `i` uses frames `JOURNAL_FIRST_FRAME + 2 i` and `+ 2 i + 1`)
//! and never hands them to anything else.
//!
//! # Layout (all fields little-endian `u32` unless said otherwise)
//!
//! Page 0, the request journal:
//!
//! | off | size | field |
//! |---|---|---|
//! | 0 | 4 | `magic` = [`MAGIC`] (`"BKJ1"`): the page holds a journal |
//! | 4 | 2 | `guest`: the frontend's domain id |
//! | 6 | 2 | reserved, 0 |
//! | 8 | 4 | `ring_ref`: the frontend's ring grant |
//! | 12 | 4 | `remote_port`: the frontend's event-channel port |
//! | 16 | 4 | `local_port`: our bound port (it survives the process) |
//! | 20 | 4 | `req_cons`: requests consumed from the ring so far |
//! | 24 | 4 | `valid`: bit `i` = slot `i` holds a consumed, unanswered request |
//! | 28 | 4 | `answering`: bit `i` = slot `i`'s response was put at `rsp_idx` |
//! | 32..64 | | reserved, 0 |
//! | 64 + 120 i | 4 | slot `i` (`i` = ring index mod 32): `ring_idx` |
//! | 68 + 120 i | 4 | slot `i`: `rsp_idx`, the response index used when `answering` |
//! | 72 + 120 i | 112 | slot `i`: the raw `blkif_request` as consumed |
//!
//! Page 1, the pin table: 32 slots × [`PINS_PER_SLOT`] `u64` IOVAs, 0 = none.
//!
//! # Protocol (crash-safe at every store)
//!
//! 1. *Consume* ring index `k`: write slot `k mod 32`, set its `valid` bit, then advance
//!    `req_cons`. A crash before `req_cons` moved leaves a valid slot at or past `req_cons`,
//!    which resume ignores: the request is still in the ring and is consumed again.
//! 2. *Pin*: record each IOVA after the pin, zero it after the unpin. A restarted process
//!    unpins what is recorded ([`release_stale_pins`]) before it pins anything itself (IOVAs
//!    are recycled). A crash between a pin and its record leaks that pin until the manager
//!    revokes the dead process's pins (`System::set_holder_deadline` + `revoke_overdue`),
//!    which the manager should do on every IDD restart.
//! 3. *Answer*: write `rsp_idx` (the response index), set `answering`, put the response,
//!    push; then clear `valid` and `answering`. On resume, an answering slot whose `rsp_idx`
//!    is below the shared `rsp_prod` was published: it is dropped, never answered twice.
//!    Otherwise the response was lost with the process and the request is replayed.
//!
//! A resumed backend attaches with `BackRing::resume(req_cons)` and first re-executes the
//! slots to replay, in ring order (reads and writes are idempotent: the frontend keeps the
//! pages granted and unchanged until it sees the response).

use devchan::blkif::{BlkifRequest, BLKIF_RING_SIZE};
use devchan::grant::{DomId, GrantRef};
use devchan::platform::{Frame, Platform, PlatformError, Port};
use devchan::ring::RingIdx;
use std::sync::atomic::{compiler_fence, Ordering};
use zerocopy::{FromBytes, IntoBytes};

/// `"BKJ1"`, little-endian.
pub const MAGIC: u32 = u32::from_le_bytes(*b"BKJ1");
/// Slots: one per ring entry.
pub const SLOTS: usize = BLKIF_RING_SIZE as usize;
/// Offset of the first slot.
pub const SLOT_BASE: usize = 64;
/// Bytes per slot.
pub const SLOT_SIZE: usize = 8 + core::mem::size_of::<BlkifRequest>();
/// Pins recorded per request: bounds the segments of one request (direct: 11; indirect
/// requests are limited to this by `feature-max-indirect-segments`).
pub const PINS_PER_SLOT: usize = 16;

const OFF_GUEST: usize = 4;
const OFF_RING_REF: usize = 8;
const OFF_REMOTE_PORT: usize = 12;
const OFF_LOCAL_PORT: usize = 16;
const OFF_REQ_CONS: usize = 20;
const OFF_VALID: usize = 24;
const OFF_ANSWERING: usize = 28;

const _: () = assert!(SLOT_BASE + SLOTS * SLOT_SIZE <= 4096);
const _: () = assert!(SLOTS * PINS_PER_SLOT * 8 <= 4096);
const _: () = assert!(SLOTS <= 32, "valid/answering are 32-bit masks");

/// Why a journal operation failed.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Reading or writing the journal frames failed.
    #[error("Journal memory access failed")]
    Memory(#[source] PlatformError),
    /// A slot holds more pins than [`PINS_PER_SLOT`].
    #[error("Request needs more than {PINS_PER_SLOT} pins")]
    TooManyPins,
}

/// Which ring a journal belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingId {
    /// Frontend domain.
    pub guest: DomId,
    /// Its ring grant.
    pub ring_ref: GrantRef,
    /// Its event-channel port.
    pub remote_port: Port,
}

/// A request found in the journal that must be executed again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Replay {
    /// Its ring index.
    pub ring_idx: RingIdx,
    /// The request as consumed.
    pub raw: BlkifRequest,
}

/// What [`Journal::open`] found.
#[derive(Debug)]
pub enum Opened {
    /// No journal of this ring: start fresh.
    Fresh,
    /// A journal of this ring: resume.
    Resume {
        /// Our port bound to the frontend.
        local_port: Port,
        /// How far the ring was consumed.
        req_cons: RingIdx,
        /// Consumed requests whose responses were never published, in ring order.
        replay: Vec<Replay>,
        /// IOVAs the old process left pinned (to unpin).
        stale_pins: Vec<u64>,
    },
}

/// Unpin every IOVA the pin table in `journal_frame + 1` records, and clear the table.
/// Returns how many were recorded.
///
/// A restarted process must call this for every channel *before it pins anything*: IOVAs
/// are recycled, so once the manager has revoked a dead process's pins and the process has
/// pinned something new, a recorded IOVA may name the new pin.
pub fn release_stale_pins<P: Platform>(p: &P, journal_frame: Frame) -> Result<usize, JournalError> {
    let mut pins = vec![0u8; 4096];
    p.read_local(journal_frame + 1, 0, &mut pins)
        .map_err(JournalError::Memory)?;
    let mut n = 0;
    for c in pins.chunks_exact(8) {
        let iova = u64::from_le_bytes(c.try_into().unwrap_or([0; 8]));
        if iova != 0 {
            // Revoked by the manager already, or released now: gone either way.
            let _ = p.unpin_grant(iova);
            n += 1;
        }
    }
    if n > 0 {
        p.write_local(journal_frame + 1, 0, &[0u8; 4096])
            .map_err(JournalError::Memory)?;
    }
    Ok(n)
}

/// One channel's journal.
pub struct Journal {
    frame: Frame,
    valid: u32,
    answering: u32,
}

fn mask(idx: RingIdx) -> (usize, u32) {
    let slot = idx as usize % SLOTS;
    (slot, 1u32 << slot)
}

impl Journal {
    fn read_u32<P: Platform>(&self, p: &P, off: usize) -> Result<u32, JournalError> {
        let mut b = [0u8; 4];
        p.read_local(self.frame, off, &mut b)
            .map_err(JournalError::Memory)?;
        Ok(u32::from_le_bytes(b))
    }

    fn write<P: Platform>(
        &self,
        p: &P,
        page: u64,
        off: usize,
        data: &[u8],
    ) -> Result<(), JournalError> {
        // Program order of the journal stores is the crash-safety argument: keep the compiler
        // from moving them across each other (a process crash makes every store it executed
        // visible; the next process of the domain reads the same memfd).
        compiler_fence(Ordering::SeqCst);
        p.write_local(self.frame + page, off, data)
            .map_err(JournalError::Memory)?;
        compiler_fence(Ordering::SeqCst);
        Ok(())
    }

    fn write_u32<P: Platform>(&self, p: &P, off: usize, v: u32) -> Result<(), JournalError> {
        self.write(p, 0, off, &v.to_le_bytes())
    }

    /// Open the journal in `frame` (and `frame + 1`) for ring `id`; `rsp_prod` is the ring's
    /// shared response producer as found now.
    pub fn open<P: Platform>(
        p: &P,
        frame: Frame,
        id: RingId,
        rsp_prod: RingIdx,
    ) -> Result<(Self, Opened), JournalError> {
        let mut j = Self {
            frame,
            valid: 0,
            answering: 0,
        };
        let mut page = vec![0u8; 4096];
        p.read_local(frame, 0, &mut page)
            .map_err(JournalError::Memory)?;
        let u = |off: usize| {
            u32::from_le_bytes([page[off], page[off + 1], page[off + 2], page[off + 3]])
        };
        let same = u(0) == MAGIC
            && u16::from_le_bytes([page[OFF_GUEST], page[OFF_GUEST + 1]]) == id.guest
            && u(OFF_RING_REF) == id.ring_ref
            && u(OFF_REMOTE_PORT) == id.remote_port;
        if !same {
            return Ok((j, Opened::Fresh));
        }
        let req_cons = u(OFF_REQ_CONS);
        let (valid, answering) = (u(OFF_VALID), u(OFF_ANSWERING));
        let mut replay = Vec::new();
        for slot in 0..SLOTS {
            if valid & (1 << slot) == 0 {
                continue;
            }
            let base = SLOT_BASE + slot * SLOT_SIZE;
            let ring_idx = u(base);
            let rsp_idx = u(base + 4);
            // Only requests consumed before req_cons (within one ring) count.
            let age = req_cons.wrapping_sub(ring_idx);
            if age == 0 || age > BLKIF_RING_SIZE || ring_idx as usize % SLOTS != slot {
                continue;
            }
            // Published: rsp_idx is behind rsp_prod (within one ring).
            let published = answering & (1 << slot) != 0 && {
                let behind = rsp_prod.wrapping_sub(rsp_idx);
                (1..=BLKIF_RING_SIZE).contains(&behind)
            };
            if published {
                continue;
            }
            let Ok(raw) = BlkifRequest::read_from_bytes(&page[base + 8..base + SLOT_SIZE]) else {
                continue;
            };
            replay.push(Replay { ring_idx, raw });
            j.valid |= 1 << slot;
        }
        replay.sort_by_key(|r| req_cons.wrapping_sub(r.ring_idx));
        replay.reverse();
        let mut pins = vec![0u8; 4096];
        p.read_local(frame + 1, 0, &mut pins)
            .map_err(JournalError::Memory)?;
        let stale_pins = pins
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .filter(|v| *v != 0)
            .collect();
        Ok((
            j,
            Opened::Resume {
                local_port: u(OFF_LOCAL_PORT),
                req_cons,
                replay,
                stale_pins,
            },
        ))
    }

    /// Start a fresh journal for ring `id` (clears both pages), or rewrite the header of a
    /// resumed one; `req_cons` is where consumption stands.
    pub fn init<P: Platform>(
        &mut self,
        p: &P,
        id: RingId,
        local_port: Port,
        req_cons: RingIdx,
        fresh: bool,
    ) -> Result<(), JournalError> {
        if fresh {
            self.write(p, 0, 0, &[0u8; 4096])?;
            self.write(p, 1, 0, &[0u8; 4096])?;
            self.valid = 0;
            self.answering = 0;
        } else {
            // Drop the stale answering marks and slots resume decided against.
            // `valid` first: once it lists only the slots to replay, the answering marks
            // no longer matter (clearing them first could make a published slot look
            // unpublished after a crash in between).
            self.write_u32(p, OFF_VALID, self.valid)?;
            self.answering = 0;
            self.write_u32(p, OFF_ANSWERING, 0)?;
            self.write(p, 1, 0, &[0u8; 4096])?;
        }
        self.write(p, 0, OFF_GUEST, &id.guest.to_le_bytes())?;
        self.write_u32(p, OFF_RING_REF, id.ring_ref)?;
        self.write_u32(p, OFF_REMOTE_PORT, id.remote_port)?;
        self.write_u32(p, OFF_LOCAL_PORT, local_port)?;
        self.write_u32(p, OFF_REQ_CONS, req_cons)?;
        // The magic last: a journal is only trusted once its header is complete.
        self.write_u32(p, 0, MAGIC)
    }

    /// Record that ring index `idx` (holding `raw`) was consumed; `req_cons` is the new
    /// consumer index (`idx + 1`).
    pub fn consumed<P: Platform>(
        &mut self,
        p: &P,
        idx: RingIdx,
        raw: &BlkifRequest,
        req_cons: RingIdx,
    ) -> Result<(), JournalError> {
        let (slot, bit) = mask(idx);
        let base = SLOT_BASE + slot * SLOT_SIZE;
        let mut rec = [0u8; SLOT_SIZE];
        rec[..4].copy_from_slice(&idx.to_le_bytes());
        rec[8..].copy_from_slice(raw.as_bytes());
        self.write(p, 0, base, &rec)?;
        self.valid |= bit;
        self.write_u32(p, OFF_VALID, self.valid)?;
        self.write_u32(p, OFF_REQ_CONS, req_cons)
    }

    /// Record the IOVAs pinned for ring index `idx` (replacing earlier ones).
    pub fn pins<P: Platform>(
        &self,
        p: &P,
        idx: RingIdx,
        iovas: &[u64],
    ) -> Result<(), JournalError> {
        if iovas.len() > PINS_PER_SLOT {
            return Err(JournalError::TooManyPins);
        }
        let (slot, _) = mask(idx);
        let mut rec = [0u8; PINS_PER_SLOT * 8];
        for (c, v) in rec.chunks_exact_mut(8).zip(iovas) {
            c.copy_from_slice(&v.to_le_bytes());
        }
        self.write(p, 1, slot * PINS_PER_SLOT * 8, &rec)
    }

    /// Record that the response for ring index `idx` is put at response index `rsp_idx`
    /// (before the response is written to the ring).
    pub fn answering<P: Platform>(
        &mut self,
        p: &P,
        idx: RingIdx,
        rsp_idx: RingIdx,
    ) -> Result<(), JournalError> {
        let (slot, bit) = mask(idx);
        self.write_u32(p, SLOT_BASE + slot * SLOT_SIZE + 4, rsp_idx)?;
        self.answering |= bit;
        self.write_u32(p, OFF_ANSWERING, self.answering)
    }

    /// Forget the slots of `idxs`, whose responses are published.
    pub fn answered<P: Platform>(&mut self, p: &P, idxs: &[RingIdx]) -> Result<(), JournalError> {
        if idxs.is_empty() {
            return Ok(());
        }
        for &i in idxs {
            let (_, bit) = mask(i);
            self.valid &= !bit;
            self.answering &= !bit;
        }
        self.write_u32(p, OFF_VALID, self.valid)?;
        self.write_u32(p, OFF_ANSWERING, self.answering)
    }

    /// Consumed requests not yet answered, as the journal counts them.
    pub fn outstanding(&self) -> u32 {
        self.valid.count_ones()
    }

    /// The `req_cons` recorded (for tests and the manager's inspection).
    pub fn recorded_req_cons<P: Platform>(&self, p: &P) -> Result<u32, JournalError> {
        self.read_u32(p, OFF_REQ_CONS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypervisor::domain::DomainConfig;
    use hypervisor::local::LocalPlatform;
    use hypervisor::system::System;

    fn plat() -> LocalPlatform {
        let sys = System::new();
        let d = sys
            .create_domain(DomainConfig {
                name: "idd".into(),
                nr_frames: 16,
                iommu: None,
            })
            .unwrap();
        LocalPlatform::new(sys, d).unwrap()
    }

    const ID: RingId = RingId {
        guest: 3,
        ring_ref: 9,
        remote_port: 4,
    };

    fn req(id: u64) -> BlkifRequest {
        BlkifRequest {
            id,
            nr_segments: 1,
            ..Default::default()
        }
    }

    fn resume(p: &LocalPlatform, rsp_prod: u32) -> (Journal, Opened) {
        Journal::open(p, 8, ID, rsp_prod).unwrap()
    }

    #[test]
    fn fresh_then_resume_replays_exactly_the_unanswered() {
        let p = plat();
        let (mut j, o) = resume(&p, 0);
        assert!(matches!(o, Opened::Fresh));
        j.init(&p, ID, 17, 0, true).unwrap();
        // Consume 0..5; answer 1 and 3 (published at rsp 0 and 1); 4 is "answering" at
        // rsp 2 but never pushed.
        for i in 0..5u32 {
            j.consumed(&p, i, &req(u64::from(i) + 100), i + 1).unwrap();
        }
        j.pins(&p, 2, &[0x1000, 0x2000]).unwrap();
        j.answering(&p, 1, 0).unwrap();
        j.answering(&p, 3, 1).unwrap();
        j.answering(&p, 4, 2).unwrap();
        // Crash before `answered`: rsp_prod is 2 (responses for 1 and 3 pushed).
        let (j2, o) = resume(&p, 2);
        let Opened::Resume {
            local_port,
            req_cons,
            replay,
            stale_pins,
        } = o
        else {
            panic!("journal not found")
        };
        assert_eq!((local_port, req_cons), (17, 5));
        let ids: Vec<_> = replay.iter().map(|r| (r.ring_idx, r.raw.id)).collect();
        assert_eq!(ids, vec![(0, 100), (2, 102), (4, 104)]);
        assert_eq!(stale_pins, vec![0x1000, 0x2000]);
        assert_eq!(j2.outstanding(), 3);
    }

    #[test]
    fn stale_pins_are_released_once() {
        let p = plat();
        let (mut j, _) = resume(&p, 0);
        j.init(&p, ID, 1, 0, true).unwrap();
        j.pins(&p, 3, &[0x5000, 0x6000]).unwrap();
        j.pins(&p, 7, &[0x7000]).unwrap();
        assert_eq!(release_stale_pins(&p, 8).unwrap(), 3);
        assert_eq!(release_stale_pins(&p, 8).unwrap(), 0);
        let (_, o) = resume(&p, 0);
        let Opened::Resume { stale_pins, .. } = o else {
            panic!()
        };
        assert!(stale_pins.is_empty());
    }

    #[test]
    fn consumed_but_req_cons_not_advanced_is_not_replayed() {
        let p = plat();
        let (mut j, _) = resume(&p, 0);
        j.init(&p, ID, 1, 0, true).unwrap();
        j.consumed(&p, 0, &req(1), 1).unwrap();
        // Simulate a crash between the valid bit and req_cons for index 1.
        let (slot, bit) = mask(1);
        let base = SLOT_BASE + slot * SLOT_SIZE;
        let mut rec = [0u8; SLOT_SIZE];
        rec[..4].copy_from_slice(&1u32.to_le_bytes());
        j.write(&p, 0, base, &rec).unwrap();
        j.write_u32(&p, OFF_VALID, j.valid | bit).unwrap();
        let (_, o) = resume(&p, 0);
        let Opened::Resume {
            replay, req_cons, ..
        } = o
        else {
            panic!()
        };
        assert_eq!(req_cons, 1);
        assert_eq!(
            replay.len(),
            1,
            "index 1 is still in the ring, not in the journal"
        );
    }

    #[test]
    fn other_ring_or_garbage_starts_fresh() {
        let p = plat();
        let (mut j, _) = resume(&p, 0);
        j.init(&p, ID, 1, 0, true).unwrap();
        let other = RingId { ring_ref: 10, ..ID };
        assert!(matches!(
            Journal::open(&p, 8, other, 0).unwrap().1,
            Opened::Fresh
        ));
        // Garbage slot indexes (as a corrupted page could hold) are ignored, never a panic.
        p.write_local(8, OFF_VALID, &u32::MAX.to_le_bytes())
            .unwrap();
        for s in 0..SLOTS {
            p.write_local(8, SLOT_BASE + s * SLOT_SIZE, &0xdead_beefu32.to_le_bytes())
                .unwrap();
        }
        let (_, o) = resume(&p, 0);
        let Opened::Resume { replay, .. } = o else {
            panic!()
        };
        assert!(replay.is_empty());
        assert!(j.pins(&p, 0, &[1; PINS_PER_SLOT + 1]).is_err());
    }
}
