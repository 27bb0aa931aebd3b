//! The toolstack's part of a guest disk: XenStore device nodes, and the channel description
//! the IDD process is started with.
//!
//! # Nodes (as Linux's xen-blkfront/xen-blkback and `libxl` use them)
//!
//! Frontend `/local/domain/<guest>/device/vbd/<devid>/`, owned by the guest, readable by the
//! IDD: `backend` (the backend directory's path), `backend-id`, `virtual-device` (`devid`),
//! `device-type` (`disk`), `state` (`1`, Initialising). The guest adds `ring-ref`,
//! `event-channel`, `protocol` and moves `state`.
//!
//! Backend `/local/domain/<idd>/backend/vbd/<guest>/<devid>/`, owned by the IDD, readable by
//! the guest: `frontend`, `frontend-id`, `online` (`1`), `removable` (`0`), `bootable` (`1`),
//! `type` (`phy`), `mode` (`w`/`r`), `params` (the device name), `device-type`, `sectors`
//! (the guest's region, 512-byte units), `sector-size` and `physical-sector-size` (`512`),
//! `info` (`VDISK_READONLY` = 4 for a read-only region), `feature-flush-cache` (`1`),
//! `feature-discard` (`0`), `feature-persistent` (`0`), `feature-max-indirect-segments`
//! (`idd_blk::journal::PINS_PER_SLOT`), and `state`: `2` (InitWait) at once; the manager
//! writes `4` (Connected) once the IDD process serves the channel. Domain 0 runs the backend's
//! half of the XenBus handshake because the IDD process keeps no state of its own (soft
//! state only): a restarted process is handed the same channels.

use std::fmt;
use std::os::unix::net::UnixStream;
use std::str::FromStr;
use std::sync::Arc;

use devchan::grant::{DomId, GrantRef};
use devchan::platform::Port;
use devchan::xenbus::XenbusState;
use devchan::xenstore::client::NO_TX;
use devchan::xenstore::perms::{Perm, PERM_READ};
use devchan::xenstore::{Client, ClientError, XsError};
use hypervisor::system::System;
use idd_blk::blkback::{ChannelConfig, Region};

/// Toolstack errors.
#[derive(Debug, thiserror::Error)]
pub enum ToolstackError {
    /// XenStore refused or failed.
    #[error("XenStore {op} {path}: {source}")]
    Store {
        /// Operation.
        op: &'static str,
        /// Path.
        path: String,
        /// Cause.
        #[source]
        source: ClientError,
    },
    /// A frontend key holds something that is not what the protocol allows.
    #[error("frontend key {key} = {value:?} is malformed")]
    Malformed {
        /// Path.
        key: String,
        /// Value (at most 32 bytes kept).
        value: String,
    },
    /// A channel description does not parse.
    #[error("channel {0:?}: want GUEST:RING_REF:PORT:OFFSET:SECTORS[:ro]")]
    BadChannel(String),
    /// Domain 0 could not look at a guest's ring page.
    #[error("ring of domain {dom} (grant {gref}): {msg}")]
    Ring {
        /// Guest.
        dom: DomId,
        /// Its ring grant.
        gref: GrantRef,
        /// What failed.
        msg: String,
    },
}

type Result<T> = std::result::Result<T, ToolstackError>;

pub mod vif;

/// One guest disk as the IDD process is told about it (`--channel`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelSpec {
    /// The frontend's domain.
    pub guest: DomId,
    /// Its ring grant.
    pub ring_ref: GrantRef,
    /// Its event-channel port.
    pub port: Port,
    /// Its region of the device.
    pub region: Region,
    /// Read-only.
    pub read_only: bool,
}

impl ChannelSpec {
    /// The blkback channel with its journal at `journal_frame`.
    pub fn config(&self, journal_frame: u64) -> ChannelConfig {
        ChannelConfig {
            guest: self.guest,
            ring_ref: self.ring_ref,
            remote_port: self.port,
            region: self.region,
            read_only: self.read_only,
            journal_frame,
        }
    }
}

impl fmt::Display for ChannelSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}:{}:{}{}",
            self.guest,
            self.ring_ref,
            self.port,
            self.region.offset,
            self.region.sectors,
            if self.read_only { ":ro" } else { "" }
        )
    }
}

impl FromStr for ChannelSpec {
    type Err = ToolstackError;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || ToolstackError::BadChannel(s.chars().take(80).collect());
        let f: Vec<&str> = s.split(':').collect();
        if !(5..=6).contains(&f.len()) {
            return Err(bad());
        }
        let num = |i: usize| f[i].parse::<u64>().map_err(|_| bad());
        let read_only = match f.get(5) {
            None => false,
            Some(&"ro") => true,
            Some(_) => return Err(bad()),
        };
        Ok(Self {
            guest: DomId::try_from(num(0)?).map_err(|_| bad())?,
            ring_ref: GrantRef::try_from(num(1)?).map_err(|_| bad())?,
            port: Port::try_from(num(2)?).map_err(|_| bad())?,
            region: Region {
                offset: num(3)?,
                sectors: num(4)?,
            },
            read_only,
        })
    }
}

/// The frontend directory of `guest`'s disk `devid`.
pub fn front_dir(guest: DomId, devid: u16) -> String {
    format!("/local/domain/{guest}/device/vbd/{devid}")
}

/// The backend directory in `idd` of `guest`'s disk `devid`.
pub fn back_dir(idd: DomId, guest: DomId, devid: u16) -> String {
    format!("/local/domain/{idd}/backend/vbd/{guest}/{devid}")
}

pub(crate) fn st<'a>(
    op: &'static str,
    path: &'a str,
) -> impl FnOnce(ClientError) -> ToolstackError + 'a {
    move |source| ToolstackError::Store {
        op,
        path: path.to_owned(),
        source,
    }
}

/// What the toolstack writes for one disk.
#[derive(Clone, Debug)]
pub struct VbdNodes {
    /// The guest.
    pub guest: DomId,
    /// The IDD.
    pub idd: DomId,
    /// Virtual device number.
    pub devid: u16,
    /// The guest's region size, in 512-byte sectors.
    pub sectors: u64,
    /// Read-only region.
    pub read_only: bool,
    /// The device's name (`params`).
    pub device: String,
}

/// Write both directories of `n` with their permissions, backend `InitWait`, in one
/// transaction (retried on conflict).
pub fn write_vbd(xs: &mut Client<UnixStream>, n: &VbdNodes) -> Result<()> {
    let fdir = front_dir(n.guest, n.devid);
    let bdir = back_dir(n.idd, n.guest, n.devid);
    let fperm = [Perm::new(n.guest, 0), Perm::new(n.idd, PERM_READ)];
    let bperm = [Perm::new(n.idd, 0), Perm::new(n.guest, PERM_READ)];
    let s = |v: &str| v.to_owned();
    let mut nodes: Vec<(String, String, &[Perm])> = vec![
        (format!("/local/domain/{}/device", n.guest), s(""), &fperm),
        (
            format!("/local/domain/{}/device/vbd", n.guest),
            s(""),
            &fperm,
        ),
        (fdir.clone(), s(""), &fperm),
    ];
    for (k, v) in [
        ("backend", bdir.clone()),
        ("backend-id", n.idd.to_string()),
        ("virtual-device", n.devid.to_string()),
        ("device-type", s("disk")),
        ("state", XenbusState::Initialising.to_xenstore()),
    ] {
        nodes.push((format!("{fdir}/{k}"), v, &fperm));
    }
    for d in [
        format!("/local/domain/{}/backend", n.idd),
        format!("/local/domain/{}/backend/vbd", n.idd),
        format!("/local/domain/{}/backend/vbd/{}", n.idd, n.guest),
        bdir.clone(),
    ] {
        nodes.push((d, s(""), &bperm));
    }
    let info = if n.read_only { "4" } else { "0" };
    for (k, v) in [
        ("frontend", fdir.clone()),
        ("frontend-id", n.guest.to_string()),
        ("online", s("1")),
        ("removable", s("0")),
        ("bootable", s("1")),
        ("type", s("phy")),
        ("mode", s(if n.read_only { "r" } else { "w" })),
        ("params", n.device.clone()),
        ("device-type", s("disk")),
        ("sectors", n.sectors.to_string()),
        ("sector-size", s("512")),
        ("physical-sector-size", s("512")),
        ("info", s(info)),
        ("feature-flush-cache", s("1")),
        ("feature-discard", s("0")),
        ("feature-persistent", s("0")),
        (
            "feature-max-indirect-segments",
            idd_blk::journal::PINS_PER_SLOT.to_string(),
        ),
        ("state", XenbusState::InitWait.to_xenstore()),
    ] {
        nodes.push((format!("{bdir}/{k}"), v, &bperm));
    }
    write_nodes(xs, &nodes)
}

/// Write `nodes` (path, value, permissions) in one transaction, retried on conflict.
pub(crate) fn write_nodes(
    xs: &mut Client<UnixStream>,
    nodes: &[(String, String, &[Perm])],
) -> Result<()> {
    loop {
        let tx = xs
            .transaction_start()
            .map_err(st("transaction_start", ""))?;
        for (path, value, perms) in nodes {
            xs.write(tx, path, value.as_bytes())
                .map_err(st("write", path))?;
            xs.set_perms(tx, path, perms)
                .map_err(st("set_perms", path))?;
        }
        match xs.transaction_end(tx, true) {
            Ok(()) => return Ok(()),
            Err(ClientError::Xs(XsError::Eagain)) => continue,
            Err(e) => return Err(st("transaction_end", "")(e)),
        }
    }
}

/// A XenBus state key, `Unknown` if missing or malformed.
pub fn read_state(xs: &mut Client<UnixStream>, path: &str) -> XenbusState {
    xs.read(NO_TX, path)
        .ok()
        .and_then(|v| XenbusState::from_xenstore(&v).ok())
        .unwrap_or(XenbusState::Unknown)
}

/// Set the backend `state` of `n`.
pub fn set_backend_state(xs: &mut Client<UnixStream>, n: &VbdNodes, s: XenbusState) -> Result<()> {
    let path = format!("{}/state", back_dir(n.idd, n.guest, n.devid));
    xs.write(NO_TX, &path, s.to_xenstore().as_bytes())
        .map_err(st("write", &path))
}

pub(crate) fn read_num(xs: &mut Client<UnixStream>, key: &str) -> Result<u32> {
    let v = xs.read(NO_TX, key).map_err(st("read", key))?;
    std::str::from_utf8(&v)
        .ok()
        .filter(|s| !s.is_empty() && s.len() <= 10 && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ToolstackError::Malformed {
            key: key.to_owned(),
            value: String::from_utf8_lossy(&v[..v.len().min(32)]).into_owned(),
        })
}

/// If the frontend of `n` is `Initialised` (or later), the ring it published: (ring-ref,
/// event-channel). Values come from the guest: parsed strictly, and the protocol must be
/// `x86_64-abi`.
pub fn frontend_ring(
    xs: &mut Client<UnixStream>,
    n: &VbdNodes,
) -> Result<Option<(GrantRef, Port)>> {
    let fdir = front_dir(n.guest, n.devid);
    let s = read_state(xs, &format!("{fdir}/state"));
    if !matches!(s, XenbusState::Initialised | XenbusState::Connected) {
        return Ok(None);
    }
    let key = format!("{fdir}/protocol");
    let proto = xs.read(NO_TX, &key).map_err(st("read", &key))?;
    if proto != b"x86_64-abi" {
        return Err(ToolstackError::Malformed {
            key,
            value: String::from_utf8_lossy(&proto[..proto.len().min(32)]).into_owned(),
        });
    }
    let gref = read_num(xs, &format!("{fdir}/ring-ref"))?;
    let port = read_num(xs, &format!("{fdir}/event-channel"))?;
    Ok(Some((gref, port)))
}

/// The reconnect signal: point the frontend of `n` at (a new) backend `idd`.
pub fn point_frontend(xs: &mut Client<UnixStream>, n: &VbdNodes) -> Result<()> {
    let fdir = front_dir(n.guest, n.devid);
    let bdir = back_dir(n.idd, n.guest, n.devid);
    for (k, v) in [("backend", bdir), ("backend-id", n.idd.to_string())] {
        let p = format!("{fdir}/{k}");
        xs.write(NO_TX, &p, v.as_bytes()).map_err(st("write", &p))?;
    }
    Ok(())
}

/// Domain 0's view of a guest's shared ring header (`req_prod` at 0, `rsp_prod` at 8 of the
/// `blkif_sring`): for recovery timing, and for fault injection.
#[derive(Clone)]
pub struct RingView {
    sys: Arc<System>,
    /// The guest.
    pub guest: DomId,
    /// Its ring grant.
    pub gref: GrantRef,
}

/// Offset of `req_prod` in the shared ring.
const REQ_PROD: usize = 0;
/// Offset of `rsp_prod` in the shared ring.
const RSP_PROD: usize = 8;

impl RingView {
    /// The ring `gref` of `guest`.
    pub fn new(sys: Arc<System>, guest: DomId, gref: GrantRef) -> Self {
        Self { sys, guest, gref }
    }

    fn frame(&self) -> Result<(Arc<hypervisor::domain::Domain>, u64)> {
        let err = |msg: String| ToolstackError::Ring {
            dom: self.guest,
            gref: self.gref,
            msg,
        };
        let d = self
            .sys
            .domain(self.guest)
            .map_err(|e| err(e.to_string()))?;
        let frame = d
            .grant_entries()
            .frame(self.gref)
            .map_err(|e| err(e.to_string()))?;
        Ok((d, u64::from(frame)))
    }

    fn word(&self, off: usize) -> Result<u32> {
        let (d, frame) = self.frame()?;
        let mut b = [0u8; 4];
        d.memory()
            .read(frame, off, &mut b)
            .map_err(|e| ToolstackError::Ring {
                dom: self.guest,
                gref: self.gref,
                msg: e.to_string(),
            })?;
        Ok(u32::from_le_bytes(b))
    }

    /// (`req_prod`, `rsp_prod`) as they are now (a snapshot; either may move at once).
    pub fn indexes(&self) -> Result<(u32, u32)> {
        Ok((self.word(REQ_PROD)?, self.word(RSP_PROD)?))
    }

    /// Fault injection: make `req_prod` claim more requests than the ring holds, as a
    /// corrupted or hostile frontend would, and keep it so for `hold` (the real frontend
    /// rewrites `req_prod` at its next push).
    pub fn corrupt(&self, hold: std::time::Duration) -> Result<()> {
        let (d, frame) = self.frame()?;
        let until = std::time::Instant::now() + hold;
        loop {
            let rsp = self.word(RSP_PROD)?;
            let bogus = rsp.wrapping_add(10_000);
            d.memory()
                .write(frame, REQ_PROD, &bogus.to_le_bytes())
                .map_err(|e| ToolstackError::Ring {
                    dom: self.guest,
                    gref: self.gref,
                    msg: e.to_string(),
                })?;
            if std::time::Instant::now() >= until {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_spec_round_trips() {
        let c = ChannelSpec {
            guest: 3,
            ring_ref: 9,
            port: 4,
            region: Region {
                offset: 2048,
                sectors: 4096,
            },
            read_only: true,
        };
        assert_eq!(c.to_string(), "3:9:4:2048:4096:ro");
        assert_eq!(c.to_string().parse::<ChannelSpec>().unwrap(), c);
        let rw = ChannelSpec {
            read_only: false,
            ..c
        };
        assert_eq!(rw.to_string().parse::<ChannelSpec>().unwrap(), rw);
    }

    #[test]
    fn channel_spec_rejects_garbage() {
        for s in [
            "",
            "1:2:3:4",
            "1:2:3:4:5:rw",
            "70000:1:1:1:1",
            "1:x:3:4:5",
            "1:2:3:4:5:ro:7",
        ] {
            assert!(s.parse::<ChannelSpec>().is_err(), "{s}");
        }
    }

    #[test]
    fn paths() {
        assert_eq!(front_dir(2, 51712), "/local/domain/2/device/vbd/51712");
        assert_eq!(back_dir(1, 2, 51712), "/local/domain/1/backend/vbd/2/51712");
    }
}
