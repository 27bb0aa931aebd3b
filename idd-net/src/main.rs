//! `idd-net`: the network driver domain as a process domain.
//!
//! Started by the manager with `hypervisor::launch` (a fresh domain, or `spawn_in` an existing
//! one after a crash). Before it confines itself it connects to its NIC's I/O Space server in
//! domain 0 (`--device-socket`); then it takes its platform from the launch environment and
//! enters the sandbox (`ProcessPlatform::enter`), releases what an earlier process of the
//! domain left pinned, brings up the virtio-net device through the I/O Space, attaches to
//! every channel it was given (resuming from each channel's journal when it is a restarted
//! process of the same domain), prints `ready` and serves until killed.
//!
//! # Command line
//!
//! ```text
//! idd-net --device-socket PATH --channel SPEC [--channel SPEC ...] [--batch N]
//! SPEC = guest=D,tx=GREF,rx=GREF,port=P,mac=02:00:00:00:00:01[,rx-copy=0|1][,credit=BYTES/USEC][,ips=CIDR+CIDR]
//! ```
//!
//! `idd-net --device-socket PATH --standby`: a hot standby. It connects to the I/O Space and
//! enters the sandbox like a primary, prints `standby`, then waits without touching the
//! device (domain 0 binds a link's interrupt vectors at its first request, so the idle link
//! takes nothing from the running driver): the manager writes `channel SPEC` lines on its
//! stdin and then `go` when it promotes it; it then probes (resets) the device and serves
//! those channels. A standby lives in its own domain: the channels it gets are the ones the
//! guests set up again for it (the reconnect protocol). stdin closing before `go` ends it
//! with an error.
//!
//! # Control commands on stdin (while serving)
//!
//! The manager changes a channel's policy live (a reload) without a restart, one line per
//! command in `hypervisor::process::control`'s format (`ID VERB ARGS`, answered `ctl ID ok`
//! or `ctl ID err REASON` on stdout); `CHAN` is the `--channel` index:
//!
//! * `ID credit CHAN BYTES/USEC` or `ID credit CHAN none`: the channel's credit; its bucket
//!   restarts full at the new rate.
//! * `ID ips CHAN CIDR+CIDR` or `ID ips CHAN none`: the networks it may send from.
//! * `ID attach SPEC`: serve one more guest interface (SPEC as for `--channel`); it becomes
//!   the next channel index (its journal the next one): a guest added live.
//!
//! A standby reads its `channel`/`go` lines from the same stdin first. stdin closed (or
//! `/dev/null`) just means no commands.
//!
//! One `--channel` per guest interface: the frontend's domain, its `tx-ring-ref`,
//! `rx-ring-ref` and `event-channel`, its MAC (the only source it may send from, and where
//! unicast frames for it go), `rx-copy` (1, the default: grant copy, Linux's
//! `request-rx-copy`; 0: page exchange), `credit` (absent: unlimited), `ips` (absent: no IP
//! filter; else the source IPv4/IPv6 address or ARP sender must be inside one of the
//! networks). `--batch` bounds the packets taken from one channel per round (default 16).
//!
//! # stdout protocol (read by the manager's supervision)
//!
//! One line per message; diagnostics go to stderr:
//!
//! * `ready`: every channel is attached (re-attached, its journal replayed from now on).
//! * `hb N in_flight=K channels=C0;C1;...`: heartbeat `N` (from 1), at least every
//!   [`HEARTBEAT`] (plus one serving round); `K` transmits taken and not answered; per
//!   channel, in `--channel` order, `Ci` = `tx=..,txb=..,rx=..,rxb=..,drop=..,spoof=..,wait=..`:
//!   packets and bytes sent for the guest, received for it, frames dropped for want of a
//!   posted buffer, packets dropped as spoofed, times a packet waited for credit.
//! * `failed CHAN`: channel `CHAN` (its `--channel` index) broke its ring; it is no longer
//!   served, the others are. Once per channel.
//! * `ctl ID ok` / `ctl ID err REASON`: the answer to control command `ID`.
//!
//! # Its own memory (frames of the IDD domain's RAM, `idd_net::layout`)
//!
//! | frame | what |
//! |---|---|
//! | 7, 8, 9 | virtio-net receiveq, transmitq, transmit header + driver pin record |
//! | 10, 11 | record of netback's self-grants and pins (`idd_net::pool`) |
//! | 12..=15 | transmit header copies (32 × 128 bytes each) |
//! | 16..=147 | receive pool (128 at the device, 4 spares) |
//! | 148 + 3 i ..= 150 + 3 i | journal of channel `i` (`idd_net::journal`) |
//!
//! The domain needs `idd_net::layout::frames_needed(channels)` = `148 + 3 × channels` frames.

use clap::Parser;
use devchan::platform::Platform;
use hypervisor::process::control::{self, ControlError, ControlIn, Request};
use hypervisor::process::report::Reporter;
use hypervisor::process::ProcessPlatform;
use hypervisor::sandbox::SandboxConfig;
use idd_net::credit::Credit;
use idd_net::device::NetDevice;
use idd_net::filter::{parse_nets, Mac};
use idd_net::layout::{
    journal_frame, DRIVER_FRAMES, HEADER_FIRST_FRAME, HEADER_FRAMES, RECORD_FRAME, RX_FIRST_FRAME,
    RX_FRAMES,
};
use idd_net::netback::{release_previous, BackendConfig, ChannelConfig, ChannelStats, Netback};
use idd_net::virtio::VirtioNetDriver;
use iospace::link::RemoteIo;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// Heartbeat period (see the stdout protocol).
const HEARTBEAT: Duration = Duration::from_millis(50);
/// Longest wait of one serving round (bounds how late a heartbeat can be).
const ROUND: Duration = Duration::from_millis(5);
/// Most packets taken from one channel per round.
const MAX_BATCH: usize = 64;
/// Most channels: journals past this would lie outside the memory the manager gives the
/// domain (`idd_net::layout::frames_needed(64)`).
const MAX_CHANNELS: usize = 64;

#[derive(Parser, Debug)]
#[command(about = "Network driver domain (netback over a virtio-net device)")]
struct Args {
    /// Unix socket of the NIC's I/O Space server in domain 0.
    #[arg(long)]
    device_socket: PathBuf,
    /// A guest interface: guest=D,tx=GREF,rx=GREF,port=P,mac=M[,rx-copy=0|1][,credit=B/US][,ips=CIDR+CIDR].
    #[arg(long = "channel")]
    channels: Vec<String>,
    /// Packets taken from one channel per round.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Hot standby: connect and enter the sandbox, then wait for the channels on stdin
    /// (see the module docs) before touching the device.
    #[arg(long)]
    standby: bool,
}

/// Control lines read and not yet run.
type Pending = Vec<Result<String, ControlError>>;

/// A standby's wait: `channel SPEC` lines on stdin until `go`; returns the SPECs and the
/// lines that came after `go` in the same read (control commands, served once running).
fn await_promotion<R: std::io::Read + AsRawFd>(
    ctl: &mut ControlIn<R>,
) -> Result<(Vec<String>, Pending), String> {
    let mut specs = Vec::new();
    while !ctl.closed() {
        let mut lines = ctl.wait_lines(-1).into_iter();
        while let Some(line) = lines.next() {
            let line = line.map_err(|e| format!("standby: stdin: {e}"))?;
            match line.split_once(' ') {
                Some(("channel", spec)) => specs.push(spec.trim().to_owned()),
                None if line.trim() == "go" => return Ok((specs, lines.collect())),
                _ => {
                    let shown: String = line.chars().take(80).collect();
                    return Err(format!("standby: unexpected line {shown:?}"));
                }
            }
        }
    }
    Err("standby: stdin closed before `go`".into())
}

/// A control command (see the module docs), its channel index first.
#[derive(Debug, Clone, PartialEq)]
enum Control {
    /// `credit CHAN BYTES/USEC|none`.
    Credit(usize, Option<Credit>),
    /// `ips CHAN CIDR+CIDR|none`.
    Ips(usize, Vec<ipnet::IpNet>),
    /// `attach SPEC`: a new channel (checked when run: its index is the next one).
    Attach(String),
}

/// Parse a control request's verb and arguments.
fn parse_control(r: &Request) -> Result<Control, String> {
    if r.verb == "attach" {
        return match r.args.as_slice() {
            [spec] => Ok(Control::Attach(spec.clone())),
            _ => Err("attach: want SPEC".into()),
        };
    }
    let [chan, value] = r.args.as_slice() else {
        return Err(format!("{}: want CHAN VALUE", r.verb));
    };
    let chan = chan
        .parse::<usize>()
        .map_err(|e| format!("{}: channel {chan:?}: {e}", r.verb))?;
    match r.verb.as_str() {
        "credit" if value == "none" => Ok(Control::Credit(chan, None)),
        "credit" => value
            .parse::<Credit>()
            .map(|c| Control::Credit(chan, Some(c)))
            .map_err(|e| format!("credit: {e}")),
        "ips" if value == "none" => Ok(Control::Ips(chan, Vec::new())),
        "ips" => parse_nets(value)
            .map(|n| Control::Ips(chan, n))
            .map_err(|e| format!("ips: {e}")),
        other => Err(format!(
            "unknown command {:?}",
            other.chars().take(20).collect::<String>()
        )),
    }
}

/// Run one control line against the backend; the answer line to print, if the line had an
/// id to answer to (one without is said on stderr: nothing could match the answer).
fn control<P: Platform, D: NetDevice>(
    back: &mut Netback<P, D>,
    line: Result<String, ControlError>,
) -> Option<String> {
    control::serve("idd-net", line, |req| {
        let (chan, done) = match parse_control(req)? {
            Control::Credit(chan, credit) => (chan, back.set_credit(chan, credit)),
            Control::Ips(chan, nets) => (chan, back.set_nets(chan, nets)),
            Control::Attach(spec) => {
                let i = back.channels();
                if i >= MAX_CHANNELS {
                    return Err(format!("attach: at most {MAX_CHANNELS} channels"));
                }
                let c = parse_channel(&spec, i)?;
                let guest = c.guest;
                return back
                    .attach(c)
                    .map(|_| ())
                    .map_err(|e| format!("attach: channel of domain {guest}: {}", chain(&e)));
            }
        };
        if done {
            Ok(())
        } else {
            Err(format!("no channel {chan}"))
        }
    })
}

/// Parse one `--channel` SPEC; `i` is its index (which journal it uses).
fn parse_channel(s: &str, i: usize) -> Result<ChannelConfig, String> {
    let (mut guest, mut tx, mut rx, mut port, mut mac) = (None, None, None, None, None);
    let (mut rx_copy, mut credit, mut nets) = (true, None, Vec::new());
    for kv in s.split(',') {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("channel {s:?}: {kv:?} is not KEY=VALUE"))?;
        let num = |v: &str| {
            v.parse::<u32>()
                .map_err(|e| format!("channel {s:?}: {k}: {e}"))
        };
        match k {
            "guest" => {
                guest = Some(
                    v.parse::<u16>()
                        .map_err(|e| format!("channel {s:?}: guest: {e}"))?,
                );
            }
            "tx" => tx = Some(num(v)?),
            "rx" => rx = Some(num(v)?),
            "port" => port = Some(num(v)?),
            "mac" => {
                mac = Some(
                    v.parse::<Mac>()
                        .map_err(|e| format!("channel {s:?}: {e}"))?,
                )
            }
            "rx-copy" => {
                rx_copy = match v {
                    "1" => true,
                    "0" => false,
                    _ => return Err(format!("channel {s:?}: rx-copy must be 0 or 1")),
                };
            }
            "credit" => {
                credit = Some(
                    v.parse::<Credit>()
                        .map_err(|e| format!("channel {s:?}: {e}"))?,
                );
            }
            "ips" => nets = parse_nets(v).map_err(|e| format!("channel {s:?}: ips: {e}"))?,
            other => return Err(format!("channel {s:?}: unknown key {other:?}")),
        }
    }
    let need = |v: Option<u32>, k: &str| v.ok_or_else(|| format!("channel {s:?}: {k}= missing"));
    Ok(ChannelConfig {
        guest: guest.ok_or_else(|| format!("channel {s:?}: guest= missing"))?,
        tx_ring_ref: need(tx, "tx")?,
        rx_ring_ref: need(rx, "rx")?,
        remote_port: need(port, "port")?,
        mac: mac.ok_or_else(|| format!("channel {s:?}: mac= missing"))?,
        rx_copy,
        credit,
        nets,
        journal_frame: journal_frame(i as u64),
    })
}

fn backend_config(batch: usize) -> BackendConfig {
    BackendConfig {
        record_frame: RECORD_FRAME,
        header_frames: (HEADER_FIRST_FRAME..HEADER_FIRST_FRAME + HEADER_FRAMES).collect(),
        rx_frames: (RX_FIRST_FRAME..RX_FIRST_FRAME + RX_FRAMES).collect(),
        batch,
    }
}

fn run(args: Args) -> Result<(), String> {
    // Check the command line before anything else (a standby's channels come later).
    for (i, c) in args.channels.iter().enumerate() {
        parse_channel(c, i)?;
    }
    if !(1..=MAX_BATCH).contains(&args.batch) {
        return Err(format!("--batch must be 1..={MAX_BATCH}"));
    }
    // The only thing opened before the sandbox: the link to the NIC's I/O Space.
    let stream = UnixStream::connect(&args.device_socket)
        .map_err(|e| format!("connecting to {}: {e}", args.device_socket.display()))?;
    let mut sandbox = SandboxConfig::default();
    sandbox.keep_fds.push(stream.as_raw_fd());
    let (platform, report) =
        ProcessPlatform::enter(sandbox).map_err(|e| format!("platform: {}", chain(&e)))?;
    eprintln!(
        "idd-net: domain {} sandboxed ({report:?})",
        platform.domid()
    );
    let platform = Arc::new(platform);
    let mut report = Reporter::new("idd-net", HEARTBEAT);
    let mut ctl = ControlIn::stdin();
    let (specs, mut early) = if args.standby {
        if !args.channels.is_empty() {
            return Err("--standby takes its channels on stdin, not --channel".into());
        }
        // Say we are idle and ready to be promoted (the first line a standby prints).
        report.say("standby");
        await_promotion(&mut ctl)?
    } else {
        (args.channels, Vec::new())
    };
    let channels = specs
        .iter()
        .enumerate()
        .map(|(i, c)| parse_channel(c, i))
        .collect::<Result<Vec<_>, _>>()?;
    // Before anything is pinned (IOVAs are recycled): release what a previous process of
    // this domain left pinned and granted.
    let released = release_previous(
        &*platform,
        RECORD_FRAME,
        channels.iter().map(|c| c.journal_frame),
    )
    .map_err(|e| format!("releasing stale pins: {}", chain(&e)))?;
    if released > 0 {
        eprintln!("idd-net: released {released} pins and grants of a previous process");
    }
    let io = RemoteIo::new(stream).map_err(|e| format!("I/O Space: {}", chain(&e)))?;
    let driver = VirtioNetDriver::probe(platform.clone(), io, DRIVER_FRAMES)
        .map_err(|e| format!("virtio-net: {}", chain(&e)))?;
    let mut back = Netback::new(platform, driver, backend_config(args.batch))
        .map_err(|e| format!("netback: {}", chain(&e)))?;
    for c in channels {
        let guest = c.guest;
        back.attach(c)
            .map_err(|e| format!("channel of domain {guest}: {}", chain(&e)))?;
    }
    report.ready();
    loop {
        back.run_once(ROUND)
            .map_err(|e| format!("serving: {}", chain(&e)))?;
        early.extend(ctl.poll_lines());
        for line in early.drain(..) {
            if let Some(a) = control(&mut back, line) {
                report.say(&a);
            }
        }
        for (chan, e) in back.failed() {
            report.failed(chan, &e);
        }
        let nchan = back.channels();
        report.heartbeat(|n| heartbeat(n, &back, nchan));
    }
}

/// The heartbeat line (see the stdout protocol).
fn heartbeat<P: Platform, D: NetDevice>(n: u64, back: &Netback<P, D>, nchan: usize) -> String {
    let stats: Vec<ChannelStats> = (0..nchan).filter_map(|c| back.stats(c)).collect();
    heartbeat_line(n, back.in_flight(), &stats)
}

fn heartbeat_line(n: u64, in_flight: usize, stats: &[ChannelStats]) -> String {
    let channels: Vec<String> = stats
        .iter()
        .map(|s| {
            format!(
                "tx={},txb={},rx={},rxb={},drop={},spoof={},wait={}",
                s.tx, s.txb, s.rx, s.rxb, s.drop, s.spoof, s.wait
            )
        })
        .collect();
    format!(
        "hb {n} in_flight={in_flight} channels={}",
        channels.join(";")
    )
}

/// `e` and its sources, `: `-separated.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("idd-net: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn standby(input: &[u8]) -> Result<(Vec<String>, usize), String> {
        let (mut w, r) = std::os::unix::net::UnixStream::pair().unwrap();
        std::io::Write::write_all(&mut w, input).unwrap();
        drop(w);
        await_promotion(&mut ControlIn::new(r)).map(|(s, rest)| (s, rest.len()))
    }

    #[test]
    fn a_standby_takes_its_channels_from_stdin() {
        let input =
            b"channel guest=3,tx=8,rx=9,port=5,mac=02:00:00:00:00:01\ngo\n1 credit 0 none\n";
        assert_eq!(
            standby(input).unwrap(),
            (
                vec!["guest=3,tx=8,rx=9,port=5,mac=02:00:00:00:00:01".to_owned()],
                1
            )
        );
        assert!(standby(b"channel x\n").is_err(), "no go");
        assert!(standby(b"hello\ngo\n").is_err());
        assert_eq!(standby(b"go\n").unwrap(), (Vec::<String>::new(), 0));
    }

    fn req(line: &str) -> Request {
        Request::parse(line).unwrap()
    }

    #[test]
    fn control_commands() {
        assert_eq!(
            parse_control(&req("1 credit 2 61440/100000")).unwrap(),
            Control::Credit(2, Some(Credit::new(61_440, 100_000).unwrap()))
        );
        assert_eq!(
            parse_control(&req("1 credit 0 none")).unwrap(),
            Control::Credit(0, None)
        );
        match parse_control(&req("1 ips 1 10.0.0.0/24+fd00::/64")).unwrap() {
            Control::Ips(1, n) => assert_eq!(n.len(), 2),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse_control(&req("1 ips 1 none")).unwrap(),
            Control::Ips(1, Vec::new())
        );
        assert_eq!(
            parse_control(&req("1 attach guest=1,tx=2")).unwrap(),
            Control::Attach("guest=1,tx=2".into())
        );
        for bad in [
            "1 credit",
            "1 credit 0",
            "1 credit x 1/1",
            "1 credit 0 0/10",
            "1 credit 0 1/1 extra",
            "1 ips 0 10.0.0.0/40",
            "1 region 0 100",
            "1 credit -1 1/1",
            "1 attach",
            "1 attach a b",
        ] {
            assert!(parse_control(&req(bad)).is_err(), "{bad}");
        }
    }

    proptest::proptest! {
        #[test]
        fn hostile_control_lines_never_panic(line in "\\PC{0,200}", words in proptest::collection::vec("[ -~]{0,30}", 0..5)) {
            if let Ok(r) = Request::parse(&line) {
                let _ = parse_control(&r);
            }
            let joined = format!("7 {}", words.join(" "));
            if let Ok(r) = Request::parse(&joined) {
                let _ = parse_control(&r);
            }
        }
    }

    #[test]
    fn channel_arguments() {
        let c = parse_channel(
            "guest=3,tx=12,rx=13,port=5,mac=02:00:00:00:00:01,rx-copy=0,credit=125000/1000,ips=10.0.0.0/24+fd00::/64",
            1,
        )
        .unwrap();
        assert_eq!(
            (
                c.guest,
                c.tx_ring_ref,
                c.rx_ring_ref,
                c.remote_port,
                c.rx_copy
            ),
            (3, 12, 13, 5, false)
        );
        assert_eq!(c.mac.to_string(), "02:00:00:00:00:01");
        assert_eq!(c.credit, Some(Credit::new(125_000, 1000).unwrap()));
        assert_eq!(c.nets.len(), 2);
        assert_eq!(c.journal_frame, journal_frame(1));
        let d = parse_channel("guest=1,tx=1,rx=2,port=3,mac=02:00:00:00:00:02", 0).unwrap();
        assert!(d.rx_copy && d.credit.is_none() && d.nets.is_empty());
        for bad in [
            "guest=1,tx=1,rx=2,port=3",
            "guest=1,tx=1,rx=2,mac=02:00:00:00:00:02",
            "guest=70000,tx=1,rx=2,port=3,mac=02:00:00:00:00:02",
            "guest=1,tx=1,rx=2,port=3,mac=02:00:00:00:00",
            "guest=1,tx=1,rx=2,port=3,mac=02:00:00:00:00:02,rx-copy=2",
            "guest=1,tx=1,rx=2,port=3,mac=02:00:00:00:00:02,credit=0/10",
            "guest=1,tx=1,rx=2,port=3,mac=02:00:00:00:00:02,ips=10.0.0.0/40",
            "guest=1,tx=1,rx=2,port=3,mac=02:00:00:00:00:02,colour=red",
            "guest=1,tx",
        ] {
            assert!(parse_channel(bad, 0).is_err(), "{bad}");
        }
    }

    #[test]
    fn heartbeat_lines_follow_the_protocol() {
        let a = ChannelStats {
            tx: 10,
            txb: 6000,
            rx: 4,
            rxb: 400,
            drop: 1,
            spoof: 2,
            wait: 3,
            ..Default::default()
        };
        assert_eq!(
            heartbeat_line(7, 2, &[a, ChannelStats::default()]),
            "hb 7 in_flight=2 channels=tx=10,txb=6000,rx=4,rxb=400,drop=1,spoof=2,wait=3;\
             tx=0,txb=0,rx=0,rxb=0,drop=0,spoof=0,wait=0"
        );
        assert_eq!(heartbeat_line(1, 0, &[]), "hb 1 in_flight=0 channels=");
    }

    #[test]
    fn frames_match_the_docs() {
        let b = backend_config(8);
        assert_eq!(b.record_frame, 10);
        assert_eq!(b.header_frames, [12, 13, 14, 15]);
        assert_eq!((b.rx_frames[0], *b.rx_frames.last().unwrap()), (16, 147));
        assert_eq!(journal_frame(0), 148);
    }
}
