//! The disk check of `net-guest echo --disk-blocks` (see the program's docs): blkfront
//! driven between echo rounds, one write-then-read-back in flight, and the event waits the
//! two frontends share in one loop.
//!
//! # Data
//!
//! Block `i mod B` is written at version `i` (from 1) with [`disk_pattern`]`(seed, block,
//! version)`: the three numbers in little endian (readable in a hex dump), then an xorshift
//! stream seeded from them. The read that follows must return exactly that; anything else, or
//! an error, ends the check (and the program).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use devchan::platform::{Platform, PlatformError, Port};
use guest_frontends::blkfront::{BlkFront, BlkFrontConfig, EventWait};
use hypervisor::process::ProcessPlatform;
use hypervisor::store_link::EventMux;

use super::{Domain, SharedStore};

/// The disk's virtual device number (`xvda`, the toolstack's `vbd/51712`).
pub(super) const VBD_DEVID: u16 = 51712;
/// Most data pages blkfront may hold for the disk check (one 4 KiB operation at a time).
pub(super) const DISK_PAGES: usize = 8;
/// Bytes of one checked block.
const DISK_BLOCK: usize = 4096;

type Disk = BlkFront<ProcessPlatform, SharedStore>;

/// The disk check of `echo --disk-blocks` (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct DiskSpec {
    pub(super) blocks: u64,
    pub(super) seed: u64,
    pub(super) period: Duration,
}

/// What the disk check is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DiskStep {
    /// Nothing in flight; the next block is written at this time.
    Idle(Instant),
    /// Block `block` at version `version` being written, since `since`.
    Writing {
        token: u64,
        block: u64,
        version: u64,
        since: Instant,
    },
    /// ... and being read back (`since`: when the write was submitted).
    Reading {
        token: u64,
        block: u64,
        version: u64,
        since: Instant,
    },
}

/// One block of the disk check's data: starts with (seed, block, version) in little endian
/// (readable in a hex dump), then an xorshift stream seeded from them.
fn disk_pattern(seed: u64, block: u64, version: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(DISK_BLOCK);
    for v in [seed, block, version] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    let mut x = (seed ^ block.rotate_left(21) ^ version.rotate_left(42))
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        | 1;
    while out.len() < DISK_BLOCK {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// The event waits of a domain whose one loop drives netfront and blkfront (see the module
/// docs): the loop blocks in netfront's wait, which also wakes for the disk's port and leaves
/// a note for blkfront's next wait. Either frontend looks at XenStore whenever a wait of its
/// own ends without an event, so neither may be woken by short timeouts instead: 64 guests
/// doing that every millisecond keep domain 0's xenstored busy for nothing.
pub(super) struct SharedEvents {
    mux: Arc<EventMux<ProcessPlatform>>,
    /// The disk's port as of blkfront's latest wait (0: none yet; Xen never allocates 0).
    disk_port: AtomicU32,
    /// The disk's port fired during a wait of netfront's, unmasked, not yet seen by blkfront.
    disk_fired: AtomicBool,
}

impl SharedEvents {
    /// Shared waits over the domain's multiplexer.
    pub(super) fn new(mux: Arc<EventMux<ProcessPlatform>>) -> Arc<Self> {
        Arc::new(Self {
            mux,
            disk_port: AtomicU32::new(0),
            disk_fired: AtomicBool::new(false),
        })
    }

    fn wait(
        &self,
        ports: &[Port],
        timeout: Duration,
    ) -> std::result::Result<Vec<Port>, PlatformError> {
        match self.mux.wait_any(ports, Some(timeout)) {
            Ok(p) => Ok(p),
            Err(PlatformError::TimedOut) => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }
}

/// netfront's side of [`SharedEvents`]. netfront looks at XenStore after every wait that
/// reports no event, and at least every poll interval anyway. Its waits here are also cut
/// short by the loop (a disk event, the disk check's next step): those are reported as
/// "fired", so that netfront returns to the loop without a XenStore look and keeps to one
/// look per poll interval, as in a loop of its own.
pub(super) struct NetEvents {
    shared: Arc<SharedEvents>,
    /// netfront's poll interval (`NetFrontConfig::poll_interval`): a wait this long that
    /// ends without an event is one of its own idle intervals.
    poll_interval: Duration,
}

impl NetEvents {
    pub(super) fn new(shared: Arc<SharedEvents>, poll_interval: Duration) -> Self {
        Self {
            shared,
            poll_interval,
        }
    }
}

impl EventWait for NetEvents {
    fn wait(&self, port: Port, timeout: Duration) -> std::result::Result<bool, PlatformError> {
        let disk = self.shared.disk_port.load(Ordering::Relaxed);
        let ports: &[Port] = if disk == 0 { &[port] } else { &[port, disk] };
        let fired = self.shared.wait(ports, timeout)?;
        let disk_hit = disk != 0 && fired.contains(&disk);
        if disk_hit {
            self.shared.disk_fired.store(true, Ordering::Relaxed);
        }
        Ok(disk_hit || fired.contains(&port) || timeout < self.poll_interval)
    }
}

/// blkfront's side of [`SharedEvents`].
struct DiskEvents(Arc<SharedEvents>);

impl EventWait for DiskEvents {
    fn wait(&self, port: Port, timeout: Duration) -> std::result::Result<bool, PlatformError> {
        self.0.disk_port.store(port, Ordering::Relaxed);
        if self.0.disk_fired.swap(false, Ordering::Relaxed) {
            return Ok(true);
        }
        Ok(self.0.wait(&[port], timeout)?.contains(&port))
    }
}

/// The disk check: one write-then-read-back in flight, driven between echo rounds.
pub(super) struct DiskCheck {
    disk: Disk,
    events: Arc<SharedEvents>,
    spec: DiskSpec,
    step: DiskStep,
    /// When blkfront last ran (an operation outstanding is looked at every [`Self::LOOK`]
    /// even without an event, for blkfront's stall detection and reconnect).
    looked: Instant,
    ops: u64,
    version: u64,
    /// Longest write and read-back (the outage this guest saw).
    max_wait: Duration,
}

impl DiskCheck {
    const SPB: u64 = DISK_BLOCK as u64 / 512;
    /// See [`Self::looked`]. A look that finds no event costs blkfront three XenStore reads
    /// (it checks its backend) and blocks the echo loop while they take: with 64 guests
    /// looking every 50 ms (blkfront's own poll interval) during a disk IDD restart, pings
    /// took several times longer than at 250 ms (2 busy cores, noisy). The price: noticing a
    /// *replaced* backend domain takes up to this much longer while an operation waits; a
    /// restarted process on the same rings needs no look at all (its answers are events).
    const LOOK: Duration = Duration::from_millis(250);

    /// Connect blkfront (in the sandbox) and check that `spec.blocks` fit the disk.
    pub(super) fn connect(d: &Domain, events: Arc<SharedEvents>, spec: DiskSpec) -> Result<Self> {
        let mut cfg = BlkFrontConfig::new(d.mux.platform().domid(), VBD_DEVID);
        cfg.max_pages = DISK_PAGES;
        // Each look at an operation outstanding blocks the echo loop for at most this long.
        cfg.poll_interval = Duration::from_millis(2);
        cfg.stall_timeout = Duration::from_secs(3);
        let disk = BlkFront::connect_with(
            d.mux.platform().clone(),
            d.xs.clone(),
            Box::new(DiskEvents(events.clone())),
            cfg,
        )
        .context("blkfront connect")?;
        let sectors = disk.capacity() / 512;
        ensure!(
            spec.blocks > 0 && spec.blocks.saturating_mul(Self::SPB) <= sectors,
            "{} blocks of 4 KiB do not fit a disk of {sectors} sectors",
            spec.blocks
        );
        Ok(Self {
            disk,
            events,
            spec,
            step: DiskStep::Idle(Instant::now()),
            looked: Instant::now(),
            ops: 0,
            version: 0,
            max_wait: Duration::ZERO,
        })
    }

    /// How long the echo loop may wait (for an event of either device) before
    /// [`Self::drive`] is due.
    pub(super) fn due_in(&self) -> Duration {
        match self.step {
            DiskStep::Idle(at) => at.saturating_duration_since(Instant::now()),
            DiskStep::Writing { .. } | DiskStep::Reading { .. } => {
                Self::LOOK.saturating_sub(self.looked.elapsed())
            }
        }
    }

    /// Advance the check, blocking at most blkfront's poll interval. An I/O error or a
    /// mismatch is returned as an error (it ends the program).
    pub(super) fn drive(&mut self) -> Result<()> {
        if let DiskStep::Idle(at) = self.step {
            if Instant::now() < at {
                return Ok(());
            }
            self.version += 1;
            let block = self.version % self.spec.blocks;
            let data = disk_pattern(self.spec.seed, block, self.version);
            let token = self
                .disk
                .submit_write(block * Self::SPB, data)
                .context("disk: submit write")?;
            self.step = DiskStep::Writing {
                token,
                block,
                version: self.version,
                since: Instant::now(),
            };
        }
        if self.events.disk_fired.load(Ordering::Relaxed) || self.looked.elapsed() >= Self::LOOK {
            self.looked = Instant::now();
            self.disk.poll(Duration::ZERO).context("disk")?;
        }
        match self.step {
            DiskStep::Idle(_) => {}
            DiskStep::Writing {
                token,
                block,
                version,
                since,
            } => {
                if let Some(r) = self.disk.take(token) {
                    r.with_context(|| format!("disk: write of block {block}"))?;
                    let token = self
                        .disk
                        .submit_read(block * Self::SPB, DISK_BLOCK)
                        .context("disk: submit read")?;
                    self.step = DiskStep::Reading {
                        token,
                        block,
                        version,
                        since,
                    };
                }
            }
            DiskStep::Reading {
                token,
                block,
                version,
                since,
            } => {
                if let Some(r) = self.disk.take(token) {
                    let data = r.with_context(|| format!("disk: read of block {block}"))?;
                    ensure!(
                        data == disk_pattern(self.spec.seed, block, version),
                        "disk: block {block} does not read back as version {version} was written"
                    );
                    self.ops += 1;
                    self.max_wait = self.max_wait.max(since.elapsed());
                    let next = Instant::now()
                        .checked_add(self.spec.period)
                        .context("disk: --disk-period-ms out of range")?;
                    self.step = DiskStep::Idle(next);
                }
            }
        }
        Ok(())
    }

    pub(super) fn line(&self) -> String {
        let s = self.disk.stats();
        format!(
            "disk ops={} errors=0 mismatches=0 max_wait_us={} reconnects={} reissued={}",
            self.ops,
            self.max_wait.as_micros(),
            s.connects.saturating_sub(1),
            s.reissued
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_patterns_differ_by_each_coordinate_and_start_with_them() {
        let a = disk_pattern(1, 2, 3);
        assert_eq!(a.len(), DISK_BLOCK);
        assert_eq!(&a[..8], &1u64.to_le_bytes());
        assert_eq!(&a[8..16], &2u64.to_le_bytes());
        assert_eq!(&a[16..24], &3u64.to_le_bytes());
        assert_eq!(a, disk_pattern(1, 2, 3));
        for other in [
            disk_pattern(1, 2, 4),
            disk_pattern(1, 3, 3),
            disk_pattern(2, 2, 3),
        ] {
            assert_ne!(a[24..], other[24..]);
        }
    }
}
