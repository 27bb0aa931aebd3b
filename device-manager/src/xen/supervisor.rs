//! The supervisor: one backend process per guest device, restarted when it exits, holding
//! what must outlive it.
//!
//! # What outlives a backend process
//!
//! | held here | given to the process as | why |
//! |---|---|---|
//! | an open event-channel file per backend (`/dev/xen/evtchn`) | `--evtchn-fd N` (the same number; close-on-exec cleared in the child only) | a port bound on it stays bound when the process dies, so the guest's event channel survives the restart |
//! | the memory file, `<run-dir>/<guest>-<dev>.mem` (tmpfs) | `--memory PATH` (in the spec's arguments) | the backend's journal of requests in flight, replayed by the next process |
//!
//! The file is opened once, when the backend is added, and every process of that backend
//! inherits the *same open file description* (not a reopened file): that is what keeps the
//! ports bound. Each backend gets its own, so one backend's ports are never another's, and
//! nothing else: every other descriptor above stderr is made close-on-exec in the child.
//!
//! # Restart
//!
//! A process that exits with status 0 has finished (its frontend closed): it is not
//! restarted. Any other exit (a signal, a failure) is restarted while the device's budget
//! lasts: at most `max_restarts` within `window` (the policy's `[restart]`); the one after
//! that gives up on the device (`gave-up`). A process that had printed `ready` is restarted
//! at once (the guest is waiting); one that died before `ready` is restarted after a backoff
//! that doubles with each such failure in a row (from [`Budget::backoff`], at most
//! [`Budget::backoff_max`]), so a backend that cannot start does not spin.
//!
//! Exits are observed with `waitid(WEXITED | WNOWAIT)` in a thread per process (the time of
//! death, without reaping: the pid cannot be reused before the supervisor reaps it), and the
//! process's stdout by a reader thread per process; both feed one channel, so the supervisor
//! is a single loop. The restart time reported is from the exit seen to the new process's
//! `ready` line read.
//!
//! # Events (one line each, [`Event`]'s `Display`)
//!
//! ```text
//! started web/xvda pid=812
//! ready web/xvda pid=812 start-to-ready-ms=140 (ready fresh journaled=0 port=7 persistent=true)
//! out web/xvda pid=812: first-answer ms_after_ready=3 replayed=0
//! exited web/xvda pid=812 signal 9 after 4210 ms; restarting now (restart 1 of at most 50 in 60 s)
//! started web/xvda pid=835
//! restarted web/xvda pid=835 exit-to-ready-ms=290 restarts=1 (ready resumed journaled=2 port=7 persistent=true)
//! finished web/xvda pid=835 exit 0 (its frontend closed)
//! gave-up web/xvda after 51 restarts within 60 s
//! summary web/xvda starts=21 restarts=20 exit-to-ready-ms mean=301 max=540 state=running
//! ```
//!
//! Lines a backend prints other than `ready` are passed on as `out`; its stderr goes to
//! `<log-dir>/<guest>-<dev>.err` (appended across restarts), or is inherited without a log dir.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

/// The longest stdout line of a backend kept (the rest of the line is dropped).
pub const MAX_LINE: u64 = 4096;

/// Why a backend could not be added or started.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// The event-channel device could not be opened.
    #[error("{name}: opening the event-channel device {path}")]
    Evtchn {
        /// The backend.
        name: String,
        /// The device.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The memory file could not be created.
    #[error("{name}: creating the memory file {path}")]
    Memory {
        /// The backend.
        name: String,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The program could not be started.
    #[error("{name}: starting {program}")]
    Spawn {
        /// The backend.
        name: String,
        /// The program.
        program: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// How often a backend may be restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Restarts allowed within `window`.
    pub max_restarts: u32,
    /// The counting window.
    pub window: Duration,
    /// The first delay before restarting a process that died before `ready`.
    pub backoff: Duration,
    /// The longest such delay.
    pub backoff_max: Duration,
}

impl Budget {
    /// The policy's restart settings, with a 100 ms .. 5 s backoff.
    pub fn from_policy(r: &policy::RestartPolicy) -> Self {
        Self {
            max_restarts: r.max_restarts,
            window: Duration::from_micros(r.window_us),
            backoff: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }

    /// The delay after `n` failures before `ready` in a row (0 for none).
    pub fn delay(&self, n: u32) -> Duration {
        if n == 0 {
            return Duration::ZERO;
        }
        let f = 1u32
            .checked_shl(n.saturating_sub(1).min(16))
            .unwrap_or(u32::MAX);
        self.backoff.saturating_mul(f).min(self.backoff_max)
    }
}

/// One backend to supervise.
#[derive(Debug, Clone)]
pub struct BackendSpec {
    /// Its name in events and file names (`guest/xvda`).
    pub name: String,
    /// The program.
    pub program: PathBuf,
    /// Its arguments; `--evtchn-fd N` is appended.
    pub args: Vec<OsString>,
    /// The event-channel device to open for it (`/dev/xen/evtchn`).
    pub evtchn: PathBuf,
    /// Its memory file, created empty when the backend is added (a fresh device has no
    /// journal), kept across its restarts.
    pub memory: Option<PathBuf>,
    /// Its restart budget.
    pub budget: Budget,
}

/// Where a backend stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// A process runs.
    Running,
    /// Waiting out a backoff before the next start.
    Waiting,
    /// Exited 0: not restarted.
    Finished,
    /// The budget ran out, or it could not be started.
    Failed,
}

/// What happened to a backend over the supervisor's life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The backend.
    pub name: String,
    /// Processes started.
    pub starts: u32,
    /// Of which restarts.
    pub restarts: u32,
    /// Exit → `ready` of each restart that reached `ready`.
    pub exit_to_ready: Vec<Duration>,
    /// Where it stands.
    pub phase: Phase,
}

/// One thing that happened; `Display` is its event line (the module docs show each).
#[allow(missing_docs)] // the same few fields throughout: the backend, its pid, the line
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A process started.
    Started { name: String, pid: u32 },
    /// The first process printed `ready`.
    Ready {
        name: String,
        pid: u32,
        after: Duration,
        line: String,
    },
    /// A restarted process printed `ready`.
    Restarted {
        name: String,
        pid: u32,
        exit_to_ready: Duration,
        restarts: u32,
        line: String,
    },
    /// Another stdout line of a backend.
    Output {
        name: String,
        pid: u32,
        line: String,
    },
    /// A process exited; `restart_in` is `None` when it is not restarted.
    Exited {
        name: String,
        pid: u32,
        status: String,
        uptime: Duration,
        restart_in: Option<Duration>,
        restart: u32,
        budget: Budget,
    },
    /// A process exited 0.
    Finished { name: String, pid: u32 },
    /// The budget ran out.
    GaveUp {
        name: String,
        restarts: u32,
        window: Duration,
    },
    /// A start failed.
    StartFailed { name: String, error: String },
    /// The end of the supervisor: one per backend.
    Summary(Summary),
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Started { name, pid } => write!(f, "started {name} pid={pid}"),
            Event::Ready {
                name,
                pid,
                after,
                line,
            } => {
                write!(
                    f,
                    "ready {name} pid={pid} start-to-ready-ms={} ({line})",
                    ms(*after)
                )
            }
            Event::Restarted {
                name,
                pid,
                exit_to_ready,
                restarts,
                line,
            } => write!(
                f,
                "restarted {name} pid={pid} exit-to-ready-ms={} restarts={restarts} ({line})",
                ms(*exit_to_ready)
            ),
            Event::Output { name, pid, line } => write!(f, "out {name} pid={pid}: {line}"),
            Event::Exited {
                name,
                pid,
                status,
                uptime,
                restart_in,
                restart,
                budget,
            } => {
                write!(
                    f,
                    "exited {name} pid={pid} {status} after {} ms",
                    ms(*uptime)
                )?;
                match restart_in {
                    Some(d) if d.is_zero() => write!(f, "; restarting now")?,
                    Some(d) => write!(f, "; restarting in {} ms (it died before ready)", ms(*d))?,
                    None => return Ok(()),
                }
                write!(
                    f,
                    " (restart {restart} of at most {} in {} s)",
                    budget.max_restarts,
                    budget.window.as_secs()
                )
            }
            Event::Finished { name, pid } => {
                write!(f, "finished {name} pid={pid} exit 0 (its frontend closed)")
            }
            Event::GaveUp {
                name,
                restarts,
                window,
            } => write!(
                f,
                "gave-up {name} after {restarts} restarts within {} s",
                window.as_secs()
            ),
            Event::StartFailed { name, error } => write!(f, "start-failed {name}: {error}"),
            Event::Summary(s) => {
                let n = s.exit_to_ready.len() as u128;
                let total: u128 = s.exit_to_ready.iter().map(|d| d.as_millis()).sum();
                let max = s.exit_to_ready.iter().max().map_or(0, |d| d.as_millis());
                write!(
                    f,
                    "summary {} starts={} restarts={} exit-to-ready-ms mean={} max={} state={}",
                    s.name,
                    s.starts,
                    s.restarts,
                    total.checked_div(n).unwrap_or(0),
                    max,
                    match s.phase {
                        Phase::Running => "running",
                        Phase::Waiting => "waiting",
                        Phase::Finished => "finished",
                        Phase::Failed => "failed",
                    }
                )
            }
        }
    }
}

enum Msg {
    Line {
        slot: usize,
        gen: u64,
        line: String,
        at: Instant,
    },
    Exited {
        slot: usize,
        gen: u64,
        at: Instant,
    },
    Stop,
}

/// Asks a running [`Supervisor::run`] to stop its backends and return.
#[derive(Clone)]
pub struct StopHandle(Sender<Msg>);

impl StopHandle {
    /// Stop (idempotent; no effect once `run` returned).
    pub fn stop(&self) {
        let _ = self.0.send(Msg::Stop);
    }
}

struct Slot {
    spec: BackendSpec,
    evtchn: File,
    _memory: Option<File>,
    child: Option<Child>,
    gen: u64,
    spawned: Instant,
    ready: bool,
    exited_at: Option<Instant>,
    restarts_in_window: VecDeque<Instant>,
    failures_before_ready: u32,
    next_start: Option<Instant>,
    phase: Phase,
    starts: u32,
    restarts: u32,
    exit_to_ready: Vec<Duration>,
}

/// The supervisor of a set of backends.
pub struct Supervisor {
    slots: Vec<Slot>,
    log_dir: Option<PathBuf>,
    tx: Sender<Msg>,
    rx: Receiver<Msg>,
}

impl Supervisor {
    /// An empty supervisor; `log_dir` receives each backend's stderr.
    pub fn new(log_dir: Option<PathBuf>) -> Self {
        let (tx, rx) = channel();
        Self {
            slots: Vec::new(),
            log_dir,
            tx,
            rx,
        }
    }

    /// A handle that stops [`Supervisor::run`].
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.tx.clone())
    }

    /// Add a backend: opens its event-channel file and creates its memory file (empty).
    pub fn add(&mut self, spec: BackendSpec) -> Result<(), SupervisorError> {
        let evtchn = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&spec.evtchn)
            .map_err(|source| SupervisorError::Evtchn {
                name: spec.name.clone(),
                path: spec.evtchn.clone(),
                source,
            })?;
        let memory = match &spec.memory {
            Some(p) => Some(
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(p)
                    .map_err(|source| SupervisorError::Memory {
                        name: spec.name.clone(),
                        path: p.clone(),
                        source,
                    })?,
            ),
            None => None,
        };
        self.slots.push(Slot {
            spec,
            evtchn,
            _memory: memory,
            child: None,
            gen: 0,
            spawned: Instant::now(),
            ready: false,
            exited_at: None,
            restarts_in_window: VecDeque::new(),
            failures_before_ready: 0,
            next_start: None,
            phase: Phase::Waiting,
            starts: 0,
            restarts: 0,
            exit_to_ready: Vec::new(),
        });
        Ok(())
    }

    /// Start every backend and supervise them until stopped (or until none is left running
    /// or waiting), then stop the running ones (SIGTERM, SIGKILL after 2 s) and emit one
    /// summary each. Every event goes to `sink`. Returns the summaries.
    pub fn run(mut self, mut sink: impl FnMut(&Event)) -> Vec<Summary> {
        for i in 0..self.slots.len() {
            self.start(i, &mut sink);
        }
        loop {
            let live = self
                .slots
                .iter()
                .any(|s| matches!(s.phase, Phase::Running | Phase::Waiting));
            if !live {
                break;
            }
            let now = Instant::now();
            let next = self.slots.iter().filter_map(|s| s.next_start).min();
            let wait = next.map_or(Duration::from_secs(1), |t| t.saturating_duration_since(now));
            match self.rx.recv_timeout(wait) {
                Ok(Msg::Stop) => break,
                Ok(Msg::Line {
                    slot,
                    gen,
                    line,
                    at,
                }) => self.on_line(slot, gen, line, at, &mut sink),
                Ok(Msg::Exited { slot, gen, at }) => self.on_exit(slot, gen, at, &mut sink),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            let now = Instant::now();
            for i in 0..self.slots.len() {
                if self.slots[i].next_start.is_some_and(|t| t <= now) {
                    self.start(i, &mut sink);
                }
            }
        }
        self.shutdown();
        let out: Vec<Summary> = self
            .slots
            .iter()
            .map(|s| Summary {
                name: s.spec.name.clone(),
                starts: s.starts,
                restarts: s.restarts,
                exit_to_ready: s.exit_to_ready.clone(),
                phase: s.phase,
            })
            .collect();
        for s in &out {
            sink(&Event::Summary(s.clone()));
        }
        out
    }

    fn start(&mut self, i: usize, sink: &mut impl FnMut(&Event)) {
        let s = &mut self.slots[i];
        s.next_start = None;
        let fd = s.evtchn.as_raw_fd();
        let mut cmd = Command::new(&s.spec.program);
        cmd.args(&s.spec.args)
            .arg("--evtchn-fd")
            .arg(fd.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        let log = self.log_dir.as_ref().and_then(|d| {
            let p = d.join(format!("{}.err", s.spec.name.replace('/', "-")));
            OpenOptions::new().create(true).append(true).open(p).ok()
        });
        cmd.stderr(log.map_or_else(Stdio::inherit, Stdio::from));
        // SAFETY: between fork and exec the closure only calls async-signal-safe functions
        // (fcntl, close_range, sigemptyset, pthread_sigmask); the fds it touches are the
        // child's own copies (the supervisor keeps its evtchn file open).
        unsafe {
            cmd.pre_exec(move || {
                // The one descriptor this backend inherits: clear its close-on-exec, and
                // set it on every other one above stderr (what our own parent may have
                // leaked to us, e.g. a jobserver's pipe).
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Marked close-on-exec rather than closed: std's own error pipe to the
                // parent (close-on-exec already) must stay open until the exec.
                let fd_u = libc::c_uint::try_from(fd).unwrap_or(0);
                let cloexec = libc::CLOSE_RANGE_CLOEXEC;
                if fd_u > 3 {
                    libc::syscall(libc::SYS_close_range, 3 as libc::c_uint, fd_u - 1, cloexec);
                }
                libc::syscall(libc::SYS_close_range, fd_u + 1, libc::c_uint::MAX, cloexec);
                // A clean signal mask (the caller may block SIGTERM to wait for it).
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
                Ok(())
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(source) => {
                let e = SupervisorError::Spawn {
                    name: s.spec.name.clone(),
                    program: s.spec.program.clone(),
                    source,
                };
                sink(&Event::StartFailed {
                    name: s.spec.name.clone(),
                    error: crate::xen::chain(&e),
                });
                s.phase = Phase::Failed;
                return;
            }
        };
        s.gen += 1;
        s.starts += 1;
        s.spawned = Instant::now();
        s.ready = false;
        s.phase = Phase::Running;
        let (gen, pid) = (s.gen, child.id());
        if let Some(out) = child.stdout.take() {
            let tx = self.tx.clone();
            std::thread::spawn(move || read_lines(out, i, gen, &tx));
        }
        let tx = self.tx.clone();
        std::thread::spawn(move || {
            wait_exit(pid);
            let _ = tx.send(Msg::Exited {
                slot: i,
                gen,
                at: Instant::now(),
            });
        });
        s.child = Some(child);
        sink(&Event::Started {
            name: s.spec.name.clone(),
            pid,
        });
    }

    fn on_line(
        &mut self,
        i: usize,
        gen: u64,
        line: String,
        at: Instant,
        sink: &mut impl FnMut(&Event),
    ) {
        let Some(s) = self
            .slots
            .get_mut(i)
            .filter(|s| s.gen == gen && s.phase == Phase::Running)
        else {
            return;
        };
        let name = s.spec.name.clone();
        let pid = s.child.as_ref().map_or(0, Child::id);
        if !s.ready && (line == "ready" || line.starts_with("ready ")) {
            s.ready = true;
            s.failures_before_ready = 0;
            match s.exited_at.take() {
                Some(t) => {
                    let d = at.saturating_duration_since(t);
                    s.exit_to_ready.push(d);
                    sink(&Event::Restarted {
                        name,
                        pid,
                        exit_to_ready: d,
                        restarts: s.restarts,
                        line,
                    });
                }
                None => sink(&Event::Ready {
                    name,
                    pid,
                    after: at.saturating_duration_since(s.spawned),
                    line,
                }),
            }
        } else {
            sink(&Event::Output { name, pid, line });
        }
    }

    fn on_exit(&mut self, i: usize, gen: u64, at: Instant, sink: &mut impl FnMut(&Event)) {
        let Some(s) = self.slots.get_mut(i).filter(|s| s.gen == gen) else {
            return;
        };
        let Some(mut child) = s.child.take() else {
            return;
        };
        let pid = child.id();
        // The waiter saw it exit without reaping it: this returns at once.
        let status = child
            .wait()
            .map_or_else(|e| format!("wait failed: {e}"), describe);
        let name = s.spec.name.clone();
        let uptime = at.saturating_duration_since(s.spawned);
        let budget = s.spec.budget;
        if status == "exit 0" {
            s.phase = Phase::Finished;
            sink(&Event::Finished { name, pid });
            return;
        }
        while s
            .restarts_in_window
            .front()
            .is_some_and(|t| at.saturating_duration_since(*t) > budget.window)
        {
            s.restarts_in_window.pop_front();
        }
        let used = u32::try_from(s.restarts_in_window.len()).unwrap_or(u32::MAX);
        if used >= budget.max_restarts {
            sink(&Event::Exited {
                name: name.clone(),
                pid,
                status,
                uptime,
                restart_in: None,
                restart: used,
                budget,
            });
            s.phase = Phase::Failed;
            sink(&Event::GaveUp {
                name,
                restarts: used,
                window: budget.window,
            });
            return;
        }
        if !s.ready {
            s.failures_before_ready = s.failures_before_ready.saturating_add(1);
        }
        let delay = budget.delay(s.failures_before_ready);
        s.restarts_in_window.push_back(at);
        s.restarts += 1;
        s.exited_at = Some(at);
        s.phase = Phase::Waiting;
        s.next_start = Some(at + delay);
        sink(&Event::Exited {
            name,
            pid,
            status,
            uptime,
            restart_in: Some(delay),
            restart: s.restarts,
            budget,
        });
    }

    fn shutdown(&mut self) {
        let pids: Vec<i32> = self
            .slots
            .iter()
            .filter_map(|s| s.child.as_ref())
            .filter_map(|c| i32::try_from(c.id()).ok())
            .collect();
        for pid in &pids {
            // SAFETY: kill(2) on a child this supervisor has not reaped (its pid is ours).
            unsafe { libc::kill(*pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        for s in &mut self.slots {
            let Some(mut c) = s.child.take() else {
                continue;
            };
            loop {
                match c.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }
    }
}

/// "exit N" or "signal N".
fn describe(st: ExitStatus) -> String {
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => "unknown status".into(),
    }
}

/// Block until `pid` has exited, without reaping it.
fn wait_exit(pid: u32) {
    let id: libc::id_t = pid;
    loop {
        // SAFETY: waitid with WNOWAIT only reports on our own child and leaves it a zombie
        // for the supervisor to reap; `info` is a plain struct the kernel fills.
        let r = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(libc::P_PID, id, &mut info, libc::WEXITED | libc::WNOWAIT)
        };
        if r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return;
        }
    }
}

/// Forward a backend's stdout, line by line (each cut at [`MAX_LINE`] bytes).
fn read_lines(out: impl Read, slot: usize, gen: u64, tx: &Sender<Msg>) {
    let mut r = BufReader::new(out);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match (&mut r).take(MAX_LINE).read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if buf.last() != Some(&b'\n') {
            // An over-long line: drop the rest of it, without holding it (a backend printing
            // without end must not grow our memory).
            if r.skip_until(b'\n').is_err() {
                return;
            }
        }
        let line = String::from_utf8_lossy(&buf).trim_end().to_owned();
        if tx
            .send(Msg::Line {
                slot,
                gen,
                line,
                at: Instant::now(),
            })
            .is_err()
        {
            return;
        }
    }
}

/// Where a backend's stderr log goes under `dir`.
pub fn log_file(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{}.err", name.replace('/', "-")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_stops_at_the_max() {
        let b = Budget {
            max_restarts: 3,
            window: Duration::from_secs(60),
            backoff: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
        };
        let d: Vec<u128> = (0..7).map(|n| b.delay(n).as_millis()).collect();
        assert_eq!(d, [0, 100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn event_lines() {
        let b = Budget::from_policy(&policy::RestartPolicy::default());
        let e = Event::Exited {
            name: "web/xvda".into(),
            pid: 7,
            status: "signal 9".into(),
            uptime: Duration::from_millis(1500),
            restart_in: Some(Duration::ZERO),
            restart: 2,
            budget: b,
        };
        assert_eq!(
            e.to_string(),
            "exited web/xvda pid=7 signal 9 after 1500 ms; restarting now (restart 2 of at most 10 in 60 s)"
        );
        let s = Event::Summary(Summary {
            name: "a".into(),
            starts: 3,
            restarts: 2,
            exit_to_ready: vec![Duration::from_millis(100), Duration::from_millis(300)],
            phase: Phase::Running,
        });
        assert_eq!(
            s.to_string(),
            "summary a starts=3 restarts=2 exit-to-ready-ms mean=200 max=300 state=running"
        );
    }

    #[test]
    fn long_lines_are_cut() {
        let (tx, rx) = channel();
        let text = format!("{}\nready\n", "x".repeat(10_000));
        read_lines(text.as_bytes(), 0, 1, &tx);
        let lines: Vec<String> = rx
            .try_iter()
            .filter_map(|m| match m {
                Msg::Line { line, .. } => Some(line),
                _ => None,
            })
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].len(), usize::try_from(MAX_LINE).unwrap());
        assert_eq!(lines[1], "ready");
    }
}
