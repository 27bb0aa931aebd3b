//! XenStore interoperability: Xen's own client tools (libxenstore 4.17) against our daemon over
//! a Unix socket, and our client over a domain ring page against the ring server.
//!
//! libxenstore picks its socket from `XENSTORED_PATH` (then `$XENSTORED_RUNDIR/socket`, then
//! `/var/run/xenstored/socket`), so each test points it at a temporary socket. The tool tests
//! skip, saying so, when `xenstore-utils` is not installed (`ci/setup.sh` installs it).

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use devchan::xenstore::client::NO_TX;
use devchan::xenstore::perms::{Perm, PERM_READ};
use devchan::xenstore::ring::{OwnedRingPage, RingTransport};
use devchan::xenstore::{Client, ClientError, MsgType, XsError};
use hypervisor::xenstored::ring::{serve_ring, EventFdSignal, RingExit};
use hypervisor::xenstored::socket::{serve_client, ServerHandle, SocketServer};
use hypervisor::xenstored::Xenstored;

fn tools_installed() -> bool {
    let ok = Command::new("xenstore-read")
        .arg("-h")
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !ok {
        eprintln!("SKIPPED: Xen's xenstore tools are not installed (run ci/setup.sh)");
    }
    ok
}

struct Daemon {
    xs: Arc<Xenstored>,
    handle: ServerHandle,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let xs = Xenstored::new();
        let server = SocketServer::bind(dir.path().join("socket"), Arc::clone(&xs)).unwrap();
        let handle = server.spawn().unwrap();
        Self {
            xs,
            handle,
            _dir: dir,
        }
    }

    fn socket(&self) -> &Path {
        self.handle.path()
    }

    fn tool(&self, name: &str, args: &[&str]) -> Output {
        Command::new(name)
            .args(args)
            .env("XENSTORED_PATH", self.socket())
            .output()
            .unwrap_or_else(|e| panic!("running {name}: {e}"))
    }

    /// Runs a tool that must succeed; returns its stdout.
    fn ok(&self, name: &str, args: &[&str]) -> String {
        let out = self.tool(name, args);
        assert!(
            out.status.success(),
            "{name} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn client(&self) -> Client<UnixStream> {
        Client::new(UnixStream::connect(self.socket()).unwrap())
    }
}

#[test]
fn tools_write_read_list_exists_rm() {
    if !tools_installed() {
        return;
    }
    let d = Daemon::start();
    d.ok("xenstore-write", &["/tool/a", "hello", "/tool/b/c", "deep"]);
    assert_eq!(d.ok("xenstore-read", &["/tool/a"]), "hello\n");
    assert_eq!(d.ok("xenstore-read", &["/tool/b/c"]), "deep\n");
    assert_eq!(d.ok("xenstore-list", &["/tool"]), "a\nb\n");
    let ls = d.ok("xenstore-ls", &["/tool"]);
    assert_eq!(ls, "a = \"hello\"\nb = \"\"\n c = \"deep\"\n");
    let ls_full = d.ok("xenstore-ls", &["-f", "/tool"]);
    assert!(ls_full.contains("/tool/b/c = \"deep\""), "{ls_full}");
    assert!(d.tool("xenstore-exists", &["/tool/a"]).status.success());
    assert!(!d.tool("xenstore-exists", &["/tool/zz"]).status.success());
    let missing = d.tool("xenstore-read", &["/tool/zz"]);
    assert!(!missing.status.success());
    d.ok("xenstore-rm", &["/tool/b"]);
    assert_eq!(d.ok("xenstore-list", &["/tool"]), "a\n");
    // The tools wrap their work in transactions; those went through our daemon.
    assert!(d.xs.request_count(MsgType::TransactionStart) > 0);
    assert_eq!(
        d.xs.request_count(MsgType::TransactionStart),
        d.xs.request_count(MsgType::TransactionEnd)
    );
    // And what the tools wrote is what our own client sees.
    assert_eq!(d.client().read(NO_TX, "/tool/a").unwrap(), b"hello");
}

#[test]
fn tools_list_large_directories_in_parts() {
    if !tools_installed() {
        return;
    }
    let d = Daemon::start();
    let mut c = d.client();
    for i in 0..500 {
        c.write(NO_TX, &format!("/big/child{i:04}"), b"v").unwrap();
    }
    // Too big for one XS_DIRECTORY reply: libxenstore falls back to XS_DIRECTORY_PART.
    assert!(matches!(
        c.directory(NO_TX, "/big"),
        Err(ClientError::Xs(XsError::E2big))
    ));
    let list = d.ok("xenstore-list", &["/big"]);
    let names: Vec<&str> = list.lines().collect();
    assert_eq!(names.len(), 500);
    assert_eq!((names[0], names[499]), ("child0000", "child0499"));
    assert!(d.xs.request_count(MsgType::DirectoryPart) >= 2);
}

#[test]
fn tools_chmod_and_permissions_listing() {
    if !tools_installed() {
        return;
    }
    let d = Daemon::start();
    d.ok("xenstore-write", &["/perm/x", "1"]);
    d.ok("xenstore-chmod", &["/perm/x", "n5", "r6"]);
    assert_eq!(
        d.client().get_perms(NO_TX, "/perm/x").unwrap(),
        [Perm::new(5, 0), Perm::new(6, PERM_READ)]
    );
    let ls = d.ok("xenstore-ls", &["-p", "/perm"]);
    assert!(ls.contains("(n5,r6)"), "{ls}");
    d.ok("xenstore-chmod", &["-r", "/perm", "b3"]);
    let mut c = d.client();
    assert_eq!(c.get_perms(NO_TX, "/perm").unwrap(), [Perm::new(3, 3)]);
    assert_eq!(c.get_perms(NO_TX, "/perm/x").unwrap(), [Perm::new(3, 3)]);
}

#[test]
fn tools_watch_receives_events() {
    if !tools_installed() {
        return;
    }
    let d = Daemon::start();
    d.ok("xenstore-write", &["/watched", ""]);
    let mut child = Command::new("xenstore-watch")
        .args(["-n", "2", "/watched"])
        .env("XENSTORED_PATH", d.socket())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let _ = tx.send(line.unwrap());
        }
    });
    // First the event every new watch gets, then the one for our write.
    let first = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("initial watch event");
    assert_eq!(first, "/watched");
    d.ok("xenstore-write", &["/watched/key", "v"]);
    let second = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("event for the write");
    assert_eq!(second, "/watched/key");
    assert!(child.wait().unwrap().success());
}

#[test]
fn our_client_and_tools_agree_on_transactions() {
    if !tools_installed() {
        return;
    }
    let d = Daemon::start();
    let mut c = d.client();
    let tx = c.transaction_start().unwrap();
    c.write(tx, "/txn/a", b"in-tx").unwrap();
    // Not visible to the tools until commit.
    assert!(!d.tool("xenstore-exists", &["/txn/a"]).status.success());
    c.transaction_end(tx, true).unwrap();
    assert_eq!(d.ok("xenstore-read", &["/txn/a"]), "in-tx\n");
    // A tool write to a node the transaction read makes the commit fail.
    let tx = c.transaction_start().unwrap();
    assert_eq!(c.read(tx, "/txn/a").unwrap(), b"in-tx");
    d.ok("xenstore-write", &["/txn/a", "changed"]);
    c.write(tx, "/txn/b", b"x").unwrap();
    assert!(matches!(
        c.transaction_end(tx, true),
        Err(ClientError::Xs(XsError::Eagain))
    ));
    assert!(!d.tool("xenstore-exists", &["/txn/b"]).status.success());
}

#[test]
fn domain_client_over_ring_page() {
    let xs = Xenstored::new();
    let mem = Arc::new(OwnedRingPage::new());
    let signal = Arc::new(EventFdSignal::new().unwrap());

    let server = {
        let (xs, mem, signal) = (Arc::clone(&xs), Arc::clone(&mem), Arc::clone(&signal));
        std::thread::spawn(move || serve_ring(&xs, 5, &mem.view(), &signal))
    };

    // Dom0 (over a socket pair) gives domain 5 its home directory, as a toolstack would.
    let mut admin = {
        let (a, b) = UnixStream::pair().unwrap();
        let xs2 = Arc::clone(&xs);
        std::thread::spawn(move || serve_client(&xs2, b));
        Client::new(a)
    };
    admin.write(NO_TX, "/local/domain/5", b"").unwrap();
    admin
        .set_perms(NO_TX, "/local/domain/5", &[Perm::new(5, 0)])
        .unwrap();
    admin.introduce(5, 1234, 7).unwrap();

    let (notify, wait) = signal.domain_side();
    let mut dom5 = Client::new(RingTransport::new(mem.view(), notify, wait));
    assert_eq!(dom5.get_domain_path(5).unwrap(), "/local/domain/5");
    dom5.write(NO_TX, "data/x", b"from the ring").unwrap();
    assert_eq!(
        admin.read(NO_TX, "/local/domain/5/data/x").unwrap(),
        b"from the ring"
    );
    assert!(matches!(
        dom5.write(NO_TX, "/forbidden", b"x"),
        Err(ClientError::Xs(XsError::Eacces))
    ));
    assert!(matches!(
        dom5.read(NO_TX, "/local"),
        Err(ClientError::Xs(XsError::Eacces))
    ));
    assert!(matches!(
        dom5.read(NO_TX, "data/none"),
        Err(ClientError::Xs(XsError::Enoent))
    ));

    // Messages larger than the 1 KiB ring go through in pieces.
    let big = vec![b'z'; 2000];
    dom5.write(NO_TX, "data/big", &big).unwrap();
    assert_eq!(dom5.read(NO_TX, "data/big").unwrap(), big);

    // A relative watch gets relative paths; dom0's write reaches the domain.
    dom5.watch("data", "tok").unwrap();
    assert_eq!(dom5.next_event().unwrap().path, "data");
    admin.write(NO_TX, "/local/domain/5/data/y", b"1").unwrap();
    let ev = dom5.next_event().unwrap();
    assert_eq!(
        (ev.path.as_str(), ev.token.as_slice()),
        ("data/y", &b"tok"[..])
    );

    let tx = dom5.transaction_start().unwrap();
    dom5.write(tx, "data/z", b"tx").unwrap();
    dom5.transaction_end(tx, true).unwrap();
    assert_eq!(admin.read(NO_TX, "/local/domain/5/data/z").unwrap(), b"tx");

    admin.release(5).unwrap();
    assert_eq!(server.join().unwrap().unwrap(), RingExit::Released);
}

#[test]
fn tools_set_up_a_domain_that_talks_over_its_ring() {
    if !tools_installed() {
        return;
    }
    let d = Daemon::start();
    let mem = Arc::new(OwnedRingPage::new());
    let signal = Arc::new(EventFdSignal::new().unwrap());
    let server = {
        let (xs, mem, signal) = (Arc::clone(&d.xs), Arc::clone(&mem), Arc::clone(&signal));
        std::thread::spawn(move || serve_ring(&xs, 7, &mem.view(), &signal))
    };
    // The toolstack's part, with Xen's tools: a home for domain 7 and a frontend directory.
    d.ok(
        "xenstore-write",
        &["/local/domain/7/device/vif/0/state", "1"],
    );
    d.ok("xenstore-chmod", &["-r", "/local/domain/7", "n7"]);
    d.ok(
        "xenstore-write",
        &["/local/domain/0/backend/vif/7/0/state", "1"],
    );
    d.ok(
        "xenstore-chmod",
        &["/local/domain/0/backend/vif/7/0/state", "n0", "r7"],
    );

    let (notify, wait) = signal.domain_side();
    let mut dom7 = Client::new(RingTransport::new(mem.view(), notify, wait));
    assert_eq!(dom7.read(NO_TX, "device/vif/0/state").unwrap(), b"1");
    assert_eq!(
        dom7.read(NO_TX, "/local/domain/0/backend/vif/7/0/state")
            .unwrap(),
        b"1"
    );
    assert!(matches!(
        dom7.write(NO_TX, "/local/domain/0/backend/vif/7/0/state", b"4"),
        Err(ClientError::Xs(XsError::Eacces))
    ));
    // The domain watches the backend's state; the tool's write reaches it.
    dom7.watch("/local/domain/0/backend/vif/7/0/state", "be")
        .unwrap();
    assert_eq!(dom7.next_event().unwrap().token, b"be");
    d.ok(
        "xenstore-write",
        &["/local/domain/0/backend/vif/7/0/state", "2"],
    );
    let ev = dom7.next_event().unwrap();
    assert_eq!(ev.path, "/local/domain/0/backend/vif/7/0/state");
    // And the domain's own writes are visible to the tools.
    dom7.write(NO_TX, "device/vif/0/state", b"3").unwrap();
    assert_eq!(
        d.ok("xenstore-read", &["/local/domain/7/device/vif/0/state"]),
        "3\n"
    );
    d.xs.close_domain(7);
    assert_eq!(server.join().unwrap().unwrap(), RingExit::Released);
}
