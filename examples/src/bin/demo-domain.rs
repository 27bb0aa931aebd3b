//! `demo-domain`: the program `channel-demo` runs in its backend and frontend domains.
//!
//! ```text
//! demo-domain backend FRONT_DOMID
//! demo-domain frontend REQUESTS WINDOW SIZE TIMEOUT_MS
//! ```
//!
//! It must be started by the process-domain launcher (it takes its platform from the launch
//! environment, including `PDOM_STORE_PORT`), enters the sandbox before doing anything else,
//! and then talks to the world only through its platform: grants, event channels, XenStore.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use devchan::platform::Platform;
use hypervisor::process::ProcessPlatform;
use hypervisor::sandbox::SandboxConfig;
use hypervisor::store_link::{process_client, EventMux};
use idd_examples::front::FrontConfig;
use idd_examples::{back, front, say};

fn num<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> Result<T> {
    args.get(i)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("missing or bad {what}"))
}

fn run(args: &[String]) -> Result<()> {
    let role = args.first().map(String::as_str).unwrap_or("");
    if role != "backend" && role != "frontend" {
        bail!("usage: demo-domain backend FRONT_DOMID | frontend REQUESTS WINDOW SIZE TIMEOUT_MS");
    }
    // Parse everything before entering the sandbox, then confine.
    let front_cfg = (role == "frontend")
        .then(|| -> Result<FrontConfig> {
            Ok(FrontConfig {
                requests: num(args, 1, "REQUESTS")?,
                window: num(args, 2, "WINDOW")?,
                size: num(args, 3, "SIZE")?,
                timeout: Duration::from_millis(num(args, 4, "TIMEOUT_MS")?),
            })
        })
        .transpose()?;
    let front_id: Option<u16> = (role == "backend")
        .then(|| num(args, 1, "FRONT_DOMID"))
        .transpose()?;
    let (platform, report) = ProcessPlatform::enter(SandboxConfig::default())?;
    let mux = EventMux::new(Arc::new(platform));
    let mut xs = process_client(&mux)?;
    let me = mux.platform().domid();
    say(&format!(
        "{role}: domain {me} sandboxed (seccomp, no_new_privs, user namespace: {}); XenStore at {}",
        report.user_namespace,
        xs.get_domain_path(me)?
    ));
    match (front_cfg, front_id) {
        (Some(cfg), _) => front::run(&mux, &mut xs, cfg),
        (_, Some(f)) => back::run(&mux, &mut xs, f),
        _ => unreachable!("role checked above"),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo-domain: {e:#}");
            ExitCode::FAILURE
        }
    }
}
