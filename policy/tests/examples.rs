//! The shipped examples parse, resolve as documented, and match the JSON Schema.

use std::path::Path;

use policy::{BlkMedia, DeviceSpec, MacAddr, Policy, Region, Share, Wire};
use serde_json::Value;

fn example(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name)
}

#[test]
fn two_guests_one_disk() {
    let p = Policy::load(example("two-guests-one-disk.toml")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.devices.len(), 1);
    let DeviceSpec::Blk {
        size,
        media: BlkMedia::Image(img),
    } = &p.devices[0].spec
    else {
        panic!()
    };
    assert_eq!(*size, 64 << 20);
    assert_eq!(
        img,
        &example("disk0.img"),
        "relative image paths resolve against the file"
    );
    let alice = &p.guest("alice").unwrap().disk[0];
    let bob = &p.guest("bob").unwrap().disk[0];
    assert_eq!(
        alice.region,
        Region {
            offset: 0,
            length: 32 << 20
        }
    );
    assert_eq!(
        (bob.region.start_sector(), bob.region.sectors()),
        (65536, 65536)
    );
    assert!(!bob.read_only);
    assert_eq!(p.restart.heartbeat_us, 1_000_000);
}

#[test]
fn net_and_disk() {
    let p = Policy::load(example("net-and-disk.toml")).unwrap_or_else(|e| panic!("{e}"));
    let net0 = p.device("net0").unwrap();
    assert!(net0.standby);
    assert_eq!(net0.restart.heartbeat_us, 250_000, "device override");
    assert_eq!(net0.restart.max_restarts, 10, "top-level default");
    let DeviceSpec::Net {
        link,
        wire: Wire::Udp { peer, .. },
    } = &net0.spec
    else {
        panic!()
    };
    assert_eq!(link.bits_per_sec, 1_000_000_000);
    assert_eq!(peer.unwrap().port(), 7000);
    let web = &p.guest("web").unwrap().net[0];
    assert_eq!(
        web.share,
        Some(Share {
            bytes: 3_125_000,
            interval_us: 50_000
        })
    );
    assert_eq!(web.ips.len(), 2);
    let db = &p.guest("db").unwrap();
    assert_eq!(
        db.net[0].mac,
        MacAddr([0x02, 0x1d, 0xd0, 0, 1, 0]),
        "generated: device 0, guest 1, NIC 0"
    );
    assert_eq!(
        db.net[0].share,
        Some(Share {
            bytes: 25 << 10,
            interval_us: 500
        })
    );
    assert_eq!(
        db.disk[0].region,
        Region {
            offset: 512 << 20,
            length: 512 << 20
        }
    );
}

#[test]
fn commented_out_read_only_overlap_is_allowed_but_writable_is_not() {
    let text = std::fs::read_to_string(example("net-and-disk.toml")).unwrap();
    let ro = text.replace(
        "# [[guest.disk]]\n# device = \"disk0\"\n# length = \"512MiB\"\n# read_only = true",
        "[[guest.disk]]\ndevice = \"disk0\"\nlength = \"512MiB\"\nread_only = true",
    );
    assert_ne!(ro, text);
    // Overlapping web's writable region read-only is still an overlap with a writer.
    let e = Policy::parse(&ro, "x.toml").unwrap_err();
    assert_eq!(e.kinds(), [policy::ErrorKind::Overlap]);
}

// --- JSON Schema ---

fn resolve<'a>(root: &'a Value, s: &'a Value) -> &'a Value {
    match s.get("$ref").and_then(Value::as_str) {
        Some(r) => root
            .pointer(r.trim_start_matches('#'))
            .unwrap_or_else(|| panic!("dangling {r}")),
        None => s,
    }
}

/// A small structural check: every key in `doc` is a property of the schema at that place,
/// every required property is present, and arrays/objects recurse. Returns the paths checked.
fn check(root: &Value, schema: &Value, doc: &Value, path: &str, seen: &mut Vec<String>) {
    let schema = resolve(root, schema);
    if let Some(alts) = schema
        .get("anyOf")
        .or_else(|| schema.get("oneOf"))
        .and_then(Value::as_array)
    {
        // Option<T> is anyOf [T, null]: take the non-null alternative that fits the type.
        let fit = alts.iter().map(|a| resolve(root, a)).find(|a| match doc {
            Value::Object(_) => a.get("properties").is_some(),
            Value::Array(_) => a.get("items").is_some(),
            _ => true,
        });
        if let Some(a) = fit {
            return check(root, a, doc, path, seen);
        }
    }
    match doc {
        Value::Object(map) => {
            let props = schema
                .get("properties")
                .and_then(Value::as_object)
                .unwrap_or_else(|| panic!("{path}: no properties in {schema}"));
            assert_eq!(
                schema.get("additionalProperties"),
                Some(&Value::Bool(false)),
                "{path}: unknown keys must be refused"
            );
            for req in schema
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                assert!(
                    map.contains_key(req.as_str().unwrap()),
                    "{path}: missing required {req}"
                );
            }
            for (k, v) in map {
                let sub = props
                    .get(k)
                    .unwrap_or_else(|| panic!("{path}.{k} not in the schema"));
                let p = format!("{path}.{k}");
                seen.push(p.clone());
                check(root, sub, v, &p, seen);
            }
        }
        Value::Array(items) => {
            let item = schema
                .get("items")
                .unwrap_or_else(|| panic!("{path}: no items in {schema}"));
            for v in items {
                check(root, item, v, &format!("{path}[]"), seen);
            }
        }
        _ => {}
    }
}

#[test]
fn examples_match_the_json_schema() {
    let schema = policy::schema::json_schema();
    let mut seen = Vec::new();
    for f in ["two-guests-one-disk.toml", "net-and-disk.toml"] {
        let text = std::fs::read_to_string(example(f)).unwrap();
        let doc: Value =
            serde_json::to_value(toml::from_str::<toml::Value>(&text).unwrap()).unwrap();
        check(&schema, &schema, &doc, "", &mut seen);
    }
    for p in [
        ".device[].size",
        ".device[].restart.heartbeat",
        ".guest[].net[].share",
        ".guest[].disk[].read_only",
        ".restart.max_restarts",
    ] {
        assert!(seen.iter().any(|s| s == p), "{p} not checked; saw {seen:?}");
    }
}

#[test]
fn schema_names_every_key_with_a_description() {
    let schema = policy::schema::json_schema();
    let defs = &schema["$defs"];
    let table = [
        (&schema, policy::raw::ROOT_KEYS),
        (&defs["Device"], policy::raw::DEVICE_KEYS),
        (&defs["Guest"], policy::raw::GUEST_KEYS),
        (&defs["NetAccess"], policy::raw::NET_KEYS),
        (&defs["DiskAccess"], policy::raw::DISK_KEYS),
        (&defs["Restart"], policy::raw::RESTART_KEYS),
    ];
    for (s, keys) in table {
        let props = s["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("no properties: {s}"));
        let mut names: Vec<&str> = props.keys().map(String::as_str).collect();
        let mut want = keys.to_vec();
        names.sort_unstable();
        want.sort_unstable();
        assert_eq!(names, want, "the *_KEYS list and the schema disagree");
        for (k, v) in props {
            assert!(v.get("description").is_some(), "{k} has no description");
        }
    }
    let kinds = serde_json::to_string(&defs["DeviceKind"]).unwrap();
    assert!(
        kinds.contains("virtio-net") && kinds.contains("virtio-blk"),
        "{kinds}"
    );
}

#[test]
fn writes_the_schema() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.schema.json");
    policy::schema::write_json_schema(&path).unwrap();
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(v["title"], "idd policy");
}

/// The checked-in `policy.schema.json` is what the code generates (regenerate with
/// `UPDATE_SCHEMA=1 cargo test -p policy --test examples`).
#[test]
fn checked_in_schema_is_current() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("policy.schema.json");
    if std::env::var_os("UPDATE_SCHEMA").is_some() {
        policy::schema::write_json_schema(&path).unwrap();
    }
    let on_disk: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(
        on_disk,
        policy::schema::json_schema(),
        "run with UPDATE_SCHEMA=1 to regenerate"
    );
}
