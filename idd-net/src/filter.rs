//! Anti-spoofing and receive demultiplexing: what netback reads from an Ethernet header.
//!
//! # What a guest may send
//!
//! Policy gives each channel its MAC and, optionally, the IP networks it may use. A frame
//! from the guest is accepted only if:
//!
//! * its Ethernet source is the channel's MAC (always checked);
//! * with networks given: an IPv4 (`0x0800`) or IPv6 (`0x86DD`) packet's source address, or
//!   an ARP (`0x0806`) packet's sender protocol address, lies inside one of them, and an ARP
//!   packet's sender hardware address is the channel's MAC too. One 802.1Q tag is looked
//!   through. Other EtherTypes are not IP traffic and are allowed. A header too short to
//!   hold the checked field is a violation (nothing unchecked gets through).
//!
//! The check runs on netback's *own copy* of the first [`HEADER_COPY`] bytes of the frame,
//! and that copy is what the device sends (see `netback`), so the guest cannot change the
//! header between the check and the DMA.
//!
//! # Where a received frame goes
//!
//! By destination MAC ([`destination`]): a unicast address to the channel with that MAC
//! (none: dropped), a group address (the I/G bit, which covers broadcast and multicast) to
//! every channel.

use ipnet::IpNet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// Bytes of a frame's start that netback copies, checks and sends from its own memory
/// (Ethernet + 802.1Q + an IPv6 header, or ARP, with room to spare).
pub const HEADER_COPY: usize = 128;
/// Ethernet header bytes.
pub const ETH_HLEN: usize = 14;

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_VLAN: u16 = 0x8100;
const ETHERTYPE_IPV6: u16 = 0x86DD;

/// Why a MAC or a frame was rejected.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum FilterError {
    /// Not six `:`-separated hex bytes.
    #[error("Bad MAC address {0:?}")]
    BadMac(String),
    /// The Ethernet source is not the channel's MAC.
    #[error("Source MAC {0} is not the channel's")]
    SourceMac(Mac),
    /// The source IP (or ARP sender) is outside the allowed networks.
    #[error("Source address {0} is not allowed")]
    SourceIp(IpAddr),
    /// An ARP sender hardware address other than the channel's MAC.
    #[error("ARP sender {0} is not the channel's MAC")]
    ArpSender(Mac),
    /// Too short to check.
    #[error("Frame header too short ({0} bytes) to check")]
    Short(usize),
}

/// An Ethernet address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// `ff:ff:ff:ff:ff:ff`.
    pub const BROADCAST: Mac = Mac([0xff; 6]);

    /// A group (multicast or broadcast) address: the I/G bit of the first byte.
    pub fn is_group(&self) -> bool {
        self.0[0] & 1 != 0
    }
}

impl FromStr for Mac {
    type Err = FilterError;
    fn from_str(s: &str) -> Result<Self, FilterError> {
        let bad = || FilterError::BadMac(s.to_owned());
        let mut m = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut m {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Mac(m))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// A channel's transmit policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpoofPolicy {
    /// The only Ethernet source allowed.
    pub mac: Mac,
    /// Allowed source networks; empty: no IP check.
    pub nets: Vec<IpNet>,
}

fn be16(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(off)?, *b.get(off + 1)?]))
}

fn field<const N: usize>(b: &[u8], off: usize) -> Result<[u8; N], FilterError> {
    b.get(off..off + N)
        .and_then(|s| s.try_into().ok())
        .ok_or(FilterError::Short(b.len()))
}

impl SpoofPolicy {
    fn ip_allowed(&self, ip: IpAddr) -> Result<(), FilterError> {
        if self.nets.iter().any(|n| n.contains(&ip)) {
            Ok(())
        } else {
            Err(FilterError::SourceIp(ip))
        }
    }

    /// Check the start of a frame a guest sends (`hdr`: up to [`HEADER_COPY`] bytes of it).
    pub fn check(&self, hdr: &[u8]) -> Result<(), FilterError> {
        let src = Mac(field::<6>(hdr, 6)?);
        if src != self.mac {
            return Err(FilterError::SourceMac(src));
        }
        let mut ethertype = be16(hdr, 12).ok_or(FilterError::Short(hdr.len()))?;
        let mut l3 = ETH_HLEN;
        if ethertype == ETHERTYPE_VLAN {
            ethertype = be16(hdr, 16).ok_or(FilterError::Short(hdr.len()))?;
            l3 += 4;
        }
        if self.nets.is_empty() {
            return Ok(());
        }
        match ethertype {
            ETHERTYPE_IPV4 => {
                self.ip_allowed(IpAddr::V4(Ipv4Addr::from(field::<4>(hdr, l3 + 12)?)))
            }
            ETHERTYPE_IPV6 => {
                self.ip_allowed(IpAddr::V6(Ipv6Addr::from(field::<16>(hdr, l3 + 8)?)))
            }
            ETHERTYPE_ARP => {
                // htype(2) ptype(2) hlen(1) plen(1) op(2) sha(6) spa(4) ... for IPv4 ARP.
                let sha = Mac(field::<6>(hdr, l3 + 8)?);
                if sha != self.mac {
                    return Err(FilterError::ArpSender(sha));
                }
                self.ip_allowed(IpAddr::V4(Ipv4Addr::from(field::<4>(hdr, l3 + 14)?)))
            }
            _ => Ok(()),
        }
    }
}

/// Where a received frame goes, by its destination MAC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destination {
    /// To the channel with this MAC.
    Unicast(Mac),
    /// To every channel.
    Group,
}

/// The destination of a frame (`None`: shorter than an Ethernet header).
pub fn destination(frame: &[u8]) -> Option<Destination> {
    if frame.len() < ETH_HLEN {
        return None;
    }
    let dst = Mac(field::<6>(frame, 0).ok()?);
    Some(if dst.is_group() {
        Destination::Group
    } else {
        Destination::Unicast(dst)
    })
}

/// Parse `CIDR+CIDR+...` (the `ips=` of a channel spec).
pub fn parse_nets(s: &str) -> Result<Vec<IpNet>, ipnet::AddrParseError> {
    s.split('+')
        .filter(|p| !p.is_empty())
        .map(|p| p.parse::<IpNet>().map(|n| n.trunc()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAC: Mac = Mac([2, 0, 0, 0, 0, 1]);

    fn eth(src: Mac, ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&src.0);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn ipv4(src: [u8; 4]) -> Vec<u8> {
        let mut h = vec![0x45, 0, 0, 20, 0, 0, 0, 0, 64, 17, 0, 0];
        h.extend_from_slice(&src);
        h.extend_from_slice(&[10, 0, 0, 9]);
        h
    }

    fn arp(sha: Mac, spa: [u8; 4]) -> Vec<u8> {
        let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
        a.extend_from_slice(&sha.0);
        a.extend_from_slice(&spa);
        a.extend_from_slice(&[0; 6]);
        a.extend_from_slice(&[10, 0, 0, 9]);
        a
    }

    fn policy(nets: &str) -> SpoofPolicy {
        SpoofPolicy {
            mac: MAC,
            nets: parse_nets(nets).unwrap(),
        }
    }

    #[test]
    fn mac_parse_and_display() {
        let m: Mac = "02:00:00:00:00:01".parse().unwrap();
        assert_eq!(m, MAC);
        assert_eq!(m.to_string(), "02:00:00:00:00:01");
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:01:02",
            "2:0:0:0:0:1",
            "zz:00:00:00:00:01",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad}");
        }
        assert!(Mac::BROADCAST.is_group() && !MAC.is_group());
    }

    #[test]
    fn source_mac_is_always_checked() {
        let p = policy("");
        assert_eq!(p.check(&eth(MAC, 0x0800, &ipv4([1, 2, 3, 4]))), Ok(()));
        let other = Mac([2, 0, 0, 0, 0, 2]);
        assert_eq!(
            p.check(&eth(other, 0x0800, &[])),
            Err(FilterError::SourceMac(other))
        );
        assert_eq!(p.check(&[0; 10]), Err(FilterError::Short(10)));
    }

    #[test]
    fn source_ips_and_arp_senders() {
        let p = policy("10.0.0.0/24+fd00::/64");
        assert_eq!(p.check(&eth(MAC, 0x0800, &ipv4([10, 0, 0, 2]))), Ok(()));
        assert!(matches!(
            p.check(&eth(MAC, 0x0800, &ipv4([10, 0, 1, 2]))),
            Err(FilterError::SourceIp(_))
        ));
        // One VLAN tag is looked through.
        let mut tagged = vec![0, 5, 0x08, 0x00];
        tagged.extend_from_slice(&ipv4([10, 0, 1, 2]));
        assert!(p.check(&eth(MAC, 0x8100, &tagged)).is_err());
        assert_eq!(p.check(&eth(MAC, 0x0806, &arp(MAC, [10, 0, 0, 7]))), Ok(()));
        assert!(matches!(
            p.check(&eth(MAC, 0x0806, &arp(MAC, [10, 9, 0, 7]))),
            Err(FilterError::SourceIp(_))
        ));
        let other = Mac([2, 0, 0, 0, 0, 9]);
        assert_eq!(
            p.check(&eth(MAC, 0x0806, &arp(other, [10, 0, 0, 7]))),
            Err(FilterError::ArpSender(other))
        );
        let mut v6 = vec![0x60, 0, 0, 0, 0, 0, 17, 64];
        v6.extend_from_slice(&"fd00::5".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&[0; 16]);
        assert_eq!(p.check(&eth(MAC, 0x86dd, &v6)), Ok(()));
        v6[8] = 0xfe;
        assert!(p.check(&eth(MAC, 0x86dd, &v6)).is_err());
        // Truncated IP header: a violation, not a pass.
        assert_eq!(
            p.check(&eth(MAC, 0x0800, &[0x45, 0])),
            Err(FilterError::Short(16))
        );
        // Non-IP traffic only has its MAC checked.
        assert_eq!(p.check(&eth(MAC, 0x88cc, &[])), Ok(()));
    }

    #[test]
    fn destinations() {
        let mut f = eth(MAC, 0x0800, &[]);
        assert_eq!(destination(&f), Some(Destination::Group));
        f[..6].copy_from_slice(&MAC.0);
        assert_eq!(destination(&f), Some(Destination::Unicast(MAC)));
        f[0] = 0x01; // multicast 01:00:...
        assert_eq!(destination(&f), Some(Destination::Group));
        assert_eq!(destination(&f[..13]), None);
        assert!(parse_nets("10.0.0.1/33").is_err());
        assert_eq!(
            parse_nets("10.0.0.7/24").unwrap()[0].to_string(),
            "10.0.0.0/24"
        );
    }

    proptest! {
        #[test]
        fn arbitrary_headers_never_panic(hdr in proptest::collection::vec(any::<u8>(), 0..HEADER_COPY)) {
            let p = policy("10.0.0.0/8+fd00::/16");
            let _ = p.check(&hdr);
            let _ = destination(&hdr);
        }

        #[test]
        fn only_the_channel_mac_passes(src in any::<[u8; 6]>(), ethertype in any::<u16>()) {
            let p = policy("");
            let ok = p.check(&eth(Mac(src), ethertype, &[0; 64])).is_ok();
            prop_assert_eq!(ok, Mac(src) == MAC);
        }
    }
}
