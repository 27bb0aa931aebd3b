//! `dm-idd-blk`: the block driver domain program the device manager runs (until the `idd-blk`
//! crate's own binary lands on main; same command line, plus a heartbeat).
//!
//! Started with `hypervisor::launch` in the IDD domain (again with `spawn_in` after a crash).
//! Before confining itself it connects to its device's I/O Space server in domain 0
//! (`--device-socket`, see `idd_blk::io`), then enters the sandbox, probes the virtio-blk
//! device through the I/O Space, attaches every channel (a restarted process resumes from each
//! channel's journal and replays it), prints `ready`, and serves until killed.
//!
//! # stdout protocol (read by the manager)
//!
//! * `ready`: every channel is attached (re-attached) and served from now on.
//! * `hb N in_flight=K channels=C/R/A/E,..`: heartbeat (with each channel's consumed,
//!   replayed, answered and error counts), at most every [`HEARTBEAT`] from the serving loop; a process that
//!   stops printing them (stopped, spinning, deadlocked) misses the manager's deadline.
//! * `failed CHAN`: a channel's ring became impossible (a corrupted ring); it is no longer served.
//!
//! # Its memory (frames of the IDD domain's RAM the manager reserves)
//!
//! | frame | what |
//! |---|---|
//! | 7 | scratch page for indirect segment pages |
//! | 8, 9 | virtqueue and request headers (pinned for the device) |
//! | 10 + 2 i, 11 + 2 i | journal of channel `i` |
//!
//! `--channel GUEST:RING_REF:PORT:OFFSET:SECTORS[:ro]` per guest disk.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use device_manager::layout::{DRIVER_FRAMES, JOURNAL_FIRST_FRAME, SCRATCH_FRAME};
use device_manager::queue_fit::QueueFit;
use device_manager::remote_io::ManagedIo;
use device_manager::toolstack::ChannelSpec;
use hypervisor::process::ProcessPlatform;
use hypervisor::sandbox::SandboxConfig;
use idd_blk::blkback::{BackendConfig, Blkback};
use idd_blk::virtio::VirtioBlkDriver;

/// Heartbeat period.
const HEARTBEAT: Duration = Duration::from_millis(50);

#[derive(Parser, Debug)]
#[command(about = "Block driver domain (blkback over a virtio-blk device behind an I/O Space)")]
struct Args {
    /// Unix socket of the device's I/O Space server in domain 0.
    #[arg(long)]
    device_socket: PathBuf,
    /// A guest disk: `GUEST:RING_REF:PORT:OFFSET:SECTORS[:ro]`.
    #[arg(long = "channel")]
    channels: Vec<String>,
    /// Requests taken from one channel per round.
    #[arg(long, default_value_t = 8)]
    batch: usize,
}

fn run(args: Args) -> Result<()> {
    let channels = args
        .channels
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let spec: ChannelSpec = c.parse()?;
            Ok(spec.config(JOURNAL_FIRST_FRAME + 2 * i as u64))
        })
        .collect::<Result<Vec<_>>>()?;
    if args.batch == 0 || args.batch > 32 {
        bail!("--batch must be 1..=32");
    }
    // The only thing opened before the sandbox: the link to the device's I/O Space.
    let stream = UnixStream::connect(&args.device_socket)
        .with_context(|| format!("connecting to {}", args.device_socket.display()))?;
    // The device's config space is parsed over the link (domain 0 checks every access).
    let io = ManagedIo::new(stream).context("I/O Space link")?;
    let mut sandbox = SandboxConfig::default();
    sandbox.keep_fds.push(io.raw_fd());
    let (platform, _report) = ProcessPlatform::enter(sandbox).context("entering the sandbox")?;
    let platform = Arc::new(platform);
    let driver =
        VirtioBlkDriver::probe(platform.clone(), io, DRIVER_FRAMES).context("virtio-blk probe")?;
    let mut back = Blkback::new(
        platform,
        QueueFit::new(driver),
        BackendConfig {
            batch: args.batch,
            scratch_frame: SCRATCH_FRAME,
        },
    );
    let nchan = channels.len();
    for c in channels {
        back.attach(c)
            .with_context(|| format!("channel of domain {}", c.guest))?;
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready")?;
    out.flush()?;
    let (mut beats, mut last, mut reported) = (0u64, Instant::now(), 0);
    loop {
        back.run_once(Duration::from_millis(20))
            .context("serving")?;
        let failed = back.failed();
        for (chan, _) in failed.iter().skip(reported) {
            writeln!(out, "failed {chan}")?;
        }
        reported = failed.len();
        if last.elapsed() >= HEARTBEAT {
            beats += 1;
            last = Instant::now();
            let st: Vec<String> = (0..nchan)
                .filter_map(|c| back.stats(c))
                .map(|s| format!("{}/{}/{}/{}", s.consumed, s.replayed, s.answered, s.errors))
                .collect();
            writeln!(
                out,
                "hb {beats} in_flight={} at_device={} channels={}",
                back.in_flight(),
                idd_blk::device::BlockDevice::in_flight(back.device()),
                st.join(",")
            )?;
            out.flush()?;
        }
    }
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dm-idd-blk: {e:#}");
            ExitCode::FAILURE
        }
    }
}
