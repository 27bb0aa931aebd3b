//! `iddctl xen serve` end to end without Xen: the project's xenstored on a socket plays
//! XenStore, a regular file plays `/dev/xen/evtchn`, and a stand-in `xen-blkback` script
//! (it prints `ready` with the arguments it got, then sleeps) plays the backend. The run:
//! the guest's domain appears late and is found by name, the vbd nodes and the image are
//! made, the backend is started, killed, restarted with its exit → ready measured, and
//! SIGTERM ends it all with a summary.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

use devchan::xenstore::client::NO_TX;
use hypervisor::xenstored::socket::{connect, SocketServer};
use hypervisor::xenstored::Xenstored;

const POLICY: &str = r#"
[[device]]
name = "disk0"
kind = "virtio-blk"
image = "disk.img"
size = "1MiB"

[[guest]]
name = "web"
kind = "xen"
domain = "domu"
disk = [{ device = "disk0" }]
"#;

const STAND_IN: &str = "#!/bin/sh\necho \"ready fresh journaled=0 args=$*\"\nexec sleep 600\n";

fn iddctl(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_iddctl"));
    c.args(args).env_remove("IDDCTL_REMOTE");
    c
}

fn lines(child: &mut Child) -> Receiver<String> {
    let out = child.stdout.take().unwrap();
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            eprintln!("serve| {l}");
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    rx
}

/// The next line starting with `prefix` (others are skipped), within 30 s.
fn expect(rx: &Receiver<String>, prefix: &str) -> String {
    loop {
        let l = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("no line starting with {prefix:?}"));
        if l.starts_with(prefix) {
            return l;
        }
    }
}

fn pid_of(line: &str) -> i32 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("pid="))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {line}"))
}

fn signal(pid: i32, sig: i32) -> bool {
    // SAFETY: kill(2) on a process of this test (the backend, or iddctl itself).
    unsafe { libc::kill(pid, sig) == 0 }
}

fn setup(dir: &Path) -> (String, String, String, String) {
    let bin = dir.join("bin");
    std::fs::create_dir(&bin).unwrap();
    let prog = bin.join("xen-blkback");
    std::fs::write(&prog, STAND_IN).unwrap();
    std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755)).unwrap();
    let policy = dir.join("policy.toml");
    std::fs::write(&policy, POLICY).unwrap();
    let evtchn = dir.join("evtchn");
    std::fs::write(&evtchn, "").unwrap();
    let s = |p: &Path| p.display().to_string();
    (s(&policy), s(&bin), s(&dir.join("run")), s(&evtchn))
}

#[test]
fn serve_writes_the_nodes_and_restarts_a_killed_backend() {
    let t = tempfile::tempdir().unwrap();
    let (policy, bin, run, evtchn) = setup(t.path());
    let sock = t.path().join("xs.sock");
    let _xs = SocketServer::bind(&sock, Xenstored::new())
        .unwrap()
        .spawn()
        .unwrap();
    let sock_s = sock.display().to_string();
    let mut child = iddctl(&[
        "xen",
        "serve",
        "--policy",
        &policy,
        "--bin-dir",
        &bin,
        "--run-dir",
        &run,
        "--xenstore",
        &sock_s,
        "--evtchn-device",
        &evtchn,
        "--wait-domain",
        "30",
    ])
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let rx = lines(&mut child);
    // The guest's domain appears after serve started looking for it.
    std::thread::sleep(Duration::from_millis(300));
    let mut c = connect(&sock).unwrap();
    c.write(NO_TX, "/local/domain/0/name", b"Domain-0").unwrap();
    c.write(NO_TX, "/local/domain/4/name", b"domu").unwrap();

    assert_eq!(
        expect(&rx, "domain "),
        "domain domu is 4 (guest web; we are domain 0)"
    );
    assert_eq!(
        expect(&rx, "nodes "),
        "nodes web/xvda /local/domain/4/device/vbd/51712 and /local/domain/0/backend/vbd/4/51712 (written)"
    );
    let started = expect(&rx, "started web/xvda ");
    let ready = expect(&rx, "ready web/xvda ");
    assert_eq!(pid_of(&started), pid_of(&ready));
    let args = ready.split("args=").nth(1).unwrap().trim_end_matches(')');
    let img = t.path().join("disk.img");
    let want = format!(
        "--frontend 4 --devid 51712 --image {} --memory {run}/web-xvda.mem --xenstore {sock_s} --evtchn-fd ",
        img.display()
    );
    assert!(args.starts_with(&want), "{args}\n{want}");
    // The image was made at the policy's size, the journal file in the run dir.
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 1 << 20);
    assert!(Path::new(&run).join("web-xvda.mem").is_file());
    assert_eq!(
        c.read(NO_TX, "/local/domain/4/device/vbd/51712/state")
            .unwrap(),
        b"1"
    );
    assert_eq!(
        c.read(NO_TX, "/local/domain/0/backend/vbd/4/51712/state")
            .unwrap(),
        b"2"
    );

    // Kill the backend: restarted at once, the exit → ready measured.
    let first = pid_of(&ready);
    assert!(signal(first, libc::SIGKILL));
    let exited = expect(&rx, "exited web/xvda ");
    assert!(
        exited.starts_with(&format!("exited web/xvda pid={first} signal 9 after ")),
        "{exited}"
    );
    assert!(
        exited.ends_with("; restarting now (restart 1 of at most 10 in 60 s)"),
        "{exited}"
    );
    let restarted = expect(&rx, "restarted web/xvda ");
    let second = pid_of(&restarted);
    assert_ne!(first, second);
    assert!(restarted.contains(" exit-to-ready-ms="), "{restarted}");
    assert!(
        restarted.contains(" restarts=1 (ready fresh"),
        "{restarted}"
    );

    // SIGTERM: the backend is stopped, one summary line, exit 0.
    assert!(signal(i32::try_from(child.id()).unwrap(), libc::SIGTERM));
    expect(&rx, "signal 15");
    let summary = expect(&rx, "summary web/xvda ");
    assert!(
        summary.starts_with("summary web/xvda starts=2 restarts=1 exit-to-ready-ms mean="),
        "{summary}"
    );
    assert!(summary.ends_with("state=running"), "{summary}");
    assert!(child.wait().unwrap().success());
    assert!(!signal(second, 0), "the backend outlived serve");
}

fn run_err(args: &[&str]) -> (bool, String) {
    let o: Output = iddctl(args).output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn serve_refuses_what_it_cannot_serve_with_a_clear_error() {
    let t = tempfile::tempdir().unwrap();
    let (policy, bin, run, evtchn) = setup(t.path());
    let sock = t.path().join("xs.sock");
    let _xs = SocketServer::bind(&sock, Xenstored::new())
        .unwrap()
        .spawn()
        .unwrap();
    let sock_s = sock.display().to_string();
    let base = |p: &str| -> Vec<String> {
        [
            "xen",
            "serve",
            "--policy",
            p,
            "--bin-dir",
            &bin,
            "--run-dir",
            &run,
            "--xenstore",
            &sock_s,
            "--evtchn-device",
            &evtchn,
            "--wait-domain",
            "1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let call = |a: Vec<String>| run_err(&a.iter().map(String::as_str).collect::<Vec<_>>());

    // No such domain.
    let (ok, err) = call(base(&policy));
    assert!(!ok);
    assert!(err.contains("no Xen domain named domu within 1 s"), "{err}");
    // A policy error, with its position.
    let bad = t.path().join("bad.toml");
    std::fs::write(
        &bad,
        POLICY.replace("domain = \"domu\"", "domain = \"dom u\""),
    )
    .unwrap();
    let (ok, err) = call(base(&bad.display().to_string()));
    assert!(!ok);
    assert!(err.contains("bad.toml:11:"), "{err}");
    // Nothing to serve.
    let none = t.path().join("none.toml");
    std::fs::write(
        &none,
        POLICY.replace("kind = \"xen\"\ndomain = \"domu\"\n", ""),
    )
    .unwrap();
    let (ok, err) = call(base(&none.display().to_string()));
    assert!(!ok);
    assert!(err.contains("nothing to serve"), "{err}");
    // A missing backend program.
    let mut a = base(&policy);
    a[5] = t.path().display().to_string();
    let (ok, err) = call(a);
    assert!(!ok);
    assert!(err.contains("xen-blkback not found in"), "{err}");
}
