//! Transactions: snapshot isolation with optimistic conflict detection.
//!
//! `XS_TRANSACTION_START` takes a snapshot of the tree. Operations carrying the transaction's
//! id work on the snapshot and record every node they look at (with its generation at first
//! touch, or "absent") and every node they change. `XS_TRANSACTION_END "T"` commits: if any
//! node the transaction touched has a different generation in the live tree (changed,
//! created or removed since), the whole transaction fails with `EAGAIN` and the client
//! retries; otherwise the changed nodes are copied into the live tree with fresh generations
//! and the recorded watch events fire. Creating or removing a child changes its parent, so two
//! transactions adding children to one directory conflict, as in xenstored.

use std::collections::{BTreeMap, BTreeSet};

use super::tree::Tree;
use super::watch::FireRecord;
use crate::grant::DomId;

/// What a transaction touched and changed.
#[derive(Clone, Debug, Default)]
pub struct AccessLog {
    accessed: BTreeMap<String, Option<u64>>,
    written: BTreeSet<String>,
    /// Changes to fire on commit, in order.
    pub fired: Vec<FireRecord>,
}

/// A tree to operate on: the live one, or a transaction's snapshot with its log.
pub struct View<'a> {
    /// The tree.
    pub tree: &'a mut Tree,
    log: Option<&'a mut AccessLog>,
}

impl<'a> View<'a> {
    /// The live tree: nothing is recorded.
    pub fn live(tree: &'a mut Tree) -> Self {
        Self { tree, log: None }
    }

    /// Records that `path` was looked at.
    pub fn read(&mut self, path: &str) {
        if let Some(log) = self.log.as_deref_mut() {
            let gen = self.tree.get(path).map(|n| n.gen);
            log.accessed.entry(path.to_owned()).or_insert(gen);
        }
    }

    /// Records that `path` is about to change. Call before changing it.
    pub fn write(&mut self, path: &str) {
        self.read(path);
        if let Some(log) = self.log.as_deref_mut() {
            log.written.insert(path.to_owned());
        }
    }
}

/// An open transaction.
#[derive(Clone, Debug)]
pub struct Transaction {
    /// The snapshot being worked on.
    pub tree: Tree,
    /// What was touched.
    pub log: AccessLog,
}

/// Why a commit failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CommitError {
    /// Another change touched what the transaction read or wrote.
    #[error("Transaction conflicts with a change made since it started")]
    Conflict,
    /// Committing would put this domain over its node quota.
    #[error("Commit would put domain {0} over its node quota")]
    Quota(DomId),
}

impl Transaction {
    /// A transaction over a snapshot of `live`.
    pub fn start(live: &Tree) -> Self {
        Self {
            tree: live.clone(),
            log: AccessLog::default(),
        }
    }

    /// A view that records into this transaction.
    pub fn view(&mut self) -> View<'_> {
        View {
            tree: &mut self.tree,
            log: Some(&mut self.log),
        }
    }

    /// Whether the live tree changed anything this transaction touched.
    pub fn conflicts(&self, live: &Tree) -> bool {
        self.log
            .accessed
            .iter()
            .any(|(p, gen)| live.get(p).map(|n| n.gen) != *gen)
    }

    /// Commits into `live`, stamping changed nodes with `gen`. `node_quota(domid)` is the most
    /// nodes `domid` may own (`None`: unlimited). Returns the changes to fire.
    pub fn commit(
        self,
        live: &mut Tree,
        gen: u64,
        node_quota: impl Fn(DomId) -> Option<usize>,
    ) -> Result<Vec<FireRecord>, CommitError> {
        if self.conflicts(live) {
            return Err(CommitError::Conflict);
        }
        let mut delta: BTreeMap<DomId, isize> = BTreeMap::new();
        for p in &self.log.written {
            if let Some(n) = live.get(p) {
                *delta.entry(n.owner()).or_insert(0) -= 1;
            }
            if let Some(n) = self.tree.get(p) {
                *delta.entry(n.owner()).or_insert(0) += 1;
            }
        }
        for (&dom, &d) in &delta {
            let after = live.owned(dom).saturating_add_signed(d);
            if d > 0 && node_quota(dom).is_some_and(|q| after > q) {
                return Err(CommitError::Quota(dom));
            }
        }
        for p in &self.log.written {
            let node = self.tree.get(p).cloned().map(|mut n| {
                n.gen = gen;
                n
            });
            live.put(p, node);
        }
        Ok(self.log.fired)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xenstore::perms::Perm;

    fn tree_with(paths: &[&str]) -> Tree {
        let mut t = Tree::new();
        for (i, p) in paths.iter().enumerate() {
            t.insert_new(p, vec![], vec![Perm::new(0, 0)], i as u64 + 1);
        }
        t
    }

    #[test]
    fn disjoint_changes_commit() {
        let mut live = tree_with(&["/a", "/b"]);
        let mut tx = Transaction::start(&live);
        {
            let mut v = tx.view();
            v.write("/a");
            v.tree.set_value("/a", b"x".to_vec(), 100);
        }
        live.set_value("/b", b"y".to_vec(), 50);
        tx.commit(&mut live, 51, |_| None).unwrap();
        assert_eq!(live.get("/a").unwrap().value, b"x");
        assert_eq!(live.get("/a").unwrap().gen, 51);
        assert_eq!(live.get("/b").unwrap().value, b"y");
        live.check().unwrap();
    }

    #[test]
    fn touched_node_changed_conflicts() {
        let mut live = tree_with(&["/a"]);
        let mut tx = Transaction::start(&live);
        tx.view().read("/a");
        tx.view().read("/missing");
        assert!(!tx.conflicts(&live));
        live.insert_new("/missing", vec![], vec![Perm::new(0, 0)], 9);
        assert_eq!(
            tx.commit(&mut live, 10, |_| None).unwrap_err(),
            CommitError::Conflict
        );
    }

    #[test]
    fn commit_respects_node_quota() {
        let mut live = tree_with(&["/a"]);
        let mut tx = Transaction::start(&live);
        {
            let mut v = tx.view();
            v.write("/a");
            v.write("/a/b");
            v.tree.insert_new("/a/b", vec![], vec![Perm::new(5, 0)], 3);
        }
        live.insert_new("/c", vec![], vec![Perm::new(5, 0)], 4);
        let quota = |d: DomId| (d != 0).then_some(1);
        assert_eq!(
            tx.commit(&mut live, 5, quota).unwrap_err(),
            CommitError::Quota(5)
        );
    }
}
