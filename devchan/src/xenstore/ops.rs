//! The node operations (read, write, mkdir, rm, directory, permissions) on a [`View`], shared by
//! the live tree and transactions.
//!
//! Access rules, as in xenstored: reading a node (value, children, permissions) needs read
//! access to it; changing an existing node needs write access to it; creating a node needs
//! write access to its nearest existing ancestor, and creates missing intermediate nodes with
//! empty values and the ancestor's permissions (with the creator as owner if it is
//! unprivileged); changing permissions needs ownership, and only a privileged domain may hand a
//! node to another owner. Quotas apply to unprivileged domains: value size and permission-list
//! length per node for the writer, node count for the owner.

use super::path;
use super::perms::{access_for, is_privileged, Perm, PERM_READ, PERM_WRITE};
use super::store::Quotas;
use super::transaction::View;
use super::watch::FireRecord;
use super::wire::XENSTORE_PAYLOAD_MAX;
use super::XsError;
use crate::grant::DomId;

/// The `OK\0` reply payload.
pub const OK: &[u8] = b"OK\0";

/// Who is asking, and the store-wide settings an operation needs.
pub struct Ctx<'a> {
    /// The calling domain.
    pub domid: DomId,
    /// The domain it may act for (`XS_SET_TARGET`).
    pub acting_for: Option<DomId>,
    /// Quotas.
    pub quotas: &'a Quotas,
    /// The store's generation counter.
    pub gen: &'a mut u64,
}

impl Ctx<'_> {
    fn next_gen(&mut self) -> u64 {
        *self.gen += 1;
        *self.gen
    }

    fn access(&self, perms: &[Perm]) -> (u8, bool) {
        access_for(perms, self.domid, self.acting_for)
    }

    fn privileged(&self) -> bool {
        is_privileged(self.domid)
    }
}

/// The node quota of `owner` (`None`: unlimited).
pub fn node_quota(quotas: &Quotas, owner: DomId) -> Option<usize> {
    (!is_privileged(owner)).then_some(quotas.nodes)
}

fn readable<'t>(
    v: &'t mut View<'_>,
    cx: &Ctx<'_>,
    p: &str,
) -> Result<&'t super::tree::Node, XsError> {
    v.read(p);
    let node = v.tree.get(p).ok_or(XsError::Enoent)?;
    if cx.access(&node.perms).0 & PERM_READ == 0 {
        return Err(XsError::Eacces);
    }
    Ok(node)
}

/// `XS_READ`.
pub fn read(v: &mut View<'_>, cx: &Ctx<'_>, p: &str) -> Result<Vec<u8>, XsError> {
    Ok(readable(v, cx, p)?.value.clone())
}

/// `XS_GET_PERMS`.
pub fn get_perms(v: &mut View<'_>, cx: &Ctx<'_>, p: &str) -> Result<Vec<u8>, XsError> {
    Ok(encode_perms(&readable(v, cx, p)?.perms))
}

/// `perm\0perm\0...`.
pub fn encode_perms(perms: &[Perm]) -> Vec<u8> {
    let strs: Vec<String> = perms.iter().map(Perm::encode).collect();
    let refs: Vec<&[u8]> = strs.iter().map(String::as_bytes).collect();
    super::wire::Message::strings(&refs)
}

fn children_bytes(node: &super::tree::Node) -> Vec<u8> {
    let refs: Vec<&[u8]> = node.children.iter().map(String::as_bytes).collect();
    super::wire::Message::strings(&refs)
}

/// `XS_DIRECTORY`.
pub fn directory(v: &mut View<'_>, cx: &Ctx<'_>, p: &str) -> Result<Vec<u8>, XsError> {
    let out = children_bytes(readable(v, cx, p)?);
    if out.len() > XENSTORE_PAYLOAD_MAX {
        return Err(XsError::E2big);
    }
    Ok(out)
}

/// `XS_DIRECTORY_PART`: `generation\0`, then whole child names (each NUL-terminated) from byte
/// `offset` of the full listing as far as they fit, then one more NUL if the listing is done.
pub fn directory_part(
    v: &mut View<'_>,
    cx: &Ctx<'_>,
    p: &str,
    offset: usize,
) -> Result<Vec<u8>, XsError> {
    let node = readable(v, cx, p)?;
    let all = children_bytes(node);
    if offset > all.len() || (offset > 0 && all[offset - 1] != 0) {
        return Err(XsError::Einval);
    }
    let mut out = format!("{}", node.gen).into_bytes();
    out.push(0);
    let rest = &all[offset..];
    let room = XENSTORE_PAYLOAD_MAX - out.len() - 1;
    if rest.len() <= room {
        out.extend_from_slice(rest);
        out.push(0);
    } else {
        // Cut after the last NUL that fits, so only whole names go out.
        let cut = rest[..room]
            .iter()
            .rposition(|b| *b == 0)
            .map_or(0, |i| i + 1);
        if cut == 0 {
            return Err(XsError::E2big);
        }
        out.extend_from_slice(&rest[..cut]);
    }
    Ok(out)
}

/// `XS_WRITE` (`value: Some`) and `XS_MKDIR` (`None`).
pub fn write(
    v: &mut View<'_>,
    cx: &mut Ctx<'_>,
    p: &str,
    value: Option<Vec<u8>>,
    fires: &mut Vec<FireRecord>,
) -> Result<Vec<u8>, XsError> {
    let too_big = value
        .as_ref()
        .is_some_and(|v| v.len() > cx.quotas.entry_size);
    if too_big && !cx.privileged() {
        return Err(XsError::Enospc);
    }
    let (missing, existing) = v.tree.missing_chain(p);
    v.read(&existing);
    let enode = v.tree.get(&existing).ok_or(XsError::Enoent)?;
    if cx.access(&enode.perms).0 & PERM_WRITE == 0 {
        return Err(XsError::Eacces);
    }
    if missing.is_empty() {
        let Some(value) = value else {
            return Ok(OK.to_vec());
        };
        let perms = enode.perms.clone();
        v.write(p);
        let g = cx.next_gen();
        v.tree.set_value(p, value, g);
        fires.push(FireRecord {
            path: p.to_owned(),
            removed: false,
            perms,
        });
        return Ok(OK.to_vec());
    }
    let mut perms = enode.perms.clone();
    if !cx.privileged() {
        perms[0].domid = cx.domid;
    }
    let owner = perms[0].domid;
    if node_quota(cx.quotas, owner).is_some_and(|q| v.tree.owned(owner) + missing.len() > q) {
        return Err(XsError::Enospc);
    }
    v.write(&existing);
    let g = cx.next_gen();
    let last = missing.len() - 1;
    let mut value = value;
    for (i, np) in missing.iter().enumerate() {
        v.write(np);
        let val = if i == last {
            value.take().unwrap_or_default()
        } else {
            Vec::new()
        };
        v.tree.insert_new(np, val, perms.clone(), g);
    }
    fires.push(FireRecord {
        path: p.to_owned(),
        removed: false,
        perms,
    });
    Ok(OK.to_vec())
}

/// `XS_RM`: removes the node and its subtree. Removing a missing node whose parent exists
/// succeeds, as in xenstored.
pub fn rm(
    v: &mut View<'_>,
    cx: &mut Ctx<'_>,
    p: &str,
    fires: &mut Vec<FireRecord>,
) -> Result<Vec<u8>, XsError> {
    let parent = path::parent(p).ok_or(XsError::Einval)?.to_owned();
    v.read(p);
    let Some(node) = v.tree.get(p) else {
        v.read(&parent);
        return match v.tree.get(&parent) {
            Some(_) => Ok(OK.to_vec()),
            None => Err(XsError::Enoent),
        };
    };
    if cx.access(&node.perms).0 & PERM_WRITE == 0 {
        return Err(XsError::Eacces);
    }
    let perms = node.perms.clone();
    for sp in v.tree.subtree(p) {
        v.write(&sp);
    }
    v.write(&parent);
    let g = cx.next_gen();
    v.tree.remove_subtree(p, g);
    fires.push(FireRecord {
        path: p.to_owned(),
        removed: true,
        perms,
    });
    Ok(OK.to_vec())
}

/// Checks a `XS_SET_PERMS` by `cx` on a node currently `old`; shared with special paths.
pub fn check_set_perms(cx: &Ctx<'_>, old: &[Perm], new: &[Perm]) -> Result<(), XsError> {
    if !cx.access(old).1 {
        return Err(XsError::Eacces);
    }
    if !cx.privileged() {
        if new.first().map(|p| p.domid) != old.first().map(|p| p.domid) {
            return Err(XsError::Eperm);
        }
        if new.len() > cx.quotas.perms {
            return Err(XsError::Enospc);
        }
    }
    Ok(())
}

/// `XS_SET_PERMS` on a node.
pub fn set_perms(
    v: &mut View<'_>,
    cx: &mut Ctx<'_>,
    p: &str,
    perms: Vec<Perm>,
    fires: &mut Vec<FireRecord>,
) -> Result<Vec<u8>, XsError> {
    v.read(p);
    let node = v.tree.get(p).ok_or(XsError::Enoent)?;
    check_set_perms(cx, &node.perms, &perms)?;
    let new_owner = perms[0].domid;
    if new_owner != node.owner()
        && node_quota(cx.quotas, new_owner).is_some_and(|q| v.tree.owned(new_owner) + 1 > q)
    {
        return Err(XsError::Enospc);
    }
    v.write(p);
    let g = cx.next_gen();
    v.tree.set_perms(p, perms.clone(), g);
    fires.push(FireRecord {
        path: p.to_owned(),
        removed: false,
        perms,
    });
    Ok(OK.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xenstore::tree::Tree;

    fn cx<'a>(domid: DomId, q: &'a Quotas, gen: &'a mut u64) -> Ctx<'a> {
        Ctx {
            domid,
            acting_for: None,
            quotas: q,
            gen,
        }
    }

    #[test]
    fn create_inherits_and_unprivileged_creator_owns() {
        let q = Quotas::default();
        let mut g = 0;
        let mut t = Tree::new();
        let mut f = Vec::new();
        write(
            &mut View::live(&mut t),
            &mut cx(0, &q, &mut g),
            "/d",
            None,
            &mut f,
        )
        .unwrap();
        set_perms(
            &mut View::live(&mut t),
            &mut cx(0, &q, &mut g),
            "/d",
            vec![Perm::new(0, 0), Perm::new(4, PERM_WRITE)],
            &mut f,
        )
        .unwrap();
        write(
            &mut View::live(&mut t),
            &mut cx(4, &q, &mut g),
            "/d/x/y",
            Some(b"v".to_vec()),
            &mut f,
        )
        .unwrap();
        assert_eq!(t.get("/d/x").unwrap().owner(), 4);
        assert_eq!(t.get("/d/x/y").unwrap().perms[1], Perm::new(4, PERM_WRITE));
        assert_eq!(
            read(&mut View::live(&mut t), &cx(4, &q, &mut g), "/d/x/y").unwrap(),
            b"v"
        );
        assert_eq!(
            read(&mut View::live(&mut t), &cx(5, &q, &mut g), "/d/x/y"),
            Err(XsError::Eacces)
        );
        assert_eq!(
            write(
                &mut View::live(&mut t),
                &mut cx(5, &q, &mut g),
                "/d/z",
                None,
                &mut f
            ),
            Err(XsError::Eacces)
        );
        assert_eq!(
            set_perms(
                &mut View::live(&mut t),
                &mut cx(4, &q, &mut g),
                "/d/x",
                vec![Perm::new(5, 0)],
                &mut f
            ),
            Err(XsError::Eperm)
        );
        t.check().unwrap();
    }

    #[test]
    fn directory_part_pages_whole_names() {
        let q = Quotas::default();
        let mut g = 0;
        let mut t = Tree::new();
        let mut f = Vec::new();
        for i in 0..500 {
            write(
                &mut View::live(&mut t),
                &mut cx(0, &q, &mut g),
                &format!("/d/child{i:04}"),
                None,
                &mut f,
            )
            .unwrap();
        }
        assert!(matches!(
            directory(&mut View::live(&mut t), &cx(0, &q, &mut g), "/d"),
            Err(XsError::E2big)
        ));
        let mut names = Vec::new();
        let mut off = 0;
        loop {
            let part =
                directory_part(&mut View::live(&mut t), &cx(0, &q, &mut g), "/d", off).unwrap();
            assert!(part.len() <= XENSTORE_PAYLOAD_MAX);
            let body = &part[part.iter().position(|b| *b == 0).unwrap() + 1..];
            if body.ends_with(b"\0\0") || body == b"\0" {
                names.extend(
                    body[..body.len() - 1]
                        .split(|b| *b == 0)
                        .filter(|s| !s.is_empty())
                        .map(<[u8]>::to_vec),
                );
                break;
            }
            off += body.len();
            names.extend(
                body.split(|b| *b == 0)
                    .filter(|s| !s.is_empty())
                    .map(<[u8]>::to_vec),
            );
        }
        assert_eq!(names.len(), 500);
    }
}
