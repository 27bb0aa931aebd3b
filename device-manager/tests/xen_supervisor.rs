//! The Xen backend supervisor with stand-in backends: real processes (small `bash` scripts),
//! real descriptors, real signals; no Xen needed.
//!
//! * every process of a backend inherits the *same open file* as `--evtchn-fd` (the shared
//!   file offset proves it: each process reads the offset the previous ones left, then
//!   advances it), and only that one;
//! * the memory file is emptied when the backend is added and kept across its restarts;
//! * a killed backend is restarted at once and its exit → `ready` is measured;
//! * a backend that keeps failing before `ready` is restarted with a growing backoff until
//!   the budget is spent (`gave-up`), one that exits 0 is not restarted;
//! * stopping kills the running processes and prints a summary per backend.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

use device_manager::xen::supervisor::{BackendSpec, Budget, Event, Phase, Summary, Supervisor};

fn budget(max: u32) -> Budget {
    Budget {
        max_restarts: max,
        window: Duration::from_secs(60),
        backoff: Duration::from_millis(5),
        backoff_max: Duration::from_millis(40),
    }
}

/// A backend running `script` under `bash -c` (its `$@` is `--evtchn-fd N`). bash, not sh:
/// dash refuses `>&N` for N >= 10 ("Bad fd number", exit 2), and the inherited descriptor's
/// number depends on what the test process (its other tests) has open.
fn spec(name: &str, script: &str, evtchn: &Path, memory: Option<PathBuf>, max: u32) -> BackendSpec {
    BackendSpec {
        name: name.into(),
        program: "/bin/bash".into(),
        args: vec!["-c".into(), script.into(), "sh".into()],
        evtchn: evtchn.into(),
        memory,
        budget: budget(max),
    }
}

/// Run `sup` in a thread; events arrive on the receiver, the summaries at the join.
fn run(sup: Supervisor) -> (Receiver<Event>, std::thread::JoinHandle<Vec<Summary>>) {
    let (tx, rx) = channel();
    let h = std::thread::spawn(move || {
        sup.run(move |e| {
            eprintln!("{e}");
            let _ = tx.send(e.clone());
        })
    });
    (rx, h)
}

fn next(rx: &Receiver<Event>) -> Event {
    rx.recv_timeout(Duration::from_secs(30))
        .expect("an event within 30 s")
}

fn kill9(pid: u32) {
    let pid = i32::try_from(pid).unwrap();
    // SAFETY: kill(2) on a pid the supervisor has not reaped yet (it waits for our signal).
    let r = unsafe { libc::kill(pid, libc::SIGKILL) };
    assert_eq!(r, 0);
}

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks existence.
    unsafe { libc::kill(i32::try_from(pid).unwrap(), 0) == 0 }
}

/// Prints the inherited fd's file offset, then advances it by 2 bytes and appends a line to
/// the memory file; also counts the descriptors above 2 it inherited.
const SHARED: &str = r#"
fd=$2
pos=$(sed -n 's/^pos:[[:space:]]*//p' /proc/self/fdinfo/$fd)
n=$(ls /proc/self/fd | awk '$1 > 2' | wc -l)
printf 'x\n' >&$fd
echo run >> "$MEM"
echo "ready pos=$pos fd=$fd"
exec sleep 600
"#;

#[test]
fn restarts_share_one_open_file_and_the_memory_file() {
    let t = tempfile::tempdir().unwrap();
    let evtchn = t.path().join("evtchn");
    std::fs::write(&evtchn, "").unwrap();
    let mem = t.path().join("b.mem");
    std::fs::write(&mem, "stale journal\n").unwrap();
    let mut sup = Supervisor::new(Some(t.path().to_owned()));
    let script = SHARED.replace("$MEM", &mem.display().to_string());
    sup.add(spec("g/xvda", &script, &evtchn, Some(mem.clone()), 10))
        .unwrap();
    // A second backend with its own file: its offsets are its own.
    let other = t.path().join("evtchn2");
    std::fs::write(&other, "").unwrap();
    sup.add(spec(
        "g/xvdb",
        &SHARED.replace("$MEM", "/dev/null"),
        &other,
        None,
        10,
    ))
    .unwrap();
    let stop = sup.stop_handle();
    let (rx, h) = run(sup);

    let mut positions = Vec::new();
    let mut pids = Vec::new();
    let mut restarts_seen = 0;
    while positions.len() < 4 {
        match next(&rx) {
            Event::Ready {
                name, pid, line, ..
            }
            | Event::Restarted {
                name, pid, line, ..
            } if name == "g/xvda" => {
                let pos: u64 = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("pos="))
                    .and_then(|p| p.parse().ok())
                    .unwrap_or_else(|| panic!("no pos in {line:?}"));
                positions.push(pos);
                pids.push(pid);
                kill9(pid);
            }
            Event::Exited {
                name,
                status,
                restart_in,
                ..
            } if name == "g/xvda" => {
                assert_eq!(status, "signal 9");
                // It had been ready: restarted at once.
                assert_eq!(restart_in, Some(Duration::ZERO));
                restarts_seen += 1;
            }
            _ => {}
        }
    }
    // Each process found the offset its predecessors left: one open file description.
    assert_eq!(positions, [0, 2, 4, 6]);
    assert_eq!(restarts_seen, 3);
    assert!(pids.windows(2).all(|w| w[0] != w[1]));
    stop.stop();
    let sums = h.join().unwrap();
    let a = sums.iter().find(|s| s.name == "g/xvda").unwrap();
    assert_eq!((a.starts, a.restarts, a.exit_to_ready.len()), (4, 3, 3));
    let b = sums.iter().find(|s| s.name == "g/xvdb").unwrap();
    assert_eq!((b.starts, b.restarts, b.phase), (1, 0, Phase::Running));
    // The other backend's file was only advanced by its one process.
    assert_eq!(std::fs::read(&other).unwrap(), b"x\n");
    assert_eq!(std::fs::read(&evtchn).unwrap(), b"x\nx\nx\nx\n");
    // The memory file was emptied once (the stale journal is gone) and kept across restarts.
    assert_eq!(std::fs::read_to_string(&mem).unwrap(), "run\n".repeat(4));
    // The stopped processes are gone.
    std::thread::sleep(Duration::from_millis(50));
    assert!(!alive(*pids.last().unwrap()));
}

#[test]
fn only_the_evtchn_fd_is_inherited() {
    let t = tempfile::tempdir().unwrap();
    let evtchn = t.path().join("evtchn");
    std::fs::write(&evtchn, "").unwrap();
    let script = r#"echo "ready fds=$(ls /proc/self/fd | awk '$1 > 2' | tr '\n' ' ')arg=$2"; exec sleep 600"#;
    let mut sup = Supervisor::new(None);
    for i in 0..3 {
        sup.add(spec(&format!("g/b{i}"), script, &evtchn, None, 1))
            .unwrap();
    }
    let stop = sup.stop_handle();
    let (rx, h) = run(sup);
    let mut seen = 0;
    while seen < 3 {
        if let Event::Ready { line, .. } = next(&rx) {
            // `ls` itself opens one descriptor (its directory): the listing is the
            // evtchn fd and that one, and the fd is the one named on the command line
            // (even though this test binary inherits descriptors from cargo).
            let mut fds: Vec<&str> = line["ready fds=".len()..].split_whitespace().collect();
            let arg = fds.pop().unwrap().strip_prefix("arg=").unwrap();
            assert!(fds.contains(&arg), "{line}");
            assert_eq!(fds.len(), 2, "other descriptors inherited: {line}");
            seen += 1;
        }
    }
    stop.stop();
    h.join().unwrap();
}

#[test]
fn a_backend_failing_before_ready_backs_off_until_the_budget_is_spent() {
    let t = tempfile::tempdir().unwrap();
    let evtchn = t.path().join("evtchn");
    std::fs::write(&evtchn, "").unwrap();
    let mut sup = Supervisor::new(Some(t.path().to_owned()));
    sup.add(spec(
        "g/bad",
        "echo cannot map the ring >&2; exit 3",
        &evtchn,
        None,
        3,
    ))
    .unwrap();
    sup.add(spec("g/done", "echo ready; exit 0", &evtchn, None, 3))
        .unwrap();
    let (rx, h) = run(sup);
    // Ends by itself: one backend gave up, the other finished.
    let sums = h.join().unwrap();
    let events: Vec<Event> = rx.try_iter().collect();
    let delays: Vec<Duration> = events
        .iter()
        .filter_map(|e| match e {
            Event::Exited {
                name,
                restart_in: Some(d),
                status,
                ..
            } if name == "g/bad" => {
                assert_eq!(status, "exit 3");
                Some(*d)
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        delays,
        [5, 10, 20].map(Duration::from_millis),
        "{events:#?}"
    );
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::GaveUp { name, restarts: 3, .. } if name == "g/bad")));
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::Finished { name, .. } if name == "g/done")));
    let bad = sums.iter().find(|s| s.name == "g/bad").unwrap();
    assert_eq!((bad.starts, bad.restarts, bad.phase), (4, 3, Phase::Failed));
    let done = sums.iter().find(|s| s.name == "g/done").unwrap();
    assert_eq!((done.starts, done.phase), (1, Phase::Finished));
    // Its stderr went to its log, across the restarts.
    let log = std::fs::read_to_string(t.path().join("g-bad.err")).unwrap();
    assert_eq!(log.lines().count(), 4, "{log}");
    let lines: Vec<String> = events.iter().map(ToString::to_string).collect();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("gave-up g/bad after 3 restarts within 60 s")),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("summary g/bad starts=4 restarts=3 ")
                && l.ends_with("state=failed")),
        "{lines:?}"
    );
}

#[test]
fn a_missing_program_or_device_is_a_clear_error() {
    let t = tempfile::tempdir().unwrap();
    let mut sup = Supervisor::new(None);
    let e = sup
        .add(spec("g/x", "true", &t.path().join("no-evtchn"), None, 1))
        .unwrap_err();
    assert!(
        e.to_string().contains("opening the event-channel device"),
        "{e}"
    );
    let evtchn = t.path().join("evtchn");
    std::fs::write(&evtchn, "").unwrap();
    let mut s = spec("g/y", "true", &evtchn, None, 1);
    s.program = t.path().join("no-such-backend");
    sup.add(s).unwrap();
    let (rx, h) = run(sup);
    let sums = h.join().unwrap();
    assert_eq!(sums[0].phase, Phase::Failed);
    let e: Vec<String> = rx.try_iter().map(|e| e.to_string()).collect();
    assert!(
        e.iter()
            .any(|l| l.starts_with("start-failed g/y: g/y: starting ")),
        "{e:?}"
    );
}
