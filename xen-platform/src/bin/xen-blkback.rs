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
use devchan::xenbus::XenbusState;
use idd_blk::blkback::{BackendConfig, Blkback, ChannelConfig, Region};
use idd_blk::device::FileDevice;
use idd_blk::layout::{JOURNAL_FIRST_FRAME, SCRATCH_FRAME};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};
use xen_platform::evtchn::Evtchn;
use xen_platform::gntdev::Gntdev;
use xen_platform::memory::LocalMemory;
use xen_platform::platform::{link_text, DEFAULT_MAX_PERSISTENT};
use xen_platform::vbd::{self, VbdPaths};
use xen_platform::xenstore::XenStore;
use xen_platform::XenPlatform;

/// Frames of the memory file: up to the journal of one channel and one spare.
const FRAMES: u64 = JOURNAL_FIRST_FRAME + 4;
/// Journal header: offsets of the fields a port rebind rewrites (idd-blk's documented layout).
const J_MAGIC: usize = 0;
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
    /// An open /dev/xen/evtchn inherited from the supervisor (ports survive the process).
    #[arg(long)]
    evtchn_fd: Option<i32>,
    /// XenStore: xenstored's socket or the xenbus device.
    #[arg(long, default_value = "/dev/xen/xenbus")]
    xenstore: PathBuf,
    /// The grant device.
    #[arg(long, default_value = "/dev/xen/gntdev")]
    gntdev: PathBuf,
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

fn chain(e: &dyn std::error::Error) -> String {
    link_text(e)
}

fn run(args: Args) -> Result<(), String> {
    let mut xs = XenStore::open(&args.xenstore)
        .map_err(|e| format!("XenStore {}: {}", args.xenstore.display(), chain(&e)))?;
    let domid = xs
        .read_u64("domid")
        .ok()
        .flatten()
        .and_then(|d| u16::try_from(d).ok())
        .unwrap_or(0);
    let paths = VbdPaths::new(domid, args.frontend, args.devid);
    let image = std::fs::OpenOptions::new()
        .read(true)
        .write(!args.read_only)
        .open(&args.image)
        .map_err(|e| format!("image {}: {e}", args.image.display()))?;
    let gntdev = Gntdev::open(&args.gntdev).map_err(|e| chain(&e))?;
    let inherited = args.evtchn_fd.is_some();
    let evtchn = match args.evtchn_fd {
        // SAFETY: the supervisor passes an open /dev/xen/evtchn descriptor nothing else in
        // this process uses; from here on the platform owns it.
        Some(fd) if fd > 2 => unsafe { Evtchn::from_fd(fd) },
        Some(fd) => return Err(format!("--evtchn-fd {fd} is a standard stream")),
        None => Evtchn::open(std::path::Path::new("/dev/xen/evtchn")).map_err(|e| chain(&e))?,
    };
    let memory = LocalMemory::open(&args.memory, FRAMES).map_err(|e| chain(&e))?;
    let platform = Arc::new(XenPlatform::new(
        domid,
        gntdev,
        evtchn,
        memory,
        DEFAULT_MAX_PERSISTENT,
    ));
    let device = FileDevice::new(image, platform.dma(), args.read_only)
        .map_err(|e| format!("image {}: {e}", args.image.display()))?;
    let sectors = idd_blk::device::BlockDevice::capacity(&device);

    // 0. The toolstack's part, when asked and not done yet.
    if args.create
        && xs
            .read(&format!("{}/state", paths.back))
            .map_err(|e| chain(&e))?
            .is_none()
    {
        vbd::create(
            &mut xs,
            &paths,
            domid,
            args.frontend,
            args.devid,
            args.read_only,
        )
        .map_err(|e| chain(&e))?;
        eprintln!("xen-blkback: created {} and {}", paths.front, paths.back);
    }
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
    let mut waited = Instant::now();
    loop {
        match vbd::state(&mut xs, &paths.front).map_err(|e| chain(&e))? {
            XenbusState::Initialised | XenbusState::Connected => break,
            s if waited.elapsed() > Duration::from_secs(30) => {
                eprintln!(
                    "xen-blkback: still waiting for the frontend (state {})",
                    s.name()
                );
                waited = Instant::now();
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(50));
    }
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
        rebind_journal_port(&platform, &cfg)?;
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
    // A previous process may have died between taking an event and unmasking the port.
    let _ = platform.evtchn_unmask(port);
    let resumed = ours == XenbusState::Connected;
    if !resumed {
        vbd::connect(&mut xs, &paths).map_err(|e| chain(&e))?;
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "ready {} journaled={journaled} port={port} persistent={}",
        if resumed { "resumed" } else { "fresh" },
        ring.persistent
    );
    let _ = out.flush();

    // 3. Serve.
    let (mut last_stats, mut last_state) = (Instant::now(), Instant::now());
    let ready_at = Instant::now();
    let mut first_answer = false;
    loop {
        back.run_once(Duration::from_millis(20))
            .map_err(|e| format!("serving: {}", chain(&e)))?;
        if let Some(s) = back.stats(0).filter(|s| !first_answer && s.answered > 0) {
            first_answer = true;
            let _ = writeln!(
                out,
                "first-answer ms_after_ready={} replayed={}",
                ready_at.elapsed().as_millis(),
                s.replayed
            );
            let _ = out.flush();
        }
        if let Some((_, e)) = back.failed().first() {
            return Err(format!("the ring failed: {e}"));
        }
        if last_state.elapsed() > Duration::from_secs(1) {
            last_state = Instant::now();
            if matches!(
                vbd::state(&mut xs, &paths.front),
                Ok(XenbusState::Closing | XenbusState::Closed)
            ) {
                eprintln!("xen-blkback: the frontend is closing; closing");
                let _ = xs.write(
                    &format!("{}/state", paths.back),
                    &XenbusState::Closed.to_xenstore(),
                );
                return Ok(());
            }
        }
        if last_stats.elapsed() > Duration::from_secs(10) {
            last_stats = Instant::now();
            if let Some(s) = back.stats(0) {
                let _ = writeln!(
                    out,
                    "stats consumed={} replayed={} answered={} errors={} mapped={}",
                    s.consumed,
                    s.replayed,
                    s.answered,
                    s.errors,
                    platform.pin_stats().mapped
                );
                let _ = out.flush();
            }
        }
    }
}

/// Without a supervisor-held event-channel file, the journal's port died with the previous
/// process: bind the frontend's port again and record the new local port, so the journal
/// resumes on a live port. Nothing to do for a journal of another ring (it starts fresh).
fn rebind_journal_port(p: &XenPlatform, cfg: &ChannelConfig) -> Result<(), String> {
    let mut h = [0u8; 20];
    p.read_local(cfg.journal_frame, 0, &mut h)
        .map_err(|e| format!("journal: {e}"))?;
    let u = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
    if u(J_MAGIC) != idd_blk::journal::MAGIC
        || u(J_REMOTE_PORT) != cfg.remote_port
        || u(J_RING_REF) != cfg.ring_ref
    {
        return Ok(());
    }
    let port = p
        .evtchn_bind_interdomain(cfg.guest, cfg.remote_port)
        .map_err(|e| format!("rebinding the frontend's port {}: {e}", cfg.remote_port))?;
    p.write_local(cfg.journal_frame, J_LOCAL_PORT, &port.to_le_bytes())
        .map_err(|e| format!("journal: {e}"))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xen-blkback: {e}");
            ExitCode::FAILURE
        }
    }
}
