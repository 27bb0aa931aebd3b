//! blkfront in a sandboxed process domain (`blkfront-domain`), talking XenStore over its ring
//! and blkif over grants and event channels through the hypercall channels, against the real
//! blkback in an IDD domain; the IDD is killed mid-run and replaced, and the guest's own
//! verification plus a comparison with the image must pass.

#![allow(clippy::cast_possible_truncation)]

mod common;

use std::io::{BufRead, BufReader};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use devchan::xenstore::client::NO_TX;
use devchan::xenstore::perms::Perm;
use hypervisor::domain::DomainConfig;
use hypervisor::launch::{ExitReport, LaunchConfig};
use hypervisor::system::System;
use hypervisor::xenstored::domains::DomainStores;
use hypervisor::xenstored::socket::{self, SocketServer};
use hypervisor::xenstored::Xenstored;

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[test]
fn blkfront_in_a_process_domain_survives_an_idd_crash() {
    let sys = System::new();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("xs.sock");
    let cfg = |name: &str, nr_frames| DomainConfig {
        name: name.into(),
        nr_frames,
        iommu: None,
    };
    let dom0 = sys.create_domain(cfg("dom0", 16)).unwrap();
    let xs = Xenstored::new();
    let _server = SocketServer::bind(&sock, Arc::clone(&xs))
        .unwrap()
        .spawn()
        .unwrap();
    let stores = DomainStores::start(Arc::clone(&sys), Arc::clone(&xs), dom0).unwrap();
    let guest = sys.create_domain(cfg("guest", 64)).unwrap();
    stores.introduce(guest).unwrap();
    // The toolstack: the guest owns its device directory.
    let mut admin = socket::connect(&sock).unwrap();
    let fd = front_dir(guest);
    let perms = [Perm::new(guest, 0)];
    for p in [
        format!("/local/domain/{guest}/device"),
        format!("/local/domain/{guest}/device/vbd"),
        fd.clone(),
        format!("{fd}/state"),
    ] {
        admin
            .write(NO_TX, &p, if p.ends_with("state") { b"1" } else { b"" })
            .unwrap();
        admin.set_perms(NO_TX, &p, &perms).unwrap();
    }
    let image = std::fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.path().join("disk.img"))
        .unwrap();
    image.set_len(SECTORS * 512).unwrap();
    let b1 = start_idd(&sys, &image, &sock, guest, Mode::Blkback);

    let prog = env!("CARGO_BIN_EXE_blkfront-domain");
    let devid = DEVID.to_string();
    let mut g = stores
        .spawn_in(
            guest,
            LaunchConfig::new("guest", 64, prog, &[&devid, "2000"]),
        )
        .unwrap();
    let out = g.child_mut().stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        BufReader::new(out)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    std::thread::sleep(Duration::from_millis(700));
    b1.kill(&sys);
    std::thread::sleep(Duration::from_millis(50));
    let _b2 = start_idd(&sys, &image, &sock, guest, Mode::Blkback);
    let exit = g.wait_exit(Some(Duration::from_secs(60))).unwrap();
    let lines = reader.join().unwrap();
    eprintln!("{lines:?}");
    assert_eq!(exit, Some(ExitReport::Exited(0)), "{lines:?}");
    let line = lines
        .iter()
        .find(|l| l.starts_with("blkfront-domain: ok"))
        .expect("a result line");
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(k))
            .unwrap()
            .to_owned()
    };
    assert_eq!(field("connects="), "2", "{line}");
    let mut img = vec![0u8; (SECTORS * 512) as usize];
    std::os::unix::fs::FileExt::read_exact_at(&image, &mut img, 0).unwrap();
    assert_eq!(
        field("hash="),
        format!("{:016x}", fnv(&img)),
        "image differs"
    );
}
