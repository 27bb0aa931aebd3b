//! [`MemNic`]: a NIC in memory behind the IOMMU, for tests and for fuzzing netback.
//!
//! It behaves as a device does: it reaches frames only through its IOMMU view
//! ([`iospace::iommu::IommuDevice`]), so a transmit whose IOVAs are not pinned fails, and a
//! receive lands in a posted buffer at [`RX_OFFSET`] (where virtio-net's 12-byte header would
//! be). The "wire" is a [`MemWire`] handle shared with the test: frames sent, frames to
//! inject, and switches to hold completions (to leave transmits in flight) or refuse
//! transmits (a full queue).

use crate::device::{NetDevError, NetDevice, NetEvent, RxBuffer, TxSeg};
use iospace::iommu::IommuDevice;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Where a received frame starts in its buffer (virtio-net's header size).
pub const RX_OFFSET: u16 = 12;

#[derive(Default)]
struct Wire {
    sent: Vec<Vec<u8>>,
    posted: VecDeque<RxBuffer>,
    events: Vec<NetEvent>,
    held: Vec<NetEvent>,
    hold_tx: bool,
    full: bool,
    in_flight: usize,
    rx_no_buffer: u64,
    tx_faults: u64,
}

/// The test's side of a [`MemNic`].
#[derive(Clone, Default)]
pub struct MemWire(Arc<Mutex<Wire>>);

impl MemWire {
    fn lock(&self) -> MutexGuard<'_, Wire> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Frames the device sent so far (taken).
    pub fn take_sent(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.lock().sent)
    }

    /// A frame arrives from the wire; false if no buffer was posted (dropped and counted).
    pub fn inject(&self, dev: &IommuDevice, frame: &[u8]) -> bool {
        let mut w = self.lock();
        let Some(buf) = w.posted.pop_front() else {
            w.rx_no_buffer += 1;
            return false;
        };
        let Ok(len) = u16::try_from(frame.len()) else {
            w.posted.push_front(buf);
            return false;
        };
        if dev
            .dma_write(buf.iova + u64::from(RX_OFFSET), frame)
            .is_err()
        {
            // The buffer is no longer reachable (unpinned): the device drops it.
            w.rx_no_buffer += 1;
            return false;
        }
        w.events.push(NetEvent::Rx {
            buf,
            offset: RX_OFFSET,
            len,
        });
        true
    }

    /// Hold transmit completions (true) or release them (false, the held ones complete).
    pub fn hold_tx(&self, hold: bool) {
        let mut w = self.lock();
        w.hold_tx = hold;
        if !hold {
            let held = std::mem::take(&mut w.held);
            w.events.extend(held);
        }
    }

    /// Refuse transmits with `Full` while set.
    pub fn set_full(&self, full: bool) {
        self.lock().full = full;
    }

    /// Receive buffers posted now.
    pub fn posted(&self) -> usize {
        self.lock().posted.len()
    }

    /// Frames dropped for want of a buffer.
    pub fn rx_no_buffer(&self) -> u64 {
        self.lock().rx_no_buffer
    }

    /// Transmits that failed to read their IOVAs.
    pub fn tx_faults(&self) -> u64 {
        self.lock().tx_faults
    }
}

/// The device.
pub struct MemNic {
    dev: IommuDevice,
    wire: MemWire,
    mac: [u8; 6],
    max_segments: usize,
    rx_capacity: usize,
}

impl MemNic {
    /// A NIC reaching memory through `dev`, its wire `wire`.
    pub fn new(dev: IommuDevice, wire: MemWire, mac: [u8; 6]) -> Self {
        // A fresh device holds nothing (a restarted IDD's device is reset).
        {
            let mut w = wire.lock();
            w.posted.clear();
            w.events.clear();
            w.held.clear();
            w.in_flight = 0;
        }
        Self {
            dev,
            wire,
            mac,
            max_segments: 20,
            rx_capacity: 32,
        }
    }

    /// Change how many receive buffers the device holds.
    pub fn with_rx_capacity(mut self, n: usize) -> Self {
        self.rx_capacity = n;
        self
    }
}

impl NetDevice for MemNic {
    fn mac(&self) -> [u8; 6] {
        self.mac
    }
    fn max_frame(&self) -> usize {
        1514
    }
    fn max_tx_segments(&self) -> usize {
        self.max_segments
    }
    fn tx_in_flight(&self) -> usize {
        self.wire.lock().in_flight
    }
    fn rx_posted(&self) -> usize {
        self.wire.lock().posted.len()
    }
    fn rx_capacity(&self) -> usize {
        self.rx_capacity
    }
    fn transmit(&mut self, token: u64, segs: &[TxSeg]) -> Result<(), NetDevError> {
        let mut w = self.wire.lock();
        if w.full || w.in_flight >= 256 {
            return Err(NetDevError::Full);
        }
        if segs.is_empty() || segs.len() > self.max_segments {
            return Err(NetDevError::Malformed("segment count"));
        }
        let mut frame = Vec::new();
        let mut ok = true;
        for s in segs {
            let start = frame.len();
            frame.resize(start + s.len as usize, 0);
            if self.dev.dma_read(s.iova, &mut frame[start..]).is_err() {
                ok = false;
                break;
            }
        }
        if ok {
            w.sent.push(frame);
        } else {
            w.tx_faults += 1;
        }
        let ev = NetEvent::TxDone { token, ok };
        w.in_flight += 1;
        if w.hold_tx {
            w.held.push(ev);
        } else {
            w.events.push(ev);
        }
        Ok(())
    }
    fn post_rx(&mut self, buf: RxBuffer) -> Result<(), NetDevError> {
        let mut w = self.wire.lock();
        if w.posted.len() >= self.rx_capacity {
            return Err(NetDevError::Full);
        }
        w.posted.push_back(buf);
        Ok(())
    }
    fn poll(&mut self, out: &mut Vec<NetEvent>) -> Result<(), NetDevError> {
        let mut w = self.wire.lock();
        let evs = std::mem::take(&mut w.events);
        for e in &evs {
            if matches!(e, NetEvent::TxDone { .. }) {
                w.in_flight = w.in_flight.saturating_sub(1);
            }
        }
        out.extend(evs);
        Ok(())
    }
    fn wait(&mut self, timeout: Duration) -> Result<(), NetDevError> {
        if self.wire.lock().events.is_empty() {
            std::thread::sleep(timeout.min(Duration::from_micros(200)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devchan::platform::Platform;
    use hypervisor::domain::DomainConfig;
    use hypervisor::local::LocalPlatform;
    use hypervisor::system::System;
    use iospace::iommu::Iommu;

    #[test]
    fn sends_through_the_iommu_and_receives_into_posted_buffers() {
        let sys = System::new();
        let iommu = Iommu::new(16);
        let d = sys
            .create_domain(DomainConfig {
                name: "idd".into(),
                nr_frames: 16,
                iommu: Some(iommu.clone()),
            })
            .unwrap();
        let p = LocalPlatform::new(sys, d).unwrap();
        let gref = p.grant_access(p.domid(), 9, false).unwrap();
        let iova = p.pin_grant(p.domid(), gref, true).unwrap();
        p.write_local(9, 100, b"hello").unwrap();
        let wire = MemWire::default();
        let mut nic = MemNic::new(iommu.device(), wire.clone(), [2, 0, 0, 0, 0, 1]);
        nic.transmit(
            7,
            &[TxSeg {
                iova: iova + 100,
                len: 5,
            }],
        )
        .unwrap();
        nic.transmit(
            8,
            &[TxSeg {
                iova: 0xdead_0000,
                len: 5,
            }],
        )
        .unwrap();
        let mut ev = Vec::new();
        nic.poll(&mut ev).unwrap();
        assert_eq!(
            ev,
            [
                NetEvent::TxDone { token: 7, ok: true },
                NetEvent::TxDone {
                    token: 8,
                    ok: false
                }
            ]
        );
        assert_eq!(wire.take_sent(), [b"hello".to_vec()]);
        assert!(!wire.inject(&iommu.device(), b"nobuf"));
        nic.post_rx(RxBuffer { frame: 9, iova }).unwrap();
        assert!(wire.inject(&iommu.device(), b"frame"));
        ev.clear();
        nic.poll(&mut ev).unwrap();
        assert_eq!(ev.len(), 1);
        let mut got = [0u8; 5];
        p.read_local(9, usize::from(RX_OFFSET), &mut got).unwrap();
        assert_eq!(&got, b"frame");
        assert_eq!(wire.rx_no_buffer(), 1);
    }
}
