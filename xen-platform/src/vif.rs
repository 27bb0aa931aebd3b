//! The netif XenStore handshake of a userspace network backend (what Linux 6.1's
//! xen-netfront reads and writes), kept apart from the I/O so it can be tested without Xen.
//!
//! # Keys
//!
//! The toolstack creates both directories ([`create`], as `xl network-attach` would): in the
//! backend's `/local/domain/<us>/backend/vif/<front>/<handle>`: `frontend`, `frontend-id`,
//! `online` = 1, `handle`, `mac`, `state`; in the frontend's `/local/domain/<front>/device/vif/
//! <handle>`: `backend`, `backend-id`, `handle`, `mac` (netfront refuses a device without it),
//! `state` = 1. The backend then writes ([`advertise`]):
//!
//! | key | value | why |
//! |---|---|---|
//! | `feature-rx-copy` | 1 | netfront's `xennet_connect` refuses a backend without it (`backend does not support copying receive path`) |
//! | `feature-rx-flip` | 0 | no page exchange: a userspace process on Xen cannot transfer pages (`GNTTABOP_transfer` is not reachable through gntdev) |
//! | `state` | 2 (InitWait), then 4 (Connected) | netfront connects on seeing 2 |
//!
//! Deliberately *not* offered, so that netfront stays on the one layout idd-net serves:
//! `multi-queue-max-queues` (netfront then uses one queue whose keys sit directly in its
//! directory), `feature-split-event-channels` (one `event-channel` for both rings),
//! `feature-sg` and `feature-gso-tcpv4/6` (netfront then turns scatter-gather and TSO off on
//! transmit; a linear frame may still span two pages, which idd-net's multi-slot path takes),
//! `feature-ipv6-csum-offload`, `feature-xdp-headroom`. IPv4 checksum offload stays on (no
//! `feature-no-csum-offload`): netfront marks such packets `NETTXF_csum_blank` and idd-net
//! completes the checksum.
//!
//! On InitWait netfront grants its two ring pages, allocates an event channel and writes
//! `tx-ring-ref`, `rx-ring-ref`, `event-channel`, `request-rx-copy` = 1, `feature-rx-notify`,
//! `feature-sg`, `feature-gso-tcpv4/6`, `feature-ipv6-csum-offload` (what *it* accepts on
//! receive; we send single-slot, non-GSO frames), then switches itself to 4 (Connected): the
//! backend waits for frontend state 4 (or 3), parses ([`FrontendRings::parse`]), attaches and
//! writes 4.
//!
//! # Restart
//!
//! A restarted backend finds its own `state` at 4: it touches neither state (netfront tears
//! the device down when the backend leaves Connected for Closing/Closed), reads the ring keys
//! again and re-attaches.
//!
//! Every value read from the frontend's directory is the guest's and untrusted: parsed
//! strictly, bounded, and refused with a clear error.

use crate::handshake::{self, DeviceClass, DevicePaths};
use crate::xenstore::{XenStore, XenStoreError};
use devchan::grant::{DomId, GrantRef};
use devchan::platform::Port;
use devchan::xenbus::XenbusState;

/// Why the handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum VifError {
    /// XenStore failed.
    #[error(transparent)]
    XenStore(#[from] XenStoreError),
    /// A frontend key is missing, malformed, or asks for something not offered.
    #[error("Frontend key {key}: {why}")]
    Frontend {
        /// The key.
        key: &'static str,
        /// What is wrong.
        why: String,
    },
}

/// The vif device class (`device/vif`, `backend/vif`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Vif;

impl DeviceClass for Vif {
    const NAME: &'static str = "vif";
}

/// The two directories of one virtual network interface: `VifPaths::new(back, front, handle)`.
pub type VifPaths = DevicePaths<Vif>;

/// What the frontend published for its single queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrontendRings {
    /// The transmit ring's grant (`tx-ring-ref`).
    pub tx_ring_ref: GrantRef,
    /// The receive ring's grant (`rx-ring-ref`).
    pub rx_ring_ref: GrantRef,
    /// The frontend's event-channel port (`event-channel`).
    pub event_channel: Port,
}

fn bad(key: &'static str, why: impl Into<String>) -> VifError {
    VifError::Frontend {
        key,
        why: why.into(),
    }
}

/// Parse a decimal key (digits only, an optional trailing newline, at most `max`).
fn number(key: &'static str, v: Option<&str>, max: u64) -> Result<u64, VifError> {
    handshake::number(v, max).map_err(|why| bad(key, why))
}

impl FrontendRings {
    /// Parse the frontend's keys, given a lookup of a key below its directory.
    pub fn parse(get: &mut dyn FnMut(&str) -> Option<String>) -> Result<Self, VifError> {
        if let Some(q) = get("multi-queue-num-queues") {
            if number("multi-queue-num-queues", Some(&q), 1024)? > 1 {
                return Err(bad(
                    "multi-queue-num-queues",
                    "multi-queue is not offered (one queue only)",
                ));
            }
        }
        // netfront writes per-queue keys under queue-N only with several queues.
        let rx_copy = number("request-rx-copy", get("request-rx-copy").as_deref(), 1).map_err(
            |e| match e {
                VifError::Frontend { why, .. } if why == "missing" => bad(
                    "request-rx-copy",
                    "missing: the frontend wants page exchange, which a Xen backend cannot do",
                ),
                e => e,
            },
        )?;
        if rx_copy != 1 {
            return Err(bad(
                "request-rx-copy",
                "0 (page exchange): a userspace Xen backend cannot transfer pages; copy only",
            ));
        }
        let max = u64::from(u32::MAX);
        let tx = number("tx-ring-ref", get("tx-ring-ref").as_deref(), max)?;
        let rx = number("rx-ring-ref", get("rx-ring-ref").as_deref(), max)?;
        let port = match get("event-channel") {
            Some(v) => number("event-channel", Some(&v), max)?,
            None if get("event-channel-tx").is_some() => {
                return Err(bad(
                    "event-channel",
                    "split event channels were not offered (event-channel-tx/-rx written)",
                ))
            }
            None => return Err(bad("event-channel", "missing")),
        };
        if tx == rx {
            return Err(bad(
                "rx-ring-ref",
                format!("{rx} is the transmit ring's grant too"),
            ));
        }
        // All three bounded by u32::MAX above.
        Ok(Self {
            tx_ring_ref: GrantRef::try_from(tx).unwrap_or(0),
            rx_ring_ref: GrantRef::try_from(rx).unwrap_or(0),
            event_channel: Port::try_from(port).unwrap_or(0),
        })
    }

    /// Read and parse the frontend's keys from XenStore.
    pub fn read(xs: &mut XenStore, paths: &VifPaths) -> Result<Self, VifError> {
        handshake::read_frontend(xs, &paths.front, Self::parse)
    }
}

/// The toolstack's part: create both directories of a new vif (as `xl network-attach` would)
/// for MAC `mac` (`xx:xx:xx:xx:xx:xx`). Ours starts in state 2 (InitWait), not 1: we are the
/// backend, already running, and a kernel netback loaded in the same domain probes every
/// `backend/vif` directory that appears in state 1.
///
/// Permissions first, on the parents (keys created below inherit them), then one key after
/// another, the frontend's `state` last (netfront acts on its directory once it is there).
pub fn create(
    xs: &mut XenStore,
    paths: &VifPaths,
    back: DomId,
    front: DomId,
    handle: u32,
    mac: &str,
) -> Result<(), VifError> {
    handshake::create(
        xs,
        paths,
        back,
        front,
        &[
            ("handle", handle.to_string()),
            ("mac", mac.into()),
            ("type", "vif".into()),
        ],
        &[("handle", handle.to_string()), ("mac", mac.into())],
    )?;
    Ok(())
}

/// A device end's state from XenStore (`Unknown` when missing or malformed).
pub fn state(xs: &mut XenStore, dir: &str) -> Result<XenbusState, VifError> {
    Ok(handshake::state(xs, dir)?)
}

/// The keys [`advertise`] writes, in order (state last).
pub fn features() -> [(&'static str, &'static str); 2] {
    [("feature-rx-copy", "1"), ("feature-rx-flip", "0")]
}

/// Write our features and InitWait, unless we are already Connected (a restart: nothing may
/// change under the connected frontend). Returns our state as found.
pub fn advertise(xs: &mut XenStore, paths: &VifPaths) -> Result<XenbusState, VifError> {
    let features = features().map(|(k, v)| (k, v.to_string()));
    let ours = handshake::write_features(xs, &paths.back, &features)?;
    if ours != XenbusState::Connected && ours != XenbusState::InitWait {
        handshake::set_state(xs, &paths.back, XenbusState::InitWait)?;
    }
    Ok(ours)
}

/// Connected: the rings are attached.
pub fn connect(xs: &mut XenStore, paths: &VifPaths) -> Result<(), VifError> {
    handshake::set_state(xs, &paths.back, XenbusState::Connected)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn keys(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect()
    }

    fn parse(m: &HashMap<String, String>) -> Result<FrontendRings, VifError> {
        FrontendRings::parse(&mut |k| m.get(k).cloned())
    }

    /// What Linux 6.1's netfront writes for one queue.
    fn linux() -> HashMap<String, String> {
        keys(&[
            ("tx-ring-ref", "8"),
            ("rx-ring-ref", "9"),
            ("event-channel", "5"),
            ("request-rx-copy", "1"),
            ("feature-rx-notify", "1"),
            ("feature-sg", "1"),
            ("feature-gso-tcpv4", "1"),
            ("feature-gso-tcpv6", "1"),
            ("feature-ipv6-csum-offload", "1"),
            ("mac", "00:16:3e:00:00:02"),
            ("handle", "0"),
        ])
    }

    fn why(r: Result<FrontendRings, VifError>) -> (&'static str, String) {
        match r {
            Err(VifError::Frontend { key, why }) => (key, why),
            other => panic!("expected a frontend error, got {other:?}"),
        }
    }

    #[test]
    fn linux_single_queue_keys_parse() {
        let r = parse(&linux()).unwrap();
        assert_eq!(
            r,
            FrontendRings {
                tx_ring_ref: 8,
                rx_ring_ref: 9,
                event_channel: 5
            }
        );
        let mut m = linux();
        m.insert("multi-queue-num-queues".into(), "1".into());
        m.insert("tx-ring-ref".into(), "4294967295\n".into());
        assert_eq!(parse(&m).unwrap().tx_ring_ref, u32::MAX);
    }

    #[test]
    fn hostile_and_unoffered_values_are_refused() {
        let cases: &[(&str, Option<&str>, &str)] = &[
            ("tx-ring-ref", None, "tx-ring-ref"),
            ("tx-ring-ref", Some(""), "tx-ring-ref"),
            ("tx-ring-ref", Some("-1"), "tx-ring-ref"),
            ("tx-ring-ref", Some("0x10"), "tx-ring-ref"),
            ("tx-ring-ref", Some(" 8"), "tx-ring-ref"),
            ("rx-ring-ref", Some("4294967296"), "rx-ring-ref"),
            (
                "rx-ring-ref",
                Some("99999999999999999999999"),
                "rx-ring-ref",
            ),
            ("rx-ring-ref", Some("8"), "rx-ring-ref"), // the tx ring's grant
            ("event-channel", None, "event-channel"),
            ("event-channel", Some("5\n\n"), "event-channel"),
            ("request-rx-copy", Some("0"), "request-rx-copy"),
            ("request-rx-copy", None, "request-rx-copy"),
            ("request-rx-copy", Some("2"), "request-rx-copy"),
            (
                "multi-queue-num-queues",
                Some("2"),
                "multi-queue-num-queues",
            ),
            (
                "multi-queue-num-queues",
                Some("x"),
                "multi-queue-num-queues",
            ),
        ];
        for (k, v, key) in cases {
            let mut m = linux();
            match v {
                Some(v) => m.insert((*k).to_string(), (*v).to_string()),
                None => m.remove(*k),
            };
            let (got, text) = why(parse(&m));
            assert_eq!(got, *key, "{k}={v:?}: {text}");
        }
        // Split event channels: named as such.
        let mut m = linux();
        m.remove("event-channel");
        m.insert("event-channel-tx".into(), "5".into());
        m.insert("event-channel-rx".into(), "6".into());
        let (_, text) = why(parse(&m));
        assert!(text.contains("split"), "{text}");
        // Page exchange: the error says why it cannot be served.
        let mut m = linux();
        m.insert("request-rx-copy".into(), "0".into());
        let (_, text) = why(parse(&m));
        assert!(text.contains("copy only"), "{text}");
        // A long hostile value is shortened in the message.
        let mut m = linux();
        m.insert("tx-ring-ref".into(), "A".repeat(5000));
        let (_, text) = why(parse(&m));
        assert!(text.len() < 120, "{text}");
    }

    #[test]
    fn paths_follow_the_xen_layout() {
        let p = VifPaths::new(0, 7, 1);
        assert_eq!(p.front, "/local/domain/7/device/vif/1");
        assert_eq!(p.back, "/local/domain/0/backend/vif/7/1");
        let names: Vec<_> = features().iter().map(|(k, _)| *k).collect();
        assert!(names.contains(&"feature-rx-copy"));
        assert!(!names
            .iter()
            .any(|k| k.contains("multi-queue") || k.contains("split")));
    }

    /// The whole handshake against an in-memory xenstored: the toolstack part, InitWait with
    /// the features, a Linux-like frontend's keys read back, Connected; then a restart finds
    /// itself Connected and writes nothing.
    #[test]
    fn handshake_over_xenstore_and_restart_leaves_it_alone() {
        let mut xs = crate::xenstore::testing::fake();
        let p = VifPaths::new(0, 3, 0);
        create(&mut xs, &p, 0, 3, 0, "00:16:3e:00:00:02").unwrap();
        let rd = |xs: &mut XenStore, k: &str| xs.read(k).unwrap();
        assert_eq!(
            rd(&mut xs, &format!("{}/mac", p.front)).as_deref(),
            Some("00:16:3e:00:00:02")
        );
        assert_eq!(
            rd(&mut xs, &format!("{}/backend", p.front)),
            Some(p.back.clone())
        );
        assert_eq!(
            rd(&mut xs, &format!("{}/frontend-id", p.back)).as_deref(),
            Some("3")
        );
        assert_eq!(
            rd(&mut xs, "/local/domain/3/device/vif/@perms").as_deref(),
            Some("n3\0r0\0")
        );
        assert_eq!(state(&mut xs, &p.back).unwrap(), XenbusState::InitWait);
        assert_eq!(state(&mut xs, &p.front).unwrap(), XenbusState::Initialising);
        assert_eq!(advertise(&mut xs, &p).unwrap(), XenbusState::InitWait);
        assert_eq!(
            rd(&mut xs, &format!("{}/feature-rx-copy", p.back)).as_deref(),
            Some("1")
        );
        // What netfront writes on seeing InitWait.
        for (k, v) in linux() {
            xs.write(&format!("{}/{k}", p.front), &v).unwrap();
        }
        xs.write(&format!("{}/state", p.front), "4").unwrap();
        let r = FrontendRings::read(&mut xs, &p).unwrap();
        assert_eq!((r.tx_ring_ref, r.rx_ring_ref, r.event_channel), (8, 9, 5));
        connect(&mut xs, &p).unwrap();
        assert_eq!(state(&mut xs, &p.back).unwrap(), XenbusState::Connected);
        // A restarted process: Connected stays, the features are not rewritten.
        xs.write(&format!("{}/feature-rx-copy", p.back), "marker")
            .unwrap();
        assert_eq!(advertise(&mut xs, &p).unwrap(), XenbusState::Connected);
        assert_eq!(
            rd(&mut xs, &format!("{}/feature-rx-copy", p.back)).as_deref(),
            Some("marker")
        );
        // A frontend that wrote garbage is refused through `read` too.
        xs.write(&format!("{}/rx-ring-ref", p.front), "9; rm -rf")
            .unwrap();
        assert!(matches!(
            FrontendRings::read(&mut xs, &p),
            Err(VifError::Frontend {
                key: "rx-ring-ref",
                ..
            })
        ));
    }

    proptest! {
        /// Any frontend directory either parses into values that are what it wrote, or is
        /// refused with an error naming a key; never a panic.
        #[test]
        fn arbitrary_directories_never_panic(
            vals in proptest::collection::vec(
                prop_oneof![
                    Just(None),
                    "[0-9]{1,12}".prop_map(Some),
                    ".{0,24}".prop_map(Some),
                ],
                6,
            )
        ) {
            let names = ["tx-ring-ref", "rx-ring-ref", "event-channel", "request-rx-copy",
                "multi-queue-num-queues", "event-channel-tx"];
            let m: HashMap<String, String> = names.iter().zip(&vals)
                .filter_map(|(k, v)| v.clone().map(|v| ((*k).to_string(), v)))
                .collect();
            match parse(&m) {
                Ok(r) => {
                    prop_assert_eq!(m.get("tx-ring-ref").map(|v| v.trim_end().parse::<u32>().ok()), Some(Some(r.tx_ring_ref)));
                    prop_assert_eq!(m.get("rx-ring-ref").map(|v| v.trim_end().parse::<u32>().ok()), Some(Some(r.rx_ring_ref)));
                    prop_assert_eq!(m.get("event-channel").map(|v| v.trim_end().parse::<u32>().ok()), Some(Some(r.event_channel)));
                    prop_assert_ne!(r.tx_ring_ref, r.rx_ring_ref);
                }
                Err(VifError::Frontend { key, .. }) => prop_assert!(names.contains(&key)),
                Err(e) => prop_assert!(false, "unexpected {e}"),
            }
        }
    }
}
