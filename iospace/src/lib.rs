//! I/O Spaces: the ports, MMIO pages, interrupt lines and config-space registers a driver domain
//! may touch, computed from its device's PCI config space, plus the software IOMMU and the
//! emulated chipset.
//!
//! * [`pci`]: config-space registers, header/BAR/capability parsing, sysfs enumeration.
//! * [`space`]: the I/O Space of one device: permission tables and the virtualized config view.
//! * [`iommu`]: the software IOMMU every device DMA goes through.
//! * [`emu`]: the emulated chipset: a PCI bus and a virtio-blk-pci device.

pub mod emu;
pub mod fuzzing;
pub mod iommu;
pub mod pci;
pub mod space;
