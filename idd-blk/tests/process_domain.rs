//! The `idd-blk` binary as a sandboxed process domain: this test is domain 0 (the System, the
//! emulated virtio-blk-pci behind its I/O Space server) and a guest whose blkfront is
//! written here. The IDD process is SIGKILLed with requests in flight and restarted in the
//! same domain (`spawn_in`) several times; the guest never reconnects, and every request is
//! answered exactly once with the right data.

mod common;

use common::*;
use devchan::blkif::BLKIF_RSP_OKAY;
use devchan::platform::{Platform, SharedPage};
use hypervisor::domain::DomainConfig;
use hypervisor::launch::{spawn_in, LaunchConfig, RunningDomain};
use hypervisor::system::System;
use iospace::emu::virtio_blk::{BlkConfig, VirtioBlk};
use iospace::emu::virtio_pci::VirtioPci;
use iospace::emu::PciBus;
use iospace::iommu::Iommu;
use iospace::space::IoSpace;
use std::collections::BTreeMap;
use std::io::BufRead;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn start(sys: &Arc<System>, idd: u16, socket: &std::path::Path, channel: &str) -> RunningDomain {
    let mut cfg = LaunchConfig::new(
        "idd-blk",
        0,
        env!("CARGO_BIN_EXE_idd-blk"),
        &[
            "--device-socket",
            socket.to_str().unwrap(),
            "--channel",
            channel,
            "--batch",
            "4",
        ],
    );
    cfg.stderr = std::process::Stdio::inherit();
    let mut d = spawn_in(sys, idd, cfg).unwrap();
    let out = d.child_mut().stdout.take().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(out).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready", "idd-blk did not come up");
    d
}

#[test]
fn killed_idd_process_is_restarted_in_its_domain_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let blk = Arc::new(
        VirtioBlk::new(&BlkConfig {
            path: path.clone(),
            size: 4096 * 512,
            read_only: false,
            serial: "idd-blk-process".into(),
            workers: 2,
        })
        .unwrap(),
    );
    let iommu = Iommu::new(1024);
    let dev = Arc::new(VirtioPci::new(blk.clone(), iommu.device(), 11).unwrap());
    let bus = PciBus::new();
    let bdf = bus.plug(4, dev.clone()).unwrap();
    let dev_status = dev.clone();
    let space = Arc::new(IoSpace::new(bdf, dev).unwrap());
    // Domain 0's I/O Space server: one IDD process at a time.
    let socket = dir.path().join("iospace.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let srv_space = space.clone();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(s) = s else { return };
            let _ = iospace::link::serve(&srv_space, s);
        }
    });

    let sys = System::new();
    let idd = sys
        .create_domain(DomainConfig {
            name: "idd-blk".into(),
            nr_frames: 32,
            iommu: Some(iommu.clone()),
        })
        .unwrap();
    let mut g = Front::new(&sys, idd, "guest");
    let region_offset = 512u64;
    let channel = format!(
        "{}:{}:{}:{}:{}",
        g.plat.domid(),
        g.ring_ref,
        g.port,
        region_offset,
        1024
    );
    let mut running = start(&sys, idd, &socket, &channel);

    let mut expect: BTreeMap<u64, Vec<u8>> = BTreeMap::new(); // block → data
    let mut outstanding: BTreeMap<u64, (usize, bool, u64)> = BTreeMap::new();
    let mut seed = 0u64;
    let mut restarts = 0;
    let mut in_flight_at_kill = 0;
    for round in 0..6u64 {
        // Post 16 writes (distinct blocks per round, some rewritten across rounds).
        for i in 0..16u64 {
            let page = usize::try_from(i).unwrap();
            let block = (round * 5 + i) % 40;
            seed += 1;
            let data = pattern(seed);
            g.fill(page, &data);
            let w = g.rw(true, block * 8, &[page]);
            outstanding.insert(w.id(), (page, true, block));
            expect.insert(block, data);
            g.post(&w);
        }
        // Let some complete, then kill the IDD with the rest in flight.
        let until =
            Instant::now() + Duration::from_millis(if round == 0 { 0 } else { 2 + 3 * round });
        while Instant::now() < until {
            for r in g.responses() {
                assert_eq!(r.status, BLKIF_RSP_OKAY);
                outstanding.remove(&r.id).expect("unknown or repeated id");
            }
        }
        in_flight_at_kill += outstanding.len();
        running.kill().unwrap();
        running.stop_server();
        drop(running);
        // The manager's recovery: revoke every pin the dead process's domain holds (a pin
        // made by a hypercall that completed after the kill is known to nobody else).
        sys.set_holder_deadline(idd, Instant::now()).unwrap();
        sys.revoke_overdue();
        restarts += 1;
        running = start(&sys, idd, &socket, &channel);
        // Everything outstanding is answered by the new process, once.
        let deadline = Instant::now() + Duration::from_secs(45);
        while !outstanding.is_empty() {
            if Instant::now() > deadline {
                // SAFETY: reading the live ring page's header words for the message.
                let hdr: Vec<u32> = (0..4)
                    .map(|i| unsafe {
                        (g.ring_page().as_ptr() as *const u32)
                            .add(i)
                            .read_volatile()
                    })
                    .collect();
                panic!(
                    "round {round}: {} requests never answered: {:?}; front prod {} cons {}; shared req_prod/req_event/rsp_prod/rsp_event {hdr:?}; device completed {} status {:#x}",
                    outstanding.len(),
                    outstanding.keys().collect::<Vec<_>>(),
                    g.ring.req_prod_pvt(),
                    g.ring.rsp_cons(),
                    blk.completed(),
                    dev_status.device_status()
                );
            }
            for r in g.responses() {
                assert_eq!(r.status, BLKIF_RSP_OKAY);
                outstanding.remove(&r.id).expect("unknown or repeated id");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    assert!(
        g.answered.values().all(|c| *c == 1),
        "an id was answered twice"
    );
    // Read every block back through the restarted IDD, and check the image itself.
    for (&block, data) in &expect {
        let r = g.rw(false, block * 8, &[20]);
        g.fill(20, &[0; 4096]);
        g.post(&r);
        let deadline = Instant::now() + Duration::from_secs(10);
        let rsp = loop {
            if let Some(x) = g.responses().pop() {
                break x;
            }
            assert!(Instant::now() < deadline, "read never answered");
            std::thread::sleep(Duration::from_millis(1));
        };
        assert_eq!(rsp.status, BLKIF_RSP_OKAY);
        assert_eq!(&g.page(20), data, "block {block} via the IDD");
        let mut disk = vec![0u8; 4096];
        std::fs::File::open(&path)
            .unwrap()
            .read_exact_at(&mut disk, (region_offset + block * 8) * 512)
            .unwrap();
        assert_eq!(&disk, data, "block {block} in the image");
    }
    assert_eq!(restarts, 6);
    // Each process released its predecessor's pins: only the live driver's two queue pages
    // and no guest page remain in the IOMMU.
    assert_eq!(
        iommu.len(),
        2,
        "pins leaked across restarts ({} in flight at kills)",
        in_flight_at_kill
    );
    assert!(
        in_flight_at_kill > 0,
        "no kill happened with requests in flight"
    );
    eprintln!("{restarts} restarts, {in_flight_at_kill} requests in flight at the kills");
    running.kill().unwrap();
}
