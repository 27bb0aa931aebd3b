//! netfront: a Xen network frontend (`io/netif.h`) over any [`Platform`], with transparent
//! backend restarts and the seed's reconnect protocol.
//!
//! # Connecting (XenBus, as Linux's xen-netfront)
//!
//! The manager writes the frontend directory `/local/domain/<G>/device/vif/<N>` (`backend`,
//! `backend-id`, `handle`, `mac`) and the backend's (`feature-rx-copy`, `feature-rx-flip`,
//! `feature-sg`, `state = InitWait`). When the backend is `InitWait` the frontend reads `mac`,
//! allocates and grants the two ring pages, allocates an unbound port, posts its receive
//! buffers, and writes in one transaction ([`connect`]):
//!
//! | key | value |
//! |---|---|
//! | `tx-ring-ref` | grant of the transmit ring page |
//! | `rx-ring-ref` | grant of the receive ring page |
//! | `event-channel` | the port the backend binds (one for both rings) |
//! | `request-rx-copy` | 1: copy receive (grant copy into our buffer); 0: page exchange |
//! | `feature-rx-notify` | 1: we notify when posting receive buffers |
//! | `feature-sg` | 1: we accept multi-slot receive packets (`NETRXF_more_data`) |
//! | `state` | `Connected` (4), directly, as Linux's netfront does |
//!
//! Frames flow once the backend is `Connected` too (the manager sets it after it started or
//! updated idd-net for the channel).
//!
//! # Buffers
//!
//! Data lives in frames of the domain's own RAM ([`NetFrontConfig::frames`], see [`frames`]):
//! `rx_buffers` of them are posted as receive buffers (one frame each, re-posted as soon as
//! their response is taken), the rest carry transmits, packed one after the other so that a
//! packet crossing a page boundary goes out in several slots (see [`tx`]). Every grant lives only while a request names it; a grant the backend still holds
//! when it should be ended is quarantined with its frame.
//!
//! Receive mode ([`RxMode`]): *copy* posts writable grants and reads the packet from the frame
//! after ending the grant; *exchange* posts accept-transfer grants, and on the response
//! [`Platform::end_transfer`] says where the page that arrived is. A backend that does not
//! offer `feature-rx-flip` gets copy mode (the mode in use is [`NetFront::rx_mode`]); one
//! that does not offer `feature-rx-copy` cannot serve copy mode (connect fails, as in Linux).
//!
//! # Restarts
//!
//! *Transparent* (the default recovery): the backend *process* dies and a new one re-attaches
//! to the same rings in the same domain; the frontend does nothing and notices only that
//! answers paused. Nothing here times out on a slow backend for that reason (the credit
//! scheduler may also hold transmits back for a while).
//!
//! *Reconnect* (the backend domain itself was replaced), on the same signals as blkfront:
//! the backend's `state` goes `Closing`/`Closed` (then back to `InitWait`), or the manager
//! rewrites `backend`/`backend-id`; and also when the backend breaks the protocol (a refused
//! response, see [`rx`] and [`tx`]: the frontend then closes, which tells the manager). The
//! frontend drops the connection without reading more from it, ends (or quarantines) every
//! grant, and on the next `InitWait` builds fresh rings and posts fresh receive buffers.
//!
//! **Unanswered transmits are sent again** on the new rings, ahead of newer ones and in their
//! original order. The old backend may or may not have put them on the wire; Ethernet gives
//! no delivery guarantee either way, so a duplicate is something every protocol above already
//! tolerates (TCP discards it, UDP applications must cope with duplicates), whereas a dropped
//! frame costs TCP a retransmission timeout (at least 200 ms on Linux) and an ARP or ping
//! request a whole retry interval. It is also what the transparent path promises (a
//! transmit may go out twice, never be skipped), so both recoveries look the same to the
//! guest. Partly received packets are dropped (the sender's problem, as on a wire).
//!
//! # Watching XenStore
//!
//! As blkfront: the frontend reads the backend's `state` and its own `backend`/`backend-id`
//! whenever a wait passes [`NetFrontConfig::poll_interval`] without an event, and at least
//! once per interval while busy.
//!
//! # Threads
//!
//! [`NetFront`] has no thread of its own: [`NetFront::send`] queues and posts, and
//! [`NetFront::wait`] / [`NetFront::poll`] wait on the event channel, take responses, refill
//! the receive ring and run the handshake.

pub mod channel;
mod connect;
pub mod frames;
pub mod fuzz;
pub mod rx;
pub mod tx;

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devchan::grant::{DomId, GrantRef, PAGE_SIZE};
use devchan::netif::{NetifRxRequest, NetifStatus, NET_RX_RING_SIZE, NET_TX_RING_SIZE};
use devchan::platform::{Frame, Platform, PlatformError};
use devchan::xenbus::{Handshake, Role, XenbusState};

pub use crate::blkfront::{DirectEvents, EventWait, FrontStore, StoreError};
use channel::{Channel, ChannelError};
pub use connect::{format_mac, parse_mac};
use frames::{FramePool, GrantKind};
use rx::RxAssembler;
use tx::{TxAnswer, TxFrag, TxLayout, TxShadow};

/// Shortest frame accepted: an Ethernet header.
pub const MIN_FRAME: usize = 14;
/// Longest frame netif carries (`XEN_NETIF_MAX_TX_SIZE`).
pub const MAX_FRAME: usize = devchan::netif::XEN_NETIF_MAX_TX_SIZE;
/// Frames the transmit side needs at least (one largest packet, plus the frame being filled).
pub const MIN_TX_FRAMES: usize = MAX_FRAME.div_ceil(PAGE_SIZE) + 1;
/// Default receive buffers: a full ring, as Linux posts.
pub const DEFAULT_RX_BUFFERS: usize = NET_RX_RING_SIZE as usize;
/// Default transmit frames.
pub const DEFAULT_TX_FRAMES: usize = 128;

/// Buffer frames a frontend with `rx_buffers` receive buffers and `tx_frames` transmit frames
/// is given ([`NetFrontConfig::frames`] must hold this many).
pub const fn frames_needed(rx_buffers: usize, tx_frames: usize) -> u64 {
    let tx = if tx_frames > MIN_TX_FRAMES {
        tx_frames
    } else {
        MIN_TX_FRAMES
    };
    (rx_buffers + tx) as u64
}

/// Errors reported to callers.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// XenStore failed or holds a malformed value.
    #[error("XenStore access failed")]
    Store(#[from] StoreError),
    /// Setting up a connection failed.
    #[error("Connection to the backend failed")]
    Channel(#[from] ChannelError),
    /// The event-channel wait failed.
    #[error("Event-channel wait failed")]
    Event(#[source] PlatformError),
    /// The backend cannot serve the configuration.
    #[error("Backend does not offer {0}")]
    Unsupported(&'static str),
    /// The settings are inconsistent.
    #[error("Bad configuration: {0}")]
    Config(String),
    /// A frame shorter than an Ethernet header or longer than netif carries.
    #[error("Frame of {0} bytes is outside {MIN_FRAME}..={MAX_FRAME}")]
    BadLength(usize),
    /// The transmit queue is full; wait for answers and try again.
    #[error("Transmit queue is full")]
    QueueFull,
    /// Not connected within the configured time.
    #[error("Timed out")]
    TimedOut,
}

/// Result of netfront calls.
pub type Result<T> = std::result::Result<T, NetError>;

/// How receive buffers are filled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxMode {
    /// The backend grant-copies into our buffer (`request-rx-copy = 1`).
    Copy,
    /// The backend gives us a page for our accept-transfer grant (`request-rx-copy = 0`).
    Exchange,
}

impl std::str::FromStr for RxMode {
    type Err = NetError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "copy" => Ok(Self::Copy),
            "exchange" => Ok(Self::Exchange),
            other => Err(NetError::Config(format!(
                "rx mode {other:?}: copy or exchange"
            ))),
        }
    }
}

impl std::fmt::Display for RxMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Copy => "copy",
            Self::Exchange => "exchange",
        })
    }
}

/// Frontend settings.
#[derive(Clone, Debug)]
pub struct NetFrontConfig {
    /// `/local/domain/<G>/device/vif/<N>`.
    pub front_dir: String,
    /// Receive mode asked for.
    pub rx_mode: RxMode,
    /// RAM frames the frontend owns for buffers (nothing else in the domain may use them).
    pub frames: Range<Frame>,
    /// Receive buffers kept posted (at most the ring size, 256).
    pub rx_buffers: usize,
    /// Packets [`NetFront::send`] queues before it answers [`NetError::QueueFull`].
    pub tx_queue: usize,
    /// Received packets kept for [`NetFront::recv`]; more are dropped and counted.
    pub rx_queue: usize,
    /// How long one wait lasts before XenStore is looked at again.
    pub poll_interval: Duration,
    /// [`NetFront::connect`] gives up after this long.
    pub connect_timeout: Option<Duration>,
}

impl NetFrontConfig {
    /// Defaults for vif `devid` of domain `front`, buffers in `frames`.
    pub fn new(front: DomId, devid: u32, frames: Range<Frame>) -> Self {
        Self {
            front_dir: format!("/local/domain/{front}/device/vif/{devid}"),
            rx_mode: RxMode::Copy,
            frames,
            rx_buffers: DEFAULT_RX_BUFFERS,
            tx_queue: 1024,
            rx_queue: 4096,
            poll_interval: Duration::from_millis(50),
            connect_timeout: Some(Duration::from_secs(30)),
        }
    }
}

/// Counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Packets the backend answered `NETIF_RSP_OKAY`.
    pub tx_packets: u64,
    /// Their bytes.
    pub tx_bytes: u64,
    /// Packets answered with an error or dropped status.
    pub tx_errors: u64,
    /// Packets received and queued for [`NetFront::recv`].
    pub rx_packets: u64,
    /// Their bytes.
    pub rx_bytes: u64,
    /// Packets the backend reported failed, or too short, or unreadable.
    pub rx_errors: u64,
    /// Packets dropped because [`NetFrontConfig::rx_queue`] was full.
    pub rx_overruns: u64,
    /// Refused responses (the connection was dropped for each).
    pub protocol_errors: u64,
    /// Times the backend became connected (the first included).
    pub connects: u64,
    /// Connections dropped.
    pub disconnects: u64,
    /// Transmits put back for a new connection after one was dropped.
    pub resent: u64,
}

/// A posted receive buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RxBuf {
    frame: Frame,
    gref: GrantRef,
    kind: GrantKind,
}

/// The frontend (see the module docs).
pub struct NetFront<P: Platform, S: FrontStore> {
    platform: Arc<P>,
    store: S,
    events: Box<dyn EventWait>,
    cfg: NetFrontConfig,
    hs: Handshake,
    backend: Option<(String, DomId)>,
    backend_connected: bool,
    chan: Option<Channel<P>>,
    mode: RxMode,
    mac: [u8; 6],
    pool: FramePool,
    tx: TxShadow,
    layout: TxLayout,
    rx: RxAssembler<RxBuf>,
    backlog: VecDeque<Vec<u8>>,
    received: VecDeque<Vec<u8>>,
    last_store_check: Instant,
    stats: NetStats,
}

impl<P: Platform, S: FrontStore> NetFront<P, S> {
    /// Start the frontend and wait until the backend is connected.
    pub fn connect(platform: Arc<P>, store: S, cfg: NetFrontConfig) -> Result<Self>
    where
        P: 'static,
    {
        let events = Box::new(DirectEvents(platform.clone()));
        Self::connect_with(platform, store, events, cfg)
    }

    /// As [`Self::connect`], waiting for events through `events`.
    pub fn connect_with(
        platform: Arc<P>,
        store: S,
        events: Box<dyn EventWait>,
        cfg: NetFrontConfig,
    ) -> Result<Self> {
        let nframes =
            usize::try_from(cfg.frames.end.saturating_sub(cfg.frames.start)).unwrap_or(usize::MAX);
        if cfg.rx_buffers == 0 || cfg.rx_buffers > NET_RX_RING_SIZE as usize {
            return Err(NetError::Config(format!(
                "rx_buffers {} not in 1..={NET_RX_RING_SIZE}",
                cfg.rx_buffers
            )));
        }
        if nframes < cfg.rx_buffers + MIN_TX_FRAMES {
            return Err(NetError::Config(format!(
                "{nframes} frames hold {} receive buffers and {MIN_TX_FRAMES} transmit frames only if there are {} of them",
                cfg.rx_buffers,
                cfg.rx_buffers + MIN_TX_FRAMES
            )));
        }
        let mut me = Self {
            platform,
            store,
            events,
            hs: Handshake::new(Role::Frontend),
            backend: None,
            backend_connected: false,
            chan: None,
            mode: cfg.rx_mode,
            mac: [0; 6],
            pool: FramePool::new(cfg.frames.clone()),
            tx: TxShadow::new(NET_TX_RING_SIZE),
            layout: TxLayout::default(),
            rx: RxAssembler::new(NET_RX_RING_SIZE),
            backlog: VecDeque::new(),
            received: VecDeque::new(),
            last_store_check: Instant::now(),
            stats: NetStats::default(),
            cfg,
        };
        me.write_state()?;
        let deadline = me.cfg.connect_timeout.map(|t| Instant::now() + t);
        while !me.is_connected() {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(NetError::TimedOut);
            }
            let iv = me.cfg.poll_interval;
            me.step(iv)?;
        }
        Ok(me)
    }

    /// The MAC address the manager gave this interface (`mac`).
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The receive mode in use.
    pub fn rx_mode(&self) -> RxMode {
        self.mode
    }

    /// Counters.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// Connected: our rings are published and the backend is `Connected`.
    pub fn is_connected(&self) -> bool {
        self.chan.is_some() && self.backend_connected
    }

    /// The backend domain named now.
    pub fn backend_domain(&self) -> Option<DomId> {
        self.backend.as_ref().map(|b| b.1)
    }

    /// Transmits not yet answered (queued or on the ring).
    pub fn tx_pending(&self) -> usize {
        self.backlog.len() + self.tx.packets_in_flight()
    }

    /// Receive buffers posted now.
    pub fn rx_posted(&self) -> usize {
        self.rx.posted()
    }

    /// Grants the backend has not released (with their frames).
    pub fn quarantined(&self) -> usize {
        self.pool.quarantined()
    }

    /// The settings.
    pub fn config(&self) -> &NetFrontConfig {
        &self.cfg
    }

    /// Queue `frame` (a whole Ethernet frame, no FCS) for transmission and post what fits.
    /// A frame longer than a page goes out in several slots.
    pub fn send(&mut self, frame: &[u8]) -> Result<()> {
        if !(MIN_FRAME..=MAX_FRAME).contains(&frame.len()) {
            return Err(NetError::BadLength(frame.len()));
        }
        if self.backlog.len() >= self.cfg.tx_queue {
            return Err(NetError::QueueFull);
        }
        self.backlog.push_back(frame.to_vec());
        self.kick();
        Ok(())
    }

    /// A received frame, if one is waiting.
    pub fn recv(&mut self) -> Option<Vec<u8>> {
        self.received.pop_front()
    }

    /// Run the frontend until a frame is waiting for [`Self::recv`] or `timeout` passes;
    /// true if one is.
    pub fn wait(&mut self, timeout: Duration) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.received.is_empty() {
                return Ok(true);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            self.step(deadline - now)?;
        }
    }

    /// One round of the engine: wait up to `timeout` for an event, take responses, refill,
    /// look at XenStore.
    pub fn poll(&mut self, timeout: Duration) -> Result<()> {
        self.step(timeout)
    }

    /// Run until every queued transmit was answered, or `timeout` passes; true if all were.
    pub fn flush(&mut self, timeout: Duration) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        while self.tx_pending() > 0 {
            let now = Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            self.step(deadline - now)?;
        }
        Ok(true)
    }

    /// The manager says the backend was replaced: drop the connection now and reconnect to
    /// whatever backend XenStore names.
    pub fn reconnect(&mut self) -> Result<()> {
        self.force_reconnect("requested");
        self.write_state()
    }

    // --- Engine --------------------------------------------------------------------------

    fn step(&mut self, timeout: Duration) -> Result<()> {
        self.kick();
        let wait = timeout.min(self.cfg.poll_interval);
        let fired = match self.chan.as_ref().filter(|_| self.backend_connected) {
            Some(ch) => self.events.wait(ch.port(), wait).map_err(NetError::Event)?,
            None => {
                std::thread::sleep(wait.min(Duration::from_millis(10)));
                false
            }
        };
        if self.chan.is_some() {
            self.take_responses();
        }
        if !fired || self.last_store_check.elapsed() >= self.cfg.poll_interval {
            self.last_store_check = Instant::now();
            if self.pool.quarantined() > 0 {
                self.pool.retry_quarantine(&*self.platform);
            }
            if let Err(e) = self.drive_xenbus() {
                // Before the first connection the caller hears of it (a misconfigured device),
                // unless a key is merely not written yet; afterwards a failed attempt is
                // retried at the next interval.
                let missing = matches!(e, NetError::Store(StoreError::Missing(_)));
                if self.stats.connects == 0 && !missing {
                    return Err(e);
                }
                tracing::warn!(error = %e, "reconnect attempt failed; retrying");
            }
        }
        self.kick();
        Ok(())
    }

    /// Post receive buffers and queued transmits, and publish them.
    fn kick(&mut self) {
        if self.chan.is_none() {
            return;
        }
        let mut failed = None;
        if let Err(e) = self.refill_rx() {
            failed = Some(e);
        }
        if failed.is_none() && self.backend_connected {
            if let Err(e) = self.post_tx() {
                failed = Some(e);
            }
        }
        let pushed = self.chan.as_mut().map(Channel::push);
        if let Some(e) = failed {
            tracing::warn!(error = %e, "posting to the backend failed");
            self.force_reconnect("post failed");
            let _ = self.write_state();
            return;
        }
        // Before the backend binds the port a notification has nowhere to go; it looks at
        // the rings when it connects.
        if let Some(Err(e)) = pushed {
            if self.backend_connected {
                tracing::warn!(error = %e, "notifying the backend failed");
                self.force_reconnect("notify failed");
                let _ = self.write_state();
            }
        }
    }

    fn refill_rx(&mut self) -> std::result::Result<(), ChannelError> {
        let Some(chan) = self.chan.as_mut() else {
            return Ok(());
        };
        let backend = chan.backend();
        let size = NET_RX_RING_SIZE;
        while self.rx.posted() < self.cfg.rx_buffers && chan.rx_free() > 0 {
            // The ring slot's number, as Linux numbers buffers, unless that id is still out
            // (answered out of order): then the next free one.
            let start = chan.rx_next_slot();
            let Some(id) = (0..size)
                .map(|i| u16::try_from((start + i) % size).unwrap_or(0))
                .find(|id| self.rx.is_free(*id))
            else {
                break;
            };
            let Some(frame) = self.pool.alloc() else {
                break;
            };
            let (granted, kind) = match self.mode {
                RxMode::Copy => (
                    self.platform.grant_access(backend, frame, false),
                    GrantKind::Access,
                ),
                RxMode::Exchange => (
                    self.platform.accept_transfer(backend, frame),
                    GrantKind::Transfer,
                ),
            };
            let gref = match granted {
                Ok(g) => g,
                Err(e) => {
                    self.pool.free(frame);
                    return Err(ChannelError::Platform("grant receive buffer", e));
                }
            };
            let buf = RxBuf { frame, gref, kind };
            if self.rx.post(id, buf).is_err() {
                let _ = self.pool.release(&*self.platform, gref, kind, Some(frame));
                break;
            }
            chan.put_rx(&NetifRxRequest { id, pad: 0, gref })?;
        }
        Ok(())
    }

    fn post_tx(&mut self) -> std::result::Result<(), ChannelError> {
        let Some(chan) = self.chan.as_mut() else {
            return Ok(());
        };
        let backend = chan.backend();
        // Frames the receive side will need to refill its buffers stay reserved.
        let reserved = self.cfg.rx_buffers.saturating_sub(self.rx.posted());
        let mut result = Ok(());
        while let Some(data) = self.backlog.front() {
            let fresh_n = self.layout.frames_needed(data.len());
            if (chan.tx_free() as usize) < fresh_n + 1
                || self.pool.available().saturating_sub(reserved) < fresh_n
            {
                break;
            }
            let mut fresh: Vec<Frame> = (0..fresh_n).filter_map(|_| self.pool.alloc()).collect();
            let placed = self.layout.place(data.len(), &mut fresh);
            fresh.into_iter().for_each(|f| self.pool.free(f));
            let mut frags = Vec::with_capacity(placed.len());
            let mut at = 0;
            for &(frame, offset, size) in &placed {
                let chunk = data.get(at..at + usize::from(size)).unwrap_or_default();
                at += usize::from(size);
                if let Err(e) = self.platform.write_local(frame, usize::from(offset), chunk) {
                    result = Err(ChannelError::Platform("write_local", e));
                    break;
                }
                match self.platform.grant_access(backend, frame, true) {
                    Ok(gref) => frags.push(TxFrag {
                        frame,
                        gref,
                        offset,
                        size,
                    }),
                    Err(e) => {
                        result = Err(ChannelError::Platform("grant transmit frame", e));
                        break;
                    }
                }
            }
            let started = match (&result, self.backlog.pop_front()) {
                (Ok(()), Some(d)) => self.tx.start(d, &frags).map_err(|d| {
                    self.backlog.push_front(d);
                }),
                (_, d) => {
                    self.backlog.extend(d);
                    Err(())
                }
            };
            match started {
                Ok(reqs) => {
                    if let Err(e) = chan.put_tx(&reqs) {
                        result = Err(e);
                        break;
                    }
                }
                Err(()) => {
                    // Undo: end the grants, give the fragments' frames back.
                    for f in &frags {
                        let _ = self
                            .pool
                            .release(&*self.platform, f.gref, GrantKind::Access, None);
                    }
                    for &(frame, _, _) in &placed {
                        self.layout.put(frame);
                    }
                    break;
                }
            }
        }
        for f in self.layout.take_freed() {
            self.pool.free(f);
        }
        result
    }

    fn take_responses(&mut self) {
        let Some(chan) = self.chan.as_mut() else {
            return;
        };
        let (txs, rxs) = match chan.take_responses() {
            Ok(r) => r,
            Err(e) => return self.protocol_error(&e),
        };
        for r in &txs {
            match self.tx.answer(r) {
                Ok(TxAnswer::Null) => {}
                Ok(TxAnswer::Slot { slot, done }) => {
                    let _ = self
                        .pool
                        .release(&*self.platform, slot.gref, GrantKind::Access, None);
                    self.layout.put(slot.frame);
                    for f in self.layout.take_freed() {
                        self.pool.free(f);
                    }
                    if let Some(d) = done {
                        if d.status == NetifStatus::Okay {
                            self.stats.tx_packets += 1;
                            self.stats.tx_bytes += d.len as u64;
                        } else {
                            self.stats.tx_errors += 1;
                        }
                    }
                }
                Err(e) => return self.protocol_error(&e),
            }
        }
        for r in &rxs {
            let platform = &*self.platform;
            let pool = &mut self.pool;
            let fetch = |b: RxBuf, range: Option<(u16, u16)>| -> Option<Vec<u8>> {
                let arrived = pool.release(platform, b.gref, b.kind, Some(b.frame));
                let (offset, len) = range?;
                let at = match (b.kind, arrived) {
                    // Copy mode: the data is in our frame (read even if the backend still
                    // holds the grant: we copy it out once and use only the copy).
                    (GrantKind::Access, _) => b.frame,
                    (GrantKind::Transfer, Ok(Some(f))) => f,
                    // Exchange mode and no page arrived: the response lied.
                    (GrantKind::Transfer, _) => return None,
                };
                let mut data = vec![0u8; usize::from(len)];
                platform
                    .read_local(at, usize::from(offset), &mut data)
                    .ok()
                    .map(|()| data)
            };
            match self.rx.accept(r, fetch) {
                Ok(None) => {}
                Ok(Some(Ok(p))) if p.len() >= MIN_FRAME => {
                    if self.received.len() >= self.cfg.rx_queue {
                        self.stats.rx_overruns += 1;
                    } else {
                        self.stats.rx_packets += 1;
                        self.stats.rx_bytes += p.len() as u64;
                        self.received.push_back(p);
                    }
                }
                Ok(Some(_)) => self.stats.rx_errors += 1,
                Err(e) => return self.protocol_error(&e),
            }
        }
    }

    fn protocol_error(&mut self, e: &dyn std::fmt::Display) {
        tracing::warn!(error = %e, "backend broke the netif protocol; reconnecting");
        self.stats.protocol_errors += 1;
        self.force_reconnect("protocol error");
        let _ = self.write_state();
    }
}

impl<P: Platform, S: FrontStore> Drop for NetFront<P, S> {
    fn drop(&mut self) {
        self.drop_channel();
        self.hs = Handshake::resume(Role::Frontend, XenbusState::Closed);
        let _ = self.write_state();
    }
}
