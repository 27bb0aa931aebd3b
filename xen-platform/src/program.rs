//! What the backend programs (`xen-blkback`, `xen-netback`) do alike: start-up and error
//! exit, opening XenStore and the platform's devices, the toolstack's part, waiting for the
//! frontend, rebinding a journal's port after a restart, watching for the frontend to close,
//! and writing stdout lines. Each program keeps its device, its channel and its own stdout
//! lines (documented in its `//!`).
//!
//! Errors are one line of text for stderr (`<program>: <what>: <why>`): these run once, at
//! start-up, or end the program, and a supervisor reads them, not code.

use crate::evtchn::Evtchn;
use crate::gntdev::Gntdev;
use crate::handshake::{self, DevicePaths};
use crate::memory::LocalMemory;
use crate::platform::{link_text, DEFAULT_MAX_PERSISTENT};
use crate::xenstore::XenStore;
use crate::XenPlatform;
use devchan::grant::DomId;
use devchan::platform::{Platform, Port};
use devchan::xenbus::XenbusState;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The device arguments every backend program takes alike (`#[command(flatten)]` into its
/// own, after `--memory`): the inherited event-channel file, XenStore and the grant device.
#[derive(clap::Args, Debug)]
pub struct DeviceArgs {
    /// An open /dev/xen/evtchn inherited from the supervisor (ports survive the process).
    #[arg(long)]
    pub evtchn_fd: Option<i32>,
    /// XenStore: xenstored's socket or the xenbus device.
    #[arg(long, default_value = "/dev/xen/xenbus")]
    pub xenstore: PathBuf,
    /// The grant device.
    #[arg(long, default_value = "/dev/xen/gntdev")]
    pub gntdev: PathBuf,
}

/// `main` of a program named `name`: tracing to stderr (`RUST_LOG`, default `info`), then
/// `run`; its error becomes one stderr line `name: error` and a failure status.
pub fn main(name: &str, run: impl FnOnce() -> Result<(), String>) -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes, on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    link_text(e)
}

/// One stdout line, flushed at once (a supervisor waits for it).
pub fn say(out: &mut impl Write, line: std::fmt::Arguments<'_>) {
    let _ = out.write_fmt(line);
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

/// Open XenStore at `path` and read our domain id ([`own_domid`]).
pub fn open_xenstore(path: &Path) -> Result<(XenStore, DomId), String> {
    let mut xs =
        XenStore::open(path).map_err(|e| format!("XenStore {}: {}", path.display(), chain(&e)))?;
    let domid = own_domid(&mut xs);
    Ok((xs, domid))
}

/// Our own domain id (`domid` relative to our home, as Xen writes it for every domain;
/// 0 when missing or not a domain id, as for dom0 before `xen-init-dom0`).
pub fn own_domid(xs: &mut XenStore) -> DomId {
    xs.read_u64("domid")
        .ok()
        .flatten()
        .and_then(|d| DomId::try_from(d).ok())
        .unwrap_or(0)
}

/// Refuse `--evtchn-fd` naming a standard stream (it is not the supervisor's file).
pub fn refuse_standard_stream(evtchn_fd: Option<i32>) -> Result<(), String> {
    match evtchn_fd.filter(|fd| *fd <= 2) {
        Some(fd) => Err(format!("--evtchn-fd {fd} is a standard stream")),
        None => Ok(()),
    }
}

/// The platform on the grant device `gntdev`, the event-channel file (`evtchn_fd` inherited
/// from the supervisor, or `/dev/xen/evtchn` opened here) and the memory file `memory` of
/// `frames` frames; also the event-channel file's descriptor, which the platform owns and
/// keeps open as long as it lives (to sleep on: readable means an event is pending).
pub fn open_platform(
    domid: DomId,
    gntdev: &Path,
    evtchn_fd: Option<i32>,
    memory: &Path,
    frames: u64,
) -> Result<(Arc<XenPlatform>, RawFd), String> {
    let gntdev = Gntdev::open(gntdev).map_err(|e| chain(&e))?;
    refuse_standard_stream(evtchn_fd)?;
    let evtchn = match evtchn_fd {
        // SAFETY: the supervisor passes an open /dev/xen/evtchn descriptor nothing else in
        // this process uses (a standard stream was refused above); from here on the platform
        // owns it.
        Some(fd) => unsafe { Evtchn::from_fd(fd) },
        None => Evtchn::open(Path::new("/dev/xen/evtchn")).map_err(|e| chain(&e))?,
    };
    let fd = evtchn.as_raw_fd();
    let memory = LocalMemory::open(memory, frames).map_err(|e| chain(&e))?;
    let platform = XenPlatform::new(domid, gntdev, evtchn, memory, DEFAULT_MAX_PERSISTENT);
    Ok((Arc::new(platform), fd))
}

/// The toolstack's part, when asked (`--create`) and not done yet (no `state` in our
/// directory): `create` writes both directories. Says so on stderr as `name`.
pub fn create_if_missing<C, E: std::error::Error>(
    xs: &mut XenStore,
    asked: bool,
    name: &str,
    paths: &DevicePaths<C>,
    create: impl FnOnce(&mut XenStore) -> Result<(), E>,
) -> Result<(), String> {
    let (front, back) = (&paths.front, &paths.back);
    if asked
        && xs
            .read(&format!("{back}/state"))
            .map_err(|e| chain(&e))?
            .is_none()
    {
        create(xs).map_err(|e| chain(&e))?;
        eprintln!("{name}: created {front} and {back}");
    }
    Ok(())
}

/// Wait until the frontend at `front` published its ring keys (state 3 or 4), saying on
/// stderr every 30 s that it still waits.
pub fn wait_for_frontend(xs: &mut XenStore, name: &str, front: &str) -> Result<(), String> {
    let mut waited = Instant::now();
    loop {
        match handshake::state(xs, front).map_err(|e| chain(&e))? {
            XenbusState::Initialised | XenbusState::Connected => return Ok(()),
            s if waited.elapsed() > Duration::from_secs(30) => {
                eprintln!(
                    "{name}: still waiting for the frontend (state {})",
                    s.name()
                );
                waited = Instant::now();
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// After attaching the channel on local `port`: unmask the port (a previous process may have
/// died between taking an event and unmasking it) and, unless our state `ours` was Connected
/// already (a restart, the frontend saw nothing), write Connected into our directory `back`.
/// Returns whether this was a restart (`resumed` in the `ready` line).
pub fn connected(
    xs: &mut XenStore,
    p: &XenPlatform,
    port: Port,
    ours: XenbusState,
    back: &str,
) -> Result<bool, String> {
    let _ = p.evtchn_unmask(port);
    let resumed = ours == XenbusState::Connected;
    if !resumed {
        handshake::set_state(xs, back, XenbusState::Connected).map_err(|e| chain(&e))?;
    }
    Ok(resumed)
}

/// Whether the frontend at `front` is closing or closed; if so, our state `back` is set to
/// Closed (best effort) and it is said on stderr: the program then exits 0.
pub fn frontend_closed(xs: &mut XenStore, name: &str, front: &str, back: &str) -> bool {
    if !matches!(
        handshake::state(xs, front),
        Ok(XenbusState::Closing | XenbusState::Closed)
    ) {
        return false;
    }
    eprintln!("{name}: the frontend is closing; closing");
    let _ = handshake::set_state(xs, back, XenbusState::Closed);
    true
}

/// The serve loop's clock, started when the `ready` line is said: the `first-answer` line
/// once, the frontend's state every second, the `stats` line every 10 s.
pub struct ServeClock {
    ready_at: Instant,
    answered: bool,
    last_state: Instant,
    last_stats: Instant,
}

impl ServeClock {
    /// Started now (just after `ready`).
    pub fn new() -> Self {
        let now = Instant::now();
        Self {
            ready_at: now,
            answered: false,
            last_state: now,
            last_stats: now,
        }
    }

    /// The first time `answer` is something: it, with the milliseconds since ready (for the
    /// `first-answer` line); `None` before and ever after.
    pub fn first_answer<T>(&mut self, answer: Option<T>) -> Option<(u128, T)> {
        let a = answer.filter(|_| !self.answered)?;
        self.answered = true;
        Some((self.ready_at.elapsed().as_millis(), a))
    }

    /// Whether to look at the frontend's state now (a second passed since the last look).
    pub fn state_due(&mut self) -> bool {
        due(&mut self.last_state, Duration::from_secs(1))
    }

    /// Whether to print `stats` now (10 s passed since the last time).
    pub fn stats_due(&mut self) -> bool {
        due(&mut self.last_stats, Duration::from_secs(10))
    }
}

impl Default for ServeClock {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether more than `every` passed since `last`; if so, `last` is now.
fn due(last: &mut Instant, every: Duration) -> bool {
    if last.elapsed() > every {
        *last = Instant::now();
        true
    } else {
        false
    }
}

/// Where a channel journal's header keeps what a port rebind needs (each IDD documents its
/// layout): its magic, the fields naming the channel, the local port.
pub struct JournalHeader {
    /// The journal's first frame.
    pub frame: u64,
    /// The magic value at offset 0.
    pub magic: u32,
    /// (offset, value) of each little-endian u32 field that must match this channel.
    pub channel: Vec<(usize, u32)>,
    /// Offset of the local port.
    pub local_port: usize,
}

impl JournalHeader {
    /// Whether the journal belongs to this channel (magic and every field match).
    pub fn is_ours(&self, p: &XenPlatform) -> Result<bool, String> {
        let len = self
            .channel
            .iter()
            .map(|(o, _)| o + 4)
            .max()
            .unwrap_or(4)
            .max(4);
        let mut h = vec![0u8; len];
        p.read_local(self.frame, 0, &mut h)
            .map_err(|e| format!("journal: {e}"))?;
        let u = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
        Ok(u(0) == self.magic && self.channel.iter().all(|(o, v)| u(*o) == *v))
    }

    /// Without a supervisor-held event-channel file the journal's port died with the
    /// previous process: bind `guest`'s port `remote_port` again and record the new local
    /// port, so the journal resumes on a live port. Nothing to do for a journal of another
    /// channel (it starts fresh).
    pub fn rebind_port(
        &self,
        p: &XenPlatform,
        guest: DomId,
        remote_port: Port,
    ) -> Result<(), String> {
        if !self.is_ours(p)? {
            return Ok(());
        }
        let port = p
            .evtchn_bind_interdomain(guest, remote_port)
            .map_err(|e| format!("rebinding the frontend's port {remote_port}: {e}"))?;
        p.write_local(self.frame, self.local_port, &port.to_le_bytes())
            .map_err(|e| format!("journal: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn say_writes_one_flushed_line() {
        let mut out = Vec::new();
        say(&mut out, format_args!("ready fresh port={}", 5));
        assert_eq!(out, b"ready fresh port=5\n");
    }

    #[test]
    fn only_standard_streams_are_refused() {
        for fd in [0, 1, 2] {
            let e = refuse_standard_stream(Some(fd)).unwrap_err();
            assert!(e.contains("standard stream"), "{e}");
        }
        assert!(refuse_standard_stream(Some(3)).is_ok());
        assert!(refuse_standard_stream(None).is_ok());
    }

    #[test]
    fn a_missing_xenstore_is_one_clear_error() {
        let e = open_xenstore(Path::new("/nonexistent/xenstored"))
            .err()
            .unwrap();
        assert!(e.starts_with("XenStore /nonexistent/xenstored: "), "{e}");
    }

    #[test]
    fn create_if_missing_creates_once() {
        struct T;
        impl handshake::DeviceClass for T {
            const NAME: &'static str = "t";
        }
        let mut xs = crate::xenstore::testing::fake();
        let p = DevicePaths::<T>::new(0, 1, 2);
        let mut calls = 0;
        for _ in 0..2 {
            create_if_missing(&mut xs, true, "t", &p, |xs| {
                calls += 1;
                handshake::set_state(xs, &p.back, XenbusState::InitWait)
            })
            .unwrap();
        }
        assert_eq!(calls, 1);
        let q = DevicePaths::<T>::new(0, 1, 3);
        create_if_missing(&mut xs, false, "t", &q, |_| {
            Err(crate::xenstore::XenStoreError::Malformed("not asked"))
        })
        .unwrap();
    }

    /// A platform on `/dev/null` devices (every ioctl fails) and a memory file in `dir`.
    fn offline(dir: &Path) -> Arc<XenPlatform> {
        use std::os::fd::IntoRawFd;
        let fd = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .unwrap()
            .into_raw_fd();
        let (p, got) =
            open_platform(0, Path::new("/dev/null"), Some(fd), &dir.join("mem"), 4).unwrap();
        assert_eq!(got, fd);
        p
    }

    #[test]
    fn the_journal_port_is_rebound_only_for_this_channel() {
        let dir = tempfile::tempdir().unwrap();
        let p = offline(dir.path());
        let j = JournalHeader {
            frame: 1,
            magic: 0x1234_5678,
            channel: vec![(8, 9), (12, 7)],
            local_port: 16,
        };
        // A fresh (zero) journal, then one of another channel: nothing to rebind.
        assert!(!j.is_ours(&p).unwrap());
        j.rebind_port(&p, 3, 7).unwrap();
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&0x1234_5678u32.to_le_bytes());
        h[8..12].copy_from_slice(&9u32.to_le_bytes());
        h[12..16].copy_from_slice(&8u32.to_le_bytes());
        p.write_local(1, 0, &h).unwrap();
        assert!(!j.is_ours(&p).unwrap());
        j.rebind_port(&p, 3, 7).unwrap();
        // Ours: the rebind is tried (and fails here, on /dev/null, with the port named).
        p.write_local(1, 12, &7u32.to_le_bytes()).unwrap();
        assert!(j.is_ours(&p).unwrap());
        let e = j.rebind_port(&p, 3, 7).unwrap_err();
        assert!(e.starts_with("rebinding the frontend's port 7: "), "{e}");
    }

    #[test]
    fn connected_leaves_a_resumed_backend_alone() {
        let dir = tempfile::tempdir().unwrap();
        let p = offline(dir.path());
        let mut xs = crate::xenstore::testing::fake();
        xs.write("/b/state", "2").unwrap();
        assert!(!connected(&mut xs, &p, 5, XenbusState::InitWait, "/b").unwrap());
        assert_eq!(xs.read("/b/state").unwrap().as_deref(), Some("4"));
        xs.write("/c/state", "marker").unwrap();
        assert!(connected(&mut xs, &p, 5, XenbusState::Connected, "/c").unwrap());
        assert_eq!(xs.read("/c/state").unwrap().as_deref(), Some("marker"));
    }

    #[test]
    fn the_first_answer_is_said_once() {
        let mut c = ServeClock::new();
        assert!(c.first_answer(None::<u32>).is_none());
        assert_eq!(c.first_answer(Some(7)).map(|(_, a)| a), Some(7));
        assert!(c.first_answer(Some(8)).is_none());
        // Just started: neither the state look nor the stats are due yet.
        assert!(!c.stats_due());
        let mut last = Instant::now() - Duration::from_secs(2);
        assert!(due(&mut last, Duration::from_secs(1)));
        assert!(!due(&mut last, Duration::from_secs(1)));
    }

    #[test]
    fn frontend_closed_closes_us() {
        let mut xs = crate::xenstore::testing::fake();
        xs.write("/f/state", "4").unwrap();
        assert!(!frontend_closed(&mut xs, "t", "/f", "/b"));
        xs.write("/f/state", "5").unwrap();
        assert!(frontend_closed(&mut xs, "t", "/f", "/b"));
        assert_eq!(xs.read("/b/state").unwrap().as_deref(), Some("6"));
    }
}
