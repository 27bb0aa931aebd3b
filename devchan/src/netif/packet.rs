//! Transmit packets (a first request, extra info, further fragments) and receive responses:
//! the multi-slot and peer-decoded parts of [`super`].

use super::*;

/// One data slot of a transmit packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxFragment {
    /// The request's `id`, for its response.
    pub id: u16,
    /// Grant of the page.
    pub gref: GrantRef,
    /// Offset in the page.
    pub offset: u16,
    /// Bytes of this fragment (for the first, computed from the total).
    pub size: u16,
}

/// A validated transmit packet as it was laid out on the ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxPacket {
    /// Flags of the first request, without `MORE_DATA` and `EXTRA_INFO` (implied by the lists).
    pub flags: TxFlags,
    /// Total packet length: the sum of the fragment sizes.
    pub size: u16,
    /// The data slots in order; at least one.
    pub fragments: Vec<TxFragment>,
    /// The extra-info slots in order, at most one of each type.
    pub extras: Vec<ExtraInfo>,
}

impl TxPacket {
    /// Ring slots the packet occupies.
    pub fn slots(&self) -> usize {
        self.fragments.len() + self.extras.len()
    }

    /// The responses, in slot order: `status` for each data slot (with its id), and
    /// `NETIF_RSP_NULL` for each extra-info slot (which follow the first fragment's).
    pub fn responses(&self, status: NetifStatus) -> Vec<NetifTxResponse> {
        let data = |f: &TxFragment| NetifTxResponse {
            id: f.id,
            status: status.into(),
        };
        let null = NetifTxResponse {
            id: 0,
            status: NETIF_RSP_NULL,
        };
        let mut out = Vec::with_capacity(self.slots());
        out.extend(self.fragments.first().map(data));
        out.extend(self.extras.iter().map(|_| null));
        out.extend(self.fragments.iter().skip(1).map(data));
        out
    }

    /// The request slots a frontend puts on the ring for this packet.
    pub fn encode(&self) -> Vec<NetifTxRequest> {
        let n = self.fragments.len();
        let mut out = Vec::with_capacity(self.slots());
        for (i, f) in self.fragments.iter().enumerate() {
            let mut flags = if i == 0 { self.flags.bits() } else { 0 };
            if i + 1 < n {
                flags |= NETTXF_MORE_DATA;
            }
            if i == 0 && !self.extras.is_empty() {
                flags |= NETTXF_EXTRA_INFO;
            }
            let size = if i == 0 { self.size } else { f.size };
            out.push(NetifTxRequest {
                gref: f.gref,
                offset: f.offset,
                flags,
                id: f.id,
                size,
            });
            if i == 0 {
                let m = self.extras.len();
                out.extend(
                    self.extras
                        .iter()
                        .enumerate()
                        .map(|(j, e)| e.to_tx_slot(j + 1 < m)),
                );
            }
        }
        out
    }
}

fn check_in_page(index: usize, offset: u16, size: u16) -> Result<(), NetifError> {
    if usize::from(offset) + usize::from(size) > PAGE_SIZE {
        return Err(NetifError::CrossesPage {
            index,
            offset,
            size,
        });
    }
    Ok(())
}

/// Copy one transmit packet out of the ring, slot by slot, from `next` (normally
/// `|| back.get_request()`), and validate it. `max_slots` bounds the data slots (Linux uses
/// [`XEN_NETBK_LEGACY_SLOTS_MAX`]). `Ok(None)`: no request was waiting. A packet whose chain
/// runs past what was published is an error ([`NetifError::Truncated`]): frontends publish a
/// packet whole.
pub fn read_tx_packet(
    mut next: impl FnMut() -> Result<Option<NetifTxRequest>, RingError>,
    max_slots: usize,
) -> Result<Option<TxPacket>, NetifError> {
    let Some(first) = next()? else {
        return Ok(None);
    };
    let flags = TxFlags::try_from(first.flags)?;
    let mut slots = 1;
    let mut extras: Vec<ExtraInfo> = Vec::new();
    if flags.contains(TxFlags::EXTRA_INFO) {
        loop {
            let slot = next()?.ok_or(NetifError::Truncated { slots })?;
            slots += 1;
            let (info, more) = ExtraInfo::decode_slot(&slot)?;
            // At most one of each of the four types: this also bounds the chain.
            if extras.iter().any(|e| e.kind() == info.kind()) {
                return Err(NetifError::DuplicateExtra(info.kind()));
            }
            extras.push(info);
            if !more {
                break;
            }
        }
    }
    let mut fragments = vec![TxFragment {
        id: first.id,
        gref: first.gref,
        offset: first.offset,
        size: first.size,
    }];
    let mut remaining = first.size;
    let mut more = flags.contains(TxFlags::MORE_DATA);
    while more {
        let index = fragments.len();
        if index >= max_slots {
            return Err(NetifError::TooManySlots { max: max_slots });
        }
        let r = next()?.ok_or(NetifError::Truncated { slots })?;
        slots += 1;
        let f = TxFlags::try_from(r.flags)?;
        if f.contains(TxFlags::EXTRA_INFO) {
            return Err(NetifError::ExtraOnLaterFragment(index));
        }
        if r.size > remaining {
            return Err(NetifError::FragmentTooLarge {
                index,
                size: r.size,
                remaining,
            });
        }
        remaining -= r.size;
        check_in_page(index, r.offset, r.size)?;
        fragments.push(TxFragment {
            id: r.id,
            gref: r.gref,
            offset: r.offset,
            size: r.size,
        });
        more = f.contains(TxFlags::MORE_DATA);
    }
    if fragments.len() > max_slots {
        return Err(NetifError::TooManySlots { max: max_slots });
    }
    fragments[0].size = remaining;
    check_in_page(0, first.offset, remaining)?;
    Ok(Some(TxPacket {
        flags: flags - TxFlags::MORE_DATA - TxFlags::EXTRA_INFO,
        size: first.size,
        fragments,
        extras,
    }))
}

/// A validated receive response (what a frontend reads).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxResponse {
    /// The request's `id`.
    pub id: u16,
    /// Offset of the data in the buffer page.
    pub offset: u16,
    /// Checked flags.
    pub flags: RxFlags,
    /// Bytes received, or the failure status.
    pub result: Result<u16, NetifStatus>,
}

impl RxResponse {
    /// Decode and check a receive response: known flags and status, data within the page.
    pub fn decode(raw: &NetifRxResponse) -> Result<Self, NetifError> {
        let flags = RxFlags::try_from(raw.flags)?;
        let result = match u16::try_from(raw.status) {
            Ok(size) => {
                check_in_page(0, raw.offset, size)?;
                Ok(size)
            }
            Err(_) => Err(NetifStatus::try_from(raw.status)?),
        };
        Ok(Self {
            id: raw.id,
            offset: raw.offset,
            flags,
            result,
        })
    }

    /// The wire slot a backend puts on the ring.
    pub fn encode(&self) -> NetifRxResponse {
        let status = match self.result {
            // A length is at most a page, so it fits an i16.
            Ok(size) => i16::try_from(size).unwrap_or(i16::MAX),
            Err(s) => s.into(),
        };
        NetifRxResponse {
            id: self.id,
            offset: self.offset,
            flags: self.flags.bits(),
            status,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(id: u16, flags: u16, size: u16) -> NetifTxRequest {
        NetifTxRequest {
            gref: 1000 + u32::from(id),
            offset: 0,
            flags,
            id,
            size,
        }
    }

    fn read(slots: &[NetifTxRequest], max: usize) -> Result<Option<TxPacket>, NetifError> {
        let mut it = slots.iter().copied();
        read_tx_packet(|| Ok(it.next()), max)
    }

    const GSO: ExtraInfo = ExtraInfo::Gso {
        size: 1448,
        gso_type: GsoType::TcpV4,
        features: 0,
    };

    #[test]
    fn multi_slot_packet_with_extras() {
        let slots = [
            req(
                1,
                NETTXF_CSUM_BLANK | NETTXF_MORE_DATA | NETTXF_EXTRA_INFO,
                5000,
            ),
            GSO.to_tx_slot(true),
            ExtraInfo::Hash {
                hash_type: 1,
                algorithm: 1,
                value: 0xdead_beef,
            }
            .to_tx_slot(false),
            req(2, NETTXF_MORE_DATA, 4096),
            req(3, 0, 100),
            req(9, 0, 60), // the next packet
        ];
        let p = read(&slots, XEN_NETBK_LEGACY_SLOTS_MAX).unwrap().unwrap();
        assert_eq!(p.size, 5000);
        assert_eq!(p.flags, TxFlags::CSUM_BLANK);
        assert_eq!(
            p.fragments.iter().map(|f| f.size).collect::<Vec<_>>(),
            [804, 4096, 100]
        );
        assert_eq!(p.extras.len(), 2);
        assert_eq!(p.extras[0], GSO);
        assert_eq!(p.slots(), 5);
        assert_eq!(p.encode(), slots[..5].to_vec());
        let ids: Vec<_> = p
            .responses(NetifStatus::Okay)
            .iter()
            .map(|r| (r.id, r.status))
            .collect();
        assert_eq!(ids, [(1, 0), (0, 1), (0, 1), (2, 0), (3, 0)]);
    }

    #[test]
    fn malformed_chains_are_errors() {
        let r = |s: &[NetifTxRequest]| read(s, 3);
        assert_eq!(r(&[]), Ok(None));
        assert_eq!(r(&[req(1, 0x10, 10)]), Err(NetifError::BadTxFlags(0x10)));
        assert_eq!(
            r(&[req(1, NETTXF_MORE_DATA, 10)]),
            Err(NetifError::Truncated { slots: 1 })
        );
        assert_eq!(
            r(&[req(1, NETTXF_EXTRA_INFO, 10)]),
            Err(NetifError::Truncated { slots: 1 })
        );
        assert_eq!(
            r(&[req(1, NETTXF_MORE_DATA, 10), req(2, 0, 11)]),
            Err(NetifError::FragmentTooLarge {
                index: 1,
                size: 11,
                remaining: 10
            })
        );
        let chain = [req(1, 4, 40), req(2, 4, 1), req(3, 4, 1), req(4, 0, 1)];
        assert_eq!(r(&chain), Err(NetifError::TooManySlots { max: 3 }));
        assert!(read(&chain, 4).unwrap().is_some());
        assert_eq!(
            r(&[req(1, NETTXF_MORE_DATA, 10), req(2, NETTXF_EXTRA_INFO, 1)]),
            Err(NetifError::ExtraOnLaterFragment(1))
        );
        let mut off = req(1, 0, 100);
        off.offset = 4000;
        assert_eq!(
            r(&[off]),
            Err(NetifError::CrossesPage {
                index: 0,
                offset: 4000,
                size: 100
            })
        );
        assert_eq!(
            r(&[
                req(1, NETTXF_EXTRA_INFO, 10),
                GSO.to_tx_slot(true),
                GSO.to_tx_slot(false)
            ]),
            Err(NetifError::DuplicateExtra(ExtraType::Gso))
        );
        let mut bad = GSO.to_tx_slot(false);
        bad.gref = 0; // type 0
        assert_eq!(
            r(&[req(1, NETTXF_EXTRA_INFO, 10), bad]),
            Err(NetifError::BadExtraType(0))
        );
        let ring_err = read_tx_packet(|| Err(RingError::Overflow { prod: 9, cons: 0 }), 3);
        assert!(matches!(ring_err, Err(NetifError::Ring(_))));
    }

    #[test]
    fn rx_response_decoding() {
        let ok = NetifRxResponse {
            id: 4,
            offset: 10,
            flags: NETRXF_DATA_VALIDATED,
            status: 1500,
        };
        let r = RxResponse::decode(&ok).unwrap();
        assert_eq!(r.result, Ok(1500));
        assert_eq!(r.encode(), ok);
        let dropped = NetifRxResponse {
            status: NETIF_RSP_DROPPED,
            ..ok
        };
        assert_eq!(
            RxResponse::decode(&dropped).unwrap().result,
            Err(NetifStatus::Dropped)
        );
        assert_eq!(
            RxResponse::decode(&NetifRxResponse { status: -7, ..ok }),
            Err(NetifError::BadStatus(-7))
        );
        assert!(matches!(
            RxResponse::decode(&NetifRxResponse { status: 4090, ..ok }),
            Err(NetifError::CrossesPage { .. })
        ));
        assert_eq!(
            RxResponse::decode(&NetifRxResponse { flags: 0x20, ..ok }),
            Err(NetifError::BadRxFlags(0x20))
        );
        assert_eq!((NET_TX_RING_SIZE, NET_RX_RING_SIZE), (256, 256));
    }
}
