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
//! # Its own memory (frames of the IDD domain's RAM the manager reserves)
//!
//! | frame | what |
//! |---|---|
//! | 7 | scratch page for indirect segment pages |
//! | 8, 9 | virtqueue and request headers (pinned for the device) |
//! | 10 + 2 i, 11 + 2 i | journal of channel `i` (request slots, pin table) |
//!
//! The domain needs at least `12 + 2 × channels` frames.
//!
//! # Channels
//!
//! `--channel GUEST:RING_REF:PORT:OFFSET:SECTORS[:ro]` per guest disk (the frontend's domain,
//! its ring grant and event-channel port, its region of the device in sectors, read-only).

use clap::Parser;
use hypervisor::process::ProcessPlatform;
use hypervisor::sandbox::SandboxConfig;
use idd_blk::blkback::{BackendConfig, Blkback, ChannelConfig, Region};
use idd_blk::io::RemoteIo;
use idd_blk::virtio::{DriverFrames, VirtioBlkDriver};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// Scratch frame for indirect pages.
const SCRATCH_FRAME: u64 = 7;
/// The driver's frames.
const DRIVER: DriverFrames = DriverFrames { ring: 8, hdr: 9 };
/// The first journal frame.
const JOURNAL_FIRST_FRAME: u64 = 10;

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

fn run(args: Args) -> Result<(), String> {
    let channels = args
        .channels
        .iter()
        .enumerate()
        .map(|(i, c)| parse_channel(c, i))
        .collect::<Result<Vec<_>, _>>()?;
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
    let driver = VirtioBlkDriver::probe(platform.clone(), io, DRIVER)
        .map_err(|e| format!("virtio-blk: {}", chain(&e)))?;
    let mut back = Blkback::new(
        platform,
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
    let mut out = std::io::stdout();
    let _ = writeln!(out, "ready");
    let _ = out.flush();
    let mut reported = std::collections::BTreeSet::new();
    let mut last_progress = std::time::Instant::now();
    let mut stall_reported = false;
    loop {
        let work = back
            .run_once(Duration::from_millis(50))
            .map_err(|e| format!("serving: {}", chain(&e)))?;
        if work > 0 || back.in_flight() == 0 {
            last_progress = std::time::Instant::now();
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
            // Once per channel; the manager reads stderr and decides what to do.
            if reported.insert(chan) {
                eprintln!("idd-blk: channel {chan} failed: {e}");
            }
        }
    }
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
}
