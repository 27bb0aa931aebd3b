//! I/O Spaces: the ports, MMIO pages, interrupt lines and config-space registers a driver domain
//! may touch, computed from its device's PCI config space, plus the software IOMMU and the
//! emulated chipset.
//!
//! The software IOMMU ([`iommu`]) is here; the rest is planned in issue 3 (I/O Spaces and the
//! block path).
pub mod iommu;
