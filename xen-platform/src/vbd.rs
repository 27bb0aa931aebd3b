//! The blkif XenStore handshake of a userspace block backend (what Linux 6.1's xen-blkfront
//! reads and writes), kept apart from the I/O so it can be tested without Xen.
//!
//! # Keys
//!
//! The toolstack creates both directories (`frontend`, `frontend-id`, `online`, `mode`, `dev`,
//! ... in the backend's; `backend`, `backend-id`, `virtual-device`, `state` = 1 in the
//! frontend's; see `ci/xen-testbed/dom0/xs-nodes.sh`). The backend then writes, in its own
//! directory `/local/domain/<us>/backend/vbd/<front>/<devid>`:
//!
//! | key | value | read by blkfront |
//! |---|---|---|
//! | `sectors` | disk size in 512-byte sectors | at connect (required) |
//! | `sector-size` | 512 | at connect (required) |
//! | `info` | 0, or 4 (`VDISK_READONLY`) | at connect (required) |
//! | `feature-flush-cache` | 1 | flush requests (`BLKIF_OP_FLUSH_DISKCACHE`) |
//! | `feature-persistent` | 1 | the frontend reuses a fixed pool of grants |
//! | `feature-max-indirect-segments` | only with `--max-indirect-segments N` (N ≤ 16) | requests of up to N segments through indirect pages |
//! | `state` | 2 (InitWait), then 4 (Connected) | drives the frontend |
//!
//! No `max-ring-page-order` and no `multi-queue-max-queues`: blkfront then publishes one
//! single-page ring, as `ring-ref` and `event-channel` (and `protocol`, `feature-persistent`) in
//! its directory, and goes to 3 (Initialised). Without `feature-max-indirect-segments` (the
//! default: idd-blk's response to an indirect request carries operation 6, which Linux's
//! blkfront rejects) requests carry at most 11 segments.
//!
//! # Restart
//!
//! A restarted backend finds its own `state` at 4 and the frontend's at 4: it does not touch
//! either (a frontend that saw the backend leave Connected would tear down), reads the ring
//! keys again and re-attaches.
//!
//! Every value read from the frontend's directory is the guest's and untrusted: parsed
//! strictly, bounded, and refused with a clear error.

use crate::handshake::{self, DeviceClass, DevicePaths};
use crate::xenstore::{XenStore, XenStoreError};
use devchan::grant::{DomId, GrantRef};
use devchan::platform::Port;
use devchan::xenbus::XenbusState;

/// `VDISK_READONLY` in the `info` key.
pub const VDISK_READONLY: u32 = 4;

/// Why the handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum VbdError {
    /// XenStore failed.
    #[error(transparent)]
    XenStore(#[from] XenStoreError),
    /// A frontend key is missing or malformed.
    #[error("Frontend key {key}: {why}")]
    Frontend {
        /// The key.
        key: &'static str,
        /// What is wrong.
        why: String,
    },
}

/// The vbd device class (`device/vbd`, `backend/vbd`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Vbd;

impl DeviceClass for Vbd {
    const NAME: &'static str = "vbd";
}

/// The two directories of one virtual block device: `VbdPaths::new(back, front, devid)`.
pub type VbdPaths = DevicePaths<Vbd>;

/// What the frontend published.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrontendRing {
    /// The ring's grant.
    pub ring_ref: GrantRef,
    /// The frontend's event-channel port.
    pub event_channel: Port,
    /// Whether it uses persistent grants.
    pub persistent: bool,
}

/// Parse a decimal number key (no sign, no spaces but a trailing newline, at most `max`).
fn number(key: &'static str, v: Option<&str>, max: u64) -> Result<u64, VbdError> {
    handshake::number(v, max).map_err(|why| VbdError::Frontend { key, why })
}

impl FrontendRing {
    /// Parse the frontend's keys, given a lookup of the key below its directory.
    pub fn parse(get: &mut dyn FnMut(&str) -> Option<String>) -> Result<Self, VbdError> {
        if let Some(order) = get("ring-page-order") {
            if number("ring-page-order", Some(&order), 16)? != 0 {
                return Err(VbdError::Frontend {
                    key: "ring-page-order",
                    why: "multi-page rings are not offered".into(),
                });
            }
        }
        if let Some(q) = get("multi-queue-num-queues") {
            if number("multi-queue-num-queues", Some(&q), 256)? > 1 {
                return Err(VbdError::Frontend {
                    key: "multi-queue-num-queues",
                    why: "multi-queue is not offered".into(),
                });
            }
        }
        let ring = get("ring-ref").or_else(|| get("ring-ref0"));
        let ring_ref = number("ring-ref", ring.as_deref(), u64::from(u32::MAX))?;
        let port = number(
            "event-channel",
            get("event-channel").as_deref(),
            u64::from(u32::MAX),
        )?;
        match get("protocol").as_deref() {
            None | Some("x86_64-abi") => {}
            Some(other) => {
                return Err(VbdError::Frontend {
                    key: "protocol",
                    why: format!(
                        "{:?}: only the native x86_64 ABI is served",
                        other.chars().take(32).collect::<String>()
                    ),
                })
            }
        }
        let persistent = match get("feature-persistent") {
            None => false,
            Some(v) => number("feature-persistent", Some(&v), 1)? == 1,
        };
        // Both bounded by u32::MAX above.
        Ok(Self {
            ring_ref: GrantRef::try_from(ring_ref).unwrap_or(0),
            event_channel: Port::try_from(port).unwrap_or(0),
            persistent,
        })
    }
}

/// The toolstack's part: create both directories of a new vbd (as `xl block-attach` would)
/// for a disk `mode` `w` or `r`. The backend's starts in state 2 (InitWait), not 1: we are
/// the backend, already running, and a kernel backend driver loaded in the same domain
/// (xen-blkback) probes every `backend/vbd` directory that appears in state 1.
///
/// Permissions first, on the parents (`device/vbd` owned by the frontend and readable by us,
/// `backend/vbd/<front>` owned by us and readable by the frontend): keys created below them
/// inherit those, so a running guest that probes the moment its directory appears can already
/// read both sides. Then one key after another, the frontend's `backend` last but one and its
/// `state` last (blkfront acts on its directory only once `state` is there).
pub fn create(
    xs: &mut XenStore,
    paths: &VbdPaths,
    back: DomId,
    front: DomId,
    devid: u32,
    read_only: bool,
) -> Result<(), VbdError> {
    let mode = if read_only { "r" } else { "w" };
    handshake::create(
        xs,
        paths,
        back,
        front,
        &[
            ("mode", mode.into()),
            ("type", "phy".into()),
            ("dev", devid.to_string()),
        ],
        &[
            ("virtual-device", devid.to_string()),
            ("device-type", "disk".into()),
        ],
    )?;
    Ok(())
}

/// A device end's state from XenStore (`Unknown` when missing or malformed).
pub fn state(xs: &mut XenStore, dir: &str) -> Result<XenbusState, VbdError> {
    Ok(handshake::state(xs, dir)?)
}

/// Write our features and InitWait, unless we are already Connected (a restart: the
/// features are there and nothing may change under the connected frontend). Returns our state.
/// `max_indirect` is `feature-max-indirect-segments` (0: not offered).
pub fn advertise(
    xs: &mut XenStore,
    paths: &VbdPaths,
    sectors: u64,
    read_only: bool,
    max_indirect: u16,
) -> Result<XenbusState, VbdError> {
    let info = if read_only { VDISK_READONLY } else { 0 };
    let mut features = vec![
        ("sectors", sectors.to_string()),
        ("sector-size", "512".to_string()),
        ("info", info.to_string()),
        ("feature-flush-cache", "1".to_string()),
        ("feature-persistent", "1".to_string()),
    ];
    if max_indirect > 0 {
        features.push(("feature-max-indirect-segments", max_indirect.to_string()));
    }
    let ours = handshake::write_features(xs, &paths.back, &features)?;
    if ours == XenbusState::Connected {
        return Ok(ours);
    }
    handshake::set_state(xs, &paths.back, XenbusState::InitWait)?;
    Ok(XenbusState::InitWait)
}

/// Read what the frontend published.
pub fn frontend_ring(xs: &mut XenStore, paths: &VbdPaths) -> Result<FrontendRing, VbdError> {
    handshake::read_frontend(xs, &paths.front, FrontendRing::parse)
}

/// Mark us Connected.
pub fn connect(xs: &mut XenStore, paths: &VbdPaths) -> Result<(), VbdError> {
    handshake::set_state(xs, &paths.back, XenbusState::Connected)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn parse(keys: &[(&str, &str)]) -> Result<FrontendRing, VbdError> {
        let m: HashMap<String, String> = keys
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        FrontendRing::parse(&mut |k| m.get(k).cloned())
    }

    #[test]
    fn linux_blkfront_keys() {
        let r = parse(&[
            ("ring-ref", "8"),
            ("event-channel", "5"),
            ("protocol", "x86_64-abi"),
            ("feature-persistent", "1"),
        ])
        .unwrap();
        assert_eq!(
            r,
            FrontendRing {
                ring_ref: 8,
                event_channel: 5,
                persistent: true
            }
        );
        assert!(
            !parse(&[("ring-ref0", "8"), ("event-channel", "5")])
                .unwrap()
                .persistent
        );
        assert_eq!(
            VbdPaths::new(0, 3, 51712).back,
            "/local/domain/0/backend/vbd/3/51712"
        );
    }

    #[test]
    fn what_we_do_not_serve_is_refused() {
        for bad in [
            vec![("event-channel", "5")],
            vec![("ring-ref", "8")],
            vec![("ring-ref", "-8"), ("event-channel", "5")],
            vec![("ring-ref", "99999999999"), ("event-channel", "5")],
            vec![
                ("ring-ref", "8"),
                ("event-channel", "5"),
                ("protocol", "x86_32-abi"),
            ],
            vec![
                ("ring-ref", "8"),
                ("event-channel", "5"),
                ("ring-page-order", "2"),
            ],
            vec![
                ("ring-ref", "8"),
                ("event-channel", "5"),
                ("multi-queue-num-queues", "4"),
            ],
            vec![
                ("ring-ref", "8"),
                ("event-channel", "5"),
                ("feature-persistent", "2"),
            ],
        ] {
            assert!(parse(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn advertise_then_connect_and_a_restart_writes_nothing() {
        let mut xs = crate::xenstore::testing::fake();
        let p = VbdPaths::new(0, 3, 51712);
        assert_eq!(
            advertise(&mut xs, &p, 2048, true, 16).unwrap(),
            XenbusState::InitWait
        );
        let get = |xs: &mut XenStore, k: &str| xs.read(&format!("{}/{k}", p.back)).unwrap();
        assert_eq!(get(&mut xs, "sectors").as_deref(), Some("2048"));
        assert_eq!(get(&mut xs, "info").as_deref(), Some("4"));
        assert_eq!(get(&mut xs, "feature-persistent").as_deref(), Some("1"));
        assert_eq!(
            get(&mut xs, "feature-max-indirect-segments").as_deref(),
            Some("16")
        );
        assert_eq!(get(&mut xs, "state").as_deref(), Some("2"));
        for (k, v) in [("ring-ref", "9"), ("event-channel", "7"), ("state", "3")] {
            xs.write(&format!("{}/{k}", p.front), v).unwrap();
        }
        assert_eq!(state(&mut xs, &p.front).unwrap(), XenbusState::Initialised);
        let ring = frontend_ring(&mut xs, &p).unwrap();
        assert_eq!(
            (ring.ring_ref, ring.event_channel, ring.persistent),
            (9, 7, false)
        );
        connect(&mut xs, &p).unwrap();
        // A restarted backend: Connected stays, and different features are not written.
        assert_eq!(
            advertise(&mut xs, &p, 1, false, 0).unwrap(),
            XenbusState::Connected
        );
        assert_eq!(get(&mut xs, "sectors").as_deref(), Some("2048"));
        assert_eq!(get(&mut xs, "state").as_deref(), Some("4"));
    }

    #[test]
    fn create_writes_both_directories_with_their_owners() {
        let mut xs = crate::xenstore::testing::fake();
        let p = VbdPaths::new(0, 3, 51712);
        create(&mut xs, &p, 0, 3, 51712, false).unwrap();
        let r = |xs: &mut XenStore, k: &str| xs.read(k).unwrap();
        assert_eq!(
            r(&mut xs, &format!("{}/state", p.front)).as_deref(),
            Some("1")
        );
        assert_eq!(
            r(&mut xs, &format!("{}/backend", p.front)),
            Some(p.back.clone())
        );
        assert_eq!(
            r(&mut xs, &format!("{}/frontend-id", p.back)).as_deref(),
            Some("3")
        );
        assert_eq!(
            r(&mut xs, &format!("{}/mode", p.back)).as_deref(),
            Some("w")
        );
        assert_eq!(
            r(&mut xs, "/local/domain/3/device/vbd/@perms").as_deref(),
            Some("n3\0r0\0")
        );
        assert_eq!(
            r(&mut xs, "/local/domain/0/backend/vbd/3/@perms").as_deref(),
            Some("n0\0r3\0")
        );
    }

    proptest! {
        #[test]
        fn arbitrary_frontend_values_never_panic(r in ".{0,24}", e in ".{0,24}", p in ".{0,12}") {
            let _ = parse(&[("ring-ref", &r), ("event-channel", &e), ("feature-persistent", &p)]);
        }

        #[test]
        fn numbers_round_trip(n in 0u64..=u64::from(u32::MAX)) {
            prop_assert_eq!(number("k", Some(&n.to_string()), u64::from(u32::MAX)).unwrap(), n);
        }
    }
}
