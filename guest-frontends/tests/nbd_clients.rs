//! Real NBD clients against the adapter: `qemu-io`, `qemu-img` (Debian `qemu-utils`) and
//! `nbdcopy` (`libnbd-bin`), over a file-backed export. Each test skips, saying so, when its
//! tool is missing.
#![allow(clippy::cast_possible_truncation)]

use std::process::Command;
use std::sync::Arc;

use guest_frontends::block::{BlockDevice, FileDevice};
use guest_frontends::nbd::{Export, NbdServer};

fn have(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIPPED: {tool} is not installed (apt-get install qemu-utils libnbd-bin)");
    }
    ok
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed: {text}");
    text
}

fn server(dir: &tempfile::TempDir, size: usize) -> (NbdServer, Arc<FileDevice>) {
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; size]).unwrap();
    let dev = Arc::new(FileDevice::open(&img, false).unwrap());
    let srv = NbdServer::spawn(
        dir.path().join("nbd.sock"),
        Export {
            name: "disk".into(),
            device: dev.clone(),
        },
    )
    .unwrap();
    (srv, dev)
}

#[test]
fn qemu_io_writes_and_verifies_a_pattern() {
    if !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (srv, dev) = server(&dir, 4 << 20);
    let out = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0xab 0 1M",
        "-c",
        "read -P 0xab 0 1M",
        "-c",
        "write -P 0x5c 1536 3000",
        "-c",
        "read -P 0x5c 1536 3000",
        "-c",
        "flush",
        "-c",
        "write -z 2M 64k",
        "-c",
        "read -P 0 2M 64k",
        "-c",
        "discard 3M 64k",
        &srv.uri(),
    ]));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // The bytes really are on the device.
    let mut b = vec![0u8; 1536];
    dev.read_at(0, &mut b).unwrap();
    assert!(b.iter().all(|x| *x == 0xab));
    let mut b = vec![0u8; 3000];
    dev.read_at(1536, &mut b).unwrap();
    assert!(b.iter().all(|x| *x == 0x5c));
    // A wrong expectation must fail (the verify pass can fail).
    let bad = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read -P 0xcd 0 4k", &srv.uri()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&bad.stdout).to_string();
    assert!(text.contains("Pattern verification failed"), "{text}");
    // Out of range: qemu refuses or the server answers EINVAL; either way an error.
    let oob = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read 4M 4k", &srv.uri()])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&oob.stdout),
        String::from_utf8_lossy(&oob.stderr)
    );
    assert!(
        text.contains("error") || text.contains("Input/output") || text.contains("Invalid"),
        "{text}"
    );
}

#[test]
fn qemu_img_info_and_convert_round_trip() {
    if !have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (srv, _dev) = server(&dir, 2 << 20);
    let info = run(Command::new("qemu-img").args(["info", &srv.uri()]));
    assert!(info.contains("2 MiB") || info.contains("2097152"), "{info}");
    let src = dir.path().join("src.img");
    let data: Vec<u8> = (0..2u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&src, &data).unwrap();
    run(Command::new("qemu-img").args([
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "raw",
        src.to_str().unwrap(),
        &srv.uri(),
    ]));
    let back = dir.path().join("back.img");
    run(Command::new("qemu-img").args([
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &srv.uri(),
        back.to_str().unwrap(),
    ]));
    assert_eq!(std::fs::read(&back).unwrap(), data);
    run(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        src.to_str().unwrap(),
        &srv.uri(),
    ]));
}

fn sha256(path: &std::path::Path) -> String {
    let out = run(Command::new("sha256sum").arg(path));
    out.split_whitespace().next().unwrap().to_owned()
}

#[test]
fn nbdcopy_in_and_out_with_checksums() {
    if !have("nbdcopy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 8 << 20;
    let (srv, _dev) = server(&dir, size);
    let src = dir.path().join("in.img");
    let data: Vec<u8> = (0..size as u32)
        .map(|i| (i.wrapping_mul(40503) >> 7) as u8)
        .collect();
    std::fs::write(&src, &data).unwrap();
    // nbdcopy uses several connections at once (the export says CAN_MULTI_CONN).
    run(Command::new("nbdcopy").args(["--connections=4", src.to_str().unwrap(), &srv.uri()]));
    let out = dir.path().join("out.img");
    run(Command::new("nbdcopy").args([&srv.uri(), out.to_str().unwrap()]));
    assert_eq!(sha256(&src), sha256(&out));
}

#[test]
fn nbdinfo_lists_the_export() {
    if !have("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (srv, _dev) = server(&dir, 1 << 20);
    let uri = format!("nbd+unix:///?socket={}", srv.path().display());
    let list = run(Command::new("nbdinfo").args(["--list", &uri]));
    assert!(list.contains("disk"), "{list}");
    let info =
        run(Command::new("nbdinfo")
            .arg(format!("nbd+unix:///disk?socket={}", srv.path().display())));
    assert!(info.contains("1048576"), "{info}");
    assert!(
        info.contains("can_flush: true") || info.contains("can_flush"),
        "{info}"
    );
    // An export that does not exist is refused by NBD_OPT_GO.
    let bad = Command::new("nbdinfo")
        .arg(format!(
            "nbd+unix:///nosuch?socket={}",
            srv.path().display()
        ))
        .output()
        .unwrap();
    assert!(!bad.status.success());
}
