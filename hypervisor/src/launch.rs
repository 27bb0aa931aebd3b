//! Starting a process domain, and hearing when it dies.
//!
//! The manager creates the domain in [`System`] (or reuses an existing one: a restarted IDD
//! process keeps its domain), makes the domain's hypercall channels, starts the per-domain
//! [`Server`], and spawns the child program with exactly these descriptors (all others are
//! close-on-exec, and the child's sandbox closes anything else it inherits):
//!
//! | fd | what |
//! |---|---|
//! | 0, 1, 2 | stdio as the caller configured it |
//! | [`FD_MEMORY`] = 3 | the domain's RAM memfd (`nr_frames` pages; layout in `memory::layout`) |
//! | [`FD_CONTROL`] = 4 | the domain's end of the control socket (`SOCK_SEQPACKET`) |
//! | [`FD_DOORBELL`] = 5 | doorbell eventfd (domain writes) |
//! | [`FD_COMPLETION`] = 6 | completion eventfd (domain reads) |
//! | [`FD_UPCALL`] = 7 | upcall eventfd (domain reads) |
//!
//! and these environment variables: [`ENV_DOMID`] (decimal domain id) and [`ENV_NR_FRAMES`]
//! (decimal RAM size in frames). The child (see `process::ProcessPlatform::from_launch_env`)
//! maps its memory, then applies the sandbox before it runs domain code.
//!
//! A domain's death is observed through a pidfd (`pidfd_open`): it becomes readable when the
//! process exits, and [`RunningDomain::wait_exit`] then reports the exit code or the signal and
//! releases the grant mappings the process held (`System::release_mappings`).
//!
//! # Restarting a domain's process
//!
//! [`spawn_in`] starts a new process of an existing domain; one process per domain at a time.
//! What the new process finds (see `process::ProcessPlatform`):
//!
//! * its memory as the old process left it, including its grant table: the platform resumes
//!   the grant allocator from it (`GrantAllocator::resume`), so live grants stay valid, are
//!   never handed out again, and can be listed (`ProcessPlatform::granted`) and ended;
//! * its shareable pages (ring pages), which it maps again by frame
//!   (`ProcessPlatform::reattach_page`); the frames are those its live grants name;
//! * its event-channel ports, still bound;
//! * none of the old process's mappings of peers' grants (released when it died): it maps
//!   them again.
//!
//! A frontend finds its ring grant and port in XenStore (or by `find_grant(backend, frame)`)
//! and carries on; a backend maps the frontend's ring again from XenStore's `ring-ref`.

use crate::domain::DomainConfig;
use crate::hypercall::{control_pair, HypercallError, Server, ServerExit, ServerFds};
use crate::process::ProcessFds;
use crate::system::{System, SystemError};
use devchan::grant::DomId;
use rustix::event::EventfdFlags;
use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The child's fd number for its RAM memfd.
pub const FD_MEMORY: RawFd = 3;
/// The child's fd number for its control socket.
pub const FD_CONTROL: RawFd = 4;
/// The child's fd number for its doorbell eventfd.
pub const FD_DOORBELL: RawFd = 5;
/// The child's fd number for its completion eventfd.
pub const FD_COMPLETION: RawFd = 6;
/// The child's fd number for its upcall eventfd.
pub const FD_UPCALL: RawFd = 7;
/// Every fd the platform passes, for the child's sandbox `keep_fds` (plus stdio).
pub const PLATFORM_FDS: [RawFd; 5] = [FD_MEMORY, FD_CONTROL, FD_DOORBELL, FD_COMPLETION, FD_UPCALL];
/// Environment variable with the child's domain id.
pub const ENV_DOMID: &str = "PDOM_DOMID";
/// Environment variable with the child's RAM size in frames.
pub const ENV_NR_FRAMES: &str = "PDOM_NR_FRAMES";

/// Errors while starting or watching a domain process.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The core refused to create or find the domain.
    #[error("Domain setup failed")]
    System(#[from] SystemError),
    /// Making the hypercall channels or starting the server failed.
    #[error("Hypercall channel setup failed")]
    Hypercall(#[from] HypercallError),
    /// A system call of the launcher failed.
    #[error("{0} failed")]
    Os(&'static str, #[source] std::io::Error),
}

/// What to run as a domain.
pub struct LaunchConfig {
    /// Domain name.
    pub name: String,
    /// RAM size in 4 KiB frames.
    pub nr_frames: u64,
    /// The program.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// Extra environment variables.
    pub env: Vec<(OsString, OsString)>,
    /// Where its stdin comes from (nothing by default; piped for a process the manager
    /// hands work to later, such as a hot standby).
    pub stdin: Stdio,
    /// Where its stdout goes (piped by default, so the manager can read what it publishes).
    pub stdout: Stdio,
    /// Where its stderr goes (inherited by default).
    pub stderr: Stdio,
    /// The I/O Space IOMMU its pins go to (for a driver domain with a device).
    pub iommu: Option<Arc<iospace::iommu::Iommu>>,
}

impl LaunchConfig {
    /// Run `program` with `args` in a domain called `name` of `nr_frames` frames.
    pub fn new(name: &str, nr_frames: u64, program: impl Into<PathBuf>, args: &[&str]) -> Self {
        Self {
            name: name.to_owned(),
            nr_frames,
            program: program.into(),
            args: args.iter().map(OsString::from).collect(),
            env: Vec::new(),
            stdin: Stdio::null(),
            stdout: Stdio::piped(),
            stderr: Stdio::inherit(),
            iommu: None,
        }
    }
}

/// How a domain process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReport {
    /// It exited with this code.
    Exited(i32),
    /// A signal killed it.
    Signaled(i32),
}

/// A running domain process and its hypercall server.
pub struct RunningDomain {
    sys: Arc<System>,
    domid: DomId,
    child: Child,
    pidfd: OwnedFd,
    server: Option<Server>,
    exit: Option<ExitReport>,
}

/// Create a domain in `sys` and start `cfg.program` in it.
pub fn launch(sys: &Arc<System>, cfg: LaunchConfig) -> Result<RunningDomain, LaunchError> {
    let domid = sys.create_domain(DomainConfig {
        name: cfg.name.clone(),
        nr_frames: cfg.nr_frames,
        iommu: cfg.iommu.clone(),
    })?;
    match spawn_in(sys, domid, cfg) {
        Ok(d) => Ok(d),
        Err(e) => {
            let _ = sys.destroy_domain(domid);
            Err(e)
        }
    }
}

fn eventfd() -> Result<OwnedFd, LaunchError> {
    rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
        .map_err(|e| LaunchError::Os("eventfd", e.into()))
}

/// Duplicate `fd` to a number at or above 64 (close-on-exec), so that no source fd of the
/// child's fd table collides with a target number while `pre_exec` moves them into place.
fn dup_high(fd: BorrowedFd<'_>) -> Result<OwnedFd, LaunchError> {
    rustix::io::fcntl_dupfd_cloexec(fd, 64).map_err(|e| LaunchError::Os("dup", e.into()))
}

/// Make domain `domid`'s hypercall channels and start its server; returns the server and the
/// domain's ends of the channels (all at or above fd 64, close-on-exec). [`spawn_in`] hands
/// those to a child; a test can also give them to a `ProcessPlatform` in its own process.
pub fn connect(sys: &Arc<System>, domid: DomId) -> Result<(Server, ProcessFds), LaunchError> {
    let domain = sys.domain(domid)?;
    let (ctl_hv, ctl_dom) = control_pair()?;
    let doorbell = eventfd()?;
    let completion = eventfd()?;
    // SAFETY: the upcall eventfd is owned by `domain`, which outlives this borrow.
    let upcall_fd = unsafe { BorrowedFd::borrow_raw(domain.upcall().as_raw_fd()) };
    let fds = ProcessFds {
        memory: dup_high(domain.memory().ram_file().as_fd())?,
        control: dup_high(ctl_dom.as_fd())?,
        doorbell: dup_high(doorbell.as_fd())?,
        completion: dup_high(completion.as_fd())?,
        upcall: dup_high(upcall_fd)?,
    };
    // The server starts before the domain runs, so it never mistakes the domain's first batch
    // for a stale one left in the page by a previous process of this domain.
    let server = Server::spawn(
        sys.clone(),
        domid,
        ServerFds {
            doorbell,
            completion,
            control: ctl_hv,
        },
    )?;
    Ok((server, fds))
}

/// Start `cfg.program` as a process of the existing domain `domid` (a fresh start or a
/// restart after a crash: the domain, its memory, grants and ports persist).
pub fn spawn_in(
    sys: &Arc<System>,
    domid: DomId,
    cfg: LaunchConfig,
) -> Result<RunningDomain, LaunchError> {
    let nr_frames = sys.domain(domid)?.memory().nr_frames();
    let (server, fds) = connect(sys, domid)?;
    let sources = [
        fds.memory,
        fds.control,
        fds.doorbell,
        fds.completion,
        fds.upcall,
    ];
    let moves: Vec<(RawFd, RawFd)> = sources
        .iter()
        .map(AsRawFd::as_raw_fd)
        .zip(PLATFORM_FDS)
        .collect();

    let mut cmd = Command::new(&cfg.program);
    cmd.args(&cfg.args)
        .env(ENV_DOMID, domid.to_string())
        .env(ENV_NR_FRAMES, nr_frames.to_string())
        .stdin(cfg.stdin)
        .stdout(cfg.stdout)
        .stderr(cfg.stderr);
    for (k, v) in &cfg.env {
        cmd.env(k, v);
    }
    // SAFETY: the closure runs in the forked child before exec and only calls dup2, which is
    // async-signal-safe; it allocates nothing and touches no lock.
    unsafe {
        cmd.pre_exec(move || {
            for &(src, dst) in &moves {
                // dup2 to a different number clears close-on-exec on the target; the sources
                // are all >= 64, so none of them is overwritten by an earlier move.
                if libc::dup2(src, dst) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| LaunchError::Os("spawn", e))?;
    drop(sources);
    let pid = rustix::process::Pid::from_raw(child.id().try_into().unwrap_or(-1))
        .ok_or_else(|| LaunchError::Os("pid", std::io::Error::other("bad child pid")))?;
    let pidfd = match rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()) {
        Ok(fd) => fd,
        Err(e) => {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
            return Err(LaunchError::Os("pidfd_open", e.into()));
        }
    };
    Ok(RunningDomain {
        sys: sys.clone(),
        domid,
        child,
        pidfd,
        server: Some(server),
        exit: None,
    })
}

impl RunningDomain {
    /// The domain's id.
    pub fn domid(&self) -> DomId {
        self.domid
    }

    /// The process's pidfd: readable once it has exited (for the manager's poll loop).
    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    /// The child process (its stdout pipe, its pid).
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Wait until the process exits or `timeout` passes (`None`: forever); the exit report, or
    /// `None` on timeout.
    pub fn wait_exit(
        &mut self,
        timeout: Option<Duration>,
    ) -> Result<Option<ExitReport>, LaunchError> {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        if let Some(r) = self.exit {
            return Ok(Some(r));
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let ts = left.map(|l| Timespec {
                tv_sec: l.as_secs().try_into().unwrap_or(i64::MAX),
                tv_nsec: l.subsec_nanos().into(),
            });
            let mut pfd = [PollFd::new(&self.pidfd, PollFlags::IN)];
            match poll(&mut pfd, ts.as_ref()) {
                Ok(0) if left.is_some_and(|l| l.is_zero()) => return Ok(None),
                Ok(0) => continue,
                Ok(_) => break,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(LaunchError::Os("poll pidfd", e.into())),
            }
        }
        let status = self.child.wait().map_err(|e| LaunchError::Os("wait", e))?;
        let report = match (status.code(), status.signal()) {
            (Some(code), _) => ExitReport::Exited(code),
            (None, Some(sig)) => ExitReport::Signaled(sig),
            (None, None) => ExitReport::Exited(-1),
        };
        self.exit = Some(report);
        // The process is gone, and with it every page it had mapped (it could not fork: the
        // sandbox forbids it), so the grants it mapped are released for their granters.
        if let Ok(n) = self.sys.release_mappings(self.domid) {
            tracing::debug!(dom = self.domid, released = n, "domain process exited");
        }
        Ok(Some(report))
    }

    /// Kill the process (`SIGKILL` through the pidfd) and reap it.
    pub fn kill(&mut self) -> Result<ExitReport, LaunchError> {
        if self.exit.is_none() {
            let _ = rustix::process::pidfd_send_signal(&self.pidfd, rustix::process::Signal::KILL);
        }
        self.wait_exit(None)?
            .ok_or_else(|| LaunchError::Os("wait", std::io::Error::other("no exit")))
    }

    /// Stop the hypercall server (after the process exited, or to cut the domain off).
    pub fn stop_server(&mut self) -> ServerExit {
        self.server.take().map_or(ServerExit::Stopped, Server::stop)
    }
}

impl Drop for RunningDomain {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.kill();
        }
        self.stop_server();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_fds_follow_stdio_and_are_distinct() {
        let mut v = PLATFORM_FDS.to_vec();
        v.sort_unstable();
        v.dedup();
        assert_eq!(v.len(), PLATFORM_FDS.len());
        assert!(v.iter().all(|&fd| fd > 2 && fd < 64));
    }

    #[test]
    fn dup_high_lands_above_the_targets() {
        let (r, _w) = rustix::pipe::pipe().unwrap();
        let d = dup_high(r.as_fd()).unwrap();
        assert!(d.as_raw_fd() >= 64);
    }
}
