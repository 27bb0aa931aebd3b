//! Live reload, driven only through the management API: the service runs the real sandboxed
//! IDDs and process guests from a TOML policy, and the test applies new policies with
//! `POST /v1/policy/apply` and watches `/v1/channels`, `/v1/idds`, `/v1/guests` and the event
//! stream like any client.
//!
//! * Two guests flood one NIC at shares 1:1; one share is changed to get 1:3: the split
//!   measured from the channel counters follows (within 10 %), the IDD process, the guests
//!   and the other guest's channel are untouched (no recovery, its counters continue); a
//!   third guest is added live (its channel attached to the running IDD); after a crash of
//!   the IDD the restarted process keeps the new share and the added guest; an allowed-IP
//!   change takes effect live.
//! * Unsafe changes (a MAC change, a region shrunk or moved) are answered 409 with the
//!   reason, removing a running guest 501, and nothing changes.
//! * A disk region grown in place is applied live (the IDD took it, the channel shows it),
//!   the guests' verified workloads keep running, a third guest is added live on the same
//!   disk, and a crashed disk IDD comes back with both.
//!   That requests beyond the old end are then served is shown by `idd-blk`'s program test
//!   (`idd-blk/tests/control.rs`): our blkfront reads the capacity only at connect.

mod common;

use std::net::UdpSocket;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use device_manager::api::client::{Client, ClientError};
use device_manager::manager::ManagerConfig;
use device_manager::service::{Service, ServiceConfig};
use policy::Policy;
use serde_json::{json, Value};

/// One system at a time: the share measurement wants the machine to itself.
static SERIAL: Mutex<()> = Mutex::new(());

const ALICE_MAC: &str = "02:00:00:00:00:0a";
const BOB_MAC: &str = "02:00:00:00:00:0b";

struct Running {
    svc: Service,
    url: String,
    /// Runs the API server.
    _rt: tokio::runtime::Runtime,
    c: Client,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.svc.shutdown();
    }
}

fn serve(text: &str, cfg: ServiceConfig) -> Running {
    let policy = Policy::parse(text, "reload.toml").unwrap_or_else(|e| panic!("{}", e.render()));
    let svc = Service::start(policy, "reload.toml", text.to_owned(), cfg);
    let (rt, server) = common::serve_api(&svc);
    let url = server.url();
    let c = Client::new(&url, None, None).unwrap();
    std::mem::forget(server); // lives as long as the runtime
    let r = Running {
        svc,
        url,
        _rt: rt,
        c,
    };
    // Up: every IDD running.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let idds: Value = r.c.get("/v1/idds").unwrap();
        let states: Vec<&str> = idds
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["state"].as_str().unwrap())
            .collect();
        assert!(!states.contains(&"failed"), "{idds}");
        if states
            .iter()
            .all(|s| *s == "running" || *s == "not_started")
        {
            break;
        }
        assert!(Instant::now() < deadline, "not up: {idds}");
        std::thread::sleep(Duration::from_millis(100));
    }
    r
}

fn manager_config() -> ManagerConfig {
    ManagerConfig {
        idd_program: common::idd_program(),
        guest_program: env!("CARGO_BIN_EXE_blk-guest").into(),
        net_idd_program: common::program("idd-net", "idd-net"),
        heartbeat: None,
        verbose: std::env::var_os("DM_DEBUG").is_some(),
    }
}

fn apply(c: &Client, text: &str) -> Result<Value, ClientError> {
    c.post(
        "/v1/policy/apply",
        &json!({ "text": text, "name": "reload.toml" }),
    )
}

/// The API error's status and message.
fn refused(r: Result<Value, ClientError>) -> (u16, String) {
    match r {
        Err(ClientError::Api {
            status, message, ..
        }) => (status, message),
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// Channel of `guest` on `device`.
fn channel(c: &Client, device: &str, guest: &str) -> Value {
    let chans: Value = c.get("/v1/channels").unwrap();
    chans
        .as_array()
        .unwrap()
        .iter()
        .find(|ch| ch["device"] == device && ch["guest"] == guest)
        .unwrap_or_else(|| panic!("no channel of {guest} on {device}: {chans}"))
        .clone()
}

fn num(v: &Value, k: &str) -> u64 {
    v["stats"][k]
        .as_u64()
        .unwrap_or_else(|| panic!("no {k} in {v}"))
}

fn idd(c: &Client, name: &str) -> Value {
    c.get(&format!("/v1/idds/{name}")).unwrap()
}

/// Bytes per second each of alice and bob sent during `secs` (from the IDD's heartbeat
/// counters). A window in which the counters went back (the IDD was restarted by
/// supervision, e.g. a heartbeat missed on a loaded machine) is measured again.
fn split(c: &Client, secs: f64) -> (f64, f64) {
    let tx = || {
        (
            num(&channel(c, "net0", "alice"), "tx_bytes"),
            num(&channel(c, "net0", "bob"), "tx_bytes"),
        )
    };
    for _ in 0..3 {
        let a = tx();
        std::thread::sleep(Duration::from_secs_f64(secs));
        let b = tx();
        if b.0 >= a.0 && b.1 >= a.1 {
            return ((b.0 - a.0) as f64 / secs, (b.1 - a.1) as f64 / secs);
        }
        eprintln!("counters went back ({a:?} -> {b:?}): the IDD restarted; measuring again");
    }
    panic!("the IDD kept restarting");
}

/// bob's send rate over alice's, measured over `secs` (see [`split`]); both rates are
/// logged, `when` and the `configured` ratio with them.
fn bob_to_alice(c: &Client, secs: f64, when: &str, configured: f64) -> f64 {
    let (a, b) = split(c, secs);
    let ratio = b / a;
    eprintln!(
        "{when}: alice {a:.0} B/s, bob {b:.0} B/s, ratio {ratio:.2} (configured {configured:.2})"
    );
    ratio
}

/// `text` with a third guest, carol, on net0.
fn with_carol(text: &str) -> String {
    format!(
        "{text}\n[[guest]]\nname = \"carol\"\n[[guest.net]]\ndevice = \"net0\"\nmac = \"02:00:00:00:00:0c\"\nips = [\"10.0.0.3\"]\nshare = \"20KiB every 100ms\"\n"
    )
}

fn net_policy(wire_peer: &str, bob_share: &str, bob_mac: &str) -> String {
    net_policy_ips(wire_peer, bob_share, bob_mac, "10.0.0.1")
}

fn net_policy_ips(wire_peer: &str, bob_share: &str, bob_mac: &str, alice_ip: &str) -> String {
    format!(
        r#"
[restart]
max_restarts = 100
window = "600s"
heartbeat = "2s"

[[device]]
name = "net0"
kind = "virtio-net"
wire = "udp"
bind = "127.0.0.1:0"
peer = "{wire_peer}"
link = "1Gbit/s"

[[guest]]
name = "alice"
[[guest.net]]
device = "net0"
mac = "{ALICE_MAC}"
ips = ["{alice_ip}"]
share = "20KiB every 100ms"

[[guest]]
name = "bob"
[[guest.net]]
device = "net0"
mac = "{bob_mac}"
ips = ["10.0.0.2"]
share = "{bob_share}"
"#
    )
}

#[test]
fn a_share_changes_live_and_survives_a_crash() {
    let _one = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // The wire's far side: frames go somewhere (nobody reads them).
    let far = UdpSocket::bind("127.0.0.1:0").unwrap();
    let peer = far.local_addr().unwrap().to_string();
    let mut cfg = ServiceConfig::new(manager_config());
    cfg.net_guest_program = Some(common::program("guest-frontends", "net-guest"));
    cfg.net_guest_args = [
        "flood",
        "--ip",
        "{ip}",
        "--dst-mac",
        "02:00:00:00:00:fe",
        "--dst-ip",
        "10.0.0.254",
        "--size",
        "1000",
        "--secs",
        "600",
    ]
    .map(str::to_owned)
    .to_vec();
    let one_to_one = net_policy(&peer, "20KiB every 100ms", BOB_MAC);
    let r = serve(&one_to_one, cfg);
    let c = &r.c;

    // Ramp up, then 1:1.
    let deadline = Instant::now() + Duration::from_secs(30);
    while num(&channel(c, "net0", "alice"), "tx_bytes") == 0
        || num(&channel(c, "net0", "bob"), "tx_bytes") == 0
    {
        assert!(Instant::now() < deadline, "the guests do not send");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    let ratio = bob_to_alice(c, 3.0, "before", 1.0);
    assert!((ratio - 1.0).abs() <= 0.1, "bob/alice = {ratio:.2}, want 1");

    let pid = idd(c, "idd-net0")["pid"].clone();
    let alice_before = channel(c, "net0", "alice");
    let mut events = c.events_since(None).unwrap();

    // Unsafe: bob's MAC. Refused with the reason, nothing applied.
    let mac_changed = net_policy(&peer, "60KiB every 100ms", "02:00:00:00:00:0c");
    let (status, why) = refused(apply(c, &mac_changed));
    eprintln!("MAC change: {status} {why}");
    assert_eq!(status, 409);
    assert!(why.contains("MAC") && why.contains("bob"), "{why}");
    let p: Value = c.get("/v1/policy").unwrap();
    assert!(p["text"]
        .as_str()
        .unwrap()
        .contains(r#"share = "20KiB every 100ms""#));

    // 1:3: bob's share tripled, live.
    let one_to_three = net_policy(&peer, "60KiB every 100ms", BOB_MAC);
    let out = apply(c, &one_to_three).unwrap();
    eprintln!("applied: {}", out["applied"]);
    let applied = out["applied"].as_array().unwrap();
    assert_eq!(applied.len(), 1, "{out}");
    assert_eq!(applied[0]["change"], "share-changed");
    assert_eq!(applied[0]["guest"], "bob");
    assert_eq!(applied[0]["how"], "live", "{out}");
    // The event stream says so.
    loop {
        let m = events.next().expect("stream ended").unwrap();
        if m.event == "policy_applied" {
            let v: Value = serde_json::from_str(&m.data).unwrap();
            assert_eq!(v["applied"][0]["how"], "live", "{v}");
            break;
        }
        assert_ne!(
            m.event, "recovery",
            "a recovery during a reload: {}",
            m.data
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    let ratio = bob_to_alice(c, 4.0, "after apply", 3.0);
    assert!(
        (ratio - 3.0).abs() <= 0.3,
        "bob/alice = {ratio:.2}, want 3 within 10 %"
    );
    // Nothing restarted: same IDD process, no recovery, guests running, alice's channel
    // counting on from where it was.
    let i = idd(c, "idd-net0");
    assert_eq!(i["pid"], pid, "{i}");
    assert_eq!(i["restarts"], 0, "{i}");
    let guests: Value = c.get("/v1/guests").unwrap();
    for g in guests.as_array().unwrap() {
        assert_eq!(g["running"], true, "{g}");
    }
    let alice_after = channel(c, "net0", "alice");
    assert_eq!(alice_after["index"], alice_before["index"]);
    assert!(num(&alice_after, "tx_packets") > num(&alice_before, "tx_packets"));
    let want = policy::units::parse_share("60KiB every 100ms")
        .unwrap()
        .to_string();
    assert_eq!(channel(c, "net0", "bob")["stats"]["credit"], want.as_str());

    // A third guest added live: its domain, its process, its channel attached to the running
    // IDD; nobody else disturbed.
    let out = apply(c, &with_carol(&one_to_three)).unwrap();
    eprintln!("guest added: {}", out["applied"]);
    assert_eq!(out["applied"][0]["change"], "guest-added", "{out}");
    assert_eq!(out["applied"][0]["how"], "live", "{out}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while num(&channel(c, "net0", "carol"), "tx_bytes") == 0 {
        assert!(Instant::now() < deadline, "carol does not send");
        std::thread::sleep(Duration::from_millis(100));
    }
    let i = idd(c, "idd-net0");
    assert_eq!(
        (i["pid"].clone(), i["restarts"].clone()),
        (pid.clone(), json!(0)),
        "{i}"
    );
    let carol = |c: &Client| num(&channel(c, "net0", "carol"), "tx_bytes");
    let ratio = bob_to_alice(c, 3.0, "with carol", 3.0);
    assert!(
        (ratio - 3.0).abs() <= 0.3,
        "bob/alice = {ratio:.2} with carol"
    );

    // A crash of the IDD after the apply: the restarted process has the new share.
    let _: Value = c
        .post("/v1/idds/idd-net0/faults", &json!({ "fault": "crash" }))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let i = idd(c, "idd-net0");
        if i["restarts"] == 1 && i["state"] == "running" {
            assert_ne!(i["pid"], pid);
            break;
        }
        assert!(Instant::now() < deadline, "no recovery: {i}");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(1000));
    let ratio = bob_to_alice(c, 4.0, "after a crash", 3.0);
    assert!(
        (ratio - 3.0).abs() <= 0.3,
        "bob/alice = {ratio:.2} after the crash, want 3"
    );
    // carol's channel was in the restarted IDD's arguments.
    let before = carol(c);
    std::thread::sleep(Duration::from_millis(500));
    assert!(carol(c) > before, "carol not served after the crash");

    // Alice's allowed IPs no longer include the address she floods from: live, her packets
    // are dropped as spoofed from then on, bob goes on.
    let moved = with_carol(&net_policy_ips(
        &peer,
        "60KiB every 100ms",
        BOB_MAC,
        "10.0.0.99",
    ));
    let out = apply(c, &moved).unwrap();
    assert_eq!(out["applied"][0]["change"], "ips-changed", "{out}");
    assert_eq!(out["applied"][0]["how"], "live", "{out}");
    std::thread::sleep(Duration::from_millis(300));
    let spoofed = num(&channel(c, "net0", "alice"), "spoofed");
    let (a, b) = split(c, 2.0);
    eprintln!("after the IP change: alice {a:.0} B/s, bob {b:.0} B/s");
    assert_eq!(a, 0.0, "alice still sends from a disallowed address");
    assert!(b > 0.0);
    assert!(num(&channel(c, "net0", "alice"), "spoofed") > spoofed);
}

fn disk_policy(dir: &Path, alice: &str, with_bob: bool) -> String {
    let bob = if with_bob {
        "[[guest]]\nname = \"bob\"\n[[guest.disk]]\ndevice = \"disk0\"\noffset = \"8MiB\"\nlength = \"4MiB\"\n"
    } else {
        ""
    };
    format!(
        r#"
[restart]
max_restarts = 100
window = "600s"
heartbeat = "2s"

[[device]]
name = "disk0"
kind = "virtio-blk"
image = "{img}"
size = "16MiB"

[[guest]]
name = "alice"
[[guest.disk]]
device = "disk0"
{alice}

{bob}"#,
        img = dir.join("disk0.img").display(),
    )
}

#[test]
fn a_region_grows_live_and_unsafe_changes_are_refused() {
    let _one = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ServiceConfig::new(manager_config());
    cfg.guest_args = [
        "workload", "--secs", "300", "--blocks", "32", "--seed", "{seed}",
    ]
    .map(str::to_owned)
    .to_vec();
    let start = disk_policy(dir.path(), "length = \"4MiB\"", true);
    let r = serve(&start, cfg);
    let c = &r.c;
    let pid = idd(c, "idd-disk0")["pid"].clone();
    let bob_before = num(&channel(c, "disk0", "bob"), "responses");

    // Shrunk or moved while running: 409 with the reason.
    for (alice, what) in [
        ("length = \"2MiB\"", "shrunk"),
        ("offset = \"1MiB\"\nlength = \"4MiB\"", "moved"),
    ] {
        let (status, why) = refused(apply(c, &disk_policy(dir.path(), alice, true)));
        eprintln!("region {what}: {status} {why}");
        assert_eq!(status, 409);
        assert!(why.contains(what) && why.contains("alice"), "{why}");
    }
    // Removing running bob: not live, 501, nothing applied.
    let (status, why) = refused(apply(
        c,
        &disk_policy(dir.path(), "length = \"8MiB\"", false),
    ));
    eprintln!("unplug: {status} {why}");
    assert_eq!(status, 501);
    assert!(why.contains("bob"), "{why}");
    assert_eq!(num(&channel(c, "disk0", "alice"), "sectors"), 8192);

    // Grown in place, through the CLI: live.
    let grown = disk_policy(dir.path(), "length = \"8MiB\"", true);
    let file = dir.path().join("grown.toml");
    std::fs::write(&file, &grown).unwrap();
    let cli = std::process::Command::new(env!("CARGO_BIN_EXE_iddctl"))
        .args(["--remote", &r.url, "--json", "policy", "apply"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        cli.status.success(),
        "iddctl policy apply: {}",
        String::from_utf8_lossy(&cli.stderr)
    );
    let out: Value = serde_json::from_slice(&cli.stdout).unwrap();
    eprintln!("iddctl policy apply: {}", out["applied"]);
    let applied = out["applied"].as_array().unwrap();
    assert_eq!(applied.len(), 1, "{out}");
    assert_eq!(applied[0]["change"], "region-changed");
    assert_eq!(applied[0]["how"], "live", "{out}");
    assert_eq!(num(&channel(c, "disk0", "alice"), "sectors"), 16_384);
    // Nothing restarted; both guests' verified workloads go on.
    std::thread::sleep(Duration::from_secs(1));
    let i = idd(c, "idd-disk0");
    assert_eq!(
        (i["pid"].clone(), i["restarts"].clone()),
        (pid, json!(0)),
        "{i}"
    );
    assert!(num(&channel(c, "disk0", "bob"), "responses") > bob_before);

    // A guest added live on the same disk: its verified workload runs on its own region.
    let carol = format!(
        "{grown}\n[[guest]]\nname = \"carol\"\n[[guest.disk]]\ndevice = \"disk0\"\noffset = \"12MiB\"\nlength = \"4MiB\"\n"
    );
    let out = apply(c, &carol).unwrap();
    eprintln!("guest added: {}", out["applied"]);
    assert_eq!(out["applied"][0]["change"], "guest-added", "{out}");
    assert_eq!(out["applied"][0]["how"], "live", "{out}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while num(&channel(c, "disk0", "carol"), "responses") == 0 {
        assert!(Instant::now() < deadline, "carol's disk is not served");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(idd(c, "idd-disk0")["restarts"], 0);

    // A crash after the apply: the restarted IDD serves the grown region (the manager's
    // stored channel) and carol's channel, and the guests keep going.
    let _: Value = c
        .post("/v1/idds/idd-disk0/faults", &json!({ "fault": "crash" }))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let i = idd(c, "idd-disk0");
        if i["restarts"] == 1 && i["state"] == "running" {
            break;
        }
        assert!(Instant::now() < deadline, "no recovery: {i}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let alice = num(&channel(c, "disk0", "alice"), "responses");
    let carol = num(&channel(c, "disk0", "carol"), "responses");
    std::thread::sleep(Duration::from_secs(1));
    assert!(num(&channel(c, "disk0", "alice"), "responses") > alice);
    assert!(num(&channel(c, "disk0", "carol"), "responses") > carol);
    assert_eq!(num(&channel(c, "disk0", "alice"), "sectors"), 16_384);
    let guests: Value = c.get("/v1/guests").unwrap();
    for g in guests.as_array().unwrap() {
        assert_eq!(
            g["running"], true,
            "a guest's verified workload stopped: {g}"
        );
    }
}
