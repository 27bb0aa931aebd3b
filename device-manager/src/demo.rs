//! `iddctl demo`: the whole system on the embedded process-domain hypervisor, no root, no
//! KVM.
//!
//! 1. Writes an example policy ([`POLICY`]: a NIC `net0` on a UDP wire, a disk `disk0` on an
//!    image, guest `web` with the NIC, guest `db` with half the disk) into a fresh directory,
//!    and starts the manager with it behind the management API on loopback.
//! 2. Traffic and I/O: `db` runs the verified block workload (every read checked against
//!    what it wrote); `web` answers pings, and the demo probes it from the wire's far side at
//!    200 per second (`netprobe`).
//! 3. Crashes each IDD `crashes` times through the API's fault injection, one second apart,
//!    and follows the recoveries on the event stream.
//! 4. Prints a recovery table (every phase of every recovery), the probes' view (replies
//!    lost, outage per crash), writes the inter-arrival plot, and leaves the API up until
//!    Ctrl-C with a hint of what to try.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use netprobe::frame::{Endpoint, Mac};
use netprobe::probe::{Probe, ProbeConfig, ProbeReport};
use netprobe::wire::UdpTransport;
use policy::Policy;

use crate::api::auth::Tokens;
use crate::api::{self, AppState, Listener};
use crate::fault::Fault;
use crate::manager::ManagerConfig;
use crate::service::{
    Command, EventKind, IddState, RecoveryView, Service, ServiceConfig, Snapshot,
};

/// The demo's policy; `{dir}` is the demo's directory.
pub const POLICY: &str = r#"# The demo: one NIC IDD, one disk IDD, two process guests.
[restart]
max_restarts = 100
window = "60s"
heartbeat = "500ms"

[[device]]
name = "net0"
kind = "virtio-net"
wire = "udp"
bind = "127.0.0.1:0"      # any free port; the wire's far side is the demo's prober
link = "1Gbit/s"

[[device]]
name = "disk0"
kind = "virtio-blk"
image = "{dir}/disk0.img"  # created at this size
size = "64MiB"

[[guest]]
name = "web"
[[guest.net]]
device = "net0"
mac = "02:00:00:00:00:01"
ips = ["10.0.0.1/32"]      # web may send only as 10.0.0.1 from its own MAC
share = "100Mbit/s"

[[guest]]
name = "db"
[[guest.disk]]
device = "disk0"
length = "32MiB"           # the first half of the disk; its whole disk as db sees it
"#;

/// The prober on the wire's far side.
const PROBER: Endpoint = Endpoint {
    mac: Mac([0x02, 0, 0, 0, 0, 0xfe]),
    ip: Ipv4Addr::new(10, 0, 0, 254),
};
const WEB_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

/// What the demo does.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Crashes per IDD.
    pub crashes: u32,
    /// Where the API listens (loopback).
    pub listen: SocketAddr,
    /// Where the policy, image, plot and report go (`None`: a new directory under
    /// `target/demo` or the system's temporary directory).
    pub dir: Option<PathBuf>,
    /// Return after the report instead of waiting for Ctrl-C.
    pub no_wait: bool,
}

/// What the demo measured.
#[derive(Debug)]
pub struct DemoReport {
    /// Every recovery seen on the event stream, with its IDD.
    pub recoveries: Vec<(String, RecoveryView)>,
    /// The probes' view.
    pub probe: ProbeReport,
    /// The plot.
    pub plot: PathBuf,
}

fn demo_dir(opt: Option<&Path>) -> Result<PathBuf> {
    if let Some(d) = opt {
        std::fs::create_dir_all(d)?;
        return Ok(d.to_owned());
    }
    let base = std::env::current_dir()
        .map(|d| d.join("target/demo"))
        .unwrap_or_else(|_| std::env::temp_dir().join("idd-demo"));
    std::fs::create_dir_all(&base)?;
    Ok(tempfile::Builder::new()
        .prefix("run-")
        .tempdir_in(&base)?
        .keep())
}

/// Wait until `f` holds for the snapshot, or `timeout`.
fn wait_snapshot(svc: &Service, timeout: Duration, f: impl Fn(&Snapshot) -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !f(&svc.snapshot()) {
        if Instant::now() > deadline {
            bail!(
                "timed out waiting for the system: {:?}",
                svc.snapshot().idds
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Run the demo (see the module docs).
pub fn run(opts: &DemoOptions, mcfg: ManagerConfig) -> Result<DemoReport> {
    let dir = demo_dir(opts.dir.as_deref())?;
    let text = POLICY.replace("{dir}", &dir.display().to_string());
    let policy_path = dir.join("demo.toml");
    std::fs::write(&policy_path, &text)?;
    let policy = Policy::parse(&text, &policy_path.display().to_string())
        .map_err(|e| anyhow::anyhow!("{}", e.render()))?;
    println!(
        "== policy {} (one NIC IDD, one disk IDD, two guests)",
        policy_path.display()
    );

    let svc = Service::start(
        policy,
        &policy_path.display().to_string(),
        text,
        ServiceConfig::new(mcfg),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let state = AppState {
        svc: svc.clone(),
        sysfs: PathBuf::from("/sys"),
    };
    let router = api::router(state, Arc::new(Tokens::none()), 256 * 1024);
    let listener = Listener {
        addr: opts.listen,
        tls: None,
    };
    let server = rt.block_on(api::spawn(router, &listener))?;
    let url = server.url();
    println!("== management API on {url}");

    wait_snapshot(&svc, Duration::from_secs(60), |s| {
        s.idds.iter().all(|i| i.state != IddState::Starting)
    })?;
    for i in &svc.snapshot().idds {
        if i.state != IddState::Running {
            bail!(
                "{} is {:?}: {}",
                i.name,
                i.state,
                i.reason.as_deref().unwrap_or("")
            );
        }
        println!(
            "   {} running: domain {}, pid {}",
            i.name,
            i.domid.unwrap_or(0),
            i.pid.unwrap_or(0)
        );
    }
    let wire: SocketAddr = svc
        .snapshot()
        .devices
        .iter()
        .find(|d| d.name == "net0")
        .and_then(|d| d.wire.clone())
        .context("net0 has no UDP wire address")?
        .parse()?;
    println!("   net0's wire: UDP {wire}; the prober sends from the other end");

    // Probes from the wire's far side, at 200/s, for the whole run.
    let far = Arc::new(UdpTransport::bind("127.0.0.1:0".parse()?, Some(wire))?);
    let mut cfg = ProbeConfig::new(PROBER, WEB_IP);
    cfg.target_mac = Some(Mac([0x02, 0, 0, 0, 0, 0x01]));
    cfg.linger = Duration::from_millis(500);
    let probe = Probe::new(cfg, far)?;
    let handle = probe.handle();
    let stop = Arc::new(AtomicBool::new(false));
    let mut events = svc.subscribe();
    let (report, recoveries) = std::thread::scope(|s| -> Result<_> {
        let stop2 = stop.clone();
        let prober = s.spawn(move || probe.run(&stop2));
        let t0 = Instant::now();
        while handle.received() < 20 {
            if t0.elapsed() > Duration::from_secs(10) {
                stop.store(true, Ordering::Relaxed);
                bail!("web does not answer the probes");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        println!("== web answers pings; db runs its verified workload");
        let mut recoveries = Vec::new();
        let idds = ["idd-net0", "idd-disk0"];
        for round in 1..=opts.crashes {
            for idd in idds {
                std::thread::sleep(Duration::from_millis(500));
                let at = Instant::now();
                rt.block_on(svc.command(Command::Inject {
                    idd: idd.to_owned(),
                    fault: Fault::Crash,
                }))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
                handle.mark_at(format!("{idd} #{round}"), at);
                // Follow the event stream to this recovery.
                let deadline = Instant::now() + Duration::from_secs(20);
                loop {
                    match events.try_recv() {
                        Ok(ev) => {
                            if let EventKind::Recovery { idd: who, recovery } = ev.kind {
                                println!(
                                    "   crash {round} of {who}: back after {:.1} ms",
                                    recovery.outage_us as f64 / 1e3
                                );
                                let done = who == idd;
                                recoveries.push((who, recovery));
                                if done {
                                    break;
                                }
                            }
                        }
                        Err(tokio::sync::broadcast::error::TryRecvError::Empty) => {
                            if Instant::now() > deadline {
                                bail!("no recovery of {idd} within 20 s");
                            }
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err(e) => bail!("event stream: {e}"),
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        let report = prober
            .join()
            .map_err(|_| anyhow::anyhow!("prober panicked"))??;
        Ok((report, recoveries))
    })?;

    let plot = dir.join("net-recovery.svg");
    netprobe::plot::write_svg(&report, &plot)?;
    std::fs::write(
        dir.join("probe.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    print_table(&recoveries, &report);
    println!(
        "\nplot of web's reply inter-arrival times (spikes = net0's restarts): {}",
        plot.display()
    );
    let db_ok = svc
        .snapshot()
        .guests
        .iter()
        .find(|g| g.name == "db")
        .is_some_and(|g| g.running);
    println!(
        "db's workload {} (it stops at the first wrong byte)",
        if db_ok {
            "is still running: every read so far matched"
        } else {
            "ENDED"
        }
    );

    if !opts.no_wait {
        println!(
            "\nThe system stays up until Ctrl-C. Try, in another terminal:\n  \
             iddctl --remote {url} status\n  \
             iddctl --remote {url} channels\n  \
             iddctl --remote {url} watch                 # follow events live\n  \
             iddctl --remote {url} inject idd-net0 crash --wait\n  \
             curl {url}/metrics\n  \
             curl {url}/openapi.json"
        );
        rt.block_on(async {
            let _ = tokio::signal::ctrl_c().await;
        });
        println!("stopping");
    }
    rt.block_on(server.shutdown());
    svc.shutdown();
    Ok(DemoReport {
        recoveries,
        probe: report,
        plot,
    })
}

fn print_table(recoveries: &[(String, RecoveryView)], probe: &ProbeReport) {
    println!(
        "\n{:<10} {:>3} {:>9} {:>9} {:>9} {:>10} {:>10} {:>10}",
        "IDD", "#", "detect", "revoke", "spawn", "re-attach", "first rsp", "outage ms"
    );
    let ms = |us: u64| us as f64 / 1e3;
    let mut n: std::collections::BTreeMap<&str, u32> = Default::default();
    for (idd, r) in recoveries {
        let k = n.entry(idd.as_str()).or_insert(0);
        *k += 1;
        println!(
            "{:<10} {:>3} {:>9.2} {:>9.2} {:>9.2} {:>10.2} {:>10.2} {:>10.2}",
            idd,
            k,
            ms(r.detect_us),
            ms(r.revoke_us),
            ms(r.spawn_us),
            ms(r.reattach_us),
            ms(r.first_response_us),
            ms(r.outage_us)
        );
    }
    let crash_outages: Vec<f64> = probe
        .per_mark
        .iter()
        .filter(|m| m.label.starts_with("idd-net0"))
        .map(|m| m.outage_ms)
        .collect();
    println!(
        "\nprobes to web: {} sent, {} answered, {} lost; reply gaps after net0's crashes (ms): {}",
        probe.sent,
        probe.received,
        probe.lost,
        crash_outages
            .iter()
            .map(|o| format!("{o:.0}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
}
