//! The file format as written: serde types that keep every value's span.
//!
//! These mirror the TOML one to one (and generate the JSON Schema); [`crate::validate`] turns
//! them into the typed [`crate::Policy`]. Quantities stay strings here so that a bad unit is a
//! diagnostic with a hint rather than a serde error that stops the parse. Each struct has a
//! `*_KEYS` list of the keys it accepts, used to report every unknown key (serde's
//! `deny_unknown_fields` stops at the first); a test checks the lists against the JSON Schema.

use std::borrow::Cow;
use std::fmt;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use toml::Spanned;

/// A size: a bare integer (bytes) or a string with a unit (`"64MiB"`, `"1G"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Quantity {
    /// A bare integer.
    Int(i64),
    /// A string with a unit.
    Text(String),
}

impl<'de> Deserialize<'de> for Quantity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Quantity;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size: an integer number of bytes or a string such as \"64MiB\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Quantity, E> {
                Ok(Quantity::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Quantity, E> {
                i64::try_from(v)
                    .map(Quantity::Int)
                    .map_err(|_| E::custom("size too large"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Quantity, E> {
                Ok(Quantity::Text(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

impl JsonSchema for Quantity {
    fn schema_name() -> Cow<'static, str> {
        "Size".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A size: an integer number of bytes, or a string with a unit: B, KiB, MiB, GiB, TiB (also K, M, G, T), or decimal KB, MB, GB, TB. Example: \"64MiB\".",
            "anyOf": [
                { "type": "integer", "minimum": 0 },
                { "type": "string", "pattern": "^\\s*[0-9_]+\\s*[A-Za-z]*\\s*$" }
            ]
        })
    }
}

/// The kind of an emulated (or passed-through) device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceKind {
    /// A virtio-net NIC, driven by an idd-net domain.
    VirtioNet,
    /// A virtio-blk disk, driven by an idd-blk domain.
    VirtioBlk,
}

impl DeviceKind {
    /// The name as written in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::VirtioNet => "virtio-net",
            Self::VirtioBlk => "virtio-blk",
        }
    }
}

/// How a network device reaches the outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum WireKind {
    /// A UDP socket pair (no privileges needed; the default).
    Udp,
    /// A TAP interface (needs root or CAP_NET_ADMIN).
    Tap,
}

/// What runs in a guest domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum GuestKind {
    /// A process domain with the Rust frontends (the default).
    #[default]
    Process,
    /// A domain of a real Xen host (e.g. an unmodified Linux guest with xen-netfront /
    /// xen-blkfront), found by its name (`domain`); the device manager runs in the backend
    /// domain as its toolstack and supervises one userspace backend per device (`iddctl xen
    /// serve`). `"xen-linux"`, the name earlier policies used, is read as `"xen"`.
    #[serde(alias = "xen-linux")]
    Xen,
}

impl GuestKind {
    /// The name as written in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Process => "process",
            Self::Xen => "xen",
        }
    }
}

/// A whole policy file.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(
    title = "idd policy",
    description = "Devices, guests and each guest's access to them."
)]
pub struct RawPolicy {
    /// Restart defaults for every device's driver domain.
    #[serde(default)]
    #[schemars(with = "Option<RawRestart>")]
    pub restart: Option<Spanned<RawRestart>>,
    /// The devices, one `[[device]]` table each.
    #[serde(default)]
    #[schemars(with = "Vec<RawDevice>")]
    pub device: Vec<Spanned<RawDevice>>,
    /// The guests, one `[[guest]]` table each.
    #[serde(default)]
    #[schemars(with = "Vec<RawGuest>")]
    pub guest: Vec<Spanned<RawGuest>>,
}

/// Keys of the top level.
pub const ROOT_KEYS: &[&str] = &["restart", "device", "guest"];

/// When and how a driver domain is restarted.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Restart")]
pub struct RawRestart {
    /// Restarts allowed within `window` before the device is marked failed (default 10).
    #[schemars(with = "Option<u32>")]
    pub max_restarts: Option<Spanned<u32>>,
    /// The window over which restarts are counted (default "60s").
    #[schemars(with = "Option<String>")]
    pub window: Option<Spanned<String>>,
    /// A driver domain that misses its heartbeat for this long is restarted (default "1s").
    #[schemars(with = "Option<String>")]
    pub heartbeat: Option<Spanned<String>>,
}

/// Keys of `[restart]` and `[device.restart]`.
pub const RESTART_KEYS: &[&str] = &["max_restarts", "window", "heartbeat"];

/// One `[[device]]`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Device")]
pub struct RawDevice {
    /// Unique device name, used by guests' access entries.
    #[schemars(with = "String")]
    pub name: Spanned<String>,
    /// "virtio-net" or "virtio-blk".
    #[schemars(with = "DeviceKind")]
    pub kind: Spanned<DeviceKind>,
    /// virtio-blk: the raw image file (created at `size` if missing; relative to the policy file).
    #[schemars(with = "Option<String>")]
    pub image: Option<Spanned<String>>,
    /// virtio-blk: the disk's capacity, e.g. "64MiB".
    #[schemars(with = "Option<Quantity>")]
    pub size: Option<Spanned<Quantity>>,
    /// virtio-net: "udp" (default, unprivileged) or "tap".
    #[schemars(with = "Option<WireKind>")]
    pub wire: Option<Spanned<WireKind>>,
    /// virtio-net, udp wire: local socket address (default "127.0.0.1:0").
    #[schemars(with = "Option<String>")]
    pub bind: Option<Spanned<String>>,
    /// virtio-net, udp wire: the peer's socket address (default: none, receive only until a
    /// peer sends).
    #[schemars(with = "Option<String>")]
    pub peer: Option<Spanned<String>>,
    /// virtio-net, tap wire: the interface name (at most 15 bytes).
    #[schemars(with = "Option<String>")]
    pub ifname: Option<Spanned<String>>,
    /// virtio-net: the link speed that shares are checked against (default "1Gbit/s").
    #[schemars(with = "Option<String>")]
    pub link: Option<Spanned<String>>,
    /// A host PCI device to pass through instead of an emulated one, e.g. "0000:00:04.0".
    #[schemars(with = "Option<String>")]
    pub pci: Option<Spanned<String>>,
    /// Keep a hot standby driver domain for this device (default false).
    #[schemars(with = "Option<bool>")]
    pub standby: Option<Spanned<bool>>,
    /// Restart settings for this device (each key defaults to the top-level `[restart]`).
    #[schemars(with = "Option<RawRestart>")]
    pub restart: Option<Spanned<RawRestart>>,
}

/// Keys of `[[device]]`.
pub const DEVICE_KEYS: &[&str] = &[
    "name", "kind", "image", "size", "wire", "bind", "peer", "ifname", "link", "pci", "standby",
    "restart",
];

/// One `[[guest]]`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Guest")]
pub struct RawGuest {
    /// Unique guest name.
    #[schemars(with = "String")]
    pub name: Spanned<String>,
    /// "process" (default) or "xen" ("xen-linux" is read as "xen").
    #[schemars(with = "Option<GuestKind>")]
    pub kind: Option<Spanned<GuestKind>>,
    /// kind = "xen": the Xen domain's name (`name` in xl's config; default: the guest's
    /// name), resolved to a domain id through XenStore's `/local/domain/*/name`.
    #[schemars(with = "Option<String>")]
    pub domain: Option<Spanned<String>>,
    /// Network interfaces, one `[[guest.net]]` each.
    #[serde(default)]
    #[schemars(with = "Vec<RawNetAccess>")]
    pub net: Vec<Spanned<RawNetAccess>>,
    /// Disks, one `[[guest.disk]]` each.
    #[serde(default)]
    #[schemars(with = "Vec<RawDiskAccess>")]
    pub disk: Vec<Spanned<RawDiskAccess>>,
}

/// Keys of `[[guest]]`.
pub const GUEST_KEYS: &[&str] = &["name", "kind", "domain", "net", "disk"];

/// One `[[guest.net]]`: a NIC on a virtio-net device.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "NetAccess")]
pub struct RawNetAccess {
    /// The virtio-net device's name.
    #[schemars(with = "String")]
    pub device: Spanned<String>,
    /// Unicast MAC address, e.g. "02:00:00:00:00:01" (default: 02:1d:d0:DD:GG:NN from the
    /// device, guest and NIC index).
    #[schemars(with = "Option<String>")]
    pub mac: Option<Spanned<String>>,
    /// Source addresses the guest may send from, as addresses or networks ("10.0.0.2",
    /// "10.0.0.0/24"); absent means no IP filter (the MAC is still enforced).
    #[schemars(with = "Option<Vec<String>>")]
    pub ips: Option<Vec<Spanned<String>>>,
    /// Bandwidth share: "100Mbit/s", "100Mbit/s@20ms" or "64KiB every 1ms"; absent means
    /// unlimited (round robin only).
    #[schemars(with = "Option<String>")]
    pub share: Option<Spanned<String>>,
}

/// Keys of `[[guest.net]]`.
pub const NET_KEYS: &[&str] = &["device", "mac", "ips", "share"];

/// One `[[guest.disk]]`: a region of a virtio-blk device.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "DiskAccess")]
pub struct RawDiskAccess {
    /// The virtio-blk device's name.
    #[schemars(with = "String")]
    pub device: Spanned<String>,
    /// Where the region starts on the disk (default 0); a multiple of 512 bytes.
    #[schemars(with = "Option<Quantity>")]
    pub offset: Option<Spanned<Quantity>>,
    /// The region's length (default: to the end of the disk); a multiple of 512 bytes.
    #[schemars(with = "Option<Quantity>")]
    pub length: Option<Spanned<Quantity>>,
    /// Read-only access (default false).
    #[schemars(with = "Option<bool>")]
    pub read_only: Option<Spanned<bool>>,
}

/// Keys of `[[guest.disk]]`.
pub const DISK_KEYS: &[&str] = &["device", "offset", "length", "read_only"];
