//! A domain's process dies and a new one takes over the domain: the grants it made stay valid
//! for the peer, are found again, are not handed out twice, and can be ended; the mappings a
//! dead process held are released.

use devchan::grant::GrantRef;
use devchan::platform::{Frame, Platform, PlatformError, SharedPage};
use hypervisor::domain::DomainConfig;
use hypervisor::launch::{connect, launch, spawn_in, ExitReport, LaunchConfig};
use hypervisor::process::ProcessPlatform;
use hypervisor::system::System;
use std::io::{BufRead, BufReader};
use std::process::ChildStdout;
use std::sync::Arc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_domain-test");
const FRAMES: u64 = 32;

fn domain(sys: &Arc<System>, name: &str) -> u16 {
    sys.create_domain(DomainConfig {
        name: name.into(),
        nr_frames: FRAMES,
        iommu: None,
    })
    .unwrap()
}

/// A platform of `dom` in this process: a stand-in for one process of the domain.
fn attach(sys: &Arc<System>, dom: u16) -> (ProcessPlatform, hypervisor::hypercall::Server) {
    let (server, fds) = connect(sys, dom).unwrap();
    (ProcessPlatform::from_fds(dom, FRAMES, fds).unwrap(), server)
}

fn poke(page: &impl SharedPage, off: usize, data: &[u8]) {
    for (i, b) in data.iter().enumerate() {
        // SAFETY: `off + i` is inside the one mapped page; volatile because it is shared.
        unsafe { page.as_ptr().add(off + i).write_volatile(*b) };
    }
}

fn peek(page: &impl SharedPage, off: usize, len: usize) -> Vec<u8> {
    // SAFETY: as in `poke`.
    (0..len)
        .map(|i| unsafe { page.as_ptr().add(off + i).read_volatile() })
        .collect()
}

#[test]
fn restarted_process_resumes_its_grants() {
    let sys = System::new();
    let (a_id, b_id) = (domain(&sys, "front"), domain(&sys, "back"));
    let (b, _bs) = attach(&sys, b_id);

    // The first process: a ring page granted to the back, plus a grant it ended.
    let (a1, a1s) = attach(&sys, a_id);
    let ring = a1.alloc_shared_page().unwrap();
    poke(&ring, 0, b"ring");
    let gref = a1.grant_access(b_id, ring.frame(), false).unwrap();
    let gone = a1.grant_access(b_id, ring.frame(), true).unwrap();
    a1.end_access(gone).unwrap();
    let frame = ring.frame();
    let map = b.map_grant(a_id, gref, false).unwrap();
    // It dies: its mappings and descriptors go, the domain stays.
    drop((ring, a1, a1s));

    let (a2, _a2s) = attach(&sys, a_id);
    let live: Vec<GrantRef> = a2.granted().iter().map(|g| g.0).collect();
    assert_eq!(live, vec![gref], "exactly the live grant is found");
    assert_eq!(a2.find_grant(b_id, frame), Some(gref));
    let ring = a2.reattach_page(frame).unwrap();
    assert_eq!(ring.frame(), frame);
    assert_eq!(peek(&ring, 0, 4), b"ring");
    // Both sides still share the page.
    poke(&map, 4, b"back");
    assert_eq!(peek(&ring, 4, 4), b"back");
    poke(&ring, 8, b"new!");
    assert_eq!(peek(&map, 8, 4), b"new!");
    // New grants never reuse the live reference (the ended one may come back).
    let fresh: Vec<GrantRef> = (0..64)
        .map(|_| a2.grant_access(b_id, frame, true).unwrap())
        .collect();
    assert!(!fresh.contains(&gref));
    assert!(fresh.contains(&gone));
    // The old grant ends as any other: not while the back maps it.
    assert_eq!(a2.end_access(gref), Err(PlatformError::GrantInUse(gref)));
    drop(map);
    a2.end_access(gref).unwrap();
    assert!(b.map_grant(a_id, gref, false).is_err());
    for g in fresh {
        a2.end_access(g).unwrap();
    }
    assert!(a2.granted().is_empty());
    assert!(
        a2.reattach_page(FRAMES + 5).is_err(),
        "no shareable page at that frame"
    );
    assert!(a2.reattach_page(3).is_err(), "a RAM frame is not shareable");
}

#[test]
fn mappings_of_a_dead_process_are_released() {
    let sys = System::new();
    let (a_id, b_id) = (domain(&sys, "front"), domain(&sys, "back"));
    let (a, _as) = attach(&sys, a_id);
    let ring = a.alloc_shared_page().unwrap();
    let gref = a.grant_access(b_id, ring.frame(), false).unwrap();
    let (b, bs) = attach(&sys, b_id);
    let map = b.map_grant(a_id, gref, false).unwrap();
    // The back's process dies without unmapping (its address space is gone; the mapping's
    // release never reaches the hypervisor).
    std::mem::forget(map);
    drop((b, bs));
    assert_eq!(a.end_access(gref), Err(PlatformError::GrantInUse(gref)));
    assert_eq!(sys.release_mappings(b_id).unwrap(), 1);
    a.end_access(gref).unwrap();
    assert_eq!(sys.release_mappings(b_id).unwrap(), 0);
}

fn line_with(out: &mut BufReader<ChildStdout>, prefix: &str) -> Vec<String> {
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "domain closed stdout before {prefix}"
        );
        if let Some(rest) = line.trim_end().strip_prefix(prefix) {
            return rest.split_whitespace().map(str::to_owned).collect();
        }
    }
}

#[test]
fn sandboxed_process_is_killed_and_restarted_with_its_grants() {
    let sys = System::new();
    let b_id = domain(&sys, "back");
    let (b, _bs) = attach(&sys, b_id);
    let mut a = launch(
        &sys,
        LaunchConfig::new("front", FRAMES, BIN, &["ring-grant", &b_id.to_string()]),
    )
    .unwrap();
    let a_id = a.domid();
    let mut out = BufReader::new(a.child_mut().stdout.take().unwrap());
    let ready = line_with(&mut out, "READY");
    let (gref, frame): (GrantRef, Frame) = (ready[0].parse().unwrap(), ready[1].parse().unwrap());
    let map = b.map_grant(a_id, gref, false).unwrap();
    assert_eq!(peek(&map, 0, 4), b"RING");
    assert!(matches!(a.kill().unwrap(), ExitReport::Signaled(9)));
    drop(a);
    // The grant outlives the process.
    poke(&map, 4, b"held");

    let mut a2 = spawn_in(
        &sys,
        a_id,
        LaunchConfig::new(
            "front",
            FRAMES,
            BIN,
            &[
                "resume",
                &b_id.to_string(),
                &gref.to_string(),
                &frame.to_string(),
            ],
        ),
    )
    .unwrap();
    let mut out = BufReader::new(a2.child_mut().stdout.take().unwrap());
    let resumed = line_with(&mut out, "RESUMED");
    assert_ne!(resumed[0].parse::<GrantRef>().unwrap(), gref);
    assert_eq!(
        resumed[1], "held",
        "the restarted process sees the back's write"
    );
    // It can end the old grant only once we stop mapping it.
    std::thread::sleep(Duration::from_millis(50));
    assert!(b.map_grant(a_id, gref, false).is_ok(), "still granted");
    drop(map);
    line_with(&mut out, "ENDED");
    assert_eq!(
        a2.wait_exit(Some(Duration::from_secs(20))).unwrap(),
        Some(ExitReport::Exited(0))
    );
    assert!(b.map_grant(a_id, gref, false).is_err());
}

#[test]
fn killing_a_mapper_process_releases_its_mappings() {
    let sys = System::new();
    let (f_id, b_id) = (domain(&sys, "front"), domain(&sys, "back"));
    let (front, _fs) = attach(&sys, f_id);
    let ring = front.alloc_shared_page().unwrap();
    let gref = front.grant_access(b_id, ring.frame(), false).unwrap();
    let port = front.evtchn_alloc_unbound(b_id).unwrap();
    let args = [
        "back".to_owned(),
        f_id.to_string(),
        gref.to_string(),
        port.to_string(),
        "1".to_owned(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut back = spawn_in(&sys, b_id, LaunchConfig::new("back", FRAMES, BIN, &args)).unwrap();
    // The back maps the ring, then binds the port (so a send succeeds), then waits for a
    // request that never comes.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while front.evtchn_notify(port).is_err() {
        assert!(std::time::Instant::now() < deadline, "back never bound");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        back.wait_exit(Some(Duration::ZERO)).unwrap(),
        None,
        "still running"
    );
    assert_eq!(front.end_access(gref), Err(PlatformError::GrantInUse(gref)));
    assert!(matches!(back.kill().unwrap(), ExitReport::Signaled(9)));
    // The kill's wait released the dead process's mapping.
    front.end_access(gref).unwrap();
}
