//! `iddctl demo` end to end (the README's first command, short form): both IDDs come up, each
//! is crashed and recovers, web keeps answering probes, db keeps verifying, the plot is
//! written.

mod common;

use std::process::Command;

#[test]
fn the_demo_runs_and_reports() {
    // The demo finds the IDD and guest programs next to iddctl.
    for (pkg, bin) in [
        ("idd-blk", "idd-blk"),
        ("idd-net", "idd-net"),
        ("guest-frontends", "net-guest"),
    ] {
        common::program(pkg, bin);
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_iddctl"))
        .args([
            "demo",
            "--no-wait",
            "--crashes",
            "2",
            "--listen",
            "127.0.0.1:0",
            "--dir",
        ])
        .arg(dir.path())
        .output()
        .expect("running iddctl demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for idd in ["idd-net0", "idd-disk0"] {
        let rows = stdout
            .lines()
            .filter(|l| {
                let mut w = l.split_whitespace();
                w.next() == Some(idd) && w.next().is_some_and(|n| n.parse::<u32>().is_ok())
            })
            .count();
        assert_eq!(rows, 2, "{idd}: two recoveries in the table\n{stdout}");
    }
    assert!(stdout.contains("every read so far matched"), "{stdout}");
    assert!(dir.path().join("net-recovery.svg").exists());
    assert!(dir.path().join("probe.json").exists());
}
