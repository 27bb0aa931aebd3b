//! The `netprobe` program: probe against an echo host, flood → count between two processes,
//! plot from a saved report, errors.

mod common;

use common::{peer_ep, probe_ep, EchoPeer};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

fn netprobe() -> Command {
    Command::new(env!("CARGO_BIN_EXE_netprobe"))
}

#[test]
fn probe_prints_a_summary_and_writes_report_and_plot() {
    let peer = EchoPeer::spawn(Some(40), Duration::from_millis(300));
    let dir = tempfile::tempdir().unwrap();
    let (json, svg) = (dir.path().join("r.json"), dir.path().join("r.svg"));
    let out = netprobe()
        .args(["probe", "--wire", &format!("udp:127.0.0.1:0,{}", peer.addr)])
        .args([
            "--src-mac",
            &probe_ep().mac.to_string(),
            "--src-ip",
            &probe_ep().ip.to_string(),
        ])
        .args([
            "--dst-ip",
            &peer_ep().ip.to_string(),
            "--udp",
            "--count",
            "200",
            "--threshold",
            "20",
        ])
        .arg("--out")
        .arg(&json)
        .arg("--svg")
        .arg(&svg)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dropped = peer.dropped.load(std::sync::atomic::Ordering::Relaxed);
    assert!(stdout.contains(&format!(" lost={dropped} ")), "{stdout}");
    assert!(
        stdout.lines().any(|l| l.starts_with("outage 1 at=")),
        "{stdout}"
    );
    assert!(stdout.contains("outages n=1 "), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["lost"], dropped);
    assert_eq!(report["run"]["mode"], "udp:7");
    roxmltree::Document::parse(&std::fs::read_to_string(&svg).unwrap()).unwrap();

    // The same plot again from the saved report.
    let again = dir.path().join("again.svg");
    let st = netprobe()
        .arg("plot")
        .arg(&json)
        .arg(&again)
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(std::fs::read(&again).unwrap(), std::fs::read(&svg).unwrap());
}

#[test]
fn flood_to_count_between_processes() {
    let mut counter = netprobe()
        .args([
            "count",
            "--wire",
            "udp:127.0.0.1:0",
            "--frames",
            "500",
            "--idle-ms",
            "5000",
            "--secs",
            "60",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(counter.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("count: listening on udp ")
        .expect(&line)
        .to_owned();
    let out = netprobe()
        .args(["flood", "--wire", &format!("udp:127.0.0.1:0,{addr}")])
        .args([
            "--src-ip",
            "192.0.2.1",
            "--dst-mac",
            "02:00:00:00:00:02",
            "--dst-ip",
            "192.0.2.2",
        ])
        .args([
            "--size", "1500", "--secs", "60", "--count", "500", "--rate", "5000",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.starts_with("flood: frames=500 bytes=750000 send_errors=0 "),
        "{stdout}"
    );
    let out = counter.wait_with_output().unwrap();
    assert!(out.status.success());
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["frames"], 500);
    assert_eq!(r["bytes"], 750_000);
    assert_eq!(r["tag_missing"], 0);
}

#[test]
fn bad_arguments_fail_with_a_message() {
    let out = netprobe()
        .args([
            "flood",
            "--wire",
            "udp:127.0.0.1:0,127.0.0.1:9",
            "--src-ip",
            "192.0.2.1",
            "--dst-mac",
            "02:00:00:00:00:02",
            "--dst-ip",
            "192.0.2.2",
            "--size",
            "20",
            "--secs",
            "1",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Frame size 20"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = netprobe()
        .args(["plot", "/nonexistent/r.json", "/tmp/x.svg"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
    let out = netprobe()
        .args([
            "probe",
            "--wire",
            "udp:127.0.0.1:0,127.0.0.1:9",
            "--src-ip",
            "192.0.2.1",
            "--dst-ip",
            "192.0.2.2",
            "--dst-mac",
            "nope",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn sigusr1_marks_and_sigint_ends_an_unbounded_probe() {
    let peer = EchoPeer::spawn(None, Duration::ZERO);
    let child = netprobe()
        .args(["probe", "--wire", &format!("udp:127.0.0.1:0,{}", peer.addr)])
        .args([
            "--src-ip",
            &probe_ep().ip.to_string(),
            "--dst-ip",
            &peer_ep().ip.to_string(),
        ])
        .args([
            "--dst-mac",
            &peer_ep().mac.to_string(),
            "--json",
            "--linger-ms",
            "200",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    let signal = |sig: &str| {
        assert!(Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success());
    };
    // Replies flow once the probe runs (its handlers are installed before it starts).
    let wait_for = |n: u64| {
        while peer.answered.load(std::sync::atomic::Ordering::Relaxed) < n {
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    wait_for(10);
    signal("-USR1");
    let after_mark = peer.answered.load(std::sync::atomic::Ordering::Relaxed) + 10;
    wait_for(after_mark);
    signal("-INT");
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["marks"][0]["label"], "signal 1");
    assert_eq!(r["per_mark"].as_array().unwrap().len(), 1);
    assert!(r["sent"].as_u64().unwrap() >= 20);
    assert_eq!(r["lost"], 0);
}
