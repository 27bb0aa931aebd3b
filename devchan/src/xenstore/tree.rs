//! The node tree: values, permissions, children, and per-owner node counts for quotas.
//!
//! Nodes are kept in a map keyed by absolute path, so a subtree is a contiguous key range.
//! Every node carries the generation of its last change; a change to a node's children list
//! (a child created or removed) is a change of the node. Transactions compare these
//! generations to detect conflicts (see `transaction`).

use std::collections::{BTreeMap, BTreeSet};

use super::path;
use super::perms::Perm;
use crate::grant::DomId;

/// One node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// The value (arbitrary bytes).
    pub value: Vec<u8>,
    /// Permissions; the first entry is the owner. Never empty.
    pub perms: Vec<Perm>,
    /// Names (last components) of the children.
    pub children: BTreeSet<String>,
    /// Generation of the last change to this node.
    pub gen: u64,
}

impl Node {
    /// The owning domain.
    pub fn owner(&self) -> DomId {
        self.perms.first().map_or(0, |p| p.domid)
    }
}

/// The whole tree. Always contains the root `/`.
#[derive(Clone, Debug)]
pub struct Tree {
    nodes: BTreeMap<String, Node>,
    owned: BTreeMap<DomId, usize>,
}

impl Default for Tree {
    fn default() -> Self {
        Self::new()
    }
}

impl Tree {
    /// A tree with only the root, owned by domain 0, no access for others.
    pub fn new() -> Self {
        let root = Node {
            value: Vec::new(),
            perms: vec![Perm::new(0, 0)],
            children: BTreeSet::new(),
            gen: 0,
        };
        let mut t = Self {
            nodes: BTreeMap::new(),
            owned: BTreeMap::new(),
        };
        t.put("/", Some(root));
        t
    }

    /// The node at `path`.
    pub fn get(&self, path: &str) -> Option<&Node> {
        self.nodes.get(path)
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether only the root is left (never truly empty).
    pub fn is_empty(&self) -> bool {
        self.nodes.len() <= 1
    }

    /// Number of nodes `domid` owns.
    pub fn owned(&self, domid: DomId) -> usize {
        self.owned.get(&domid).copied().unwrap_or(0)
    }

    /// All nodes, in path order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Node)> {
        self.nodes.iter()
    }

    /// The missing nodes on the way to `path`, topmost first (empty if `path` exists), and the
    /// nearest existing ancestor (or `path` itself).
    pub fn missing_chain(&self, path: &str) -> (Vec<String>, String) {
        let mut missing = Vec::new();
        let mut cur = path.to_owned();
        while !self.nodes.contains_key(&cur) {
            let parent = path::parent(&cur).unwrap_or("/").to_owned();
            missing.push(std::mem::replace(&mut cur, parent));
        }
        missing.reverse();
        (missing, cur)
    }

    /// Paths of `path` and everything below it, `path` first.
    pub fn subtree(&self, path: &str) -> Vec<String> {
        if !self.nodes.contains_key(path) {
            return Vec::new();
        }
        let mut v = vec![path.to_owned()];
        let prefix = if path == "/" {
            "/".to_owned()
        } else {
            format!("{path}/")
        };
        v.extend(
            self.nodes
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .map(|(k, _)| k.clone()),
        );
        v
    }

    /// Creates `path` (whose parent must exist) and links it into the parent.
    pub fn insert_new(&mut self, path: &str, value: Vec<u8>, perms: Vec<Perm>, gen: u64) {
        if let Some(parent) = path::parent(path).and_then(|p| self.nodes.get_mut(p)) {
            parent.children.insert(path::basename(path).to_owned());
            parent.gen = gen;
        }
        let node = Node {
            value,
            perms,
            children: BTreeSet::new(),
            gen,
        };
        self.put(path, Some(node));
    }

    /// Replaces the value of an existing node.
    pub fn set_value(&mut self, path: &str, value: Vec<u8>, gen: u64) {
        if let Some(n) = self.nodes.get_mut(path) {
            n.value = value;
            n.gen = gen;
        }
    }

    /// Replaces the permissions of an existing node.
    pub fn set_perms(&mut self, path: &str, perms: Vec<Perm>, gen: u64) {
        if let Some(mut n) = self.nodes.get(path).cloned() {
            n.perms = perms;
            n.gen = gen;
            self.put(path, Some(n));
        }
    }

    /// Removes `path` and its subtree, unlinking it from its parent. Returns the removed paths.
    pub fn remove_subtree(&mut self, path: &str, gen: u64) -> Vec<String> {
        let paths = self.subtree(path);
        for p in &paths {
            self.put(p, None);
        }
        if let Some(parent) = path::parent(path).and_then(|p| self.nodes.get_mut(p)) {
            parent.children.remove(path::basename(path));
            parent.gen = gen;
        }
        paths
    }

    /// Sets or removes one node as is, keeping the owner counts right. Children lists are the
    /// caller's business (used to copy a committed transaction's nodes).
    pub fn put(&mut self, path: &str, node: Option<Node>) {
        let new_owner = node.as_ref().map(Node::owner);
        let old = match node {
            Some(n) => self.nodes.insert(path.to_owned(), n),
            None => self.nodes.remove(path),
        };
        if let Some(o) = old {
            if let Some(c) = self.owned.get_mut(&o.owner()) {
                *c = c.saturating_sub(1);
            }
        }
        if let Some(o) = new_owner {
            *self.owned.entry(o).or_insert(0) += 1;
        }
    }

    /// Checks the structure: root present, parents and children lists consistent, owner counts
    /// exact, permission lists non-empty.
    pub fn check(&self) -> Result<(), String> {
        if !self.nodes.contains_key("/") {
            return Err("root missing".into());
        }
        let mut owned: BTreeMap<DomId, usize> = BTreeMap::new();
        for (p, n) in &self.nodes {
            if n.perms.is_empty() {
                return Err(format!("{p}: empty permissions"));
            }
            *owned.entry(n.owner()).or_insert(0) += 1;
            if let Some(parent) = path::parent(p) {
                match self.nodes.get(parent) {
                    Some(pn) if pn.children.contains(path::basename(p)) => {}
                    _ => return Err(format!("{p}: not linked from its parent")),
                }
            }
            for c in &n.children {
                if !self.nodes.contains_key(&path::join(p, c)) {
                    return Err(format!("{p}: lists missing child {c}"));
                }
            }
        }
        owned.retain(|_, c| *c > 0);
        let mut mine = self.owned.clone();
        mine.retain(|_, c| *c > 0);
        if owned != mine {
            return Err(format!("owner counts {mine:?} but tree has {owned:?}"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_and_remove_keep_structure() {
        let mut t = Tree::new();
        let (missing, existing) = t.missing_chain("/a/b/c");
        assert_eq!(missing, ["/a", "/a/b", "/a/b/c"]);
        assert_eq!(existing, "/");
        for (i, p) in missing.iter().enumerate() {
            t.insert_new(p, vec![], vec![Perm::new(3, 0)], i as u64 + 1);
        }
        t.insert_new("/ab", vec![], vec![Perm::new(0, 0)], 9);
        t.check().unwrap();
        assert_eq!(t.owned(3), 3);
        assert_eq!(t.subtree("/a"), ["/a", "/a/b", "/a/b/c"]);
        let removed = t.remove_subtree("/a/b", 10);
        assert_eq!(removed, ["/a/b", "/a/b/c"]);
        assert_eq!(t.get("/a").unwrap().gen, 10);
        assert_eq!(t.owned(3), 1);
        t.check().unwrap();
        t.set_perms("/a", vec![Perm::new(4, 0)], 11);
        assert_eq!((t.owned(3), t.owned(4)), (0, 1));
        t.check().unwrap();
    }

    #[test]
    fn check_catches_corruption() {
        let mut t = Tree::new();
        t.put("/orphan/x", Some(t.get("/").unwrap().clone()));
        assert!(t.check().is_err());
    }
}
