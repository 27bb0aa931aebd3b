//! `iddctl`: run a policy under the device manager, and inject faults.
//!
//! ```text
//! iddctl run POLICY.toml [--secs S] [--faults N] [--fault crash|hang|corrupt:GUEST] [--interval-ms T]
//! iddctl crash POLICY.toml        # = run --faults 1 --fault crash
//! iddctl hang POLICY.toml         # = run --faults 1 --fault hang
//! iddctl corrupt POLICY.toml GUEST
//! iddctl nbd POLICY.toml GUEST SOCKET   # export GUEST's disk to one NBD client
//! ```
//!
//! Everything runs in this process (domain 0); the remote management API is issue 5. `run`
//! starts every guest of the policy with the verified workload (`blk-guest workload`), injects
//! `--faults` faults `--interval-ms` apart while they run, supervises the IDD, and prints each
//! recovery, each guest's summary, and the outage percentiles. Exit status 0 only if every
//! guest verified every block.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use device_manager::fault::Fault;
use device_manager::manager::{Manager, ManagerConfig};
use device_manager::recovery::Percentiles;
use hypervisor::launch::ExitReport;
use policy::Policy;

#[derive(Parser)]
#[command(about = "Device manager control: run a policy, inject faults into its IDD")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct RunArgs {
    /// The policy file.
    policy: PathBuf,
    /// Length of the guests' mixed workload.
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
    /// Faults to inject while it runs.
    #[arg(long, default_value_t = 0)]
    faults: u32,
    /// Which fault.
    #[arg(long, default_value = "crash")]
    fault: Fault,
    /// Time between faults.
    #[arg(long, default_value_t = 200)]
    interval_ms: u64,
    /// Heartbeat deadline in ms (default: the policy's).
    #[arg(long)]
    heartbeat_ms: Option<u64>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the policy's guests with a verified workload, injecting faults.
    Run(RunArgs),
    /// Crash (abort) the IDD once while the guests run.
    Crash {
        /// The policy file.
        policy: PathBuf,
    },
    /// Hang (SIGSTOP) the IDD once while the guests run.
    Hang {
        /// The policy file.
        policy: PathBuf,
    },
    /// Export GUEST's disk over NBD on SOCKET (one client session), supervised.
    Nbd {
        /// The policy file.
        policy: PathBuf,
        /// The guest.
        guest: String,
        /// The Unix socket path.
        socket: PathBuf,
    },
    /// Corrupt GUEST's ring once while the guests run.
    Corrupt {
        /// The policy file.
        policy: PathBuf,
        /// The guest.
        guest: String,
    },
}

fn once(policy: PathBuf, fault: Fault) -> RunArgs {
    RunArgs {
        policy,
        secs: 3.0,
        faults: 1,
        fault,
        interval_ms: 1000,
        heartbeat_ms: Some(300),
    }
}

fn run(a: &RunArgs) -> Result<bool> {
    let policy = Policy::load(&a.policy).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut cfg = ManagerConfig::beside_current_exe()?;
    cfg.heartbeat = a.heartbeat_ms.map(Duration::from_millis);
    cfg.verbose = true;
    let mut m = Manager::start(&policy, cfg)?;
    println!(
        "== domain 0 up; xenstored at {}",
        m.xenstored_socket().display()
    );
    let (img, sectors) = m.image()?;
    println!(
        "== device: virtio-blk-pci, image {} ({sectors} sectors); IDD domain {}",
        img.display(),
        m.idd()?
    );
    let names: Vec<String> = m.disks().iter().map(|g| g.name.clone()).collect();
    for (i, n) in names.iter().enumerate() {
        let g = &m.disks()[i];
        println!(
            "   guest {n}: domain {}, region sectors {}+{}",
            g.domid, g.region.offset, g.region.sectors
        );
        let secs = a.secs.to_string();
        let seed = (i + 1).to_string();
        m.start_guest(
            n,
            &[
                "workload",
                "--secs",
                &secs,
                "--blocks",
                "256",
                "--seed",
                &seed,
                "--probe-oob",
            ],
        )?;
    }
    m.connect(Duration::from_secs(20))?;
    println!("== IDD serving {} guest disk(s)", names.len());
    let mut injected = 0;
    let mut next = Instant::now() + Duration::from_millis(a.interval_ms);
    let end = Instant::now() + Duration::from_secs_f64(a.secs) + Duration::from_secs(60);
    loop {
        let mut running = false;
        for n in &names {
            running |= m.guest_running(n)?;
        }
        if !running {
            break;
        }
        if Instant::now() > end {
            bail!("the guests did not finish");
        }
        if injected < a.faults && Instant::now() >= next {
            m.inject(&a.fault)?;
            injected += 1;
            println!("   [iddctl] injected {} #{injected}", a.fault);
            next = Instant::now() + Duration::from_millis(a.interval_ms);
        }
        m.supervise(Duration::from_millis(10))?;
    }
    let mut ok = true;
    for n in &names {
        let (exit, lines) = m.wait_guest(n, Duration::from_secs(10))?;
        let summary = lines
            .iter()
            .rev()
            .find(|l| l.starts_with("summary "))
            .cloned()
            .unwrap_or_default();
        println!("   guest {n}: {exit:?} {summary}");
        ok &= exit == ExitReport::Exited(0) && summary.contains(" mismatches=0 ");
    }
    if !m.failed_channels().is_empty() {
        println!(
            "   channels the IDD refused (corrupted rings): {:?}",
            m.failed_channels()
        );
    }
    let outages: Vec<Duration> = m.recoveries().iter().map(|r| r.outage()).collect();
    match Percentiles::of(&outages) {
        Some(p) => println!("== recoveries: {p}"),
        None => println!("== no recoveries"),
    }
    println!(
        "== {}",
        if ok {
            "OK: every acknowledged write read back"
        } else {
            "FAILED"
        }
    );
    Ok(ok)
}

fn nbd(policy: &PathBuf, guest: &str, socket: &std::path::Path) -> Result<bool> {
    let policy = Policy::load(policy).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut cfg = ManagerConfig::beside_current_exe()?;
    cfg.verbose = true;
    let mut m = Manager::start(&policy, cfg)?;
    let sock = socket.to_string_lossy().into_owned();
    m.start_guest(guest, &["nbd", "--socket", &sock])?;
    println!("== waiting for an NBD client on {sock} (e.g. qemu-io -f raw nbd+unix:///disk?socket={sock})");
    m.connect(Duration::from_secs(600))?;
    while m.guest_running(guest)? {
        m.supervise(Duration::from_millis(20))?;
    }
    let (exit, lines) = m.wait_guest(guest, Duration::from_secs(5))?;
    println!("   guest {guest}: {exit:?} {}", lines.join(" | "));
    Ok(exit == ExitReport::Exited(0))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Cmd::Nbd {
        policy,
        guest,
        socket,
    } = &cli.cmd
    {
        return match nbd(policy, guest, socket) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("iddctl: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let args = match cli.cmd {
        Cmd::Nbd { .. } => unreachable!("handled above"),
        Cmd::Run(a) => a,
        Cmd::Crash { policy } => once(policy, Fault::Crash),
        Cmd::Hang { policy } => once(policy, Fault::Hang),
        Cmd::Corrupt { policy, guest } => once(policy, Fault::Corrupt { guest }),
    };
    match run(&args).context("iddctl") {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
