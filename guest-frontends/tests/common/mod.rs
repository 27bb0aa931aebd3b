//! The manager's part for blkback in these tests: an IDD domain (in-process, `LocalPlatform`
//! with an IOMMU) running the real blkback from `idd-blk` over a raw image, driven through
//! XenStore as the device manager will (blkback itself does no XenStore): advertise the disk,
//! read `ring-ref`/`event-channel`, attach; close on request; die on request.
#![allow(dead_code, missing_docs, clippy::cast_possible_truncation)]

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devchan::grant::DomId;
use devchan::xenbus::{Action, Handshake, Role, XenbusState};
use devchan::xenstore::client::NO_TX;
use devchan::xenstore::perms::{Perm, PERM_READ};
use devchan::xenstore::Client;
use hypervisor::domain::DomainConfig;
use hypervisor::local::LocalPlatform;
use hypervisor::system::System;
use hypervisor::xenstored::socket;
use idd_blk::blkback::{BackendConfig, Blkback, ChannelConfig, Region};
use idd_blk::device::FileDevice;
use iospace::iommu::Iommu;
use std::os::unix::net::UnixStream;

/// The virtual device number.
pub const DEVID: u16 = 51712;
/// Disk size: 4 MiB.
pub const SECTORS: u64 = 8192;

/// The frontend's XenStore directory.
pub fn front_dir(guest: DomId) -> String {
    format!("/local/domain/{guest}/device/vbd/{DEVID}")
}

/// Start a new IDD domain running blkback over `image` for `guest`'s disk, and point the
/// frontend at it (the manager's signal).
pub fn start_idd(
    sys: &Arc<System>,
    image: &std::fs::File,
    xs_path: &Path,
    guest: DomId,
    mode: Mode,
) -> BackendDriver {
    let iommu = Iommu::new(512);
    let idd = sys
        .create_domain(DomainConfig {
            name: "idd-blk".into(),
            nr_frames: 32,
            iommu: Some(iommu.clone()),
        })
        .unwrap();
    let plat = Arc::new(LocalPlatform::new(sys.clone(), idd).unwrap());
    let image = image.try_clone().unwrap();
    let back_dir = format!("/local/domain/{idd}/backend/vbd/{}/{DEVID}", guest);
    let mut xs = socket::connect(xs_path).unwrap();
    let fd = front_dir(guest);
    // The backend directory: the IDD owns it, the guest may read it.
    let perms = [Perm::new(idd, 0), Perm::new(guest, PERM_READ)];
    for p in [
        format!("/local/domain/{idd}/backend"),
        format!("/local/domain/{idd}/backend/vbd"),
        format!("/local/domain/{idd}/backend/vbd/{guest}"),
        back_dir.clone(),
    ] {
        xs.write(NO_TX, &p, b"").unwrap();
        xs.set_perms(NO_TX, &p, &perms).unwrap();
    }
    xs.write(NO_TX, &format!("{back_dir}/frontend"), fd.as_bytes())
        .unwrap();
    xs.write(
        NO_TX,
        &format!("{back_dir}/frontend-id"),
        guest.to_string().as_bytes(),
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
    let close = Arc::new(AtomicBool::new(false));
    let (st, cl) = (stop.clone(), close.clone());
    let xs = socket::connect(xs_path).unwrap();
    let thread = std::thread::spawn(move || {
        let device =
            move || FileDevice::new(image.try_clone().unwrap(), iommu.device(), false).unwrap();
        run_backend(plat, &device, xs, guest, &fd, &back_dir, &st, &cl, mode);
    });
    BackendDriver {
        idd,
        stop,
        close,
        thread: Some(thread),
    }
}

/// A backend domain running blkback, driven through XenStore by this test.
pub struct BackendDriver {
    pub idd: DomId,
    stop: Arc<AtomicBool>,
    close: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// What the backend domain runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    /// The real blkback.
    Blkback,
    /// A broken backend (see [`Lie`]).
    Hostile(Lie),
}

/// How a hostile backend breaks the protocol.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Lie {
    /// Answers every request with an id that was never issued.
    UnknownId,
    /// Answers with the right id and a status that does not exist.
    BadStatus,
    /// Publishes a response producer index far ahead of the requests.
    Overflow,
}

impl BackendDriver {
    /// Close the device from the backend side (XenBus `Closing`), then serve again when the
    /// frontend comes back.
    pub fn close(&self) {
        self.close.store(true, Ordering::Release);
    }

    /// Crash: stop serving at once (answering nothing more) and destroy the domain, which
    /// releases its mappings and pins.
    pub fn kill(mut self, sys: &System) {
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

#[allow(clippy::too_many_arguments)]
fn run_backend(
    plat: Arc<LocalPlatform>,
    device: &dyn Fn() -> FileDevice,
    mut xs: Client<UnixStream>,
    guest: DomId,
    front_dir: &str,
    back_dir: &str,
    stop: &AtomicBool,
    close: &AtomicBool,
    mode: Mode,
) {
    let mut back: Option<Blkback<LocalPlatform, FileDevice>> = None;
    let mut hostile: Option<Hostile> = None;
    let mut journal_frame = 8;
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
        let mut action = hs.on_peer(peer);
        if close.swap(false, Ordering::AcqRel) {
            action = hs.close();
        }
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
                if let Mode::Hostile(lie) = mode {
                    hostile = Hostile::new(&plat, guest, ring_ref, remote_port, lie);
                    if hostile.is_none() {
                        let a = hs.close();
                        hs.completed(a);
                        w(&mut xs, "state", hs.state().to_xenstore());
                        continue;
                    }
                    hs.completed(action);
                    w(&mut xs, "state", hs.state().to_xenstore());
                    continue;
                }
                let mut b = Blkback::new(
                    plat.clone(),
                    device(),
                    BackendConfig {
                        batch: 8,
                        scratch_frame: 7,
                    },
                );
                let attached = b.attach(ChannelConfig {
                    guest,
                    ring_ref,
                    remote_port,
                    region: Region {
                        offset: 0,
                        sectors: SECTORS,
                    },
                    read_only: false,
                    journal_frame,
                });
                // A later attach (after a close) gets a fresh journal.
                journal_frame += 2;
                if attached.is_err() {
                    // A stale ring-ref (granted to the backend this one replaced): ask the
                    // frontend to start over, as Linux's blkback does on a failed map.
                    let a = hs.close();
                    hs.completed(a);
                    w(&mut xs, "state", hs.state().to_xenstore());
                    continue;
                }
                back = Some(b);
            }
            Action::TearDown(_) => {
                back = None;
                hostile = None;
            }
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
            None => match hostile.as_mut() {
                Some(h) => h.serve(&plat),
                None => std::thread::sleep(Duration::from_millis(5)),
            },
        }
    }
}

/// The broken backend of [`Mode::Hostile`].
struct Hostile {
    ring: devchan::blkif::BlkifBackRing,
    map: hypervisor::local::LocalMapping,
    port: devchan::platform::Port,
    lie: Lie,
}

impl Hostile {
    fn new(
        plat: &LocalPlatform,
        guest: DomId,
        ring_ref: u32,
        remote_port: u32,
        lie: Lie,
    ) -> Option<Self> {
        use devchan::platform::{Platform, SharedPage};
        let map = plat.map_grant(guest, ring_ref, false).ok()?;
        let base = std::ptr::NonNull::new(map.as_ptr()).unwrap();
        // SAFETY: the mapping is a live 4 KiB page kept in the same struct (dropped after the
        // ring, field order); it is accessed only through this ring.
        let ring = unsafe { devchan::blkif::BlkifBackRing::attach(base, 4096).unwrap() };
        let port = plat.evtchn_bind_interdomain(guest, remote_port).ok()?;
        Some(Self {
            ring,
            map,
            port,
            lie,
        })
    }

    fn serve(&mut self, plat: &LocalPlatform) {
        use devchan::blkif::{BlkStatus, BlkifResponse};
        use devchan::platform::Platform;
        std::thread::sleep(Duration::from_millis(5));
        while let Ok(Some(req)) = self.ring.get_request() {
            let rsp = match self.lie {
                Lie::UnknownId => BlkifResponse::new(req.id + 1000, req.operation, BlkStatus::Okay),
                Lie::BadStatus => BlkifResponse {
                    status: 7,
                    ..BlkifResponse::new(req.id, req.operation, BlkStatus::Okay)
                },
                Lie::Overflow => {
                    use devchan::platform::SharedPage;
                    // rsp_prod (offset 8 of the shared header) far ahead of any request.
                    // SAFETY: offset 8 is the 4-aligned rsp_prod word inside the mapped
                    // page; the frontend reads it atomically, a volatile store is what a
                    // hostile peer's plain store looks like.
                    unsafe {
                        self.map
                            .as_ptr()
                            .add(8)
                            .cast::<u32>()
                            .write_volatile(1 << 20)
                    };
                    let _ = plat.evtchn_notify(self.port);
                    continue;
                }
            };
            if self.ring.put_response(&rsp).is_ok() && self.ring.push_responses() {
                let _ = plat.evtchn_notify(self.port);
            }
        }
    }
}

pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((i.wrapping_mul(31) ^ seed.wrapping_mul(0x9e37_79b9)) % 251) as u8)
        .collect()
}
