//! Grant-table enforcement through `System` and `LocalPlatform`: the happy paths, every
//! negative case a peer can provoke (each an error status, never a panic, never memory it
//! was not granted), the in-use rule, transfers, revocation and teardown.

use devchan::grant::{status, GTF_PERMIT_ACCESS, GTF_READING, GTF_WRITING};
use devchan::platform::{CopyPtr, GrantCopyOp, Platform, PlatformError, SharedPage, TransferMode};
use hypervisor::domain::DomainConfig;
use hypervisor::grant_table::RevokedUse;
use hypervisor::local::LocalPlatform;
use hypervisor::memory::layout;
use hypervisor::system::{System, SystemError};
use iospace::iommu::{Iommu, IommuError};
use proptest::prelude::*;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct World {
    sys: Arc<System>,
    a: LocalPlatform,
    b: LocalPlatform,
    c: LocalPlatform,
    iommu: Arc<Iommu>,
}

/// Domains a (guest), b (driver domain with an IOMMU) and c (bystander).
fn world() -> World {
    let sys = System::new();
    let iommu = Iommu::new(64);
    let mk = |name: &str, iommu: Option<Arc<Iommu>>| {
        let id = sys
            .create_domain(DomainConfig {
                name: name.into(),
                nr_frames: 32,
                iommu,
            })
            .unwrap();
        LocalPlatform::new(sys.clone(), id).unwrap()
    };
    let a = mk("a", None);
    let b = mk("b", Some(iommu.clone()));
    let c = mk("c", None);
    World {
        sys,
        a,
        b,
        c,
        iommu,
    }
}

fn grant_ptr(domid: u16, gref: u32, offset: u16) -> CopyPtr {
    CopyPtr::Grant {
        domid,
        gref,
        offset,
    }
}

fn local(frame: u64, offset: u16) -> CopyPtr {
    CopyPtr::Local { frame, offset }
}

fn flags(p: &LocalPlatform, gref: u32) -> u16 {
    p.domain().grant_entries().header(gref).unwrap().0
}

#[test]
fn copy_both_directions() {
    let w = world();
    w.a.write_local(10, 100, b"hello").unwrap();
    let g = w.a.grant_access(w.b.domid(), 10, false).unwrap();
    let st =
        w.b.grant_copy(&[
            GrantCopyOp {
                src: grant_ptr(w.a.domid(), g, 100),
                dst: local(20, 0),
                len: 5,
            },
            GrantCopyOp {
                src: local(20, 0),
                dst: grant_ptr(w.a.domid(), g, 4091),
                len: 5,
            },
        ])
        .unwrap();
    assert_eq!(st, vec![status::OKAY, status::OKAY]);
    let mut buf = [0; 5];
    w.b.read_local(20, 0, &mut buf).unwrap();
    assert_eq!(&buf, b"hello");
    w.a.read_local(10, 4091, &mut buf).unwrap();
    assert_eq!(&buf, b"hello");
    // No use remains after the batch: flags clear, end access works.
    assert_eq!(flags(&w.a, g), GTF_PERMIT_ACCESS);
    w.a.end_access(g).unwrap();
}

#[test]
fn copy_negative_cases_are_statuses() {
    let w = world();
    let (a, b) = (w.a.domid(), w.b.domid());
    let g = w.a.grant_access(b, 10, false).unwrap();
    let ro = w.a.grant_access(b, 11, true).unwrap();
    let for_c = w.a.grant_access(w.c.domid(), 12, false).unwrap();
    let op = |src, dst, len| GrantCopyOp { src, dst, len };
    let st =
        w.b.grant_copy(&[
            // wrong domid: the grant names c
            op(grant_ptr(a, for_c, 0), local(20, 0), 8),
            // a reference never granted
            op(grant_ptr(a, 300, 0), local(20, 0), 8),
            // out of range
            op(grant_ptr(a, layout::NR_GRANT_ENTRIES, 0), local(20, 0), 8),
            op(grant_ptr(a, u32::MAX, 0), local(20, 0), 8),
            // write into a read-only grant
            op(local(20, 0), grant_ptr(a, ro, 0), 8),
            // crossing the page, on either side
            op(grant_ptr(a, g, 4090), local(20, 0), 8),
            op(grant_ptr(a, g, 0), local(20, 4095), 2),
            op(grant_ptr(a, g, 0), local(20, 0), 4097),
            // a frame the caller does not have
            op(grant_ptr(a, g, 0), local(1 << 40, 0), 8),
            // a domain that does not exist
            op(grant_ptr(999, g, 0), local(20, 0), 8),
            // reading a read-only grant is fine
            op(grant_ptr(a, ro, 0), local(20, 0), 8),
        ])
        .unwrap();
    assert_eq!(
        st,
        vec![
            status::GENERAL_ERROR,
            status::GENERAL_ERROR,
            status::BAD_GNTREF,
            status::BAD_GNTREF,
            status::GENERAL_ERROR,
            status::BAD_COPY_ARG,
            status::BAD_COPY_ARG,
            status::BAD_COPY_ARG,
            status::BAD_PAGE,
            status::BAD_DOMAIN,
            status::OKAY,
        ]
    );
    // Failed ops left no use behind.
    for r in [g, ro, for_c] {
        w.a.end_access(r).unwrap();
    }
}

#[test]
fn platform_frames_and_foreign_frames_cannot_be_reached() {
    let w = world();
    let entries = w.a.domain().grant_entries();
    // A grant entry written directly (bypassing the guest-side check) naming the grant table
    // itself, the shared_info page, and a frame past the domain's memory.
    for (gref, frame) in [(100u32, 0u32), (101, 1), (102, 5), (103, 1 << 30)] {
        entries
            .publish(gref, w.b.domid(), frame, GTF_PERMIT_ACCESS)
            .unwrap();
        let st =
            w.b.grant_copy(&[GrantCopyOp {
                src: grant_ptr(w.a.domid(), gref, 0),
                dst: local(20, 0),
                len: 8,
            }])
            .unwrap();
        assert_eq!(st, vec![status::BAD_PAGE], "frame {frame}");
        assert_eq!(
            entries.header(gref).unwrap().0,
            GTF_PERMIT_ACCESS,
            "bits undone"
        );
    }
}

#[test]
fn map_rules() {
    let w = world();
    let page = w.a.alloc_shared_page().unwrap();
    let g = w.a.grant_access(w.b.domid(), page.frame(), true).unwrap();
    // Read-only grant mapped writable: refused.
    assert!(matches!(
        w.b.map_grant(w.a.domid(), g, false),
        Err(PlatformError::Grant(status::GENERAL_ERROR))
    ));
    // Wrong domain.
    assert!(matches!(
        w.c.map_grant(w.a.domid(), g, true),
        Err(PlatformError::Grant(status::GENERAL_ERROR))
    ));
    // RAM frames can be copied but not mapped.
    let ram = w.a.grant_access(w.b.domid(), 10, false).unwrap();
    assert!(matches!(
        w.b.map_grant(w.a.domid(), ram, false),
        Err(PlatformError::Grant(status::BAD_PAGE))
    ));
    assert_eq!(flags(&w.a, ram), GTF_PERMIT_ACCESS);
    let m = w.b.map_grant(w.a.domid(), g, true).unwrap();
    assert_eq!(flags(&w.a, g) & (GTF_READING | GTF_WRITING), GTF_READING);
    assert_eq!(w.a.end_access(g), Err(PlatformError::GrantInUse(g)));
    drop(m);
    w.a.end_access(g).unwrap();
    // Raw System: unmapping a handle twice or someone else's handle is an error.
    let g = w.a.grant_access(w.b.domid(), page.frame(), false).unwrap();
    let (h, _file) = w.sys.map_grant(w.b.domid(), w.a.domid(), g, false).unwrap();
    assert_eq!(flags(&w.a, g) & GTF_WRITING, GTF_WRITING);
    assert!(matches!(
        w.sys.unmap_grant(w.c.domid(), h),
        Err(SystemError::Grant(status::BAD_HANDLE))
    ));
    w.sys.unmap_grant(w.b.domid(), h).unwrap();
    assert!(matches!(
        w.sys.unmap_grant(w.b.domid(), h),
        Err(SystemError::Grant(status::BAD_HANDLE))
    ));
    w.a.end_access(g).unwrap();
}

#[test]
fn readonly_map_cannot_be_made_writable() {
    let w = world();
    let page = w.a.alloc_shared_page().unwrap();
    let g = w.a.grant_access(w.b.domid(), page.frame(), true).unwrap();
    let (_h, file) = w.sys.map_grant(w.b.domid(), w.a.domid(), g, true).unwrap();
    assert!(std::os::unix::fs::FileExt::write_at(&file, b"x", 0).is_err());
    let r = vm_memory::mmap::MmapRegion::<()>::build(
        Some(vm_memory::FileOffset::new(file, 0)),
        4096,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_SHARED,
    );
    assert!(
        r.is_err(),
        "a read-only mapper must not get a writable mapping"
    );
}

#[test]
fn pin_dma_unpin() {
    let w = world();
    let g = w.a.grant_access(w.b.domid(), 10, false).unwrap();
    let ro = w.a.grant_access(w.b.domid(), 11, true).unwrap();
    let iova = w.b.pin_grant(w.a.domid(), g, true).unwrap();
    let iova_ro = w.b.pin_grant(w.a.domid(), ro, false).unwrap();
    assert!(matches!(
        w.b.pin_grant(w.a.domid(), ro, true),
        Err(PlatformError::Grant(status::GENERAL_ERROR))
    ));
    let dev = w.iommu.device();
    dev.dma_write(iova + 8, b"dma!").unwrap();
    let mut buf = [0; 4];
    w.a.read_local(10, 8, &mut buf).unwrap();
    assert_eq!(&buf, b"dma!");
    assert_eq!(
        dev.dma_write(iova_ro, b"no"),
        Err(IommuError::ReadOnly(iova_ro))
    );
    assert_eq!(w.a.end_access(g), Err(PlatformError::GrantInUse(g)));
    w.b.unpin_grant(iova).unwrap();
    assert_eq!(
        dev.dma_read(iova, &mut buf),
        Err(IommuError::Unmapped(iova))
    );
    w.a.end_access(g).unwrap();
    // Bad IOVAs, and a domain without an IOMMU.
    assert!(matches!(
        w.b.unpin_grant(iova),
        Err(PlatformError::Grant(status::BAD_DEV_ADDR))
    ));
    assert!(matches!(
        w.c.unpin_grant(iova_ro),
        Err(PlatformError::Grant(status::BAD_DEV_ADDR))
    ));
    let gc = w.a.grant_access(w.c.domid(), 12, false).unwrap();
    assert!(matches!(
        w.c.pin_grant(w.a.domid(), gc, false),
        Err(PlatformError::Grant(status::PERMISSION_DENIED))
    ));
    w.b.unpin_grant(iova_ro).unwrap();
    assert!(w.iommu.is_empty());
}

#[test]
fn transfer_remaps_shared_pages_and_copies_otherwise() {
    let w = world();
    // Remap: both shareable, nobody else holds either.
    let src = w.b.alloc_shared_page().unwrap();
    let dst = w.a.alloc_shared_page().unwrap();
    let (sf, df) = (src.frame(), dst.frame());
    drop((src, dst));
    w.b.write_local(sf, 0, b"packet").unwrap();
    w.a.write_local(df, 0, b"oldbuf").unwrap();
    let g = w.a.accept_transfer(w.b.domid(), df).unwrap();
    assert_eq!(
        w.b.transfer(sf, w.a.domid(), g).unwrap(),
        TransferMode::Remapped
    );
    assert_eq!(w.a.end_transfer(g).unwrap(), Some(df));
    let mut buf = [0; 6];
    w.a.read_local(df, 0, &mut buf).unwrap();
    assert_eq!(&buf, b"packet");
    w.b.read_local(sf, 0, &mut buf).unwrap();
    assert_eq!(
        &buf, b"oldbuf",
        "the sender got the receiver's page in exchange"
    );

    // Copy: RAM frames.
    w.b.write_local(20, 0, b"ramram").unwrap();
    let g = w.a.accept_transfer(w.b.domid(), 21).unwrap();
    assert_eq!(
        w.b.transfer(20, w.a.domid(), g).unwrap(),
        TransferMode::Copied
    );
    assert_eq!(w.a.end_transfer(g).unwrap(), Some(21));
    w.a.read_local(21, 0, &mut buf).unwrap();
    assert_eq!(&buf, b"ramram");

    // Copy: a shareable page still held by a handle cannot be swapped away.
    let held = w.b.alloc_shared_page().unwrap();
    let dst = w.a.alloc_shared_page().unwrap();
    let df = dst.frame();
    drop(dst);
    let g = w.a.accept_transfer(w.b.domid(), df).unwrap();
    assert_eq!(
        w.b.transfer(held.frame(), w.a.domid(), g).unwrap(),
        TransferMode::Copied
    );
    w.a.end_transfer(g).unwrap();

    // Negative: wrong sender, an access grant, used twice, platform frame, unknown ref.
    let g = w.a.accept_transfer(w.b.domid(), 22).unwrap();
    assert!(matches!(
        w.c.transfer(20, w.a.domid(), g),
        Err(PlatformError::Grant(status::GENERAL_ERROR))
    ));
    assert!(matches!(
        w.b.transfer(2, w.a.domid(), g),
        Err(PlatformError::Grant(status::BAD_PAGE))
    ));
    w.b.transfer(20, w.a.domid(), g).unwrap();
    assert!(matches!(
        w.b.transfer(20, w.a.domid(), g),
        Err(PlatformError::Grant(status::GENERAL_ERROR))
    ));
    let acc = w.a.grant_access(w.b.domid(), 23, false).unwrap();
    assert!(matches!(
        w.b.transfer(20, w.a.domid(), acc),
        Err(PlatformError::Grant(status::GENERAL_ERROR))
    ));
    assert!(matches!(
        w.b.transfer(20, w.a.domid(), 5000),
        Err(PlatformError::Grant(status::BAD_GNTREF))
    ));
    // No transfer happened: the grant is simply withdrawn.
    let g = w.a.accept_transfer(w.b.domid(), 24).unwrap();
    assert_eq!(w.a.end_transfer(g).unwrap(), None);
}

#[test]
fn revocation_drops_pins_and_reports_mappings() {
    let w = world();
    let g = w.a.grant_access(w.b.domid(), 10, false).unwrap();
    let iova = w.b.pin_grant(w.a.domid(), g, true).unwrap();
    let page = w.a.alloc_shared_page().unwrap();
    let gm = w.a.grant_access(w.b.domid(), page.frame(), false).unwrap();
    let m = w.b.map_grant(w.a.domid(), gm, false).unwrap();
    // Nothing overdue yet.
    assert!(w
        .sys
        .set_grant_deadline(w.a.domid(), g, Instant::now() + Duration::from_secs(60))
        .unwrap());
    assert!(w.sys.revoke_overdue().is_empty());
    // Overdue: the pin goes, the mapping is reported.
    assert!(w
        .sys
        .set_grant_deadline(w.a.domid(), g, Instant::now())
        .unwrap());
    assert!(w
        .sys
        .set_grant_deadline(w.a.domid(), gm, Instant::now())
        .unwrap());
    assert!(
        !w.sys
            .set_grant_deadline(w.a.domid(), 200, Instant::now())
            .unwrap(),
        "unused ref"
    );
    let mut rev = w.sys.revoke_overdue();
    rev.sort_by_key(|r| r.gref);
    assert_eq!(rev.len(), 2);
    assert_eq!(
        (rev[0].gref, rev[0].holder, rev[0].kind),
        (g, w.b.domid(), RevokedUse::Pin { iova })
    );
    assert!(matches!(rev[1].kind, RevokedUse::Unrevocable { .. }));
    assert_eq!(
        w.iommu.device().dma_write(iova, b"late"),
        Err(IommuError::Unmapped(iova))
    );
    w.a.end_access(g).unwrap();
    assert!(matches!(
        w.b.unpin_grant(iova),
        Err(PlatformError::Grant(status::BAD_DEV_ADDR))
    ));
    // The manager kills the holder of the unrevocable mapping; the grant is free again.
    assert_eq!(w.a.end_access(gm), Err(PlatformError::GrantInUse(gm)));
    w.sys.destroy_domain(w.b.domid()).unwrap();
    w.a.end_access(gm).unwrap();
    drop(m); // unmapping after the holder died is harmless
}

#[test]
fn holder_deadline_revokes_everything_it_holds() {
    let w = world();
    let g1 = w.a.grant_access(w.b.domid(), 10, false).unwrap();
    let g2 = w.a.grant_access(w.b.domid(), 11, false).unwrap();
    let i1 = w.b.pin_grant(w.a.domid(), g1, false).unwrap();
    let _i2 = w.b.pin_grant(w.a.domid(), g2, true).unwrap();
    w.sys
        .set_holder_deadline(w.b.domid(), Instant::now())
        .unwrap();
    assert_eq!(w.sys.revoke_overdue().len(), 2);
    assert!(w.iommu.is_empty());
    w.a.end_access(g1).unwrap();
    w.a.end_access(g2).unwrap();
    // The IOVA may be reused by a new pin; the old, revoked record must not unpin it.
    let g3 = w.a.grant_access(w.b.domid(), 12, false).unwrap();
    let i3 = w.b.pin_grant(w.a.domid(), g3, false).unwrap();
    if i3 == i1 {
        w.b.unpin_grant(i3).unwrap();
    }
}

#[test]
fn destroying_the_granter_removes_pins_from_the_holders_iommu() {
    let w = world();
    let g = w.a.grant_access(w.b.domid(), 10, false).unwrap();
    let iova = w.b.pin_grant(w.a.domid(), g, true).unwrap();
    w.sys.destroy_domain(w.a.domid()).unwrap();
    assert!(w.iommu.is_empty());
    assert!(matches!(
        w.b.unpin_grant(iova),
        Err(PlatformError::Grant(status::BAD_DEV_ADDR))
    ));
    // Everything naming the dead domain fails cleanly.
    assert!(matches!(
        w.b.pin_grant(w.a.domid(), g, false),
        Err(PlatformError::Grant(status::BAD_DOMAIN))
    ));
    assert!(matches!(
        w.sys.destroy_domain(w.a.domid()),
        Err(SystemError::NoSuchDomain(_))
    ));
}

#[test]
fn concurrent_copies_and_end_access_never_overlap() {
    // While copies run, end_access either fails (in use) or succeeds, and once it succeeded
    // no copy through that ref may succeed.
    let w = world();
    let (a, b) = (w.a.domid(), w.b.domid());
    let g = w.a.grant_access(b, 10, false).unwrap();
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let st =
                    w.b.grant_copy(&[GrantCopyOp {
                        src: grant_ptr(a, g, 0),
                        dst: local(20, 0),
                        len: 64,
                    }])
                    .unwrap();
                assert!(st[0] == status::OKAY || st[0] == status::GENERAL_ERROR);
            }
        });
        let mut tries = 0;
        while w.a.end_access(g).is_err() {
            tries += 1;
            std::thread::yield_now();
        }
        let st =
            w.b.grant_copy(&[GrantCopyOp {
                src: grant_ptr(a, g, 0),
                dst: local(20, 0),
                len: 64,
            }])
            .unwrap();
        assert_eq!(st, vec![status::GENERAL_ERROR]);
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = tries;
    });
}

#[derive(Debug, Clone)]
enum Op {
    Grant {
        frame: u64,
        ro: bool,
        to_c: bool,
    },
    End(usize),
    Map(usize, bool),
    Unmap(usize),
    Pin(usize, bool),
    Unpin(usize),
    Copy {
        idx: usize,
        write: bool,
        off: u16,
        len: u16,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (7u64..34, any::<bool>(), prop::bool::weighted(0.2))
            .prop_map(|(frame, ro, to_c)| Op::Grant { frame, ro, to_c }),
        (0usize..6).prop_map(Op::End),
        ((0usize..6), any::<bool>()).prop_map(|(i, w)| Op::Map(i, w)),
        (0usize..6).prop_map(Op::Unmap),
        ((0usize..6), any::<bool>()).prop_map(|(i, w)| Op::Pin(i, w)),
        (0usize..6).prop_map(Op::Unpin),
        ((0usize..6), any::<bool>(), 0u16..4200, 0u16..4200).prop_map(|(idx, write, off, len)| {
            Op::Copy {
                idx,
                write,
                off,
                len,
            }
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    /// Random grant/end/map/pin/copy sequences between a granter and a holder, against a model
    /// of what each should do: uses are counted, end access fails exactly while a use exists,
    /// every status is the one Xen would give, and nothing panics.
    #[test]
    fn enforcement_matches_model(ops in prop::collection::vec(op(), 1..60)) {
        let w = world();
        let (a, b) = (w.a.domid(), w.b.domid());
        // Shareable pages at frames 32.. (nr_frames = 32) for map tests.
        let shared: Vec<_> = (0..2).map(|_| w.a.alloc_shared_page().unwrap()).collect();
        struct G { gref: u32, frame: u64, ro: bool, to_c: bool, maps: Vec<hypervisor::grant_table::MapHandle>, pins: Vec<u64> }
        let mut gs: Vec<G> = Vec::new();
        for op in ops {
            match op {
                Op::Grant { frame, ro, to_c } => {
                    let frame = if frame >= 32 { shared[(frame % 2) as usize].frame() } else { frame };
                    let peer = if to_c { w.c.domid() } else { b };
                    let gref = w.a.grant_access(peer, frame, ro).unwrap();
                    gs.push(G { gref, frame, ro, to_c, maps: vec![], pins: vec![] });
                }
                Op::End(i) if i < gs.len() => {
                    let busy = !gs[i].maps.is_empty() || !gs[i].pins.is_empty();
                    let r = w.a.end_access(gs[i].gref);
                    prop_assert_eq!(r.is_err(), busy);
                    if !busy { gs.remove(i); }
                }
                Op::Map(i, write) if i < gs.len() => {
                    let g = &mut gs[i];
                    let r = w.sys.map_grant(b, a, g.gref, !write);
                    let want = if g.to_c || (write && g.ro) { Err(status::GENERAL_ERROR) }
                        else if g.frame < 32 { Err(status::BAD_PAGE) } else { Ok(()) };
                    match r {
                        Ok((h, _)) => { prop_assert_eq!(want, Ok(())); g.maps.push(h); }
                        Err(SystemError::Grant(s)) => prop_assert_eq!(want, Err(s)),
                        Err(e) => prop_assert!(false, "unexpected {e}"),
                    }
                }
                Op::Unmap(i) if i < gs.len() => {
                    if let Some(h) = gs[i].maps.pop() { w.sys.unmap_grant(b, h).unwrap(); }
                }
                Op::Pin(i, write) if i < gs.len() => {
                    let g = &mut gs[i];
                    let want_ok = !(g.to_c || (write && g.ro));
                    let r = w.b.pin_grant(a, g.gref, write);
                    prop_assert_eq!(r.is_ok(), want_ok);
                    if let Ok(iova) = r { g.pins.push(iova); }
                }
                Op::Unpin(i) if i < gs.len() => {
                    if let Some(iova) = gs[i].pins.pop() { w.b.unpin_grant(iova).unwrap(); }
                }
                Op::Copy { idx, write, off, len } if idx < gs.len() => {
                    let g = &gs[idx];
                    let gp = grant_ptr(a, g.gref, off);
                    let op = if write { GrantCopyOp { src: local(20, 0), dst: gp, len } }
                        else { GrantCopyOp { src: gp, dst: local(20, 0), len } };
                    let st = w.b.grant_copy(&[op]).unwrap()[0];
                    let want = if usize::from(off) + usize::from(len) > 4096 { status::BAD_COPY_ARG }
                        else if g.to_c || (write && g.ro) { status::GENERAL_ERROR } else { status::OKAY };
                    prop_assert_eq!(st, want);
                }
                _ => {}
            }
            // Shared flags agree with the uses in the model.
            for g in &gs {
                let f = flags(&w.a, g.gref);
                let used = !g.maps.is_empty() || !g.pins.is_empty();
                prop_assert_eq!(f & GTF_READING != 0, used);
            }
        }
        prop_assert_eq!(w.iommu.len(), gs.iter().map(|g| g.pins.len()).sum::<usize>());
    }
}

#[test]
#[allow(clippy::cast_possible_truncation)] // Truncating random words is the point.
fn hostile_granter_rewriting_its_table_cannot_break_the_hypervisor() {
    // The granter scribbles random entries (any flags, domid, frame) over its table while the
    // holder maps, pins and copies through them. Nothing may panic, every status must be one
    // Xen defines, the platform frames (0, 5, 6) must stay untouched, and once the holder
    // lets go nothing stays in use.
    let w = world();
    let (a, b) = (w.a.domid(), w.b.domid());
    let entries = w.a.domain().grant_entries();
    let known = [
        status::OKAY,
        status::GENERAL_ERROR,
        status::BAD_DOMAIN,
        status::BAD_GNTREF,
        status::BAD_PAGE,
        status::BAD_COPY_ARG,
        status::NO_DEVICE_SPACE,
    ];
    let shared = w.a.alloc_shared_page().unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut x = 0x1234_5678_9abc_def0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let gref = 8 + (x % 8) as u32;
                let frame = match x >> 60 {
                    0..=5 => (x >> 8) as u32 % 8,       // platform frames
                    6..=11 => 7 + (x >> 8) as u32 % 30, // RAM (some past the end)
                    12..=13 => shared.frame() as u32,   // the shareable page
                    _ => (x >> 8) as u32,               // anything
                };
                let domid = if x & 0x100 == 0 { b } else { (x >> 16) as u16 };
                let _ = entries.publish(gref, domid, frame, (x >> 32) as u16);
                let _ = entries.end_access(gref);
            }
        });
        let mut maps = Vec::new();
        let mut pins = Vec::new();
        let mut y = 99u64;
        let mut oks = 0u32;
        for i in 0..20_000u32 {
            y = y
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let gref = 8 + (y >> 33) as u32 % 8;
            match i % 4 {
                0 | 1 => {
                    let off = (y >> 20) as u16 % 4200;
                    let op = if i % 4 == 0 {
                        GrantCopyOp {
                            src: local(20, 0),
                            dst: grant_ptr(a, gref, off),
                            len: 64,
                        }
                    } else {
                        GrantCopyOp {
                            src: grant_ptr(a, gref, off),
                            dst: local(20, 0),
                            len: 64,
                        }
                    };
                    let st = w.b.grant_copy(&[op]).unwrap()[0];
                    assert!(known.contains(&st), "status {st}");
                    if st == status::OKAY {
                        oks += 1;
                    }
                }
                2 => match w.sys.map_grant(b, a, gref, y & 1 == 0) {
                    Ok((h, _)) => maps.push(h),
                    Err(SystemError::Grant(st)) => assert!(known.contains(&st)),
                    Err(e) => panic!("{e}"),
                },
                _ => match w.b.pin_grant(a, gref, y & 2 == 0) {
                    Ok(iova) => pins.push(iova),
                    Err(PlatformError::Grant(st)) => assert!(known.contains(&st)),
                    Err(e) => panic!("{e}"),
                },
            }
            if maps.len() > 4 {
                w.sys.unmap_grant(b, maps.remove(0)).unwrap();
            }
            if pins.len() > 4 {
                w.b.unpin_grant(pins.remove(0)).unwrap();
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        eprintln!(
            "{oks} copies succeeded, {} maps and {} pins held at the end",
            maps.len(),
            pins.len()
        );
        // How many copies raced into a valid entry depends on scheduling; what must hold is
        // that the hypervisor still serves a well-formed grant after the abuse (checked below).
        for h in maps {
            w.sys.unmap_grant(b, h).unwrap();
        }
        for iova in pins {
            w.b.unpin_grant(iova).unwrap();
        }
    });
    assert_eq!(w.a.domain().grants_in_use(), 0);
    assert!(w.iommu.is_empty());
    entries.publish(8, b, 20, GTF_PERMIT_ACCESS).unwrap();
    let after = GrantCopyOp { src: grant_ptr(a, 8, 0), dst: local(21, 0), len: 64 };
    assert_eq!(w.b.grant_copy(&[after]).unwrap(), vec![status::OKAY]);
    let mut page = vec![0u8; 4096];
    for f in [0u64, 5, 6] {
        w.a.read_local(f, 0, &mut page).unwrap();
        assert!(
            page.iter().all(|b| *b == 0),
            "platform frame {f} was written"
        );
    }
}
