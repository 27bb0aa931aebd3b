//! The toolstack's part on a real Xen host: find a guest's domain id by its name and write
//! the frontend and backend XenStore directories of its devices, as `xl block-attach` /
//! `network-attach` would, for backends that are our userspace programs.
//!
//! # Nodes (what Linux 6.1's xen-blkfront and xen-netfront read)
//!
//! A vbd: [`xen_platform::vbd::create`]; a vif: [`xen_platform::vif::create`] (the keys
//! are documented there; the same ones `xen-blkback --create` and `xen-netback --create`
//! write). Both start the backend's directory in state 2 (InitWait), not 1: its backend is
//! our process, started right after, and a kernel backend module loaded in the same domain
//! (xen-blkback, xen-netback) probes every `backend/vbd` or `backend/vif` directory that
//! appears in state 1. The features (`sectors`, `feature-rx-copy`, ...) are the backend's to
//! write; blkfront and netfront read them only once the backend is Connected. Both set the
//! permissions on the parents first (`device/vif` owned by the guest and readable by us,
//! `backend/vif/<guest>` owned by us and readable by the guest): new nodes inherit them, so a
//! running guest that probes the moment its directory appears can already read both sides.
//!
//! A directory whose backend `state` already exists is left alone: its backend is connected
//! (or being connected) and rewriting it would disturb the guest.
//!
//! # Two clients
//!
//! Writes go through [`xen_platform::xenstore::XenStore`] (the client of the backends, and
//! so of `vbd::create` and `vif::create`); the domain lookup needs `XS_DIRECTORY`, which that
//! minimal client does not have, so it uses `devchan`'s full client on its own connection.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use devchan::grant::DomId;
use devchan::xenstore::client::{Client, ClientError, NO_TX};
use devchan::xenstore::XsError;
use policy::MacAddr;
use xen_platform::vbd::{self, VbdError, VbdPaths};
pub use xen_platform::vif::VifPaths;
use xen_platform::vif::{self, VifError};
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
    /// The vif helper failed.
    #[error(transparent)]
    Vif(#[from] VifError),
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

/// Our own domain id: the backend programs' own reading of it.
pub use xen_platform::program::own_domid;

/// Whether a backend directory exists already (its `state` is there).
fn exists(xs: &mut XenStore, back: &str) -> Result<bool, XenStoreError> {
    Ok(xs.read(&format!("{back}/state"))?.is_some())
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
    vif::create(xs, &p, back, front, handle, &mac.to_string())?;
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
    use hypervisor::xenstored::socket::SocketServer;
    use hypervisor::xenstored::Xenstored;

    #[test]
    fn an_empty_store_has_no_domains_yet() {
        let t = tempfile::tempdir().unwrap();
        let sock = t.path().join("xs");
        let _h = SocketServer::bind(&sock, Xenstored::new())
            .unwrap()
            .spawn()
            .unwrap();
        let mut c = lookup_client(&sock).unwrap();
        // xenstored just started: no /local/domain at all is "not there yet", not an error.
        assert_eq!(find_domain(&mut c, "domu").unwrap(), None);
        let mut xs = XenStore::open(&sock).unwrap();
        assert!(!exists(&mut xs, "/local/domain/0/backend/vbd/1/51712").unwrap());
        assert!(lookup_client(&t.path().join("nothing")).is_err());
    }
}
