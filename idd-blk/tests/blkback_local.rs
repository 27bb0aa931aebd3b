//! blkback end to end with a frontend written here: two guests on one image, each in its own
//! region, over real grants, event channels and IOMMU pins (`LocalPlatform`).
#![allow(clippy::cast_possible_truncation)] // small test numbers

mod common;

use common::*;
use devchan::blkif::{
    BlkRequest, BlkifRequest, BlkifRequestIndirect, BlkifRequestSegment, DiscardRequest,
    IndirectOp, IndirectRequest, RwRequest, Segments, BLKIF_OP_INDIRECT, BLKIF_OP_WRITE,
    BLKIF_RSP_EOPNOTSUPP, BLKIF_RSP_ERROR, BLKIF_RSP_OKAY,
};
use devchan::platform::Platform;
use idd_blk::blkback::Region;
use zerocopy::IntoBytes;

#[test]
fn two_guests_write_and_read_back_in_their_regions() {
    let rig = Rig::new(256);
    let mut a = rig.guest("a");
    let mut b = rig.guest("b");
    let mut back = rig.backend(8);
    back.attach(a.channel(
        Region {
            offset: 0,
            sectors: 128,
        },
        false,
        journal_frame(0),
    ))
    .unwrap();
    back.attach(b.channel(
        Region {
            offset: 128,
            sectors: 128,
        },
        false,
        journal_frame(1),
    ))
    .unwrap();
    for (g, seed) in [(&mut a, 1u64), (&mut b, 2)] {
        for p in 0..4 {
            g.fill(p, &pattern(seed * 10 + p as u64));
        }
        // Two writes of two pages each, at sectors 8 and 24 of the guest's disk.
        let w1 = g.rw(true, 8, &[0, 1]);
        let w2 = g.rw(true, 24, &[2, 3]);
        g.post(&w1);
        g.post(&w2);
    }
    for g in [&mut a, &mut b] {
        let r = run_until(&mut back, g, 2);
        assert!(r.iter().all(|r| r.status == BLKIF_RSP_OKAY), "{r:?}");
    }
    // The image holds each guest's data at its region offset.
    assert_eq!(rig.read_image(8, 4096), pattern(10));
    assert_eq!(rig.read_image(128 + 24 + 8, 4096), pattern(23));
    // Read back into fresh pages.
    for (g, seed) in [(&mut a, 1u64), (&mut b, 2)] {
        for p in 10..14 {
            g.fill(p, &[0; 4096]);
        }
        let r = g.rw(false, 8, &[10, 11]);
        g.post(&r);
        let r = g.rw(false, 24, &[12, 13]);
        g.post(&r);
        let rs = run_until(&mut back, g, 2);
        assert!(rs.iter().all(|r| r.status == BLKIF_RSP_OKAY));
        for (i, p) in (10..14).enumerate() {
            assert_eq!(g.page(p), pattern(seed * 10 + i as u64), "guest page {p}");
        }
    }
    // Every pin was released: the guests can end access to every data page.
    for g in [&a, &b] {
        for (_, gref) in &g.pages {
            g.plat.end_access(*gref).unwrap();
        }
    }
    assert!(rig.iommu.is_empty());
}

#[test]
fn region_read_only_and_malformed_requests_get_errors() {
    let rig = Rig::new(256);
    let mut g = rig.guest("g");
    let mut ro = rig.guest("ro");
    let mut back = rig.backend(8);
    back.attach(g.channel(
        Region {
            offset: 64,
            sectors: 16,
        },
        false,
        journal_frame(0),
    ))
    .unwrap();
    back.attach(ro.channel(
        Region {
            offset: 0,
            sectors: 64,
        },
        true,
        journal_frame(1),
    ))
    .unwrap();
    g.fill(0, &pattern(5));
    // Past the end of the 16-sector region (sector 9 + 8 > 16).
    let out = g.rw(true, 9, &[0]);
    g.post(&out);
    // Unknown operation.
    let mut bad = g.rw(true, 0, &[0]).encode();
    bad.operation = 4;
    bad.id = 900;
    g.post_raw(&bad);
    // Segment with first_sect > last_sect.
    let mut seg = g.rw(false, 0, &[0]).encode();
    seg.seg[0].first_sect = 6;
    seg.seg[0].last_sect = 2;
    seg.id = 901;
    g.post_raw(&seg);
    // A grant the guest never made.
    let mut nogrant = g.rw(false, 0, &[0]).encode();
    nogrant.seg[0].gref = 2000;
    nogrant.id = 902;
    g.post_raw(&nogrant);
    // Too many indirect segments.
    let ind = BlkifRequestIndirect {
        operation: BLKIF_OP_INDIRECT,
        indirect_op: BLKIF_OP_WRITE,
        nr_segments: 200,
        id: 903,
        ..Default::default()
    };
    let mut raw = BlkifRequest::default();
    raw.as_mut_bytes()[..64].copy_from_slice(ind.as_bytes());
    g.post_raw(&raw);
    // In range: fine.
    let ok = g.rw(true, 8, &[0]);
    g.post(&ok);
    let rs = run_until(&mut back, &mut g, 6);
    let by_id = |id| rs.iter().find(|r| r.id == id).unwrap().status;
    assert_eq!(by_id(out.id()), BLKIF_RSP_ERROR);
    assert_eq!(by_id(900), BLKIF_RSP_ERROR);
    assert_eq!(rs.iter().find(|r| r.id == 900).unwrap().operation, 4);
    assert_eq!(by_id(901), BLKIF_RSP_ERROR);
    assert_eq!(by_id(902), BLKIF_RSP_ERROR);
    assert_eq!(by_id(903), BLKIF_RSP_ERROR);
    assert_eq!(by_id(ok.id()), BLKIF_RSP_OKAY);
    assert_eq!(rig.read_image(64 + 8, 4096), pattern(5));
    assert_eq!(
        rig.read_image(64 + 16, 512),
        vec![0; 512],
        "nothing past the region"
    );

    // The read-only guest may read and flush, not write or discard.
    ro.fill(0, &pattern(6));
    let w = ro.rw(true, 0, &[0]);
    ro.post(&w);
    let d = BlkRequest::Discard(DiscardRequest {
        id: 77,
        handle: 0,
        sector: 0,
        nr_sectors: 8,
        secure: false,
    });
    ro.post(&d);
    let r = ro.rw(false, 0, &[1]);
    ro.post(&r);
    let f = BlkRequest::Flush(RwRequest {
        id: 78,
        handle: 0,
        sector: 0,
        segments: Segments::default(),
    });
    ro.post(&f);
    let rs = run_until(&mut back, &mut ro, 4);
    let by_id = |id| rs.iter().find(|r| r.id == id).unwrap().status;
    assert_eq!(by_id(w.id()), BLKIF_RSP_ERROR);
    assert_eq!(by_id(77), BLKIF_RSP_ERROR);
    assert_eq!(by_id(r.id()), BLKIF_RSP_OKAY);
    assert_eq!(by_id(78), BLKIF_RSP_OKAY);
    assert_eq!(rig.read_image(0, 4096), vec![0; 4096]);
    assert_eq!(back.stats(1).unwrap().errors, 2);
    assert!(back.failed().is_empty());
    let _ = BLKIF_RSP_EOPNOTSUPP;
}

#[test]
fn flush_with_data_discard_and_indirect() {
    let rig = Rig::new(256);
    let mut g = rig.guest("g");
    let mut back = rig.backend(8);
    back.attach(g.channel(
        Region {
            offset: 32,
            sectors: 200,
        },
        false,
        journal_frame(0),
    ))
    .unwrap();
    // Flush carrying data (Linux blkfront's FUA/preflush writes): written, then flushed.
    g.fill(0, &pattern(1));
    let BlkRequest::Write(w) = g.rw(true, 0, &[0]) else {
        unreachable!()
    };
    g.post(&BlkRequest::Flush(w));
    // Indirect write of 12 pages (more than the 11 of a direct request) from sector 16.
    let n = 12usize;
    for p in 0..n {
        g.fill(1 + p, &pattern(100 + p as u64));
    }
    let seg_page = 30usize;
    let mut segs = vec![0u8; 4096];
    for p in 0..n {
        let s = BlkifRequestSegment {
            gref: g.pages[1 + p].1,
            first_sect: 0,
            last_sect: 7,
            _pad: [0; 2],
        };
        segs[p * 8..p * 8 + 8].copy_from_slice(s.as_bytes());
    }
    g.fill(seg_page, &segs);
    let mut grefs = [0; 8];
    grefs[0] = g.pages[seg_page].1;
    let ind = |id, op| {
        BlkRequest::Indirect(IndirectRequest {
            id,
            handle: 0,
            sector: 16,
            op,
            nr_segments: u16::try_from(n).unwrap(),
            indirect_grefs: grefs,
        })
    };
    g.post(&ind(50, IndirectOp::Write));
    let rs = run_until(&mut back, &mut g, 2);
    assert!(rs.iter().all(|r| r.status == BLKIF_RSP_OKAY), "{rs:?}");
    assert_eq!(rig.read_image(32, 4096), pattern(1));
    for p in 0..n {
        assert_eq!(
            rig.read_image(32 + 16 + 8 * p as u64, 4096),
            pattern(100 + p as u64)
        );
    }
    // Discard the first 8 sectors of the indirect data, then read it all back indirectly.
    g.post(&BlkRequest::Discard(DiscardRequest {
        id: 60,
        handle: 0,
        sector: 16,
        nr_sectors: 8,
        secure: false,
    }));
    let rs = run_until(&mut back, &mut g, 1);
    assert_eq!(rs[0].status, BLKIF_RSP_OKAY);
    for p in 0..n {
        g.fill(1 + p, &[0xee; 4096]);
    }
    g.post(&ind(51, IndirectOp::Read));
    let rs = run_until(&mut back, &mut g, 1);
    assert_eq!(rs[0].status, BLKIF_RSP_OKAY);
    assert_eq!(g.page(1), vec![0; 4096], "discarded");
    for p in 1..n {
        assert_eq!(g.page(1 + p), pattern(100 + p as u64));
    }
    assert!(rig.iommu.is_empty());
    let _ = g.plat.domid();
}

#[test]
fn round_robin_takes_a_bounded_batch_from_each_guest() {
    let rig = Rig::new(1024);
    let mut a = rig.guest("a");
    let mut b = rig.guest("b");
    let mut back = rig.backend(4);
    back.attach(a.channel(
        Region {
            offset: 0,
            sectors: 512,
        },
        false,
        journal_frame(0),
    ))
    .unwrap();
    back.attach(b.channel(
        Region {
            offset: 512,
            sectors: 512,
        },
        false,
        journal_frame(1),
    ))
    .unwrap();
    // a floods its ring; b posts 3.
    for i in 0..30 {
        let r = a.rw(false, i * 8, &[i as usize]);
        a.post(&r);
    }
    for i in 0..3 {
        let r = b.rw(false, i * 8, &[i as usize]);
        b.post(&r);
    }
    assert_eq!(back.consume_round().unwrap(), 4 + 3);
    assert_eq!(back.stats(0).unwrap().consumed, 4);
    assert_eq!(back.stats(1).unwrap().consumed, 3);
    assert_eq!(back.consume_round().unwrap(), 4);
    assert_eq!(back.stats(0).unwrap().consumed, 8);
    let got = run_until(&mut back, &mut b, 3);
    assert!(got.iter().all(|r| r.status == BLKIF_RSP_OKAY));
    run_until(&mut back, &mut a, 30);
    assert!(a.answered.values().all(|c| *c == 1));
}

#[test]
fn hostile_ring_index_fails_only_that_channel() {
    let rig = Rig::new(256);
    let mut a = rig.guest("a");
    let mut b = rig.guest("b");
    let mut back = rig.backend(8);
    back.attach(a.channel(
        Region {
            offset: 0,
            sectors: 128,
        },
        false,
        journal_frame(0),
    ))
    .unwrap();
    back.attach(b.channel(
        Region {
            offset: 128,
            sectors: 128,
        },
        false,
        journal_frame(1),
    ))
    .unwrap();
    // a claims 1000 requests on a 32-slot ring.
    let rr = a.rw(false, 0, &[0]);
    a.post(&rr);
    // SAFETY: the ring page is live and this test is its only other user; writing req_prod
    // as a hostile frontend would.
    unsafe {
        let p = devchan::platform::SharedPage::as_ptr(a.ring_page());
        (p as *mut u32).write_volatile(1000);
    }
    let r = b.rw(false, 0, &[0]);
    b.post(&r);
    let rs = run_until(&mut back, &mut b, 1);
    assert_eq!(rs[0].status, BLKIF_RSP_OKAY);
    assert_eq!(back.failed().len(), 1);
    assert_eq!(back.failed()[0].0, 0);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
    /// Arbitrary request slots (random bytes, with a unique id and a mostly-plausible
    /// operation and grant): the backend never panics, never fails the channel, and answers
    /// every request exactly once; nothing outside the region is written.
    #[test]
    fn arbitrary_requests_are_each_answered_once(
        slots in proptest::collection::vec(
            (proptest::collection::vec(proptest::prelude::any::<u8>(), 112), 0u8..8, 0usize..45, 0u8..14),
            1..32,
        )
    ) {
        let rig = Rig::new(256);
        let mut g = rig.guest("g");
        let mut back = rig.backend(4);
        back.attach(g.channel(Region { offset: 64, sectors: 64 }, false, journal_frame(0)))
            .unwrap();
        let n = slots.len();
        for (i, (bytes, op, page, nseg)) in slots.into_iter().enumerate() {
            let mut raw = BlkifRequest::default();
            raw.as_mut_bytes().copy_from_slice(&bytes);
            raw.operation = op;
            raw.nr_segments = nseg;
            raw.id = 1_000_000 + i as u64;
            raw.sector_number %= 80;
            if let Some((_, gref)) = g.pages.get(page) {
                raw.seg[0].gref = *gref;
            }
            g.post_raw(&raw);
        }
        run_until(&mut back, &mut g, n);
        proptest::prop_assert!(back.failed().is_empty());
        proptest::prop_assert_eq!(g.answered.len(), n);
        proptest::prop_assert!(g.answered.values().all(|c| *c == 1));
        proptest::prop_assert_eq!(rig.read_image(0, 64 * 512), vec![0; 64 * 512]);
        proptest::prop_assert_eq!(rig.read_image(128, 128 * 512), vec![0; 128 * 512]);
        proptest::prop_assert!(rig.iommu.is_empty());
    }
}
