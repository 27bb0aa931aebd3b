//! The transmit shadow: which request ids are on the ring, which frame and grant each holds,
//! and the bytes of every unanswered packet (kept so a reconnect can send them again).
//!
//! Transmit bytes are packed into frames one after the other ([`TxLayout`]), as a Linux
//! guest's socket buffers lie in its memory: a packet starts where the previous one ended
//! and continues in a fresh frame when the page is full, so a packet that crosses a page takes
//! one slot per page it touches (a 1514-byte frame takes two about a third of the time). Each
//! slot is one fragment (grant, offset, size) with its own grant, read-only. The first
//! request's `size` is the whole packet's length, later ones their own fragment's; every
//! request but the last has `NETTXF_more_data` (`io/netif.h`). Each slot has its own id and
//! gets its own response, in any order; the packet is done when every slot was answered. A
//! frame returns to the pool when no fragment on it is in flight and the layout has moved on
//! to another frame.
//!
//! Responses come from an untrusted backend: an id that is not in flight (never issued, or
//! answered already) or a status that is not `NETIF_RSP_*` is a protocol error
//! ([`TxError`]). `NETIF_RSP_NULL` answers an extra-info slot; this frontend sends none, and
//! like Linux's netfront it skips such responses (a backend that answers a data slot with
//! `NULL` only delays that packet until the next reconnect).

use std::collections::{BTreeMap, HashMap};

use devchan::grant::{GrantRef, PAGE_SIZE};
use devchan::netif::{NetifStatus, NetifTxRequest, NetifTxResponse, NETTXF_MORE_DATA};
use devchan::platform::Frame;
use devchan::ring::IdAllocator;

/// A broken transmit response.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum TxError {
    /// The id is not in flight.
    #[error("Transmit response for id {0}, which is not in flight")]
    UnknownId(u16),
    /// The status is not a `NETIF_RSP_*` value.
    #[error("Transmit response for id {id} has unknown status {status}")]
    BadStatus {
        /// The id.
        id: u16,
        /// The status.
        status: i16,
    },
}

/// One request slot in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxSlot {
    /// The packet it belongs to.
    pub seq: u64,
    /// The frame holding its bytes.
    pub frame: Frame,
    /// The grant of that frame.
    pub gref: GrantRef,
}

#[derive(Debug)]
struct Pending {
    data: Vec<u8>,
    remaining: usize,
    failed: Option<NetifStatus>,
}

/// A packet every slot of which was answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxDone {
    /// Its length.
    pub len: usize,
    /// `Okay`, or the first failure status a slot got.
    pub status: NetifStatus,
}

/// What one response did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxAnswer {
    /// A `NETIF_RSP_NULL` (extra-info answer): nothing to release.
    Null,
    /// A slot was answered: release its grant and frame; `done` if that was the packet's last.
    Slot {
        /// The slot.
        slot: TxSlot,
        /// The packet, if complete.
        done: Option<TxDone>,
    },
}

/// One fragment of a packet: bytes `offset..offset + size` of `frame`, granted as `gref`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxFrag {
    /// The frame.
    pub frame: Frame,
    /// Its grant.
    pub gref: GrantRef,
    /// Where the bytes start.
    pub offset: u16,
    /// How many.
    pub size: u16,
}

/// Where transmit bytes go: the rest of the frame being filled, then fresh frames; with a
/// count of fragments in flight per frame (see the module docs). Frames that become free are
/// collected for the caller ([`Self::take_freed`]).
#[derive(Debug, Default)]
pub struct TxLayout {
    /// The frame being filled and the bytes used in it.
    fill: Option<(Frame, usize)>,
    /// Fragments in flight per frame, plus one for the frame being filled.
    refs: HashMap<Frame, usize>,
    /// Frames no longer used.
    freed: Vec<Frame>,
}

impl TxLayout {
    /// Fresh frames a packet of `len` bytes needs.
    pub fn frames_needed(&self, len: usize) -> usize {
        let room = self.fill.map_or(0, |(_, used)| PAGE_SIZE - used);
        len.saturating_sub(room).div_ceil(PAGE_SIZE)
    }

    /// Lay out `len` bytes: `(frame, offset, size)` per fragment, taking fresh frames from
    /// `fresh` (which should hold [`Self::frames_needed`] of them; with fewer, the layout
    /// covers fewer bytes, which the caller checks).
    pub fn place(&mut self, len: usize, fresh: &mut Vec<Frame>) -> Vec<(Frame, u16, u16)> {
        let mut out = Vec::new();
        let mut left = len;
        while left > 0 {
            let (frame, used) = match self.fill {
                Some(f) if f.1 < PAGE_SIZE => f,
                _ => {
                    let Some(f) = fresh.pop() else {
                        break;
                    };
                    self.close_fill();
                    self.refs.insert(f, 1);
                    (f, 0)
                }
            };
            let n = left.min(PAGE_SIZE - used);
            // used < 4096 and n <= 4096: both fit a u16.
            out.push((
                frame,
                u16::try_from(used).unwrap_or(0),
                u16::try_from(n).unwrap_or(0),
            ));
            *self.refs.entry(frame).or_insert(0) += 1;
            self.fill = Some((frame, used + n));
            left -= n;
        }
        if self.fill.is_some_and(|(_, used)| used == PAGE_SIZE) {
            self.close_fill();
        }
        out
    }

    fn close_fill(&mut self) {
        if let Some((f, _)) = self.fill.take() {
            self.put(f);
        }
    }

    /// A fragment on `frame` is done.
    pub fn put(&mut self, frame: Frame) {
        match self.refs.get_mut(&frame) {
            Some(n) if *n > 1 => *n -= 1,
            Some(_) => {
                self.refs.remove(&frame);
                self.freed.push(frame);
            }
            None => {}
        }
    }

    /// Frames that became free since the last call.
    pub fn take_freed(&mut self) -> Vec<Frame> {
        std::mem::take(&mut self.freed)
    }

    /// Frames held (in flight or being filled).
    pub fn held(&self) -> usize {
        self.refs.len()
    }
}

/// The transmit shadow (see the module docs).
#[derive(Debug)]
pub struct TxShadow {
    ids: IdAllocator<TxSlot>,
    packets: BTreeMap<u64, Pending>,
    next_seq: u64,
}

impl TxShadow {
    /// A shadow for a ring of `size` slots.
    pub fn new(size: u32) -> Self {
        Self {
            ids: IdAllocator::new(size),
            packets: BTreeMap::new(),
            next_seq: 0,
        }
    }

    /// Slots in flight.
    pub fn slots_in_flight(&self) -> usize {
        self.ids.len()
    }

    /// Packets in flight.
    pub fn packets_in_flight(&self) -> usize {
        self.packets.len()
    }

    /// Record a packet laid out in `frags` (their sizes add up to `data.len()`, each within
    /// its page) and return the requests to put on the ring, which must have room for them.
    /// On failure (no free ids, or a layout that does not match) nothing is recorded and the
    /// data is given back.
    pub fn start(
        &mut self,
        data: Vec<u8>,
        frags: &[TxFrag],
    ) -> Result<Vec<NetifTxRequest>, Vec<u8>> {
        let len = data.len();
        let total: usize = frags.iter().map(|f| usize::from(f.size)).sum();
        let in_page = frags
            .iter()
            .all(|f| usize::from(f.offset) + usize::from(f.size) <= PAGE_SIZE);
        if frags.is_empty() || total != len || !in_page || len > usize::from(u16::MAX) {
            return Err(data);
        }
        let seq = self.next_seq;
        let mut reqs: Vec<NetifTxRequest> = Vec::with_capacity(frags.len());
        for (i, f) in frags.iter().enumerate() {
            let slot = TxSlot {
                seq,
                frame: f.frame,
                gref: f.gref,
            };
            let Ok(id) = self.ids.alloc(slot) else {
                for r in &reqs {
                    let _ = self.ids.complete(u64::from(r.id));
                }
                return Err(data);
            };
            let more = i + 1 < frags.len();
            reqs.push(NetifTxRequest {
                gref: f.gref,
                offset: f.offset,
                flags: if more { NETTXF_MORE_DATA } else { 0 },
                // Ids are below the ring size (256); the length was bounded by u16::MAX above.
                id: u16::try_from(id).unwrap_or(u16::MAX),
                size: if i == 0 {
                    u16::try_from(len).unwrap_or(u16::MAX)
                } else {
                    f.size
                },
            });
        }
        self.next_seq += 1;
        self.packets.insert(
            seq,
            Pending {
                data,
                remaining: frags.len(),
                failed: None,
            },
        );
        Ok(reqs)
    }

    /// Match a response (copied out of the ring) against the shadow.
    pub fn answer(&mut self, rsp: &NetifTxResponse) -> Result<TxAnswer, TxError> {
        let status = NetifStatus::try_from(rsp.status).map_err(|_| TxError::BadStatus {
            id: rsp.id,
            status: rsp.status,
        })?;
        if status == NetifStatus::Null {
            return Ok(TxAnswer::Null);
        }
        let slot = self
            .ids
            .complete(u64::from(rsp.id))
            .map_err(|_| TxError::UnknownId(rsp.id))?;
        let Some(p) = self.packets.get_mut(&slot.seq) else {
            return Ok(TxAnswer::Slot { slot, done: None });
        };
        if status != NetifStatus::Okay && p.failed.is_none() {
            p.failed = Some(status);
        }
        p.remaining = p.remaining.saturating_sub(1);
        let done = if p.remaining == 0 {
            self.packets.remove(&slot.seq).map(|p| TxDone {
                len: p.data.len(),
                status: p.failed.unwrap_or(NetifStatus::Okay),
            })
        } else {
            None
        };
        Ok(TxAnswer::Slot { slot, done })
    }

    /// Forget everything in flight (the connection is gone): the slots, whose grants and
    /// frames the caller releases, and the unanswered packets' bytes in submission order.
    pub fn drain(&mut self) -> (Vec<TxSlot>, Vec<Vec<u8>>) {
        let slots = self.ids.drain().into_iter().map(|(_, s)| s).collect();
        let packets = std::mem::take(&mut self.packets)
            .into_values()
            .map(|p| p.data)
            .collect();
        (slots, packets)
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Fragments of whole pages from offset 0 (frames 100.., grants 500..).
    fn pages(len: usize) -> Vec<TxFrag> {
        (0..len.div_ceil(PAGE_SIZE))
            .map(|i| TxFrag {
                frame: 100 + i as u64,
                gref: 500 + i as u32,
                offset: 0,
                size: (len - i * PAGE_SIZE).min(PAGE_SIZE) as u16,
            })
            .collect()
    }

    #[test]
    fn multi_slot_layout_follows_netif_h() {
        let mut t = TxShadow::new(256);
        let mut frags = pages(9000);
        let reqs = t.start(vec![1; 9000], &frags).unwrap();
        let got: Vec<_> = reqs
            .iter()
            .map(|r| (r.id, r.flags, r.size, r.gref))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, NETTXF_MORE_DATA, 9000, 500),
                (1, NETTXF_MORE_DATA, 4096, 501),
                (2, 0, 9000 - 8192, 502)
            ]
        );
        // devchan's backend-side parser reads the same packet back.
        let mut it = reqs.clone().into_iter();
        let p = devchan::netif::read_tx_packet(|| Ok(it.next()), 18)
            .unwrap()
            .unwrap();
        assert_eq!(p.size, 9000);
        let sizes: Vec<u16> = p.fragments.iter().map(|f| f.size).collect();
        assert_eq!(sizes, vec![4096, 4096, 808]);
        assert!(t.start(vec![0; 10], &frags).is_err(), "sizes do not add up");
        frags[0].offset = 1;
        assert!(t.start(vec![0; 9000], &frags).is_err(), "crosses its page");
        assert!(t.start(vec![0; 10], &[]).is_err());
    }

    #[test]
    fn answers_complete_packets_and_reject_lies() {
        let mut t = TxShadow::new(256);
        t.start(vec![1; 5000], &pages(5000)).unwrap();
        let ok = |id| NetifTxResponse { id, status: 0 };
        assert_eq!(
            t.answer(&NetifTxResponse { id: 7, status: 0 }),
            Err(TxError::UnknownId(7))
        );
        assert_eq!(
            t.answer(&NetifTxResponse { id: 0, status: 9 }),
            Err(TxError::BadStatus { id: 0, status: 9 })
        );
        assert_eq!(
            t.answer(&NetifTxResponse { id: 0, status: 1 }),
            Ok(TxAnswer::Null)
        );
        let TxAnswer::Slot { done: None, .. } = t.answer(&ok(1)).unwrap() else {
            panic!("first of two")
        };
        assert_eq!(t.answer(&ok(1)), Err(TxError::UnknownId(1)), "duplicate");
        let TxAnswer::Slot {
            done: Some(d),
            slot,
        } = t.answer(&NetifTxResponse { id: 0, status: -1 }).unwrap()
        else {
            panic!("last")
        };
        assert_eq!(
            d,
            TxDone {
                len: 5000,
                status: NetifStatus::Error
            }
        );
        assert_eq!((slot.frame, slot.gref), (100, 500));
        assert_eq!(t.slots_in_flight(), 0);
    }

    #[test]
    fn drain_returns_unanswered_packets_in_order() {
        let mut t = TxShadow::new(8);
        t.start(vec![1; 10], &pages(10)).unwrap();
        t.start(vec![2; 5000], &pages(5000)).unwrap();
        t.start(vec![3; 10], &pages(10)).unwrap();
        t.answer(&NetifTxResponse { id: 0, status: 0 }).unwrap();
        t.answer(&NetifTxResponse { id: 1, status: 0 }).unwrap();
        let (slots, packets) = t.drain();
        assert_eq!(slots.len(), 2);
        assert_eq!(packets, vec![vec![2; 5000], vec![3; 10]]);
        assert!(
            t.start(vec![0; 30000], &pages(30000)).is_ok(),
            "all ids free again"
        );
        assert!(t.start(vec![0; 10], &pages(10)).is_err(), "ids exhausted");
    }

    #[test]
    fn layout_packs_packets_and_frees_frames_when_done() {
        let mut l = TxLayout::default();
        let mut fresh = vec![12, 11, 10];
        assert_eq!(l.frames_needed(1514), 1);
        let a = l.place(1514, &mut fresh);
        assert_eq!(a, vec![(10, 0, 1514)]);
        assert_eq!(l.frames_needed(1514), 0);
        let b = l.place(1514, &mut fresh);
        assert_eq!(b, vec![(10, 1514, 1514)]);
        // The third crosses into a fresh page: two slots.
        assert_eq!(l.frames_needed(1514), 1);
        let c = l.place(1514, &mut fresh);
        assert_eq!(c, vec![(10, 3028, 1068), (11, 0, 446)]);
        assert!(l.take_freed().is_empty());
        for (f, _, _) in a.iter().chain(&b).chain(&c) {
            l.put(*f);
        }
        assert_eq!(l.take_freed(), vec![10], "11 is still being filled");
        // Exactly filling a page closes it.
        let d = l.place(PAGE_SIZE - 446, &mut fresh);
        assert_eq!(d, vec![(11, 446, 3650)]);
        l.put(11);
        assert_eq!(l.take_freed(), vec![11]);
        assert_eq!(l.held(), 0);
        // Too few fresh frames: the layout covers less, which the caller sees.
        let e = l.place(9000, &mut fresh);
        let placed: usize = e.iter().map(|x| usize::from(x.2)).sum();
        assert_eq!(placed, PAGE_SIZE);
    }

    proptest! {
        #[test]
        fn any_response_sequence_keeps_the_shadow_consistent(
            lens in proptest::collection::vec(1usize..20000, 1..10),
            rsps in proptest::collection::vec((0u16..300, -3i16..3), 0..100),
        ) {
            let mut t = TxShadow::new(64);
            let mut slots = 0;
            for len in lens {
                let f = pages(len);
                if t.start(vec![0; len], &f).is_ok() {
                    slots += f.len();
                }
            }
            prop_assert_eq!(t.slots_in_flight(), slots);
            for (id, status) in rsps {
                if let Ok(TxAnswer::Slot { .. }) = t.answer(&NetifTxResponse { id, status }) {
                    slots -= 1;
                }
                prop_assert_eq!(t.slots_in_flight(), slots);
            }
            let (s, _) = t.drain();
            prop_assert_eq!(s.len(), slots);
        }

        #[test]
        fn layouts_cover_every_byte_once_and_free_every_frame(
            lens in proptest::collection::vec(1usize..10000, 1..30),
        ) {
            let mut l = TxLayout::default();
            let mut next = 0u64;
            let mut out = Vec::new();
            for len in lens {
                let mut fresh: Vec<Frame> = (0..l.frames_needed(len))
                    .map(|_| { next += 1; next })
                    .collect();
                let frags = l.place(len, &mut fresh);
                prop_assert!(fresh.is_empty());
                prop_assert_eq!(frags.iter().map(|f| usize::from(f.2)).sum::<usize>(), len);
                prop_assert!(frags.iter().all(|f| usize::from(f.1) + usize::from(f.2) <= PAGE_SIZE));
                prop_assert!(frags.len() <= len.div_ceil(PAGE_SIZE) + 1);
                out.extend(frags);
            }
            for (f, _, _) in &out {
                l.put(*f);
            }
            let freed = l.take_freed();
            prop_assert_eq!(freed.len() + l.held(), next as usize);
            prop_assert!(l.held() <= 1, "at most the page being filled");
        }
    }
}
