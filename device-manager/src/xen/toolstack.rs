//! The toolstack's part on a real Xen host: find a guest's domain id by its name and write
//! the frontend and backend XenStore directories of its devices, as `xl block-attach` /
//! `network-attach` would, for backends that are our userspace programs.
//!
//! # Nodes (what Linux 6.1's xen-blkfront and xen-netfront read)
//!
//! A vbd: [`xen_platform::vbd::create`] (documented there). A vif, with `F =
//! /local/domain/<guest>/device/vif/<handle>` and `B = /local/domain/<us>/backend/vif/<guest>/<handle>`:
//!
//! | key | value | who reads it |
//! |---|---|---|
//! | `B/frontend`, `B/frontend-id` | `F`, the guest's id | the backend |
//! | `B/online` | 1 | the backend (0 asks it to close) |
//! | `B/handle`, `B/mac` | handle, the guest's MAC | the backend |
//! | `B/state` | 2 (InitWait) | netfront (starts connecting), the backend |
//! | `F/backend-id`, `F/handle`, `F/mac` | our id, handle, MAC | netfront (`mac` is its address) |
//! | `F/backend` | `B` | netfront: where to find the backend |
//! | `F/state` | 1 (Initialising), written last | netfront probes the device once it is there |
//!
//! The backend's directory starts in state 2, not 1: its backend is our process, started
//! right after, and a kernel backend module loaded in the same domain (xen-netback,
//! xen-blkback) probes every `backend/vif` or `backend/vbd` directory that appears in state 1.
//! The features (`feature-rx-copy`, `sectors`, ...) are the backend's to write; netfront and
//! blkfront read them only once the backend is Connected.
//!
//! Permissions are set on the parents first (`device/vif` owned by the guest and readable by
//! us, `backend/vif/<guest>` owned by us and readable by the guest): new nodes inherit their
//! parent's, so a running guest that probes the moment its directory appears can already read
//! both sides (the testbed saw a probe fail with `-ENOENT` when the permissions came after).
//!
//! A directory whose backend `state` already exists is left alone: its backend is connected
//! (or being connected) and rewriting it would disturb the guest.
//!
//! # Two clients
//!
//! Writes go through [`xen_platform::xenstore::XenStore`] (the client `xen-blkback` uses, and
//! so [`xen_platform::vbd::create`]); the domain lookup needs `XS_DIRECTORY`, which that
//! minimal client does not have, so it uses `devchan`'s full client on its own connection.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use devchan::grant::DomId;
use devchan::xenbus::XenbusState;
use devchan::xenstore::client::{Client, ClientError, NO_TX};
use devchan::xenstore::XsError;
use policy::MacAddr;
use xen_platform::vbd::{self, VbdError, VbdPaths};
use xen_platform::xenstore::{XenStore, XenStoreError};

/// Why the toolstack failed.
#[derive(Debug, thiserror::Error)]
pub enum ToolstackError {
    /// A write or read failed.
    #[error(transparent)]
    XenStore(#[from] XenStoreError),
    /// The vbd helper failed.
    #[error(transparent)]
    Vbd(#[from] VbdError),
    /// The domain listing failed.
    #[error("listing XenStore's domains")]
    Lookup(#[from] ClientError),
    /// Connecting failed.
    #[error("connecting to XenStore at {path}")]
    Connect {
        /// The socket or device.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A byte stream to xenstored: its socket or the xenbus device.
pub trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// `devchan`'s client on `path` (a Unix socket, else a device such as `/dev/xen/xenbus`).
pub fn lookup_client(path: &Path) -> Result<Client<Box<dyn Stream>>, ToolstackError> {
    let io: Box<dyn Stream> = match UnixStream::connect(path) {
        Ok(s) => Box::new(s),
        Err(_) => Box::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(|source| ToolstackError::Connect {
                    path: path.display().to_string(),
                    source,
                })?,
        ),
    };
    Ok(Client::new(io))
}

/// The id of the domain whose `/local/domain/<id>/name` is `name`, if any. Entries that are
/// not decimal domain ids, or whose name cannot be read (a domain being destroyed), are
/// skipped; the lowest matching id wins (xl refuses two domains of one name anyway).
pub fn find_domain<T: Read + Write>(
    c: &mut Client<T>,
    name: &str,
) -> Result<Option<DomId>, ToolstackError> {
    // No `/local/domain` yet: no domain yet (xenstored just started).
    let entries = match c.directory(NO_TX, "/local/domain") {
        Ok(e) => e,
        Err(ClientError::Xs(XsError::Enoent)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut ids: Vec<DomId> = entries
        .iter()
        .filter(|e| !e.is_empty() && e.len() <= 5 && e.bytes().all(|b| b.is_ascii_digit()))
        .filter_map(|e| e.parse().ok())
        .collect();
    ids.sort_unstable();
    for id in ids {
        match c.read(NO_TX, &format!("/local/domain/{id}/name")) {
            Ok(v) if v == name.as_bytes() => return Ok(Some(id)),
            Ok(_) | Err(ClientError::Xs(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(None)
}

/// Our own domain id (`domid` relative to our home, as Xen writes it for every domain;
/// 0 when missing, as for dom0 before `xen-init-dom0`).
pub fn own_domid(xs: &mut XenStore) -> DomId {
    xs.read_u64("domid")
        .ok()
        .flatten()
        .and_then(|d| DomId::try_from(d).ok())
        .unwrap_or(0)
}

/// The two directories of one vif.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VifPaths {
    /// The frontend's directory.
    pub front: String,
    /// The backend's.
    pub back: String,
}

impl VifPaths {
    /// The standard paths of `front`'s vif `handle` served by `back`.
    pub fn new(back: DomId, front: DomId, handle: u32) -> Self {
        Self {
            front: format!("/local/domain/{front}/device/vif/{handle}"),
            back: format!("/local/domain/{back}/backend/vif/{front}/{handle}"),
        }
    }
}

/// Whether a backend directory exists already (its `state` is there).
fn exists(xs: &mut XenStore, back: &str) -> Result<bool, XenStoreError> {
    Ok(xs.read(&format!("{back}/state"))?.is_some())
}

/// Parents first, with the device's owners: the frontend's parent owned by the guest and
/// readable by us, ours owned by us and readable by the guest.
fn parents(
    xs: &mut XenStore,
    front: &str,
    back: &str,
    fd: DomId,
    bd: DomId,
) -> Result<(), XenStoreError> {
    for (dir, owner, reader) in [(front, fd, bd), (back, bd, fd)] {
        let parent = dir.rsplit_once('/').map_or(dir, |(p, _)| p);
        if xs.read(parent)?.is_none() {
            xs.write(parent, "")?;
        }
        xs.set_perms(parent, &[format!("n{owner}"), format!("r{reader}")])?;
    }
    Ok(())
}

/// The keys of a new vif, in the order they are written (the frontend's `state` last).
pub fn vif_nodes(
    p: &VifPaths,
    back: DomId,
    front: DomId,
    handle: u32,
    mac: MacAddr,
) -> Vec<(String, String)> {
    let (b, f) = (&p.back, &p.front);
    let (h, m) = (handle.to_string(), mac.to_string());
    vec![
        (format!("{b}/frontend"), f.clone()),
        (format!("{b}/frontend-id"), front.to_string()),
        (format!("{b}/online"), "1".into()),
        (format!("{b}/handle"), h.clone()),
        (format!("{b}/mac"), m.clone()),
        (format!("{b}/state"), XenbusState::InitWait.to_xenstore()),
        (format!("{f}/backend-id"), back.to_string()),
        (format!("{f}/handle"), h),
        (format!("{f}/mac"), m),
        (format!("{f}/backend"), b.clone()),
        (
            format!("{f}/state"),
            XenbusState::Initialising.to_xenstore(),
        ),
    ]
}

/// Write a vif's directories unless its backend directory exists. Returns the paths and
/// whether it wrote them.
pub fn write_vif(
    xs: &mut XenStore,
    back: DomId,
    front: DomId,
    handle: u32,
    mac: MacAddr,
) -> Result<(VifPaths, bool), ToolstackError> {
    let p = VifPaths::new(back, front, handle);
    if exists(xs, &p.back)? {
        return Ok((p, false));
    }
    parents(xs, &p.front, &p.back, front, back)?;
    for (k, v) in vif_nodes(&p, back, front, handle, mac) {
        xs.write(&k, &v)?;
    }
    Ok((p, true))
}

/// Write a vbd's directories ([`vbd::create`]) unless its backend directory exists.
pub fn write_vbd(
    xs: &mut XenStore,
    back: DomId,
    front: DomId,
    devid: u32,
    read_only: bool,
) -> Result<(VbdPaths, bool), ToolstackError> {
    let p = VbdPaths::new(back, front, devid);
    if exists(xs, &p.back)? {
        return Ok((p, false));
    }
    vbd::create(xs, &p, back, front, devid, read_only)?;
    Ok((p, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vif_nodes_end_with_the_frontend_state() {
        let p = VifPaths::new(0, 3, 1);
        assert_eq!(p.back, "/local/domain/0/backend/vif/3/1");
        let n = vif_nodes(&p, 0, 3, 1, MacAddr([0, 0x16, 0x3e, 0, 0, 2]));
        let last = n.last().unwrap();
        assert_eq!(
            last,
            &("/local/domain/3/device/vif/1/state".into(), "1".into())
        );
        let get = |k: &str| {
            n.iter()
                .find(|(p, _)| p.ends_with(k))
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("/device/vif/1/mac"), Some("00:16:3e:00:00:02"));
        assert_eq!(
            get("/device/vif/1/backend"),
            Some("/local/domain/0/backend/vif/3/1")
        );
        assert_eq!(get("backend/vif/3/1/state"), Some("2"));
        assert_eq!(get("backend/vif/3/1/frontend-id"), Some("3"));
        // The frontend's `backend` comes after everything of the backend's directory.
        let at = |k: &str| n.iter().position(|(p, _)| p.ends_with(k)).unwrap();
        assert!(at("/device/vif/1/backend") > at("backend/vif/3/1/state"));
    }
}
