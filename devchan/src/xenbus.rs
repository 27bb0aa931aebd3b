//! XenBus device states (`xen/include/public/io/xenbus.h`) and the connection handshake.
//!
//! Each end of a split device keeps its state, as a decimal number, in the `state` key of its
//! own XenStore directory (`/local/domain/<front>/device/<type>/<id>/state` and
//! `/local/domain/<back>/backend/<type>/<front>/<id>/state`) and watches the other end's.
//!
//! # Handshake
//!
//! ```text
//!  frontend                                   backend
//!  Initialising                               Initialising
//!       |                                          | Advertise: write feature-* keys
//!       |                                     InitWait
//!       | PublishRing: grant ring page(s), alloc   |
//!       | event channel, write ring-ref and        |
//!       | event-channel                            |
//!  Initialised                                     | MapRing: read ring-ref/event-channel,
//!       |                                          | map the ring, bind the event channel
//!       |                                     Connected
//!       | Connect: read the backend's features     |
//!  Connected                                  Connected
//!
//!  Closing/Closed on either side: TearDown (unmap, unbind, end grants), then Closing/Closed.
//! ```
//!
//! A restarted backend finds the frontend `Connected` and maps the ring the frontend already
//! uses, resuming from its shared indexes (`MapRing { resume: true }`, see
//! [`crate::ring::BackRing::attach`]): the frontend never notices (transparent re-attach, as
//! Linux backends also connect to an already `Connected` frontend). A backend that cannot
//! resume (a new domain the ring was not granted to) asks for a reconnect instead by closing
//! ([`Handshake::close`]): the frontend tears down to `Closed`, restarts
//! ([`Handshake::restart`]) and publishes a fresh ring. A backend that is `Closed` goes back to
//! `InitWait` when the frontend returns to `Initialising`.
//!
//! [`next_action`] is the whole policy: a pure function of the role, our state and the peer's,
//! with no I/O. The caller performs the [`Action`], writes [`Action::then`] to its `state` key,
//! and calls again on the next watch event. [`Handshake`] keeps our state for it.

use core::fmt;
use core::str::FromStr;

/// A device end's state (`enum xenbus_state`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum XenbusState {
    /// No state yet (the key is missing or unreadable): `XenbusStateUnknown`.
    Unknown = 0,
    /// Starting up: `XenbusStateInitialising`.
    Initialising = 1,
    /// Early initialisation done, waiting for the peer or hotplug scripts: `XenbusStateInitWait`.
    InitWait = 2,
    /// Waiting for a connection from the peer: `XenbusStateInitialised`.
    Initialised = 3,
    /// Connected: `XenbusStateConnected`.
    Connected = 4,
    /// Being closed after an error or unplug: `XenbusStateClosing`.
    Closing = 5,
    /// Closed: `XenbusStateClosed`.
    Closed = 6,
    /// Being reconfigured: `XenbusStateReconfiguring`.
    Reconfiguring = 7,
    /// Reconfigured: `XenbusStateReconfigured`.
    Reconfigured = 8,
}

/// Every state, in numeric order.
pub const ALL_STATES: [XenbusState; 9] = [
    XenbusState::Unknown,
    XenbusState::Initialising,
    XenbusState::InitWait,
    XenbusState::Initialised,
    XenbusState::Connected,
    XenbusState::Closing,
    XenbusState::Closed,
    XenbusState::Reconfiguring,
    XenbusState::Reconfigured,
];

/// Why a state value was rejected.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum XenbusError {
    /// A number that is not a state.
    #[error("Unknown XenBus state {0}")]
    BadState(u32),
    /// A XenStore value that is not a decimal state number.
    #[error("XenBus state value {0:?} is not a number")]
    NotANumber(String),
}

impl TryFrom<u32> for XenbusState {
    type Error = XenbusError;
    fn try_from(v: u32) -> Result<Self, XenbusError> {
        usize::try_from(v)
            .ok()
            .and_then(|i| ALL_STATES.get(i).copied())
            .ok_or(XenbusError::BadState(v))
    }
}

impl From<XenbusState> for u32 {
    fn from(s: XenbusState) -> u32 {
        s as u32
    }
}

impl FromStr for XenbusState {
    type Err = XenbusError;
    /// Parse a `state` value as read from XenStore: decimal digits, surrounding whitespace
    /// allowed (some tools add a newline).
    fn from_str(s: &str) -> Result<Self, XenbusError> {
        let t = s.trim();
        if t.is_empty() || t.len() > 10 || !t.bytes().all(|b| b.is_ascii_digit()) {
            return Err(XenbusError::NotANumber(s.chars().take(32).collect()));
        }
        let n: u32 = t
            .parse()
            .map_err(|_| XenbusError::NotANumber(t.to_owned()))?;
        Self::try_from(n)
    }
}

impl XenbusState {
    /// Parse a raw XenStore value (bytes from the peer).
    pub fn from_xenstore(value: &[u8]) -> Result<Self, XenbusError> {
        let s = core::str::from_utf8(value)
            .map_err(|_| XenbusError::NotANumber(String::from_utf8_lossy(value).into_owned()))?;
        s.parse()
    }

    /// The value to write to XenStore: the decimal number.
    pub fn to_xenstore(self) -> String {
        u32::from(self).to_string()
    }

    /// The state's name, as Linux's `xenbus_strstate` prints it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Unknown => "Unknown",
            Self::Initialising => "Initialising",
            Self::InitWait => "InitWait",
            Self::Initialised => "Initialised",
            Self::Connected => "Connected",
            Self::Closing => "Closing",
            Self::Closed => "Closed",
            Self::Reconfiguring => "Reconfiguring",
            Self::Reconfigured => "Reconfigured",
        }
    }
}

impl fmt::Display for XenbusState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which end of the device we are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The guest's end: owns the ring pages and event channel.
    Frontend,
    /// The driver domain's end: maps the ring and binds the event channel.
    Backend,
}

/// What the caller should do next; after doing it, switch our `state` to [`Action::then`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Nothing: wait for the peer's next state change.
    Wait,
    /// Backend: write the `feature-*` keys and limits, then `InitWait`.
    Advertise,
    /// Frontend: drop any previous ring, create and grant new ring page(s), allocate an event
    /// channel, write `ring-ref`/`event-channel` (and feature requests), then `Initialised`.
    PublishRing,
    /// Backend: read `ring-ref`/`event-channel` and the frontend's requests, map the ring,
    /// bind the event channel, then `Connected`. `resume`: the frontend is already connected
    /// on this ring, so attach at its shared indexes (and replay the in-flight journal) rather
    /// than start at 0.
    MapRing {
        /// Attach to a ring in use instead of a fresh one.
        resume: bool,
    },
    /// Frontend: read the backend's features and start I/O, then `Connected`.
    Connect,
    /// Stop I/O and release the ring and event channel, then switch to the given state
    /// (`Closing` or `Closed`).
    TearDown(XenbusState),
}

impl Action {
    /// The state to switch to after the action, or `None` for [`Action::Wait`].
    pub fn then(self) -> Option<XenbusState> {
        match self {
            Self::Wait => None,
            Self::Advertise => Some(XenbusState::InitWait),
            Self::PublishRing => Some(XenbusState::Initialised),
            Self::MapRing { .. } | Self::Connect => Some(XenbusState::Connected),
            Self::TearDown(s) => Some(s),
        }
    }
}

/// The handshake policy: what `role`, in state `ours`, does when the other end is in `peer`.
pub fn next_action(role: Role, ours: XenbusState, peer: XenbusState) -> Action {
    use XenbusState as S;
    match role {
        Role::Frontend => match (ours, peer) {
            // Closed already, or restarted after a close: wait for the backend to come back.
            (S::Closed, S::Closing | S::Closed) | (S::Initialising, S::Closed) => Action::Wait,
            (_, S::Closing | S::Closed) => Action::TearDown(S::Closed),
            (S::Initialising | S::Closed, S::InitWait | S::Initialised) => Action::PublishRing,
            (S::Initialised, S::Connected) => Action::Connect,
            // A backend still connected to a ring from before we (re)started: reset it first.
            (S::Initialising, S::Connected) => Action::TearDown(S::Closing),
            _ => Action::Wait,
        },
        Role::Backend => match (ours, peer) {
            (S::Closed, S::Closing | S::Closed | S::Unknown) => Action::Wait,
            (S::Closing, S::Closing) => Action::Wait,
            // A new backend advertises whatever the frontend is doing (its state key may not
            // exist yet: Unknown), except to a closed frontend, which must restart first.
            (S::Initialising, S::Closed) => Action::Wait,
            (S::Initialising, S::Closing) => Action::TearDown(S::Closing),
            (S::Initialising, _) => Action::Advertise,
            (S::Closed, S::Initialising) => Action::Advertise,
            (_, S::Closed | S::Unknown) => Action::TearDown(S::Closed),
            (_, S::Closing) => Action::TearDown(S::Closing),
            (S::InitWait | S::Initialised, S::Initialised) => Action::MapRing { resume: false },
            (S::InitWait | S::Initialised, S::Connected) => Action::MapRing { resume: true },
            _ => Action::Wait,
        },
    }
}

/// One end's progress through the handshake: our state plus [`next_action`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Handshake {
    role: Role,
    state: XenbusState,
}

impl Handshake {
    /// A new end in `Initialising`.
    pub fn new(role: Role) -> Self {
        Self {
            role,
            state: XenbusState::Initialising,
        }
    }

    /// Resume at a known state (e.g. read back from XenStore after a restart).
    pub fn resume(role: Role, state: XenbusState) -> Self {
        Self { role, state }
    }

    /// Our role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Our current state (what our `state` key should say).
    pub fn state(&self) -> XenbusState {
        self.state
    }

    /// What to do now that the peer is in `peer`.
    pub fn on_peer(&self, peer: XenbusState) -> Action {
        next_action(self.role, self.state, peer)
    }

    /// The action succeeded: take its target state, which the caller writes to XenStore.
    /// Returns the new state if it changed.
    pub fn completed(&mut self, action: Action) -> Option<XenbusState> {
        let next = action.then().filter(|s| *s != self.state)?;
        self.state = next;
        Some(next)
    }

    /// Start closing on our own initiative (unplug, error): tear down, then `Closing`.
    pub fn close(&self) -> Action {
        match self.state {
            XenbusState::Closing | XenbusState::Closed => Action::Wait,
            _ => Action::TearDown(XenbusState::Closing),
        }
    }

    /// After `Closed`, go back to `Initialising` to connect again (frontend reconnect).
    pub fn restart(&mut self) {
        self.state = XenbusState::Initialising;
    }
}

/// What this module claims about Xen's `io/xenbus.h`.
pub fn abi_checks() -> Vec<crate::abi::AbiCheck> {
    ALL_STATES
        .iter()
        .map(|s| crate::abi::AbiCheck::new(format!("XenbusState{}", s.name()), u32::from(*s)))
        .chain(std::iter::once(crate::abi::AbiCheck::new(
            "sizeof(XenbusState)",
            core::mem::size_of::<XenbusState>(),
        )))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use XenbusState as S;

    /// Run both ends against each other until neither has anything to do; returns the final
    /// states and the actions taken, or panics on a livelock.
    fn settle(front: &mut Handshake, back: &mut Handshake) -> Vec<(Role, Action)> {
        let mut log = Vec::new();
        for _ in 0..50 {
            let mut moved = false;
            let a = front.on_peer(back.state());
            if front.completed(a).is_some() {
                log.push((Role::Frontend, a));
                moved = true;
            }
            let a = back.on_peer(front.state());
            if back.completed(a).is_some() {
                log.push((Role::Backend, a));
                moved = true;
            }
            if !moved {
                return log;
            }
        }
        panic!("handshake does not settle: {log:?}");
    }

    #[test]
    fn states_parse_from_xenstore() {
        for (i, s) in ALL_STATES.iter().enumerate() {
            assert_eq!(u32::from(*s) as usize, i);
            assert_eq!(s.to_xenstore().parse::<S>(), Ok(*s));
        }
        assert_eq!(S::from_xenstore(b"4"), Ok(S::Connected));
        assert_eq!(S::from_xenstore(b"4\n"), Ok(S::Connected));
        assert_eq!(S::from_xenstore(b"9"), Err(XenbusError::BadState(9)));
        assert_eq!(
            S::from_xenstore(b"99999999999"),
            Err(XenbusError::NotANumber("99999999999".into()))
        );
        assert!(S::from_xenstore(b"-1").is_err());
        assert!(S::from_xenstore(b"+4").is_err());
        assert!(S::from_xenstore(b"").is_err());
        assert!(S::from_xenstore(b"\xff").is_err());
        assert_eq!(S::Connected.to_string(), "Connected");
    }

    #[test]
    fn fresh_devices_connect() {
        let (mut f, mut b) = (
            Handshake::new(Role::Frontend),
            Handshake::new(Role::Backend),
        );
        let log = settle(&mut f, &mut b);
        assert_eq!((f.state(), b.state()), (S::Connected, S::Connected));
        assert_eq!(
            log,
            [
                (Role::Backend, Action::Advertise),
                (Role::Frontend, Action::PublishRing),
                (Role::Backend, Action::MapRing { resume: false }),
                (Role::Frontend, Action::Connect),
            ]
        );
    }

    #[test]
    fn close_from_either_side_reaches_closed_and_reconnects() {
        for closer in [Role::Frontend, Role::Backend] {
            let (mut f, mut b) = (
                Handshake::new(Role::Frontend),
                Handshake::new(Role::Backend),
            );
            settle(&mut f, &mut b);
            let who = if closer == Role::Frontend {
                &mut f
            } else {
                &mut b
            };
            let a = who.close();
            who.completed(a);
            settle(&mut f, &mut b);
            assert_eq!(
                (f.state(), b.state()),
                (S::Closed, S::Closed),
                "{closer:?} closed"
            );
            f.restart();
            let log = settle(&mut f, &mut b);
            assert_eq!((f.state(), b.state()), (S::Connected, S::Connected));
            assert!(log.contains(&(Role::Frontend, Action::PublishRing)));
        }
    }

    #[test]
    fn backend_advertises_before_the_frontend_exists() {
        let b = Handshake::new(Role::Backend);
        assert_eq!(b.on_peer(S::Unknown), Action::Advertise);
        assert_eq!(b.on_peer(S::Closed), Action::Wait);
        let b = Handshake::resume(Role::Backend, S::InitWait);
        assert_eq!(
            b.on_peer(S::Unknown),
            Action::TearDown(S::Closed),
            "frontend went away"
        );
    }

    #[test]
    fn restarted_backend_reattaches_or_asks_for_a_new_ring() {
        let mut f = Handshake::new(Role::Frontend);
        let mut b = Handshake::new(Role::Backend);
        settle(&mut f, &mut b);
        b = Handshake::new(Role::Backend); // the manager restarts the backend
        let log = settle(&mut f, &mut b);
        assert_eq!((f.state(), b.state()), (S::Connected, S::Connected));
        let resumed = Action::MapRing { resume: true };
        assert_eq!(
            log,
            [(Role::Backend, Action::Advertise), (Role::Backend, resumed)]
        );
        // A backend that cannot re-attach closes; the frontend reconnects on a fresh ring.
        b = Handshake::new(Role::Backend);
        let a = b.close();
        b.completed(a);
        settle(&mut f, &mut b);
        assert_eq!((f.state(), b.state()), (S::Closed, S::Closed));
        f.restart();
        let log = settle(&mut f, &mut b);
        assert_eq!((f.state(), b.state()), (S::Connected, S::Connected));
        assert!(log.contains(&(Role::Frontend, Action::PublishRing)));
        assert!(log.contains(&(Role::Backend, Action::MapRing { resume: false })));
    }

    #[test]
    fn restarted_frontend_resets_a_stale_backend() {
        let (mut f, mut b) = (
            Handshake::new(Role::Frontend),
            Handshake::new(Role::Backend),
        );
        settle(&mut f, &mut b);
        f = Handshake::new(Role::Frontend);
        settle(&mut f, &mut b);
        assert_eq!((f.state(), b.state()), (S::Closed, S::Closed));
        f.restart();
        settle(&mut f, &mut b);
        assert_eq!((f.state(), b.state()), (S::Connected, S::Connected));
    }

    #[test]
    fn every_start_pair_settles() {
        for fs in ALL_STATES {
            for bs in ALL_STATES {
                let mut f = Handshake::resume(Role::Frontend, fs);
                let mut b = Handshake::resume(Role::Backend, bs);
                settle(&mut f, &mut b);
            }
        }
    }
}
