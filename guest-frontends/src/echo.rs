//! A tiny IPv4 host over raw Ethernet frames: what a process guest without a network stack
//! needs to be pinged and probed through netfront.
//!
//! [`Responder::handle`] takes one received frame and returns the reply, if any:
//! * ARP: a request (Ethernet/IPv4, RFC 826) for our address gets a reply with our MAC;
//! * ICMP echo request (RFC 792) to our address: an echo reply with the same id, sequence
//!   number and payload;
//! * UDP to our address, port 7 (the echo service, RFC 862): the payload back to the sender's
//!   port.
//!
//! Everything else is counted and ignored: frames for another MAC (broadcast is ours too),
//! other protocols, IPv4 fragments (a fragment's payload is not the whole datagram, and
//! echoing it would be wrong). Parsing and building use `etherparse`, which checks lengths
//! and computes the checksums; a frame that does not parse is counted as malformed. Frames come
//! from the network, so nothing here panics on any input (see the proptest below).

use std::net::Ipv4Addr;

use etherparse::{
    ArpEthIpv4Packet, ArpOperation, ArpPacket, Icmpv4Type, NetSlice, PacketBuilder, SlicedPacket,
    TransportSlice,
};

/// The UDP echo port.
pub const ECHO_PORT: u16 = 7;
/// The UDP discard port (what [`udp_frame`] senders aim at when they want no answer).
pub const DISCARD_PORT: u16 = 9;
/// TTL of the packets we send.
const TTL: u8 = 64;
/// The broadcast MAC.
pub const BROADCAST: [u8; 6] = [0xff; 6];

/// Building a frame failed.
#[derive(Debug, thiserror::Error)]
pub enum EchoError {
    /// etherparse refused to build it (a payload too long for IPv4).
    #[error("Building a frame failed")]
    Build(#[from] etherparse::err::packet::BuildWriteError),
    /// A frame size that cannot hold the headers or exceeds an IPv4 datagram.
    #[error("Frame size {0} cannot carry a UDP datagram")]
    Size(usize),
}

/// What the responder did, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EchoStats {
    /// ARP requests answered.
    pub arp: u64,
    /// ICMP echo requests answered.
    pub icmp: u64,
    /// UDP echo datagrams answered.
    pub udp: u64,
    /// Frames that were not for us or not something we answer.
    pub ignored: u64,
    /// Frames that did not parse.
    pub malformed: u64,
}

/// The responder for one MAC and IPv4 address.
#[derive(Clone, Debug)]
pub struct Responder {
    mac: [u8; 6],
    ip: Ipv4Addr,
    stats: EchoStats,
}

impl Responder {
    /// A responder answering for `mac` and `ip`.
    pub fn new(mac: [u8; 6], ip: Ipv4Addr) -> Self {
        Self {
            mac,
            ip,
            stats: EchoStats::default(),
        }
    }

    /// Counters.
    pub fn stats(&self) -> EchoStats {
        self.stats
    }

    /// The reply to `frame`, if it deserves one.
    pub fn handle(&mut self, frame: &[u8]) -> Option<Vec<u8>> {
        let reply = match self.reply(frame) {
            Ok(r) => r,
            Err(()) => {
                self.stats.malformed += 1;
                return None;
            }
        };
        if reply.is_none() {
            self.stats.ignored += 1;
        }
        reply
    }

    fn reply(&mut self, frame: &[u8]) -> Result<Option<Vec<u8>>, ()> {
        let p = SlicedPacket::from_ethernet(frame).map_err(|_| ())?;
        let Some(eth) = p.link.as_ref().and_then(|l| l.to_header()) else {
            return Ok(None);
        };
        let Some(eth) = eth.ethernet2() else {
            return Ok(None);
        };
        if eth.destination != self.mac && eth.destination != BROADCAST {
            return Ok(None);
        }
        match &p.net {
            Some(NetSlice::Arp(arp)) => {
                let Ok(a) = arp.to_packet().try_eth_ipv4() else {
                    return Ok(None);
                };
                if a.operation != ArpOperation::REQUEST || a.target_ipv4_addr() != self.ip {
                    return Ok(None);
                }
                let reply = ArpEthIpv4Packet {
                    operation: ArpOperation::REPLY,
                    sender_mac: self.mac,
                    sender_ipv4: self.ip.octets(),
                    target_mac: a.sender_mac,
                    target_ipv4: a.sender_ipv4,
                };
                let mut out = Vec::new();
                PacketBuilder::ethernet2(self.mac, a.sender_mac)
                    .arp(ArpPacket::from(reply))
                    .write(&mut out)
                    .map_err(|_| ())?;
                self.stats.arp += 1;
                Ok(Some(out))
            }
            Some(NetSlice::Ipv4(ip)) => {
                let h = ip.header();
                if h.destination_addr() != self.ip || h.is_fragmenting_payload() {
                    return Ok(None);
                }
                let src = h.source_addr().octets();
                let b =
                    PacketBuilder::ethernet2(self.mac, eth.source).ipv4(self.ip.octets(), src, TTL);
                let mut out = Vec::new();
                match &p.transport {
                    Some(TransportSlice::Icmpv4(icmp)) => {
                        let Icmpv4Type::EchoRequest(echo) = icmp.icmp_type() else {
                            return Ok(None);
                        };
                        b.icmpv4_echo_reply(echo.id, echo.seq)
                            .write(&mut out, icmp.payload())
                            .map_err(|_| ())?;
                        self.stats.icmp += 1;
                    }
                    Some(TransportSlice::Udp(udp)) if udp.destination_port() == ECHO_PORT => {
                        b.udp(ECHO_PORT, udp.source_port())
                            .write(&mut out, udp.payload())
                            .map_err(|_| ())?;
                        self.stats.udp += 1;
                    }
                    _ => return Ok(None),
                }
                Ok(Some(out))
            }
            _ => Ok(None),
        }
    }
}

/// Bytes of Ethernet, IPv4 and UDP headers.
pub const UDP_HEADERS: usize = 14 + 20 + 8;

/// A UDP frame of exactly `size` bytes (headers included) from `src` to `dst`, the payload
/// filled with `fill`.
pub fn udp_frame(
    src: ([u8; 6], Ipv4Addr, u16),
    dst: ([u8; 6], Ipv4Addr, u16),
    size: usize,
    fill: u8,
) -> Result<Vec<u8>, EchoError> {
    if !(UDP_HEADERS..=UDP_HEADERS + 65_507).contains(&size) {
        return Err(EchoError::Size(size));
    }
    let payload = vec![fill; size - UDP_HEADERS];
    let mut out = Vec::with_capacity(size);
    PacketBuilder::ethernet2(src.0, dst.0)
        .ipv4(src.1.octets(), dst.1.octets(), TTL)
        .udp(src.2, dst.2)
        .write(&mut out, &payload)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::ArpHardwareId;
    use proptest::prelude::*;

    const ME: [u8; 6] = [2, 0, 0, 0, 0, 2];
    const PEER: [u8; 6] = [2, 0, 0, 0, 0, 9];
    const IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
    const PEER_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 9);

    fn arp_request(target: Ipv4Addr) -> Vec<u8> {
        let req = ArpEthIpv4Packet {
            operation: ArpOperation::REQUEST,
            sender_mac: PEER,
            sender_ipv4: PEER_IP.octets(),
            target_mac: [0; 6],
            target_ipv4: target.octets(),
        };
        let mut out = Vec::new();
        PacketBuilder::ethernet2(PEER, BROADCAST)
            .arp(ArpPacket::from(req))
            .write(&mut out)
            .unwrap();
        out
    }

    #[test]
    fn answers_arp_for_its_address_only() {
        let mut r = Responder::new(ME, IP);
        let reply = r.handle(&arp_request(IP)).unwrap();
        let p = SlicedPacket::from_ethernet(&reply).unwrap();
        let Some(NetSlice::Arp(a)) = p.net else {
            panic!("not ARP")
        };
        let a = a.to_packet();
        assert_eq!(a.hw_addr_type, ArpHardwareId::ETHERNET);
        let a = a.try_eth_ipv4().unwrap();
        assert_eq!(a.operation, ArpOperation::REPLY);
        assert_eq!((a.sender_mac, a.sender_ipv4), (ME, IP.octets()));
        assert_eq!((a.target_mac, a.target_ipv4), (PEER, PEER_IP.octets()));
        assert!(r.handle(&arp_request(Ipv4Addr::new(10, 0, 0, 3))).is_none());
        assert_eq!((r.stats().arp, r.stats().ignored), (1, 1));
    }

    #[test]
    fn answers_ping_with_the_same_payload() {
        let mut r = Responder::new(ME, IP);
        let mut req = Vec::new();
        PacketBuilder::ethernet2(PEER, ME)
            .ipv4(PEER_IP.octets(), IP.octets(), 64)
            .icmpv4_echo_request(77, 5)
            .write(&mut req, b"hello ping")
            .unwrap();
        let reply = r.handle(&req).unwrap();
        let p = SlicedPacket::from_ethernet(&reply).unwrap();
        let Some(TransportSlice::Icmpv4(icmp)) = p.transport else {
            panic!("not ICMP")
        };
        let Icmpv4Type::EchoReply(e) = icmp.icmp_type() else {
            panic!("not a reply")
        };
        assert_eq!((e.id, e.seq), (77, 5));
        assert_eq!(icmp.payload(), b"hello ping");
        assert_eq!(
            icmp.icmp_type().calc_checksum(icmp.payload()),
            icmp.header().checksum,
            "checksum valid"
        );
        let Some(NetSlice::Ipv4(ip)) = p.net else {
            panic!()
        };
        assert_eq!(ip.header().destination_addr(), PEER_IP);
        // For another MAC: ignored.
        req[..6].copy_from_slice(&[2, 0, 0, 0, 0, 3]);
        assert!(r.handle(&req).is_none());
    }

    #[test]
    fn echoes_udp_port_7_only() {
        let mut r = Responder::new(ME, IP);
        let req = udp_frame((PEER, PEER_IP, 4000), (ME, IP, ECHO_PORT), 100, 0xab).unwrap();
        assert_eq!(req.len(), 100);
        let reply = r.handle(&req).unwrap();
        let p = SlicedPacket::from_ethernet(&reply).unwrap();
        let Some(TransportSlice::Udp(u)) = p.transport else {
            panic!("not UDP")
        };
        assert_eq!((u.source_port(), u.destination_port()), (7, 4000));
        assert_eq!(u.payload(), &[0xab; 100 - UDP_HEADERS][..]);
        let other = udp_frame((PEER, PEER_IP, 4000), (ME, IP, DISCARD_PORT), 60, 0).unwrap();
        assert!(r.handle(&other).is_none());
        assert!(r.handle(&[1, 2, 3]).is_none());
        assert_eq!(
            r.stats(),
            EchoStats {
                arp: 0,
                icmp: 0,
                udp: 1,
                ignored: 1,
                malformed: 1
            }
        );
        assert!(udp_frame((PEER, PEER_IP, 1), (ME, IP, 2), 41, 0).is_err());
    }

    proptest! {
        #[test]
        fn any_frame_is_handled_without_panic(f in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut r = Responder::new(ME, IP);
            let _ = r.handle(&f);
        }

        #[test]
        fn mutated_pings_are_handled_without_panic(i in 0usize..60, b in any::<u8>()) {
            let mut req = Vec::new();
            PacketBuilder::ethernet2(PEER, ME)
                .ipv4(PEER_IP.octets(), IP.octets(), 64)
                .icmpv4_echo_request(1, 1)
                .write(&mut req, b"0123456789")
                .unwrap();
            let i = i % req.len();
            req[i] = b;
            let _ = Responder::new(ME, IP).handle(&req);
        }
    }
}
