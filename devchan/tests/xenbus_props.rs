//! Property test of the XenBus handshake policy: whatever the interleaving of steps, closes and
//! restarts of either end, the two ends never livelock, and once both want a connection again
//! (a closed frontend restarts) they end up Connected on a ring the current backend mapped, and
//! a backend resumes (re-attaches at the shared indexes) exactly when the frontend has already
//! used the ring.

use devchan::xenbus::{Action, Handshake, Role, XenbusState as S};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Ev {
    StepFront,
    StepBack,
    CloseFront,
    CloseBack,
    NewFront,
    NewBack,
}

fn ev() -> impl Strategy<Value = Ev> {
    prop_oneof![
        4 => Just(Ev::StepFront),
        4 => Just(Ev::StepBack),
        1 => Just(Ev::CloseFront),
        1 => Just(Ev::CloseBack),
        1 => Just(Ev::NewFront),
        1 => Just(Ev::NewBack),
    ]
}

struct World {
    front: Handshake,
    back: Handshake,
    /// Backend incarnations the frontend connected to on its current ring.
    sessions: Vec<u32>,
    /// The backend incarnation that last mapped a ring.
    mapped_by: Option<u32>,
    back_incarnation: u32,
}

impl World {
    fn step(&mut self, role: Role) -> bool {
        let (me, peer) = match role {
            Role::Frontend => (&mut self.front, self.back.state()),
            Role::Backend => (&mut self.back, self.front.state()),
        };
        let a = me.on_peer(peer);
        match a {
            Action::PublishRing => self.sessions.clear(),
            Action::Connect => self.sessions.push(self.back_incarnation),
            Action::MapRing { resume } => {
                // Resume exactly when the frontend connected on this ring already.
                assert_eq!(
                    resume,
                    !self.sessions.is_empty(),
                    "sessions {:?}",
                    self.sessions
                );
                self.mapped_by = Some(self.back_incarnation);
            }
            _ => {}
        }
        me.completed(a).is_some()
    }

    fn settle(&mut self) {
        for _ in 0..100 {
            let moved = self.step(Role::Frontend) | self.step(Role::Backend);
            if !moved {
                return;
            }
        }
        panic!(
            "livelock: front {:?}, back {:?}",
            self.front.state(),
            self.back.state()
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn handshake_always_recovers_to_connected(evs in prop::collection::vec(ev(), 0..60)) {
        let mut w = World {
            front: Handshake::new(Role::Frontend),
            back: Handshake::new(Role::Backend),
            sessions: Vec::new(),
            mapped_by: None,
            back_incarnation: 0,
        };
        for e in evs {
            match e {
                Ev::StepFront => { w.step(Role::Frontend); }
                Ev::StepBack => { w.step(Role::Backend); }
                Ev::CloseFront => { let a = w.front.close(); w.front.completed(a); }
                Ev::CloseBack => { let a = w.back.close(); w.back.completed(a); }
                Ev::NewFront => w.front = Handshake::new(Role::Frontend),
                Ev::NewBack => {
                    w.back = Handshake::new(Role::Backend);
                    w.back_incarnation += 1;
                }
            }
        }
        w.settle();
        if w.front.state() == S::Closed {
            w.front.restart();
            w.settle();
        }
        prop_assert_eq!((w.front.state(), w.back.state()), (S::Connected, S::Connected));
        // The ring in use was mapped by the current backend.
        prop_assert_eq!(w.mapped_by, Some(w.back_incarnation));
        prop_assert!(!w.sessions.is_empty());
    }
}
