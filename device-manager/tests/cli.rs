//! `iddctl` subcommands that need no running manager: `check` (every policy error with
//! file:line:col, exit 1) and `devices` (host functions from a sysfs tree and the policy's
//! emulated devices with their owner IDD and I/O Space), as tables and as JSON.

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

const GOOD: &str = r#"
[[device]]
name = "disk0"
kind = "virtio-blk"
image = "disk0.img"
size = "16MiB"

[[device]]
name = "nic0"
kind = "virtio-net"

[[guest]]
name = "alice"
disk = [{ device = "disk0", length = "8MiB" }]
"#;

/// Three independent problems on known lines: an unknown key (line 5), a bad size unit
/// (line 6), a guest naming an unknown device (line 10).
const BAD: &str = r#"
[[device]]
name = "disk0"
kind = "virtio-blk"
colour = "red"
size = "16 parsecs"
image = "disk0.img"

[[guest]]
name = "alice"
disk = [{ device = "disk9", length = "8MiB" }]
"#;

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[test]
fn check_accepts_a_good_policy() {
    let dir = tempfile::tempdir().unwrap();
    let good = write(dir.path(), "good.toml", GOOD);
    let out = iddctl(&["check", &good]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("OK (2 device(s), 1 guest(s))"), "{text}");
}

#[test]
fn check_reports_every_error_with_its_position() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write(dir.path(), "bad.toml", BAD);
    let out = iddctl(&["check", &bad]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for (line, what) in [(5, "colour"), (6, "16 parsecs"), (11, "disk9")] {
        let prefix = format!("{bad}:{line}:");
        assert!(
            err.lines().any(|l| l.starts_with(&prefix)),
            "no error at line {line} ({what}) in:\n{err}"
        );
    }
    assert!(err.contains("3 error(s)"), "{err}");
    assert!(err.contains("hint:"), "{err}");

    let out = iddctl(&["check", &bad, "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["valid"], false);
    let lines: Vec<u64> = v["diagnostics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["line"].as_u64().unwrap())
        .collect();
    assert_eq!(lines, [5, 6, 11]);
}

#[test]
fn check_of_a_missing_file_fails_cleanly() {
    let out = iddctl(&["check", "/nonexistent/policy.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Cannot read policy file"));
}

/// A fake sysfs with one NIC-like function (one 128 KiB memory BAR, INTx line 10).
fn fake_sysfs(root: &Path) {
    let d = root.join("bus/pci/devices/0000:00:03.0");
    std::fs::create_dir_all(&d).unwrap();
    let mut cfg = vec![0u8; 64];
    cfg[0..2].copy_from_slice(&0x8086u16.to_le_bytes());
    cfg[2..4].copy_from_slice(&0x100eu16.to_le_bytes());
    cfg[0x0a] = 0x00;
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

#[test]
fn devices_lists_host_and_emulated_functions() {
    let dir = tempfile::tempdir().unwrap();
    fake_sysfs(dir.path());
    let good = write(dir.path(), "good.toml", GOOD);
    let sysfs = dir.path().display().to_string();
    let out = iddctl(&["devices", "--sysfs", &sysfs, "--policy", &good, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let list = v.as_array().unwrap();
    assert_eq!(list.len(), 3, "{v}");
    let host = &list[0];
    assert_eq!(host["origin"], "host");
    assert_eq!(host["address"], "0000:00:03.0");
    assert_eq!(host["vendor_id"], 0x8086);
    assert_eq!(host["irq"], 10);
    assert_eq!(host["bars"][0]["size"], 0x20000);
    assert!(host["owner"].is_null());
    let disk = &list[1];
    assert_eq!(disk["origin"], "emulated");
    assert_eq!(disk["name"], "disk0");
    assert_eq!(
        (disk["vendor_id"].as_u64(), disk["device_id"].as_u64()),
        (Some(0x1af4), Some(0x1042))
    );
    assert_eq!(disk["owner"], "idd-disk0");
    assert!(disk["io_space"]["mmio_pages"].as_u64().unwrap() > 0);
    assert!(disk["io_space"]["msix_vectors"].as_u64().unwrap() > 0);
    assert_eq!(list[2]["owner"], "idd-nic0");
    assert_eq!(list[2]["class"], 0x02_00_00);

    let out = iddctl(&["devices", "--sysfs", &sysfs, "--policy", &good]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("ORIGIN"), "{table}");
    assert!(table.contains("8086:100e"), "{table}");
    assert!(table.contains("idd-disk0"), "{table}");
    assert!(table.contains("I/O Space:"), "{table}");
}

#[test]
fn devices_without_a_policy_needs_no_manager() {
    let out = iddctl(&["devices", "--sysfs", "/nonexistent", "--json"]);
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v, Value::Array(vec![]));
}

#[test]
fn a_client_without_a_server_reports_where_it_tried() {
    // Port 9 on loopback: nothing listens there in the test environment.
    let out = iddctl(&["--remote", "http://127.0.0.1:9", "idds"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("http://127.0.0.1:9/v1/idds"));
}
