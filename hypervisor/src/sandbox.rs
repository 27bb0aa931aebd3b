//! Confining a domain process after start.
//!
//! A process domain (an IDD or a process guest) is started by the manager with exactly the file
//! descriptors it needs (see [`crate::launch`]). Before it runs any domain code it calls
//! [`apply`], which, in this order:
//!
//! 1. compiles the seccomp filter (so a compile error changes nothing);
//! 2. closes every file descriptor that is not listed in [`SandboxConfig::keep_fds`]
//!    (`close_range` over the gaps);
//! 3. lowers resource limits, soft and hard, so they cannot be raised again
//!    ([`SandboxConfig::max_fds`] for `RLIMIT_NOFILE`; 0 for `RLIMIT_CORE` (no core dump of
//!    guest data), `RLIMIT_NPROC`, `RLIMIT_MEMLOCK`, `RLIMIT_LOCKS`, `RLIMIT_MSGQUEUE`;
//!    optionally `RLIMIT_AS`). `RLIMIT_FSIZE` stays: the only files a domain can write are the
//!    stdio it inherited, and a zero limit would kill it with `SIGXFSZ` when its log is a file;
//! 4. optionally enters fresh user, network and IPC namespaces where the kernel lets it
//!    (unprivileged user namespaces; as root it falls back to network + IPC only). Failure here
//!    is reported in [`SandboxReport`], not an error: namespaces are defence in depth, the
//!    seccomp filter is the boundary;
//! 5. sets `no_new_privs` (required for an unprivileged seccomp filter, and it stops any
//!    privilege gain through set-uid binaries, which cannot be executed anyway);
//! 6. installs the seccomp allow-list [`ALLOWED_SYSCALLS`] on every thread (`TSYNC`).
//!
//! # The allow-list
//!
//! The rules are data: one [`SyscallRule`] per allowed system call with a one-line reason and,
//! where it matters, a condition on an argument. What a sandboxed domain can do is what the
//! platform needs: read and write the descriptors it already has (eventfds, the control socket,
//! stdio), exchange messages and received fds on its control socket, map and unmap memory
//! (never executable), wait, and exit. Everything else is denied, in particular `open`,
//! `openat`, `socket`, `connect`, `bind`, `execve`, `fork`/`clone`/`clone3` (no new threads or
//! processes after start: a domain creates its threads, if any, before calling [`apply`]),
//! `ptrace`, `kill` of other processes, `ioctl`, `prctl`, `setrlimit`, `unshare`.
//!
//! # What a denied call does
//!
//! [`DenyAction::Errno`] (the default) makes a denied call fail with `EPERM`: the domain sees an
//! ordinary error and can report it. This is the right default here because standard libraries
//! sometimes probe optional system calls (a failed probe must not crash a healthy driver), and
//! because the filter, not the action, is the security boundary: with either action the call
//! never reaches the kernel. [`DenyAction::KillProcess`] kills the whole process with `SIGSYS`
//! instead; the manager sees that through the pidfd ([`crate::launch`]) as a crash and restarts
//! the domain. Use it for domains whose code is known not to probe (fail-stop on compromise).

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use std::collections::BTreeMap;
use std::os::fd::RawFd;

/// Errors while confining the current process.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The filter rules could not be turned into a seccomp filter.
    #[error("Building the seccomp filter failed")]
    Filter(#[source] seccompiler::BackendError),
    /// The filter could not be compiled to BPF.
    #[error("Compiling the seccomp filter failed")]
    Compile(#[source] seccompiler::BackendError),
    /// The kernel refused the filter.
    #[error("Installing the seccomp filter failed")]
    Install(#[source] seccompiler::Error),
    /// Closing the descriptors that are not kept failed.
    #[error("Closing inherited file descriptors failed")]
    CloseFds(#[source] std::io::Error),
    /// A kept descriptor number is negative.
    #[error("Kept file descriptor {0} is invalid")]
    BadFd(RawFd),
    /// Lowering a resource limit failed.
    #[error("Setting resource limit {0} failed")]
    Rlimit(&'static str, #[source] std::io::Error),
    /// Setting `no_new_privs` failed.
    #[error("Setting no_new_privs failed")]
    NoNewPrivs(#[source] std::io::Error),
}

/// What a denied system call does. See the module docs for the choice.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DenyAction {
    /// Fail the call with `EPERM` (default).
    #[default]
    Errno,
    /// Kill the process with `SIGSYS`.
    KillProcess,
}

/// How to confine a domain process.
#[derive(Clone, Debug)]
pub struct SandboxConfig {
    /// Descriptors that stay open (stdio and the platform's fds); all others are closed.
    pub keep_fds: Vec<RawFd>,
    /// `RLIMIT_NOFILE`: at most this many descriptors (room for fds received for mappings).
    pub max_fds: u64,
    /// `RLIMIT_AS` in bytes, if set.
    pub max_address_space: Option<u64>,
    /// Try to enter new user/network/IPC namespaces.
    pub namespaces: bool,
    /// What a denied system call does.
    pub deny: DenyAction,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            keep_fds: vec![0, 1, 2],
            max_fds: 64,
            max_address_space: None,
            namespaces: true,
            deny: DenyAction::Errno,
        }
    }
}

/// What [`apply`] managed to do beyond the mandatory steps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SandboxReport {
    /// Entered a new user namespace.
    pub user_namespace: bool,
    /// Entered new network and IPC namespaces.
    pub net_ipc_namespaces: bool,
}

/// A condition on one argument of an allowed system call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgRule {
    /// Any arguments.
    Any,
    /// Argument `arg` has none of the bits in `mask` set.
    NoBits {
        /// Argument index (0-based).
        arg: u8,
        /// Forbidden bits.
        mask: u64,
    },
    /// Argument `arg` equals the calling process's pid (signals to ourselves only).
    OwnPid {
        /// Argument index (0-based).
        arg: u8,
    },
}

/// One allowed system call, with why a domain needs it.
#[derive(Clone, Copy, Debug)]
pub struct SyscallRule {
    /// The system call number on this architecture.
    pub nr: libc::c_long,
    /// Its name, for reports.
    pub name: &'static str,
    /// Why a domain needs it.
    pub reason: &'static str,
    /// A restriction on its arguments.
    pub args: ArgRule,
}

const fn rule(nr: libc::c_long, name: &'static str, reason: &'static str) -> SyscallRule {
    SyscallRule {
        nr,
        name,
        reason,
        args: ArgRule::Any,
    }
}

const fn rule_if(
    nr: libc::c_long,
    name: &'static str,
    reason: &'static str,
    args: ArgRule,
) -> SyscallRule {
    SyscallRule {
        nr,
        name,
        reason,
        args,
    }
}

/// `PROT_EXEC` as a 64-bit mask: no new executable mappings after start.
const PROT_EXEC: u64 = libc::PROT_EXEC as u64;

/// The allow-list: every system call a sandboxed domain may make.
pub const ALLOWED_SYSCALLS: &[SyscallRule] = &[
    rule(
        libc::SYS_read,
        "read",
        "read eventfds (upcall, completion), the control socket, stdin",
    ),
    rule(
        libc::SYS_write,
        "write",
        "ring the doorbell and self-upcall eventfds; stdout/stderr",
    ),
    rule(libc::SYS_readv, "readv", "buffered stdio"),
    rule(libc::SYS_writev, "writev", "buffered stdio and logging"),
    rule(
        libc::SYS_close,
        "close",
        "drop fds received for mappings once they are mapped",
    ),
    rule(
        libc::SYS_recvmsg,
        "recvmsg",
        "control-socket replies with SCM_RIGHTS fds",
    ),
    rule(
        libc::SYS_sendmsg,
        "sendmsg",
        "control-socket requests on the connected socket",
    ),
    rule_if(
        libc::SYS_mmap,
        "mmap",
        "map own memory, received grant pages, heap; never executable",
        ArgRule::NoBits {
            arg: 2,
            mask: PROT_EXEC,
        },
    ),
    rule_if(
        libc::SYS_mprotect,
        "mprotect",
        "allocator guard pages; never executable",
        ArgRule::NoBits {
            arg: 2,
            mask: PROT_EXEC,
        },
    ),
    rule(
        libc::SYS_munmap,
        "munmap",
        "unmap grant mappings and freed heap",
    ),
    rule(
        libc::SYS_madvise,
        "madvise",
        "the allocator returns memory to the kernel",
    ),
    rule(
        libc::SYS_mremap,
        "mremap",
        "the allocator grows large buffers",
    ),
    rule(libc::SYS_brk, "brk", "heap growth"),
    rule(libc::SYS_futex, "futex", "mutexes and condition variables"),
    rule(
        libc::SYS_ppoll,
        "ppoll",
        "wait for the upcall or completion eventfd with a timeout",
    ),
    #[cfg(target_arch = "x86_64")]
    rule(
        libc::SYS_poll,
        "poll",
        "wait for an eventfd (libc's poll on x86-64)",
    ),
    rule(
        libc::SYS_clock_gettime,
        "clock_gettime",
        "Instant::now when the vDSO is unavailable",
    ),
    rule(
        libc::SYS_clock_nanosleep,
        "clock_nanosleep",
        "thread::sleep",
    ),
    rule(
        libc::SYS_nanosleep,
        "nanosleep",
        "thread::sleep on older libcs",
    ),
    rule(
        libc::SYS_sched_yield,
        "sched_yield",
        "back off in spin loops",
    ),
    rule(libc::SYS_getrandom, "getrandom", "HashMap seeds"),
    rule(
        libc::SYS_rt_sigreturn,
        "rt_sigreturn",
        "return from a signal handler",
    ),
    rule(
        libc::SYS_rt_sigprocmask,
        "rt_sigprocmask",
        "libc masks signals around abort",
    ),
    rule(
        libc::SYS_rt_sigaction,
        "rt_sigaction",
        "abort() resets the SIGABRT handler",
    ),
    rule(
        libc::SYS_sigaltstack,
        "sigaltstack",
        "std's stack-overflow handler",
    ),
    rule(libc::SYS_getpid, "getpid", "abort() finds its own process"),
    rule(
        libc::SYS_gettid,
        "gettid",
        "abort() and locks find their own thread",
    ),
    rule_if(
        libc::SYS_tgkill,
        "tgkill",
        "abort() raises SIGABRT, only in this process",
        ArgRule::OwnPid { arg: 0 },
    ),
    rule(libc::SYS_exit, "exit", "thread exit"),
    rule(libc::SYS_exit_group, "exit_group", "process exit"),
];

/// System calls that must never be allowed after start (checked by the tests).
pub const FORBIDDEN_SYSCALLS: &[(libc::c_long, &str)] = &[
    #[cfg(target_arch = "x86_64")]
    (libc::SYS_open, "open"),
    (libc::SYS_openat, "openat"),
    (libc::SYS_openat2, "openat2"),
    (libc::SYS_socket, "socket"),
    (libc::SYS_socketpair, "socketpair"),
    (libc::SYS_connect, "connect"),
    (libc::SYS_bind, "bind"),
    (libc::SYS_accept4, "accept4"),
    (libc::SYS_execve, "execve"),
    (libc::SYS_execveat, "execveat"),
    (libc::SYS_clone, "clone"),
    (libc::SYS_clone3, "clone3"),
    #[cfg(target_arch = "x86_64")]
    (libc::SYS_fork, "fork"),
    (libc::SYS_ptrace, "ptrace"),
    (libc::SYS_kill, "kill"),
    (libc::SYS_ioctl, "ioctl"),
    (libc::SYS_prctl, "prctl"),
    (libc::SYS_setrlimit, "setrlimit"),
    (libc::SYS_prlimit64, "prlimit64"),
    (libc::SYS_unshare, "unshare"),
    (libc::SYS_memfd_create, "memfd_create"),
    (libc::SYS_pidfd_open, "pidfd_open"),
    (libc::SYS_pidfd_getfd, "pidfd_getfd"),
    (libc::SYS_process_vm_readv, "process_vm_readv"),
    (libc::SYS_process_vm_writev, "process_vm_writev"),
];

fn target_arch() -> TargetArch {
    #[cfg(target_arch = "aarch64")]
    {
        TargetArch::aarch64
    }
    #[cfg(not(target_arch = "aarch64"))]
    {
        TargetArch::x86_64
    }
}

/// Build the seccomp filter for `deny`, with `own_pid` for the rules that name the process.
pub fn build_filter(deny: DenyAction, own_pid: u32) -> Result<BpfProgram, SandboxError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for r in ALLOWED_SYSCALLS {
        let cond = match r.args {
            ArgRule::Any => None,
            ArgRule::NoBits { arg, mask } => Some(SeccompCondition::new(
                arg,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(mask),
                0,
            )),
            ArgRule::OwnPid { arg } => Some(SeccompCondition::new(
                arg,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                u64::from(own_pid),
            )),
        };
        let entry = rules.entry(r.nr).or_default();
        if let Some(cond) = cond {
            entry.push(
                SeccompRule::new(vec![cond.map_err(SandboxError::Filter)?])
                    .map_err(SandboxError::Filter)?,
            );
        }
    }
    let mismatch = match deny {
        DenyAction::Errno => SeccompAction::Errno(libc::EPERM as u32),
        DenyAction::KillProcess => SeccompAction::KillProcess,
    };
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, target_arch())
        .map_err(SandboxError::Filter)?;
    filter.try_into().map_err(SandboxError::Compile)
}

/// Close every descriptor not in `keep` (which need not be sorted).
pub fn close_fds_except(keep: &[RawFd]) -> Result<(), SandboxError> {
    let mut keep: Vec<u32> = keep
        .iter()
        .map(|&fd| u32::try_from(fd).map_err(|_| SandboxError::BadFd(fd)))
        .collect::<Result<_, _>>()?;
    keep.sort_unstable();
    keep.dedup();
    let mut first = 0u32;
    for &k in &keep {
        if k > first {
            close_range(first, k - 1)?;
        }
        first = k.saturating_add(1);
    }
    if first < u32::MAX {
        close_range(first, u32::MAX)?;
    }
    Ok(())
}

fn close_range(first: u32, last: u32) -> Result<(), SandboxError> {
    // SAFETY: close_range only closes descriptors; the caller decided that no live Rust object
    // of this process uses the closed ones (they were inherited or are about to be dropped, and
    // a dropped owner closing an already-closed number gets EBADF, which std ignores).
    let r = unsafe { libc::close_range(first, last, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(SandboxError::CloseFds(std::io::Error::last_os_error()))
    }
}

fn set_limit(
    name: &'static str,
    res: rustix::process::Resource,
    value: u64,
) -> Result<(), SandboxError> {
    let lim = rustix::process::Rlimit {
        current: Some(value),
        maximum: Some(value),
    };
    rustix::process::setrlimit(res, lim).map_err(|e| SandboxError::Rlimit(name, e.into()))
}

fn lower_limits(cfg: &SandboxConfig) -> Result<(), SandboxError> {
    use rustix::process::Resource;
    set_limit("RLIMIT_NOFILE", Resource::Nofile, cfg.max_fds)?;
    set_limit("RLIMIT_CORE", Resource::Core, 0)?;
    set_limit("RLIMIT_NPROC", Resource::Nproc, 0)?;
    set_limit("RLIMIT_MEMLOCK", Resource::Memlock, 0)?;
    set_limit("RLIMIT_LOCKS", Resource::Locks, 0)?;
    set_limit("RLIMIT_MSGQUEUE", Resource::Msgqueue, 0)?;
    if let Some(bytes) = cfg.max_address_space {
        set_limit("RLIMIT_AS", Resource::As, bytes)?;
    }
    Ok(())
}

fn enter_namespaces() -> SandboxReport {
    use rustix::thread::UnshareFlags as F;
    let mut report = SandboxReport::default();
    // SAFETY: the flags do not include CLONE_FILES, the only flag that can make descriptors of
    // one thread invisible to another (rustix's documented hazard).
    if unsafe { rustix::thread::unshare_unsafe(F::NEWUSER | F::NEWNET | F::NEWIPC) }.is_ok() {
        report.user_namespace = true;
        report.net_ipc_namespaces = true;
    // SAFETY: as above, no CLONE_FILES.
    } else if unsafe { rustix::thread::unshare_unsafe(F::NEWNET | F::NEWIPC) }.is_ok() {
        report.net_ipc_namespaces = true;
    }
    report
}

/// Confine the calling process as the module docs describe. Call it early, before domain code
/// runs and before any thread other than the caller exists.
pub fn apply(cfg: &SandboxConfig) -> Result<SandboxReport, SandboxError> {
    let filter = build_filter(cfg.deny, std::process::id())?;
    close_fds_except(&cfg.keep_fds)?;
    lower_limits(cfg)?;
    let report = if cfg.namespaces {
        enter_namespaces()
    } else {
        SandboxReport::default()
    };
    rustix::thread::set_no_new_privs(true).map_err(|e| SandboxError::NoNewPrivs(e.into()))?;
    seccompiler::apply_filter_all_threads(&filter).map_err(SandboxError::Install)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_list_has_no_duplicates_and_every_rule_has_a_reason() {
        let mut seen = std::collections::HashSet::new();
        for r in ALLOWED_SYSCALLS {
            assert!(seen.insert(r.nr), "{} listed twice", r.name);
            assert!(!r.reason.is_empty(), "{} has no reason", r.name);
        }
    }

    #[test]
    fn forbidden_calls_are_not_allowed() {
        for &(nr, name) in FORBIDDEN_SYSCALLS {
            assert!(
                !ALLOWED_SYSCALLS.iter().any(|r| r.nr == nr),
                "{name} must not be allowed"
            );
        }
    }

    #[test]
    fn filter_compiles_for_both_actions() {
        for deny in [DenyAction::Errno, DenyAction::KillProcess] {
            let prog = build_filter(deny, 1234).unwrap();
            assert!(prog.len() > ALLOWED_SYSCALLS.len());
        }
    }

    #[test]
    fn bad_kept_fd_is_an_error_and_closes_nothing() {
        assert!(matches!(
            close_fds_except(&[0, -1]),
            Err(SandboxError::BadFd(-1))
        ));
    }
}
