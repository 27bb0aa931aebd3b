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

mod meaning;
mod values;

use std::collections::HashSet;

use serde::Deserialize;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::diag::{ErrorKind as K, Sink};
use crate::model::*;
use crate::raw::*;
use crate::units::Rate;
use meaning::Validator;
pub use values::{parse_mac, parse_pci};

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
