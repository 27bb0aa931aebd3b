//! The manager: builds everything from a [`Policy`], then supervises the IDD.
//!
//! Use: [`Manager::start`] (domain 0 services, the device, the domains, the XenStore nodes),
//! [`Manager::start_guest`] for each guest's process, [`Manager::connect`] (waits for the
//! frontends' rings, starts the IDD process, marks the backends `Connected`), then call
//! [`Manager::supervise`] in a loop; [`Manager::inject`] injects faults.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use devchan::grant::DomId;
use devchan::xenbus::XenbusState;
use devchan::xenstore::Client;
use hypervisor::domain::DomainConfig;
use hypervisor::launch::{ExitReport, LaunchConfig, RunningDomain};
use hypervisor::system::System;
use hypervisor::xenstored::domains::DomainStores;
use hypervisor::xenstored::socket::{self, ServerHandle, SocketServer};
use hypervisor::xenstored::Xenstored;
use idd_blk::blkback::Region;
use iospace::emu::virtio_blk::{BlkConfig, VirtioBlk};
use iospace::emu::virtio_pci::VirtioPci;
use iospace::emu::PciBus;
use iospace::iommu::Iommu;
use iospace::space::IoSpace;
use policy::{BlkMedia, DeviceSpec, GuestKind, Policy};

mod reconnect;

use crate::fault::Fault;
use crate::layout::{GUEST_FRAMES, IDD_FRAMES, JOURNAL_FIRST_FRAME, MAX_CHANNELS};
use crate::recovery::{Cause, Recovery};
use crate::toolstack::{self, ChannelSpec, RingView, VbdNodes};
use crate::VBD_DEVID;

/// Where the programs are and how the manager behaves.
#[derive(Clone, Debug)]
pub struct ManagerConfig {
    /// The IDD program (the `idd-blk` crate's `idd-blk`).
    pub idd_program: PathBuf,
    /// The guest program (`blk-guest`).
    pub guest_program: PathBuf,
    /// Heartbeat deadline; `None`: the policy's `restart.heartbeat`.
    pub heartbeat: Option<Duration>,
    /// Print each recovery on stderr.
    pub verbose: bool,
}

impl ManagerConfig {
    /// The programs next to the running executable (or its parent directory, for test and
    /// bench executables in `target/*/deps`).
    pub fn beside_current_exe() -> Result<Self> {
        let exe = std::env::current_exe()?;
        let find = |name: &str| -> Result<PathBuf> {
            let dir = exe.parent().context("executable has no directory")?;
            for d in [Some(dir), dir.parent()].into_iter().flatten() {
                let p = d.join(name);
                if p.exists() {
                    return Ok(p);
                }
            }
            bail!(
                "{name} not found next to {} (cargo build -p idd-blk -p device-manager)",
                exe.display()
            )
        };
        Ok(Self {
            idd_program: find("idd-blk")?,
            guest_program: find("blk-guest")?,
            heartbeat: None,
            verbose: false,
        })
    }
}

/// A line a domain process printed, or its end.
#[derive(Debug)]
enum Line {
    Text(Instant, String),
    Eof,
}

fn forward(d: &mut RunningDomain, tx: Sender<Line>) {
    if let Some(out) = d.child_mut().stdout.take() {
        std::thread::spawn(move || {
            for line in BufReader::new(out)
                .lines()
                .map_while(std::result::Result::ok)
            {
                if tx.send(Line::Text(Instant::now(), line)).is_err() {
                    return;
                }
            }
            let _ = tx.send(Line::Eof);
        });
    }
}

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
    process: Option<RunningDomain>,
    lines: Option<Receiver<Line>>,
}

struct IddProcess {
    run: RunningDomain,
    lines: Receiver<Line>,
    last_beat: Instant,
    stopped: bool,
}

/// The emulated device and what serves its I/O Space.
struct Device {
    name: String,
    image: PathBuf,
    sectors: u64,
    _bus: PciBus,
    pci: Arc<VirtioPci<VirtioBlk>>,
    iommu: Arc<Iommu>,
    sock: PathBuf,
    _listener: std::thread::JoinHandle<()>,
}

/// The device manager (see the crate docs).
pub struct Manager {
    cfg: ManagerConfig,
    sys: Arc<System>,
    stores: DomainStores,
    server: Option<ServerHandle>,
    xs_sock: PathBuf,
    admin: Client<UnixStream>,
    dev: Device,
    idd: DomId,
    idd_proc: Option<IddProcess>,
    channels: Vec<ChannelSpec>,
    /// The guest (index into `guests`) of each channel.
    chan_guest: Vec<usize>,
    guests: Vec<GuestDisk>,
    heartbeat: Duration,
    max_restarts: u32,
    window: Duration,
    restarts: VecDeque<Instant>,
    recoveries: Vec<Recovery>,
    fault_at: Option<Instant>,
    failed_channels: Vec<usize>,
    /// Failed channels already reconnected (by index at the time of failure).
    reset_done: Vec<usize>,
    _dir: tempfile::TempDir,
}

fn serve_io_space(listener: UnixListener, space: Arc<IoSpace>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        // Each link on its own thread: a new IDD process's link owns the MSI-X vectors from
        // its start, even while a dead process's link is still ending (`iospace::link::serve`).
        for s in listener.incoming() {
            let Ok(s) = s else { return };
            let space = Arc::clone(&space);
            std::thread::spawn(move || {
                let r = iospace::link::serve(&space, s);
                if std::env::var_os("DM_DEBUG").is_some() {
                    eprintln!("[dom0] I/O Space link ended: {r:?}");
                }
            });
        }
    })
}

impl Manager {
    /// Build domain 0, the first virtio-blk device of `policy` and its IDD domain, and the
    /// domains and XenStore nodes of every process guest with a disk on it.
    pub fn start(policy: &Policy, cfg: ManagerConfig) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("idd-dm-").tempdir()?;
        let dev = policy
            .devices
            .iter()
            .find(|d| matches!(d.spec, DeviceSpec::Blk { .. }))
            .context("the policy has no virtio-blk device")?;
        let DeviceSpec::Blk { size, media } = &dev.spec else {
            unreachable!("found above")
        };
        let BlkMedia::Image(image) = media else {
            bail!("device {}: PCI passthrough is not supported yet", dev.name)
        };
        let heartbeat = cfg
            .heartbeat
            .unwrap_or(Duration::from_micros(dev.restart.heartbeat_us));

        // Domain 0: the hypervisor core, xenstored on its socket and on the domains' rings.
        let sys = System::new();
        let dom0 = sys.create_domain(DomainConfig {
            name: "dom0".into(),
            nr_frames: 16,
            iommu: None,
        })?;
        let xs = Xenstored::new();
        let xs_sock = dir.path().join("xenstored.sock");
        let server = SocketServer::bind(&xs_sock, Arc::clone(&xs))?.spawn()?;
        let stores = DomainStores::start(Arc::clone(&sys), xs, dom0)?;
        let mut admin = socket::connect(&xs_sock)?;

        // The device: virtio-blk-pci on the emulated bus, its IOMMU and I/O Space.
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
        let pci_dev = pci.clone();
        let space = Arc::new(IoSpace::new(bdf, pci)?);
        let dev_sock = dir.path().join(format!("{}.iospace", dev.name));
        let listener = serve_io_space(UnixListener::bind(&dev_sock)?, space);

        // The IDD domain, with the device's IOMMU.
        let idd = sys.create_domain(DomainConfig {
            name: format!("idd-{}", dev.name),
            nr_frames: IDD_FRAMES,
            iommu: Some(iommu.clone()),
        })?;

        // The guests.
        let mut guests = Vec::new();
        for g in &policy.guests {
            let Some(disk) = g.disk.iter().find(|d| d.device == dev.name) else {
                continue;
            };
            if g.kind != GuestKind::Process {
                bail!("guest {}: only process guests are supported yet", g.name);
            }
            ensure!(
                (guests.len() as u64) < MAX_CHANNELS,
                "more than {MAX_CHANNELS} guests on one device"
            );
            let domid = sys.create_domain(DomainConfig {
                name: g.name.clone(),
                nr_frames: GUEST_FRAMES,
                iommu: None,
            })?;
            stores.introduce(domid)?;
            let region = Region {
                offset: disk.region.start_sector(),
                sectors: disk.region.sectors(),
            };
            let nodes = VbdNodes {
                guest: domid,
                idd,
                devid: VBD_DEVID,
                sectors: region.sectors,
                read_only: disk.read_only,
                device: dev.name.clone(),
            };
            toolstack::write_vbd(&mut admin, &nodes)?;
            guests.push(GuestDisk {
                name: g.name.clone(),
                domid,
                nodes,
                region,
                ring: None,
                process: None,
                lines: None,
            });
        }
        ensure!(
            !guests.is_empty(),
            "no process guest has a disk on {}",
            dev.name
        );
        Ok(Self {
            cfg,
            sys,
            stores,
            server: Some(server),
            xs_sock,
            admin,
            dev: Device {
                name: dev.name.clone(),
                image: image.clone(),
                sectors,
                _bus: bus,
                pci: pci_dev,
                iommu,
                sock: dev_sock,
                _listener: listener,
            },
            idd,
            idd_proc: None,
            channels: Vec::new(),
            chan_guest: Vec::new(),
            guests,
            heartbeat,
            max_restarts: dev.restart.max_restarts,
            window: Duration::from_micros(dev.restart.window_us),
            restarts: VecDeque::new(),
            recoveries: Vec::new(),
            fault_at: None,
            failed_channels: Vec::new(),
            reset_done: Vec::new(),
            _dir: dir,
        })
    }

    /// The hypervisor core.
    pub fn system(&self) -> &Arc<System> {
        &self.sys
    }

    /// xenstored's socket (for `xenstore-ls` with `XENSTORED_PATH`).
    pub fn xenstored_socket(&self) -> &Path {
        &self.xs_sock
    }

    /// The image file and its size in sectors.
    pub fn image(&self) -> (&Path, u64) {
        (&self.dev.image, self.dev.sectors)
    }

    /// The IDD's domain id.
    pub fn idd(&self) -> DomId {
        self.idd
    }

    /// The guests.
    pub fn guests(&self) -> &[GuestDisk] {
        &self.guests
    }

    /// Every recovery so far.
    pub fn recoveries(&self) -> &[Recovery] {
        &self.recoveries
    }

    /// Channels the IDD reported failed (indexes into [`Self::guests`]).
    pub fn failed_channels(&self) -> &[usize] {
        &self.failed_channels
    }

    /// IOMMU entries in use by the device (pins).
    pub fn iommu_entries(&self) -> usize {
        self.dev.iommu.len()
    }

    fn guest_index(&self, name: &str) -> Result<usize> {
        self.guests
            .iter()
            .position(|g| g.name == name)
            .with_context(|| format!("no guest {name}"))
    }

    /// Start guest `name`'s process (the guest program with `args`), sandboxed in its domain.
    pub fn start_guest(&mut self, name: &str, args: &[&str]) -> Result<()> {
        let i = self.guest_index(name)?;
        let g = &mut self.guests[i];
        ensure!(g.process.is_none(), "guest {name} already runs");
        let prog = self.cfg.guest_program.clone();
        let mut run = self
            .stores
            .spawn_in(g.domid, LaunchConfig::new(name, GUEST_FRAMES, prog, args))?;
        let (tx, rx) = channel();
        forward(&mut run, tx);
        g.process = Some(run);
        g.lines = Some(rx);
        Ok(())
    }

    /// Wait until every started guest has published its ring, then start the IDD process with
    /// their channels and mark the backends `Connected`.
    pub fn connect(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut channels = Vec::new();
        let mut chan_guest = Vec::new();
        for (gi, g) in self.guests.iter_mut().enumerate() {
            if g.process.is_none() {
                continue;
            }
            let (gref, port) = loop {
                if let Some(r) = toolstack::frontend_ring(&mut self.admin, &g.nodes)? {
                    break r;
                }
                ensure!(
                    Instant::now() < deadline,
                    "guest {} did not publish its ring",
                    g.name
                );
                std::thread::sleep(Duration::from_millis(2));
            };
            g.ring = Some(RingView::new(self.sys.clone(), g.domid, gref));
            channels.push(ChannelSpec {
                guest: g.domid,
                ring_ref: gref,
                port,
                region: g.region,
                read_only: g.nodes.read_only,
            });
            chan_guest.push(gi);
        }
        self.channels = channels;
        self.chan_guest = chan_guest;
        self.spawn_idd()?;
        self.wait_ready(deadline.saturating_duration_since(Instant::now()))?;
        for g in &self.guests {
            if g.ring.is_some() {
                toolstack::set_backend_state(&mut self.admin, &g.nodes, XenbusState::Connected)?;
            }
        }
        Ok(())
    }

    fn spawn_idd(&mut self) -> Result<()> {
        let sock = self.dev.sock.to_string_lossy().into_owned();
        let mut args = vec!["--device-socket".to_owned(), sock];
        for c in &self.channels {
            args.push("--channel".into());
            args.push(c.to_string());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut lc = LaunchConfig::new(
            &format!("idd-{}", self.dev.name),
            IDD_FRAMES,
            &self.cfg.idd_program,
            &args,
        );
        lc.iommu = Some(self.dev.iommu.clone());
        let mut run = hypervisor::launch::spawn_in(&self.sys, self.idd, lc)?;
        let (tx, rx) = channel();
        forward(&mut run, tx);
        self.idd_proc = Some(IddProcess {
            run,
            lines: rx,
            last_beat: Instant::now(),
            stopped: false,
        });
        Ok(())
    }

    /// Take the IDD's stdout lines; true once `ready` was seen (when `want_ready`).
    fn drain_idd(&mut self, wait: Duration, want_ready: bool) -> Result<bool> {
        let p = self.idd_proc.as_mut().context("no IDD process")?;
        let mut wait = wait;
        loop {
            match p.lines.recv_timeout(wait) {
                Ok(Line::Text(at, l)) => {
                    if self.cfg.verbose && std::env::var_os("DM_DEBUG").is_some() {
                        eprintln!("[idd] {l}");
                    }
                    if l == "ready" || l.starts_with("hb ") {
                        p.last_beat = at;
                    }
                    if let Some(c) = l.strip_prefix("failed ") {
                        if let Ok(c) = c.parse::<usize>() {
                            if !self.failed_channels.contains(&c) {
                                self.failed_channels.push(c);
                            }
                        }
                    }
                    if want_ready && l == "ready" {
                        return Ok(true);
                    }
                    wait = Duration::ZERO;
                }
                Ok(Line::Eof) | Err(RecvTimeoutError::Disconnected) => return Ok(false),
                Err(RecvTimeoutError::Timeout) => return Ok(false),
            }
        }
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.drain_idd(Duration::from_millis(20), true)? {
            let p = self.idd_proc.as_mut().context("no IDD process")?;
            if let Some(r) = p.run.wait_exit(Some(Duration::ZERO))? {
                bail!("the IDD process ended before it was ready: {r:?}");
            }
            ensure!(
                Instant::now() < deadline,
                "the IDD process did not get ready"
            );
        }
        Ok(())
    }

    /// Inject `fault` into the running IDD (see [`crate::fault`]).
    pub fn inject(&mut self, fault: &Fault) -> Result<()> {
        let signal = match fault {
            Fault::Crash => libc::SIGABRT,
            Fault::Hang => libc::SIGSTOP,
            Fault::Corrupt { guest } => {
                let i = self.guest_index(guest)?;
                let ring = self.guests[i]
                    .ring
                    .as_ref()
                    .context("that guest has no ring yet")?;
                ring.corrupt(Duration::from_millis(50))?;
                return Ok(());
            }
        };
        let p = self.idd_proc.as_mut().context("no IDD process")?;
        ensure!(
            p.run.wait_exit(Some(Duration::ZERO))?.is_none(),
            "the IDD process is not running"
        );
        let pid = i32::try_from(p.run.child_mut().id())?;
        self.fault_at = Some(Instant::now());
        // SAFETY: kill(2) on our own child, not reaped yet (checked just above), so the pid
        // cannot have been reused.
        if unsafe { libc::kill(pid, signal) } != 0 {
            bail!("kill: {}", std::io::Error::last_os_error());
        }
        p.stopped |= signal == libc::SIGSTOP;
        Ok(())
    }

    /// Watch the IDD for up to `timeout`: a crash (pidfd) or a missed heartbeat deadline is
    /// recovered at once, and the recovery returned.
    pub fn supervise(&mut self, timeout: Duration) -> Result<Option<Recovery>> {
        let until = Instant::now() + timeout;
        loop {
            self.drain_idd(Duration::ZERO, false)?;
            if let Some(chan) = self
                .failed_channels
                .iter()
                .copied()
                .find(|c| !self.reset_done.contains(c))
            {
                self.reset_done.push(chan);
                return self.reset_channel(chan, Duration::from_secs(20)).map(Some);
            }
            let p = self.idd_proc.as_mut().context("no IDD process")?;
            let left = until.saturating_duration_since(Instant::now());
            let slice = left.min(Duration::from_millis(5));
            if let Some(r) = p.run.wait_exit(Some(slice))? {
                let cause = Cause::Exited(format!("{r:?}"));
                return self.recover(cause).map(Some);
            }
            let silent = p.last_beat.elapsed();
            if silent > self.heartbeat {
                // Hung: kill it (SIGKILL ends a stopped process too) and wait for the pidfd.
                p.run.kill()?;
                return self.recover(Cause::Hung(silent)).map(Some);
            }
            if left.is_zero() {
                return Ok(None);
            }
        }
    }

    fn recover(&mut self, cause: Cause) -> Result<Recovery> {
        let t_detect = Instant::now();
        let detect = self
            .fault_at
            .take()
            .map_or(Duration::ZERO, |f| t_detect - f);
        // Restart budget.
        self.restarts.push_back(t_detect);
        while self
            .restarts
            .front()
            .is_some_and(|t| t_detect - *t > self.window)
        {
            self.restarts.pop_front();
        }
        ensure!(
            self.restarts.len() <= self.max_restarts as usize,
            "the IDD failed {} times within {:?}: giving up (restart.max_restarts)",
            self.restarts.len(),
            self.window
        );
        // Where every guest ring stood (to see the first response of the new process).
        let before: Vec<Option<(u32, u32)>> = self
            .guests
            .iter()
            .map(|g| g.ring.as_ref().and_then(|r| r.indexes().ok()))
            .collect();
        // Revoke: the process is gone (the pidfd said so), its mappings went with it.
        let t0 = Instant::now();
        let released = self.sys.release_mappings(self.idd)?;
        self.sys.set_holder_deadline(self.idd, t0)?;
        let revoked = self.sys.revoke_overdue().len();
        // Lift the deadline again for the next process (one day is "none").
        self.sys
            .set_holder_deadline(self.idd, Instant::now() + Duration::from_secs(86_400))?;
        // The journals' pin tables list IOVAs the dead process pinned, for the next process
        // to unpin. They are all revoked now, and the IOMMU hands freed IOVAs out again (the
        // new process's own queue pins may get them): clear the tables, or the new process
        // would unpin someone else's fresh mapping. The request slots (page 0) stay: the
        // new process replays them and pins again.
        let mem = self.sys.domain(self.idd)?.memory().clone();
        for i in 0..self.channels.len() as u64 {
            mem.write(JOURNAL_FIRST_FRAME + 2 * i + 1, 0, &[0u8; 4096])?;
        }
        let revoke = t0.elapsed();
        // Spawn in the same domain.
        let t1 = Instant::now();
        self.idd_proc = None;
        self.spawn_idd()?;
        let spawn = t1.elapsed();
        // Re-attach (journal replay starts).
        let t2 = Instant::now();
        self.wait_ready(Duration::from_secs(10))?;
        let reattach = t2.elapsed();
        // First response: a ring with requests outstanding at the crash gets an answer.
        let t3 = Instant::now();
        let pending: Vec<usize> = before
            .iter()
            .enumerate()
            .filter_map(|(i, b)| b.filter(|(req, rsp)| req != rsp).map(|_| i))
            .collect();
        loop {
            let answered = pending.iter().any(|i| {
                let now = self.guests[*i].ring.as_ref().and_then(|r| r.indexes().ok());
                matches!((before[*i], now), (Some((_, a)), Some((_, b))) if a != b)
            });
            if answered || (pending.is_empty()) || t3.elapsed() > Duration::from_secs(5) {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let first_response = t3.elapsed();
        if std::env::var_os("DM_DEBUG").is_some() {
            eprintln!(
                "[dom0] after recovery: device status {:#x}, {} IOMMU entries",
                self.dev.pci.device_status(),
                self.dev.iommu.len()
            );
        }
        let r = Recovery {
            seq: u32::try_from(self.recoveries.len() + 1).unwrap_or(u32::MAX),
            cause,
            detect,
            revoke,
            revoked: (released, revoked),
            spawn,
            reattach,
            first_response,
        };
        if self.cfg.verbose {
            eprintln!("[manager] {r}");
        }
        tracing::info!("{r}");
        self.recoveries.push(r.clone());
        Ok(r)
    }

    /// Wait for guest `name`'s process to end; returns how it ended and every line it printed.
    pub fn wait_guest(
        &mut self,
        name: &str,
        timeout: Duration,
    ) -> Result<(ExitReport, Vec<String>)> {
        let i = self.guest_index(name)?;
        let deadline = Instant::now() + timeout;
        let mut lines = Vec::new();
        let g = &mut self.guests[i];
        let rx = g.lines.take().context("guest not started")?;
        loop {
            match rx.recv_timeout(Duration::from_millis(20)) {
                Ok(Line::Text(_, l)) => lines.push(l),
                Ok(Line::Eof) | Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    ensure!(Instant::now() < deadline, "guest {name} did not finish");
                }
            }
        }
        let p = g.process.as_mut().context("guest not started")?;
        let r = p
            .wait_exit(Some(deadline.saturating_duration_since(Instant::now())))?
            .context("guest did not exit")?;
        g.process = None;
        Ok((r, lines))
    }

    /// Whether guest `name`'s process still runs.
    pub fn guest_running(&mut self, name: &str) -> Result<bool> {
        let i = self.guest_index(name)?;
        match self.guests[i].process.as_mut() {
            Some(p) => Ok(p.wait_exit(Some(Duration::ZERO))?.is_none()),
            None => Ok(false),
        }
    }

    /// New stdout lines of guest `name` (without blocking).
    pub fn guest_lines(&mut self, name: &str) -> Result<Vec<String>> {
        let i = self.guest_index(name)?;
        let mut out = Vec::new();
        if let Some(rx) = self.guests[i].lines.as_ref() {
            while let Ok(Line::Text(_, l)) = rx.try_recv() {
                out.push(l);
            }
        }
        Ok(out)
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        if let Some(mut p) = self.idd_proc.take() {
            let _ = p.run.kill();
        }
        for g in &mut self.guests {
            if let Some(mut p) = g.process.take() {
                let _ = p.kill();
            }
            let _ = self.stores.destroy(g.domid);
        }
        let _ = self.sys.destroy_domain(self.idd);
        if let Some(s) = self.server.take() {
            let _ = s.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_looked_up_next_to_the_executable() {
        // In a unit-test binary (target/debug/deps) the bins are one directory up once built;
        // either they are found or the error names what is missing.
        match ManagerConfig::beside_current_exe() {
            Ok(c) => assert!(c.idd_program.ends_with("idd-blk")),
            Err(e) => assert!(e.to_string().contains("not found"), "{e}"),
        }
    }
}
