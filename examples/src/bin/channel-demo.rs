//! `channel-demo`: two sandboxed process domains connect through XenStore like Xen split
//! drivers, exchange verified requests over a grant-referenced ring, and survive a backend
//! crash. See the crate docs; run it with `bash ci/demo.sh`.
//!
//! ```text
//! channel-demo [--requests N] [--window W] [--size BYTES] [--timeout-ms T]
//!              [--crash-after N | --no-crash] [--restart-delay-ms T] [--stay]
//! ```
//!
//! By default the backend is restarted at once and the frontend sees only a short gap in
//! responses. `--restart-delay-ms` stands for a manager's restart back-off: a delay longer than
//! the frontend's timeout makes it notice the outage and reissue what had no response.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use devchan::grant::DomId;
use hypervisor::domain::DomainConfig;
use hypervisor::launch::{ExitReport, LaunchConfig, RunningDomain};
use hypervisor::system::System;
use hypervisor::xenstored::domains::DomainStores;
use hypervisor::xenstored::socket::{self, SocketServer};
use hypervisor::xenstored::Xenstored;
use idd_examples::front::FrontConfig;
use idd_examples::toolstack::{write_device, StateWatcher, Timeline};
use idd_examples::{back, proto};

struct Opts {
    front: FrontConfig,
    crash_after: Option<u64>,
    restart_delay: Duration,
    stay: bool,
}

fn parse() -> Result<Opts> {
    let mut o = Opts {
        front: FrontConfig {
            requests: 100_000,
            window: 32,
            size: 1024,
            timeout: Duration::from_millis(200),
        },
        crash_after: None,
        restart_delay: Duration::ZERO,
        stay: false,
    };
    let mut crash = Some(None);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || -> Result<u64> {
            args.next()
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("{a} needs a number"))
        };
        match a.as_str() {
            "--requests" => o.front.requests = val()?,
            "--window" => o.front.window = usize::try_from(val()?)?,
            "--size" => o.front.size = u16::try_from(val()?)?,
            "--timeout-ms" => o.front.timeout = Duration::from_millis(val()?),
            "--crash-after" => crash = Some(Some(val()?)),
            "--no-crash" => crash = None,
            "--restart-delay-ms" => o.restart_delay = Duration::from_millis(val()?),
            "--stay" => o.stay = true,
            _ => bail!(
                "usage: channel-demo [--requests N] [--window W] [--size BYTES] [--timeout-ms T] \
                 [--crash-after N | --no-crash] [--restart-delay-ms T] [--stay]"
            ),
        }
    }
    if o.front.window == 0
        || o.front.window > 64
        || o.front.size == 0
        || o.front.size > proto::MAX_LEN
    {
        bail!("--window must be 1..=64 and --size 1..={}", proto::MAX_LEN);
    }
    o.crash_after = crash.map(|c| c.unwrap_or(o.front.requests / 2));
    Ok(o)
}

/// A domain process's stdout, line by line, into `tx` as (who, line); ("who", "") at EOF.
fn forward(d: &mut RunningDomain, who: &'static str, tx: Sender<(&'static str, String)>) {
    if let Some(out) = d.child_mut().stdout.take() {
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send((who, line));
            }
            let _ = tx.send((who, String::new()));
        });
    }
}

fn domain_program() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let p = exe.with_file_name("demo-domain");
    if !p.exists() {
        bail!("{} not found (build the idd-examples crate)", p.display());
    }
    Ok(p)
}

fn summary_fields(line: &str) -> HashMap<String, String> {
    line.split_whitespace()
        .skip(1)
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[allow(clippy::too_many_lines)]
fn run(o: &Opts) -> Result<bool> {
    let tl = Timeline::new();
    let dir = tempfile::Builder::new().prefix("idd-demo-").tempdir()?;
    let sock = dir.path().join("xenstored.sock");

    // Domain 0: the hypervisor core, xenstored on its socket and on every domain's ring.
    let sys = System::new();
    let cfg = |name: &str, nr_frames| DomainConfig {
        name: name.into(),
        nr_frames,
        iommu: None,
    };
    let dom0 = sys.create_domain(cfg("dom0", 16))?;
    let xs = Xenstored::new();
    let server = SocketServer::bind(&sock, Arc::clone(&xs))?.spawn()?;
    let stores = DomainStores::start(Arc::clone(&sys), Arc::clone(&xs), dom0)?;
    println!("== domain 0: hypervisor core + xenstored");
    println!("   xenstored socket: {}", sock.display());
    println!(
        "   try: XENSTORED_PATH={} xenstore-ls /local/domain   (with --stay)",
        sock.display()
    );

    // The toolstack: two domains, their stores, the device directories.
    let back_id: DomId = sys.create_domain(cfg("backend", back::NR_FRAMES))?;
    let front_id: DomId = sys.create_domain(cfg("frontend", o.front.nr_frames()))?;
    let back_port = stores.introduce(back_id)?;
    let front_port = stores.introduce(front_id)?;
    println!("== toolstack: domain {back_id} (backend, its store port {back_port}), domain {front_id} (frontend, its store port {front_port}); XenStore ring = frame 6 of each");
    let mut admin = socket::connect(&sock)?;
    write_device(&mut admin, front_id, back_id)?;
    println!(
        "   wrote {} and {}",
        proto::front_dir(front_id),
        proto::back_dir(back_id, front_id)
    );
    let watcher = StateWatcher::start(&sock, front_id, back_id, tl.clone())?;

    let prog = domain_program()?;
    println!("   domain program: {}", prog.display());
    let back_cfg = || {
        let mut c = LaunchConfig::new(
            "backend",
            back::NR_FRAMES,
            &prog,
            &["backend", &front_id.to_string()],
        );
        c.nr_frames = back::NR_FRAMES;
        c
    };
    let f = &o.front;
    let front_args = [
        "frontend".to_string(),
        f.requests.to_string(),
        f.window.to_string(),
        f.size.to_string(),
        f.timeout.as_millis().to_string(),
    ];
    let front_args: Vec<&str> = front_args.iter().map(String::as_str).collect();
    let (tx, rx) = channel();
    let mut backend = stores.spawn_in(back_id, back_cfg())?;
    forward(&mut backend, "backend", tx.clone());
    tl.push(
        "manager",
        format!("backend process {} started", backend.child_mut().id()),
    );
    let mut frontend = stores.spawn_in(
        front_id,
        LaunchConfig::new("frontend", f.nr_frames(), &prog, &front_args),
    )?;
    forward(&mut frontend, "frontend", tx.clone());
    tl.push(
        "manager",
        format!("frontend process {} started", frontend.child_mut().id()),
    );
    println!(
        "== running {} requests of {} B, window {}, through a grant-referenced ring",
        f.requests, f.size, f.window
    );

    let deadline = Instant::now() + Duration::from_secs(120);
    let mut summary = HashMap::new();
    let mut crashed = false;
    let mut crash_info = String::new();
    let mut front_done = false;
    let mut restarts = 0;
    while !front_done {
        if Instant::now() >= deadline {
            bail!("the frontend did not finish in time");
        }
        // Supervision: a backend process that dies on its own (a signal or an error exit; it
        // exits 0 only after the frontend closed) is restarted in its domain, as after the
        // planned crash below.
        if restarts < 3 {
            let report = backend.wait_exit(Some(Duration::ZERO))?;
            if let Some(r) = report.filter(|r| *r != ExitReport::Exited(0)) {
                restarts += 1;
                println!("   [manager] backend process died on its own ({r:?}); restarting it");
                tl.push(
                    "manager",
                    format!("pidfd: backend process {r:?} (unplanned)"),
                );
                let mut new = stores.spawn_in(back_id, back_cfg())?;
                forward(&mut new, "backend'", tx.clone());
                drop(std::mem::replace(&mut backend, new));
            }
        }
        let Ok((who, line)) = rx.recv_timeout(Duration::from_millis(100)) else {
            continue;
        };
        if line.is_empty() {
            front_done |= who == "frontend";
            continue;
        }
        if let Some(rest) = line.strip_prefix("progress ") {
            let done: u64 = rest
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            println!("   [{who}] {done}/{} requests answered", f.requests);
            if o.crash_after.is_some_and(|c| done >= c) && !crashed {
                crashed = true;
                crash_info = crash(
                    &stores,
                    &mut backend,
                    back_id,
                    back_cfg(),
                    o.restart_delay,
                    &tl,
                    &tx,
                )?;
            }
            continue;
        }
        if line.starts_with("summary ") {
            summary = summary_fields(&line);
        }
        println!("   [{who}] {line}");
    }
    let front_exit = frontend.wait_exit(Some(Duration::from_secs(10)))?;
    let back_exit = backend.wait_exit(Some(Duration::from_secs(5)))?;
    tl.push(
        "manager",
        format!("frontend exit {front_exit:?}, backend exit {back_exit:?}"),
    );
    // Let the watcher see the last state changes.
    std::thread::sleep(Duration::from_millis(50));
    watcher.stop();

    let g = |k: &str| summary.get(k).cloned().unwrap_or_else(|| "?".into());
    println!();
    println!("== results");
    println!(
        "   requests          {} (verified {}, failed {})",
        g("requests"),
        g("verified"),
        g("failed")
    );
    println!(
        "   throughput        {} req/s over {} ms",
        g("req_per_s"),
        g("elapsed_ms")
    );
    println!(
        "   round trip        p50 {} us, p99 {} us, max {} us",
        g("p50_us"),
        g("p99_us"),
        g("max_us")
    );
    if crashed {
        println!("   backend crash     {crash_info}");
        println!(
            "   guest-visible gap {} us: the longest wait for any response",
            g("max_gap_us")
        );
        println!(
            "   reissue timeouts  {} ms ({} time(s)); reissued {}, duplicate responses discarded {}",
            g("outage_ms"),
            g("outages"),
            g("reissued"),
            g("duplicates")
        );
    } else {
        println!("   backend crash     none (--no-crash)");
    }
    println!("   XenBus timeline (XenStore watches from domain 0):");
    for e in tl.events() {
        println!("     {:>9.1} ms  {:<9} {}", e.at_ms, e.who, e.what);
    }
    let ok = front_exit == Some(ExitReport::Exited(0))
        && g("failed") == "0"
        && g("verified") == f.requests.to_string();
    println!(
        "== {}",
        if ok {
            "OK: every response verified"
        } else {
            "FAILED"
        }
    );

    if o.stay {
        println!("== --stay: xenstored keeps serving; Ctrl-C (or SIGTERM) ends the demo");
        println!(
            "   XENSTORED_PATH={} xenstore-ls -p /local/domain",
            sock.display()
        );
        wait_for_interrupt();
    }
    drop(admin);
    drop((frontend, backend));
    stores.destroy(front_id)?;
    stores.destroy(back_id)?;
    drop(stores);
    server.stop()?;
    Ok(ok)
}

/// Kill the backend process, hear it through the pidfd, start a new process in the same
/// domain; returns a one-line account.
fn crash(
    stores: &DomainStores,
    backend: &mut RunningDomain,
    back_id: DomId,
    cfg: LaunchConfig,
    delay: Duration,
    tl: &Timeline,
    tx: &Sender<(&'static str, String)>,
) -> Result<String> {
    let pid = backend.child_mut().id();
    let t_kill = tl.now_ms();
    tl.push("manager", format!("SIGKILL backend process {pid}"));
    // SAFETY: kill(2) on our own child's pid, which is not reaped yet (so not reused).
    if unsafe { libc::kill(i32::try_from(pid)?, libc::SIGKILL) } != 0 {
        bail!("kill: {}", std::io::Error::last_os_error());
    }
    let report = backend
        .wait_exit(Some(Duration::from_secs(5)))?
        .context("the backend did not die")?;
    let t_seen = tl.now_ms();
    tl.push("manager", format!("pidfd: backend process {report:?}"));
    println!(
        "   [manager] killed backend process {pid}; pidfd says {report:?}; restarting it in domain {back_id} after {} ms",
        delay.as_millis()
    );
    std::thread::sleep(delay);
    let mut new = stores.spawn_in(back_id, cfg)?;
    let t_new = tl.now_ms();
    tl.push(
        "manager",
        format!(
            "new backend process {} in domain {back_id}",
            new.child_mut().id()
        ),
    );
    forward(&mut new, "backend'", tx.clone());
    let old = std::mem::replace(backend, new);
    drop(old);
    Ok(format!(
        "killed at {t_kill:.1} ms, pidfd reported it {:.2} ms later, new process {:.1} ms after that ({} ms back-off)",
        t_seen - t_kill,
        t_new - t_seen,
        delay.as_millis()
    ))
}

/// Block SIGINT and SIGTERM in this thread (and every thread and process started after it),
/// so that [`wait_for_interrupt`] can take them and the demo cleans up.
fn block_interrupts() -> libc::sigset_t {
    // SAFETY: plain libc signal-set calls on a local, zero-initialised sigset_t.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Wait for SIGINT or SIGTERM (blocked by [`block_interrupts`] at start).
fn wait_for_interrupt() {
    let set = block_interrupts();
    let mut sig = 0;
    // SAFETY: `set` is initialised and `sig` is a valid out pointer.
    unsafe { libc::sigwait(&set, &mut sig) };
}

fn main() -> ExitCode {
    let opts = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("channel-demo: {e:#}");
            return ExitCode::from(2);
        }
    };
    if opts.stay {
        // Before any thread exists, so the signals can only be taken by sigwait.
        block_interrupts();
    }
    match run(&opts) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("channel-demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}
