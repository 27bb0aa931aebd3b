//! `xen-blkback`: idd-blk's `Blkback` as a userspace Xen block backend for one guest disk.
//!
//! Runs in the backend domain (dom0 in the testbed) on [`XenPlatform`], with idd-blk's
//! `FileDevice` over a raw image file as the device: every data byte crosses the platform's
//! software IOMMU into the guest's page through a persistent gntdev mapping. Why not idd-blk's
//! virtio driver over an emulated virtio-blk-pci (`iospace::link::LocalIo`): in dom0 there is
//! no device behind it either — the emulated device would end in the same image file, behind
//! one more in-process queue — and the file device exercises the same blkback, journal and
//! pin path with fewer moving parts. The platform supports that driver too (its own queue
//! frames reach the device through self-grants, see `xen_platform::platform`).
//!
//! # Lifecycle
//!
//! 0. With `--create` (the toolstack's part) and no backend directory yet: creates the
//!    frontend's and its own directory (`xen_platform::vbd::create`).
//! 1. Writes its features into the backend directory and `state` = 2 (unless already 4: a
//!    restart), waits for the frontend's ring (`state` 3 or 4), reads `ring-ref`,
//!    `event-channel`, `feature-persistent`.
//! 2. Attaches blkback: maps the ring, binds the port (or, restarted, finds the port still
//!    bound in the supervisor-held event-channel file and the journal in the memory file, and
//!    replays what was in flight), unmasks the port, writes `state` = 4 if it was not.
//! 3. Prints `ready fresh|resumed replay=N` on stdout and serves until killed, or until the
//!    frontend closes (then `state` = 6 and exit 0).
//!
//! # Transparent restart
//!
//! What the next process needs outlives this one outside it: the guest's ring (the guest's
//! memory), the bound event channel (the supervisor keeps the `/dev/xen/evtchn` file open and
//! passes it as `--evtchn-fd`), and the journal (`--memory`, a tmpfs file: frame
//! `idd_blk::layout::JOURNAL_FIRST_FRAME` and the next hold it, `SCRATCH_FRAME` is the scratch
//! page). The grant mappings die with the process and are made again on first use. Without
//! `--evtchn-fd` the port dies with the process: a restarted process then binds the
//! frontend's port again and records the new port in the journal before resuming.
//!
//! # stdout
//!
//! `ready fresh|resumed journaled=N port=P persistent=B` (`N`: requests the journal held),
//! `first-answer ms_after_ready=T replayed=R` when this process published its first response
//! (`R`: journal requests re-executed by then), then every 10 s
//! `stats consumed=C replayed=R answered=A errors=E mapped=M`. Diagnostics go to stderr.

use clap::Parser;
use devchan::platform::Platform;
use idd_blk::blkback::{BackendConfig, Blkback, ChannelConfig, Region};
use idd_blk::device::FileDevice;
use idd_blk::layout::{JOURNAL_FIRST_FRAME, SCRATCH_FRAME};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use xen_platform::program::{self, chain, say, JournalHeader, ServeClock};
use xen_platform::vbd::{self, VbdPaths};

/// The program's name on stderr.
const NAME: &str = "xen-blkback";
/// Frames of the memory file: up to the journal of one channel and one spare.
const FRAMES: u64 = JOURNAL_FIRST_FRAME + 4;
/// Journal header: offsets of the fields a port rebind rewrites (idd-blk's documented layout).
const J_LOCAL_PORT: usize = 16;
const J_REMOTE_PORT: usize = 12;
const J_RING_REF: usize = 8;
const J_VALID: usize = 24;

#[derive(Parser, Debug)]
#[command(about = "Userspace Xen block backend (idd-blk's blkback on /dev/xen)")]
struct Args {
    /// The frontend's domain id.
    #[arg(long)]
    frontend: u16,
    /// The virtual device number (the vbd directory name, e.g. 51712 for xvda).
    #[arg(long, default_value_t = 51712)]
    devid: u32,
    /// The raw disk image served.
    #[arg(long)]
    image: PathBuf,
    /// Serve read-only.
    #[arg(long)]
    read_only: bool,
    /// The backend's memory file (journal), on tmpfs; kept across restarts.
    #[arg(long)]
    memory: PathBuf,
    #[command(flatten)]
    dev: program::DeviceArgs,
    /// Also be the toolstack: create the frontend's and our directories if ours does not
    /// exist yet (`xen_platform::vbd::create`).
    #[arg(long)]
    create: bool,
    /// `feature-max-indirect-segments` offered (0: none; at most idd-blk's 16). idd-blk
    /// answers an indirect request with its `indirect_op`, which is what Linux's blkfront
    /// checks ("response has wrong operation (6 instead of 1)" and a dead disk otherwise, as
    /// an earlier idd-blk showed in the testbed).
    #[arg(long, default_value_t = 16)]
    max_indirect_segments: u16,
    /// Requests taken from the ring per round.
    #[arg(long, default_value_t = 8)]
    batch: usize,
}

fn run(args: Args) -> Result<(), String> {
    let (mut xs, domid) = program::open_xenstore(&args.dev.xenstore)?;
    let paths = VbdPaths::new(domid, args.frontend, args.devid);
    let image = std::fs::OpenOptions::new()
        .read(true)
        .write(!args.read_only)
        .open(&args.image)
        .map_err(|e| format!("image {}: {e}", args.image.display()))?;
    let inherited = args.dev.evtchn_fd.is_some();
    let (platform, _) = program::open_platform(
        domid,
        &args.dev.gntdev,
        args.dev.evtchn_fd,
        &args.memory,
        FRAMES,
    )?;
    let device = FileDevice::new(image, platform.dma(), args.read_only)
        .map_err(|e| format!("image {}: {e}", args.image.display()))?;
    let sectors = idd_blk::device::BlockDevice::capacity(&device);

    // 0. The toolstack's part, when asked and not done yet.
    program::create_if_missing(&mut xs, args.create, NAME, &paths, |xs| {
        vbd::create(xs, &paths, domid, args.frontend, args.devid, args.read_only)
    })?;
    // 1. XenStore handshake (or find it done: a restart).
    // idd-blk records at most PINS_PER_SLOT pins per request (16).
    let max_indirect = args
        .max_indirect_segments
        .min(u16::try_from(idd_blk::journal::PINS_PER_SLOT).unwrap_or(u16::MAX));
    let ours = vbd::advertise(&mut xs, &paths, sectors, args.read_only, max_indirect)
        .map_err(|e| chain(&e))?;
    eprintln!(
        "xen-blkback: domain {domid}, {} ({sectors} sectors), backend state {}",
        paths.back,
        ours.name()
    );
    program::wait_for_frontend(&mut xs, NAME, &paths.front)?;
    let ring = vbd::frontend_ring(&mut xs, &paths).map_err(|e| chain(&e))?;
    platform.set_persistent(ring.persistent);

    // 2. Attach (resuming from the journal when it belongs to this ring).
    let cfg = ChannelConfig {
        guest: args.frontend,
        ring_ref: ring.ring_ref,
        remote_port: ring.event_channel,
        region: Region { offset: 0, sectors },
        read_only: args.read_only,
        journal_frame: JOURNAL_FIRST_FRAME,
    };
    if !inherited {
        JournalHeader {
            frame: cfg.journal_frame,
            magic: idd_blk::journal::MAGIC,
            channel: vec![(J_REMOTE_PORT, cfg.remote_port), (J_RING_REF, cfg.ring_ref)],
            local_port: J_LOCAL_PORT,
        }
        .rebind_port(&platform, cfg.guest, cfg.remote_port)?;
    }
    // Requests the journal holds (consumed, not known answered): what the attach replays,
    // less any whose response turns out to be published.
    let mut v = [0u8; 4];
    platform
        .read_local(cfg.journal_frame, J_VALID, &mut v)
        .map_err(|e| format!("journal: {e}"))?;
    let journaled = u32::from_le_bytes(v).count_ones();
    idd_blk::journal::release_stale_pins(&*platform, cfg.journal_frame)
        .map_err(|e| format!("journal: {}", chain(&e)))?;
    let mut back = Blkback::new(
        platform.clone(),
        device,
        BackendConfig {
            batch: args.batch.clamp(1, 32),
            scratch_frame: SCRATCH_FRAME,
        },
    );
    back.attach(cfg).map_err(|e| {
        format!(
            "attaching to domain {}'s ring: {}",
            args.frontend,
            chain(&e)
        )
    })?;
    let port = back.port(0).unwrap_or(0);
    let resumed = program::connected(&mut xs, &platform, port, ours, &paths.back)?;
    let mut out = std::io::stdout().lock();
    say(
        &mut out,
        format_args!(
            "ready {} journaled={journaled} port={port} persistent={}",
            if resumed { "resumed" } else { "fresh" },
            ring.persistent
        ),
    );

    // 3. Serve.
    let mut clock = ServeClock::new();
    loop {
        back.run_once(Duration::from_millis(20))
            .map_err(|e| format!("serving: {}", chain(&e)))?;
        if let Some((ms, s)) = clock.first_answer(back.stats(0).filter(|s| s.answered > 0)) {
            say(
                &mut out,
                format_args!("first-answer ms_after_ready={ms} replayed={}", s.replayed),
            );
        }
        if let Some((_, e)) = back.failed().first() {
            return Err(format!("the ring failed: {e}"));
        }
        if clock.state_due() && program::frontend_closed(&mut xs, NAME, &paths.front, &paths.back) {
            return Ok(());
        }
        if clock.stats_due() {
            if let Some(s) = back.stats(0) {
                say(
                    &mut out,
                    format_args!(
                        "stats consumed={} replayed={} answered={} errors={} mapped={}",
                        s.consumed,
                        s.replayed,
                        s.answered,
                        s.errors,
                        platform.pin_stats().mapped
                    ),
                );
            }
        }
    }
}

fn main() -> ExitCode {
    program::main(NAME, || run(Args::parse()))
}
