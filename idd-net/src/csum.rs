//! Completing the checksum of a transmit the guest left blank (`NETTXF_csum_blank`).
//!
//! Linux netfront offloads TCP and UDP checksums: it sends such packets with
//! `NETTXF_csum_blank` and only a partial (pseudo-header) sum in the checksum field, and
//! expects the backend to finish it (Linux netback does, in `skb_checksum_setup`). Our NIC
//! model has no checksum offload, so netback computes the full checksum itself: the whole
//! frame is grant-copied into a page of our own memory, the checksum of the L4 segment and
//! its pseudo-header is computed there, and the two bytes are patched into netback's private
//! header copy, which is what the device sends.
//!
//! Handled: IPv4 (any IHL) and IPv6 (no extension headers), one optional 802.1Q tag, TCP and
//! UDP (a UDP sum of 0 is sent as `0xffff`). Anything else with `csum_blank` is refused
//! ([`CsumError`]), and netback answers it with `NETIF_RSP_ERROR` rather than send a frame
//! with a wrong checksum.

/// Why a checksum could not be completed.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum CsumError {
    /// Not IPv4/IPv6 carrying TCP or UDP, or an IPv6 extension header.
    #[error("No TCP or UDP checksum to complete")]
    Unsupported,
    /// The headers or the lengths they give run past the frame.
    #[error("Frame too short for its headers")]
    Truncated,
}

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

fn sum(data: &[u8], mut acc: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc = acc.wrapping_add(u32::from(u16::from_be_bytes([c[0], c[1]])));
    }
    if let [last] = chunks.remainder() {
        acc = acc.wrapping_add(u32::from(*last) << 8);
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    // Folded to 16 bits above.
    #[allow(clippy::cast_possible_truncation)]
    {
        !(acc as u16)
    }
}

/// Compute the TCP/UDP checksum of `frame` (an Ethernet frame) and write it into the frame.
/// Returns the offset of the two checksum bytes.
pub fn complete(frame: &mut [u8]) -> Result<usize, CsumError> {
    let be16 = |f: &[u8], o: usize| {
        f.get(o..o + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or(CsumError::Truncated)
    };
    let mut l3 = 14;
    let mut ethertype = be16(frame, 12)?;
    if ethertype == 0x8100 {
        ethertype = be16(frame, 16)?;
        l3 = 18;
    }
    let (proto, l4, l4_len, pseudo) = match ethertype {
        0x0800 => {
            let ihl = usize::from(*frame.get(l3).ok_or(CsumError::Truncated)? & 0x0f) * 4;
            let total = usize::from(be16(frame, l3 + 2)?);
            if ihl < 20 || total < ihl || l3 + total > frame.len() {
                return Err(CsumError::Truncated);
            }
            let proto = frame[l3 + 9];
            let l4_len = total - ihl;
            let mut acc = sum(&frame[l3 + 12..l3 + 20], 0);
            acc = acc.wrapping_add(u32::from(proto));
            acc = acc.wrapping_add(u32::try_from(l4_len).map_err(|_| CsumError::Truncated)?);
            (proto, l3 + ihl, l4_len, acc)
        }
        0x86dd => {
            let payload = usize::from(be16(frame, l3 + 4)?);
            if l3 + 40 + payload > frame.len() {
                return Err(CsumError::Truncated);
            }
            let proto = frame[l3 + 6];
            let mut acc = sum(&frame[l3 + 8..l3 + 40], 0);
            acc = acc.wrapping_add(u32::from(proto));
            acc = acc.wrapping_add(u32::try_from(payload).map_err(|_| CsumError::Truncated)?);
            (proto, l3 + 40, payload, acc)
        }
        _ => return Err(CsumError::Unsupported),
    };
    let field = match proto {
        IPPROTO_TCP if l4_len >= 20 => l4 + 16,
        IPPROTO_UDP if l4_len >= 8 => l4 + 6,
        IPPROTO_TCP | IPPROTO_UDP => return Err(CsumError::Truncated),
        _ => return Err(CsumError::Unsupported),
    };
    frame[field] = 0;
    frame[field + 1] = 0;
    let mut c = fold(sum(&frame[l4..l4 + l4_len], pseudo));
    if proto == IPPROTO_UDP && c == 0 {
        c = 0xffff;
    }
    frame[field..field + 2].copy_from_slice(&c.to_be_bytes());
    Ok(field)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[allow(clippy::cast_possible_truncation)] // the high and low bytes of a u16
    fn udp4(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&[0x08, 0x00]);
        let total = u16::try_from(20 + 8 + payload.len()).unwrap();
        f.extend_from_slice(&[
            0x45,
            0,
            (total >> 8) as u8,
            total as u8,
            0,
            0,
            0,
            0,
            64,
            17,
            0,
            0,
        ]);
        f.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
        let ulen = u16::try_from(8 + payload.len()).unwrap();
        f.extend_from_slice(&[
            0x30,
            0x39,
            0x00,
            0x07,
            (ulen >> 8) as u8,
            ulen as u8,
            0xde,
            0xad,
        ]);
        f.extend_from_slice(payload);
        f
    }

    /// Verify the way a receiver does, written independently of `sum`/`fold`: the
    /// one's-complement sum over pseudo-header and segment is 0xffff.
    fn verifies(f: &[u8]) -> bool {
        let mut words: Vec<u64> = Vec::new();
        let mut pseudo = f[26..34].to_vec();
        let ulen = u16::try_from(f.len() - 34).unwrap();
        pseudo.extend_from_slice(&[0, 17]);
        pseudo.extend_from_slice(&ulen.to_be_bytes());
        for part in [&pseudo[..], &f[34..]] {
            for i in (0..part.len()).step_by(2) {
                let hi = u64::from(part[i]);
                let lo = part.get(i + 1).map_or(0, |b| u64::from(*b));
                words.push(hi * 256 + lo);
            }
        }
        let mut total: u64 = words.iter().sum();
        while total > 0xffff {
            total = (total % 65536) + total / 65536;
        }
        total == 0xffff
    }

    #[test]
    fn udp_over_ipv4_is_completed() {
        let mut f = udp4(b"hello, world");
        assert_eq!(complete(&mut f), Ok(40));
        assert!(verifies(&f));
        // A known value: recomputing gives the same.
        let c = [f[40], f[41]];
        assert_eq!(complete(&mut f), Ok(40));
        assert_eq!([f[40], f[41]], c);
    }

    #[test]
    fn unsupported_and_truncated() {
        let mut arp = vec![0u8; 60];
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(complete(&mut arp), Err(CsumError::Unsupported));
        let mut f = udp4(b"x");
        f.truncate(30);
        assert_eq!(complete(&mut f), Err(CsumError::Truncated));
        let mut icmp = udp4(b"abcd");
        icmp[23] = 1;
        assert_eq!(complete(&mut icmp), Err(CsumError::Unsupported));
    }

    proptest! {
        #[test]
        fn any_udp_payload_verifies(payload in proptest::collection::vec(any::<u8>(), 0..1400)) {
            let mut f = udp4(&payload);
            prop_assert!(complete(&mut f).is_ok());
            prop_assert!(verifies(&f));
        }

        #[test]
        fn arbitrary_frames_never_panic(mut f in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = complete(&mut f);
        }
    }
}
