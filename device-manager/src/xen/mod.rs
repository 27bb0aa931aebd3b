//! The device manager on a real Xen host: the toolstack and supervisor of our userspace
//! backends in the backend domain (dom0 in the testbed), and a driver domain's I/O Space in
//! xl's terms.
//!
//! ```text
//!  policy.toml ──plan──▶ one backend per device of each kind = "xen" guest
//!        │
//!        ├─toolstack─▶ XenStore: /local/domain/<guest>/device/{vbd,vif}/N   (frontend dirs)
//!        │                       /local/domain/<us>/backend/{vbd,vif}/<guest>/N
//!        └─supervisor─▶ xen-blkback / xen-netback processes, each with
//!                         --evtchn-fd  (an open /dev/xen/evtchn the supervisor keeps)
//!                         --memory     (<run-dir>/<guest>-<dev>.mem, its journal, on tmpfs)
//!                       restarted on exit (budget, backoff); one event line each
//! ```
//!
//! * [`plan`]: which backends a policy asks for, and their arguments.
//! * [`toolstack`]: a domain's id from its name; the vbd and vif directories Linux 6.1's
//!   frontends need, with their permissions.
//! * [`supervisor`]: processes, what outlives them, restarts, events, the summary.
//! * [`serve`]: `iddctl xen serve`, the three together; [`cli`]: the `iddctl xen` commands.
//! * [`config`]: `iddctl xen config`, a PCI function's I/O Space as `pci`/`iomem`/`ioports`/
//!   `irqs` for a driver domain's xl configuration.
//!
//! # Transparent restart
//!
//! A backend process can die (or be killed) without the guest noticing more than a stall:
//! the guest's ring and grants are the guest's, the backend *domain* stays (so the grants'
//! domain id stays), the bound event channel lives in the supervisor's file, the journal in
//! the memory file, and the XenStore states stay Connected. The next process maps the ring
//! again, replays what the journal held, and carries on (`xen-blkback`'s docs).
//!
//! What this cannot exercise in the emulated testbed (no passthrough, no separate driver
//! domain) is in `docs/xen.md`.

pub mod cli;
pub mod config;
pub mod plan;
pub mod serve;
pub mod supervisor;
pub mod toolstack;

/// An error and its sources, one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
