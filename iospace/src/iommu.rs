//! Software IOMMU (being written).

/// A device's IOMMU.
#[derive(Default)]
pub struct Iommu {}
