//! The supervision thread: owns the [`Manager`], runs commands, supervises, publishes.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use policy::Policy;
use tokio::sync::watch;

use super::*;
use crate::fault::Fault;
use crate::manager::Manager;

pub(super) struct Worker {
    svc: Service,
    policy: Policy,
    cfg: ServiceConfig,
    snap: watch::Sender<Arc<Snapshot>>,
    started: Instant,
    state: IddState,
    reason: Option<String>,
    proc_started: Instant,
    faults: u64,
    seen_failed: Vec<usize>,
    exited: Vec<String>,
    /// The current IDD process's pid, once looked up (`None` inside: not found).
    pid_cache: Option<Option<u32>>,
    /// Events waiting for the snapshot that shows their effect.
    pending: Vec<EventKind>,
}

impl Worker {
    pub(super) fn new(
        svc: Service,
        policy: Policy,
        cfg: ServiceConfig,
        snap: watch::Sender<Arc<Snapshot>>,
        started: Instant,
    ) -> Self {
        Self {
            svc,
            policy,
            cfg,
            snap,
            started,
            state: IddState::Starting,
            reason: None,
            proc_started: Instant::now(),
            faults: 0,
            seen_failed: Vec::new(),
            exited: Vec::new(),
            pid_cache: None,
            pending: Vec::new(),
        }
    }

    fn set_state(&mut self, state: IddState, reason: Option<String>) {
        if self.state != state || self.reason != reason {
            self.state = state;
            self.reason = reason.clone();
            if let Some(d) = managed_device(&self.policy) {
                let idd = idd_name(&d.name);
                self.pending
                    .push(EventKind::IddState { idd, state, reason });
            }
        }
    }

    fn bring_up(&mut self) -> anyhow::Result<Manager> {
        let mut m = Manager::start(&self.policy, self.cfg.manager.clone())?;
        let names: Vec<String> = m.guests().iter().map(|g| g.name.clone()).collect();
        for (i, n) in names.iter().enumerate() {
            let seed = (i + 1).to_string();
            let args: Vec<String> = self
                .cfg
                .guest_args
                .iter()
                .map(|a| a.replace("{seed}", &seed))
                .collect();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            m.start_guest(n, &args)?;
        }
        m.connect(self.cfg.connect_timeout)?;
        Ok(m)
    }

    pub(super) fn run(mut self, cmds: mpsc::Receiver<Request>) {
        let mut m = match self.bring_up() {
            Ok(m) => {
                self.proc_started = Instant::now();
                self.set_state(IddState::Running, None);
                Some(m)
            }
            Err(e) => {
                self.set_state(IddState::Failed, Some(format!("bring-up failed: {e:#}")));
                None
            }
        };
        self.publish(m.as_mut());
        self.flush();
        while !self.svc.shared.stop.load(Ordering::SeqCst) {
            // Commands first: an injected fault is seen by the very next slice.
            loop {
                let wait = if m.is_some() && self.state != IddState::Failed {
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
                if self.state != IddState::Failed {
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
        let idd = managed_device(&self.policy)
            .map(|d| idd_name(&d.name))
            .unwrap_or_default();
        // A refused channel is reset within the same `supervise` call: tell it first, so the
        // stream reads cause (channel failed) before effect (recovery).
        // The manager forgets a channel's failure once it reset it, and says so only in the
        // recovery's cause (`channel N ring refused; ...`): take it from either.
        let mut failed: Vec<usize> = m.failed_channels().to_vec();
        if let Ok(Some(r)) = &result {
            failed.extend(reset_channel_of(&r.cause));
        }
        for c in failed {
            if !self.seen_failed.contains(&c) {
                self.seen_failed.push(c);
                self.pending.push(EventKind::ChannelFailed {
                    idd: idd.clone(),
                    channel: u32::try_from(c).unwrap_or(u32::MAX),
                });
            }
        }
        // A channel reset and healthy again may fail again later.
        let still: Vec<usize> = m.failed_channels().to_vec();
        self.seen_failed.retain(|c| still.contains(c));
        match result {
            Ok(Some(r)) => {
                self.proc_started = Instant::now();
                self.pid_cache = None;
                self.pending.push(EventKind::Recovery {
                    idd,
                    recovery: RecoveryView::from(&r),
                });
                self.set_state(IddState::Running, None);
            }
            Ok(None) => {}
            Err(e) => self.set_state(
                IddState::Failed,
                Some(format!("supervision gave up: {e:#}")),
            ),
        }
    }

    fn find_idd(&self, name: &str) -> Result<(), ServiceError> {
        match managed_device(&self.policy) {
            Some(d) if idd_name(&d.name) == name => Ok(()),
            _ if self
                .policy
                .devices
                .iter()
                .any(|d| idd_name(&d.name) == name) =>
            {
                Err(ServiceError::NotImplemented(format!(
                    "{name} is not run by this manager (one virtio-blk device today)"
                )))
            }
            _ => Err(ServiceError::NotFound(format!("no IDD {name}"))),
        }
    }

    fn handle(&mut self, m: Option<&mut Manager>, cmd: Command) -> Result<Reply, ServiceError> {
        match cmd {
            Command::ApplyPolicy { text, name } => self.apply(&text, &name),
            Command::PromoteStandby { device } => {
                if self.policy.device(&device).is_none() {
                    return Err(ServiceError::NotFound(format!("no device {device}")));
                }
                Err(ServiceError::NotImplemented(
                    "standby promotion arrives with the network slice's standby IDDs".into(),
                ))
            }
            Command::Inject { idd, fault } => {
                self.find_idd(&idd)?;
                let m = self.usable(m)?;
                if let Fault::Corrupt { guest } = &fault {
                    if !m.guests().iter().any(|g| &g.name == guest) {
                        return Err(ServiceError::NotFound(format!("no guest {guest} on {idd}")));
                    }
                }
                m.inject(&fault)
                    .map_err(|e| ServiceError::Manager(format!("{e:#}")))?;
                self.faults += 1;
                self.pending.push(EventKind::FaultInjected {
                    idd: idd.clone(),
                    fault: fault.to_string(),
                });
                if !matches!(fault, Fault::Corrupt { .. }) {
                    self.set_state(IddState::Faulted, Some(format!("{fault} injected")));
                }
                Ok(Reply::Accepted {
                    message: format!("{fault} injected into {idd}; recovery follows on /v1/events"),
                })
            }
            Command::Restart { idd } => {
                self.find_idd(&idd)?;
                let m = self.usable(m)?;
                // Until the manager has a restart of its own, a restart is a crash it recovers
                // from (the same path: revoke, respawn in the same domain, re-attach).
                m.inject(&Fault::Crash)
                    .map_err(|e| ServiceError::Manager(format!("{e:#}")))?;
                self.set_state(IddState::Faulted, Some("restart requested".into()));
                Ok(Reply::Accepted {
                    message: format!("{idd} is being restarted; recovery follows on /v1/events"),
                })
            }
        }
    }

    fn usable<'m>(&self, m: Option<&'m mut Manager>) -> Result<&'m mut Manager, ServiceError> {
        match m {
            Some(m) if self.state != IddState::Failed => Ok(m),
            _ => Err(ServiceError::Unavailable(format!(
                "the IDD is not running: {}",
                self.reason.as_deref().unwrap_or("failed")
            ))),
        }
    }

    fn apply(&mut self, text: &str, name: &str) -> Result<Reply, ServiceError> {
        let new = Policy::parse(text, name).map_err(|e| ServiceError::Invalid(Box::new(e)))?;
        let running = self.snap.borrow().clone();
        let outcome = plan(&self.policy, &new, &running)?;
        *lock(&self.svc.shared.policy) = PolicyState {
            name: name.to_owned(),
            text: text.to_owned(),
            policy: policy_json(&new),
        };
        self.pending.push(EventKind::PolicyApplied {
            changes: outcome.changes.clone(),
        });
        // The manager keeps running the device and guests it started with; the new policy is
        // what the API shows and what the next start uses. Keep the running device's view.
        let keep_running = managed_device(&self.policy).map(|d| d.name.clone());
        if managed_device(&new).map(|d| d.name.clone()) == keep_running {
            self.policy = new;
        }
        Ok(Reply::Applied(outcome))
    }

    fn publish(&mut self, m: Option<&mut Manager>) {
        let managed = managed_device(&self.policy).map(|d| d.name.clone());
        let mut snap = Snapshot {
            at_unix_ms: now_ms(),
            uptime_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            devices: device_views(&self.policy, managed.as_deref()),
            idds: idd_placeholders(&self.policy, self.state, self.reason.clone()),
            ..Snapshot::default()
        };
        let (Some(m), Some(dev)) = (m, managed) else {
            self.snap.send_replace(Arc::new(snap));
            return;
        };
        let idd = idd_name(&dev);
        // One /proc scan per process (the process exists once it printed `ready`).
        if self.state == IddState::Running && self.pid_cache.is_none() {
            self.pid_cache = Some(find_idd_pid(&self.cfg.manager.idd_program));
        }
        if let Some(v) = snap.idds.iter_mut().find(|v| v.name == idd) {
            v.domid = m.idd().ok().map(u32::from);
            v.pid = if matches!(self.state, IddState::Running | IddState::Faulted) {
                self.pid_cache.flatten()
            } else {
                None
            };
            v.restarts = u32::try_from(m.recoveries().len()).unwrap_or(u32::MAX);
            v.uptime_ms = if self.state == IddState::Running {
                u64::try_from(self.proc_started.elapsed().as_millis()).unwrap_or(u64::MAX)
            } else {
                0
            };
            v.faults_injected = self.faults;
            v.outage_total_us = m.recoveries().iter().map(|r| us(r.outage())).sum();
            v.last_recovery = m.recoveries().last().map(RecoveryView::from);
            v.iommu_entries = m.iommu_entries() as u64;
        }
        let names: Vec<String> = m.guests().iter().map(|g| g.name.clone()).collect();
        let mut running = BTreeMap::new();
        for n in &names {
            let r = m.guest_running(n).unwrap_or(false);
            running.insert(n.clone(), r);
        }
        let failed = m.failed_channels().to_vec();
        let mut chan = 0u32;
        for g in m.guests() {
            let r = running.get(&g.name).copied().unwrap_or(false);
            let disk = m.disks().iter().find(|d| d.name == g.name);
            let policy_guest = self.policy.guest(&g.name);
            snap.guests.push(GuestView {
                name: g.name.clone(),
                domid: u32::from(g.domid),
                kind: policy_guest
                    .map_or("process", |p| match p.kind {
                        policy::GuestKind::Process => "process",
                        _ => "xen-linux",
                    })
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
            let ring = disk.and_then(|d| d.ring.as_ref());
            if !r && ring.is_some() && !self.exited.contains(&g.name) {
                self.exited.push(g.name.clone());
                self.pending.push(EventKind::GuestExited {
                    guest: g.name.clone(),
                });
            }
            if let (Some(ring), Some(d)) = (ring, disk) {
                let idx = ring.indexes().ok();
                snap.channels.push(ChannelView {
                    index: chan,
                    idd: idd.clone(),
                    device: dev.clone(),
                    guest: g.name.clone(),
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
        self.snap.send_replace(Arc::new(snap));
    }
}

/// The channel a recovery reset, from its cause (`Manager::reset_channel` words it
/// `channel N ring refused; frontend reconnected`).
fn reset_channel_of(cause: &crate::recovery::Cause) -> Option<usize> {
    match cause {
        crate::recovery::Cause::Exited(how) => how
            .strip_prefix("channel ")?
            .split_once(' ')
            .filter(|(_, rest)| rest.starts_with("ring refused"))?
            .0
            .parse()
            .ok(),
        crate::recovery::Cause::Hung(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recovery::Cause;

    #[test]
    fn reset_channel_from_cause() {
        let c = Cause::Exited("channel 3 ring refused; frontend reconnected".into());
        assert_eq!(reset_channel_of(&c), Some(3));
        assert_eq!(reset_channel_of(&Cause::Exited("Signaled(6)".into())), None);
        assert_eq!(
            reset_channel_of(&Cause::Exited("channel x ring refused".into())),
            None
        );
        assert_eq!(
            reset_channel_of(&Cause::Hung(Duration::from_millis(1))),
            None
        );
    }
}
