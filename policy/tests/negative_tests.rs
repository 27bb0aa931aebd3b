//! Every kind of policy error, at its exact line and column, and all of them at once.

use policy::{ErrorKind as K, Policy};

/// (kind, line, column) of every diagnostic, in source order.
fn errs(text: &str) -> Vec<(K, usize, usize)> {
    match Policy::parse(text, "t.toml") {
        Ok(p) => panic!("expected errors, parsed {p:?}"),
        Err(e) => {
            let r = e.render();
            for d in &e.diagnostics {
                assert!(
                    r.contains(&format!("t.toml:{}:{}", d.line, d.column)),
                    "{r}"
                );
                assert!(d.hint.is_some(), "every diagnostic has a hint: {d:?}");
            }
            e.diagnostics
                .iter()
                .map(|d| (d.kind, d.line, d.column))
                .collect()
        }
    }
}

// Lines 1-5: a 64 MiB disk. Lines 6-10: a 1 Gbit/s NIC.
const DEVICES: &str = r#"[[device]]
name = "disk0"
kind = "virtio-blk"
image = "d.img"
size = "64MiB"
[[device]]
name = "net0"
kind = "virtio-net"
link = "1Gbit/s"
wire = "udp"
"#;

fn with(rest: &str) -> String {
    format!("{DEVICES}{rest}")
}

#[test]
fn syntax() {
    assert_eq!(errs("[[device]\nname = 1\n"), [(K::Syntax, 1, 10)]);
}

#[test]
fn unknown_keys_everywhere_with_suggestion() {
    let text = with("colour = 1\n[[guest]]\nname = \"a\"\n[[guest.disk]]\ndevice = \"disk0\"\nreadonly = true\n");
    assert_eq!(
        errs(&text),
        [(K::UnknownKey, 11, 1), (K::UnknownKey, 16, 1)]
    );
    let e = Policy::parse(&text, "t.toml").unwrap_err();
    assert!(
        e.diagnostics[1]
            .hint
            .as_deref()
            .unwrap()
            .contains("did you mean `read_only`"),
        "{e}"
    );
    assert!(e.diagnostics[1].message.contains("[[guest.disk]]"), "{e}");
    // Inline tables and nested restart tables are checked too.
    let text = with("[[guest]]\nname = \"a\"\ndisk = [{ device = \"disk0\", lenght = 512 }]\n");
    assert_eq!(errs(&text), [(K::UnknownKey, 13, 29)]);
    let text = DEVICES.replace(
        "wire = \"udp\"",
        "wire = \"udp\"\nrestart = { heartbeats = \"1s\" }",
    );
    assert_eq!(errs(&text), [(K::UnknownKey, 11, 13)]);
}

#[test]
fn wrong_types_and_missing_keys_per_entry() {
    // A wrong type in one guest does not hide an unknown device in the next.
    let text = with("[[guest]]\nname = 5\n[[guest]]\nname = \"b\"\nkind = \"vm\"\n[[guest]]\nname = \"c\"\ndisk = [{ device = \"nope\" }]\n");
    assert_eq!(
        errs(&text),
        [
            (K::Type, 12, 8),
            (K::Type, 15, 8),
            (K::UnknownDevice, 18, 20)
        ]
    );
    assert_eq!(
        errs("[device]\nname = \"x\"\n"),
        [(K::Type, 1, 1)],
        "a table where a list of tables belongs"
    );
}

#[test]
fn duplicate_names() {
    let text = with("[[device]]\nname = \"disk0\"\nkind = \"virtio-blk\"\nimage = \"e.img\"\nsize = 512\n[[guest]]\nname = \"a\"\n[[guest]]\nname = \"a\"\n");
    assert_eq!(
        errs(&text),
        [(K::DuplicateName, 12, 8), (K::DuplicateName, 19, 8)]
    );
    let e = Policy::parse(&text, "t.toml").unwrap_err();
    assert_eq!(e.diagnostics[0].related[0].1, "first declared here");
}

#[test]
fn unknown_device_and_kind_mismatch() {
    let text = with("[[guest]]\nname = \"a\"\n[[guest.disk]]\ndevice = \"disk1\"\n[[guest.disk]]\ndevice = \"net0\"\n[[guest.net]]\ndevice = \"disk0\"\n");
    assert_eq!(
        errs(&text),
        [
            (K::UnknownDevice, 14, 10),
            (K::KindMismatch, 16, 10),
            (K::KindMismatch, 18, 10)
        ]
    );
    let e = Policy::parse(&text, "t.toml").unwrap_err();
    assert!(
        e.diagnostics[0]
            .hint
            .as_deref()
            .unwrap()
            .contains("did you mean device `disk0`"),
        "{e}"
    );
    assert!(
        e.diagnostics[1]
            .hint
            .as_deref()
            .unwrap()
            .contains("[[guest.net]]"),
        "{e}"
    );
}

#[test]
fn bad_and_duplicate_macs() {
    let text = with(concat!(
        "[[guest]]\nname = \"a\"\n",
        "net = [{ device = \"net0\", mac = \"01:00:5e:00:00:01\" },\n",
        "       { device = \"net0\", mac = \"00:00:00:00:00:00\" },\n",
        "       { device = \"net0\", mac = \"02:00:00:00:00:0g\" },\n",
        "       { device = \"net0\", mac = \"02:00:00:00:00:01\" },\n",
        "       { device = \"net0\", mac = \"02-00-00-00-00-01\" }]\n",
    ));
    assert_eq!(
        errs(&text),
        [
            (K::BadMac, 13, 33),
            (K::BadMac, 14, 33),
            (K::BadMac, 15, 33),
            (K::DuplicateMac, 17, 33)
        ]
    );
    let e = Policy::parse(&text, "t.toml").unwrap_err();
    assert!(e.diagnostics[0].message.contains("multicast"), "{e}");
    assert!(e.diagnostics[1].message.contains("all-zero"), "{e}");
}

#[test]
fn bad_units() {
    let text = DEVICES
        .replace("\"64MiB\"", "\"64 parsecs\"")
        .replace("\"1Gbit/s\"", "\"1.5.0Gbit/s\"");
    assert_eq!(errs(&text), [(K::BadUnit, 5, 8), (K::BadUnit, 9, 8)]);
    let e = Policy::parse(&text, "t.toml").unwrap_err();
    assert!(
        e.diagnostics[0].hint.as_deref().unwrap().contains("MiB"),
        "{e}"
    );
    let text = with("[[guest]]\nname = \"a\"\nnet = [{ device = \"net0\", share = \"lots\" }]\ndisk = [{ device = \"disk0\", offset = -512 }]\n");
    assert_eq!(errs(&text), [(K::BadUnit, 13, 35), (K::BadUnit, 14, 38)]);
    assert_eq!(
        errs("[restart]\nheartbeat = \"1 fortnight\"\n"),
        [(K::BadUnit, 2, 13)]
    );
}

#[test]
fn regions_past_end_empty_and_misaligned() {
    let text = with(concat!(
        "[[guest]]\nname = \"a\"\n",
        "disk = [{ device = \"disk0\", offset = \"60MiB\", length = \"8MiB\" },\n",
        "        { device = \"disk0\", offset = 100, length = 512 },\n",
        "        { device = \"disk0\", offset = \"64MiB\" }]\n",
    ));
    assert_eq!(
        errs(&text),
        [
            (K::PastEnd, 13, 56),
            (K::Misaligned, 14, 38),
            (K::PastEnd, 15, 38)
        ]
    );
    let e = Policy::parse(&text, "t.toml").unwrap_err();
    assert!(
        e.diagnostics[0]
            .hint
            .as_deref()
            .unwrap()
            .contains("`disk0` is 64MiB long; this region needs 68MiB"),
        "{e}"
    );
}

#[test]
fn overlapping_writable_regions() {
    let guests = r#"[[guest]]
name = "a"
disk = [{ device = "disk0", length = "40MiB", read_only = RO_A }]
[[guest]]
name = "b"
disk = [{ device = "disk0", offset = "32MiB", read_only = RO_B }]
"#;
    let case = |a: bool, b: bool| {
        with(
            &guests
                .replace("RO_A", &a.to_string())
                .replace("RO_B", &b.to_string()),
        )
    };
    assert_eq!(errs(&case(false, false)), [(K::Overlap, 16, 38)]);
    assert_eq!(errs(&case(true, false)), [(K::Overlap, 16, 38)]);
    assert_eq!(errs(&case(false, true)), [(K::Overlap, 16, 38)]);
    // Both read-only: allowed.
    Policy::parse(&case(true, true), "t.toml").unwrap();
    let e = Policy::parse(&case(false, false), "t.toml").unwrap_err();
    assert_eq!(
        e.diagnostics[0].related[0].1,
        "`a`'s region (0..40MiB, writable)"
    );
}

#[test]
fn shares_exceeding_the_link() {
    let text = with(concat!(
        "[[guest]]\nname = \"a\"\nnet = [{ device = \"net0\", share = \"600Mbit/s\" }]\n",
        "[[guest]]\nname = \"b\"\nnet = [{ device = \"net0\" }]\n",
        "[[guest]]\nname = \"c\"\nnet = [{ device = \"net0\", share = \"51MB/s\" }]\n",
    ));
    assert_eq!(errs(&text), [(K::ShareExceedsLink, 19, 35)]);
    let e = Policy::parse(&text, "t.toml").unwrap_err();
    assert!(
        e.diagnostics[0]
            .message
            .contains("add up to 1.008Gbit/s, more than its 1Gbit/s link"),
        "{e}"
    );
    assert_eq!(
        e.diagnostics[0].related.len(),
        2,
        "the link and the other share"
    );
    // 400 Mbit/s fits.
    Policy::parse(&text.replace("51MB/s", "400Mbit/s"), "t.toml").unwrap();
}

#[test]
fn keys_that_do_not_fit_the_kind() {
    let text = DEVICES
        .replace("size = \"64MiB\"", "size = \"64MiB\"\nlink = \"1Gbit/s\"")
        .replace(
            "wire = \"udp\"",
            "wire = \"tap\"\nbind = \"127.0.0.1:1\"\nsize = 512",
        );
    // The blk device's `link` (line 6), the tap device's missing `ifname` (at its name, line 8),
    // its `bind` (udp only) and `size` (blk only).
    assert_eq!(
        errs(&text),
        [
            (K::NotForKind, 6, 8),
            (K::Missing, 8, 8),
            (K::NotForKind, 12, 8),
            (K::NotForKind, 13, 8)
        ]
    );
}

#[test]
fn missing_and_malformed_values() {
    let text = "[[device]]\nname = \"d\"\nkind = \"virtio-blk\"\n[[device]]\nname = \"n\"\nkind = \"virtio-net\"\nbind = \"localhost\"\npci = \"0000:00:20.0\"\n[[guest]]\nname = \"g\"\nnet = [{ device = \"n\", ips = [\"10.0.0.300\"] }]\n";
    let got = errs(text);
    assert!(got.contains(&(K::Missing, 2, 8)), "{got:?}");
    assert!(got.contains(&(K::BadValue, 8, 7)), "{got:?}");
    assert!(got.contains(&(K::NotForKind, 7, 8)), "{got:?}");
}

#[test]
fn all_errors_are_collected_in_source_order() {
    let text = with(concat!(
        "[[guest]]\nname = \"a\"\nmystery = 1\n",
        "net = [{ device = \"net0\", mac = \"ff:ff:ff:ff:ff:ff\" }, { device = \"nic9\" }]\n",
        "disk = [{ device = \"disk0\", offset = \"1G\" }, { device = \"disk0\", length = \"1 potato\" }]\n",
        "[[guest]]\nname = \"a\"\n",
    ));
    let got = errs(&text);
    let kinds: Vec<K> = got.iter().map(|g| g.0).collect();
    assert_eq!(
        kinds,
        [
            K::UnknownKey,
            K::BadMac,
            K::UnknownDevice,
            K::PastEnd,
            K::BadUnit,
            K::DuplicateName
        ],
        "{got:?}"
    );
    let mut sorted = got.clone();
    sorted.sort_by_key(|g| (g.1, g.2));
    assert_eq!(got, sorted);
    let r = Policy::parse(&text, "t.toml").unwrap_err().render();
    assert!(r.ends_with("6 error(s) in t.toml\n"), "{r}");
}

#[test]
fn bad_addresses_and_names() {
    let text = DEVICES.replace("wire = \"udp\"", "wire = \"udp\"\npeer = \"localhost:7000\"")
        + "[[device]]\nname = \"tap\"\nkind = \"virtio-net\"\nwire = \"tap\"\nifname = \"a/b\"\n"
        + "[[guest]]\nname = \"g\"\nnet = [{ device = \"net0\", ips = [\"10.0.0.1\", \"10.0.0.300\", \"fd00::/64\"] }]\n";
    assert_eq!(
        errs(&text),
        [
            (K::BadValue, 11, 8),
            (K::BadValue, 16, 10),
            (K::BadValue, 19, 46)
        ]
    );
}
