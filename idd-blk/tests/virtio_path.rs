//! The whole block path in one process: a guest's blkfront (written here) → blkif ring →
//! blkback → pins → the virtio-blk driver → the emulated virtio-blk-pci device (reached only
//! through its I/O Space) → DMA through the IOMMU → the image file, and back.
#![allow(clippy::cast_possible_truncation)] // small test numbers

mod common;

use common::*;
use devchan::blkif::{BlkRequest, DiscardRequest, RwRequest, Segments, BLKIF_RSP_OKAY};
use devchan::platform::Platform;
use hypervisor::domain::DomainConfig;
use hypervisor::local::LocalPlatform;
use hypervisor::system::System;
use idd_blk::blkback::{BackendConfig, Blkback, Region};
use idd_blk::device::{BlockDevice, DevOp, DevRequest, IovaSeg};
use iospace::link::LocalIo;
use idd_blk::virtio::{DriverFrames, VirtioBlkDriver};
use iospace::emu::virtio_blk::{BlkConfig, VirtioBlk};
use iospace::emu::virtio_pci::VirtioPci;
use iospace::emu::PciBus;
use iospace::iommu::Iommu;
use iospace::space::IoSpace;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

struct VirtioRig {
    sys: Arc<System>,
    idd: Arc<LocalPlatform>,
    iommu: Arc<Iommu>,
    space: Arc<IoSpace>,
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

const FRAMES: DriverFrames = DriverFrames { ring: 20, hdr: 21 };

fn rig(sectors: u64) -> VirtioRig {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let blk = VirtioBlk::new(&BlkConfig {
        path: path.clone(),
        size: sectors * 512,
        read_only: false,
        serial: "idd-blk-test".into(),
        workers: 2,
    })
    .unwrap();
    let iommu = Iommu::new(256);
    let dev = Arc::new(VirtioPci::new(Arc::new(blk), iommu.device(), 11).unwrap());
    let bus = PciBus::new();
    let bdf = bus.plug(4, dev.clone()).unwrap();
    let space = Arc::new(IoSpace::new(bdf, dev).unwrap());
    let sys = System::new();
    let d = sys
        .create_domain(DomainConfig {
            name: "idd-blk".into(),
            nr_frames: 32,
            iommu: Some(iommu.clone()),
        })
        .unwrap();
    let idd = Arc::new(LocalPlatform::new(sys.clone(), d).unwrap());
    VirtioRig {
        sys,
        idd,
        iommu,
        space,
        path,
        _dir: dir,
    }
}

fn image(r: &VirtioRig, sector: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0; len];
    std::fs::File::open(&r.path)
        .unwrap()
        .read_exact_at(&mut b, sector * 512)
        .unwrap();
    b
}

#[test]
fn driver_probes_and_moves_data_through_pinned_iovas_only() {
    let r = rig(2048);
    let mut drv =
        VirtioBlkDriver::probe(r.idd.clone(), LocalIo::new(r.space.clone()), FRAMES).unwrap();
    assert_eq!(drv.capacity(), 2048);
    assert!(!drv.read_only());
    // The driver's queue memory is pinned: two IOMMU entries.
    assert_eq!(r.iommu.len(), 2);
    // A write from an IDD-own page pinned for the device (what a guest grant would be).
    let p = &*r.idd;

    p.write_local(25, 0, &pattern(3)).unwrap();
    let g = p.grant_access(p.domid(), 25, false).unwrap();
    let iova = p.pin_grant(p.domid(), g, true).unwrap();
    drv.submit(DevRequest {
        token: 7,
        op: DevOp::Write,
        sector: 100,
        nr_sectors: 8,
        segs: vec![
            IovaSeg { iova, len: 1024 },
            IovaSeg {
                iova: iova + 1024,
                len: 3072,
            },
        ],
    })
    .unwrap();
    let mut out = Vec::new();
    for _ in 0..2000 {
        drv.poll(&mut out).unwrap();
        if !out.is_empty() {
            break;
        }
        drv.wait(Duration::from_millis(5)).unwrap();
    }
    assert_eq!(out.len(), 1);
    assert!(out[0].ok && out[0].token == 7);
    assert_eq!(image(&r, 100, 4096), pattern(3));
    // Flush and discard.
    drv.submit(DevRequest {
        token: 8,
        op: DevOp::Flush,
        sector: 0,
        nr_sectors: 0,
        segs: vec![],
    })
    .unwrap();
    drv.submit(DevRequest {
        token: 9,
        op: DevOp::Discard,
        sector: 100,
        nr_sectors: 4,
        segs: vec![],
    })
    .unwrap();
    out.clear();
    for _ in 0..2000 {
        drv.poll(&mut out).unwrap();
        if out.len() == 2 {
            break;
        }
        drv.wait(Duration::from_millis(5)).unwrap();
    }
    assert!(out.iter().all(|c| c.ok), "{out:?}");
    assert_eq!(image(&r, 100, 2048), vec![0; 2048]);
    assert_eq!(image(&r, 104, 2048), pattern(3)[2048..]);
    // Unpinned memory: the device faults and asks for a reset; the driver reports it.
    p.unpin_grant(iova).unwrap();
    drv.submit(DevRequest {
        token: 10,
        op: DevOp::Write,
        sector: 0,
        nr_sectors: 8,
        segs: vec![IovaSeg { iova, len: 4096 }],
    })
    .unwrap();
    let mut failed = false;
    for _ in 0..2000 {
        out.clear();
        match drv.poll(&mut out) {
            Err(_) => {
                failed = true;
                break;
            }
            Ok(()) if out.iter().any(|c| !c.ok) => {
                failed = true;
                break;
            }
            Ok(()) => drv.wait(Duration::from_millis(5)).unwrap(),
        }
    }
    assert!(failed, "a DMA to an unpinned IOVA must not succeed");
    assert!(r.iommu.device().faults() >= 1);
    drop(drv);
    assert!(r.iommu.is_empty(), "the driver released its queue pins");
    let _ = &r.sys;
}

#[test]
fn guest_disk_through_blkback_and_the_virtio_driver() {
    let r = rig(4096);
    let drv = VirtioBlkDriver::probe(r.idd.clone(), LocalIo::new(r.space.clone()), FRAMES).unwrap();
    let mut back = Blkback::new(
        r.idd.clone(),
        drv,
        BackendConfig {
            batch: 8,
            scratch_frame: SCRATCH,
        },
    );
    let mut a = Front::new(&r.sys, r.idd.domid(), "a");
    let mut b = Front::new(&r.sys, r.idd.domid(), "b");
    back.attach(a.channel(
        Region {
            offset: 0,
            sectors: 1024,
        },
        false,
        journal_frame(0),
    ))
    .unwrap();
    back.attach(b.channel(
        Region {
            offset: 1024,
            sectors: 1024,
        },
        true,
        journal_frame(1),
    ))
    .unwrap();
    // Guest a writes 16 consecutive pages with one request per page: the elevator merges them.
    for p in 0..16 {
        a.fill(p, &pattern(500 + p as u64));
        let w = a.rw(true, 64 + 8 * p as u64, &[p]);
        a.post(&w);
    }
    let rs = run_until(&mut back, &mut a, 16);
    assert!(rs.iter().all(|x| x.status == BLKIF_RSP_OKAY), "{rs:?}");
    for p in 0..16u64 {
        assert_eq!(image(&r, 64 + 8 * p, 4096), pattern(500 + p));
    }
    // Flush, then read everything back with 11-segment reads.
    a.post(&BlkRequest::Flush(RwRequest {
        id: 1000,
        handle: 0,
        sector: 0,
        segments: Segments::default(),
    }));
    let pages: Vec<usize> = (20..31).collect();
    let rd = a.rw(false, 64, &pages);
    a.post(&rd);
    let rs = run_until(&mut back, &mut a, 2);
    assert!(rs.iter().all(|x| x.status == BLKIF_RSP_OKAY));
    for (i, p) in pages.iter().enumerate() {
        assert_eq!(a.page(*p), pattern(500 + i as u64));
    }
    // The read-only guest b can read its own region but not write or discard it.
    let w = b.rw(true, 0, &[0]);
    b.post(&w);
    b.post(&BlkRequest::Discard(DiscardRequest {
        id: 5,
        handle: 0,
        sector: 0,
        nr_sectors: 8,
        secure: false,
    }));
    let rd = b.rw(false, 0, &[1]);
    b.post(&rd);
    let rs = run_until(&mut back, &mut b, 3);
    let ok: Vec<bool> = [w.id(), 5, rd.id()]
        .iter()
        .map(|id| rs.iter().find(|x| x.id == *id).unwrap().status == BLKIF_RSP_OKAY)
        .collect();
    assert_eq!(ok, [false, false, true]);
    // Only the driver's two queue pages remain pinned.
    assert_eq!(r.iommu.len(), 2);
}

/// A driver that dies with chains at the device (its process was killed: no Drop, no reset),
/// then a new driver of the same domain probes the same device and must be served.
#[test]
fn a_new_driver_after_a_dead_one_with_chains_in_flight_is_served() {
    let r = rig(2048);
    let p = &*r.idd;
    let mut pins = Vec::new();
    for f in 24..28u64 {
        p.write_local(f, 0, &pattern(f)).unwrap();
        let g = p.grant_access(p.domid(), f, false).unwrap();
        pins.push(p.pin_grant(p.domid(), g, true).unwrap());
    }
    let write = |token: u64, iova: u64| DevRequest {
        token,
        op: DevOp::Write,
        sector: token * 8,
        nr_sectors: 8,
        segs: vec![IovaSeg { iova, len: 4096 }],
    };
    for round in 0..5u64 {
        let mut old =
            VirtioBlkDriver::probe(r.idd.clone(), LocalIo::new(r.space.clone()), FRAMES).unwrap();
        for (i, iova) in pins.iter().enumerate() {
            old.submit(write(i as u64 + 10 * round, *iova)).unwrap();
        }
        // The process dies: nothing of the driver runs any more.
        std::mem::forget(old);
        let mut new =
            VirtioBlkDriver::probe(r.idd.clone(), LocalIo::new(r.space.clone()), FRAMES).unwrap();
        for (i, iova) in pins.iter().enumerate() {
            new.submit(write(i as u64 + 100 + 10 * round, *iova))
                .unwrap();
        }
        let mut out = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while out.len() < pins.len() {
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: only {} of {} completions: {}",
                out.len(),
                pins.len(),
                new.describe()
            );
            new.poll(&mut out).unwrap();
            new.wait(Duration::from_millis(5)).unwrap();
        }
        assert!(out.iter().all(|c| c.ok), "{out:?}");
        std::mem::forget(new);
    }
}

#[test]
fn merged_requests_beyond_the_free_descriptors_wait_and_all_complete_in_order() {
    let r = rig(16384);
    let mut drv =
        VirtioBlkDriver::probe(r.idd.clone(), LocalIo::new(r.space.clone()), FRAMES).unwrap();
    let segs = drv.max_segments();
    assert!(segs + 2 <= usize::from(idd_blk::virtio::QUEUE_SIZE));
    let p = &*r.idd;
    p.write_local(25, 0, &pattern(5)).unwrap();
    let g = p.grant_access(p.domid(), 25, false).unwrap();
    let iova = p.pin_grant(p.domid(), g, true).unwrap();
    // More full-size requests than the queue's descriptors hold at once, and more than
    // `queue_depth` allows: the driver must hold them, never answer Busy.
    let n = 2 * drv.queue_depth().max(4);
    for t in 0..n as u64 {
        drv.submit(DevRequest {
            token: t,
            op: DevOp::Write,
            sector: t * 8 * segs as u64,
            nr_sectors: 8 * segs as u64,
            segs: vec![IovaSeg { iova, len: 4096 }; segs],
        })
        .unwrap_or_else(|e| panic!("request {t} refused: {e}"));
    }
    assert_eq!(drv.in_flight(), n);
    let mut out = Vec::new();
    for _ in 0..4000 {
        drv.poll(&mut out).unwrap();
        if out.len() == n {
            break;
        }
        drv.wait(Duration::from_millis(5)).unwrap();
    }
    assert_eq!(out.len(), n, "{}", drv.describe());
    assert!(out.iter().all(|c| c.ok), "{out:?}");
    assert_eq!(drv.in_flight(), 0);
    let last = (n as u64 - 1) * 8 * segs as u64 + 8 * (segs as u64 - 1);
    assert_eq!(image(&r, last, 4096), pattern(5));
    // A request larger than the queue is refused outright.
    assert!(drv
        .submit(DevRequest {
            token: 999,
            op: DevOp::Read,
            sector: 0,
            nr_sectors: 8 * (segs as u64 + 1),
            segs: vec![IovaSeg { iova, len: 4096 }; segs + 1],
        })
        .is_err());
    p.unpin_grant(iova).unwrap();
}
