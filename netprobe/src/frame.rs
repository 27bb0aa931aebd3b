//! Ethernet frames the probe sends and the replies it accepts, built and parsed with
//! `etherparse`.
//!
//! # What goes on the wire
//!
//! Every frame is Ethernet II without FCS (what a TAP device and the UDP wire carry):
//!
//! ```text
//! dst MAC (6) | src MAC (6) | EtherType (2) | payload
//! ```
//!
//! * ARP (EtherType 0x0806): Ethernet/IPv4 requests and replies (RFC 826), 28 bytes.
//! * IPv4 (0x0800), no options, TTL 64, DF clear: ICMP echo request/reply (type 8/0) or UDP.
//!
//! The probe's own payload ([`ProbeTag`]) identifies a probe independently of the 16-bit ICMP
//! sequence number (which wraps after 327 s at 200 probes/s) and of the UDP ports:
//!
//! ```text
//! "NPRB" (4) | run id u32 BE (4) | probe index u64 BE (8) | zero padding
//! ```
//!
//! An echo responder returns the payload unchanged, so the reply names the probe it answers.
//!
//! # Parsing untrusted frames
//!
//! Frames come from the other side of the wire (a guest's stack, through an IDD), so
//! [`parse`] never panics and rejects with [`FrameError`]: truncated headers, IPv4 header
//! checksum errors, IPv4 fragments, ICMP checksum errors and UDP checksum errors (a UDP
//! checksum of 0 means "none" in IPv4 and is accepted). Anything it does not understand
//! (IPv6, TCP, other EtherTypes) is [`Payload::Other`], not an error: the wire carries all
//! kinds of traffic and the tools skip what is not theirs.

use etherparse::{
    ArpEthIpv4Packet, ArpHardwareId, ArpOperation, ArpPacket, EtherType, Icmpv4Type, NetSlice,
    PacketBuilder, SlicedPacket, TransportSlice,
};
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// Ethernet header length (no VLAN tag, no FCS).
pub const ETH_HEADER_LEN: usize = 14;
/// IPv4 header length without options (what we build).
pub const IPV4_HEADER_LEN: usize = 20;
/// ICMP echo header length.
pub const ICMP_ECHO_HEADER_LEN: usize = 8;
/// UDP header length.
pub const UDP_HEADER_LEN: usize = 8;
/// Largest frame the tools send or accept (a 1500-byte MTU plus the Ethernet header).
pub const MAX_FRAME_LEN: usize = 1514;
/// Time to live of the IPv4 packets we build.
const TTL: u8 = 64;

/// Why a frame could not be built or parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The frame is not a well-formed Ethernet/ARP/IPv4/ICMP/UDP frame.
    #[error("Malformed frame: {0}")]
    Malformed(String),
    /// The IPv4 header checksum is wrong.
    #[error("Bad IPv4 header checksum")]
    Ipv4Checksum,
    /// The ICMP checksum is wrong.
    #[error("Bad ICMP checksum")]
    IcmpChecksum,
    /// The UDP checksum is wrong.
    #[error("Bad UDP checksum")]
    UdpChecksum,
    /// An IPv4 fragment (we neither send nor reassemble them).
    #[error("IPv4 fragment")]
    Fragment,
    /// The frame to build would be larger than [`MAX_FRAME_LEN`].
    #[error("Frame of {0} bytes is larger than {MAX_FRAME_LEN}")]
    TooLarge(usize),
    /// A MAC address string is not `xx:xx:xx:xx:xx:xx`.
    #[error("Bad MAC address {0:?}")]
    BadMac(String),
}

/// An Ethernet MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// The broadcast address.
    pub const BROADCAST: Mac = Mac([0xff; 6]);

    /// True for broadcast and multicast addresses (group bit set).
    pub fn is_group(&self) -> bool {
        self.0[0] & 1 != 0
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

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Mac {
    type Err = FrameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || FrameError::BadMac(s.to_owned());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Mac(out))
    }
}

impl From<Mac> for String {
    fn from(m: Mac) -> String {
        m.to_string()
    }
}

impl TryFrom<String> for Mac {
    type Error = FrameError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

/// One end of an IPv4-over-Ethernet conversation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Its MAC address.
    pub mac: Mac,
    /// Its IPv4 address.
    pub ip: Ipv4Addr,
}

/// The probe's payload header (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeTag {
    /// Distinguishes runs (and tools) sharing a wire.
    pub run: u32,
    /// The probe's index in its run, from 0.
    pub index: u64,
}

impl ProbeTag {
    /// Bytes of the tag at the start of a payload.
    pub const LEN: usize = 16;
    /// Magic that starts the tag.
    pub const MAGIC: [u8; 4] = *b"NPRB";

    /// A payload of `len` bytes (at least [`Self::LEN`]) starting with the tag.
    pub fn payload(&self, len: usize) -> Vec<u8> {
        let mut p = vec![0u8; len.max(Self::LEN)];
        p[..4].copy_from_slice(&Self::MAGIC);
        p[4..8].copy_from_slice(&self.run.to_be_bytes());
        p[8..16].copy_from_slice(&self.index.to_be_bytes());
        p
    }

    /// The tag at the start of `payload`, if there is one.
    pub fn from_payload(payload: &[u8]) -> Option<ProbeTag> {
        let head = payload.get(..Self::LEN)?;
        if head[..4] != Self::MAGIC {
            return None;
        }
        let run = u32::from_be_bytes(head[4..8].try_into().ok()?);
        let index = u64::from_be_bytes(head[8..16].try_into().ok()?);
        Some(ProbeTag { run, index })
    }
}

/// An IPv4 packet's addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Pair {
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
}

/// What a parsed frame carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Payload<'a> {
    /// An Ethernet/IPv4 ARP request or reply.
    Arp(ArpEthIpv4Packet),
    /// ICMP echo request.
    EchoRequest {
        /// Addresses.
        ip: Ipv4Pair,
        /// Identifier.
        id: u16,
        /// Sequence number.
        seq: u16,
        /// Data after the echo header.
        data: &'a [u8],
    },
    /// ICMP echo reply.
    EchoReply {
        /// Addresses.
        ip: Ipv4Pair,
        /// Identifier.
        id: u16,
        /// Sequence number.
        seq: u16,
        /// Data after the echo header.
        data: &'a [u8],
    },
    /// A UDP datagram.
    Udp {
        /// Addresses.
        ip: Ipv4Pair,
        /// Source port.
        src_port: u16,
        /// Destination port.
        dst_port: u16,
        /// Data after the UDP header.
        data: &'a [u8],
    },
    /// Anything else (IPv6, TCP, other ICMP, other EtherTypes), by EtherType.
    Other(u16),
}

/// A parsed frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    /// Destination MAC.
    pub dst: Mac,
    /// Source MAC.
    pub src: Mac,
    /// What it carries.
    pub payload: Payload<'a>,
}

fn malformed(e: impl fmt::Display) -> FrameError {
    FrameError::Malformed(e.to_string())
}

/// The Internet checksum (RFC 1071) of `data`, folded; 0 over a correct header.
fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(u16::from_be_bytes([*last, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // The loop leaves sum <= 0xffff.
    !u16::try_from(sum).unwrap_or(u16::MAX)
}

/// Parses an Ethernet frame (see the module docs for what is checked).
pub fn parse(frame: &[u8]) -> Result<Frame<'_>, FrameError> {
    let sliced = SlicedPacket::from_ethernet(frame).map_err(malformed)?;
    let (dst, src, ether_type) = match &sliced.link {
        Some(etherparse::LinkSlice::Ethernet2(eth)) => {
            (Mac(eth.destination()), Mac(eth.source()), eth.ether_type())
        }
        _ => return Err(FrameError::Malformed("not Ethernet II".into())),
    };
    let other = Payload::Other(ether_type.0);
    let payload = match &sliced.net {
        Some(NetSlice::Arp(arp)) => match arp.to_packet().try_eth_ipv4() {
            Ok(p) => Payload::Arp(p),
            Err(_) => other,
        },
        Some(NetSlice::Ipv4(v4)) => {
            let header = v4.header();
            if internet_checksum(header.slice()) != 0 {
                return Err(FrameError::Ipv4Checksum);
            }
            if v4.is_payload_fragmented() {
                return Err(FrameError::Fragment);
            }
            let ip = Ipv4Pair {
                src: header.source_addr(),
                dst: header.destination_addr(),
            };
            match &sliced.transport {
                Some(TransportSlice::Icmpv4(icmp)) => {
                    if internet_checksum(icmp.slice()) != 0 {
                        return Err(FrameError::IcmpChecksum);
                    }
                    match icmp.icmp_type() {
                        Icmpv4Type::EchoRequest(h) => Payload::EchoRequest {
                            ip,
                            id: h.id,
                            seq: h.seq,
                            data: icmp.payload(),
                        },
                        Icmpv4Type::EchoReply(h) => Payload::EchoReply {
                            ip,
                            id: h.id,
                            seq: h.seq,
                            data: icmp.payload(),
                        },
                        _ => other,
                    }
                }
                Some(TransportSlice::Udp(udp)) => {
                    let h = udp.to_header();
                    if h.checksum != 0 {
                        let want = h
                            .calc_checksum_ipv4_raw(
                                header.source(),
                                header.destination(),
                                udp.payload(),
                            )
                            .map_err(malformed)?;
                        if want != h.checksum {
                            return Err(FrameError::UdpChecksum);
                        }
                    }
                    Payload::Udp {
                        ip,
                        src_port: h.source_port,
                        dst_port: h.destination_port,
                        data: udp.payload(),
                    }
                }
                _ => other,
            }
        }
        _ => other,
    };
    Ok(Frame { dst, src, payload })
}

fn check_len(len: usize) -> Result<(), FrameError> {
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(len));
    }
    Ok(())
}

fn ipv4_step(from: Endpoint, to: Endpoint) -> etherparse::PacketBuilderStep<etherparse::IpHeaders> {
    PacketBuilder::ethernet2(from.mac.0, to.mac.0).ipv4(from.ip.octets(), to.ip.octets(), TTL)
}

/// An ICMP echo request (`reply == false`) or reply from `from` to `to`.
pub fn icmp_echo(
    from: Endpoint,
    to: Endpoint,
    reply: bool,
    id: u16,
    seq: u16,
    data: &[u8],
) -> Result<Vec<u8>, FrameError> {
    let step = ipv4_step(from, to);
    let step = if reply {
        step.icmpv4_echo_reply(id, seq)
    } else {
        step.icmpv4_echo_request(id, seq)
    };
    let len = step.size(data.len());
    check_len(len)?;
    let mut out = Vec::with_capacity(len);
    step.write(&mut out, data).map_err(malformed)?;
    Ok(out)
}

/// A UDP datagram from `from:src_port` to `to:dst_port`, with its checksum.
pub fn udp(
    from: Endpoint,
    to: Endpoint,
    src_port: u16,
    dst_port: u16,
    data: &[u8],
) -> Result<Vec<u8>, FrameError> {
    let step = ipv4_step(from, to).udp(src_port, dst_port);
    let len = step.size(data.len());
    check_len(len)?;
    let mut out = Vec::with_capacity(len);
    step.write(&mut out, data).map_err(malformed)?;
    Ok(out)
}

/// Bytes a UDP frame with `data_len` bytes of data takes (headers included).
pub const fn udp_frame_len(data_len: usize) -> usize {
    ETH_HEADER_LEN + IPV4_HEADER_LEN + UDP_HEADER_LEN + data_len
}

/// An ARP request from `from` asking who has `target` (sent to broadcast).
pub fn arp_request(from: Endpoint, target: Ipv4Addr) -> Result<Vec<u8>, FrameError> {
    arp(
        from,
        Mac::BROADCAST,
        Mac([0; 6]),
        target,
        ArpOperation::REQUEST,
    )
}

/// An ARP reply from `from` to `to` saying `from.ip` is at `from.mac`.
pub fn arp_reply(from: Endpoint, to: Endpoint) -> Result<Vec<u8>, FrameError> {
    arp(from, to.mac, to.mac, to.ip, ArpOperation::REPLY)
}

fn arp(
    from: Endpoint,
    eth_dst: Mac,
    target_mac: Mac,
    target_ip: Ipv4Addr,
    op: ArpOperation,
) -> Result<Vec<u8>, FrameError> {
    let packet = ArpPacket::new(
        ArpHardwareId::ETHERNET,
        EtherType::IPV4,
        op,
        &from.mac.0,
        &from.ip.octets(),
        &target_mac.0,
        &target_ip.octets(),
    )
    .map_err(malformed)?;
    let step = PacketBuilder::ethernet2(from.mac.0, eth_dst.0).arp(packet);
    let mut out = Vec::with_capacity(step.size());
    step.write(&mut out).map_err(malformed)?;
    Ok(out)
}

/// The UDP port the echo responder answers (RFC 862).
pub const ECHO_PORT: u16 = 7;

/// What an echo host at `me` answers to `frame`, if anything: ARP requests for its IP, ICMP
/// echo requests to its IP, UDP datagrams to port 7 (echoed back with the ports swapped).
/// Frames for other MACs (except broadcast ARP) and malformed frames get no answer.
pub fn echo_answer(me: Endpoint, frame: &[u8]) -> Option<Vec<u8>> {
    let f = parse(frame).ok()?;
    if f.dst != me.mac && !(f.dst.is_group() && matches!(f.payload, Payload::Arp(_))) {
        return None;
    }
    match f.payload {
        Payload::Arp(a)
            if a.operation == ArpOperation::REQUEST && a.target_ipv4_addr() == me.ip =>
        {
            let asker = Endpoint {
                mac: Mac(a.sender_mac),
                ip: a.sender_ipv4_addr(),
            };
            arp_reply(me, asker).ok()
        }
        Payload::EchoRequest { ip, id, seq, data } if ip.dst == me.ip => icmp_echo(
            me,
            Endpoint {
                mac: f.src,
                ip: ip.src,
            },
            true,
            id,
            seq,
            data,
        )
        .ok(),
        Payload::Udp {
            ip,
            src_port,
            dst_port: ECHO_PORT,
            data,
        } if ip.dst == me.ip => udp(
            me,
            Endpoint {
                mac: f.src,
                ip: ip.src,
            },
            ECHO_PORT,
            src_port,
            data,
        )
        .ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ep(mac: [u8; 6], ip: [u8; 4]) -> Endpoint {
        Endpoint {
            mac: Mac(mac),
            ip: Ipv4Addr::from(ip),
        }
    }

    fn a() -> Endpoint {
        ep([2, 0, 0, 0, 0, 1], [192, 0, 2, 1])
    }
    fn b() -> Endpoint {
        ep([2, 0, 0, 0, 0, 2], [192, 0, 2, 2])
    }

    #[test]
    fn mac_parse_and_print() {
        let m: Mac = "02:00:0a:ff:00:01".parse().unwrap();
        assert_eq!(m.0, [2, 0, 10, 255, 0, 1]);
        assert_eq!(m.to_string(), "02:00:0a:ff:00:01");
        for bad in [
            "",
            "02:00:0a:ff:00",
            "02:00:0a:ff:00:01:02",
            "2:00:0a:ff:00:01",
            "zz:00:00:00:00:00",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad}");
        }
        assert!(Mac::BROADCAST.is_group());
        assert!(!m.is_group());
    }

    #[test]
    fn arp_request_is_answered_by_the_owner_only() {
        let req = arp_request(a(), b().ip).unwrap();
        let f = parse(&req).unwrap();
        assert_eq!(f.dst, Mac::BROADCAST);
        let ans = echo_answer(b(), &req).expect("b owns the address");
        let f = parse(&ans).unwrap();
        assert_eq!(f.dst, a().mac);
        match f.payload {
            Payload::Arp(p) => {
                assert_eq!(p.operation, ArpOperation::REPLY);
                assert_eq!(p.sender_mac, b().mac.0);
                assert_eq!(p.sender_ipv4_addr(), b().ip);
                assert_eq!(p.target_ipv4_addr(), a().ip);
            }
            other => panic!("{other:?}"),
        }
        let other = ep([2, 0, 0, 0, 0, 3], [192, 0, 2, 3]);
        assert_eq!(echo_answer(other, &req), None);
    }

    #[test]
    fn corrupted_checksums_are_rejected() {
        let data = ProbeTag { run: 1, index: 2 }.payload(32);
        let mut icmp = icmp_echo(a(), b(), false, 1, 1, &data).unwrap();
        let last = icmp.len() - 1;
        icmp[last] ^= 0x40;
        assert_eq!(parse(&icmp), Err(FrameError::IcmpChecksum));
        let mut u = udp(a(), b(), 1000, 7, &data).unwrap();
        let last = u.len() - 1;
        u[last] ^= 0x40;
        assert_eq!(parse(&u), Err(FrameError::UdpChecksum));
        let mut ip = icmp_echo(a(), b(), false, 1, 1, &data).unwrap();
        ip[ETH_HEADER_LEN + 8] ^= 1; // TTL
        assert_eq!(parse(&ip), Err(FrameError::Ipv4Checksum));
    }

    #[test]
    fn frames_padded_to_the_ethernet_minimum_still_parse() {
        // A NIC pads short frames to 60 bytes; the IPv4 length and ARP's fixed size tell
        // where the packet ends.
        let mut req = arp_request(a(), b().ip).unwrap();
        req.resize(60, 0);
        assert!(echo_answer(b(), &req).is_some());
        let mut ping = icmp_echo(a(), b(), false, 1, 2, b"hi").unwrap();
        ping.resize(60, 0);
        let ans = echo_answer(b(), &ping).unwrap();
        match parse(&ans).unwrap().payload {
            Payload::EchoReply { data, .. } => assert_eq!(data, b"hi"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn too_large_is_refused() {
        let data = vec![0u8; MAX_FRAME_LEN];
        assert!(matches!(
            udp(a(), b(), 1, 2, &data),
            Err(FrameError::TooLarge(_))
        ));
        let fits = vec![0u8; MAX_FRAME_LEN - udp_frame_len(0)];
        assert_eq!(udp(a(), b(), 1, 2, &fits).unwrap().len(), MAX_FRAME_LEN);
    }

    #[test]
    fn echo_answer_ignores_other_hosts_and_replies() {
        let req = icmp_echo(a(), b(), false, 1, 1, b"x").unwrap();
        let third = ep([2, 0, 0, 0, 0, 9], [192, 0, 2, 9]);
        assert_eq!(echo_answer(third, &req), None);
        let rep = icmp_echo(b(), a(), true, 1, 1, b"x").unwrap();
        assert_eq!(echo_answer(a(), &rep), None);
        let u = udp(a(), b(), 5000, 9, b"x").unwrap();
        assert_eq!(echo_answer(b(), &u), None, "only port 7 is echoed");
    }

    fn arb_ep() -> impl Strategy<Value = Endpoint> {
        (any::<[u8; 6]>(), any::<[u8; 4]>()).prop_map(|(mut m, ip)| {
            m[0] &= 0xfe; // unicast
            ep(m, ip)
        })
    }

    proptest! {
        #[test]
        fn icmp_round_trip(from in arb_ep(), to in arb_ep(), reply: bool, id: u16, seq: u16,
                           data in proptest::collection::vec(any::<u8>(), 0..1400)) {
            let f = icmp_echo(from, to, reply, id, seq, &data).unwrap();
            let p = parse(&f).unwrap();
            prop_assert_eq!(p.src, from.mac);
            prop_assert_eq!(p.dst, to.mac);
            let ip = Ipv4Pair { src: from.ip, dst: to.ip };
            let want = if reply {
                Payload::EchoReply { ip, id, seq, data: &data }
            } else {
                Payload::EchoRequest { ip, id, seq, data: &data }
            };
            prop_assert_eq!(p.payload, want);
            if !reply {
                let ans = echo_answer(to, &f).unwrap();
                let back = parse(&ans).unwrap();
                prop_assert_eq!(back.dst, from.mac);
                prop_assert_eq!(back.payload, Payload::EchoReply {
                    ip: Ipv4Pair { src: to.ip, dst: from.ip }, id, seq, data: &data });
            }
        }

        #[test]
        fn udp_round_trip(from in arb_ep(), to in arb_ep(), sp: u16, dp: u16,
                          data in proptest::collection::vec(any::<u8>(), 0..1400)) {
            let f = udp(from, to, sp, dp, &data).unwrap();
            prop_assert_eq!(f.len(), udp_frame_len(data.len()));
            let p = parse(&f).unwrap();
            prop_assert_eq!(p.payload, Payload::Udp {
                ip: Ipv4Pair { src: from.ip, dst: to.ip }, src_port: sp, dst_port: dp, data: &data });
        }

        #[test]
        fn arp_round_trip(from in arb_ep(), to in arb_ep()) {
            let f = arp_reply(from, to).unwrap();
            let p = parse(&f).unwrap();
            prop_assert_eq!(p.dst, to.mac);
            match p.payload {
                Payload::Arp(a) => {
                    prop_assert_eq!(a.operation, ArpOperation::REPLY);
                    prop_assert_eq!(Mac(a.sender_mac), from.mac);
                    prop_assert_eq!(a.sender_ipv4_addr(), from.ip);
                    prop_assert_eq!(Mac(a.target_mac), to.mac);
                    prop_assert_eq!(a.target_ipv4_addr(), to.ip);
                }
                other => prop_assert!(false, "{:?}", other),
            }
        }

        #[test]
        fn tag_round_trip(run: u32, index: u64, len in 0usize..100) {
            let p = ProbeTag { run, index }.payload(len);
            prop_assert_eq!(p.len(), len.max(ProbeTag::LEN));
            prop_assert_eq!(ProbeTag::from_payload(&p), Some(ProbeTag { run, index }));
        }

        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse(&bytes);
            let _ = echo_answer(b(), &bytes);
        }

        #[test]
        fn parse_survives_corrupted_frames(data in proptest::collection::vec(any::<u8>(), 0..64),
                                           pos: usize, flip in 1u8..=255, cut: usize) {
            let mut f = udp(a(), b(), 1, 7, &data).unwrap();
            let i = pos % f.len();
            f[i] ^= flip;
            let _ = parse(&f);
            f.truncate(cut % (f.len() + 1));
            let _ = parse(&f);
        }
    }
}
