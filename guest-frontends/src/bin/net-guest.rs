//! `net-guest`: the program of a process guest with one network interface (`vif/0`), driven
//! through the Rust netfront.
//!
//! ```text
//! net-guest [--vif N] echo --ip 10.0.0.2/24 [--rx-mode copy|exchange] [--secs S]
//!                          [--disk-blocks B [--disk-seed X] [--disk-period-ms P]]
//! net-guest [--vif N] tap --netns NS --ifname IF [--ip CIDR] [--rx-mode ..] [--secs S]
//! net-guest [--vif N] flood --dst-mac M --dst-ip IP --size B --secs S [--ip CIDR] [--rx-mode ..]
//! ```
//!
//! Started by the manager in the guest's domain like `blk-guest` (platform and XenStore port
//! from the launch environment). Anything privileged happens first: in `tap` mode the guest
//! reads its `mac` from XenStore and creates the TAP in namespace `NS` (root), then enters the
//! sandbox keeping the TAP's descriptor. Then netfront connects (`vif/N` as the toolstack
//! described it) and the mode runs until `--secs` pass (0: until SIGTERM or SIGINT).
//!
//! * `echo`: answers ARP for its address, ICMP echo and UDP echo (port 7)
//!   ([`guest_frontends::echo`]). With `--disk-blocks B` the guest also has a disk
//!   (`vbd/51712`, connected through blkfront before the NIC, as the manager connects the disk
//!   IDD first) and checks it while it echoes: every `P` ms it writes block `i mod B` with a
//!   pattern of (seed, block, version) and reads it back ([`disk`]), one operation in
//!   flight; the loop waits for either device's event at once ([`SharedEvents`]). A disk
//!   error or a read that differs from what was written ends the program (status 1, the
//!   reason on stderr): a supervisor sees a failed check as an exited guest. This is the
//!   guest of the manager's load test: one process per domain, so a domain with a disk and
//!   a NIC runs both frontends in this one loop.
//! * `tap`: frames between netfront and the TAP, so the namespace's Linux stack is the guest
//!   OS.
//! * `flood`: UDP datagrams of `B` bytes (whole frame) to `M`/`IP` port 9 as fast as the
//!   backend answers (its credit scheduler decides), then waits for the last answers.
//!
//! # stdout
//!
//! ```text
//! ready mac=02:00:00:00:00:01 mode=copy frames=391
//! stats tx=.. txb=.. rx=.. rxb=.. txerr=.. rxerr=.. drop=.. proto=.. arp=.. icmp=.. udp=..   (every second)
//! reconnected n=1                                                      (on each reconnect)
//! summary tx=.. txb=.. rx=.. rxb=.. txerr=.. rxerr=.. drop=.. proto=.. arp=.. icmp=.. udp=.. reconnects=.. resent=.. secs=..
//! disk ops=.. errors=0 mismatches=0 max_wait_us=.. reconnects=.. reissued=..  (--disk-blocks)
//! ```
//! With `--disk-blocks` a `disk` line follows each `stats` line and the summary: checks
//! done, the longest write and read-back in microseconds, blkfront's reconnects and
//! reissued requests (errors and mismatches are always 0: either ends the program).
//! `tx`/`rx` are packets the backend acknowledged / delivered, `drop` frames the guest could
//! not queue (its transmit queue full, or the TAP refused one), `proto` responses refused as
//! protocol violations. `mode` is the receive mode in use (copy if the backend lacks
//! `feature-rx-flip`). Errors go to stderr and the exit status is 1.
//!
//! # Domain RAM
//!
//! The domain needs [`NET_GUEST_FRAMES`] frames (391: the platform's 7, 256 receive buffers,
//! 128 transmit frames). With fewer, fewer receive buffers are posted; at least
//! 7 + 1 + 16 frames are required. blkfront's pages are shareable pages, not RAM frames
//! (at most [`disk::DISK_PAGES`]).
//!
//! Both frontends share the domain's one XenStore connection ([`SharedStore`]): the ring
//! carries one request at a time in order, so a second client on it would take the other's
//! replies.

use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use devchan::platform::{Platform, PlatformError, Port};
use guest_frontends::blkfront::StoreError;
use guest_frontends::echo::{udp_frame, EchoStats, Responder, DISCARD_PORT};
use guest_frontends::netfront::{
    format_mac, frames_needed, parse_mac, EventWait, FrontStore, NetError, NetFront,
    NetFrontConfig, RxMode, DEFAULT_RX_BUFFERS, DEFAULT_TX_FRAMES, MIN_TX_FRAMES,
};
use guest_frontends::tap::Tap;
use hypervisor::memory::layout::FIRST_FREE_FRAME;
use hypervisor::process::ProcessPlatform;
use hypervisor::sandbox::SandboxConfig;
use hypervisor::store_link::{process_client, EventMux, StoreClient};

#[path = "net_guest/disk.rs"]
mod disk;
use disk::{DiskCheck, DiskSpec, NetEvents, SharedEvents};

/// netfront's poll interval (its default; `disk::NetEvents` must know it).
const NET_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Frames of RAM the guest's domain should have.
pub const NET_GUEST_FRAMES: u64 =
    FIRST_FREE_FRAME + frames_needed(DEFAULT_RX_BUFFERS, DEFAULT_TX_FRAMES);

#[derive(Parser)]
struct Args {
    /// The interface number (`device/vif/N`).
    #[arg(long, default_value_t = 0)]
    vif: u32,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Answer ARP, ICMP echo and UDP echo for an address.
    Echo {
        /// Our address and prefix, e.g. 10.0.0.2/24.
        #[arg(long)]
        ip: String,
        /// `copy` or `exchange`.
        #[arg(long, default_value = "copy")]
        rx_mode: String,
        /// Run this long (0: until SIGTERM).
        #[arg(long, default_value_t = 0.0)]
        secs: f64,
        /// Also check the disk `vbd/51712` on its first B 4 KiB blocks (0: no disk).
        #[arg(long, default_value_t = 0)]
        disk_blocks: u64,
        /// Seed of the disk check's data patterns.
        #[arg(long, default_value_t = 1)]
        disk_seed: u64,
        /// Milliseconds between two checked blocks.
        #[arg(long, default_value_t = 20)]
        disk_period_ms: u64,
    },
    /// Bridge netfront and a TAP interface in a network namespace (root).
    Tap {
        /// The namespace (`ip netns add NS`).
        #[arg(long)]
        netns: String,
        /// The interface name in it.
        #[arg(long)]
        ifname: String,
        /// Address for the interface, e.g. 10.0.0.2/24.
        #[arg(long)]
        ip: Option<String>,
        /// `copy` or `exchange`.
        #[arg(long, default_value = "copy")]
        rx_mode: String,
        /// Run this long (0: until SIGTERM).
        #[arg(long, default_value_t = 0.0)]
        secs: f64,
    },
    /// Send UDP to port 9 as fast as the backend takes it.
    Flood {
        /// Destination MAC.
        #[arg(long)]
        dst_mac: String,
        /// Destination IPv4 address.
        #[arg(long)]
        dst_ip: Ipv4Addr,
        /// Frame size in bytes (42..=1514 makes sense on Ethernet; up to 65535 is allowed).
        #[arg(long, default_value_t = 1514)]
        size: usize,
        /// How long.
        #[arg(long, default_value_t = 5.0)]
        secs: f64,
        /// Our source address.
        #[arg(long, default_value = "10.0.0.2/24")]
        ip: String,
        /// `copy` or `exchange`.
        #[arg(long, default_value = "copy")]
        rx_mode: String,
    },
}

/// Set by SIGTERM/SIGINT.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn install_signals() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: `on_signal` is an `extern "C"` handler that only stores to an atomic, which
        // is async-signal-safe; replacing the default disposition affects nothing else here.
        unsafe {
            libc::signal(
                sig,
                on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            )
        };
    }
}

/// Event waits through the domain's multiplexer (shared with the XenStore ring).
struct MuxEvents(Arc<EventMux<ProcessPlatform>>);

impl EventWait for MuxEvents {
    fn wait(&self, port: Port, timeout: Duration) -> std::result::Result<bool, PlatformError> {
        match self.0.wait_any(&[port], Some(timeout)) {
            Ok(p) => Ok(!p.is_empty()),
            Err(PlatformError::TimedOut) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// The domain's one XenStore connection, shared by its frontends (see the module docs).
#[derive(Clone)]
struct SharedStore(Arc<Mutex<StoreClient<ProcessPlatform>>>);

impl SharedStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, StoreClient<ProcessPlatform>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl FrontStore for SharedStore {
    fn read(&mut self, path: &str) -> std::result::Result<Option<Vec<u8>>, StoreError> {
        FrontStore::read(&mut *self.lock(), path)
    }
    fn write(&mut self, path: &str, value: &[u8]) -> std::result::Result<(), StoreError> {
        FrontStore::write(&mut *self.lock(), path, value)
    }
    fn write_all(&mut self, kvs: &[(String, Vec<u8>)]) -> std::result::Result<(), StoreError> {
        FrontStore::write_all(&mut *self.lock(), kvs)
    }
}

type Front = NetFront<ProcessPlatform, SharedStore>;

/// The domain's platform and XenStore, before the sandbox.
struct Domain {
    mux: Arc<EventMux<ProcessPlatform>>,
    xs: SharedStore,
    nr_frames: u64,
}

fn domain() -> Result<Domain> {
    let nr_frames: u64 = std::env::var(hypervisor::launch::ENV_NR_FRAMES)
        .context("PDOM_NR_FRAMES")?
        .parse()
        .context("PDOM_NR_FRAMES")?;
    let platform = ProcessPlatform::from_launch_env().context("platform")?;
    let mux = EventMux::new(Arc::new(platform));
    let xs = SharedStore(Arc::new(Mutex::new(
        process_client(&mux).context("XenStore")?,
    )));
    Ok(Domain { mux, xs, nr_frames })
}

fn front_dir(d: &Domain, vif: u32) -> String {
    format!(
        "/local/domain/{}/device/vif/{vif}",
        d.mux.platform().domid()
    )
}

/// Enter the sandbox keeping `extra` descriptors.
fn enter_sandbox(extra: &[i32]) -> Result<()> {
    let mut sandbox = SandboxConfig::default();
    sandbox.keep_fds.extend([0, 1, 2]);
    sandbox.keep_fds.extend(hypervisor::launch::PLATFORM_FDS);
    sandbox.keep_fds.extend(extra);
    hypervisor::sandbox::apply(&sandbox).context("sandbox")?;
    Ok(())
}

/// Enter the sandbox keeping `extra` descriptors, then connect netfront.
fn connect(d: Domain, vif: u32, mode: RxMode, extra: &[i32]) -> Result<Front> {
    enter_sandbox(extra)?;
    connect_net(d, vif, mode, None)
}

/// Connect netfront (in the sandbox), waiting for its events through `events` (default:
/// its own port on the domain's multiplexer).
fn connect_net(
    d: Domain,
    vif: u32,
    mode: RxMode,
    events: Option<Box<dyn EventWait>>,
) -> Result<Front> {
    let first = FIRST_FREE_FRAME;
    let avail = usize::try_from(d.nr_frames.saturating_sub(first))?;
    if avail < 1 + MIN_TX_FRAMES {
        bail!(
            "the domain has {} frames; net-guest needs {NET_GUEST_FRAMES} (at least {})",
            d.nr_frames,
            first + 1 + MIN_TX_FRAMES as u64
        );
    }
    let me = d.mux.platform().domid();
    let mut cfg = NetFrontConfig::new(me, vif, first..d.nr_frames);
    cfg.poll_interval = NET_POLL_INTERVAL;
    cfg.rx_mode = mode;
    cfg.rx_buffers = DEFAULT_RX_BUFFERS.min(avail - MIN_TX_FRAMES);
    let plat = d.mux.platform().clone();
    let events = events.unwrap_or_else(|| Box::new(MuxEvents(d.mux)));
    NetFront::connect_with(plat, d.xs, events, cfg).context("netfront connect")
}

/// Counters and the periodic lines.
struct Report {
    start: Instant,
    last: Instant,
    connects: u64,
    drop: u64,
    echo: EchoStats,
}

impl Report {
    fn new(f: &Front) -> Result<Self> {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "ready mac={} mode={} frames={NET_GUEST_FRAMES}",
            format_mac(&f.mac()),
            f.rx_mode()
        )?;
        out.flush()?;
        Ok(Self {
            start: Instant::now(),
            last: Instant::now(),
            connects: f.stats().connects,
            drop: 0,
            echo: EchoStats::default(),
        })
    }

    fn counters(&self, f: &Front) -> String {
        let s = f.stats();
        let e = self.echo;
        format!(
            "tx={} txb={} rx={} rxb={} txerr={} rxerr={} drop={} proto={} arp={} icmp={} udp={}",
            s.tx_packets,
            s.tx_bytes,
            s.rx_packets,
            s.rx_bytes,
            s.tx_errors,
            s.rx_errors + s.rx_overruns,
            self.drop,
            s.protocol_errors,
            e.arp,
            e.icmp,
            e.udp
        )
    }

    /// Print `reconnected` and the once-a-second `stats` line when due; true if a `stats`
    /// line was printed.
    fn tick(&mut self, f: &Front) -> Result<bool> {
        let mut out = std::io::stdout().lock();
        let c = f.stats().connects;
        if c > self.connects {
            self.connects = c;
            writeln!(out, "reconnected n={}", c.saturating_sub(1))?;
            out.flush()?;
        }
        if self.last.elapsed() >= Duration::from_secs(1) {
            self.last = Instant::now();
            writeln!(out, "stats {}", self.counters(f))?;
            out.flush()?;
            return Ok(true);
        }
        Ok(false)
    }

    fn summary(&self, f: &Front) -> Result<()> {
        let s = f.stats();
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "summary {} reconnects={} resent={} secs={:.3}",
            self.counters(f),
            s.connects.saturating_sub(1),
            s.resent,
            self.start.elapsed().as_secs_f64()
        )?;
        out.flush()?;
        Ok(())
    }
}

fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8)> {
    let (a, p) = s.split_once('/').unwrap_or((s, "32"));
    let p: u8 = p.parse().context("prefix length")?;
    if p > 32 {
        bail!("prefix length {p} > 32");
    }
    Ok((a.parse().with_context(|| format!("address {a}"))?, p))
}

/// When `--secs` end (`None`: never); an error if they are out of range.
fn deadline(secs: f64) -> Result<Option<Instant>> {
    if secs > 0.0 {
        Duration::try_from_secs_f64(secs)
            .ok()
            .and_then(|d| Instant::now().checked_add(d))
            .map(Some)
            .with_context(|| format!("--secs {secs} out of range"))
    } else {
        Ok(None)
    }
}

fn running(end: Option<Instant>) -> bool {
    !STOP.load(Ordering::Relaxed) && end.is_none_or(|e| Instant::now() < e)
}

/// Queue `frame`; a full queue drops it (counted).
fn send(f: &mut Front, r: &mut Report, frame: &[u8]) -> Result<()> {
    match f.send(frame) {
        Ok(()) => Ok(()),
        Err(NetError::QueueFull | NetError::BadLength(_)) => {
            r.drop += 1;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

fn echo(vif: u32, ip: &str, mode: RxMode, secs: f64, disk: Option<DiskSpec>) -> Result<()> {
    let (addr, _) = parse_cidr(ip)?;
    let d = domain()?;
    enter_sandbox(&[])?;
    // The disk first: the manager connects the disk IDD before the NIC IDDs.
    let (mut check, net_events) = match disk {
        Some(spec) => {
            let events = SharedEvents::new(d.mux.clone());
            let check = DiskCheck::connect(&d, events.clone(), spec)?;
            let net: Box<dyn EventWait> = Box::new(NetEvents::new(events, NET_POLL_INTERVAL));
            (Some(check), Some(net))
        }
        None => (None, None),
    };
    let mut f = connect_net(d, vif, mode, net_events)?;
    let mut resp = Responder::new(f.mac(), addr);
    let mut r = Report::new(&f)?;
    let end = deadline(secs)?;
    while running(end) {
        match check.as_ref() {
            // One wait for either device's event (or the disk check's next step).
            Some(c) => f.poll(c.due_in().min(Duration::from_millis(50)))?,
            None => {
                f.wait(Duration::from_millis(50))?;
            }
        }
        while let Some(frame) = f.recv() {
            if let Some(reply) = resp.handle(&frame) {
                send(&mut f, &mut r, &reply)?;
            }
        }
        if let Some(c) = check.as_mut() {
            c.drive()?;
        }
        r.echo = resp.stats();
        let stats_printed = r.tick(&f)?;
        if let Some(c) = check.as_ref().filter(|_| stats_printed) {
            // After each `stats` line.
            println_flush(&c.line())?;
        }
    }
    f.flush(Duration::from_secs(1))?;
    r.summary(&f)?;
    if let Some(c) = check.as_ref() {
        println_flush(&c.line())?;
    }
    Ok(())
}

fn println_flush(line: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

fn tap(
    vif: u32,
    netns: &str,
    ifname: &str,
    ip: Option<&str>,
    mode: RxMode,
    secs: f64,
) -> Result<()> {
    if let Some(ip) = ip {
        parse_cidr(ip)?;
    }
    let mut d = domain()?;
    // The TAP must exist before the sandbox, with netfront's MAC: read it now.
    let key = format!("{}/mac", front_dir(&d, vif));
    let mac = loop {
        if let Some(v) = FrontStore::read(&mut d.xs, &key)? {
            break parse_mac(&key, &v)?;
        }
        if STOP.load(Ordering::Relaxed) {
            bail!("stopped before {key} was written");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut tap = Tap::open_in_netns(netns, ifname, mac, ip).context("TAP")?;
    let mut f = connect(d, vif, mode, &[tap.as_fd().as_raw_fd()])?;
    let mut r = Report::new(&f)?;
    let end = deadline(secs)?;
    let mut buf = vec![0u8; 65536];
    while running(end) {
        // From the namespace's stack to the backend (a bounded batch per round).
        for _ in 0..64 {
            match tap.recv(&mut buf).context("TAP read")? {
                Some(n) => send(&mut f, &mut r, &buf[..n])?,
                None => break,
            }
        }
        // And back: the TAP is polled again within a millisecond.
        f.wait(Duration::from_millis(1))?;
        while let Some(frame) = f.recv() {
            if tap.send(&frame).is_err() {
                r.drop += 1;
            }
        }
        r.tick(&f)?;
    }
    r.summary(&f)
}

fn flood(
    vif: u32,
    dst_mac: &str,
    dst_ip: Ipv4Addr,
    size: usize,
    secs: f64,
    ip: &str,
    mode: RxMode,
) -> Result<()> {
    let (src_ip, _) = parse_cidr(ip)?;
    let dst_mac = parse_mac("--dst-mac", dst_mac.as_bytes())?;
    let mut f = connect(domain()?, vif, mode, &[])?;
    let frame = udp_frame(
        (f.mac(), src_ip, DISCARD_PORT),
        (dst_mac, dst_ip, DISCARD_PORT),
        size,
        0x5a,
    )?;
    let mut r = Report::new(&f)?;
    let end = deadline(secs.max(0.001))?;
    while running(end) {
        match f.send(&frame) {
            Ok(()) => {}
            Err(NetError::QueueFull) => f.poll(Duration::from_millis(1))?,
            Err(e) => return Err(e.into()),
        }
        while f.recv().is_some() {}
        r.tick(&f)?;
    }
    f.flush(Duration::from_secs(2))?;
    r.summary(&f)
}

fn main() -> ExitCode {
    install_signals();
    let args = Args::parse();
    let mode = |s: &str| s.parse::<RxMode>().map_err(anyhow::Error::from);
    let r = match args.mode {
        Mode::Echo {
            ip,
            rx_mode,
            secs,
            disk_blocks,
            disk_seed,
            disk_period_ms,
        } => {
            let disk = (disk_blocks > 0).then_some(DiskSpec {
                blocks: disk_blocks,
                seed: disk_seed,
                period: Duration::from_millis(disk_period_ms),
            });
            mode(&rx_mode).and_then(|m| echo(args.vif, &ip, m, secs, disk))
        }
        Mode::Tap {
            netns,
            ifname,
            ip,
            rx_mode,
            secs,
        } => mode(&rx_mode).and_then(|m| tap(args.vif, &netns, &ifname, ip.as_deref(), m, secs)),
        Mode::Flood {
            dst_mac,
            dst_ip,
            size,
            secs,
            ip,
            rx_mode,
        } => mode(&rx_mode).and_then(|m| flood(args.vif, &dst_mac, dst_ip, size, secs, &ip, m)),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("net-guest: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parsing() {
        assert_eq!(
            parse_cidr("10.0.0.7/24").unwrap(),
            (Ipv4Addr::new(10, 0, 0, 7), 24)
        );
        assert_eq!(parse_cidr("10.0.0.7").unwrap().1, 32);
        assert!(parse_cidr("10.0.0.7/33").is_err());
        assert!(parse_cidr("10.0.0/24").is_err());
    }
}
