//! `idd-blk`: the block driver domain as a process domain.
//!
//! Started by the manager with `hypervisor::launch` (a fresh domain, or `spawn_in` an existing
//! one after a crash). Before it confines itself it connects to its device's I/O Space server
//! in domain 0 (`--device-socket`, see `idd_blk::io`); then it takes its platform from the
//! launch environment and enters the sandbox (`ProcessPlatform::enter`), brings up the
//! virtio-blk device through the I/O Space, attaches to every channel it was given (resuming
//! from each channel's journal when it is a restarted process of the same domain), prints
//! `ready` on stdout and serves until killed.
//!
//! # stdout protocol (read by the manager's supervision)
//!
//! One line per message, nothing else is printed on stdout (diagnostics go to stderr):
//!
//! * `ready`: every channel is attached (re-attached, its journal replayed) and served from
//!   now on.
//! * `hb N in_flight=K at_device=D channels=C/R/A/E,...`: heartbeat `N` (from 1), printed from
//!   the serving loop at least every [`HEARTBEAT`] (plus one serving round): `K` guest
//!   requests in flight, `D` device requests outstanding (held for descriptors included), and
//!   per channel, in `--channel` order, the requests consumed, replayed from the journal,
//!   answered, and answered with an error. A process that stops printing them (stopped,
//!   spinning, deadlocked) misses the manager's deadline and is replaced.
//! * `failed CHAN`: channel `CHAN` (its index in `--channel` order) became impossible to
//!   serve (a corrupted ring); it is no longer served, the others are. Printed once per
//!   channel.
//! * `ctl ID ok` / `ctl ID err REASON`: the answer to control command `ID` (below).
//!
//! # Control commands on stdin (while serving)
//!
//! In `hypervisor::process::control`'s format (`ID VERB ARGS`), for the manager's live reload:
//!
//! * `ID region CHAN SECTORS`: grow channel `CHAN`'s region in place to `SECTORS` (same
//!   offset). Requests up to the new end are served from then on; a shrink or a region past
//!   the device's end is answered `err`. The guest learns the new size from XenStore
//!   (`sectors`), which the manager writes after the `ok`.
//! * `ID attach SPEC`: serve one more guest disk (SPEC as for `--channel`); it becomes the
//!   next channel index, its journal the next pair of frames: a guest added live.
//!
//! stdin closed (or `/dev/null`) just means no commands.
//!
//! # Its own memory (frames of the IDD domain's RAM the manager reserves)
//!
//! | frame | what |
//! |---|---|
//! | 7 | scratch page for indirect segment pages |
//! | 8, 9 | virtqueue and request headers (pinned for the device) |
//! | 10 + 2 i, 11 + 2 i | journal of channel `i` (request slots, pin table) |
//!
//! The domain needs at least `12 + 2 × channels` frames (`idd_blk::layout`).
//!
//! # Channels
//!
//! `--channel GUEST:RING_REF:PORT:OFFSET:SECTORS[:ro]` per guest disk (the frontend's domain,
//! its ring grant and event-channel port, its region of the device in sectors, read-only).

use clap::Parser;
use hypervisor::process::control::{self, ControlError, ControlIn, Request};
use hypervisor::process::report::Reporter;
use hypervisor::process::ProcessPlatform;
use hypervisor::sandbox::SandboxConfig;
use idd_blk::blkback::{BackendConfig, Blkback, ChannelConfig, ChannelStats, Region};
use idd_blk::layout::{DRIVER_FRAMES, JOURNAL_FIRST_FRAME, SCRATCH_FRAME};
use idd_blk::virtio::VirtioBlkDriver;
use iospace::link::RemoteIo;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Heartbeat period (see the stdout protocol).
const HEARTBEAT: Duration = Duration::from_millis(50);
/// Longest wait of one serving round (bounds how late a heartbeat can be).
const ROUND: Duration = Duration::from_millis(20);
/// Most requests taken from one channel per round.
const MAX_BATCH: usize = 32;

#[derive(Parser, Debug)]
#[command(about = "Block driver domain (blkback over a virtio-blk device)")]
struct Args {
    /// Unix socket of the device's I/O Space server in domain 0.
    #[arg(long)]
    device_socket: PathBuf,
    /// A guest disk: GUEST:RING_REF:PORT:OFFSET:SECTORS[:ro].
    #[arg(long = "channel")]
    channels: Vec<String>,
    /// Requests taken from one channel per round.
    #[arg(long, default_value_t = 8)]
    batch: usize,
}

fn parse_channel(s: &str, i: usize) -> Result<ChannelConfig, String> {
    let f: Vec<&str> = s.split(':').collect();
    if !(5..=6).contains(&f.len()) {
        return Err(format!(
            "channel {s:?}: want GUEST:RING_REF:PORT:OFFSET:SECTORS[:ro]"
        ));
    }
    let num = |k: usize| {
        f[k].parse::<u64>()
            .map_err(|e| format!("channel {s:?} field {k}: {e}"))
    };
    let read_only = match f.get(5) {
        None => false,
        Some(&"ro") => true,
        Some(other) => return Err(format!("channel {s:?}: unknown flag {other:?}")),
    };
    let small = |k: usize, v: u64| {
        u32::try_from(v).map_err(|_| format!("channel {s:?} field {k} too large"))
    };
    Ok(ChannelConfig {
        guest: u16::try_from(num(0)?).map_err(|_| format!("channel {s:?}: bad domain"))?,
        ring_ref: small(1, num(1)?)?,
        remote_port: small(2, num(2)?)?,
        region: Region {
            offset: num(3)?,
            sectors: num(4)?,
        },
        read_only,
        journal_frame: JOURNAL_FIRST_FRAME + 2 * i as u64,
    })
}

/// A control command (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Control {
    /// `region CHAN SECTORS`.
    Region(usize, u64),
    /// `attach SPEC`: a new channel, the next index.
    Attach(String),
}

/// Parse a control request's verb and arguments.
fn parse_control(r: &Request) -> Result<Control, String> {
    match (r.verb.as_str(), r.args.as_slice()) {
        ("region", [chan, sectors]) => Ok(Control::Region(
            chan.parse()
                .map_err(|e| format!("region: channel {chan:?}: {e}"))?,
            sectors
                .parse()
                .map_err(|e| format!("region: sectors {sectors:?}: {e}"))?,
        )),
        ("region", _) => Err("region: want CHAN SECTORS".into()),
        ("attach", [spec]) => Ok(Control::Attach(spec.clone())),
        ("attach", _) => Err("attach: want SPEC".into()),
        (other, _) => Err(format!(
            "unknown command {:?}",
            other.chars().take(20).collect::<String>()
        )),
    }
}

/// Run one control line against the backend; the answer line, if the line had an id.
fn control<P: devchan::platform::Platform, D: idd_blk::device::BlockDevice>(
    back: &mut Blkback<P, D>,
    platform: &P,
    line: Result<String, ControlError>,
) -> Option<String> {
    control::serve("idd-blk", line, |req| match parse_control(req)? {
        Control::Region(chan, sectors) => back
            .grow_region(chan, sectors)
            .map_err(|e| format!("region: {}", chain(&e))),
        Control::Attach(spec) => {
            let c = parse_channel(&spec, back.channels())?;
            // A journal left by an earlier process of this domain in that slot is not ours.
            idd_blk::journal::release_stale_pins(platform, c.journal_frame)
                .map_err(|e| format!("attach: journal: {}", chain(&e)))?;
            back.attach(c)
                .map(|_| ())
                .map_err(|e| format!("attach: channel of domain {}: {}", c.guest, chain(&e)))
        }
    })
}

fn run(args: Args) -> Result<(), String> {
    let channels = args
        .channels
        .iter()
        .enumerate()
        .map(|(i, c)| parse_channel(c, i))
        .collect::<Result<Vec<_>, _>>()?;
    if !(1..=MAX_BATCH).contains(&args.batch) {
        return Err(format!("--batch must be 1..={MAX_BATCH}"));
    }
    // The only thing opened before the sandbox: the link to the device's I/O Space.
    let stream = UnixStream::connect(&args.device_socket)
        .map_err(|e| format!("connecting to {}: {e}", args.device_socket.display()))?;
    let mut sandbox = SandboxConfig::default();
    sandbox.keep_fds.push(stream.as_raw_fd());
    let (platform, report) =
        ProcessPlatform::enter(sandbox).map_err(|e| format!("platform: {}", chain(&e)))?;
    eprintln!(
        "idd-blk: domain {} sandboxed ({report:?})",
        devchan::platform::Platform::domid(&platform)
    );
    let platform = Arc::new(platform);
    // Before anything is pinned: release the pins a previous process of this domain left
    // recorded in the channels' journals (IOVAs are recycled once the manager revoked them).
    for c in &channels {
        idd_blk::journal::release_stale_pins(&*platform, c.journal_frame)
            .map_err(|e| format!("journal: {}", chain(&e)))?;
    }
    let io = RemoteIo::new(stream).map_err(|e| format!("I/O Space: {}", chain(&e)))?;
    let driver = VirtioBlkDriver::probe(platform.clone(), io, DRIVER_FRAMES)
        .map_err(|e| format!("virtio-blk: {}", chain(&e)))?;
    let mut back = Blkback::new(
        platform.clone(),
        driver,
        BackendConfig {
            batch: args.batch,
            scratch_frame: SCRATCH_FRAME,
        },
    );
    for c in channels {
        back.attach(c)
            .map_err(|e| format!("channel of domain {}: {}", c.guest, chain(&e)))?;
    }
    let mut report = Reporter::new("idd-blk", HEARTBEAT);
    let mut ctl = ControlIn::stdin();
    report.ready();
    let mut last_progress = Instant::now();
    let mut stall_reported = false;
    loop {
        let work = back
            .run_once(ROUND)
            .map_err(|e| format!("serving: {}", chain(&e)))?;
        if work > 0 || back.in_flight() == 0 {
            last_progress = Instant::now();
            stall_reported = false;
        } else if !stall_reported && last_progress.elapsed() > Duration::from_secs(5) {
            // Requests outstanding and nothing moving: say where they are, once per stall.
            let (elevator, at_device) = back.queued();
            eprintln!(
                "idd-blk: stalled: {} requests in flight ({elevator} queued, {at_device} at the device); device: {}",
                back.in_flight(),
                back.device().describe()
            );
            stall_reported = true;
        }
        for (chan, e) in back.failed() {
            report.failed(chan, &e);
        }
        for line in ctl.poll_lines() {
            if let Some(a) = control(&mut back, &*platform, line) {
                report.say(&a);
            }
        }
        report.heartbeat(|n| heartbeat(n, &back, back.channels()));
    }
}

/// The heartbeat line (see the stdout protocol).
fn heartbeat<P: devchan::platform::Platform, D: idd_blk::device::BlockDevice>(
    n: u64,
    back: &Blkback<P, D>,
    nchan: usize,
) -> String {
    let stats: Vec<ChannelStats> = (0..nchan).filter_map(|c| back.stats(c)).collect();
    heartbeat_line(n, back.in_flight(), back.device().in_flight(), &stats)
}

fn heartbeat_line(n: u64, in_flight: usize, at_device: usize, stats: &[ChannelStats]) -> String {
    let channels: Vec<String> = stats
        .iter()
        .map(|s| format!("{}/{}/{}/{}", s.consumed, s.replayed, s.answered, s.errors))
        .collect();
    format!(
        "hb {n} in_flight={in_flight} at_device={at_device} channels={}",
        channels.join(",")
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
            eprintln!("idd-blk: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_arguments() {
        let c = parse_channel("3:12:5:100:200:ro", 1).unwrap();
        assert_eq!(
            (
                c.guest,
                c.ring_ref,
                c.remote_port,
                c.region,
                c.read_only,
                c.journal_frame
            ),
            (
                3,
                12,
                5,
                Region {
                    offset: 100,
                    sectors: 200
                },
                true,
                12
            )
        );
        assert!(!parse_channel("3:12:5:100:200", 0).unwrap().read_only);
        for bad in [
            "3:12:5:100",
            "3:12:5:100:200:rw",
            "70000:1:1:0:1",
            "a:1:1:0:1",
            "1:1:1:0:1:ro:x",
        ] {
            assert!(parse_channel(bad, 0).is_err(), "{bad}");
        }
    }

    #[test]
    fn control_commands() {
        let req = |l: &str| Request::parse(l).unwrap();
        assert_eq!(
            parse_control(&req("4 region 1 4096")).unwrap(),
            Control::Region(1, 4096)
        );
        assert_eq!(
            parse_control(&req("4 attach 3:12:5:0:8")).unwrap(),
            Control::Attach("3:12:5:0:8".into())
        );
        for bad in [
            "4 region",
            "4 region 1",
            "4 region x 1",
            "4 region 1 -5",
            "4 region 1 2 3",
            "4 credit 1 2",
            "4 attach",
            "4 attach a b",
        ] {
            assert!(parse_control(&req(bad)).is_err(), "{bad}");
        }
    }

    proptest::proptest! {
        #[test]
        fn hostile_control_lines_never_panic(line in "\\PC{0,200}", words in proptest::collection::vec("[ -~]{0,30}", 0..4)) {
            if let Ok(r) = Request::parse(&line) {
                let _ = parse_control(&r);
            }
            if let Ok(r) = Request::parse(&format!("9 region {}", words.join(" "))) {
                let _ = parse_control(&r);
            }
        }
    }

    #[test]
    fn heartbeat_lines_follow_the_protocol() {
        let s = |c, r, a, e| ChannelStats {
            consumed: c,
            replayed: r,
            answered: a,
            errors: e,
        };
        assert_eq!(
            heartbeat_line(3, 5, 2, &[s(10, 1, 9, 0), s(4, 0, 4, 1)]),
            "hb 3 in_flight=5 at_device=2 channels=10/1/9/0,4/0/4/1"
        );
        assert_eq!(
            heartbeat_line(1, 0, 0, &[]),
            "hb 1 in_flight=0 at_device=0 channels="
        );
    }
}
