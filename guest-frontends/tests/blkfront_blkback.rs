//! blkfront against the real blkback (`idd-blk`), both in-process on `LocalPlatform`
//! domains of one `System`, connected through XenStore (the real daemon, over its socket).
//!
//! blkback itself does no XenStore; the test plays the manager's part for it ([`BackendDriver`]:
//! advertise the disk, read `ring-ref`/`event-channel`, attach), as the device manager will.
//! The reconnect test kills the backend domain with requests in flight, brings up a new IDD
//! domain on the same image, points the frontend at it, and checks that every acknowledged
//! write reads back.
#![allow(clippy::cast_possible_truncation)]

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devchan::grant::DomId;
use devchan::xenstore::Client;
use guest_frontends::blkfront::{BlkFront, BlkFrontConfig, Stats};
use guest_frontends::block::BlockDevice;
use guest_frontends::nbd::{Export, NbdServer};
use hypervisor::domain::DomainConfig;
use hypervisor::local::LocalPlatform;
use hypervisor::system::System;
use hypervisor::xenstored::socket::{self, ServerHandle, SocketServer};
use hypervisor::xenstored::Xenstored;
use std::os::unix::net::UnixStream;

mod common;
use common::*;

struct World {
    sys: Arc<System>,
    xs: ServerHandle,
    image: std::fs::File,
    dir: tempfile::TempDir,
    guest: DomId,
    guest_plat: Arc<LocalPlatform>,
}

impl World {
    fn new() -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let sys = System::new();
        let dir = tempfile::tempdir().unwrap();
        let xs = SocketServer::bind(dir.path().join("xs.sock"), Xenstored::new())
            .unwrap()
            .spawn()
            .unwrap();
        let image = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("disk.img"))
            .unwrap();
        image.set_len(SECTORS * 512).unwrap();
        let guest = sys
            .create_domain(DomainConfig {
                name: "guest".into(),
                nr_frames: 32,
                iommu: None,
            })
            .unwrap();
        let guest_plat = Arc::new(LocalPlatform::new(sys.clone(), guest).unwrap());
        Self {
            sys,
            xs,
            image,
            dir,
            guest,
            guest_plat,
        }
    }

    fn xs(&self) -> Client<UnixStream> {
        socket::connect(self.xs.path()).unwrap()
    }

    /// Start a new IDD domain serving the image and point the frontend at it.
    fn start_backend(&self) -> BackendDriver {
        self.start_backend_mode(Mode::Blkback)
    }

    fn start_backend_mode(&self, mode: Mode) -> BackendDriver {
        start_idd(&self.sys, &self.image, self.xs.path(), self.guest, mode)
    }

    fn frontend(&self) -> BlkFront<LocalPlatform, Client<UnixStream>> {
        let mut cfg = BlkFrontConfig::new(self.guest, DEVID);
        cfg.stall_timeout = Duration::from_millis(500);
        cfg.io_timeout = Some(Duration::from_secs(30));
        BlkFront::connect(self.guest_plat.clone(), self.xs(), cfg).unwrap()
    }
}

#[test]
fn connects_reads_writes_flushes_discards() {
    let w = World::new();
    let _b = w.start_backend();
    let mut f = w.frontend();
    assert_eq!(f.capacity(), SECTORS * 512);
    let info = f.backend_info().unwrap();
    assert!(info.flush && info.discard && info.max_indirect_segments == 16);
    // Small, direct (11 pages), indirect (16 pages) and multi-piece sizes.
    for (i, (sector, len)) in [
        (0u64, 512usize),
        (9, 4096 * 11),
        (200, 4096 * 16),
        (1000, 300 * 1024),
    ]
    .into_iter()
    .enumerate()
    {
        let data = pattern(i as u64, len);
        f.write(sector, &data).unwrap();
        let mut back = vec![0u8; len];
        f.read(sector, &mut back).unwrap();
        assert_eq!(back, data, "sector {sector} len {len}");
        let mut img = vec![0u8; len];
        w.image.read_exact_at(&mut img, sector * 512).unwrap();
        assert_eq!(img, data, "image at sector {sector}");
    }
    f.flush().unwrap();
    f.discard(1000, 8, false).unwrap();
    let mut z = vec![1u8; 4096];
    f.read(1000, &mut z).unwrap();
    assert!(
        z.iter().all(|b| *b == 0),
        "discarded sectors read as zeroes"
    );
    // Bounds and alignment are checked before anything reaches the ring.
    assert!(f.read(SECTORS, &mut [0u8; 512]).is_err());
    assert!(f.write(SECTORS - 1, &[0u8; 1024]).is_err());
    assert!(f.write(0, &[0u8; 100]).is_err());
    // Queue depth: 24 writes in flight at once, then read them all back.
    let tokens: Vec<_> = (0..24u64)
        .map(|i| {
            f.submit_write(2000 + i * 16, pattern(100 + i, 8192))
                .unwrap()
        })
        .collect();
    for t in tokens {
        f.wait(t).unwrap();
    }
    for i in 0..24u64 {
        let mut b = vec![0u8; 8192];
        f.read(2000 + i * 16, &mut b).unwrap();
        assert_eq!(b, pattern(100 + i, 8192));
    }
    assert_eq!(f.stats().connects, 1);
    assert_eq!(f.stats().protocol_errors, 0);
}

/// A writer keeping 16 writes in flight (overlapping each other at random) while `disrupt`
/// runs; the model of the disk is updated only when a write is acknowledged, in submission
/// order (the order the shadow table keeps overlapping writes in). Afterwards every byte of
/// the disk, read through the frontend and straight from the image, must match the model.
fn workload_across(w: &World, disrupt: impl FnOnce() -> Vec<BackendDriver>) -> (u64, Stats) {
    let f = Arc::new(Mutex::new(w.frontend()));
    let model = Arc::new(Mutex::new(vec![0u8; (SECTORS * 512) as usize]));
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let (f, model, done) = (f.clone(), model.clone(), done.clone());
        std::thread::spawn(move || {
            let mut acked = 0u64;
            let mut round = 0u64;
            while !done.load(Ordering::Acquire) || round < 4 {
                let mut f = f.lock().unwrap();
                let batch: Vec<_> = (0..16u64)
                    .map(|i| {
                        let seed = round * 16 + i;
                        // 4 KiB..64 KiB anywhere: writes in a batch overlap.
                        let sector = (seed.wrapping_mul(2_654_435_761) >> 7) % (SECTORS - 128);
                        let data = pattern(seed, 4096 * (1 + (seed % 16) as usize));
                        let t = f.submit_write(sector, data.clone()).unwrap();
                        (t, sector, data)
                    })
                    .collect();
                for (t, sector, data) in batch {
                    f.wait(t).unwrap();
                    let off = (sector * 512) as usize;
                    model.lock().unwrap()[off..off + data.len()].copy_from_slice(&data);
                    acked += 1;
                }
                round += 1;
            }
            acked
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let _keep = disrupt();
    std::thread::sleep(Duration::from_millis(800));
    done.store(true, Ordering::Release);
    let acked = writer.join().unwrap();
    let mut f = f.lock().unwrap();
    let stats = f.stats();
    eprintln!("acked {acked} writes; {stats:?}");
    let model = model.lock().unwrap();
    let mut all = vec![0u8; model.len()];
    f.read(0, &mut all).unwrap();
    assert!(all == *model, "disk differs from the acknowledged writes");
    let mut img = vec![0u8; model.len()];
    w.image.read_exact_at(&mut img, 0).unwrap();
    assert!(img == *model, "image differs from the acknowledged writes");
    assert!(acked >= 64, "acked {acked}");
    (acked, stats)
}

#[test]
fn reconnects_to_a_new_backend_and_reissues() {
    let w = World::new();
    let b1 = w.start_backend();
    let (_, stats) = workload_across(&w, || {
        // Crash the IDD with requests in flight; the manager starts a new one at once.
        b1.kill(&w.sys);
        std::thread::sleep(Duration::from_millis(50));
        vec![w.start_backend()]
    });
    assert_eq!((stats.connects, stats.disconnects), (2, 1), "{stats:?}");
    assert_eq!(stats.protocol_errors, 0);
}

#[test]
fn reconnects_after_a_stall_when_the_manager_is_slow() {
    let w = World::new();
    let b1 = w.start_backend();
    let (_, stats) = workload_across(&w, || {
        // The IDD dies and nothing is said for longer than the stall timeout (500 ms): the
        // frontend gives up on it, then connects to the new one when it is named.
        b1.kill(&w.sys);
        std::thread::sleep(Duration::from_millis(1200));
        vec![w.start_backend()]
    });
    assert_eq!(stats.connects, 2, "{stats:?}");
    assert!(stats.reissued > 0, "{stats:?}");
}

#[test]
fn reconnects_when_the_backend_closes() {
    let w = World::new();
    let b1 = w.start_backend();
    let (_, stats) = workload_across(&w, || {
        // The backend says Closing (XenBus) with requests in flight, then serves again.
        b1.close();
        vec![b1]
    });
    assert_eq!(stats.connects, 2, "{stats:?}");
}

#[test]
fn a_backend_that_answers_unknown_ids_is_dropped() {
    hostile_backend_is_dropped(Lie::UnknownId);
}

#[test]
fn a_backend_that_answers_an_unknown_status_is_dropped() {
    hostile_backend_is_dropped(Lie::BadStatus);
}

#[test]
fn a_backend_whose_response_index_runs_ahead_is_dropped() {
    hostile_backend_is_dropped(Lie::Overflow);
}

fn hostile_backend_is_dropped(lie: Lie) {
    let w = World::new();
    let bad = w.start_backend_mode(Mode::Hostile(lie));
    let mut cfg = BlkFrontConfig::new(w.guest, DEVID);
    cfg.io_timeout = Some(Duration::from_secs(30));
    let mut f = BlkFront::connect(w.guest_plat.clone(), w.xs(), cfg).unwrap();
    let t = f.submit_write(64, pattern(1, 8192)).unwrap();
    // The bogus answer is a protocol error: the frontend drops the connection, nothing is
    // completed, and the write is still owed.
    let deadline = Instant::now() + Duration::from_secs(10);
    while f.stats().protocol_errors == 0 {
        assert!(Instant::now() < deadline, "no protocol error seen");
        assert!(f.poll(Duration::from_millis(20)).unwrap().is_empty());
    }
    assert!(!f.is_connected() || f.stats().connects > 1);
    // The manager replaces the broken backend; the write completes there.
    bad.kill(&w.sys);
    let _good = w.start_backend();
    f.wait(t).unwrap();
    let mut b = vec![0u8; 8192];
    f.read(64, &mut b).unwrap();
    assert_eq!(b, pattern(1, 8192));
    let mut img = vec![0u8; 8192];
    w.image.read_exact_at(&mut img, 64 * 512).unwrap();
    assert_eq!(img, pattern(1, 8192));
}

#[test]
fn nbd_clients_through_blkfront_and_blkback() {
    if !Command::new("qemu-io")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        eprintln!("SKIPPED: qemu-io is not installed (apt-get install qemu-utils)");
        return;
    }
    let w = World::new();
    let _b = w.start_backend();
    let f = Arc::new(Mutex::new(w.frontend()));
    let dev: Arc<dyn BlockDevice> = f.clone();
    assert_eq!(dev.size(), SECTORS * 512);
    let srv = NbdServer::spawn(
        w.dir.path().join("nbd.sock"),
        Export {
            name: "xvda".into(),
            device: dev,
        },
    )
    .unwrap();
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "read -P 0xab 0 1M",
            "-c",
            "write -P 0x11 1000 5000",
            "-c",
            "read -P 0x11 1000 5000",
            "-c",
            "read -P 0xab 6144 1042432",
            "-c",
            "flush",
            &srv.uri(),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}");
    assert!(!text.contains("Pattern verification failed"), "{text}");
    let mut img = vec![0u8; 1000];
    w.image.read_exact_at(&mut img, 0).unwrap();
    assert!(img.iter().all(|b| *b == 0xab));
    let mut img = vec![0u8; 5000];
    w.image.read_exact_at(&mut img, 1000).unwrap();
    assert!(img.iter().all(|b| *b == 0x11));
    if Command::new("nbdcopy")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        let src = w.dir.path().join("in.img");
        let data = pattern(7, (SECTORS * 512) as usize);
        std::fs::write(&src, &data).unwrap();
        let ok = Command::new("nbdcopy")
            .args([src.to_str().unwrap(), &srv.uri()])
            .status()
            .unwrap();
        assert!(ok.success());
        let out = w.dir.path().join("out.img");
        let ok = Command::new("nbdcopy")
            .args([&srv.uri(), out.to_str().unwrap()])
            .status()
            .unwrap();
        assert!(ok.success());
        assert!(
            std::fs::read(&out).unwrap() == data,
            "nbdcopy round trip differs"
        );
    } else {
        eprintln!("SKIPPED nbdcopy part: libnbd-bin is not installed");
    }
}

use std::process::Command;

#[test]
fn concurrent_users_share_the_ring_and_unaligned_writes_do_not_clobber() {
    let w = World::new();
    let _b = w.start_backend();
    let f = Arc::new(Mutex::new(w.frontend()));
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let dev: Arc<dyn BlockDevice> = f.clone();
            std::thread::spawn(move || {
                for round in 0..20u64 {
                    // Each thread owns 50 bytes of the same two sectors (read-modify-write)...
                    let b = u8::try_from(t * 20 + round).unwrap();
                    dev.write_at(t * 200 + 7, &[b; 50]).unwrap();
                    // ...and a 64 KiB area of its own, written whole.
                    let data = pattern(t * 100 + round, 64 * 1024);
                    dev.write_at((1 + t) * (256 << 10), &data).unwrap();
                    let mut back = vec![0u8; data.len()];
                    dev.read_at((1 + t) * (256 << 10), &mut back).unwrap();
                    assert!(back == data);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let dev: Arc<dyn BlockDevice> = f.clone();
    let mut head = vec![0u8; 1024];
    dev.read_at(0, &mut head).unwrap();
    for t in 0..4u64 {
        let want = u8::try_from(t * 20 + 19).unwrap();
        let at = (t * 200 + 7) as usize;
        assert!(
            head[at..at + 50].iter().all(|x| *x == want),
            "thread {t}'s bytes lost"
        );
    }
}
