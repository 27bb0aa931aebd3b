//! Live reload: which changes apply, which are refused and why.

use policy::{Change, Policy, Region, Share};

const BASE: &str = r#"
[[device]]
name = "disk0"
kind = "virtio-blk"
image = "d.img"
size = "64MiB"

[[device]]
name = "net0"
kind = "virtio-net"

[[guest]]
name = "a"
net = [{ device = "net0", mac = "02:00:00:00:00:01", share = "100Mbit/s" }]
disk = [{ device = "disk0", length = "16MiB" }]

[[guest]]
name = "b"
disk = [{ device = "disk0", offset = "32MiB", length = "16MiB" }]
"#;

fn p(text: &str) -> Policy {
    Policy::parse(text, "t.toml").unwrap_or_else(|e| panic!("{e}"))
}

fn reasons(old: &str, new: &str) -> Vec<String> {
    let e = Policy::diff(&p(old), &p(new)).expect_err("should be refused");
    e.0.iter()
        .map(|r| format!("{}: {}", r.subject, r.reason))
        .collect()
}

#[test]
fn nothing_changed() {
    assert_eq!(Policy::diff(&p(BASE), &p(BASE)), Ok(vec![]));
}

#[test]
fn share_change_applies_to_that_guest_only() {
    let new = BASE.replace("100Mbit/s", "200Mbit/s");
    assert_eq!(
        Policy::diff(&p(BASE), &p(&new)),
        Ok(vec![Change::ShareChanged {
            guest: "a".into(),
            device: "net0".into(),
            old: Some(Share {
                bytes: 625_000,
                interval_us: 50_000
            }),
            new: Some(Share {
                bytes: 1_250_000,
                interval_us: 50_000
            }),
        }])
    );
}

#[test]
fn region_grows_in_place() {
    let new = BASE.replace(
        "length = \"16MiB\" }]\n\n[[guest]]",
        "length = \"32MiB\" }]\n\n[[guest]]",
    );
    assert_eq!(
        Policy::diff(&p(BASE), &p(&new)),
        Ok(vec![Change::RegionChanged {
            guest: "a".into(),
            device: "disk0".into(),
            old: Region {
                offset: 0,
                length: 16 << 20
            },
            new: Region {
                offset: 0,
                length: 32 << 20
            },
        }])
    );
}

#[test]
fn shrinking_or_moving_a_connected_region_is_refused() {
    let shrunk = BASE.replace(
        "offset = \"32MiB\", length = \"16MiB\"",
        "offset = \"32MiB\", length = \"8MiB\"",
    );
    let r = reasons(BASE, &shrunk);
    assert_eq!(r.len(), 1);
    assert!(
        r[0].starts_with("b: its region of `disk0` would be shrunk while it is connected"),
        "{r:?}"
    );
    let moved = BASE.replace("offset = \"32MiB\"", "offset = \"40MiB\"");
    assert!(reasons(BASE, &moved)[0].contains("moved"));
    // Not connected: applied.
    let changes = Policy::diff_with(&p(BASE), &p(&shrunk), |g| g != "b").unwrap();
    assert!(
        matches!(&changes[..], [Change::RegionChanged { guest, .. }] if guest == "b"),
        "{changes:?}"
    );
}

#[test]
fn mac_and_read_only_changes_are_refused_all_at_once() {
    let new = BASE
        .replace("02:00:00:00:00:01", "02:00:00:00:00:02")
        .replace(
            "length = \"16MiB\" }]\n\n[[guest]]\nname = \"b\"",
            "length = \"16MiB\", read_only = true }]\n\n[[guest]]\nname = \"b\"",
        );
    let r = reasons(BASE, &new);
    assert_eq!(r.len(), 2, "{r:?}");
    assert!(r[0].contains("MAC on `net0` changed"), "{r:?}");
    assert!(r[1].contains("read-only on `disk0` changed"), "{r:?}");
}

#[test]
fn devices_in_use_stay_until_unplugged() {
    // Removing net0 means removing a's NIC too; with a connected, refused.
    let no_net = BASE
        .replace("[[device]]\nname = \"net0\"\nkind = \"virtio-net\"\n", "")
        .replace(
            "net = [{ device = \"net0\", mac = \"02:00:00:00:00:01\", share = \"100Mbit/s\" }]\n",
            "",
        );
    let r = reasons(BASE, &no_net);
    assert!(
        r[0].starts_with("net0: connected guests use it (a)"),
        "{r:?}"
    );
    // Two steps: unplug the NIC (applied), then remove the device (applied).
    let unplugged = BASE.replace(
        "net = [{ device = \"net0\", mac = \"02:00:00:00:00:01\", share = \"100Mbit/s\" }]\n",
        "",
    );
    assert_eq!(
        Policy::diff(&p(BASE), &p(&unplugged)),
        Ok(vec![Change::AccessRemoved {
            guest: "a".into(),
            device: "net0".into()
        }])
    );
    assert_eq!(
        Policy::diff(&p(&unplugged), &p(&no_net)),
        Ok(vec![Change::DeviceRemoved {
            device: "net0".into()
        }])
    );
}

#[test]
fn device_media_is_fixed_but_settings_are_live() {
    let r = reasons(BASE, &BASE.replace("d.img", "e.img"));
    assert!(r[0].starts_with("disk0: its kind, media"), "{r:?}");
    let r = reasons(BASE, &BASE.replace("\"64MiB\"", "\"128MiB\""));
    assert!(r[0].starts_with("disk0:"), "{r:?}");
    let new = BASE.replace(
        "kind = \"virtio-net\"\n",
        "kind = \"virtio-net\"\nlink = \"10Gbit/s\"\nstandby = true\n",
    );
    assert_eq!(
        Policy::diff(&p(BASE), &p(&new)),
        Ok(vec![Change::DeviceSettings {
            device: "net0".into()
        }])
    );
}

#[test]
fn guests_and_access_come_and_go() {
    let new = BASE.replace("[[guest]]\nname = \"b\"\ndisk = [{ device = \"disk0\", offset = \"32MiB\", length = \"16MiB\" }]\n", "[[guest]]\nname = \"c\"\nnet = [{ device = \"net0\" }]\n");
    assert_eq!(
        Policy::diff(&p(BASE), &p(&new)),
        Ok(vec![
            Change::GuestRemoved { guest: "b".into() },
            Change::GuestAdded { guest: "c".into() }
        ])
    );
    let more = BASE.replace(
        "name = \"b\"\n",
        "name = \"b\"\nnet = [{ device = \"net0\" }]\n",
    );
    assert_eq!(
        Policy::diff(&p(BASE), &p(&more)),
        Ok(vec![Change::AccessAdded {
            guest: "b".into(),
            device: "net0".into()
        }])
    );
    let kind = BASE.replace("name = \"b\"\n", "name = \"b\"\nkind = \"xen-linux\"\n");
    assert!(reasons(BASE, &kind)[0].starts_with("b: its kind changed"));
}
