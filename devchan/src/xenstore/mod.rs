//! XenStore: the wire protocol, the store, a client, and the domain-side ring transport.
//!
//! XenStore is a small hierarchical database that domains use to find each other's devices:
//! a backend writes `/local/domain/<backend>/backend/vif/<front>/<dev>/...`, a frontend its
//! `/local/domain/<front>/device/vif/<dev>/...` (ring references, event channel, state), and
//! each watches the other. The daemon (xenstored) serves dom0 tools over a Unix socket and
//! every other domain over a one-page ring shared with it.
//!
//! * [`wire`]: the `xs_wire.h` message header, types and framing; [`request`]: payloads.
//! * [`path`], [`perms`]: path rules and permissions; [`tree`], [`ops`], [`watch`],
//!   [`transaction`], [`store`]: the database itself, pure logic without I/O.
//! * [`client`]: a protocol client over any byte stream; [`ring`]: the
//!   `xenstore_domain_interface` page and the domain side of it as a byte stream.
//! * [`fuzzing`]: fuzz target bodies.
//!
//! ```
//! use devchan::xenstore::{Message, MsgType, Store};
//!
//! let mut store = Store::new();
//! let dom0 = store.connect(0);
//! let guest = store.connect(5);
//! // dom0 (privileged) writes; domain 5 may not read a node it has no permission on.
//! let w = Message::new(MsgType::Write, 1, 0, b"/vm/name\0guest".to_vec());
//! assert_eq!(store.handle(dom0, &w).reply.payload, b"OK\0");
//! let r = Message::new(MsgType::Read, 2, 0, b"/vm/name\0".to_vec());
//! let reply = store.handle(guest, &r).reply;
//! assert_eq!((reply.ty, reply.payload.as_slice()), (MsgType::Error, &b"EACCES\0"[..]));
//! ```
//!
//! Errors travel as strings: an `XS_ERROR` reply carries the errno *name* (`"ENOENT\0"`), from
//! the table in `xs_wire.h`; [`XsError`] is that table.

pub mod client;
pub mod fuzzing;
pub mod ops;
pub mod path;
pub mod perms;
pub mod request;
pub mod ring;
pub mod store;
pub mod transaction;
pub mod tree;
pub mod watch;
pub mod wire;

#[cfg(test)]
mod store_tests;

pub use client::{Client, ClientError};
pub use store::{ConnId, DomainAction, Quotas, Response, Store};
pub use watch::WatchEvent;
pub use wire::{Decoder, Message, MsgType, WireError};

macro_rules! xs_errors {
    ($($(#[$doc:meta])* $v:ident = $errno:expr, $name:literal;)*) => {
        /// An error as XenStore reports it: the `xsd_errors` table of `xs_wire.h`, in order.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
        pub enum XsError {
            $($(#[$doc])* #[error($name)] $v,)*
        }

        impl XsError {
            /// The table, in `xs_wire.h` order.
            pub const ALL: &'static [XsError] = &[$(XsError::$v,)*];

            /// The errno name sent on the wire.
            pub fn name(self) -> &'static str {
                match self { $(XsError::$v => $name,)* }
            }

            /// The Linux errno value.
            pub fn errno(self) -> i32 {
                match self { $(XsError::$v => $errno,)* }
            }

            /// The error an `XS_ERROR` payload names (NUL optional); unknown names are `EINVAL`,
            /// as libxenstore treats them.
            pub fn from_name(s: &[u8]) -> Self {
                let s = s.strip_suffix(&[0]).unwrap_or(s);
                $(if s == $name.as_bytes() { return XsError::$v; })*
                XsError::Einval
            }
        }
    };
}

xs_errors! {
    /// Invalid argument.
    Einval = 22, "EINVAL";
    /// Permission denied.
    Eacces = 13, "EACCES";
    /// Already exists.
    Eexist = 17, "EEXIST";
    /// Is a directory.
    Eisdir = 21, "EISDIR";
    /// No such node.
    Enoent = 2, "ENOENT";
    /// Out of memory.
    Enomem = 12, "ENOMEM";
    /// Quota exceeded.
    Enospc = 28, "ENOSPC";
    /// I/O error.
    Eio = 5, "EIO";
    /// Directory not empty.
    Enotempty = 39, "ENOTEMPTY";
    /// Not implemented.
    Enosys = 38, "ENOSYS";
    /// Read-only.
    Erofs = 30, "EROFS";
    /// Busy (a transaction inside a transaction).
    Ebusy = 16, "EBUSY";
    /// Try again (transaction conflict).
    Eagain = 11, "EAGAIN";
    /// Already connected.
    Eisconn = 106, "EISCONN";
    /// Too big (reply or watch quota).
    E2big = 7, "E2BIG";
    /// Not permitted.
    Eperm = 1, "EPERM";
}

/// What this module claims about Xen's headers (`xen/io/xs_wire.h`).
pub fn abi_checks() -> Vec<crate::abi::AbiCheck> {
    use crate::abi::AbiCheck;
    use ring::*;
    use wire::*;
    let mut v = Vec::new();
    for (ty, name) in MsgType::ALL {
        v.push(AbiCheck::new(*name, *ty as u32));
    }
    v.push(AbiCheck::new("XS_DEBUG", MsgType::Control as u32));
    v.push(AbiCheck::new("XS_TYPE_COUNT", XS_TYPE_COUNT));
    v.push(AbiCheck::new("XS_INVALID", XS_INVALID));
    // XS_RESTRICT was removed; its number lies between SET_TARGET and RESET_WATCHES.
    v.push(AbiCheck::new("XS_RESET_WATCHES - 1", XS_RESTRICT_RESERVED));
    v.push(AbiCheck::new("XS_WATCH_PATH", XS_WATCH_PATH));
    v.push(AbiCheck::new("XS_WATCH_TOKEN", XS_WATCH_TOKEN));
    for (name, ours) in [
        ("XS_WRITE_NONE", XS_WRITE_NONE),
        ("XS_WRITE_CREATE", XS_WRITE_CREATE),
        ("XS_WRITE_CREATE_EXCL", XS_WRITE_CREATE_EXCL),
    ] {
        v.push(AbiCheck::new(
            format!("__builtin_strcmp({name}, \"{ours}\")"),
            0,
        ));
    }
    v.push(AbiCheck::new(
        "sizeof(xsd_errors) / sizeof(xsd_errors[0])",
        XsError::ALL.len(),
    ));
    for (i, e) in XsError::ALL.iter().enumerate() {
        v.push(AbiCheck::new(format!("xsd_errors[{i}].errnum"), e.errno()));
        v.push(AbiCheck::new(
            format!(
                "__builtin_strcmp(xsd_errors[{i}].errstring, \"{}\")",
                e.name()
            ),
            0,
        ));
    }
    v.push(AbiCheck::new(
        "sizeof(struct xsd_sockmsg)",
        core::mem::size_of::<XsdSockmsg>(),
    ));
    v.push(AbiCheck::new(
        "offsetof(struct xsd_sockmsg, type)",
        core::mem::offset_of!(XsdSockmsg, r#type),
    ));
    v.extend(crate::abi_layout!(
        "struct xsd_sockmsg",
        XsdSockmsg { req_id, tx_id, len }
    ));
    v.extend(crate::abi_layout!(
        "struct xenstore_domain_interface",
        XenstoreDomainInterface {
            req,
            rsp,
            req_cons,
            req_prod,
            rsp_cons,
            rsp_prod,
            server_features,
            connection,
            error
        }
    ));
    v.push(AbiCheck::new(
        "sizeof(XENSTORE_RING_IDX)",
        core::mem::size_of::<RingIdx>(),
    ));
    for (name, ours) in [
        ("XENSTORE_PAYLOAD_MAX", XENSTORE_PAYLOAD_MAX),
        ("XENSTORE_ABS_PATH_MAX", XENSTORE_ABS_PATH_MAX),
        ("XENSTORE_REL_PATH_MAX", XENSTORE_REL_PATH_MAX),
        ("XENSTORE_RING_SIZE", XENSTORE_RING_SIZE),
    ] {
        v.push(AbiCheck::new(name, ours));
    }
    v.push(AbiCheck::new(
        "MASK_XENSTORE_IDX(1027)",
        mask_xenstore_idx(1027),
    ));
    for (name, ours) in [
        (
            "XENSTORE_SERVER_FEATURE_RECONNECTION",
            XENSTORE_SERVER_FEATURE_RECONNECTION,
        ),
        (
            "XENSTORE_SERVER_FEATURE_ERROR",
            XENSTORE_SERVER_FEATURE_ERROR,
        ),
        ("XENSTORE_CONNECTED", XENSTORE_CONNECTED),
        ("XENSTORE_RECONNECT", XENSTORE_RECONNECT),
        ("XENSTORE_ERROR_NONE", XENSTORE_ERROR_NONE),
        ("XENSTORE_ERROR_COMM", XENSTORE_ERROR_COMM),
        ("XENSTORE_ERROR_RINGIDX", XENSTORE_ERROR_RINGIDX),
        ("XENSTORE_ERROR_PROTO", XENSTORE_ERROR_PROTO),
    ] {
        v.push(AbiCheck::new(name, ours));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_names_round_trip() {
        for e in XsError::ALL {
            assert_eq!(XsError::from_name(format!("{}\0", e.name()).as_bytes()), *e);
            assert_eq!(e.to_string(), e.name());
        }
        assert_eq!(XsError::from_name(b"EWHATEVER"), XsError::Einval);
        assert_eq!(XsError::ALL.len(), 16);
    }

    #[test]
    fn abi_checks_cover_every_type() {
        let checks = abi_checks();
        for (_, name) in MsgType::ALL {
            assert!(checks.iter().any(|c| c.c_expr == *name), "{name}");
        }
    }
}
