//! Page exchange (`GNTTABOP_transfer`) between two process domains through the real hypercall
//! page, control socket and server: after a remapping transfer both processes see the new page
//! at the same frame and the same address, and the hypervisor agrees with them.

use devchan::platform::{Frame, Platform, SharedPage, TransferMode};
use hypervisor::domain::DomainConfig;
use hypervisor::hypercall::Server;
use hypervisor::launch::connect;
use hypervisor::process::ProcessPlatform;
use hypervisor::system::System;
use std::sync::Arc;

const FRAMES: u64 = 32;
const PAGE: usize = 4096;

struct Dom {
    id: u16,
    p: ProcessPlatform,
    _server: Server,
}

fn dom(sys: &Arc<System>, name: &str) -> Dom {
    let id = sys
        .create_domain(DomainConfig {
            name: name.into(),
            nr_frames: FRAMES,
            iommu: None,
        })
        .unwrap();
    let (server, fds) = connect(sys, id).unwrap();
    Dom {
        id,
        p: ProcessPlatform::from_fds(id, FRAMES, fds).unwrap(),
        _server: server,
    }
}

fn fill(page: &impl SharedPage, seed: u8) {
    for i in 0..PAGE {
        // SAFETY: `i` is inside the one mapped page; volatile because it is shared.
        unsafe { page.as_ptr().add(i).write_volatile(pattern(seed, i)) };
    }
}

fn pattern(seed: u8, i: usize) -> u8 {
    seed ^ (i.to_le_bytes()[0].wrapping_mul(7)) ^ i.to_le_bytes()[1]
}

fn holds(page: &impl SharedPage, seed: u8) -> bool {
    // SAFETY: as in `fill`.
    (0..PAGE).all(|i| unsafe { page.as_ptr().add(i).read_volatile() } == pattern(seed, i))
}

/// What the hypervisor has at `dom`'s `frame`.
fn hv_holds(sys: &System, dom: u16, frame: Frame, seed: u8) -> bool {
    let mut buf = vec![0u8; PAGE];
    sys.domain(dom)
        .unwrap()
        .memory()
        .read(frame, 0, &mut buf)
        .unwrap();
    buf.iter().enumerate().all(|(i, b)| *b == pattern(seed, i))
}

#[test]
fn remapped_exchange_is_seen_by_both_processes_at_the_same_frame() {
    let sys = System::new();
    let (a, b) = (dom(&sys, "sender"), dom(&sys, "receiver"));
    let pa = a.p.alloc_shared_page().unwrap();
    let pb = b.p.alloc_shared_page().unwrap();
    // A second mapping of the receiving frame in the receiver, e.g. a ring and its owner.
    let pb2 = b.p.reattach_page(pb.frame()).unwrap();
    let (ptr_a, ptr_b) = (pa.as_ptr(), pb.as_ptr());
    fill(&pa, 0xA1);
    fill(&pb, 0xB2);

    let gref = b.p.accept_transfer(a.id, pb.frame()).unwrap();
    assert_eq!(
        a.p.transfer(pa.frame(), b.id, gref).unwrap(),
        TransferMode::Remapped
    );
    assert_eq!(b.p.end_transfer(gref).unwrap(), Some(pb.frame()));

    // The receiver sees the sent page at its frame, through every mapping, at the same address.
    assert_eq!(pb.as_ptr(), ptr_b);
    assert!(holds(&pb, 0xA1) && holds(&pb2, 0xA1));
    assert!(hv_holds(&sys, b.id, pb.frame(), 0xA1));
    // The sender got the receiver's old page in exchange, at its own frame.
    assert_eq!(pa.as_ptr(), ptr_a);
    assert!(holds(&pa, 0xB2));
    assert!(hv_holds(&sys, a.id, pa.frame(), 0xB2));

    // The two no longer share anything: writes stay on each side.
    fill(&pa, 0x11);
    assert!(holds(&pb, 0xA1));
    fill(&pb2, 0x22);
    assert!(holds(&pb, 0x22));
    assert!(hv_holds(&sys, b.id, pb.frame(), 0x22));
    assert!(hv_holds(&sys, a.id, pa.frame(), 0x11));

    // A peer mapping the received page through a grant sees what the receiver sees.
    let g = b.p.grant_access(a.id, pb.frame(), true).unwrap();
    let m = a.p.map_grant(b.id, g, true).unwrap();
    assert!(holds(&m, 0x22));
    drop(m);
    b.p.end_access(g).unwrap();
}

#[test]
fn exchange_falls_back_to_copy_and_both_sides_agree() {
    let sys = System::new();
    let (a, b) = (dom(&sys, "sender"), dom(&sys, "receiver"));
    // A shareable page into a RAM frame: cannot be swapped, so it is copied.
    let pa = a.p.alloc_shared_page().unwrap();
    fill(&pa, 0x5A);
    let ram: Frame = 9;
    let gref = b.p.accept_transfer(a.id, ram).unwrap();
    assert_eq!(
        a.p.transfer(pa.frame(), b.id, gref).unwrap(),
        TransferMode::Copied
    );
    assert_eq!(b.p.end_transfer(gref).unwrap(), Some(ram));
    let mut buf = vec![0u8; PAGE];
    b.p.read_local(ram, 0, &mut buf).unwrap();
    assert!(buf.iter().enumerate().all(|(i, x)| *x == pattern(0x5A, i)));
    assert!(holds(&pa, 0x5A), "a copy leaves the sender's page alone");

    // A RAM frame into a shareable page: copied into the receiver's page, which its
    // process keeps mapped where it was.
    let pb = b.p.alloc_shared_page().unwrap();
    fill(&pb, 0x33);
    a.p.write_local(ram, 0, &[0xEE; 16]).unwrap();
    let t = b.p.accept_transfer(a.id, pb.frame()).unwrap();
    assert_eq!(a.p.transfer(ram, b.id, t).unwrap(), TransferMode::Copied);
    assert_eq!(b.p.end_transfer(t).unwrap(), Some(pb.frame()));
    // SAFETY: bytes 0..17 are inside the mapped page.
    let got: Vec<u8> = (0..17)
        .map(|i| unsafe { pb.as_ptr().add(i).read_volatile() })
        .collect();
    assert_eq!(&got[..16], &[0xEE; 16]);
    assert_eq!(got[16], 0, "the rest of the sender's RAM frame was zero");
}

#[test]
fn pages_in_use_are_not_exchanged() {
    let sys = System::new();
    let (a, b) = (dom(&sys, "sender"), dom(&sys, "receiver"));
    let pa = a.p.alloc_shared_page().unwrap();
    let pb = b.p.alloc_shared_page().unwrap();
    fill(&pa, 0x44);
    fill(&pb, 0x55);
    // The receiving page is mapped by a peer: the hypervisor refuses the transfer.
    let g = b.p.grant_access(a.id, pb.frame(), true).unwrap();
    let m = a.p.map_grant(b.id, g, true).unwrap();
    let t = b.p.accept_transfer(a.id, pb.frame()).unwrap();
    assert!(a.p.transfer(pa.frame(), b.id, t).is_err());
    assert!(holds(&pb, 0x55) && holds(&m, 0x55) && holds(&pa, 0x44));
    assert_eq!(b.p.end_transfer(t).unwrap(), None, "not committed");
    drop(m);
    b.p.end_access(g).unwrap();
    // Once nobody maps it, the exchange goes through.
    let t = b.p.accept_transfer(a.id, pb.frame()).unwrap();
    assert_eq!(
        a.p.transfer(pa.frame(), b.id, t).unwrap(),
        TransferMode::Remapped
    );
    assert_eq!(b.p.end_transfer(t).unwrap(), Some(pb.frame()));
    assert!(holds(&pb, 0x44) && holds(&pa, 0x55));
}

#[test]
fn a_transfer_grant_withdrawn_before_use_moves_nothing() {
    let sys = System::new();
    let (a, b) = (dom(&sys, "sender"), dom(&sys, "receiver"));
    let pa = a.p.alloc_shared_page().unwrap();
    let pb = b.p.alloc_shared_page().unwrap();
    fill(&pa, 1);
    fill(&pb, 2);
    let gref = b.p.accept_transfer(a.id, pb.frame()).unwrap();
    assert_eq!(b.p.end_transfer(gref).unwrap(), None);
    assert!(a.p.transfer(pa.frame(), b.id, gref).is_err());
    assert!(holds(&pa, 1) && holds(&pb, 2));
}
