//! The block slice of the manager: a virtio-blk-pci device with its image, its `idd-blk`
//! IDD, and the guests' disks on it.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use devchan::grant::DomId;
use devchan::xenbus::XenbusState;
use hypervisor::domain::DomainConfig;
use idd_blk::blkback::Region;
use iospace::emu::virtio_blk::{BlkConfig, VirtioBlk};
use iospace::emu::virtio_pci::VirtioPci;
use iospace::emu::PciBus;
use iospace::iommu::Iommu;
use iospace::space::IoSpace;
use policy::{BlkMedia, Device, DeviceSpec, DiskAccess};

use super::idd::{Idd, RestartRules};
use super::{serve_io_space, Dom0};
use crate::layout::{IDD_FRAMES, JOURNAL_FIRST_FRAME, MAX_CHANNELS};
use crate::recovery::{Cause, Recovery};
use crate::toolstack::{self, ChannelSpec, RingView, VbdNodes};
use crate::VBD_DEVID;

/// One guest disk.
pub struct GuestDisk {
    /// Guest name (policy).
    pub name: String,
    /// Its domain.
    pub domid: DomId,
    /// Its XenStore nodes.
    pub nodes: VbdNodes,
    /// Its region of the device.
    pub region: Region,
    /// Its ring, once published.
    pub ring: Option<RingView>,
}

/// The emulated disk and what serves its I/O Space.
pub(crate) struct BlkDevice {
    pub name: String,
    pub image: PathBuf,
    pub sectors: u64,
    _bus: PciBus,
    pub pci: Arc<VirtioPci<VirtioBlk>>,
    pub sock: PathBuf,
    _listener: std::thread::JoinHandle<()>,
}

/// The block slice (see the module docs).
pub(crate) struct BlkSlice {
    pub dev: BlkDevice,
    pub idd: Idd,
    pub channels: Vec<ChannelSpec>,
    /// The disk (index into `disks`) of each channel.
    pub chan_disk: Vec<usize>,
    pub disks: Vec<GuestDisk>,
    /// Failed channels already reconnected (by index at the time of failure).
    pub reset_done: Vec<usize>,
}

impl BlkSlice {
    /// Build the device `dev` and its IDD domain.
    pub fn build(
        d0: &Dom0,
        dev: &Device,
        program: &Path,
        rules: RestartRules,
        verbose: bool,
    ) -> Result<Self> {
        let DeviceSpec::Blk { size, media } = &dev.spec else {
            bail!("device {} is not a disk", dev.name)
        };
        let BlkMedia::Image(image) = media else {
            bail!("device {}: PCI passthrough is not supported yet", dev.name)
        };
        let blk = VirtioBlk::new(&BlkConfig {
            path: image.clone(),
            size: *size,
            read_only: false,
            serial: dev.name.chars().take(20).collect(),
            workers: 2,
        })
        .with_context(|| format!("image {}", image.display()))?;
        let sectors = blk.capacity();
        let iommu = Iommu::new(4096);
        let pci = Arc::new(VirtioPci::new(Arc::new(blk), iommu.device(), 11)?);
        let bus = PciBus::new();
        let bdf = bus.plug(4, pci.clone())?;
        let space = Arc::new(IoSpace::new(bdf, pci.clone())?);
        let sock = d0.dir.path().join(format!("{}.iospace", dev.name));
        let listener = serve_io_space(UnixListener::bind(&sock)?, space);
        let domid = d0.sys.create_domain(DomainConfig {
            name: format!("idd-{}", dev.name),
            nr_frames: IDD_FRAMES,
            iommu: Some(iommu.clone()),
        })?;
        Ok(Self {
            dev: BlkDevice {
                name: dev.name.clone(),
                image: image.clone(),
                sectors,
                _bus: bus,
                pci,
                sock,
                _listener: listener,
            },
            idd: Idd::new(
                &dev.name,
                domid,
                program.to_owned(),
                IDD_FRAMES,
                iommu,
                rules,
                verbose,
            ),
            channels: Vec::new(),
            chan_disk: Vec::new(),
            disks: Vec::new(),
            reset_done: Vec::new(),
        })
    }

    /// Give guest `name` (domain `domid`) its disk: XenStore nodes, backend `InitWait`.
    pub fn add_disk(
        &mut self,
        d0: &mut Dom0,
        name: &str,
        domid: DomId,
        disk: &DiskAccess,
    ) -> Result<()> {
        ensure!(
            (self.disks.len() as u64) < MAX_CHANNELS,
            "more than {MAX_CHANNELS} guests on one disk"
        );
        let region = Region {
            offset: disk.region.start_sector(),
            sectors: disk.region.sectors(),
        };
        let nodes = VbdNodes {
            guest: domid,
            idd: self.idd.domid,
            devid: VBD_DEVID,
            sectors: region.sectors,
            read_only: disk.read_only,
            device: self.dev.name.clone(),
        };
        toolstack::write_vbd(&mut d0.admin, &nodes)?;
        self.disks.push(GuestDisk {
            name: name.to_owned(),
            domid,
            nodes,
            region,
            ring: None,
        });
        Ok(())
    }

    fn idd_args(&self) -> Vec<String> {
        let mut args = vec![
            "--device-socket".to_owned(),
            self.dev.sock.to_string_lossy().into_owned(),
        ];
        for c in &self.channels {
            args.push("--channel".into());
            args.push(c.to_string());
        }
        args
    }

    /// Wait until every disk of a started guest has published its ring, then start the IDD
    /// process with their channels and mark the backends `Connected`.
    pub fn connect(&mut self, d0: &mut Dom0, started: &[DomId], timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut channels = Vec::new();
        let mut chan_disk = Vec::new();
        for (i, g) in self.disks.iter_mut().enumerate() {
            if !started.contains(&g.domid) {
                continue;
            }
            let (gref, port) = loop {
                if let Some(r) = toolstack::frontend_ring(&mut d0.admin, &g.nodes)? {
                    break r;
                }
                ensure!(
                    Instant::now() < deadline,
                    "guest {} did not publish its disk's ring",
                    g.name
                );
                std::thread::sleep(Duration::from_millis(2));
            };
            g.ring = Some(RingView::new(d0.sys.clone(), g.domid, gref));
            channels.push(ChannelSpec {
                guest: g.domid,
                ring_ref: gref,
                port,
                region: g.region,
                read_only: g.nodes.read_only,
            });
            chan_disk.push(i);
        }
        if channels.is_empty() {
            return Ok(());
        }
        self.channels = channels;
        self.chan_disk = chan_disk;
        let args = self.idd_args();
        self.idd.spawn(&d0.sys, &args)?;
        self.idd
            .wait_ready(deadline.saturating_duration_since(Instant::now()))?;
        for g in &self.disks {
            if g.ring.is_some() {
                toolstack::set_backend_state(&mut d0.admin, &g.nodes, XenbusState::Connected)?;
            }
        }
        Ok(())
    }

    /// Give guest domain `guest`'s disk (added with [`Self::add_disk`], its process started)
    /// its channel while the IDD serves: wait for its ring, store the channel (a restarted
    /// IDD has it), `attach SPEC` to the running IDD (or start the IDD if it never ran), mark
    /// the backend `Connected`. Returns what was done (nothing if it has no disk here).
    pub fn attach_guest(
        &mut self,
        d0: &mut Dom0,
        guest: DomId,
        timeout: Duration,
    ) -> Result<Option<String>> {
        let Some(k) = self
            .disks
            .iter()
            .position(|d| d.domid == guest && d.ring.is_none())
        else {
            return Ok(None);
        };
        if self.idd.starts == 0 {
            self.connect(d0, &[guest], timeout)?;
            return Ok(Some(format!("{}: the IDD started", self.dev.name)));
        }
        let deadline = Instant::now() + timeout;
        let (gref, port) = loop {
            let g = &self.disks[k];
            if let Some(r) = toolstack::frontend_ring(&mut d0.admin, &g.nodes)? {
                break r;
            }
            ensure!(
                Instant::now() < deadline,
                "guest {} did not publish its disk's ring",
                g.name
            );
            std::thread::sleep(Duration::from_millis(2));
        };
        let g = &mut self.disks[k];
        g.ring = Some(RingView::new(d0.sys.clone(), g.domid, gref));
        let c = ChannelSpec {
            guest,
            ring_ref: gref,
            port,
            region: g.region,
            read_only: g.nodes.read_only,
        };
        self.channels.push(c);
        self.chan_disk.push(k);
        let chan = self.channels.len() - 1;
        self.idd.control(&format!("attach {c}"), timeout)?;
        let g = &self.disks[k];
        toolstack::set_backend_state(&mut d0.admin, &g.nodes, XenbusState::Connected)?;
        Ok(Some(format!(
            "{} on {}: attached (live, channel {chan})",
            g.name, self.dev.name
        )))
    }

    /// Whether guest `guest`'s disk can take region `new` now (see [`Self::update_region`]):
    /// its disk index, its channel, whether it is connected, and the region in sectors.
    pub fn check_region(
        &self,
        guest: &str,
        new: &policy::Region,
    ) -> Result<(usize, Option<usize>, bool, Region)> {
        let k = self
            .disks
            .iter()
            .position(|g| g.name == guest)
            .with_context(|| format!("guest {guest} has no disk on {}", self.dev.name))?;
        let region = Region {
            offset: new.start_sector(),
            sectors: new.sectors(),
        };
        let old = self.disks[k].region;
        let chan = self.chan_disk.iter().position(|d| *d == k);
        let connected = chan.is_some() && self.disks[k].ring.is_some();
        ensure!(
            !connected || (region.offset == old.offset && region.sectors >= old.sectors),
            "guest {guest} is connected: its region of {} may only grow in place",
            self.dev.name
        );
        ensure!(
            region
                .offset
                .checked_add(region.sectors)
                .is_some_and(|end| end <= self.dev.sectors),
            "region {}+{} is past the end of {} ({} sectors)",
            region.offset,
            region.sectors,
            self.dev.name,
            self.dev.sectors
        );
        Ok((k, chan, connected, region))
    }

    /// Give guest `guest`'s disk the region `new` (the live reload: grown in place while
    /// connected, anything while not): the stored policy first (so a restarted IDD serves the
    /// new region), then the running IDD (`region CHAN SECTORS`), then XenStore: `sectors`,
    /// and for a connected disk `state` rewritten as `Connected`, which is how a Linux
    /// blkback announces a resize (Linux blkfront re-reads `sectors` on a `Connected` while
    /// connected and resizes the disk; our blkfront reads it only at connect). Returns what
    /// changed.
    pub fn update_region(
        &mut self,
        d0: &mut Dom0,
        guest: &str,
        new: &policy::Region,
        timeout: Duration,
    ) -> Result<String> {
        let (k, chan, connected, region) = self.check_region(guest, new)?;
        let d = &mut self.disks[k];
        d.region = region;
        d.nodes.sectors = region.sectors;
        let nodes = d.nodes.clone();
        if let Some(c) = chan {
            self.channels[c].region = region;
        }
        let how = match chan {
            Some(c) if connected && self.idd.running() => {
                self.idd
                    .control(&format!("region {c} {}", region.sectors), timeout)?;
                format!("live, channel {c}")
            }
            Some(_) => "stored; the IDD restarts with it".to_owned(),
            None => "stored".to_owned(),
        };
        // `sectors` and `state` in one transaction, as Linux's blkback resizes.
        let dir = toolstack::back_dir(nodes.idd, nodes.guest, nodes.devid);
        let xs = &mut d0.admin;
        let tx = xs.transaction_start().context("XenStore transaction")?;
        let wrote = xs
            .write(
                tx,
                &format!("{dir}/sectors"),
                region.sectors.to_string().as_bytes(),
            )
            .and_then(|()| {
                if connected {
                    xs.write(
                        tx,
                        &format!("{dir}/state"),
                        XenbusState::Connected.to_xenstore().as_bytes(),
                    )
                } else {
                    Ok(())
                }
            });
        let ended = xs.transaction_end(tx, wrote.is_ok());
        wrote
            .and(ended)
            .with_context(|| format!("writing {dir}/sectors"))?;
        Ok(format!(
            "{guest} on {}: region {}+{} sectors ({how})",
            self.dev.name, region.offset, region.sectors
        ))
    }

    /// Replace the dead or hung IDD process (the domain stays) and time each phase.
    pub fn recover(&mut self, d0: &mut Dom0, cause: Cause, seq: u32) -> Result<Recovery> {
        let detect = self.idd.begin_recovery()?;
        // Where every guest ring stood (to see the first response of the new process).
        let before: Vec<Option<(u32, u32)>> = self
            .disks
            .iter()
            .map(|g| g.ring.as_ref().and_then(|r| r.indexes().ok()))
            .collect();
        // The journals' pin tables list IOVAs the dead process pinned, for the next process
        // to unpin. They are all revoked now, and the IOMMU hands freed IOVAs out again (the
        // new process's own queue pins may get them): clear the tables, or the new process
        // would unpin someone else's fresh mapping. The request slots (page 0) stay: the
        // new process replays them and pins again.
        let mem = d0.sys.domain(self.idd.domid)?.memory().clone();
        let channels = self.channels.len() as u64;
        let args = self.idd_args();
        let ph = self.idd.restart_in_place(&d0.sys, &args, || {
            for i in 0..channels {
                mem.write(JOURNAL_FIRST_FRAME + 2 * i + 1, 0, &[0u8; 4096])?;
            }
            Ok(())
        })?;
        // First response: a ring with requests outstanding at the crash gets an answer.
        let t3 = Instant::now();
        let pending: Vec<usize> = before
            .iter()
            .enumerate()
            .filter_map(|(i, b)| b.filter(|(req, rsp)| req != rsp).map(|_| i))
            .collect();
        loop {
            let answered = pending.iter().any(|i| {
                let now = self.disks[*i].ring.as_ref().and_then(|r| r.indexes().ok());
                matches!((before[*i], now), (Some((_, a)), Some((_, b))) if a != b)
            });
            if answered || pending.is_empty() || t3.elapsed() > Duration::from_secs(5) {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let first_response = t3.elapsed();
        if std::env::var_os("DM_DEBUG").is_some() {
            eprintln!(
                "[dom0] after recovery: device status {:#x}, {} IOMMU entries",
                self.dev.pci.device_status(),
                self.idd.iommu().len()
            );
        }
        Ok(Recovery {
            seq,
            device: self.dev.name.clone(),
            channel: None,
            cause,
            detect,
            revoke: ph.revoke,
            revoked: ph.revoked,
            spawn: ph.spawn,
            reattach: ph.reattach,
            first_response,
        })
    }
}
