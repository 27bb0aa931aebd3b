//! The network slice of the manager: a virtio-net-pci device on its wire (UDP socket or TAP),
//! its `idd-net` IDD, and the guests' NICs on it.
//!
//! Recovery is the block slice's (same domain, new process, the journal replayed); the
//! first-response phase lasts until a response appears on any of the guests' rings (a
//! transmit answered or a frame delivered), at most half a second: with no traffic nothing
//! moves. The guest-visible outage is what a probe measures from the wire.
//!
//! # Hot standby
//!
//! With `standby = true` in the policy, a second domain holds an `idd-net --standby`
//! process that has connected to the device's I/O Space and entered its sandbox but does
//! not touch the device. On a failure of the primary the manager revokes the primary's
//! grants and pins, moves every backend directory to the standby domain and rewrites the
//! frontends' `backend`/`backend-id` (the reconnect protocol: frontends publish fresh rings
//! to the new domain), then hands the standby its channels on stdin; it resets the device
//! and serves. The old primary domain becomes the next standby. Unmodified Linux frontends
//! cannot follow this (they only reconnect on resume): for them the cold, same-domain
//! restart is the path.

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use devchan::grant::DomId;
use devchan::xenbus::XenbusState;
use hypervisor::domain::DomainConfig;
use hypervisor::launch::{LaunchConfig, RunningDomain};
use hypervisor::memory::layout::FIRST_FREE_FRAME;
use iospace::emu::virtio_net::{NetConfig, VirtioNet};
use iospace::emu::virtio_pci::VirtioPci;
use iospace::emu::wire::{self, UdpWire, Wire, WireConfig};
use iospace::emu::PciBus;
use iospace::iommu::Iommu;
use iospace::space::IoSpace;
use policy::{Device, DeviceSpec, NetAccess};

use super::idd::{Idd, RestartRules};
use super::{serve_io_space, Dom0};
use crate::recovery::{Cause, Recovery};
use crate::toolstack::vif::{self, NetChannel, VifNodes, VifRings};
use crate::toolstack::RingView;

/// Longest wait for the first ring response after a recovery.
const FIRST_RESPONSE_WAIT: Duration = Duration::from_millis(500);

/// Most NICs one network IDD serves.
pub const MAX_NICS: usize = 64;

/// One guest NIC.
pub struct GuestNic {
    /// Guest name (policy).
    pub name: String,
    /// Its domain.
    pub domid: DomId,
    /// Its XenStore nodes.
    pub nodes: VifNodes,
    /// Its policy (MAC, allowed IPs, share).
    pub access: NetAccess,
    /// Its rings, once published.
    pub rings: Option<VifRings>,
}

/// The emulated NIC and what serves its I/O Space.
pub(crate) struct NetDevice {
    pub name: String,
    pub mac: [u8; 6],
    /// What the wire is (for status).
    pub wire_desc: String,
    /// The UDP wire's bound address (where the wire's far side sends frames).
    pub wire_addr: Option<std::net::SocketAddr>,
    pub model: Arc<VirtioNet>,
    _pci: Arc<VirtioPci<VirtioNet>>,
    _bus: PciBus,
    pub sock: PathBuf,
    _listener: std::thread::JoinHandle<()>,
}

/// A standby process, idle in its own domain.
struct Standby {
    domid: DomId,
    run: RunningDomain,
    stdin: ChildStdin,
}

/// The network slice (see the module docs).
pub(crate) struct NetSlice {
    pub dev: NetDevice,
    pub idd: Idd,
    pub nics: Vec<GuestNic>,
    pub channels: Vec<NetChannel>,
    program: PathBuf,
    frames: u64,
    standby: Option<Standby>,
    want_standby: bool,
}

/// The device's own MAC: locally administered, derived from the device's name.
fn device_mac(name: &str) -> [u8; 6] {
    let h = crate::fnv64(name.as_bytes()).to_le_bytes();
    [0x02, 0x1d, 0xd0, 0xfe, h[0], h[1]]
}

impl NetSlice {
    /// Build the device `dev` on its wire and its IDD domain.
    pub fn build(
        d0: &Dom0,
        dev: &Device,
        program: &Path,
        rules: RestartRules,
        verbose: bool,
    ) -> Result<Self> {
        let DeviceSpec::Net { wire: w, .. } = &dev.spec else {
            bail!("device {} is not a NIC", dev.name)
        };
        let wcfg = match w {
            policy::Wire::Udp { bind, peer } => WireConfig::Udp {
                bind: *bind,
                peer: *peer,
            },
            policy::Wire::Tap { ifname } => WireConfig::Tap {
                ifname: ifname.clone(),
            },
            policy::Wire::Pci(_) => {
                bail!("device {}: PCI passthrough is not supported yet", dev.name)
            }
        };
        let (wire, wire_addr): (Arc<dyn Wire>, _) = match &wcfg {
            WireConfig::Udp { bind, peer } => {
                let w =
                    UdpWire::bind(*bind, *peer).with_context(|| format!("wire of {}", dev.name))?;
                let addr = w.local_addr()?;
                (Arc::new(w), Some(addr))
            }
            WireConfig::Tap { .. } => (
                wire::open(&wcfg).with_context(|| format!("wire of {}", dev.name))?,
                None,
            ),
        };
        let mac = device_mac(&dev.name);
        let model = Arc::new(VirtioNet::new(NetConfig::new(mac, wire.clone()))?);
        let iommu = Iommu::new(4096);
        let pci = Arc::new(VirtioPci::new(model.clone(), iommu.device(), 10)?);
        let bus = PciBus::new();
        let bdf = bus.plug(3, pci.clone())?;
        let space = Arc::new(IoSpace::new(bdf, pci.clone())?);
        let sock = d0.dir.path().join(format!("{}.iospace", dev.name));
        let listener = serve_io_space(UnixListener::bind(&sock)?, space);
        let frames = idd_net::layout::frames_needed(MAX_NICS as u64);
        let domid = d0.sys.create_domain(DomainConfig {
            name: format!("idd-{}", dev.name),
            nr_frames: frames,
            iommu: Some(iommu.clone()),
        })?;
        Ok(Self {
            dev: NetDevice {
                name: dev.name.clone(),
                mac,
                wire_desc: wire.describe(),
                wire_addr,
                model,
                _pci: pci,
                _bus: bus,
                sock,
                _listener: listener,
            },
            idd: Idd::new(
                &dev.name,
                domid,
                program.to_owned(),
                frames,
                iommu,
                rules,
                verbose,
            ),
            nics: Vec::new(),
            channels: Vec::new(),
            program: program.to_owned(),
            frames,
            standby: None,
            want_standby: dev.standby,
        })
    }

    /// Give guest `name` (domain `domid`) a NIC: XenStore nodes, backend `InitWait`.
    pub fn add_nic(
        &mut self,
        d0: &mut Dom0,
        name: &str,
        domid: DomId,
        access: &NetAccess,
    ) -> Result<()> {
        ensure!(
            self.nics.len() < MAX_NICS,
            "more than {MAX_NICS} NICs on one device"
        );
        let devid = u16::try_from(self.nics.iter().filter(|n| n.domid == domid).count())?;
        let nodes = VifNodes {
            guest: domid,
            idd: self.idd.domid,
            devid,
            mac: access.mac,
        };
        vif::write_vif(&mut d0.admin, &nodes)?;
        self.nics.push(GuestNic {
            name: name.to_owned(),
            domid,
            nodes,
            access: access.clone(),
            rings: None,
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

    /// Wait until every NIC of a started guest has published its rings.
    /// Wait until every NIC of a started guest has published its rings. With `leave_out`, a
    /// guest whose rings do not come by `deadline`, or whose keys are malformed, is left
    /// without a channel (and said so on stderr) instead of failing the whole step: one
    /// hostile guest must not stop a promotion for the others.
    fn collect_rings(
        &mut self,
        d0: &mut Dom0,
        started: &[DomId],
        deadline: Instant,
        leave_out: bool,
    ) -> Result<()> {
        let mut channels = Vec::new();
        for n in &mut self.nics {
            n.rings = None;
            if !started.contains(&n.domid) {
                continue;
            }
            let rings = loop {
                let got = vif::frontend_rings(&mut d0.admin, &n.nodes)
                    .with_context(|| format!("guest {}", n.name));
                let missing = match got {
                    Ok(Some(r)) => break Some(r),
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    }
                    Ok(None) => anyhow::anyhow!("guest {} did not publish its NIC's rings", n.name),
                    Err(e) => e,
                };
                if !leave_out {
                    return Err(missing);
                }
                eprintln!(
                    "[manager] {}: {missing:#}; its NIC is left without a channel",
                    self.dev.name
                );
                break None;
            };
            let Some(rings) = rings else { continue };
            n.rings = Some(rings);
            channels.push(NetChannel {
                guest: n.domid,
                rings,
                access: n.access.clone(),
            });
        }
        self.channels = channels;
        Ok(())
    }

    fn mark_connected(&self, d0: &mut Dom0) -> Result<()> {
        for n in &self.nics {
            if n.rings.is_some() {
                vif::set_backend_state(&mut d0.admin, &n.nodes, XenbusState::Connected)?;
            }
        }
        Ok(())
    }

    /// Start the IDD process with the channels of every started guest, mark the backends
    /// `Connected`, and start the standby if the policy asks for one.
    pub fn connect(&mut self, d0: &mut Dom0, started: &[DomId], timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        self.collect_rings(d0, started, deadline, false)?;
        if self.channels.is_empty() {
            return Ok(());
        }
        let args = self.idd_args();
        self.idd.spawn(&d0.sys, &args)?;
        self.idd
            .wait_ready(deadline.saturating_duration_since(Instant::now()))?;
        self.mark_connected(d0)?;
        if self.want_standby && self.standby.is_none() {
            let domid = d0.sys.create_domain(DomainConfig {
                name: format!("idd-{}-standby", self.dev.name),
                nr_frames: self.frames,
                iommu: Some(self.idd.iommu().clone()),
            })?;
            self.standby = Some(self.spawn_standby(d0, domid)?);
        }
        Ok(())
    }

    fn spawn_standby(&self, d0: &Dom0, domid: DomId) -> Result<Standby> {
        let args = [
            "--device-socket".to_owned(),
            self.dev.sock.to_string_lossy().into_owned(),
            "--standby".to_owned(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut lc = LaunchConfig::new(
            &format!("idd-{}-standby", self.dev.name),
            self.frames,
            &self.program,
            &args,
        );
        lc.iommu = Some(self.idd.iommu().clone());
        lc.stdin = Stdio::piped();
        let mut run = hypervisor::launch::spawn_in(&d0.sys, domid, lc)?;
        let stdin = run
            .child_mut()
            .stdin
            .take()
            .context("standby without stdin")?;
        Ok(Standby { domid, run, stdin })
    }

    /// Whether a standby is ready to be promoted.
    pub fn has_standby(&self) -> bool {
        self.standby.is_some()
    }

    /// Replace the dead or hung IDD process: promote the standby if there is one, else a
    /// new process in the same domain.
    pub fn recover(&mut self, d0: &mut Dom0, cause: Cause, seq: u32) -> Result<Recovery> {
        if self.standby.is_some() {
            return self.promote(d0, cause, seq);
        }
        let detect = self.idd.begin_recovery()?;
        let views = self.ring_views(d0);
        let before: Vec<_> = views.iter().map(|v| v.indexes().ok()).collect();
        let args = self.idd_args();
        let ph = self.idd.restart_in_place(&d0.sys, &args, || Ok(()))?;
        let t3 = Instant::now();
        self.first_response(&views, &before);
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
            first_response: t3.elapsed(),
        })
    }

    /// Domain 0's views of every channel's transmit and receive rings.
    fn ring_views(&self, d0: &Dom0) -> Vec<RingView> {
        self.channels
            .iter()
            .flat_map(|c| {
                [c.rings.tx, c.rings.rx].map(|g| RingView::new(d0.sys.clone(), c.guest, g))
            })
            .collect()
    }

    /// Wait until the new process answers on some ring (a transmit done or a frame
    /// delivered): the first thing a guest sees of it. Bounded by [`FIRST_RESPONSE_WAIT`]:
    /// with no traffic at all nothing moves, and the phase reads as that bound.
    fn first_response(&self, views: &[RingView], before: &[Option<(u32, u32)>]) {
        let t = Instant::now();
        while t.elapsed() < FIRST_RESPONSE_WAIT {
            let moved = views.iter().zip(before).any(
                |(v, b)| matches!((b, v.indexes().ok()), (Some((_, a)), Some((_, n))) if *a != n),
            );
            if moved {
                return;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Promote the standby (see the module docs).
    fn promote(&mut self, d0: &mut Dom0, cause: Cause, seq: u32) -> Result<Recovery> {
        let detect = self.idd.begin_recovery()?;
        let mut sb = self.standby.take().context("no standby")?;
        let t0 = Instant::now();
        let revoked = self.idd.revoke(&d0.sys)?;
        let old = self.idd.domid;
        let revoke = t0.elapsed();
        // Re-advertise: backend directories in the standby's domain, frontends pointed at
        // them; each frontend drops its rings and publishes new ones for the new domain.
        let t1 = Instant::now();
        for n in &mut self.nics {
            n.nodes.idd = sb.domid;
            vif::write_vif(&mut d0.admin, &n.nodes)?;
            vif::point_frontend(&mut d0.admin, &n.nodes)?;
        }
        let started: Vec<DomId> = self.channels.iter().map(|c| c.guest).collect();
        self.collect_rings(d0, &started, Instant::now() + Duration::from_secs(10), true)?;
        let spawn = t1.elapsed();
        // Hand the standby its channels; it resets the device and attaches.
        let t2 = Instant::now();
        let mut script = String::new();
        for c in &self.channels {
            script.push_str(&format!("channel {c}\n"));
        }
        script.push_str("go\n");
        sb.stdin
            .write_all(script.as_bytes())
            .context("handing the standby its channels")?;
        self.idd.adopt(sb.domid, sb.run, sb.stdin);
        self.idd.wait_ready(Duration::from_secs(10))?;
        self.mark_connected(d0)?;
        let reattach = t2.elapsed();
        let t3 = Instant::now();
        let views = self.ring_views(d0);
        let before: Vec<_> = views.iter().map(|v| v.indexes().ok()).collect();
        self.first_response(&views, &before);
        let first_response = t3.elapsed();
        // The old domain becomes the next standby. Its memory still holds the dead
        // process's journals and pin records; those pins were revoked and their IOVAs may be
        // the new primary's now: wipe them so the next standby starts clean.
        let _ = d0.sys.release_mappings(old);
        let mem = d0.sys.domain(old)?.memory().clone();
        for f in FIRST_FREE_FRAME..self.frames {
            mem.write(f, 0, &[0u8; 4096])?;
        }
        self.standby = Some(self.spawn_standby(d0, old)?);
        Ok(Recovery {
            seq,
            device: self.dev.name.clone(),
            channel: None,
            cause: Cause::Exited(format!("{cause}; standby promoted")),
            detect,
            revoke,
            revoked,
            spawn,
            reattach,
            first_response,
        })
    }

    /// Give guest domain `guest`'s NICs on this device (added with [`Self::add_nic`], its
    /// process started) their channels while the IDD serves: wait for its rings, store the
    /// channels (a restarted or promoted IDD has them), `attach SPEC` each to the running IDD
    /// (or start the IDD if it never ran: no guest had connected), mark the backends
    /// `Connected`. Returns what was done.
    pub fn attach_guest(
        &mut self,
        d0: &mut Dom0,
        guest: DomId,
        timeout: Duration,
    ) -> Result<Vec<String>> {
        if self.idd.starts == 0 {
            self.connect(d0, &[guest], timeout)?;
            return Ok(vec![format!(
                "{}: the IDD started with {} channel(s)",
                self.dev.name,
                self.channels.len()
            )]);
        }
        let deadline = Instant::now() + timeout;
        let mut done = Vec::new();
        for k in 0..self.nics.len() {
            if self.nics[k].domid != guest || self.nics[k].rings.is_some() {
                continue;
            }
            let rings = loop {
                let n = &self.nics[k];
                if let Some(r) = vif::frontend_rings(&mut d0.admin, &n.nodes)
                    .with_context(|| format!("guest {}", n.name))?
                {
                    break r;
                }
                ensure!(
                    Instant::now() < deadline,
                    "guest {} did not publish its NIC's rings",
                    n.name
                );
                std::thread::sleep(Duration::from_millis(2));
            };
            let c = NetChannel {
                guest,
                rings,
                access: self.nics[k].access.clone(),
            };
            let spec = c.to_string();
            self.nics[k].rings = Some(rings);
            self.channels.push(c);
            let chan = self.channels.len() - 1;
            self.idd.control(&format!("attach {spec}"), timeout)?;
            let n = &self.nics[k];
            vif::set_backend_state(&mut d0.admin, &n.nodes, XenbusState::Connected)?;
            done.push(format!(
                "{} on {}: attached (live, channel {chan})",
                n.name, self.dev.name
            ));
        }
        Ok(done)
    }

    /// Whether guest `guest`'s NICs on this device can take `new` (one entry per NIC, in
    /// order): their indexes in `nics`.
    pub fn check_access(&self, guest: &str, new: &[&NetAccess]) -> Result<Vec<usize>> {
        let mine: Vec<usize> = (0..self.nics.len())
            .filter(|i| self.nics[*i].name == guest)
            .collect();
        ensure!(
            mine.len() == new.len(),
            "guest {guest} has {} NICs on {} and the new policy {}: adding or removing NICs is not live",
            mine.len(),
            self.dev.name,
            new.len()
        );
        Ok(mine)
    }

    /// Give guest `guest`'s NICs on this device the share and allowed IPs of `new` (its
    /// access entries for this device, in policy order; the MAC stays): the stored policy
    /// first, so a respawned or promoted IDD starts with the new values, then the running
    /// IDD's channel through its control commands. Returns what changed, one line each.
    pub fn update_access(
        &mut self,
        guest: &str,
        new: &[&NetAccess],
        timeout: Duration,
    ) -> Result<Vec<String>> {
        let mut done = Vec::new();
        let mine = self.check_access(guest, new)?;
        for (i, want) in mine.into_iter().zip(new) {
            let n = &mut self.nics[i];
            let (share, ips) = (n.access.share != want.share, n.access.ips != want.ips);
            if !share && !ips {
                continue;
            }
            n.access.share = want.share;
            n.access.ips.clone_from(&want.ips);
            let (domid, mac) = (n.domid, n.access.mac);
            let chan = self
                .channels
                .iter()
                .position(|c| c.guest == domid && c.access.mac == mac);
            if let Some(c) = chan {
                self.channels[c].access.share = want.share;
                self.channels[c].access.ips.clone_from(&want.ips);
            }
            let mut cmds = Vec::new();
            if share {
                let v = want.share.map_or("none".to_owned(), |s| {
                    format!("{}/{}", s.bytes, s.interval_us)
                });
                cmds.push(("credit", v));
            }
            if ips {
                let v: Vec<String> = want.ips.iter().map(ToString::to_string).collect();
                cmds.push((
                    "ips",
                    if v.is_empty() {
                        "none".to_owned()
                    } else {
                        v.join("+")
                    },
                ));
            }
            for (verb, v) in cmds {
                match chan {
                    // No channel yet (the guest is not connected): it starts with the stored
                    // values.
                    None => done.push(format!("{guest} on {}: {verb} {v} (stored)", self.dev.name)),
                    Some(_) if !self.idd.running() => done.push(format!(
                        "{guest} on {}: {verb} {v} (stored; the IDD restarts with it)",
                        self.dev.name
                    )),
                    Some(c) => {
                        self.idd.control(&format!("{verb} {c} {v}"), timeout)?;
                        done.push(format!(
                            "{guest} on {}: {verb} {v} (live, channel {c})",
                            self.dev.name
                        ));
                    }
                }
            }
        }
        Ok(done)
    }

    /// Domain 0's view of NIC `name`'s transmit ring (fault injection).
    pub fn tx_ring(&self, d0: &Dom0, guest: &str) -> Result<RingView> {
        let n = self
            .nics
            .iter()
            .find(|n| n.name == guest)
            .with_context(|| format!("guest {guest} has no NIC on {}", self.dev.name))?;
        let rings = n.rings.context("that NIC has no rings yet")?;
        Ok(RingView::new(d0.sys.clone(), n.domid, rings.tx))
    }

    /// Stop the standby and release its domain.
    pub fn shutdown(&mut self, d0: &Dom0) {
        let _ = self.idd.kill();
        if let Some(mut sb) = self.standby.take() {
            let _ = sb.run.kill();
            let _ = d0.sys.destroy_domain(sb.domid);
        }
        let _ = d0.sys.destroy_domain(self.idd.domid);
    }
}
