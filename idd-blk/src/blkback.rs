//! blkback: Xen's `blkif` protocol served over device channels, onto a [`BlockDevice`].
//!
//! # Per channel (one guest disk)
//!
//! The frontend's ring page is mapped through its grant (`ring-ref`), our event-channel port
//! is bound to its port, and requests are copied out with `BlkifBackRing::get_request`,
//! journaled ([`crate::journal`]) and decoded with `BlkRequest::decode`. Anything that does
//! not decode, lies outside the guest's region (`offset`, `sectors` of the device), writes
//! or discards on a read-only channel, or names a grant we cannot pin is answered with
//! `BLKIF_RSP_ERROR`; nothing a frontend writes can panic the backend. A ring whose indexes
//! are impossible (`RingError::Overflow`) marks the channel failed: it is no longer touched,
//! and [`Blkback::failed`] reports it to the manager.
//!
//! Indirect requests: the indirect pages are grant-copied into a scratch frame of our own
//! memory ([`BackendConfig::scratch_frame`]), read from there, and decoded; we advertise at
//! most [`crate::journal::PINS_PER_SLOT`] indirect segments.
//!
//! # Data path
//!
//! The IDD never maps guest data. Each segment's grant is pinned for the device
//! (`Platform::pin_grant`, writable for reads since the device writes the page), giving an
//! IOVA; the device gets the IOVA segments; on completion every pin is dropped and the
//! response is put on the ring. Responses go out in completion order, matched by `id`.
//!
//! # Scheduling
//!
//! Each round takes at most [`BackendConfig::batch`] requests from each channel, starting
//! with a different channel every round (round robin), so one busy guest cannot starve
//! another. The round's requests go through the [`Elevator`] (conflict-ordered, sorted by
//! sector, adjacent same-direction requests merged) into the device queue, up to the
//! device's free depth.
//!
//! # Restart
//!
//! [`Blkback::attach`] opens the channel's journal: if it belongs to the same ring, the
//! channel resumes (`BackRing::resume` with the journal's `req_cons`, the same bound port,
//! stale pins released) and the journal's unanswered requests are re-executed before any new
//! request is taken.

use crate::device::{BlockDevice, Completion, DevOp, IovaSeg};
use crate::elevator::{Elevator, Extent, Part};
use crate::journal::{Journal, JournalError, Opened, RingId, PINS_PER_SLOT};
use devchan::blkif::{
    BlkRequest, BlkStatus, BlkifBackRing, BlkifRequest, BlkifResponse, IndirectOp, Segment,
};
use devchan::grant::{DomId, GrantRef, PAGE_SIZE};
use devchan::platform::{CopyPtr, Frame, GrantCopyOp, Platform, PlatformError, Port, SharedPage};
use devchan::ring::{RingError, RingIdx};
use std::collections::{BTreeMap, VecDeque};
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::Duration;

/// The part of the device a guest sees, in sectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// First device sector of the guest's disk.
    pub offset: u64,
    /// Length of the guest's disk.
    pub sectors: u64,
}

/// One guest disk to serve.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelConfig {
    /// The frontend's domain.
    pub guest: DomId,
    /// Its ring grant (`ring-ref`).
    pub ring_ref: GrantRef,
    /// Its event-channel port (`event-channel`).
    pub remote_port: Port,
    /// Where its disk lies on the device.
    pub region: Region,
    /// Refuse writes and discards.
    pub read_only: bool,
    /// First of the two frames of our memory holding this channel's journal.
    pub journal_frame: Frame,
}

/// Backend-wide settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendConfig {
    /// Most requests taken from one channel per round.
    pub batch: usize,
    /// A frame of our memory used to read indirect segment pages.
    pub scratch_frame: Frame,
}

/// Why a backend operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BlkbackError {
    /// The guest's region does not fit the device.
    #[error("Region {offset}+{sectors} does not fit the device's {capacity} sectors")]
    Region {
        /// Region start.
        offset: u64,
        /// Region length.
        sectors: u64,
        /// Device size.
        capacity: u64,
    },
    /// A platform operation (mapping the ring, binding the port, waiting) failed.
    #[error("Platform operation failed")]
    Platform(#[from] PlatformError),
    /// The ring could not be attached.
    #[error("Ring attach failed")]
    Ring(#[from] RingError),
    /// The journal could not be read or written.
    #[error("Journal access failed")]
    Journal(#[from] JournalError),
    /// The journal and the ring disagree on what is outstanding.
    #[error("Journal has {journal} unanswered requests, the ring {ring}")]
    JournalMismatch {
        /// Requests to replay.
        journal: usize,
        /// `req_cons - rsp_prod` on the ring.
        ring: u32,
    },
    /// The device failed as a whole.
    #[error("Device failed")]
    Device(#[from] crate::device::DeviceError),
    /// No channel by that index.
    #[error("No channel {0}")]
    NoChannel(usize),
    /// A region may only grow in place.
    #[error("Region would shrink from {old} to {new} sectors")]
    Shrink {
        /// Current length.
        old: u64,
        /// Asked length.
        new: u64,
    },
}

/// Counters of one channel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChannelStats {
    /// Requests taken from the ring (or the journal).
    pub consumed: u64,
    /// Requests replayed from the journal.
    pub replayed: u64,
    /// Responses published.
    pub answered: u64,
    /// Responses with an error status.
    pub errors: u64,
}

struct Channel<P: Platform> {
    cfg: ChannelConfig,
    // Declared before the mapping: the ring points into it and must go first.
    ring: BlkifBackRing,
    _mapping: P::Mapping,
    port: Port,
    journal: Journal,
    replay: VecDeque<(RingIdx, BlkifRequest)>,
    responses: Vec<(RingIdx, BlkifResponse)>,
    failed: Option<RingError>,
    stats: ChannelStats,
}

struct Request {
    chan: usize,
    ring_idx: RingIdx,
    id: u64,
    operation: u8,
    pins: Vec<u64>,
    stages: VecDeque<Part>,
    ok: bool,
}

/// The `operation` a response to `raw` carries: the request's own, or for an indirect
/// request its `indirect_op` (read or write), as Linux's blkback answers and Linux's blkfront
/// expects (it rejects a response of operation 6; seen in the Xen testbed). In
/// `blkif_request_indirect` the byte after `operation` is `indirect_op`.
fn response_op(raw: &BlkifRequest) -> u8 {
    if raw.operation == devchan::blkif::BLKIF_OP_INDIRECT {
        raw.nr_segments
    } else {
        raw.operation
    }
}

/// The block backend: channels, an elevator and a device.
pub struct Blkback<P: Platform, D: BlockDevice> {
    platform: Arc<P>,
    device: D,
    cfg: BackendConfig,
    channels: Vec<Channel<P>>,
    rr: usize,
    elevator: Elevator,
    requests: BTreeMap<u64, Request>,
    at_device: BTreeMap<u64, (Extent, Vec<u64>)>,
    completions: Vec<Completion>,
}

fn token(chan: usize, idx: RingIdx) -> u64 {
    (chan as u64) << 32 | u64::from(idx)
}

fn status_of(ok: bool) -> BlkStatus {
    if ok {
        BlkStatus::Okay
    } else {
        BlkStatus::Error
    }
}

/// A checked request: its device stages, first guest sector, sectors and data segments.
struct Plan {
    ops: Vec<DevOp>,
    sector: u64,
    sectors: u64,
    segs: Vec<Segment>,
}

/// Why a request is answered without reaching the device.
enum Refusal {
    Error,
    NotSupported,
}

impl<P: Platform, D: BlockDevice> Blkback<P, D> {
    /// A backend with no channels yet.
    pub fn new(platform: Arc<P>, device: D, cfg: BackendConfig) -> Self {
        let max = device.max_segments();
        Self {
            platform,
            device,
            cfg: BackendConfig {
                batch: cfg.batch.max(1),
                ..cfg
            },
            channels: Vec::new(),
            rr: 0,
            elevator: Elevator::new(max),
            requests: BTreeMap::new(),
            at_device: BTreeMap::new(),
            completions: Vec::new(),
        }
    }

    /// The `feature-max-indirect-segments` value to advertise.
    pub fn max_indirect_segments(&self) -> u16 {
        // PINS_PER_SLOT is 16.
        #[allow(clippy::cast_possible_truncation)]
        {
            PINS_PER_SLOT as u16
        }
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// Requests waiting in the elevator and at the device (for stall reports).
    pub fn queued(&self) -> (usize, usize) {
        (self.elevator.len(), self.at_device.len())
    }

    /// Serve a guest disk: map its ring, bind its port, and resume from the channel's journal
    /// if it belongs to this ring. Returns the channel's index.
    pub fn attach(&mut self, cfg: ChannelConfig) -> Result<usize, BlkbackError> {
        let capacity = self.device.capacity();
        let Region { offset, sectors } = cfg.region;
        if offset.checked_add(sectors).is_none_or(|end| end > capacity) {
            return Err(BlkbackError::Region {
                offset,
                sectors,
                capacity,
            });
        }
        let p = &*self.platform;
        let mapping = p.map_grant(cfg.guest, cfg.ring_ref, false)?;
        let base = NonNull::new(mapping.as_ptr()).ok_or(PlatformError::BadFrame(0))?;
        let id = RingId {
            guest: cfg.guest,
            ring_ref: cfg.ring_ref,
            remote_port: cfg.remote_port,
        };
        // SAFETY: `base` is a live 4 KiB page mapping owned by `mapping`, which the channel
        // keeps (and drops after the ring); it is accessed only through this ring.
        let rsp_prod = unsafe { BlkifBackRing::attach(base, PAGE_SIZE)? }.rsp_prod_pvt();
        let (mut journal, opened) = Journal::open(p, cfg.journal_frame, id, rsp_prod)?;
        let (ring, port, replay) = match opened {
            Opened::Fresh => {
                let port = p.evtchn_bind_interdomain(cfg.guest, cfg.remote_port)?;
                // SAFETY: as above.
                let ring = unsafe { BlkifBackRing::attach(base, PAGE_SIZE)? };
                journal.init(p, id, port, ring.req_cons(), true)?;
                (ring, port, Vec::new())
            }
            Opened::Resume {
                local_port,
                req_cons,
                replay,
                stale_pins,
            } => {
                // Normally already released by `journal::release_stale_pins` before anything
                // else was pinned; if not, nothing of this process has been pinned for this
                // channel yet, so the recorded IOVAs are still the old process's.
                for iova in stale_pins {
                    let _ = p.unpin_grant(iova);
                }
                // SAFETY: as above.
                let ring = unsafe { BlkifBackRing::resume(base, PAGE_SIZE, req_cons)? };
                if ring.unanswered() as usize != replay.len() {
                    return Err(BlkbackError::JournalMismatch {
                        journal: replay.len(),
                        ring: ring.unanswered(),
                    });
                }
                journal.init(p, id, local_port, req_cons, false)?;
                let replay = replay.into_iter().map(|r| (r.ring_idx, r.raw)).collect();
                (ring, local_port, replay)
            }
        };
        tracing::info!(
            guest = cfg.guest,
            port,
            replay = replay.len(),
            "blkback channel attached"
        );
        self.channels.push(Channel {
            cfg,
            ring,
            _mapping: mapping,
            port,
            journal,
            replay: VecDeque::from(replay),
            responses: Vec::new(),
            failed: None,
            stats: ChannelStats::default(),
        });
        Ok(self.channels.len() - 1)
    }

    /// Grow channel `chan`'s region in place to `sectors` (the manager's reload): requests
    /// up to the new end are served from the next one taken. Shrinking is refused (the guest
    /// may already address what would vanish), as is a region past the device's end.
    pub fn grow_region(&mut self, chan: usize, sectors: u64) -> Result<(), BlkbackError> {
        let capacity = self.device.capacity();
        let c = self
            .channels
            .get_mut(chan)
            .ok_or(BlkbackError::NoChannel(chan))?;
        let Region {
            offset,
            sectors: old,
        } = c.cfg.region;
        if sectors < old {
            return Err(BlkbackError::Shrink { old, new: sectors });
        }
        if offset.checked_add(sectors).is_none_or(|end| end > capacity) {
            return Err(BlkbackError::Region {
                offset,
                sectors,
                capacity,
            });
        }
        c.cfg.region.sectors = sectors;
        Ok(())
    }

    /// Channels attached (failed ones included): the next one gets this index.
    pub fn channels(&self) -> usize {
        self.channels.len()
    }

    /// Our port of channel `chan`.
    pub fn port(&self, chan: usize) -> Option<Port> {
        self.channels.get(chan).map(|c| c.port)
    }

    /// Counters of channel `chan`.
    pub fn stats(&self, chan: usize) -> Option<ChannelStats> {
        self.channels.get(chan).map(|c| c.stats)
    }

    /// Channels marked failed, with the reason (for the manager).
    pub fn failed(&self) -> Vec<(usize, RingError)> {
        self.channels
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.failed.map(|e| (i, e)))
            .collect()
    }

    /// Requests taken and not yet answered, over all channels.
    pub fn in_flight(&self) -> usize {
        self.requests.len()
    }

    /// One round of work without waiting: take batches round-robin, dispatch, collect
    /// completions, publish responses. Returns the number of requests taken plus completed.
    ///
    /// Every completion is published before the next dispatch, so a request that conflicts
    /// with an earlier one starts only after the earlier one's response is out: a restarted
    /// backend never replays a request whose later conflicting requests already ran.
    pub fn poll(&mut self) -> Result<usize, BlkbackError> {
        let mut work = self.reap()?;
        self.publish()?;
        work += self.consume_round()?;
        work += self.dispatch()?;
        work += self.reap()?;
        self.publish()?;
        Ok(work)
    }

    /// Poll once; if there was nothing to do, wait up to `timeout` for an event (or, with
    /// requests at the device, briefly for the device).
    pub fn run_once(&mut self, timeout: Duration) -> Result<usize, BlkbackError> {
        let work = self.poll()?;
        if work > 0 {
            return Ok(work);
        }
        if self.device.in_flight() > 0 || !self.elevator.is_empty() {
            self.device.wait(timeout.min(Duration::from_millis(1)))?;
            return Ok(0);
        }
        for c in self.channels.iter_mut().filter(|c| c.failed.is_none()) {
            match c.ring.final_check_for_requests() {
                Ok(true) => return Ok(0),
                Ok(false) => {}
                Err(e) => c.failed = Some(e),
            }
        }
        match self.platform.evtchn_wait(Some(timeout)) {
            Ok(ports) => {
                for port in ports {
                    self.platform.evtchn_unmask(port)?;
                }
            }
            Err(PlatformError::TimedOut) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(0)
    }

    /// Take up to `batch` requests from each channel, starting at the round-robin cursor.
    /// Returns how many were taken.
    pub fn consume_round(&mut self) -> Result<usize, BlkbackError> {
        let n = self.channels.len();
        let mut taken = 0;
        for k in 0..n {
            let chan = (self.rr + k) % n;
            for _ in 0..self.cfg.batch {
                let Some((idx, raw)) = self.next_request(chan)? else {
                    break;
                };
                taken += 1;
                self.start(chan, idx, &raw)?;
            }
        }
        if n > 0 {
            self.rr = (self.rr + 1) % n;
        }
        Ok(taken)
    }

    /// The next request of `chan`: a journal replay first, then the ring.
    fn next_request(
        &mut self,
        chan: usize,
    ) -> Result<Option<(RingIdx, BlkifRequest)>, BlkbackError> {
        let p = &*self.platform;
        let c = &mut self.channels[chan];
        if c.failed.is_some() {
            return Ok(None);
        }
        if let Some(r) = c.replay.pop_front() {
            c.stats.consumed += 1;
            c.stats.replayed += 1;
            return Ok(Some(r));
        }
        match c.ring.get_request() {
            Ok(Some(raw)) => {
                let idx = c.ring.req_cons().wrapping_sub(1);
                c.journal.consumed(p, idx, &raw, c.ring.req_cons())?;
                c.stats.consumed += 1;
                Ok(Some((idx, raw)))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                tracing::warn!(guest = c.cfg.guest, error = %e, "blkback channel failed");
                c.failed = Some(e);
                Ok(None)
            }
        }
    }

    /// Validate, pin and queue one request (or answer it at once).
    fn start(&mut self, chan: usize, idx: RingIdx, raw: &BlkifRequest) -> Result<(), BlkbackError> {
        match self.plan(chan, raw) {
            Ok(plan) => self.pin_and_queue(chan, idx, raw, &plan),
            Err(r) => {
                let st = match r {
                    Refusal::Error => BlkStatus::Error,
                    Refusal::NotSupported => BlkStatus::NotSupported,
                };
                self.respond(chan, idx, BlkifResponse::new(raw.id, response_op(raw), st));
                Ok(())
            }
        }
    }

    /// Decode and check a request: its device stages' operation, its first guest sector and
    /// its segments.
    fn plan(&self, chan: usize, raw: &BlkifRequest) -> Result<Plan, Refusal> {
        let c = &self.channels[chan];
        let req = BlkRequest::decode(raw, self.max_indirect_segments()).map_err(|e| {
            tracing::debug!(guest = c.cfg.guest, error = %e, "malformed block request");
            Refusal::Error
        })?;
        let ro = c.cfg.read_only || self.device.read_only();
        let (ops, sector, segs, nr) = match req {
            BlkRequest::Read(r) => (vec![DevOp::Read], r.sector, r.segments.to_vec(), None),
            BlkRequest::Write(r) => (vec![DevOp::Write], r.sector, r.segments.to_vec(), None),
            BlkRequest::Flush(r) | BlkRequest::WriteBarrier(r) => {
                let ops = if r.segments.is_empty() {
                    vec![DevOp::Flush]
                } else {
                    vec![DevOp::Write, DevOp::Flush]
                };
                (ops, r.sector, r.segments.to_vec(), None)
            }
            BlkRequest::Discard(d) => (
                vec![DevOp::Discard],
                d.sector,
                Vec::new(),
                Some(d.nr_sectors),
            ),
            BlkRequest::Indirect(r) => {
                let segs = self.indirect_segments(c.cfg.guest, &r)?;
                let op = match r.op {
                    IndirectOp::Read => DevOp::Read,
                    IndirectOp::Write => DevOp::Write,
                };
                (vec![op], r.sector, segs, None)
            }
        };
        if ro
            && ops
                .iter()
                .any(|o| matches!(o, DevOp::Write | DevOp::Discard))
        {
            return Err(Refusal::Error);
        }
        let sectors = nr.unwrap_or_else(|| segs.iter().map(Segment::sectors).sum());
        let fits = sector
            .checked_add(sectors)
            .is_some_and(|end| end <= c.cfg.region.sectors);
        // A flush without data has no range to check.
        if !fits && !(ops == [DevOp::Flush]) {
            return Err(Refusal::Error);
        }
        if segs.len() > PINS_PER_SLOT {
            return Err(Refusal::NotSupported);
        }
        Ok(Plan {
            ops,
            sector,
            sectors,
            segs,
        })
    }

    /// Copy the indirect segment pages into our scratch frame and decode them.
    fn indirect_segments(
        &self,
        guest: DomId,
        r: &devchan::blkif::IndirectRequest,
    ) -> Result<Vec<Segment>, Refusal> {
        let p = &*self.platform;
        let mut bytes = Vec::with_capacity(r.pages() * PAGE_SIZE);
        for &gref in r.grefs() {
            let op = GrantCopyOp {
                src: CopyPtr::Grant {
                    domid: guest,
                    gref,
                    offset: 0,
                },
                dst: CopyPtr::Local {
                    frame: self.cfg.scratch_frame,
                    offset: 0,
                },
                // A page is 4096 bytes.
                #[allow(clippy::cast_possible_truncation)]
                len: PAGE_SIZE as u16,
            };
            match p.grant_copy(&[op]).as_deref() {
                Ok([0]) => {}
                _ => return Err(Refusal::Error),
            }
            let mut page = vec![0u8; PAGE_SIZE];
            p.read_local(self.cfg.scratch_frame, 0, &mut page)
                .map_err(|_| Refusal::Error)?;
            bytes.extend_from_slice(&page);
        }
        r.segments(&bytes).map_err(|_| Refusal::Error)
    }

    fn pin_and_queue(
        &mut self,
        chan: usize,
        idx: RingIdx,
        raw: &BlkifRequest,
        plan: &Plan,
    ) -> Result<(), BlkbackError> {
        let Plan {
            ops,
            sector,
            sectors,
            segs,
        } = plan;
        let p = &*self.platform;
        let c = &self.channels[chan];
        let device_writes = ops.contains(&DevOp::Read);
        let mut pins = Vec::with_capacity(segs.len());
        let mut iosegs = Vec::with_capacity(segs.len());
        for s in segs {
            match p.pin_grant(c.cfg.guest, s.gref, device_writes) {
                Ok(iova) => {
                    pins.push(iova);
                    // offset < 4096 and len <= 4096: both fit.
                    iosegs.push(IovaSeg {
                        iova: iova + s.offset() as u64,
                        len: u32::try_from(s.len()).unwrap_or(0),
                    });
                }
                Err(e) => {
                    tracing::debug!(guest = c.cfg.guest, gref = s.gref, error = %e, "pin failed");
                    for iova in pins {
                        let _ = p.unpin_grant(iova);
                    }
                    self.respond(
                        chan,
                        idx,
                        BlkifResponse::new(raw.id, response_op(raw), BlkStatus::Error),
                    );
                    return Ok(());
                }
            }
        }
        c.journal.pins(p, idx, &pins)?;
        let tok = token(chan, idx);
        let dev_sector = c.cfg.region.offset + sector;
        let stages: VecDeque<Part> = ops
            .iter()
            .map(|&op| Part {
                token: tok,
                op,
                sector: if op == DevOp::Flush { 0 } else { dev_sector },
                nr_sectors: if op == DevOp::Flush { 0 } else { *sectors },
                segs: if matches!(op, DevOp::Read | DevOp::Write) {
                    iosegs.clone()
                } else {
                    Vec::new()
                },
            })
            .collect();
        let mut req = Request {
            chan,
            ring_idx: idx,
            id: raw.id,
            operation: response_op(raw),
            pins,
            stages,
            ok: true,
        };
        match req.stages.pop_front() {
            // An empty discard has nothing for the device.
            Some(first) if !(first.op == DevOp::Discard && first.nr_sectors == 0) => {
                self.elevator.push(first);
                self.requests.insert(tok, req);
            }
            _ => {
                self.requests.insert(tok, req);
                self.finish(tok);
            }
        }
        Ok(())
    }

    /// Move startable requests from the elevator to the device. Returns how many started.
    fn dispatch(&mut self) -> Result<usize, BlkbackError> {
        let budget = self
            .device
            .queue_depth()
            .saturating_sub(self.device.in_flight());
        if budget == 0 || self.elevator.is_empty() {
            return Ok(0);
        }
        let busy: Vec<Extent> = self.at_device.values().map(|(e, _)| *e).collect();
        let merged = self.elevator.dispatch(&busy, budget);
        let n = merged.len();
        for m in merged {
            let ext = m.extent();
            let tok = m.request.token;
            match self.device.submit(m.request) {
                Ok(()) => {
                    self.at_device.insert(tok, (ext, m.parts));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "device refused a request");
                    for t in m.parts {
                        self.part_done(t, false);
                    }
                }
            }
        }
        Ok(n)
    }

    /// Collect device completions. Returns how many device requests completed.
    fn reap(&mut self) -> Result<usize, BlkbackError> {
        let mut done = std::mem::take(&mut self.completions);
        done.clear();
        self.device.poll(&mut done)?;
        let n = done.len();
        for c in &done {
            if let Some((_, parts)) = self.at_device.remove(&c.token) {
                for t in parts {
                    self.part_done(t, c.ok);
                }
            }
        }
        self.completions = done;
        Ok(n)
    }

    /// One stage of request `tok` finished.
    fn part_done(&mut self, tok: u64, ok: bool) {
        let Some(req) = self.requests.get_mut(&tok) else {
            return;
        };
        req.ok &= ok;
        if req.ok {
            if let Some(next) = req.stages.pop_front() {
                self.elevator.push(next);
                return;
            }
        }
        self.finish(tok);
    }

    /// Unpin and answer request `tok`.
    fn finish(&mut self, tok: u64) {
        let Some(req) = self.requests.remove(&tok) else {
            return;
        };
        let p = &*self.platform;
        for &iova in &req.pins {
            if let Err(e) = p.unpin_grant(iova) {
                tracing::warn!(iova, error = %e, "unpin failed");
            }
        }
        let c = &self.channels[req.chan];
        if !req.pins.is_empty() {
            if let Err(e) = c.journal.pins(p, req.ring_idx, &[]) {
                tracing::warn!(error = %e, "journal pin clear failed");
            }
        }
        self.respond(
            req.chan,
            req.ring_idx,
            BlkifResponse::new(req.id, req.operation, status_of(req.ok)),
        );
    }

    fn respond(&mut self, chan: usize, idx: RingIdx, rsp: BlkifResponse) {
        self.channels[chan].responses.push((idx, rsp));
    }

    /// Put the collected responses on their rings, push, notify, and clear the journal.
    fn publish(&mut self) -> Result<(), BlkbackError> {
        let p = &*self.platform;
        for c in &mut self.channels {
            if c.responses.is_empty() {
                continue;
            }
            let rsps = std::mem::take(&mut c.responses);
            if c.failed.is_some() {
                continue;
            }
            let mut idxs = Vec::with_capacity(rsps.len());
            for (idx, rsp) in &rsps {
                c.journal.answering(p, *idx, c.ring.rsp_prod_pvt())?;
                if let Err(e) = c.ring.put_response(rsp) {
                    c.failed = Some(e);
                    break;
                }
                idxs.push(*idx);
                c.stats.answered += 1;
                if rsp.status != 0 {
                    c.stats.errors += 1;
                }
            }
            let notify = c.ring.push_responses();
            c.journal.answered(p, &idxs)?;
            if notify {
                p.evtchn_notify(c.port)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::FileDevice;
    use hypervisor::domain::DomainConfig;
    use hypervisor::local::LocalPlatform;
    use hypervisor::system::System;
    use iospace::iommu::Iommu;

    fn backend() -> Blkback<LocalPlatform, FileDevice> {
        let sys = System::new();
        let iommu = Iommu::new(8);
        let d = sys
            .create_domain(DomainConfig {
                name: "idd".into(),
                nr_frames: 16,
                iommu: Some(iommu.clone()),
            })
            .unwrap();
        let f = tempfile::tempfile().unwrap();
        f.set_len(100 * 512).unwrap();
        Blkback::new(
            Arc::new(LocalPlatform::new(sys, d).unwrap()),
            FileDevice::new(f, iommu.device(), false).unwrap(),
            BackendConfig {
                batch: 0,
                scratch_frame: 7,
            },
        )
    }

    #[test]
    fn regions_must_fit_the_device() {
        let mut b = backend();
        for (offset, sectors) in [(0, 101), (50, 51), (u64::MAX, 2)] {
            let cfg = ChannelConfig {
                guest: 9,
                ring_ref: 8,
                remote_port: 1,
                region: Region { offset, sectors },
                read_only: false,
                journal_frame: 8,
            };
            assert!(matches!(b.attach(cfg), Err(BlkbackError::Region { .. })));
        }
        // In range, but no such guest: the ring mapping fails cleanly.
        let cfg = ChannelConfig {
            guest: 9,
            ring_ref: 8,
            remote_port: 1,
            region: Region {
                offset: 0,
                sectors: 100,
            },
            read_only: false,
            journal_frame: 8,
        };
        assert!(matches!(b.attach(cfg), Err(BlkbackError::Platform(_))));
        assert_eq!(b.poll().unwrap(), 0, "no channels, no work");
        assert_eq!(b.cfg.batch, 1, "a zero batch is raised to one");
    }

    #[test]
    fn tokens_are_unique_per_channel_and_slot() {
        assert_ne!(token(0, 5), token(1, 5));
        assert_ne!(token(0, 5), token(0, 6));
        assert_eq!(token(2, u32::MAX) >> 32, 2);
    }
}
