//! Watches and the events they produce.
//!
//! A watch `(path, token)` fires when the node at `path` or any node below it is written,
//! created, removed or has its permissions changed; removing an ancestor of `path` fires it too
//! (with the watch's own path). The daemon sends `XS_WATCH_EVENT` with payload
//! `"<path>\0<token>\0"`; a watch registered with a relative path receives relative paths.
//! Right after `XS_WATCH` is acknowledged the watch fires once with its own path, so clients
//! can read the initial state without a race.
//!
//! Special paths name events that are not nodes:
//! [`INTRODUCE_DOMAIN`](super::path::INTRODUCE_DOMAIN) fires when `XS_INTRODUCE` adds a
//! domain, [`RELEASE_DOMAIN`](super::path::RELEASE_DOMAIN) when `XS_RELEASE` removes one.
//!
//! An event is delivered only to a connection whose domain may read the node that changed
//! (for a removal, as the node was before), so watches cannot probe unreadable parts of the
//! tree. Changes inside a transaction fire when it commits.

use super::path;
use super::perms::{access_for, Perm, PERM_READ};
use super::wire::{Message, MsgType};
use crate::grant::DomId;

/// A registered watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Watch {
    /// Absolute or special path watched.
    pub path: String,
    /// The client's token, echoed in events.
    pub token: Vec<u8>,
    /// Whether the client gave the path relative to its home.
    pub relative: bool,
}

/// A change that may fire watches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FireRecord {
    /// Absolute (or special) path of the changed node.
    pub path: String,
    /// Whether the node and its subtree were removed.
    pub removed: bool,
    /// The node's permissions (before removal, for a removal), used to filter delivery.
    pub perms: Vec<Perm>,
}

/// A watch event as a client sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchEvent {
    /// The path reported.
    pub path: String,
    /// The watch's token.
    pub token: Vec<u8>,
}

impl WatchEvent {
    /// The `XS_WATCH_EVENT` message carrying this event.
    pub fn to_message(&self) -> Message {
        Message::new(
            MsgType::WatchEvent,
            0,
            0,
            Message::strings(&[self.path.as_bytes(), &self.token]),
        )
    }

    /// Parses an `XS_WATCH_EVENT` payload `"path\0token\0"` (trailing NUL optional).
    pub fn parse(payload: &[u8]) -> Option<Self> {
        let body = payload.strip_suffix(&[0]).unwrap_or(payload);
        let mut parts = body.splitn(2, |b| *b == 0);
        let path = std::str::from_utf8(parts.next()?).ok()?.to_owned();
        let token = parts.next()?.to_vec();
        Some(Self { path, token })
    }
}

/// The event `w` (owned by `domid`) receives for `f`, if it fires and may be delivered.
pub fn event_for(
    w: &Watch,
    domid: DomId,
    acting_for: Option<DomId>,
    f: &FireRecord,
) -> Option<WatchEvent> {
    let abs = if path::is_within(&f.path, &w.path) {
        &f.path
    } else if f.removed && path::is_within(&w.path, &f.path) {
        &w.path
    } else {
        return None;
    };
    if access_for(&f.perms, domid, acting_for).0 & PERM_READ == 0 {
        return None;
    }
    Some(WatchEvent {
        path: report_path(w, abs, domid),
        token: w.token.clone(),
    })
}

/// The path a watch reports for the absolute path `abs`.
pub fn report_path(w: &Watch, abs: &str, domid: DomId) -> String {
    if w.relative {
        path::relative_to_home(abs, domid)
    } else {
        abs.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(path: &str, relative: bool) -> Watch {
        Watch {
            path: path.into(),
            token: b"t".to_vec(),
            relative,
        }
    }

    fn fire(path: &str, removed: bool, owner: DomId) -> FireRecord {
        FireRecord {
            path: path.into(),
            removed,
            perms: vec![Perm::new(owner, 0)],
        }
    }

    #[test]
    fn fires_on_self_and_children_only() {
        let watch = w("/a", false);
        assert_eq!(
            event_for(&watch, 0, None, &fire("/a", false, 0))
                .unwrap()
                .path,
            "/a"
        );
        assert_eq!(
            event_for(&watch, 0, None, &fire("/a/b", false, 0))
                .unwrap()
                .path,
            "/a/b"
        );
        assert!(event_for(&watch, 0, None, &fire("/ab", false, 0)).is_none());
        assert!(event_for(&watch, 0, None, &fire("/", false, 0)).is_none());
        assert_eq!(
            event_for(&w("/a/b/c", false), 0, None, &fire("/a", true, 0))
                .unwrap()
                .path,
            "/a/b/c"
        );
    }

    #[test]
    fn filters_by_read_permission_and_relativises() {
        let watch = w("/local/domain/3", true);
        assert!(event_for(&watch, 3, None, &fire("/local/domain/3/x", false, 0)).is_none());
        let ev = event_for(&watch, 3, None, &fire("/local/domain/3/x", false, 3)).unwrap();
        assert_eq!(ev.path, "x");
        let msg = ev.to_message();
        assert_eq!(msg.payload, b"x\0t\0");
        assert_eq!(WatchEvent::parse(&msg.payload), Some(ev));
    }

    #[test]
    fn special_paths_match_exactly() {
        let watch = w("@releaseDomain", false);
        assert!(event_for(&watch, 0, None, &fire("@releaseDomain", false, 0)).is_some());
        assert!(event_for(&w("/", false), 0, None, &fire("@releaseDomain", false, 0)).is_none());
    }
}
