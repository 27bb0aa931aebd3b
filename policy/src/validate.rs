//! From TOML text to a validated [`Policy`], collecting every problem.
//!
//! Three passes, each collecting all it finds:
//!
//! 1. TOML syntax (`toml`'s recoverable parser). Syntax errors stop here: checking a half-read
//!    file would report problems that are not there.
//! 2. Shape: unknown keys anywhere (all of them, with a did-you-mean hint; they are then dropped
//!    so the rest can be checked), `device`/`guest` written as tables instead of arrays of
//!    tables, then each `[[device]]`, `[[guest]]` and `[restart]` deserialized on its own, so a
//!    wrong type in one entry does not hide problems in the others.
//! 3. Meaning: names, kinds, units, MACs, addresses, regions, shares.
//!
//! ## Rules
//!
//! * Device names are unique, guest names are unique (the two are separate namespaces).
//! * A `[[guest.net]]` names a virtio-net device, a `[[guest.disk]]` a virtio-blk device.
//! * MACs are unique across the whole file, unicast (bit 0 of the first octet clear) and not
//!   all-zero. Omitted MACs are generated as `02:1d:d0:DD:GG:NN` (device, guest, NIC index).
//! * Regions are whole 512-byte sectors, non-empty and inside the disk. Two regions of one disk
//!   may overlap only if **both** are read-only (a shared base image): a writer under a reader
//!   would change data the reader's cache believes stable, and two writers corrupt each other.
//! * The explicit shares on one net device add up to at most its link (default 1 Gbit/s); a NIC
//!   without a share is unlimited and is not counted.
//! * A device is either emulated (`image` for blk, `wire` for net) or passed through (`pci`).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::PathBuf;

use ipnet::IpNet;
use serde::Deserialize;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::diag::{ErrorKind as K, Sink};
use crate::model::*;
use crate::raw::*;
use crate::units::{self, Rate, Share};

/// The default link speed of a net device.
pub const DEFAULT_LINK: Rate = Rate {
    bits_per_sec: 1_000_000_000,
};
/// The default local address of a UDP wire.
pub const DEFAULT_UDP_BIND: &str = "127.0.0.1:0";

fn did_you_mean(word: &str, known: &[&str]) -> String {
    let best = known
        .iter()
        .map(|k| (strsim::levenshtein(word, k), *k))
        .min()
        .filter(|(d, k)| *d <= 2 || k.contains(word) || word.contains(k));
    let list = known.join(", ");
    match best {
        Some((_, k)) => format!("did you mean `{k}`? keys here: {list}"),
        None => format!("keys here: {list}"),
    }
}

/// Drops (and reports) every key of `table` not in `known`.
fn check_keys(sink: &mut Sink<'_>, table: &mut DeTable<'_>, known: &[&str], what: &str) {
    for (k, v) in std::mem::take(table) {
        let key: &str = k.get_ref();
        if known.contains(&key) {
            table.insert(k, v);
        } else {
            sink.error(
                K::UnknownKey,
                k.span(),
                format!("Unknown key `{key}` in {what}"),
                Some(did_you_mean(key, known)),
            );
        }
    }
}

/// Checks keys in the sub-table or array of sub-tables under `key`.
fn check_sub(sink: &mut Sink<'_>, table: &mut DeTable<'_>, key: &str, known: &[&str], what: &str) {
    for (k, v) in table.iter_mut() {
        if k.get_ref().as_ref() != key {
            continue;
        }
        match v.get_mut() {
            DeValue::Table(t) => check_keys(sink, t, known, what),
            DeValue::Array(a) => {
                for e in a.iter_mut() {
                    if let DeValue::Table(t) = e.get_mut() {
                        check_keys(sink, t, known, what);
                    }
                }
            }
            _ => {}
        }
    }
}

/// Splits a top-level `[[name]]` value into its tables, reporting other shapes.
fn tables<'i>(
    sink: &mut Sink<'_>,
    key: &str,
    v: Spanned<DeValue<'i>>,
) -> Vec<Spanned<DeTable<'i>>> {
    let span = v.span();
    match v.into_inner() {
        DeValue::Array(a) => {
            let mut out = Vec::new();
            for e in a.into_iter() {
                let s = e.span();
                match e.into_inner() {
                    DeValue::Table(t) => out.push(Spanned::new(s, t)),
                    _ => {
                        sink.error(
                            K::Type,
                            s,
                            format!("Each `{key}` must be a table"),
                            Some(format!("write a [[{key}]] section")),
                        );
                    }
                }
            }
            out
        }
        _ => {
            sink.error(
                K::Type,
                span,
                format!("`{key}` must be a list of tables"),
                Some(format!("write [[{key}]] (two brackets), once per {key}")),
            );
            Vec::new()
        }
    }
}

/// The string value of `name` in a table, if any (to know the names of entries that failed).
fn name_of(t: &DeTable<'_>) -> Option<String> {
    t.iter()
        .find(|(k, _)| k.get_ref().as_ref() == "name")
        .and_then(|(_, v)| v.get_ref().as_str().map(str::to_owned))
}

fn typed<'de, T: Deserialize<'de>>(
    sink: &mut Sink<'_>,
    t: Spanned<DeTable<'de>>,
) -> Option<Spanned<T>> {
    let span = t.span();
    match T::deserialize(toml::de::Deserializer::from(t)) {
        Ok(v) => Some(Spanned::new(span, v)),
        Err(e) => {
            let at = e.span().unwrap_or(span);
            sink.error(
                K::Type,
                at,
                capitalise(e.message().trim()),
                Some("see the examples in policy/examples/ or the JSON Schema".into()),
            );
            None
        }
    }
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

/// Parses and validates `text`; on failure the sink holds every problem.
pub(crate) fn parse(sink: &mut Sink<'_>, text: &str) -> Option<Policy> {
    let (root, errs) = DeTable::parse_recoverable(text);
    if !errs.is_empty() {
        for e in errs {
            let at = e.span().unwrap_or(0..0);
            sink.error(
                K::Syntax,
                at,
                capitalise(e.message().trim()),
                Some("this is not valid TOML; see https://toml.io".into()),
            );
        }
        return None;
    }
    let (mut devices, mut guests, mut restart) = (Vec::new(), Vec::new(), None);
    let mut root = root.into_inner();
    check_keys(sink, &mut root, ROOT_KEYS, "the top level");
    for (k, v) in root {
        match k.get_ref().as_ref() {
            "device" => devices = tables(sink, "device", v),
            "guest" => guests = tables(sink, "guest", v),
            _ => {
                let span = v.span();
                match v.into_inner() {
                    DeValue::Table(mut t) => {
                        check_keys(sink, &mut t, RESTART_KEYS, "[restart]");
                        restart = Some(Spanned::new(span, t));
                    }
                    _ => {
                        sink.error(
                            K::Type,
                            span,
                            "`restart` must be a table",
                            Some("write a [restart] section".into()),
                        );
                    }
                }
            }
        }
    }
    let mut broken = HashSet::new();
    let mut raw_devices = Vec::new();
    for mut t in devices {
        check_keys(sink, t.get_mut(), DEVICE_KEYS, "[[device]]");
        check_sub(
            sink,
            t.get_mut(),
            "restart",
            RESTART_KEYS,
            "[device.restart]",
        );
        let name = name_of(t.get_ref());
        match typed::<RawDevice>(sink, t) {
            Some(d) => raw_devices.push(d),
            None => broken.extend(name),
        }
    }
    let mut raw_guests = Vec::new();
    for mut t in guests {
        check_keys(sink, t.get_mut(), GUEST_KEYS, "[[guest]]");
        check_sub(sink, t.get_mut(), "net", NET_KEYS, "[[guest.net]]");
        check_sub(sink, t.get_mut(), "disk", DISK_KEYS, "[[guest.disk]]");
        raw_guests.extend(typed::<RawGuest>(sink, t));
    }
    let top_restart = restart.and_then(|t| typed::<RawRestart>(sink, t));
    let mut v = Validator { sink, broken };
    let policy = v.policy(
        top_restart.as_ref().map(Spanned::get_ref),
        &raw_devices,
        &raw_guests,
    );
    Some(policy)
}

struct Validator<'s, 'a> {
    sink: &'s mut Sink<'a>,
    broken: HashSet<String>,
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
    fn lookup<'p>(
        &mut self,
        devices: &'p HashMap<String, (usize, Device)>,
        dev: &Spanned<String>,
        want: DeviceKind,
        section: &str,
    ) -> Option<&'p (usize, Device)> {
        let name = dev.get_ref();
        let Some(found) = devices.get(name) else {
            if !self.broken.contains(name) {
                let mut known: Vec<&str> = devices
                    .iter()
                    .filter(|(_, (_, d))| d.kind() == want)
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
        if found.1.kind() != want {
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
                    found.1.kind().as_str(),
                    want.as_str()
                ),
                format!(
                    "move this entry to {other}, or name a {} device",
                    want.as_str()
                ),
            );
            return None;
        }
        Some(found)
    }

    fn policy(
        &mut self,
        top: Option<&RawRestart>,
        raw_devices: &[Spanned<RawDevice>],
        raw_guests: &[Spanned<RawGuest>],
    ) -> Policy {
        let restart = self.restart(RestartPolicy::default(), top);
        let mut devices = Vec::new();
        let mut by_name: HashMap<String, (usize, Device)> = HashMap::new();
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
            match self.device(d, restart) {
                Some(dev) => {
                    by_name.insert(name.clone(), (idx, dev.clone()));
                    devices.push(dev);
                }
                None => {
                    self.broken.insert(name.clone());
                }
            }
        }
        let mut guests = Vec::new();
        let mut guest_spans: HashMap<String, Range<usize>> = HashMap::new();
        let mut macs: HashMap<MacAddr, Range<usize>> = HashMap::new();
        let mut shares: HashMap<String, Vec<(Share, Range<usize>)>> = HashMap::new();
        let mut regions: HashMap<String, Vec<Declared<'_>>> = HashMap::new();
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
                let Some((didx, _)) =
                    self.lookup(&by_name, &n.device, DeviceKind::VirtioNet, "[[guest.net]]")
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
                    None => match (u8::try_from(*didx), u8::try_from(gidx), u8::try_from(nidx)) {
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
                let Some((_, dev)) =
                    self.lookup(&by_name, &a.device, DeviceKind::VirtioBlk, "[[guest.disk]]")
                else {
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
                } else if end.map_or(true, |e| e > size) {
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
            guests.push(Guest {
                name: gname.clone(),
                kind: g.kind.as_ref().map(|k| *k.get_ref()).unwrap_or_default(),
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
                    .push((a.span.clone(), format!("`{}`'s region ({}{})", a.guest, units::format_size(a.region.offset), if a.read_only { ", read-only" } else { ", writable" })));
                }
            }
        }
    }
}

/// Parses a MAC written as six hex pairs separated by `:` or `-`; says why not.
pub fn parse_mac(s: &str) -> Result<MacAddr, &'static str> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6 || parts.iter().any(|p| p.len() != 2) {
        return Err("is not a MAC address (six hex pairs such as 02:00:00:00:00:01)");
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(&parts) {
        *b = u8::from_str_radix(p, 16).map_err(|_| "has a pair that is not hex")?;
    }
    if mac == [0; 6] {
        return Err("is the all-zero MAC");
    }
    if mac[0] & 1 != 0 {
        return Err("is a multicast MAC (bit 0 of the first octet is set)");
    }
    Ok(MacAddr(mac))
}

/// Parses `dddd:bb:dd.f` (hex; the domain may be left out).
pub fn parse_pci(s: &str) -> Option<PciAddress> {
    let (rest, function) = s.rsplit_once('.')?;
    let parts: Vec<&str> = rest.split(':').collect();
    let (domain, bus, device) = match parts.as_slice() {
        [d, b, v] => (*d, *b, *v),
        [b, v] => ("0", *b, *v),
        _ => return None,
    };
    let hex = |x: &str, max: usize| {
        (!x.is_empty() && x.len() <= max)
            .then(|| u32::from_str_radix(x, 16).ok())
            .flatten()
    };
    let device = u8::try_from(hex(device, 2)?).ok().filter(|&d| d < 32)?;
    let function = u8::try_from(hex(function, 1)?).ok().filter(|&f| f < 8)?;
    Some(PciAddress {
        domain: u16::try_from(hex(domain, 4)?).ok()?,
        bus: u8::try_from(hex(bus, 2)?).ok()?,
        device,
        function,
    })
}

fn span<T>(f: &Option<Spanned<T>>) -> Option<Range<usize>> {
    f.as_ref().map(Spanned::span)
}

fn valid_ifname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s != "."
        && s != ".."
        && !s.chars().any(|c| c == '/' || c == ':' || c.is_whitespace())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("02:00:00:00:00:01"),
            Ok(MacAddr([2, 0, 0, 0, 0, 1]))
        );
        assert_eq!(
            parse_mac("02-AB-00-00-00-01"),
            Ok(MacAddr([2, 0xab, 0, 0, 0, 1]))
        );
        assert!(parse_mac("01:00:5e:00:00:01")
            .unwrap_err()
            .contains("multicast"));
        assert!(parse_mac("ff:ff:ff:ff:ff:ff")
            .unwrap_err()
            .contains("multicast"));
        assert!(parse_mac("00:00:00:00:00:00")
            .unwrap_err()
            .contains("all-zero"));
        assert!(parse_mac("02:00:00:00:00").is_err());
        assert!(parse_mac("02:00:00:00:00:zz").is_err());
    }

    #[test]
    fn pci_addresses() {
        assert_eq!(
            parse_pci("0000:00:04.0"),
            Some(PciAddress {
                domain: 0,
                bus: 0,
                device: 4,
                function: 0
            })
        );
        assert_eq!(
            parse_pci("01:1f.7"),
            Some(PciAddress {
                domain: 0,
                bus: 1,
                device: 0x1f,
                function: 7
            })
        );
        assert_eq!(parse_pci("0000:00:20.0"), None, "device 32");
        assert_eq!(parse_pci("0000:00:04.8"), None, "function 8");
        assert_eq!(parse_pci("00:04"), None);
    }

    #[test]
    fn ifnames() {
        assert!(valid_ifname("tap0"));
        assert!(!valid_ifname("a-very-long-interface"));
        assert!(!valid_ifname("a/b"));
        assert!(!valid_ifname(""));
    }
}
