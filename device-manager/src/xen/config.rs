//! A driver domain's I/O Space as Xen's own settings: the lines of an `xl` domain
//! configuration that give a driver domain one PCI function.
//!
//! The I/O Space is the one the manager computes everywhere else ([`Tables::from_info`]: the
//! function's config space parsed, its BARs sized, no administrator input), written in
//! `xl.cfg(5)`'s terms:
//!
//! | xl key | from | format |
//! |---|---|---|
//! | `pci = ["SBDF"]` | the function's address | `0000:03:00.0`; xl then assigns it through pciback |
//! | `iomem = ["PFN,NR"]` | the pages of its memory BARs, merged into runs | hex 4 KiB page frame and page count (`xl.cfg`: "IOMEM_START,NUM_PAGES", both hex) |
//! | `ioports = ["START-END"]` | the ports of its I/O BARs, merged into runs | hex, inclusive |
//! | `irqs = [N]` | its INTx line, when it has an interrupt pin | decimal |
//!
//! For a PV driver domain, `pci` alone makes libxl grant the BARs' memory, ports and the
//! legacy IRQ; `iomem`/`ioports`/`irqs` say the same explicitly and are what a device that is
//! not assigned through pciback would need (and what `xl` checks them against). MSI and MSI-X
//! vectors are not `irqs` entries: Xen sets them up when the driver domain's kernel enables
//! them on the assigned function (the count is printed as a comment).
//!
//! An emulated device of the policy has no host function behind it, so nothing to assign:
//! its settings are printed as comments, with the addresses it has on the manager's own
//! emulated bus, to show what its I/O Space is.

use std::path::Path;

use serde::Serialize;

use iospace::pci::DeviceInfo;
use iospace::space::{MmioPages, PortBitmap, Tables, MMIO_PAGE_SIZE};
use policy::{BlkMedia, DeviceSpec, Policy, Wire};

use crate::devices::{self, PciDeviceView};

/// Why a device's settings could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Neither a host function nor a policy device.
    #[error("no PCI function {0} in sysfs and no such device in the policy")]
    NotFound(String),
    /// The host function could not be read.
    #[error("PCI function {address}")]
    Sysfs {
        /// The address.
        address: String,
        /// Why.
        #[source]
        source: iospace::pci::PciError,
    },
    /// An emulated device could not be described.
    #[error("emulated device {device}: {message}")]
    Emulated {
        /// The device.
        device: String,
        /// Why.
        message: String,
    },
}

/// Xen's page size (`iomem` counts 4 KiB frames).
pub const XEN_PAGE: u64 = 4096;

/// One function's driver-domain settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct XlConfig {
    /// The function's address.
    pub address: String,
    /// The policy's device name, if any.
    pub name: Option<String>,
    /// `host` (a real function) or `emulated` (comments only).
    pub origin: String,
    /// `iomem` entries: (first page frame, page count).
    pub iomem: Vec<(u64, u64)>,
    /// `ioports` entries: (first port, last port), inclusive.
    pub ioports: Vec<(u16, u16)>,
    /// `irqs` entries.
    pub irqs: Vec<u32>,
    /// MSI-X vectors (not an xl setting).
    pub msix_vectors: u16,
}

/// The xl keys' values (`--json` prints them with the numbers).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct XlValues {
    /// `pci`.
    pub pci: Vec<String>,
    /// `iomem`: `"PFN,NR"`, hex.
    pub iomem: Vec<String>,
    /// `ioports`: `"START-END"`, hex.
    pub ioports: Vec<String>,
    /// `irqs`.
    pub irqs: Vec<u32>,
}

/// Consecutive numbers merged into inclusive runs.
fn runs(items: impl IntoIterator<Item = u64>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for n in items {
        match out.last_mut() {
            Some((_, last)) if last.checked_add(1) == Some(n) => *last = n,
            _ => out.push((n, n)),
        }
    }
    out
}

impl XlConfig {
    /// The settings for a function whose config space is `info`.
    pub fn from_info(address: &str, name: Option<String>, origin: &str, info: &DeviceInfo) -> Self {
        Self::from_tables(address, name, origin, &Tables::from_info(info))
    }

    fn from_tables(address: &str, name: Option<String>, origin: &str, t: &Tables) -> Self {
        // The I/O Space's pages are MMIO_PAGE_SIZE (4 KiB, as Xen's) pages.
        let per = MMIO_PAGE_SIZE / XEN_PAGE;
        let iomem = runs(t.mmio.pages())
            .into_iter()
            .map(|(a, b)| (a * per, (b - a + 1) * per))
            .collect();
        let ioports = runs(
            (0..=u16::MAX)
                .filter(|p| t.ports.allowed(*p, 1))
                .map(u64::from),
        )
        .into_iter()
        .map(|(a, b)| {
            (
                u16::try_from(a).unwrap_or(0),
                u16::try_from(b).unwrap_or(u16::MAX),
            )
        })
        .collect();
        Self {
            address: address.to_owned(),
            name,
            origin: origin.to_owned(),
            iomem,
            ioports,
            irqs: t.irqs.line.map(u32::from).into_iter().collect(),
            msix_vectors: t.irqs.msix_vectors,
        }
    }

    /// The settings of an emulated device, from its description ([`devices::emulated_devices`]
    /// computes its I/O Space exactly as the manager builds it).
    pub fn from_view(v: &PciDeviceView) -> Self {
        let (mut mmio, mut ports) = (MmioPages::default(), PortBitmap::default());
        for b in &v.bars {
            if b.kind == "io" {
                ports.allow(b.address, b.size);
            } else {
                mmio.allow(b.address, b.size);
            }
        }
        let t = Tables {
            ports,
            mmio,
            irqs: iospace::space::IrqSet {
                line: v.irq,
                msix_vectors: v.msix_vectors,
            },
            command: 0,
        };
        Self::from_tables(&v.address, v.name.clone(), &v.origin, &t)
    }

    /// The values of the xl keys as xl writes them (`pci` empty for an emulated device).
    pub fn xl_values(&self) -> XlValues {
        XlValues {
            pci: if self.origin == "host" {
                vec![self.address.clone()]
            } else {
                Vec::new()
            },
            iomem: self
                .iomem
                .iter()
                .map(|(p, n)| format!("{p:x},{n:x}"))
                .collect(),
            ioports: self
                .ioports
                .iter()
                .map(|(a, b)| format!("{a:x}-{b:x}"))
                .collect(),
            irqs: self.irqs.clone(),
        }
    }

    /// The xl lines (commented out for an emulated device), each ending in a newline.
    pub fn render(&self) -> String {
        let x = self.xl_values();
        let list = |v: &[String]| {
            v.iter()
                .map(|e| format!("\"{e}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (iomem, ports) = (list(&x.iomem), list(&x.ioports));
        let irqs = x
            .irqs
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let body = format!(
            "pci = [\"{}\"]\niomem = [{iomem}]\nioports = [{ports}]\nirqs = [{irqs}]\n",
            self.address
        );
        let title = match &self.name {
            // The policy's free-text name: escaped, so a newline in it cannot end the comment
            // and put a line of its own into the xl config.
            Some(n) => format!("# {} ({})", self.address, n.escape_debug()),
            None => format!("# {}", self.address),
        };
        let mut out = format!(
            "{title}: {} MSI-X vector(s), set up by Xen when the driver enables them\n",
            self.msix_vectors
        );
        if self.origin == "host" {
            out.push_str(&body);
        } else {
            out.push_str("# emulated by the device manager: no host function to assign on Xen; its I/O Space on the emulated bus:\n");
            for l in body.lines() {
                out.push_str(&format!("# {l}\n"));
            }
        }
        out
    }
}

/// The host function at `address` under `<sysfs_root>/bus/pci/devices`.
pub fn host(
    sysfs_root: &Path,
    address: &str,
    name: Option<String>,
) -> Result<XlConfig, ConfigError> {
    let dir = sysfs_root.join("bus/pci/devices").join(address);
    if address.contains('/') || !dir.is_dir() {
        return Err(ConfigError::NotFound(address.to_owned()));
    }
    let d = iospace::pci::sysfs::read_device(&dir).map_err(|source| ConfigError::Sysfs {
        address: address.to_owned(),
        source,
    })?;
    let info = DeviceInfo {
        header: d.header,
        bars: d.bars,
        capabilities: d.capabilities,
    };
    Ok(XlConfig::from_info(address, name, "host", &info))
}

/// The PCI address a policy device passes through, if it does.
fn passthrough(d: &policy::Device) -> Option<String> {
    match &d.spec {
        DeviceSpec::Blk {
            media: BlkMedia::Pci(a),
            ..
        }
        | DeviceSpec::Net {
            wire: Wire::Pci(a), ..
        } => Some(a.to_string()),
        _ => None,
    }
}

/// The settings of one policy device: its host function when it is passed through, else its
/// emulated transport.
pub fn policy_device(sysfs_root: &Path, p: &Policy, name: &str) -> Result<XlConfig, ConfigError> {
    let d = p
        .device(name)
        .ok_or_else(|| ConfigError::NotFound(name.to_owned()))?;
    if let Some(a) = passthrough(d) {
        return host(sysfs_root, &a, Some(name.to_owned()));
    }
    let v = devices::emulated_devices(p)
        .into_iter()
        .find(|v| v.name.as_deref() == Some(name))
        .ok_or_else(|| ConfigError::NotFound(name.to_owned()))?;
    match &v.error {
        Some(e) => Err(ConfigError::Emulated {
            device: name.to_owned(),
            message: e.clone(),
        }),
        None => Ok(XlConfig::from_view(&v)),
    }
}

/// `DEVICE`: a policy device's name (with a policy), else a host function's address.
pub fn one(sysfs_root: &Path, p: Option<&Policy>, device: &str) -> Result<XlConfig, ConfigError> {
    match p {
        Some(p) if p.device(device).is_some() => policy_device(sysfs_root, p, device),
        _ => host(sysfs_root, device, None),
    }
}

/// Every host function (those the policy passes through named after their device), then the
/// policy's emulated devices; each with its own result.
pub fn all(sysfs_root: &Path, p: Option<&Policy>) -> Vec<Result<XlConfig, ConfigError>> {
    let mut out: Vec<Result<XlConfig, ConfigError>> = iospace::pci::sysfs::enumerate(sysfs_root)
        .into_iter()
        .map(|(path, r)| {
            let address = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let name = p
                .and_then(|p| {
                    p.devices
                        .iter()
                        .find(|d| passthrough(d).as_deref() == Some(&address))
                })
                .map(|d| d.name.clone());
            r.map(|d| {
                let info = DeviceInfo {
                    header: d.header,
                    bars: d.bars,
                    capabilities: d.capabilities,
                };
                XlConfig::from_info(&address, name, "host", &info)
            })
            .map_err(|source| ConfigError::Sysfs { address, source })
        })
        .collect();
    if let Some(p) = p {
        for v in devices::emulated_devices(p) {
            out.push(match &v.error {
                Some(e) => Err(ConfigError::Emulated {
                    device: v.name.clone().unwrap_or_default(),
                    message: e.clone(),
                }),
                None => Ok(XlConfig::from_view(&v)),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use iospace::pci::{ConfigDump, Header};
    use proptest::prelude::*;

    /// A type-0 header with the given BARs (`(raw low dword, size)`), INTx line `irq`.
    fn info(bars: &[(u32, u64)], irq: Option<u8>) -> DeviceInfo {
        let mut cfg = vec![0u8; 256];
        cfg[0..2].copy_from_slice(&0x8086u16.to_le_bytes());
        cfg[2..4].copy_from_slice(&0x100eu16.to_le_bytes());
        cfg[0x0b] = 0x02;
        if let Some(l) = irq {
            cfg[0x3c] = l;
            cfg[0x3d] = 1;
        }
        let mut out = Vec::new();
        for (i, (raw, size)) in bars.iter().enumerate() {
            let o = 0x10 + 4 * i;
            cfg[o..o + 4].copy_from_slice(&raw.to_le_bytes());
            out.push(iospace::pci::Bar::from_raw(i, *raw, 0, *size).unwrap());
        }
        let dump = ConfigDump::new(&cfg).unwrap();
        DeviceInfo {
            header: Header::parse(&dump).unwrap(),
            bars: out,
            capabilities: Vec::new(),
        }
    }

    #[test]
    fn a_name_with_a_newline_stays_in_the_comment() {
        let i = info(&[(0xfeb8_0000, 0x20000)], None);
        let name = "nic\nirqs = [5]".to_owned();
        let r = XlConfig::from_info("0000:00:03.0", Some(name), "host", &i).render();
        assert!(r.starts_with("# 0000:00:03.0 (nic\\nirqs = [5]): "), "{r}");
        assert!(!r.contains("irqs = [5]\n"), "{r}");
    }

    #[test]
    fn a_nic_with_mmio_io_and_an_irq() {
        // 128 KiB of MMIO at 0xfeb80000 and 64 ports at 0xc000 (an e1000).
        let i = info(&[(0xfeb8_0000, 0x20000), (0xc001, 0x40)], Some(11));
        let c = XlConfig::from_info("0000:00:03.0", Some("nic".into()), "host", &i);
        assert_eq!(c.iomem, [(0xfeb80, 0x20)]);
        assert_eq!(c.ioports, [(0xc000, 0xc03f)]);
        assert_eq!(c.irqs, [11]);
        let r = c.render();
        assert!(r.contains("pci = [\"0000:00:03.0\"]\n"), "{r}");
        assert!(r.contains("iomem = [\"feb80,20\"]\n"), "{r}");
        assert!(r.contains("ioports = [\"c000-c03f\"]\n"), "{r}");
        assert!(r.contains("irqs = [11]\n"), "{r}");
        let e = XlConfig {
            origin: "emulated".into(),
            ..c
        }
        .render();
        assert!(e.lines().all(|l| l.starts_with('#')), "{e}");
    }

    #[test]
    fn runs_merge_neighbours_only() {
        assert_eq!(runs([1, 2, 3, 5, 7, 8]), [(1, 3), (5, 5), (7, 8)]);
        assert_eq!(runs([u64::MAX]), [(u64::MAX, u64::MAX)]);
        assert!(runs([]).is_empty());
    }

    proptest! {
        /// Whatever the BARs, the xl entries cover exactly the I/O Space's pages and ports.
        #[test]
        fn entries_cover_exactly_the_io_space(
            pages in proptest::collection::vec((0x1000u32..0xfff0u32, 0u32..6u32), 0..4),
            ports in proptest::collection::vec((0x100u16..0xff00u16, 2u32..8u32), 0..2),
            irq in proptest::option::of(1u8..16),
        ) {
            let mut bars: Vec<(u32, u64)> = pages
                .iter()
                .map(|(pfn, order)| (*pfn << 16, 4096u64 << order))
                .collect();
            bars.extend(ports.iter().map(|(p, order)| ((u32::from(*p) & !0xff) | 1, 1u64 << order)));
            bars.truncate(6);
            let i = info(&bars, irq);
            let t = Tables::from_info(&i);
            let c = XlConfig::from_info("0000:00:01.0", None, "host", &i);
            let mut from_xl: Vec<u64> = c.iomem.iter().flat_map(|(p, n)| *p..*p + *n).collect();
            from_xl.sort_unstable();
            prop_assert_eq!(from_xl, t.mmio.pages().collect::<Vec<_>>());
            let nports: u32 = c.ioports.iter().map(|(a, b)| u32::from(*b) - u32::from(*a) + 1).sum();
            prop_assert_eq!(nports, t.ports.count());
            for (a, b) in &c.ioports {
                prop_assert!(t.ports.allowed(*a, usize::from(*b - *a) + 1));
            }
            prop_assert_eq!(c.irqs.len(), usize::from(irq.is_some()));
            // And the text parses back to the same numbers.
            let r = c.render();
            let line = r.lines().find(|l| l.starts_with("iomem")).unwrap();
            let parsed: Vec<(u64, u64)> = line
                .split('"')
                .skip(1)
                .step_by(2)
                .map(|e| {
                    let (p, n) = e.split_once(',').unwrap();
                    (u64::from_str_radix(p, 16).unwrap(), u64::from_str_radix(n, 16).unwrap())
                })
                .collect();
            prop_assert_eq!(parsed, c.iomem.clone());
        }
    }
}
