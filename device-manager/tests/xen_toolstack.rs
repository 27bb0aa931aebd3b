//! The Xen toolstack against a XenStore that speaks Xen's wire protocol: the project's own
//! xenstored (`hypervisor::xenstored`) on a Unix socket, where every client is domain 0 as
//! with Xen's. `xen_platform`'s client writes, `devchan`'s client lists and checks.

use devchan::xenstore::client::NO_TX;
use devchan::xenstore::perms::Perm;
use device_manager::xen::toolstack::{self, VifPaths};
use hypervisor::xenstored::socket::{connect, ServerHandle, SocketServer};
use hypervisor::xenstored::Xenstored;
use policy::MacAddr;
use xen_platform::xenstore::XenStore;

fn daemon(dir: &std::path::Path) -> (ServerHandle, std::path::PathBuf) {
    let path = dir.join("xs.sock");
    let h = SocketServer::bind(&path, Xenstored::new())
        .unwrap()
        .spawn()
        .unwrap();
    (h, path)
}

fn perms(
    c: &mut devchan::xenstore::Client<std::os::unix::net::UnixStream>,
    p: &str,
) -> Vec<String> {
    c.get_perms(NO_TX, p)
        .unwrap()
        .iter()
        .map(Perm::encode)
        .collect()
}

#[test]
fn domains_are_found_by_name() {
    let t = tempfile::tempdir().unwrap();
    let (_h, sock) = daemon(t.path());
    let mut c = connect(&sock).unwrap();
    for (id, name) in [(0, "Domain-0"), (7, "domu"), (12, "other")] {
        c.write(NO_TX, &format!("/local/domain/{id}/name"), name.as_bytes())
            .unwrap();
    }
    // Not a domain id: ignored.
    c.write(NO_TX, "/local/domain/pool/name", b"domu").unwrap();
    let mut l = toolstack::lookup_client(&sock).unwrap();
    assert_eq!(toolstack::find_domain(&mut l, "domu").unwrap(), Some(7));
    assert_eq!(toolstack::find_domain(&mut l, "Domain-0").unwrap(), Some(0));
    assert_eq!(toolstack::find_domain(&mut l, "nobody").unwrap(), None);
    assert_eq!(toolstack::find_domain(&mut l, "dom").unwrap(), None);
    let mut xs = XenStore::open(&sock).unwrap();
    assert_eq!(toolstack::own_domid(&mut xs), 0);
}

#[test]
fn vbd_and_vif_directories_with_their_owners() {
    let t = tempfile::tempdir().unwrap();
    let (_h, sock) = daemon(t.path());
    let mut xs = XenStore::open(&sock).unwrap();
    let mut c = connect(&sock).unwrap();

    let (vbd, wrote) = toolstack::write_vbd(&mut xs, 0, 5, 51712, false).unwrap();
    assert!(wrote);
    let mac = MacAddr([0, 0x16, 0x3e, 0, 0, 2]);
    let (vif, wrote) = toolstack::write_vif(&mut xs, 0, 5, 0, mac).unwrap();
    assert!(wrote);
    assert_eq!(vif, VifPaths::new(0, 5, 0));

    let r = |c: &mut devchan::xenstore::Client<_>, p: String| {
        String::from_utf8(c.read(NO_TX, &p).unwrap()).unwrap()
    };
    // What blkfront and netfront read in their own directory, and the backend's state.
    assert_eq!(r(&mut c, format!("{}/backend", vbd.front)), vbd.back);
    assert_eq!(r(&mut c, format!("{}/virtual-device", vbd.front)), "51712");
    assert_eq!(r(&mut c, format!("{}/state", vbd.front)), "1");
    assert_eq!(r(&mut c, format!("{}/state", vbd.back)), "2");
    assert_eq!(r(&mut c, format!("{}/mode", vbd.back)), "w");
    assert_eq!(r(&mut c, format!("{}/mac", vif.front)), "00:16:3e:00:00:02");
    assert_eq!(r(&mut c, format!("{}/handle", vif.front)), "0");
    assert_eq!(r(&mut c, format!("{}/backend", vif.front)), vif.back);
    assert_eq!(r(&mut c, format!("{}/backend-id", vif.front)), "0");
    assert_eq!(r(&mut c, format!("{}/frontend-id", vif.back)), "5");
    assert_eq!(r(&mut c, format!("{}/state", vif.back)), "2");
    let mut keys = c.directory(NO_TX, &vif.back).unwrap();
    keys.sort();
    assert_eq!(
        keys,
        [
            "frontend",
            "frontend-id",
            "handle",
            "mac",
            "online",
            "state",
            "type"
        ]
    );

    // Ownership: the guest owns its side and we may read it; we own ours and the guest may
    // read it. Set on the parents, inherited by every key written below them.
    for (node, want) in [
        ("/local/domain/5/device/vbd".to_owned(), ["n5", "r0"]),
        (format!("{}/state", vbd.front), ["n5", "r0"]),
        (format!("{}/backend", vif.front), ["n5", "r0"]),
        ("/local/domain/0/backend/vif/5".to_owned(), ["n0", "r5"]),
        (format!("{}/state", vbd.back), ["n0", "r5"]),
        (format!("{}/mac", vif.back), ["n0", "r5"]),
    ] {
        assert_eq!(perms(&mut c, &node), want, "{node}");
    }

    // A directory that exists is left alone (a connected backend, a serve restarted).
    c.write(NO_TX, &format!("{}/state", vif.back), b"4")
        .unwrap();
    let (_, wrote) = toolstack::write_vif(&mut xs, 0, 5, 0, MacAddr([2, 0, 0, 0, 0, 9])).unwrap();
    assert!(!wrote);
    assert_eq!(r(&mut c, format!("{}/state", vif.back)), "4");
    assert_eq!(r(&mut c, format!("{}/mac", vif.front)), "00:16:3e:00:00:02");
    let (_, wrote) = toolstack::write_vbd(&mut xs, 0, 5, 51712, true).unwrap();
    assert!(!wrote);
    assert_eq!(r(&mut c, format!("{}/mode", vbd.back)), "w");
}
