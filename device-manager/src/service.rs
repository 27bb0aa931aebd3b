//! The manager as a service: one thread owns the [`Manager`], everything else talks to it by
//! message.
//!
//! The [`Manager`] is a single-owner object (`&mut self` everywhere, blocking calls during a
//! recovery), so it is *not* shared behind a lock: a lock held across a 10-second recovery would
//! stall every API request. Instead:
//!
//! * the **supervision thread** builds the manager (so a non-`Send` part can never leak out),
//!   starts the guests, connects, then loops: take queued [`Command`]s, call
//!   [`Manager::supervise`] for a short slice ([`SLICE`]), notice changes, publish;
//! * **snapshots** ([`Snapshot`]: devices, IDDs, guests, channels) are published through a
//!   `tokio::sync::watch` channel after every slice: readers never wait for the manager, and
//!   see the state at most one slice old (during a recovery, the state before it);
//! * **events** ([`Event`]: IDD state changes, recoveries with their phases, injected faults,
//!   failed channels, exited guests, applied policies) go to a `tokio::sync::broadcast`
//!   channel; a slow subscriber loses the oldest events (it is told how many) rather than
//!   slowing the manager;
//! * **commands** come in over a `std::sync::mpsc` channel, each with a `tokio::sync::oneshot`
//!   for the answer, so async API handlers can await them without blocking a runtime thread.
//!
//! Views are modelled by device *kind* (`virtio-blk` today, `virtio-net` when the network slice
//! is wired in): [`ChannelStats`] is an enum with one variant per kind, and IDDs and devices
//! carry their kind, so adding a kind adds variants, not a new API.
//!
//! # Policy reload
//!
//! [`Command::ApplyPolicy`] parses and validates the new text (every error with its position),
//! computes [`Policy::diff_with`] against the running policy (guests whose process runs count
//! as connected) and refuses every unsafe change with its reason ([`ServiceError::Refused`],
//! 409). The safe ones are carried out by [`Manager::apply`](crate::manager::Manager::apply)
//! (`manager::reload`): a NIC's share and allowed IPs and a disk region grown in place reach
//! the running IDD at once and its stored config, without restarting anything; a new process
//! guest on a running device gets its domain, its process and its channels attached to the
//! running IDDs; changes that concern nothing running (new or removed unused devices and
//! guests, device settings) are recorded and take effect at the next start. Plugging or unplugging a running guest's NIC
//! or disk, or removing a running guest, is answered [`ServiceError::NotImplemented`] (501)
//! and nothing is applied. The answer and the `policy_applied` event list what was done.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use policy::{Change, DeviceSpec, Policy, PolicyErrors, Refusal};
use serde::Serialize;
use tokio::sync::{broadcast, oneshot, watch};

use utoipa::ToSchema;

use crate::fault::Fault;
use crate::manager::ManagerConfig;

mod views;
mod worker;

pub use views::*;
use worker::Worker;

/// How long one supervision slice lasts: the longest a command waits while nothing fails, and
/// the age of a snapshot at most.
pub const SLICE: Duration = Duration::from_millis(20);

/// How long a command may wait for its answer (a recovery in progress delays it).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Events kept for slow subscribers before the oldest are dropped.
pub const EVENT_BUFFER: usize = 1024;

/// Past events kept for subscribers that resume after a disconnect.
pub const EVENT_HISTORY: usize = 256;

/// What the service could not do.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ServiceError {
    /// No IDD, guest or device by that name.
    #[error("{0}")]
    NotFound(String),
    /// The request itself is wrong (a fault that does not fit, say).
    #[error("{0}")]
    BadRequest(String),
    /// The policy text has errors (all of them, with positions).
    #[error("the policy has {} error(s)", .0.diagnostics.len())]
    Invalid(Box<PolicyErrors>),
    /// The reload would be unsafe on the running system.
    #[error("reload refused: {}", .0.iter().map(|r| format!("{}: {}", r.subject, r.reason)).collect::<Vec<_>>().join("; "))]
    Refused(Vec<Refusal>),
    /// The manager cannot do this yet.
    #[error("{0}")]
    NotImplemented(String),
    /// The manager is not (or no longer) able to act: bring-up failed, or the IDD was given up.
    #[error("{0}")]
    Unavailable(String),
    /// No answer within [`COMMAND_TIMEOUT`].
    #[error("the manager did not answer within {} s", COMMAND_TIMEOUT.as_secs())]
    Timeout,
    /// The manager failed while doing it.
    #[error("{0}")]
    Manager(String),
}

/// A request to the supervision thread.
#[derive(Debug, Clone)]
pub enum Command {
    /// Inject a fault into an IDD.
    Inject {
        /// The IDD (`idd-<device>`).
        idd: String,
        /// What.
        fault: Fault,
    },
    /// Restart an IDD's process (recovered like a crash).
    Restart {
        /// The IDD.
        idd: String,
    },
    /// Validate and apply a new policy.
    ApplyPolicy {
        /// The TOML text.
        text: String,
        /// The name shown in error positions.
        name: String,
    },
    /// Promote a device's hot standby IDD.
    PromoteStandby {
        /// The device.
        device: String,
    },
}

/// What a command did.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "snake_case", tag = "result")]
pub enum Reply {
    /// Done (a fault injected, a restart begun); recovery follows on the event stream.
    Accepted {
        /// What was done.
        message: String,
    },
    /// A policy applied.
    Applied(ApplyOutcome),
}

/// How the service starts the system.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// The programs and supervision settings.
    pub manager: ManagerConfig,
    /// Arguments of the program of a guest with a disk; `{seed}` becomes the guest's
    /// 1-based index.
    pub guest_args: Vec<String>,
    /// The program of a guest with only NICs (`net-guest`); `None`: such guests are not
    /// started.
    pub net_guest_program: Option<std::path::PathBuf>,
    /// Its arguments; `{ip}` becomes the guest's address (its policy's first allowed IPv4
    /// address, else `10.0.0.{seed}`) with a /24.
    pub net_guest_args: Vec<String>,
    /// How long the guests have to publish their rings.
    pub connect_timeout: Duration,
}

impl ServiceConfig {
    /// Guests with a disk run the verified block workload for a day (`blk-guest workload`);
    /// guests with only NICs answer pings (`net-guest echo`).
    pub fn new(manager: ManagerConfig) -> Self {
        Self {
            manager,
            guest_args: [
                "workload", "--secs", "86400", "--blocks", "64", "--seed", "{seed}",
            ]
            .map(str::to_owned)
            .to_vec(),
            net_guest_program: crate::manager::find_program("net-guest").ok(),
            net_guest_args: ["echo", "--ip", "{ip}"].map(str::to_owned).to_vec(),
            connect_timeout: Duration::from_secs(30),
        }
    }
}

type Request = (Command, oneshot::Sender<Result<Reply, ServiceError>>);

struct Shared {
    cmds: Mutex<mpsc::Sender<Request>>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    events: broadcast::Sender<Event>,
    policy: Mutex<PolicyState>,
    stop: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
    seq: AtomicU64,
    /// The last [`EVENT_HISTORY`] events, for subscribers that resume (`Last-Event-ID`).
    history: Mutex<std::collections::VecDeque<Event>>,
}

/// A handle on the running service (cheap to clone; the last [`Service::shutdown`] or drop of
/// every handle does not stop it: call `shutdown`).
#[derive(Clone)]
pub struct Service {
    shared: Arc<Shared>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn policy_json(p: &Policy) -> serde_json::Value {
    serde_json::to_value(p).unwrap_or(serde_json::Value::Null)
}

impl Service {
    /// Start the supervision thread: it builds the manager from `policy`, starts every guest
    /// with a disk on the managed device, connects, and supervises until [`Self::shutdown`].
    /// Returns at once; the IDD shows `starting` until bring-up is done (or `failed` with why).
    pub fn start(policy: Policy, name: &str, text: String, cfg: ServiceConfig) -> Self {
        let (cmd_tx, cmd_rx) = mpsc::channel();
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let started = Instant::now();
        let initial = Snapshot {
            at_unix_ms: now_ms(),
            devices: device_views(&policy, &[]),
            idds: idd_placeholders(&policy, IddState::Starting, None),
            ..Snapshot::default()
        };
        let (snap_tx, snap_rx) = watch::channel(Arc::new(initial));
        let shared = Arc::new(Shared {
            cmds: Mutex::new(cmd_tx),
            snapshot: snap_rx,
            events,
            policy: Mutex::new(PolicyState {
                name: name.to_owned(),
                text,
                policy: policy_json(&policy),
            }),
            stop: AtomicBool::new(false),
            thread: Mutex::new(None),
            seq: AtomicU64::new(0),
            history: Mutex::new(std::collections::VecDeque::new()),
        });
        let svc = Self { shared };
        let worker = Worker::new(svc.clone(), policy, cfg, snap_tx, started);
        let handle = std::thread::Builder::new()
            .name("dm-supervise".into())
            .spawn(move || worker.run(cmd_rx));
        match handle {
            Ok(h) => *lock(&svc.shared.thread) = Some(h),
            Err(e) => tracing::error!("cannot start the supervision thread: {e}"),
        }
        svc
    }

    /// The latest snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.snapshot.borrow().clone()
    }

    /// A receiver that sees each new snapshot.
    pub fn watch(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.shared.snapshot.clone()
    }

    /// Subscribe to events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.shared.events.subscribe()
    }

    /// Subscribe, and the kept events numbered after `since` (oldest first) to replay before
    /// the live ones. The receiver is created first, so an event is in the history, on the
    /// receiver, or both (then skip live events with `seq` at or below the last replayed).
    pub fn resume(&self, since: u64) -> (Vec<Event>, broadcast::Receiver<Event>) {
        let rx = self.subscribe();
        let past = lock(&self.shared.history)
            .iter()
            .filter(|e| e.seq > since)
            .cloned()
            .collect();
        (past, rx)
    }

    /// The running policy.
    pub fn policy(&self) -> PolicyState {
        lock(&self.shared.policy).clone()
    }

    /// Send a command and wait (asynchronously) for its answer.
    pub async fn command(&self, cmd: Command) -> Result<Reply, ServiceError> {
        let (tx, rx) = oneshot::channel();
        lock(&self.shared.cmds)
            .send((cmd, tx))
            .map_err(|_| ServiceError::Unavailable("the manager has stopped".into()))?;
        match tokio::time::timeout(COMMAND_TIMEOUT, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(ServiceError::Unavailable("the manager has stopped".into())),
            Err(_) => Err(ServiceError::Timeout),
        }
    }

    /// Validate `text` as a policy and diff it against the running one, without applying.
    pub fn validate(&self, text: &str, name: &str) -> Result<ApplyOutcome, ServiceError> {
        let new = Policy::parse(text, name).map_err(|e| ServiceError::Invalid(Box::new(e)))?;
        let running = self.snapshot();
        let old = self.current_policy()?;
        plan(&old, &new, &running).map(|c| outcome(&c, &new, &running))
    }

    fn current_policy(&self) -> Result<Policy, ServiceError> {
        let st = self.policy();
        Policy::parse(&st.text, &st.name)
            .map_err(|e| ServiceError::Manager(format!("the running policy no longer parses: {e}")))
    }

    fn emit(&self, kind: EventKind) {
        let ev = Event {
            seq: self.shared.seq.fetch_add(1, Ordering::Relaxed) + 1,
            at_unix_ms: now_ms(),
            kind,
        };
        {
            let mut h = lock(&self.shared.history);
            if h.len() == EVENT_HISTORY {
                h.pop_front();
            }
            h.push_back(ev.clone());
        }
        // No subscriber is fine.
        let _ = self.shared.events.send(ev);
    }

    /// Stop supervising, stop every process and domain, and wait for the thread.
    pub fn shutdown(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(h) = lock(&self.shared.thread).take() {
            let _ = h.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The IDD name of a device.
pub fn idd_name(device: &str) -> String {
    format!("idd-{device}")
}

fn device_views(p: &Policy, managed: &[String]) -> Vec<DeviceView> {
    p.devices
        .iter()
        .map(|d| {
            let (backing, size) = match &d.spec {
                DeviceSpec::Blk { size, media } => (
                    match media {
                        policy::BlkMedia::Image(i) => format!("image {}", i.display()),
                        policy::BlkMedia::Pci(a) => format!("pci {a}"),
                    },
                    Some(*size),
                ),
                DeviceSpec::Net { wire, link } => (
                    match wire {
                        policy::Wire::Udp { bind, peer } => match peer {
                            Some(peer) => format!(
                                "udp {bind} -> {peer}, link {}",
                                policy::units::format_rate(*link)
                            ),
                            None => {
                                format!("udp {bind}, link {}", policy::units::format_rate(*link))
                            }
                        },
                        policy::Wire::Tap { ifname } => format!("tap {ifname}"),
                        policy::Wire::Pci(a) => format!("pci {a}"),
                    },
                    None,
                ),
            };
            DeviceView {
                name: d.name.clone(),
                kind: d.kind().as_str().to_owned(),
                idd: managed.contains(&d.name).then(|| idd_name(&d.name)),
                backing,
                size_bytes: size,
                standby: d.standby,
                wire: None,
            }
        })
        .collect()
}

/// The devices the manager runs (see `Manager::start`): the first virtio-blk, every
/// virtio-net.
fn managed_devices(p: &Policy) -> Vec<&policy::Device> {
    let disk = p
        .devices
        .iter()
        .find(|d| matches!(d.spec, DeviceSpec::Blk { .. }));
    disk.into_iter()
        .chain(
            p.devices
                .iter()
                .filter(|d| matches!(d.spec, DeviceSpec::Net { .. })),
        )
        .collect()
}

fn idd_placeholders(p: &Policy, state: IddState, reason: Option<String>) -> Vec<IddView> {
    let managed: Vec<String> = managed_devices(p).iter().map(|d| d.name.clone()).collect();
    p.devices
        .iter()
        .map(|d| {
            let ours = managed.contains(&d.name);
            IddView {
                name: idd_name(&d.name),
                device: d.name.clone(),
                kind: d.kind().as_str().to_owned(),
                domid: None,
                state: if ours { state } else { IddState::NotStarted },
                reason: if ours {
                    reason.clone()
                } else {
                    Some("this manager drives one virtio-blk device (the first)".into())
                },
                pid: None,
                restarts: 0,
                uptime_ms: 0,
                faults_injected: 0,
                outage_total_us: 0,
                last_recovery: None,
                iommu_entries: 0,
                nic: None,
            }
        })
        .collect()
}

/// Whether a change needs an action the manager does not do live (plugging or unplugging a
/// running guest's devices): the guest, if so.
fn not_live(c: &Change, running: &Snapshot) -> Option<String> {
    let guest_runs = |g: &str| running.guests.iter().any(|v| v.name == g && v.running);
    match c {
        Change::AccessAdded { guest, .. }
        | Change::AccessRemoved { guest, .. }
        | Change::AccessChanged { guest, .. }
        | Change::GuestRemoved { guest }
            if guest_runs(guest) =>
        {
            Some(guest.clone())
        }
        _ => None,
    }
}

/// The reload plan from `old` to `new` given what runs: the changes, or why not.
fn plan(old: &Policy, new: &Policy, running: &Snapshot) -> Result<Vec<Change>, ServiceError> {
    let connected = |g: &str| running.guests.iter().any(|v| v.name == g && v.running);
    let changes = Policy::diff_with(old, new, connected).map_err(|r| ServiceError::Refused(r.0))?;
    let live: Vec<String> = changes
        .iter()
        .filter_map(|c| not_live(c, running).map(|g| format!("{} ({g})", change_name(c))))
        .collect();
    if !live.is_empty() {
        return Err(ServiceError::NotImplemented(format!(
            "plugging or unplugging a running guest's NIC or disk, or removing a running guest, \
             is not done live: {}; stop the guest, or restart the manager with the new policy",
            live.join(", ")
        )));
    }
    Ok(changes)
}

fn to_json<T: Serialize>(items: &[T]) -> Vec<serde_json::Value> {
    items
        .iter()
        .map(|c| serde_json::to_value(c).unwrap_or(serde_json::Value::Null))
        .collect()
}

/// What [`Service::validate`] answers: the changes (leading to `new`), those that concern
/// nothing running as deferred, nothing applied.
fn outcome(changes: &[Change], new: &Policy, running: &Snapshot) -> ApplyOutcome {
    let runs = |g: &str| running.guests.iter().any(|v| v.name == g);
    let run_device = |d: &str| {
        running
            .devices
            .iter()
            .any(|v| v.name == d && v.idd.is_some())
    };
    let deferred: Vec<&Change> = changes
        .iter()
        .filter(|c| match c {
            Change::ShareChanged { guest, .. }
            | Change::IpsChanged { guest, .. }
            | Change::RegionChanged { guest, .. } => !runs(guest),
            Change::GuestAdded { guest } => !new.guest(guest).is_some_and(|g| {
                g.kind == policy::GuestKind::Process
                    && g.disk
                        .iter()
                        .map(|d| &d.device)
                        .chain(g.net.iter().map(|n| &n.device))
                        .any(|d| run_device(d))
            }),
            _ => true,
        })
        .collect();
    ApplyOutcome {
        changes: to_json(changes),
        deferred: to_json(&deferred),
        applied: Vec::new(),
    }
}

fn change_name(c: &Change) -> String {
    crate::manager::reload::change_name(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
[[device]]
name = "disk0"
kind = "virtio-blk"
image = "/nonexistent/disk0.img"
size = "16MiB"

[[guest]]
name = "alice"
disk = [{ device = "disk0", length = "8MiB" }]
"#;

    fn snap_with(guest: &str, running: bool) -> Snapshot {
        Snapshot {
            guests: vec![GuestView {
                name: guest.into(),
                domid: 1,
                kind: "process".into(),
                running,
                devices: vec!["disk0".into()],
            }],
            ..Snapshot::default()
        }
    }

    #[test]
    fn plan_refuses_unsafe_and_passes_live_changes() {
        let old = Policy::parse(POLICY, "a.toml").unwrap();
        // Adding a guest: safe, deferred.
        let added = format!("{POLICY}\n[[guest]]\nname = \"bob\"\ndisk = [{{ device = \"disk0\", offset = \"8MiB\" }}]\n");
        let new = Policy::parse(&added, "b.toml").unwrap();
        let running = snap_with("alice", true);
        let changes = plan(&old, &new, &running).unwrap();
        let out = outcome(&changes, &new, &running);
        assert_eq!(out.changes.len(), 1);
        assert_eq!(out.changes[0]["change"], "guest-added");
        assert_eq!(out.deferred.len(), 1, "disk0 is not run in this snapshot");
        // Moving alice's region while she runs: refused with the reason.
        let moved = POLICY.replace("length = \"8MiB\"", "offset = \"1MiB\", length = \"8MiB\"");
        let new = Policy::parse(&moved, "c.toml").unwrap();
        match plan(&old, &new, &running) {
            Err(ServiceError::Refused(r)) => assert_eq!(r[0].subject, "alice"),
            other => panic!("{other:?}"),
        }
        // Growing it in place while she runs: a live change, not deferred.
        let grown = POLICY.replace("length = \"8MiB\"", "length = \"12MiB\"");
        let new = Policy::parse(&grown, "d.toml").unwrap();
        let changes = plan(&old, &new, &running).unwrap();
        assert_eq!(changes.len(), 1);
        assert!(outcome(&changes, &new, &running).deferred.is_empty());
        // Removing running alice: not live.
        let gone = Policy::parse(
            &POLICY.replace("name = \"alice\"", "name = \"carol\""),
            "e.toml",
        )
        .unwrap();
        assert!(matches!(
            plan(&old, &gone, &running),
            Err(ServiceError::NotImplemented(_))
        ));
        // The same while she is not running: fine.
        assert!(plan(&old, &gone, &snap_with("alice", false)).is_ok());
    }

    #[test]
    fn placeholders_name_every_device() {
        let p = Policy::parse(POLICY, "a.toml").unwrap();
        let v = idd_placeholders(&p, IddState::Starting, None);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].name, "idd-disk0");
        assert_eq!(v[0].state, IddState::Starting);
        let d = device_views(&p, &["disk0".to_owned()]);
        assert_eq!(d[0].idd.as_deref(), Some("idd-disk0"));
        assert_eq!(d[0].kind, "virtio-blk");
    }

    #[test]
    fn events_serialize_with_their_type() {
        let ev = Event {
            seq: 3,
            at_unix_ms: 1,
            kind: EventKind::FaultInjected {
                idd: "idd-disk0".into(),
                fault: "crash".into(),
            },
        };
        let v = serde_json::to_value(&ev).unwrap();
        assert_eq!(v["type"], "fault_injected");
        assert_eq!(v["seq"], 3);
        assert_eq!(ev.type_name(), "fault_injected");
    }
}
