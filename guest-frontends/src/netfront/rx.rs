//! The receive side's bookkeeping: which buffer each posted id names, and the assembly of
//! (possibly multi-slot) packets from the backend's responses.
//!
//! # Posting
//!
//! Each posted buffer is one frame; its request id is its ring slot (`req_prod % size`, as
//! Linux's netfront numbers them), so ids are `0..size` and at most one buffer per id is
//! posted at a time. The grant is writable access (copy mode: the backend grant-copies into
//! it) or an accept-transfer grant (exchange mode: the backend gives us a page in its place).
//!
//! # Responses (untrusted)
//!
//! A response names its buffer by `id`; the response is copied out of the ring and checked
//! before anything is done with it ([`RxAssembler::accept`]):
//! * flags must be known `NETRXF_*` bits, the status a length or a `NETIF_RSP_*` value, and
//!   `offset + length` within the page (devchan's [`RxResponse::decode`]);
//! * the id must name a posted buffer (never posted, or answered already: refused);
//! * `NETRXF_extra_info` and `NETRXF_gso_prefix` are refused: this frontend asks for no GSO,
//!   hashing or multicast control, so a backend has no reason to send extra-info slots (and
//!   such a slot carries no id that would say which buffer it consumed);
//! * a packet is the responses up to one without `NETRXF_more_data`; at most
//!   [`MAX_RX_SLOTS`] slots and [`devchan::netif::XEN_NETIF_MAX_TX_SIZE`] bytes.
//!
//! A refused response is a [`RxError`]: the caller drops the connection (the backend is broken
//! or hostile). A well-formed response with a failure status (`NETIF_RSP_ERROR`/`DROPPED`) only
//! drops its packet. In every case the buffer named by a valid id is handed back to the caller
//! (through the `fetch` callback) so its grant is ended and its frame reused.

use devchan::netif::{
    NetifError, NetifRxResponse, NetifStatus, RxFlags, RxResponse, XEN_NETIF_MAX_TX_SIZE,
    XEN_NETIF_NR_SLOTS_MIN,
};

/// Most slots one received packet may take (what Linux's netfront accepts: 18).
pub const MAX_RX_SLOTS: usize = XEN_NETIF_NR_SLOTS_MIN;

/// A refused receive response (see the module docs).
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum RxError {
    /// Bad flags, status or offset/length.
    #[error("Malformed receive response for id {id}")]
    Malformed {
        /// The id it carried.
        id: u16,
        /// What was wrong.
        #[source]
        why: NetifError,
    },
    /// The id names no posted buffer.
    #[error("Receive response for id {0}, which has no posted buffer")]
    UnknownId(u16),
    /// Extra info or a GSO prefix, which were not asked for.
    #[error("Receive response with unrequested flags {0:#x}")]
    Unrequested(u16),
    /// A packet of more than [`MAX_RX_SLOTS`] slots.
    #[error("Received packet takes more than {MAX_RX_SLOTS} slots")]
    TooManySlots,
    /// A packet longer than the largest Ethernet frame netif carries.
    #[error("Received packet is longer than {XEN_NETIF_MAX_TX_SIZE} bytes")]
    TooLong,
}

/// One received packet: its bytes, or why it was dropped.
pub type RxPacket = Result<Vec<u8>, NetifStatus>;

#[derive(Debug, Default)]
struct Partial {
    data: Vec<u8>,
    slots: usize,
    failed: Option<NetifStatus>,
}

/// The posted buffers (of type `B`) and the packet being assembled.
#[derive(Debug)]
pub struct RxAssembler<B> {
    posted: Vec<Option<B>>,
    partial: Partial,
}

impl<B> RxAssembler<B> {
    /// Room for `size` posted buffers (the ring size).
    pub fn new(size: u32) -> Self {
        Self {
            posted: (0..size).map(|_| None).collect(),
            partial: Partial::default(),
        }
    }

    /// Buffers posted and not answered.
    pub fn posted(&self) -> usize {
        self.posted.iter().filter(|b| b.is_some()).count()
    }

    /// Whether `id` is free for a new buffer.
    pub fn is_free(&self, id: u16) -> bool {
        matches!(self.posted.get(usize::from(id)), Some(None))
    }

    /// Record `buf` as posted under `id`; gives it back if the id is taken or out of range.
    pub fn post(&mut self, id: u16, buf: B) -> Result<(), B> {
        match self.posted.get_mut(usize::from(id)) {
            Some(slot @ None) => {
                *slot = Some(buf);
                Ok(())
            }
            _ => Err(buf),
        }
    }

    /// Take back every posted buffer and forget the packet being assembled (the connection is
    /// gone).
    pub fn drain(&mut self) -> Vec<B> {
        self.partial = Partial::default();
        self.posted.iter_mut().filter_map(Option::take).collect()
    }

    /// Take one response. `fetch(buf, range)` gets the buffer back and, if the response
    /// carries data, its `(offset, len)` (already checked to lie within the page); it returns
    /// the bytes, or `None` if they could not be read (the packet is then dropped as an error).
    /// Returns a complete packet when this response ends one.
    pub fn accept(
        &mut self,
        raw: &NetifRxResponse,
        fetch: impl FnOnce(B, Option<(u16, u16)>) -> Option<Vec<u8>>,
    ) -> Result<Option<RxPacket>, RxError> {
        let decoded = RxResponse::decode(raw);
        let buf = self
            .posted
            .get_mut(usize::from(raw.id))
            .and_then(Option::take);
        let rsp = match (decoded, buf) {
            (Ok(r), Some(b)) => {
                let unrequested = r.flags & (RxFlags::EXTRA_INFO | RxFlags::GSO_PREFIX);
                if !unrequested.is_empty() {
                    fetch(b, None);
                    return Err(self.fail(RxError::Unrequested(unrequested.bits())));
                }
                if self.partial.slots + 1 > MAX_RX_SLOTS {
                    fetch(b, None);
                    return Err(self.fail(RxError::TooManySlots));
                }
                let range = r.result.ok().map(|len| (r.offset, len));
                let bytes = fetch(b, range);
                (r, bytes)
            }
            (Err(why), b) => {
                if let Some(b) = b {
                    fetch(b, None);
                }
                return Err(self.fail(RxError::Malformed { id: raw.id, why }));
            }
            (Ok(_), None) => return Err(self.fail(RxError::UnknownId(raw.id))),
        };
        let (r, bytes) = rsp;
        let p = &mut self.partial;
        p.slots += 1;
        match (r.result, bytes) {
            (Ok(_), Some(b)) if p.failed.is_none() => {
                if p.data.len() + b.len() > XEN_NETIF_MAX_TX_SIZE {
                    return Err(self.fail(RxError::TooLong));
                }
                p.data.extend_from_slice(&b);
            }
            (Ok(_), _) => {
                p.failed.get_or_insert(NetifStatus::Error);
            }
            (Err(s), _) => {
                p.failed.get_or_insert(s);
            }
        }
        if r.flags.contains(RxFlags::MORE_DATA) {
            return Ok(None);
        }
        let p = std::mem::take(&mut self.partial);
        Ok(Some(match p.failed {
            Some(s) => Err(s),
            None => Ok(p.data),
        }))
    }

    fn fail(&mut self, e: RxError) -> RxError {
        self.partial = Partial::default();
        e
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use devchan::netif::{NETRXF_EXTRA_INFO, NETRXF_MORE_DATA};
    use proptest::prelude::*;

    fn rsp(id: u16, offset: u16, flags: u16, status: i16) -> NetifRxResponse {
        NetifRxResponse {
            id,
            offset,
            flags,
            status,
        }
    }

    /// Buffers are numbers; "reading" yields `len` copies of the buffer number.
    fn fetch(got: &mut Vec<u32>) -> impl FnOnce(u32, Option<(u16, u16)>) -> Option<Vec<u8>> + '_ {
        move |b, r| {
            got.push(b);
            r.map(|(_, len)| vec![b as u8; usize::from(len)])
        }
    }

    #[test]
    fn single_and_multi_slot_packets() {
        let mut a = RxAssembler::new(8);
        for id in 0..4 {
            a.post(id, u32::from(id) + 10).unwrap();
        }
        assert_eq!(a.post(0, 99), Err(99), "id taken");
        assert_eq!(a.post(8, 99), Err(99), "id out of range");
        let mut got = Vec::new();
        let p = a.accept(&rsp(2, 16, 0, 60), fetch(&mut got)).unwrap();
        assert_eq!(p, Some(Ok(vec![12; 60])));
        assert_eq!(
            a.accept(&rsp(0, 0, NETRXF_MORE_DATA, 4096), fetch(&mut got))
                .unwrap(),
            None
        );
        let p = a
            .accept(&rsp(1, 0, 0, 100), fetch(&mut got))
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(p.len(), 4196);
        assert!(p[..4096].iter().all(|b| *b == 10) && p[4096..].iter().all(|b| *b == 11));
        // A failed fragment drops the whole packet (and its buffer comes back).
        let p = a.accept(&rsp(3, 0, 0, -1), fetch(&mut got)).unwrap();
        assert_eq!(p, Some(Err(NetifStatus::Error)));
        assert_eq!(got, vec![12, 10, 11, 13]);
        assert_eq!(a.posted(), 0);
    }

    #[test]
    fn hostile_responses_are_refused_and_buffers_returned() {
        let mut a = RxAssembler::new(8);
        for id in 0..8 {
            a.post(id, u32::from(id)).unwrap();
        }
        let mut got = Vec::new();
        assert_eq!(
            a.accept(&rsp(0, 0, 0, 10), fetch(&mut got)).unwrap(),
            Some(Ok(vec![0; 10]))
        );
        assert_eq!(
            a.accept(&rsp(0, 0, 0, 10), fetch(&mut got)),
            Err(RxError::UnknownId(0)),
            "duplicate"
        );
        assert_eq!(
            a.accept(&rsp(200, 0, 0, 10), fetch(&mut got)),
            Err(RxError::UnknownId(200))
        );
        assert!(matches!(
            a.accept(&rsp(1, 4000, 0, 200), fetch(&mut got)),
            Err(RxError::Malformed {
                id: 1,
                why: NetifError::CrossesPage { .. }
            })
        ));
        assert!(matches!(
            a.accept(&rsp(2, 0, 0, -7), fetch(&mut got)),
            Err(RxError::Malformed {
                why: NetifError::BadStatus(-7),
                ..
            })
        ));
        assert!(matches!(
            a.accept(&rsp(3, 0, 0x8000, 10), fetch(&mut got)),
            Err(RxError::Malformed {
                why: NetifError::BadRxFlags(_),
                ..
            })
        ));
        assert_eq!(
            a.accept(&rsp(4, 0, NETRXF_EXTRA_INFO, 10), fetch(&mut got)),
            Err(RxError::Unrequested(NETRXF_EXTRA_INFO))
        );
        assert_eq!(
            got,
            vec![0, 1, 2, 3, 4],
            "each valid id's buffer came back once"
        );
        assert_eq!(a.posted(), 3);
    }

    #[test]
    fn packets_are_bounded() {
        let mut a = RxAssembler::new(32);
        for id in 0..32 {
            a.post(id, u32::from(id)).unwrap();
        }
        let mut got = Vec::new();
        for id in 0..MAX_RX_SLOTS as u16 {
            assert_eq!(
                a.accept(&rsp(id, 0, NETRXF_MORE_DATA, 1), fetch(&mut got))
                    .unwrap(),
                None
            );
        }
        assert_eq!(
            a.accept(&rsp(20, 0, 0, 1), fetch(&mut got)),
            Err(RxError::TooManySlots)
        );
        // The next packet starts clean.
        assert_eq!(
            a.accept(&rsp(21, 0, 0, 3), fetch(&mut got)).unwrap(),
            Some(Ok(vec![21; 3]))
        );
    }

    proptest! {
        #[test]
        fn arbitrary_responses_never_panic_or_leak(
            rsps in proptest::collection::vec((0u16..40, 0u16..4200, 0u16..40, -4i16..4200), 0..64)
        ) {
            let mut a = RxAssembler::new(32);
            for id in 0..32 {
                a.post(id, u32::from(id)).unwrap();
            }
            let mut back = 0;
            for (id, off, flags, status) in rsps {
                let mut got = Vec::new();
                if let Ok(Some(Ok(p))) = a.accept(&rsp(id, off, flags, status), fetch(&mut got)) {
                    prop_assert!(p.len() <= XEN_NETIF_MAX_TX_SIZE);
                }
                prop_assert!(got.len() <= 1);
                back += got.len();
            }
            prop_assert_eq!(back + a.posted(), 32);
        }
    }
}
