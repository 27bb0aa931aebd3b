//! Fuzz target bodies, shared by the libFuzzer targets in `devchan/fuzz/fuzz_targets/` and by
//! unit tests that run them over random inputs.
//!
//! * [`xenstore_msg`]: arbitrary bytes as a client's message stream: framing, payload parsing
//!   for every type and domain, and a store handling what decodes.
//! * [`xenstore_ops`]: bytes decoded into a sequence of operations by several connections of
//!   three domains (one privileged) against a store with tight quotas. After every operation
//!   it checks the store's invariants (structure, quotas) and that no unprivileged request
//!   succeeded without the permission it needs.

use super::path::INTRODUCE_DOMAIN;
use super::perms::{access_for, Perm, PERM_READ, PERM_WRITE};
use super::request::Request;
use super::store::{ConnId, Quotas, Store};
use super::tree::Tree;
use super::wire::{Decoder, Message, MsgType};
use crate::grant::DomId;

/// Decodes `data` as a message stream and runs what decodes through a store.
pub fn xenstore_msg(data: &[u8]) {
    let mut store = Store::with_quotas(tight_quotas());
    let conns = [store.connect(0), store.connect(3)];
    let mut d = Decoder::new();
    // Feed in two pieces split by the first byte, so split handling is exercised too.
    let cut = data.first().map_or(0, |b| usize::from(*b)).min(data.len());
    for piece in [&data[..cut], &data[cut..]] {
        d.push(piece);
        loop {
            match d.next_message() {
                Ok(Some(m)) => {
                    let mut again = Decoder::new();
                    again.push(&m.encode());
                    assert_eq!(
                        again.next_message(),
                        Ok(Some(m.clone())),
                        "re-encoding changed it"
                    );
                    for domid in [0, 3, 0x7ff0] {
                        let _ = Request::parse(&m, domid);
                    }
                    let _ = super::WatchEvent::parse(&m.payload);
                    let conn = conns[usize::from(m.req_id & 1 == 1)];
                    let r = store.handle(conn, &m);
                    assert!(r.reply.payload.len() <= super::wire::XENSTORE_PAYLOAD_MAX);
                    assert_eq!(r.reply.req_id, m.req_id);
                }
                Ok(None) => break,
                Err(e) if e.is_fatal() => return,
                Err(_) => {}
            }
        }
    }
    if let Err(e) = store.check_invariants() {
        panic!("store invariant broken: {e}");
    }
}

/// Small quotas, so fuzzing reaches them.
pub fn tight_quotas() -> Quotas {
    Quotas {
        nodes: 8,
        entry_size: 16,
        watches: 3,
        transactions: 2,
        perms: 3,
    }
}

const PATHS: &[&str] = &[
    "/",
    "/a",
    "/a/b",
    "/a/b/c",
    "/local/domain/1",
    "/local/domain/1/x",
    "/local/domain/1/x/y",
    "/local/domain/2",
    "/local/domain/2/z",
    "x",
    "x/y",
    "q/r/s/t/u/v",
    "@releaseDomain",
    INTRODUCE_DOMAIN,
    "/bad//path",
];

struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*b)
    }
}

/// Whether the live tree lets `domid` do `need` to `p` (the node, or for a missing node its
/// nearest existing ancestor); `owner` asks for ownership instead.
fn allowed(tree: &Tree, domid: DomId, p: &str, need: u8, owner: bool) -> bool {
    let (_, existing) = tree.missing_chain(p);
    let Some(node) = tree.get(&existing) else {
        return false;
    };
    let (access, is_owner) = access_for(&node.perms, domid, None);
    if owner {
        is_owner
    } else {
        access & need == need
    }
}

/// Decodes `data` into operations by several domains and runs them, checking invariants.
pub fn xenstore_ops(data: &[u8]) {
    let quotas = tight_quotas();
    let mut store = Store::with_quotas(quotas);
    let domains: [DomId; 4] = [0, 1, 1, 2];
    let conns: Vec<ConnId> = domains.iter().map(|d| store.connect(*d)).collect();
    let mut open_tx: Vec<u32> = vec![0; conns.len()];
    let mut input = Bytes(data);
    let mut req_id = 0u32;
    while let Some(op) = input.byte() {
        let who = usize::from(op >> 5) % conns.len();
        let (conn, domid) = (conns[who], domains[who]);
        let kind = op & 0x1f;
        let arg = input.byte().unwrap_or(0);
        let raw_path = PATHS[usize::from(arg) % PATHS.len()];
        let in_tx = arg & 0x80 != 0;
        let tx = if in_tx { open_tx[who] } else { 0 };
        let extra = input.byte().unwrap_or(0);
        let (ty, payload): (MsgType, Vec<u8>) = match kind {
            0 => (MsgType::Read, Message::strings(&[raw_path.as_bytes()])),
            1 | 2 => {
                let mut p = Message::strings(&[raw_path.as_bytes()]);
                p.resize(p.len() + usize::from(extra % 24), b'v');
                (MsgType::Write, p)
            }
            3 => (MsgType::Mkdir, Message::strings(&[raw_path.as_bytes()])),
            4 => (MsgType::Rm, Message::strings(&[raw_path.as_bytes()])),
            5 => (MsgType::Directory, Message::strings(&[raw_path.as_bytes()])),
            6 => (MsgType::GetPerms, Message::strings(&[raw_path.as_bytes()])),
            7 | 8 => {
                let n = usize::from(extra % 5) + 1;
                let perms: Vec<String> = (0..n)
                    .map(|i| {
                        let b = input.byte().unwrap_or(0);
                        let d = DomId::from(b % 3);
                        Perm::new(if i == 0 { d } else { DomId::from(b >> 2) % 4 }, b >> 6).encode()
                    })
                    .collect();
                let mut parts: Vec<&[u8]> = vec![raw_path.as_bytes()];
                parts.extend(perms.iter().map(String::as_bytes));
                (MsgType::SetPerms, Message::strings(&parts))
            }
            9 | 10 => {
                let token = [b'a' + extra % 4];
                let ty = if kind == 9 {
                    MsgType::Watch
                } else {
                    MsgType::Unwatch
                };
                (ty, Message::strings(&[raw_path.as_bytes(), &token]))
            }
            11 => (MsgType::TransactionStart, b"\0".to_vec()),
            12 => {
                let t = if extra & 1 == 0 { &b"T\0"[..] } else { b"F\0" };
                (MsgType::TransactionEnd, t.to_vec())
            }
            13 => (
                MsgType::Introduce,
                format!("{}\0{extra}\x001\0", 1 + extra % 3).into_bytes(),
            ),
            14 => (
                MsgType::Release,
                format!("{}\0", 1 + extra % 3).into_bytes(),
            ),
            15 => (MsgType::ResetWatches, Vec::new()),
            16 => (
                MsgType::DirectoryPart,
                format!("{raw_path}\0{}\0", extra % 8).into_bytes(),
            ),
            _ => {
                // Raw bytes as a payload of any type.
                let n = usize::from(extra % 16);
                let mut p = Vec::new();
                for _ in 0..n {
                    p.push(input.byte().unwrap_or(0));
                }
                let ty = MsgType::ALL[usize::from(arg) % MsgType::ALL.len()].0;
                (ty, p)
            }
        };
        let tx = if kind == 12 { open_tx[who] } else { tx };
        req_id = req_id.wrapping_add(1);
        let msg = Message::new(ty, req_id, tx, payload);
        let before = store.tree().clone();
        let resp = store.handle(conn, &msg);
        let ok = resp.reply.ty != MsgType::Error;
        assert_eq!(resp.reply.req_id, req_id);

        match ty {
            MsgType::TransactionStart if ok => {
                let s = resp
                    .reply
                    .payload
                    .strip_suffix(&[0])
                    .unwrap_or(&resp.reply.payload);
                open_tx[who] = std::str::from_utf8(s)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
            }
            MsgType::TransactionEnd if tx == open_tx[who] => open_tx[who] = 0,
            MsgType::ResetWatches => open_tx[who] = 0,
            _ => {}
        }

        // Permission invariants, for requests on the live tree by unprivileged domains.
        if ok && domid != 0 && tx == 0 && kind < 17 {
            if let Ok(rp) = super::path::resolve(raw_path.as_bytes(), domid, true) {
                let p = rp.abs.as_str();
                let existed = before.get(p).is_some();
                let fine = match ty {
                    MsgType::Read | MsgType::Directory | MsgType::DirectoryPart => {
                        allowed(&before, domid, p, PERM_READ, false)
                    }
                    MsgType::GetPerms => {
                        rp.is_special() || allowed(&before, domid, p, PERM_READ, false)
                    }
                    MsgType::Write => {
                        let value_len = msg.payload.len() - raw_path.len() - 1;
                        allowed(&before, domid, p, PERM_WRITE, false)
                            && value_len <= quotas.entry_size
                    }
                    MsgType::Mkdir => allowed(&before, domid, p, PERM_WRITE, false),
                    MsgType::Rm => !existed || allowed(&before, domid, p, PERM_WRITE, false),
                    MsgType::SetPerms => rp.is_special() || allowed(&before, domid, p, 0, true),
                    MsgType::Introduce | MsgType::Release => false,
                    _ => true,
                };
                assert!(fine, "domain {domid} did {ty:?} on {p} without permission");
            }
        }
        for (to, ev) in &resp.events {
            assert!(conns.contains(to), "event for an unknown connection");
            assert_eq!(ev.ty, MsgType::WatchEvent);
        }
        if let Err(e) = store.check_invariants() {
            panic!("invariant broken after {ty:?} by domain {domid}: {e}");
        }
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    /// xorshift64*: deterministic inputs without a dependency.
    fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut x = seed | 1;
        move || {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    #[test]
    fn msg_body_survives_random_input() {
        let mut r = rng(0x5eed);
        for _ in 0..3000 {
            let len = (r() % 600) as usize;
            let mut data: Vec<u8> = (0..len).map(|_| r() as u8).collect();
            // Half the time, make a plausible header so payload parsing gets reached.
            if len >= 16 && r() % 2 == 0 {
                let ty = (r() % 24) as u32;
                let plen = ((len - 16) as u32).min((r() % 200) as u32);
                data[..4].copy_from_slice(&ty.to_ne_bytes());
                data[12..16].copy_from_slice(&plen.to_ne_bytes());
            }
            xenstore_msg(&data);
        }
    }

    #[test]
    fn ops_body_survives_random_input() {
        let mut r = rng(0x0b5);
        for _ in 0..3000 {
            let len = (r() % 400) as usize;
            let data: Vec<u8> = (0..len).map(|_| r() as u8).collect();
            xenstore_ops(&data);
        }
    }

    #[test]
    fn ops_body_reaches_quotas() {
        // Domain 1 (second connection: op byte 0b001_xxxxx) writes many nodes at home.
        let mut data = Vec::new();
        for i in 0..12u8 {
            data.extend([0x20 | 1, 5 + (i % 2), 3]);
        }
        xenstore_ops(&data);
    }
}
