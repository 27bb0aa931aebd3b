//! Event-channel routing (being written).

/// A domain's port table.
#[derive(Default)]
pub struct PortTable {}
