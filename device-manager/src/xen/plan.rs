//! From the policy to the backends a Xen backend domain runs: one per device of each
//! `kind = "xen"` guest.
//!
//! | policy | backend | XenStore directory | program |
//! |---|---|---|---|
//! | the guest's `i`-th `[[guest.disk]]` (a virtio-blk device's image) | `xvd<a+i>` | `vbd/<domid>/<51712 + 16 i>` | `xen-blkback --frontend D --devid N --image IMG [--read-only] --memory M --xenstore X` |
//! | the guest's `i`-th `[[guest.net]]` (a TAP-wired virtio-net device) | `vif<i>` | `vif/<domid>/<i>` | `xen-netback --frontend D --handle i --mac MAC --tap IFNAME --memory M --xenstore X` |
//!
//! The supervisor appends `--evtchn-fd FD` (its own event-channel file for that backend).
//! Neither program gets `--create`: the toolstack ([`super::toolstack`]) writes both
//! directories before the backend starts.
//!
//! Devices keep the meaning they have everywhere else: a disk's image is what the guest
//! sees, a NIC's TAP interface is its wire. What today's Xen backends cannot do is refused
//! here, with the guest and device named: a region that is not the whole image
//! (`xen-blkback` serves whole images), more than 16 disks (`xvda`..`xvdp`: Linux's
//! `202:N` numbering has 16 minors per disk and 256 in all), a passed-through PCI device (it
//! belongs to a driver domain: `iddctl xen config` prints its xl settings).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use devchan::grant::DomId;
use policy::{BlkMedia, DeviceSpec, GuestKind, MacAddr, Policy, RestartPolicy, Wire};

/// Linux's `xvda`: major 202, minor 0, as blkfront reads `virtual-device`.
pub const XVDA: u32 = 51712;
/// Disks one guest may have (`xvda`..`xvdp`).
pub const MAX_DISKS: usize = 16;

/// Why the policy cannot be served on Xen.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    /// A Xen guest's disk is not its whole device.
    #[error("guest {guest}: disk `{device}` is a region ({offset}+{length} bytes of {size}); xen-blkback serves whole images: give the guest the whole device")]
    Region {
        /// The guest.
        guest: String,
        /// The device.
        device: String,
        /// The region's offset.
        offset: u64,
        /// The region's length.
        length: u64,
        /// The device's size.
        size: u64,
    },
    /// More disks than Linux numbers `xvd*` devices for.
    #[error("guest {guest}: {n} disks; at most {MAX_DISKS} (xvda..xvdp)")]
    TooManyDisks {
        /// The guest.
        guest: String,
        /// How many it has.
        n: usize,
    },
    /// A device a userspace backend cannot serve.
    #[error("guest {guest}: device `{device}` {why}")]
    Unservable {
        /// The guest.
        guest: String,
        /// The device.
        device: String,
        /// Why.
        why: &'static str,
    },
}

/// What one backend serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendKind {
    /// A virtual block device.
    Vbd {
        /// The `virtual-device` number.
        devid: u32,
        /// The image file.
        image: PathBuf,
        /// Its size in bytes (the image is created at it when missing).
        size: u64,
        /// Served read-only.
        read_only: bool,
    },
    /// A virtual network interface.
    Vif {
        /// The vif's handle.
        handle: u32,
        /// The guest's MAC.
        mac: MacAddr,
        /// The TAP interface in the backend domain.
        tap: String,
    },
}

/// One backend process to run, for one device of one guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendPlan {
    /// The policy's guest.
    pub guest: String,
    /// Its Xen domain's name.
    pub domain: String,
    /// The policy's device.
    pub device: String,
    /// What it serves.
    pub kind: BackendKind,
    /// The device's restart budget.
    pub restart: RestartPolicy,
}

impl BackendPlan {
    /// `guest/xvda` or `guest/vif0`: the name in every event line and file name.
    pub fn name(&self) -> String {
        match &self.kind {
            BackendKind::Vbd { devid, .. } => format!("{}/{}", self.guest, xvd_name(*devid)),
            BackendKind::Vif { handle, .. } => format!("{}/vif{handle}", self.guest),
        }
    }

    /// The program that serves it.
    pub fn program(&self) -> &'static str {
        match self.kind {
            BackendKind::Vbd { .. } => "xen-blkback",
            BackendKind::Vif { .. } => "xen-netback",
        }
    }

    /// The backend's memory file (its journal) under `run_dir`.
    pub fn memory_file(&self, run_dir: &Path) -> PathBuf {
        run_dir.join(format!("{}.mem", self.name().replace('/', "-")))
    }

    /// The program's arguments for frontend domain `front` (without `--evtchn-fd`).
    pub fn args(&self, front: DomId, memory: &Path, xenstore: &Path) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec!["--frontend".into(), front.to_string().into()];
        match &self.kind {
            BackendKind::Vbd {
                devid,
                image,
                read_only,
                ..
            } => {
                a.extend(["--devid".into(), devid.to_string().into()]);
                a.extend(["--image".into(), image.clone().into_os_string()]);
                if *read_only {
                    a.push("--read-only".into());
                }
            }
            BackendKind::Vif { handle, mac, tap } => {
                a.extend(["--handle".into(), handle.to_string().into()]);
                a.extend(["--mac".into(), mac.to_string().into()]);
                a.extend(["--tap".into(), tap.into()]);
            }
        }
        a.extend(["--memory".into(), memory.as_os_str().to_owned()]);
        a.extend(["--xenstore".into(), xenstore.as_os_str().to_owned()]);
        a
    }
}

/// `xvda` for 51712, `xvdb` for 51728, ... (`xvd?` outside the 16 disks).
pub fn xvd_name(devid: u32) -> String {
    let i = devid.wrapping_sub(XVDA) / 16;
    match u8::try_from(i) {
        Ok(i) if devid >= XVDA && devid % 16 == 0 && usize::from(i) < MAX_DISKS => {
            format!("xvd{}", char::from(b'a' + i))
        }
        _ => format!("vbd{devid}"),
    }
}

/// The backends of every Xen guest of `policy`, guests and devices in file order.
pub fn plan(policy: &Policy) -> Result<Vec<BackendPlan>, PlanError> {
    let mut out = Vec::new();
    for g in policy.guests.iter().filter(|g| g.kind == GuestKind::Xen) {
        let domain = g.domain.clone().unwrap_or_else(|| g.name.clone());
        if g.disk.len() > MAX_DISKS {
            return Err(PlanError::TooManyDisks {
                guest: g.name.clone(),
                n: g.disk.len(),
            });
        }
        let unservable = |device: &str, why| PlanError::Unservable {
            guest: g.name.clone(),
            device: device.to_owned(),
            why,
        };
        for (i, d) in g.disk.iter().enumerate() {
            // Validated policies only name declared devices of the right kind.
            let Some(dev) = policy.device(&d.device) else {
                return Err(unservable(&d.device, "is not declared"));
            };
            let DeviceSpec::Blk { size, media } = &dev.spec else {
                return Err(unservable(&d.device, "is not a disk"));
            };
            let BlkMedia::Image(image) = media else {
                return Err(unservable(
                    &d.device,
                    "is a passed-through PCI device: it belongs to a driver domain (see `iddctl xen config`)",
                ));
            };
            if d.region.offset != 0 || d.region.length != *size {
                return Err(PlanError::Region {
                    guest: g.name.clone(),
                    device: d.device.clone(),
                    offset: d.region.offset,
                    length: d.region.length,
                    size: *size,
                });
            }
            // i < MAX_DISKS = 16.
            let devid = XVDA + 16 * u32::try_from(i).unwrap_or(0);
            out.push(BackendPlan {
                guest: g.name.clone(),
                domain: domain.clone(),
                device: d.device.clone(),
                kind: BackendKind::Vbd {
                    devid,
                    image: image.clone(),
                    size: *size,
                    read_only: d.read_only,
                },
                restart: dev.restart,
            });
        }
        for (i, n) in g.net.iter().enumerate() {
            let Some(dev) = policy.device(&n.device) else {
                return Err(unservable(&n.device, "is not declared"));
            };
            let tap = match &dev.spec {
                DeviceSpec::Net {
                    wire: Wire::Tap { ifname },
                    ..
                } => ifname.clone(),
                _ => return Err(unservable(&n.device, "is not a TAP-wired NIC")),
            };
            out.push(BackendPlan {
                guest: g.name.clone(),
                domain: domain.clone(),
                device: n.device.clone(),
                kind: BackendKind::Vif {
                    handle: u32::try_from(i).unwrap_or(u32::MAX),
                    mac: n.mac,
                    tap,
                },
                restart: dev.restart,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
[restart]
max_restarts = 40

[[device]]
name = "disk0"
kind = "virtio-blk"
image = "/srv/xvda.img"
size = "64MiB"

[[device]]
name = "disk1"
kind = "virtio-blk"
image = "/srv/ro.img"
size = "1MiB"

[[device]]
name = "net0"
kind = "virtio-net"
wire = "tap"
ifname = "xtap0"

[[guest]]
name = "web"
kind = "xen"
domain = "domu"
disk = [{ device = "disk0" }, { device = "disk1", read_only = true }]
net = [{ device = "net0", mac = "00:16:3e:00:00:02" }]

[[guest]]
name = "local"
"#;

    #[test]
    fn disks_then_nics_with_linux_numbering() {
        let p = Policy::parse(POLICY, "p.toml").unwrap();
        let v = plan(&p).unwrap();
        let names: Vec<String> = v.iter().map(BackendPlan::name).collect();
        assert_eq!(names, ["web/xvda", "web/xvdb", "web/vif0"]);
        assert_eq!(v[0].domain, "domu");
        assert_eq!(v[0].restart.max_restarts, 40);
        assert_eq!(v[1].program(), "xen-blkback");
        assert_eq!(v[2].program(), "xen-netback");
        let a = |b: &BackendPlan| {
            b.args(7, Path::new("/run/idd/m.mem"), Path::new("/dev/xen/xenbus"))
                .iter()
                .map(|s| s.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(
            a(&v[1]),
            "--frontend 7 --devid 51728 --image /srv/ro.img --read-only --memory /run/idd/m.mem --xenstore /dev/xen/xenbus"
        );
        assert_eq!(
            a(&v[2]),
            "--frontend 7 --handle 0 --mac 00:16:3e:00:00:02 --tap xtap0 --memory /run/idd/m.mem --xenstore /dev/xen/xenbus"
        );
        assert_eq!(
            v[0].memory_file(Path::new("/run/idd")),
            Path::new("/run/idd/web-xvda.mem")
        );
    }

    #[test]
    fn what_the_backends_cannot_serve_is_refused() {
        let region = POLICY.replace(
            "{ device = \"disk0\" }",
            "{ device = \"disk0\", length = \"32MiB\" }",
        );
        let e = plan(&Policy::parse(&region, "p.toml").unwrap()).unwrap_err();
        assert!(e.to_string().contains("serves whole images"), "{e}");
        let pci = POLICY.replace("image = \"/srv/xvda.img\"", "pci = \"0000:00:04.0\"");
        let e = plan(&Policy::parse(&pci, "p.toml").unwrap()).unwrap_err();
        assert!(e.to_string().contains("iddctl xen config"), "{e}");
        let mut many = POLICY.to_owned();
        let disks: Vec<String> = (0..17)
            .map(|_| "{ device = \"disk1\", read_only = true }".to_owned())
            .collect();
        many = many.replace(
            "disk = [{ device = \"disk0\" }, { device = \"disk1\", read_only = true }]",
            &format!("disk = [{}]", disks.join(", ")),
        );
        let e = plan(&Policy::parse(&many, "p.toml").unwrap()).unwrap_err();
        assert!(matches!(e, PlanError::TooManyDisks { n: 17, .. }), "{e}");
    }

    #[test]
    fn xvd_names() {
        assert_eq!(xvd_name(51712), "xvda");
        assert_eq!(xvd_name(51712 + 16 * 15), "xvdp");
        assert_eq!(xvd_name(51712 + 16 * 16), "vbd51968");
        assert_eq!(xvd_name(51713), "vbd51713");
        assert_eq!(xvd_name(5), "vbd5");
    }
}
