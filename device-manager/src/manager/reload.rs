//! Live reload: the manager's side of `policy::reload`.
//!
//! The policy crate decides what changed between two policies and which changes are unsafe
//! on a running system ([`policy::Policy::diff_with`]). This module carries out the safe ones
//! without restarting a guest or touching another guest's channel:
//!
//! | change | what the manager does |
//! |---|---|
//! | a NIC's share | stored config, then `credit CHAN BYTES/USEC` to the running `idd-net` |
//! | a NIC's allowed IPs | stored config, then `ips CHAN CIDR+CIDR` to the running `idd-net` |
//! | a disk region grown in place | stored config, `region CHAN SECTORS` to the running `idd-blk`, then `sectors` in XenStore and `state` rewritten `Connected` |
//! | a process guest added that uses a running device | its domain and XenStore nodes, its process started (the caller's [`GuestStarter`]), its rings awaited, then `attach SPEC` to each running IDD |
//! | devices added, removed or re-set, other guests added | nothing now: the next start uses them |
//! | a running guest removed, or its NIC or disk added, removed or re-moded | refused ([`ReloadError::NotLive`]): restart the manager with the new policy |
//!
//! Removing a guest live is not done: the IDDs have no detach (a channel's index is its
//! journal's place, and every later channel would move), so it stays a refusal.
//!
//! "Stored config" is what the manager keeps to start an IDD process (its `--channel`
//! arguments, a standby's `channel` lines): it is updated *first*, so an IDD that crashes
//! during or after the apply comes back with the new values. The running IDD is then told
//! through its control commands (`manager/idd.rs`); it answers each one. A guest without a
//! channel yet only gets the stored value.
//!
//! Every change is checked before anything is done (kind and preconditions: a connected
//! disk's region only grows in place and fits the device, a guest keeps its number of NICs):
//! an apply that contains a change that is not live does nothing at all. What can still fail
//! part-way is the running IDD's answer ([`ReloadError::Failed`]); the stored config of that
//! change and of every change before it holds the new values by then.

use std::time::Duration;

use policy::{Change, Policy};
use serde::Serialize;

use super::{add_guest_domain, uses_ours, Manager};

/// How long an IDD has to answer a control command.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);

/// Why an apply did not (fully) happen.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// A change cannot be done live; nothing was applied.
    #[error("{change} for {subject} cannot be applied live: {reason}")]
    NotLive {
        /// The change's name (`access-added`, ...).
        change: String,
        /// The guest or device.
        subject: String,
        /// Why, and what to do instead.
        reason: String,
    },
    /// Acting on the running system failed part-way; `done` lists what was applied before.
    /// The stored config of the failed change is updated (a restarted IDD uses it).
    #[error("applying {change}: {error:#}")]
    Failed {
        /// The change that failed.
        change: String,
        /// What was applied before it.
        done: Vec<Applied>,
        /// What went wrong.
        error: anyhow::Error,
    },
}

/// What the manager did for one change.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Applied {
    /// The change, as `policy` serializes it.
    #[serde(flatten)]
    pub change: Change,
    /// `live` (a running IDD took it), `stored` (no running channel: used at the next
    /// start), or `deferred` (nothing runs that it concerns).
    pub how: How,
    /// One line per action.
    pub actions: Vec<String>,
}

/// How a change took effect (see [`Applied`]).
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum How {
    /// A running IDD took it.
    Live,
    /// Stored for the next start of the channel or IDD.
    Stored,
    /// Nothing runs that it concerns (recorded in the policy only).
    Deferred,
}

/// What one change needs.
enum Action<'c> {
    Net { guest: &'c str, device: &'c str },
    Region { guest: &'c str, device: &'c str },
    AddGuest { guest: &'c str },
    Deferred,
}

/// Starts a guest's process (its program and arguments are the caller's business): called
/// by [`Manager::apply`] with the manager and the guest's name, after its domain and nodes
/// exist and before its rings are awaited.
pub type GuestStarter<'a> = dyn FnMut(&mut Manager, &str) -> anyhow::Result<()> + 'a;

/// How long a guest added live has to publish its rings.
pub const ATTACH_TIMEOUT: Duration = Duration::from_secs(10);

/// The change's name as it serializes (`share-changed`, ...).
pub fn change_name(c: &Change) -> String {
    serde_json::to_value(c)
        .ok()
        .and_then(|v| v.get("change").and_then(|c| c.as_str()).map(str::to_owned))
        .unwrap_or_else(|| "change".into())
}

impl Manager {
    /// Classify `c` (leading to policy `new`): an action on a running slice, nothing, or not
    /// live; an action's preconditions are checked here, so that [`Manager::apply`] fails
    /// before doing anything when one does not hold.
    fn action<'c>(&mut self, new: &Policy, c: &'c Change) -> Result<Action<'c>, ReloadError> {
        let not_live = |subject: &str, reason: String| ReloadError::NotLive {
            change: change_name(c),
            subject: subject.to_owned(),
            reason,
        };
        Ok(match c {
            Change::ShareChanged { guest, device, .. } | Change::IpsChanged { guest, device } => {
                match self.nets.iter().find(|n| &n.dev.name == device) {
                    Some(n) if n.nics.iter().any(|x| &x.name == guest) => {
                        n.check_access(guest, &net_entries(new, guest, device))
                            .map_err(|e| not_live(guest, format!("{e:#}")))?;
                        Action::Net { guest, device }
                    }
                    _ => Action::Deferred,
                }
            }
            Change::RegionChanged { guest, device, .. } => match &self.blk {
                Some(b) if &b.dev.name == device && b.disks.iter().any(|d| &d.name == guest) => {
                    let region = disk_region(new, guest, device)
                        .map_err(|e| not_live(guest, format!("{e:#}")))?;
                    b.check_region(guest, &region)
                        .map_err(|e| not_live(guest, format!("{e:#}")))?;
                    Action::Region { guest, device }
                }
                _ => Action::Deferred,
            },
            Change::GuestAdded { guest } => match new.guest(guest) {
                Some(g) if uses_ours(self.blk.as_ref(), &self.nets, g) => {
                    if g.kind != policy::GuestKind::Process {
                        return Err(not_live(guest, "only process guests are run".into()));
                    }
                    if let Some(b) = &self.blk {
                        ensure_room(
                            g.disk.iter().any(|d| d.device == b.dev.name),
                            b.disks.len(),
                            usize::try_from(crate::layout::MAX_CHANNELS).unwrap_or(usize::MAX),
                        )
                        .map_err(|e| not_live(guest, format!("{}: {e}", b.dev.name)))?;
                    }
                    for n in &self.nets {
                        let more = g.net.iter().filter(|a| a.device == n.dev.name).count();
                        // `- 1` saturates: with `more == 0` on a device without NICs yet
                        // it would underflow (the count is unused then).
                        let have = (n.nics.len() + more).saturating_sub(1);
                        ensure_room(more > 0, have, super::net::MAX_NICS)
                            .map_err(|e| not_live(guest, format!("{}: {e}", n.dev.name)))?;
                    }
                    Action::AddGuest { guest }
                }
                _ => Action::Deferred,
            },
            Change::AccessAdded { guest, .. }
            | Change::AccessRemoved { guest, .. }
            | Change::AccessChanged { guest, .. }
            | Change::GuestRemoved { guest }
                if self.guest_running(guest).unwrap_or(false) =>
            {
                return Err(not_live(
                    guest,
                    "plugging or unplugging a running guest's NIC or disk, or removing a running \
                     guest, is not done live: stop the guest, or restart the manager with the new policy"
                        .into(),
                ))
            }
            _ => Action::Deferred,
        })
    }

    /// Check that every change of `changes` (from [`Policy::diff_with`] against the running
    /// policy, leading to `new`) can be applied live, without doing anything.
    pub fn check_live(&mut self, new: &Policy, changes: &[Change]) -> Result<(), ReloadError> {
        for c in changes {
            self.action(new, c)?;
        }
        Ok(())
    }

    /// Apply `changes` (see the module docs): all checked first, then each carried out;
    /// `start` starts the process of a guest added live.
    pub fn apply(
        &mut self,
        new: &Policy,
        changes: &[Change],
        start: &mut GuestStarter<'_>,
    ) -> Result<Vec<Applied>, ReloadError> {
        self.check_live(new, changes)?;
        let mut done = Vec::new();
        for c in changes {
            let result = match self.action(new, c)? {
                Action::Deferred => Ok((How::Deferred, Vec::new())),
                Action::Net { guest, device } => self.apply_net(new, guest, device),
                Action::Region { guest, device } => self.apply_region(new, guest, device),
                Action::AddGuest { guest } => self.apply_add_guest(new, guest, start),
            };
            match result {
                Ok((how, actions)) => done.push(Applied {
                    change: c.clone(),
                    how,
                    actions,
                }),
                Err(error) => {
                    return Err(ReloadError::Failed {
                        change: change_name(c),
                        done,
                        error,
                    })
                }
            }
        }
        Ok(done)
    }

    fn apply_net(
        &mut self,
        new: &Policy,
        guest: &str,
        device: &str,
    ) -> anyhow::Result<(How, Vec<String>)> {
        let entries = net_entries(new, guest, device);
        let n = self
            .nets
            .iter_mut()
            .find(|n| n.dev.name == device)
            .ok_or_else(|| anyhow::anyhow!("no NIC {device}"))?;
        let actions = n.update_access(guest, &entries, CONTROL_TIMEOUT)?;
        Ok((how_of(&actions), actions))
    }

    fn apply_add_guest(
        &mut self,
        new: &Policy,
        guest: &str,
        start: &mut GuestStarter<'_>,
    ) -> anyhow::Result<(How, Vec<String>)> {
        let g = new
            .guest(guest)
            .ok_or_else(|| anyhow::anyhow!("no guest {guest} in the new policy"))?;
        anyhow::ensure!(
            self.guests.iter().all(|x| x.name != guest),
            "guest {guest} exists already"
        );
        let dom = add_guest_domain(&mut self.d0, self.blk.as_mut(), &mut self.nets, g)?
            .ok_or_else(|| anyhow::anyhow!("guest {guest} uses no device this manager runs"))?;
        let domid = dom.domid;
        self.guests.push(dom);
        let mut actions = vec![format!("{guest}: domain {domid} created")];
        start(self, guest)?;
        actions.push(format!("{guest}: process started"));
        if let Some(b) = self.blk.as_mut() {
            actions.extend(b.attach_guest(&mut self.d0, domid, ATTACH_TIMEOUT)?);
        }
        for n in &mut self.nets {
            actions.extend(n.attach_guest(&mut self.d0, domid, ATTACH_TIMEOUT)?);
        }
        Ok((How::Live, actions))
    }

    fn apply_region(
        &mut self,
        new: &Policy,
        guest: &str,
        device: &str,
    ) -> anyhow::Result<(How, Vec<String>)> {
        let region = disk_region(new, guest, device)?;
        let b = self
            .blk
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("no disk {device}"))?;
        let line = b.update_region(&mut self.d0, guest, &region, CONTROL_TIMEOUT)?;
        let actions = vec![line];
        Ok((how_of(&actions), actions))
    }
}

/// Guest `guest`'s access entries for NIC `device` in `new`, in order.
fn net_entries<'p>(new: &'p Policy, guest: &str, device: &str) -> Vec<&'p policy::NetAccess> {
    new.guest(guest)
        .map(|g| g.net.iter().filter(|a| a.device == device).collect())
        .unwrap_or_default()
}

/// Guest `guest`'s region of disk `device` in `new`.
fn disk_region(new: &Policy, guest: &str, device: &str) -> anyhow::Result<policy::Region> {
    new.guest(guest)
        .and_then(|g| g.disk.iter().find(|d| d.device == device))
        .map(|d| d.region)
        .ok_or_else(|| anyhow::anyhow!("guest {guest} has no disk on {device} in the new policy"))
}

/// Room for one more channel when `wanted`: `have` channels now, `max` at most.
fn ensure_room(wanted: bool, have: usize, max: usize) -> anyhow::Result<()> {
    anyhow::ensure!(
        !wanted || have < max,
        "it serves {have} channels, at most {max}"
    );
    Ok(())
}

/// `live` if any action reached a running IDD.
fn how_of(actions: &[String]) -> How {
    if actions.iter().any(|a| a.contains("(live")) {
        How::Live
    } else {
        How::Stored
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applied_changes_serialize_flat() {
        let a = Applied {
            change: Change::IpsChanged {
                guest: "alice".into(),
                device: "net0".into(),
            },
            how: How::Live,
            actions: vec!["alice on net0: ips 10.0.0.0/24 (live, channel 0)".into()],
        };
        let v = serde_json::to_value(&a).unwrap();
        assert_eq!(v["change"], "ips-changed");
        assert_eq!(v["guest"], "alice");
        assert_eq!(v["how"], "live");
        assert_eq!(change_name(&a.change), "ips-changed");
    }

    #[test]
    fn room_is_checked_only_when_wanted() {
        assert!(ensure_room(true, 63, 64).is_ok());
        let e = ensure_room(true, 64, 64).unwrap_err().to_string();
        assert!(e.contains("at most 64"), "{e}");
        assert!(ensure_room(false, 64, 64).is_ok());
    }

    #[test]
    fn how_follows_the_actions() {
        assert_eq!(how_of(&["x (live, channel 1)".into()]), How::Live);
        assert_eq!(how_of(&["x (stored)".into()]), How::Stored);
        assert_eq!(how_of(&[]), How::Stored);
    }
}
