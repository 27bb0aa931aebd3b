//! Event-channel routing between domains (`EVTCHNOP_*` semantics, 2-level ABI).
//!
//! Each domain has a port table. A port is *free*, *unbound* (allocated for one named remote
//! domain to bind to) or *interdomain* (connected to one port of a peer). Port 0 is reserved
//! and never allocated, as in Xen; ports are below `EVTCHN_2L_NR_CHANNELS`.
//!
//! ```text
//!  alloc_unbound(remote)         bind_interdomain (by remote)
//!  Free ───────────────► Unbound ──────────────────────────► Interdomain
//!   ▲                      │  ▲                                  │
//!   └──── close ───────────┘  └──── peer closes its end ─────────┘
//!   ▲                                                            │
//!   └──────────────────────────── close ─────────────────────────┘
//! ```
//!
//! Sending on an interdomain port sets the peer port pending in the *peer's* `shared_info`
//! page (its own memory) and signals the peer's upcall eventfd only when
//! [`devchan::evtchn::EventPage::set_pending`] says an upcall is due. Unmask re-checks pending
//! in the hypervisor and raises the upcall again if the port became pending while masked.
//!
//! Unlike Xen, which silently drops a send on an unbound port, sending on a port that is not
//! interdomain is an error here: a domain learns at once that its peer closed the channel (or
//! died).
//!
//! Two port tables are locked in domain-id order; a send holds only the sender's table lock
//! (so a concurrent close cannot retarget the port midway) while it sets the peer's bit.

use crate::domain::Domain;
use crate::system::{Result, System, SystemError};
use devchan::evtchn::EVTCHN_2L_NR_CHANNELS;
use devchan::grant::{DomId, DOMID_SELF};
use devchan::platform::Port;
use std::sync::{Arc, MutexGuard, Weak};

/// The state of one port.
#[derive(Clone, Debug, Default)]
pub enum PortState {
    /// Not allocated.
    #[default]
    Free,
    /// Allocated; `remote` may bind to it.
    Unbound {
        /// The domain allowed to bind.
        remote: DomId,
    },
    /// Connected to `remote`'s `remote_port`.
    Interdomain {
        /// The peer domain.
        remote: DomId,
        /// The peer's port.
        remote_port: Port,
        /// The peer itself (weak: a dead peer's memory is not kept alive by its channels).
        peer: Weak<Domain>,
    },
}

/// A domain's port table. Grows on demand up to `EVTCHN_2L_NR_CHANNELS` ports.
#[derive(Default)]
pub struct PortTable {
    ports: Vec<PortState>,
}

impl PortTable {
    /// The state of `port` (`Free` if never allocated or out of range).
    pub fn get(&self, port: Port) -> PortState {
        self.ports.get(port as usize).cloned().unwrap_or_default()
    }

    fn set(&mut self, port: Port, st: PortState) {
        if let Some(p) = self.ports.get_mut(port as usize) {
            *p = st;
        }
    }

    fn alloc(&mut self, st: PortState) -> Result<Port> {
        if self.ports.is_empty() {
            self.ports.push(PortState::Free); // port 0: reserved, never handed out
        }
        let free = self
            .ports
            .iter()
            .skip(1)
            .position(|p| matches!(p, PortState::Free));
        let idx = match free {
            Some(i) => i + 1,
            None if self.ports.len() < EVTCHN_2L_NR_CHANNELS as usize => {
                self.ports.push(PortState::Free);
                self.ports.len() - 1
            }
            None => return Err(SystemError::Exhausted("event-channel ports")),
        };
        self.ports[idx] = st;
        Port::try_from(idx).map_err(|_| SystemError::Exhausted("event-channel ports"))
    }

    /// Ports not free, with their state.
    pub fn allocated(&self) -> Vec<(Port, PortState)> {
        (0u32..)
            .zip(&self.ports)
            .filter(|(_, s)| !matches!(s, PortState::Free))
            .map(|(p, s)| (p, s.clone()))
            .collect()
    }
}

/// Lock the port tables of `a` and `b` in domain-id order (once if they are the same).
fn lock_two<'a>(
    a: &'a Domain,
    b: &'a Domain,
) -> (MutexGuard<'a, PortTable>, Option<MutexGuard<'a, PortTable>>) {
    if a.id() == b.id() {
        (a.lock_ports(), None)
    } else if a.id() < b.id() {
        let ga = a.lock_ports();
        (ga, Some(b.lock_ports()))
    } else {
        let gb = b.lock_ports();
        (a.lock_ports(), Some(gb))
    }
}

fn resolve(sys: &System, caller: &Arc<Domain>, dom: DomId) -> Result<Arc<Domain>> {
    if dom == DOMID_SELF || dom == caller.id() {
        Ok(caller.clone())
    } else {
        sys.lookup(dom)
    }
}

/// `EVTCHNOP_alloc_unbound`.
pub(crate) fn alloc_unbound(sys: &System, caller: DomId, remote: DomId) -> Result<Port> {
    let me = sys.lookup(caller)?;
    let remote = resolve(sys, &me, remote)?.id();
    let port = me.lock_ports().alloc(PortState::Unbound { remote })?;
    Ok(port)
}

/// `EVTCHNOP_bind_interdomain`.
pub(crate) fn bind_interdomain(
    sys: &System,
    caller: DomId,
    remote: DomId,
    remote_port: Port,
) -> Result<Port> {
    let me = sys.lookup(caller)?;
    let peer = resolve(sys, &me, remote)?;
    let (mut mine, mut theirs) = lock_two(&me, &peer);
    let rstate = theirs
        .as_ref()
        .map_or_else(|| mine.get(remote_port), |t| t.get(remote_port));
    match rstate {
        PortState::Unbound { remote } if remote == caller => {}
        _ => return Err(SystemError::BadPort(remote_port)),
    }
    let local = mine.alloc(PortState::Interdomain {
        remote: peer.id(),
        remote_port,
        peer: Arc::downgrade(&peer),
    })?;
    let back = PortState::Interdomain {
        remote: caller,
        remote_port: local,
        peer: Arc::downgrade(&me),
    };
    match theirs.as_mut() {
        Some(t) => t.set(remote_port, back),
        None => mine.set(remote_port, back),
    }
    drop((mine, theirs));
    // As Xen does: notifications sent to the unbound port before the bind may have been
    // lost, so conservatively mark the new local port pending.
    if me.event_page().set_pending(local) {
        me.kick();
    }
    Ok(local)
}

/// `EVTCHNOP_send`.
pub(crate) fn send(sys: &System, caller: DomId, port: Port) -> Result<()> {
    let me = sys.lookup(caller)?;
    let ports = me.lock_ports();
    let PortState::Interdomain {
        remote_port, peer, ..
    } = ports.get(port)
    else {
        return Err(SystemError::BadPort(port));
    };
    let peer = peer.upgrade().ok_or(SystemError::BadPort(port))?;
    if peer.event_page().set_pending(remote_port) {
        peer.kick();
    }
    Ok(())
}

/// `EVTCHNOP_unmask`.
pub(crate) fn unmask(sys: &System, caller: DomId, port: Port) -> Result<()> {
    let me = sys.lookup(caller)?;
    if port == 0 || matches!(me.lock_ports().get(port), PortState::Free) {
        return Err(SystemError::BadPort(port));
    }
    if me.event_page().unmask(port) {
        me.kick();
    }
    Ok(())
}

/// `EVTCHNOP_close`.
pub(crate) fn close(sys: &System, caller: DomId, port: Port) -> Result<()> {
    let me = sys.lookup_any(caller)?;
    close_port(&me, port)
}

/// Close `port` of `me`: a bound peer's port goes back to unbound (for `me`).
pub(crate) fn close_port(me: &Arc<Domain>, port: Port) -> Result<()> {
    // Find the peer, then lock both tables in order and re-check (the state may have moved
    // between the two lockings; a few retries bound the loop).
    for _ in 0..8 {
        let state = me.lock_ports().get(port);
        let peer = match &state {
            PortState::Free => return Err(SystemError::BadPort(port)),
            PortState::Unbound { .. } => None,
            PortState::Interdomain { peer, .. } => peer.upgrade(),
        };
        let peer_ref = peer.as_deref().unwrap_or(me);
        let (mut mine, mut theirs) = lock_two(me, peer_ref);
        let now = mine.get(port);
        let same = match (&state, &now) {
            (PortState::Unbound { remote: a }, PortState::Unbound { remote: b }) => a == b,
            (
                PortState::Interdomain {
                    remote: a,
                    remote_port: ap,
                    ..
                },
                PortState::Interdomain {
                    remote: b,
                    remote_port: bp,
                    ..
                },
            ) => a == b && ap == bp,
            _ => false,
        };
        if !same {
            continue;
        }
        if let (PortState::Interdomain { remote_port, .. }, Some(_)) = (&now, &peer) {
            let table = theirs.as_mut().unwrap_or(&mut mine);
            // Only if the peer's port still points back at us.
            if matches!(table.get(*remote_port),
                PortState::Interdomain { remote, remote_port: rp, .. } if remote == me.id() && rp == port)
            {
                table.set(*remote_port, PortState::Unbound { remote: me.id() });
            }
        }
        mine.set(port, PortState::Free);
        me.event_page().clear_pending(port);
        return Ok(());
    }
    Err(SystemError::BadPort(port))
}

/// Close every port of a dying domain.
pub(crate) fn close_all(me: &Arc<Domain>) {
    let ports = me.lock_ports().allocated();
    for (p, _) in ports {
        let _ = close_port(me, p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_zero_is_reserved_and_ports_are_reused() {
        let mut t = PortTable::default();
        assert_eq!(t.alloc(PortState::Unbound { remote: 1 }).unwrap(), 1);
        assert_eq!(t.alloc(PortState::Unbound { remote: 1 }).unwrap(), 2);
        t.set(1, PortState::Free);
        assert_eq!(t.alloc(PortState::Unbound { remote: 2 }).unwrap(), 1);
        assert!(matches!(t.get(0), PortState::Free));
        assert!(matches!(t.get(u32::MAX), PortState::Free));
        assert_eq!(t.allocated().len(), 2);
    }

    #[test]
    fn set_out_of_range_is_ignored() {
        let mut t = PortTable::default();
        t.set(5, PortState::Unbound { remote: 1 });
        assert!(t.allocated().is_empty());
    }
}
