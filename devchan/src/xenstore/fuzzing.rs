//! Fuzz target bodies (stub, being written).

/// Decodes arbitrary bytes as XenStore messages.
pub fn xenstore_msg(_data: &[u8]) {}
