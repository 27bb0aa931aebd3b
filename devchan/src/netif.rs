//! Network device messages (`xen/include/public/io/netif.h`).
//!
//! # Wire layout
//!
//! Two rings per queue, each one page of 256 entries. The transmit ring (guest → backend)
//! has 12-byte slots, the receive ring (backend → guest) 8-byte slots:
//!
//! | message | bytes |
//! |---|---|
//! | `netif_tx_request` | `gref` 0 (4), `offset` 4, `flags` 6 (`NETTXF_*`), `id` 8, `size` 10 |
//! | `netif_tx_response` | `id` 0, `status` 2 (`NETIF_RSP_*`) |
//! | `netif_rx_request` | `id` 0, `pad` 2, `gref` 4 |
//! | `netif_rx_response` | `id` 0, `offset` 2, `flags` 4 (`NETRXF_*`), `status` 6 (size, or `NETIF_RSP_*` if < 0) |
//! | `netif_extra_info` | `type` 0, `flags` 1 (`XEN_NETIF_EXTRA_FLAG_MORE`), `u` 2..8 |
//!
//! `u` of an extra-info slot is, by `type`: GSO (`size` 2, `type` 4, `pad` 5, `features` 6),
//! multicast add/delete (`addr[6]` 2), or hash (`type` 2, `algorithm` 3, `value[4]` 4).
//!
//! # Transmit packets
//!
//! A packet takes several consecutive slots:
//!
//! ```text
//! first request          flags NETTXF_*; size = the whole packet's length
//! [extra info]...        if the first has NETTXF_extra_info; chained by XEN_NETIF_EXTRA_FLAG_MORE
//! [further request]...   while the previous request has NETTXF_more_data; size = its fragment
//! ```
//!
//! The first fragment's own length is the total minus the other fragments. Each slot gets one
//! response in the same order: data slots with their `id` and status, extra slots with
//! `NETIF_RSP_NULL` ([`TxPacket::responses`]). [`read_tx_packet`] copies one packet out of the
//! ring and validates it the way Linux netback does: bounded slot count, fragment sizes within
//! the total and within the page, known flags, well-formed extras; a malformed chain is an
//! error for which the channel should be marked failed.
//!
//! # Receive
//!
//! The guest posts buffers (`netif_rx_request`); the backend answers in the same slot order,
//! with `status` the received length. Extra-info slots overlay responses, and since they carry
//! no id, a backend must keep responses in request order on this ring.
//!
//! # XenStore keys (frontend directory)
//!
//! `tx-ring-ref`, `rx-ring-ref`, `event-channel` (or `event-channel-tx`/`-rx` with
//! `feature-split-event-channels`), `request-rx-copy` = 1, `feature-rx-notify` = 1, per queue
//! under `queue-N/` with `multi-queue-num-queues`.

use bitflags::bitflags;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::grant::{GrantRef, PAGE_SIZE};
use crate::ring::{BackRing, FrontRing, RingError};

mod packet;
pub use packet::{read_tx_packet, RxResponse, TxFragment, TxPacket};

/// Slots a backend must accept per packet without negotiation (`XEN_NETIF_NR_SLOTS_MIN`).
pub const XEN_NETIF_NR_SLOTS_MIN: usize = 18;
/// Linux netback's limit on data slots per transmit packet (`XEN_NETBK_LEGACY_SLOTS_MAX`).
pub const XEN_NETBK_LEGACY_SLOTS_MAX: usize = XEN_NETIF_NR_SLOTS_MIN;
/// Largest transmit packet (`XEN_NETIF_MAX_TX_SIZE`).
pub const XEN_NETIF_MAX_TX_SIZE: usize = 0xFFFF;

/// Transmit flag: checksum left blank for offload (`NETTXF_csum_blank`).
pub const NETTXF_CSUM_BLANK: u16 = 1 << 0;
/// Transmit flag: checksum already validated (`NETTXF_data_validated`).
pub const NETTXF_DATA_VALIDATED: u16 = 1 << 1;
/// Transmit flag: the packet continues in the next request (`NETTXF_more_data`).
pub const NETTXF_MORE_DATA: u16 = 1 << 2;
/// Transmit flag: extra-info slots follow (`NETTXF_extra_info`).
pub const NETTXF_EXTRA_INFO: u16 = 1 << 3;

/// Receive flag: checksum validated (`NETRXF_data_validated`).
pub const NETRXF_DATA_VALIDATED: u16 = 1 << 0;
/// Receive flag: checksum left blank (`NETRXF_csum_blank`).
pub const NETRXF_CSUM_BLANK: u16 = 1 << 1;
/// Receive flag: the packet continues in the next response (`NETRXF_more_data`).
pub const NETRXF_MORE_DATA: u16 = 1 << 2;
/// Receive flag: extra-info slots follow (`NETRXF_extra_info`).
pub const NETRXF_EXTRA_INFO: u16 = 1 << 3;
/// Receive flag: GSO prefix, deprecated (`NETRXF_gso_prefix`).
pub const NETRXF_GSO_PREFIX: u16 = 1 << 4;

/// Extra-info type 0: never valid (`XEN_NETIF_EXTRA_TYPE_NONE`).
pub const XEN_NETIF_EXTRA_TYPE_NONE: u8 = 0;
/// GSO parameters (`XEN_NETIF_EXTRA_TYPE_GSO`).
pub const XEN_NETIF_EXTRA_TYPE_GSO: u8 = 1;
/// Add a multicast address to the filter (`XEN_NETIF_EXTRA_TYPE_MCAST_ADD`).
pub const XEN_NETIF_EXTRA_TYPE_MCAST_ADD: u8 = 2;
/// Remove a multicast address from the filter (`XEN_NETIF_EXTRA_TYPE_MCAST_DEL`).
pub const XEN_NETIF_EXTRA_TYPE_MCAST_DEL: u8 = 3;
/// Packet hash (`XEN_NETIF_EXTRA_TYPE_HASH`).
pub const XEN_NETIF_EXTRA_TYPE_HASH: u8 = 4;
/// One past the last type (`XEN_NETIF_EXTRA_TYPE_MAX`).
pub const XEN_NETIF_EXTRA_TYPE_MAX: u8 = 5;
/// Extra-info flag: another extra-info slot follows (`XEN_NETIF_EXTRA_FLAG_MORE`).
pub const XEN_NETIF_EXTRA_FLAG_MORE: u8 = 1 << 0;

/// No GSO (`XEN_NETIF_GSO_TYPE_NONE`); not valid in a GSO extra.
pub const XEN_NETIF_GSO_TYPE_NONE: u8 = 0;
/// TCP over IPv4 (`XEN_NETIF_GSO_TYPE_TCPV4`).
pub const XEN_NETIF_GSO_TYPE_TCPV4: u8 = 1;
/// TCP over IPv6 (`XEN_NETIF_GSO_TYPE_TCPV6`).
pub const XEN_NETIF_GSO_TYPE_TCPV6: u8 = 2;

/// Hash type bit numbers (`_XEN_NETIF_CTRL_HASH_TYPE_*`), the `type` of a hash extra.
pub mod hash_type {
    /// IPv4 addresses.
    pub const IPV4: u8 = 0;
    /// IPv4 addresses and TCP ports.
    pub const IPV4_TCP: u8 = 1;
    /// IPv6 addresses.
    pub const IPV6: u8 = 2;
    /// IPv6 addresses and TCP ports.
    pub const IPV6_TCP: u8 = 3;
    /// No algorithm (`XEN_NETIF_CTRL_HASH_ALGORITHM_NONE`).
    pub const ALGORITHM_NONE: u8 = 0;
    /// Toeplitz (`XEN_NETIF_CTRL_HASH_ALGORITHM_TOEPLITZ`).
    pub const ALGORITHM_TOEPLITZ: u8 = 1;
}

/// The packet was dropped (`NETIF_RSP_DROPPED`).
pub const NETIF_RSP_DROPPED: i16 = -2;
/// The packet could not be sent or received (`NETIF_RSP_ERROR`).
pub const NETIF_RSP_ERROR: i16 = -1;
/// Success (`NETIF_RSP_OKAY`).
pub const NETIF_RSP_OKAY: i16 = 0;
/// The response to an extra-info slot (`NETIF_RSP_NULL`).
pub const NETIF_RSP_NULL: i16 = 1;

/// A transmit request slot, exactly `struct netif_tx_request` (12 bytes).
#[repr(C)]
#[derive(
    FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub struct NetifTxRequest {
    /// Grant of the page holding the data.
    pub gref: GrantRef,
    /// Offset of the data in the page.
    pub offset: u16,
    /// `NETTXF_*`.
    pub flags: u16,
    /// Echoed in the response.
    pub id: u16,
    /// First slot: the packet's length; others: the fragment's.
    pub size: u16,
}

/// A transmit response slot, exactly `struct netif_tx_response` (4 bytes).
#[repr(C)]
#[derive(
    FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub struct NetifTxResponse {
    /// The request's `id`.
    pub id: u16,
    /// `NETIF_RSP_*`.
    pub status: i16,
}

/// A receive request slot (a posted buffer), exactly `struct netif_rx_request` (8 bytes).
#[repr(C)]
#[derive(
    FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub struct NetifRxRequest {
    /// Echoed in the response.
    pub id: u16,
    /// Padding; zero.
    pub pad: u16,
    /// Grant of the buffer page.
    pub gref: GrantRef,
}

/// A receive response slot, exactly `struct netif_rx_response` (8 bytes).
#[repr(C)]
#[derive(
    FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub struct NetifRxResponse {
    /// The request's `id`.
    pub id: u16,
    /// Offset of the data in the page.
    pub offset: u16,
    /// `NETRXF_*`.
    pub flags: u16,
    /// Length received, or a negative `NETIF_RSP_*`.
    pub status: i16,
}

/// An extra-info slot, exactly `struct netif_extra_info` (8 bytes), overlaid on a transmit
/// request or receive response. `u` is kept as bytes; [`ExtraInfo`] decodes it.
#[repr(C, align(2))]
#[derive(
    FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub struct NetifExtraInfo {
    /// `XEN_NETIF_EXTRA_TYPE_*` (C field `type`).
    pub type_: u8,
    /// `XEN_NETIF_EXTRA_FLAG_*`.
    pub flags: u8,
    /// The type-specific union.
    pub u: [u8; 6],
}

const _: () = assert!(core::mem::size_of::<NetifTxRequest>() == 12);
const _: () = assert!(core::mem::size_of::<NetifTxResponse>() == 4);
const _: () = assert!(core::mem::size_of::<NetifRxRequest>() == 8);
const _: () = assert!(core::mem::size_of::<NetifRxResponse>() == 8);
const _: () = assert!(core::mem::size_of::<NetifExtraInfo>() == 8);

/// Offsets within `u` of the union members (checked against the header).
mod u_off {
    pub const GSO_SIZE: usize = 0;
    pub const GSO_TYPE: usize = 2;
    pub const GSO_PAD: usize = 3;
    pub const GSO_FEATURES: usize = 4;
    pub const MCAST_ADDR: usize = 0;
    pub const HASH_TYPE: usize = 0;
    pub const HASH_ALGORITHM: usize = 1;
    pub const HASH_VALUE: usize = 2;
}

/// The frontend's end of a transmit ring.
pub type NetifTxFrontRing = FrontRing<NetifTxRequest, NetifTxResponse>;
/// The backend's end of a transmit ring.
pub type NetifTxBackRing = BackRing<NetifTxRequest, NetifTxResponse>;
/// The frontend's end of a receive ring.
pub type NetifRxFrontRing = FrontRing<NetifRxRequest, NetifRxResponse>;
/// The backend's end of a receive ring.
pub type NetifRxBackRing = BackRing<NetifRxRequest, NetifRxResponse>;
/// Entries in a transmit ring (`__CONST_RING_SIZE(netif_tx, 4096)`).
pub const NET_TX_RING_SIZE: u32 = crate::ring::page_ring_size::<NetifTxRequest, NetifTxResponse>();
/// Entries in a receive ring (`__CONST_RING_SIZE(netif_rx, 4096)`).
pub const NET_RX_RING_SIZE: u32 = crate::ring::page_ring_size::<NetifRxRequest, NetifRxResponse>();

bitflags! {
    /// Checked `NETTXF_*` flags of a transmit request.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct TxFlags: u16 {
        /// `NETTXF_csum_blank`.
        const CSUM_BLANK = NETTXF_CSUM_BLANK;
        /// `NETTXF_data_validated`.
        const DATA_VALIDATED = NETTXF_DATA_VALIDATED;
        /// `NETTXF_more_data`.
        const MORE_DATA = NETTXF_MORE_DATA;
        /// `NETTXF_extra_info`.
        const EXTRA_INFO = NETTXF_EXTRA_INFO;
    }
}

bitflags! {
    /// Checked `NETRXF_*` flags of a receive response.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct RxFlags: u16 {
        /// `NETRXF_data_validated`.
        const DATA_VALIDATED = NETRXF_DATA_VALIDATED;
        /// `NETRXF_csum_blank`.
        const CSUM_BLANK = NETRXF_CSUM_BLANK;
        /// `NETRXF_more_data`.
        const MORE_DATA = NETRXF_MORE_DATA;
        /// `NETRXF_extra_info`.
        const EXTRA_INFO = NETRXF_EXTRA_INFO;
        /// `NETRXF_gso_prefix`.
        const GSO_PREFIX = NETRXF_GSO_PREFIX;
    }
}

impl TryFrom<u16> for TxFlags {
    type Error = NetifError;
    fn try_from(v: u16) -> Result<Self, NetifError> {
        Self::from_bits(v).ok_or(NetifError::BadTxFlags(v))
    }
}

impl TryFrom<u16> for RxFlags {
    type Error = NetifError;
    fn try_from(v: u16) -> Result<Self, NetifError> {
        Self::from_bits(v).ok_or(NetifError::BadRxFlags(v))
    }
}

/// Why a message from the peer was rejected.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum NetifError {
    /// Reading the ring failed.
    #[error("Ring access failed")]
    Ring(#[source] RingError),
    /// Unknown transmit flag bits.
    #[error("Unknown transmit flags {0:#x}")]
    BadTxFlags(u16),
    /// Unknown receive flag bits.
    #[error("Unknown receive flags {0:#x}")]
    BadRxFlags(u16),
    /// Extra-info type 0 or unknown.
    #[error("Unknown extra-info type {0}")]
    BadExtraType(u8),
    /// Unknown extra-info flag bits.
    #[error("Unknown extra-info flags {0:#x}")]
    BadExtraFlags(u8),
    /// The same extra-info type twice in one packet.
    #[error("Extra info of type {0:?} given twice")]
    DuplicateExtra(ExtraType),
    /// A GSO extra with size 0 or an unknown GSO type.
    #[error("Bad GSO extra: size {size}, type {gso_type}")]
    BadGso {
        /// Segment size.
        size: u16,
        /// GSO type.
        gso_type: u8,
    },
    /// More data slots than allowed.
    #[error("Packet needs more than {max} slots")]
    TooManySlots {
        /// The limit.
        max: usize,
    },
    /// The chain announces another slot that was not published with it.
    #[error("Packet ends after {slots} slots but announces more")]
    Truncated {
        /// Slots read.
        slots: usize,
    },
    /// A fragment larger than what is left of the packet's total size.
    #[error("Fragment {index} of {size} bytes exceeds the {remaining} bytes left of the packet")]
    FragmentTooLarge {
        /// Fragment number (0 = first).
        index: usize,
        /// Its size.
        size: u16,
        /// Bytes of the total left for it.
        remaining: u16,
    },
    /// A fragment that runs past the end of its page.
    #[error("Fragment {index} at offset {offset} with {size} bytes crosses its page")]
    CrossesPage {
        /// Fragment number.
        index: usize,
        /// Offset in the page.
        offset: u16,
        /// Size.
        size: u16,
    },
    /// `NETTXF_extra_info` on a fragment other than the first.
    #[error("Fragment {0} asks for extra info, which only the first may")]
    ExtraOnLaterFragment(usize),
    /// A status that is not `NETIF_RSP_*`.
    #[error("Unknown response status {0}")]
    BadStatus(i16),
}

impl From<RingError> for NetifError {
    fn from(e: RingError) -> Self {
        Self::Ring(e)
    }
}

/// A response status (`NETIF_RSP_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetifStatus {
    /// `NETIF_RSP_DROPPED`.
    Dropped,
    /// `NETIF_RSP_ERROR`.
    Error,
    /// `NETIF_RSP_OKAY`.
    Okay,
    /// `NETIF_RSP_NULL`: the answer to an extra-info slot.
    Null,
}

impl From<NetifStatus> for i16 {
    fn from(s: NetifStatus) -> i16 {
        match s {
            NetifStatus::Dropped => NETIF_RSP_DROPPED,
            NetifStatus::Error => NETIF_RSP_ERROR,
            NetifStatus::Okay => NETIF_RSP_OKAY,
            NetifStatus::Null => NETIF_RSP_NULL,
        }
    }
}

impl TryFrom<i16> for NetifStatus {
    type Error = NetifError;
    fn try_from(v: i16) -> Result<Self, NetifError> {
        match v {
            NETIF_RSP_DROPPED => Ok(Self::Dropped),
            NETIF_RSP_ERROR => Ok(Self::Error),
            NETIF_RSP_OKAY => Ok(Self::Okay),
            NETIF_RSP_NULL => Ok(Self::Null),
            other => Err(NetifError::BadStatus(other)),
        }
    }
}

/// The kind of an extra-info slot (`XEN_NETIF_EXTRA_TYPE_*` other than NONE).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtraType {
    /// `XEN_NETIF_EXTRA_TYPE_GSO`.
    Gso,
    /// `XEN_NETIF_EXTRA_TYPE_MCAST_ADD`.
    McastAdd,
    /// `XEN_NETIF_EXTRA_TYPE_MCAST_DEL`.
    McastDel,
    /// `XEN_NETIF_EXTRA_TYPE_HASH`.
    Hash,
}

impl TryFrom<u8> for ExtraType {
    type Error = NetifError;
    fn try_from(v: u8) -> Result<Self, NetifError> {
        match v {
            XEN_NETIF_EXTRA_TYPE_GSO => Ok(Self::Gso),
            XEN_NETIF_EXTRA_TYPE_MCAST_ADD => Ok(Self::McastAdd),
            XEN_NETIF_EXTRA_TYPE_MCAST_DEL => Ok(Self::McastDel),
            XEN_NETIF_EXTRA_TYPE_HASH => Ok(Self::Hash),
            other => Err(NetifError::BadExtraType(other)),
        }
    }
}

impl From<ExtraType> for u8 {
    fn from(t: ExtraType) -> u8 {
        match t {
            ExtraType::Gso => XEN_NETIF_EXTRA_TYPE_GSO,
            ExtraType::McastAdd => XEN_NETIF_EXTRA_TYPE_MCAST_ADD,
            ExtraType::McastDel => XEN_NETIF_EXTRA_TYPE_MCAST_DEL,
            ExtraType::Hash => XEN_NETIF_EXTRA_TYPE_HASH,
        }
    }
}

/// The protocol of a GSO packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GsoType {
    /// `XEN_NETIF_GSO_TYPE_TCPV4`.
    TcpV4,
    /// `XEN_NETIF_GSO_TYPE_TCPV6`.
    TcpV6,
}

/// A decoded extra-info slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtraInfo {
    /// Segmentation offload parameters.
    Gso {
        /// Payload bytes per segment (the MSS); never 0.
        size: u16,
        /// Protocol.
        gso_type: GsoType,
        /// `XEN_NETIF_GSO_FEAT_*` bits (none defined today), passed through.
        features: u16,
    },
    /// Add a multicast MAC address to the receive filter.
    McastAdd([u8; 6]),
    /// Remove a multicast MAC address from the receive filter.
    McastDel([u8; 6]),
    /// The packet's hash.
    Hash {
        /// `hash_type::IPV4` etc.
        hash_type: u8,
        /// `hash_type::ALGORITHM_*`.
        algorithm: u8,
        /// The hash value.
        value: u32,
    },
}

impl ExtraInfo {
    /// Decode an extra-info slot; the flag says whether another extra-info slot follows.
    pub fn decode(raw: &NetifExtraInfo) -> Result<(Self, bool), NetifError> {
        if raw.flags & !XEN_NETIF_EXTRA_FLAG_MORE != 0 {
            return Err(NetifError::BadExtraFlags(raw.flags));
        }
        let u = &raw.u;
        let u16_at = |o: usize| u16::from_ne_bytes([u[o], u[o + 1]]);
        let mac = || {
            let mut a = [0u8; 6];
            a.copy_from_slice(&u[u_off::MCAST_ADDR..u_off::MCAST_ADDR + 6]);
            a
        };
        let info = match ExtraType::try_from(raw.type_)? {
            ExtraType::Gso => {
                let size = u16_at(u_off::GSO_SIZE);
                let gso_type = match u[u_off::GSO_TYPE] {
                    XEN_NETIF_GSO_TYPE_TCPV4 if size != 0 => GsoType::TcpV4,
                    XEN_NETIF_GSO_TYPE_TCPV6 if size != 0 => GsoType::TcpV6,
                    t => return Err(NetifError::BadGso { size, gso_type: t }),
                };
                Self::Gso {
                    size,
                    gso_type,
                    features: u16_at(u_off::GSO_FEATURES),
                }
            }
            ExtraType::McastAdd => Self::McastAdd(mac()),
            ExtraType::McastDel => Self::McastDel(mac()),
            ExtraType::Hash => {
                let mut value = [0u8; 4];
                value.copy_from_slice(&u[u_off::HASH_VALUE..u_off::HASH_VALUE + 4]);
                Self::Hash {
                    hash_type: u[u_off::HASH_TYPE],
                    algorithm: u[u_off::HASH_ALGORITHM],
                    value: u32::from_ne_bytes(value),
                }
            }
        };
        Ok((info, raw.flags & XEN_NETIF_EXTRA_FLAG_MORE != 0))
    }

    /// Decode the extra-info slot overlaid on a transmit request or receive response.
    pub fn decode_slot<T: IntoBytes + Immutable>(slot: &T) -> Result<(Self, bool), NetifError> {
        // Every slot type is at least 8 bytes; a shorter one reads as type 0 (invalid).
        let raw = NetifExtraInfo::read_from_prefix(slot.as_bytes())
            .map(|(r, _)| r)
            .unwrap_or_default();
        Self::decode(&raw)
    }

    /// Which kind of extra this is.
    pub fn kind(&self) -> ExtraType {
        match self {
            Self::Gso { .. } => ExtraType::Gso,
            Self::McastAdd(_) => ExtraType::McastAdd,
            Self::McastDel(_) => ExtraType::McastDel,
            Self::Hash { .. } => ExtraType::Hash,
        }
    }

    /// The wire slot; `more` sets `XEN_NETIF_EXTRA_FLAG_MORE`.
    pub fn encode(&self, more: bool) -> NetifExtraInfo {
        let mut u = [0u8; 6];
        match *self {
            Self::Gso {
                size,
                gso_type,
                features,
            } => {
                u[u_off::GSO_SIZE..u_off::GSO_SIZE + 2].copy_from_slice(&size.to_ne_bytes());
                u[u_off::GSO_TYPE] = match gso_type {
                    GsoType::TcpV4 => XEN_NETIF_GSO_TYPE_TCPV4,
                    GsoType::TcpV6 => XEN_NETIF_GSO_TYPE_TCPV6,
                };
                u[u_off::GSO_PAD] = 0;
                u[u_off::GSO_FEATURES..u_off::GSO_FEATURES + 2]
                    .copy_from_slice(&features.to_ne_bytes());
            }
            Self::McastAdd(a) | Self::McastDel(a) => {
                u[u_off::MCAST_ADDR..u_off::MCAST_ADDR + 6].copy_from_slice(&a);
            }
            Self::Hash {
                hash_type,
                algorithm,
                value,
            } => {
                u[u_off::HASH_TYPE] = hash_type;
                u[u_off::HASH_ALGORITHM] = algorithm;
                u[u_off::HASH_VALUE..u_off::HASH_VALUE + 4].copy_from_slice(&value.to_ne_bytes());
            }
        }
        NetifExtraInfo {
            type_: self.kind().into(),
            flags: if more { XEN_NETIF_EXTRA_FLAG_MORE } else { 0 },
            u,
        }
    }

    /// The slot as a transmit request (the last 4 bytes zero).
    pub fn to_tx_slot(&self, more: bool) -> NetifTxRequest {
        let mut slot = NetifTxRequest::default();
        slot.as_mut_bytes()[..8].copy_from_slice(self.encode(more).as_bytes());
        slot
    }

    /// The slot as a receive response.
    pub fn to_rx_slot(&self, more: bool) -> NetifRxResponse {
        let mut slot = NetifRxResponse::default();
        slot.as_mut_bytes()
            .copy_from_slice(self.encode(more).as_bytes());
        slot
    }
}

/// What this module claims about Xen's `io/netif.h`.
pub fn abi_checks() -> Vec<crate::abi::AbiCheck> {
    use crate::abi::AbiCheck;
    let mut v = crate::abi_layout!(
        "struct netif_tx_request",
        NetifTxRequest {
            gref,
            offset,
            flags,
            id,
            size
        }
    );
    v.extend(crate::abi_layout!(
        "struct netif_tx_response",
        NetifTxResponse { id, status }
    ));
    v.extend(crate::abi_layout!(
        "struct netif_rx_request",
        NetifRxRequest { id, pad, gref }
    ));
    v.extend(crate::abi_layout!(
        "struct netif_rx_response",
        NetifRxResponse {
            id,
            offset,
            flags,
            status
        }
    ));
    let x = "struct netif_extra_info";
    v.extend(crate::abi_layout!(x, NetifExtraInfo { flags, u }));
    v.push(AbiCheck::new(
        format!("offsetof({x}, type)"),
        core::mem::offset_of!(NetifExtraInfo, type_),
    ));
    v.push(AbiCheck::new(
        format!("_Alignof({x})"),
        core::mem::align_of::<NetifExtraInfo>(),
    ));
    let u = core::mem::offset_of!(NetifExtraInfo, u);
    for (member, off) in [
        ("u.gso.size", u_off::GSO_SIZE),
        ("u.gso.type", u_off::GSO_TYPE),
        ("u.gso.pad", u_off::GSO_PAD),
        ("u.gso.features", u_off::GSO_FEATURES),
        ("u.mcast.addr", u_off::MCAST_ADDR),
        ("u.hash.type", u_off::HASH_TYPE),
        ("u.hash.algorithm", u_off::HASH_ALGORITHM),
        ("u.hash.value", u_off::HASH_VALUE),
    ] {
        v.push(AbiCheck::new(format!("offsetof({x}, {member})"), u + off));
    }
    for (ring, entry, size) in [
        (
            "netif_tx",
            crate::ring::entry_size::<NetifTxRequest, NetifTxResponse>(),
            NET_TX_RING_SIZE,
        ),
        (
            "netif_rx",
            crate::ring::entry_size::<NetifRxRequest, NetifRxResponse>(),
            NET_RX_RING_SIZE,
        ),
    ] {
        v.push(AbiCheck::new(
            format!("sizeof(union {ring}_sring_entry)"),
            entry,
        ));
        v.push(AbiCheck::new(
            format!("sizeof(struct {ring}_sring)"),
            crate::ring::RING_HEADER_SIZE + entry,
        ));
        v.push(AbiCheck::new(
            format!("__CONST_RING_SIZE({ring}, 4096)"),
            size,
        ));
    }
    for (name, ours) in [
        ("NETTXF_csum_blank", NETTXF_CSUM_BLANK),
        ("NETTXF_data_validated", NETTXF_DATA_VALIDATED),
        ("NETTXF_more_data", NETTXF_MORE_DATA),
        ("NETTXF_extra_info", NETTXF_EXTRA_INFO),
        ("NETRXF_data_validated", NETRXF_DATA_VALIDATED),
        ("NETRXF_csum_blank", NETRXF_CSUM_BLANK),
        ("NETRXF_more_data", NETRXF_MORE_DATA),
        ("NETRXF_extra_info", NETRXF_EXTRA_INFO),
        ("NETRXF_gso_prefix", NETRXF_GSO_PREFIX),
    ] {
        v.push(AbiCheck::new(name, ours));
    }
    for (name, ours) in [
        ("XEN_NETIF_EXTRA_TYPE_NONE", XEN_NETIF_EXTRA_TYPE_NONE),
        ("XEN_NETIF_EXTRA_TYPE_GSO", XEN_NETIF_EXTRA_TYPE_GSO),
        (
            "XEN_NETIF_EXTRA_TYPE_MCAST_ADD",
            XEN_NETIF_EXTRA_TYPE_MCAST_ADD,
        ),
        (
            "XEN_NETIF_EXTRA_TYPE_MCAST_DEL",
            XEN_NETIF_EXTRA_TYPE_MCAST_DEL,
        ),
        ("XEN_NETIF_EXTRA_TYPE_HASH", XEN_NETIF_EXTRA_TYPE_HASH),
        ("XEN_NETIF_EXTRA_TYPE_MAX", XEN_NETIF_EXTRA_TYPE_MAX),
        ("XEN_NETIF_EXTRA_FLAG_MORE", XEN_NETIF_EXTRA_FLAG_MORE),
        ("XEN_NETIF_GSO_TYPE_NONE", XEN_NETIF_GSO_TYPE_NONE),
        ("XEN_NETIF_GSO_TYPE_TCPV4", XEN_NETIF_GSO_TYPE_TCPV4),
        ("XEN_NETIF_GSO_TYPE_TCPV6", XEN_NETIF_GSO_TYPE_TCPV6),
        ("_XEN_NETIF_CTRL_HASH_TYPE_IPV4", hash_type::IPV4),
        ("_XEN_NETIF_CTRL_HASH_TYPE_IPV4_TCP", hash_type::IPV4_TCP),
        ("_XEN_NETIF_CTRL_HASH_TYPE_IPV6", hash_type::IPV6),
        ("_XEN_NETIF_CTRL_HASH_TYPE_IPV6_TCP", hash_type::IPV6_TCP),
        (
            "XEN_NETIF_CTRL_HASH_ALGORITHM_NONE",
            hash_type::ALGORITHM_NONE,
        ),
        (
            "XEN_NETIF_CTRL_HASH_ALGORITHM_TOEPLITZ",
            hash_type::ALGORITHM_TOEPLITZ,
        ),
    ] {
        v.push(AbiCheck::new(name, ours));
    }
    for (name, ours) in [
        ("NETIF_RSP_DROPPED", NETIF_RSP_DROPPED),
        ("NETIF_RSP_ERROR", NETIF_RSP_ERROR),
        ("NETIF_RSP_OKAY", NETIF_RSP_OKAY),
        ("NETIF_RSP_NULL", NETIF_RSP_NULL),
    ] {
        v.push(AbiCheck::new(name, ours));
    }
    v.push(AbiCheck::new(
        "XEN_NETIF_NR_SLOTS_MIN",
        XEN_NETIF_NR_SLOTS_MIN,
    ));
    v.push(AbiCheck::new(
        "XEN_NETIF_MAX_TX_SIZE",
        XEN_NETIF_MAX_TX_SIZE,
    ));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    const GSO: ExtraInfo = ExtraInfo::Gso {
        size: 1448,
        gso_type: GsoType::TcpV4,
        features: 0,
    };

    #[test]
    fn extra_info_round_trip_and_checks() {
        for e in [
            GSO,
            ExtraInfo::Gso {
                size: 9000,
                gso_type: GsoType::TcpV6,
                features: 3,
            },
            ExtraInfo::McastAdd([1, 0, 0x5e, 0, 0, 1]),
            ExtraInfo::McastDel([1, 2, 3, 4, 5, 6]),
            ExtraInfo::Hash {
                hash_type: 3,
                algorithm: 1,
                value: 7,
            },
        ] {
            assert_eq!(ExtraInfo::decode(&e.encode(true)), Ok((e, true)));
            assert_eq!(ExtraInfo::decode_slot(&e.to_rx_slot(false)), Ok((e, false)));
        }
        let mut raw = GSO.encode(false);
        raw.flags = 2;
        assert_eq!(ExtraInfo::decode(&raw), Err(NetifError::BadExtraFlags(2)));
        raw.flags = 0;
        raw.u[u_off::GSO_TYPE] = XEN_NETIF_GSO_TYPE_NONE;
        assert_eq!(
            ExtraInfo::decode(&raw),
            Err(NetifError::BadGso {
                size: 1448,
                gso_type: 0
            })
        );
        let zero = ExtraInfo::Gso {
            size: 0,
            gso_type: GsoType::TcpV4,
            features: 0,
        }
        .encode(false);
        assert!(ExtraInfo::decode(&zero).is_err());
        // GSO size is at byte 2 of the slot, type at 4 (netif.h's diagram).
        assert_eq!(
            &GSO.encode(false).as_bytes()[..6],
            &[1, 0, 0xa8, 0x05, 1, 0]
        );
    }
}
