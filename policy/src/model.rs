//! The validated, typed policy the device manager consumes.
//!
//! Every quantity is resolved: sizes and regions in bytes (with sector helpers, 512-byte
//! sectors as blkif counts them), shares as bytes per interval, durations in microseconds, MACs
//! as six bytes, defaults filled in. A value of these types has passed every check in
//! [`crate::validate`].

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use serde::Serialize;

pub use crate::raw::{DeviceKind, GuestKind};
use crate::units::{Rate, Share};

/// Bytes per sector, as blkif counts them.
pub const SECTOR_SIZE: u64 = 512;

/// A validated policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Policy {
    /// Top-level restart defaults (each device has its resolved copy too).
    pub restart: RestartPolicy,
    /// Devices in file order.
    pub devices: Vec<Device>,
    /// Guests in file order.
    pub guests: Vec<Guest>,
}

/// When a driver domain is restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RestartPolicy {
    /// Restarts allowed within `window_us` before the device is marked failed.
    pub max_restarts: u32,
    /// The counting window, microseconds.
    pub window_us: u64,
    /// Heartbeat deadline, microseconds.
    pub heartbeat_us: u64,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            max_restarts: 10,
            window_us: 60_000_000,
            heartbeat_us: 1_000_000,
        }
    }
}

/// A PCI address `domain:bus:device.function`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct PciAddress {
    /// PCI segment (domain).
    pub domain: u16,
    /// Bus number.
    pub bus: u8,
    /// Device number (0..32).
    pub device: u8,
    /// Function number (0..8).
    pub function: u8,
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

/// A declared device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Device {
    /// Unique name.
    pub name: String,
    /// Kind-specific configuration.
    pub spec: DeviceSpec,
    /// Keep a hot standby driver domain.
    pub standby: bool,
    /// Restart policy (device keys over top-level defaults).
    pub restart: RestartPolicy,
}

impl Device {
    /// The device's kind.
    pub fn kind(&self) -> DeviceKind {
        match self.spec {
            DeviceSpec::Blk { .. } => DeviceKind::VirtioBlk,
            DeviceSpec::Net { .. } => DeviceKind::VirtioNet,
        }
    }
}

/// What a device is backed by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum DeviceSpec {
    /// A virtio-blk disk.
    Blk {
        /// Capacity in bytes (a multiple of 512).
        size: u64,
        /// The media.
        media: BlkMedia,
    },
    /// A virtio-net NIC.
    Net {
        /// Link speed that shares are checked against.
        link: Rate,
        /// How frames leave the host.
        wire: Wire,
    },
}

/// A disk's media.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlkMedia {
    /// A raw image file, created at the device's size if missing.
    Image(PathBuf),
    /// A host PCI device (passthrough, later).
    Pci(PciAddress),
}

/// A NIC's wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Wire {
    /// A UDP socket: frames go to `peer` (if any) and come from whoever sends to `bind`.
    Udp {
        /// Local address.
        bind: SocketAddr,
        /// Peer address.
        peer: Option<SocketAddr>,
    },
    /// A TAP interface.
    Tap {
        /// Interface name.
        ifname: String,
    },
    /// A host PCI device (passthrough, later).
    Pci(PciAddress),
}

/// A declared guest and its access.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Guest {
    /// Unique name.
    pub name: String,
    /// What runs in it.
    pub kind: GuestKind,
    /// kind = "xen": the Xen domain's name (the guest's name unless `domain` says otherwise);
    /// `None` for other kinds.
    pub domain: Option<String>,
    /// Its NICs, in file order.
    pub net: Vec<NetAccess>,
    /// Its disks, in file order.
    pub disk: Vec<DiskAccess>,
}

/// A MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// A guest's NIC on a net device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetAccess {
    /// The device's name.
    pub device: String,
    /// The guest's MAC (explicit or generated).
    pub mac: MacAddr,
    /// Allowed source networks; empty means no IP filter.
    pub ips: Vec<IpNet>,
    /// Credit share; `None` means unlimited.
    pub share: Option<Share>,
}

/// A byte range of a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Region {
    /// First byte (a multiple of 512).
    pub offset: u64,
    /// Length in bytes (a non-zero multiple of 512).
    pub length: u64,
}

impl Region {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
    /// First sector.
    pub fn start_sector(&self) -> u64 {
        self.offset / SECTOR_SIZE
    }
    /// Number of sectors (what the frontend sees as the disk's capacity).
    pub fn sectors(&self) -> u64 {
        self.length / SECTOR_SIZE
    }
    /// Whether two regions share a byte.
    pub fn overlaps(&self, other: &Region) -> bool {
        self.offset < other.end() && other.offset < self.end()
    }
}

/// A guest's region of a disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiskAccess {
    /// The device's name.
    pub device: String,
    /// The region the guest sees as its whole disk.
    pub region: Region,
    /// Read-only access.
    pub read_only: bool,
}

impl Policy {
    /// A device by name.
    pub fn device(&self, name: &str) -> Option<&Device> {
        self.devices.iter().find(|d| d.name == name)
    }
    /// A guest by name.
    pub fn guest(&self, name: &str) -> Option<&Guest> {
        self.guests.iter().find(|g| g.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_arithmetic() {
        let a = Region {
            offset: 0,
            length: 1024,
        };
        let b = Region {
            offset: 1024,
            length: 512,
        };
        assert!(!a.overlaps(&b) && !b.overlaps(&a));
        assert!(a.overlaps(&Region {
            offset: 512,
            length: 1024
        }));
        assert_eq!((b.start_sector(), b.sectors(), b.end()), (2, 1, 1536));
    }

    #[test]
    fn display_forms() {
        assert_eq!(
            MacAddr([2, 0, 0, 0, 0, 0xab]).to_string(),
            "02:00:00:00:00:ab"
        );
        let p = PciAddress {
            domain: 0,
            bus: 0,
            device: 4,
            function: 0,
        };
        assert_eq!(p.to_string(), "0000:00:04.0");
    }
}
