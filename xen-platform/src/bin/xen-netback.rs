//! `xen-netback`: idd-net's `Netback` as a userspace Xen network backend for one guest vif.
//!
//! Runs in the backend domain (dom0 in the testbed) on [`XenPlatform`], with a TAP interface
//! of that domain as the device ([`TapNic`]): frames the guest sends come out of the TAP into
//! the domain's network stack, frames the stack sends to the TAP go to the guest. Every frame
//! byte crosses the platform's software IOMMU: transmit fragments are the guest's grants,
//! pinned as persistent gntdev mappings; receive buffers are our own frames (self-grants),
//! grant-copied into the guest's buffers afterwards. Copy only: a userspace backend on Xen
//! cannot exchange pages (no `GNTTABOP_transfer` through gntdev), and Linux's netfront only
//! uses `feature-rx-copy` anyway; a frontend asking for exchange (`request-rx-copy` = 0) is
//! refused with that reason.
//!
//! # Flags (what a supervisor passes)
//!
//! | flag | meaning |
//! |---|---|
//! | `--frontend D` | the guest's domain id |
//! | `--handle N` | the vif number (`device/vif/N`; default 0) |
//! | `--mac M` | the guest's MAC (`xx:xx:xx:xx:xx:xx`): the only source it may send from, where unicast frames go; written to both directories with `--create` |
//! | `--tap IFNAME` | the TAP interface (created if missing and made persistent: it and dom0's address on it outlive this process) |
//! | `--memory FILE` | the backend's memory (tmpfs; kept across restarts): pool record, header copies, receive pool, the channel's journal (`idd_net::layout`, [`frames_needed`]`(1)` frames) |
//! | `--evtchn-fd FD` | an open `/dev/xen/evtchn` inherited from the supervisor (the bound port survives the process). Use a file of its own, not xen-blkback's: two processes reading one event-channel file take each other's events |
//! | `--xenstore PATH` | `/dev/xen/xenbus` (default) or xenstored's socket |
//! | `--create` | also be the toolstack: write both vif directories if ours does not exist yet (`xen_platform::vif::create`) |
//! | `--batch N` | packets taken from the ring per round (default 32) |
//!
//! # Lifecycle
//!
//! 0. Makes the TAP persistent and attaches to it; with `--create`, writes the directories.
//! 1. Writes `feature-rx-copy` = 1, `feature-rx-flip` = 0 and `state` = 2, unless its state is
//!    4 already (a restart), waits for the frontend's rings (`state` 3 or 4: Linux's netfront
//!    goes to 4 by itself once it wrote them) and parses them (`xen_platform::vif`).
//! 2. Releases what a previous process recorded (pool record, journal pins), sets up the
//!    pool, attaches the channel: maps both rings, binds the port (or, restarted, finds the
//!    port bound in the supervisor's event-channel file and the journal in the memory file:
//!    unanswered transmits are sent again, consumed receive requests are kept), unmasks the
//!    port, writes `state` = 4 if it was not.
//! 3. Prints `ready ...` and serves until killed, or until the frontend closes (then `state`
//!    = 6 and exit 0).
//!
//! # stdout
//!
//! * `ready fresh|resumed journaled=N port=P tap=IFNAME up=U` (`N`: transmit slots the
//!   journal held as consumed and unanswered; `U`: `/proc/uptime` when the line was written, so
//!   a supervisor measures kill → ready without polling);
//! * `first-answer ms_after_ready=T tx=A rx=B replayed=R up=U`: the first transmit answered
//!   or frame delivered to the guest by this process;
//! * every 10 s `stats tx=.. txb=.. rx=.. rxb=.. drop=.. spoof=.. errors=.. replayed=..
//!   unclaimed=.. tap_rx_bad=.. tap_rx_overflow=.. mapped=.. cpu_ms=..` (`mapped`: grant
//!   mappings made; `cpu_ms`: this process's CPU time so far).
//!
//! # Idle
//!
//! netback's `run_once` waits on the event channel and on the device in turn, 0.5 ms each
//! (the `Platform` and `NetDevice` traits cannot wait on both at once). When a round found
//! nothing to do, this program sleeps instead in one `poll(2)` on the event-channel file and
//! the TAP device's wake-up descriptor ([`TapNic::wake_fd`]), up to 100 ms, so an idle
//! backend does not wake thousands of times a second.
//!
//! Diagnostics go to stderr.

use clap::Parser;
use devchan::platform::Platform;
use idd_net::filter::Mac;
use idd_net::layout::{
    frames_needed, journal_frame, HEADER_FIRST_FRAME, HEADER_FRAMES, RECORD_FRAME, RX_FIRST_FRAME,
    RX_FRAMES,
};
use idd_net::netback::{self, BackendConfig, ChannelConfig, Netback, SPARES};
use std::os::fd::BorrowedFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use xen_platform::program::{self, chain, say, JournalHeader, ServeClock};
use xen_platform::tapnic::{self, wait_readable, TapNic};
use xen_platform::vif::{self, FrontendRings, VifPaths};
use xen_platform::XenPlatform;

/// The program's name on stderr.
const NAME: &str = "xen-netback";
/// Longest idle sleep (the loop also checks the frontend's state and prints stats).
const IDLE_WAIT: Duration = Duration::from_millis(100);
/// Journal header offsets (idd-net's documented layout) a port rebind needs.
const J_TX_RING_REF: usize = 8;
const J_RX_RING_REF: usize = 12;
const J_REMOTE_PORT: usize = 16;
const J_LOCAL_PORT: usize = 20;
const J_VALID: usize = 64;

#[derive(Parser, Debug)]
#[command(
    about = "Userspace Xen network backend (idd-net's netback on /dev/xen, a TAP as the wire)"
)]
struct Args {
    /// The frontend's domain id.
    #[arg(long)]
    frontend: u16,
    /// The vif number (device/vif/N).
    #[arg(long, default_value_t = 0)]
    handle: u32,
    /// The guest's MAC address.
    #[arg(long)]
    mac: Mac,
    /// The TAP interface in this domain (created and made persistent if missing).
    #[arg(long)]
    tap: String,
    /// The backend's memory file (journal, pools), on tmpfs; kept across restarts.
    #[arg(long)]
    memory: PathBuf,
    #[command(flatten)]
    dev: program::DeviceArgs,
    /// Also be the toolstack: create both vif directories if ours does not exist yet.
    #[arg(long)]
    create: bool,
    /// Packets taken from the ring per round.
    #[arg(long, default_value_t = 32)]
    batch: usize,
}

fn run(args: Args) -> Result<(), String> {
    program::refuse_standard_stream(args.dev.evtchn_fd)?;
    let (mut xs, domid) = program::open_xenstore(&args.dev.xenstore)?;
    let paths = VifPaths::new(domid, args.frontend, args.handle);
    let inherited = args.dev.evtchn_fd.is_some();
    // The event-channel file's descriptor is kept: the idle loop sleeps on it (readable = an
    // event is pending), without reading it (netback's `run_once` reads and unmasks).
    let (platform, evtchn_fd) = program::open_platform(
        domid,
        &args.dev.gntdev,
        args.dev.evtchn_fd,
        &args.memory,
        frames_needed(1),
    )?;
    tapnic::make_persistent(&args.tap).map_err(|e| chain(&e))?;

    // 0. The toolstack's part, when asked and not done yet.
    program::create_if_missing(&mut xs, args.create, NAME, &paths, |xs| {
        vif::create(
            xs,
            &paths,
            domid,
            args.frontend,
            args.handle,
            &args.mac.to_string(),
        )
    })?;
    // 1. XenStore handshake (or find it done: a restart).
    let ours = vif::advertise(&mut xs, &paths).map_err(|e| chain(&e))?;
    eprintln!(
        "xen-netback: domain {domid}, {} (mac {}, tap {}), backend state {}",
        paths.back,
        args.mac,
        args.tap,
        ours.name()
    );
    program::wait_for_frontend(&mut xs, NAME, &paths.front)?;
    let rings = FrontendRings::read(&mut xs, &paths).map_err(|e| chain(&e))?;

    // 2. Attach (resuming from the journal when it belongs to these rings).
    let cfg = ChannelConfig {
        guest: args.frontend,
        tx_ring_ref: rings.tx_ring_ref,
        rx_ring_ref: rings.rx_ring_ref,
        remote_port: rings.event_channel,
        mac: args.mac,
        rx_copy: true,
        credit: None,
        nets: Vec::new(),
        journal_frame: journal_frame(0),
    };
    let journal = JournalHeader {
        frame: cfg.journal_frame,
        magic: idd_net::journal::MAGIC,
        channel: vec![
            (J_TX_RING_REF, cfg.tx_ring_ref),
            (J_RX_RING_REF, cfg.rx_ring_ref),
            (J_REMOTE_PORT, cfg.remote_port),
        ],
        local_port: J_LOCAL_PORT,
    };
    if !inherited {
        journal.rebind_port(&platform, cfg.guest, cfg.remote_port)?;
    }
    let journaled = journal_count(&platform, &journal)?;
    // Before anything of this process is pinned: the previous process's pins and
    // self-grants (they died with it here, but the records must be cleared).
    netback::release_previous(&*platform, RECORD_FRAME, [cfg.journal_frame])
        .map_err(|e| format!("releasing the previous process's records: {}", chain(&e)))?;
    let rx_capacity = usize::try_from(RX_FRAMES).unwrap_or(usize::MAX) - SPARES;
    let device = TapNic::open(
        &args.tap,
        platform.dma(),
        [0xfe, 0xff, 0xff, 0xff, 0xff, 0xff],
        rx_capacity,
    )
    .map_err(|e| chain(&e))?;
    let mut back = Netback::new(
        platform.clone(),
        device,
        BackendConfig {
            record_frame: RECORD_FRAME,
            header_frames: (HEADER_FIRST_FRAME..HEADER_FIRST_FRAME + HEADER_FRAMES).collect(),
            rx_frames: (RX_FIRST_FRAME..RX_FIRST_FRAME + RX_FRAMES).collect(),
            batch: args.batch.clamp(1, 64),
        },
    )
    .map_err(|e| format!("setting up the pool: {}", chain(&e)))?;
    back.attach(cfg).map_err(|e| {
        format!(
            "attaching to domain {}'s rings: {}",
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
            "ready {} journaled={journaled} port={port} tap={} up={}",
            if resumed { "resumed" } else { "fresh" },
            args.tap,
            uptime()
        ),
    );

    // 3. Serve.
    let mut clock = ServeClock::new();
    loop {
        let work = back
            .run_once(Duration::from_millis(20))
            .map_err(|e| format!("serving: {}", chain(&e)))?;
        // Idle: `run_once` armed the rings' notifications (its final check) and took any
        // event; one more poll catches work that event announced. Then sleep on the event
        // channel and the TAP together, instead of run_once's alternating 0.5 ms waits.
        if work == 0 && back.poll().map_err(|e| format!("serving: {}", chain(&e)))? == 0 {
            // SAFETY: the platform owns `evtchn_fd` and outlives this borrow.
            let ev = unsafe { BorrowedFd::borrow_raw(evtchn_fd) };
            wait_readable(&[ev, back.device().wake_fd()], IDLE_WAIT)
                .map_err(|e| format!("waiting: {e}"))?;
        }
        if let Some((ms, s)) = clock.first_answer(
            back.stats(0)
                .filter(|s| s.tx + s.rx + s.errors + s.spoof > 0),
        ) {
            say(
                &mut out,
                format_args!(
                    "first-answer ms_after_ready={ms} tx={} rx={} replayed={} up={}",
                    s.tx,
                    s.rx,
                    s.replayed,
                    uptime()
                ),
            );
        }
        if let Some((_, e)) = back.failed().first() {
            return Err(format!("the rings failed: {e}"));
        }
        if clock.state_due() && program::frontend_closed(&mut xs, NAME, &paths.front, &paths.back) {
            return Ok(());
        }
        if clock.stats_due() {
            if let Some(s) = back.stats(0) {
                say(
                    &mut out,
                    format_args!(
                        "stats tx={} txb={} rx={} rxb={} drop={} spoof={} errors={} replayed={} unclaimed={} tap_rx_bad={} tap_rx_overflow={} mapped={} cpu_ms={}",
                        s.tx,
                        s.txb,
                        s.rx,
                        s.rxb,
                        s.drop,
                        s.spoof,
                        s.errors,
                        s.replayed,
                        back.unclaimed(),
                        back.device().stats().rx_bad,
                        back.device().stats().rx_overflow,
                        platform.pin_stats().mapped,
                        cpu_ms()
                    ),
                );
            }
        }
    }
}

/// The domain's uptime as `/proc/uptime` gives it (seconds, two decimals; `?` if unreadable):
/// a supervisor subtracts the time it killed the previous process, without polling.
fn uptime() -> String {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit() || b == b'.'))
        .unwrap_or_else(|| "?".into())
}

/// CPU time (user + system) this process used so far, in milliseconds.
fn cpu_ms() -> u64 {
    // SAFETY: all-zero is a valid `rusage`; getrusage fills the one passed, which outlives
    // the call.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0;
    }
    let ms = |t: libc::timeval| {
        u64::try_from(t.tv_sec).unwrap_or(0) * 1000 + u64::try_from(t.tv_usec).unwrap_or(0) / 1000
    };
    ms(ru.ru_utime) + ms(ru.ru_stime)
}

/// Transmit slots the journal holds as consumed and unanswered (0 for a journal of other
/// rings: the channel starts fresh).
fn journal_count(p: &XenPlatform, journal: &JournalHeader) -> Result<u32, String> {
    if !journal.is_ours(p)? {
        return Ok(0);
    }
    let mut v = [0u8; 32];
    p.read_local(journal.frame, J_VALID, &mut v)
        .map_err(|e| format!("journal: {e}"))?;
    Ok(v.iter().map(|b| b.count_ones()).sum())
}

fn main() -> ExitCode {
    program::main(NAME, || run(Args::parse()))
}
