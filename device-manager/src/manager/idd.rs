//! One supervised IDD, whatever its device: the domain, its current process, the stdout
//! protocol every IDD program speaks (`ready`, `hb N ...`, `failed CHAN`), the control
//! commands it takes on stdin while serving (`ID VERB ARGS`, answered `ctl ID ok|err ...`,
//! `hypervisor::process::control`; the live reload uses them), the heartbeat deadline, the
//! restart budget, and the device-independent phases of a recovery (revoke, spawn,
//! re-attach). What is specific to a device kind (its channel arguments, journal
//! housekeeping, how to see a first response) stays with the kind.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{ChildStdin, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use devchan::grant::DomId;
use hypervisor::launch::{LaunchConfig, RunningDomain};
use hypervisor::system::System;
use iospace::iommu::Iommu;

use crate::recovery::Cause;

/// Most channels an IDD may report failed at once (more than any IDD serves).
const MAX_FAILED_CHANNELS: usize = 256;

/// A line a domain process printed, or its end.
#[derive(Debug)]
pub(crate) enum Line {
    Text(Instant, String),
    Eof,
}

/// Forward `d`'s stdout lines to `tx` from a thread.
pub(crate) fn forward(d: &mut RunningDomain, tx: Sender<Line>) {
    if let Some(out) = d.child_mut().stdout.take() {
        std::thread::spawn(move || {
            for line in BufReader::new(out)
                .lines()
                .map_while(std::result::Result::ok)
            {
                if tx.send(Line::Text(Instant::now(), line)).is_err() {
                    return;
                }
            }
            let _ = tx.send(Line::Eof);
        });
    }
}

struct IddProcess {
    run: RunningDomain,
    /// Where control commands go (`None`: the process has no control pipe).
    stdin: Option<ChildStdin>,
    pid: u32,
    lines: Receiver<Line>,
    last_beat: Instant,
    started: Instant,
}

/// How an IDD restarts (the policy's `restart` table).
#[derive(Clone, Copy, Debug)]
pub(crate) struct RestartRules {
    pub heartbeat: Duration,
    pub max_restarts: u32,
    pub window: Duration,
}

/// A supervised IDD (see the module docs).
pub(crate) struct Idd {
    /// The device's name (policy).
    pub device: String,
    /// Its domain.
    pub domid: DomId,
    program: PathBuf,
    frames: u64,
    iommu: Arc<Iommu>,
    proc: Option<IddProcess>,
    rules: RestartRules,
    restarts: VecDeque<Instant>,
    /// When a fault was injected (to time detection).
    pub fault_at: Option<Instant>,
    /// Channels the process reported failed.
    pub failed_channels: Vec<usize>,
    /// The latest heartbeat line.
    pub last_hb: Option<String>,
    /// Processes started in this domain.
    pub starts: u32,
    verbose: bool,
    /// The last control command id used.
    ctl_seq: u64,
    /// Control answers read and not yet claimed: (id, result).
    ctl_answers: VecDeque<(u64, Result<(), String>)>,
}

/// Why a control command did not take effect.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ControlError {
    /// The IDD answered `err`.
    #[error("the IDD refused `{command}`: {reason}")]
    Refused {
        /// The command.
        command: String,
        /// Its answer.
        reason: String,
    },
    /// No process, no pipe, the process ended, or no answer in time.
    #[error("the IDD of {device} did not take `{command}`: {why}")]
    Unreached {
        /// The device.
        device: String,
        /// The command.
        command: String,
        /// What happened.
        why: String,
    },
}

impl Idd {
    pub fn new(
        device: &str,
        domid: DomId,
        program: PathBuf,
        frames: u64,
        iommu: Arc<Iommu>,
        rules: RestartRules,
        verbose: bool,
    ) -> Self {
        Self {
            device: device.to_owned(),
            domid,
            program,
            frames,
            iommu,
            proc: None,
            rules,
            restarts: VecDeque::new(),
            fault_at: None,
            failed_channels: Vec::new(),
            last_hb: None,
            starts: 0,
            verbose,
            ctl_seq: 0,
            ctl_answers: VecDeque::new(),
        }
    }

    /// The IDD's IOMMU.
    pub fn iommu(&self) -> &Arc<Iommu> {
        &self.iommu
    }

    /// Move the IDD to another domain (the domain-replacement path).
    pub fn set_domain(&mut self, domid: DomId) {
        self.domid = domid;
    }

    /// The running process's pid.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(|p| p.pid)
    }

    /// Whether a process was started (and not given up on).
    pub fn running(&self) -> bool {
        self.proc.is_some()
    }

    /// How long the current process has run.
    pub fn uptime(&self) -> Option<Duration> {
        self.proc.as_ref().map(|p| p.started.elapsed())
    }

    /// Start a process of the IDD program in the domain with `args`.
    pub fn spawn(&mut self, sys: &Arc<System>, args: &[String]) -> Result<()> {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut lc = LaunchConfig::new(
            &format!("idd-{}", self.device),
            self.frames,
            &self.program,
            &args,
        );
        lc.iommu = Some(self.iommu.clone());
        lc.stdin = Stdio::piped();
        let mut run = hypervisor::launch::spawn_in(sys, self.domid, lc)
            .with_context(|| format!("starting {}", self.program.display()))?;
        let (tx, rx) = channel();
        forward(&mut run, tx);
        let pid = run.child_mut().id();
        let stdin = run.child_mut().stdin.take();
        self.ctl_answers.clear();
        self.proc = Some(IddProcess {
            run,
            stdin,
            pid,
            lines: rx,
            last_beat: Instant::now(),
            started: Instant::now(),
        });
        self.starts += 1;
        Ok(())
    }

    /// Take over `run`, a process already running in domain `domid` (a promoted standby),
    /// as this IDD's process; `stdin` is its control pipe.
    pub fn adopt(&mut self, domid: DomId, mut run: RunningDomain, stdin: ChildStdin) {
        let (tx, rx) = channel();
        forward(&mut run, tx);
        let pid = run.child_mut().id();
        self.domid = domid;
        self.ctl_answers.clear();
        self.proc = Some(IddProcess {
            run,
            stdin: Some(stdin),
            pid,
            lines: rx,
            last_beat: Instant::now(),
            started: Instant::now(),
        });
        self.starts += 1;
    }

    /// Take the process's stdout lines; true once `ready` was seen (when `want_ready`).
    pub fn drain(&mut self, wait: Duration, want_ready: bool) -> Result<bool> {
        let p = self.proc.as_mut().context("no IDD process")?;
        let mut wait = wait;
        loop {
            match p.lines.recv_timeout(wait) {
                Ok(Line::Text(at, l)) => {
                    if self.verbose && std::env::var_os("DM_DEBUG").is_some() {
                        eprintln!("[idd-{}] {l}", self.device);
                    }
                    if l == "ready" || l.starts_with("hb ") {
                        p.last_beat = at;
                    }
                    if l.starts_with("hb ") {
                        self.last_hb = Some(l.clone());
                    }
                    if let Some(a) = hypervisor::process::control::parse_answer(&l) {
                        // Bounded: answers nobody waits for any more are dropped first.
                        if self.ctl_answers.len() >= 64 {
                            self.ctl_answers.pop_front();
                        }
                        self.ctl_answers.push_back(a);
                    }
                    if let Some(c) = l.strip_prefix("failed ") {
                        // The IDD's word only: its slice checks the channel exists before
                        // resetting it, and the list stays bounded whatever the IDD prints.
                        if let Ok(c) = c.parse::<usize>() {
                            if !self.failed_channels.contains(&c)
                                && self.failed_channels.len() < MAX_FAILED_CHANNELS
                            {
                                self.failed_channels.push(c);
                            }
                        }
                    }
                    if want_ready && l == "ready" {
                        return Ok(true);
                    }
                    wait = Duration::ZERO;
                }
                Ok(Line::Eof) | Err(RecvTimeoutError::Disconnected) => return Ok(false),
                Err(RecvTimeoutError::Timeout) => return Ok(false),
            }
        }
    }

    /// Wait for `ready` (every channel re-attached).
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.drain(Duration::from_millis(20), true)? {
            let p = self.proc.as_mut().context("no IDD process")?;
            if let Some(r) = p.run.wait_exit(Some(Duration::ZERO))? {
                bail!(
                    "the IDD process of {} ended before it was ready: {r:?}",
                    self.device
                );
            }
            ensure!(
                Instant::now() < deadline,
                "the IDD process of {} did not get ready",
                self.device
            );
        }
        Ok(())
    }

    /// Send control command `command` (`VERB ARGS`, see the module docs) to the running
    /// process and wait up to `timeout` for its answer. Heartbeats and other lines read
    /// meanwhile are handled as usual.
    pub fn control(&mut self, command: &str, timeout: Duration) -> Result<(), ControlError> {
        let device = self.device.clone();
        let unreached = |why: String| ControlError::Unreached {
            device: device.clone(),
            command: command.to_owned(),
            why,
        };
        self.ctl_seq += 1;
        let id = self.ctl_seq;
        let p = self
            .proc
            .as_mut()
            .ok_or_else(|| unreached("no process runs".into()))?;
        let pipe = p
            .stdin
            .as_mut()
            .ok_or_else(|| unreached("it has no control pipe".into()))?;
        pipe.write_all(format!("{id} {command}\n").as_bytes())
            .and_then(|()| pipe.flush())
            .map_err(|e| unreached(format!("writing its stdin: {e}")))?;
        let deadline = Instant::now() + timeout;
        loop {
            self.drain(Duration::from_millis(5), false)
                .map_err(|e| unreached(format!("{e:#}")))?;
            if let Some((_, r)) = self
                .ctl_answers
                .iter()
                .position(|(a, _)| *a == id)
                .and_then(|i| self.ctl_answers.remove(i))
            {
                return r.map_err(|reason| ControlError::Refused {
                    command: command.to_owned(),
                    reason,
                });
            }
            let p = self
                .proc
                .as_mut()
                .ok_or_else(|| unreached("no process runs".into()))?;
            if let Ok(Some(r)) = p.run.wait_exit(Some(Duration::ZERO)) {
                return Err(unreached(format!("it ended: {r:?}")));
            }
            if Instant::now() >= deadline {
                return Err(unreached(format!("no answer within {timeout:?}")));
            }
        }
    }

    /// Send `signal` to the running process (fault injection); records the fault's time.
    pub fn signal(&mut self, signal: i32) -> Result<()> {
        let p = self.proc.as_mut().context("no IDD process")?;
        ensure!(
            p.run.wait_exit(Some(Duration::ZERO))?.is_none(),
            "the IDD process of {} is not running",
            self.device
        );
        let pid = i32::try_from(p.run.child_mut().id())?;
        self.fault_at = Some(Instant::now());
        // SAFETY: kill(2) on our own child, not reaped yet (checked just above), so the pid
        // cannot have been reused.
        if unsafe { libc::kill(pid, signal) } != 0 {
            bail!("kill: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Kill the running process (if any) and forget it.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut p) = self.proc.take() {
            p.run.kill()?;
        }
        Ok(())
    }

    /// Watch the process for up to `slice`: `Some(cause)` if it died or missed its heartbeat
    /// deadline (a hung process is killed first).
    pub fn check(&mut self, slice: Duration) -> Result<Option<Cause>> {
        self.drain(Duration::ZERO, false)?;
        let p = self.proc.as_mut().context("no IDD process")?;
        if let Some(r) = p.run.wait_exit(Some(slice))? {
            return Ok(Some(Cause::Exited(format!("{r:?}"))));
        }
        let silent = p.last_beat.elapsed();
        if silent > self.rules.heartbeat {
            // SIGKILL ends a stopped process too.
            p.run.kill()?;
            return Ok(Some(Cause::Hung(silent)));
        }
        Ok(None)
    }

    /// Start a recovery: count it against the restart budget (fails when exhausted) and
    /// return the detection time (from the injected fault, or zero).
    pub fn begin_recovery(&mut self) -> Result<Duration> {
        let now = Instant::now();
        let detect = self.fault_at.take().map_or(Duration::ZERO, |f| now - f);
        self.restarts.push_back(now);
        while self
            .restarts
            .front()
            .is_some_and(|t| now - *t > self.rules.window)
        {
            self.restarts.pop_front();
        }
        ensure!(
            self.restarts.len() <= self.rules.max_restarts as usize,
            "the IDD of {} failed {} times within {:?}: giving up (restart.max_restarts)",
            self.device,
            self.restarts.len(),
            self.rules.window
        );
        self.proc = None;
        Ok(detect)
    }

    /// Revoke what the dead process held: its mappings went with it; its pins and copies are
    /// revoked now (holder deadline passed), then the deadline is lifted for the next
    /// process. Returns (mappings released, pins/copies revoked).
    pub fn revoke(&self, sys: &System) -> Result<(usize, usize)> {
        let released = sys.release_mappings(self.domid)?;
        sys.set_holder_deadline(self.domid, Instant::now())?;
        let revoked = sys.revoke_overdue().len();
        // One day is "no deadline".
        sys.set_holder_deadline(self.domid, Instant::now() + Duration::from_secs(86_400))?;
        Ok((released, revoked))
    }
}

/// The timed, device-independent phases of a same-domain restart.
pub(crate) struct Phases {
    /// (mappings released, pins/copies revoked).
    pub revoked: (usize, usize),
    pub revoke: Duration,
    pub spawn: Duration,
    pub reattach: Duration,
}

impl Idd {
    /// Restart in the same domain after [`Idd::begin_recovery`]: revoke what the dead process
    /// held, run the kind's `housekeeping` on the domain (counted in the revoke phase), start
    /// a new process with `args` and wait until it is `ready`.
    pub fn restart_in_place(
        &mut self,
        sys: &Arc<System>,
        args: &[String],
        housekeeping: impl FnOnce() -> Result<()>,
    ) -> Result<Phases> {
        let t0 = Instant::now();
        let revoked = self.revoke(sys)?;
        housekeeping()?;
        let revoke = t0.elapsed();
        let t1 = Instant::now();
        self.spawn(sys, args)?;
        let spawn = t1.elapsed();
        let t2 = Instant::now();
        self.wait_ready(Duration::from_secs(10))?;
        Ok(Phases {
            revoked,
            revoke,
            spawn,
            reattach: t2.elapsed(),
        })
    }
}

impl Drop for Idd {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}
