//! The toolstack's part of a guest NIC: XenStore `vif` nodes, and the channel description
//! the `idd-net` process is started with.
//!
//! # Nodes (as Linux's xen-netfront/xen-netback and `libxl` use them)
//!
//! Frontend `/local/domain/<guest>/device/vif/<devid>/`, owned by the guest, readable by the
//! IDD: `backend`, `backend-id`, `handle` (`devid`), `mac`, `state` (`1`). The guest adds
//! `tx-ring-ref`, `rx-ring-ref`, `event-channel`, `request-rx-copy` (`1`: grant copy into
//! posted buffers, `0`: page exchange), `feature-rx-notify`, `feature-sg`, and moves `state`
//! to `Connected` (Linux netfront skips `Initialised`).
//!
//! Backend `/local/domain/<idd>/backend/vif/<guest>/<devid>/`, owned by the IDD, readable by
//! the guest: `frontend`, `frontend-id`, `handle`, `mac`, `online` (`1`), `feature-sg`,
//! `feature-rx-copy`, `feature-rx-flip` (both receive modes are offered), and `state`: `2`
//! (InitWait) at once, `4` (Connected) once the IDD process serves the channel.
//!
//! The policy's MAC, allowed IPs and credit reach the IDD on its command line
//! ([`NetChannel`]), never through a key the guest can write.

use std::fmt;
use std::os::unix::net::UnixStream;

use devchan::grant::{DomId, GrantRef};
use devchan::platform::Port;
use devchan::xenbus::XenbusState;
use devchan::xenstore::client::NO_TX;
use devchan::xenstore::perms::{Perm, PERM_READ};
use devchan::xenstore::Client;
use policy::{MacAddr, NetAccess};

use super::{read_num, read_state, st, write_nodes, Result, ToolstackError};

/// The frontend directory of `guest`'s NIC `devid`.
pub fn front_dir(guest: DomId, devid: u16) -> String {
    format!("/local/domain/{guest}/device/vif/{devid}")
}

/// The backend directory in `idd` of `guest`'s NIC `devid`.
pub fn back_dir(idd: DomId, guest: DomId, devid: u16) -> String {
    format!("/local/domain/{idd}/backend/vif/{guest}/{devid}")
}

/// What the toolstack writes for one NIC.
#[derive(Clone, Debug)]
pub struct VifNodes {
    /// The guest.
    pub guest: DomId,
    /// The IDD.
    pub idd: DomId,
    /// The NIC's handle.
    pub devid: u16,
    /// The guest's MAC.
    pub mac: MacAddr,
}

/// Write both directories of `n` with their permissions, backend `InitWait`, in one
/// transaction.
pub fn write_vif(xs: &mut Client<UnixStream>, n: &VifNodes) -> Result<()> {
    let fdir = front_dir(n.guest, n.devid);
    let bdir = back_dir(n.idd, n.guest, n.devid);
    let fperm = [Perm::new(n.guest, 0), Perm::new(n.idd, PERM_READ)];
    let bperm = [Perm::new(n.idd, 0), Perm::new(n.guest, PERM_READ)];
    let mut nodes: Vec<(String, String, &[Perm])> = Vec::new();
    for d in [
        format!("/local/domain/{}/device", n.guest),
        format!("/local/domain/{}/device/vif", n.guest),
        fdir.clone(),
    ] {
        nodes.push((d, String::new(), &fperm));
    }
    for (k, v) in [
        ("backend", bdir.clone()),
        ("backend-id", n.idd.to_string()),
        ("handle", n.devid.to_string()),
        ("mac", n.mac.to_string()),
        ("state", XenbusState::Initialising.to_xenstore()),
    ] {
        nodes.push((format!("{fdir}/{k}"), v, &fperm));
    }
    for d in [
        format!("/local/domain/{}/backend", n.idd),
        format!("/local/domain/{}/backend/vif", n.idd),
        format!("/local/domain/{}/backend/vif/{}", n.idd, n.guest),
        bdir.clone(),
    ] {
        nodes.push((d, String::new(), &bperm));
    }
    for (k, v) in [
        ("frontend", fdir),
        ("frontend-id", n.guest.to_string()),
        ("handle", n.devid.to_string()),
        ("mac", n.mac.to_string()),
        ("online", "1".into()),
        ("feature-sg", "1".into()),
        ("feature-rx-copy", "1".into()),
        ("feature-rx-flip", "1".into()),
        ("state", XenbusState::InitWait.to_xenstore()),
    ] {
        nodes.push((format!("{bdir}/{k}"), v, &bperm));
    }
    write_nodes(xs, &nodes)
}

/// Set the backend state of `n`.
pub fn set_backend_state(xs: &mut Client<UnixStream>, n: &VifNodes, s: XenbusState) -> Result<()> {
    let p = format!("{}/state", back_dir(n.idd, n.guest, n.devid));
    xs.write(NO_TX, &p, s.to_xenstore().as_bytes())
        .map_err(st("write", &p))
}

/// The reconnect signal: point the frontend of `n` at (a new) backend.
pub fn point_frontend(xs: &mut Client<UnixStream>, n: &VifNodes) -> Result<()> {
    let fdir = front_dir(n.guest, n.devid);
    let bdir = back_dir(n.idd, n.guest, n.devid);
    for (k, v) in [("backend", bdir), ("backend-id", n.idd.to_string())] {
        let p = format!("{fdir}/{k}");
        xs.write(NO_TX, &p, v.as_bytes()).map_err(st("write", &p))?;
    }
    Ok(())
}

/// The rings a connected frontend published.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VifRings {
    /// Transmit ring grant.
    pub tx: GrantRef,
    /// Receive ring grant.
    pub rx: GrantRef,
    /// Event channel.
    pub port: Port,
    /// Receive by grant copy (`request-rx-copy` = 1) rather than page exchange.
    pub rx_copy: bool,
}

/// If the frontend of `n` is `Initialised` or `Connected`, the rings it published. Values
/// come from the guest: parsed strictly.
pub fn frontend_rings(xs: &mut Client<UnixStream>, n: &VifNodes) -> Result<Option<VifRings>> {
    let fdir = front_dir(n.guest, n.devid);
    let s = read_state(xs, &format!("{fdir}/state"));
    if !matches!(s, XenbusState::Initialised | XenbusState::Connected) {
        return Ok(None);
    }
    let tx = read_num(xs, &format!("{fdir}/tx-ring-ref"))?;
    let rx = read_num(xs, &format!("{fdir}/rx-ring-ref"))?;
    let port = read_num(xs, &format!("{fdir}/event-channel"))?;
    // Absent means 0: the original page-flipping receive path.
    let copy_key = format!("{fdir}/request-rx-copy");
    let rx_copy = match xs.read(NO_TX, &copy_key) {
        Ok(v) => match v.as_slice() {
            b"1" => true,
            b"0" => false,
            other => {
                return Err(ToolstackError::Malformed {
                    key: copy_key,
                    value: String::from_utf8_lossy(&other[..other.len().min(32)]).into_owned(),
                })
            }
        },
        Err(_) => false,
    };
    Ok(Some(VifRings {
        tx,
        rx,
        port,
        rx_copy,
    }))
}

/// One guest NIC as the `idd-net` process is told about it (`--channel`, the syntax in
/// `idd-net`'s program docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetChannel {
    /// The frontend's domain.
    pub guest: DomId,
    /// Its rings.
    pub rings: VifRings,
    /// Its policy: MAC, allowed networks, credit.
    pub access: NetAccess,
}

impl fmt::Display for NetChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "guest={},tx={},rx={},port={},mac={},rx-copy={}",
            self.guest,
            self.rings.tx,
            self.rings.rx,
            self.rings.port,
            self.access.mac,
            u8::from(self.rings.rx_copy)
        )?;
        if let Some(share) = &self.access.share {
            write!(f, ",credit={}/{}", share.bytes, share.interval_us)?;
        }
        if !self.access.ips.is_empty() {
            let ips: Vec<String> = self.access.ips.iter().map(ToString::to_string).collect();
            write!(f, ",ips={}", ips.join("+"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_arguments_carry_the_policy() {
        let c = NetChannel {
            guest: 3,
            rings: VifRings {
                tx: 8,
                rx: 9,
                port: 5,
                rx_copy: true,
            },
            access: NetAccess {
                device: "net0".into(),
                mac: MacAddr([2, 0, 0, 0, 0, 1]),
                ips: vec!["10.0.0.2/32".parse().unwrap(), "fd00::/64".parse().unwrap()],
                share: None,
            },
        };
        assert_eq!(
            c.to_string(),
            "guest=3,tx=8,rx=9,port=5,mac=02:00:00:00:00:01,rx-copy=1,ips=10.0.0.2/32+fd00::/64"
        );
    }

    #[test]
    fn directories() {
        assert_eq!(front_dir(3, 0), "/local/domain/3/device/vif/0");
        assert_eq!(back_dir(1, 3, 0), "/local/domain/1/backend/vif/3/0");
    }
}
