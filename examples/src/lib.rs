//! Runnable programs a new user starts from.
//!
//! `channel-demo` (run it with `bash ci/demo.sh`) boots the embedded process-domain
//! hypervisor: domain 0 with xenstored (on every domain's ring page, and on a Unix socket for
//! Xen's own tools), a sandboxed backend domain and a sandboxed frontend domain, both running
//! `demo-domain`. They find each other through XenStore exactly like Xen split drivers
//! ([`proto`] lists the keys), exchange requests whose payload pages travel by grant (the
//! backend uses grant copy) and verify every response; halfway through, the demo kills the
//! backend process, hears of it through its pidfd, and starts a new backend process in the
//! same domain, which re-attaches to the same ring while the frontend reissues what had no
//! answer.
//!
//! * [`proto`]: the `vdemo` device: ring messages, payload check, XenStore keys.
//! * [`front`], [`back`]: the two ends, as run inside the domains.
//! * [`toolstack`]: what domain 0 writes to XenStore, and the state-timeline watcher.

pub mod back;
pub mod front;
pub mod proto;
pub mod toolstack;

use devchan::xenbus::XenbusState;
use devchan::xenstore::Client;
use std::io::{Read, Write};

/// Print one line to stdout and flush it (the demo reads the domains' stdout line by line).
pub fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    // A closed stdout only loses the progress line.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// The XenBus state at `path`; `Unknown` when missing or malformed (a peer's bytes).
pub fn read_state<T: Read + Write>(xs: &mut Client<T>, path: &str) -> XenbusState {
    xs.read(0, path)
        .ok()
        .and_then(|v| XenbusState::from_xenstore(&v).ok())
        .unwrap_or(XenbusState::Unknown)
}
