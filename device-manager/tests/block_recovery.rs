//! The block path end to end under a supervised, repeatedly crashed IDD.
//!
//! Two sandboxed process guests (Rust blkfront) run a mixed, checksummed read/write workload
//! on their own regions of one emulated virtio-blk-pci disk, served by the sandboxed IDD
//! process (blkback → virtio-blk driver over the I/O Space → device → image). The IDD is
//! crashed (SIGABRT) 50 times meanwhile; the manager restarts it in the same domain each time
//! and it re-attaches from its journal. Afterwards: every acknowledged write reads back (in
//! the guests, and in the image file, by digest), each guest's write just past its region was
//! refused by the backend and the other guest's data is untouched, and the recovery time of
//! every crash is reported with p50/p99/max.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use device_manager::fault::Fault;
use device_manager::manager::{Manager, ManagerConfig};
use device_manager::recovery::{Cause, Percentiles};
use device_manager::{fnv64, BLOCK};
use hypervisor::launch::ExitReport;
use policy::Policy;

const BLOCKS: u64 = 256;
const REGION_BYTES: usize = BLOCK * 256;

fn policy(dir: &Path, heartbeat: &str) -> Policy {
    let text = format!(
        r#"
[restart]
max_restarts = 1000
window = "600s"
heartbeat = "{heartbeat}"

[[device]]
name = "disk0"
kind = "virtio-blk"
image = "{}"
size = "16MiB"

[[guest]]
name = "alice"
[[guest.disk]]
device = "disk0"
length = "8MiB"

[[guest]]
name = "bob"
[[guest.disk]]
device = "disk0"
offset = "8MiB"
length = "8MiB"
"#,
        dir.join("disk0.img").display()
    );
    Policy::parse(&text, "test.toml").unwrap_or_else(|e| panic!("{}", e.render()))
}

fn manager(dir: &Path, heartbeat: &str) -> Manager {
    let cfg = ManagerConfig {
        idd_program: common::idd_program(),
        guest_program: env!("CARGO_BIN_EXE_blk-guest").into(),
        net_idd_program: "idd-net".into(), // no NIC in this policy
        heartbeat: None,
        verbose: false,
    };
    Manager::start(&policy(dir, heartbeat), cfg).unwrap()
}

fn field<'a>(summary: &'a str, key: &str) -> &'a str {
    summary
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key} in {summary:?}"))
}

/// Run both guests for `secs`, applying `fault` every `every` until `faults` were injected.
fn run(m: &mut Manager, secs: &str, faults: usize, fault: &Fault, every: Duration) -> Vec<String> {
    for (name, seed) in [("alice", "1"), ("bob", "2")] {
        let blocks = BLOCKS.to_string();
        m.start_guest(
            name,
            &[
                "workload",
                "--secs",
                secs,
                "--blocks",
                &blocks,
                "--seed",
                seed,
                "--probe-oob",
            ],
        )
        .unwrap();
    }
    m.connect(Duration::from_secs(30)).unwrap();
    let mut injected = 0;
    let mut next = Instant::now() + every;
    let deadline = Instant::now() + Duration::from_secs(120);
    while m.guest_running("alice").unwrap() || m.guest_running("bob").unwrap() {
        assert!(Instant::now() < deadline, "guests did not finish");
        if injected < faults && Instant::now() >= next && m.recoveries().len() == injected {
            m.inject(fault).unwrap();
            injected += 1;
            next = Instant::now() + every;
        }
        m.supervise(Duration::from_millis(5)).unwrap();
    }
    assert_eq!(
        injected, faults,
        "the guests finished before every fault was injected"
    );
    let mut summaries = Vec::new();
    for name in ["alice", "bob"] {
        let (exit, lines) = m.wait_guest(name, Duration::from_secs(10)).unwrap();
        let summary = lines
            .iter()
            .rev()
            .find(|l| l.starts_with("summary "))
            .cloned()
            .unwrap_or_else(|| panic!("{name} printed no summary: {lines:?}"));
        eprintln!("{name}: {exit:?} {summary}");
        assert_eq!(exit, ExitReport::Exited(0), "{name}");
        summaries.push(summary);
    }
    summaries
}

/// Both guests verified everything, the backend refused their out-of-region writes, and the
/// image holds exactly what each guest's model says (so neither touched the other).
fn check_data(m: &Manager, summaries: &[String]) {
    let (image, _) = m.image().unwrap();
    let f = File::open(image).unwrap();
    for (g, s) in m.disks().iter().zip(summaries) {
        assert_eq!(field(s, "mismatches"), "0", "{}: {s}", g.name);
        assert_eq!(field(s, "verified"), BLOCKS.to_string(), "{}: {s}", g.name);
        assert_eq!(
            field(s, "oob"),
            "error",
            "{}: the write past its region was not refused",
            g.name
        );
        assert!(
            field(s, "writes").parse::<u64>().unwrap() > 100,
            "{}: too little work: {s}",
            g.name
        );
        let mut region = vec![0u8; REGION_BYTES];
        f.read_exact_at(&mut region, g.region.offset * 512).unwrap();
        assert_eq!(
            format!("{:016x}", fnv64(&region)),
            field(s, "digest"),
            "{}: the image differs from the acknowledged writes",
            g.name
        );
    }
    // Alice's out-of-region write aimed at Bob's first block: covered by Bob's digest above.
    assert_eq!(
        m.disks()[0].region.offset + m.disks()[0].region.sectors,
        m.disks()[1].region.offset
    );
}

#[test]
fn two_guests_survive_fifty_idd_crashes_without_losing_an_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = manager(dir.path(), "2s");
    let t = Instant::now();
    let summaries = run(&mut m, "10", 50, &Fault::Crash, Duration::from_millis(120));
    check_data(&m, &summaries);
    let rs = m.recoveries();
    assert_eq!(rs.len(), 50);
    for r in rs {
        eprintln!("{r}");
        assert!(
            matches!(&r.cause, Cause::Exited(how) if how.contains("Signaled(6)")),
            "{r}"
        );
    }
    let outage = Percentiles::of(&rs.iter().map(|r| r.outage()).collect::<Vec<_>>()).unwrap();
    let detect = Percentiles::of(&rs.iter().map(|r| r.detect).collect::<Vec<_>>()).unwrap();
    let reattach = Percentiles::of(&rs.iter().map(|r| r.reattach).collect::<Vec<_>>()).unwrap();
    eprintln!("recovery outage: {outage}");
    eprintln!("  detect: {detect}; re-attach: {reattach}");
    eprintln!("test took {:.1} s", t.elapsed().as_secs_f64());
    // Nothing is left pinned for a device that is idle now except the driver's own queue.
    assert!(
        m.iommu_entries() <= 2 + 32,
        "{} IOMMU entries left",
        m.iommu_entries()
    );
}

#[test]
fn a_hung_idd_misses_its_heartbeat_and_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = manager(dir.path(), "300ms");
    let summaries = run(&mut m, "3", 3, &Fault::Hang, Duration::from_millis(500));
    check_data(&m, &summaries);
    let rs = m.recoveries();
    assert_eq!(rs.len(), 3);
    for r in rs {
        eprintln!("{r}");
        assert!(
            matches!(r.cause, Cause::Hung(d) if d >= Duration::from_millis(300)),
            "{r}"
        );
        // The last heartbeat came up to one period (50 ms, more on a loaded machine) before
        // the SIGSTOP: the deadline passes 300 ms after it.
        assert!(
            r.detect >= Duration::from_millis(150),
            "detected long before the deadline: {r}"
        );
    }
}

#[test]
fn a_corrupted_ring_is_refused_and_its_guest_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = manager(dir.path(), "2s");
    let fault = Fault::Corrupt {
        guest: "alice".into(),
    };
    let summaries = run(&mut m, "3", 1, &fault, Duration::from_millis(800));
    check_data(&m, &summaries);
    let rs = m.recoveries();
    assert_eq!(rs.len(), 1, "{rs:?}");
    eprintln!("{}", rs[0]);
    assert!(
        matches!(&rs[0].cause, Cause::Exited(s) if s.contains("ring refused")),
        "{}",
        rs[0]
    );
    // Alice reconnected once (a new ring); Bob only saw a process restart.
    assert_eq!(field(&summaries[0], "reconnects"), "1", "{}", summaries[0]);
    assert_eq!(field(&summaries[1], "reconnects"), "0", "{}", summaries[1]);
}

#[test]
fn replacing_the_idd_domain_makes_the_frontends_reconnect_without_loss() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = manager(dir.path(), "2s");
    for (name, seed) in [("alice", "1"), ("bob", "2")] {
        m.start_guest(
            name,
            &[
                "workload",
                "--secs",
                "3",
                "--blocks",
                "256",
                "--seed",
                seed,
                "--probe-oob",
            ],
        )
        .unwrap();
    }
    m.connect(Duration::from_secs(30)).unwrap();
    let old = m.idd().unwrap();
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(1000) {
        m.supervise(Duration::from_millis(10)).unwrap();
    }
    m.replace_idd_domain(Duration::from_secs(30)).unwrap();
    assert_ne!(m.idd().unwrap(), old);
    let deadline = Instant::now() + Duration::from_secs(60);
    while m.guest_running("alice").unwrap() || m.guest_running("bob").unwrap() {
        assert!(Instant::now() < deadline, "guests did not finish");
        m.supervise(Duration::from_millis(10)).unwrap();
    }
    let mut summaries = Vec::new();
    for name in ["alice", "bob"] {
        let (exit, lines) = m.wait_guest(name, Duration::from_secs(10)).unwrap();
        let s = lines
            .iter()
            .rev()
            .find(|l| l.starts_with("summary "))
            .cloned()
            .unwrap_or_default();
        eprintln!("{name}: {exit:?} {s}");
        assert_eq!(exit, ExitReport::Exited(0), "{name}: {lines:?}");
        assert_eq!(field(&s, "reconnects"), "1", "{name}: {s}");
        summaries.push(s);
    }
    check_data(&m, &summaries);
}
