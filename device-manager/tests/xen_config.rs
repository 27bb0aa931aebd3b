//! `iddctl xen config`: a PCI function's I/O Space as a driver domain's xl settings, from a
//! fake sysfs tree (exact output), from a policy (a passed-through device by name, an
//! emulated one as comments), and from this machine's real `/sys/bus/pci`.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn iddctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_iddctl"))
        .args(args)
        .env_remove("IDDCTL_REMOTE")
        .output()
        .expect("running iddctl")
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// An e1000-like function: 128 KiB of MMIO at 0xfeb80000, 64 ports at 0xc000, INTx 11.
fn fake_sysfs(root: &Path) {
    let d = root.join("bus/pci/devices/0000:00:03.0");
    std::fs::create_dir_all(&d).unwrap();
    let mut cfg = vec![0u8; 64];
    cfg[0..2].copy_from_slice(&0x8086u16.to_le_bytes());
    cfg[2..4].copy_from_slice(&0x100eu16.to_le_bytes());
    cfg[0x0b] = 0x02;
    cfg[0x10..0x14].copy_from_slice(&0xfeb8_0000u32.to_le_bytes());
    cfg[0x14..0x18].copy_from_slice(&0xc001u32.to_le_bytes());
    cfg[0x3c] = 11;
    cfg[0x3d] = 1;
    std::fs::write(d.join("config"), cfg).unwrap();
    std::fs::write(
        d.join("resource"),
        "0x00000000feb80000 0x00000000feb9ffff 0x0000000000040200\n\
         0x000000000000c000 0x000000000000c03f 0x0000000000040101\n",
    )
    .unwrap();
}

const POLICY: &str = r#"
[[device]]
name = "hostnic"
kind = "virtio-net"
pci = "0000:00:03.0"

[[device]]
name = "disk0"
kind = "virtio-blk"
image = "disk0.img"
size = "16MiB"
"#;

#[test]
fn a_host_function_by_address_and_by_policy_name() {
    let t = tempfile::tempdir().unwrap();
    fake_sysfs(t.path());
    let sysfs = t.path().display().to_string();
    let o = iddctl(&["xen", "config", "0000:00:03.0", "--sysfs", &sysfs]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(
        text(&o),
        "# 0000:00:03.0: 0 MSI-X vector(s), set up by Xen when the driver enables them\n\
         pci = [\"0000:00:03.0\"]\n\
         iomem = [\"feb80,20\"]\n\
         ioports = [\"c000-c03f\"]\n\
         irqs = [11]\n"
    );
    let policy = t.path().join("p.toml");
    std::fs::write(&policy, POLICY).unwrap();
    let p = policy.display().to_string();
    let o = iddctl(&[
        "xen", "config", "hostnic", "--policy", &p, "--sysfs", &sysfs, "--json",
    ]);
    assert!(o.status.success(), "{o:?}");
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0]["config"]["name"], "hostnic");
    assert_eq!(v[0]["xl"]["iomem"][0], "feb80,20");
    assert_eq!(v[0]["xl"]["pci"][0], "0000:00:03.0");
    assert_eq!(v[0]["xl"]["irqs"][0], 11);
    // --all: the host function (named after the policy device), then the emulated disk,
    // whose settings are comments (nothing to assign on Xen).
    let o = iddctl(&["xen", "config", "--all", "--policy", &p, "--sysfs", &sysfs]);
    assert!(o.status.success(), "{o:?}");
    let out = text(&o);
    assert!(out.starts_with("# 0000:00:03.0 (hostnic):"), "{out}");
    let emu = out.split("\n\n").nth(1).unwrap();
    assert!(emu.contains("(disk0)"), "{out}");
    assert!(emu.lines().all(|l| l.starts_with('#')), "{out}");
    assert!(emu.contains("# iomem = [\""), "{out}");
}

#[test]
fn unknown_devices_fail_clearly() {
    let t = tempfile::tempdir().unwrap();
    fake_sysfs(t.path());
    let sysfs = t.path().display().to_string();
    let o = iddctl(&["xen", "config", "0000:00:09.0", "--sysfs", &sysfs]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no PCI function 0000:00:09.0"));
    let o = iddctl(&["xen", "config", "../../etc", "--sysfs", &sysfs]);
    assert!(!o.status.success());
    let o = iddctl(&["xen", "config"]);
    assert!(!o.status.success(), "DEVICE or --all is required");
}

/// Every function of this machine: each listed, each entry in xl's syntax and consistent
/// with the BARs `iddctl devices` reports for it.
#[test]
fn this_machines_pci_functions() {
    let devs = Path::new("/sys/bus/pci/devices");
    let Ok(rd) = std::fs::read_dir(devs) else {
        eprintln!("SKIP: no /sys/bus/pci/devices here");
        return;
    };
    let n = rd.count();
    let o = iddctl(&["xen", "config", "--all", "--json"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let list = v.as_array().unwrap();
    let d = iddctl(&["devices", "--json"]);
    let devices: Value = serde_json::from_slice(&d.stdout).unwrap();
    // Every function is described, or the exit status says one could not be read.
    assert!(
        list.len() <= n && (o.status.success() == (list.len() == n)),
        "{o:?}"
    );
    for e in list {
        let addr = e["config"]["address"].as_str().unwrap();
        let dev = devices
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["address"] == addr)
            .unwrap();
        let bars = dev["bars"].as_array().unwrap();
        // Pages of the memory BARs, rounded out to whole 4 KiB pages, and ports of the I/O BARs.
        let mut pages = std::collections::BTreeSet::new();
        let mut ports = 0u64;
        for b in bars {
            let (a, s) = (b["address"].as_u64().unwrap(), b["size"].as_u64().unwrap());
            if b["kind"] == "io" {
                ports += s;
            } else if s > 0 {
                pages.extend(a / 4096..=(a + s - 1) / 4096);
            }
        }
        let mut xl_pages = 0u64;
        for m in e["xl"]["iomem"].as_array().unwrap() {
            let (pfn, nr) = m.as_str().unwrap().split_once(',').unwrap();
            let (pfn, nr) = (
                u64::from_str_radix(pfn, 16).unwrap(),
                u64::from_str_radix(nr, 16).unwrap(),
            );
            assert!(
                nr > 0 && (pfn..pfn + nr).all(|p| pages.contains(&p)),
                "{addr}: {m}"
            );
            xl_pages += nr;
        }
        assert_eq!(xl_pages, pages.len() as u64, "{addr}");
        let mut xl_ports = 0u64;
        for r in e["xl"]["ioports"].as_array().unwrap() {
            let (a, b) = r.as_str().unwrap().split_once('-').unwrap();
            let (a, b) = (
                u64::from_str_radix(a, 16).unwrap(),
                u64::from_str_radix(b, 16).unwrap(),
            );
            assert!(a <= b, "{addr}: {r}");
            xl_ports += b - a + 1;
        }
        assert_eq!(xl_ports, ports.min(0x1_0000), "{addr}");
        assert_eq!(e["xl"]["pci"][0], addr);
        assert_eq!(
            e["xl"]["irqs"].as_array().unwrap().first(),
            dev["irq"].as_u64().map(Value::from).as_ref()
        );
    }
    eprintln!("{} of {n} functions described", list.len());
}
