//! What netback needs from a NIC: the [`NetDevice`] trait.
//!
//! Data never passes through the driver domain's address space on transmit: netback pins
//! each guest grant for the device (`Platform::pin_grant`) and hands the device the IOVAs
//! ([`TxSeg`]); the device DMAs the frame through its IOMMU. On receive the device writes
//! into page-sized buffers of the IDD's *own* memory that the driver posted ([`RxBuffer`]);
//! netback reads the Ethernet header from that page to demultiplex, then grant-copies the
//! frame into the guest's posted buffer or transfers the whole page (exchange).
//!
//! A receive buffer stays owned by the device until it comes back in [`NetEvent::Rx`];
//! netback then either posts it again (copy) or posts the page it got in exchange.

use devchan::platform::Frame;
use std::time::Duration;

/// One piece of a frame to transmit: `len` bytes at `iova` (device address space).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxSeg {
    /// Device address of the first byte (any offset within a page).
    pub iova: u64,
    /// Bytes; a segment never crosses a 4 KiB page.
    pub len: u32,
}

/// A receive buffer: one page of the IDD's own memory, mapped for the device at `iova`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxBuffer {
    /// The IDD's frame (netback reads it with `Platform::read_local`).
    pub frame: Frame,
    /// Where the device reaches it.
    pub iova: u64,
}

/// Something the device finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetEvent {
    /// The transmit submitted with `token` is done (its pins may be released).
    TxDone {
        /// The caller's token.
        token: u64,
        /// Whether the device sent it (false: the device dropped it, e.g. malformed).
        ok: bool,
    },
    /// A frame arrived in `buf`: the Ethernet frame is `len` bytes starting at `offset`.
    Rx {
        /// The buffer, given back.
        buf: RxBuffer,
        /// Offset of the Ethernet header within the page (after any device header).
        offset: u16,
        /// Frame length in bytes.
        len: u16,
    },
}

/// Why a device operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NetDevError {
    /// No room on the device queue now; try again after a [`NetDevice::poll`].
    #[error("Device queue full")]
    Full,
    /// The request itself is unacceptable (too many segments, too long, empty).
    #[error("Malformed request: {0}")]
    Malformed(&'static str),
    /// The device failed or needs a reset; the driver domain should restart.
    #[error("Device failed: {0}")]
    Failed(String),
}

/// A NIC as netback drives it.
pub trait NetDevice: Send {
    /// The device's MAC address.
    fn mac(&self) -> [u8; 6];
    /// Largest frame (Ethernet header included, no FCS) the device sends or receives.
    fn max_frame(&self) -> usize;
    /// Most segments one transmit may carry.
    fn max_tx_segments(&self) -> usize;
    /// Transmits submitted and not yet returned by [`NetDevice::poll`].
    fn tx_in_flight(&self) -> usize;
    /// Receive buffers the device holds now.
    fn rx_posted(&self) -> usize;
    /// Most receive buffers the device can hold.
    fn rx_capacity(&self) -> usize;
    /// Queue one frame (its segments, in order) for transmit. `Err(Full)`: not accepted, no
    /// completion follows; any other error also means not accepted.
    fn transmit(&mut self, token: u64, segs: &[TxSeg]) -> Result<(), NetDevError>;
    /// Give the device a receive buffer.
    fn post_rx(&mut self, buf: RxBuffer) -> Result<(), NetDevError>;
    /// Append finished transmits and arrived frames to `out`.
    fn poll(&mut self, out: &mut Vec<NetEvent>) -> Result<(), NetDevError>;
    /// Block until an event may be ready or `timeout` passes.
    fn wait(&mut self, timeout: Duration) -> Result<(), NetDevError>;
}
