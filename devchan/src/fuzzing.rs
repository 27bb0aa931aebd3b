//! Bodies of the fuzz targets for what other domains send us: ring pages and the messages on
//! them. `fuzz/fuzz_targets/*.rs` call these under libFuzzer; the unit tests below run them over
//! random inputs so every `cargo test` exercises them too.
//!
//! Each body panics only if one of our invariants breaks (an assertion here or in the code
//! under test); malformed input must come back as an `Err`, never as a panic.

use zerocopy::IntoBytes;

use crate::blkif::{BlkRequest, BlkStatus, BlkifRequest, BlkifResponse, MAX_INDIRECT_SEGMENTS};
use crate::netif::{
    read_tx_packet, ExtraInfo, NetifExtraInfo, NetifRxRequest, NetifRxResponse, NetifTxRequest,
    NetifTxResponse, RxResponse, XEN_NETBK_LEGACY_SLOTS_MAX,
};
use crate::ring::{BackRing, FrontRing, OwnedPage, RingMessage};
use crate::xenbus::XenbusState;

/// A cursor over the fuzzer's bytes; reads past the end give zeros. Shared by every crate's
/// fuzz bodies that decode their input into operations.
pub struct Input<'a>(pub &'a [u8]);

impl Input<'_> {
    /// Whether every byte was consumed.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The next `n` bytes, zero-padded past the end.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let take = n.min(self.0.len());
        let (head, tail) = self.0.split_at(take);
        self.0 = tail;
        let mut v = head.to_vec();
        v.resize(n, 0);
        v
    }

    /// The next byte.
    pub fn u8(&mut self) -> u8 {
        self.bytes(1)[0]
    }

    /// The next little-endian `u16`.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes(2).try_into().unwrap_or_default())
    }

    /// The next little-endian `u32`.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes(4).try_into().unwrap_or_default())
    }

    /// The next little-endian `u64`.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes(8).try_into().unwrap_or_default())
    }

    /// The next ring message (zeroed where the input ran out).
    pub fn msg<T: RingMessage>(&mut self) -> T {
        let b = self.bytes(core::mem::size_of::<T>());
        T::read_from_bytes(&b).unwrap_or_else(|_| T::new_zeroed())
    }
}

/// Treat `data` as a sequence of operations on a front and a back ring sharing one page,
/// interleaved with arbitrary writes to that page by a hostile peer (indexes, event words,
/// entries) and re-attaches at arbitrary indexes. Requests and responses that come out are
/// decoded as blkif, netif or plain integers, chosen by the first byte.
pub fn ring_entries(data: &[u8]) {
    let mut input = Input(data);
    match input.u8() % 4 {
        0 => drive::<BlkifRequest, BlkifResponse>(
            input,
            |r| {
                let _ = BlkRequest::decode(r, MAX_INDIRECT_SEGMENTS);
            },
            |r| {
                let _ = BlkStatus::try_from(r.status);
            },
            |_| {},
        ),
        1 => drive::<NetifTxRequest, NetifTxResponse>(
            input,
            |r| {
                let _ = ExtraInfo::decode_slot(r);
            },
            |_| {},
            |back| {
                if let Ok(Some(p)) =
                    read_tx_packet(|| back.get_request(), XEN_NETBK_LEGACY_SLOTS_MAX)
                {
                    for rsp in p.responses(crate::netif::NetifStatus::Okay) {
                        if back.put_response(&rsp).is_err() {
                            break;
                        }
                    }
                }
            },
        ),
        2 => drive::<NetifRxRequest, NetifRxResponse>(
            input,
            |_| {},
            |r| {
                let _ = RxResponse::decode(r);
                let _ = ExtraInfo::decode_slot(r);
            },
            |_| {},
        ),
        _ => drive::<u64, u32>(input, |_| {}, |_| {}, |_| {}),
    }
}

fn drive<Req: RingMessage, Rsp: RingMessage>(
    mut input: Input<'_>,
    on_request: impl Fn(&Req),
    on_response: impl Fn(&Rsp),
    mut packet: impl FnMut(&mut BackRing<Req, Rsp>),
) {
    let mut page = OwnedPage::new();
    let ptr = page.as_non_null();
    // SAFETY: `page` is 4 KiB, page-aligned, outlives both rings (declared first, dropped last)
    // and is touched otherwise only by `OwnedPage`'s volatile writes, in this thread.
    let attach = |prod: u32, cons: u32| unsafe {
        BackRing::<Req, Rsp>::attach_at(ptr, OwnedPage::SIZE, prod, cons)
    };
    // SAFETY: as above.
    let mut front =
        unsafe { FrontRing::<Req, Rsp>::init(page.as_non_null(), OwnedPage::SIZE) }.expect("page");
    let mut back = attach(0, 0).expect("page");
    let size = front.size();
    while !input.is_empty() {
        match input.u8() % 12 {
            0 => {
                let req = input.msg::<Req>();
                let _ = front.put_request(&req);
            }
            1 => {
                front.push_requests();
            }
            2 => {
                if let Ok(Some(req)) = back.get_request() {
                    on_request(&req);
                }
            }
            3 => {
                let rsp = input.msg::<Rsp>();
                let _ = back.put_response(&rsp);
            }
            4 => {
                back.push_responses();
            }
            5 => {
                if let Ok(Some(rsp)) = front.get_response() {
                    on_response(&rsp);
                }
            }
            6 => {
                let _ = front.final_check_for_responses();
            }
            7 => {
                let _ = back.final_check_for_requests();
            }
            8 => {
                // The peer scribbles on a header word or an entry.
                let off = usize::from(input.u16()) % OwnedPage::SIZE;
                let val = input.bytes(4);
                page.write_at(off, &val);
            }
            9 => {
                // The peer sets an index word (0..16) to a chosen value.
                let word = usize::from(input.u8() % 4) * 4;
                page.write_at(word, &input.u32().to_ne_bytes());
            }
            10 => {
                // A restarted backend re-attaches: at given indexes, from the shared indexes,
                // or from the shared rsp_prod and a journal's req_cons.
                let (prod, cons) = (input.u32(), input.u32());
                let restarted = match prod % 3 {
                    0 => attach(prod, cons),
                    // SAFETY: as for `attach`.
                    1 => unsafe { BackRing::attach(ptr, OwnedPage::SIZE) },
                    // SAFETY: as for `attach`.
                    _ => unsafe { BackRing::resume(ptr, OwnedPage::SIZE, cons) },
                };
                if let Ok(b) = restarted {
                    back = b;
                }
            }
            _ => packet(&mut back),
        }
        assert!(front.free_requests() <= size);
        assert!(back.unanswered() <= size);
    }
}

/// Decode `data` as every message type a peer can send: blkif requests (and indirect segment
/// pages), blkif responses, netif transmit packets, receive responses, extra-info slots and a
/// XenBus state. Whatever decodes must re-encode to something that decodes the same.
pub fn netif_blkif(data: &[u8]) {
    let _ = XenbusState::from_xenstore(data);

    let mut input = Input(data);
    let max_indirect = input.u16();
    for chunk in data.chunks(core::mem::size_of::<BlkifRequest>()) {
        let raw = Input(chunk).msg::<BlkifRequest>();
        if let Ok(req) = BlkRequest::decode(&raw, max_indirect) {
            assert_eq!(BlkRequest::decode(&req.encode(), max_indirect), Ok(req));
            if let BlkRequest::Indirect(ind) = req {
                if let Ok(segs) = ind.segments(data) {
                    assert_eq!(segs.len(), usize::from(ind.nr_segments));
                }
            }
        }
        let rsp = Input(chunk).msg::<BlkifResponse>();
        let _ = BlkStatus::try_from(rsp.status);
    }

    let slots: Vec<NetifTxRequest> = data
        .chunks(12)
        .map(|c| Input(c).msg::<NetifTxRequest>())
        .collect();
    let mut it = slots.iter().copied();
    while let Ok(Some(p)) = read_tx_packet(|| Ok(it.next()), XEN_NETBK_LEGACY_SLOTS_MAX) {
        assert!(p.slots() >= 1 && p.fragments.len() <= XEN_NETBK_LEGACY_SLOTS_MAX);
        assert_eq!(
            p.responses(crate::netif::NetifStatus::Okay).len(),
            p.slots()
        );
        let sum: u32 = p.fragments.iter().map(|f| u32::from(f.size)).sum();
        assert_eq!(sum, u32::from(p.size));
        let again = p.encode();
        let mut it2 = again.iter().copied();
        assert_eq!(
            read_tx_packet(|| Ok(it2.next()), XEN_NETBK_LEGACY_SLOTS_MAX),
            Ok(Some(p))
        );
    }

    for chunk in data.chunks(8) {
        let rx = Input(chunk).msg::<NetifRxResponse>();
        if let Ok(r) = RxResponse::decode(&rx) {
            assert_eq!(r.encode(), rx);
        }
        let extra = Input(chunk).msg::<NetifExtraInfo>();
        if let Ok((e, more)) = ExtraInfo::decode(&extra) {
            assert_eq!(ExtraInfo::decode(&e.encode(more)), Ok((e, more)));
            assert_eq!(e.encode(more).as_bytes()[..2], extra.as_bytes()[..2]);
        }
    }
}

#[cfg(test)]
mod tests {
    /// A small deterministic generator, so failures reproduce.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        /// Random bytes biased towards small values and ring-like structure.
        fn input(&mut self, max_len: u64) -> Vec<u8> {
            let len = self.next() % max_len;
            (0..len)
                .map(|_| {
                    let r = self.next();
                    match r % 4 {
                        0 => 0,
                        1 => (r >> 8).to_le_bytes()[0] % 16,
                        _ => (r >> 16).to_le_bytes()[0],
                    }
                })
                .collect()
        }
    }

    #[test]
    fn ring_entries_survives_random_inputs() {
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        for _ in 0..4000 {
            super::ring_entries(&rng.input(3000));
        }
    }

    #[test]
    fn netif_blkif_survives_random_inputs() {
        let mut rng = XorShift(0xD1B5_4A32_D192_ED03);
        for _ in 0..4000 {
            super::netif_blkif(&rng.input(1200));
        }
    }
}
