//! The `xen-netback` program's command line and its failures without Xen: it must refuse bad
//! arguments and missing devices with one clear line on stderr and a failure status, never a
//! panic (a supervisor restarts it on exit and logs that line).

use std::process::Command;

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_xen-netback"))
        .args(args)
        .output()
        .expect("spawn xen-netback");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_names_every_flag_a_supervisor_passes() {
    let out = Command::new(env!("CARGO_BIN_EXE_xen-netback"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--frontend",
        "--handle",
        "--mac",
        "--tap",
        "--memory",
        "--evtchn-fd",
        "--xenstore",
        "--create",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help:\n{help}");
    }
}

#[test]
fn bad_arguments_are_refused_before_anything_is_opened() {
    let dir = tempfile::tempdir().unwrap();
    let mem = dir.path().join("vif.mem");
    let mem = mem.to_str().unwrap();
    let cases: [(&[&str], &str); 3] = [
        // A MAC that is not six hex pairs.
        (
            &[
                "--frontend",
                "1",
                "--mac",
                "00:16:3e:00:00",
                "--tap",
                "xnb9",
            ],
            "--mac",
        ),
        // A domain id out of range.
        (
            &[
                "--frontend",
                "70000",
                "--mac",
                "00:16:3e:00:00:02",
                "--tap",
                "xnb9",
            ],
            "--frontend",
        ),
        // A missing required flag.
        (&["--frontend", "1", "--mac", "00:16:3e:00:00:02"], "--tap"),
    ];
    for (args, flag) in cases {
        let (ok, err) = run(&[args, &["--memory", mem]].concat());
        assert!(!ok);
        assert!(err.contains(flag), "{err}");
    }
}

#[test]
fn no_xenstore_is_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let mem = dir.path().join("vif.mem");
    let xs = dir.path().join("no-xenstored");
    let (ok, err) = run(&[
        "--frontend",
        "1",
        "--mac",
        "00:16:3e:00:00:02",
        "--tap",
        "xnb9",
        "--memory",
        mem.to_str().unwrap(),
        "--xenstore",
        xs.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        err.lines()
            .any(|l| l.starts_with("xen-netback: XenStore ") && l.contains("no-xenstored")),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    // Nothing was created: the memory file comes after XenStore.
    assert!(!mem.exists());
}

#[test]
fn a_standard_stream_as_the_event_channel_file_is_refused() {
    let (ok, err) = run(&[
        "--frontend",
        "1",
        "--mac",
        "00:16:3e:00:00:02",
        "--tap",
        "xnb9",
        "--memory",
        "/tmp/xnb9.mem",
        "--evtchn-fd",
        "1",
    ]);
    assert!(!ok);
    assert!(err.contains("standard stream"), "{err}");
}
