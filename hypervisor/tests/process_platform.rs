//! Every `Platform` operation of `ProcessPlatform` through the real hypercall page, control
//! socket and server, with both domains' platforms in this test process (the same code runs in
//! a domain process; see `process_channel.rs` for the sandboxed multi-process run).

use devchan::grant::status as gntst;
use devchan::platform::{CopyPtr, GrantCopyOp, Platform, PlatformError, SharedPage};
use hypervisor::domain::DomainConfig;
use hypervisor::hypercall::Server;
use hypervisor::launch::connect;
use hypervisor::process::ProcessPlatform;
use hypervisor::system::System;
use std::sync::Arc;
use std::time::Duration;

const FRAMES: u64 = 32;

struct Dom {
    p: ProcessPlatform,
    _server: Server,
}

fn dom(sys: &Arc<System>, name: &str, iommu: Option<Arc<iospace::iommu::Iommu>>) -> Dom {
    let id = sys
        .create_domain(DomainConfig {
            name: name.into(),
            nr_frames: FRAMES,
            iommu,
        })
        .unwrap();
    let (server, fds) = connect(sys, id).unwrap();
    Dom {
        p: ProcessPlatform::from_fds(id, FRAMES, fds).unwrap(),
        _server: server,
    }
}

fn pair() -> (Arc<System>, Dom, Dom) {
    let sys = System::new();
    let a = dom(&sys, "a", None);
    let b = dom(&sys, "b", None);
    (sys, a, b)
}

#[test]
fn mapped_ring_page_is_shared_and_cannot_be_ungranted_while_mapped() {
    let (_sys, a, b) = pair();
    let page = a.p.alloc_shared_page().unwrap();
    assert!(page.frame() >= FRAMES);
    let gref = a.p.grant_access(b.p.domid(), page.frame(), false).unwrap();
    let map = b.p.map_grant(a.p.domid(), gref, false).unwrap();
    assert_eq!(map.frame(), page.frame());
    // SAFETY: both pointers are one mapped page; byte 100 is inside it; volatile because the
    // page is shared.
    unsafe {
        map.as_ptr().add(100).write_volatile(0xAB);
        assert_eq!(page.as_ptr().add(100).read_volatile(), 0xAB);
    }
    assert_eq!(a.p.end_access(gref), Err(PlatformError::GrantInUse(gref)));
    drop(map);
    a.p.end_access(gref).unwrap();
    assert!(
        b.p.map_grant(a.p.domid(), gref, false).is_err(),
        "ended grant cannot be mapped"
    );
}

#[test]
fn read_only_grants_map_read_only_and_refuse_writable_maps() {
    let (_sys, a, b) = pair();
    let page = a.p.alloc_shared_page().unwrap();
    let gref = a.p.grant_access(b.p.domid(), page.frame(), true).unwrap();
    assert!(b.p.map_grant(a.p.domid(), gref, false).is_err());
    let map = b.p.map_grant(a.p.domid(), gref, true).unwrap();
    // SAFETY: reading inside the mapped page.
    assert_eq!(unsafe { map.as_ptr().read_volatile() }, 0);
}

#[test]
fn event_channels_notify_wait_unmask_and_close() {
    let (_sys, a, b) = pair();
    let pa = a.p.evtchn_alloc_unbound(b.p.domid()).unwrap();
    let pb = b.p.evtchn_bind_interdomain(a.p.domid(), pa).unwrap();
    assert_eq!(
        a.p.evtchn_wait(Some(Duration::from_millis(10))),
        Err(PlatformError::TimedOut)
    );
    b.p.evtchn_notify(pb).unwrap();
    assert_eq!(
        a.p.evtchn_wait(Some(Duration::from_secs(5))).unwrap(),
        vec![pa]
    );
    // Masked until unmasked: a second notify is held back, then delivered by the unmask.
    b.p.evtchn_notify(pb).unwrap();
    assert_eq!(
        a.p.evtchn_wait(Some(Duration::from_millis(10))),
        Err(PlatformError::TimedOut)
    );
    a.p.evtchn_unmask(pa).unwrap();
    assert_eq!(
        a.p.evtchn_wait(Some(Duration::from_secs(5))).unwrap(),
        vec![pa]
    );
    a.p.evtchn_unmask(pa).unwrap();
    a.p.evtchn_notify(pa).unwrap();
    assert_eq!(
        b.p.evtchn_wait(Some(Duration::from_secs(5))).unwrap(),
        vec![pb]
    );
    a.p.evtchn_close(pa).unwrap();
    assert_eq!(a.p.evtchn_notify(pa), Err(PlatformError::BadPort(pa)));
    assert!(b.p.evtchn_bind_interdomain(a.p.domid(), pa).is_err());
}

#[test]
fn grant_copy_batches_beyond_one_page_of_records() {
    let (_sys, a, b) = pair();
    a.p.write_local(7, 0, b"hello, grant copy").unwrap();
    let gref = a.p.grant_access(b.p.domid(), 7, true).unwrap();
    let op = |i: u16| GrantCopyOp {
        src: CopyPtr::Grant {
            domid: a.p.domid(),
            gref,
            offset: 7,
        },
        dst: CopyPtr::Local {
            frame: 8,
            offset: i * 10,
        },
        len: 10,
    };
    // 200 records: more than one hypercall page holds, so the client splits the batch.
    let ops: Vec<GrantCopyOp> = (0..200).map(|i| op(i % 400)).collect();
    let st = b.p.grant_copy(&ops).unwrap();
    assert_eq!(st.len(), 200);
    assert!(st.iter().all(|&s| s == gntst::OKAY), "{st:?}");
    let mut buf = [0u8; 10];
    b.p.read_local(8, 190, &mut buf).unwrap();
    assert_eq!(&buf, b"grant copy");
    // Writing into a read-only grant, and a copy crossing the page end, fail per op.
    let bad = [
        GrantCopyOp {
            src: CopyPtr::Local {
                frame: 8,
                offset: 0,
            },
            dst: CopyPtr::Grant {
                domid: a.p.domid(),
                gref,
                offset: 0,
            },
            len: 4,
        },
        GrantCopyOp {
            src: CopyPtr::Local {
                frame: 8,
                offset: 4090,
            },
            dst: CopyPtr::Local {
                frame: 9,
                offset: 0,
            },
            len: 100,
        },
    ];
    let st = b.p.grant_copy(&bad).unwrap();
    assert!(st.iter().all(|&s| s < 0), "{st:?}");
}

#[test]
fn local_access_is_bounded_to_own_ram() {
    let (_sys, a, _b) = pair();
    let mut buf = [0u8; 8];
    assert_eq!(
        a.p.read_local(FRAMES, 0, &mut buf),
        Err(PlatformError::BadFrame(FRAMES))
    );
    assert_eq!(
        a.p.write_local(7, 4090, &[0; 8]),
        Err(PlatformError::BadFrame(7))
    );
    a.p.write_local(7, 4088, &[1; 8]).unwrap();
}

#[test]
fn pins_go_to_the_domains_iommu() {
    let sys = System::new();
    let iommu = iospace::iommu::Iommu::new(64);
    let a = dom(&sys, "guest", None);
    let d = dom(&sys, "idd", Some(iommu.clone()));
    a.p.write_local(9, 0, b"dma me").unwrap();
    let gref = a.p.grant_access(d.p.domid(), 9, true).unwrap();
    assert!(
        d.p.pin_grant(a.p.domid(), gref, true).is_err(),
        "read-only grant pinned writable"
    );
    let iova = d.p.pin_grant(a.p.domid(), gref, false).unwrap();
    assert_eq!(iommu.len(), 1);
    assert_eq!(a.p.end_access(gref), Err(PlatformError::GrantInUse(gref)));
    d.p.unpin_grant(iova).unwrap();
    assert!(iommu.is_empty());
    assert!(d.p.unpin_grant(iova).is_err(), "double unpin");
    a.p.end_access(gref).unwrap();
    // A domain without an IOMMU cannot pin.
    let gref = a.p.grant_access(d.p.domid(), 9, true).unwrap();
    let e = dom(&sys, "no-iommu", None);
    assert!(e.p.pin_grant(a.p.domid(), gref, false).is_err());
}

#[test]
fn transfer_delivers_the_page_content() {
    let (_sys, a, b) = pair();
    let gref = a.p.accept_transfer(b.p.domid(), 10).unwrap();
    b.p.write_local(11, 0, b"page for you").unwrap();
    b.p.transfer(11, a.p.domid(), gref).unwrap();
    let frame = a.p.end_transfer(gref).unwrap().expect("a page arrived");
    let mut buf = [0u8; 12];
    a.p.read_local(frame, 0, &mut buf).unwrap();
    assert_eq!(&buf, b"page for you");
    // The grant is used up: a second transfer into it fails.
    assert!(b.p.transfer(11, a.p.domid(), gref).is_err());
}

#[test]
fn posted_notifies_deliver_and_count_failures() {
    let (_sys, a, b) = pair();
    let pa = a.p.evtchn_alloc_unbound(b.p.domid()).unwrap();
    let pb = b.p.evtchn_bind_interdomain(a.p.domid(), pa).unwrap();
    b.p.evtchn_notify_posted(pb).unwrap();
    assert_eq!(
        a.p.evtchn_wait(Some(Duration::from_secs(5))).unwrap(),
        vec![pa]
    );
    assert_eq!(b.p.posted_failures().unwrap(), 0);
    b.p.evtchn_notify_posted(pb + 100).unwrap();
    // The next synchronous call settles the posted one first, and still works.
    let pb2 = b.p.evtchn_alloc_unbound(a.p.domid()).unwrap();
    assert_ne!(pb2, pb);
    assert_eq!(b.p.posted_failures().unwrap(), 1);
}
