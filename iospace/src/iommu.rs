//! Software IOMMU (being written)
