//! The in-flight journal: what a restarted netback process of the same domain needs to carry
//! on a channel's rings without the frontend noticing.
//!
//! Netback answers transmits out of order (a spoofed packet at once, a sent one when the
//! device is done), so once a response overwrites the ring slot of an earlier request, that
//! request exists only in netback's memory; and a receive request consumed for a packet that
//! was never answered must not be lost either (the guest would be one buffer short forever).
//! The journal keeps both in memory that outlives the process.
//!
//! # Where it lives
//!
//! In [`FRAMES`] consecutive frames of the IDD domain's own RAM per channel (named by
//! `ChannelConfig::journal_frame`, see `crate::layout`), read and written through
//! `Platform::read_local`/`write_local`. On the process-domain platform that RAM is a memfd
//! owned by the hypervisor: the next process of the same domain (`launch::spawn_in`) finds it
//! unchanged.
//!
//! # Layout (little-endian)
//!
//! Frame 0, header and transmit state:
//!
//! | off | size | field |
//! |---|---|---|
//! | 0 | 4 | `magic` = [`MAGIC`] (`"NBJ1"`), written last by `init` |
//! | 4 | 2 | `guest` (the frontend's domain), then 2 reserved |
//! | 8 | 4 | `tx_ring_ref` |
//! | 12 | 4 | `rx_ring_ref` |
//! | 16 | 4 | `remote_port` |
//! | 20 | 4 | `local_port`: our bound port (it survives the process) |
//! | 24 | 4 | `tx_req_cons`: transmit requests consumed so far |
//! | 28 | 4 | `rx_req_cons`: receive requests consumed so far |
//! | 64 | 32 | `valid`: bit `s` = transmit slot `s` holds a consumed, unanswered request |
//! | 96 | 32 | `answering`: bit `s` = slot `s`'s response was put at `rsp_idx[s]` |
//! | 128 | 4 × 256 | `rsp_idx[s]` |
//! | 1152 | 8 × 256 | `pin[s]`: IOVA pinned for slot `s`'s fragment, 0 = none |
//!
//! Frame 1, transmit slots: `s` (= ring index mod 256) at `16 s`: `ring_idx` (4), the raw
//! 12-byte `netif_tx_request` as consumed.
//!
//! Frame 2, receive slots: the raw 8-byte `netif_rx_request` of ring index `i` at `8 (i mod
//! 256)`. Receive responses go out in request order, so the consumed, unanswered receive
//! requests are exactly the indexes from the shared `rsp_prod` to `rx_req_cons`.
//!
//! # Protocol (crash-safe at every store)
//!
//! 1. *Consume* transmit slots: write their records, set their `valid` bits, then advance
//!    `tx_req_cons`. A crash before `tx_req_cons` moved leaves records that resume ignores
//!    (they are at or past `tx_req_cons`, still in the ring, consumed again).
//! 2. *Pin*: record the IOVA after the pin, zero it after the unpin; a restarted process
//!    unpins what is recorded before it pins anything ([`release_stale_pins`]).
//! 3. *Answer* a packet: write each slot's `rsp_idx`, set `answering`, put the responses,
//!    push, then clear `valid` and `answering`. On resume an answering slot whose `rsp_idx`
//!    is behind the shared `rsp_prod` was published and is dropped; every other valid slot is
//!    replayed: the packet goes out again (possibly twice, never skipped).
//! 4. *Consume* a receive request: write its raw request, then advance `rx_req_cons`.

use devchan::grant::{DomId, GrantRef};
use devchan::netif::{NetifRxRequest, NetifTxRequest, NET_RX_RING_SIZE, NET_TX_RING_SIZE};
use devchan::platform::{Frame, Platform, PlatformError, Port};
use devchan::ring::RingIdx;
use std::sync::atomic::{compiler_fence, Ordering};
use zerocopy::{FromBytes, IntoBytes};

/// `"NBJ1"`, little-endian.
pub const MAGIC: u32 = u32::from_le_bytes(*b"NBJ1");
/// Frames per channel.
pub const FRAMES: u64 = 3;
/// Transmit slots: one per ring entry.
pub const TX_SLOTS: usize = NET_TX_RING_SIZE as usize;
/// Receive slots: one per ring entry.
pub const RX_SLOTS: usize = NET_RX_RING_SIZE as usize;

const OFF_GUEST: usize = 4;
const OFF_TX_REF: usize = 8;
const OFF_RX_REF: usize = 12;
const OFF_REMOTE_PORT: usize = 16;
const OFF_LOCAL_PORT: usize = 20;
const OFF_TX_CONS: usize = 24;
const OFF_RX_CONS: usize = 28;
const OFF_VALID: usize = 64;
const OFF_ANSWERING: usize = 96;
const OFF_RSP_IDX: usize = 128;
const OFF_PINS: usize = 1152;
const TX_REC: usize = 16;
const RX_REC: usize = 8;

const _: () = assert!(OFF_RSP_IDX + 4 * TX_SLOTS == OFF_PINS);
const _: () = assert!(OFF_PINS + 8 * TX_SLOTS <= 4096);
const _: () = assert!(TX_SLOTS * TX_REC <= 4096 && RX_SLOTS * RX_REC <= 4096);
const _: () = assert!(TX_SLOTS == 256, "bitmaps are 256 bits");

/// Why a journal operation failed.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Reading or writing the journal frames failed.
    #[error("Journal memory access failed")]
    Memory(#[from] PlatformError),
}

/// Which channel a journal belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelId {
    /// Frontend domain.
    pub guest: DomId,
    /// Its transmit ring grant.
    pub tx_ring_ref: GrantRef,
    /// Its receive ring grant.
    pub rx_ring_ref: GrantRef,
    /// Its event-channel port.
    pub remote_port: Port,
}

/// What [`Journal::open`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Opened {
    /// No journal of this channel: start fresh.
    Fresh,
    /// A journal of this channel: resume.
    Resume {
        /// Our port bound to the frontend.
        local_port: Port,
        /// How far the transmit ring was consumed.
        tx_req_cons: RingIdx,
        /// How far the receive ring was consumed.
        rx_req_cons: RingIdx,
        /// Consumed transmit slots whose responses were never published, in ring order.
        tx_replay: Vec<(RingIdx, NetifTxRequest)>,
        /// Consumed receive requests never answered, in ring order (posted buffers).
        rx_held: Vec<(RingIdx, NetifRxRequest)>,
        /// IOVAs the old process left pinned (to unpin).
        stale_pins: Vec<u64>,
    },
}

/// One channel's journal.
pub struct Journal {
    frame: Frame,
    valid: [u32; 8],
    answering: [u32; 8],
}

fn slot(idx: RingIdx) -> (usize, usize, u32) {
    let s = idx as usize % TX_SLOTS;
    (s, s / 32, 1u32 << (s % 32))
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    b.get(off..off + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

fn read_pins<P: Platform>(p: &P, frame: Frame) -> Result<Vec<u64>, JournalError> {
    let mut pins = vec![0u8; 8 * TX_SLOTS];
    p.read_local(frame, OFF_PINS, &mut pins)?;
    Ok(pins
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .filter(|v| *v != 0)
        .collect())
}

/// Unpin every IOVA the journal at `journal_frame` records and clear the record; returns how
/// many there were. A restarted process calls this for every channel *before it pins
/// anything* (IOVAs are recycled).
pub fn release_stale_pins<P: Platform>(p: &P, journal_frame: Frame) -> Result<usize, JournalError> {
    let mut magic = [0u8; 4];
    p.read_local(journal_frame, 0, &mut magic)?;
    if u32::from_le_bytes(magic) != MAGIC {
        return Ok(0);
    }
    let pins = read_pins(p, journal_frame)?;
    for &iova in &pins {
        // Revoked by the manager already, or released now: gone either way.
        let _ = p.unpin_grant(iova);
    }
    if !pins.is_empty() {
        p.write_local(journal_frame, OFF_PINS, &[0u8; 8 * TX_SLOTS])?;
    }
    Ok(pins.len())
}

impl Journal {
    fn write<P: Platform>(
        &self,
        p: &P,
        page: u64,
        off: usize,
        data: &[u8],
    ) -> Result<(), JournalError> {
        // Program order of the journal stores is the crash-safety argument: keep the compiler
        // from reordering them (a crashed process's executed stores are all in the memfd).
        compiler_fence(Ordering::SeqCst);
        p.write_local(self.frame + page, off, data)?;
        compiler_fence(Ordering::SeqCst);
        Ok(())
    }

    fn write_u32<P: Platform>(&self, p: &P, off: usize, v: u32) -> Result<(), JournalError> {
        self.write(p, 0, off, &v.to_le_bytes())
    }

    fn write_words<P: Platform>(
        &self,
        p: &P,
        off: usize,
        words: &[u32; 8],
        which: u8,
    ) -> Result<(), JournalError> {
        for (w, v) in words.iter().enumerate() {
            if which & (1 << w) != 0 {
                self.write_u32(p, off + 4 * w, *v)?;
            }
        }
        Ok(())
    }

    /// Open the journal at `frame` for channel `id`; the `*_rsp_prod` are the rings' shared
    /// response producers as found now.
    pub fn open<P: Platform>(
        p: &P,
        frame: Frame,
        id: ChannelId,
        tx_rsp_prod: RingIdx,
        rx_rsp_prod: RingIdx,
    ) -> Result<(Self, Opened), JournalError> {
        let mut j = Self {
            frame,
            valid: [0; 8],
            answering: [0; 8],
        };
        let mut h = vec![0u8; 4096];
        p.read_local(frame, 0, &mut h)?;
        let same = u32_at(&h, 0) == MAGIC
            && u16::from_le_bytes([h[OFF_GUEST], h[OFF_GUEST + 1]]) == id.guest
            && u32_at(&h, OFF_TX_REF) == id.tx_ring_ref
            && u32_at(&h, OFF_RX_REF) == id.rx_ring_ref
            && u32_at(&h, OFF_REMOTE_PORT) == id.remote_port;
        if !same {
            return Ok((j, Opened::Fresh));
        }
        let tx_req_cons = u32_at(&h, OFF_TX_CONS);
        let rx_req_cons = u32_at(&h, OFF_RX_CONS);
        let mut slots = vec![0u8; 4096];
        p.read_local(frame + 1, 0, &mut slots)?;
        let mut tx_replay = Vec::new();
        for s in 0..TX_SLOTS {
            let (w, bit) = (s / 32, 1u32 << (s % 32));
            if u32_at(&h, OFF_VALID + 4 * w) & bit == 0 {
                continue;
            }
            let rec = &slots[s * TX_REC..(s + 1) * TX_REC];
            let ring_idx = u32_at(rec, 0);
            // Only slots consumed before tx_req_cons (within one ring) count.
            let age = tx_req_cons.wrapping_sub(ring_idx);
            if age == 0 || age as usize > TX_SLOTS || ring_idx as usize % TX_SLOTS != s {
                continue;
            }
            let published = u32_at(&h, OFF_ANSWERING + 4 * w) & bit != 0 && {
                let behind = tx_rsp_prod.wrapping_sub(u32_at(&h, OFF_RSP_IDX + 4 * s));
                (1..=NET_TX_RING_SIZE).contains(&behind)
            };
            if published {
                continue;
            }
            let Ok(raw) = NetifTxRequest::read_from_bytes(&rec[4..]) else {
                continue;
            };
            tx_replay.push((ring_idx, raw));
            j.valid[w] |= bit;
        }
        // Oldest first.
        tx_replay.sort_by_key(|(i, _)| std::cmp::Reverse(tx_req_cons.wrapping_sub(*i)));
        let mut rx_held = Vec::new();
        let held = rx_req_cons.wrapping_sub(rx_rsp_prod);
        if held as usize <= RX_SLOTS {
            let mut rx = vec![0u8; 4096];
            p.read_local(frame + 2, 0, &mut rx)?;
            for k in 0..held {
                let idx = rx_rsp_prod.wrapping_add(k);
                let off = idx as usize % RX_SLOTS * RX_REC;
                if let Ok(raw) = NetifRxRequest::read_from_bytes(&rx[off..off + RX_REC]) {
                    rx_held.push((idx, raw));
                }
            }
        }
        let stale_pins = read_pins(p, frame)?;
        Ok((
            j,
            Opened::Resume {
                local_port: u32_at(&h, OFF_LOCAL_PORT),
                tx_req_cons,
                rx_req_cons,
                tx_replay,
                rx_held,
                stale_pins,
            },
        ))
    }

    /// Start a fresh journal for `id` (clears it), or rewrite the header of a resumed one.
    pub fn init<P: Platform>(
        &mut self,
        p: &P,
        id: ChannelId,
        local_port: Port,
        tx_req_cons: RingIdx,
        rx_req_cons: RingIdx,
        fresh: bool,
    ) -> Result<(), JournalError> {
        if fresh {
            // The magic goes first: a half-initialised journal is never trusted.
            self.write_u32(p, 0, 0)?;
            for page in 0..FRAMES {
                self.write(p, page, 0, &[0u8; 4096])?;
            }
            self.valid = [0; 8];
        } else {
            // `valid` first (it now lists only the slots to replay), then the answering marks.
            self.write_words(p, OFF_VALID, &self.valid.clone(), 0xff)?;
            self.write(p, 0, OFF_ANSWERING, &[0u8; 32])?;
            self.write(p, 0, OFF_PINS, &[0u8; 8 * TX_SLOTS])?;
        }
        self.answering = [0; 8];
        self.write(p, 0, OFF_GUEST, &id.guest.to_le_bytes())?;
        self.write_u32(p, OFF_TX_REF, id.tx_ring_ref)?;
        self.write_u32(p, OFF_RX_REF, id.rx_ring_ref)?;
        self.write_u32(p, OFF_REMOTE_PORT, id.remote_port)?;
        self.write_u32(p, OFF_LOCAL_PORT, local_port)?;
        self.write_u32(p, OFF_TX_CONS, tx_req_cons)?;
        self.write_u32(p, OFF_RX_CONS, rx_req_cons)?;
        self.write_u32(p, 0, MAGIC)
    }

    /// Record consumed transmit slots (ring index and raw request); `tx_req_cons` is the new
    /// consumer index.
    pub fn tx_consumed<P: Platform>(
        &mut self,
        p: &P,
        slots: &[(RingIdx, NetifTxRequest)],
        tx_req_cons: RingIdx,
    ) -> Result<(), JournalError> {
        let mut words = 0u8;
        for (idx, raw) in slots {
            let (s, w, bit) = slot(*idx);
            let mut rec = [0u8; TX_REC];
            rec[..4].copy_from_slice(&idx.to_le_bytes());
            rec[4..].copy_from_slice(raw.as_bytes());
            self.write(p, 1, s * TX_REC, &rec)?;
            self.valid[w] |= bit;
            words |= 1 << w;
        }
        self.write_words(p, OFF_VALID, &self.valid.clone(), words)?;
        self.write_u32(p, OFF_TX_CONS, tx_req_cons)
    }

    /// Record the IOVA pinned for transmit slot `idx` (0: unpinned).
    pub fn tx_pin<P: Platform>(&self, p: &P, idx: RingIdx, iova: u64) -> Result<(), JournalError> {
        let (s, _, _) = slot(idx);
        self.write(p, 0, OFF_PINS + 8 * s, &iova.to_le_bytes())
    }

    /// Record that slot `idx`'s response is put at response index `rsp_idx` (before it is
    /// written to the ring).
    pub fn tx_answering<P: Platform>(
        &mut self,
        p: &P,
        idx: RingIdx,
        rsp_idx: RingIdx,
    ) -> Result<(), JournalError> {
        let (s, w, bit) = slot(idx);
        self.write_u32(p, OFF_RSP_IDX + 4 * s, rsp_idx)?;
        self.answering[w] |= bit;
        self.write_u32(p, OFF_ANSWERING + 4 * w, self.answering[w])
    }

    /// Forget the slots `idxs`, whose responses are published.
    pub fn tx_answered<P: Platform>(
        &mut self,
        p: &P,
        idxs: &[RingIdx],
    ) -> Result<(), JournalError> {
        let mut words = 0u8;
        for &i in idxs {
            let (_, w, bit) = slot(i);
            self.valid[w] &= !bit;
            self.answering[w] &= !bit;
            words |= 1 << w;
        }
        self.write_words(p, OFF_VALID, &self.valid.clone(), words)?;
        self.write_words(p, OFF_ANSWERING, &self.answering.clone(), words)
    }

    /// Record a consumed receive request; `rx_req_cons` is the new consumer index.
    pub fn rx_consumed<P: Platform>(
        &self,
        p: &P,
        idx: RingIdx,
        raw: &NetifRxRequest,
        rx_req_cons: RingIdx,
    ) -> Result<(), JournalError> {
        self.write(p, 2, idx as usize % RX_SLOTS * RX_REC, raw.as_bytes())?;
        self.write_u32(p, OFF_RX_CONS, rx_req_cons)
    }

    /// Transmit slots consumed and not answered, as the journal counts them.
    pub fn tx_outstanding(&self) -> u32 {
        self.valid.iter().map(|w| w.count_ones()).sum()
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

    const ID: ChannelId = ChannelId {
        guest: 3,
        tx_ring_ref: 9,
        rx_ring_ref: 10,
        remote_port: 4,
    };

    fn tx(id: u16) -> NetifTxRequest {
        NetifTxRequest {
            gref: 100 + u32::from(id),
            offset: 0,
            flags: 0,
            id,
            size: 60,
        }
    }

    fn open(p: &LocalPlatform, tx_rsp: u32, rx_rsp: u32) -> (Journal, Opened) {
        Journal::open(p, 8, ID, tx_rsp, rx_rsp).unwrap()
    }

    #[test]
    fn resume_replays_unpublished_transmits_and_keeps_receive_buffers() {
        let p = plat();
        let (mut j, o) = open(&p, 0, 0);
        assert_eq!(o, Opened::Fresh);
        j.init(&p, ID, 17, 0, 0, true).unwrap();
        // Transmits at ring indexes 0..5 (index 254/255 style wrap tested below).
        let slots: Vec<_> = (0..5u32)
            .map(|i| (i, tx(u16::try_from(i).unwrap())))
            .collect();
        j.tx_consumed(&p, &slots[..2], 2).unwrap();
        j.tx_consumed(&p, &slots[2..], 5).unwrap();
        j.tx_pin(&p, 3, 0x7000).unwrap();
        // Slot 1 answered at rsp 0 and published; slot 4 put at rsp 1, never pushed.
        j.tx_answering(&p, 1, 0).unwrap();
        j.tx_answering(&p, 4, 1).unwrap();
        // Receive requests 0..3 consumed; response 0 published.
        for i in 0..3u32 {
            let r = NetifRxRequest {
                id: 50 + u16::try_from(i).unwrap(),
                pad: 0,
                gref: 200 + i,
            };
            j.rx_consumed(&p, i, &r, i + 1).unwrap();
        }
        let (j2, o) = open(&p, 1, 1);
        let Opened::Resume {
            local_port,
            tx_req_cons,
            rx_req_cons,
            tx_replay,
            rx_held,
            stale_pins,
        } = o
        else {
            panic!("journal not found")
        };
        assert_eq!((local_port, tx_req_cons, rx_req_cons), (17, 5, 3));
        let ids: Vec<_> = tx_replay.iter().map(|(i, r)| (*i, r.id)).collect();
        assert_eq!(ids, [(0, 0), (2, 2), (3, 3), (4, 4)]);
        let held: Vec<_> = rx_held.iter().map(|(i, r)| (*i, r.id, r.gref)).collect();
        assert_eq!(held, [(1, 51, 201), (2, 52, 202)]);
        assert_eq!(stale_pins, [0x7000]);
        assert_eq!(j2.tx_outstanding(), 4);
        assert_eq!(release_stale_pins(&p, 8).unwrap(), 1);
        assert_eq!(release_stale_pins(&p, 8).unwrap(), 0);
    }

    #[test]
    fn answered_slots_are_forgotten_and_indexes_wrap() {
        let p = plat();
        let (mut j, _) = open(&p, 0, 0);
        let start = u32::MAX - 1;
        j.init(&p, ID, 1, start, 0, true).unwrap();
        let slots: Vec<_> = (0..4u32)
            .map(|k| (start.wrapping_add(k), tx(u16::try_from(k).unwrap())))
            .collect();
        j.tx_consumed(&p, &slots, start.wrapping_add(4)).unwrap();
        j.tx_answered(&p, &[start, start.wrapping_add(2)]).unwrap();
        let (_, o) = open(&p, start, 0);
        let Opened::Resume { tx_replay, .. } = o else {
            panic!()
        };
        let idx: Vec<_> = tx_replay.iter().map(|(i, _)| *i).collect();
        assert_eq!(idx, [u32::MAX, 1]);
    }

    #[test]
    fn other_channel_or_garbage_is_harmless() {
        let p = plat();
        let (mut j, _) = open(&p, 0, 0);
        j.init(&p, ID, 1, 0, 0, true).unwrap();
        let other = ChannelId {
            rx_ring_ref: 11,
            ..ID
        };
        assert_eq!(Journal::open(&p, 8, other, 0, 0).unwrap().1, Opened::Fresh);
        // Garbage everywhere: no panic, nothing outside one ring replayed.
        p.write_local(8, OFF_VALID, &[0xff; 64]).unwrap();
        p.write_local(9, 0, &[0xab; 4096]).unwrap();
        p.write_local(8, OFF_RX_CONS, &u32::MAX.to_le_bytes())
            .unwrap();
        let (_, o) = open(&p, 0, 0);
        let Opened::Resume {
            tx_replay, rx_held, ..
        } = o
        else {
            panic!()
        };
        assert!(tx_replay.is_empty());
        assert!(rx_held.is_empty(), "more held than a ring is garbage");
    }
}
