//! The `idd-blk` binary's control commands (the manager's live reload): a guest's region is
//! grown while the IDD serves, requests beyond the old end then succeed, a second guest is
//! attached and served, and bad commands
//! (a shrink, a region past the device, an unknown channel, garbage) are answered `err` or
//! ignored without disturbing the service.

mod common;

use common::*;
use devchan::blkif::{BLKIF_RSP_ERROR, BLKIF_RSP_OKAY};
use devchan::platform::Platform;
use hypervisor::domain::DomainConfig;
use hypervisor::launch::{spawn_in, LaunchConfig};
use hypervisor::system::System;
use iospace::emu::virtio_blk::{BlkConfig, VirtioBlk};
use iospace::emu::virtio_pci::VirtioPci;
use iospace::emu::PciBus;
use iospace::iommu::Iommu;
use iospace::space::IoSpace;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Post `req` and wait for its status.
fn status(g: &mut Front, req: &devchan::blkif::BlkRequest) -> i16 {
    g.post(req);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(r) = g.responses().pop() {
            return r.status;
        }
        assert!(Instant::now() < deadline, "request never answered");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_region_grows_and_a_guest_is_attached_while_serving() {
    let dir = tempfile::tempdir().unwrap();
    let blk = Arc::new(
        VirtioBlk::new(&BlkConfig {
            path: dir.path().join("disk.img"),
            size: 4096 * 512,
            read_only: false,
            serial: "idd-blk-control".into(),
            workers: 2,
        })
        .unwrap(),
    );
    let iommu = Iommu::new(1024);
    let dev = Arc::new(VirtioPci::new(blk, iommu.device(), 11).unwrap());
    let bus = PciBus::new();
    let bdf = bus.plug(4, dev.clone()).unwrap();
    let space = Arc::new(IoSpace::new(bdf, dev).unwrap());
    let socket = dir.path().join("iospace.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(s) = s else { return };
            let _ = iospace::link::serve(&space, s);
        }
    });
    let sys = System::new();
    let idd = sys
        .create_domain(DomainConfig {
            name: "idd-blk".into(),
            nr_frames: 32,
            iommu: Some(iommu),
        })
        .unwrap();
    let mut g = Front::new(&sys, idd, "guest");
    // Region: 1024 sectors from sector 512 of a 4096-sector device.
    let channel = format!("{}:{}:{}:512:1024", g.plat.domid(), g.ring_ref, g.port);
    let mut cfg = LaunchConfig::new(
        "idd-blk",
        0,
        env!("CARGO_BIN_EXE_idd-blk"),
        &[
            "--device-socket",
            socket.to_str().unwrap(),
            "--channel",
            &channel,
        ],
    );
    cfg.stderr = std::process::Stdio::inherit();
    cfg.stdin = std::process::Stdio::piped();
    let mut d = spawn_in(&sys, idd, cfg).unwrap();
    let mut stdin = d.child_mut().stdin.take().unwrap();
    let out = d.child_mut().stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    let next = |prefix: &str| loop {
        let l = lines
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("no {prefix:?} line"));
        if l.starts_with(prefix) {
            return l;
        }
    };
    assert_eq!(next("ready"), "ready");
    let mut send = |l: &str| {
        stdin.write_all(l.as_bytes()).unwrap();
        stdin.flush().unwrap();
    };

    // Beyond the old end (sectors 1024..1032 of the region): refused.
    let beyond = g.rw(true, 1024, &[0]);
    assert_eq!(status(&mut g, &beyond), BLKIF_RSP_ERROR);
    // Bad commands: answered err (or, without an id, ignored), the service goes on.
    send("1 region 0 512\n");
    let a = next("ctl 1 ");
    assert!(a.starts_with("ctl 1 err") && a.contains("shrink"), "{a}");
    send("2 region 0 999999\n");
    let a = next("ctl 2 ");
    assert!(a.starts_with("ctl 2 err") && a.contains("fit"), "{a}");
    send("3 region 7 2048\n");
    assert!(next("ctl 3 ").starts_with("ctl 3 err"));
    send("4 credit 0 1/1\n");
    assert!(next("ctl 4 ").starts_with("ctl 4 err"));
    send("region 0 2048\n\u{0}\u{ff}garbage\n");
    let inside = g.rw(false, 0, &[1]);
    assert_eq!(status(&mut g, &inside), BLKIF_RSP_OKAY);
    assert_eq!(
        status(&mut g, &beyond),
        BLKIF_RSP_ERROR,
        "no id: not applied"
    );
    // Grow to 2048 sectors: the same request now succeeds, up to the new end only.
    send("5 region 0 2048\n");
    assert_eq!(next("ctl 5 "), "ctl 5 ok");
    g.fill(0, &pattern(5));
    assert_eq!(status(&mut g, &beyond), BLKIF_RSP_OKAY);
    let read = g.rw(false, 1024, &[2]);
    assert_eq!(status(&mut g, &read), BLKIF_RSP_OKAY);
    assert_eq!(g.page(2), pattern(5));
    let past = g.rw(false, 2048, &[2]);
    assert_eq!(status(&mut g, &past), BLKIF_RSP_ERROR);
    // A second guest attached while serving: its own region, served at once.
    let mut h = Front::new(&sys, idd, "guest-2");
    send(&format!(
        "6 attach {}:{}:{}:3000:64\n",
        h.plat.domid(),
        h.ring_ref,
        h.port
    ));
    assert_eq!(next("ctl 6 "), "ctl 6 ok");
    h.fill(0, &pattern(6));
    let w = h.rw(true, 8, &[0]);
    assert_eq!(status(&mut h, &w), BLKIF_RSP_OKAY);
    let past = h.rw(false, 64, &[1]);
    assert_eq!(status(&mut h, &past), BLKIF_RSP_ERROR, "its own bounds");
    send("7 attach 1:2\n");
    assert!(next("ctl 7 ").starts_with("ctl 7 err"));
    // The heartbeat counts both channels.
    let hb = loop {
        let l = next("hb ");
        if l.matches('/').count() == 6 {
            break l;
        }
    };
    eprintln!("{hb}");
    d.kill().unwrap();
}
