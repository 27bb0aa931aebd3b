//! Store behaviour tests: permissions, quotas, watches, domains, and property tests of the tree
//! and of transactions against a simple model.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::perms::{Perm, PERM_READ, PERM_WRITE};
use super::store::{ConnId, DomainAction, Quotas, Store};
use super::wire::{Message, MsgType};
use super::XsError;

fn req(
    store: &mut Store,
    conn: ConnId,
    ty: MsgType,
    tx: u32,
    payload: &[u8],
) -> Result<Vec<u8>, XsError> {
    let r = store.handle(conn, &Message::new(ty, 1, tx, payload.to_vec()));
    if r.reply.ty == MsgType::Error {
        Err(XsError::from_name(&r.reply.payload))
    } else {
        assert_eq!(r.reply.ty, ty);
        Ok(r.reply.payload)
    }
}

fn write(s: &mut Store, c: ConnId, p: &str, v: &[u8]) -> Result<Vec<u8>, XsError> {
    let mut payload = Message::strings(&[p.as_bytes()]);
    payload.extend_from_slice(v);
    req(s, c, MsgType::Write, 0, &payload)
}

fn one(s: &mut Store, c: ConnId, ty: MsgType, p: &str) -> Result<Vec<u8>, XsError> {
    req(s, c, ty, 0, &Message::strings(&[p.as_bytes()]))
}

fn set_perms(s: &mut Store, c: ConnId, p: &str, perms: &[&str]) -> Result<Vec<u8>, XsError> {
    let mut parts: Vec<&[u8]> = vec![p.as_bytes()];
    parts.extend(perms.iter().map(|s| s.as_bytes()));
    req(s, c, MsgType::SetPerms, 0, &Message::strings(&parts))
}

fn home(s: &mut Store, dom0: ConnId, d: u16) {
    let p = format!("/local/domain/{d}");
    write(s, dom0, &p, b"").unwrap();
    set_perms(s, dom0, &p, &[&format!("n{d}")]).unwrap();
}

#[test]
fn unprivileged_domains_are_confined() {
    let mut s = Store::new();
    let dom0 = s.connect(0);
    let d1 = s.connect(1);
    let d2 = s.connect(2);
    home(&mut s, dom0, 1);
    home(&mut s, dom0, 2);
    write(&mut s, d1, "mine", b"1").unwrap();
    assert_eq!(
        one(&mut s, d1, MsgType::Read, "/local/domain/1/mine").unwrap(),
        b"1"
    );
    assert_eq!(
        one(&mut s, d2, MsgType::Read, "/local/domain/1/mine"),
        Err(XsError::Eacces)
    );
    assert_eq!(
        write(&mut s, d2, "/local/domain/1/x", b""),
        Err(XsError::Eacces)
    );
    assert_eq!(
        one(&mut s, d2, MsgType::Rm, "/local/domain/1/mine"),
        Err(XsError::Eacces)
    );
    assert_eq!(write(&mut s, d1, "/top", b""), Err(XsError::Eacces));
    // Grant domain 2 read access: now it can read, still not write.
    set_perms(&mut s, d1, "mine", &["n1", "r2"]).unwrap();
    assert_eq!(
        one(&mut s, d2, MsgType::Read, "/local/domain/1/mine").unwrap(),
        b"1"
    );
    assert_eq!(
        write(&mut s, d2, "/local/domain/1/mine", b"2"),
        Err(XsError::Eacces)
    );
    // Only dom0 may hand a node to another owner.
    assert_eq!(set_perms(&mut s, d1, "mine", &["n2"]), Err(XsError::Eperm));
    assert_eq!(
        set_perms(&mut s, d2, "/local/domain/1/mine", &["n2"]),
        Err(XsError::Eacces)
    );
    assert_eq!(
        one(&mut s, d1, MsgType::GetPerms, "mine").unwrap(),
        b"n1\0r2\0"
    );
    // Domain-management requests are dom0's.
    assert_eq!(
        req(&mut s, d1, MsgType::Introduce, 0, b"5\x001\x001\0"),
        Err(XsError::Eacces)
    );
    assert_eq!(
        req(&mut s, d1, MsgType::Release, 0, b"2\0"),
        Err(XsError::Eacces)
    );
    s.check_invariants().unwrap();
}

#[test]
fn created_nodes_inherit_and_creator_owns() {
    let mut s = Store::new();
    let dom0 = s.connect(0);
    let d3 = s.connect(3);
    write(&mut s, dom0, "/shared", b"").unwrap();
    set_perms(&mut s, dom0, "/shared", &["n0", "w3", "r4"]).unwrap();
    write(&mut s, d3, "/shared/a/b", b"x").unwrap();
    assert_eq!(
        one(&mut s, dom0, MsgType::GetPerms, "/shared/a/b").unwrap(),
        b"n3\0w3\0r4\0"
    );
    assert_eq!(s.tree().owned(3), 2);
    // dom0 creating keeps the inherited owner.
    write(&mut s, dom0, "/shared/c", b"").unwrap();
    assert_eq!(s.tree().get("/shared/c").unwrap().perms[0], Perm::new(0, 0));
}

#[test]
fn quotas_hold() {
    let q = Quotas {
        nodes: 3,
        entry_size: 4,
        watches: 2,
        transactions: 1,
        perms: 2,
    };
    let mut s = Store::with_quotas(q);
    let dom0 = s.connect(0);
    let d1 = s.connect(1);
    home(&mut s, dom0, 1);
    assert_eq!(write(&mut s, d1, "big", b"12345"), Err(XsError::Enospc));
    write(&mut s, d1, "a", b"1234").unwrap();
    // Home (owned by 1) + a = 2; two more would make 4.
    assert_eq!(write(&mut s, d1, "b/c", b""), Err(XsError::Enospc));
    write(&mut s, d1, "b", b"").unwrap();
    assert_eq!(write(&mut s, d1, "c", b""), Err(XsError::Enospc));
    // dom0 cannot push a domain over its quota by giving it nodes either.
    write(&mut s, dom0, "/gift", b"").unwrap();
    assert_eq!(
        set_perms(&mut s, dom0, "/gift", &["n1"]),
        Err(XsError::Enospc)
    );
    // Removing frees quota.
    one(&mut s, d1, MsgType::Rm, "b").unwrap();
    write(&mut s, d1, "c", b"").unwrap();
    assert_eq!(
        set_perms(&mut s, d1, "c", &["n1", "r2", "r3"]),
        Err(XsError::Enospc)
    );
    let watch = |s: &mut Store, t: &str| {
        req(
            s,
            d1,
            MsgType::Watch,
            0,
            &Message::strings(&[b"a", t.as_bytes()]),
        )
    };
    watch(&mut s, "1").unwrap();
    assert_eq!(watch(&mut s, "1"), Err(XsError::Eexist));
    watch(&mut s, "2").unwrap();
    assert_eq!(watch(&mut s, "3"), Err(XsError::E2big));
    req(&mut s, d1, MsgType::TransactionStart, 0, b"\0").unwrap();
    assert_eq!(
        req(&mut s, d1, MsgType::TransactionStart, 0, b"\0"),
        Err(XsError::Enospc)
    );
    // dom0 has no node or size quota.
    write(&mut s, dom0, "/x/y/z/w", b"0123456789").unwrap();
    s.check_invariants().unwrap();
}

#[test]
fn watches_fire_with_permissions_and_on_removal() {
    let mut s = Store::new();
    let dom0 = s.connect(0);
    let d1 = s.connect(1);
    home(&mut s, dom0, 1);
    write(&mut s, dom0, "/local/domain/1/dev/state", b"1").unwrap();
    let r = s.handle(
        d1,
        &Message::new(MsgType::Watch, 1, 0, b"dev/state\0tok\0".to_vec()),
    );
    assert_eq!(
        r.events,
        [(
            d1,
            Message::new(MsgType::WatchEvent, 0, 0, b"dev/state\0tok\0".to_vec())
        )]
    );
    // A node below the watch that domain 1 cannot read: its changes send no event.
    let r = s.handle(
        dom0,
        &Message::new(
            MsgType::Write,
            2,
            0,
            b"/local/domain/1/dev/state/secret\0s".to_vec(),
        ),
    );
    assert_eq!(
        r.events.len(),
        1,
        "inherited permissions let domain 1 read it"
    );
    let r = s.handle(
        dom0,
        &Message::new(
            MsgType::SetPerms,
            2,
            0,
            b"/local/domain/1/dev/state/secret\0n0\0".to_vec(),
        ),
    );
    assert!(r.events.is_empty());
    let r = s.handle(
        dom0,
        &Message::new(
            MsgType::Write,
            2,
            0,
            b"/local/domain/1/dev/state/secret\0t".to_vec(),
        ),
    );
    assert!(r.events.is_empty());
    // dom0 changes the readable node: relative event.
    write(&mut s, dom0, "/local/domain/1/dev/state", b"").unwrap();
    let r = s.handle(
        dom0,
        &Message::new(
            MsgType::Write,
            3,
            0,
            b"/local/domain/1/dev/state\x004".to_vec(),
        ),
    );
    assert_eq!(r.events.len(), 1);
    assert_eq!(r.events[0].1.payload, b"dev/state\0tok\0");
    // Removing an ancestor fires the watch with its own path.
    let w = s.handle(
        dom0,
        &Message::new(
            MsgType::Watch,
            4,
            0,
            b"/local/domain/1/dev/state\0t0\0".to_vec(),
        ),
    );
    assert_eq!(w.events.len(), 1);
    let r = s.handle(
        dom0,
        &Message::new(MsgType::Rm, 5, 0, b"/local/domain/1/dev\0".to_vec()),
    );
    let paths: Vec<(ConnId, Vec<u8>)> = r
        .events
        .iter()
        .map(|(c, m)| (*c, m.payload.clone()))
        .collect();
    assert!(
        paths.contains(&(dom0, b"/local/domain/1/dev/state\0t0\0".to_vec())),
        "{paths:?}"
    );
    assert!(
        paths.contains(&(d1, b"dev/state\0tok\0".to_vec())),
        "{paths:?}"
    );
    // Unwatch stops events.
    req(
        &mut s,
        dom0,
        MsgType::Unwatch,
        0,
        b"/local/domain/1/dev/state\0t0\0",
    )
    .unwrap();
    assert_eq!(
        req(
            &mut s,
            dom0,
            MsgType::Unwatch,
            0,
            b"/local/domain/1/dev/state\0t0\0"
        ),
        Err(XsError::Enoent)
    );
}

#[test]
fn domains_and_special_watches() {
    let mut s = Store::new();
    let dom0 = s.connect(0);
    let d2 = s.connect(2);
    req(&mut s, dom0, MsgType::Watch, 0, b"@introduceDomain\0i\0").unwrap();
    req(&mut s, d2, MsgType::Watch, 0, b"@releaseDomain\0r\0").unwrap();
    let r = s.handle(
        dom0,
        &Message::new(MsgType::Introduce, 1, 0, b"7\x00100\x003\0".to_vec()),
    );
    assert_eq!(
        r.action,
        Some(DomainAction::Introduced {
            domid: 7,
            mfn: 100,
            port: 3
        })
    );
    assert_eq!(
        r.events,
        [(
            dom0,
            Message::new(MsgType::WatchEvent, 0, 0, b"@introduceDomain\0i\0".to_vec())
        )]
    );
    assert_eq!(
        req(&mut s, dom0, MsgType::Introduce, 0, b"7\x00101\x003\0"),
        Err(XsError::Eexist)
    );
    assert_eq!(
        req(&mut s, dom0, MsgType::IsDomainIntroduced, 0, b"7\0").unwrap(),
        b"T\0"
    );
    assert_eq!(
        req(&mut s, dom0, MsgType::IsDomainIntroduced, 0, b"8\0").unwrap(),
        b"F\0"
    );
    assert_eq!(
        req(&mut s, d2, MsgType::GetDomainPath, 0, b"7\0").unwrap(),
        b"/local/domain/7\0"
    );
    // Domain 2 may not see @releaseDomain until dom0 lets it.
    let r = s.handle(dom0, &Message::new(MsgType::Release, 2, 0, b"7\0".to_vec()));
    assert_eq!(r.action, Some(DomainAction::Released(7)));
    assert!(r.events.is_empty());
    req(&mut s, dom0, MsgType::Introduce, 0, b"7\x00100\x003\0").unwrap();
    set_perms(&mut s, dom0, "@releaseDomain", &["n0", "r2"]).unwrap();
    let r = s.handle(dom0, &Message::new(MsgType::Release, 3, 0, b"7\0".to_vec()));
    assert_eq!(
        r.events,
        [(
            d2,
            Message::new(MsgType::WatchEvent, 0, 0, b"@releaseDomain\0r\0".to_vec())
        )]
    );
    assert_eq!(
        req(&mut s, dom0, MsgType::Release, 0, b"7\0"),
        Err(XsError::Enoent)
    );
    assert_eq!(
        req(&mut s, dom0, MsgType::Read, 0, b"@releaseDomain\0"),
        Err(XsError::Einval)
    );
}

#[test]
fn transaction_edge_cases() {
    let mut s = Store::new();
    let c = s.connect(0);
    let other = s.connect(0);
    let id = req(&mut s, c, MsgType::TransactionStart, 0, b"\0").unwrap();
    let tx: u32 = std::str::from_utf8(&id[..id.len() - 1])
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        req(&mut s, c, MsgType::TransactionStart, tx, b"\0"),
        Err(XsError::Ebusy)
    );
    // Another connection cannot use it.
    assert_eq!(
        req(&mut s, other, MsgType::Read, tx, b"/\0"),
        Err(XsError::Enoent)
    );
    assert_eq!(
        req(&mut s, c, MsgType::TransactionEnd, tx, b"X\0"),
        Err(XsError::Einval)
    );
    // Watches fire on commit, not before.
    req(&mut s, other, MsgType::Watch, 0, b"/w\0t\0").unwrap();
    let r = s.handle(c, &Message::new(MsgType::Write, 9, tx, b"/w\0v".to_vec()));
    assert!(r.events.is_empty());
    assert_eq!(r.reply.tx_id, tx);
    let r = s.handle(
        c,
        &Message::new(MsgType::TransactionEnd, 10, tx, b"T\0".to_vec()),
    );
    assert_eq!(r.events.len(), 1);
    assert_eq!(
        req(&mut s, c, MsgType::TransactionEnd, tx, b"T\0"),
        Err(XsError::Enoent)
    );
    // Disconnecting drops open transactions.
    req(&mut s, c, MsgType::TransactionStart, 0, b"\0").unwrap();
    assert_eq!(s.transaction_count(c), 1);
    s.disconnect(c);
    assert_eq!(s.transaction_count(c), 0);
}

// ---- Property tests against a model ----

const PATHS: &[&str] = &["/t", "/t/a", "/t/a/b", "/t/c", "/t/c/d", "/t/e"];

#[derive(Clone, Debug)]
enum Op {
    Read(usize),
    Dir(usize),
    Write(usize, u8),
    Mkdir(usize),
    Rm(usize),
}

fn arb_op() -> impl Strategy<Value = Op> {
    let i = 0..PATHS.len();
    prop_oneof![
        i.clone().prop_map(Op::Read),
        i.clone().prop_map(Op::Dir),
        (i.clone(), any::<u8>()).prop_map(|(i, v)| Op::Write(i, v)),
        i.clone().prop_map(Op::Mkdir),
        i.prop_map(Op::Rm),
    ]
}

#[derive(Clone, Debug)]
enum Step {
    Live(Op),
    Start,
    InTx(Op),
    End(bool),
}

fn arb_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => arb_op().prop_map(Step::Live),
        1 => Just(Step::Start),
        3 => arb_op().prop_map(Step::InTx),
        1 => any::<bool>().prop_map(Step::End),
    ]
}

/// The model: path -> (value, version). A node's version changes whenever its value, its
/// existence or its set of children changes.
#[derive(Clone, Debug, Default)]
struct Model {
    nodes: BTreeMap<String, (Vec<u8>, u64)>,
}

fn parent(p: &str) -> String {
    match p.rfind('/') {
        Some(0) => "/".into(),
        Some(i) => p[..i].into(),
        None => "/".into(),
    }
}

impl Model {
    fn new() -> Self {
        let mut m = Self::default();
        m.nodes.insert("/".into(), (vec![], 0));
        m
    }

    fn bump(&mut self, p: &str, clock: &mut u64) {
        *clock += 1;
        if let Some(n) = self.nodes.get_mut(p) {
            n.1 = *clock;
        }
    }

    fn version(&self, p: &str) -> Option<u64> {
        self.nodes.get(p).map(|n| n.1)
    }

    fn children(&self, p: &str) -> Vec<u8> {
        let mut out = Vec::new();
        for k in self.nodes.keys() {
            if k != "/" && parent(k) == p {
                out.extend_from_slice(k.rsplit('/').next().unwrap().as_bytes());
                out.push(0);
            }
        }
        out
    }

    /// Applies `op`; returns the expected reply and the paths it depends on or changes.
    fn apply(&mut self, op: &Op, clock: &mut u64) -> (Result<Vec<u8>, XsError>, Vec<String>) {
        match op {
            Op::Read(i) => {
                let p = PATHS[*i];
                (
                    self.nodes
                        .get(p)
                        .map(|n| n.0.clone())
                        .ok_or(XsError::Enoent),
                    vec![p.into()],
                )
            }
            Op::Dir(i) => {
                let p = PATHS[*i];
                let r = if self.nodes.contains_key(p) {
                    Ok(self.children(p))
                } else {
                    Err(XsError::Enoent)
                };
                (r, vec![p.into()])
            }
            Op::Write(i, _) | Op::Mkdir(i) => {
                let p = PATHS[*i];
                let value = match op {
                    Op::Write(_, v) => Some(vec![*v]),
                    _ => None,
                };
                let mut touched = vec![];
                let mut missing = vec![];
                let mut cur = p.to_string();
                while !self.nodes.contains_key(&cur) {
                    missing.push(cur.clone());
                    cur = parent(&cur);
                }
                touched.push(cur.clone());
                if missing.is_empty() {
                    if let Some(v) = value {
                        self.nodes.get_mut(p).unwrap().0 = v;
                        self.bump(p, clock);
                    }
                } else {
                    self.bump(&cur, clock);
                    for m in missing.iter().rev() {
                        *clock += 1;
                        let v = if m == p {
                            value.clone().unwrap_or_default()
                        } else {
                            vec![]
                        };
                        self.nodes.insert(m.clone(), (v, *clock));
                        touched.push(m.clone());
                    }
                }
                (Ok(b"OK\0".to_vec()), touched)
            }
            Op::Rm(i) => {
                let p = PATHS[*i];
                let par = parent(p);
                if !self.nodes.contains_key(p) {
                    let r = if self.nodes.contains_key(&par) {
                        Ok(b"OK\0".to_vec())
                    } else {
                        Err(XsError::Enoent)
                    };
                    return (r, vec![p.into(), par]);
                }
                let sub: Vec<String> = self
                    .nodes
                    .keys()
                    .filter(|k| *k == p || k.starts_with(&format!("{p}/")))
                    .cloned()
                    .collect();
                for k in &sub {
                    self.nodes.remove(k);
                }
                self.bump(&par, clock);
                let mut touched = sub;
                touched.push(par);
                (Ok(b"OK\0".to_vec()), touched)
            }
        }
    }
}

fn encode(op: &Op) -> (MsgType, Vec<u8>) {
    let path = |i: &usize| Message::strings(&[PATHS[*i].as_bytes()]);
    match op {
        Op::Read(i) => (MsgType::Read, path(i)),
        Op::Dir(i) => (MsgType::Directory, path(i)),
        Op::Write(i, v) => {
            let mut p = path(i);
            p.push(*v);
            (MsgType::Write, p)
        }
        Op::Mkdir(i) => (MsgType::Mkdir, path(i)),
        Op::Rm(i) => (MsgType::Rm, path(i)),
    }
}

struct ModelTx {
    id: u32,
    snapshot: Model,
    accessed: BTreeMap<String, Option<u64>>,
    ops: Vec<Op>,
}

fn assert_tree_matches(store: &Store, model: &Model) -> Result<(), TestCaseError> {
    let ours: BTreeMap<String, Vec<u8>> = store
        .tree()
        .iter()
        .map(|(k, n)| (k.clone(), n.value.clone()))
        .collect();
    let theirs: BTreeMap<String, Vec<u8>> = model
        .nodes
        .iter()
        .map(|(k, n)| (k.clone(), n.0.clone()))
        .collect();
    prop_assert_eq!(ours, theirs);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Live operations and one connection's transactions, against the model: every reply
    /// matches, commits fail with EAGAIN exactly when a node the transaction touched changed
    /// since it started, and a successful commit equals replaying its operations.
    #[test]
    fn store_and_transactions_follow_the_model(steps in prop::collection::vec(arb_step(), 1..60)) {
        let mut store = Store::new();
        let live_conn = store.connect(0);
        let tx_conn = store.connect(0);
        let mut model = Model::new();
        let mut clock = 0u64;
        let mut tx: Option<ModelTx> = None;
        for step in steps {
            match step {
                Step::Live(op) => {
                    let (expect, _) = model.apply(&op, &mut clock);
                    let (ty, p) = encode(&op);
                    prop_assert_eq!(req(&mut store, live_conn, ty, 0, &p), expect, "{:?}", op);
                }
                Step::Start => {
                    if tx.is_none() {
                        let id = req(&mut store, tx_conn, MsgType::TransactionStart, 0, b"\0");
                        let id = id.unwrap();
                        let id = std::str::from_utf8(&id[..id.len() - 1]).unwrap().parse().unwrap();
                        let snapshot = model.clone();
                        tx = Some(ModelTx { id, snapshot, accessed: BTreeMap::new(), ops: vec![] });
                    }
                }
                Step::InTx(op) => {
                    if let Some(t) = tx.as_mut() {
                        let before = t.snapshot.clone();
                        let mut scratch = clock;
                        let (expect, touched) = t.snapshot.apply(&op, &mut scratch);
                        for p in touched {
                            t.accessed.entry(p.clone()).or_insert(before.version(&p));
                        }
                        t.ops.push(op.clone());
                        let (ty, p) = encode(&op);
                        let got = req(&mut store, tx_conn, ty, t.id, &p);
                        prop_assert_eq!(got, expect, "in tx: {:?}", op);
                    }
                }
                Step::End(commit) => {
                    if let Some(t) = tx.take() {
                        let p: &[u8] = if commit { b"T\0" } else { b"F\0" };
                        let got = req(&mut store, tx_conn, MsgType::TransactionEnd, t.id, p);
                        let conflict = t.accessed.iter().any(|(p, v)| model.version(p) != *v);
                        if !commit {
                            prop_assert_eq!(got, Ok(b"OK\0".to_vec()));
                        } else if conflict {
                            prop_assert_eq!(got, Err(XsError::Eagain));
                        } else {
                            prop_assert_eq!(got, Ok(b"OK\0".to_vec()));
                            for op in &t.ops {
                                let _ = model.apply(op, &mut clock);
                            }
                        }
                    }
                }
            }
            assert_tree_matches(&store, &model)?;
            prop_assert!(store.check_invariants().is_ok());
        }
    }

    /// Random operation streams from several domains never break an invariant (quotas,
    /// permissions, structure): the fuzz body under proptest's shrinking.
    #[test]
    fn random_multi_domain_ops_keep_invariants(data in prop::collection::vec(any::<u8>(), 0..600)) {
        super::fuzzing::xenstore_ops(&data);
    }

    /// Reads by an unprivileged domain succeed exactly when the permissions allow.
    #[test]
    fn read_access_matches_permissions(
        owner in 0u16..4,
        default in 0u8..4,
        entries in prop::collection::vec((0u16..4, 0u8..4), 0..3),
        reader in 1u16..4,
    ) {
        let mut s = Store::new();
        let dom0 = s.connect(0);
        let r = s.connect(reader);
        write(&mut s, dom0, "/n", b"v").unwrap();
        let mut perms = vec![Perm::new(owner, default)];
        perms.extend(entries.iter().map(|(d, a)| Perm::new(*d, *a)));
        let strs: Vec<String> = perms.iter().map(Perm::encode).collect();
        let refs: Vec<&str> = strs.iter().map(String::as_str).collect();
        set_perms(&mut s, dom0, "/n", &refs).unwrap();
        // Entries for the reader add up; without any, the owner entry's access applies.
        let listed: u8 = entries
            .iter()
            .filter(|(d, _)| *d == reader)
            .fold(None, |acc: Option<u8>, (_, a)| Some(acc.unwrap_or(0) | a))
            .unwrap_or(default);
        let can_read = owner == reader || listed & PERM_READ != 0;
        let can_write = owner == reader || listed & PERM_WRITE != 0;
        prop_assert_eq!(one(&mut s, r, MsgType::Read, "/n").is_ok(), can_read);
        prop_assert_eq!(write(&mut s, r, "/n", b"w").is_ok(), can_write);
    }
}
