//! A hostile domain talking to its hypercall server directly: garbage in its hypercall page or
//! on its control socket gets error statuses (never a panic, never another domain's memory),
//! and a domain that stops reading does not block the hypervisor.

use devchan::grant::status as gntst;
use devchan::platform::{CopyPtr, GrantCopyOp};
use hypervisor::domain::DomainConfig;
use hypervisor::hypercall::{
    control_pair, ctl, recv_msg, send_msg, CtlReply, CtlRequest, HypercallPage, Op, OpRecord,
    Server, ServerExit, ServerFds, HYPERCALL_FRAME, MAX_OPS,
};
use hypervisor::system::System;
use proptest::prelude::*;
use rustix::event::{eventfd, EventfdFlags};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The domain's side of a server, driven by hand.
struct Hostile {
    sys: Arc<System>,
    dom: u16,
    page: HypercallPage,
    doorbell: OwnedFd,
    completion: OwnedFd,
    control: OwnedFd,
    server: Option<Server>,
    seq: u32,
}

fn efd() -> OwnedFd {
    eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).unwrap()
}

impl Hostile {
    fn new() -> Self {
        let sys = System::new();
        let dom = sys
            .create_domain(DomainConfig {
                name: "hostile".into(),
                nr_frames: 16,
                iommu: None,
            })
            .unwrap();
        let (hv, control) = control_pair().unwrap();
        let (doorbell, completion) = (efd(), efd());
        let fds = ServerFds {
            doorbell: doorbell.try_clone().unwrap(),
            completion: completion.try_clone().unwrap(),
            control: hv,
        };
        let server = Server::spawn(sys.clone(), dom, fds).unwrap();
        let ptr = sys
            .domain(dom)
            .unwrap()
            .memory()
            .ram_frame_ptr(HYPERCALL_FRAME)
            .unwrap();
        // SAFETY: frame 5 of the domain's RAM, mapped while `sys` holds the domain (the test
        // keeps `sys` alive for the view's lifetime).
        let page = unsafe { HypercallPage::new(ptr) };
        Self {
            sys,
            dom,
            page,
            doorbell,
            completion,
            control,
            server: Some(server),
            seq: 0,
        }
    }

    /// Publish raw records and wait for completion: (batch status, records).
    fn batch(&mut self, recs: &[OpRecord]) -> (i32, Vec<OpRecord>) {
        self.seq += 1;
        self.page.publish(self.seq, recs);
        rustix::io::write(&self.doorbell, &1u64.to_ne_bytes()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.page.is_complete(self.seq) {
            assert!(
                Instant::now() < deadline,
                "server did not complete the batch"
            );
            std::thread::sleep(Duration::from_micros(100));
        }
        let mut b = [0u8; 8];
        let _ = rustix::io::read(&self.completion, &mut b);
        self.page.results(recs.len())
    }

    fn ctl(&self, bytes: &[u8]) -> (CtlReply, Option<OwnedFd>) {
        send_msg(self.control.as_fd(), bytes, None, false).unwrap();
        let mut buf = [0u8; 64];
        let (n, fd) = recv_msg(self.control.as_fd(), &mut buf, false).unwrap();
        (CtlReply::from_bytes(&buf[..n]).unwrap(), fd)
    }

    fn still_serving(&mut self) {
        // A valid op after the garbage: the server is alive and answers correctly.
        let (batch, recs) = self.batch(&[Op::EvtchnAllocUnbound(self.dom).encode()]);
        assert_eq!((batch, recs[0].status), (0, 0));
    }
}

#[test]
fn undecodable_records_get_error_statuses_and_the_batch_goes_on() {
    let mut h = Hostile::new();
    let mut bad_copy = Op::GrantCopy(GrantCopyOp {
        src: CopyPtr::Local {
            frame: 7,
            offset: 0,
        },
        dst: CopyPtr::Local {
            frame: 8,
            offset: 0,
        },
        len: 8,
    })
    .encode();
    bad_copy.args[0] |= 0x80; // an unknown flag bit
    let recs = [
        OpRecord {
            op: 999,
            ..Default::default()
        },
        bad_copy,
        OpRecord {
            op: 4,
            args: [u64::MAX, 0, 0, 0, 0, 0],
            ..Default::default()
        },
        Op::EvtchnAllocUnbound(h.dom).encode(),
    ];
    let (batch, out) = h.batch(&recs);
    assert_eq!(batch, 0);
    assert_eq!(out[0].status, -libc::ENOSYS);
    assert_eq!(out[1].status, i32::from(gntst::GENERAL_ERROR));
    assert_eq!(out[2].status, -libc::EINVAL);
    assert_eq!(
        out[3].status, 0,
        "the valid op after the garbage still runs"
    );
}

#[test]
fn a_batch_with_a_hostile_count_is_refused_whole() {
    let mut h = Hostile::new();
    // Publish a valid record but claim far more than fit.
    h.page.publish(1, &[Op::EvtchnSend(1).encode()]);
    // SAFETY: word 1 of the page header (nr_ops), written as the hostile domain would.
    unsafe {
        let p = h
            .sys
            .domain(h.dom)
            .unwrap()
            .memory()
            .ram_frame_ptr(HYPERCALL_FRAME)
            .unwrap();
        p.add(4).cast::<u32>().write_volatile(u32::MAX);
    }
    h.seq = 1;
    rustix::io::write(&h.doorbell, &1u64.to_ne_bytes()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !h.page.is_complete(1) {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_micros(100));
    }
    assert_eq!(h.page.results(0).0, -libc::EINVAL);
    h.still_serving();
}

#[test]
fn copies_into_or_out_of_memory_the_domain_does_not_own_fail() {
    let mut h = Hostile::new();
    let victim = h
        .sys
        .create_domain(DomainConfig {
            name: "victim".into(),
            nr_frames: 16,
            iommu: None,
        })
        .unwrap();
    h.sys
        .domain(victim)
        .unwrap()
        .memory()
        .write(7, 0, b"secret")
        .unwrap();
    let ops = [
        // A grant the victim never made.
        Op::GrantCopy(GrantCopyOp {
            src: CopyPtr::Grant {
                domid: victim,
                gref: 8,
                offset: 0,
            },
            dst: CopyPtr::Local {
                frame: 7,
                offset: 0,
            },
            len: 6,
        }),
        // A local frame past the domain's memory.
        Op::GrantCopy(GrantCopyOp {
            src: CopyPtr::Local {
                frame: 1 << 40,
                offset: 0,
            },
            dst: CopyPtr::Local {
                frame: 7,
                offset: 0,
            },
            len: 6,
        }),
        // Crossing the end of the page.
        Op::GrantCopy(GrantCopyOp {
            src: CopyPtr::Local {
                frame: 7,
                offset: 4000,
            },
            dst: CopyPtr::Local {
                frame: 8,
                offset: 0,
            },
            len: 200,
        }),
        Op::Pin {
            granter: victim,
            gref: 8,
            writable: true,
        },
        Op::EvtchnBindInterdomain {
            remote: victim,
            port: 1,
        },
        Op::EvtchnSend(5),
    ];
    let recs: Vec<OpRecord> = ops.iter().map(Op::encode).collect();
    let (batch, out) = h.batch(&recs);
    assert_eq!(batch, 0);
    for (op, r) in ops.iter().zip(&out) {
        assert!(r.status < 0, "{op:?} succeeded");
    }
    let mut buf = [0u8; 6];
    h.sys
        .domain(h.dom)
        .unwrap()
        .memory()
        .read(7, 0, &mut buf)
        .unwrap();
    assert_eq!(
        &buf, &[0; 6],
        "nothing of the victim's reached the hostile domain"
    );
}

#[test]
fn control_socket_garbage_gets_error_replies() {
    let h = Hostile::new();
    assert_eq!(h.ctl(&[1, 2, 3]).0.status, -libc::EINVAL, "short message");
    let mut req = CtlRequest {
        op: ctl::ALLOC_SHARED_PAGE,
        args: [0; 3],
    }
    .to_bytes();
    req[5] = 1; // reserved word
    assert_eq!(h.ctl(&req).0.status, -libc::EINVAL);
    let req = CtlRequest {
        op: 77,
        args: [0; 3],
    };
    assert_eq!(h.ctl(&req.to_bytes()).0.status, -libc::ENOSYS);
    let req = CtlRequest {
        op: ctl::MAP_GRANT,
        args: [h.dom.into(), 1 << 40, 0],
    };
    assert!(h.ctl(&req.to_bytes()).0.status < 0, "gref out of range");
    let req = CtlRequest {
        op: ctl::UNMAP_GRANT,
        args: [12345, 0, 0],
    };
    assert!(h.ctl(&req.to_bytes()).0.status < 0, "unknown handle");
    // A valid request still works, and passes a page.
    let req = CtlRequest {
        op: ctl::ALLOC_SHARED_PAGE,
        args: [0; 3],
    };
    let (rep, fd) = h.ctl(&req.to_bytes());
    assert_eq!(rep.status, 0);
    assert!(fd.is_some());
    assert!(rep.result[0] >= 16, "shared pages are numbered after RAM");
}

#[test]
fn a_domain_that_never_reads_replies_is_cut_off_without_blocking() {
    let mut h = Hostile::new();
    let req = CtlRequest {
        op: 77,
        args: [0; 3],
    }
    .to_bytes();
    // Flood requests and never read a reply: the server must not block on its sends, and
    // cuts the domain off once its replies no longer fit.
    let server = h.server.take().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !server.is_finished() {
        assert!(
            Instant::now() < deadline,
            "server still serving a domain that never reads"
        );
        if send_msg(h.control.as_fd(), &req, None, true).is_err() {
            // Our own send buffer is full until the server reads on: let it run.
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    assert_eq!(server.stop(), ServerExit::Misbehaved);
}

#[test]
fn the_server_notices_when_the_domain_goes_away() {
    let mut h = Hostile::new();
    let control = std::mem::replace(&mut h.control, efd());
    drop(control);
    let server = h.server.take().unwrap();
    // It ends on its own, and says why.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.is_finished() {
        assert!(
            Instant::now() < deadline,
            "server did not notice the hang-up"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(server.stop(), ServerExit::DomainGone);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn random_records_never_panic_the_server(
        recs in proptest::collection::vec(
            (0u32..12, proptest::array::uniform6(prop_oneof![Just(0u64), 0u64..64, any::<u64>()]))
                .prop_map(|(op, args)| OpRecord { op, args, ..Default::default() }),
            1..MAX_OPS)
    ) {
        let mut h = Hostile::new();
        let (batch, out) = h.batch(&recs);
        prop_assert_eq!(batch, 0);
        prop_assert_eq!(out.len(), recs.len());
        for r in &out {
            prop_assert!(r.status <= 0);
        }
        h.still_serving();
    }
}
