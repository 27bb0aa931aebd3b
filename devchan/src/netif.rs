//! (being written)

/// What this module claims about Xen's headers.
pub fn abi_checks() -> Vec<crate::abi::AbiCheck> {
    Vec::new()
}
