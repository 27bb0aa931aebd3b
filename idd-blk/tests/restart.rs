//! Transparent restart: the backend "process" is killed at arbitrary points (every platform
//! call may be its last, device requests may never have run), a new one attaches to the same
//! rings from the journal, and the frontend, which never reconnects, sees every request
//! answered exactly once with the right data.
//!
//! The backend's state (rings, elevator, in-flight table, device queue) is dropped at the
//! crash; what survives is what survives a process death on the process-domain platform:
//! the IDD domain (its memory with the journal, its bound ports, its pins) and the guest.
#![allow(clippy::cast_possible_truncation)] // small test numbers

mod common;

use common::*;
use devchan::blkif::{BlkRequest, BLKIF_RSP_OKAY};
use devchan::grant::{DomId, GrantRef};
use devchan::platform::{Frame, GrantCopyOp, Platform, PlatformError, Port, Result, TransferMode};
use hypervisor::local::{LocalMapping, LocalPage, LocalPlatform};
use idd_blk::blkback::{BackendConfig, Blkback, Region};
use idd_blk::device::{BlockDevice, Completion, DevRequest, DeviceError, FileDevice};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A platform whose process dies after `budget` calls: every later call fails.
struct Mortal {
    inner: Arc<LocalPlatform>,
    budget: AtomicI64,
}

impl Mortal {
    fn tick(&self) -> Result<()> {
        if self.budget.fetch_sub(1, Ordering::SeqCst) <= 0 {
            return Err(PlatformError::Link("process killed".into()));
        }
        Ok(())
    }
}

impl Platform for Mortal {
    type Page = LocalPage;
    type Mapping = LocalMapping;
    fn domid(&self) -> DomId {
        self.inner.domid()
    }
    fn alloc_shared_page(&self) -> Result<LocalPage> {
        self.tick()?;
        self.inner.alloc_shared_page()
    }
    fn grant_access(&self, peer: DomId, frame: Frame, ro: bool) -> Result<GrantRef> {
        self.tick()?;
        self.inner.grant_access(peer, frame, ro)
    }
    fn end_access(&self, gref: GrantRef) -> Result<()> {
        self.tick()?;
        self.inner.end_access(gref)
    }
    fn accept_transfer(&self, peer: DomId, frame: Frame) -> Result<GrantRef> {
        self.tick()?;
        self.inner.accept_transfer(peer, frame)
    }
    fn end_transfer(&self, gref: GrantRef) -> Result<Option<Frame>> {
        self.tick()?;
        self.inner.end_transfer(gref)
    }
    fn map_grant(&self, peer: DomId, gref: GrantRef, ro: bool) -> Result<LocalMapping> {
        self.tick()?;
        self.inner.map_grant(peer, gref, ro)
    }
    fn grant_copy(&self, ops: &[GrantCopyOp]) -> Result<Vec<i16>> {
        self.tick()?;
        self.inner.grant_copy(ops)
    }
    fn pin_grant(&self, peer: DomId, gref: GrantRef, w: bool) -> Result<u64> {
        self.tick()?;
        self.inner.pin_grant(peer, gref, w)
    }
    fn unpin_grant(&self, iova: u64) -> Result<()> {
        self.tick()?;
        self.inner.unpin_grant(iova)
    }
    fn transfer(&self, frame: Frame, peer: DomId, gref: GrantRef) -> Result<TransferMode> {
        self.tick()?;
        self.inner.transfer(frame, peer, gref)
    }
    fn read_local(&self, frame: Frame, off: usize, buf: &mut [u8]) -> Result<()> {
        self.tick()?;
        self.inner.read_local(frame, off, buf)
    }
    fn write_local(&self, frame: Frame, off: usize, data: &[u8]) -> Result<()> {
        self.tick()?;
        self.inner.write_local(frame, off, data)
    }
    fn evtchn_alloc_unbound(&self, remote: DomId) -> Result<Port> {
        self.tick()?;
        self.inner.evtchn_alloc_unbound(remote)
    }
    fn evtchn_bind_interdomain(&self, remote: DomId, port: Port) -> Result<Port> {
        self.tick()?;
        self.inner.evtchn_bind_interdomain(remote, port)
    }
    fn evtchn_notify(&self, port: Port) -> Result<()> {
        self.tick()?;
        self.inner.evtchn_notify(port)
    }
    fn evtchn_unmask(&self, port: Port) -> Result<()> {
        self.tick()?;
        self.inner.evtchn_unmask(port)
    }
    fn evtchn_close(&self, port: Port) -> Result<()> {
        self.tick()?;
        self.inner.evtchn_close(port)
    }
    fn evtchn_wait(&self, timeout: Option<Duration>) -> Result<Vec<Port>> {
        self.tick()?;
        self.inner.evtchn_wait(timeout)
    }
}

/// A device that runs requests only when it completes them, in a pseudo-random order and
/// number: a crash loses whatever is still queued, as a dying process loses its device queue.
struct Lazy {
    inner: FileDevice,
    queued: Vec<DevRequest>,
    rng: u64,
}

impl Lazy {
    fn next(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }
}

impl BlockDevice for Lazy {
    fn capacity(&self) -> u64 {
        self.inner.capacity()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn max_segments(&self) -> usize {
        self.inner.max_segments()
    }
    fn queue_depth(&self) -> usize {
        16
    }
    fn in_flight(&self) -> usize {
        self.queued.len()
    }
    fn submit(&mut self, req: DevRequest) -> std::result::Result<(), DeviceError> {
        idd_blk::device::check_request(&req, self.capacity())?;
        self.queued.push(req);
        Ok(())
    }
    fn poll(&mut self, out: &mut Vec<Completion>) -> std::result::Result<(), DeviceError> {
        let n = (self.next() % 4) as usize;
        for _ in 0..n.min(self.queued.len()) {
            let i = (self.next() % self.queued.len() as u64) as usize;
            let r = self.queued.swap_remove(i);
            self.inner.submit(r)?;
        }
        self.inner.poll(out)
    }
    fn wait(&mut self, _t: Duration) -> std::result::Result<(), DeviceError> {
        Ok(())
    }
}

struct Outstanding {
    page: usize,
    write: bool,
    sector: u64,
    /// For reads: the content the sequential model says the read must return.
    expect: Vec<u8>,
}

#[test]
fn killed_backend_resumes_from_its_journal_nothing_skipped_nothing_twice() {
    const SLOTS: u64 = 12; // 12 page-sized blocks in the guest's region
    let rig = Rig::new(256);
    let mut g = rig.guest("g");
    let chan = g.channel(
        Region {
            offset: 40,
            sectors: SLOTS * 8,
        },
        false,
        journal_frame(0),
    );
    let mut model = vec![vec![0u8; 4096]; SLOTS as usize];
    let mut outstanding: BTreeMap<u64, Outstanding> = BTreeMap::new();
    let mut free: Vec<usize> = (0..24).collect();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let (mut crashes, mut done, mut replayed) = (0u32, 0u32, 0u64);
    let mut seed = 1000u64;
    while done < 3000 {
        assert!(crashes < 20_000, "no progress");
        // A new backend process: a fresh platform handle with a random lifetime.
        // The first process lives through its fresh attach: a death between binding the
        // port and recording it in the journal loses the port (see journal.rs).
        let budget = if crashes == 0 {
            1000
        } else {
            20 + (rnd() % 120) as i64
        };
        let plat = Arc::new(Mortal {
            inner: rig.idd.clone(),
            budget: AtomicI64::new(budget),
        });
        let dev = Lazy {
            inner: rig.device(),
            queued: Vec::new(),
            rng: rnd() | 1,
        };
        let mut back = Blkback::new(
            plat.clone(),
            dev,
            BackendConfig {
                batch: 1 + (rnd() % 6) as usize,
                scratch_frame: SCRATCH,
            },
        );
        if let Err(e) = back.attach(chan) {
            assert!(
                matches!(
                    &e,
                    idd_blk::blkback::BlkbackError::Platform(PlatformError::Link(_))
                        | idd_blk::blkback::BlkbackError::Journal(_)
                ),
                "attach failed for another reason than the process dying: {e:?}"
            );
            crashes += 1;
            continue;
        }
        loop {
            // The guest keeps its ring busy with a mix of writes and reads.
            while let Some(page) = (outstanding.len() < 20).then(|| free.pop()).flatten() {
                let block = rnd() % SLOTS;
                let write = rnd() % 3 != 0;
                let req = if write {
                    seed += 1;
                    let data = pattern(seed);
                    g.fill(page, &data);
                    model[block as usize] = data;
                    g.rw(true, block * 8, &[page])
                } else {
                    g.fill(page, &[0xaa; 4096]);
                    g.rw(false, block * 8, &[page])
                };
                outstanding.insert(
                    req.id(),
                    Outstanding {
                        page,
                        write,
                        sector: block * 8,
                        expect: model[block as usize].clone(),
                    },
                );
                g.post(&req);
            }
            let alive = back.run_once(Duration::from_millis(1));
            for r in g.responses() {
                let o = outstanding
                    .remove(&r.id)
                    .unwrap_or_else(|| panic!("response to id {} not outstanding", r.id));
                assert_eq!(r.status, BLKIF_RSP_OKAY);
                if !o.write {
                    assert_eq!(g.page(o.page), o.expect, "read of sector {}", o.sector);
                }
                free.push(o.page);
                done += 1;
            }
            if alive.is_err() {
                replayed += back.stats(0).map_or(0, |s| s.replayed);
                crashes += 1;
                break;
            }
        }
        drop(back);
    }
    assert!(crashes >= 10, "only {crashes} crashes");
    assert!(replayed > 0, "no crash left a request to replay");
    // Let a last, immortal backend finish everything outstanding.
    let plat = Arc::new(Mortal {
        inner: rig.idd.clone(),
        budget: AtomicI64::new(i64::MAX),
    });
    let mut back = Blkback::new(
        plat,
        rig.device(),
        BackendConfig {
            batch: 8,
            scratch_frame: SCRATCH,
        },
    );
    back.attach(chan).unwrap();
    let left = outstanding.len();
    let rs = run_until(&mut back, &mut g, left);
    for r in rs {
        let o = outstanding
            .remove(&r.id)
            .expect("answered twice or never asked");
        if !o.write {
            assert_eq!(g.page(o.page), o.expect);
        }
    }
    assert!(outstanding.is_empty());
    assert!(
        g.answered.values().all(|c| *c == 1),
        "an id was answered twice"
    );
    // The media holds the sequential result of every write.
    for (b, data) in model.iter().enumerate() {
        assert_eq!(&rig.read_image(40 + 8 * b as u64, 4096), data, "block {b}");
    }
    // Pins outlive their request only when a process died between pinning and recording
    // the pin (at most one per crash); the manager revokes those, and then the guest can
    // take every page back.
    let now = std::time::Instant::now();
    for (_, gref) in &g.pages {
        rig.sys
            .set_grant_deadline(g.plat.domid(), *gref, now)
            .unwrap();
    }
    let leaked = rig.sys.revoke_overdue().len();
    assert!(
        leaked as u32 <= crashes,
        "{leaked} leaked pins for {crashes} crashes"
    );
    for (_, gref) in &g.pages {
        g.plat.end_access(*gref).unwrap();
    }
    let _: Option<BlkRequest> = None;
    eprintln!("{crashes} crashes, {replayed} requests replayed, {done} answered before the end, {leaked} pins revoked by the manager");
}
