//! A frontend written for the tests (devchan's ring over a `LocalPlatform` guest domain) and
//! a rig: one System, an IDD domain with an IOMMU, a raw image behind a `FileDevice`.
#![allow(dead_code, missing_docs)]

use devchan::blkif::{
    BlkRequest, BlkifFrontRing, BlkifRequest, BlkifResponse, RwRequest, Segment, Segments,
};
use devchan::grant::{DomId, GrantRef, PAGE_SIZE};
use devchan::platform::{Frame, Platform, Port, SharedPage};
use hypervisor::domain::DomainConfig;
use hypervisor::local::{LocalPage, LocalPlatform};
use hypervisor::system::System;
use idd_blk::blkback::{BackendConfig, Blkback, ChannelConfig, Region};
use idd_blk::device::FileDevice;
use iospace::iommu::Iommu;
use std::collections::BTreeMap;
use std::fs::File;
use std::ptr::NonNull;
use std::sync::Arc;

/// First free frame of a domain's RAM.
pub const FREE: Frame = 7;
/// The IDD's scratch frame.
pub const SCRATCH: Frame = 7;
/// The IDD's journal frames for channel `i`.
pub fn journal_frame(i: u64) -> Frame {
    8 + 2 * i
}

pub struct Rig {
    pub sys: Arc<System>,
    pub idd: Arc<LocalPlatform>,
    pub iommu: Arc<Iommu>,
    pub image: File,
    pub _dir: tempfile::TempDir,
}

impl Rig {
    pub fn new(sectors: u64) -> Self {
        let sys = System::new();
        let iommu = Iommu::new(512);
        let d = sys
            .create_domain(DomainConfig {
                name: "idd-blk".into(),
                nr_frames: 32,
                iommu: Some(iommu.clone()),
            })
            .unwrap();
        let idd = Arc::new(LocalPlatform::new(sys.clone(), d).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let image = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("disk.img"))
            .unwrap();
        image.set_len(sectors * 512).unwrap();
        Self {
            sys,
            idd,
            iommu,
            image,
            _dir: dir,
        }
    }

    pub fn device(&self) -> FileDevice {
        FileDevice::new(self.image.try_clone().unwrap(), self.iommu.device(), false).unwrap()
    }

    pub fn backend(&self, batch: usize) -> Blkback<LocalPlatform, FileDevice> {
        Blkback::new(
            self.idd.clone(),
            self.device(),
            BackendConfig {
                batch,
                scratch_frame: SCRATCH,
            },
        )
    }

    pub fn guest(&self, name: &str) -> Front {
        Front::new(&self.sys, self.idd.domid(), name)
    }

    pub fn read_image(&self, sector: u64, len: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut b = vec![0; len];
        self.image.read_exact_at(&mut b, sector * 512).unwrap();
        b
    }
}

/// A guest's blkfront, minimal: one data page per request.
pub struct Front {
    pub plat: LocalPlatform,
    pub ring: BlkifFrontRing,
    _page: LocalPage,
    pub ring_ref: GrantRef,
    pub port: Port,
    pub backend: DomId,
    /// Data pages: frame and its grant to the backend.
    pub pages: Vec<(Frame, GrantRef)>,
    /// Responses seen, by id (to catch duplicates).
    pub answered: BTreeMap<u64, u32>,
    next_id: u64,
}

pub const DATA_PAGES: u64 = 40;

impl Front {
    pub fn new(sys: &Arc<System>, backend: DomId, name: &str) -> Self {
        let d = sys
            .create_domain(DomainConfig {
                name: name.into(),
                nr_frames: FREE + DATA_PAGES + 8,
                iommu: None,
            })
            .unwrap();
        let plat = LocalPlatform::new(sys.clone(), d).unwrap();
        let page = plat.alloc_shared_page().unwrap();
        let ring_ref = plat.grant_access(backend, page.frame(), false).unwrap();
        // SAFETY: the page is a live 4 KiB page owned by `_page` in the same struct, which is
        // dropped after the ring (field order); it is only accessed through rings.
        let ring = unsafe {
            BlkifFrontRing::init(NonNull::new(page.as_ptr()).unwrap(), PAGE_SIZE).unwrap()
        };
        let port = plat.evtchn_alloc_unbound(backend).unwrap();
        let pages = (0..DATA_PAGES)
            .map(|i| {
                let f = FREE + i;
                (f, plat.grant_access(backend, f, false).unwrap())
            })
            .collect();
        Self {
            plat,
            ring,
            _page: page,
            ring_ref,
            port,
            backend,
            pages,
            answered: BTreeMap::new(),
            next_id: 1,
        }
    }

    pub fn channel(&self, region: Region, read_only: bool, journal_frame: Frame) -> ChannelConfig {
        ChannelConfig {
            guest: self.plat.domid(),
            ring_ref: self.ring_ref,
            remote_port: self.port,
            region,
            read_only,
            journal_frame,
        }
    }

    pub fn ring_page(&self) -> &LocalPage {
        &self._page
    }

    pub fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    pub fn fill(&self, page: usize, data: &[u8]) {
        self.plat.write_local(self.pages[page].0, 0, data).unwrap();
    }

    pub fn page(&self, page: usize) -> Vec<u8> {
        let mut b = vec![0; PAGE_SIZE];
        self.plat.read_local(self.pages[page].0, 0, &mut b).unwrap();
        b
    }

    /// A read or write of whole data pages `pages` at `sector`.
    pub fn rw(&mut self, write: bool, sector: u64, pages: &[usize]) -> BlkRequest {
        let segs: Vec<Segment> = pages
            .iter()
            .map(|&p| Segment {
                gref: self.pages[p].1,
                first_sect: 0,
                last_sect: 7,
            })
            .collect();
        let r = RwRequest {
            id: self.id(),
            handle: 0,
            sector,
            segments: Segments::new(&segs).unwrap(),
        };
        if write {
            BlkRequest::Write(r)
        } else {
            BlkRequest::Read(r)
        }
    }

    pub fn post_raw(&mut self, raw: &BlkifRequest) {
        self.ring.put_request(raw).unwrap();
        if self.ring.push_requests() {
            self.plat.evtchn_notify(self.port).unwrap();
        }
    }

    pub fn post(&mut self, req: &BlkRequest) {
        self.post_raw(&req.encode());
    }

    /// Responses available now; records them (a second response to an id is counted).
    pub fn responses(&mut self) -> Vec<BlkifResponse> {
        let mut out = Vec::new();
        while let Some(r) = self.ring.get_response().unwrap() {
            *self.answered.entry(r.id).or_default() += 1;
            out.push(r);
        }
        out
    }
}

/// Run `back` until `front` has `n` responses; returns them.
pub fn run_until<P: Platform, D: idd_blk::device::BlockDevice>(
    back: &mut Blkback<P, D>,
    front: &mut Front,
    n: usize,
) -> Vec<BlkifResponse> {
    let mut got = Vec::new();
    for _ in 0..10_000 {
        back.run_once(std::time::Duration::from_millis(1)).unwrap();
        got.extend(front.responses());
        if got.len() >= n {
            return got;
        }
    }
    panic!("only {} of {n} responses", got.len());
}

pub fn pattern(seed: u64) -> Vec<u8> {
    (0..PAGE_SIZE as u64)
        .map(|i| u8::try_from((i.wrapping_mul(31) ^ seed.wrapping_mul(0x9e37)) % 251).unwrap())
        .collect()
}
