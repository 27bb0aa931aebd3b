//! The XenStore handshake steps every split-driver device shares (what [`crate::vbd`] and
//! [`crate::vif`] have in common), kept apart from the device-specific keys.
//!
//! A device has two directories: the frontend's `/local/domain/<front>/device/<class>/<id>`
//! and the backend's `/local/domain/<back>/backend/<class>/<front>/<id>` ([`DevicePaths`]).
//! Each holds a `state` key, a [`XenbusState`] in decimal, that drives the other end:
//!
//! 1. The toolstack ([`create`]) sets the owner and reader of both parent directories (keys
//!    created below inherit them, so a guest that probes at once can already read both
//!    sides), then writes the backend's `frontend`, `frontend-id`, `online` = 1, the class's
//!    keys and `state` = 2; then the frontend's `backend-id`, the class's keys, `backend` and
//!    `state` = 1, last (a Linux frontend acts on its directory once `state` is there).
//! 2. The backend writes its features ([`write_features`]) and InitWait, unless it is already
//!    Connected (a restart: nothing may change under a connected frontend).
//! 3. The frontend publishes its ring keys (read with [`read_frontend`], each device parses
//!    its own: they are the guest's and untrusted, see [`number`]) and goes to 3 or 4.
//! 4. The backend attaches and writes 4 ([`set_state`]).

use crate::xenstore::{XenStore, XenStoreError};
use devchan::grant::DomId;
use devchan::xenbus::XenbusState;
use std::marker::PhantomData;

/// A device class: the directory name below `device/` and `backend/`.
pub trait DeviceClass {
    /// `vbd`, `vif`, ...
    const NAME: &'static str;
}

/// The two directories of one device of class `C`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevicePaths<C> {
    /// The frontend's directory.
    pub front: String,
    /// Ours.
    pub back: String,
    class: PhantomData<C>,
}

impl<C: DeviceClass> DevicePaths<C> {
    /// The standard paths for `front` domain's device `id`, served by domain `back`.
    pub fn new(back: DomId, front: DomId, id: u32) -> Self {
        let class = C::NAME;
        Self {
            front: format!("/local/domain/{front}/device/{class}/{id}"),
            back: format!("/local/domain/{back}/backend/{class}/{front}/{id}"),
            class: PhantomData,
        }
    }
}

/// The toolstack's part (step 1): both directories of a new device, with `back_keys` and
/// `front_keys` (names relative to each directory) between the common keys. The backend's
/// starts in state 2 (InitWait), not 1: the backend is already running, and a kernel backend
/// driver loaded in the same domain probes every directory of its class appearing in state 1.
pub fn create<C>(
    xs: &mut XenStore,
    paths: &DevicePaths<C>,
    back: DomId,
    front: DomId,
    back_keys: &[(&str, String)],
    front_keys: &[(&str, String)],
) -> Result<(), XenStoreError> {
    let parent = |p: &str| {
        p.rsplit_once('/')
            .map_or(String::new(), |(a, _)| a.to_string())
    };
    let (fp, bp) = (parent(&paths.front), parent(&paths.back));
    for (dir, owner, reader) in [(&fp, front, back), (&bp, back, front)] {
        if xs.read(dir)?.is_none() {
            xs.write(dir, "")?;
        }
        xs.set_perms(dir, &[format!("n{owner}"), format!("r{reader}")])?;
    }
    let b = &paths.back;
    let f = &paths.front;
    let mut keys = vec![
        (format!("{b}/frontend"), f.clone()),
        (format!("{b}/frontend-id"), front.to_string()),
        (format!("{b}/online"), "1".into()),
    ];
    keys.extend(
        back_keys
            .iter()
            .map(|(k, v)| (format!("{b}/{k}"), v.clone())),
    );
    keys.push((format!("{b}/state"), XenbusState::InitWait.to_xenstore()));
    keys.push((format!("{f}/backend-id"), back.to_string()));
    keys.extend(
        front_keys
            .iter()
            .map(|(k, v)| (format!("{f}/{k}"), v.clone())),
    );
    keys.push((format!("{f}/backend"), b.clone()));
    keys.push((
        format!("{f}/state"),
        XenbusState::Initialising.to_xenstore(),
    ));
    for (k, v) in keys {
        xs.write(&k, &v)?;
    }
    Ok(())
}

/// A device end's state from XenStore (`Unknown` when missing or malformed).
pub fn state(xs: &mut XenStore, dir: &str) -> Result<XenbusState, XenStoreError> {
    Ok(xs
        .read(&format!("{dir}/state"))?
        .and_then(|v| XenbusState::from_xenstore(v.as_bytes()).ok())
        .unwrap_or(XenbusState::Unknown))
}

/// Write `state` into directory `dir`.
pub fn set_state(xs: &mut XenStore, dir: &str, state: XenbusState) -> Result<(), XenStoreError> {
    xs.write(&format!("{dir}/state"), &state.to_xenstore())
}

/// Step 2 without the state: write `features` (relative to `back`) in order, unless our state
/// is Connected already (a restart: then nothing is written). Returns our state as found; the
/// caller writes InitWait.
pub fn write_features(
    xs: &mut XenStore,
    back: &str,
    features: &[(&str, String)],
) -> Result<XenbusState, XenStoreError> {
    let ours = state(xs, back)?;
    if ours != XenbusState::Connected {
        for (k, v) in features {
            xs.write(&format!("{back}/{k}"), v)?;
        }
    }
    Ok(ours)
}

/// Parse the keys below the frontend's directory `front` with `parse`, given a lookup of a
/// key: a XenStore failure (the first) wins over what `parse` made of the missing values.
pub fn read_frontend<T, E: From<XenStoreError>>(
    xs: &mut XenStore,
    front: &str,
    parse: impl FnOnce(&mut dyn FnMut(&str) -> Option<String>) -> Result<T, E>,
) -> Result<T, E> {
    let mut err = None;
    let r = parse(&mut |k| match xs.read(&format!("{front}/{k}")) {
        Ok(v) => v,
        Err(e) => {
            err.get_or_insert(e);
            None
        }
    });
    match err {
        Some(e) => Err(e.into()),
        None => r,
    }
}

/// Parse a frontend's decimal key (digits only, an optional trailing newline, at most `max`).
/// The error is what is wrong, for the caller's error naming the key: `missing`, or the value
/// (at most 32 characters of it) and why.
pub fn number(v: Option<&str>, max: u64) -> Result<u64, String> {
    let v = v.ok_or_else(|| "missing".to_string())?;
    let t = v.strip_suffix('\n').unwrap_or(v);
    if t.is_empty() || t.len() > 20 || !t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "not a decimal number: {:?}",
            v.chars().take(32).collect::<String>()
        ));
    }
    t.parse::<u64>()
        .ok()
        .filter(|n| *n <= max)
        .ok_or_else(|| format!("{t} out of range (max {max})"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq)]
    struct Test;
    impl DeviceClass for Test {
        const NAME: &'static str = "test";
    }

    #[test]
    fn paths_follow_the_xen_layout() {
        let p = DevicePaths::<Test>::new(0, 7, 1);
        assert_eq!(p.front, "/local/domain/7/device/test/1");
        assert_eq!(p.back, "/local/domain/0/backend/test/7/1");
    }

    #[test]
    fn create_orders_the_keys_and_sets_the_owners() {
        let mut xs = crate::xenstore::testing::fake();
        let p = DevicePaths::<Test>::new(0, 3, 2);
        create(
            &mut xs,
            &p,
            0,
            3,
            &[("b-key", "b".into())],
            &[("f-key", "f".into())],
        )
        .unwrap();
        let rd = |xs: &mut XenStore, k: &str| xs.read(k).unwrap();
        for (k, v) in [
            (format!("{}/frontend", p.back), p.front.as_str()),
            (format!("{}/frontend-id", p.back), "3"),
            (format!("{}/online", p.back), "1"),
            (format!("{}/b-key", p.back), "b"),
            (format!("{}/state", p.back), "2"),
            (format!("{}/backend-id", p.front), "0"),
            (format!("{}/f-key", p.front), "f"),
            (format!("{}/backend", p.front), p.back.as_str()),
            (format!("{}/state", p.front), "1"),
            ("/local/domain/3/device/test/@perms".into(), "n3\0r0\0"),
            ("/local/domain/0/backend/test/3/@perms".into(), "n0\0r3\0"),
        ] {
            assert_eq!(rd(&mut xs, &k).as_deref(), Some(v), "{k}");
        }
    }

    #[test]
    fn features_are_not_rewritten_once_connected() {
        let mut xs = crate::xenstore::testing::fake();
        let p = DevicePaths::<Test>::new(0, 3, 0);
        assert_eq!(state(&mut xs, &p.back).unwrap(), XenbusState::Unknown);
        let f = [("feature-x", "1".to_string())];
        assert_eq!(
            write_features(&mut xs, &p.back, &f).unwrap(),
            XenbusState::Unknown
        );
        set_state(&mut xs, &p.back, XenbusState::Connected).unwrap();
        xs.write(&format!("{}/feature-x", p.back), "marker")
            .unwrap();
        assert_eq!(
            write_features(&mut xs, &p.back, &f).unwrap(),
            XenbusState::Connected
        );
        assert_eq!(
            xs.read(&format!("{}/feature-x", p.back))
                .unwrap()
                .as_deref(),
            Some("marker")
        );
        xs.write(&format!("{}/k", p.front), "7").unwrap();
        let got: Result<u64, XenStoreError> = read_frontend(&mut xs, &p.front, |get| {
            Ok(number(get("k").as_deref(), 9).unwrap())
        });
        assert_eq!(got.unwrap(), 7);
    }

    #[test]
    fn numbers_are_strict() {
        for bad in ["", "-1", "0x10", " 8", "8\n\n", "4294967296"] {
            assert!(number(Some(bad), u64::from(u32::MAX)).is_err(), "{bad:?}");
        }
        assert_eq!(number(None, 1).unwrap_err(), "missing");
        assert_eq!(number(Some("8\n"), 8).unwrap(), 8);
        assert!(number(Some(&"A".repeat(5000)), 1).unwrap_err().len() < 80);
    }

    proptest! {
        #[test]
        fn numbers_round_trip(n in 0u64..=u64::from(u32::MAX)) {
            prop_assert_eq!(number(Some(&n.to_string()), u64::from(u32::MAX)).unwrap(), n);
        }

        #[test]
        fn arbitrary_values_never_panic(v in ".{0,40}") {
            let _ = number(Some(&v), u64::MAX);
        }
    }
}
