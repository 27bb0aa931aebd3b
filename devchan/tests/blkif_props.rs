//! Property tests of the blkif decoder: valid requests round-trip through their wire slot, and
//! any 112 bytes either decode to a request that satisfies every protocol limit or are
//! rejected; nothing panics. Also blkif over a real ring.

use devchan::blkif::*;
use devchan::ring::OwnedPage;
use proptest::prelude::*;
use zerocopy::FromBytes;

fn segment() -> impl Strategy<Value = Segment> {
    (any::<u32>(), 0u8..8, 0u8..8).prop_map(|(gref, a, b)| Segment {
        gref,
        first_sect: a.min(b),
        last_sect: a.max(b),
    })
}

fn rw(min: usize) -> impl Strategy<Value = RwRequest> {
    (
        any::<u64>(),
        any::<u16>(),
        0u64..u64::MAX / 2,
        prop::collection::vec(segment(), min..=11),
    )
        .prop_map(|(id, handle, sector, segs)| RwRequest {
            id,
            handle,
            sector,
            segments: Segments::new(&segs).unwrap(),
        })
}

fn request() -> impl Strategy<Value = BlkRequest> {
    prop_oneof![
        rw(1).prop_map(BlkRequest::Read),
        rw(1).prop_map(BlkRequest::Write),
        rw(0).prop_map(BlkRequest::WriteBarrier),
        rw(0).prop_map(BlkRequest::Flush),
        (
            any::<u64>(),
            any::<u16>(),
            0u64..u64::MAX / 2,
            0u64..u64::MAX / 2,
            any::<bool>()
        )
            .prop_map(|(id, handle, sector, nr_sectors, secure)| {
                BlkRequest::Discard(DiscardRequest {
                    id,
                    handle,
                    sector,
                    nr_sectors,
                    secure,
                })
            }),
        (
            any::<u64>(),
            any::<u16>(),
            0u64..u64::MAX / 2,
            any::<bool>(),
            1u16..=MAX_INDIRECT_SEGMENTS,
            any::<[u32; 8]>()
        )
            .prop_map(|(id, handle, sector, write, nr_segments, grefs)| {
                let mut r = IndirectRequest {
                    id,
                    handle,
                    sector,
                    op: if write {
                        IndirectOp::Write
                    } else {
                        IndirectOp::Read
                    },
                    nr_segments,
                    indirect_grefs: [0; 8],
                };
                let pages = r.pages();
                r.indirect_grefs[..pages].copy_from_slice(&grefs[..pages]);
                BlkRequest::Indirect(r)
            }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn valid_requests_round_trip(req in request()) {
        let raw = req.encode();
        prop_assert_eq!(BlkRequest::decode(&raw, MAX_INDIRECT_SEGMENTS), Ok(req));
        prop_assert_eq!(raw.operation, req.operation());
        prop_assert_eq!(raw.id, req.id());
    }

    #[test]
    fn arbitrary_slots_decode_within_limits(
        bytes in prop::collection::vec(any::<u8>(), 112),
        op in 0u8..8,
        max in any::<u16>()
    ) {
        let mut raw = BlkifRequest::read_from_bytes(&bytes).unwrap();
        raw.operation = op; // mostly valid operations, to get past the first check
        match BlkRequest::decode(&raw, max) {
            Ok(BlkRequest::Read(r) | BlkRequest::Write(r)) => {
                prop_assert!((1..=11).contains(&r.segments.len()));
                prop_assert_eq!(r.segments.len(), usize::from(raw.nr_segments));
                for s in r.segments.iter() {
                    prop_assert!(s.first_sect <= s.last_sect && s.last_sect < 8);
                }
            }
            Ok(BlkRequest::WriteBarrier(r) | BlkRequest::Flush(r)) => {
                prop_assert!(r.segments.len() <= 11);
            }
            Ok(BlkRequest::Discard(d)) => {
                prop_assert!(d.sector.checked_add(d.nr_sectors).is_some());
            }
            Ok(BlkRequest::Indirect(r)) => {
                prop_assert!(r.nr_segments >= 1 && r.nr_segments <= max.min(MAX_INDIRECT_SEGMENTS));
                prop_assert!(r.pages() <= BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST);
            }
            Err(BlkifError::BadOperation(o)) => prop_assert!(o == BLKIF_OP_RESERVED_1 || o > 6),
            Err(_) => {}
        }
    }

    #[test]
    fn indirect_segment_pages_are_validated(
        pages in prop::collection::vec(any::<u8>(), 0..3 * 4096),
        nr in 1u16..=1024
    ) {
        let req = IndirectRequest {
            id: 1, handle: 0, sector: 0, op: IndirectOp::Read, nr_segments: nr,
            indirect_grefs: [0; 8],
        };
        match req.segments(&pages) {
            Ok(segs) => {
                prop_assert_eq!(segs.len(), usize::from(nr));
                prop_assert!(segs.iter().all(|s| s.first_sect <= s.last_sect && s.last_sect < 8));
            }
            Err(BlkifError::IndirectPagesShort { needed, got }) => {
                prop_assert!(got < needed);
                prop_assert_eq!(needed, usize::from(nr) * 8);
            }
            Err(e) => prop_assert!(matches!(e, BlkifError::BadSegment { .. }), "{e:?}"),
        }
    }
}

#[test]
fn blkif_over_a_ring_with_out_of_order_responses() {
    let page = OwnedPage::new();
    // SAFETY: the page is 4 KiB, page-aligned, and outlives both rings.
    let (mut front, mut back) = unsafe {
        (
            BlkifFrontRing::init(page.as_non_null(), OwnedPage::SIZE).unwrap(),
            BlkifBackRing::attach_at(page.as_non_null(), OwnedPage::SIZE, 0, 0).unwrap(),
        )
    };
    assert_eq!(front.size(), BLKIF_RING_SIZE);
    let seg = Segment {
        gref: 8,
        first_sect: 0,
        last_sect: 7,
    };
    for id in 0..BLKIF_RING_SIZE {
        let r = RwRequest {
            id: u64::from(id) << 32,
            handle: 0,
            sector: u64::from(id) * 8,
            segments: Segments::new(&[seg]).unwrap(),
        };
        front.put_request(&BlkRequest::Write(r).encode()).unwrap();
    }
    front.push_requests();
    let mut got = Vec::new();
    while let Some(raw) = back.get_request().unwrap() {
        got.push(BlkRequest::decode(&raw, 0).unwrap());
    }
    assert_eq!(got.len(), 32);
    for req in got.iter().rev() {
        back.put_response(&req.response(BlkStatus::Okay)).unwrap();
    }
    back.push_responses();
    let mut ids = Vec::new();
    while let Some(rsp) = front.get_response().unwrap() {
        assert_eq!(BlkStatus::try_from(rsp.status), Ok(BlkStatus::Okay));
        assert_eq!(rsp.operation, BLKIF_OP_WRITE);
        ids.push(rsp.id >> 32);
    }
    assert_eq!(ids, (0..32u64).rev().collect::<Vec<_>>());
}
