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
//! as connected) and refuses every unsafe change with its reason. Changes that need no action
//! from a running domain (new or removed unused devices and guests, device settings) are
//! recorded and take effect at the next start; changes that need the manager to act on a
//! running guest (share, IPs, region, access) are answered [`ServiceError::NotImplemented`]
//! until the manager has a method to apply them live.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use policy::{Change, DeviceSpec, Policy, PolicyErrors, Refusal};
use serde::Serialize;
use tokio::sync::{broadcast, oneshot, watch};
use utoipa::ToSchema;

use crate::fault::Fault;
use crate::manager::{Manager, ManagerConfig};
use crate::recovery::Recovery;

/// How long one supervision slice lasts: the longest a command waits while nothing fails, and
/// the age of a snapshot at most.
pub const SLICE: Duration = Duration::from_millis(20);

/// How long a command may wait for its answer (a recovery in progress delays it).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Events kept for slow subscribers before the oldest are dropped.
pub const EVENT_BUFFER: usize = 1024;

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

/// The outcome of a policy apply.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ApplyOutcome {
    /// Every change (as `policy::Change` serializes: `{"change": "guest-added", ...}`).
    #[schema(value_type = Vec<Object>)]
    pub changes: Vec<serde_json::Value>,
    /// Changes recorded in the running policy that take effect at the next start.
    #[schema(value_type = Vec<Object>)]
    pub deferred: Vec<serde_json::Value>,
}

/// A device as the manager runs it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DeviceView {
    /// Policy name.
    pub name: String,
    /// `virtio-blk` or `virtio-net`.
    pub kind: String,
    /// Its IDD (`idd-<name>`), when the manager runs one for it.
    pub idd: Option<String>,
    /// Media (image path) or wire, as the policy says.
    pub backing: String,
    /// Capacity in bytes (disks).
    pub size_bytes: Option<u64>,
    /// A hot standby IDD is requested.
    pub standby: bool,
}

/// An IDD's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum IddState {
    /// Being built and connected.
    Starting,
    /// Serving.
    Running,
    /// A fault was injected; supervision has not seen it yet.
    Faulted,
    /// Not running: bring-up failed or the restart budget ran out.
    Failed,
    /// Declared in the policy, not run by this manager (e.g. a second device).
    NotStarted,
}

/// One recovery, phase by phase, in microseconds.
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq, Eq)]
pub struct RecoveryView {
    /// 1 for the first recovery of this IDD.
    pub seq: u32,
    /// Why (`exited (...)`, `hung (...)`, `channel N reset`).
    pub cause: String,
    /// Fault to detection.
    pub detect_us: u64,
    /// Releasing mappings, revoking pins and copies.
    pub revoke_us: u64,
    /// Mappings released.
    pub mappings_released: u64,
    /// Pins and copies revoked.
    pub pins_revoked: u64,
    /// Starting the new process.
    pub spawn_us: u64,
    /// Until it re-attached every channel.
    pub reattach_us: u64,
    /// Until a guest got its first response.
    pub first_response_us: u64,
    /// Sum of the phases.
    pub outage_us: u64,
}

fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl From<&Recovery> for RecoveryView {
    fn from(r: &Recovery) -> Self {
        Self {
            seq: r.seq,
            cause: r.cause.to_string(),
            detect_us: us(r.detect),
            revoke_us: us(r.revoke),
            mappings_released: r.revoked.0 as u64,
            pins_revoked: r.revoked.1 as u64,
            spawn_us: us(r.spawn),
            reattach_us: us(r.reattach),
            first_response_us: us(r.first_response),
            outage_us: us(r.outage()),
        }
    }
}

/// A driver domain.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct IddView {
    /// `idd-<device>`.
    pub name: String,
    /// The device it drives.
    pub device: String,
    /// The device's kind.
    pub kind: String,
    /// Its domain id (stays across restarts).
    pub domid: Option<u32>,
    /// Lifecycle state.
    pub state: IddState,
    /// Why it is in that state, when not simply running.
    pub reason: Option<String>,
    /// Its current process id.
    pub pid: Option<u32>,
    /// Recoveries so far (process restarts and channel resets).
    pub restarts: u32,
    /// Time since the current process started, milliseconds.
    pub uptime_ms: u64,
    /// Faults injected through the service.
    pub faults_injected: u64,
    /// Sum of every recovery's outage, microseconds (with `restarts`: the mean).
    pub outage_total_us: u64,
    /// The last recovery's phases.
    pub last_recovery: Option<RecoveryView>,
    /// IOMMU entries (pins) the device holds.
    pub iommu_entries: u64,
}

/// A guest domain.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct GuestView {
    /// Policy name.
    pub name: String,
    /// Domain id.
    pub domid: u32,
    /// `process` (Linux guests later).
    pub kind: String,
    /// Its process runs.
    pub running: bool,
    /// The devices it reaches.
    pub devices: Vec<String>,
}

/// A block channel's numbers, read from the shared ring by domain 0.
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq, Eq)]
pub struct BlkChannel {
    /// First sector of the guest's region on the device.
    pub region_offset_sectors: u64,
    /// Sectors the guest sees.
    pub sectors: u64,
    /// Read-only access.
    pub read_only: bool,
    /// Requests the guest produced (the ring's `req_prod`).
    pub requests: Option<u64>,
    /// Responses the IDD produced (`rsp_prod`).
    pub responses: Option<u64>,
    /// Requests in the ring without a response (ring fill).
    pub in_flight: Option<u64>,
}

/// A network channel's numbers (from idd-net's heartbeat; filled when the net slice lands).
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq, Eq)]
pub struct NetChannel {
    /// The guest's MAC.
    pub mac: String,
    /// Packets and bytes sent for the guest.
    pub tx_packets: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Packets received for the guest.
    pub rx_packets: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Dropped for want of a posted buffer.
    pub drops: u64,
    /// Dropped as spoofed.
    pub spoofed: u64,
    /// Times the guest waited for credit.
    pub credit_waits: u64,
    /// The guest's share (`policy::units` text), if limited.
    pub credit: Option<String>,
}

/// Kind-specific channel numbers.
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum ChannelStats {
    /// A virtio-blk channel (blkif ring).
    VirtioBlk(BlkChannel),
    /// A virtio-net channel (netif rings).
    VirtioNet(NetChannel),
}

/// One guest's connection to one IDD.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChannelView {
    /// Index in the IDD's channel list.
    pub index: u32,
    /// The IDD.
    pub idd: String,
    /// The device.
    pub device: String,
    /// The guest.
    pub guest: String,
    /// The IDD refused the ring (corrupted) and it was not reset yet.
    pub failed: bool,
    /// Numbers by kind.
    pub stats: ChannelStats,
}

/// Everything the API shows, as of one moment.
#[derive(Debug, Clone, Serialize, ToSchema, Default)]
pub struct Snapshot {
    /// When it was taken (Unix milliseconds).
    pub at_unix_ms: u64,
    /// Time since the service started, milliseconds.
    pub uptime_ms: u64,
    /// Devices of the running policy.
    pub devices: Vec<DeviceView>,
    /// Driver domains.
    pub idds: Vec<IddView>,
    /// Guests.
    pub guests: Vec<GuestView>,
    /// Channels.
    pub channels: Vec<ChannelView>,
}

/// What happened.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum EventKind {
    /// An IDD changed state.
    IddState {
        /// The IDD.
        idd: String,
        /// The new state.
        state: IddState,
        /// Why.
        reason: Option<String>,
    },
    /// An IDD was recovered.
    Recovery {
        /// The IDD.
        idd: String,
        /// Its phases.
        recovery: RecoveryView,
    },
    /// A fault was injected.
    FaultInjected {
        /// The IDD.
        idd: String,
        /// `crash`, `hang` or `corrupt:GUEST`.
        fault: String,
    },
    /// An IDD refused a channel (its ring was corrupt).
    ChannelFailed {
        /// The IDD.
        idd: String,
        /// The channel's index.
        channel: u32,
    },
    /// A guest's process ended.
    GuestExited {
        /// The guest.
        guest: String,
    },
    /// A new policy was applied.
    PolicyApplied {
        /// Its changes.
        #[schema(value_type = Vec<Object>)]
        changes: Vec<serde_json::Value>,
    },
}

/// One event, numbered.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Event {
    /// 1, 2, ... in the order they happened.
    pub seq: u64,
    /// When (Unix milliseconds).
    pub at_unix_ms: u64,
    /// What.
    #[serde(flatten)]
    pub kind: EventKind,
}

impl Event {
    /// The event's type name (`recovery`, `idd_state`, ...), as the SSE `event:` field.
    pub fn type_name(&self) -> &'static str {
        match self.kind {
            EventKind::IddState { .. } => "idd_state",
            EventKind::Recovery { .. } => "recovery",
            EventKind::FaultInjected { .. } => "fault_injected",
            EventKind::ChannelFailed { .. } => "channel_failed",
            EventKind::GuestExited { .. } => "guest_exited",
            EventKind::PolicyApplied { .. } => "policy_applied",
        }
    }
}

/// The running policy.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PolicyState {
    /// Its file name (or the name given with the text).
    pub name: String,
    /// Its TOML text.
    pub text: String,
    /// The validated policy, as JSON.
    #[schema(value_type = Object)]
    pub policy: serde_json::Value,
}

/// How the service starts the system.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// The programs and supervision settings.
    pub manager: ManagerConfig,
    /// Arguments of every guest's program; `{seed}` becomes the guest's 1-based index.
    pub guest_args: Vec<String>,
    /// How long the guests have to publish their rings.
    pub connect_timeout: Duration,
}

impl ServiceConfig {
    /// Guests run the verified block workload for a day (`blk-guest workload`).
    pub fn new(manager: ManagerConfig) -> Self {
        Self {
            manager,
            guest_args: [
                "workload", "--secs", "86400", "--blocks", "64", "--seed", "{seed}",
            ]
            .map(str::to_owned)
            .to_vec(),
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
            devices: device_views(&policy, None),
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
        });
        let svc = Self { shared };
        let worker = Worker {
            svc: svc.clone(),
            policy,
            cfg,
            snap: snap_tx,
            started,
            state: IddState::Starting,
            reason: None,
            proc_started: Instant::now(),
            faults: 0,
            seen_failed: Vec::new(),
            exited: Vec::new(),
            pid_cache: None,
        };
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
        plan(&old, &new, &running)
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

fn device_views(p: &Policy, managed: Option<&str>) -> Vec<DeviceView> {
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
                idd: (managed == Some(d.name.as_str())).then(|| idd_name(&d.name)),
                backing,
                size_bytes: size,
                standby: d.standby,
            }
        })
        .collect()
}

/// The device the manager runs today: the first virtio-blk (see `Manager::start`).
fn managed_device(p: &Policy) -> Option<&policy::Device> {
    p.devices
        .iter()
        .find(|d| matches!(d.spec, DeviceSpec::Blk { .. }))
}

fn idd_placeholders(p: &Policy, state: IddState, reason: Option<String>) -> Vec<IddView> {
    let managed = managed_device(p).map(|d| d.name.clone());
    p.devices
        .iter()
        .map(|d| {
            let ours = managed.as_deref() == Some(d.name.as_str());
            IddView {
                name: idd_name(&d.name),
                device: d.name.clone(),
                kind: d.kind().as_str().to_owned(),
                domid: None,
                state: if ours { state } else { IddState::NotStarted },
                reason: if ours {
                    reason.clone()
                } else {
                    Some("this manager drives one virtio-blk device".into())
                },
                pid: None,
                restarts: 0,
                uptime_ms: 0,
                faults_injected: 0,
                outage_total_us: 0,
                last_recovery: None,
                iommu_entries: 0,
            }
        })
        .collect()
}

/// Whether a change needs the manager to act on a running guest.
fn needs_live_action(c: &Change, running: &Snapshot) -> Option<String> {
    let guest_runs = |g: &str| running.guests.iter().any(|v| v.name == g && v.running);
    match c {
        Change::ShareChanged { guest, .. }
        | Change::IpsChanged { guest, .. }
        | Change::RegionChanged { guest, .. }
        | Change::AccessAdded { guest, .. }
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

/// The reload plan from `old` to `new` given what runs.
fn plan(old: &Policy, new: &Policy, running: &Snapshot) -> Result<ApplyOutcome, ServiceError> {
    let connected = |g: &str| running.guests.iter().any(|v| v.name == g && v.running);
    let changes = Policy::diff_with(old, new, connected).map_err(|r| ServiceError::Refused(r.0))?;
    let live: Vec<String> = changes
        .iter()
        .filter_map(|c| needs_live_action(c, running).map(|g| format!("{} ({g})", change_name(c))))
        .collect();
    if !live.is_empty() {
        return Err(ServiceError::NotImplemented(format!(
            "these changes need the manager to act on a running guest, which it cannot do live yet: {}",
            live.join(", ")
        )));
    }
    let json: Vec<serde_json::Value> = changes
        .iter()
        .map(|c| serde_json::to_value(c).unwrap_or(serde_json::Value::Null))
        .collect();
    Ok(ApplyOutcome {
        deferred: json.clone(),
        changes: json,
    })
}

fn change_name(c: &Change) -> String {
    serde_json::to_value(c)
        .ok()
        .and_then(|v| v.get("change").and_then(|c| c.as_str()).map(str::to_owned))
        .unwrap_or_else(|| "change".into())
}

/// The IDD process's pid: a child of this process running the IDD program.
///
/// Stopgap until the manager exposes it (`Manager::idd_pid`): the IDD is `exec`ed directly by
/// `hypervisor::launch`, so it is our child and its `comm` is the program's file name (the
/// first 15 bytes). With two managers of the same program in one process this may name the
/// other's IDD.
fn find_idd_pid(program: &std::path::Path) -> Option<u32> {
    let comm: String = program
        .file_name()?
        .to_string_lossy()
        .chars()
        .take(15)
        .collect();
    let me = std::process::id();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`; comm may hold spaces and parentheses: split at the last `)`.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = &stat[open + 1..close];
        let mut rest = stat[close + 1..].split_whitespace();
        let state = rest.next();
        let ppid = rest.next().and_then(|p| p.parse::<u32>().ok());
        if name == comm && ppid == Some(me) && state != Some("Z") {
            return Some(pid);
        }
    }
    None
}

struct Worker {
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
    pid_cache: Option<u32>,
}

impl Worker {
    fn set_state(&mut self, state: IddState, reason: Option<String>) {
        if self.state != state || self.reason != reason {
            self.state = state;
            self.reason = reason.clone();
            if let Some(d) = managed_device(&self.policy) {
                let idd = idd_name(&d.name);
                self.svc.emit(EventKind::IddState { idd, state, reason });
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

    fn run(mut self, cmds: mpsc::Receiver<Request>) {
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
        }
        // Dropping the manager stops every process and domain.
        drop(m);
    }

    fn supervise(&mut self, m: &mut Manager) {
        match m.supervise(SLICE) {
            Ok(Some(r)) => {
                self.proc_started = Instant::now();
                self.pid_cache = None;
                if let Some(d) = managed_device(&self.policy) {
                    self.svc.emit(EventKind::Recovery {
                        idd: idd_name(&d.name),
                        recovery: RecoveryView::from(&r),
                    });
                }
                self.set_state(IddState::Running, None);
            }
            Ok(None) => {}
            Err(e) => self.set_state(
                IddState::Failed,
                Some(format!("supervision gave up: {e:#}")),
            ),
        }
        let idd = managed_device(&self.policy)
            .map(|d| idd_name(&d.name))
            .unwrap_or_default();
        for &c in m.failed_channels() {
            if !self.seen_failed.contains(&c) {
                self.seen_failed.push(c);
                self.svc.emit(EventKind::ChannelFailed {
                    idd: idd.clone(),
                    channel: u32::try_from(c).unwrap_or(u32::MAX),
                });
            }
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
                self.svc.emit(EventKind::FaultInjected {
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
        self.svc.emit(EventKind::PolicyApplied {
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

    fn publish(&mut self, mut m: Option<&mut Manager>) {
        let managed = managed_device(&self.policy).map(|d| d.name.clone());
        let mut snap = Snapshot {
            at_unix_ms: now_ms(),
            uptime_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            devices: device_views(&self.policy, managed.as_deref()),
            idds: idd_placeholders(&self.policy, self.state, self.reason.clone()),
            ..Snapshot::default()
        };
        let (Some(m), Some(dev)) = (m.as_deref_mut(), managed) else {
            self.snap.send_replace(Arc::new(snap));
            return;
        };
        let idd = idd_name(&dev);
        if self.state == IddState::Running && self.pid_cache.is_none() {
            self.pid_cache = find_idd_pid(&self.cfg.manager.idd_program);
        }
        if let Some(v) = snap.idds.iter_mut().find(|v| v.name == idd) {
            v.domid = Some(u32::from(m.idd()));
            v.pid = if matches!(self.state, IddState::Running | IddState::Faulted) {
                self.pid_cache
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
            if !r && g.ring.is_some() && !self.exited.contains(&g.name) {
                self.exited.push(g.name.clone());
                self.svc.emit(EventKind::GuestExited {
                    guest: g.name.clone(),
                });
            }
            if let Some(ring) = &g.ring {
                let idx = ring.indexes().ok();
                snap.channels.push(ChannelView {
                    index: chan,
                    idd: idd.clone(),
                    device: dev.clone(),
                    guest: g.name.clone(),
                    failed: failed.contains(&(chan as usize)),
                    stats: ChannelStats::VirtioBlk(BlkChannel {
                        region_offset_sectors: g.region.offset,
                        sectors: g.region.sectors,
                        read_only: g.nodes.read_only,
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

/// Where the programs are when the service runs from `iddctl` (next to it).
pub fn default_manager_config() -> anyhow::Result<ManagerConfig> {
    ManagerConfig::beside_current_exe()
}

/// The policy file's directory-resolved text and policy, or every error.
pub fn load_policy(path: &std::path::Path) -> Result<(Policy, String), policy::LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| policy::LoadError::Read {
        path: PathBuf::from(path),
        source,
    })?;
    let p = Policy::load(path)?;
    Ok((p, text))
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
    fn plan_refuses_unsafe_and_defers_safe_changes() {
        let old = Policy::parse(POLICY, "a.toml").unwrap();
        // Adding a guest: safe, recorded.
        let added = format!("{POLICY}\n[[guest]]\nname = \"bob\"\ndisk = [{{ device = \"disk0\", offset = \"8MiB\" }}]\n");
        let new = Policy::parse(&added, "b.toml").unwrap();
        let out = plan(&old, &new, &snap_with("alice", true)).unwrap();
        assert_eq!(out.changes.len(), 1);
        assert_eq!(out.changes[0]["change"], "guest-added");
        // Moving alice's region while she runs: refused with the reason.
        let moved = POLICY.replace("length = \"8MiB\"", "offset = \"1MiB\", length = \"8MiB\"");
        let new = Policy::parse(&moved, "c.toml").unwrap();
        match plan(&old, &new, &snap_with("alice", true)) {
            Err(ServiceError::Refused(r)) => assert_eq!(r[0].subject, "alice"),
            other => panic!("{other:?}"),
        }
        // Growing it in place while she runs: safe by the rules, but needs the manager.
        let grown = POLICY.replace("length = \"8MiB\"", "length = \"12MiB\"");
        let new = Policy::parse(&grown, "d.toml").unwrap();
        assert!(matches!(
            plan(&old, &new, &snap_with("alice", true)),
            Err(ServiceError::NotImplemented(_))
        ));
        // The same while she is not running: recorded.
        assert!(plan(&old, &new, &snap_with("alice", false)).is_ok());
    }

    #[test]
    fn placeholders_name_every_device() {
        let p = Policy::parse(POLICY, "a.toml").unwrap();
        let v = idd_placeholders(&p, IddState::Starting, None);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].name, "idd-disk0");
        assert_eq!(v[0].state, IddState::Starting);
        let d = device_views(&p, Some("disk0"));
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

    #[test]
    fn no_idd_pid_for_a_program_we_did_not_start() {
        assert_eq!(find_idd_pid(std::path::Path::new("/no/such-program")), None);
    }
}
