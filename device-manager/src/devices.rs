//! PCI enumeration for `iddctl devices` and `GET /v1/devices`: host functions from sysfs and
//! the emulated devices of a policy, in one shape.
//!
//! * **Host** functions come from `<root>/bus/pci/devices` ([`iospace::pci::sysfs`], read-only:
//!   the `config` file and `resource` for BAR sizes), with names from the system's PCI ID
//!   database ([`iospace::pci::names`]; hex ids when there is none). No manager is needed. A
//!   function that cannot be read is listed with its error instead of hiding the others.
//! * **Emulated** devices are described by building exactly what the manager builds for them
//!   (a `VirtioPci` transport on its own emulated bus, slot [`EMULATED_SLOT`], INTx line
//!   [`EMULATED_LINE`]) around a stand-in virtio device of the same type and PCI class, then
//!   computing its I/O Space the way the manager does ([`IoSpace::new`]: config space probed,
//!   BARs sized, permission tables derived, no administrator input). The stand-in never runs:
//!   nothing is activated, no image is opened.
//!
//! Each device also names the IDD that owns it (`idd-<device>` for an emulated device, or for a
//! host function the policy passes through) and summarizes that IDD's I/O Space: the MMIO pages
//! and I/O ports it may touch, its interrupts, and the command bits the manager enforces.

use std::path::Path;
use std::sync::Arc;

use iospace::emu::interrupts::Interrupts;
use iospace::emu::mem::IommuMemory;
use iospace::emu::virtio_pci::{VirtioDevice, VirtioPci};
use iospace::emu::{EmuError, PciBus};
use iospace::iommu::Iommu;
use iospace::pci::{BarKind, Capability, Header};
use iospace::space::{IoSpace, Tables};
use policy::{BlkMedia, DeviceSpec, Policy, Wire};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::service::idd_name;

/// The slot the manager plugs an emulated device into (on that device's own bus).
pub const EMULATED_SLOT: u8 = 4;
/// The INTx line the manager gives an emulated device.
pub const EMULATED_LINE: u8 = 11;

/// Why an emulated device could not be described.
#[derive(Debug, thiserror::Error)]
pub enum DevicesError {
    /// Building the transport or plugging it failed.
    #[error("emulated device {device}: {source}")]
    Emulated {
        /// The device.
        device: String,
        /// Why.
        #[source]
        source: EmuError,
    },
    /// Computing its I/O Space failed.
    #[error("emulated device {device}: I/O Space: {message}")]
    Space {
        /// The device.
        device: String,
        /// Why.
        message: String,
    },
}

/// One BAR.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct BarView {
    /// BAR number.
    pub index: u32,
    /// `io`, `mem32` or `mem64`.
    pub kind: String,
    /// Prefetchable memory.
    pub prefetchable: bool,
    /// Base address (port for I/O).
    pub address: u64,
    /// Size in bytes.
    pub size: u64,
}

/// An IDD's I/O Space for this device: what the IDD may touch.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct IoSpaceSummary {
    /// MMIO pages it may map.
    pub mmio_pages: u64,
    /// I/O ports it may use.
    pub io_ports: u32,
    /// INTx line, if any.
    pub irq_line: Option<u8>,
    /// MSI-X vectors.
    pub msix_vectors: u16,
    /// Command register bits the manager sets (decode, bus master).
    pub command: u16,
}

/// One PCI function.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct PciDeviceView {
    /// `host` (sysfs) or `emulated`.
    pub origin: String,
    /// Its address (`0000:00:04.0`; emulated devices each sit on their own bus).
    pub address: String,
    /// The policy's device name, for emulated devices and passed-through host functions.
    pub name: Option<String>,
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Vendor name (PCI ID database), if known.
    pub vendor: Option<String>,
    /// Device name, if known.
    pub device: Option<String>,
    /// Class code `0xCCSSPP`.
    pub class: u32,
    /// Class name, if known.
    pub class_name: Option<String>,
    /// BARs.
    pub bars: Vec<BarView>,
    /// INTx line (when the device has an interrupt pin).
    pub irq: Option<u8>,
    /// MSI-X vectors.
    pub msix_vectors: u16,
    /// Capabilities (`msi`, `msix`, `pcie`, `virtio-common`, `vendor`, `cap-0xNN`).
    pub capabilities: Vec<String>,
    /// The IDD that owns it.
    pub owner: Option<String>,
    /// The owner's I/O Space.
    pub io_space: Option<IoSpaceSummary>,
    /// Why it could not be read (the other fields are then empty).
    pub error: Option<String>,
}

fn bar_views(bars: &[iospace::pci::Bar]) -> Vec<BarView> {
    bars.iter()
        .map(|b| BarView {
            index: u32::try_from(b.index).unwrap_or(u32::MAX),
            kind: match b.kind {
                BarKind::Io => "io",
                BarKind::Mem32 => "mem32",
                BarKind::Mem64 => "mem64",
            }
            .into(),
            prefetchable: b.prefetchable,
            address: b.address,
            size: b.size,
        })
        .collect()
}

fn cap_names(caps: &[Capability]) -> Vec<String> {
    caps.iter()
        .map(|c| match c {
            Capability::Msi(_) => "msi".to_owned(),
            Capability::MsiX(_) => "msix".to_owned(),
            Capability::PciExpress { .. } => "pcie".to_owned(),
            Capability::Vendor {
                virtio: Some(_), ..
            } => "virtio".to_owned(),
            Capability::Vendor { .. } => "vendor".to_owned(),
            Capability::Other { id, .. } => format!("cap-{id:#04x}"),
        })
        .collect()
}

fn summary(t: &Tables) -> IoSpaceSummary {
    IoSpaceSummary {
        mmio_pages: t.mmio.pages().count() as u64,
        io_ports: t.ports.count(),
        irq_line: t.irqs.line,
        msix_vectors: t.irqs.msix_vectors,
        command: t.command,
    }
}

fn base_view(origin: &str, address: String, h: &Header) -> PciDeviceView {
    PciDeviceView {
        origin: origin.into(),
        address,
        name: None,
        vendor_id: h.vendor_id,
        device_id: h.device_id,
        vendor: h.vendor_name().map(str::to_owned),
        device: h.device_name().map(str::to_owned),
        class: u32::from(h.class) << 16 | u32::from(h.subclass) << 8 | u32::from(h.prog_if),
        class_name: h.class_name().map(str::to_owned),
        bars: Vec::new(),
        irq: (h.interrupt_pin != 0).then_some(h.interrupt_line),
        msix_vectors: 0,
        capabilities: Vec::new(),
        owner: None,
        io_space: None,
        error: None,
    }
}

/// Every host PCI function under `<sysfs_root>/bus/pci/devices` (`/sys` normally), with the
/// policy's passthrough owner when `policy` names its address.
pub fn host_devices(sysfs_root: &Path, policy: Option<&Policy>) -> Vec<PciDeviceView> {
    iospace::pci::sysfs::enumerate(sysfs_root)
        .into_iter()
        .map(|(path, r)| match r {
            Ok(d) => {
                let mut v = base_view("host", d.address.clone(), &d.header);
                v.bars = bar_views(&d.bars);
                v.capabilities = cap_names(&d.capabilities);
                let info = iospace::pci::DeviceInfo {
                    header: d.header,
                    bars: d.bars.clone(),
                    capabilities: d.capabilities.clone(),
                };
                v.msix_vectors = info.msix().map_or(0, |m| m.table_size);
                if let Some(dev) = policy.and_then(|p| passthrough_of(p, &d.address)) {
                    v.name = Some(dev.to_owned());
                    v.owner = Some(idd_name(dev));
                    v.io_space = Some(summary(&Tables::from_info(&info)));
                }
                v
            }
            Err(e) => PciDeviceView {
                origin: "host".into(),
                address: path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                name: None,
                vendor_id: 0,
                device_id: 0,
                vendor: None,
                device: None,
                class: 0,
                class_name: None,
                bars: Vec::new(),
                irq: None,
                msix_vectors: 0,
                capabilities: Vec::new(),
                owner: None,
                io_space: None,
                error: Some(e.to_string()),
            },
        })
        .collect()
}

/// The policy device that passes the host function at `address` through, if any.
fn passthrough_of<'p>(p: &'p Policy, address: &str) -> Option<&'p str> {
    p.devices.iter().find_map(|d| {
        let a = match &d.spec {
            DeviceSpec::Blk {
                media: BlkMedia::Pci(a),
                ..
            }
            | DeviceSpec::Net {
                wire: Wire::Pci(a), ..
            } => a,
            _ => return None,
        };
        (a.to_string() == address).then_some(d.name.as_str())
    })
}

/// A virtio device that only answers the questions config space asks (type, class, queues):
/// the transport around it is the real one, nothing is ever activated.
struct StandIn {
    device_type: u16,
    class: (u8, u8, u8),
    queues: u16,
}

impl VirtioDevice for StandIn {
    fn device_type(&self) -> u16 {
        self.device_type
    }
    fn class(&self) -> (u8, u8, u8) {
        self.class
    }
    fn features(&self) -> u64 {
        0
    }
    fn num_queues(&self) -> u16 {
        self.queues
    }
    fn queue_max_size(&self) -> u16 {
        256
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write_config(&self, _offset: u64, _data: &[u8]) {}
    fn activate(
        &self,
        _features: u64,
        _queues: Vec<Option<virtio_queue::Queue>>,
        _mem: IommuMemory,
        _irq: Arc<Interrupts>,
    ) -> Result<(), EmuError> {
        Err(EmuError::Probe(iospace::pci::PciError::ReadOnly))
    }
    fn queue_notify(&self, _queue: u16) {}
    fn reset(&self) {}
}

/// Describe one emulated device of `policy` as the manager builds it.
fn emulated(dev: &policy::Device) -> Result<Option<PciDeviceView>, DevicesError> {
    // Type, class and queues as iospace's models report them (virtio-blk: mass storage/SCSI as
    // QEMU does, one request queue; virtio-net: network/Ethernet, receive and transmit).
    let stand_in = match &dev.spec {
        DeviceSpec::Blk {
            media: BlkMedia::Image(_),
            ..
        } => StandIn {
            device_type: 2,
            class: (0x01, 0x00, 0x00),
            queues: 1,
        },
        DeviceSpec::Net { wire, .. } if !matches!(wire, Wire::Pci(_)) => StandIn {
            device_type: 1,
            class: (0x02, 0x00, 0x00),
            queues: 2,
        },
        _ => return Ok(None), // a host device: listed by `host_devices`
    };
    let err = |source| DevicesError::Emulated {
        device: dev.name.clone(),
        source,
    };
    let iommu = Iommu::new(1);
    let pci =
        Arc::new(VirtioPci::new(Arc::new(stand_in), iommu.device(), EMULATED_LINE).map_err(err)?);
    let bus = PciBus::new();
    let bdf = bus.plug(EMULATED_SLOT, pci.clone()).map_err(err)?;
    let space = IoSpace::new(bdf, pci).map_err(|e| DevicesError::Space {
        device: dev.name.clone(),
        message: e.to_string(),
    })?;
    let info = space.info();
    let mut v = base_view("emulated", bdf.to_string(), &info.header);
    v.name = Some(dev.name.clone());
    v.bars = bar_views(&info.bars);
    v.capabilities = cap_names(&info.capabilities);
    v.msix_vectors = info.msix().map_or(0, |m| m.table_size);
    v.owner = Some(idd_name(&dev.name));
    v.io_space = Some(IoSpaceSummary {
        mmio_pages: space.mmio_pages().pages().count() as u64,
        io_ports: space.ports().count(),
        irq_line: space.irqs().line,
        msix_vectors: space.irqs().msix_vectors,
        command: Tables::from_info(info).command,
    });
    Ok(Some(v))
}

/// Every emulated device of `policy`; one that cannot be described is listed with its error.
pub fn emulated_devices(policy: &Policy) -> Vec<PciDeviceView> {
    policy
        .devices
        .iter()
        .filter_map(|d| match emulated(d) {
            Ok(v) => v,
            Err(e) => Some(PciDeviceView {
                origin: "emulated".into(),
                address: String::new(),
                name: Some(d.name.clone()),
                vendor_id: 0,
                device_id: 0,
                vendor: None,
                device: None,
                class: 0,
                class_name: None,
                bars: Vec::new(),
                irq: None,
                msix_vectors: 0,
                capabilities: Vec::new(),
                owner: Some(idd_name(&d.name)),
                io_space: None,
                error: Some(e.to_string()),
            }),
        })
        .collect()
}

/// Host functions (from `sysfs_root`) then the policy's emulated devices.
pub fn enumerate(sysfs_root: &Path, policy: Option<&Policy>) -> Vec<PciDeviceView> {
    let mut v = host_devices(sysfs_root, policy);
    if let Some(p) = policy {
        v.extend(emulated_devices(p));
    }
    v
}

fn size(n: u64) -> String {
    policy::units::format_size(n)
}

/// The human table: one line per function, then one indented line per BAR and for the I/O
/// Space of an owned device.
pub fn table(devs: &[PciDeviceView]) -> String {
    let mut out = format!(
        "{:<9} {:<13} {:<9} {:<7} {:<14} {:<5} {:<16} {}\n",
        "ORIGIN", "ADDRESS", "ID", "CLASS", "OWNER", "IRQ", "NAME", "VENDOR / DEVICE"
    );
    for d in devs {
        if let Some(e) = &d.error {
            out.push_str(&format!("{:<9} {:<13} error: {e}\n", d.origin, d.address));
            continue;
        }
        let names = format!(
            "{} / {}",
            d.vendor
                .clone()
                .unwrap_or_else(|| format!("{:04x}", d.vendor_id)),
            d.device
                .clone()
                .unwrap_or_else(|| format!("{:04x}", d.device_id))
        );
        let irq = match (d.irq, d.msix_vectors) {
            (_, n) if n > 0 => format!("msix{n}"),
            (Some(l), _) => l.to_string(),
            (None, _) => "-".into(),
        };
        out.push_str(&format!(
            "{:<9} {:<13} {:04x}:{:04x} {:06x}  {:<14} {:<5} {:<16} {}{}\n",
            d.origin,
            d.address,
            d.vendor_id,
            d.device_id,
            d.class,
            d.owner.as_deref().unwrap_or("-"),
            irq,
            d.name.as_deref().unwrap_or("-"),
            names,
            d.class_name
                .as_deref()
                .map(|c| format!(" [{c}]"))
                .unwrap_or_default()
        ));
        for b in &d.bars {
            out.push_str(&format!(
                "    BAR{} {:<5} {:#x} size {}{}\n",
                b.index,
                b.kind,
                b.address,
                size(b.size),
                if b.prefetchable { " prefetchable" } else { "" }
            ));
        }
        if let Some(s) = &d.io_space {
            out.push_str(&format!(
                "    I/O Space: {} MMIO page(s), {} port(s), irq {}, {} MSI-X vector(s), command {:#06x}\n",
                s.mmio_pages,
                s.io_ports,
                s.irq_line.map_or_else(|| "-".to_owned(), |l| l.to_string()),
                s.msix_vectors,
                s.command
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
[[device]]
name = "disk0"
kind = "virtio-blk"
image = "disk0.img"
size = "16MiB"

[[device]]
name = "nic0"
kind = "virtio-net"

[[device]]
name = "hostnic"
kind = "virtio-net"
pci = "0000:00:03.0"
"#;

    #[test]
    fn emulated_blk_is_described_like_the_manager_builds_it() {
        let p = Policy::parse(POLICY, "p.toml").unwrap();
        let v = emulated_devices(&p);
        assert_eq!(v.len(), 2, "{v:?}");
        let blk = &v[0];
        assert_eq!(blk.error, None);
        assert_eq!((blk.vendor_id, blk.device_id), (0x1af4, 0x1040 + 2));
        assert_eq!(blk.class, 0x01_00_00);
        assert_eq!(blk.address, "0000:00:04.0");
        assert_eq!(blk.owner.as_deref(), Some("idd-disk0"));
        assert!(blk.bars.iter().any(|b| b.index == 4), "{:?}", blk.bars);
        assert!(blk.capabilities.contains(&"msix".to_owned()));
        let s = blk.io_space.as_ref().unwrap();
        assert!(s.mmio_pages >= 4, "{s:?}");
        assert!(s.msix_vectors >= 2);
        assert_eq!(s.irq_line, Some(EMULATED_LINE));
        let net = &v[1];
        assert_eq!(net.device_id, 0x1041);
        assert_eq!(net.class, 0x02_00_00);
        let t = table(&v);
        assert!(t.contains("idd-disk0"), "{t}");
        assert!(t.contains("1af4:1042"), "{t}");
        assert!(t.contains("I/O Space:"), "{t}");
    }

    /// The stand-in must describe exactly what the manager builds: compare with a real
    /// virtio-blk transport over a scratch image, built the way `Manager::start` builds it.
    #[test]
    fn stand_in_matches_the_real_virtio_blk() {
        use iospace::emu::virtio_blk::{BlkConfig, VirtioBlk};
        let t = tempfile::tempdir().unwrap();
        let blk = VirtioBlk::new(&BlkConfig {
            path: t.path().join("d.img"),
            size: 1 << 20,
            read_only: false,
            serial: "disk0".into(),
            workers: 1,
        })
        .unwrap();
        let iommu = Iommu::new(16);
        let pci = Arc::new(VirtioPci::new(Arc::new(blk), iommu.device(), EMULATED_LINE).unwrap());
        let bus = PciBus::new();
        let bdf = bus.plug(EMULATED_SLOT, pci.clone()).unwrap();
        let real = IoSpace::new(bdf, pci).unwrap();
        let p = Policy::parse(POLICY, "p.toml").unwrap();
        let ours = emulated(&p.devices[0]).unwrap().unwrap();
        let h = &real.info().header;
        assert_eq!((ours.vendor_id, ours.device_id), (h.vendor_id, h.device_id));
        assert_eq!(
            ours.class,
            u32::from(h.class) << 16 | u32::from(h.subclass) << 8 | u32::from(h.prog_if)
        );
        assert_eq!(ours.bars, bar_views(&real.info().bars));
        assert_eq!(ours.capabilities, cap_names(&real.info().capabilities));
        let s = ours.io_space.unwrap();
        assert_eq!(s.mmio_pages, real.mmio_pages().pages().count() as u64);
        assert_eq!(s.msix_vectors, real.irqs().msix_vectors);
        assert_eq!(s.irq_line, real.irqs().line);
    }

    #[test]
    fn host_devices_from_a_fake_tree_with_passthrough_owner() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("bus/pci/devices");
        for (addr, ok) in [("0000:00:03.0", true), ("0000:00:05.0", false)] {
            let d = dir.join(addr);
            std::fs::create_dir_all(&d).unwrap();
            if !ok {
                continue; // no config file: listed with its error
            }
            let mut cfg = vec![0u8; 64];
            cfg[0..2].copy_from_slice(&0x8086u16.to_le_bytes());
            cfg[2..4].copy_from_slice(&0x100eu16.to_le_bytes());
            cfg[0x0b] = 0x02;
            cfg[0x10..0x14].copy_from_slice(&0xfeb8_0000u32.to_le_bytes());
            cfg[0x3c] = 10;
            cfg[0x3d] = 1;
            std::fs::write(d.join("config"), cfg).unwrap();
            std::fs::write(
                d.join("resource"),
                "0x00000000feb80000 0x00000000feb9ffff 0x0000000000040200\n",
            )
            .unwrap();
        }
        let p = Policy::parse(POLICY, "p.toml").unwrap();
        let v = host_devices(t.path(), Some(&p));
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].address, "0000:00:03.0");
        assert_eq!(v[0].vendor_id, 0x8086);
        assert_eq!(v[0].irq, Some(10));
        assert_eq!(v[0].bars[0].size, 0x20000);
        assert_eq!(v[0].owner.as_deref(), Some("idd-hostnic"));
        assert_eq!(v[0].io_space.as_ref().unwrap().mmio_pages, 32);
        assert!(v[1].error.is_some());
        let all = enumerate(t.path(), Some(&p));
        assert_eq!(all.len(), 4);
        assert!(table(&all).contains("error:"));
    }

    #[test]
    fn missing_sysfs_is_an_empty_list() {
        assert!(host_devices(Path::new("/nonexistent"), None).is_empty());
    }
}
