//! XenStore paths: validation and resolution.
//!
//! A node path is absolute (`/local/domain/3/device/vif/0/state`) or relative to the calling
//! domain's home `/local/domain/<domid>` (`device/vif/0/state`). Rules, as xenstored enforces
//! them:
//!
//! * characters: `A-Z a-z 0-9 - / _ @` only;
//! * no empty component (`//`), no trailing `/` except the root `/` itself;
//! * a relative path is at most [`XENSTORE_REL_PATH_MAX`] bytes, the resolved absolute path at
//!   most [`XENSTORE_ABS_PATH_MAX`].
//!
//! Paths beginning with `@` are *special*: they name events, not nodes. Only watches and
//! GET/SET_PERMS accept them; the store knows [`INTRODUCE_DOMAIN`] and [`RELEASE_DOMAIN`].

use super::wire::{XENSTORE_ABS_PATH_MAX, XENSTORE_REL_PATH_MAX};
use super::XsError;
use crate::grant::DomId;

/// Special watch path fired when a domain is introduced.
pub const INTRODUCE_DOMAIN: &str = "@introduceDomain";
/// Special watch path fired when a domain is released.
pub const RELEASE_DOMAIN: &str = "@releaseDomain";

/// `/local/domain/<domid>`, a domain's home directory.
pub fn domain_path(domid: DomId) -> String {
    format!("/local/domain/{domid}")
}

/// A path as a request names it, resolved against the caller's home.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedPath {
    /// The absolute path, or the special `@name`.
    pub abs: String,
    /// Whether the request gave it relative to the domain's home (watch events are then
    /// reported relative too).
    pub relative: bool,
}

impl ResolvedPath {
    /// Whether this is a special `@` path.
    pub fn is_special(&self) -> bool {
        self.abs.starts_with('@')
    }
}

fn valid_chars(s: &str) -> bool {
    s.bytes()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'/' | b'_' | b'@'))
}

/// Resolves a path from a request of domain `domid`. `allow_special` admits `@` paths.
pub fn resolve(raw: &[u8], domid: DomId, allow_special: bool) -> Result<ResolvedPath, XsError> {
    let s = std::str::from_utf8(raw).map_err(|_| XsError::Einval)?;
    if s.is_empty() || !valid_chars(s) {
        return Err(XsError::Einval);
    }
    if s.starts_with('@') {
        if !allow_special || s.len() > XENSTORE_REL_PATH_MAX || s.contains('/') {
            return Err(XsError::Einval);
        }
        return Ok(ResolvedPath {
            abs: s.to_owned(),
            relative: false,
        });
    }
    let (abs, relative) = if s.starts_with('/') {
        (s.to_owned(), false)
    } else {
        if s.len() > XENSTORE_REL_PATH_MAX {
            return Err(XsError::Einval);
        }
        (format!("{}/{s}", domain_path(domid)), true)
    };
    if abs.len() > XENSTORE_ABS_PATH_MAX
        || abs.contains("//")
        || (abs.len() > 1 && abs.ends_with('/'))
    {
        return Err(XsError::Einval);
    }
    Ok(ResolvedPath { abs, relative })
}

/// The parent of an absolute path (`None` for `/` and special paths).
pub fn parent(path: &str) -> Option<&str> {
    if path == "/" || !path.starts_with('/') {
        return None;
    }
    match path.rfind('/') {
        Some(0) => Some("/"),
        Some(i) => Some(&path[..i]),
        None => None,
    }
}

/// The last component of an absolute path (`""` for `/`).
pub fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or("")
}

/// `parent/name`, minding the root.
pub fn join(parent: &str, name: &str) -> String {
    if parent == "/" {
        format!("/{name}")
    } else {
        format!("{parent}/{name}")
    }
}

/// Whether `path` is `ancestor` or lies below it.
pub fn is_within(path: &str, ancestor: &str) -> bool {
    if ancestor == "/" {
        return path.starts_with('/');
    }
    path == ancestor
        || (path.starts_with(ancestor) && path.as_bytes().get(ancestor.len()) == Some(&b'/'))
}

/// `path` as seen by a domain that named it relatively: the part after its home, or the
/// absolute path if it is not below the home.
pub fn relative_to_home(path: &str, domid: DomId) -> String {
    let home = domain_path(domid);
    match path.strip_prefix(&home).and_then(|r| r.strip_prefix('/')) {
        Some(r) if !r.is_empty() => r.to_owned(),
        _ => path.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_relative_and_absolute() {
        let r = resolve(b"device/vif", 3, false).unwrap();
        assert_eq!(r.abs, "/local/domain/3/device/vif");
        assert!(r.relative);
        assert_eq!(resolve(b"/", 3, false).unwrap().abs, "/");
        assert_eq!(resolve(b"/a_b-c@d", 0, false).unwrap().abs, "/a_b-c@d");
    }

    #[test]
    fn rejects_bad_paths() {
        for bad in [
            &b""[..],
            b"/a//b",
            b"/a/",
            b"/a b",
            b"/a\xff",
            b"/a.b",
            b"@x",
            b"a\0",
        ] {
            assert_eq!(resolve(bad, 0, false), Err(XsError::Einval), "{bad:?}");
        }
        assert_eq!(resolve(b"@x/y", 0, true), Err(XsError::Einval));
        assert!(resolve(b"@releaseDomain", 0, true).unwrap().is_special());
        let long_rel = vec![b'a'; XENSTORE_REL_PATH_MAX + 1];
        assert_eq!(resolve(&long_rel, 0, false), Err(XsError::Einval));
        let mut long_abs = vec![b'/'];
        long_abs.extend(vec![b'a'; XENSTORE_ABS_PATH_MAX]);
        assert_eq!(resolve(&long_abs, 0, false), Err(XsError::Einval));
    }

    #[test]
    fn path_helpers() {
        assert_eq!(parent("/a/b"), Some("/a"));
        assert_eq!(parent("/a"), Some("/"));
        assert_eq!(parent("/"), None);
        assert_eq!(basename("/a/b"), "b");
        assert_eq!(join("/", "a"), "/a");
        assert!(is_within("/a/b", "/a"));
        assert!(is_within("/a", "/a"));
        assert!(!is_within("/ab", "/a"));
        assert!(is_within("/x", "/"));
        assert_eq!(relative_to_home("/local/domain/3/x/y", 3), "x/y");
        assert_eq!(relative_to_home("/other", 3), "/other");
    }
}
