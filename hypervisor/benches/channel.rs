//! Device-channel benchmark between two sandboxed process domains, with baselines measured in
//! the same run. Not a test: `cargo bench -p hypervisor --bench channel` prints a table and
//! writes `target/bench/channel.json`.
//!
//! Measured:
//! * ring + event channel round trip (one request outstanding): p50 and p99 latency, with
//!   posted (exceptionless) notifies and with synchronous ones;
//! * ring + event channel throughput (32 outstanding, notification hold-off);
//! * grant copy of 64 B, 1500 B and 4 KiB: one copy per hypercall and 32 per hypercall;
//! * page exchange (transfer) per page: the remapping swap with both processes re-mapping the
//!   swapped frames in place, the same swap with neither frame mapped in a process (the
//!   hypercall alone), and the copy fallback (RAM frames). Measured with both domains'
//!   platforms in the bench process, over the real hypercall page, server thread and control
//!   socket; one exchange is the receiver's accept-transfer grant, the sender's transfer
//!   hypercall and the receiver's end-transfer.
//!
//! Baselines, without our layers: a pipe ping-pong between two processes, a shared-memory
//! ping-pong (a memfd word plus two eventfds) between two processes, and an in-process memcpy.
//! Environment: `CHANNEL_BENCH_SCALE` multiplies the iteration counts (default 1).

use devchan::platform::{Frame, Platform, SharedPage, TransferMode};
use hypervisor::domain::DomainConfig;
use hypervisor::hypercall::Server;
use hypervisor::launch::{connect, launch, spawn_in, LaunchConfig, RunningDomain};
use hypervisor::process::ProcessPlatform;
use hypervisor::system::System;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_domain-test");
const FRAMES: u64 = 128;

struct Row {
    what: String,
    ours: f64,
    baseline: f64,
    unit: &'static str,
    baseline_name: &'static str,
}

fn scale() -> u64 {
    std::env::var("CHANNEL_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
        .max(1)
}

fn line_with(out: &mut BufReader<ChildStdout>, prefix: &str) -> Vec<String> {
    let mut line = String::new();
    loop {
        line.clear();
        if out.read_line(&mut line).expect("read domain stdout") == 0 {
            panic!("domain closed stdout before {prefix}");
        }
        if let Some(rest) = line.trim_end().strip_prefix(prefix) {
            return rest.split_whitespace().map(str::to_owned).collect();
        }
    }
}

fn stdout_of(d: &mut RunningDomain) -> BufReader<ChildStdout> {
    BufReader::new(d.child_mut().stdout.take().expect("piped stdout"))
}

fn domain(sys: &Arc<System>, name: &str) -> u16 {
    sys.create_domain(DomainConfig {
        name: name.into(),
        nr_frames: FRAMES,
        iommu: None,
    })
    .expect("create domain")
}

/// Run front/back; (requests, elapsed ns, p50 ns, p99 ns) as the front measured them.
fn channel(n: u64, inflight: u32, len: u32, notify: &str) -> (u64, f64, f64, f64) {
    let sys = System::new();
    let back_dom = domain(&sys, "back");
    let fa = [
        "front".to_owned(),
        back_dom.to_string(),
        n.to_string(),
        inflight.to_string(),
        len.to_string(),
        notify.to_owned(),
    ];
    let fa: Vec<&str> = fa.iter().map(String::as_str).collect();
    let mut front = launch(&sys, LaunchConfig::new("front", FRAMES, BIN, &fa)).expect("front");
    let mut fo = stdout_of(&mut front);
    let ready = line_with(&mut fo, "READY ");
    let ba = [
        "back".to_owned(),
        front.domid().to_string(),
        ready[0].clone(),
        ready[1].clone(),
        n.to_string(),
        notify.to_owned(),
    ];
    let ba: Vec<&str> = ba.iter().map(String::as_str).collect();
    let mut back =
        spawn_in(&sys, back_dom, LaunchConfig::new("back", FRAMES, BIN, &ba)).expect("back");
    let done = line_with(&mut fo, "DONE ");
    let _ = back.wait_exit(Some(Duration::from_secs(60)));
    let _ = front.wait_exit(Some(Duration::from_secs(60)));
    let f = |i: usize| done[i].parse::<f64>().expect("number");
    (n, f(1), f(2), f(3))
}

/// Grant-copy costs: (bytes, ns per copy alone, ns per copy in a batch of 32).
fn grant_copies(iters: u64) -> Vec<(u64, f64, f64)> {
    let sys = System::new();
    let copier = domain(&sys, "copier");
    let mut granter = launch(
        &sys,
        LaunchConfig::new("granter", FRAMES, BIN, &["grant", &copier.to_string()]),
    )
    .expect("granter");
    let mut go = stdout_of(&mut granter);
    let gref = line_with(&mut go, "READY ")[0].clone();
    let args = [
        "copybench".to_owned(),
        granter.domid().to_string(),
        gref,
        iters.to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut c = spawn_in(
        &sys,
        copier,
        LaunchConfig::new("copier", FRAMES, BIN, &args),
    )
    .expect("copier");
    let mut co = stdout_of(&mut c);
    let rows = (0..3)
        .map(|_| {
            let w = line_with(&mut co, "COPY ");
            (
                w[0].parse().unwrap(),
                w[1].parse().unwrap(),
                w[2].parse().unwrap(),
            )
        })
        .collect();
    let _ = c.wait_exit(Some(Duration::from_secs(60)));
    let _ = granter.kill();
    rows
}

/// A platform of a new domain in this process, with its server.
fn attach(sys: &Arc<System>, name: &str) -> (ProcessPlatform, Server) {
    let id = domain(sys, name);
    let (server, fds) = connect(sys, id).expect("connect");
    (
        ProcessPlatform::from_fds(id, FRAMES, fds).expect("platform"),
        server,
    )
}

/// `iters` exchanges of the sender's `src` into the receiver's `dst`; ns per exchange.
fn exchanges(
    a: &ProcessPlatform,
    b: &ProcessPlatform,
    src: Frame,
    dst: Frame,
    iters: u64,
    want: TransferMode,
) -> f64 {
    let t = Instant::now();
    for _ in 0..iters {
        let gref = b.accept_transfer(a.domid(), dst).expect("accept");
        let mode = a.transfer(src, b.domid(), gref).expect("transfer");
        assert_eq!(mode, want);
        assert_eq!(b.end_transfer(gref).expect("end"), Some(dst));
    }
    t.elapsed().as_nanos() as f64 / iters as f64
}

/// Page exchange costs, ns per page: (remap with both frames mapped in the processes, remap
/// with neither mapped, copy fallback between RAM frames).
fn page_exchange(iters: u64) -> (f64, f64, f64) {
    let sys = System::new();
    let (a, _sa) = attach(&sys, "sender");
    let (b, _sb) = attach(&sys, "receiver");
    let (pa, pb) = (
        a.alloc_shared_page().expect("page"),
        b.alloc_shared_page().expect("page"),
    );
    let (fa, fb) = (pa.frame(), pb.frame());
    let mapped = exchanges(&a, &b, fa, fb, iters, TransferMode::Remapped);
    // SAFETY: byte 0 of a mapped page; volatile because it is shared.
    let _ = unsafe { pb.as_ptr().read_volatile() };
    drop((pa, pb));
    let unmapped = exchanges(&a, &b, fa, fb, iters, TransferMode::Remapped);
    let copied = exchanges(&a, &b, 9, 10, iters, TransferMode::Copied);
    (mapped, unmapped, copied)
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn percentile(v: &mut [u64], p: usize) -> f64 {
    v.sort_unstable();
    v.get(v.len().saturating_sub(1) * p / 100)
        .copied()
        .unwrap_or(0) as f64
}

/// Pipe ping-pong with a child that echoes 8-byte messages: (p50, p99, msgs/s with 32 in flight).
fn pipe_baseline(n: u64) -> (f64, f64, f64) {
    let mut child = Command::new(BIN)
        .arg("pipe-echo")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("pipe-echo");
    let mut tx = child.stdin.take().unwrap();
    let mut rx = child.stdout.take().unwrap();
    let mut lat = Vec::new();
    let mut b = [0u8; 8];
    for i in 0..n {
        let t = Instant::now();
        tx.write_all(&i.to_ne_bytes()).unwrap();
        rx.read_exact(&mut b).unwrap();
        lat.push(nanos(t.elapsed()));
    }
    let window = [7u8; 8 * 32];
    let mut back = [0u8; 8 * 32];
    let t = Instant::now();
    for _ in 0..n / 32 {
        tx.write_all(&window).unwrap();
        rx.read_exact(&mut back).unwrap();
    }
    let rate = (n / 32 * 32) as f64 / t.elapsed().as_secs_f64();
    drop(tx);
    let _ = child.wait();
    (percentile(&mut lat, 50), percentile(&mut lat, 99), rate)
}

fn efd() -> OwnedFd {
    rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap()
}

/// Shared-memory ping-pong (a memfd word, eventfd each way): (p50, p99, round trips/s).
fn shm_baseline(n: u64) -> (f64, f64, f64) {
    use std::sync::atomic::{AtomicU64, Ordering};
    let mem = rustix::fs::memfd_create("shm-bench", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&mem, 4096).unwrap();
    let (ping, pong) = (efd(), efd());
    let moves = [
        (mem.as_raw_fd(), 3),
        (ping.as_raw_fd(), 4),
        (pong.as_raw_fd(), 5),
    ];
    // Move the sources out of the way of the target numbers first.
    let high: Vec<OwnedFd> = moves
        .iter()
        .map(|(fd, _)| {
            // SAFETY: fd is one of the descriptors owned above, alive for this call.
            let b = unsafe { std::os::fd::BorrowedFd::borrow_raw(*fd) };
            rustix::io::fcntl_dupfd_cloexec(b, 64).unwrap()
        })
        .collect();
    let pairs: Vec<(i32, i32)> = high.iter().map(AsRawFd::as_raw_fd).zip([3, 4, 5]).collect();
    let mut cmd = Command::new(BIN);
    cmd.arg("shm-echo");
    // SAFETY: only dup2 (async-signal-safe) runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            for &(s, d) in &pairs {
                if libc::dup2(s, d) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("shm-echo");
    // SAFETY: a fresh shared mapping of the one-page memfd, kept for the rest of the run.
    let ptr = unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            4096,
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            rustix::mm::MapFlags::SHARED,
            &mem,
            0,
        )
        .unwrap()
    };
    // SAFETY: the mapping is page-aligned and stays mapped; both processes use the two words
    // only atomically.
    let (req, rsp) = unsafe { (&*ptr.cast::<AtomicU64>(), &*ptr.cast::<AtomicU64>().add(1)) };
    let mut b = [0u8; 8];
    let mut lat = Vec::new();
    let t0 = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        req.store(i, Ordering::Release);
        rustix::io::write(&ping, &1u64.to_ne_bytes()).unwrap();
        rustix::io::read(&pong, &mut b).unwrap();
        assert_eq!(rsp.load(Ordering::Acquire), i);
        lat.push(nanos(t.elapsed()));
    }
    let rate = n as f64 / t0.elapsed().as_secs_f64();
    req.store(u64::MAX, Ordering::Release);
    rustix::io::write(&ping, &1u64.to_ne_bytes()).unwrap();
    let _ = child.wait();
    (percentile(&mut lat, 50), percentile(&mut lat, 99), rate)
}

/// In-process memcpy of `len` bytes, ns per copy.
fn memcpy_baseline(len: usize, iters: u64) -> f64 {
    let src = vec![0x5au8; 4096];
    let mut dst = vec![0u8; 4096];
    let t = Instant::now();
    for _ in 0..iters {
        dst[..len].copy_from_slice(std::hint::black_box(&src[..len]));
        std::hint::black_box(&mut dst);
    }
    t.elapsed().as_nanos() as f64 / iters as f64
}

/// Median of the values.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn row(what: &str, ours: f64, baseline: f64, unit: &'static str, name: &'static str) -> Row {
    Row {
        what: what.into(),
        ours,
        baseline,
        unit,
        baseline_name: name,
    }
}

fn main() {
    let s = scale();
    // The machine is shared: measure in interleaved rounds (ours and the baselines side by
    // side in each round) and report the median round, so load swings hit both alike.
    const ROUNDS: usize = 5;
    let mut m: [Vec<f64>; 11] = Default::default();
    for _ in 0..ROUNDS {
        let (pp50, pp99, prate) = pipe_baseline(4_000 * s);
        let (sp50, sp99, srate) = shm_baseline(4_000 * s);
        let (_, _, p50, p99) = channel(4_000 * s, 1, 64, "posted");
        let (_, _, y50, y99) = channel(4_000 * s, 1, 64, "sync");
        let (n, ns, _, _) = channel(40_000 * s, 32, 64, "posted");
        let rate = n as f64 / (ns / 1e9);
        for (k, v) in [
            p50, p99, sp50, sp99, pp50, pp99, rate, prate, srate, y50, y99,
        ]
        .into_iter()
        .enumerate()
        {
            m[k].push(v);
        }
    }
    let [p50, p99, sp50, sp99, pp50, pp99, rate, prate, srate, y50, y99] = m.map(median);
    let mut rows = vec![
        row(
            "round trip p50, synchronous notify",
            y50 / 1e3,
            sp50 / 1e3,
            "us",
            "shm+eventfd",
        ),
        row(
            "round trip p99, synchronous notify",
            y99 / 1e3,
            sp99 / 1e3,
            "us",
            "shm+eventfd",
        ),
        row(
            "round trip p50 (ring+evtchn)",
            p50 / 1e3,
            sp50 / 1e3,
            "us",
            "shm+eventfd",
        ),
        row(
            "round trip p99 (ring+evtchn)",
            p99 / 1e3,
            sp99 / 1e3,
            "us",
            "shm+eventfd",
        ),
        row(
            "round trip p50 (ring+evtchn)",
            p50 / 1e3,
            pp50 / 1e3,
            "us",
            "pipe",
        ),
        row(
            "round trip p99 (ring+evtchn)",
            p99 / 1e3,
            pp99 / 1e3,
            "us",
            "pipe",
        ),
        row(
            "throughput, 32 in flight",
            rate / 1e3,
            prate / 1e3,
            "k req/s",
            "pipe, 32 in flight",
        ),
        row(
            "throughput, 32 in flight",
            rate / 1e3,
            srate / 1e3,
            "k req/s",
            "shm+eventfd, 1 in flight",
        ),
    ];
    for (len, single, batched) in grant_copies(20_000 * s) {
        let base = memcpy_baseline(usize::try_from(len).unwrap_or(4096), 1_000_000);
        rows.push(row(
            &format!("grant copy {len} B, 1 per call"),
            single / 1e3,
            base / 1e3,
            "us",
            "memcpy",
        ));
        rows.push(row(
            &format!("grant copy {len} B, 32 per call"),
            batched / 1e3,
            base / 1e3,
            "us",
            "memcpy",
        ));
    }

    let mut ex: [Vec<f64>; 4] = Default::default();
    for _ in 0..ROUNDS {
        let (mapped, unmapped, copied) = page_exchange(2_000 * s);
        let base = memcpy_baseline(4096, 200_000);
        for (k, v) in [mapped, unmapped, copied, base].into_iter().enumerate() {
            ex[k].push(v);
        }
    }
    let [mapped, unmapped, copied, base] = ex.map(median);
    for (what, ours) in [
        ("page exchange, remap + re-map", mapped),
        ("page exchange, remap, unmapped", unmapped),
        ("page exchange, copy fallback", copied),
    ] {
        rows.push(row(what, ours / 1e3, base / 1e3, "us/page", "memcpy 4 KiB"));
    }

    println!("{ROUNDS} interleaved rounds, medians; grant copies: one run");
    println!(
        "{:<34} {:>12} {:>12} {:>9}  {:<10} baseline",
        "measure", "ours", "baseline", "ratio", "unit"
    );
    for r in &rows {
        println!(
            "{:<34} {:>12.3} {:>12.3} {:>9.2}  {:<10} {}",
            r.what,
            r.ours,
            r.baseline,
            r.ours / r.baseline,
            r.unit,
            r.baseline_name
        );
    }
    let json = serde_json::json!({
        "bench": "channel",
        "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
        "scale": s,
        "rows": rows.iter().map(|r| serde_json::json!({
            "measure": r.what, "ours": r.ours, "baseline": r.baseline,
            "baseline_name": r.baseline_name, "unit": r.unit, "ratio": r.ours / r.baseline,
        })).collect::<Vec<_>>(),
    });
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = manifest.parent().unwrap_or(manifest).join("target/bench");
    std::fs::create_dir_all(&dir).expect("create target/bench");
    let path = dir.join("channel.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).expect("write json");
    println!("wrote {}", path.display());
}
