//! Our backends on real Xen: the emulated Xen testbed (`ci/xen-testbed.sh`) with
//! `BACKEND=ours` and this crate's `xen-blkback` and `xen-netback` in dom0.
//!
//! The guest's xen-blkfront writes and reads back a checksummed pattern through `xen-blkback`,
//! its xen-netfront pings dom0 and downloads through `xen-netback` (and through Xen's kernel
//! netback on a second vif, for the ratios), then dom0 kills both backends 20 times while the
//! guest runs verified direct I/O and a ping; the run passes only if every restart
//! re-attached with both ends still Connected, no guest I/O failed and the ping kept getting
//! replies (see `docs/xen-testbed.md`). It boots Xen under QEMU TCG (minutes, root for the host
//! packages), so it runs only when asked:
//!
//! ```text
//! XEN_TESTBED=1 cargo test -p xen-platform --test xen_testbed_ours -- --nocapture
//! ```

use std::path::Path;
use std::process::Command;

#[test]
fn guest_disk_and_network_through_our_backends_survive_their_restarts() {
    if std::env::var("XEN_TESTBED").as_deref() != Ok("1") {
        eprintln!("SKIP: set XEN_TESTBED=1 to boot the emulated Xen host");
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ci/xen-testbed.sh");
    let out = Command::new("bash")
        .arg(&script)
        .env("BACKEND", "ours")
        .env(
            "IDD_BINARIES",
            format!(
                "{} {}",
                env!("CARGO_BIN_EXE_xen-blkback"),
                env!("CARGO_BIN_EXE_xen-netback")
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
    assert!(stdout.contains("xen-testbed: PASS (BACKEND=ours"));
}
