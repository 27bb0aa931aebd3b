//! The network isolated driver domain: a virtio-net driver behind an I/O Space, and netback
//! serving Xen's `netif` protocol over device channels.
//!
//! * [`device`]: the [`device::NetDevice`] trait netback drives (transmit IOVA segments in,
//!   receive buffers of the IDD's own memory posted, completions and arrivals out).
//! * [`virtio`]: the virtio-net driver ([`virtio::VirtioNetDriver`]), a [`device::NetDevice`]
//!   programmed only through the device's I/O Space.

pub mod device;
pub mod virtio;
