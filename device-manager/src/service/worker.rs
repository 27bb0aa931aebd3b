//! The supervision thread: owns the [`Manager`], runs commands, supervises, publishes.
//!
//! One manager runs every IDD of the policy (the first disk, every NIC); each IDD has its
//! own state here. A bring-up failure or a supervision error (the restart budget exhausted)
//! makes the whole manager unusable: every IDD is then `failed` with the reason.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use policy::Policy;
use tokio::sync::watch;

use super::*;
use crate::fault::Fault;
use crate::manager::{Manager, ReloadError};

pub(super) struct Worker {
    svc: Service,
    policy: Policy,
    cfg: ServiceConfig,
    snap: watch::Sender<Arc<Snapshot>>,
    started: Instant,
    /// Per IDD name: its state and why.
    states: BTreeMap<String, (IddState, Option<String>)>,
    /// The manager failed as a whole (bring-up, or supervision gave up).
    broken: Option<String>,
    /// Per IDD name: faults injected through the service.
    faults: BTreeMap<String, u64>,
    seen_failed: Vec<usize>,
    exited: Vec<String>,
    /// Events waiting for the snapshot that shows their effect.
    pending: Vec<EventKind>,
}

/// The IDD name and device name of every device the manager runs.
fn managed(p: &Policy) -> Vec<(String, String)> {
    managed_devices(p)
        .iter()
        .map(|d| (idd_name(&d.name), d.name.clone()))
        .collect()
}

/// Blocks a guest with a disk and a NIC checks in `net-guest`'s disk loop.
const DISK_CHECK_BLOCKS: u64 = 64;

/// The guest's address for `net-guest echo`: its first allowed IPv4 address, else
/// `10.0.0.{seed}`, with a /24.
fn guest_ip(g: Option<&policy::Guest>, seed: usize) -> String {
    let first = g.and_then(|g| {
        g.net
            .iter()
            .flat_map(|n| n.ips.iter())
            .find_map(|net| match net.addr() {
                std::net::IpAddr::V4(a) => Some(a),
                std::net::IpAddr::V6(_) => None,
            })
    });
    match first {
        Some(a) => format!("{a}/24"),
        None => format!("10.0.0.{}/24", seed.min(254)),
    }
}

/// Start guest `name`'s process (the `seed`-th guest, from 1): the verified block workload
/// for a guest with only a disk, `net-guest` for one with NICs (if configured); a guest with
/// both runs `net-guest` with its disk check (`--disk-blocks`), since `blk-guest` drives no
/// NIC and the guest's NIC would never connect.
fn start_guest(
    cfg: &ServiceConfig,
    policy: &Policy,
    m: &mut Manager,
    name: &str,
    seed: usize,
) -> anyhow::Result<()> {
    let pg = policy.guest(name);
    let has_disk = pg.is_some_and(|g| !g.disk.is_empty());
    let has_nic = pg.is_some_and(|g| !g.net.is_empty());
    let seed_s = seed.to_string();
    if has_disk && (!has_nic || cfg.net_guest_program.is_none()) {
        let args: Vec<String> = cfg
            .guest_args
            .iter()
            .map(|a| a.replace("{seed}", &seed_s))
            .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        m.start_guest(name, &args)?;
    } else if let Some(prog) = cfg.net_guest_program.clone() {
        let ip = guest_ip(pg, seed);
        let mut args: Vec<String> = cfg
            .net_guest_args
            .iter()
            .map(|a| a.replace("{seed}", &seed_s).replace("{ip}", &ip))
            .collect();
        if has_disk {
            let blocks = DISK_CHECK_BLOCKS.to_string();
            args.extend(["--disk-blocks", &blocks, "--disk-seed", &seed_s].map(str::to_owned));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        m.start_guest_program(name, &prog, &args)?;
    }
    Ok(())
}

impl Worker {
    pub(super) fn new(
        svc: Service,
        policy: Policy,
        cfg: ServiceConfig,
        snap: watch::Sender<Arc<Snapshot>>,
        started: Instant,
    ) -> Self {
        let states = managed(&policy)
            .into_iter()
            .map(|(idd, _)| (idd, (IddState::Starting, None)))
            .collect();
        Self {
            svc,
            policy,
            cfg,
            snap,
            started,
            states,
            broken: None,
            faults: BTreeMap::new(),
            seen_failed: Vec::new(),
            exited: Vec::new(),
            pending: Vec::new(),
        }
    }

    fn set_state(&mut self, idd: &str, state: IddState, reason: Option<String>) {
        let entry = self
            .states
            .entry(idd.to_owned())
            .or_insert((IddState::Starting, None));
        if entry.0 != state || entry.1 != reason {
            *entry = (state, reason.clone());
            self.pending.push(EventKind::IddState {
                idd: idd.to_owned(),
                state,
                reason,
            });
        }
    }

    fn set_all(&mut self, state: IddState, reason: Option<String>) {
        let names: Vec<String> = self.states.keys().cloned().collect();
        for n in names {
            self.set_state(&n, state, reason.clone());
        }
    }

    fn bring_up(&mut self) -> anyhow::Result<Manager> {
        let mut m = Manager::start(&self.policy, self.cfg.manager.clone())?;
        let names: Vec<String> = m.guests().iter().map(|g| g.name.clone()).collect();
        for (i, n) in names.iter().enumerate() {
            start_guest(&self.cfg, &self.policy, &mut m, n, i + 1)?;
        }
        m.connect(self.cfg.connect_timeout)?;
        Ok(m)
    }

    pub(super) fn run(mut self, cmds: mpsc::Receiver<Request>) {
        let mut m = match self.bring_up() {
            Ok(m) => {
                self.set_all(IddState::Running, None);
                Some(m)
            }
            Err(e) => {
                let why = format!("bring-up failed: {e:#}");
                self.broken = Some(why.clone());
                self.set_all(IddState::Failed, Some(why));
                None
            }
        };
        self.publish(m.as_mut());
        self.flush();
        while !self.svc.shared.stop.load(Ordering::SeqCst) {
            // Commands first: an injected fault is seen by the very next slice.
            loop {
                let wait = if m.is_some() && self.broken.is_none() {
                    Duration::ZERO
                } else {
                    SLICE
                };
                match cmds.recv_timeout(wait) {
                    Ok((cmd, reply)) => {
                        let r = self.handle(m.as_mut(), cmd);
                        // Publish before answering: a client that reads right after its
                        // command sees its effect.
                        self.publish(m.as_mut());
                        self.flush();
                        let _ = reply.send(r);
                    }
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                }
            }
            if let Some(mgr) = m.as_mut() {
                if self.broken.is_none() {
                    self.supervise(mgr);
                }
            }
            self.publish(m.as_mut());
            self.flush();
        }
        // Dropping the manager stops every process and domain.
        drop(m);
    }

    /// Send the pending events; called right after a publish, so a client that reacts to an
    /// event reads a snapshot that already shows it.
    fn flush(&mut self) {
        for k in std::mem::take(&mut self.pending) {
            self.svc.emit(k);
        }
    }

    fn supervise(&mut self, m: &mut Manager) {
        let result = m.supervise(SLICE);
        // The disk's IDD is the one whose channels can be refused and reset.
        let disk_idd = managed_devices(&self.policy)
            .iter()
            .find(|d| matches!(d.spec, DeviceSpec::Blk { .. }))
            .map(|d| idd_name(&d.name))
            .unwrap_or_default();
        // A refused channel is reset within the same `supervise` call: tell it first, so the
        // stream reads cause (channel failed) before effect (recovery).
        // The manager forgets a channel's failure once it reset it; the recovery names the
        // channel it reset: take it from either.
        let mut failed: Vec<usize> = m.failed_channels().to_vec();
        if let Ok(Some(r)) = &result {
            failed.extend(r.channel);
        }
        for c in failed {
            if !self.seen_failed.contains(&c) {
                self.seen_failed.push(c);
                self.pending.push(EventKind::ChannelFailed {
                    idd: disk_idd.clone(),
                    channel: u32::try_from(c).unwrap_or(u32::MAX),
                });
            }
        }
        // A channel reset and healthy again may fail again later.
        let still: Vec<usize> = m.failed_channels().to_vec();
        self.seen_failed.retain(|c| still.contains(c));
        match result {
            Ok(Some(r)) => {
                let idd = idd_name(&r.device);
                self.pending.push(EventKind::Recovery {
                    idd: idd.clone(),
                    recovery: RecoveryView::from(&r),
                });
                self.set_state(&idd, IddState::Running, None);
            }
            Ok(None) => {}
            Err(e) => {
                let why = format!("supervision gave up: {e:#}");
                self.broken = Some(why.clone());
                self.set_all(IddState::Failed, Some(why));
            }
        }
    }

    /// The device of IDD `name`.
    fn find_idd(&self, name: &str) -> Result<String, ServiceError> {
        if let Some((_, dev)) = managed(&self.policy).into_iter().find(|(i, _)| i == name) {
            return Ok(dev);
        }
        if self
            .policy
            .devices
            .iter()
            .any(|d| idd_name(&d.name) == name)
        {
            return Err(ServiceError::NotImplemented(format!(
                "{name} is not run by this manager (one virtio-blk device, the first, today)"
            )));
        }
        Err(ServiceError::NotFound(format!("no IDD {name}")))
    }

    fn handle(&mut self, m: Option<&mut Manager>, cmd: Command) -> Result<Reply, ServiceError> {
        match cmd {
            Command::ApplyPolicy { text, name } => self.apply(m, &text, &name),
            Command::PromoteStandby { device } => {
                if self.policy.device(&device).is_none() {
                    return Err(ServiceError::NotFound(format!("no device {device}")));
                }
                let idd = idd_name(&device);
                self.find_idd(&idd)?;
                let m = self.usable(m)?;
                if !m.has_standby(&device).unwrap_or(false) {
                    return Err(ServiceError::BadRequest(format!(
                        "{device} has no standby ready (`standby = true` on a NIC)"
                    )));
                }
                // Promotion is what the manager does when the primary fails: fail it.
                m.inject_into(&device, &Fault::Crash)
                    .map_err(|e| ServiceError::Manager(format!("{e:#}")))?;
                self.set_state(
                    &idd,
                    IddState::Faulted,
                    Some("standby promotion requested".into()),
                );
                Ok(Reply::Accepted {
                    message: format!(
                        "promoting {device}'s standby; recovery follows on /v1/events"
                    ),
                })
            }
            Command::Inject { idd, fault } => {
                let device = self.find_idd(&idd)?;
                let m = self.usable(m)?;
                if let Fault::Corrupt { guest } = &fault {
                    if !m.guests().iter().any(|g| &g.name == guest) {
                        return Err(ServiceError::NotFound(format!("no guest {guest} on {idd}")));
                    }
                }
                m.inject_into(&device, &fault)
                    .map_err(|e| ServiceError::Manager(format!("{e:#}")))?;
                *self.faults.entry(idd.clone()).or_insert(0) += 1;
                self.pending.push(EventKind::FaultInjected {
                    idd: idd.clone(),
                    fault: fault.to_string(),
                });
                if !matches!(fault, Fault::Corrupt { .. }) {
                    self.set_state(&idd, IddState::Faulted, Some(format!("{fault} injected")));
                }
                Ok(Reply::Accepted {
                    message: format!("{fault} injected into {idd}; recovery follows on /v1/events"),
                })
            }
            Command::Restart { idd } => {
                let device = self.find_idd(&idd)?;
                let m = self.usable(m)?;
                // Until the manager has a restart of its own, a restart is a crash it recovers
                // from (the same path: revoke, respawn in the same domain, re-attach).
                m.inject_into(&device, &Fault::Crash)
                    .map_err(|e| ServiceError::Manager(format!("{e:#}")))?;
                self.set_state(&idd, IddState::Faulted, Some("restart requested".into()));
                Ok(Reply::Accepted {
                    message: format!("{idd} is being restarted; recovery follows on /v1/events"),
                })
            }
        }
    }

    fn usable<'m>(&self, m: Option<&'m mut Manager>) -> Result<&'m mut Manager, ServiceError> {
        match (m, &self.broken) {
            (Some(m), None) => Ok(m),
            (_, why) => Err(ServiceError::Unavailable(format!(
                "the IDDs are not running: {}",
                why.as_deref().unwrap_or("failed")
            ))),
        }
    }

    fn apply(
        &mut self,
        m: Option<&mut Manager>,
        text: &str,
        name: &str,
    ) -> Result<Reply, ServiceError> {
        let new = Policy::parse(text, name).map_err(|e| ServiceError::Invalid(Box::new(e)))?;
        let running = self.snap.borrow().clone();
        let changes = plan(&self.policy, &new, &running)?;
        let mut outcome = outcome(&changes, &new, &running);
        // Nothing ran (bring-up failed): record only. Else the manager carries the changes
        // out (it checks them all before doing anything).
        let applied = match (m, &self.broken) {
            (Some(m), None) => match m.apply(&new, &changes, &mut |m, guest| {
                let seed = m.guests().iter().position(|g| g.name == guest).unwrap_or(0) + 1;
                start_guest(&self.cfg, &new, m, guest, seed)
            }) {
                Ok(a) => a,
                Err(e @ ReloadError::NotLive { .. }) => {
                    return Err(ServiceError::NotImplemented(e.to_string()))
                }
                Err(ReloadError::Failed {
                    change,
                    done,
                    error,
                }) => {
                    // What was done stays done, and the stored config is the new one: record
                    // the policy, say what failed.
                    self.record_policy(new, text, name, &outcome.changes, &to_json(&done));
                    return Err(ServiceError::Manager(format!(
                        "applying {change}: {error:#} (applied before it: {}; the IDD's next \
                         start uses the new values)",
                        done.len()
                    )));
                }
            },
            _ => Vec::new(),
        };
        outcome.applied = to_json(&applied);
        self.record_policy(new, text, name, &outcome.changes, &outcome.applied);
        Ok(Reply::Applied(outcome))
    }

    /// Make `new` the running policy and announce it.
    fn record_policy(
        &mut self,
        new: Policy,
        text: &str,
        name: &str,
        changes: &[serde_json::Value],
        applied: &[serde_json::Value],
    ) {
        *lock(&self.svc.shared.policy) = PolicyState {
            name: name.to_owned(),
            text: text.to_owned(),
            policy: policy_json(&new),
        };
        self.pending.push(EventKind::PolicyApplied {
            changes: changes.to_vec(),
            applied: applied.to_vec(),
        });
        // The manager keeps running the devices and guests it started with; the new policy
        // is what the API shows and what the next start uses. Keep the running devices' view.
        if managed(&new) == managed(&self.policy) {
            self.policy = new;
        }
    }

    fn publish(&mut self, m: Option<&mut Manager>) {
        let managed_names: Vec<String> =
            managed(&self.policy).into_iter().map(|(_, d)| d).collect();
        let mut snap = Snapshot {
            at_unix_ms: now_ms(),
            uptime_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            devices: device_views(&self.policy, &managed_names),
            idds: idd_placeholders(&self.policy, IddState::Starting, None),
            ..Snapshot::default()
        };
        for v in &mut snap.idds {
            if let Some((st, why)) = self.states.get(&v.name) {
                v.state = *st;
                v.reason = why.clone();
            }
            v.faults_injected = self.faults.get(&v.name).copied().unwrap_or(0);
        }
        let Some(m) = m else {
            self.snap.send_replace(Arc::new(snap));
            return;
        };
        for d in &mut snap.devices {
            if let Ok(Some(addr)) = m.wire_addr(&d.name) {
                d.wire = Some(addr.to_string());
            }
        }
        for st in m.idd_status() {
            let name = idd_name(&st.device);
            let Some(v) = snap.idds.iter_mut().find(|v| v.name == name) else {
                continue;
            };
            let mine: Vec<&crate::recovery::Recovery> = m
                .recoveries()
                .iter()
                .filter(|r| r.device == st.device)
                .collect();
            v.domid = Some(u32::from(st.domid));
            v.pid = if matches!(v.state, IddState::Running | IddState::Faulted) {
                st.pid
            } else {
                None
            };
            v.restarts = u32::try_from(mine.len()).unwrap_or(u32::MAX);
            v.uptime_ms = if v.state == IddState::Running {
                st.uptime_ms.unwrap_or(0)
            } else {
                0
            };
            v.outage_total_us = mine.iter().map(|r| us(r.outage())).sum();
            v.last_recovery = mine.last().map(|r| RecoveryView::from(*r));
            if st.kind == "blk" {
                v.iommu_entries = m.iommu_entries() as u64;
            }
            v.nic = m.net_stats(&st.device).ok().map(NicCounters::from);
        }
        let names: Vec<String> = m.guests().iter().map(|g| g.name.clone()).collect();
        let mut running = BTreeMap::new();
        for n in &names {
            let r = m.guest_running(n).unwrap_or(false);
            running.insert(n.clone(), r);
        }
        for g in m.guests() {
            let r = running.get(&g.name).copied().unwrap_or(false);
            let policy_guest = self.policy.guest(&g.name);
            snap.guests.push(GuestView {
                name: g.name.clone(),
                domid: u32::from(g.domid),
                kind: policy_guest
                    .map_or("process", |p| p.kind.as_str())
                    .to_owned(),
                running: r,
                devices: policy_guest
                    .map(|p| {
                        p.disk
                            .iter()
                            .map(|d| d.device.clone())
                            .chain(p.net.iter().map(|n| n.device.clone()))
                            .collect()
                    })
                    .unwrap_or_default(),
            });
            if !r && !self.exited.contains(&g.name) && self.was_started(m, &g.name) {
                self.exited.push(g.name.clone());
                self.pending.push(EventKind::GuestExited {
                    guest: g.name.clone(),
                });
            }
        }
        disk_channels(m, &mut snap);
        net_channels(m, &self.policy, &mut snap);
        self.snap.send_replace(Arc::new(snap));
    }

    /// Whether guest `name` has a channel (it was started and connected).
    fn was_started(&self, m: &Manager, name: &str) -> bool {
        m.disks().iter().any(|d| d.name == name && d.ring.is_some())
            || m.net_devices().iter().any(|dev| {
                m.nics(dev)
                    .is_ok_and(|n| n.iter().any(|n| n.name == name && n.rings.is_some()))
            })
    }
}

/// The disk's channels: one per guest disk with a ring, read from the ring indexes.
fn disk_channels(m: &Manager, snap: &mut Snapshot) {
    let Some(dev) = m
        .idd_status()
        .into_iter()
        .find(|s| s.kind == "blk")
        .map(|s| s.device)
    else {
        return;
    };
    let idd = idd_name(&dev);
    let failed = m.failed_channels().to_vec();
    let mut chan = 0u32;
    for d in m.disks() {
        let Some(ring) = &d.ring else { continue };
        let idx = ring.indexes().ok();
        snap.channels.push(ChannelView {
            index: chan,
            idd: idd.clone(),
            device: dev.clone(),
            guest: d.name.clone(),
            failed: failed.contains(&(chan as usize)),
            stats: ChannelStats::VirtioBlk(BlkChannel {
                region_offset_sectors: d.region.offset,
                sectors: d.region.sectors,
                read_only: d.nodes.read_only,
                requests: idx.map(|(req, _)| u64::from(req)),
                responses: idx.map(|(_, rsp)| u64::from(rsp)),
                in_flight: idx.map(|(req, rsp)| u64::from(req.wrapping_sub(rsp))),
            }),
        });
        chan += 1;
    }
}

/// Each NIC's channels, with the counters of the IDD's latest heartbeat
/// (`channels=tx=..,txb=..;...`, in channel order).
fn net_channels(m: &Manager, policy: &Policy, snap: &mut Snapshot) {
    for st in m.idd_status().into_iter().filter(|s| s.kind == "net") {
        let idd = idd_name(&st.device);
        let per_chan: Vec<BTreeMap<&str, u64>> = st
            .last_heartbeat
            .as_deref()
            .and_then(|hb| hb.split(" channels=").nth(1))
            .map(|c| {
                c.split(';')
                    .map(|ch| {
                        ch.split(',')
                            .filter_map(|kv| kv.split_once('='))
                            .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
                            .collect()
                    })
                    .collect()
            })
            .unwrap_or_default();
        let Ok(nics) = m.nics(&st.device) else {
            continue;
        };
        let mut chan = 0usize;
        for n in nics {
            if n.rings.is_none() {
                continue;
            }
            let c = per_chan.get(chan);
            let get = |k: &str| c.and_then(|c| c.get(k)).copied().unwrap_or(0);
            let share = policy
                .guest(&n.name)
                .and_then(|g| g.net.iter().find(|a| a.device == st.device))
                .and_then(|a| a.share)
                .map(|s| s.to_string());
            snap.channels.push(ChannelView {
                index: u32::try_from(chan).unwrap_or(u32::MAX),
                idd: idd.clone(),
                device: st.device.clone(),
                guest: n.name.clone(),
                failed: st.failed_channels.contains(&chan),
                stats: ChannelStats::VirtioNet(NetChannel {
                    mac: n.access.mac.to_string(),
                    tx_packets: get("tx"),
                    tx_bytes: get("txb"),
                    rx_packets: get("rx"),
                    rx_bytes: get("rxb"),
                    drops: get("drop"),
                    spoofed: get("spoof"),
                    credit_waits: get("wait"),
                    credit: share,
                }),
            });
            chan += 1;
        }
    }
}
