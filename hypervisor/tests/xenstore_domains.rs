//! XenStore for sandboxed process domains: each domain talks to xenstored over its ring page
//! (frame 6) and store event channel, as set up by `xenstored::domains::DomainStores`.
//!
//! The domains are this test binary itself, started by the launcher with `XSD_ROLE` set and
//! running only the `domain_main` test (which does nothing when `XSD_ROLE` is unset). Domain
//! and test coordinate through XenStore itself: the test (domain 0, over the Unix socket)
//! writes `data/ping`, which the domain watches; the domain answers in `data/pong`.

use std::error::Error;
use std::io::{BufRead, BufReader};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devchan::platform::Platform;
use devchan::xenstore::perms::Perm;
use devchan::xenstore::{ClientError, XsError};
use hypervisor::domain::DomainConfig;
use hypervisor::launch::{LaunchConfig, RunningDomain};
use hypervisor::process::ProcessPlatform;
use hypervisor::sandbox::SandboxConfig;
use hypervisor::store_link::{process_client, EventMux};
use hypervisor::system::System;
use hypervisor::xenstored::domains::{DomainStores, ServiceState};
use hypervisor::xenstored::socket::{self, SocketServer};
use hypervisor::xenstored::Xenstored;

const ROLE: &str = "XSD_ROLE";
const OTHER: &str = "XSD_OTHER";

type Res<T> = Result<T, Box<dyn Error>>;

fn out(line: &str) {
    println!("XS: {line}");
}

/// The domain side. `rw`: serve pings until `data/ping` says `stop`, checking permissions
/// on the other domain's private node on the way; `scribble`: make one request, then break
/// the ring's indexes and report what the client sees.
#[test]
fn domain_main() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    if let Err(e) = domain(&role) {
        out(&format!("error {e}"));
        std::process::exit(1);
    }
}

fn domain(role: &str) -> Res<()> {
    let other: u16 = std::env::var(OTHER)?.parse()?;
    let (platform, _) = ProcessPlatform::enter(SandboxConfig::default())?;
    let mux = EventMux::new(Arc::new(platform));
    let mut xs = process_client(&mux)?;
    let me = mux.platform().domid();
    let home = xs.get_domain_path(me)?;
    out(&format!("home {home}"));
    // Our own private node: read/write.
    xs.write(0, &format!("{home}/data/hello"), b"from the domain")?;
    out(&format!(
        "readback {}",
        String::from_utf8(xs.read(0, &format!("{home}/data/hello"))?)?
    ));
    // Another domain's private node: neither readable nor writable.
    let secret = format!("/local/domain/{other}/data/secret");
    let r = xs.read(0, &secret);
    out(&format!(
        "read-other {}",
        matches!(r, Err(ClientError::Xs(XsError::Eacces)))
    ));
    let w = xs.write(0, &secret, b"overwritten");
    out(&format!(
        "write-other {}",
        matches!(w, Err(ClientError::Xs(XsError::Eacces)))
    ));
    if role == "scribble" {
        let page = mux.platform().xenstore_page().ok_or("no page")?;
        // SAFETY: req_prod (offset 2052) of our own ring page, an aligned u32 inside our RAM
        // mapping, which the platform keeps alive; the daemon accesses it atomically too.
        let req_prod = unsafe { AtomicU32::from_ptr(page.as_ptr().add(2052).cast()) };
        req_prod.fetch_add(5000, Ordering::Release);
        // The daemon may already have cut us off and closed its end: the send then fails.
        let _ = mux.platform().evtchn_notify(xs.get_ref().port());
        let t0 = Instant::now();
        let r = loop {
            match xs.read(0, &format!("{home}/data/hello")) {
                Err(e) => break e,
                Ok(_) if t0.elapsed() > Duration::from_secs(5) => return Err("still served".into()),
                Ok(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        out(&format!("cut-off {r}"));
        return Ok(());
    }
    xs.watch(&format!("{home}/data/ping"), "ping")?;
    out("watching");
    loop {
        let ev = xs.next_event()?;
        if ev.token != b"ping" {
            continue;
        }
        let Ok(v) = xs.read(0, &format!("{home}/data/ping")) else {
            continue;
        };
        if v == b"stop" {
            return Ok(());
        }
        xs.write(0, &format!("{home}/data/pong"), &v)?;
    }
}

// ---- domain 0 ------------------------------------------------------------------------

struct Rig {
    sys: Arc<System>,
    stores: DomainStores,
    admin: devchan::xenstore::Client<std::os::unix::net::UnixStream>,
    _server: socket::ServerHandle,
    _dir: tempfile::TempDir,
}

fn rig() -> Rig {
    let sys = System::new();
    sys.create_domain(DomainConfig {
        name: "dom0".into(),
        nr_frames: 16,
        iommu: None,
    })
    .unwrap();
    let xs = Xenstored::new();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("xs.sock");
    let server = SocketServer::bind(&path, Arc::clone(&xs))
        .unwrap()
        .spawn()
        .unwrap();
    let stores = DomainStores::start(Arc::clone(&sys), xs, 0).unwrap();
    let admin = socket::connect(&path).unwrap();
    Rig {
        sys,
        stores,
        admin,
        _server: server,
        _dir: dir,
    }
}

/// Create and introduce domain `name` with a private `data/secret` node; its id.
fn create(r: &mut Rig, name: &str) -> u16 {
    let id = r
        .sys
        .create_domain(DomainConfig {
            name: name.into(),
            nr_frames: 16,
            iommu: None,
        })
        .unwrap();
    r.stores.introduce(id).unwrap();
    let p = format!("/local/domain/{id}/data/secret");
    r.admin.write(0, &p, b"private").unwrap();
    r.admin.set_perms(0, &p, &[Perm::new(id, 0)]).unwrap();
    id
}

/// Start this binary in domain `id` in `role`; `other` is the domain whose secret it probes.
fn spawn(r: &Rig, id: u16, role: &str, other: u16) -> RunningDomain {
    r.stores.spawn_in(id, config(role, other)).unwrap()
}

/// This binary as a domain in `role`.
fn config(role: &str, other: u16) -> LaunchConfig {
    let mut cfg = LaunchConfig::new(
        "domain",
        16,
        std::env::current_exe().unwrap(),
        &["--exact", "domain_main", "--nocapture", "--test-threads=1"],
    );
    cfg.env.push((ROLE.into(), role.into()));
    cfg.env.push((OTHER.into(), other.to_string().into()));
    cfg
}

/// Wait until `dom`'s service is in a state `ok` accepts.
fn wait_status(r: &Rig, dom: u16, ok: impl Fn(&ServiceState) -> bool) {
    let t0 = Instant::now();
    while !r.stores.status(dom).as_ref().is_some_and(&ok) {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{:?}",
            r.stores.status(dom)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Lines `XS: …` the domain printed, until one starts with `until` (or its stdout closes).
fn lines_until(d: &mut RunningDomain, until: &str) -> Vec<String> {
    let stdout = d.child_mut().stdout.as_mut().unwrap();
    let mut r = BufReader::new(stdout);
    let mut v = Vec::new();
    let mut l = String::new();
    while r.read_line(&mut l).unwrap() > 0 {
        // libtest may print its own text before ours on the same line.
        if let Some((_, x)) = l.trim_end().split_once("XS: ") {
            v.push(x.to_owned());
            if x.starts_with(until) || x.starts_with("error") {
                break;
            }
        }
        l.clear();
    }
    v
}

fn ping(r: &mut Rig, dom: u16, value: &str) {
    let home = format!("/local/domain/{dom}/data");
    r.admin
        .write(0, &format!("{home}/ping"), value.as_bytes())
        .unwrap();
    let t0 = Instant::now();
    loop {
        if r.admin.read(0, &format!("{home}/pong")).ok().as_deref() == Some(value.as_bytes()) {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "domain {dom} did not answer {value}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn sandboxed_domains_read_write_and_watch_with_permissions() {
    let mut r = rig();
    // Each domain probes the other's secret.
    let (ia, ib) = (create(&mut r, "a"), create(&mut r, "b"));
    let mut a = spawn(&r, ia, "rw", ib);
    let mut b = spawn(&r, ib, "rw", ia);
    for (d, id) in [(&mut a, 1), (&mut b, 2)] {
        let got = lines_until(d, "watching");
        assert_eq!(
            got,
            [
                format!("home /local/domain/{id}"),
                "readback from the domain".into(),
                "read-other true".into(),
                "write-other true".into(),
                "watching".into(),
            ]
        );
    }
    // Watches fire across the ring, many times, for both domains.
    for i in 0..20 {
        ping(&mut r, 1, &format!("a{i}"));
        ping(&mut r, 2, &format!("b{i}"));
    }
    assert_eq!(
        r.admin.read(0, "/local/domain/2/data/secret").unwrap(),
        b"private"
    );
    // Destroying a domain stops its service (found by the dispatcher's scan), the other
    // domain keeps going.
    a.kill().unwrap();
    r.sys.destroy_domain(1).unwrap();
    wait_status(&r, 1, |s| *s == ServiceState::Stopped);
    assert!(!r.admin.is_domain_introduced(1).unwrap());
    ping(&mut r, 2, "after");
    r.admin
        .write(0, "/local/domain/2/data/ping", b"stop")
        .unwrap();
    assert_eq!(
        b.wait_exit(Some(Duration::from_secs(10))).unwrap(),
        Some(hypervisor::launch::ExitReport::Exited(0))
    );
    r.stores.destroy(2).unwrap();
    assert_eq!(r.stores.status(2), Some(ServiceState::Stopped));
}

#[test]
fn a_domain_that_scribbles_its_ring_is_cut_off_alone() {
    let mut r = rig();
    let (ig, ib) = (create(&mut r, "good"), create(&mut r, "bad"));
    let mut good = spawn(&r, ig, "rw", ib);
    let mut bad = spawn(&r, ib, "scribble", ig);
    assert_eq!(
        lines_until(&mut good, "watching").last().unwrap(),
        "watching"
    );
    let got = lines_until(&mut bad, "cut-off");
    let last = got.last().unwrap();
    assert!(last.starts_with("cut-off"), "{got:?}");
    wait_status(&r, 2, |s| matches!(s, ServiceState::CutOff(_)));
    assert_eq!(
        bad.wait_exit(Some(Duration::from_secs(10))).unwrap(),
        Some(hypervisor::launch::ExitReport::Exited(0))
    );
    // The well-behaved domain is unaffected.
    for i in 0..5 {
        ping(&mut r, 1, &format!("still-{i}"));
    }
    assert_eq!(r.stores.status(1), Some(ServiceState::Serving));
    r.admin
        .write(0, "/local/domain/1/data/ping", b"stop")
        .unwrap();
    assert_eq!(
        good.wait_exit(Some(Duration::from_secs(10))).unwrap(),
        Some(hypervisor::launch::ExitReport::Exited(0))
    );
}

#[test]
fn a_restarted_process_reconnects_to_its_store() {
    let mut r = rig();
    // Created, introduced and started in one call.
    let mut first = r.stores.launch(config("rw", 9)).unwrap();
    let id = first.domid();
    assert_eq!(
        lines_until(&mut first, "watching").last().unwrap(),
        "watching"
    );
    ping(&mut r, 1, "one");
    first.kill().unwrap();
    drop(first);
    // A new process in the same domain: same port, same ring; it reconnects and its watch
    // works again.
    let mut second = spawn(&r, id, "rw", 9);
    assert_eq!(
        lines_until(&mut second, "watching").last().unwrap(),
        "watching"
    );
    ping(&mut r, 1, "two");
    r.admin
        .write(0, "/local/domain/1/data/ping", b"stop")
        .unwrap();
    assert_eq!(
        second.wait_exit(Some(Duration::from_secs(10))).unwrap(),
        Some(hypervisor::launch::ExitReport::Exited(0))
    );
}
