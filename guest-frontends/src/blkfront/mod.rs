//! blkfront: a Xen block frontend over any [`Platform`], with the seed's reconnect protocol.
//!
//! # Connecting (XenBus, as Linux's xen-blkfront)
//!
//! The frontend directory (`/local/domain/<front>/device/vbd/<devid>`) names the backend
//! (`backend`, `backend-id`, written by the manager). [`devchan::xenbus::Handshake`] drives
//! both `state` keys: when the backend reaches `InitWait` the frontend allocates a ring page,
//! grants it, allocates an unbound port and writes `ring-ref`, `event-channel`,
//! `protocol = x86_64-abi` and `state = Initialised` in one transaction; when the backend is
//! `Connected` it reads `sectors`, `sector-size`, `info`, `feature-flush-cache`,
//! `feature-discard` and `feature-max-indirect-segments` ([`store`]) and goes `Connected`.
//!
//! # Reconnecting (when the driver domain itself is replaced)
//!
//! The frontend drops its connection and builds a new one when
//! * the backend's `state` becomes `Closing`/`Closed` (or its directory vanishes),
//! * the manager points `backend`/`backend-id` at a new backend (the manager's signal; a caller
//!   that hears of it another way calls [`BlkFront::reconnect`]),
//! * the backend breaks the protocol (a response for an unknown id, a duplicate, a wrong
//!   operation or status, a response index running ahead), or
//! * requests are outstanding and nothing was answered for [`BlkFrontConfig::stall_timeout`].
//!
//! Dropping the connection reads nothing more from the old ring: its grants are ended (or
//! quarantined while the old backend still holds them), its port closed, and every in-flight
//! request goes back to the shadow table's waiting queue ([`shadow`]). The XenBus handshake
//! then runs again with whatever backend the frontend directory names, and the waiting
//! requests are issued on the fresh ring in submission order. A caller's operation completes
//! only when every piece of it was answered `BLKIF_RSP_OKAY` by some backend; the shadow
//! table's ordering rules make a reissued write harmless (see [`shadow`]).
//!
//! # Watching the backend
//!
//! Instead of XenStore watches, the frontend reads the backend's `state` and its own
//! `backend`/`backend-id` whenever a wait on the event channel passes
//! [`BlkFrontConfig::poll_interval`] without an event: plain reads work over every transport,
//! and a busy device (events arriving) costs no XenStore traffic.
//!
//! # Threads
//!
//! [`BlkFront`] is driven by its caller (`&mut self`, no thread of its own): the blocking calls
//! and [`BlkFront::poll`] wait on the event channel and run the XenBus handshake. Share it with
//! a mutex ([`crate::block::BlockDevice`] is implemented for `Mutex<BlkFront>`).

pub mod channel;
mod connect;
pub mod shadow;
pub mod store;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devchan::blkif::{BlkStatus, BlkifResponse, SECTOR_SIZE};
use devchan::grant::DomId;
use devchan::platform::{Platform, PlatformError, Port};
use devchan::xenbus::{Handshake, Role, XenbusState};

use channel::{Channel, ChannelError, PagePool};
use shadow::{Piece, PieceOp, ShadowTable, Token};
pub use store::{BackendInfo, FrontStore, StoreError};

/// The ring protocol blkfront speaks (`protocol` key).
pub const PROTOCOL: &str = "x86_64-abi";

/// Errors reported to callers.
#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    /// XenStore failed.
    #[error("XenStore access failed")]
    Store(#[from] StoreError),
    /// Setting up a connection failed.
    #[error("Connection to the backend failed")]
    Channel(#[from] ChannelError),
    /// The event-channel wait failed.
    #[error("Event-channel wait failed")]
    Event(#[source] PlatformError),
    /// The backend answered with `BLKIF_RSP_ERROR`.
    #[error("Backend reported an I/O error")]
    Io,
    /// The backend does not support the operation.
    #[error("Operation not supported by the backend")]
    NotSupported,
    /// The request is outside the disk.
    #[error("Sectors {sector}+{sectors} are outside a disk of {capacity} sectors")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Sectors asked for.
        sectors: u64,
        /// Disk size in sectors.
        capacity: u64,
    },
    /// A length that is not a whole number of 512-byte sectors.
    #[error("Length {0} is not a multiple of 512")]
    Unaligned(usize),
    /// A write to a read-only disk.
    #[error("The disk is read-only")]
    ReadOnly,
    /// No answer within the configured time.
    #[error("Timed out")]
    TimedOut,
    /// No such operation (already collected, or never submitted).
    #[error("Unknown token {0}")]
    UnknownToken(Token),
}

/// Result of blkfront calls.
pub type Result<T> = std::result::Result<T, BlkError>;

/// Waits for the frontend's event channel. A domain whose event wait is shared between several
/// users (the XenStore ring, other devices) implements this over its multiplexer.
pub trait EventWait: Send {
    /// Block until `port` fires or `timeout` passes; true if it fired. The port must be
    /// unmasked again when this returns.
    fn wait(&self, port: Port, timeout: Duration) -> std::result::Result<bool, PlatformError>;
}

/// [`EventWait`] straight over the platform, for a domain where blkfront is the only user of
/// event channels.
pub struct DirectEvents<P>(pub Arc<P>);

impl<P: Platform> EventWait for DirectEvents<P> {
    fn wait(&self, port: Port, timeout: Duration) -> std::result::Result<bool, PlatformError> {
        match self.0.evtchn_wait(Some(timeout)) {
            Ok(ports) => {
                let mut hit = false;
                for p in ports {
                    self.0.evtchn_unmask(p)?;
                    hit |= p == port;
                }
                Ok(hit)
            }
            Err(PlatformError::TimedOut) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// Frontend settings.
#[derive(Clone, Debug)]
pub struct BlkFrontConfig {
    /// The frontend's XenStore directory, `/local/domain/<front>/device/vbd/<devid>`.
    pub front_dir: String,
    /// The virtual device number (`handle` in requests).
    pub handle: u16,
    /// Data pages the frontend may allocate (bounds memory and grants in use).
    pub max_pages: usize,
    /// Most segments per indirect request asked of a backend that offers more.
    pub max_indirect_segments: u32,
    /// How long one wait lasts before XenStore is looked at again.
    pub poll_interval: Duration,
    /// Outstanding requests with no answer for this long: drop the backend and reconnect.
    pub stall_timeout: Duration,
    /// A blocking call gives up after this long ([`BlkError::TimedOut`]).
    pub io_timeout: Option<Duration>,
}

impl BlkFrontConfig {
    /// Defaults for device `devid` of domain `front`.
    pub fn new(front: DomId, devid: u16) -> Self {
        Self {
            front_dir: format!("/local/domain/{front}/device/vbd/{devid}"),
            handle: devid,
            max_pages: 512,
            max_indirect_segments: 128,
            poll_interval: Duration::from_millis(50),
            stall_timeout: Duration::from_secs(5),
            io_timeout: Some(Duration::from_secs(60)),
        }
    }
}

/// Counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connections established (the first one included).
    pub connects: u64,
    /// Connections dropped.
    pub disconnects: u64,
    /// Pieces put back on a new ring after a connection was dropped.
    pub reissued: u64,
    /// Protocol violations by a backend.
    pub protocol_errors: u64,
}

struct OpState {
    remaining: usize,
    buf: Vec<u8>,
    error: Option<BlkError>,
}

/// The frontend (see the module docs).
pub struct BlkFront<P: Platform, S: FrontStore> {
    platform: Arc<P>,
    store: S,
    events: Box<dyn EventWait>,
    cfg: BlkFrontConfig,
    hs: Handshake,
    backend: Option<(String, DomId)>,
    chan: Option<Channel<P>>,
    spare_ring: Option<P::Page>,
    info: Option<BackendInfo>,
    pool: PagePool<P>,
    shadow: ShadowTable,
    ops: HashMap<Token, OpState>,
    done: HashMap<Token, Result<Vec<u8>>>,
    next_token: Token,
    last_progress: Instant,
    stats: Stats,
}

impl<P: Platform, S: FrontStore> BlkFront<P, S> {
    /// Start the frontend and wait until it is connected (or `cfg.io_timeout` passes).
    pub fn connect(platform: Arc<P>, store: S, cfg: BlkFrontConfig) -> Result<Self>
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
        cfg: BlkFrontConfig,
    ) -> Result<Self> {
        let ring_size = devchan::blkif::BLKIF_RING_SIZE;
        let mut me = Self {
            platform,
            store,
            events,
            hs: Handshake::new(Role::Frontend),
            backend: None,
            chan: None,
            spare_ring: None,
            info: None,
            pool: PagePool::new(cfg.max_pages),
            shadow: ShadowTable::new(ring_size),
            ops: HashMap::new(),
            done: HashMap::new(),
            next_token: 1,
            last_progress: Instant::now(),
            stats: Stats::default(),
            cfg,
        };
        me.write_state()?;
        let deadline = me.cfg.io_timeout.map(|t| Instant::now() + t);
        while me.info.is_none() || !me.is_connected() {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(BlkError::TimedOut);
            }
            me.step()?;
        }
        Ok(me)
    }

    /// Disk size in bytes.
    pub fn capacity(&self) -> u64 {
        self.info
            .map_or(0, |i| i.sectors.saturating_mul(SECTOR_SIZE as u64))
    }

    /// What the backend advertised when the current (or last) connection was made.
    pub fn backend_info(&self) -> Option<BackendInfo> {
        self.info
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Operations submitted and not yet collected.
    pub fn outstanding(&self) -> usize {
        self.ops.len()
    }

    /// Connected to a backend right now.
    pub fn is_connected(&self) -> bool {
        self.chan.is_some() && self.hs.state() == XenbusState::Connected
    }

    /// The backend domain of the current connection.
    pub fn backend_domain(&self) -> Option<DomId> {
        self.backend.as_ref().map(|b| b.1)
    }

    // --- Blocking API --------------------------------------------------------------------

    /// Read `buf.len()` bytes (a multiple of 512) from `sector`.
    pub fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<()> {
        let t = self.submit_read(sector, buf.len())?;
        let data = self.wait(t)?;
        buf.copy_from_slice(&data);
        Ok(())
    }

    /// Write `data` (a multiple of 512 bytes) at `sector`; returns once the backend answered.
    pub fn write(&mut self, sector: u64, data: &[u8]) -> Result<()> {
        let t = self.submit_write(sector, data.to_vec())?;
        self.wait(t).map(drop)
    }

    /// Make every write answered so far durable (a no-op if the backend has no write cache
    /// to flush: it did not advertise `feature-flush-cache`).
    pub fn flush(&mut self) -> Result<()> {
        let t = self.submit_flush()?;
        self.wait(t).map(drop)
    }

    /// Discard `sectors` sectors from `sector`.
    pub fn discard(&mut self, sector: u64, sectors: u64, secure: bool) -> Result<()> {
        let t = self.submit_discard(sector, sectors, secure)?;
        self.wait(t).map(drop)
    }

    // --- Queue-depth API -----------------------------------------------------------------

    fn check_range(&self, sector: u64, sectors: u64) -> Result<()> {
        let capacity = self.info.map_or(0, |i| i.sectors);
        match sector.checked_add(sectors) {
            Some(end) if end <= capacity => Ok(()),
            _ => Err(BlkError::OutOfRange {
                sector,
                sectors,
                capacity,
            }),
        }
    }

    fn sectors_of(len: usize) -> Result<u64> {
        if len % SECTOR_SIZE != 0 {
            return Err(BlkError::Unaligned(len));
        }
        Ok((len / SECTOR_SIZE) as u64)
    }

    /// Largest piece in sectors: direct requests, or indirect if the backend offers it.
    fn piece_sectors(&self) -> u64 {
        let ind = self.info.map_or(0, |i| i.max_indirect_segments);
        let pages = ind.min(self.cfg.max_indirect_segments).max(11);
        let pages = u64::from(pages).min(self.cfg.max_pages as u64 / 2).max(1);
        pages * 8
    }

    fn new_op(&mut self, pieces: Vec<Piece>, buf_len: usize) -> Token {
        let token = self.next_token;
        self.next_token += 1;
        let n = pieces.len();
        for mut p in pieces {
            p.token = token;
            self.shadow.push(p);
        }
        if n == 0 {
            self.done.insert(token, Ok(vec![0; buf_len]));
        } else {
            self.ops.insert(
                token,
                OpState {
                    remaining: n,
                    buf: vec![0; buf_len],
                    error: None,
                },
            );
        }
        token
    }

    fn split(&self, sector: u64, len: usize, data: Option<Vec<u8>>) -> Vec<Piece> {
        let per = usize::try_from(self.piece_sectors()).unwrap_or(8) * SECTOR_SIZE;
        (0..len)
            .step_by(per.max(SECTOR_SIZE))
            .map(|off| {
                let n = per.min(len - off);
                let op = match &data {
                    Some(d) => PieceOp::Write(d[off..off + n].to_vec()),
                    None => PieceOp::Read {
                        sectors: u32::try_from(n / SECTOR_SIZE).unwrap_or(u32::MAX),
                    },
                };
                Piece {
                    token: 0,
                    seq: 0,
                    sector: sector + (off / SECTOR_SIZE) as u64,
                    offset: off,
                    op,
                }
            })
            .collect()
    }

    /// Queue a read; collect the data with [`Self::wait`].
    pub fn submit_read(&mut self, sector: u64, len: usize) -> Result<Token> {
        self.check_range(sector, Self::sectors_of(len)?)?;
        let pieces = self.split(sector, len, None);
        let t = self.new_op(pieces, len);
        self.kick()?;
        Ok(t)
    }

    /// Queue a write.
    pub fn submit_write(&mut self, sector: u64, data: Vec<u8>) -> Result<Token> {
        self.check_range(sector, Self::sectors_of(data.len())?)?;
        if self.info.is_some_and(|i| i.read_only()) {
            return Err(BlkError::ReadOnly);
        }
        let len = data.len();
        let pieces = self.split(sector, len, Some(data));
        let t = self.new_op(pieces, 0);
        self.kick()?;
        Ok(t)
    }

    /// Queue a flush (answered at once if the backend has no `feature-flush-cache`).
    pub fn submit_flush(&mut self) -> Result<Token> {
        let pieces = if self.info.is_some_and(|i| i.flush) {
            vec![Piece {
                token: 0,
                seq: 0,
                sector: 0,
                offset: 0,
                op: PieceOp::Flush,
            }]
        } else {
            Vec::new()
        };
        let t = self.new_op(pieces, 0);
        self.kick()?;
        Ok(t)
    }

    /// Queue a discard.
    pub fn submit_discard(&mut self, sector: u64, sectors: u64, secure: bool) -> Result<Token> {
        self.check_range(sector, sectors)?;
        if !self.info.is_some_and(|i| i.discard) {
            return Err(BlkError::NotSupported);
        }
        let pieces = vec![Piece {
            token: 0,
            seq: 0,
            sector,
            offset: 0,
            op: PieceOp::Discard { sectors, secure },
        }];
        let t = self.new_op(pieces, 0);
        self.kick()?;
        Ok(t)
    }

    /// Wait for operation `token`; a read's data is returned (empty for the others). After
    /// [`BlkError::TimedOut`] the operation is abandoned: its pieces not yet on a ring are
    /// dropped, those already issued may still complete (a timed-out write leaves its sectors
    /// unspecified).
    pub fn wait(&mut self, token: Token) -> Result<Vec<u8>> {
        let deadline = self.cfg.io_timeout.map(|t| Instant::now() + t);
        loop {
            if let Some(r) = self.done.remove(&token) {
                return r;
            }
            if !self.ops.contains_key(&token) {
                return Err(BlkError::UnknownToken(token));
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                self.shadow.cancel_waiting(token);
                self.ops.remove(&token);
                return Err(BlkError::TimedOut);
            }
            self.step()?;
        }
    }

    /// The result of operation `token` if it has completed, without waiting (`None`: still
    /// outstanding, or unknown).
    pub fn take(&mut self, token: Token) -> Option<Result<Vec<u8>>> {
        self.done.remove(&token)
    }

    /// Operation `token` was submitted and its result not yet collected.
    pub fn is_pending(&self, token: Token) -> bool {
        self.ops.contains_key(&token) || self.done.contains_key(&token)
    }

    /// Give up on operation `token` (see [`Self::wait`] on timeouts).
    pub fn cancel(&mut self, token: Token) {
        self.shadow.cancel_waiting(token);
        self.ops.remove(&token);
        self.done.remove(&token);
    }

    /// The settings.
    pub fn config(&self) -> &BlkFrontConfig {
        &self.cfg
    }

    /// Wait up to `timeout` for progress; returns the operations that completed (their
    /// results stay available to [`Self::wait`] until collected).
    pub fn poll(&mut self, timeout: Duration) -> Result<Vec<Token>> {
        let deadline = Instant::now() + timeout;
        loop {
            self.step()?;
            if !self.done.is_empty() || Instant::now() >= deadline {
                return Ok(self.done.keys().copied().collect());
            }
        }
    }

    /// The manager says the backend was replaced: drop the connection now and reconnect to
    /// whatever backend XenStore names.
    pub fn reconnect(&mut self) -> Result<()> {
        self.force_reconnect("requested");
        self.write_state()
    }

    // --- Engine --------------------------------------------------------------------------

    /// Put waiting pieces on the ring and publish them.
    fn kick(&mut self) -> Result<()> {
        if !self.is_connected() {
            return Ok(());
        }
        let Some(chan) = self.chan.as_mut() else {
            return Ok(());
        };
        let mut any = false;
        while chan.has_room() && self.shadow.has_free_id() {
            let Some(idx) = self.shadow.next_issuable() else {
                break;
            };
            let Some(piece) = self.shadow.waiting(idx) else {
                break;
            };
            if chan.pages_needed(piece) > self.pool.available() {
                self.pool.retry_quarantine(&self.platform);
                if chan.pages_needed(piece) > self.pool.available() {
                    break;
                }
            }
            let op = chan.wire_op(piece);
            // Cannot fail: a free id and the waiting piece were checked just above.
            let Ok(id) = self.shadow.start(idx, op) else {
                break;
            };
            let Some(piece) = self.shadow.inflight(u64::from(id)) else {
                break;
            };
            if let Err(e) = chan.issue(&mut self.pool, id, piece) {
                // The piece waits again; a connection that cannot take requests (the backend
                // domain is gone, its grants refused) is dropped and rebuilt.
                let _ = self.shadow.unstart(id);
                tracing::warn!(error = %e, "issuing a request failed");
                self.force_reconnect("issue failed");
                return self.write_state();
            }
            any = true;
        }
        if any {
            self.last_progress = Instant::now();
            if let Err(e) = chan.push() {
                // Notifying fails when the backend's end of the port is gone.
                tracing::warn!(error = %e, "notifying the backend failed");
                self.force_reconnect("notify failed");
                return self.write_state();
            }
        }
        Ok(())
    }

    /// One round: wait for an event (or a poll interval), take responses, look at XenStore
    /// when idle, reconnect when needed.
    fn step(&mut self) -> Result<()> {
        self.kick()?;
        let fired = match self.chan.as_ref().filter(|_| self.is_connected()) {
            Some(ch) => self
                .events
                .wait(ch.port(), self.cfg.poll_interval)
                .map_err(BlkError::Event)?,
            None => {
                std::thread::sleep(self.cfg.poll_interval.min(Duration::from_millis(10)));
                false
            }
        };
        if self.is_connected() {
            self.take_responses();
        }
        if !fired {
            if self.is_connected()
                && self.shadow.inflight_len() > 0
                && self.last_progress.elapsed() >= self.cfg.stall_timeout
            {
                self.force_reconnect("stalled");
                self.write_state()?;
            }
            if let Err(e) = self.drive_xenbus() {
                // Before the first connection the caller hears of it (a misconfigured device);
                // afterwards a failed reconnect attempt (a backend not ready, malformed keys)
                // is retried at the next interval, and requests wait (up to `io_timeout`).
                if self.stats.connects == 0 {
                    return Err(e);
                }
                tracing::warn!(error = %e, "reconnect attempt failed; retrying");
            }
        }
        self.kick()
    }

    fn take_responses(&mut self) {
        let Some(chan) = self.chan.as_mut() else {
            return;
        };
        let rsps = match chan.take_responses() {
            Ok(r) => r,
            Err(e) => {
                self.protocol_error(&e);
                return;
            }
        };
        for rsp in rsps {
            if let Err(e) = self.complete(&rsp) {
                self.protocol_error(&e);
                return;
            }
        }
    }

    fn complete(&mut self, rsp: &BlkifResponse) -> std::result::Result<(), String> {
        let status = BlkStatus::try_from(rsp.status)
            .map_err(|s| format!("unknown status {s} for id {}", rsp.id))?;
        let piece = self
            .shadow
            .complete(rsp.id, rsp.operation)
            .map_err(|e| e.to_string())?;
        self.last_progress = Instant::now();
        // The shadow accepted the id, so it is a ring id (< ring size).
        let id = u32::try_from(rsp.id).unwrap_or(u32::MAX);
        let op = self.ops.get_mut(&piece.token);
        let out = match (&piece.op, op) {
            (PieceOp::Read { sectors }, Some(op)) if status == BlkStatus::Okay => {
                let len = *sectors as usize * SECTOR_SIZE;
                op.buf.get_mut(piece.offset..piece.offset + len)
            }
            _ => None,
        };
        // The piece is answered whatever happens now: a local failure to copy its data out
        // fails the caller's operation, it does not make the backend wrong.
        let copied = match self.chan.as_mut() {
            Some(chan) => chan.finish(&mut self.pool, id, out).is_ok(),
            None => true,
        };
        let error = match status {
            BlkStatus::Okay if !copied => Some(BlkError::Io),
            BlkStatus::Okay => None,
            BlkStatus::Error => Some(BlkError::Io),
            BlkStatus::NotSupported => Some(BlkError::NotSupported),
        };
        self.settle(piece.token, error);
        Ok(())
    }

    /// One piece of operation `token` is done (with `error`, if any); the operation is done
    /// when all its pieces are.
    fn settle(&mut self, token: Token, error: Option<BlkError>) {
        let Some(op) = self.ops.get_mut(&token) else {
            return; // the caller gave up on it
        };
        if error.is_some() {
            op.error = error;
        }
        op.remaining -= 1;
        if op.remaining == 0 {
            if let Some(op) = self.ops.remove(&token) {
                let r = match op.error {
                    Some(e) => Err(e),
                    None => Ok(op.buf),
                };
                self.done.insert(token, r);
            }
        }
    }

    fn protocol_error(&mut self, e: &dyn std::fmt::Display) {
        tracing::warn!(error = %e, "backend broke the blkif protocol; reconnecting");
        self.stats.protocol_errors += 1;
        self.force_reconnect("protocol error");
        let _ = self.write_state();
    }
}

impl<P: Platform, S: FrontStore> Drop for BlkFront<P, S> {
    fn drop(&mut self) {
        self.drop_channel();
        self.hs = Handshake::resume(Role::Frontend, XenbusState::Closed);
        let _ = self.write_state();
    }
}
