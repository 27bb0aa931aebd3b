//! virtio-net: a NIC model whose wire is a [`Wire`] (a UDP socket or a TAP interface).
//!
//! # Interface (virtio 1.2 §5.1)
//!
//! Features offered: `VIRTIO_F_VERSION_1`, `VIRTIO_F_ACCESS_PLATFORM` (required by the
//! transport: every address is an IOVA), `VIRTIO_NET_F_MAC`, `VIRTIO_NET_F_MTU`,
//! `VIRTIO_NET_F_STATUS`. No offloads, no mergeable receive buffers, no control queue, one
//! queue pair: queue 0 is the receiveq, queue 1 the transmitq.
//!
//! Device configuration (`struct virtio_net_config`, read-only):
//!
//! | offset | field | value |
//! |---|---|---|
//! | 0 | `mac[6]` | [`NetConfig::mac`] |
//! | 6 | `status: le16` | `VIRTIO_NET_S_LINK_UP` |
//! | 8 | `max_virtqueue_pairs: le16` | 1 |
//! | 10 | `mtu: le16` | [`NetConfig::mtu`] |
//!
//! Every frame in either direction is preceded by a 12-byte `virtio_net_hdr_v1`
//! ([`HDR_LEN`]): `flags: u8, gso_type: u8, hdr_len: le16, gso_size: le16, csum_start: le16,
//! csum_offset: le16, num_buffers: le16`. With no offloads negotiated the device writes it
//! as zeroes with `num_buffers` = 1 and ignores the one the driver sends.
//!
//! # Transmit
//!
//! A transmit is one chain of device-readable descriptors: header then frame, split anyhow.
//! The driver's notify wakes the transmit thread, which pops each chain, gathers it through
//! the IOMMU into a local buffer (the frame is copied out of DMA memory once, before any
//! check), drops the header and sends the frame on the wire, then returns the chain with
//! used length 0. While the thread drains, the used ring's `VRING_USED_F_NO_NOTIFY` flag is
//! set so a driver that honours it need not ring for every frame. A chain that is malformed but harmless (a writable descriptor, shorter
//! than a header plus an Ethernet header, longer than [`NetConfig::max_frame`] plus the
//! header) is returned unsent and counted in `tx_dropped`; so is a frame the wire refuses.
//!
//! # Receive
//!
//! The receive thread reads frames from the wire. For each, it pops one posted chain (all
//! device-writable, at least [`HDR_LEN`] + frame bytes), scatters header and frame into it
//! and returns it with used length `12 + len`. With no chain posted (or the device not
//! running) the frame is dropped and counted in `rx_no_buffer`; a frame longer than
//! [`NetConfig::max_frame`], or one that does not fit the chain at the head of the queue, is
//! dropped and counted in `rx_dropped` (the chain stays posted).
//!
//! # Reset and failure
//!
//! Both threads touch queues only while holding the read side of the device's `active`
//! lock; reset takes the write side and drops the queues, so once `reset` returns no thread
//! does DMA until the driver activates the device again. An IOMMU fault anywhere (ring,
//! descriptor or buffer unmapped or read-only) or a receive chain with a device-readable
//! descriptor marks the device failed: `DEVICE_NEEDS_RESET` and the config interrupt, and
//! neither queue is touched again until reset. Nothing a driver or a wire sends can panic it.

use super::interrupts::Interrupts;
use super::mem::IommuMemory;
use super::virtio_pci::VirtioDevice;
use super::wire::{Wire, MAX_WIRE_FRAME};
use super::{lock, EmuError};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, RwLockReadGuard};
use std::thread::JoinHandle;
use std::time::Duration;
use virtio_bindings::virtio_config::{VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};

/// Length of `virtio_net_hdr_v1`.
pub const HDR_LEN: usize = 12;
/// Offset of `num_buffers` in the header.
const HDR_NUM_BUFFERS: usize = 10;
/// Queue size offered.
pub const QUEUE_MAX_SIZE: u16 = 256;
/// The receive queue.
pub const RX_QUEUE: u16 = 0;
/// The transmit queue.
pub const TX_QUEUE: u16 = 1;
/// Ethernet header plus one VLAN tag: what a frame may carry beyond the MTU.
pub const FRAME_OVERHEAD: usize = 18;
/// Smallest frame (an Ethernet header).
pub const MIN_FRAME: usize = 14;
/// How often the receive thread looks up from the wire to check for shutdown.
const RX_POLL: Duration = Duration::from_millis(100);

/// `struct virtio_net_config` offsets.
pub mod cfg {
    /// `mac[6]`.
    pub const MAC: usize = 0;
    /// le16 link status.
    pub const STATUS: usize = 6;
    /// le16 queue pairs.
    pub const MAX_VIRTQUEUE_PAIRS: usize = 8;
    /// le16 MTU.
    pub const MTU: usize = 10;
    /// Length of what we serve.
    pub const LEN: usize = 12;
}

/// How to build the device.
#[derive(Clone)]
pub struct NetConfig {
    /// The MAC address in config space.
    pub mac: [u8; 6],
    /// Where frames go and come from.
    pub wire: Arc<dyn Wire>,
    /// MTU advertised (68..=9000); frames may be `mtu + 18` bytes.
    pub mtu: u16,
}

impl NetConfig {
    /// A device with MTU 1500.
    pub fn new(mac: [u8; 6], wire: Arc<dyn Wire>) -> Self {
        Self {
            mac,
            wire,
            mtu: 1500,
        }
    }

    /// Largest frame (Ethernet header included, no FCS).
    pub fn max_frame(&self) -> usize {
        usize::from(self.mtu) + FRAME_OVERHEAD
    }
}

/// Counters for the manager's metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetDevStats {
    /// Frames put on the wire.
    pub tx_frames: u64,
    /// Their bytes.
    pub tx_bytes: u64,
    /// Transmit chains returned unsent (malformed, oversized, or refused by the wire).
    pub tx_dropped: u64,
    /// Frames delivered into receive buffers.
    pub rx_frames: u64,
    /// Their bytes.
    pub rx_bytes: u64,
    /// Frames dropped for want of a posted receive buffer (or a running device).
    pub rx_no_buffer: u64,
    /// Frames dropped as too long for the MTU or for the posted buffer.
    pub rx_dropped: u64,
    /// Errors reading from the wire.
    pub wire_errors: u64,
    /// Times the device marked itself `DEVICE_NEEDS_RESET`.
    pub failures: u64,
}

#[derive(Default)]
struct Stats {
    tx_frames: AtomicU64,
    tx_bytes: AtomicU64,
    tx_dropped: AtomicU64,
    rx_frames: AtomicU64,
    rx_bytes: AtomicU64,
    rx_no_buffer: AtomicU64,
    rx_dropped: AtomicU64,
    wire_errors: AtomicU64,
    failures: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

struct Active {
    rx: Option<Mutex<Queue>>,
    tx: Option<Mutex<Queue>>,
    mem: IommuMemory,
    irq: Arc<Interrupts>,
    /// Set on the first fault: nothing more is touched until reset.
    failed: AtomicBool,
}

struct Shared {
    mac: [u8; 6],
    mtu: u16,
    wire: Arc<dyn Wire>,
    stats: Stats,
    active: RwLock<Option<Active>>,
    /// What the transmit thread is woken for.
    kick: Mutex<Kick>,
    kicked: Condvar,
    stop: AtomicBool,
}

/// Wake-ups of the transmit thread.
#[derive(Default)]
struct Kick {
    /// The driver rang the transmit doorbell since the thread last looked.
    pending: bool,
    /// The device is being dropped.
    stop: bool,
}

/// The virtio-net device model.
pub struct VirtioNet {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// Why a chain could not be served.
enum Fail {
    /// Return the chain unsent and count it.
    Drop,
    /// The driver broke the device: needs reset.
    Fatal,
}

/// One descriptor's buffer.
#[derive(Clone, Copy)]
struct Seg {
    addr: u64,
    len: u32,
}

impl VirtioNet {
    /// Build the device and start its receive and transmit threads.
    pub fn new(config: NetConfig) -> Result<Self, EmuError> {
        if !(68..=9000).contains(&config.mtu) {
            return Err(EmuError::Config("mtu must be 68..=9000"));
        }
        if config.mac[0] & 1 != 0 {
            return Err(EmuError::Config("mac must be unicast"));
        }
        let shared = Arc::new(Shared {
            mac: config.mac,
            mtu: config.mtu,
            wire: config.wire,
            stats: Stats::default(),
            active: RwLock::new(None),
            kick: Mutex::new(Kick::default()),
            kicked: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let mut threads = Vec::new();
        let sh = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name("virtio-net-rx".into())
                .spawn(move || sh.rx_loop())
                .map_err(EmuError::Resource)?,
        );
        let sh = shared.clone();
        let tx = std::thread::Builder::new()
            .name("virtio-net-tx".into())
            .spawn(move || sh.tx_loop());
        let dev = Self {
            shared,
            threads: Mutex::new(threads),
        };
        // On a spawn failure `dev`'s Drop stops the receive thread.
        lock(&dev.threads).push(tx.map_err(EmuError::Resource)?);
        Ok(dev)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> NetDevStats {
        let s = &self.shared.stats;
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetDevStats {
            tx_frames: g(&s.tx_frames),
            tx_bytes: g(&s.tx_bytes),
            tx_dropped: g(&s.tx_dropped),
            rx_frames: g(&s.rx_frames),
            rx_bytes: g(&s.rx_bytes),
            rx_no_buffer: g(&s.rx_no_buffer),
            rx_dropped: g(&s.rx_dropped),
            wire_errors: g(&s.wire_errors),
            failures: g(&s.failures),
        }
    }

    /// The wire's description.
    pub fn describe_wire(&self) -> String {
        self.shared.wire.describe()
    }

    /// Where the wire receives, for a UDP wire ([`Wire::bound_addr`]).
    pub fn wire_addr(&self) -> Option<std::net::SocketAddr> {
        self.shared.wire.bound_addr()
    }

    fn config_bytes(&self) -> [u8; cfg::LEN] {
        let mut c = [0u8; cfg::LEN];
        c[cfg::MAC..cfg::MAC + 6].copy_from_slice(&self.shared.mac);
        let link = u16::try_from(VIRTIO_NET_S_LINK_UP).unwrap_or(1);
        c[cfg::STATUS..cfg::STATUS + 2].copy_from_slice(&link.to_le_bytes());
        c[cfg::MAX_VIRTQUEUE_PAIRS..cfg::MAX_VIRTQUEUE_PAIRS + 2]
            .copy_from_slice(&1u16.to_le_bytes());
        c[cfg::MTU..cfg::MTU + 2].copy_from_slice(&self.shared.mtu.to_le_bytes());
        c
    }
}

/// The descriptors of a chain, split by direction, copied out of the ring.
struct Chain {
    head: u16,
    readable: Vec<Seg>,
    writable: Vec<Seg>,
}

/// Pop one chain; `Ok(None)` when the ring is empty, `Err` on a DMA fault or an available
/// index more than a queue ahead of us (which would leave chains we can never pop).
fn pop(q: &mut Queue, mem: &IommuMemory) -> Result<Option<Chain>, Fail> {
    let faults = mem.faults();
    let chain = match q.iter(mem) {
        Ok(mut it) => it.next(),
        Err(_) => return Err(Fail::Fatal),
    };
    let Some(chain) = chain else {
        return if mem.faults() == faults {
            Ok(None)
        } else {
            Err(Fail::Fatal)
        };
    };
    let mut c = Chain {
        head: chain.head_index(),
        readable: Vec::new(),
        writable: Vec::new(),
    };
    for d in chain {
        let s = Seg {
            addr: d.addr().0,
            len: d.len(),
        };
        if d.is_write_only() {
            c.writable.push(s);
        } else {
            c.readable.push(s);
        }
    }
    if mem.faults() != faults {
        return Err(Fail::Fatal);
    }
    Ok(Some(c))
}

fn total(segs: &[Seg]) -> usize {
    segs.iter()
        .fold(0usize, |a, s| a.saturating_add(s.len as usize))
}

impl Shared {
    fn max_frame(&self) -> usize {
        usize::from(self.mtu) + FRAME_OVERHEAD
    }

    fn read_active(&self) -> RwLockReadGuard<'_, Option<Active>> {
        self.active.read().unwrap_or_else(|p| p.into_inner())
    }

    fn fail(&self, a: &Active) {
        if !a.failed.swap(true, Ordering::SeqCst) {
            // Status first: whoever sees the count must also see `DEVICE_NEEDS_RESET`.
            a.irq.needs_reset();
            bump(&self.stats.failures, 1);
        }
    }

    /// Return `head` to the used ring of `q` and interrupt when the driver wants it.
    fn complete(&self, a: &Active, q: &mut Queue, queue: u16, head: u16, len: u32) -> bool {
        let faults = a.mem.faults();
        let ok = q.add_used(&a.mem, head, len).is_ok();
        let notify = ok && q.needs_notification(&a.mem).unwrap_or(true);
        if !ok || a.mem.faults() != faults {
            return false;
        }
        if notify {
            a.irq.signal_queue(queue);
        }
        true
    }

    fn rx_loop(&self) {
        let mut buf = vec![0u8; MAX_WIRE_FRAME];
        while !self.stop.load(Ordering::SeqCst) {
            match self.wire.recv(&mut buf, Some(RX_POLL)) {
                Ok(Some(n)) => self.deliver(&buf[..n.min(buf.len())]),
                Ok(None) => {}
                Err(e) => {
                    bump(&self.stats.wire_errors, 1);
                    tracing::debug!(error = %e, "virtio-net wire receive failed");
                    std::thread::sleep(RX_POLL); // do not spin on a broken wire
                }
            }
        }
    }

    /// Put one frame from the wire into the next posted receive buffer.
    fn deliver(&self, frame: &[u8]) {
        if frame.len() > self.max_frame() || frame.len() < MIN_FRAME {
            bump(&self.stats.rx_dropped, 1);
            return;
        }
        let act = self.read_active();
        let Some(a) = act.as_ref().filter(|a| !a.failed.load(Ordering::SeqCst)) else {
            bump(&self.stats.rx_no_buffer, 1);
            return;
        };
        let Some(q) = &a.rx else {
            bump(&self.stats.rx_no_buffer, 1);
            return;
        };
        let mut q = lock(q);
        match self.fill(a, &mut q, frame) {
            Ok(true) => {
                bump(&self.stats.rx_frames, 1);
                bump(&self.stats.rx_bytes, frame.len() as u64);
            }
            Ok(false) => bump(&self.stats.rx_no_buffer, 1),
            Err(Fail::Drop) => bump(&self.stats.rx_dropped, 1),
            Err(Fail::Fatal) => self.fail(a),
        }
    }

    /// `Ok(false)`: no buffer posted.
    fn fill(&self, a: &Active, q: &mut Queue, frame: &[u8]) -> Result<bool, Fail> {
        let Some(c) = pop(q, &a.mem)? else {
            return Ok(false);
        };
        if !c.readable.is_empty() {
            return Err(Fail::Fatal); // a receive buffer the device may not write
        }
        let len = HDR_LEN + frame.len();
        if total(&c.writable) < len {
            q.go_to_previous_position(); // keep the buffer posted for a smaller frame
            return Err(Fail::Drop);
        }
        let mut hdr = [0u8; HDR_LEN];
        hdr[HDR_NUM_BUFFERS..].copy_from_slice(&1u16.to_le_bytes());
        let mut data = hdr.iter().chain(frame).copied();
        let mut rest = len;
        let dev = a.mem.device();
        let mut piece = Vec::with_capacity(len);
        for s in &c.writable {
            if rest == 0 {
                break;
            }
            let n = (s.len as usize).min(rest);
            piece.clear();
            piece.extend(data.by_ref().take(n));
            dev.dma_write(s.addr, &piece).map_err(|_| Fail::Fatal)?;
            rest -= n;
        }
        let used = u32::try_from(len).map_err(|_| Fail::Fatal)?;
        if self.complete(a, q, RX_QUEUE, c.head, used) {
            Ok(true)
        } else {
            Err(Fail::Fatal)
        }
    }

    fn tx_loop(&self) {
        loop {
            {
                let mut k = lock(&self.kick);
                while !k.pending && !k.stop {
                    k = self.kicked.wait(k).unwrap_or_else(|p| p.into_inner());
                }
                if k.stop {
                    return;
                }
                k.pending = false;
            }
            self.drain_tx();
        }
    }

    /// Send every available transmit chain. While it runs, the used ring's `NO_NOTIFY` flag
    /// tells the driver not to ring (each doorbell is a trapped MMIO write); after clearing
    /// it again the ring is checked once more, so a chain made available in between is not
    /// missed (the driver re-reads the flag after publishing, both sides with a full fence).
    fn drain_tx(&self) {
        let act = self.read_active();
        let Some(a) = act.as_ref() else { return };
        let Some(q) = &a.tx else { return };
        let mut q = lock(q);
        if a.failed.load(Ordering::SeqCst) {
            return;
        }
        if q.disable_notification(&a.mem).is_err() {
            return self.fail(a);
        }
        let mut rechecked = false;
        loop {
            while !a.failed.load(Ordering::SeqCst) {
                let c = match pop(&mut q, &a.mem) {
                    Ok(Some(c)) => c,
                    // The ring said there was more and yet nothing can be popped: the
                    // driver's index is inconsistent; never spin on it.
                    Ok(None) if rechecked => return self.fail(a),
                    Ok(None) => break,
                    Err(_) => return self.fail(a),
                };
                rechecked = false;
                match self.send(a, &c) {
                    Ok(n) => {
                        bump(&self.stats.tx_frames, 1);
                        bump(&self.stats.tx_bytes, n as u64);
                    }
                    Err(Fail::Drop) => bump(&self.stats.tx_dropped, 1),
                    Err(Fail::Fatal) => return self.fail(a),
                }
                if !self.complete(a, &mut q, TX_QUEUE, c.head, 0) {
                    return self.fail(a);
                }
            }
            if a.failed.load(Ordering::SeqCst) {
                return;
            }
            match q.enable_notification(&a.mem) {
                Ok(false) => return,
                Ok(true) => {
                    rechecked = true;
                    if q.disable_notification(&a.mem).is_err() {
                        return self.fail(a);
                    }
                }
                Err(_) => return self.fail(a),
            }
        }
    }

    /// Gather one transmit chain and put its frame on the wire; the frame's length.
    fn send(&self, a: &Active, c: &Chain) -> Result<usize, Fail> {
        let len = total(&c.readable);
        if !c.writable.is_empty() || len < HDR_LEN + MIN_FRAME || len > HDR_LEN + self.max_frame() {
            return Err(Fail::Drop);
        }
        let mut buf = vec![0u8; len];
        let mut at = 0;
        for s in &c.readable {
            let n = s.len as usize;
            a.mem
                .device()
                .dma_read(s.addr, &mut buf[at..at + n])
                .map_err(|_| Fail::Fatal)?;
            at += n;
        }
        let frame = &buf[HDR_LEN..];
        match self.wire.send(frame) {
            Ok(()) => Ok(frame.len()),
            Err(e) => {
                tracing::debug!(error = %e, "virtio-net wire send failed");
                Err(Fail::Drop)
            }
        }
    }
}

impl VirtioDevice for VirtioNet {
    fn device_type(&self) -> u16 {
        1
    }
    fn class(&self) -> (u8, u8, u8) {
        (0x02, 0x00, 0x00) // network, Ethernet
    }
    fn features(&self) -> u64 {
        [
            VIRTIO_F_VERSION_1,
            VIRTIO_F_ACCESS_PLATFORM,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_MTU,
            VIRTIO_NET_F_STATUS,
        ]
        .iter()
        .fold(0u64, |f, b| f | 1u64 << b)
    }
    fn num_queues(&self) -> u16 {
        2
    }
    fn queue_max_size(&self) -> u16 {
        QUEUE_MAX_SIZE
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.config_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| c.get(o))
                .copied()
                .unwrap_or(0);
        }
    }
    fn write_config(&self, _offset: u64, _data: &[u8]) {
        // The MAC is writable only with VIRTIO_NET_F_CTRL_MAC_ADDR (legacy); nothing else is.
    }
    fn activate(
        &self,
        _features: u64,
        queues: Vec<Option<Queue>>,
        mem: IommuMemory,
        irq: Arc<Interrupts>,
    ) -> Result<(), EmuError> {
        let mut qs = queues.into_iter().map(|q| q.map(Mutex::new));
        let (rx, tx) = (qs.next().flatten(), qs.next().flatten());
        *self
            .shared
            .active
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(Active {
            rx,
            tx,
            mem,
            irq,
            failed: AtomicBool::new(false),
        });
        // Chains may already be waiting.
        self.queue_notify(TX_QUEUE);
        Ok(())
    }
    fn queue_notify(&self, queue: u16) {
        // Receive buffers are taken when a frame arrives; only transmits need a wake-up.
        if queue == TX_QUEUE {
            lock(&self.shared.kick).pending = true;
            self.shared.kicked.notify_one();
        }
    }
    fn reset(&self) {
        // Waits for both threads to leave the queues (they hold the read side).
        *self
            .shared
            .active
            .write()
            .unwrap_or_else(|p| p.into_inner()) = None;
    }
}

impl Drop for VirtioNet {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // No thread touches the driver's memory from here on.
        *self
            .shared
            .active
            .write()
            .unwrap_or_else(|p| p.into_inner()) = None;
        lock(&self.shared.kick).stop = true;
        self.shared.kicked.notify_all();
        // Wakes the receive thread out of its wait on the wire.
        self.shared.wire.shut_down();
        for h in lock(&self.threads).drain(..) {
            let _ = h.join();
        }
    }
}

/// Fuzz body (the `virtio_net_device` target in `iospace/fuzz`, also run by the unit tests):
/// a hostile driver and a hostile wire at once. The input is a sequence of 12-byte operations
/// `op: u8, a: le16, b: u8, value: le64`: register reads and writes in both BARs, config
/// writes, arbitrary bytes in the four pages the IOMMU maps (rings, descriptors, buffers), a
/// shortcut that brings both queues up (receiveq on page 0, transmitq on page 1), doorbells,
/// unmap/remap of pages while the threads run, frames of any length injected from the wire,
/// and resets. Nothing may panic, in the caller or in the device's threads; returns the
/// frames that reached the wire's far end.
pub fn fuzz_device(data: &[u8]) -> Vec<Vec<u8>> {
    use super::virtio_pci::{common, VirtioPci, MSIX_BAR, NOTIFY_OFFSET, VIRTIO_BAR};
    use super::wire::UdpWire;
    use super::PciDevice;
    use crate::iommu::{DmaPage, Iommu, IommuEntry};
    struct FuzzPage(Mutex<Vec<u8>>);
    impl DmaPage for FuzzPage {
        fn read(&self, offset: usize, buf: &mut [u8]) {
            let p = lock(&self.0);
            if let Some(src) = p.get(offset..offset.saturating_add(buf.len())) {
                buf.copy_from_slice(src);
            }
        }
        fn write(&self, offset: usize, data: &[u8]) {
            let mut p = lock(&self.0);
            if let Some(dst) = p.get_mut(offset..offset.saturating_add(data.len())) {
                dst.copy_from_slice(data);
            }
        }
    }
    let mut out = Vec::new();
    let Ok(far) = std::net::UdpSocket::bind("127.0.0.1:0") else {
        return out;
    };
    let _ = far.set_nonblocking(true);
    let Some(wire) = far
        .local_addr()
        .ok()
        .and_then(|a| UdpWire::bind("127.0.0.1:0".parse().ok()?, Some(a)).ok())
    else {
        return out;
    };
    let Ok(wire_addr) = wire.local_addr() else {
        return out;
    };
    let Ok(net) = VirtioNet::new(NetConfig::new([2, 0, 0, 0, 0, 1], Arc::new(wire))) else {
        return out;
    };
    let iommu = Iommu::new(8);
    let Ok(dev) = VirtioPci::new(Arc::new(net), iommu.device(), 5) else {
        return out;
    };
    let pages: Vec<Arc<FuzzPage>> = (0..4)
        .map(|_| Arc::new(FuzzPage(Mutex::new(vec![0; 4096]))))
        .collect();
    let entry = |i: usize| IommuEntry {
        domain: 1,
        frame: i as u64,
        writable: i != 3,
        page: pages[i].clone(),
    };
    let mut iovas: Vec<Option<u64>> = (0..4).map(|i| iommu.map(entry(i)).ok()).collect();
    let w = |off: u64, v: &[u8]| dev.bar_write(VIRTIO_BAR, off, v);
    let drain = |out: &mut Vec<Vec<u8>>| {
        let mut b = vec![0u8; MAX_WIRE_FRAME];
        while let Ok(n) = far.recv(&mut b) {
            out.push(b[..n].to_vec());
        }
    };
    for op in data.chunks_exact(12) {
        let a = u64::from(u16::from_le_bytes([op[1], op[2]]));
        let width = [1usize, 2, 4, 8][usize::from(op[3] & 3)];
        let mut v = [0u8; 8];
        v.copy_from_slice(&op[4..12]);
        let value = u64::from_le_bytes(v);
        let page = usize::from(op[3] >> 2) % 4;
        match op[0] % 10 {
            0 => w(a % 0x4000, &v[..width]),
            1 => dev.bar_read(VIRTIO_BAR, a % 0x4000, &mut v[..width]),
            2 => dev.bar_write(MSIX_BAR, a % 0x1000, &v[..width]),
            3 => dev.config_write(u16::try_from(a % 256).unwrap_or(0), &v[..width.min(4)]),
            4 => pages[page].write(usize::try_from(a).unwrap_or(0) % (4096 - 8), &v),
            5 => {
                w(common::DEVICE_STATUS, &[0]);
                w(common::DEVICE_STATUS, &[3]);
                w(common::DRIVER_FEATURE_SELECT, &1u32.to_le_bytes());
                w(common::DRIVER_FEATURE, &3u32.to_le_bytes());
                w(common::DEVICE_STATUS, &[11]);
                for q in 0..2u16 {
                    let ring = iovas[usize::from(q)].unwrap_or(0);
                    let size = u16::try_from(value >> (16 * q) & 0x1ff).unwrap_or(8);
                    w(common::QUEUE_SELECT, &q.to_le_bytes());
                    w(common::QUEUE_SIZE, &size.to_le_bytes());
                    w(common::QUEUE_DESC, &ring.to_le_bytes());
                    w(common::QUEUE_DRIVER, &(ring + 1024).to_le_bytes());
                    w(common::QUEUE_DEVICE, &(ring + 2048).to_le_bytes());
                    w(common::QUEUE_ENABLE, &1u16.to_le_bytes());
                }
                w(common::DEVICE_STATUS, &[15]);
            }
            6 => {
                let q = u16::from(op[3] & 1);
                w(NOTIFY_OFFSET + 4 * u64::from(q), &q.to_le_bytes());
            }
            7 => match iovas[page].take() {
                Some(iova) => {
                    let _ = iommu.unmap(iova);
                }
                None => iovas[page] = iommu.map(entry(page)).ok(),
            },
            8 => {
                let len = usize::try_from(value % 1600).unwrap_or(0);
                let frame: Vec<u8> = (0..len).map(|i| op[4 + i % 8]).collect();
                let _ = far.send_to(&frame, wire_addr);
            }
            _ => w(common::DEVICE_STATUS, &[0]),
        }
        drain(&mut out);
    }
    // After a reset nothing may be in flight.
    w(common::DEVICE_STATUS, &[0]);
    drain(&mut out);
    out
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // small test patterns
mod tests {
    use super::super::virtio_pci::{
        common, VirtioPci, DEVICE_CFG_OFFSET, NOTIFY_OFFSET, VIRTIO_BAR,
    };
    use super::super::wire::UdpWire;
    use super::super::PciDevice;
    use super::*;
    use crate::iommu::{DmaPage, Iommu, IommuEntry};
    use std::net::UdpSocket;
    use std::time::Instant;
    use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

    const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x42];
    const QSIZE: u16 = 8;
    #[allow(clippy::cast_possible_truncation)]
    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    #[allow(clippy::cast_possible_truncation)]
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;

    struct Page(Mutex<Vec<u8>>);
    impl DmaPage for Page {
        fn read(&self, offset: usize, buf: &mut [u8]) {
            buf.copy_from_slice(&self.0.lock().unwrap()[offset..offset + buf.len()]);
        }
        fn write(&self, offset: usize, data: &[u8]) {
            self.0.lock().unwrap()[offset..offset + data.len()].copy_from_slice(data);
        }
    }

    /// A minimal driver: pages 0 and 1 hold the receive and transmit queues (descriptors at
    /// 0, available ring at 1024, used ring at 2048), pages 2.. hold buffers.
    struct Rig {
        dev: VirtioPci<VirtioNet>,
        iommu: Arc<Iommu>,
        pages: Vec<Arc<Page>>,
        iovas: Vec<u64>,
        far: UdpSocket,
        wire_addr: std::net::SocketAddr,
        avail: [u16; 2],
        seen: [u16; 2],
    }

    fn rig() -> Rig {
        let far = UdpSocket::bind("127.0.0.1:0").unwrap();
        far.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let wire = UdpWire::bind(
            "127.0.0.1:0".parse().unwrap(),
            Some(far.local_addr().unwrap()),
        )
        .unwrap();
        let wire_addr = wire.local_addr().unwrap();
        let net = VirtioNet::new(NetConfig::new(MAC, Arc::new(wire))).unwrap();
        let iommu = Iommu::new(16);
        let dev = VirtioPci::new(Arc::new(net), iommu.device(), 5).unwrap();
        let pages: Vec<Arc<Page>> = (0..8)
            .map(|_| Arc::new(Page(Mutex::new(vec![0; 4096]))))
            .collect();
        let iovas = pages
            .iter()
            .enumerate()
            .map(|(i, p)| {
                iommu
                    .map(IommuEntry {
                        domain: 1,
                        frame: i as u64,
                        writable: true,
                        page: p.clone(),
                    })
                    .unwrap()
            })
            .collect();
        Rig {
            dev,
            iommu,
            pages,
            iovas,
            far,
            wire_addr,
            avail: [0; 2],
            seen: [0; 2],
        }
    }

    impl Rig {
        fn w(&self, off: u64, v: &[u8]) {
            self.dev.bar_write(VIRTIO_BAR, off, v);
        }
        fn status(&self) -> u8 {
            self.dev.device_status()
        }
        fn start(&mut self) {
            self.avail = [0; 2];
            self.seen = [0; 2];
            for p in &self.pages[..2] {
                p.0.lock().unwrap().fill(0);
            }
            self.w(common::DEVICE_STATUS, &[0]);
            self.w(common::DEVICE_STATUS, &[3]);
            let f = self.dev.device().features();
            for sel in 0..2u32 {
                self.w(common::DRIVER_FEATURE_SELECT, &sel.to_le_bytes());
                let half = u32::try_from(f >> (32 * sel) & 0xffff_ffff).unwrap();
                self.w(common::DRIVER_FEATURE, &half.to_le_bytes());
            }
            self.w(common::DEVICE_STATUS, &[11]);
            for q in 0..2u16 {
                let r = self.iovas[usize::from(q)];
                self.w(common::QUEUE_SELECT, &q.to_le_bytes());
                self.w(common::QUEUE_SIZE, &QSIZE.to_le_bytes());
                self.w(common::QUEUE_DESC, &r.to_le_bytes());
                self.w(common::QUEUE_DRIVER, &(r + 1024).to_le_bytes());
                self.w(common::QUEUE_DEVICE, &(r + 2048).to_le_bytes());
                self.w(common::QUEUE_ENABLE, &1u16.to_le_bytes());
            }
            self.w(common::DEVICE_STATUS, &[15]);
            assert_eq!(self.status(), 15);
        }
        /// Put a chain of `(iova, len, writable)` on queue `q` (descriptors from 0) and notify.
        fn chain(&mut self, q: u16, first: u16, bufs: &[(u64, u32, bool)]) {
            let ring = &self.pages[usize::from(q)];
            for (k, (addr, len, wr)) in bufs.iter().enumerate() {
                let i = first + u16::try_from(k).unwrap();
                let mut flags = if *wr { WRITE } else { 0 };
                if k + 1 < bufs.len() {
                    flags |= NEXT;
                }
                let mut d = [0u8; 16];
                d[..8].copy_from_slice(&addr.to_le_bytes());
                d[8..12].copy_from_slice(&len.to_le_bytes());
                d[12..14].copy_from_slice(&flags.to_le_bytes());
                d[14..].copy_from_slice(&(i + 1).to_le_bytes());
                ring.write(usize::from(i) * 16, &d);
            }
            let a = &mut self.avail[usize::from(q)];
            ring.write(1024 + 4 + 2 * usize::from(*a % QSIZE), &first.to_le_bytes());
            *a = a.wrapping_add(1);
            ring.write(1024 + 2, &a.to_le_bytes());
            self.w(NOTIFY_OFFSET + 4 * u64::from(q), &q.to_le_bytes());
        }
        /// Wait for the next used element of queue `q`: `(id, len)`.
        fn used(&mut self, q: u16) -> (u32, u32) {
            let ring = &self.pages[usize::from(q)];
            let end = Instant::now() + Duration::from_secs(10);
            let mut idx = [0u8; 2];
            while Instant::now() < end {
                ring.read(2048 + 2, &mut idx);
                if u16::from_le_bytes(idx) != self.seen[usize::from(q)] {
                    let mut e = [0u8; 8];
                    let s = self.seen[usize::from(q)];
                    ring.read(2048 + 4 + 8 * usize::from(s % QSIZE), &mut e);
                    self.seen[usize::from(q)] = s.wrapping_add(1);
                    return (
                        u32::from_le_bytes(e[..4].try_into().unwrap()),
                        u32::from_le_bytes(e[4..].try_into().unwrap()),
                    );
                }
                std::thread::yield_now();
            }
            panic!("queue {q} used nothing");
        }
        fn stats_until(&self, f: impl Fn(&NetDevStats) -> bool) -> NetDevStats {
            let end = Instant::now() + Duration::from_secs(10);
            loop {
                let s = self.dev.device().stats();
                if f(&s) || Instant::now() > end {
                    return s;
                }
                std::thread::yield_now();
            }
        }
    }

    fn frame(len: usize, seed: u8) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 0x42, 0x02, 0, 0, 0, 0, 0x01, 0x08, 0x00];
        f.extend((0..len - 14).map(|i| (i as u8).wrapping_mul(31) ^ seed));
        f
    }

    #[test]
    fn config_space_and_features() {
        let r = rig();
        let mut c = [0u8; 12];
        r.dev.bar_read(VIRTIO_BAR, DEVICE_CFG_OFFSET, &mut c[..8]);
        r.dev
            .bar_read(VIRTIO_BAR, DEVICE_CFG_OFFSET + 8, &mut c[8..]);
        assert_eq!(&c[..6], &MAC);
        assert_eq!(u16::from_le_bytes([c[6], c[7]]), 1, "link up");
        assert_eq!(u16::from_le_bytes([c[8], c[9]]), 1);
        assert_eq!(u16::from_le_bytes([c[10], c[11]]), 1500);
        let f = r.dev.device().features();
        for b in [VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU, VIRTIO_F_ACCESS_PLATFORM] {
            assert_ne!(f & 1 << b, 0);
        }
        assert!(r.dev.device().describe_wire().starts_with("udp "));
        assert_eq!(r.dev.device().wire_addr(), Some(r.wire_addr));
        let bad = |mtu, mac: [u8; 6]| {
            let w = Arc::new(UdpWire::bind("127.0.0.1:0".parse().unwrap(), None).unwrap());
            VirtioNet::new(NetConfig { mac, wire: w, mtu }).is_err()
        };
        assert!(bad(20, MAC));
        assert!(bad(1500, [1, 0, 0, 0, 0, 0]));
    }

    #[test]
    fn transmit_gathers_a_chain_across_pages_onto_the_wire() {
        let mut r = rig();
        r.start();
        let f = frame(1514, 7);
        // Header at the end of page 2, the frame split over pages 2 and 3.
        r.pages[2].write(4096 - 12 - 100, &[0; 12]);
        r.pages[2].write(4096 - 100, &f[..100]);
        r.pages[3].write(0, &f[100..]);
        let (p2, p3) = (r.iovas[2], r.iovas[3]);
        r.chain(
            TX_QUEUE,
            0,
            &[
                (p2 + 4096 - 112, 12, false),
                (p2 + 4096 - 100, 100, false),
                (p3, 1414, false),
            ],
        );
        assert_eq!(r.used(TX_QUEUE), (0, 0));
        let mut got = [0u8; 2048];
        let (n, from) = r.far.recv_from(&mut got).unwrap();
        assert_eq!(from, r.wire_addr);
        assert_eq!(&got[..n], &f[..]);
        // Malformed chains come back unsent: a writable descriptor, a runt, an oversize.
        r.chain(TX_QUEUE, 0, &[(p2, 12, false), (p3, 60, true)]);
        r.chain(TX_QUEUE, 2, &[(p2, 12 + 13, false)]);
        r.chain(TX_QUEUE, 3, &[(p2, 12 + 1519, false)]);
        for head in [0, 2, 3] {
            assert_eq!(r.used(TX_QUEUE), (head, 0));
        }
        let s = r.dev.device().stats();
        assert_eq!((s.tx_frames, s.tx_bytes, s.tx_dropped), (1, 1514, 3));
        assert_eq!(
            r.status(),
            15,
            "dropping a bad frame does not fail the device"
        );
    }

    #[test]
    fn receive_fills_posted_buffers_and_counts_drops() {
        let mut r = rig();
        r.start();
        // No buffer posted: dropped and counted.
        r.far.send_to(&frame(60, 1), r.wire_addr).unwrap();
        r.stats_until(|s| s.rx_no_buffer == 1);
        // A buffer split over two pages.
        let (p4, p5) = (r.iovas[4], r.iovas[5]);
        r.chain(RX_QUEUE, 0, &[(p4 + 4000, 96, true), (p5, 4096, true)]);
        let f = frame(1000, 2);
        r.far.send_to(&f, r.wire_addr).unwrap();
        assert_eq!(r.used(RX_QUEUE), (0, 1012));
        let mut got = vec![0u8; 1012];
        r.pages[4].read(4000, &mut got[..96]);
        r.pages[5].read(0, &mut got[96..]);
        let mut hdr = [0u8; 12];
        hdr[10] = 1; // num_buffers
        assert_eq!(&got[..12], &hdr);
        assert_eq!(&got[12..], &f[..]);
        // Too long for the MTU: dropped; too long for the posted buffer: dropped, buffer kept.
        r.chain(RX_QUEUE, 2, &[(p4, 12 + 100, true)]);
        r.far.send_to(&frame(1519, 3), r.wire_addr).unwrap();
        r.far.send_to(&frame(101, 3), r.wire_addr).unwrap();
        r.stats_until(|s| s.rx_dropped == 2);
        let small = frame(100, 4);
        r.far.send_to(&small, r.wire_addr).unwrap();
        assert_eq!(r.used(RX_QUEUE), (2, 112));
        let s = r.stats_until(|s| s.rx_frames == 2);
        assert_eq!(
            (s.rx_frames, s.rx_bytes, s.rx_no_buffer, s.rx_dropped),
            (2, 1100, 1, 2)
        );
    }

    #[test]
    fn faults_need_reset_and_reset_frees_the_queues() {
        let mut r = rig();
        r.start();
        // A transmit descriptor pointing at an unmapped IOVA fails the device.
        let hole = r.iovas[7] + 4096 * 64;
        r.chain(TX_QUEUE, 0, &[(hole, 74, false)]);
        r.stats_until(|s| s.failures == 1);
        assert_ne!(
            r.status() & u8::try_from(VIRTIO_CONFIG_S_NEEDS_RESET).unwrap(),
            0
        );
        // A readable receive buffer fails it too (after a reset and a fresh start).
        r.start();
        r.chain(RX_QUEUE, 0, &[(r.iovas[4], 2048, false)]);
        r.far.send_to(&frame(60, 5), r.wire_addr).unwrap();
        r.stats_until(|s| s.failures == 2);
        assert_ne!(r.status() & 0x40, 0);
        // Reset: the posted buffers are forgotten, frames are dropped, nothing is written.
        r.w(common::DEVICE_STATUS, &[0]);
        r.pages[4].write(0, &[0xee; 64]);
        r.far.send_to(&frame(60, 6), r.wire_addr).unwrap();
        let s = r.stats_until(|s| s.rx_no_buffer == 1);
        assert_eq!(s.rx_no_buffer, 1);
        let mut b = [0u8; 64];
        r.pages[4].read(0, &mut b);
        assert_eq!(b, [0xee; 64]);
        // And the device works again after a new start.
        r.start();
        r.chain(RX_QUEUE, 0, &[(r.iovas[4], 2048, true)]);
        r.far.send_to(&frame(60, 7), r.wire_addr).unwrap();
        assert_eq!(r.used(RX_QUEUE), (0, 72));
        assert!(r.iommu.len() >= 8);
    }

    #[test]
    fn fuzz_body_survives_pseudo_random_inputs() {
        // Seed: both queues up (size 8), a 60-byte frame on the transmitq (header at page 2
        // offset 0, frame after it), the doorbell; checked to reach the wire, then mutated.
        let iova = crate::iommu::IOVA_BASE;
        let op = |code: u8, a: u16, b: u8, v: u64| {
            let mut o = vec![code];
            o.extend_from_slice(&a.to_le_bytes());
            o.push(b);
            o.extend_from_slice(&v.to_le_bytes());
            o
        };
        let mut base = op(5, 0, 0, 8 | 8 << 16);
        // Page 1 (transmitq): descriptor 0 = {page 2, 72 bytes}, available ring [0], idx 1.
        base.extend(op(4, 0, 1 << 2, iova + 2 * 4096));
        base.extend(op(4, 8, 1 << 2, 72));
        base.extend(op(4, 1024, 1 << 2, 1 << 16));
        for k in 0..8u16 {
            base.extend(op(4, 12 + 8 * k, 2 << 2, 0x0102_0304_0506_0708));
        }
        base.extend(op(6, 0, 1, 0));
        let mut got = Vec::new();
        let end = Instant::now() + Duration::from_secs(10);
        while got.is_empty() && Instant::now() < end {
            got = fuzz_device(&base);
        }
        assert_eq!(got.len(), 1, "the seed transmit did not reach the wire");
        assert_eq!(got[0].len(), 60);
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for round in 0..48usize {
            let mut d = base.clone();
            for _ in 0..(round % 8 + 1) * 12 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let b = x.to_le_bytes();
                if b[1] & 1 == 0 {
                    let i = usize::from(b[2]) % d.len();
                    d[i] = b[0];
                } else {
                    d.push(b[0]);
                }
            }
            fuzz_device(&d);
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]
        #[test]
        fn arbitrary_operation_sequences_never_panic(
            data in proptest::collection::vec(proptest::num::u8::ANY, 0..360)
        ) {
            fuzz_device(&data);
        }
    }

    #[test]
    fn an_available_index_far_ahead_fails_the_device_instead_of_spinning() {
        let mut r = rig();
        r.start();
        // avail.idx = 1000 with a queue of 8: chains that cannot exist.
        r.pages[1].write(1024 + 2, &1000u16.to_le_bytes());
        r.w(NOTIFY_OFFSET + 4, &1u16.to_le_bytes());
        let s = r.stats_until(|s| s.failures == 1);
        assert_eq!(s.failures, 1);
        assert_ne!(r.status() & 0x40, 0);
        // The same on the receive queue, found when a frame arrives.
        r.start();
        r.pages[0].write(1024 + 2, &1000u16.to_le_bytes());
        r.far.send_to(&frame(60, 1), r.wire_addr).unwrap();
        let s = r.stats_until(|s| s.failures == 2);
        assert_eq!(s.failures, 2);
    }

    #[test]
    fn after_reset_returns_no_thread_touches_the_rings() {
        let mut r = rig();
        for round in 0..20u8 {
            r.start();
            let p2 = r.iovas[2];
            r.pages[2].write(12, &frame(60, round));
            // A full transmit ring and a posted receive buffer with frames arriving.
            for i in 0..QSIZE {
                r.chain(TX_QUEUE, i, &[(p2, 72, false)]);
            }
            r.chain(RX_QUEUE, 0, &[(r.iovas[4], 2048, true)]);
            r.far.send_to(&frame(60, round), r.wire_addr).unwrap();
            r.w(common::DEVICE_STATUS, &[0]);
            // Once reset has returned, the rings are the driver's alone.
            for q in 0..2 {
                r.pages[q].write(2048, &[0xee; 64]);
            }
            r.pages[4].write(0, &[0xee; 64]);
            r.far.send_to(&frame(60, round), r.wire_addr).unwrap();
            std::thread::yield_now();
            for page in [0, 1, 4] {
                let mut b = [0u8; 64];
                r.pages[page].read(if page == 4 { 0 } else { 2048 }, &mut b);
                assert_eq!(b, [0xee; 64], "page {page} written after reset");
            }
        }
    }
}
