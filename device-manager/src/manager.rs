//! The manager: builds everything from a [`Policy`], then supervises the IDDs.
//!
//! Use: [`Manager::start`] (domain 0 services, the devices, the domains, the XenStore nodes),
//! [`Manager::start_guest`] for each guest's process, [`Manager::connect`] (waits for the
//! frontends' rings, starts the IDD processes, marks the backends `Connected`), then call
//! [`Manager::supervise`] in a loop; [`Manager::inject`] injects faults; [`Manager::apply`]
//! applies a policy reload live ([`reload`]).
//!
//! One IDD per device: the policy's first virtio-blk device is the block slice
//! ([`blk`]), every virtio-net device a network slice ([`net`]). A guest is one domain
//! whatever devices it uses; it runs one program.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use devchan::grant::DomId;
use devchan::xenstore::Client;
use hypervisor::domain::DomainConfig;
use hypervisor::launch::{ExitReport, LaunchConfig, RunningDomain};
use hypervisor::system::System;
use hypervisor::xenstored::domains::DomainStores;
use hypervisor::xenstored::socket::{self, ServerHandle, SocketServer};
use hypervisor::xenstored::Xenstored;
use iospace::space::IoSpace;
use policy::{Device, DeviceSpec, GuestKind, Policy};

mod blk;
mod idd;
mod net;
mod reconnect;
pub mod reload;

pub use blk::GuestDisk;
pub use net::GuestNic;
pub use reload::{Applied, How, ReloadError};

use crate::fault::Fault;
use crate::layout::GUEST_FRAMES;
use crate::recovery::Recovery;
use blk::BlkSlice;
use idd::{forward, Idd, Line, RestartRules};
use net::NetSlice;

/// What an IDD is doing now (for status queries).
#[derive(Clone, Debug, serde::Serialize)]
pub struct IddStatus {
    /// The device (policy name).
    pub device: String,
    /// `blk` or `net`.
    pub kind: &'static str,
    /// The IDD's domain.
    pub domid: DomId,
    /// The running process, if any.
    pub pid: Option<u32>,
    /// How long the current process has run, in milliseconds.
    pub uptime_ms: Option<u64>,
    /// Processes started in the domain (1 + restarts).
    pub starts: u32,
    /// The latest heartbeat line.
    pub last_heartbeat: Option<String>,
    /// Channels the IDD reported failed.
    pub failed_channels: Vec<usize>,
}

impl IddStatus {
    fn of(idd: &Idd, kind: &'static str) -> Self {
        Self {
            device: idd.device.clone(),
            kind,
            domid: idd.domid,
            pid: idd.pid(),
            uptime_ms: idd
                .uptime()
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            starts: idd.starts,
            last_heartbeat: idd.last_hb.clone(),
            failed_channels: idd.failed_channels.clone(),
        }
    }
}

/// Where the programs are and how the manager behaves.
#[derive(Clone, Debug)]
pub struct ManagerConfig {
    /// The block IDD program (the `idd-blk` crate's `idd-blk`).
    pub idd_program: PathBuf,
    /// The guest program of [`Manager::start_guest`] (`blk-guest`).
    pub guest_program: PathBuf,
    /// The network IDD program (the `idd-net` crate's `idd-net`).
    pub net_idd_program: PathBuf,
    /// Heartbeat deadline; `None`: the policy's `restart.heartbeat`.
    pub heartbeat: Option<Duration>,
    /// Print each recovery on stderr.
    pub verbose: bool,
}

impl ManagerConfig {
    /// The programs next to the running executable (or its parent directory, for test and
    /// bench executables in `target/*/deps`); one not found stays a bare name, and starting
    /// it fails with that name.
    pub fn beside_current_exe() -> Result<Self> {
        // A program that is missing is reported when it is needed (a policy without a NIC
        // never needs idd-net).
        let find = |name: &str| find_program(name).unwrap_or_else(|_| PathBuf::from(name));
        Ok(Self {
            idd_program: find("idd-blk"),
            guest_program: find("blk-guest"),
            net_idd_program: find("idd-net"),
            heartbeat: None,
            verbose: false,
        })
    }
}

/// The program `name` next to the running executable (or in its parent directory, for
/// test and bench executables in `target/*/deps`).
pub fn find_program(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("executable has no directory")?;
    for d in [Some(dir), dir.parent()].into_iter().flatten() {
        let p = d.join(name);
        if p.exists() {
            return Ok(p);
        }
    }
    bail!(
        "{name} not found next to {} (cargo build --workspace --bins)",
        exe.display()
    )
}

/// Domain 0's services: the hypervisor core, xenstored (socket and rings), the toolstack's
/// XenStore connection, and a directory for sockets.
pub(crate) struct Dom0 {
    pub sys: Arc<System>,
    pub stores: DomainStores,
    server: Option<ServerHandle>,
    pub xs_sock: PathBuf,
    pub admin: Client<UnixStream>,
    pub dir: tempfile::TempDir,
}

impl Dom0 {
    fn start() -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("idd-dm-").tempdir()?;
        // About 20 descriptors per guest (see `hypervisor::limits`): 64 guests need more
        // than the usual soft limit of 1024.
        if let Err(e) = hypervisor::limits::raise_fd_limit() {
            tracing::warn!("{e}; many guests may exhaust the descriptors");
        }
        let sys = System::new();
        let dom0 = sys.create_domain(DomainConfig {
            name: "dom0".into(),
            nr_frames: 16,
            iommu: None,
        })?;
        let xs = Xenstored::with_quotas(crate::layout::xenstore_quotas());
        let xs_sock = dir.path().join("xenstored.sock");
        let server = SocketServer::bind(&xs_sock, Arc::clone(&xs))?.spawn()?;
        let stores = DomainStores::start(Arc::clone(&sys), xs, dom0)?;
        let admin = socket::connect(&xs_sock)?;
        Ok(Self {
            sys,
            stores,
            server: Some(server),
            xs_sock,
            admin,
            dir,
        })
    }
}

impl Drop for Dom0 {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            let _ = s.stop();
        }
    }
}

/// Serve a device's I/O Space to its IDD processes on `listener`.
pub(crate) fn serve_io_space(
    listener: UnixListener,
    space: Arc<IoSpace>,
) -> std::thread::JoinHandle<()> {
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

/// A guest domain and its program.
pub struct GuestDomain {
    /// Guest name (policy).
    pub name: String,
    /// Its domain.
    pub domid: DomId,
    process: Option<RunningDomain>,
    lines: Option<Receiver<Line>>,
}

fn rules(dev: &Device, cfg: &ManagerConfig) -> RestartRules {
    RestartRules {
        heartbeat: cfg
            .heartbeat
            .unwrap_or(Duration::from_micros(dev.restart.heartbeat_us)),
        max_restarts: dev.restart.max_restarts,
        window: Duration::from_micros(dev.restart.window_us),
    }
}

/// The device manager (see the crate docs).
pub struct Manager {
    cfg: ManagerConfig,
    blk: Option<BlkSlice>,
    nets: Vec<NetSlice>,
    guests: Vec<GuestDomain>,
    recoveries: Vec<Recovery>,
    // Last: domain 0 goes after everything that uses it.
    d0: Dom0,
}

impl Manager {
    /// Build domain 0, the devices of `policy` with their IDD domains, and the domains and
    /// XenStore nodes of every process guest that uses one of them.
    pub fn start(policy: &Policy, cfg: ManagerConfig) -> Result<Self> {
        let mut d0 = Dom0::start()?;
        let mut blk = None;
        let mut nets = Vec::new();
        for dev in &policy.devices {
            match dev.spec {
                DeviceSpec::Blk { .. } if blk.is_none() => {
                    blk = Some(BlkSlice::build(
                        &d0,
                        dev,
                        &cfg.idd_program,
                        rules(dev, &cfg),
                        cfg.verbose,
                    )?);
                }
                DeviceSpec::Blk { .. } => {
                    bail!("device {}: one disk per manager for now", dev.name)
                }
                DeviceSpec::Net { .. } => nets.push(NetSlice::build(
                    &d0,
                    dev,
                    &cfg.net_idd_program,
                    rules(dev, &cfg),
                    cfg.verbose,
                )?),
            }
        }
        ensure!(
            blk.is_some() || !nets.is_empty(),
            "the policy has no device this manager can run"
        );
        let mut guests = Vec::new();
        for g in &policy.guests {
            guests.extend(add_guest_domain(&mut d0, blk.as_mut(), &mut nets, g)?);
        }
        ensure!(!guests.is_empty(), "no process guest uses a device");
        Ok(Self {
            cfg,
            blk,
            nets,
            guests,
            recoveries: Vec::new(),
            d0,
        })
    }

    fn blk(&self) -> Result<&BlkSlice> {
        self.blk.as_ref().context("the policy has no disk")
    }

    fn net(&self, device: &str) -> Result<&NetSlice> {
        self.nets
            .iter()
            .find(|n| n.dev.name == device)
            .with_context(|| format!("no NIC {device}"))
    }

    /// The hypervisor core.
    pub fn system(&self) -> &Arc<System> {
        &self.d0.sys
    }

    /// xenstored's socket (for `xenstore-ls` with `XENSTORED_PATH`).
    pub fn xenstored_socket(&self) -> &Path {
        &self.d0.xs_sock
    }

    /// The disk's image file and its size in sectors.
    pub fn image(&self) -> Result<(&Path, u64)> {
        let b = self.blk()?;
        Ok((&b.dev.image, b.dev.sectors))
    }

    /// The disk IDD's domain id.
    pub fn idd(&self) -> Result<DomId> {
        Ok(self.blk()?.idd.domid)
    }

    /// The guests' disks (none without a disk).
    pub fn disks(&self) -> &[GuestDisk] {
        self.blk.as_ref().map_or(&[], |b| &b.disks)
    }

    /// The NICs on device `device`.
    pub fn nics(&self, device: &str) -> Result<&[GuestNic]> {
        Ok(&self.net(device)?.nics)
    }

    /// The names of the NIC devices.
    pub fn net_devices(&self) -> Vec<String> {
        self.nets.iter().map(|n| n.dev.name.clone()).collect()
    }

    /// Where the far side of NIC `device`'s UDP wire sends frames (`None` for a TAP wire).
    pub fn wire_addr(&self, device: &str) -> Result<Option<std::net::SocketAddr>> {
        Ok(self.net(device)?.dev.wire_addr)
    }

    /// NIC `device`'s MAC address.
    pub fn device_mac(&self, device: &str) -> Result<[u8; 6]> {
        Ok(self.net(device)?.dev.mac)
    }

    /// NIC `device`'s counters (frames and bytes on the wire, drops).
    pub fn net_stats(&self, device: &str) -> Result<iospace::emu::virtio_net::NetDevStats> {
        Ok(self.net(device)?.dev.model.stats())
    }

    /// What NIC `device`'s wire is.
    pub fn wire_description(&self, device: &str) -> Result<String> {
        Ok(self.net(device)?.dev.wire_desc.clone())
    }

    /// Whether NIC `device` has a hot standby ready.
    pub fn has_standby(&self, device: &str) -> Result<bool> {
        Ok(self.net(device)?.has_standby())
    }

    /// The guest domains.
    pub fn guests(&self) -> &[GuestDomain] {
        &self.guests
    }

    /// Every IDD's status.
    pub fn idd_status(&self) -> Vec<IddStatus> {
        let mut v = Vec::new();
        if let Some(b) = &self.blk {
            v.push(IddStatus::of(&b.idd, "blk"));
        }
        for n in &self.nets {
            v.push(IddStatus::of(&n.idd, "net"));
        }
        v
    }

    /// Every recovery so far, of every IDD.
    pub fn recoveries(&self) -> &[Recovery] {
        &self.recoveries
    }

    /// Channels the disk IDD reported failed.
    pub fn failed_channels(&self) -> &[usize] {
        self.blk.as_ref().map_or(&[], |b| &b.idd.failed_channels)
    }

    /// IOMMU entries in use by the disk (pins).
    pub fn iommu_entries(&self) -> usize {
        self.blk.as_ref().map_or(0, |b| b.idd.iommu().len())
    }

    fn guest_index(&self, name: &str) -> Result<usize> {
        self.guests
            .iter()
            .position(|g| g.name == name)
            .with_context(|| format!("no guest {name}"))
    }

    /// Start guest `name`'s process (the configured guest program with `args`).
    pub fn start_guest(&mut self, name: &str, args: &[&str]) -> Result<()> {
        let prog = self.cfg.guest_program.clone();
        self.start_guest_program(name, &prog, args)
    }

    /// Start guest `name`'s process, `program` with `args`, sandboxed in its domain.
    pub fn start_guest_program(&mut self, name: &str, program: &Path, args: &[&str]) -> Result<()> {
        let i = self.guest_index(name)?;
        let g = &mut self.guests[i];
        ensure!(g.process.is_none(), "guest {name} already runs");
        let frames = self.d0.sys.domain(g.domid)?.memory().nr_frames();
        let mut run = self
            .d0
            .stores
            .spawn_in(g.domid, LaunchConfig::new(name, frames, program, args))?;
        let (tx, rx) = channel();
        forward(&mut run, tx);
        g.process = Some(run);
        g.lines = Some(rx);
        Ok(())
    }

    fn started(&self) -> Vec<DomId> {
        self.guests
            .iter()
            .filter(|g| g.process.is_some())
            .map(|g| g.domid)
            .collect()
    }

    /// Wait until every started guest has published its rings, then start the IDD processes
    /// with their channels and mark the backends `Connected`.
    pub fn connect(&mut self, timeout: Duration) -> Result<()> {
        let started = self.started();
        if let Some(b) = self.blk.as_mut() {
            b.connect(&mut self.d0, &started, timeout)?;
        }
        for n in &mut self.nets {
            n.connect(&mut self.d0, &started, timeout)?;
        }
        Ok(())
    }

    /// The name of the only IDD's device, or an error naming the choice.
    fn only_device(&self) -> Result<String> {
        let mut names: Vec<String> = self.blk.iter().map(|b| b.dev.name.clone()).collect();
        names.extend(self.net_devices());
        match names.as_slice() {
            [one] => Ok(one.clone()),
            _ => bail!("several devices ({}): say which", names.join(", ")),
        }
    }

    /// Inject `fault` into the IDD of the only device (see [`crate::fault`]).
    pub fn inject(&mut self, fault: &Fault) -> Result<()> {
        let name = self.only_device()?;
        self.inject_into(&name, fault)
    }

    /// Inject `fault` into the IDD of device `device`.
    pub fn inject_into(&mut self, device: &str, fault: &Fault) -> Result<()> {
        let signal = match fault {
            Fault::Crash => libc::SIGABRT,
            Fault::Hang => libc::SIGSTOP,
            Fault::Corrupt { guest } => {
                let ring = if let Some(n) = self.nets.iter().find(|n| n.dev.name == device) {
                    n.tx_ring(&self.d0, guest)?
                } else {
                    let b = self.blk()?;
                    ensure!(b.dev.name == device, "no device {device}");
                    b.disks
                        .iter()
                        .find(|d| &d.name == guest)
                        .with_context(|| format!("guest {guest} has no disk on {device}"))?
                        .ring
                        .clone()
                        .context("that guest has no ring yet")?
                };
                ring.corrupt(Duration::from_millis(50))?;
                return Ok(());
            }
        };
        if let Some(n) = self.nets.iter_mut().find(|n| n.dev.name == device) {
            return n.idd.signal(signal);
        }
        let b = self.blk.as_mut().context("the policy has no disk")?;
        ensure!(b.dev.name == device, "no device {device}");
        b.idd.signal(signal)
    }

    fn next_seq(&self) -> u32 {
        u32::try_from(self.recoveries.len() + 1).unwrap_or(u32::MAX)
    }

    fn record(&mut self, r: Recovery) -> Recovery {
        if self.cfg.verbose {
            eprintln!("[manager] {r}");
        }
        tracing::info!("{r}");
        self.recoveries.push(r.clone());
        r
    }

    /// Watch the IDDs for up to `timeout`: a crash (pidfd), a missed heartbeat deadline or a
    /// refused channel is recovered at once, and the recovery returned.
    pub fn supervise(&mut self, timeout: Duration) -> Result<Option<Recovery>> {
        let until = Instant::now() + timeout;
        loop {
            let seq = self.next_seq();
            let left = until.saturating_duration_since(Instant::now());
            let idds = usize::from(self.blk.is_some()) + self.nets.len();
            let slice = left.min(Duration::from_millis(5)) / u32::try_from(idds.max(1))?;
            if let Some(b) = self.blk.as_mut().filter(|b| b.idd.running()) {
                b.idd.drain(Duration::ZERO, false)?;
                if let Some(chan) = b
                    .idd
                    .failed_channels
                    .iter()
                    .copied()
                    .find(|c| !b.reset_done.contains(c) && *c < b.chan_disk.len())
                {
                    b.reset_done.push(chan);
                    let r = b.reset_channel(&mut self.d0, chan, Duration::from_secs(20), seq)?;
                    return Ok(Some(self.record(r)));
                }
                if let Some(cause) = b.idd.check(slice)? {
                    let r = b.recover(&mut self.d0, cause, seq)?;
                    return Ok(Some(self.record(r)));
                }
            }
            for n in &mut self.nets {
                if !n.idd.running() {
                    continue;
                }
                if let Some(cause) = n.idd.check(slice)? {
                    let r = n.recover(&mut self.d0, cause, seq)?;
                    return Ok(Some(self.record(r)));
                }
            }
            if left.is_zero() {
                return Ok(None);
            }
        }
    }

    /// Replace the disk IDD's *domain* (see [`blk`]'s reconnect).
    pub fn replace_idd_domain(&mut self, timeout: Duration) -> Result<()> {
        let started = self.started();
        let b = self.blk.as_mut().context("no disk")?;
        b.replace_domain(&mut self.d0, &started, timeout)
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

    /// Kill guest `name`'s process (if it runs).
    pub fn stop_guest(&mut self, name: &str) -> Result<()> {
        let i = self.guest_index(name)?;
        if let Some(mut p) = self.guests[i].process.take() {
            p.kill()?;
        }
        Ok(())
    }
}

/// Whether guest `g` uses a device this manager runs (the disk `blk`, a NIC of `nets`).
fn uses_ours(blk: Option<&BlkSlice>, nets: &[NetSlice], g: &policy::Guest) -> bool {
    let disk = blk.is_some_and(|b| g.disk.iter().any(|d| d.device == b.dev.name));
    disk || g
        .net
        .iter()
        .any(|a| nets.iter().any(|n| n.dev.name == a.device))
}

/// Guest `g`'s domain, with its devices' XenStore nodes on the slices this manager runs
/// (backends `InitWait`); `None` if it uses none of them.
fn add_guest_domain(
    d0: &mut Dom0,
    blk: Option<&mut BlkSlice>,
    nets: &mut [NetSlice],
    g: &policy::Guest,
) -> Result<Option<GuestDomain>> {
    if !uses_ours(blk.as_deref(), nets, g) {
        return Ok(None);
    }
    if g.kind == GuestKind::Xen {
        // A domain of a real Xen host: `iddctl xen serve` in its backend domain serves it.
        tracing::info!(
            "guest {}: a Xen domain, served by `iddctl xen serve` in the backend domain, not here",
            g.name
        );
        return Ok(None);
    }
    let domid = d0.sys.create_domain(DomainConfig {
        name: g.name.clone(),
        nr_frames: GUEST_FRAMES,
        iommu: None,
    })?;
    d0.stores.introduce(domid)?;
    if let Some(b) = blk {
        if let Some(disk) = g.disk.iter().find(|d| d.device == b.dev.name) {
            b.add_disk(d0, &g.name, domid, disk)?;
        }
    }
    for a in &g.net {
        if let Some(n) = nets.iter_mut().find(|n| n.dev.name == a.device) {
            n.add_nic(d0, &g.name, domid, a)?;
        }
    }
    Ok(Some(GuestDomain {
        name: g.name.clone(),
        domid,
        process: None,
        lines: None,
    }))
}

impl Drop for Manager {
    fn drop(&mut self) {
        if let Some(b) = self.blk.as_mut() {
            let _ = b.idd.kill();
        }
        for g in &mut self.guests {
            if let Some(mut p) = g.process.take() {
                let _ = p.kill();
            }
            let _ = self.d0.stores.destroy(g.domid);
        }
        if let Some(b) = self.blk.take() {
            let _ = self.d0.sys.destroy_domain(b.idd.domid);
        }
        for mut n in std::mem::take(&mut self.nets) {
            n.shutdown(&self.d0);
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
