//! netback: Xen's `netif` protocol served over device channels, onto a [`NetDevice`].
//!
//! # Per channel (one guest interface)
//!
//! A transmit ring (`tx-ring-ref`), a receive ring (`rx-ring-ref`) and one event channel
//! (`event-channel`), as Linux netfront sets them up. Both ring pages are mapped through the
//! guest's grants and our port is bound to its port. Everything the guest writes is copied
//! out of the ring before use and validated (`devchan::netif::read_tx_packet`); nothing a
//! frontend writes can panic the backend. A ring whose indexes are impossible
//! (`RingError::Overflow`) marks the channel failed: it is no longer touched and
//! [`Netback::failed`] reports it.
//!
//! # Transmit (guest → wire), in `netback/tx.rs`
//!
//! A packet of up to `XEN_NETBK_LEGACY_SLOTS_MAX` data slots is read whole. Its first
//! [`HEADER_COPY`] bytes are grant-copied into a header buffer of our own memory, checked
//! against the channel's [`SpoofPolicy`], and *that copy* is what the device sends, followed
//! by the rest of the packet straight from the guest's pages (each fragment's grant pinned
//! for the device, `Platform::pin_grant`): the guest cannot change the checked header
//! afterwards, and netback never maps guest data. On the device's `TxDone` the pins are
//! dropped and each slot answered. A packet with `NETTXF_csum_blank` (Linux netfront's
//! checksum offload) gets its TCP/UDP checksum completed into the header copy first
//! ([`crate::csum`]).
//!
//! Responses: `NETIF_RSP_OKAY` when the device sent it; `NETIF_RSP_DROPPED` for a packet
//! refused by the anti-spoofing policy (counted in `spoof`; the guest learns it was not sent,
//! and a Linux frontend just frees it); `NETIF_RSP_ERROR` for a malformed chain (bad flags,
//! sizes, too many slots; every consumed slot of it answered), a runt or oversized frame, a
//! grant we cannot copy or pin, a blank checksum we cannot complete, or a device error. Extra-info slots get `NETIF_RSP_NULL`.
//!
//! Local switching (guests of one IDD talk to each other, as through the bridge Xen's dom0
//! puts netback's vifs on): the checked header says where the frame goes. A unicast frame
//! for another channel's MAC is copied (our header copy, then the guest's fragments by grant
//! copy) into a spare receive page and delivered to that channel like a frame from the wire;
//! it never reaches the wire. A group frame goes to every other channel that way *and* to
//! the wire. Any other frame goes to the wire only.
//!
//! Credit: each channel's [`Bucket`] ("x bytes every y µs", [`crate::credit`]). A packet over
//! its channel's credit is held at the head of the channel (not dropped; counted once in
//! `wait`) until its window ends; channels are visited round robin, up to `batch` packets each.
//!
//! # Receive (wire → guest), in `netback/rx.rs`
//!
//! A pool of our own pages is posted to the device. An arrived frame's Ethernet header is
//! read from our page (`Platform::read_local`) and the frame goes by destination MAC to its
//! channel, or to every channel for a group address ([`crate::filter::destination`]). For
//! each target channel a receive request is taken from its ring (none: the frame is dropped
//! for it and counted in `drop`), then either
//!
//! * *copy* (`request-rx-copy` = 1, Linux's mode): one grant copy from our page into the
//!   guest's buffer at offset 0;
//! * *exchange* (`request-rx-copy` = 0): our page is unpinned (the hypervisor refuses to
//!   transfer a page in use), given to the guest through its accept-transfer grant
//!   (`Platform::transfer`), and the frame that then holds the page we got in return is
//!   pinned again and goes back to the pool. For a group frame, every exchange target but
//!   the last gets a copy of the page made in a spare pool page.
//!
//! Responses go out in request order, collected per round and published once per channel
//! (notification hold-off: the event is sent only when the ring asks for it).
//!
//! # Restart
//!
//! [`Netback::attach`] opens the channel's [`crate::journal`]: if it belongs to the same
//! rings, the channel resumes where its predecessor stopped: transmits consumed and never
//! answered are sent again (perhaps twice, never skipped), receive requests consumed and
//! never answered are kept as posted buffers, and pins left behind are released
//! ([`release_previous`], before anything is pinned).

mod rx;
mod tx;

use crate::credit::{Bucket, Credit, RoundRobin};
use crate::device::{NetDevError, NetDevice, NetEvent, RxBuffer};
use crate::filter::{Mac, SpoofPolicy, HEADER_COPY};
use crate::journal::{self, ChannelId, Journal, JournalError, Opened};
use crate::pool::{self, OwnPage, PoolError, Record};
use devchan::grant::{DomId, GrantRef, PAGE_SIZE};
use devchan::netif::{
    NetifRxBackRing, NetifRxRequest, NetifRxResponse, NetifTxBackRing, NetifTxRequest,
    NetifTxResponse, TxPacket,
};
use devchan::platform::{Frame, Platform, PlatformError, Port, SharedPage};
use devchan::ring::{RingError, RingIdx};
use ipnet::IpNet;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One guest interface to serve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelConfig {
    /// The frontend's domain.
    pub guest: DomId,
    /// Its transmit ring grant (`tx-ring-ref`).
    pub tx_ring_ref: GrantRef,
    /// Its receive ring grant (`rx-ring-ref`).
    pub rx_ring_ref: GrantRef,
    /// Its event-channel port (`event-channel`).
    pub remote_port: Port,
    /// The guest's MAC: the only source it may send from, and where unicast frames go.
    pub mac: Mac,
    /// Receive by grant copy (`request-rx-copy` = 1) or by page exchange (0).
    pub rx_copy: bool,
    /// Transmit rate limit; `None`: unlimited.
    pub credit: Option<Credit>,
    /// Allowed source networks; empty: no IP check.
    pub nets: Vec<IpNet>,
    /// First of the [`journal::FRAMES`] frames of our memory holding its journal.
    pub journal_frame: Frame,
}

/// Backend-wide settings: which frames of our memory it uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendConfig {
    /// First of the [`pool::RECORD_FRAMES`] frames recording our self-grants and pins.
    pub record_frame: Frame,
    /// Frames for transmit header copies ([`HEADERS_PER_FRAME`] each).
    pub header_frames: Vec<Frame>,
    /// Frames of the receive pool (the device holds up to its capacity, the rest are spares).
    pub rx_frames: Vec<Frame>,
    /// Most packets taken from one channel per round.
    pub batch: usize,
}

/// Header buffers per frame.
pub const HEADERS_PER_FRAME: usize = PAGE_SIZE / HEADER_COPY;

/// Why a backend operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NetbackError {
    /// A platform operation (mapping a ring, binding the port, waiting) failed.
    #[error("Platform operation failed")]
    Platform(#[from] PlatformError),
    /// A ring could not be attached.
    #[error("Ring attach failed")]
    Ring(#[from] RingError),
    /// The journal could not be read or written.
    #[error("Journal access failed")]
    Journal(#[from] JournalError),
    /// Our own pages could not be set up.
    #[error("Buffer pool setup failed")]
    Pool(#[from] PoolError),
    /// The journal and a ring disagree on what is outstanding.
    #[error("Journal has {journal} unanswered {ring_name} requests, the ring {ring}")]
    JournalMismatch {
        /// Which ring.
        ring_name: &'static str,
        /// Requests in the journal.
        journal: usize,
        /// `req_cons - rsp_prod` on the ring.
        ring: u32,
    },
    /// Two channels with one MAC: receive demultiplexing would be ambiguous.
    #[error("MAC {0} is already served")]
    DuplicateMac(Mac),
    /// No header frames or receive frames configured.
    #[error("Backend needs header and receive frames")]
    NoFrames,
    /// The device failed as a whole.
    #[error("Device failed")]
    Device(#[from] NetDevError),
}

/// Counters of one channel (the heartbeat's `tx=..,txb=..,...`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChannelStats {
    /// Packets the guest sent that went out (device said done).
    pub tx: u64,
    /// Their bytes.
    pub txb: u64,
    /// Packets delivered to the guest.
    pub rx: u64,
    /// Their bytes.
    pub rxb: u64,
    /// Frames for the guest dropped for want of a posted buffer.
    pub drop: u64,
    /// Packets from the guest dropped as spoofed.
    pub spoof: u64,
    /// Times a packet waited for credit.
    pub wait: u64,
    /// Packets answered with an error (malformed, bad grant, device error).
    pub errors: u64,
    /// Transmit slots replayed from the journal.
    pub replayed: u64,
}

/// A transmit taken from the ring and not yet at the device.
struct Pending {
    /// Ring index of each slot, in slot order.
    idxs: Vec<RingIdx>,
    packet: TxPacket,
    /// Header buffer and copied length, once copied and checked.
    hdr: Option<(usize, usize)>,
    /// Where it goes, once the header is checked: other channels (local switching), and
    /// whether to the wire too.
    local: Vec<usize>,
    wire: bool,
    /// Counted in `wait` already.
    waited: bool,
}

struct Channel<P: Platform> {
    cfg: ChannelConfig,
    // Declared before the mappings: the rings point into them and must go first.
    tx: NetifTxBackRing,
    rx: NetifRxBackRing,
    _tx_map: P::Mapping,
    _rx_map: P::Mapping,
    port: Port,
    journal: Journal,
    policy: SpoofPolicy,
    bucket: Bucket,
    /// Raw slots from the journal to send again, oldest first.
    replay: VecDeque<(RingIdx, NetifTxRequest)>,
    head: Option<Pending>,
    /// Receive requests consumed by an earlier process and never answered.
    rx_held: VecDeque<(RingIdx, NetifRxRequest)>,
    tx_rsps: Vec<(RingIdx, NetifTxResponse)>,
    rx_rsps: Vec<NetifRxResponse>,
    failed: Option<RingError>,
    stats: ChannelStats,
}

/// A transmit at the device.
struct InFlight {
    chan: usize,
    idxs: Vec<RingIdx>,
    packet: TxPacket,
    hdr: usize,
    /// (ring index, IOVA) of each pinned fragment.
    pins: Vec<(RingIdx, u64)>,
}

/// The network backend: channels, a buffer pool and a device.
pub struct Netback<P: Platform, D: NetDevice> {
    platform: Arc<P>,
    device: D,
    batch: usize,
    channels: Vec<Channel<P>>,
    rr: RoundRobin,
    record: Record,
    headers: Vec<OwnPage>,
    free_headers: Vec<usize>,
    /// Receive pool pages (record entry `headers.len() + i`).
    rx_pages: Vec<OwnPage>,
    rx_by_frame: HashMap<Frame, usize>,
    free_rx: Vec<usize>,
    /// Which receive pages the device holds (a page it returns twice is ignored).
    at_device: Vec<bool>,
    in_flight: BTreeMap<u64, InFlight>,
    next_token: u64,
    events: Vec<NetEvent>,
    epoch: Instant,
    /// Frames from the wire for no channel, or malformed.
    unclaimed: u64,
}

/// Release what an earlier process of this domain left pinned and granted: the pins in
/// each channel journal and the pool's record. Call it first, before the device driver or
/// anything else pins (IOVAs are recycled).
pub fn release_previous<P: Platform>(
    p: &P,
    record_frame: Frame,
    journal_frames: impl IntoIterator<Item = Frame>,
) -> Result<usize, NetbackError> {
    let mut n = pool::release_previous(p, record_frame)?;
    for f in journal_frames {
        n += journal::release_stale_pins(p, f)?;
    }
    Ok(n)
}

impl<P: Platform, D: NetDevice> Netback<P, D> {
    /// A backend with no channels yet: pins its header and receive pages and posts receive
    /// buffers to the device. Call [`release_previous`] before (and before the device driver
    /// pinned anything) when this may be a restarted process.
    pub fn new(platform: Arc<P>, device: D, cfg: BackendConfig) -> Result<Self, NetbackError> {
        if cfg.header_frames.is_empty() || cfg.rx_frames.is_empty() {
            return Err(NetbackError::NoFrames);
        }
        let p = &*platform;
        let record = Record::new(p, cfg.record_frame)?;
        let mut headers = Vec::with_capacity(cfg.header_frames.len());
        for (k, &f) in cfg.header_frames.iter().enumerate() {
            headers.push(record.pin_own(p, k, f)?);
        }
        let mut rx_pages = Vec::with_capacity(cfg.rx_frames.len());
        for (i, &f) in cfg.rx_frames.iter().enumerate() {
            rx_pages.push(record.pin_own(p, headers.len() + i, f)?);
        }
        let nh = headers.len() * HEADERS_PER_FRAME;
        let mut nb = Self {
            platform,
            device,
            batch: cfg.batch.max(1),
            channels: Vec::new(),
            rr: RoundRobin::default(),
            record,
            headers,
            free_headers: (0..nh).rev().collect(),
            rx_by_frame: rx_pages
                .iter()
                .enumerate()
                .map(|(i, pg)| (pg.frame, i))
                .collect(),
            free_rx: (0..rx_pages.len()).rev().collect(),
            at_device: vec![false; rx_pages.len()],
            rx_pages,
            in_flight: BTreeMap::new(),
            next_token: 1,
            events: Vec::new(),
            epoch: Instant::now(),
            unclaimed: 0,
        };
        nb.refill()?;
        Ok(nb)
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// Serve a guest interface: map its rings, bind its port, and resume from the channel's
    /// journal if it belongs to these rings. Returns the channel's index.
    pub fn attach(&mut self, cfg: ChannelConfig) -> Result<usize, NetbackError> {
        if self.channels.iter().any(|c| c.cfg.mac == cfg.mac) {
            return Err(NetbackError::DuplicateMac(cfg.mac));
        }
        let p = &*self.platform;
        let tx_map = p.map_grant(cfg.guest, cfg.tx_ring_ref, false)?;
        let rx_map = p.map_grant(cfg.guest, cfg.rx_ring_ref, false)?;
        let tx_base = NonNull::new(tx_map.as_ptr()).ok_or(PlatformError::BadFrame(0))?;
        let rx_base = NonNull::new(rx_map.as_ptr()).ok_or(PlatformError::BadFrame(0))?;
        let id = ChannelId {
            guest: cfg.guest,
            tx_ring_ref: cfg.tx_ring_ref,
            rx_ring_ref: cfg.rx_ring_ref,
            remote_port: cfg.remote_port,
        };
        // SAFETY: both bases are live 4 KiB page mappings owned by `tx_map`/`rx_map`, which
        // the channel keeps (and drops after the rings); each is accessed only through its
        // ring (these probes are dropped before the real rings are made).
        let (tx_rsp, rx_rsp) = unsafe {
            (
                NetifTxBackRing::attach(tx_base, PAGE_SIZE)?.rsp_prod_pvt(),
                NetifRxBackRing::attach(rx_base, PAGE_SIZE)?.rsp_prod_pvt(),
            )
        };
        let (mut journal, opened) = Journal::open(p, cfg.journal_frame, id, tx_rsp, rx_rsp)?;
        let (tx, rx, port, replay, rx_held) = match opened {
            Opened::Fresh => {
                let port = p.evtchn_bind_interdomain(cfg.guest, cfg.remote_port)?;
                // SAFETY: as above.
                let (tx, rx) = unsafe {
                    (
                        NetifTxBackRing::attach(tx_base, PAGE_SIZE)?,
                        NetifRxBackRing::attach(rx_base, PAGE_SIZE)?,
                    )
                };
                journal.init(p, id, port, tx.req_cons(), rx.req_cons(), true)?;
                (tx, rx, port, Vec::new(), Vec::new())
            }
            Opened::Resume {
                local_port,
                tx_req_cons,
                rx_req_cons,
                tx_replay,
                rx_held,
                stale_pins,
            } => {
                // Normally released by `release_previous` already; if not, nothing of this
                // process is pinned for this channel yet, so these are still the old ones.
                for iova in stale_pins {
                    let _ = p.unpin_grant(iova);
                }
                // SAFETY: as above.
                let (tx, rx) = unsafe {
                    (
                        NetifTxBackRing::resume(tx_base, PAGE_SIZE, tx_req_cons)?,
                        NetifRxBackRing::resume(rx_base, PAGE_SIZE, rx_req_cons)?,
                    )
                };
                if tx.unanswered() as usize != tx_replay.len() {
                    return Err(NetbackError::JournalMismatch {
                        ring_name: "transmit",
                        journal: tx_replay.len(),
                        ring: tx.unanswered(),
                    });
                }
                if rx.unanswered() as usize != rx_held.len() {
                    return Err(NetbackError::JournalMismatch {
                        ring_name: "receive",
                        journal: rx_held.len(),
                        ring: rx.unanswered(),
                    });
                }
                journal.init(p, id, local_port, tx_req_cons, rx_req_cons, false)?;
                (tx, rx, local_port, tx_replay, rx_held)
            }
        };
        tracing::info!(
            guest = cfg.guest,
            port,
            replay = replay.len(),
            held = rx_held.len(),
            "netback channel attached"
        );
        let now = self.now_us();
        self.channels.push(Channel {
            policy: SpoofPolicy {
                mac: cfg.mac,
                nets: cfg.nets.clone(),
            },
            bucket: Bucket::new(cfg.credit, now),
            cfg,
            tx,
            rx,
            _tx_map: tx_map,
            _rx_map: rx_map,
            port,
            journal,
            replay: VecDeque::from(replay),
            head: None,
            rx_held: VecDeque::from(rx_held),
            tx_rsps: Vec::new(),
            rx_rsps: Vec::new(),
            failed: None,
            stats: ChannelStats::default(),
        });
        Ok(self.channels.len() - 1)
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Our port of channel `chan`.
    pub fn port(&self, chan: usize) -> Option<Port> {
        self.channels.get(chan).map(|c| c.port)
    }

    /// Counters of channel `chan`.
    pub fn stats(&self, chan: usize) -> Option<ChannelStats> {
        self.channels.get(chan).map(|c| c.stats)
    }

    /// Change channel `chan`'s credit live (the manager's reload): its bucket starts afresh,
    /// full, at the new rate; a packet waiting for credit is checked against it next round.
    /// `false` if there is no such channel.
    pub fn set_credit(&mut self, chan: usize, credit: Option<Credit>) -> bool {
        let now = self.now_us();
        let Some(c) = self.channels.get_mut(chan) else {
            return false;
        };
        c.cfg.credit = credit;
        c.bucket = Bucket::new(credit, now);
        true
    }

    /// Change the networks channel `chan` may send from, live (the manager's reload); empty:
    /// no IP filter. `false` if there is no such channel.
    pub fn set_nets(&mut self, chan: usize, nets: Vec<IpNet>) -> bool {
        let Some(c) = self.channels.get_mut(chan) else {
            return false;
        };
        c.cfg.nets.clone_from(&nets);
        c.policy.nets = nets;
        true
    }

    /// Channels served.
    pub fn channels(&self) -> usize {
        self.channels.len()
    }

    /// Channels marked failed, with the reason (for the manager).
    pub fn failed(&self) -> Vec<(usize, RingError)> {
        self.channels
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.failed.map(|e| (i, e)))
            .collect()
    }

    /// Transmits taken and not yet answered (at the device or waiting).
    pub fn in_flight(&self) -> usize {
        self.in_flight.len() + self.channels.iter().filter(|c| c.head.is_some()).count()
    }

    /// Frames from the wire that went to no channel (or were malformed).
    pub fn unclaimed(&self) -> u64 {
        self.unclaimed
    }

    /// One round of work without waiting: device events (completions, arrivals), a round of
    /// transmits, responses published. Returns the number of things done.
    pub fn poll(&mut self) -> Result<usize, NetbackError> {
        let mut work = self.reap()?;
        work += self.transmit_round()?;
        work += self.reap()?;
        self.refill()?;
        self.publish()?;
        Ok(work)
    }

    /// Poll once; if there was nothing to do, wait up to `timeout` (in short slices) for a
    /// guest's event or the device.
    pub fn run_once(&mut self, timeout: Duration) -> Result<usize, NetbackError> {
        let work = self.poll()?;
        if work > 0 {
            return Ok(work);
        }
        let slice = timeout.min(Duration::from_micros(500));
        let credit_wait = self.channels.iter().any(|c| c.head.is_some());
        if !credit_wait {
            for c in self.channels.iter_mut().filter(|c| c.failed.is_none()) {
                match c.tx.final_check_for_requests() {
                    Ok(true) => return Ok(0),
                    Ok(false) => {}
                    Err(e) => c.failed = Some(e),
                }
            }
        }
        match self.platform.evtchn_wait(Some(slice)) {
            Ok(ports) => {
                for port in ports {
                    self.platform.evtchn_unmask(port)?;
                }
            }
            Err(PlatformError::TimedOut) => {}
            Err(e) => return Err(e.into()),
        }
        self.device.wait(slice)?;
        Ok(0)
    }

    /// Collect device events: finish transmits, deliver arrived frames.
    fn reap(&mut self) -> Result<usize, NetbackError> {
        let mut evs = std::mem::take(&mut self.events);
        evs.clear();
        self.device.poll(&mut evs)?;
        let n = evs.len();
        for e in &evs {
            match *e {
                NetEvent::TxDone { token, ok } => self.tx_done(token, ok)?,
                NetEvent::Rx { buf, offset, len } => self.received(buf, offset, len)?,
            }
        }
        self.events = evs;
        Ok(n)
    }

    /// Post free receive pages to the device up to its capacity (keeping spares for group
    /// frames to exchange-mode channels).
    fn refill(&mut self) -> Result<(), NetbackError> {
        let want = self
            .device
            .rx_capacity()
            .min(self.rx_pages.len().saturating_sub(SPARES));
        while self.device.rx_posted() < want {
            let Some(i) = self.free_rx.pop() else { break };
            let pg = self.rx_pages[i];
            match self.device.post_rx(RxBuffer {
                frame: pg.frame,
                iova: pg.iova,
            }) {
                Ok(()) => self.at_device[i] = true,
                Err(NetDevError::Full) => {
                    self.free_rx.push(i);
                    break;
                }
                Err(e) => {
                    self.free_rx.push(i);
                    return Err(e.into());
                }
            }
        }
        Ok(())
    }

    /// Put the collected responses on their rings, push, notify, and clear the journal.
    fn publish(&mut self) -> Result<(), NetbackError> {
        let p = &*self.platform;
        for c in &mut self.channels {
            if c.tx_rsps.is_empty() && c.rx_rsps.is_empty() {
                continue;
            }
            let txr = std::mem::take(&mut c.tx_rsps);
            let rxr = std::mem::take(&mut c.rx_rsps);
            if c.failed.is_some() {
                continue;
            }
            let mut notify = false;
            if !txr.is_empty() {
                let mut idxs = Vec::with_capacity(txr.len());
                for (idx, rsp) in &txr {
                    c.journal.tx_answering(p, *idx, c.tx.rsp_prod_pvt())?;
                    if let Err(e) = c.tx.put_response(rsp) {
                        c.failed = Some(e);
                        break;
                    }
                    idxs.push(*idx);
                }
                notify |= c.tx.push_responses();
                c.journal.tx_answered(p, &idxs)?;
            }
            if !rxr.is_empty() {
                for rsp in &rxr {
                    if let Err(e) = c.rx.put_response(rsp) {
                        c.failed = Some(e);
                        break;
                    }
                }
                notify |= c.rx.push_responses();
            }
            if notify {
                p.evtchn_notify(c.port)?;
            }
        }
        Ok(())
    }
}

/// Receive pool pages kept off the device for copies of group frames.
pub const SPARES: usize = 4;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::{MemNic, MemWire};
    use hypervisor::domain::DomainConfig;
    use hypervisor::local::LocalPlatform;
    use hypervisor::system::System;
    use iospace::iommu::Iommu;

    fn backend() -> (Netback<LocalPlatform, MemNic>, MemWire) {
        let sys = System::new();
        let iommu = Iommu::new(64);
        let d = sys
            .create_domain(DomainConfig {
                name: "idd".into(),
                nr_frames: 40,
                iommu: Some(iommu.clone()),
            })
            .unwrap();
        let wire = MemWire::default();
        let nic =
            MemNic::new(iommu.device(), wire.clone(), [2, 0, 0, 0, 0, 0xaa]).with_rx_capacity(4);
        let nb = Netback::new(
            Arc::new(LocalPlatform::new(sys, d).unwrap()),
            nic,
            BackendConfig {
                record_frame: 7,
                header_frames: vec![9],
                rx_frames: (10..20).collect(),
                batch: 0,
            },
        )
        .unwrap();
        (nb, wire)
    }

    #[test]
    fn buffers_are_posted_and_bad_channels_refused() {
        let (mut nb, wire) = backend();
        assert_eq!(wire.posted(), 4, "device capacity");
        assert_eq!(nb.free_rx.len(), 6);
        assert_eq!(nb.batch, 1, "a zero batch is raised to one");
        let cfg = ChannelConfig {
            guest: 9,
            tx_ring_ref: 8,
            rx_ring_ref: 9,
            remote_port: 1,
            mac: Mac([2, 0, 0, 0, 0, 1]),
            rx_copy: true,
            credit: None,
            nets: Vec::new(),
            journal_frame: 30,
        };
        assert!(matches!(nb.attach(cfg), Err(NetbackError::Platform(_))));
        assert_eq!(nb.poll().unwrap(), 0);
        assert_eq!(nb.in_flight(), 0);
    }
}
