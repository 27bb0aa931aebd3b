//! virtio-blk-pci end to end: a minimal driver written here programs the emulated device only
//! through its I/O Space (config view, MMIO, MSI-X eventfds) and gives it memory only through
//! a real `Iommu`, then writes, reads and checks the image file; bad descriptors fault.

use iospace::emu::virtio_blk::{BlkConfig, VirtioBlk};
use iospace::emu::virtio_pci::{common, VirtioPci};
use iospace::emu::PciBus;
use iospace::iommu::{DmaPage, Iommu, IommuEntry, IOVA_BASE, PAGE_SIZE};
use iospace::pci::caps::{self, virtio as vcap, Capability};
use iospace::pci::{ConfigAccess, PciError};
use iospace::space::{IoSpace, Irq};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const ACK: u8 = 1;
const DRIVER: u8 = 2;
const DRIVER_OK: u8 = 4;
const FEATURES_OK: u8 = 8;
const NEEDS_RESET: u8 = 0x40;
const F_VERSION_1: u64 = 1 << 32;
const F_ACCESS_PLATFORM: u64 = 1 << 33;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_WRITE_ZEROES: u32 = 13;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const QSIZE: u16 = 8;

/// A page of "guest" memory the test driver owns and pins into the IOMMU.
struct Page(Mutex<Vec<u8>>);
impl DmaPage for Page {
    fn read(&self, offset: usize, buf: &mut [u8]) {
        buf.copy_from_slice(&self.0.lock().unwrap()[offset..offset + buf.len()]);
    }
    fn write(&self, offset: usize, data: &[u8]) {
        self.0.lock().unwrap()[offset..offset + data.len()].copy_from_slice(data);
    }
}
impl Page {
    fn put(&self, off: usize, data: &[u8]) {
        self.write(off, data);
    }
    fn get(&self, off: usize, len: usize) -> Vec<u8> {
        self.0.lock().unwrap()[off..off + len].to_vec()
    }
}

struct Pinned {
    page: Arc<Page>,
    iova: u64,
}

fn pin(iommu: &Iommu, writable: bool) -> Pinned {
    let page = Arc::new(Page(Mutex::new(vec![0; PAGE_SIZE])));
    let iova = iommu
        .map(IommuEntry {
            domain: 5,
            frame: 0,
            writable,
            page: page.clone(),
        })
        .unwrap();
    Pinned { page, iova }
}

/// The driver's config accessor: through the I/O Space only.
struct View<'a>(&'a IoSpace);
impl ConfigAccess for View<'_> {
    fn read_u32(&self, offset: u16) -> Result<u32, PciError> {
        self.0
            .config_read(self.0.bdf(), offset, 4)
            .map_err(|_| PciError::BadOffset(offset))
    }
    fn write_u32(&mut self, offset: u16, value: u32) -> Result<(), PciError> {
        self.0
            .config_write(self.0.bdf(), offset, &value.to_le_bytes())
            .map_err(|_| PciError::ReadOnly)
    }
}

struct Driver {
    space: Arc<IoSpace>,
    common: u64,
    notify: u64,
    msix_table: u64,
    ring: Pinned,
    avail_idx: u16,
    used_seen: u16,
    queue_irq: EventFd,
    config_irq: EventFd,
}

impl Driver {
    fn w(&self, off: u64, data: &[u8]) {
        self.space.mmio_write(self.common + off, data).unwrap();
    }
    fn r8(&self, off: u64) -> u8 {
        let mut b = [0u8; 1];
        self.space.mmio_read(self.common + off, &mut b).unwrap();
        b[0]
    }
    fn r32(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.space.mmio_read(self.common + off, &mut b).unwrap();
        u32::from_le_bytes(b)
    }
    fn status(&self) -> u8 {
        self.r8(common::DEVICE_STATUS)
    }

    /// Find the device's structures from its capabilities and bring it up with one queue.
    fn probe(space: Arc<IoSpace>, iommu: &Iommu) -> Self {
        let caps = caps::walk(&View(&space)).unwrap();
        let bar_addr = |i: u8| space.info().bar(usize::from(i)).unwrap().address;
        let find = |t: u8| {
            caps.iter()
                .find_map(|c| match c {
                    Capability::Vendor {
                        virtio: Some(v), ..
                    } if v.cfg_type == t => Some(*v),
                    _ => None,
                })
                .unwrap()
        };
        let c = find(vcap::COMMON_CFG);
        let n = find(vcap::NOTIFY_CFG);
        let msix = *space.info().msix().unwrap();
        assert_eq!(msix.table_size, 2);
        let ring = pin(iommu, true);
        let queue_irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let config_irq = EventFd::new(EFD_NONBLOCK).unwrap();
        space
            .bind_irq(Irq::MsiX(0), Some(queue_irq.try_clone().unwrap()))
            .unwrap();
        space
            .bind_irq(Irq::MsiX(1), Some(config_irq.try_clone().unwrap()))
            .unwrap();
        let d = Driver {
            common: bar_addr(c.bar) + u64::from(c.offset),
            notify: bar_addr(n.bar) + u64::from(n.offset),
            msix_table: bar_addr(msix.table_bar) + u64::from(msix.table_offset),
            space: space.clone(),
            ring,
            avail_idx: 0,
            used_seen: 0,
            queue_irq,
            config_irq,
        };
        // MSI-X on, both vectors unmasked.
        let ctl = u16::from(msix.offset) + u16::from(caps::MSIX_CONTROL);
        space
            .config_write(space.bdf(), ctl, &caps::MSIX_CTL_ENABLE.to_le_bytes())
            .unwrap();
        for v in 0..2u64 {
            space
                .mmio_write(d.msix_table + v * 16 + 12, &0u32.to_le_bytes())
                .unwrap();
        }
        d.init();
        d
    }

    fn init(&self) {
        self.w(common::DEVICE_STATUS, &[0]);
        self.w(common::DEVICE_STATUS, &[ACK]);
        self.w(common::DEVICE_STATUS, &[ACK | DRIVER]);
        self.w(common::DEVICE_FEATURE_SELECT, &1u32.to_le_bytes());
        let hi = u64::from(self.r32(common::DEVICE_FEATURE)) << 32;
        assert_ne!(hi & F_ACCESS_PLATFORM, 0);
        let want = F_VERSION_1 | F_ACCESS_PLATFORM;
        self.w(common::DRIVER_FEATURE_SELECT, &1u32.to_le_bytes());
        self.w(
            common::DRIVER_FEATURE,
            &u32::try_from(want >> 32).unwrap().to_le_bytes(),
        );
        self.w(common::DEVICE_STATUS, &[ACK | DRIVER | FEATURES_OK]);
        assert_ne!(
            self.status() & FEATURES_OK,
            0,
            "device refused the features"
        );
        self.w(common::CONFIG_MSIX_VECTOR, &1u16.to_le_bytes());
        self.w(common::QUEUE_SELECT, &0u16.to_le_bytes());
        self.w(common::QUEUE_SIZE, &QSIZE.to_le_bytes());
        self.w(common::QUEUE_MSIX_VECTOR, &0u16.to_le_bytes());
        let r = self.ring.iova;
        self.w(common::QUEUE_DESC, &r.to_le_bytes());
        self.w(common::QUEUE_DRIVER, &(r + 1024).to_le_bytes());
        self.w(common::QUEUE_DEVICE, &(r + 2048).to_le_bytes());
        self.w(common::QUEUE_ENABLE, &1u16.to_le_bytes());
        self.w(
            common::DEVICE_STATUS,
            &[ACK | DRIVER | FEATURES_OK | DRIVER_OK],
        );
        assert_eq!(self.status(), ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    }

    /// Put a chain of (iova, len, flags) in descriptors 0.. and publish it.
    fn submit(&mut self, chain: &[(u64, u32, u16)]) {
        let p = &self.ring.page;
        for (i, (addr, len, flags)) in chain.iter().enumerate() {
            let mut d = Vec::new();
            d.extend_from_slice(&addr.to_le_bytes());
            d.extend_from_slice(&len.to_le_bytes());
            let next = if i + 1 < chain.len() { DESC_F_NEXT } else { 0 };
            d.extend_from_slice(&(flags | next).to_le_bytes());
            d.extend_from_slice(&u16::try_from(i + 1).unwrap().to_le_bytes());
            p.put(i * 16, &d);
        }
        let slot = usize::from(self.avail_idx % QSIZE);
        p.put(1024 + 4 + slot * 2, &0u16.to_le_bytes());
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // Ring entry before index (the page mutex orders them in this test).
        p.put(1024 + 2, &self.avail_idx.to_le_bytes());
        self.space
            .mmio_write(self.notify, &0u16.to_le_bytes())
            .unwrap();
    }

    /// Wait for the queue interrupt and the next used element; returns its length.
    fn complete(&mut self) -> u32 {
        wait(&self.queue_irq);
        let p = &self.ring.page;
        let idx = u16::from_le_bytes(p.get(2048 + 2, 2).try_into().unwrap());
        assert_eq!(idx, self.used_seen.wrapping_add(1));
        let slot = 2048 + 4 + usize::from(self.used_seen % QSIZE) * 8;
        self.used_seen = idx;
        let id = u32::from_le_bytes(p.get(slot, 4).try_into().unwrap());
        assert_eq!(id, 0);
        u32::from_le_bytes(p.get(slot + 4, 4).try_into().unwrap())
    }
}

fn wait(fd: &EventFd) {
    let end = Instant::now() + Duration::from_secs(10);
    while fd.read().is_err() {
        assert!(Instant::now() < end, "no interrupt");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn header(kind: u32, sector: u64) -> Vec<u8> {
    let mut h = kind.to_le_bytes().to_vec();
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&sector.to_le_bytes());
    h
}

struct Rig {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    iommu: Arc<Iommu>,
    dev: Arc<VirtioPci<VirtioBlk>>,
    driver: Driver,
}

fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let blk = VirtioBlk::new(&BlkConfig {
        path: path.clone(),
        size: 1 << 20,
        read_only: false,
        serial: "iospace-test".into(),
        workers: 2,
    })
    .unwrap();
    let iommu = Iommu::new(64);
    let dev = Arc::new(VirtioPci::new(Arc::new(blk), iommu.device(), 11).unwrap());
    let bus = PciBus::new();
    let bdf = bus.plug(4, dev.clone()).unwrap();
    let space = Arc::new(IoSpace::new(bdf, dev.clone()).unwrap());
    assert_eq!(
        space.info().header.device_name(),
        Some("Virtio 1.0 block device")
    );
    let driver = Driver::probe(space, &iommu);
    Rig {
        _dir: dir,
        path,
        iommu,
        dev,
        driver,
    }
}

#[test]
fn write_then_read_through_the_iommu() {
    let mut r = rig();
    let hdr = pin(&r.iommu, false);
    let status = pin(&r.iommu, true);
    let data = pin(&r.iommu, false);
    let back = pin(&r.iommu, true);
    let pattern: Vec<u8> = (0..PAGE_SIZE)
        .map(|i| u8::try_from(i * 7 % 251).unwrap())
        .collect();
    data.page.put(0, &pattern);
    hdr.page.put(0, &header(T_OUT, 8));
    status.page.put(0, &[0xff]);
    r.driver.submit(&[
        (hdr.iova, 16, 0),
        (data.iova, 4096, 0),
        (status.iova, 1, DESC_F_WRITE),
    ]);
    assert_eq!(r.driver.complete(), 1);
    assert_eq!(status.page.get(0, 1), [0]);
    let mut on_disk = vec![0u8; PAGE_SIZE];
    std::fs::File::open(&r.path)
        .unwrap()
        .read_exact_at(&mut on_disk, 8 * 512)
        .unwrap();
    assert_eq!(on_disk, pattern);

    // Read it back, split over two descriptors.
    hdr.page.put(0, &header(T_IN, 8));
    status.page.put(0, &[0xff]);
    r.driver.submit(&[
        (hdr.iova, 16, 0),
        (back.iova, 1000, DESC_F_WRITE),
        (back.iova + 1000, 3096, DESC_F_WRITE),
        (status.iova, 1, DESC_F_WRITE),
    ]);
    assert_eq!(r.driver.complete(), 4097);
    assert_eq!(status.page.get(0, 1), [0]);
    assert_eq!(back.page.get(0, PAGE_SIZE), pattern);

    // GET_ID, FLUSH, WRITE_ZEROES.
    hdr.page.put(0, &header(T_GET_ID, 0));
    r.driver.submit(&[
        (hdr.iova, 16, 0),
        (back.iova, 20, DESC_F_WRITE),
        (status.iova, 1, DESC_F_WRITE),
    ]);
    assert_eq!(r.driver.complete(), 21);
    assert_eq!(&back.page.get(0, 12), b"iospace-test");
    hdr.page.put(0, &header(T_FLUSH, 0));
    r.driver
        .submit(&[(hdr.iova, 16, 0), (status.iova, 1, DESC_F_WRITE)]);
    r.driver.complete();
    assert_eq!(status.page.get(0, 1), [0]);
    let mut seg = 9u64.to_le_bytes().to_vec();
    seg.extend_from_slice(&2u32.to_le_bytes());
    seg.extend_from_slice(&0u32.to_le_bytes());
    hdr.page.put(0, &header(T_WRITE_ZEROES, 0));
    hdr.page.put(16, &seg);
    r.driver
        .submit(&[(hdr.iova, 32, 0), (status.iova, 1, DESC_F_WRITE)]);
    r.driver.complete();
    assert_eq!(status.page.get(0, 1), [0]);
    std::fs::File::open(&r.path)
        .unwrap()
        .read_exact_at(&mut on_disk, 8 * 512)
        .unwrap();
    assert_eq!(&on_disk[..512], &pattern[..512]);
    assert!(on_disk[512..1536].iter().all(|b| *b == 0));
    assert_eq!(&on_disk[1536..], &pattern[1536..]);
    assert_eq!(r.iommu.faults(), 0);
    assert_eq!(r.driver.space.violations(), 0);
}

#[test]
fn bad_requests_get_error_status() {
    let mut r = rig();
    let hdr = pin(&r.iommu, false);
    let status = pin(&r.iommu, true);
    let data = pin(&r.iommu, true);
    // Past the end of the disk.
    hdr.page.put(0, &header(T_IN, 2047));
    r.driver.submit(&[
        (hdr.iova, 16, 0),
        (data.iova, 1024, DESC_F_WRITE),
        (status.iova, 1, DESC_F_WRITE),
    ]);
    r.driver.complete();
    assert_eq!(status.page.get(0, 1), [1]);
    // Not whole sectors.
    hdr.page.put(0, &header(T_IN, 0));
    r.driver.submit(&[
        (hdr.iova, 16, 0),
        (data.iova, 100, DESC_F_WRITE),
        (status.iova, 1, DESC_F_WRITE),
    ]);
    r.driver.complete();
    assert_eq!(status.page.get(0, 1), [1]);
    // Unknown type.
    hdr.page.put(0, &header(77, 0));
    r.driver
        .submit(&[(hdr.iova, 16, 0), (status.iova, 1, DESC_F_WRITE)]);
    r.driver.complete();
    assert_eq!(status.page.get(0, 1), [2]);
    assert_eq!(r.dev.device_status() & NEEDS_RESET, 0);
}

#[test]
fn unmapped_iova_faults_and_needs_reset() {
    let mut r = rig();
    let hdr = pin(&r.iommu, false);
    let status = pin(&r.iommu, true);
    let data = pin(&r.iommu, false);
    hdr.page.put(0, &header(T_OUT, 0));
    let unmapped = IOVA_BASE + 60 * PAGE_SIZE as u64;
    r.driver.submit(&[
        (hdr.iova, 16, 0),
        (unmapped, 512, 0),
        (status.iova, 1, DESC_F_WRITE),
    ]);
    wait(&r.driver.config_irq);
    assert_ne!(r.driver.status() & NEEDS_RESET, 0);
    assert!(r.iommu.faults() >= 1);
    // Nothing was written to the disk.
    let mut first = vec![1u8; 512];
    std::fs::File::open(&r.path)
        .unwrap()
        .read_exact_at(&mut first, 0)
        .unwrap();
    assert!(first.iter().all(|b| *b == 0));

    // After a reset the device works again; a read into a read-only page faults too.
    r.driver.avail_idx = 0;
    r.driver.used_seen = 0;
    r.driver.init();
    hdr.page.put(0, &header(T_IN, 0));
    r.driver.submit(&[
        (hdr.iova, 16, 0),
        (data.iova, 512, DESC_F_WRITE),
        (status.iova, 1, DESC_F_WRITE),
    ]);
    wait(&r.driver.config_irq);
    assert_ne!(r.driver.status() & NEEDS_RESET, 0);

    // A ring the IOMMU does not map at all: DRIVER_OK fails the queue check or the first pop.
    r.iommu.unmap(r.driver.ring.iova).unwrap();
    r.driver.w(common::DEVICE_STATUS, &[0]);
    r.driver.w(common::DEVICE_STATUS, &[ACK | DRIVER]);
    r.driver
        .w(common::DRIVER_FEATURE_SELECT, &1u32.to_le_bytes());
    r.driver.w(common::DRIVER_FEATURE, &3u32.to_le_bytes());
    r.driver
        .w(common::DEVICE_STATUS, &[ACK | DRIVER | FEATURES_OK]);
    r.driver.w(common::QUEUE_SIZE, &QSIZE.to_le_bytes());
    r.driver.w(common::QUEUE_DESC, &unmapped.to_le_bytes());
    r.driver
        .w(common::QUEUE_DRIVER, &(unmapped + 1024).to_le_bytes());
    r.driver
        .w(common::QUEUE_DEVICE, &(unmapped + 2048).to_le_bytes());
    r.driver.w(common::QUEUE_ENABLE, &1u16.to_le_bytes());
    r.driver.w(
        common::DEVICE_STATUS,
        &[ACK | DRIVER | FEATURES_OK | DRIVER_OK],
    );
    r.driver
        .space
        .mmio_write(r.driver.notify, &0u16.to_le_bytes())
        .unwrap();
    assert_ne!(r.driver.status() & NEEDS_RESET, 0);
}

#[test]
fn features_without_access_platform_are_refused() {
    let r = rig();
    let d = &r.driver;
    d.w(common::DEVICE_STATUS, &[0]);
    d.w(common::DEVICE_STATUS, &[ACK | DRIVER]);
    d.w(common::DRIVER_FEATURE_SELECT, &1u32.to_le_bytes());
    d.w(common::DRIVER_FEATURE, &1u32.to_le_bytes()); // VERSION_1 only
    d.w(common::DEVICE_STATUS, &[ACK | DRIVER | FEATURES_OK]);
    assert_eq!(d.status() & FEATURES_OK, 0);
    // Bad queue geometry at DRIVER_OK: not a power of two.
    d.w(common::DRIVER_FEATURE, &3u32.to_le_bytes());
    d.w(common::DEVICE_STATUS, &[ACK | DRIVER | FEATURES_OK]);
    d.w(common::CONFIG_MSIX_VECTOR, &1u16.to_le_bytes()); // vectors reset with the device
    d.w(common::QUEUE_SIZE, &5u16.to_le_bytes());
    d.w(common::QUEUE_ENABLE, &1u16.to_le_bytes());
    d.w(
        common::DEVICE_STATUS,
        &[ACK | DRIVER | FEATURES_OK | DRIVER_OK],
    );
    assert_ne!(d.status() & NEEDS_RESET, 0);
    wait(&d.config_irq);
}

#[test]
fn no_dma_after_reset_returns() {
    let mut r = rig();
    let hdr = pin(&r.iommu, false);
    let status = pin(&r.iommu, true);
    let data = pin(&r.iommu, true);
    for round in 0..20u64 {
        hdr.page.put(0, &header(T_IN, round));
        r.driver.submit(&[
            (hdr.iova, 16, 0),
            (data.iova, 4096, DESC_F_WRITE),
            (status.iova, 1, DESC_F_WRITE),
        ]);
        r.driver.w(common::DEVICE_STATUS, &[0]);
        let ring = r.driver.ring.page.get(0, PAGE_SIZE);
        let (d, s) = (data.page.get(0, PAGE_SIZE), status.page.get(0, 1));
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(
            ring,
            r.driver.ring.page.get(0, PAGE_SIZE),
            "used ring written after reset"
        );
        assert_eq!(d, data.page.get(0, PAGE_SIZE));
        assert_eq!(s, status.page.get(0, 1));
        r.driver.avail_idx = 0;
        r.driver.used_seen = 0;
        r.driver.ring.page.put(0, &[0; PAGE_SIZE]);
        while r.driver.queue_irq.read().is_ok() {}
        r.driver.init();
    }
    // And the device still works.
    hdr.page.put(0, &header(T_IN, 0));
    r.driver.submit(&[
        (hdr.iova, 16, 0),
        (data.iova, 512, DESC_F_WRITE),
        (status.iova, 1, DESC_F_WRITE),
    ]);
    assert_eq!(r.driver.complete(), 513);
}

#[test]
fn read_only_used_ring_faults() {
    let mut r = rig();
    let hdr = pin(&r.iommu, false);
    let status = pin(&r.iommu, true);
    // Move the used ring to a page the device may only read.
    let ro = pin(&r.iommu, false);
    r.driver.w(common::DEVICE_STATUS, &[0]);
    r.driver.w(common::DEVICE_STATUS, &[ACK | DRIVER]);
    r.driver
        .w(common::DRIVER_FEATURE_SELECT, &1u32.to_le_bytes());
    r.driver.w(common::DRIVER_FEATURE, &3u32.to_le_bytes());
    r.driver
        .w(common::DEVICE_STATUS, &[ACK | DRIVER | FEATURES_OK]);
    r.driver.w(common::CONFIG_MSIX_VECTOR, &1u16.to_le_bytes());
    r.driver.w(common::QUEUE_SIZE, &QSIZE.to_le_bytes());
    r.driver
        .w(common::QUEUE_DESC, &r.driver.ring.iova.to_le_bytes());
    r.driver.w(
        common::QUEUE_DRIVER,
        &(r.driver.ring.iova + 1024).to_le_bytes(),
    );
    r.driver.w(common::QUEUE_DEVICE, &ro.iova.to_le_bytes());
    r.driver.w(common::QUEUE_ENABLE, &1u16.to_le_bytes());
    r.driver.w(
        common::DEVICE_STATUS,
        &[ACK | DRIVER | FEATURES_OK | DRIVER_OK],
    );
    hdr.page.put(0, &header(T_FLUSH, 0));
    r.driver
        .submit(&[(hdr.iova, 16, 0), (status.iova, 1, DESC_F_WRITE)]);
    wait(&r.driver.config_irq);
    assert_ne!(r.driver.status() & NEEDS_RESET, 0);
    assert!(ro.page.get(0, 16).iter().all(|b| *b == 0));
}

static PANICKED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(128))]
    /// Random descriptor chains (addresses mapped, unmapped or wild; any lengths, flags and
    /// next indices) and random headers never panic the device (nor its workers); any IOMMU
    /// fault ends in DEVICE_NEEDS_RESET.
    #[test]
    fn random_chains_never_panic(
        descs in proptest::collection::vec((0u8..4, proptest::num::u64::ANY, proptest::num::u32::ANY, 0u16..8, 0u16..10), 1..6),
        kind in proptest::sample::select(vec![0u32, 1, 4, 8, 11, 13, 99]),
        sector in proptest::num::u64::ANY,
        seg in proptest::collection::vec(proptest::num::u8::ANY, 16),
    ) {
        static HOOK: std::sync::Once = std::sync::Once::new();
        HOOK.call_once(|| {
            let prev = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |i| {
                PANICKED.store(true, std::sync::atomic::Ordering::SeqCst);
                prev(i);
            }));
        });
        let r = rig();
        let hdr = pin(&r.iommu, false);
        let data = pin(&r.iommu, true);
        hdr.page.put(0, &header(kind, sector % 4096));
        hdr.page.put(16, &seg);
        let p = &r.driver.ring.page;
        for (i, (which, addr, len, flags, next)) in descs.iter().enumerate() {
            let a = match which {
                0 => hdr.iova + addr % 64,
                1 => data.iova + addr % 4096,
                2 => IOVA_BASE + 50 * PAGE_SIZE as u64 + addr % 4096,
                _ => *addr,
            };
            let l = if len % 3 == 0 { *len } else { len % 5000 };
            let mut d = a.to_le_bytes().to_vec();
            d.extend_from_slice(&l.to_le_bytes());
            d.extend_from_slice(&flags.to_le_bytes());
            d.extend_from_slice(&next.to_le_bytes());
            p.put(i * 16, &d);
        }
        p.put(1024 + 4, &0u16.to_le_bytes());
        p.put(1024 + 2, &1u16.to_le_bytes());
        r.driver.space.mmio_write(r.driver.notify, &0u16.to_le_bytes()).unwrap();
        let end = Instant::now() + Duration::from_millis(200);
        while Instant::now() < end {
            let used = u16::from_le_bytes(p.get(2048 + 2, 2).try_into().unwrap());
            if used == 1 || r.dev.device_status() & NEEDS_RESET != 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if r.iommu.faults() > 0 {
            proptest::prop_assert_ne!(r.dev.device_status() & NEEDS_RESET, 0);
        }
        // A reset waits for any worker still running.
        r.driver.w(common::DEVICE_STATUS, &[0]);
        proptest::prop_assert!(!PANICKED.load(std::sync::atomic::Ordering::SeqCst));
    }
}
