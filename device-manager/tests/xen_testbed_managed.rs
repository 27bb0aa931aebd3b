//! The device manager as toolstack and supervisor on real Xen: the emulated Xen testbed
//! (`ci/xen-testbed.sh`) with `BACKEND=managed`, where dom0 runs `iddctl xen serve` with a
//! policy naming the domU, and the manager writes the vbd/vif nodes, starts `xen-blkback` and
//! `xen-netback`, and restarts them through 20 kills while the guest verifies its I/O (see
//! `docs/xen.md`). It boots Xen under QEMU TCG (minutes), so it runs only when asked, with
//! the backends built beside this `iddctl`:
//!
//! ```text
//! cargo build -p xen-platform --bin xen-blkback --bin xen-netback
//! XEN_TESTBED=1 cargo test -p device-manager --test xen_testbed_managed -- --nocapture
//! ```

use std::path::Path;
use std::process::Command;

#[test]
fn the_manager_serves_and_restarts_the_guests_backends() {
    if std::env::var("XEN_TESTBED").as_deref() != Ok("1") {
        eprintln!("SKIP: set XEN_TESTBED=1 to boot the emulated Xen host");
        return;
    }
    let iddctl = Path::new(env!("CARGO_BIN_EXE_iddctl"));
    let dir = iddctl.parent().unwrap();
    let backends = ["xen-blkback", "xen-netback"].map(|b| dir.join(b));
    if let Some(b) = backends.iter().find(|b| !b.is_file()) {
        eprintln!(
            "SKIP: {} not built (cargo build -p xen-platform --bin xen-blkback --bin xen-netback)",
            b.display()
        );
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ci/xen-testbed.sh");
    let out = Command::new("bash")
        .arg(&script)
        .env("BACKEND", "managed")
        .env(
            "IDD_BINARIES",
            format!(
                "{} {} {}",
                iddctl.display(),
                backends[0].display(),
                backends[1].display()
            ),
        )
        .output()
        .expect("spawn ci/xen-testbed.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    for line in stdout.lines().filter(|l| !l.starts_with("  | ")) {
        eprintln!("{line}");
    }
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    if stdout.lines().any(|l| l.starts_with("SKIPPED:")) {
        return;
    }
    assert!(
        out.status.success(),
        "ci/xen-testbed.sh failed: {}",
        out.status
    );
    // The manager's own lines made it to the console: it wrote the nodes, restarted the
    // backends, and printed its summary when stopped.
    assert!(
        stdout.contains("TESTBED INFO manager: domain domu is "),
        "no manager lines"
    );
    assert!(stdout.contains("TESTBED PASS ours-restarts "));
    assert!(stdout.contains("TESTBED INFO manager: summary domu/xvda starts="));
}
