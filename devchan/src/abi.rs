//! Cross-checks of our layouts against Xen's public headers.
//!
//! Every module that mirrors a Xen structure or constant lists what it claims as [`AbiCheck`]s:
//! a C expression evaluated against Xen's headers (`sizeof(...)`, `offsetof(...)`, a macro) and
//! the value our Rust definition has. `tests/xen_headers.rs` compiles one C program that prints
//! every expression and fails on the first value that differs, so a layout cannot drift silently.

/// One claim about the Xen ABI: `c_expr`, evaluated by a C compiler with Xen's headers, must
/// equal `ours`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AbiCheck {
    /// A C expression of integer type, e.g. `sizeof(grant_entry_v1_t)`.
    pub c_expr: String,
    /// What our definition says it is.
    pub ours: i128,
}

impl AbiCheck {
    /// A check that `c_expr` equals `ours`.
    pub fn new(c_expr: impl Into<String>, ours: impl TryInto<i128>) -> Self {
        let ours = ours.try_into().unwrap_or(i128::MIN);
        Self { c_expr: c_expr.into(), ours }
    }
}

/// `AbiCheck`s for `sizeof(ty)` and `offsetof(ty, field)` of a `#[repr(C)]` Rust struct whose
/// fields are named as in C.
#[macro_export]
macro_rules! abi_layout {
    ($cty:expr, $rty:ty { $($field:ident),* $(,)? }) => {{
        let mut v = vec![$crate::abi::AbiCheck::new(
            format!("sizeof({})", $cty),
            core::mem::size_of::<$rty>(),
        )];
        $(v.push($crate::abi::AbiCheck::new(
            format!("offsetof({}, {})", $cty, stringify!($field)),
            core::mem::offset_of!($rty, $field),
        ));)*
        v
    }};
}

/// The C headers the checks are evaluated against, in include order.
pub const HEADERS: &[&str] = &[
    "errno.h",
    "xen/xen.h",
    "xen/grant_table.h",
    "xen/event_channel.h",
    "xen/io/ring.h",
    "xen/io/netif.h",
    "xen/io/blkif.h",
    "xen/io/xs_wire.h",
    "xen/io/xenbus.h",
];

/// Every check, from every module.
pub fn all() -> Vec<AbiCheck> {
    let mut v = crate::grant::abi_checks();
    v.extend(crate::evtchn::abi_checks());
    v.extend(crate::ring::abi_checks());
    v.extend(crate::netif::abi_checks());
    v.extend(crate::blkif::abi_checks());
    v.extend(crate::xenstore::abi_checks());
    v.extend(crate::xenbus::abi_checks());
    v
}
