//! Read-only enumeration of real PCI functions from sysfs.
//!
//! Under `<root>/bus/pci/devices/` (root is `/sys` on a real system; tests point it at a fake
//! tree), each function is a directory named by its address `DDDD:BB:DD.F` with:
//!
//! * `config`: the config space (256 bytes for an unprivileged reader, up to 4096 for root);
//! * `resource`: one line per resource, `0x<start> 0x<end> 0x<flags>`, lines 0..5 being the
//!   BARs (start = end = 0 for an unused one).
//!
//! Nothing is ever written: BAR sizes come from `resource`, not from the sizing protocol.

use super::bar::{Bar, BAR_MEM_TYPE_64};
use super::{caps, ConfigAccess, ConfigDump, Header, PciError, Result, NUM_BARS};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One function found in sysfs.
#[derive(Clone, Debug)]
pub struct SysfsDevice {
    /// Its address (`0000:00:03.0`).
    pub address: String,
    /// Its config space.
    pub config: ConfigDump,
    /// The parsed header.
    pub header: Header,
    /// BARs with sizes from `resource`.
    pub bars: Vec<Bar>,
    /// Its capabilities.
    pub capabilities: Vec<caps::Capability>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PciError + '_ {
    move |e| PciError::Sysfs {
        path: path.display().to_string(),
        source: super::IoError(Arc::new(e)),
    }
}

/// Parse a `resource` file into `(start, end)` pairs.
pub fn parse_resource(text: &str, path: &str) -> Result<Vec<(u64, u64)>> {
    let hex = |s: &str| {
        u64::from_str_radix(s.trim_start_matches("0x"), 16)
            .map_err(|_| PciError::SysfsFormat(path.to_owned()))
    };
    text.lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() != 3 {
                return Err(PciError::SysfsFormat(path.to_owned()));
            }
            Ok((hex(f[0])?, hex(f[1])?))
        })
        .collect()
}

/// Read one function's directory.
pub fn read_device(dir: &Path) -> Result<SysfsDevice> {
    let cfg_path = dir.join("config");
    let bytes = std::fs::read(&cfg_path).map_err(io_err(&cfg_path))?;
    let config = ConfigDump::new(&bytes)?;
    let header = Header::parse(&config)?;
    let res_path = dir.join("resource");
    let text = std::fs::read_to_string(&res_path).map_err(io_err(&res_path))?;
    let res = parse_resource(&text, &res_path.display().to_string())?;
    let mut bars = Vec::new();
    let mut i = 0;
    while i < NUM_BARS {
        let (start, end) = res.get(i).copied().unwrap_or((0, 0));
        let low = config.read_u32(super::bar::bar_offset(i))?;
        let is64 = low & 1 == 0 && low & super::bar::BAR_MEM_TYPE_MASK == BAR_MEM_TYPE_64;
        if end > start {
            let high = if is64 {
                config.read_u32(super::bar::bar_offset(i + 1))?
            } else {
                0
            };
            let mut bar = Bar::from_raw(i, low, high, end - start + 1)?;
            // The kernel's view of the address (the register may read 0 to an unprivileged
            // reader) is what counts.
            bar.address = start;
            bars.push(bar);
        }
        i += if is64 { 2 } else { 1 };
    }
    let capabilities = caps::walk(&config)?;
    Ok(SysfsDevice {
        address: dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        config,
        header,
        bars,
        capabilities,
    })
}

/// Every function under `<root>/bus/pci/devices`, sorted by address, each with its own
/// result (one unreadable device does not hide the others). Missing directory: empty list.
pub fn enumerate(root: &Path) -> Vec<(PathBuf, Result<SysfsDevice>)> {
    let dir = root.join("bus/pci/devices");
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let r = read_device(&p);
            (p, r)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_lines() {
        let r = parse_resource(
            "0x0000000000001000 0x000000000000101f 0x0000000000040101\n0x0 0x0 0x0\n",
            "r",
        )
        .unwrap();
        assert_eq!(r, vec![(0x1000, 0x101f), (0, 0)]);
        assert!(parse_resource("0x1 0x2\n", "r").is_err());
        assert!(parse_resource("zz 0x2 0x3\n", "r").is_err());
    }

    #[test]
    fn fake_tree() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("bus/pci/devices/0000:00:03.0");
        std::fs::create_dir_all(&d).unwrap();
        let mut cfg = vec![0u8; 64];
        cfg[0..2].copy_from_slice(&0x8086u16.to_le_bytes());
        cfg[2..4].copy_from_slice(&0x100eu16.to_le_bytes());
        cfg[0x10..0x14].copy_from_slice(&0xfeb8_0000u32.to_le_bytes());
        cfg[0x14..0x18].copy_from_slice(&0xc001u32.to_le_bytes());
        std::fs::write(d.join("config"), &cfg).unwrap();
        std::fs::write(
            d.join("resource"),
            "0xfeb80000 0xfeb9ffff 0x40200\n0xc000 0xc03f 0x40101\n0x0 0x0 0x0\n0x0 0x0 0x0\n0x0 0x0 0x0\n0x0 0x0 0x0\n0x0 0x0 0x0\n",
        )
        .unwrap();
        let e = t.path().join("bus/pci/devices/0000:00:04.0");
        std::fs::create_dir_all(&e).unwrap();
        std::fs::write(e.join("config"), [0u8; 8]).unwrap();
        let all = enumerate(t.path());
        assert_eq!(all.len(), 2);
        let dev = all[0].1.as_ref().unwrap();
        assert_eq!(dev.address, "0000:00:03.0");
        assert_eq!(
            dev.header.display_name(),
            "Intel Corporation 82540EM Gigabit Ethernet Controller"
        );
        assert_eq!(dev.bars.len(), 2);
        assert_eq!(
            (dev.bars[0].address, dev.bars[0].size),
            (0xfeb8_0000, 0x20000)
        );
        assert_eq!((dev.bars[1].address, dev.bars[1].size), (0xc000, 0x40));
        assert_eq!(all[1].1.as_ref().unwrap_err(), &PciError::ShortDump(8));
        assert!(enumerate(&t.path().join("nope")).is_empty());
    }
}
