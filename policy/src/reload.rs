//! Live reload: what changes between two validated policies, and whether it is safe.
//!
//! Both policies have passed validation, so the new one is consistent on its own (no overlaps,
//! shares within links). What remains is whether a running system can move from one to the
//! other without restarting guests that did not ask for it. The rules, for a guest that is
//! connected (by default every guest of the old policy is treated as connected):
//!
//! | change | verdict | why |
//! |---|---|---|
//! | guest, device or access entry added | applied | nothing running is affected |
//! | guest removed, access entry removed | applied | an explicit unplug: the manager closes its channels |
//! | unused device removed | applied | |
//! | device removed while a connected guest uses it | refused | remove the guest's access first |
//! | device's kind, image, size, wire or PCI address changed | refused | the driver domain holds the media; remove and re-add the device |
//! | link speed, standby, restart settings changed | applied | manager-side only |
//! | share changed | applied | netback's credit is re-read live (`rate` in XenStore) |
//! | allowed IPs changed | applied | the anti-spoof filter is updated |
//! | MAC changed | refused | the frontend reads its MAC once, at connect |
//! | region grown in place (same offset) | applied | the capacity the guest saw stays valid |
//! | region shrunk or moved | refused | data the guest already addressed would vanish or change under it |
//! | read-only turned on or off | refused | the frontend reads the mode once, at connect |
//! | guest kind changed | refused | a different guest; remove and re-add it |
//! | Xen domain (`domain`) changed | refused | a different domain; remove and re-add the guest |
//!
//! For a guest that is not connected every access change is applied. Access entries are
//! matched by (guest, device, position among that guest's entries for that device).

use std::collections::HashMap;

use serde::Serialize;

use crate::model::*;
use crate::units::Share;

/// One change a reload applies. Fields name the guest and device concerned, and for value
/// changes the old and new values.
#[allow(missing_docs)] // the fields are the same few names throughout, described above
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "change")]
pub enum Change {
    /// A new device.
    DeviceAdded { device: String },
    /// A device nobody connected uses any more.
    DeviceRemoved { device: String },
    /// Link speed, standby or restart settings of a device.
    DeviceSettings { device: String },
    /// A new guest.
    GuestAdded { guest: String },
    /// A guest removed (its channels are closed).
    GuestRemoved { guest: String },
    /// A NIC or disk added to a guest.
    AccessAdded { guest: String, device: String },
    /// A NIC or disk removed from a guest (unplugged).
    AccessRemoved { guest: String, device: String },
    /// A NIC's share changed.
    ShareChanged {
        guest: String,
        device: String,
        old: Option<Share>,
        new: Option<Share>,
    },
    /// A NIC's allowed IPs changed.
    IpsChanged { guest: String, device: String },
    /// A disk region changed (grown in place, or any change while not connected).
    RegionChanged {
        guest: String,
        device: String,
        old: Region,
        new: Region,
    },
    /// Any other access change of a guest that is not connected.
    AccessChanged { guest: String, device: String },
}

/// A change that cannot be applied live, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refusal {
    /// The guest or device concerned.
    pub subject: String,
    /// Why it is refused and what to do instead.
    pub reason: String,
}

/// Every refused change, when at least one is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Reload refused: {}", .0.iter().map(|r| format!("{}: {}", r.subject, r.reason)).collect::<Vec<_>>().join("; "))]
pub struct ReloadRefused(pub Vec<Refusal>);

type Key<'p> = (&'p str, usize);

/// Access entries keyed by (device, position among the entries for that device), in file order.
fn keyed<'p, T>(items: &'p [T], device: impl Fn(&T) -> &str) -> Vec<(Key<'p>, &'p T)> {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    items
        .iter()
        .map(|it| {
            let d = device(it);
            let n = seen.entry(d).or_default();
            *n += 1;
            ((d, *n - 1), it)
        })
        .collect()
}

fn find<'p, T>(list: &[(Key<'p>, &'p T)], k: &Key<'_>) -> Option<&'p T> {
    list.iter().find(|(key, _)| key == k).map(|(_, t)| *t)
}

/// Computes the changes from `old` to `new`, treating guests for which `connected` is true as
/// running. Returns every refusal if any change is unsafe.
pub fn diff_with(
    old: &Policy,
    new: &Policy,
    connected: impl Fn(&str) -> bool,
) -> Result<Vec<Change>, ReloadRefused> {
    let mut changes = Vec::new();
    let mut refused = Vec::new();
    let mut refuse = |subject: &str, reason: String| {
        refused.push(Refusal {
            subject: subject.into(),
            reason,
        })
    };

    for od in &old.devices {
        match new.device(&od.name) {
            None => {
                let users: Vec<&str> = old
                    .guests
                    .iter()
                    .filter(|g| connected(&g.name))
                    .filter(|g| g.net.iter().any(|n| n.device == od.name) || g.disk.iter().any(|d| d.device == od.name))
                    .map(|g| g.name.as_str())
                    .collect();
                if users.is_empty() {
                    changes.push(Change::DeviceRemoved { device: od.name.clone() });
                } else {
                    refuse(&od.name, format!("connected guests use it ({}); remove their access in one reload, then the device in the next", users.join(", ")));
                }
            }
            Some(nd) if nd.spec_identity() != od.spec_identity() => refuse(
                &od.name,
                "its kind, media, size, wire or PCI address changed; the driver domain holds them: remove the device and add it under a new name".into(),
            ),
            Some(nd) if nd != od => changes.push(Change::DeviceSettings { device: od.name.clone() }),
            Some(_) => {}
        }
    }
    changes.extend(
        new.devices
            .iter()
            .filter(|d| old.device(&d.name).is_none())
            .map(|d| Change::DeviceAdded {
                device: d.name.clone(),
            }),
    );

    for og in &old.guests {
        let Some(ng) = new.guest(&og.name) else {
            changes.push(Change::GuestRemoved {
                guest: og.name.clone(),
            });
            continue;
        };
        let live = connected(&og.name);
        if ng.kind != og.kind {
            refuse(
                &og.name,
                "its kind changed; remove the guest and add it under a new name".into(),
            );
            continue;
        }
        if ng.domain != og.domain && live {
            refuse(
                &og.name,
                format!(
                    "its Xen domain changed from {} to {}: a different domain; remove the guest and add it under a new name",
                    og.domain.as_deref().unwrap_or("-"),
                    ng.domain.as_deref().unwrap_or("-")
                ),
            );
            continue;
        }
        let g = og.name.clone();
        let (on, nn) = (keyed(&og.net, |n| &n.device), keyed(&ng.net, |n| &n.device));
        for (k, o) in &on {
            let device = k.0.to_owned();
            let Some(n) = find(&nn, k) else {
                changes.push(Change::AccessRemoved {
                    guest: g.clone(),
                    device,
                });
                continue;
            };
            if o.mac != n.mac {
                if live {
                    refuse(&g, format!("MAC on `{device}` changed from {} to {}; the frontend reads it only at connect: remove the NIC and add it back", o.mac, n.mac));
                } else {
                    changes.push(Change::AccessChanged {
                        guest: g.clone(),
                        device: device.clone(),
                    });
                }
            }
            if o.share != n.share {
                changes.push(Change::ShareChanged {
                    guest: g.clone(),
                    device: device.clone(),
                    old: o.share,
                    new: n.share,
                });
            }
            if o.ips != n.ips {
                changes.push(Change::IpsChanged {
                    guest: g.clone(),
                    device,
                });
            }
        }
        let (od, nd) = (
            keyed(&og.disk, |d| &d.device),
            keyed(&ng.disk, |d| &d.device),
        );
        for (k, o) in &od {
            let device = k.0.to_owned();
            let Some(n) = find(&nd, k) else {
                changes.push(Change::AccessRemoved {
                    guest: g.clone(),
                    device,
                });
                continue;
            };
            if o.read_only != n.read_only {
                if live {
                    refuse(&g, format!("read-only on `{device}` changed; the frontend reads the mode only at connect: remove the disk and add it back"));
                } else {
                    changes.push(Change::AccessChanged {
                        guest: g.clone(),
                        device: device.clone(),
                    });
                }
            }
            if o.region != n.region {
                let grown = n.region.offset == o.region.offset && n.region.length > o.region.length;
                if live && !grown {
                    let what = if n.region.offset != o.region.offset {
                        "moved"
                    } else {
                        "shrunk"
                    };
                    refuse(&g, format!("its region of `{device}` would be {what} while it is connected; only growing in place is live: disconnect the guest first"));
                } else {
                    changes.push(Change::RegionChanged {
                        guest: g.clone(),
                        device,
                        old: o.region,
                        new: n.region,
                    });
                }
            }
        }
        let added_net = nn
            .iter()
            .filter(|(k, _)| find(&on, k).is_none())
            .map(|(k, _)| k.0);
        let added_disk = nd
            .iter()
            .filter(|(k, _)| find(&od, k).is_none())
            .map(|(k, _)| k.0);
        for device in added_net.chain(added_disk) {
            changes.push(Change::AccessAdded {
                guest: g.clone(),
                device: device.to_owned(),
            });
        }
    }
    changes.extend(
        new.guests
            .iter()
            .filter(|g| old.guest(&g.name).is_none())
            .map(|g| Change::GuestAdded {
                guest: g.name.clone(),
            }),
    );

    if refused.is_empty() {
        Ok(changes)
    } else {
        Err(ReloadRefused(refused))
    }
}

impl Device {
    /// What the driver domain holds and cannot change live: kind and media (link speed aside).
    fn spec_identity(&self) -> DeviceSpec {
        match &self.spec {
            DeviceSpec::Net { wire, .. } => DeviceSpec::Net {
                link: crate::units::Rate { bits_per_sec: 0 },
                wire: wire.clone(),
            },
            s => s.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::Policy;

    const XEN: &str = "[[guest]]\nname = \"web\"\nkind = \"xen\"\ndomain = \"domu\"\n";

    #[test]
    fn a_xen_guest_moved_to_another_domain_is_refused_while_connected() {
        let old = Policy::parse(XEN, "a.toml").unwrap();
        let new = Policy::parse(&XEN.replace("domu", "domv"), "b.toml").unwrap();
        let e = Policy::diff(&old, &new).unwrap_err();
        assert!(
            e.0[0]
                .reason
                .contains("Xen domain changed from domu to domv"),
            "{e}"
        );
        assert!(Policy::diff_with(&old, &new, |_| false).unwrap().is_empty());
        assert!(Policy::diff(&old, &old).unwrap().is_empty());
    }
}
