//! Grant-table enforcement (being written).

use devchan::grant::{DomId, GrantRef};

/// A mapping made by `System::map_grant`, for `unmap_grant`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MapHandle(pub u64);

pub use devchan::platform::TransferMode;

/// One use of a grant forcibly ended (or found unrevocable) by `System::revoke_overdue`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revocation {
    /// The granting domain.
    pub granter: DomId,
    /// Its reference.
    pub gref: GrantRef,
    /// The domain that held the use.
    pub holder: DomId,
    /// What was revoked.
    pub kind: RevokedUse,
}

/// The kind of use revoked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RevokedUse {
    /// A DMA pin: its IOMMU entry was removed.
    Pin {
        /// The IOVA that no longer translates.
        iova: u64,
    },
    /// Copies in progress: their use counts were dropped.
    Copy,
    /// A mapping: cannot be forced back from a process; the manager must destroy the holder.
    Unrevocable {
        /// The mapping.
        handle: MapHandle,
    },
}

/// The uses others hold of one domain's grants.
#[derive(Default)]
pub struct ActiveGrantTable {}

/// The maps and pins one domain holds of others' grants.
#[derive(Default)]
pub struct Holdings {}
