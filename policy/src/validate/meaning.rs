//! Pass 3: the meaning of the typed entries (names, kinds, units, MACs, regions, shares).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::PathBuf;

use ipnet::IpNet;
use toml::Spanned;

use super::values::{parse_mac, parse_pci, valid_domain_name, valid_ifname};
use super::{did_you_mean, DEFAULT_LINK, DEFAULT_UDP_BIND};
use crate::diag::{ErrorKind as K, Sink};
use crate::model::*;
use crate::raw::*;
use crate::units::{self, Rate, Share};

pub(super) struct Validator<'s, 'a> {
    pub(super) sink: &'s mut Sink<'a>,
    pub(super) broken: HashSet<String>,
}

/// A region as declared, for the overlap check.
struct Declared<'r> {
    guest: &'r str,
    region: Region,
    read_only: bool,
    span: Range<usize>,
}

impl<'s, 'a> Validator<'s, 'a> {
    fn err(
        &mut self,
        kind: K,
        span: Range<usize>,
        msg: impl Into<String>,
        hint: impl Into<String>,
    ) -> &mut crate::diag::Diagnostic {
        self.sink.error(kind, span, msg, Some(hint.into()))
    }

    fn size(&mut self, q: &Spanned<Quantity>) -> Option<u64> {
        match q.get_ref() {
            Quantity::Int(n) => match u64::try_from(*n) {
                Ok(n) => Some(n),
                Err(_) => {
                    self.err(
                        K::BadUnit,
                        q.span(),
                        "A size cannot be negative",
                        "write a size such as \"64MiB\"",
                    );
                    None
                }
            },
            Quantity::Text(s) => self.unit(q.span(), units::parse_size(s)),
        }
    }

    fn unit<T>(&mut self, span: Range<usize>, r: Result<T, units::UnitError>) -> Option<T> {
        r.map_err(|e| self.err(K::BadUnit, span, e.to_string(), e.hint()))
            .ok()
    }

    fn restart(&mut self, base: RestartPolicy, r: Option<&RawRestart>) -> RestartPolicy {
        let mut out = base;
        let Some(r) = r else { return out };
        if let Some(m) = &r.max_restarts {
            out.max_restarts = *m.get_ref();
        }
        for (field, target) in [
            (&r.window, &mut out.window_us),
            (&r.heartbeat, &mut out.heartbeat_us),
        ] {
            if let Some(s) = field {
                match units::parse_duration_us(s.get_ref()) {
                    Ok(0) => {
                        self.sink.error(
                            K::BadUnit,
                            s.span(),
                            "A zero duration",
                            Some("give at least 1ms".into()),
                        );
                    }
                    Ok(us) => *target = us,
                    Err(e) => {
                        self.sink
                            .error(K::BadUnit, s.span(), e.to_string(), Some(e.hint()));
                    }
                }
            }
        }
        out
    }

    fn not_for(&mut self, field: Option<Range<usize>>, key: &str, why: &str) {
        if let Some(span) = field {
            self.err(
                K::NotForKind,
                span,
                format!("`{key}` does not apply here: {why}"),
                format!("remove `{key}`"),
            );
        }
    }

    fn pci(&mut self, s: &Spanned<String>) -> Option<PciAddress> {
        let p = parse_pci(s.get_ref());
        if p.is_none() {
            self.err(
                K::BadValue,
                s.span(),
                format!("`{}` is not a PCI address", s.get_ref()),
                "write domain:bus:device.function in hex, e.g. \"0000:00:04.0\"",
            );
        }
        p
    }

    fn socket(&mut self, s: &Spanned<String>) -> Option<SocketAddr> {
        s.get_ref()
            .parse()
            .map_err(|_| {
                self.err(
                    K::BadValue,
                    s.span(),
                    format!("`{}` is not a socket address", s.get_ref()),
                    "write ip:port, e.g. \"127.0.0.1:7000\" or \"[::1]:7000\"",
                )
            })
            .ok()
    }

    fn device(&mut self, d: &RawDevice, restart: RestartPolicy) -> Option<Device> {
        let name = d.name.get_ref().clone();
        let spec = match d.kind.get_ref() {
            DeviceKind::VirtioBlk => {
                let why = "only virtio-net devices have it";
                self.not_for(span(&d.wire), "wire", why);
                self.not_for(span(&d.bind), "bind", why);
                self.not_for(span(&d.peer), "peer", why);
                self.not_for(span(&d.ifname), "ifname", why);
                self.not_for(span(&d.link), "link", why);
                let size = match &d.size {
                    None => {
                        self.err(
                            K::Missing,
                            d.name.span(),
                            format!("virtio-blk device `{name}` needs a `size`"),
                            "add a line such as size = \"64MiB\"",
                        );
                        None
                    }
                    Some(q) => match self.size(q)? {
                        0 => {
                            self.err(
                                K::BadUnit,
                                q.span(),
                                "A disk cannot be empty",
                                "give a size of at least 512 bytes",
                            );
                            None
                        }
                        n if n % SECTOR_SIZE != 0 => {
                            self.err(
                                K::Misaligned,
                                q.span(),
                                format!("Disk size {n} is not a whole number of 512-byte sectors"),
                                "round it to a multiple of 512",
                            );
                            None
                        }
                        n => Some(n),
                    },
                };
                let media = match (&d.image, &d.pci) {
                    (Some(_), Some(p)) => {
                        self.err(
                            K::NotForKind,
                            p.span(),
                            "A device has either `image` or `pci`, not both",
                            "remove one",
                        );
                        None
                    }
                    (Some(i), None) => Some(BlkMedia::Image(PathBuf::from(i.get_ref()))),
                    (None, Some(p)) => self.pci(p).map(BlkMedia::Pci),
                    (None, None) => {
                        self.err(
                            K::Missing,
                            d.name.span(),
                            format!("virtio-blk device `{name}` needs an `image`"),
                            "add a line such as image = \"disk0.img\" (created if missing)",
                        );
                        None
                    }
                };
                DeviceSpec::Blk {
                    size: size?,
                    media: media?,
                }
            }
            DeviceKind::VirtioNet => {
                let why = "only virtio-blk devices have it";
                self.not_for(span(&d.image), "image", why);
                self.not_for(span(&d.size), "size", why);
                let link = match &d.link {
                    None => Some(DEFAULT_LINK),
                    Some(l) => match self.unit(l.span(), units::parse_rate(l.get_ref()))? {
                        Rate { bits_per_sec: 0 } => {
                            self.err(
                                K::BadUnit,
                                l.span(),
                                "A link cannot be 0 bit/s",
                                "write a speed such as \"1Gbit/s\"",
                            );
                            None
                        }
                        r => Some(r),
                    },
                };
                let wire_kind = d.wire.as_ref().map(|w| *w.get_ref());
                let wire = if let Some(p) = &d.pci {
                    let why = "a passed-through NIC has no emulated wire";
                    self.not_for(span(&d.wire), "wire", why);
                    self.not_for(span(&d.bind), "bind", why);
                    self.not_for(span(&d.peer), "peer", why);
                    self.not_for(span(&d.ifname), "ifname", why);
                    self.pci(p).map(Wire::Pci)
                } else if wire_kind == Some(WireKind::Tap) {
                    self.not_for(span(&d.bind), "bind", "only a udp wire has it");
                    self.not_for(span(&d.peer), "peer", "only a udp wire has it");
                    match &d.ifname {
                        None => {
                            self.err(
                                K::Missing,
                                d.name.span(),
                                format!("tap device `{name}` needs an `ifname`"),
                                "add a line such as ifname = \"tap0\"",
                            );
                            None
                        }
                        Some(i) if !valid_ifname(i.get_ref()) => {
                            self.err(
                                K::BadValue,
                                i.span(),
                                format!("`{}` is not a Linux interface name", i.get_ref()),
                                "use 1 to 15 bytes, no '/', ':' or spaces",
                            );
                            None
                        }
                        Some(i) => Some(Wire::Tap {
                            ifname: i.get_ref().clone(),
                        }),
                    }
                } else {
                    self.not_for(
                        span(&d.ifname),
                        "ifname",
                        "only a tap wire has it (add wire = \"tap\")",
                    );
                    let bind = match &d.bind {
                        None => DEFAULT_UDP_BIND.parse().ok(),
                        Some(b) => self.socket(b),
                    };
                    let peer = d.peer.as_ref().map(|p| self.socket(p));
                    match (bind, peer) {
                        (Some(bind), None) => Some(Wire::Udp { bind, peer: None }),
                        (Some(bind), Some(Some(peer))) => Some(Wire::Udp {
                            bind,
                            peer: Some(peer),
                        }),
                        _ => None,
                    }
                };
                DeviceSpec::Net {
                    link: link?,
                    wire: wire?,
                }
            }
        };
        let standby = d.standby.as_ref().is_some_and(|s| *s.get_ref());
        let restart = self.restart(restart, d.restart.as_ref().map(Spanned::get_ref));
        Some(Device {
            name,
            spec,
            standby,
            restart,
        })
    }

    /// Looks up an access entry's device and checks its kind.
    fn lookup(
        &mut self,
        devices: &HashMap<String, (usize, DeviceKind)>,
        dev: &Spanned<String>,
        want: DeviceKind,
        section: &str,
    ) -> Option<usize> {
        let name = dev.get_ref();
        let Some(found) = devices.get(name) else {
            if !self.broken.contains(name) {
                let mut known: Vec<&str> = devices
                    .iter()
                    .filter(|(_, (_, k))| *k == want)
                    .map(|(n, _)| n.as_str())
                    .collect();
                known.sort_unstable();
                let hint = match did_you_mean(name, &known) {
                    _ if known.is_empty() => format!(
                        "declare it in a [[device]] with kind = \"{}\"",
                        want.as_str()
                    ),
                    h => h
                        .replace("keys here", "declared devices")
                        .replace("did you mean", "did you mean device"),
                };
                self.err(
                    K::UnknownDevice,
                    dev.span(),
                    format!("Unknown device `{name}`"),
                    hint,
                );
            }
            return None;
        };
        if found.1 != want {
            let other = if want == DeviceKind::VirtioBlk {
                "[[guest.net]]"
            } else {
                "[[guest.disk]]"
            };
            self.err(
                K::KindMismatch,
                dev.span(),
                format!(
                    "`{name}` is a {} device, but {section} needs a {} device",
                    found.1.as_str(),
                    want.as_str()
                ),
                format!(
                    "move this entry to {other}, or name a {} device",
                    want.as_str()
                ),
            );
            return None;
        }
        Some(found.0)
    }

    pub(super) fn policy(
        &mut self,
        top: Option<&RawRestart>,
        raw_devices: &[Spanned<RawDevice>],
        raw_guests: &[Spanned<RawGuest>],
    ) -> Policy {
        let restart = self.restart(RestartPolicy::default(), top);
        let mut devices = Vec::new();
        let mut by_name: HashMap<String, (usize, Device)> = HashMap::new();
        let mut kinds: HashMap<String, (usize, DeviceKind)> = HashMap::new();
        let mut name_spans: HashMap<String, Range<usize>> = HashMap::new();
        for (idx, d) in raw_devices.iter().enumerate() {
            let d = d.get_ref();
            let name = d.name.get_ref();
            if let Some(first) = name_spans.get(name).cloned() {
                self.err(
                    K::DuplicateName,
                    d.name.span(),
                    format!("Device `{name}` is declared twice"),
                    "give each device its own name",
                )
                .related
                .push((first, "first declared here".into()));
                continue;
            }
            name_spans.insert(name.clone(), d.name.span());
            kinds.insert(name.clone(), (idx, *d.kind.get_ref()));
            if let Some(dev) = self.device(d, restart) {
                by_name.insert(name.clone(), (idx, dev.clone()));
                devices.push(dev);
            }
        }
        let mut guests = Vec::new();
        let mut guest_spans: HashMap<String, Range<usize>> = HashMap::new();
        let mut macs: HashMap<MacAddr, Range<usize>> = HashMap::new();
        let mut shares: HashMap<String, Vec<(Share, Range<usize>)>> = HashMap::new();
        let mut regions: HashMap<String, Vec<Declared<'_>>> = HashMap::new();
        let mut xen_domains: HashMap<String, Range<usize>> = HashMap::new();
        for (gidx, g) in raw_guests.iter().enumerate() {
            let g = g.get_ref();
            let gname = g.name.get_ref();
            if let Some(first) = guest_spans.get(gname).cloned() {
                self.err(
                    K::DuplicateName,
                    g.name.span(),
                    format!("Guest `{gname}` is declared twice"),
                    "give each guest its own name",
                )
                .related
                .push((first, "first declared here".into()));
            } else {
                guest_spans.insert(gname.clone(), g.name.span());
            }
            let mut net = Vec::new();
            for (nidx, n) in g.net.iter().enumerate() {
                let n = n.get_ref();
                let Some(didx) =
                    self.lookup(&kinds, &n.device, DeviceKind::VirtioNet, "[[guest.net]]")
                else {
                    continue;
                };
                let (mac, mac_span) = match &n.mac {
                    Some(m) => match parse_mac(m.get_ref()) {
                        Ok(mac) => (Some(mac), m.span()),
                        Err(why) => {
                            self.err(K::BadMac, m.span(), format!("`{}` {why}", m.get_ref()), "use a locally administered unicast address such as \"02:00:00:00:00:01\"");
                            (None, m.span())
                        }
                    },
                    None => match (u8::try_from(didx), u8::try_from(gidx), u8::try_from(nidx)) {
                        (Ok(d), Ok(gi), Ok(ni)) => (
                            Some(MacAddr([0x02, 0x1d, 0xd0, d, gi, ni])),
                            n.device.span(),
                        ),
                        _ => {
                            self.err(
                                K::Missing,
                                n.device.span(),
                                "Too many devices or guests to generate a MAC",
                                "give this NIC a `mac`",
                            );
                            (None, n.device.span())
                        }
                    },
                };
                if let Some(mac) = mac {
                    if let Some(first) = macs.get(&mac).cloned() {
                        self.err(
                            K::DuplicateMac,
                            mac_span.clone(),
                            format!("MAC {mac} is used twice"),
                            "give each NIC its own MAC (or leave `mac` out to have one generated)",
                        )
                        .related
                        .push((first, "first used here".into()));
                    } else {
                        macs.insert(mac, mac_span);
                    }
                }
                let mut ips = Vec::new();
                for ip in n.ips.iter().flatten() {
                    let s = ip.get_ref().trim();
                    match s
                        .parse::<IpNet>()
                        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                    {
                        Ok(net) => ips.push(net),
                        Err(_) => {
                            self.err(
                                K::BadValue,
                                ip.span(),
                                format!("`{s}` is not an IP address or network"),
                                "write an address (\"10.0.0.2\") or a network (\"10.0.0.0/24\")",
                            );
                        }
                    }
                }
                let share = match &n.share {
                    None => None,
                    Some(s) => {
                        let sh = self.unit(s.span(), units::parse_share(s.get_ref()));
                        if let Some(sh) = sh {
                            shares
                                .entry(n.device.get_ref().clone())
                                .or_default()
                                .push((sh, s.span()));
                        }
                        sh
                    }
                };
                if let Some(mac) = mac {
                    net.push(NetAccess {
                        device: n.device.get_ref().clone(),
                        mac,
                        ips,
                        share,
                    });
                }
            }
            let mut disk = Vec::new();
            for a in &g.disk {
                let a = a.get_ref();
                if self
                    .lookup(&kinds, &a.device, DeviceKind::VirtioBlk, "[[guest.disk]]")
                    .is_none()
                {
                    continue;
                }
                // A disk with its own errors has no trusted size: check the units only.
                let Some((_, dev)) = by_name.get(a.device.get_ref()) else {
                    let _ = a.offset.as_ref().map(|o| self.size(o));
                    let _ = a.length.as_ref().map(|l| self.size(l));
                    continue;
                };
                let DeviceSpec::Blk { size, .. } = dev.spec else {
                    continue;
                };
                let offset = match &a.offset {
                    Some(o) => self.size(o),
                    None => Some(0),
                };
                let length = match &a.length {
                    Some(l) => self.size(l),
                    None => offset.map(|o| size.saturating_sub(o)),
                };
                let (Some(offset), Some(length)) = (offset, length) else {
                    continue;
                };
                let at = a
                    .offset
                    .as_ref()
                    .or(a.length.as_ref())
                    .map_or(a.device.span(), Spanned::span);
                let len_at = a.length.as_ref().map_or(at.clone(), Spanned::span);
                let mut ok = true;
                for (v, sp, what) in [
                    (offset, at.clone(), "offset"),
                    (length, len_at.clone(), "length"),
                ] {
                    if v % SECTOR_SIZE != 0 {
                        ok = false;
                        self.err(
                            K::Misaligned,
                            sp,
                            format!("Region {what} {v} is not a whole number of 512-byte sectors"),
                            format!(
                                "round it to a multiple of 512 (e.g. \"{}\")",
                                units::format_size(v / SECTOR_SIZE * SECTOR_SIZE)
                            ),
                        );
                    }
                }
                let end = offset.checked_add(length);
                if offset >= size && a.length.is_none() {
                    ok = false;
                    self.err(
                        K::PastEnd,
                        at.clone(),
                        format!("Region starts past the end of `{}`", dev.name),
                        format!(
                            "`{}` is {} long; start the region before that",
                            dev.name,
                            units::format_size(size)
                        ),
                    );
                } else if length == 0 {
                    ok = false;
                    self.err(
                        K::PastEnd,
                        len_at,
                        "Empty region",
                        format!(
                            "the disk `{}` is {} long; the region must hold at least one sector",
                            dev.name,
                            units::format_size(size)
                        ),
                    );
                } else if end.is_none_or(|e| e > size) {
                    ok = false;
                    self.err(
                        K::PastEnd,
                        len_at,
                        format!("Region ends past the end of `{}`", dev.name),
                        format!(
                            "`{}` is {} long; this region needs {} (offset {} + length {})",
                            dev.name,
                            units::format_size(size),
                            end.map_or("more than 2^64 bytes".into(), units::format_size),
                            units::format_size(offset),
                            units::format_size(length)
                        ),
                    );
                }
                if !ok {
                    continue;
                }
                let region = Region { offset, length };
                let read_only = a.read_only.as_ref().is_some_and(|r| *r.get_ref());
                regions.entry(dev.name.clone()).or_default().push(Declared {
                    guest: g.name.get_ref(),
                    region,
                    read_only,
                    span: at,
                });
                disk.push(DiskAccess {
                    device: dev.name.clone(),
                    region,
                    read_only,
                });
            }
            let kind = g.kind.as_ref().map(|k| *k.get_ref()).unwrap_or_default();
            let domain = self.xen_domain(g, kind, &by_name, &mut xen_domains);
            guests.push(Guest {
                name: gname.clone(),
                kind,
                domain,
                net,
                disk,
            });
        }
        self.check_shares(&by_name, raw_devices, &shares);
        self.check_overlaps(&regions);
        Policy {
            restart,
            devices,
            guests,
        }
    }

    /// The Xen rules of a guest: `domain` only for kind = "xen" (default: the guest's name),
    /// a valid domain name used by one guest only, and NICs on TAP-wired devices (Xen's
    /// network backend bridges a guest's vif to a host interface; a UDP wire has none).
    fn xen_domain(
        &mut self,
        g: &RawGuest,
        kind: GuestKind,
        devices: &HashMap<String, (usize, Device)>,
        seen: &mut HashMap<String, Range<usize>>,
    ) -> Option<String> {
        if kind != GuestKind::Xen {
            self.not_for(
                span(&g.domain),
                "domain",
                "only kind = \"xen\" guests have it",
            );
            return None;
        }
        let (name, at) = match &g.domain {
            Some(d) => (d.get_ref().clone(), d.span()),
            None => (g.name.get_ref().clone(), g.name.span()),
        };
        if !valid_domain_name(&name) {
            self.err(
                K::BadValue,
                at.clone(),
                format!("`{name}` is not a Xen domain name"),
                "write the domain's `name` from its xl config: 1 to 64 printable characters, no `/` or spaces",
            );
        } else if let Some(first) = seen.get(&name).cloned() {
            self.err(
                K::DuplicateName,
                at.clone(),
                format!("Xen domain `{name}` is named by two guests"),
                "each Xen domain is one guest: merge their access entries",
            )
            .related
            .push((first, "first named here".into()));
        } else {
            seen.insert(name.clone(), at);
        }
        for n in &g.net {
            let dev = &n.get_ref().device;
            let wired = devices.get(dev.get_ref()).map(|(_, d)| &d.spec);
            if let Some(DeviceSpec::Net { wire, .. }) = wired {
                if !matches!(wire, Wire::Tap { .. }) {
                    self.err(
                        K::KindMismatch,
                        dev.span(),
                        format!("Xen guest `{}` needs a TAP-wired device, and `{}` is not one", g.name.get_ref(), dev.get_ref()),
                        "give the device wire = \"tap\" and an `ifname`: xen-netback bridges the guest's vif to it",
                    );
                }
            }
        }
        Some(name)
    }

    fn check_shares(
        &mut self,
        by_name: &HashMap<String, (usize, Device)>,
        raw: &[Spanned<RawDevice>],
        shares: &HashMap<String, Vec<(Share, Range<usize>)>>,
    ) {
        for (dev, list) in shares {
            let Some((
                idx,
                Device {
                    spec: DeviceSpec::Net { link, .. },
                    ..
                },
            )) = by_name.get(dev)
            else {
                continue;
            };
            let link_bits = u128::from(link.bits_per_sec);
            let mut sum = 0u128;
            for (i, (sh, span)) in list.iter().enumerate() {
                sum += sh.bits_per_sec();
                if sum > link_bits {
                    let total: u128 = list.iter().map(|(s, _)| s.bits_per_sec()).sum();
                    let shown = units::describe_bits_per_sec(total);
                    let rd = raw[*idx].get_ref();
                    let link_span = rd.link.as_ref().map_or(rd.name.span(), Spanned::span);
                    let d = self.err(
                        K::ShareExceedsLink,
                        span.clone(),
                        format!("Shares on `{dev}` add up to {shown}, more than its {link} link"),
                        "lower the shares, or raise the device's `link` (a NIC without `share` is unlimited and not counted)",
                    );
                    d.related
                        .push((link_span, format!("link of `{dev}` ({link})")));
                    d.related.extend(list[..i].iter().map(|(s, sp)| {
                        (sp.clone(), units::describe_bits_per_sec(s.bits_per_sec()))
                    }));
                    break;
                }
            }
        }
    }

    fn check_overlaps(&mut self, regions: &HashMap<String, Vec<Declared<'_>>>) {
        for (dev, list) in regions {
            for (j, b) in list.iter().enumerate() {
                if let Some(a) = list[..j]
                    .iter()
                    .find(|a| a.region.overlaps(&b.region) && !(a.read_only && b.read_only))
                {
                    self.err(
                        K::Overlap,
                        b.span.clone(),
                        format!("Region of `{}` overlaps the region of `{}` on `{dev}`", b.guest, a.guest),
                        "writable regions of one disk must not overlap (read-only regions may overlap each other)",
                    )
                    .related
                    .push((a.span.clone(), format!(
                        "`{}`'s region ({}..{}, {})",
                        a.guest,
                        units::format_size(a.region.offset),
                        units::format_size(a.region.end()),
                        if a.read_only { "read-only" } else { "writable" }
                    )));
                }
            }
        }
    }
}

fn span<T>(f: &Option<Spanned<T>>) -> Option<Range<usize>> {
    f.as_ref().map(Spanned::span)
}

#[cfg(test)]
mod tests {
    use crate::{ErrorKind, GuestKind, Policy};

    const XEN: &str = r#"
[[device]]
name = "disk0"
kind = "virtio-blk"
image = "disk0.img"
size = "16MiB"

[[device]]
name = "tap0"
kind = "virtio-net"
wire = "tap"
ifname = "idd-tap0"

[[device]]
name = "udp0"
kind = "virtio-net"

[[guest]]
name = "web"
kind = "xen"
domain = "domu"
disk = [{ device = "disk0" }]
net = [{ device = "tap0" }]
"#;

    /// Each diagnostic's kind and the text its span starts with.
    fn kinds(text: &str) -> Vec<(ErrorKind, &str)> {
        let e = Policy::parse(text, "x.toml").unwrap_err();
        e.diagnostics
            .iter()
            .map(|d| {
                (
                    d.kind,
                    &text[d.span.start..d.span.end.min(d.span.start + 8)],
                )
            })
            .collect()
    }

    #[test]
    fn a_xen_guest_names_its_domain() {
        let p = Policy::parse(XEN, "x.toml").unwrap();
        let g = p.guest("web").unwrap();
        assert_eq!(
            (g.kind, g.domain.as_deref()),
            (GuestKind::Xen, Some("domu"))
        );
        // Without `domain`, the guest's own name.
        let p = Policy::parse(&XEN.replace("domain = \"domu\"\n", ""), "x.toml").unwrap();
        assert_eq!(p.guest("web").unwrap().domain.as_deref(), Some("web"));
    }

    #[test]
    fn xen_rules_are_diagnostics_with_positions() {
        // `domain` on a process guest.
        let t = XEN.replace("kind = \"xen\"\n", "");
        assert_eq!(kinds(&t), vec![(ErrorKind::NotForKind, "\"domu\"")]);
        // A UDP-wired NIC for a Xen guest: at the device name of the NIC.
        let t = XEN.replace("device = \"tap0\"", "device = \"udp0\"");
        assert_eq!(kinds(&t), vec![(ErrorKind::KindMismatch, "\"udp0\"")]);
        // A bad name, and one domain named by two guests (at the second).
        let t = XEN.replace("\"domu\"", "\"dom u\"");
        assert_eq!(kinds(&t), vec![(ErrorKind::BadValue, "\"dom u\"")]);
        let t = format!("{XEN}\n[[guest]]\nname = \"other\"\nkind = \"xen\"\ndomain = \"domu\"\n");
        let k = kinds(&t);
        assert_eq!(k, vec![(ErrorKind::DuplicateName, "\"domu\"")], "{k:?}");
        let e = Policy::parse(&t, "x.toml").unwrap_err();
        assert!(e.diagnostics[0].span.start > XEN.len());
        assert!(e.render().contains("first named here"), "{}", e.render());
    }
}
