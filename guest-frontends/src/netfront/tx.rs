//! The transmit shadow: which request ids are on the ring, which frame and grant each holds,
//! and the bytes of every unanswered packet (kept so a reconnect can send them again).
//!
//! A packet of `n` bytes takes `ceil(n / 4096)` slots; slot `i` carries bytes
//! `i*4096 .. min(n, (i+1)*4096)` from offset 0 of its own frame. The first request's `size`
//! is the whole packet's length, later ones their own fragment's; every request but the last
//! has `NETTXF_more_data` (`io/netif.h`). Each slot has its own id and gets its own response,
//! in any order; the packet is done when every slot was answered.
//!
//! Responses come from an untrusted backend: an id that is not in flight (never issued, or
//! answered already) or a status that is not `NETIF_RSP_*` is a protocol error
//! ([`TxError`]). `NETIF_RSP_NULL` answers an extra-info slot; this frontend sends none, and
//! like Linux's netfront it skips such responses (a backend that answers a data slot with
//! `NULL` only delays that packet until the next reconnect).

use std::collections::BTreeMap;

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

/// Slots a packet of `len` bytes takes.
pub fn slots_for(len: usize) -> usize {
    len.div_ceil(PAGE_SIZE).max(1)
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

    /// Record a packet whose slots hold `pages` (frame and grant, in order) and return the
    /// requests to put on the ring. `pages.len()` must be [`slots_for`]`(data.len())` and the
    /// ring must have room for them; on failure (no free ids) nothing is recorded and the
    /// data is given back.
    pub fn start(
        &mut self,
        data: Vec<u8>,
        pages: &[(Frame, GrantRef)],
    ) -> Result<Vec<NetifTxRequest>, Vec<u8>> {
        let len = data.len();
        if pages.len() != slots_for(len) || len > usize::from(u16::MAX) {
            return Err(data);
        }
        let seq = self.next_seq;
        let mut reqs = Vec::with_capacity(pages.len());
        for (i, &(frame, gref)) in pages.iter().enumerate() {
            let Ok(id) = self.ids.alloc(TxSlot { seq, frame, gref }) else {
                for r in &reqs {
                    let r: &NetifTxRequest = r;
                    let _ = self.ids.complete(u64::from(r.id));
                }
                return Err(data);
            };
            let start = i * PAGE_SIZE;
            let frag = (len - start).min(PAGE_SIZE);
            let more = i + 1 < pages.len();
            reqs.push(NetifTxRequest {
                gref,
                offset: 0,
                flags: if more { NETTXF_MORE_DATA } else { 0 },
                // Ids are below the ring size (256); sizes were bounded by u16::MAX above.
                id: u16::try_from(id).unwrap_or(u16::MAX),
                size: u16::try_from(if i == 0 { len } else { frag }).unwrap_or(u16::MAX),
            });
        }
        self.next_seq += 1;
        self.packets.insert(
            seq,
            Pending {
                data,
                remaining: pages.len(),
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

    fn pages(n: usize) -> Vec<(Frame, GrantRef)> {
        (0..n).map(|i| (100 + i as u64, 500 + i as u32)).collect()
    }

    #[test]
    fn multi_slot_layout_follows_netif_h() {
        let mut t = TxShadow::new(256);
        let reqs = t.start(vec![1; 9000], &pages(3)).unwrap();
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
        assert!(t.start(vec![0; 10], &pages(2)).is_err(), "wrong page count");
    }

    #[test]
    fn answers_complete_packets_and_reject_lies() {
        let mut t = TxShadow::new(256);
        t.start(vec![1; 5000], &pages(2)).unwrap();
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
        t.start(vec![1; 10], &pages(1)).unwrap();
        t.start(vec![2; 5000], &pages(2)).unwrap();
        t.start(vec![3; 10], &pages(1)).unwrap();
        t.answer(&NetifTxResponse { id: 0, status: 0 }).unwrap();
        t.answer(&NetifTxResponse { id: 1, status: 0 }).unwrap();
        let (slots, packets) = t.drain();
        assert_eq!(slots.len(), 2);
        assert_eq!(packets, vec![vec![2; 5000], vec![3; 10]]);
        assert!(
            t.start(vec![0; 30000], &pages(8)).is_ok(),
            "all ids free again"
        );
        assert!(t.start(vec![0; 10], &pages(1)).is_err(), "ids exhausted");
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
                let n = slots_for(len);
                if t.start(vec![0; len], &pages(n)).is_ok() {
                    slots += n;
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
    }
}
