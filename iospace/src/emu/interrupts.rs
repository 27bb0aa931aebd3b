//! Interrupt delivery for PCI device models: MSI-X (table, pending bits, per-vector and
//! function masks) or, while MSI-X is disabled, INTx with the virtio ISR register.
//!
//! # MSI-X table entry (16 bytes, in a BAR)
//!
//! | offset | field |
//! |---|---|
//! | 0 | message address low |
//! | 4 | message address high |
//! | 8 | message data |
//! | 12 | vector control (bit 0 = masked; entries start masked) |
//!
//! The pending-bit array holds one bit per vector. Message address and data are kept for the
//! driver to read back but not interpreted: a vector is delivered by signalling the eventfd
//! bound to [`Irq::MsiX`] (through the I/O Space), never by a memory write. A vector raised
//! while masked (per vector or by the function mask) sets its pending bit and is delivered
//! when unmasked.

use super::lock;
use super::virtio_pci::{flag, ISR_CONFIG, ISR_QUEUE, NO_VECTOR};
use crate::space::Irq;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;
use vmm_sys_util::eventfd::EventFd;

/// MSI-X vector control: masked.
pub const MSIX_VECTOR_MASKED: u32 = 1;

pub(crate) struct Msix {
    pub(crate) table: Vec<[u32; 4]>,
    pub(crate) pending: Vec<bool>,
    pub(crate) enabled: bool,
    pub(crate) function_masked: bool,
}

/// Interrupt delivery shared by the transport and the device's workers: MSI-X with its table
/// and pending bits, or INTx with the ISR when MSI-X is off, plus the device status bit
/// `DEVICE_NEEDS_RESET`.
pub struct Interrupts {
    pub(crate) msix: Mutex<Msix>,
    pub(crate) notifiers: Mutex<BTreeMap<Irq, EventFd>>,
    /// Config vector and one vector per queue.
    pub(crate) vectors: Mutex<(u16, Vec<u16>)>,
    pub(crate) isr: AtomicU8,
    pub(crate) status: AtomicU8,
    pub(crate) line: u8,
}

impl Interrupts {
    pub(crate) fn new(vectors: u16, queues: u16, line: u8) -> Self {
        Self {
            msix: Mutex::new(Msix {
                table: vec![[0, 0, 0, MSIX_VECTOR_MASKED]; usize::from(vectors)],
                pending: vec![false; usize::from(vectors)],
                enabled: false,
                function_masked: false,
            }),
            notifiers: Mutex::new(BTreeMap::new()),
            vectors: Mutex::new((NO_VECTOR, vec![NO_VECTOR; usize::from(queues)])),
            isr: AtomicU8::new(0),
            status: AtomicU8::new(0),
            line,
        }
    }

    fn notify(&self, irq: Irq) {
        if let Some(fd) = lock(&self.notifiers).get(&irq) {
            // A full eventfd counter already means "pending": nothing is lost.
            let _ = fd.write(1);
        }
    }

    fn trigger(&self, vector: u16, isr: u8) {
        let mut m = lock(&self.msix);
        if !m.enabled {
            drop(m);
            self.isr.fetch_or(isr, Ordering::SeqCst);
            self.notify(Irq::Line(self.line));
            return;
        }
        let v = usize::from(vector);
        let Some(entry) = m.table.get(v) else {
            return; // NO_VECTOR or out of range: no interrupt
        };
        if m.function_masked || entry[3] & MSIX_VECTOR_MASKED != 0 {
            m.pending[v] = true;
            return;
        }
        drop(m);
        self.notify(Irq::MsiX(vector));
    }

    /// Signal that queue `queue` has used buffers.
    pub fn signal_queue(&self, queue: u16) {
        let v = lock(&self.vectors).1.get(usize::from(queue)).copied();
        if let Some(v) = v {
            self.trigger(v, ISR_QUEUE);
        }
    }

    /// Signal a configuration change.
    pub fn signal_config(&self) {
        let v = lock(&self.vectors).0;
        self.trigger(v, ISR_CONFIG);
    }

    /// The device has failed: set `DEVICE_NEEDS_RESET` and tell the driver.
    pub fn needs_reset(&self) {
        let was = self
            .status
            .fetch_or(flag(VIRTIO_CONFIG_S_NEEDS_RESET), Ordering::SeqCst);
        if was & flag(VIRTIO_CONFIG_S_NEEDS_RESET) == 0 {
            self.signal_config();
        }
    }

    /// The device status register.
    pub fn status(&self) -> u8 {
        self.status.load(Ordering::SeqCst)
    }

    /// Deliver pending vectors that are no longer masked.
    pub(crate) fn flush_pending(&self) {
        let mut due = Vec::new();
        {
            let mut m = lock(&self.msix);
            if !m.enabled || m.function_masked {
                return;
            }
            for v in 0..m.table.len() {
                if m.pending[v] && m.table[v][3] & MSIX_VECTOR_MASKED == 0 {
                    m.pending[v] = false;
                    due.push(u16::try_from(v).unwrap_or(NO_VECTOR));
                }
            }
        }
        for v in due {
            self.notify(Irq::MsiX(v));
        }
    }
}
