//! `netprobe`: the wire's far side from the command line.
//!
//! ```text
//! netprobe probe --wire SPEC --src-ip IP --dst-ip IP [--src-mac M] [--dst-mac M] [--udp]
//!                [--port 7] [--rate 200] [--secs S | --count N] [--payload 56]
//!                [--threshold 3] [--linger-ms 1000] [--out REPORT.json] [--svg OUT.svg] [--json]
//! netprobe flood --wire SPEC --src-ip IP --dst-mac M --dst-ip IP --size BYTES --secs S
//!                [--src-mac M] [--rate PPS] [--count N] [--src-port P] [--port 9] [--json]
//! netprobe count --wire SPEC [--secs S] [--frames N] [--idle-ms MS] [--dst-mac M] [--json]
//! netprobe plot REPORT.json OUT.svg
//! ```
//!
//! `count` prints `count: listening on WIRE` on stderr once its wire is open. While `probe`
//! runs, each SIGUSR1 adds a mark `signal N` at that moment (a script that crashes the
//! driver domain by hand signals the probe to have the crash on the plot).
//!
//! `SPEC` is `udp:BIND->PEER`, `udp:BIND,PEER`, `udp:BIND` or `tap:IFNAME` (see
//! `netprobe::wire`). Without `--secs`/`--count`, `probe` and `count` run until Ctrl-C (or
//! SIGTERM), then report. Output is a human summary, or with `--json` one JSON document (the
//! `ProbeReport`, `FloodReport` or `CountReport`) on stdout. Exit status 0 on success, 1 on
//! an error (printed on stderr).

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use netprobe::frame::{Endpoint, Mac};
use netprobe::probe::{Probe, ProbeConfig, ProbeMode, ProbeReport};
use netprobe::traffic::{self, CountConfig, FloodConfig};
use netprobe::wire::{self, WireSpec};

/// Set by SIGINT/SIGTERM; the runs poll it.
static STOP: AtomicBool = AtomicBool::new(false);
/// SIGUSR1s received; `probe` turns each into a mark.
static MARKS: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    // Only atomic operations: async-signal-safe.
    if sig == libc::SIGUSR1 {
        MARKS.fetch_add(1, Ordering::Relaxed);
    } else {
        STOP.store(true, Ordering::Relaxed);
    }
}

fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGUSR1] {
        // SAFETY: `on_signal` has the `extern "C" fn(c_int)` signature signal(2) expects
        // and only touches atomics, which is async-signal-safe.
        unsafe {
            libc::signal(
                sig,
                on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            );
        }
    }
}

#[derive(Parser)]
#[command(
    name = "netprobe",
    version,
    about = "Probes, floods and counts from the wire's far side of an emulated NIC"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Equally spaced echo probes; reports losses, outages and inter-arrival times.
    Probe(ProbeArgs),
    /// Sends UDP frames of one size at full or a set rate.
    Flood(FloodArgs),
    /// Receives and counts frames and bytes.
    Count(CountArgs),
    /// Draws a probe report (JSON) as an inter-arrival SVG plot.
    Plot {
        /// The report (`netprobe probe --out`).
        report: PathBuf,
        /// The SVG to write.
        out: PathBuf,
    },
}

#[derive(Args)]
struct Source {
    /// The wire: udp:BIND->PEER, udp:BIND,PEER, udp:BIND or tap:IFNAME.
    #[arg(long)]
    wire: WireSpec,
    /// Our MAC address.
    #[arg(long, default_value = "02:00:00:00:fe:01")]
    src_mac: Mac,
    /// Our IPv4 address.
    #[arg(long)]
    src_ip: Ipv4Addr,
}

#[derive(Args)]
struct ProbeArgs {
    #[command(flatten)]
    source: Source,
    /// The target's IPv4 address.
    #[arg(long)]
    dst_ip: Ipv4Addr,
    /// The target's MAC (default: resolved by ARP).
    #[arg(long)]
    dst_mac: Option<Mac>,
    /// Probe with UDP echo instead of ICMP echo.
    #[arg(long)]
    udp: bool,
    /// UDP destination port with --udp.
    #[arg(long, default_value_t = netprobe::frame::ECHO_PORT)]
    port: u16,
    /// Probes per second.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Send for this many seconds.
    #[arg(long)]
    secs: Option<f64>,
    /// Send this many probes.
    #[arg(long)]
    count: Option<u64>,
    /// Payload bytes per probe.
    #[arg(long, default_value_t = 56)]
    payload: usize,
    /// Outage threshold in probe intervals.
    #[arg(long, default_value_t = 3.0)]
    threshold: f64,
    /// Wait this long for late replies after the last probe.
    #[arg(long, default_value_t = 1000)]
    linger_ms: u64,
    /// Write the JSON report here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write the inter-arrival plot here.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Print the JSON report instead of the summary.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct FloodArgs {
    #[command(flatten)]
    source: Source,
    /// The receiver's MAC.
    #[arg(long)]
    dst_mac: Mac,
    /// The receiver's IPv4 address.
    #[arg(long)]
    dst_ip: Ipv4Addr,
    /// Frame size in bytes, Ethernet header included (60..=1514).
    #[arg(long)]
    size: usize,
    /// Send for this many seconds.
    #[arg(long)]
    secs: f64,
    /// Frames per second (default: as fast as the wire takes them).
    #[arg(long)]
    rate: Option<f64>,
    /// Stop after this many frames.
    #[arg(long)]
    count: Option<u64>,
    /// UDP source port.
    #[arg(long, default_value_t = 40009)]
    src_port: u16,
    /// UDP destination port.
    #[arg(long, default_value_t = traffic::DISCARD_PORT)]
    port: u16,
    /// Print JSON instead of the summary.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct CountArgs {
    /// The wire: udp:BIND or tap:IFNAME.
    #[arg(long)]
    wire: WireSpec,
    /// Count for this many seconds.
    #[arg(long)]
    secs: Option<f64>,
    /// Stop after this many frames.
    #[arg(long)]
    frames: Option<u64>,
    /// Stop when no frame came for this long (ms) after the first.
    #[arg(long)]
    idle_ms: Option<u64>,
    /// Count only frames to this MAC (and broadcast/multicast).
    #[arg(long)]
    dst_mac: Option<Mac>,
    /// Print JSON instead of the summary.
    #[arg(long)]
    json: bool,
}

fn secs(s: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(s).with_context(|| format!("bad duration {s} s"))
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn summarize(r: &ProbeReport) {
    println!(
        "probe: wire={} target={} mode={} rate={}/s",
        r.run.wire, r.run.target, r.run.mode, r.run.rate
    );
    let c = &r.counters;
    println!(
        "sent={} received={} lost={} skipped={} send_errors={} recv_errors={} duplicates={} secs={:.3}",
        r.sent, r.received, r.lost, c.skipped, c.send_errors, c.recv_errors, c.duplicates, r.duration_s
    );
    let s = &r.rtt_ms;
    println!("rtt_ms p50={:.3} p99={:.3} max={:.3}", s.p50, s.p99, s.max);
    let s = &r.inter_arrival_ms;
    println!(
        "inter_arrival_ms p50={:.3} p99={:.3} max={:.3}",
        s.p50, s.p99, s.max
    );
    for (i, o) in r.outages.iter().enumerate() {
        let open = if o.end_s.is_none() {
            " (no reply since)"
        } else {
            ""
        };
        println!(
            "outage {} at={:.3}s duration_ms={:.1} lost={}{open}",
            i + 1,
            o.start_s,
            o.duration_ms,
            o.probes_lost
        );
    }
    for m in &r.per_mark {
        println!(
            "mark {:?} at={:.3}s outages={} outage_ms={:.1} lost={}",
            m.label, m.t_s, m.outages, m.outage_ms, m.lost
        );
    }
    let s = &r.outage_ms;
    println!(
        "outages n={} p50_ms={:.1} p99_ms={:.1} max_ms={:.1} isolated_losses={} threshold_ms={:.1}",
        r.outages.len(),
        s.p50,
        s.p99,
        s.max,
        r.isolated_losses(),
        r.run.threshold_ms
    );
}

fn probe(a: ProbeArgs) -> anyhow::Result<()> {
    let wire = wire::open(&a.source.wire)?;
    let mut cfg = ProbeConfig::new(
        Endpoint {
            mac: a.source.src_mac,
            ip: a.source.src_ip,
        },
        a.dst_ip,
    );
    cfg.target_mac = a.dst_mac;
    cfg.mode = if a.udp {
        ProbeMode::Udp { port: a.port }
    } else {
        ProbeMode::Icmp
    };
    cfg.rate = a.rate;
    cfg.payload_len = a.payload;
    cfg.threshold_intervals = a.threshold;
    cfg.duration = a.secs.map(secs).transpose()?;
    cfg.count = a.count;
    cfg.linger = Duration::from_millis(a.linger_ms);
    let probe = Probe::new(cfg, wire)?;
    // Turn SIGUSR1s into marks (within a millisecond) while the probe runs.
    let done = AtomicBool::new(false);
    let report = std::thread::scope(|s| {
        let handle = probe.handle();
        let done = &done;
        s.spawn(move || {
            let mut seen = 0;
            while !done.load(Ordering::Relaxed) {
                let now = MARKS.load(Ordering::Relaxed);
                while seen < now {
                    seen += 1;
                    handle.mark(format!("signal {seen}"));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        let r = probe.run(&STOP);
        done.store(true, Ordering::Relaxed);
        r
    })?;
    if let Some(path) = &a.out {
        let json = serde_json::to_string(&report)?;
        std::fs::write(path, json).with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &a.svg {
        netprobe::plot::write_svg(&report, path)?;
    }
    if a.json {
        print_json(&report)
    } else {
        summarize(&report);
        Ok(())
    }
}

fn flood(a: FloodArgs) -> anyhow::Result<()> {
    let wire = wire::open(&a.source.wire)?;
    let cfg = FloodConfig {
        source: Endpoint {
            mac: a.source.src_mac,
            ip: a.source.src_ip,
        },
        target: Endpoint {
            mac: a.dst_mac,
            ip: a.dst_ip,
        },
        src_port: a.src_port,
        dst_port: a.port,
        frame_len: a.size,
        rate: a.rate,
        duration: secs(a.secs)?,
        count: a.count,
    };
    let r = traffic::flood(&cfg, &*wire, &STOP)?;
    if a.json {
        return print_json(&r);
    }
    println!(
        "flood: frames={} bytes={} send_errors={} secs={:.3} pps={:.0} mbps={:.1}",
        r.frames, r.bytes, r.send_errors, r.secs, r.pps, r.mbps
    );
    Ok(())
}

fn count(a: CountArgs) -> anyhow::Result<()> {
    let wire = wire::open(&a.wire)?;
    // On stderr, so a caller that bound port 0 learns the address before any frame is sent.
    eprintln!("count: listening on {}", wire.describe());
    let cfg = CountConfig {
        duration: a.secs.map(secs).transpose()?,
        frames: a.frames,
        idle: a.idle_ms.map(Duration::from_millis),
        dst: a.dst_mac,
    };
    let r = traffic::count(&cfg, &*wire, &STOP)?;
    if a.json {
        return print_json(&r);
    }
    println!(
        "count: frames={} bytes={} filtered={} tag_missing={} secs={:.3} pps={:.0} mbps={:.1}",
        r.frames, r.bytes, r.filtered, r.tag_missing, r.secs, r.pps, r.mbps
    );
    Ok(())
}

fn plot(report: PathBuf, out: PathBuf) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&report)
        .with_context(|| format!("cannot read {}", report.display()))?;
    let r: ProbeReport = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a probe report", report.display()))?;
    netprobe::plot::write_svg(&r, &out)?;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    install_signal_handlers();
    let result = match cli.cmd {
        Cmd::Probe(a) => probe(a),
        Cmd::Flood(a) => flood(a),
        Cmd::Count(a) => count(a),
        Cmd::Plot { report, out } => plot(report, out),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netprobe: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn wire_and_addresses_parse_from_the_command_line() {
        let cli = Cli::try_parse_from([
            "netprobe",
            "probe",
            "--wire",
            "udp:127.0.0.1:0->127.0.0.1:9000",
            "--src-ip",
            "192.0.2.1",
            "--dst-ip",
            "192.0.2.2",
            "--dst-mac",
            "02:00:00:00:00:02",
            "--udp",
            "--count",
            "5",
        ])
        .unwrap();
        let Cmd::Probe(a) = cli.cmd else {
            panic!("not probe")
        };
        assert!(matches!(a.source.wire, WireSpec::Udp { peer: Some(_), .. }));
        assert_eq!(a.dst_mac, Some(Mac([2, 0, 0, 0, 0, 2])));
        assert_eq!(a.source.src_mac, Mac([2, 0, 0, 0, 0xfe, 1]));
        assert!(a.udp);
        assert!(Cli::try_parse_from([
            "netprobe", "flood", "--wire", "tap:x", "--src-ip", "1.2.3.4"
        ])
        .is_err());
    }
}
