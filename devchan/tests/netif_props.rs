//! Property tests of the netif decoders: valid transmit packets round-trip through their ring
//! slots (also over a real ring), arbitrary slot sequences never panic and what they decode to
//! respects the protocol's bounds; extra info and receive responses round-trip.

use devchan::netif::*;
use devchan::ring::OwnedPage;
use proptest::prelude::*;

fn extra() -> impl Strategy<Value = ExtraInfo> {
    prop_oneof![
        (1u16.., any::<bool>(), any::<u16>()).prop_map(|(size, v6, features)| ExtraInfo::Gso {
            size,
            gso_type: if v6 { GsoType::TcpV6 } else { GsoType::TcpV4 },
            features,
        }),
        any::<[u8; 6]>().prop_map(ExtraInfo::McastAdd),
        any::<[u8; 6]>().prop_map(ExtraInfo::McastDel),
        (any::<u8>(), any::<u8>(), any::<u32>()).prop_map(|(hash_type, algorithm, value)| {
            ExtraInfo::Hash {
                hash_type,
                algorithm,
                value,
            }
        }),
    ]
}

/// A packet that a well-behaved frontend could send.
fn packet() -> impl Strategy<Value = TxPacket> {
    (
        prop::collection::vec(
            (any::<u16>(), any::<u32>(), 0u16..4096, 0u16..=4096),
            1..=18,
        ),
        prop::collection::vec(extra(), 0..4),
        0u16..4,
    )
        .prop_map(|(frags, extras, flag_bits)| {
            let mut fragments: Vec<TxFragment> = frags
                .into_iter()
                .map(|(id, gref, offset, size)| TxFragment {
                    id,
                    gref,
                    offset: offset.min(4096 - size),
                    size,
                })
                .collect();
            // Keep the total within u16.
            let mut total: u32 = 0;
            for f in &mut fragments {
                let room = u32::from(u16::MAX) - total;
                f.size = f.size.min(u16::try_from(room).unwrap_or(u16::MAX));
                total += u32::from(f.size);
            }
            // One extra of each kind at most.
            let mut seen = Vec::new();
            let extras = extras
                .into_iter()
                .filter(|e| {
                    !seen.contains(&e.kind()) && {
                        seen.push(e.kind());
                        true
                    }
                })
                .collect();
            TxPacket {
                flags: TxFlags::from_bits_truncate(flag_bits),
                size: u16::try_from(total).unwrap(),
                fragments,
                extras,
            }
        })
}

fn read(slots: &[NetifTxRequest]) -> Result<Option<TxPacket>, NetifError> {
    let mut it = slots.iter().copied();
    read_tx_packet(|| Ok(it.next()), XEN_NETBK_LEGACY_SLOTS_MAX)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn valid_packets_round_trip(p in packet()) {
        let slots = p.encode();
        prop_assert_eq!(slots.len(), p.slots());
        prop_assert_eq!(read(&slots), Ok(Some(p.clone())));
        let rsps = p.responses(NetifStatus::Okay);
        prop_assert_eq!(rsps.len(), p.slots());
        prop_assert_eq!(rsps.iter().filter(|r| r.status == NETIF_RSP_NULL).count(), p.extras.len());
    }

    #[test]
    fn arbitrary_slots_never_panic_and_respect_bounds(
        raw in prop::collection::vec((any::<u32>(), 0u16..5000, 0u16..16, any::<u16>(), any::<u16>()), 0..40)
    ) {
        let slots: Vec<NetifTxRequest> = raw
            .into_iter()
            .map(|(gref, offset, flags, id, size)| NetifTxRequest { gref, offset, flags, id, size })
            .collect();
        let mut it = slots.iter().copied();
        let mut consumed = 0usize;
        loop {
            let got = read_tx_packet(|| { Ok(it.next()) }, XEN_NETBK_LEGACY_SLOTS_MAX);
            match got {
                Ok(Some(p)) => {
                    consumed += p.slots();
                    prop_assert!(consumed <= slots.len());
                    prop_assert!(p.fragments.len() <= XEN_NETBK_LEGACY_SLOTS_MAX);
                    prop_assert!(p.extras.len() <= 4);
                    let total: u32 = p.fragments.iter().map(|f| u32::from(f.size)).sum();
                    prop_assert_eq!(total, u32::from(p.size));
                    for f in &p.fragments {
                        prop_assert!(usize::from(f.offset) + usize::from(f.size) <= 4096);
                    }
                }
                Ok(None) | Err(_) => break,
            }
        }
    }

    #[test]
    fn extra_info_round_trips(e in extra(), more in any::<bool>()) {
        prop_assert_eq!(ExtraInfo::decode(&e.encode(more)), Ok((e, more)));
        prop_assert_eq!(ExtraInfo::decode_slot(&e.to_tx_slot(more)), Ok((e, more)));
        prop_assert_eq!(ExtraInfo::decode_slot(&e.to_rx_slot(more)), Ok((e, more)));
    }

    #[test]
    fn rx_responses_decode_or_reject(id in any::<u16>(), offset in any::<u16>(), flags in any::<u16>(), status in any::<i16>()) {
        let raw = NetifRxResponse { id, offset, flags, status };
        match RxResponse::decode(&raw) {
            Ok(r) => {
                prop_assert_eq!(r.encode(), raw);
                if let Ok(size) = r.result {
                    prop_assert!(usize::from(offset) + usize::from(size) <= 4096);
                }
            }
            Err(NetifError::BadRxFlags(f)) => prop_assert!(f & !0x1f != 0),
            Err(NetifError::BadStatus(s)) => prop_assert!(s < -2),
            Err(NetifError::CrossesPage { .. }) => prop_assert!(status > 0),
            Err(e) => prop_assert!(false, "unexpected {e:?}"),
        }
    }
}

#[test]
fn tx_packets_over_a_ring() {
    let page = OwnedPage::new();
    // SAFETY: the page is 4 KiB, page-aligned, and outlives both rings.
    let (mut front, mut back) = unsafe {
        (
            NetifTxFrontRing::init(page.as_non_null(), OwnedPage::SIZE).unwrap(),
            NetifTxBackRing::attach_at(page.as_non_null(), OwnedPage::SIZE, 0, 0).unwrap(),
        )
    };
    let gso = ExtraInfo::Gso {
        size: 1448,
        gso_type: GsoType::TcpV4,
        features: 0,
    };
    let p = TxPacket {
        flags: TxFlags::CSUM_BLANK,
        size: 3000,
        fragments: vec![
            TxFragment {
                id: 1,
                gref: 10,
                offset: 0,
                size: 1000,
            },
            TxFragment {
                id: 2,
                gref: 11,
                offset: 0,
                size: 2000,
            },
        ],
        extras: vec![gso],
    };
    for _ in 0..100 {
        for slot in p.encode() {
            front.put_request(&slot).unwrap();
        }
        front.push_requests();
        let got = read_tx_packet(|| back.get_request(), XEN_NETBK_LEGACY_SLOTS_MAX).unwrap();
        assert_eq!(got.as_ref(), Some(&p));
        for rsp in p.responses(NetifStatus::Okay) {
            back.put_response(&rsp).unwrap();
        }
        back.push_responses();
        let mut ids = Vec::new();
        while let Some(r) = front.get_response().unwrap() {
            ids.push((r.id, r.status));
        }
        assert_eq!(ids, [(1, 0), (0, NETIF_RSP_NULL), (2, 0)]);
    }
    assert_eq!(read_tx_packet(|| back.get_request(), 18), Ok(None));
    // A packet announced with more_data but published without its tail is malformed.
    front
        .put_request(&NetifTxRequest {
            gref: 1,
            offset: 0,
            flags: NETTXF_MORE_DATA,
            id: 7,
            size: 100,
        })
        .unwrap();
    front.push_requests();
    assert_eq!(
        read_tx_packet(|| back.get_request(), 18),
        Err(NetifError::Truncated { slots: 1 })
    );
}
