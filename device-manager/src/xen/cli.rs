//! `iddctl xen ...`: the Xen subcommands (kept here so `iddctl.rs` only dispatches).
//!
//! ```text
//! iddctl xen serve --policy FILE [--bin-dir DIR] [--run-dir DIR] [--xenstore PATH]
//!                  [--evtchn-device PATH] [--wait-domain SECS]
//! iddctl xen config DEVICE|--all [--policy FILE] [--sysfs DIR] [--json]
//! ```
//!
//! `serve` prints one line per step and per event (see [`super::supervisor`]) on stdout until
//! SIGTERM or SIGINT, then stops the backends and prints one `summary` line each; exit 0
//! unless a backend gave up or could not start. `config` prints the xl lines of
//! [`super::config`] (or a JSON array with `--json`); exit 1 if a device cannot be read.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Subcommand};
use policy::{LoadError, Policy};

use super::config::{self, XlConfig};
use super::serve::{self, ServeError, ServeOptions};
use super::supervisor::{Phase, StopHandle};

/// `iddctl xen`.
#[derive(Subcommand, Debug)]
pub enum XenCmd {
    /// In the backend domain: write the XenStore nodes of the policy's Xen guests and run and
    /// restart one backend process per device until SIGTERM.
    Serve(ServeArgs),
    /// Print a PCI function's I/O Space as a driver domain's xl settings.
    Config(ConfigArgs),
}

/// `iddctl xen serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The policy file.
    #[arg(long)]
    pub policy: PathBuf,
    /// Where xen-blkback and xen-netback are (default: beside iddctl).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// A tmpfs directory for the backends' memory files and stderr logs.
    #[arg(long, default_value = "/run/idd")]
    pub run_dir: PathBuf,
    /// XenStore: the xenbus device or xenstored's socket.
    #[arg(long, default_value = "/dev/xen/xenbus")]
    pub xenstore: PathBuf,
    /// The event-channel device each backend gets an open file of.
    #[arg(long, default_value = "/dev/xen/evtchn")]
    pub evtchn_device: PathBuf,
    /// Seconds to wait for a guest's domain to appear in XenStore.
    #[arg(long, default_value_t = 60)]
    pub wait_domain: u64,
}

/// `iddctl xen config`.
#[derive(Args, Debug)]
pub struct ConfigArgs {
    /// A host function's address (`0000:00:03.0`) or a policy device's name.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub device: Option<String>,
    /// Every host function, then the policy's devices.
    #[arg(long)]
    pub all: bool,
    /// A policy whose devices may be named (passed-through ones resolve to their function).
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// sysfs root.
    #[arg(long, default_value = "/sys")]
    pub sysfs: PathBuf,
}

fn say(line: &str) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{line}");
    let _ = o.flush();
}

fn load(p: &std::path::Path) -> Result<Option<Policy>, bool> {
    match Policy::load(p) {
        Ok(p) => Ok(Some(p)),
        Err(LoadError::Invalid(e)) => {
            eprint!("{}", e.render());
            Err(false)
        }
        Err(e) => {
            eprintln!("iddctl: {}", super::chain(&e));
            Err(false)
        }
    }
}

/// Block SIGTERM and SIGINT in this thread (and so in the threads it starts), and stop
/// `h`'s supervisor when one arrives (a thread waiting in `sigwait`).
fn stop_on_signals(h: StopHandle) {
    // SAFETY: plain signal-set manipulation on a local set; blocking signals has no memory
    // effects. The children the supervisor starts clear their mask before exec.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    std::thread::spawn(move || {
        let mut sig = 0;
        // SAFETY: sigwait on a valid set, writing into a local.
        if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
            say(&format!("signal {sig}: stopping the backends"));
        }
        h.stop();
    });
}

fn serve_cmd(a: &ServeArgs) -> Result<bool> {
    let bin_dir = match &a.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .map(PathBuf::from)
            .unwrap_or_default(),
    };
    let o = ServeOptions {
        policy: a.policy.clone(),
        bin_dir,
        run_dir: a.run_dir.clone(),
        xenstore: a.xenstore.clone(),
        evtchn: a.evtchn_device.clone(),
        wait_domain: Duration::from_secs(a.wait_domain),
    };
    let sup = match serve::prepare(&o, &mut |l| say(&l)) {
        Ok(s) => s,
        Err(ServeError::Policy(LoadError::Invalid(e))) => {
            eprint!("{}", e.render());
            return Ok(false);
        }
        Err(e) => {
            eprintln!("iddctl xen serve: {}", super::chain(&e));
            return Ok(false);
        }
    };
    stop_on_signals(sup.stop_handle());
    let summaries = sup.run(|e| say(&e.to_string()));
    Ok(summaries.iter().all(|s| s.phase != Phase::Failed))
}

fn config_cmd(a: &ConfigArgs, json: bool) -> Result<bool> {
    let p = match &a.policy {
        Some(f) => match load(f) {
            Ok(p) => p,
            Err(ok) => return Ok(ok),
        },
        None => None,
    };
    let results: Vec<Result<XlConfig, config::ConfigError>> = match &a.device {
        Some(d) if !a.all => vec![config::one(&a.sysfs, p.as_ref(), d)],
        _ => config::all(&a.sysfs, p.as_ref()),
    };
    let mut ok = true;
    let mut good = Vec::new();
    for r in results {
        match r {
            Ok(c) => good.push(c),
            Err(e) => {
                eprintln!("iddctl xen config: {}", super::chain(&e));
                ok = false;
            }
        }
    }
    if json {
        let v: Vec<serde_json::Value> = good
            .iter()
            .map(|c| serde_json::json!({ "config": c, "xl": c.xl_values() }))
            .collect();
        say(&serde_json::to_string_pretty(&v)?);
    } else {
        let text: Vec<String> = good.iter().map(XlConfig::render).collect();
        print!("{}", text.join("\n"));
    }
    Ok(ok)
}

/// Run `iddctl xen CMD`; `Ok(false)`: failed, already reported on stderr.
pub fn run(cmd: &XenCmd, json: bool) -> Result<bool> {
    match cmd {
        XenCmd::Serve(a) => serve_cmd(a),
        XenCmd::Config(a) => config_cmd(a, json),
    }
}
