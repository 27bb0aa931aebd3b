//! virtio-blk: a block device model over a raw image file.
//!
//! # Requests (virtio 1.2 §5.2.6)
//!
//! A request is one descriptor chain: device-readable buffers first, then device-writable
//! ones. Read as byte streams:
//!
//! | stream | bytes | content |
//! |---|---|---|
//! | readable | 0..16 | header: `type: le32`, `reserved: le32`, `sector: le64` |
//! | readable | 16.. | `OUT` data; for `DISCARD`/`WRITE_ZEROES` one segment `{sector: le64, num_sectors: le32, flags: le32}` |
//! | writable | ..len−1 | `IN` data, or the 20-byte id for `GET_ID` |
//! | writable | last byte | status: `OK` 0, `IOERR` 1, `UNSUPP` 2 |
//!
//! Supported: `IN`, `OUT`, `FLUSH`, `GET_ID`, `DISCARD` (implemented by writing zeroes),
//! `WRITE_ZEROES`. Sectors are 512 bytes; data lengths must be whole sectors and the range
//! must fit the disk, else `IOERR`; a request over [`MAX_REQUEST_BYTES`] is `IOERR`.
//!
//! # Execution
//!
//! The notify path (the driver's MMIO write) pops chains with `virtio-queue`, copies the
//! header out of DMA memory, validates it, and hands the request to a small pool of worker
//! threads, which move the data between the IOMMU pages and the file with `pread`/`pwrite`,
//! write the status byte, put the chain on the used ring and signal the queue's MSI-X vector
//! (an eventfd). A thread pool rather than io_uring: every byte crosses the IOMMU by copy
//! (`IommuDevice::dma_read`/`dma_write` under its lock) so io_uring's zero-copy gains nothing,
//! io_uring is often disabled by container and seccomp policies the IDD runs under, and
//! plain threads need no extra crate or kernel feature.
//!
//! Reset: requests carry the reset generation they were popped in. A device reset bumps the
//! generation and then waits until no request is in flight; a request that a worker picks up
//! after the bump is dropped without any DMA. So once reset returns, the device touches none
//! of the driver's memory until it is activated again.
//!
//! # Failure
//!
//! An IOMMU fault anywhere (ring, descriptor, header, data or status address unmapped or
//! read-only), or a chain with no writable status byte, marks the device
//! `DEVICE_NEEDS_RESET`: it raises the config interrupt and processes nothing more until the
//! driver resets it. Nothing a driver writes can panic the device.

use super::interrupts::Interrupts;
use super::mem::IommuMemory;
use super::virtio_pci::VirtioDevice;
use super::{lock, EmuError};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::{VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1};
use virtio_queue::{Queue, QueueT};

/// Bytes per sector.
pub const SECTOR_SIZE: u64 = 512;
/// Largest data transfer of one request.
pub const MAX_REQUEST_BYTES: u64 = 4 << 20;
/// Queue size offered.
pub const QUEUE_MAX_SIZE: u16 = 256;
/// Segments per request offered (`seg_max`).
pub const SEG_MAX: u32 = 128;
/// Length of the request header.
pub const HEADER_LEN: u64 = 16;
/// Length of a discard/write-zeroes segment.
pub const DWZ_SEGMENT_LEN: u64 = 16;
/// Bytes of zeroes written per `pwrite` for discard/write-zeroes.
const ZERO_CHUNK: usize = 64 << 10;
/// Largest discard/write-zeroes range in sectors.
pub const MAX_DWZ_SECTORS: u32 = 1 << 16;

/// `struct virtio_blk_config` offsets.
pub mod cfg {
    /// le64 capacity in sectors.
    pub const CAPACITY: usize = 0;
    /// le32 most segments per request.
    pub const SEG_MAX: usize = 12;
    /// le32 logical block size.
    pub const BLK_SIZE: usize = 20;
    /// le16 number of queues.
    pub const NUM_QUEUES: usize = 34;
    /// le32 max discard sectors.
    pub const MAX_DISCARD_SECTORS: usize = 36;
    /// le32 max discard segments.
    pub const MAX_DISCARD_SEG: usize = 40;
    /// le32 discard sector alignment.
    pub const DISCARD_SECTOR_ALIGNMENT: usize = 44;
    /// le32 max write-zeroes sectors.
    pub const MAX_WRITE_ZEROES_SECTORS: usize = 48;
    /// le32 max write-zeroes segments.
    pub const MAX_WRITE_ZEROES_SEG: usize = 52;
    /// Length of the structure.
    pub const LEN: usize = 60;
}

/// How to build the device.
#[derive(Clone, Debug)]
pub struct BlkConfig {
    /// Image file (created at `size` bytes if missing; an existing file keeps its size).
    pub path: PathBuf,
    /// Size for a new image, in bytes (a multiple of 512).
    pub size: u64,
    /// Refuse writes.
    pub read_only: bool,
    /// Serial number returned by `GET_ID` (up to 20 bytes).
    pub serial: String,
    /// Worker threads.
    pub workers: usize,
}

/// A buffer in DMA space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Seg {
    addr: u64,
    len: u64,
}

/// Take `len` bytes starting `skip` bytes into a list of segments.
fn sub(segs: &[Seg], mut skip: u64, mut len: u64) -> Vec<Seg> {
    let mut out = Vec::new();
    for s in segs {
        if len == 0 {
            break;
        }
        if skip >= s.len {
            skip -= s.len;
            continue;
        }
        let n = (s.len - skip).min(len);
        out.push(Seg {
            addr: s.addr.saturating_add(skip),
            len: n,
        });
        skip = 0;
        len -= n;
    }
    out
}

fn total(segs: &[Seg]) -> u64 {
    segs.iter().fold(0u64, |a, s| a.saturating_add(s.len))
}

/// Why a request failed: answered with a status, or fatal to the device.
enum Fail {
    Status(u32),
    Fatal,
}

/// A validated request, copied out of DMA memory.
struct Request {
    queue: u16,
    head: u16,
    kind: u32,
    sector: u64,
    readable: Vec<Seg>,
    writable: Vec<Seg>,
    status: u64,
    generation: u64,
}

struct Active {
    queues: Vec<Option<Arc<Mutex<Queue>>>>,
    mem: IommuMemory,
    irq: Arc<Interrupts>,
}

struct Shared {
    file: File,
    capacity: u64,
    read_only: bool,
    id: [u8; 20],
    generation: AtomicU64,
    active: Mutex<Option<Active>>,
    /// Requests handed to the workers and not finished.
    inflight: Mutex<u64>,
    idle: Condvar,
}

/// The virtio-blk device model.
pub struct VirtioBlk {
    shared: Arc<Shared>,
    pool: Mutex<Option<mpsc::Sender<Request>>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    completed: Arc<AtomicU64>,
}

impl VirtioBlk {
    /// Open (or create) the image and start the workers.
    pub fn new(config: &BlkConfig) -> Result<Self, EmuError> {
        if config.size % SECTOR_SIZE != 0 || config.workers == 0 || config.workers > 64 {
            return Err(EmuError::Config(
                "size must be whole sectors, workers 1..=64",
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!config.read_only)
            .create(!config.read_only)
            .truncate(false)
            .open(&config.path)
            .map_err(EmuError::Media)?;
        let mut len = file.metadata().map_err(EmuError::Media)?.len();
        if len == 0 && !config.read_only {
            file.set_len(config.size).map_err(EmuError::Media)?;
            len = config.size;
        }
        let mut id = [0u8; 20];
        let s = config.serial.as_bytes();
        id[..s.len().min(20)].copy_from_slice(&s[..s.len().min(20)]);
        let shared = Arc::new(Shared {
            file,
            capacity: len / SECTOR_SIZE,
            read_only: config.read_only,
            id,
            generation: AtomicU64::new(0),
            active: Mutex::new(None),
            inflight: Mutex::new(0),
            idle: Condvar::new(),
        });
        let (tx, rx) = mpsc::channel::<Request>();
        let rx = Arc::new(Mutex::new(rx));
        let completed = Arc::new(AtomicU64::new(0));
        let mut workers = Vec::new();
        for i in 0..config.workers {
            let (rx, sh, done) = (rx.clone(), shared.clone(), completed.clone());
            let h = std::thread::Builder::new()
                .name(format!("virtio-blk-{i}"))
                .spawn(move || loop {
                    let req = lock(&rx).recv();
                    match req {
                        Ok(r) => {
                            sh.execute(r);
                            done.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(_) => return,
                    }
                })
                .map_err(EmuError::Resource)?;
            workers.push(h);
        }
        Ok(Self {
            shared,
            pool: Mutex::new(Some(tx)),
            workers: Mutex::new(workers),
            completed,
        })
    }

    /// Capacity in sectors.
    pub fn capacity(&self) -> u64 {
        self.shared.capacity
    }

    /// Requests the workers have finished (answered or failed).
    pub fn completed(&self) -> u64 {
        self.completed.load(Ordering::SeqCst)
    }

    fn config_bytes(&self) -> [u8; cfg::LEN] {
        let mut c = [0u8; cfg::LEN];
        let mut put = |at: usize, b: &[u8]| c[at..at + b.len()].copy_from_slice(b);
        put(cfg::CAPACITY, &self.shared.capacity.to_le_bytes());
        put(cfg::SEG_MAX, &SEG_MAX.to_le_bytes());
        put(
            cfg::BLK_SIZE,
            &u32::try_from(SECTOR_SIZE).unwrap_or(512).to_le_bytes(),
        );
        put(cfg::NUM_QUEUES, &1u16.to_le_bytes());
        put(cfg::MAX_DISCARD_SECTORS, &MAX_DWZ_SECTORS.to_le_bytes());
        put(cfg::MAX_DISCARD_SEG, &1u32.to_le_bytes());
        put(cfg::DISCARD_SECTOR_ALIGNMENT, &1u32.to_le_bytes());
        put(
            cfg::MAX_WRITE_ZEROES_SECTORS,
            &MAX_DWZ_SECTORS.to_le_bytes(),
        );
        put(cfg::MAX_WRITE_ZEROES_SEG, &1u32.to_le_bytes());
        c
    }

    /// Pop every available chain of `queue`, validate it and queue it for the workers.
    fn drain(&self, queue: u16) -> Result<(), ()> {
        let act = lock(&self.shared.active);
        let Some(a) = act.as_ref() else { return Ok(()) };
        let Some(Some(q)) = a.queues.get(usize::from(queue)) else {
            return Ok(());
        };
        let generation = self.shared.generation.load(Ordering::SeqCst);
        let tx = lock(&self.pool).clone();
        let mut q = lock(q);
        loop {
            let faults = a.mem.faults();
            let Some(chain) = q.pop_descriptor_chain(&a.mem) else {
                return if a.mem.faults() == faults {
                    Ok(())
                } else {
                    Err(())
                };
            };
            let head = chain.head_index();
            let mut readable = Vec::new();
            let mut writable = Vec::new();
            for d in chain {
                let seg = Seg {
                    addr: d.addr().0,
                    len: u64::from(d.len()),
                };
                if d.is_write_only() {
                    writable.push(seg);
                } else if writable.is_empty() {
                    readable.push(seg);
                } else {
                    return Err(()); // readable after writable: malformed chain
                }
            }
            if a.mem.faults() != faults {
                return Err(());
            }
            let req = parse(&a.mem, queue, head, readable, writable, generation)?;
            let Some(tx) = &tx else { return Err(()) };
            *lock(&self.shared.inflight) += 1;
            if tx.send(req).is_err() {
                self.shared.finished();
                return Err(());
            }
        }
    }
}

/// Copy the header out and build the request; the status byte must exist.
fn parse(
    mem: &IommuMemory,
    queue: u16,
    head: u16,
    readable: Vec<Seg>,
    writable: Vec<Seg>,
    generation: u64,
) -> Result<Request, ()> {
    let wlen = total(&writable);
    if wlen == 0 {
        return Err(());
    }
    let status = sub(&writable, wlen - 1, 1)
        .first()
        .map(|s| s.addr)
        .ok_or(())?;
    let writable = sub(&writable, 0, wlen - 1);
    let mut hdr = [0u8; 16];
    let (kind, sector) = if total(&readable) >= HEADER_LEN {
        let mut at = 0;
        for s in sub(&readable, 0, HEADER_LEN) {
            let n = usize::try_from(s.len).map_err(|_| ())?;
            mem.device()
                .dma_read(s.addr, &mut hdr[at..at + n])
                .map_err(|_| ())?;
            at += n;
        }
        let mut t = [0u8; 4];
        t.copy_from_slice(&hdr[0..4]);
        let mut sct = [0u8; 8];
        sct.copy_from_slice(&hdr[8..16]);
        (u32::from_le_bytes(t), u64::from_le_bytes(sct))
    } else {
        (u32::MAX, 0) // no header: answered with UNSUPP
    };
    let rlen = total(&readable);
    Ok(Request {
        queue,
        head,
        kind,
        sector,
        readable: sub(&readable, HEADER_LEN, rlen.saturating_sub(HEADER_LEN)),
        writable,
        status,
        generation,
    })
}

impl Shared {
    fn range(&self, sector: u64, bytes: u64) -> Result<u64, Fail> {
        let io = Fail::Status(VIRTIO_BLK_S_IOERR);
        if bytes % SECTOR_SIZE != 0 || bytes > MAX_REQUEST_BYTES {
            return Err(io);
        }
        let end = sector
            .checked_add(bytes / SECTOR_SIZE)
            .ok_or(Fail::Status(VIRTIO_BLK_S_IOERR))?;
        if end > self.capacity {
            return Err(io);
        }
        Ok(sector * SECTOR_SIZE)
    }

    fn run(&self, mem: &IommuMemory, r: &Request) -> Result<u32, Fail> {
        let dev = mem.device();
        let ioerr = |_| Fail::Status(VIRTIO_BLK_S_IOERR);
        match r.kind {
            VIRTIO_BLK_T_IN => {
                let len = total(&r.writable);
                let off = self.range(r.sector, len)?;
                let mut buf = vec![0u8; usize::try_from(len).map_err(|_| Fail::Fatal)?];
                read_full(&self.file, &mut buf, off).map_err(ioerr)?;
                scatter(dev, &r.writable, &buf)?;
                Ok(u32::try_from(len).unwrap_or(0))
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    return Err(Fail::Status(VIRTIO_BLK_S_IOERR));
                }
                let len = total(&r.readable);
                let off = self.range(r.sector, len)?;
                let buf = gather(dev, &r.readable, len)?;
                self.file.write_all_at(&buf, off).map_err(ioerr)?;
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => self.file.sync_data().map(|()| 0).map_err(ioerr),
            VIRTIO_BLK_T_GET_ID => {
                let n = total(&r.writable).min(u64::from(VIRTIO_BLK_ID_BYTES));
                let id = &self.id[..usize::try_from(n).unwrap_or(0)];
                scatter(dev, &sub(&r.writable, 0, n), id)?;
                Ok(u32::try_from(n).unwrap_or(0))
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                if self.read_only {
                    return Err(Fail::Status(VIRTIO_BLK_S_IOERR));
                }
                if total(&r.readable) != DWZ_SEGMENT_LEN {
                    return Err(Fail::Status(VIRTIO_BLK_S_UNSUPP));
                }
                let seg = gather(dev, &r.readable, DWZ_SEGMENT_LEN)?;
                let mut s = [0u8; 8];
                s.copy_from_slice(&seg[0..8]);
                let mut n = [0u8; 4];
                n.copy_from_slice(&seg[8..12]);
                let mut f = [0u8; 4];
                f.copy_from_slice(&seg[12..16]);
                let (sector, num, flags) = (
                    u64::from_le_bytes(s),
                    u32::from_le_bytes(n),
                    u32::from_le_bytes(f),
                );
                // flags bit 0 (unmap) is allowed for WRITE_ZEROES only; other bits reserved.
                let allowed = if r.kind == VIRTIO_BLK_T_WRITE_ZEROES {
                    1
                } else {
                    0
                };
                if flags & !allowed != 0 || num > MAX_DWZ_SECTORS {
                    return Err(Fail::Status(VIRTIO_BLK_S_UNSUPP));
                }
                let bytes = u64::from(num) * SECTOR_SIZE;
                let off = self.range(sector, bytes)?;
                // Zero in bounded chunks: the range may be up to 32 MiB.
                let zeros = [0u8; ZERO_CHUNK];
                let mut done = 0u64;
                while done < bytes {
                    let n = (bytes - done).min(ZERO_CHUNK as u64);
                    let n = usize::try_from(n).map_err(|_| Fail::Fatal)?;
                    self.file
                        .write_all_at(&zeros[..n], off + done)
                        .map_err(ioerr)?;
                    done += n as u64;
                }
                Ok(0)
            }
            _ => Err(Fail::Status(VIRTIO_BLK_S_UNSUPP)),
        }
    }

    fn finished(&self) {
        let mut n = lock(&self.inflight);
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.idle.notify_all();
        }
    }

    /// Worker side of one request.
    fn execute(&self, r: Request) {
        self.execute_inner(r);
        self.finished();
    }

    fn execute_inner(&self, r: Request) {
        if self.generation.load(Ordering::SeqCst) != r.generation {
            return; // popped before a reset: drop it untouched
        }
        let (mem, irq, queue) = {
            let act = lock(&self.active);
            let Some(a) = act.as_ref() else { return };
            let Some(Some(q)) = a.queues.get(usize::from(r.queue)) else {
                return;
            };
            (a.mem.clone(), a.irq.clone(), q.clone())
        };
        let (status, used) = match self.run(&mem, &r) {
            Ok(n) => (VIRTIO_BLK_S_OK, n),
            Err(Fail::Status(s)) => (s, 0),
            Err(Fail::Fatal) => return irq.needs_reset(),
        };
        let st = [u8::try_from(status).unwrap_or(1)];
        if mem.device().dma_write(r.status, &st).is_err() {
            return irq.needs_reset();
        }
        let mut q = lock(&queue);
        // A reset since the request was popped: its queue is gone, do not touch the new one.
        if self.generation.load(Ordering::SeqCst) != r.generation {
            return;
        }
        let faults = mem.faults();
        let ok = q.add_used(&mem, r.head, used.saturating_add(1)).is_ok();
        let notify = ok && q.needs_notification(&mem).unwrap_or(true);
        drop(q);
        if !ok || mem.faults() != faults {
            return irq.needs_reset();
        }
        if notify {
            irq.signal_queue(r.queue);
        }
    }
}

/// `pread` the whole buffer; bytes past the end of the file read as zero.
fn read_full(file: &File, buf: &mut [u8], off: u64) -> std::io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        match file.read_at(&mut buf[at..], off + at as u64) {
            Ok(0) => {
                buf[at..].fill(0);
                break;
            }
            Ok(n) => at += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn gather(dev: &crate::iommu::IommuDevice, segs: &[Seg], len: u64) -> Result<Vec<u8>, Fail> {
    let mut buf = vec![0u8; usize::try_from(len).map_err(|_| Fail::Fatal)?];
    let mut at = 0usize;
    for s in sub(segs, 0, len) {
        let n = usize::try_from(s.len).map_err(|_| Fail::Fatal)?;
        dev.dma_read(s.addr, &mut buf[at..at + n])
            .map_err(|_| Fail::Fatal)?;
        at += n;
    }
    Ok(buf)
}

fn scatter(dev: &crate::iommu::IommuDevice, segs: &[Seg], data: &[u8]) -> Result<(), Fail> {
    let mut at = 0usize;
    for s in sub(segs, 0, data.len() as u64) {
        let n = usize::try_from(s.len).map_err(|_| Fail::Fatal)?;
        dev.dma_write(s.addr, &data[at..at + n])
            .map_err(|_| Fail::Fatal)?;
        at += n;
    }
    Ok(())
}

impl VirtioDevice for VirtioBlk {
    fn device_type(&self) -> u16 {
        2
    }
    fn class(&self) -> (u8, u8, u8) {
        (0x01, 0x00, 0x00) // mass storage, SCSI (as QEMU reports virtio-blk)
    }
    fn features(&self) -> u64 {
        let mut f = 1u64 << VIRTIO_F_VERSION_1
            | 1u64 << VIRTIO_F_ACCESS_PLATFORM
            | 1u64 << VIRTIO_BLK_F_FLUSH
            | 1u64 << VIRTIO_BLK_F_SEG_MAX
            | 1u64 << VIRTIO_BLK_F_BLK_SIZE
            | 1u64 << VIRTIO_BLK_F_DISCARD
            | 1u64 << VIRTIO_BLK_F_WRITE_ZEROES;
        if self.shared.read_only {
            f |= 1u64 << VIRTIO_BLK_F_RO;
        }
        f
    }
    fn num_queues(&self) -> u16 {
        1
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
        // Nothing in virtio_blk_config is writable without VIRTIO_BLK_F_CONFIG_WCE.
    }
    fn activate(
        &self,
        _features: u64,
        queues: Vec<Option<Queue>>,
        mem: IommuMemory,
        irq: Arc<Interrupts>,
    ) -> Result<(), EmuError> {
        let queues = queues
            .into_iter()
            .map(|q| q.map(|q| Arc::new(Mutex::new(q))))
            .collect();
        *lock(&self.shared.active) = Some(Active { queues, mem, irq });
        Ok(())
    }
    fn queue_notify(&self, queue: u16) {
        if self.drain(queue).is_err() {
            let irq = lock(&self.shared.active).as_ref().map(|a| a.irq.clone());
            if let Some(irq) = irq {
                irq.needs_reset();
            }
        }
    }
    fn reset(&self) {
        self.shared.generation.fetch_add(1, Ordering::SeqCst);
        let mut n = lock(&self.shared.inflight);
        while *n > 0 {
            n = self.shared.idle.wait(n).unwrap_or_else(|p| p.into_inner());
        }
        drop(n);
        *lock(&self.shared.active) = None;
    }
}

impl Drop for VirtioBlk {
    fn drop(&mut self) {
        lock(&self.pool).take();
        for h in lock(&self.workers).drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sub_splits_segments() {
        let segs = [Seg { addr: 100, len: 10 }, Seg { addr: 500, len: 20 }];
        assert_eq!(
            sub(&segs, 5, 10),
            vec![Seg { addr: 105, len: 5 }, Seg { addr: 500, len: 5 }]
        );
        assert_eq!(sub(&segs, 29, 5), vec![Seg { addr: 519, len: 1 }]);
        assert!(sub(&segs, 30, 5).is_empty());
        assert_eq!(
            total(&[
                Seg {
                    addr: 0,
                    len: u64::MAX
                },
                Seg { addr: 0, len: 1 }
            ]),
            u64::MAX
        );
    }

    #[test]
    fn reset_waits_for_inflight_and_drops_stale_requests() {
        let dir = tempfile::tempdir().unwrap();
        let b = VirtioBlk::new(&BlkConfig {
            path: dir.path().join("d.img"),
            size: 4096,
            read_only: false,
            serial: String::new(),
            workers: 1,
        })
        .unwrap();
        // A request in flight for 50 ms holds reset back.
        *lock(&b.shared.inflight) += 1;
        let sh = b.shared.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            sh.finished();
        });
        let start = std::time::Instant::now();
        b.reset();
        assert!(start.elapsed() >= std::time::Duration::from_millis(50));
        t.join().unwrap();
        // A request popped before that reset does no DMA at all.
        let io = crate::iommu::Iommu::new(1);
        let page = std::sync::Arc::new(Page(Mutex::new(vec![0xaa; 4096])));
        let iova = io
            .map(crate::iommu::IommuEntry {
                domain: 1,
                frame: 0,
                writable: true,
                page: page.clone(),
            })
            .unwrap();
        let irq = super::super::virtio_pci::tests_support::interrupts();
        let mut q = Queue::new(8).unwrap();
        q.set_ready(true);
        b.activate(0, vec![Some(q)], IommuMemory::new(io.device()), irq)
            .unwrap();
        b.shared.execute(Request {
            queue: 0,
            head: 0,
            kind: VIRTIO_BLK_T_IN,
            sector: 0,
            readable: vec![],
            writable: vec![Seg {
                addr: iova,
                len: 512,
            }],
            status: iova + 1024,
            generation: 0,
        });
        assert!(page.0.lock().unwrap().iter().all(|x| *x == 0xaa));
        assert_eq!(*lock(&b.shared.inflight), 0);
    }

    struct Page(Mutex<Vec<u8>>);
    impl crate::iommu::DmaPage for Page {
        fn read(&self, offset: usize, buf: &mut [u8]) {
            buf.copy_from_slice(&self.0.lock().unwrap()[offset..offset + buf.len()]);
        }
        fn write(&self, offset: usize, data: &[u8]) {
            self.0.lock().unwrap()[offset..offset + data.len()].copy_from_slice(data);
        }
    }

    #[test]
    fn opens_and_sizes_media() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let mk = |size, ro| BlkConfig {
            path: path.clone(),
            size,
            read_only: ro,
            serial: "serial-0123456789-abcdef".into(),
            workers: 2,
        };
        let b = VirtioBlk::new(&mk(1 << 20, false)).unwrap();
        assert_eq!(b.capacity(), 2048);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20);
        assert_eq!(&b.shared.id, b"serial-0123456789-ab");
        drop(b);
        // An existing image keeps its size.
        let b = VirtioBlk::new(&mk(4096, true)).unwrap();
        assert_eq!(b.capacity(), 2048);
        assert_ne!(b.features() & 1 << VIRTIO_BLK_F_RO, 0);
        let mut cap = [0u8; 8];
        b.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 2048);
        let mut tail = [9u8; 8];
        b.read_config(58, &mut tail);
        assert_eq!(tail, [0; 8]);
        assert!(VirtioBlk::new(&mk(1000, false)).is_err());
        assert!(VirtioBlk::new(&BlkConfig {
            path: dir.path().join("none/x"),
            ..mk(4096, true)
        })
        .is_err());
    }
}
