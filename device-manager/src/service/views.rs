//! The service's views: what snapshots, events and command answers carry (all `Serialize`
//! and `ToSchema`, so the API's OpenAPI document describes them from these types).

use std::time::Duration;

use serde::Serialize;
use utoipa::ToSchema;

use crate::recovery::Recovery;

/// The outcome of a policy apply.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ApplyOutcome {
    /// Every change (as `policy::Change` serializes: `{"change": "guest-added", ...}`).
    #[schema(value_type = Vec<Object>)]
    pub changes: Vec<serde_json::Value>,
    /// Changes recorded in the running policy that take effect at the next start.
    #[schema(value_type = Vec<Object>)]
    pub deferred: Vec<serde_json::Value>,
    /// What the manager did for each change (empty for a validation): the change's fields
    /// plus `how` (`live`: a running IDD took it; `stored`: used when the channel or IDD next
    /// starts; `deferred`) and `actions` (one line each).
    #[schema(value_type = Vec<Object>)]
    pub applied: Vec<serde_json::Value>,
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
    /// A NIC's UDP wire: the address its far side sends frames to (known once running).
    pub wire: Option<String>,
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

pub(crate) fn us(d: Duration) -> u64 {
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
    /// A NIC's device-side counters (the emulated virtio-net device's own view: what reached
    /// the wire, and frames it dropped for want of a receive buffer the IDD had posted).
    pub nic: Option<NicCounters>,
}

/// A NIC's counters, kept by the device (they survive IDD restarts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct NicCounters {
    /// Frames put on the wire.
    pub tx_frames: u64,
    /// Their bytes.
    pub tx_bytes: u64,
    /// Transmits returned unsent (malformed, oversized, refused by the wire).
    pub tx_dropped: u64,
    /// Frames delivered into receive buffers.
    pub rx_frames: u64,
    /// Their bytes.
    pub rx_bytes: u64,
    /// Frames dropped because the IDD had no receive buffer posted (e.g. while it restarts).
    pub rx_no_buffer: u64,
    /// Frames dropped as too long.
    pub rx_dropped: u64,
    /// Errors reading from the wire.
    pub wire_errors: u64,
    /// Times the device marked itself as needing a reset.
    pub failures: u64,
}

impl From<iospace::emu::virtio_net::NetDevStats> for NicCounters {
    /// Field by field, destructured whole: a counter the device adds is a compile error
    /// here until the API decides whether to show it.
    fn from(s: iospace::emu::virtio_net::NetDevStats) -> Self {
        let iospace::emu::virtio_net::NetDevStats {
            tx_frames,
            tx_bytes,
            tx_dropped,
            rx_frames,
            rx_bytes,
            rx_no_buffer,
            rx_dropped,
            wire_errors,
            failures,
        } = s;
        Self {
            tx_frames,
            tx_bytes,
            tx_dropped,
            rx_frames,
            rx_bytes,
            rx_no_buffer,
            rx_dropped,
            wire_errors,
            failures,
        }
    }
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
        /// What the manager did for each (as in [`ApplyOutcome::applied`]).
        #[schema(value_type = Vec<Object>)]
        applied: Vec<serde_json::Value>,
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
