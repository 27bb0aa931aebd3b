//! Node permissions, as xenstored encodes them on the wire.
//!
//! A node's permission list is one or more strings `<letter><domid>`:
//!
//! | letter | meaning |
//! |---|---|
//! | `n` | no access |
//! | `r` | read |
//! | `w` | write |
//! | `b` | both read and write |
//!
//! The first entry names the *owner* (full access) and the access of every domain not listed
//! after it; later entries grant a specific domain its access. Domain 0 is privileged and may do
//! anything. A new node inherits its parent's list; an unprivileged domain that creates a node
//! becomes its owner.

use super::XsError;
use crate::grant::DomId;

/// Read access.
pub const PERM_READ: u8 = 1;
/// Write access.
pub const PERM_WRITE: u8 = 2;

/// One permission entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Perm {
    /// The domain the entry is about (the owner, for the first entry).
    pub domid: DomId,
    /// `PERM_READ | PERM_WRITE` bits.
    pub access: u8,
}

impl Perm {
    /// An entry.
    pub fn new(domid: DomId, access: u8) -> Self {
        Self {
            domid,
            access: access & (PERM_READ | PERM_WRITE),
        }
    }

    /// Parses `<letter><domid>`.
    pub fn parse(s: &[u8]) -> Result<Self, XsError> {
        let (&letter, num) = s.split_first().ok_or(XsError::Einval)?;
        let access = match letter {
            b'n' => 0,
            b'r' => PERM_READ,
            b'w' => PERM_WRITE,
            b'b' => PERM_READ | PERM_WRITE,
            _ => return Err(XsError::Einval),
        };
        Ok(Self {
            domid: parse_domid(num)?,
            access,
        })
    }

    /// The wire string of this entry.
    pub fn encode(&self) -> String {
        let letter = match self.access {
            0 => 'n',
            PERM_READ => 'r',
            PERM_WRITE => 'w',
            _ => 'b',
        };
        format!("{letter}{}", self.domid)
    }
}

/// Parses a decimal domain id (digits only, at most 65535).
pub fn parse_domid(s: &[u8]) -> Result<DomId, XsError> {
    if s.is_empty() || s.len() > 5 || !s.iter().all(u8::is_ascii_digit) {
        return Err(XsError::Einval);
    }
    let v = s.iter().fold(0u32, |a, d| a * 10 + u32::from(d - b'0'));
    DomId::try_from(v).map_err(|_| XsError::Einval)
}

/// Whether `domid` is privileged (domain 0, the controller).
pub fn is_privileged(domid: DomId) -> bool {
    domid == 0
}

/// What `domid` may do to a node with permissions `perms`: `PERM_READ | PERM_WRITE` bits, and
/// whether it counts as the owner. `acting_for` is the target domain set by `XS_SET_TARGET`,
/// whose rights the caller shares.
pub fn access_for(perms: &[Perm], domid: DomId, acting_for: Option<DomId>) -> (u8, bool) {
    if is_privileged(domid) {
        return (PERM_READ | PERM_WRITE, true);
    }
    let Some(first) = perms.first() else {
        return (0, false);
    };
    let ids = [Some(domid), acting_for];
    if ids.contains(&Some(first.domid)) {
        return (PERM_READ | PERM_WRITE, true);
    }
    let mut access = None;
    for p in &perms[1..] {
        if ids.contains(&Some(p.domid)) {
            access = Some(access.unwrap_or(0) | p.access);
        }
    }
    (access.unwrap_or(first.access), false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_encode() {
        for s in ["n0", "r5", "w65535", "b12"] {
            assert_eq!(Perm::parse(s.as_bytes()).unwrap().encode(), s);
        }
        for bad in ["", "x1", "r", "r-1", "r65536", "r1a", "r123456"] {
            assert_eq!(Perm::parse(bad.as_bytes()), Err(XsError::Einval), "{bad}");
        }
    }

    #[test]
    fn access_rules() {
        let perms = [Perm::new(3, 0), Perm::new(5, PERM_READ)];
        assert_eq!(access_for(&perms, 0, None), (3, true));
        assert_eq!(access_for(&perms, 3, None), (3, true));
        assert_eq!(access_for(&perms, 5, None), (PERM_READ, false));
        assert_eq!(access_for(&perms, 7, None), (0, false));
        assert_eq!(access_for(&perms, 7, Some(3)), (3, true));
        let open = [Perm::new(3, PERM_READ)];
        assert_eq!(access_for(&open, 9, None), (PERM_READ, false));
    }
}
