//! Event channels through `System`: binding, delivery into the peer's own `shared_info` page
//! and upcall eventfd, masking, closing, and every bad port an untrusted domain can name.

use devchan::grant::DOMID_SELF;
use hypervisor::domain::DomainConfig;
use hypervisor::system::{System, SystemError};
use std::sync::Arc;

fn sys3() -> (Arc<System>, u16, u16, u16) {
    let sys = System::new();
    let mk = |n: &str| {
        sys.create_domain(DomainConfig {
            name: n.into(),
            nr_frames: 16,
            iommu: None,
        })
        .unwrap()
    };
    let (a, b, c) = (mk("a"), mk("b"), mk("c"));
    (sys, a, b, c)
}

/// Upcall signals since the last call (the eventfd counter).
fn upcalls(sys: &System, d: u16) -> u64 {
    sys.domain(d).unwrap().upcall().read().unwrap_or(0)
}

fn connect(sys: &System, a: u16, b: u16) -> (u32, u32) {
    let pa = sys.evtchn_alloc_unbound(a, b).unwrap();
    let pb = sys.evtchn_bind_interdomain(b, a, pa).unwrap();
    // Clear the pending bit the bind sets on b's own port.
    sys.domain(b).unwrap().event_page().take_pending();
    let _ = upcalls(sys, b);
    (pa, pb)
}

#[test]
fn send_sets_pending_in_peer_page_and_signals_once() {
    let (sys, a, b, _) = sys3();
    let (pa, pb) = connect(&sys, a, b);
    assert_ne!(pa, 0);
    assert_ne!(pb, 0);
    sys.evtchn_send(b, pb).unwrap();
    sys.evtchn_send(b, pb).unwrap();
    let da = sys.domain(a).unwrap();
    assert!(da.event_page().is_pending(pa));
    assert_eq!(
        upcalls(&sys, a),
        1,
        "second send while pending raises nothing"
    );
    assert_eq!(da.event_page().take_pending(), vec![pa]);
    sys.evtchn_send(a, pa).unwrap();
    assert_eq!(upcalls(&sys, b), 1);
    assert_eq!(sys.domain(b).unwrap().event_page().take_pending(), vec![pb]);
}

#[test]
fn masked_event_is_delivered_on_unmask() {
    let (sys, a, b, _) = sys3();
    let (pa, pb) = connect(&sys, a, b);
    let da = sys.domain(a).unwrap();
    da.event_page().mask(pa);
    sys.evtchn_send(b, pb).unwrap();
    assert_eq!(upcalls(&sys, a), 0);
    assert!(da.event_page().take_pending().is_empty());
    sys.evtchn_unmask(a, pa).unwrap();
    assert_eq!(upcalls(&sys, a), 1, "unmask re-checks pending");
    assert_eq!(da.event_page().take_pending(), vec![pa]);
    sys.evtchn_unmask(a, pa).unwrap();
    assert_eq!(upcalls(&sys, a), 0, "nothing pending: no upcall");
}

#[test]
fn close_returns_peer_port_to_unbound() {
    let (sys, a, b, _) = sys3();
    let (pa, pb) = connect(&sys, a, b);
    sys.evtchn_close(b, pb).unwrap();
    assert!(matches!(sys.evtchn_send(b, pb), Err(SystemError::BadPort(p)) if p == pb));
    // a's port is unbound again (for b): sending on it fails, b can bind again.
    assert!(matches!(
        sys.evtchn_send(a, pa),
        Err(SystemError::BadPort(_))
    ));
    let pb2 = sys.evtchn_bind_interdomain(b, a, pa).unwrap();
    sys.domain(b).unwrap().event_page().take_pending();
    sys.evtchn_send(a, pa).unwrap();
    assert_eq!(
        sys.domain(b).unwrap().event_page().take_pending(),
        vec![pb2]
    );
    // Closing twice is an error.
    sys.evtchn_close(a, pa).unwrap();
    assert!(matches!(
        sys.evtchn_close(a, pa),
        Err(SystemError::BadPort(_))
    ));
}

#[test]
fn bad_ports_and_domains_are_errors() {
    let (sys, a, b, c) = sys3();
    let pa = sys.evtchn_alloc_unbound(a, b).unwrap();
    // Unbound port: nothing to send to.
    assert!(matches!(
        sys.evtchn_send(a, pa),
        Err(SystemError::BadPort(_))
    ));
    // Port 0, never-allocated and huge ports.
    for p in [0, 77, 4095, 4096, u32::MAX] {
        assert!(
            matches!(sys.evtchn_send(a, p), Err(SystemError::BadPort(_))),
            "send {p}"
        );
        assert!(
            matches!(sys.evtchn_unmask(a, p), Err(SystemError::BadPort(_))),
            "unmask {p}"
        );
        assert!(
            matches!(sys.evtchn_close(a, p), Err(SystemError::BadPort(_))),
            "close {p}"
        );
        assert!(
            matches!(
                sys.evtchn_bind_interdomain(b, a, p),
                Err(SystemError::BadPort(_))
            ),
            "bind {p}"
        );
    }
    // The port was allocated for b: c may not bind it.
    assert!(matches!(
        sys.evtchn_bind_interdomain(c, a, pa),
        Err(SystemError::BadPort(_))
    ));
    // Another domain's port number means nothing in ours.
    let (_, pb) = connect(&sys, a, b);
    let pc_like = pb + 100;
    assert!(matches!(
        sys.evtchn_send(c, pb),
        Err(SystemError::BadPort(_))
    ));
    assert!(matches!(
        sys.evtchn_close(c, pc_like),
        Err(SystemError::BadPort(_))
    ));
    // Unknown domains.
    assert!(matches!(
        sys.evtchn_alloc_unbound(a, 999),
        Err(SystemError::NoSuchDomain(999))
    ));
    assert!(matches!(
        sys.evtchn_bind_interdomain(b, 999, pa),
        Err(SystemError::NoSuchDomain(999))
    ));
    assert!(matches!(
        sys.evtchn_send(999, 1),
        Err(SystemError::NoSuchDomain(999))
    ));
    // A bound port cannot be bound again.
    sys.evtchn_bind_interdomain(b, a, pa).unwrap();
    assert!(matches!(
        sys.evtchn_bind_interdomain(b, a, pa),
        Err(SystemError::BadPort(_))
    ));
}

#[test]
fn loopback_with_domid_self() {
    let (sys, a, _, _) = sys3();
    let p1 = sys.evtchn_alloc_unbound(a, DOMID_SELF).unwrap();
    let p2 = sys.evtchn_bind_interdomain(a, DOMID_SELF, p1).unwrap();
    let da = sys.domain(a).unwrap();
    da.event_page().take_pending();
    sys.evtchn_send(a, p2).unwrap();
    assert_eq!(da.event_page().take_pending(), vec![p1]);
    sys.evtchn_close(a, p1).unwrap();
    assert!(matches!(
        sys.evtchn_send(a, p2),
        Err(SystemError::BadPort(_))
    ));
}

#[test]
fn destroying_a_peer_unbinds_its_channels() {
    let (sys, a, b, _) = sys3();
    let (pa, _) = connect(&sys, a, b);
    sys.destroy_domain(b).unwrap();
    assert!(matches!(
        sys.evtchn_send(a, pa),
        Err(SystemError::BadPort(_))
    ));
    sys.evtchn_close(a, pa).unwrap();
    assert!(matches!(
        sys.evtchn_alloc_unbound(a, b),
        Err(SystemError::NoSuchDomain(_))
    ));
}

#[test]
fn ports_run_out_cleanly() {
    let (sys, a, b, _) = sys3();
    let mut n = 0;
    let err = loop {
        match sys.evtchn_alloc_unbound(a, b) {
            Ok(_) => n += 1,
            Err(e) => break e,
        }
    };
    assert_eq!(
        n,
        devchan::evtchn::EVTCHN_2L_NR_CHANNELS - 1,
        "port 0 is reserved"
    );
    assert!(matches!(err, SystemError::Exhausted(_)));
    sys.evtchn_close(a, 17).unwrap();
    assert_eq!(sys.evtchn_alloc_unbound(a, b).unwrap(), 17);
}

#[test]
fn concurrent_senders_never_lose_a_wakeup() {
    // Senders on 8 channels each send until the receiver has seen their port 200 times; the
    // receiver only scans after an upcall. A lost wake-up would hang it (bounded by a
    // timeout that fails the test).
    let (sys, a, b, _) = sys3();
    let chans: Vec<_> = (0..8).map(|_| connect(&sys, a, b)).collect();
    let da = sys.domain(a).unwrap();
    let seen: Vec<_> = (0..8)
        .map(|_| std::sync::atomic::AtomicU32::new(0))
        .collect();
    let target = 200;
    std::thread::scope(|s| {
        for (i, &(_, pb)) in chans.iter().enumerate() {
            let (sys, seen) = (&sys, &seen);
            s.spawn(move || {
                while seen[i].load(std::sync::atomic::Ordering::SeqCst) < target {
                    sys.evtchn_send(b, pb).unwrap();
                    std::thread::yield_now();
                }
            });
        }
        let mut fd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(da.upcall()),
            events: libc::POLLIN,
            revents: 0,
        };
        let start = std::time::Instant::now();
        while seen
            .iter()
            .any(|c| c.load(std::sync::atomic::Ordering::SeqCst) < target)
        {
            // SAFETY: one valid pollfd for the call.
            let n = unsafe { libc::poll(&mut fd, 1, 2000) };
            assert!(
                n > 0,
                "no upcall for 2 s while events were being sent: lost wake-up"
            );
            let _ = da.upcall().read();
            for p in da.event_page().take_pending() {
                let i = chans.iter().position(|c| c.0 == p).expect("only our ports");
                seen[i].fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            assert!(start.elapsed().as_secs() < 60);
        }
    });
}

mod model {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum St {
        Unbound(u16),
        Inter(u16, u32),
    }

    #[derive(Debug, Clone)]
    enum Op {
        Alloc(usize, usize),
        Bind(usize, usize, u32),
        Send(usize, u32),
        Close(usize, u32),
        Unmask(usize, u32),
        Mask(usize, u32),
        Scan(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        let d = 0usize..3;
        let p = 0u32..7;
        prop_oneof![
            2 => (d.clone(), d.clone()).prop_map(|(a, b)| Op::Alloc(a, b)),
            2 => (d.clone(), d.clone(), p.clone()).prop_map(|(a, b, p)| Op::Bind(a, b, p)),
            3 => (d.clone(), p.clone()).prop_map(|(a, p)| Op::Send(a, p)),
            1 => (d.clone(), p.clone()).prop_map(|(a, p)| Op::Close(a, p)),
            1 => (d.clone(), p.clone()).prop_map(|(a, p)| Op::Unmask(a, p)),
            1 => (d.clone(), p).prop_map(|(a, p)| Op::Mask(a, p)),
            2 => d.prop_map(Op::Scan),
        ]
    }

    fn lowest_free(t: &BTreeMap<u32, St>) -> u32 {
        (1..).find(|p| !t.contains_key(p)).unwrap()
    }

    proptest! {
        /// Random alloc/bind/send/close/mask/unmask/scan sequences over three domains against
        /// a model of Xen's port states: every call succeeds exactly when the model says so,
        /// and each scan delivers exactly the pending, unmasked ports.
        #[test]
        fn routing_matches_model(ops in prop::collection::vec(op(), 1..80)) {
            let (sys, a, b, c) = sys3();
            let ids = [a, b, c];
            let mut ports: Vec<BTreeMap<u32, St>> = vec![BTreeMap::new(); 3];
            let mut pending: Vec<BTreeSet<u32>> = vec![BTreeSet::new(); 3];
            let mut masked: Vec<BTreeSet<u32>> = vec![BTreeSet::new(); 3];
            let idx = |d: u16| ids.iter().position(|x| *x == d).unwrap();
            for op in ops {
                match op {
                    Op::Alloc(d, r) => {
                        let p = sys.evtchn_alloc_unbound(ids[d], ids[r]).unwrap();
                        prop_assert_eq!(p, lowest_free(&ports[d]));
                        ports[d].insert(p, St::Unbound(ids[r]));
                    }
                    Op::Bind(d, r, rp) => {
                        let ok = ports[r].get(&rp) == Some(&St::Unbound(ids[d]));
                        let res = sys.evtchn_bind_interdomain(ids[d], ids[r], rp);
                        prop_assert_eq!(res.is_ok(), ok);
                        if let Ok(lp) = res {
                            // Loopback: the remote port is in our own table and is taken.
                            let want = if d == r {
                                (1..).find(|p| *p != rp && !ports[d].contains_key(p)).unwrap()
                            } else {
                                lowest_free(&ports[d])
                            };
                            prop_assert_eq!(lp, want);
                            ports[d].insert(lp, St::Inter(ids[r], rp));
                            ports[r].insert(rp, St::Inter(ids[d], lp));
                            pending[d].insert(lp);
                        }
                    }
                    Op::Send(d, p) => {
                        let res = sys.evtchn_send(ids[d], p);
                        match ports[d].get(&p) {
                            Some(St::Inter(r, rp)) => {
                                prop_assert!(res.is_ok());
                                pending[idx(*r)].insert(*rp);
                            }
                            _ => prop_assert!(matches!(res, Err(SystemError::BadPort(_)))),
                        }
                    }
                    Op::Close(d, p) => {
                        let res = sys.evtchn_close(ids[d], p);
                        match ports[d].remove(&p) {
                            None => prop_assert!(res.is_err()),
                            Some(st) => {
                                prop_assert!(res.is_ok());
                                if let St::Inter(r, rp) = st {
                                    let ri = idx(r);
                                    if ports[ri].get(&rp) == Some(&St::Inter(ids[d], p)) {
                                        ports[ri].insert(rp, St::Unbound(ids[d]));
                                    }
                                }
                                pending[d].remove(&p);
                            }
                        }
                    }
                    Op::Unmask(d, p) => {
                        let res = sys.evtchn_unmask(ids[d], p);
                        prop_assert_eq!(res.is_ok(), ports[d].contains_key(&p));
                        if res.is_ok() {
                            masked[d].remove(&p);
                        }
                    }
                    Op::Mask(d, p) => {
                        sys.domain(ids[d]).unwrap().event_page().mask(p);
                        masked[d].insert(p);
                    }
                    Op::Scan(d) => {
                        let got: BTreeSet<u32> =
                            sys.domain(ids[d]).unwrap().event_page().take_pending().into_iter().collect();
                        let want: BTreeSet<u32> = pending[d].difference(&masked[d]).copied().collect();
                        prop_assert_eq!(&got, &want);
                        for p in got {
                            pending[d].remove(&p);
                        }
                    }
                }
            }
        }
    }
}
