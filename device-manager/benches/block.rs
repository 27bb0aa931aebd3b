//! Block path benchmark: the full path (guest blkfront → blkif ring → blkback → virtio-blk
//! driver → I/O Space → emulated virtio-blk-pci → IOMMU DMA → image file) next to the same
//! workload on the image file directly (baseline, same run), and the recovery outage over at
//! least 100 IDD crashes.
//!
//! Workloads: 4 KiB random read and random write (IOPS), 1 MiB sequential read and write
//! (MB/s), each for `BENCH_SECS` (default 3) seconds over a 32 MiB region, 16 operations in
//! flight in the guest. The baseline does the same accesses with `pread`/`pwrite` on the image
//! file from one thread, one at a time, through the page cache (what the emulated device's
//! workers do per request). Prints a table; writes `target/bench/block.json`.
//!
//! Run: `cargo bench -p device-manager --bench block` (`ci/bench.sh`).

#[path = "../tests/common/mod.rs"]
mod common;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use device_manager::fault::Fault;
use device_manager::manager::{Manager, ManagerConfig};
use device_manager::recovery::Percentiles;
use policy::Policy;

const REGION: u64 = 32 << 20;
const CRASHES: usize = 100;

fn policy(dir: &Path) -> Policy {
    let text = format!(
        r#"
[restart]
max_restarts = 100000
window = "600s"
heartbeat = "2s"

[[device]]
name = "disk0"
kind = "virtio-blk"
image = "{}"
size = "64MiB"

[[guest]]
name = "alice"
[[guest.disk]]
device = "disk0"
length = "32MiB"

[[guest]]
name = "bob"
[[guest.disk]]
device = "disk0"
offset = "32MiB"
length = "32MiB"
"#,
        dir.join("disk0.img").display()
    );
    Policy::parse(&text, "bench.toml").unwrap_or_else(|e| panic!("{}", e.render()))
}

fn config() -> ManagerConfig {
    ManagerConfig {
        idd_program: common::idd_program(),
        guest_program: env!("CARGO_BIN_EXE_blk-guest").into(),
        net_idd_program: "idd-net".into(), // no NIC in this policy
        heartbeat: None,
        verbose: std::env::var_os("DM_DEBUG").is_some(),
    }
}

struct Row {
    name: &'static str,
    bs: usize,
    full_ops_s: f64,
    base_ops_s: f64,
}

/// (ops, bytes, secs) from a `result` line.
fn parse_result(lines: &[String]) -> (f64, f64, f64) {
    let l = lines
        .iter()
        .find(|l| l.starts_with("result "))
        .unwrap_or_else(|| panic!("no result: {lines:?}"));
    let get = |k: &str| -> f64 {
        l.split_whitespace()
            .find_map(|kv| kv.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {l}"))
    };
    (get("ops"), get("bytes"), get("secs"))
}

fn full_path(dir: &Path, pattern: &str, bs: usize, secs: f64) -> f64 {
    eprintln!("full path: {pattern} {bs}");
    let mut m = Manager::start(&policy(dir), config()).unwrap();
    let (bs_s, secs_s, span) = (bs.to_string(), secs.to_string(), REGION.to_string());
    m.start_guest(
        "alice",
        &[
            "bench",
            "--pattern",
            pattern,
            "--bs",
            &bs_s,
            "--depth",
            "16",
            "--secs",
            &secs_s,
            "--span",
            &span,
        ],
    )
    .unwrap();
    m.connect(Duration::from_secs(30)).unwrap();
    while m.guest_running("alice").unwrap() {
        m.supervise(Duration::from_millis(20)).unwrap();
    }
    let (exit, lines) = m.wait_guest("alice", Duration::from_secs(10)).unwrap();
    assert_eq!(exit, hypervisor::launch::ExitReport::Exited(0), "{lines:?}");
    let (ops, _, s) = parse_result(&lines);
    ops / s
}

fn baseline(image: &Path, pattern: &str, bs: usize, secs: f64) -> f64 {
    let f: File = OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .unwrap();
    let slots = REGION / bs as u64;
    let (random, write) = (pattern.starts_with("rand"), pattern.ends_with("write"));
    let mut buf = vec![0xa5u8; bs];
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let (mut next, mut ops) = (0u64, 0u64);
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < secs {
        let slot = if random {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % slots
        } else {
            next = (next + 1) % slots;
            next
        };
        if write {
            f.write_all_at(&buf, slot * bs as u64).unwrap();
        } else {
            f.read_exact_at(&mut buf, slot * bs as u64).unwrap();
        }
        ops += 1;
    }
    ops as f64 / start.elapsed().as_secs_f64()
}

fn crashes(dir: &Path) -> (Vec<Duration>, Vec<String>) {
    let mut m = Manager::start(&policy(dir), config()).unwrap();
    for (g, seed) in [("alice", "1"), ("bob", "2")] {
        m.start_guest(
            g,
            &[
                "workload", "--secs", "20", "--blocks", "1024", "--seed", seed, "--depth", "8",
            ],
        )
        .unwrap();
    }
    m.connect(Duration::from_secs(30)).unwrap();
    let mut injected = 0;
    let mut next = Instant::now() + Duration::from_millis(50);
    while m.guest_running("alice").unwrap() || m.guest_running("bob").unwrap() {
        if injected < CRASHES && Instant::now() >= next && m.recoveries().len() == injected {
            m.inject(&Fault::Crash).unwrap();
            injected += 1;
            next = Instant::now() + Duration::from_millis(50);
        }
        m.supervise(Duration::from_millis(2)).unwrap();
    }
    let mut summaries = Vec::new();
    for g in ["alice", "bob"] {
        let (exit, lines) = m.wait_guest(g, Duration::from_secs(10)).unwrap();
        let s = lines
            .iter()
            .rev()
            .find(|l| l.starts_with("summary "))
            .cloned()
            .unwrap_or_default();
        assert_eq!(
            exit,
            hypervisor::launch::ExitReport::Exited(0),
            "{g}: {lines:?}"
        );
        assert!(s.contains(" mismatches=0 "), "{g}: {s}");
        summaries.push(s);
    }
    (
        m.recoveries().iter().map(|r| r.outage()).collect(),
        summaries,
    )
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    )
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to filter here.
    let secs: f64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3.0);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk0.img");
    let mut rows = Vec::new();
    for (name, pattern, bs) in [
        ("4k-randread", "randread", 4096),
        ("4k-randwrite", "randwrite", 4096),
        ("1m-seqread", "seqread", 1 << 20),
        ("1m-seqwrite", "seqwrite", 1 << 20),
    ] {
        let full = full_path(dir.path(), pattern, bs, secs);
        let base = baseline(&image, pattern, bs, secs);
        rows.push(Row {
            name,
            bs,
            full_ops_s: full,
            base_ops_s: base,
        });
    }
    let (outages, summaries) = crashes(dir.path());
    let p = Percentiles::of(&outages).expect("no recoveries");
    println!();
    println!("block path: guest blkfront -> blkback -> virtio-blk driver -> emulated virtio-blk-pci -> image");
    println!(
        "{:<14} {:>14} {:>14} {:>8}",
        "workload", "full path", "image file", "ratio"
    );
    let mut json_rows = Vec::new();
    for r in &rows {
        let (unit, f, b) = if r.bs == 4096 {
            ("IOPS", r.full_ops_s, r.base_ops_s)
        } else {
            let mbs = |ops: f64| ops * r.bs as f64 / 1e6;
            ("MB/s", mbs(r.full_ops_s), mbs(r.base_ops_s))
        };
        println!(
            "{:<14} {:>9.0} {unit} {:>9.0} {unit} {:>7.1}%",
            r.name,
            f,
            b,
            100.0 * f / b
        );
        json_rows.push(serde_json::json!({
            "workload": r.name, "unit": unit, "full_path": f, "image_file": b,
        }));
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "recovery outage over {} crashes (fault to first response): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        p.count,
        ms(p.p50),
        ms(p.p99),
        ms(p.max)
    );
    for s in &summaries {
        println!("  {s}");
    }
    let json = serde_json::json!({
        "workloads": json_rows,
        "seconds_per_workload": secs,
        "depth": 16,
        "recovery": {
            "crashes": p.count, "p50_ms": ms(p.p50), "p99_ms": ms(p.p99), "max_ms": ms(p.max),
        },
    });
    let out = target_dir().join("bench");
    std::fs::create_dir_all(&out).unwrap();
    let path = out.join("block.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    println!("wrote {}", path.display());
}
