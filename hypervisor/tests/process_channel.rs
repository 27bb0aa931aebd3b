//! Two sandboxed process domains run a device channel (a grant-referenced ring plus an event
//! channel) through the hypervisor; hostile and crashing domains are contained and reported.

use hypervisor::domain::DomainConfig;
use hypervisor::launch::{launch, spawn_in, ExitReport, LaunchConfig, RunningDomain};
use hypervisor::system::System;
use std::io::{BufRead, BufReader};
use std::process::ChildStdout;
use std::sync::Arc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_domain-test");
const FRAMES: u64 = 128;
const EXIT_WAIT: Option<Duration> = Some(Duration::from_secs(600));

/// Read lines of a domain's stdout until one starts with `prefix`; its remaining words.
fn expect_line(out: &mut BufReader<ChildStdout>, prefix: &str) -> Vec<String> {
    let mut line = String::new();
    loop {
        line.clear();
        let n = out.read_line(&mut line).expect("read domain stdout");
        assert!(n > 0, "domain closed stdout before printing {prefix}");
        if let Some(rest) = line.trim_end().strip_prefix(prefix) {
            return rest.split_whitespace().map(str::to_owned).collect();
        }
    }
}

fn stdout_of(d: &mut RunningDomain) -> BufReader<ChildStdout> {
    BufReader::new(d.child_mut().stdout.take().expect("piped stdout"))
}

fn new_domain(sys: &Arc<System>, name: &str) -> u16 {
    sys.create_domain(DomainConfig {
        name: name.into(),
        nr_frames: FRAMES,
        iommu: None,
    })
    .expect("create domain")
}

/// Run a front and a back exchanging `n` requests with up to `inflight` outstanding;
/// `notify` is `posted` or `sync` (how the domains send their events).
fn exchange(n: u64, inflight: u32, max_len: u32, notify: &str) -> Vec<String> {
    let sys = System::new();
    let back_dom = new_domain(&sys, "back");
    let front_args = [
        "front".to_owned(),
        back_dom.to_string(),
        n.to_string(),
        inflight.to_string(),
        max_len.to_string(),
        notify.to_owned(),
    ];
    let front_args: Vec<&str> = front_args.iter().map(String::as_str).collect();
    let mut front =
        launch(&sys, LaunchConfig::new("front", FRAMES, BIN, &front_args)).expect("launch front");
    let mut front_out = stdout_of(&mut front);
    let ready = expect_line(&mut front_out, "READY ");
    let back_args = [
        "back".to_owned(),
        front.domid().to_string(),
        ready[0].clone(),
        ready[1].clone(),
        n.to_string(),
        notify.to_owned(),
    ];
    let back_args: Vec<&str> = back_args.iter().map(String::as_str).collect();
    let mut back = spawn_in(
        &sys,
        back_dom,
        LaunchConfig::new("back", FRAMES, BIN, &back_args),
    )
    .expect("launch back");
    let mut back_out = stdout_of(&mut back);
    let done = expect_line(&mut front_out, "DONE ");
    assert_eq!(expect_line(&mut back_out, "DONE "), vec![n.to_string()]);
    assert_eq!(
        front.wait_exit(EXIT_WAIT).unwrap(),
        Some(ExitReport::Exited(0))
    );
    assert_eq!(
        back.wait_exit(EXIT_WAIT).unwrap(),
        Some(ExitReport::Exited(0))
    );
    assert_eq!(done[0], n.to_string());
    done
}

#[test]
fn two_process_domains_exchange_a_million_verified_requests() {
    // Every response carries the checksum of the payload the back grant-copied out of the
    // front's page; the front checks each one and fails on the first mismatch.
    exchange(1_000_000, 32, 256, "posted");
}

#[test]
fn full_page_payloads_single_request_ping_pong_and_synchronous_notify() {
    exchange(2_000, 8, 4096, "posted");
    exchange(500, 1, 64, "posted");
    exchange(2_000, 4, 1500, "sync");
}

#[test]
fn a_domain_cannot_use_another_domains_grant_or_port() {
    let sys = System::new();
    let back_dom = new_domain(&sys, "back");
    let mut front = launch(
        &sys,
        LaunchConfig::new(
            "front",
            FRAMES,
            BIN,
            &["front", &back_dom.to_string(), "1", "1", "64"],
        ),
    )
    .expect("launch front");
    let mut front_out = stdout_of(&mut front);
    let ready = expect_line(&mut front_out, "READY ");
    // The ring grant and the unbound port are the back's, not the thief's.
    let args = ["thief", &front.domid().to_string(), &ready[0], &ready[1]];
    let mut thief =
        launch(&sys, LaunchConfig::new("thief", FRAMES, BIN, &args)).expect("launch thief");
    let mut thief_out = stdout_of(&mut thief);
    let mut line = String::new();
    thief_out.read_line(&mut line).unwrap();
    assert_eq!(line.trim_end(), "REFUSED");
    assert_eq!(
        thief.wait_exit(EXIT_WAIT).unwrap(),
        Some(ExitReport::Exited(0))
    );
    front.kill().unwrap();
}

#[test]
fn a_crashing_domain_is_reported_through_its_pidfd_with_its_signal() {
    let sys = System::new();
    let mut d = launch(&sys, LaunchConfig::new("crash", FRAMES, BIN, &["crash"])).expect("launch");
    let report = d.wait_exit(EXIT_WAIT).unwrap();
    assert_eq!(report, Some(ExitReport::Signaled(libc::SIGABRT)));
    // The hypervisor goes on: the domain can be destroyed and others created.
    sys.destroy_domain(d.domid()).unwrap();
    new_domain(&sys, "after");
}

#[test]
fn a_domain_killed_by_the_manager_is_reported_with_sigkill() {
    let sys = System::new();
    let other = new_domain(&sys, "peer");
    let mut d = launch(
        &sys,
        LaunchConfig::new("grant", FRAMES, BIN, &["grant", &other.to_string()]),
    )
    .expect("launch");
    let mut out = stdout_of(&mut d);
    expect_line(&mut out, "READY ");
    assert_eq!(
        d.wait_exit(Some(Duration::from_millis(50))).unwrap(),
        None,
        "still running"
    );
    assert_eq!(d.kill().unwrap(), ExitReport::Signaled(libc::SIGKILL));
}

#[test]
fn a_restarted_process_reattaches_to_its_domain() {
    // The domain outlives its process: a second process of the same domain picks up the
    // hypercall page where the first left it (its sequence numbers) and works.
    let sys = System::new();
    let victim = new_domain(&sys, "victim");
    let dom = new_domain(&sys, "restarted");
    for round in 0..3 {
        let args = ["thief", &victim.to_string(), "8", "1"];
        let mut d = spawn_in(
            &sys,
            dom,
            LaunchConfig::new("restarted", FRAMES, BIN, &args),
        )
        .expect("spawn");
        assert_eq!(
            expect_line(&mut stdout_of(&mut d), ""),
            vec!["REFUSED".to_owned()],
            "round {round}"
        );
        assert_eq!(d.wait_exit(EXIT_WAIT).unwrap(), Some(ExitReport::Exited(0)));
    }
}
