//! `iddctl`: the device manager's command line.
//!
//! ```text
//! # The demo: a NIC IDD and a disk IDD, two guests, crashes, a recovery table, the API
//! iddctl demo [--crashes N] [--listen ADDR] [--dir DIR] [--no-wait]
//!
//! # Local, no API needed
//! iddctl check POLICY.toml [--json]           # every policy error with file:line:col; exit 1 if any
//! iddctl devices [--policy P] [--sysfs DIR] [--json]   # PCI functions, host and emulated
//! iddctl run POLICY.toml [--secs S] [--faults N] [--fault crash|hang|corrupt:GUEST] [--interval-ms T]
//! iddctl crash|hang POLICY.toml / iddctl corrupt POLICY.toml GUEST
//! iddctl nbd POLICY.toml GUEST SOCKET         # export GUEST's disk to one NBD client
//!
//! # On a real Xen host (device_manager::xen::cli)
//! iddctl xen serve --policy P [--bin-dir D] [--run-dir D]   # toolstack + backend supervisor
//! iddctl xen config DEVICE|--all [--policy P] [--sysfs DIR] [--json]   # a driver domain's xl settings
//!
//! # The manager with its API, until Ctrl-C
//! iddctl serve POLICY.toml [--listen ADDR] [--remote-listen ADDR --tls-cert F --tls-key F]
//!              [--tokens FILE] [--admin-token T] [--read-token T] [--body-limit BYTES]
//!              [--guest-secs S] [--heartbeat-ms MS]
//!
//! # Clients of a running `serve` (default http://127.0.0.1:7480; --remote URL --token T [--ca PEM])
//! iddctl status | idds | guests | channels | metrics | openapi
//! iddctl devices --remote URL
//! iddctl inject IDD crash|hang|corrupt:GUEST [--wait]   # --wait: follow until the recovery
//! iddctl restart IDD [--wait]
//! iddctl promote DEVICE
//! iddctl watch [--count N] [--until TYPE] [--since N]   # follow /v1/events
//! iddctl policy show | validate FILE | apply FILE
//! ```
//!
//! Every client subcommand prints a human table by default and the API's JSON with `--json`;
//! an API error prints `iddctl: STATUS CODE: message` (and for a policy, every diagnostic) and
//! exits 1. `--remote`, `--token` and `--ca` may also come from `IDDCTL_REMOTE`,
//! `IDDCTL_TOKEN` and `IDDCTL_CA`.
//!
//! `run` (issue 3's verified workload under injected faults) runs everything in this process;
//! exit status 0 only if every guest verified every block.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use device_manager::api::auth::{Role, Token, Tokens};
use device_manager::api::client::{self, Client, ClientError};
use device_manager::api::{self, AppState, Listener, TlsFiles};
use device_manager::devices;
use device_manager::fault::Fault;
use device_manager::manager::{Manager, ManagerConfig};
use device_manager::recovery::Percentiles;
use device_manager::service::{Service, ServiceConfig};
use hypervisor::launch::ExitReport;
use policy::Policy;
use serde_json::{json, Value};

#[derive(Parser)]
#[command(about = "Device manager control: policies, devices, IDDs, faults, the management API")]
struct Cli {
    #[command(flatten)]
    remote: Remote,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Where the API is, and how to talk to it.
#[derive(Args, Clone)]
struct Remote {
    /// The API's URL.
    #[arg(
        long,
        global = true,
        env = "IDDCTL_REMOTE",
        default_value = "http://127.0.0.1:7480"
    )]
    remote: String,
    /// Bearer token.
    #[arg(long, global = true, env = "IDDCTL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// PEM file of CA certificates to trust (a self-signed server's certificate).
    #[arg(long, global = true, env = "IDDCTL_CA")]
    ca: Option<PathBuf>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
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

#[derive(clap::Args, Clone)]
struct ServeArgs {
    /// The policy file.
    policy: PathBuf,
    /// Plain HTTP listener (loopback unless TLS and tokens are configured).
    #[arg(long, default_value = api::DEFAULT_LISTEN)]
    listen: std::net::SocketAddr,
    /// A TLS listener (needs --tls-cert, --tls-key and tokens).
    #[arg(long)]
    remote_listen: Option<std::net::SocketAddr>,
    /// PEM certificate chain for the TLS listener.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for the TLS listener.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Token file (TOML, see the API docs); with tokens every request needs one.
    #[arg(long)]
    tokens: Option<PathBuf>,
    /// An admin token (besides the file's).
    #[arg(long, env = "IDDCTL_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// A read-only token (besides the file's).
    #[arg(long, env = "IDDCTL_READ_TOKEN", hide_env_values = true)]
    read_token: Option<String>,
    /// Largest request body, bytes.
    #[arg(long, default_value_t = api::DEFAULT_BODY_LIMIT)]
    body_limit: usize,
    /// How long the guests' verified workload runs.
    #[arg(long, default_value_t = 86_400)]
    guest_secs: u64,
    /// Heartbeat deadline in ms (default: the policy's).
    #[arg(long)]
    heartbeat_ms: Option<u64>,
    /// sysfs root for host PCI enumeration.
    #[arg(long, default_value = "/sys")]
    sysfs: PathBuf,
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Print the running policy.
    Show,
    /// Validate FILE against the running system (errors with positions, changes it would make).
    Validate {
        /// The policy file.
        file: PathBuf,
    },
    /// Apply FILE to the running system.
    Apply {
        /// The policy file.
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum Cmd {
    /// The demo (no root, no KVM): one NIC IDD and one disk IDD with two guests, traffic and
    /// verified I/O, each IDD crashed a few times, a recovery table and a plot, then the API
    /// stays up until Ctrl-C.
    Demo {
        /// Crashes per IDD.
        #[arg(long, default_value_t = 3)]
        crashes: u32,
        /// Where the API listens (loopback; the client commands' default).
        #[arg(long, default_value = "127.0.0.1:7480")]
        listen: std::net::SocketAddr,
        /// Directory for the policy, image, plot and probe report (default: a new one under
        /// ./target/demo).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Exit after the report instead of keeping the API up.
        #[arg(long)]
        no_wait: bool,
    },
    /// Check a policy file: every error with file:line:col and a hint; exit 1 if any.
    Check {
        /// The policy file.
        file: PathBuf,
    },
    /// List PCI functions (host from sysfs, emulated from --policy), or the server's with --remote.
    Devices {
        /// Also describe this policy's emulated devices (local listing).
        #[arg(long)]
        policy: Option<PathBuf>,
        /// sysfs root (local listing).
        #[arg(long, default_value = "/sys")]
        sysfs: PathBuf,
    },
    /// Run the manager and its API until Ctrl-C.
    Serve(ServeArgs),
    /// System summary.
    Status,
    /// Driver domains.
    Idds,
    /// Guests.
    Guests,
    /// Channels.
    Channels,
    /// Prometheus metrics.
    Metrics,
    /// The OpenAPI document.
    Openapi,
    /// Inject a fault into an IDD.
    Inject {
        /// The IDD (`idd-<device>`).
        idd: String,
        /// crash, hang or corrupt:GUEST.
        fault: Fault,
        /// Follow the event stream until the recovery (or the failed channel) shows.
        #[arg(long)]
        wait: bool,
    },
    /// Restart an IDD's process.
    Restart {
        /// The IDD.
        idd: String,
        /// Follow the event stream until the recovery shows.
        #[arg(long)]
        wait: bool,
    },
    /// Promote a device's standby IDD.
    Promote {
        /// The device.
        device: String,
    },
    /// Follow the event stream.
    Watch {
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
        /// Stop after the first event of this type (recovery, idd_state, ...).
        #[arg(long)]
        until: Option<String>,
        /// First replay the kept events numbered after N (0: all kept).
        #[arg(long)]
        since: Option<u64>,
    },
    /// The running policy.
    #[command(subcommand)]
    Policy(PolicyCmd),
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
    /// On a real Xen host: serve the policy's Xen guests, or print xl driver-domain settings.
    #[command(subcommand)]
    Xen(device_manager::xen::cli::XenCmd),
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

/// Why a subcommand failed, already explained on stderr when `Reported`.
enum Failure {
    Reported,
    Other(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Self::Other(e)
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        if let ClientError::Api {
            details: Some(d), ..
        } = &e
        {
            if let Some(r) = d["rendered"].as_str() {
                eprint!("{r}");
            }
            if let Some(refusals) = d["refusals"].as_array() {
                for r in refusals {
                    eprintln!(
                        "refused: {}: {}",
                        r["subject"].as_str().unwrap_or("?"),
                        r["reason"].as_str().unwrap_or("?")
                    );
                }
            }
        }
        eprintln!("iddctl: {e}");
        Self::Reported
    }
}

type Outcome = std::result::Result<(), Failure>;

fn print_policy_errors(e: &policy::LoadError, json_out: bool) {
    match e {
        policy::LoadError::Invalid(errs) if json_out => {
            let v = json!({ "file": errs.file, "valid": false, "diagnostics": errs.diagnostics });
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        }
        policy::LoadError::Invalid(errs) => {
            // One grep-able line per problem, then the full rendering with source and hints.
            for d in &errs.diagnostics {
                eprintln!(
                    "{}:{}:{}: error: {}",
                    errs.file, d.line, d.column, d.message
                );
            }
            eprint!("{}", errs.render());
        }
        other => eprintln!("iddctl: {other}"),
    }
}

fn check(file: &Path, json_out: bool) -> Outcome {
    match Policy::load(file) {
        Ok(p) => {
            if json_out {
                println!(
                    "{}",
                    json!({ "file": file.display().to_string(), "valid": true, "devices": p.devices.len(), "guests": p.guests.len() })
                );
            } else {
                println!(
                    "{}: OK ({} device(s), {} guest(s))",
                    file.display(),
                    p.devices.len(),
                    p.guests.len()
                );
            }
            Ok(())
        }
        Err(e) => {
            print_policy_errors(&e, json_out);
            Err(Failure::Reported)
        }
    }
}

fn client(r: &Remote) -> Result<Client, Failure> {
    let ca = match &r.ca {
        Some(p) => Some(std::fs::read(p).with_context(|| format!("CA file {}", p.display()))?),
        None => None,
    };
    Ok(Client::new(&r.remote, r.token.clone(), ca.as_deref())?)
}

fn raw(r: &Remote, path: &str) -> Outcome {
    let text = client(r)?.get_text(path)?;
    print!("{text}");
    Ok(())
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn show(r: &Remote, path: &str, table: fn(&Value) -> String) -> Outcome {
    let v: Value = client(r)?.get(path)?;
    if r.json {
        print_json(&v);
    } else {
        print!("{}", table(&v));
    }
    Ok(())
}

fn devices_cmd(r: &Remote, local: bool, policy: Option<&Path>, sysfs: &Path) -> Outcome {
    let list: Value = if local {
        let p = match policy {
            Some(f) => match Policy::load(f) {
                Ok(p) => Some(p),
                Err(e) => {
                    print_policy_errors(&e, r.json);
                    return Err(Failure::Reported);
                }
            },
            None => None,
        };
        serde_json::to_value(devices::enumerate(sysfs, p.as_ref())).map_err(anyhow::Error::from)?
    } else {
        client(r)?.get("/v1/devices")?
    };
    if r.json {
        print_json(&list);
    } else {
        let v: Vec<devices::PciDeviceView> =
            serde_json::from_value(list).map_err(anyhow::Error::from)?;
        print!("{}", devices::table(&v));
    }
    Ok(())
}

/// Follow events, printing each, until `stop` says so; returns the event that stopped it.
fn follow(
    events: impl Iterator<Item = std::io::Result<client::SseMessage>>,
    json_out: bool,
    mut stop: impl FnMut(&Value) -> bool,
) -> Result<Option<Value>, Failure> {
    for m in events {
        let m = m.context("reading the event stream")?;
        let v: Value = serde_json::from_str(&m.data).unwrap_or(Value::String(m.data.clone()));
        if json_out {
            println!("{}", serde_json::to_string(&v).unwrap_or_default());
        } else {
            println!("{}", client::event_line(&v));
        }
        if stop(&v) {
            return Ok(Some(v));
        }
    }
    Ok(None)
}

fn act(r: &Remote, path: &str, body: Value, wait: bool) -> Outcome {
    let c = client(r)?;
    // Subscribe before acting, so the recovery cannot slip by.
    let events = if wait { Some(c.events()?) } else { None };
    let reply: Value = c.post(path, &body)?;
    if r.json && !wait {
        print_json(&reply);
    } else {
        println!("{}", reply["message"].as_str().unwrap_or("done"));
    }
    if let Some(ev) = events {
        if !r.json {
            println!("waiting for the recovery ...");
        }
        let t = Instant::now();
        let last = follow(ev, r.json, |v| {
            matches!(v["type"].as_str(), Some("recovery" | "channel_failed"))
                || v["state"].as_str() == Some("failed")
        })?;
        match last {
            Some(v) if v["state"].as_str() == Some("failed") => {
                eprintln!("iddctl: the IDD failed");
                return Err(Failure::Reported);
            }
            Some(_) => {
                if !r.json {
                    println!("done in {:.0} ms", t.elapsed().as_secs_f64() * 1e3);
                }
            }
            None => {
                eprintln!("iddctl: the event stream ended");
                return Err(Failure::Reported);
            }
        }
    }
    Ok(())
}

fn policy_cmd(r: &Remote, cmd: &PolicyCmd) -> Outcome {
    let c = client(r)?;
    let body = |f: &Path| -> Result<Value, Failure> {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        Ok(json!({ "text": text, "name": f.display().to_string() }))
    };
    let v: Value = match cmd {
        PolicyCmd::Show => {
            let v: Value = c.get("/v1/policy")?;
            if !r.json {
                println!("# {}", v["name"].as_str().unwrap_or("?"));
                print!("{}", v["text"].as_str().unwrap_or(""));
                return Ok(());
            }
            v
        }
        PolicyCmd::Validate { file } => c.post("/v1/policy/validate", &body(file)?)?,
        PolicyCmd::Apply { file } => c.post("/v1/policy/apply", &body(file)?)?,
    };
    if r.json {
        print_json(&v);
    } else {
        let changes = v["changes"].as_array().cloned().unwrap_or_default();
        let verb = if matches!(cmd, PolicyCmd::Apply { .. }) {
            "applied"
        } else {
            "valid"
        };
        println!("{verb}: {} change(s)", changes.len());
        for ch in changes {
            println!("  {ch}");
        }
        // What the running system did for each change (live, stored for the next start, or
        // deferred), one line per action.
        for a in v["applied"].as_array().into_iter().flatten() {
            let how = a["how"].as_str().unwrap_or("?");
            let what = a["change"].as_str().unwrap_or("change");
            println!("  {what} ({how})");
            for line in a["actions"].as_array().into_iter().flatten() {
                println!("    {}", line.as_str().unwrap_or_default());
            }
        }
    }
    Ok(())
}

fn serve(a: &ServeArgs) -> Outcome {
    let text = std::fs::read_to_string(&a.policy)
        .with_context(|| format!("reading {}", a.policy.display()))?;
    let policy = match Policy::load(&a.policy) {
        Ok(p) => p,
        Err(e) => {
            print_policy_errors(&e, false);
            return Err(Failure::Reported);
        }
    };
    let mut tokens = match &a.tokens {
        Some(f) => Tokens::load(f).map_err(anyhow::Error::from)?,
        None => Tokens::none(),
    };
    for (secret, role, name) in [
        (&a.admin_token, Role::Admin, "cli-admin"),
        (&a.read_token, Role::Read, "cli-read"),
    ] {
        if let Some(secret) = secret {
            tokens
                .add(Token {
                    name: name.into(),
                    secret: secret.clone(),
                    role,
                })
                .map_err(anyhow::Error::from)?;
        }
    }
    let mut listeners = vec![Listener {
        addr: a.listen,
        tls: None,
    }];
    if let Some(addr) = a.remote_listen {
        let (Some(cert), Some(key)) = (a.tls_cert.clone(), a.tls_key.clone()) else {
            return Err(anyhow::anyhow!("--remote-listen needs --tls-cert and --tls-key").into());
        };
        listeners.push(Listener {
            addr,
            tls: Some(TlsFiles { cert, key }),
        });
    }
    for l in &listeners {
        api::check_listener(l, &tokens).map_err(anyhow::Error::from)?;
    }
    let mut mcfg = ManagerConfig::beside_current_exe()?;
    mcfg.heartbeat = a.heartbeat_ms.map(Duration::from_millis);
    let mut scfg = ServiceConfig::new(mcfg);
    for arg in &mut scfg.guest_args {
        if arg == "86400" {
            *arg = a.guest_secs.to_string();
        }
    }
    let svc = Service::start(policy, &a.policy.display().to_string(), text, scfg);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let state = AppState {
        svc: svc.clone(),
        sysfs: a.sysfs.clone(),
    };
    let router = api::router(state, Arc::new(tokens), a.body_limit);
    let r = rt.block_on(async {
        let mut servers = Vec::new();
        for l in &listeners {
            let s = api::spawn(router.clone(), l).await?;
            println!("listening on {}", s.url());
            servers.push(s);
        }
        // Tell the user when the system is up (or why not), then wait for Ctrl-C / SIGTERM.
        let mut snaps = svc.watch();
        let announce = async {
            loop {
                let done = snaps
                    .borrow()
                    .idds
                    .iter()
                    .all(|i| i.state != device_manager::service::IddState::Starting);
                if done {
                    for i in &snaps.borrow().idds {
                        println!(
                            "{} {}{}",
                            i.name,
                            serde_json::to_value(i.state)
                                .ok()
                                .and_then(|v| v.as_str().map(str::to_owned))
                                .unwrap_or_default(),
                            i.reason
                                .as_deref()
                                .map(|r| format!(" ({r})"))
                                .unwrap_or_default()
                        );
                    }
                    break;
                }
                if snaps.changed().await.is_err() {
                    break;
                }
            }
            std::future::pending::<()>().await;
        };
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
            () = announce => {}
        }
        println!("stopping");
        for s in servers {
            s.shutdown().await;
        }
        Ok::<(), anyhow::Error>(())
    });
    drop(rt);
    svc.shutdown();
    r.map_err(Failure::Other)
}

fn legacy(cmd: Cmd) -> Outcome {
    if let Cmd::Nbd {
        policy,
        guest,
        socket,
    } = &cmd
    {
        return match nbd(policy, guest, socket) {
            Ok(true) => Ok(()),
            Ok(false) => Err(Failure::Reported),
            Err(e) => Err(e.into()),
        };
    }
    let args = match cmd {
        Cmd::Run(a) => a,
        Cmd::Crash { policy } => once(policy, Fault::Crash),
        Cmd::Hang { policy } => once(policy, Fault::Hang),
        Cmd::Corrupt { policy, guest } => once(policy, Fault::Corrupt { guest }),
        _ => return Err(anyhow::anyhow!("not a local run subcommand").into()),
    };
    match run(&args).context("iddctl")? {
        true => Ok(()),
        false => Err(Failure::Reported),
    }
}

fn demo(
    crashes: u32,
    listen: std::net::SocketAddr,
    dir: Option<PathBuf>,
    no_wait: bool,
) -> Outcome {
    if !listen.ip().is_loopback() {
        return Err(anyhow::anyhow!("the demo's API listens on loopback only").into());
    }
    let opts = device_manager::demo::DemoOptions {
        crashes: crashes.max(1),
        listen,
        dir,
        no_wait,
    };
    device_manager::demo::run(&opts, ManagerConfig::beside_current_exe()?)?;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = &cli.remote;
    let remote_given = std::env::args().any(|a| a == "--remote" || a.starts_with("--remote="))
        || std::env::var_os("IDDCTL_REMOTE").is_some();
    let out = match cli.cmd {
        Cmd::Demo {
            crashes,
            listen,
            dir,
            no_wait,
        } => demo(crashes, listen, dir, no_wait),
        Cmd::Check { file } => check(&file, r.json),
        Cmd::Devices { policy, sysfs } => devices_cmd(r, !remote_given, policy.as_deref(), &sysfs),
        Cmd::Serve(a) => serve(&a),
        Cmd::Status => show(r, "/v1/status", client::status_table),
        Cmd::Idds => show(r, "/v1/idds", client::idds_table),
        Cmd::Guests => show(r, "/v1/guests", client::guests_table),
        Cmd::Channels => show(r, "/v1/channels", client::channels_table),
        Cmd::Metrics => raw(r, "/metrics"),
        Cmd::Openapi => raw(r, "/openapi.json"),
        Cmd::Inject { idd, fault, wait } => {
            let body = match &fault {
                Fault::Corrupt { guest } => json!({ "fault": "corrupt", "guest": guest }),
                f => json!({ "fault": f.to_string() }),
            };
            act(r, &format!("/v1/idds/{idd}/faults"), body, wait)
        }
        Cmd::Restart { idd, wait } => act(r, &format!("/v1/idds/{idd}/restart"), json!({}), wait),
        Cmd::Promote { device } => act(
            r,
            &format!("/v1/devices/{device}/promote"),
            json!({}),
            false,
        ),
        Cmd::Watch {
            count,
            until,
            since,
        } => client(r).and_then(|c| {
            let mut n = 0u64;
            follow(c.events_since(since)?, r.json, |v| {
                n += 1;
                count.is_some_and(|c| n >= c)
                    || until
                        .as_deref()
                        .is_some_and(|u| v["type"].as_str() == Some(u))
            })
            .map(|_| ())
        }),
        Cmd::Policy(p) => policy_cmd(r, &p),
        Cmd::Xen(x) => match device_manager::xen::cli::run(&x, r.json) {
            Ok(true) => Ok(()),
            Ok(false) => Err(Failure::Reported),
            Err(e) => Err(Failure::Other(e)),
        },
        other => legacy(other),
    };
    match out {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Reported) => ExitCode::FAILURE,
        Err(Failure::Other(e)) => {
            eprintln!("iddctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}
