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
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devchan::grant::DomId;
use devchan::xenbus::{Action, Handshake, Role, XenbusState};
use devchan::xenstore::client::NO_TX;
use devchan::xenstore::Client;
use guest_frontends::blkfront::{BlkFront, BlkFrontConfig};
use guest_frontends::block::BlockDevice;
use guest_frontends::nbd::{Export, NbdServer};
use hypervisor::domain::DomainConfig;
use hypervisor::local::LocalPlatform;
use hypervisor::system::System;
use hypervisor::xenstored::socket::{self, ServerHandle, SocketServer};
use hypervisor::xenstored::Xenstored;
use idd_blk::blkback::{BackendConfig, Blkback, ChannelConfig, Region};
use idd_blk::device::FileDevice;
use iospace::iommu::Iommu;
use std::os::unix::net::UnixStream;

const DEVID: u16 = 51712;
const SECTORS: u64 = 8192; // 4 MiB

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

    fn front_dir(&self) -> String {
        format!("/local/domain/{}/device/vbd/{DEVID}", self.guest)
    }

    /// Start a new IDD domain serving the image and point the frontend at it.
    fn start_backend(&self) -> BackendDriver {
        let iommu = Iommu::new(512);
        let idd = self
            .sys
            .create_domain(DomainConfig {
                name: "idd-blk".into(),
                nr_frames: 32,
                iommu: Some(iommu.clone()),
            })
            .unwrap();
        let plat = Arc::new(LocalPlatform::new(self.sys.clone(), idd).unwrap());
        let device =
            FileDevice::new(self.image.try_clone().unwrap(), iommu.device(), false).unwrap();
        let back_dir = format!("/local/domain/{idd}/backend/vbd/{}/{DEVID}", self.guest);
        let mut xs = self.xs();
        let fd = self.front_dir();
        xs.write(NO_TX, &format!("{back_dir}/frontend"), fd.as_bytes())
            .unwrap();
        xs.write(
            NO_TX,
            &format!("{back_dir}/frontend-id"),
            self.guest.to_string().as_bytes(),
        )
        .unwrap();
        // The manager's signal: the frontend now names the new backend.
        xs.write(
            NO_TX,
            &format!("{fd}/backend-id"),
            idd.to_string().as_bytes(),
        )
        .unwrap();
        xs.write(NO_TX, &format!("{fd}/backend"), back_dir.as_bytes())
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let guest = self.guest;
        let st = stop.clone();
        let xs = self.xs();
        let thread = std::thread::spawn(move || {
            run_backend(plat, device, xs, guest, &fd, &back_dir, &st);
        });
        BackendDriver {
            idd,
            stop,
            thread: Some(thread),
        }
    }

    fn frontend(&self) -> BlkFront<LocalPlatform, Client<UnixStream>> {
        let mut cfg = BlkFrontConfig::new(self.guest, DEVID);
        cfg.stall_timeout = Duration::from_millis(500);
        cfg.io_timeout = Some(Duration::from_secs(30));
        BlkFront::connect(self.guest_plat.clone(), self.xs(), cfg).unwrap()
    }
}

/// A backend domain running blkback, driven through XenStore by this test.
struct BackendDriver {
    idd: DomId,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl BackendDriver {
    /// Crash: stop serving at once (answering nothing more) and destroy the domain, which
    /// releases its mappings and pins.
    fn kill(mut self, sys: &System) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        sys.destroy_domain(self.idd).unwrap();
    }
}

impl Drop for BackendDriver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run_backend(
    plat: Arc<LocalPlatform>,
    device: FileDevice,
    mut xs: Client<UnixStream>,
    guest: DomId,
    front_dir: &str,
    back_dir: &str,
    stop: &AtomicBool,
) {
    let mut device = Some(device);
    let mut back: Option<Blkback<LocalPlatform, FileDevice>> = None;
    let mut hs = Handshake::new(Role::Backend);
    let w = |xs: &mut Client<UnixStream>, k: &str, v: String| {
        xs.write(NO_TX, &format!("{back_dir}/{k}"), v.as_bytes())
            .unwrap();
    };
    while !stop.load(Ordering::Acquire) {
        let peer = xs
            .read(NO_TX, &format!("{front_dir}/state"))
            .ok()
            .and_then(|v| XenbusState::from_xenstore(&v).ok())
            .unwrap_or(XenbusState::Unknown);
        let action = hs.on_peer(peer);
        match action {
            Action::Advertise => {
                w(&mut xs, "sectors", SECTORS.to_string());
                w(&mut xs, "sector-size", "512".into());
                w(&mut xs, "info", "0".into());
                w(&mut xs, "feature-flush-cache", "1".into());
                w(&mut xs, "feature-discard", "1".into());
                w(&mut xs, "feature-max-indirect-segments", "16".into());
            }
            Action::MapRing { resume: true } => {
                // A new backend domain cannot re-attach to a ring granted to its predecessor:
                // ask the frontend to reconnect by closing.
                let a = hs.close();
                hs.completed(a);
                w(&mut xs, "state", hs.state().to_xenstore());
                continue;
            }
            Action::MapRing { resume: false } => {
                let rd = |xs: &mut Client<UnixStream>, k: &str| -> u32 {
                    let v = xs.read(NO_TX, &format!("{front_dir}/{k}")).unwrap();
                    String::from_utf8(v).unwrap().parse().unwrap()
                };
                let ring_ref = rd(&mut xs, "ring-ref");
                let remote_port = rd(&mut xs, "event-channel");
                let proto = xs.read(NO_TX, &format!("{front_dir}/protocol")).unwrap();
                assert_eq!(proto, b"x86_64-abi");
                let mut b = Blkback::new(
                    plat.clone(),
                    device
                        .take()
                        .expect("one attach per backend domain in this test"),
                    BackendConfig {
                        batch: 8,
                        scratch_frame: 7,
                    },
                );
                b.attach(ChannelConfig {
                    guest,
                    ring_ref,
                    remote_port,
                    region: Region {
                        offset: 0,
                        sectors: SECTORS,
                    },
                    read_only: false,
                    journal_frame: 8,
                })
                .unwrap();
                back = Some(b);
            }
            Action::TearDown(_) => back = None,
            Action::Wait | Action::PublishRing | Action::Connect => {}
        }
        if let Some(s) = hs.completed(action) {
            w(&mut xs, "state", s.to_xenstore());
            continue;
        }
        match back.as_mut() {
            Some(b) => {
                let until = Instant::now() + Duration::from_millis(20);
                while Instant::now() < until && !stop.load(Ordering::Acquire) {
                    b.run_once(Duration::from_millis(2)).unwrap();
                }
            }
            None => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((i.wrapping_mul(31) ^ seed.wrapping_mul(0x9e37_79b9)) % 251) as u8)
        .collect()
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

#[test]
fn reconnects_to_a_new_backend_and_reissues() {
    let w = World::new();
    let b1 = w.start_backend();
    let f = Arc::new(Mutex::new(w.frontend()));
    let first_backend = f.lock().unwrap().backend_domain();
    // Writer: keeps 16 writes in flight over the whole disk, remembering what was
    // acknowledged; the model is updated only on acknowledgement.
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
                        // 4 KiB..64 KiB at a spread of sectors, never overlapping in a batch.
                        let sector = (i * 512 + (seed * 8) % 256) % (SECTORS - 128);
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
    // Crash the IDD with requests in flight; the manager starts a new one.
    b1.kill(&w.sys);
    std::thread::sleep(Duration::from_millis(100));
    let _b2 = w.start_backend();
    std::thread::sleep(Duration::from_millis(800));
    done.store(true, Ordering::Release);
    let acked = writer.join().unwrap();
    let mut f = f.lock().unwrap();
    let stats = f.stats();
    assert!(acked >= 64, "acked {acked}");
    assert_eq!(stats.connects, 2, "{stats:?}");
    assert_ne!(f.backend_domain(), first_backend);
    eprintln!("acked {acked} writes; {stats:?}");
    // Every acknowledged write reads back, through the new backend and in the image.
    let model = model.lock().unwrap();
    let mut all = vec![0u8; model.len()];
    f.read(0, &mut all).unwrap();
    assert!(all == *model, "disk differs from the acknowledged writes");
    let mut img = vec![0u8; model.len()];
    w.image.read_exact_at(&mut img, 0).unwrap();
    assert!(img == *model, "image differs from the acknowledged writes");
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
