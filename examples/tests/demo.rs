//! Runs `channel-demo` end to end with small counts and checks its exit and summary lines.

use std::process::Command;

fn demo(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_channel-demo"))
        .args(args)
        .output()
        .expect("run channel-demo");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{text}\n{}", String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn line<'a>(text: &'a str, prefix: &str) -> &'a str {
    text.lines()
        .map(str::trim_start)
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?}"))
}

#[test]
fn crash_and_reattach_keeps_every_response_verified() {
    let (ok, text) = demo(&[
        "--requests",
        "600",
        "--window",
        "8",
        "--size",
        "256",
        "--crash-after",
        "300",
        "--timeout-ms",
        "100",
        "--restart-delay-ms",
        "250",
    ]);
    assert!(ok, "channel-demo failed");
    assert_eq!(
        line(&text, "requests "),
        "requests          600 (verified 600, failed 0)"
    );
    // The frontend noticed the outage (more than one only if this machine stalled the
    // backend for longer than the timeout), reissued what was in flight, and the re-attached
    // backend's replays came back as discarded duplicates.
    let outage = line(&text, "reissue timeouts ");
    assert!(!outage.contains("(0 time(s))"), "{outage}");
    assert!(!outage.contains("reissued 0,"), "{outage}");
    // The guest waited at least the restart back-off for a response.
    let gap: u64 = line(&text, "guest-visible gap ")
        .split_whitespace()
        .nth(2)
        .and_then(|v| v.parse().ok())
        .expect("gap in microseconds");
    assert!(gap >= 250_000, "gap {gap} us shorter than the 250 ms back-off");
    let crash = line(&text, "backend crash ");
    assert!(crash.contains("pidfd reported it"), "{crash}");
    assert!(text.contains("pidfd: backend process Signaled(9)"));
    assert!(text.contains("restarted; XenStore says Connected: re-attaching to the ring"));
    assert!(
        text.contains("private data: EACCES"),
        "the backend read the frontend's private node"
    );
    assert!(text.contains("== OK: every response verified"));
    // The state timeline saw both ends connect and close.
    for who in ["frontend", "backend"] {
        for state in ["Initialising", "Connected", "Closed"] {
            assert!(
                text.lines()
                    .any(|l| l.contains(&format!("{who:<9} {state}"))),
                "timeline lacks {who} {state}"
            );
        }
    }
}

#[test]
fn without_a_crash_there_is_no_outage() {
    let (ok, text) = demo(&["--requests", "300", "--no-crash", "--window", "4"]);
    assert!(ok);
    assert_eq!(
        line(&text, "requests "),
        "requests          300 (verified 300, failed 0)"
    );
    assert_eq!(
        line(&text, "backend crash "),
        "backend crash     none (--no-crash)"
    );
}

#[test]
fn bad_arguments_are_refused() {
    let (ok, _) = demo(&["--window", "0"]);
    assert!(!ok);
    let (ok, _) = demo(&["--bogus"]);
    assert!(!ok);
}
