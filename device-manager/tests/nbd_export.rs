//! An unmodified program as the client: `qemu-io` writes a pattern through the NBD export of
//! a process guest (blkfront → blkback → virtio-blk driver → emulated device → image) and
//! verifies it, and the bytes are in the guest's region of the image. Skipped (with a note)
//! where `qemu-io` is not installed.

mod common;

use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::{Duration, Instant};

use device_manager::manager::{Manager, ManagerConfig};
use hypervisor::launch::ExitReport;
use policy::Policy;

#[test]
fn qemu_io_writes_and_verifies_through_the_nbd_export() {
    if Command::new("qemu-io").arg("--version").output().is_err() {
        eprintln!("qemu-io not installed: skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[[device]]\nname = \"disk0\"\nkind = \"virtio-blk\"\nimage = \"{}\"\nsize = \"16MiB\"\n\n\
         [[guest]]\nname = \"alice\"\n[[guest.disk]]\ndevice = \"disk0\"\nlength = \"8MiB\"\n\n\
         [[guest]]\nname = \"bob\"\n[[guest.disk]]\ndevice = \"disk0\"\noffset = \"8MiB\"\n",
        dir.path().join("disk0.img").display()
    );
    let policy = Policy::parse(&text, "nbd.toml").unwrap_or_else(|e| panic!("{}", e.render()));
    let cfg = ManagerConfig {
        idd_program: common::idd_program(),
        guest_program: env!("CARGO_BIN_EXE_blk-guest").into(),
        net_idd_program: "idd-net".into(), // no NIC in this policy
        heartbeat: None,
        verbose: false,
    };
    let mut m = Manager::start(&policy, cfg).unwrap();
    let sock = dir.path().join("bob.nbd");
    m.start_guest("bob", &["nbd", "--socket", sock.to_str().unwrap()])
        .unwrap();
    let sock2 = sock.clone();
    let client = std::thread::spawn(move || {
        let t = Instant::now();
        while !sock2.exists() {
            assert!(t.elapsed() < Duration::from_secs(20), "no socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        let uri = format!("nbd+unix:///disk?socket={}", sock2.display());
        Command::new("qemu-io")
            .args(["-f", "raw", &uri])
            .args(["-c", "write -P 0x5c 1M 2M", "-c", "read -P 0x5c 1M 2M"])
            .args(["-c", "write -P 0x17 0 4k", "-c", "read -P 0x17 0 4k"])
            .output()
            .unwrap()
    });
    m.connect(Duration::from_secs(30)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while m.guest_running("bob").unwrap() {
        assert!(Instant::now() < deadline, "the NBD session did not end");
        m.supervise(Duration::from_millis(20)).unwrap();
    }
    let out = client.join().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success());
    assert!(!stdout.contains("Pattern verification failed"), "{stdout}");
    assert_eq!(stdout.matches("read ").count(), 2, "{stdout}");
    let (exit, _) = m.wait_guest("bob", Duration::from_secs(5)).unwrap();
    assert_eq!(exit, ExitReport::Exited(0));
    // In Bob's region of the image (which starts at 8 MiB), and nowhere else.
    let (image, _) = m.image().unwrap();
    let f = std::fs::File::open(image).unwrap();
    let mut b = vec![0u8; 4096];
    f.read_exact_at(&mut b, (8 << 20) + (1 << 20)).unwrap();
    assert!(b.iter().all(|x| *x == 0x5c));
    f.read_exact_at(&mut b, 8 << 20).unwrap();
    assert!(b.iter().all(|x| *x == 0x17));
    f.read_exact_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|x| *x == 0), "Alice's region was touched");
}
