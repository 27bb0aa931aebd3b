//! A sandboxed domain process cannot open files, sockets or programs after start, and can
//! still do its allowed work. Runs the `domain-test` binary's `probe` roles.

use std::os::unix::process::ExitStatusExt;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_domain-test");

fn run(role: &str) -> (std::process::ExitStatus, String) {
    let out = Command::new(BIN)
        .arg(role)
        .output()
        .expect("spawn domain-test");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn sandboxed_child_cannot_open_files_sockets_or_exec_but_keeps_working() {
    // The file exists and is readable outside the sandbox: the denial is the sandbox's doing.
    assert!(
        std::fs::File::open("/etc/hostname").is_ok() || std::fs::File::open("/etc/passwd").is_ok()
    );
    let (status, out) = run("probe");
    assert!(status.success(), "probe failed: {status:?}\n{out}");
    let eperm = format!("DENIED {}", libc::EPERM);
    for what in ["open", "socket", "exec"] {
        let line = out
            .lines()
            .find(|l| l.starts_with(what))
            .unwrap_or_else(|| panic!("no {what} line in {out}"));
        assert_eq!(line, format!("{what} {eperm}"), "{out}");
    }
    // Heap, an eventfd made before the sandbox, and stdout still work.
    assert!(
        out.contains(&format!("WORK {} 5", (0..100_000u64).sum::<u64>())),
        "{out}"
    );
}

#[test]
fn kill_mode_kills_the_child_with_sigsys_on_the_first_denied_call() {
    let (status, out) = run("probe-kill");
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status:?}\n{out}");
    assert!(out.contains("SANDBOXED"), "{out}");
    assert!(!out.contains("open"), "the open must never return: {out}");
}

#[test]
fn sandboxed_child_may_log_to_an_inherited_file() {
    // Regression: a zero RLIMIT_FSIZE killed domains whose stdout was a regular file.
    let log = tempfile::NamedTempFile::new().unwrap();
    let status = Command::new(BIN)
        .arg("probe")
        .stdout(log.reopen().unwrap())
        .status()
        .expect("spawn domain-test");
    assert!(status.success(), "{status:?}");
    let out = std::fs::read_to_string(log.path()).unwrap();
    assert!(out.contains("WORK"), "{out}");
}
