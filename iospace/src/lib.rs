//! I/O Spaces: the ports, MMIO pages, interrupt lines and config-space registers a driver domain
//! may touch, computed from its device's PCI config space, plus the software IOMMU and the
//! emulated chipset.
//!
//! * [`pci`]: config-space registers, header/BAR/capability parsing, read-only sysfs
//!   enumeration, device names from the embedded PCI ID database (`pci-ids`).
//! * [`space`]: the I/O Space of one device: permission tables (port bitmap, MMIO pages,
//!   interrupts) and the virtualized config view; every refused access is counted and
//!   reported to the manager.
//! * [`iommu`]: the software IOMMU every device DMA goes through.
//! * [`emu`]: the emulated chipset: a PCI bus, the virtio 1.x PCI transport and a
//!   virtio-blk device over a raw image, whose DMA goes through [`iommu::IommuDevice`].
//! * [`driver`]: the driver side of a virtio-pci device over an [`link::IoAccess`] handle
//!   (transport bring-up and split virtqueues), shared by the IDDs' virtio drivers.
//! * [`fuzzing`]: fuzz bodies, also run by the unit tests.
//!
//! # Example
//!
//! ```
//! use iospace::emu::{PciBus, StubDevice};
//! use iospace::pci::BAR0;
//! use iospace::space::{IoSpace, SpaceError};
//! use std::sync::Arc;
//!
//! let bus = PciBus::new();
//! let dev = Arc::new(StubDevice::new(StubDevice::example_config()));
//! let bdf = bus.plug(3, dev.clone()).unwrap();
//! let space = IoSpace::new(bdf, dev).unwrap();
//!
//! // The driver may size its BAR (the write is emulated) ...
//! space.config_write(bdf, BAR0, &[0xff; 4]).unwrap();
//! assert_eq!(space.config_read(bdf, BAR0, 4).unwrap(), 0xfffe_0000);
//! // ... but not move it, and every refusal is counted.
//! let moved = space.config_write(bdf, BAR0, &0x1000_0000u32.to_le_bytes());
//! assert!(matches!(moved, Err(SpaceError::MoveBar { .. })));
//! assert_eq!(space.violations(), 1);
//! ```
pub mod driver;
pub mod emu;
pub mod fuzzing;
pub mod iommu;
pub mod link;
pub mod pci;
pub mod space;
