//! The store: the node tree plus connections, watches, transactions, domains and quotas.
//!
//! Pure logic without I/O. A server registers each connection with [`Store::connect`] (its
//! domain id decides its rights; domain 0 is privileged), passes every decoded request to
//! [`Store::handle`], sends the returned reply to that connection and then each watch event to
//! the connection it names, in order, and calls [`Store::disconnect`] when a connection goes.
//! `XS_INTRODUCE` and `XS_RELEASE` also return a [`DomainAction`] for the server to start or
//! stop serving the domain's ring.
//!
//! Quotas (per unprivileged domain, defaults as xenstored's): 1000 nodes owned, 2048-byte
//! values, 128 watches, 10 open transactions per connection, 5 permission entries per node.

use std::collections::BTreeMap;

use super::ops::{self, Ctx, OK};
use super::path::{self, INTRODUCE_DOMAIN, RELEASE_DOMAIN};
use super::perms::{access_for, is_privileged, Perm, PERM_READ};
use super::request::Request;
use super::transaction::{CommitError, Transaction, View};
use super::tree::Tree;
use super::watch::{event_for, report_path, FireRecord, Watch, WatchEvent};
use super::wire::{Message, MsgType};
use super::XsError;
use crate::grant::{DomId, DOMID_SELF};

/// Identifies a connection to the store (a socket or a domain's ring).
pub type ConnId = u64;

/// Resource limits for unprivileged domains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quotas {
    /// Nodes a domain may own.
    pub nodes: usize,
    /// Longest value a domain may write.
    pub entry_size: usize,
    /// Watches per domain.
    pub watches: usize,
    /// Open transactions per connection (applies to every domain).
    pub transactions: usize,
    /// Permission entries per node a domain may set.
    pub perms: usize,
}

impl Default for Quotas {
    fn default() -> Self {
        Self {
            nodes: 1000,
            entry_size: 2048,
            watches: 128,
            transactions: 10,
            perms: 5,
        }
    }
}

/// Something the server must do about a domain after a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DomainAction {
    /// `XS_INTRODUCE`: start serving the domain's ring page `mfn`, signalled on `port`.
    Introduced {
        /// The domain.
        domid: DomId,
        /// Its ring page frame.
        mfn: u64,
        /// Its event channel.
        port: u32,
    },
    /// `XS_RELEASE`: stop serving the domain and drop its connections.
    Released(DomId),
}

/// The result of one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// The reply for the requesting connection; send it first.
    pub reply: Message,
    /// Watch events to send afterwards, each to its connection.
    pub events: Vec<(ConnId, Message)>,
    /// What the server must do about a domain.
    pub action: Option<DomainAction>,
}

/// An error reply (`XS_ERROR` with the errno name) to a request.
pub fn error_reply(req_id: u32, tx_id: u32, e: XsError) -> Message {
    Message::new(
        MsgType::Error,
        req_id,
        tx_id,
        Message::strings(&[e.name().as_bytes()]),
    )
}

/// An introduced domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DomainInfo {
    /// Frame of its ring page.
    pub mfn: u64,
    /// Its event channel.
    pub port: u32,
}

#[derive(Debug)]
struct Conn {
    domid: DomId,
    watches: Vec<Watch>,
    txs: BTreeMap<u32, Transaction>,
}

/// The XenStore database and its clients' state.
#[derive(Debug)]
pub struct Store {
    tree: Tree,
    gen: u64,
    conns: BTreeMap<ConnId, Conn>,
    next_conn: ConnId,
    next_tx: u32,
    domains: BTreeMap<DomId, DomainInfo>,
    targets: BTreeMap<DomId, DomId>,
    special: BTreeMap<String, Vec<Perm>>,
    quotas: Quotas,
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    /// An empty store (only `/`) with default quotas.
    pub fn new() -> Self {
        Self::with_quotas(Quotas::default())
    }

    /// An empty store with the given quotas.
    pub fn with_quotas(quotas: Quotas) -> Self {
        let special = [INTRODUCE_DOMAIN, RELEASE_DOMAIN]
            .into_iter()
            .map(|p| (p.to_owned(), vec![Perm::new(0, 0)]))
            .collect();
        Self {
            tree: Tree::new(),
            gen: 0,
            conns: BTreeMap::new(),
            next_conn: 1,
            next_tx: 1,
            domains: BTreeMap::new(),
            targets: BTreeMap::new(),
            special,
            quotas,
        }
    }

    /// The quotas in force.
    pub fn quotas(&self) -> &Quotas {
        &self.quotas
    }

    /// The live tree.
    pub fn tree(&self) -> &Tree {
        &self.tree
    }

    /// Registers a connection from `domid`.
    pub fn connect(&mut self, domid: DomId) -> ConnId {
        let id = self.next_conn;
        self.next_conn += 1;
        self.conns.insert(
            id,
            Conn {
                domid,
                watches: Vec::new(),
                txs: BTreeMap::new(),
            },
        );
        id
    }

    /// Forgets a connection, its watches and its open transactions.
    pub fn disconnect(&mut self, conn: ConnId) {
        self.conns.remove(&conn);
    }

    /// The domain of a connection.
    pub fn conn_domid(&self, conn: ConnId) -> Option<DomId> {
        self.conns.get(&conn).map(|c| c.domid)
    }

    /// Connections of `domid`.
    pub fn conns_of(&self, domid: DomId) -> Vec<ConnId> {
        self.conns
            .iter()
            .filter(|(_, c)| c.domid == domid)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Watches registered by `domid`, over all its connections.
    pub fn watch_count(&self, domid: DomId) -> usize {
        self.conns
            .values()
            .filter(|c| c.domid == domid)
            .map(|c| c.watches.len())
            .sum()
    }

    /// Open transactions of a connection.
    pub fn transaction_count(&self, conn: ConnId) -> usize {
        self.conns.get(&conn).map_or(0, |c| c.txs.len())
    }

    /// Whether `domid` was introduced (domain 0 always is).
    pub fn is_introduced(&self, domid: DomId) -> bool {
        domid == 0 || self.domains.contains_key(&domid)
    }

    /// Handles one request from `conn`.
    pub fn handle(&mut self, conn: ConnId, msg: &Message) -> Response {
        let mut events = Vec::new();
        let mut action = None;
        let result = match self.conns.get(&conn) {
            None => Err(XsError::Einval),
            Some(c) => Request::parse(msg, c.domid)
                .and_then(|req| self.dispatch(conn, msg.tx_id, req, &mut events, &mut action)),
        };
        let reply = match result {
            Ok(payload) => Message::reply_to(msg, msg.ty, payload),
            Err(e) => error_reply(msg.req_id, msg.tx_id, e),
        };
        Response {
            reply,
            events,
            action,
        }
    }

    fn dispatch(
        &mut self,
        conn: ConnId,
        tx_id: u32,
        req: Request,
        events: &mut Vec<(ConnId, Message)>,
        action: &mut Option<DomainAction>,
    ) -> Result<Vec<u8>, XsError> {
        let domid = self.conn_domid(conn).ok_or(XsError::Einval)?;
        match req {
            Request::GetPerms(p) if p.is_special() => {
                let perms = self.special.get(&p.abs).ok_or(XsError::Enoent)?;
                if access_for(perms, domid, self.targets.get(&domid).copied()).0 & PERM_READ == 0 {
                    return Err(XsError::Eacces);
                }
                Ok(ops::encode_perms(perms))
            }
            Request::SetPerms(p, perms) if p.is_special() => {
                let (quotas, mut gen) = (self.quotas, self.gen);
                let cx = Ctx {
                    domid,
                    acting_for: None,
                    quotas: &quotas,
                    gen: &mut gen,
                };
                let old = self.special.get(&p.abs).ok_or(XsError::Enoent)?;
                ops::check_set_perms(&cx, old, &perms)?;
                self.special.insert(p.abs, perms);
                Ok(OK.to_vec())
            }
            Request::TransactionStart => self.tx_start(conn, tx_id),
            Request::TransactionEnd(commit) => {
                let tx = self
                    .conns
                    .get_mut(&conn)
                    .and_then(|c| c.txs.remove(&tx_id))
                    .ok_or(XsError::Enoent)?;
                if commit {
                    self.gen += 1;
                    let quotas = self.quotas;
                    let fires = tx
                        .commit(&mut self.tree, self.gen, |d| ops::node_quota(&quotas, d))
                        .map_err(|e| match e {
                            CommitError::Conflict => XsError::Eagain,
                            CommitError::Quota(_) => XsError::Enospc,
                        })?;
                    self.deliver(&fires, events);
                }
                Ok(OK.to_vec())
            }
            r if r.transactional() => self.node_op(conn, domid, tx_id, r, events),
            Request::Watch(p, token) => {
                let c = self.conns.get(&conn).ok_or(XsError::Einval)?;
                if c.watches
                    .iter()
                    .any(|w| w.path == p.abs && w.token == token)
                {
                    return Err(XsError::Eexist);
                }
                if !is_privileged(domid) && self.watch_count(domid) >= self.quotas.watches {
                    return Err(XsError::E2big);
                }
                let w = Watch {
                    path: p.abs,
                    token,
                    relative: p.relative,
                };
                // Fired once up front, with the path as the client gave it.
                let first = WatchEvent {
                    path: report_path(&w, &w.path, domid),
                    token: w.token.clone(),
                };
                events.push((conn, first.to_message()));
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.watches.push(w);
                }
                Ok(OK.to_vec())
            }
            Request::Unwatch(p, token) => {
                let c = self.conns.get_mut(&conn).ok_or(XsError::Einval)?;
                let i = c
                    .watches
                    .iter()
                    .position(|w| w.path == p.abs && w.token == token)
                    .ok_or(XsError::Enoent)?;
                c.watches.remove(i);
                Ok(OK.to_vec())
            }
            Request::ResetWatches => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.watches.clear();
                    c.txs.clear();
                }
                Ok(OK.to_vec())
            }
            Request::GetDomainPath(d) => Ok(Message::strings(&[path::domain_path(d).as_bytes()])),
            Request::IsDomainIntroduced(d) => Ok(if self.is_introduced(d) {
                b"T\0".to_vec()
            } else {
                b"F\0".to_vec()
            }),
            Request::Introduce {
                domid: d,
                mfn,
                port,
            } => {
                require_privileged(domid)?;
                if d == 0 || d >= DOMID_SELF {
                    return Err(XsError::Einval);
                }
                let info = DomainInfo { mfn, port };
                match self.domains.get(&d) {
                    Some(old) if *old == info => return Ok(OK.to_vec()),
                    Some(_) => return Err(XsError::Eexist),
                    None => {}
                }
                self.domains.insert(d, info);
                self.fire_special(INTRODUCE_DOMAIN, events);
                *action = Some(DomainAction::Introduced {
                    domid: d,
                    mfn,
                    port,
                });
                Ok(OK.to_vec())
            }
            Request::Release(d) => {
                require_privileged(domid)?;
                self.domains.remove(&d).ok_or(XsError::Enoent)?;
                self.targets.remove(&d);
                self.fire_special(RELEASE_DOMAIN, events);
                *action = Some(DomainAction::Released(d));
                Ok(OK.to_vec())
            }
            Request::Resume(d) => {
                require_privileged(domid)?;
                if !self.domains.contains_key(&d) {
                    return Err(XsError::Enoent);
                }
                Ok(OK.to_vec())
            }
            Request::SetTarget(d, target) => {
                require_privileged(domid)?;
                if !self.is_introduced(d) || !self.is_introduced(target) {
                    return Err(XsError::Enoent);
                }
                self.targets.insert(d, target);
                Ok(OK.to_vec())
            }
            Request::Control(args) => {
                require_privileged(domid)?;
                match args.first().map(Vec::as_slice) {
                    Some(b"print") => Ok(OK.to_vec()),
                    _ => Err(XsError::Einval),
                }
            }
            // Transactional requests were all matched above.
            _ => Err(XsError::Einval),
        }
    }

    fn tx_start(&mut self, conn: ConnId, tx_id: u32) -> Result<Vec<u8>, XsError> {
        if tx_id != 0 {
            return Err(XsError::Ebusy);
        }
        let in_use: Vec<u32> = self
            .conns
            .values()
            .flat_map(|c| c.txs.keys().copied())
            .collect();
        let c = self.conns.get_mut(&conn).ok_or(XsError::Einval)?;
        if c.txs.len() >= self.quotas.transactions {
            return Err(XsError::Enospc);
        }
        let mut id = self.next_tx;
        while id == 0 || in_use.contains(&id) {
            id = id.wrapping_add(1);
        }
        self.next_tx = id.wrapping_add(1);
        c.txs.insert(id, Transaction::start(&self.tree));
        Ok(Message::strings(&[id.to_string().as_bytes()]))
    }

    fn node_op(
        &mut self,
        conn: ConnId,
        domid: DomId,
        tx_id: u32,
        req: Request,
        events: &mut Vec<(ConnId, Message)>,
    ) -> Result<Vec<u8>, XsError> {
        let mut fires = Vec::new();
        let mut cx = Ctx {
            domid,
            acting_for: self.targets.get(&domid).copied(),
            quotas: &self.quotas,
            gen: &mut self.gen,
        };
        let result = if tx_id == 0 {
            run(&mut View::live(&mut self.tree), &mut cx, req, &mut fires)
        } else {
            let tx = self
                .conns
                .get_mut(&conn)
                .and_then(|c| c.txs.get_mut(&tx_id))
                .ok_or(XsError::Enoent)?;
            let r = run(&mut tx.view(), &mut cx, req, &mut fires);
            tx.log.fired.append(&mut fires);
            r
        };
        self.deliver(&fires, events);
        result
    }

    fn fire_special(&self, p: &str, events: &mut Vec<(ConnId, Message)>) {
        let perms = self
            .special
            .get(p)
            .cloned()
            .unwrap_or_else(|| vec![Perm::new(0, 0)]);
        self.deliver(
            &[FireRecord {
                path: p.to_owned(),
                removed: false,
                perms,
            }],
            events,
        );
    }

    fn deliver(&self, fires: &[FireRecord], events: &mut Vec<(ConnId, Message)>) {
        for f in fires {
            for (id, c) in &self.conns {
                let acting_for = self.targets.get(&c.domid).copied();
                for w in &c.watches {
                    if let Some(ev) = event_for(w, c.domid, acting_for, f) {
                        events.push((*id, ev.to_message()));
                    }
                }
            }
        }
    }

    /// Checks every invariant: tree structure (also of open transactions' snapshots), node,
    /// watch and transaction quotas of unprivileged domains.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.tree.check()?;
        for (p, n) in self.tree.iter() {
            let owner = n.owner();
            if !is_privileged(owner) && self.tree.owned(owner) > self.quotas.nodes {
                return Err(format!("{p}: domain {owner} owns more than its quota"));
            }
        }
        for (id, c) in &self.conns {
            if !is_privileged(c.domid) && self.watch_count(c.domid) > self.quotas.watches {
                return Err(format!("domain {} over its watch quota", c.domid));
            }
            if c.txs.len() > self.quotas.transactions {
                return Err(format!("connection {id} over its transaction quota"));
            }
            for tx in c.txs.values() {
                tx.tree.check()?;
            }
        }
        Ok(())
    }
}

fn require_privileged(domid: DomId) -> Result<(), XsError> {
    if is_privileged(domid) {
        Ok(())
    } else {
        Err(XsError::Eacces)
    }
}

fn run(
    v: &mut View<'_>,
    cx: &mut Ctx<'_>,
    req: Request,
    fires: &mut Vec<FireRecord>,
) -> Result<Vec<u8>, XsError> {
    match req {
        Request::Read(p) => ops::read(v, cx, &p.abs),
        Request::GetPerms(p) => ops::get_perms(v, cx, &p.abs),
        Request::Directory(p) => ops::directory(v, cx, &p.abs),
        Request::DirectoryPart(p, off) => ops::directory_part(v, cx, &p.abs, off),
        Request::Write(p, value) => ops::write(v, cx, &p.abs, Some(value), fires),
        Request::Mkdir(p) => ops::write(v, cx, &p.abs, None, fires),
        Request::Rm(p) => ops::rm(v, cx, &p.abs, fires),
        Request::SetPerms(p, perms) => ops::set_perms(v, cx, &p.abs, perms, fires),
        _ => Err(XsError::Einval),
    }
}
