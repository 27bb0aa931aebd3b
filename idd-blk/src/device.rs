//! What blkback drives: a block device that moves data to and from IOVAs.
//!
//! blkback never sees guest data. It pins each guest segment for the device
//! (`Platform::pin_grant`), which puts the page in the device's IOMMU and returns an IOVA, and
//! hands the device a [`DevRequest`] naming those IOVAs. The device (a virtio-blk device
//! through [`crate::virtio::VirtioBlkDriver`], or [`FileDevice`] here) moves the bytes by DMA
//! through the IOMMU and reports a [`Completion`] with the request's token; only then does
//! blkback unpin and answer the guest.
//!
//! [`FileDevice`] is a real device in its own right: a raw image file whose every data byte
//! crosses the IOMMU (`IommuDevice::dma_read`/`dma_write`), so an IOVA that is not pinned, or
//! pinned read-only for a read, faults exactly as it would for the emulated virtio-blk-pci.
//! It executes each request synchronously inside `submit`.

use iospace::iommu::IommuDevice;
use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Duration;

/// Bytes per sector.
pub const SECTOR_SIZE: u64 = 512;

/// What a device request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DevOp {
    /// Device → memory: read sectors into the segments.
    Read,
    /// Memory → device: write the segments to sectors.
    Write,
    /// Commit the device's volatile cache.
    Flush,
    /// Discard a sector range (reads back as zeroes on our devices).
    Discard,
}

impl DevOp {
    /// Whether the request changes the media (or, for a flush, orders against what does).
    pub fn modifies(self) -> bool {
        !matches!(self, Self::Read)
    }
}

/// One contiguous piece of memory the device reaches through its IOMMU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IovaSeg {
    /// Device address (page IOVA plus the offset in the page).
    pub iova: u64,
    /// Length in bytes (a multiple of [`SECTOR_SIZE`], within one page).
    pub len: u32,
}

/// A request to the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevRequest {
    /// Returned in the completion.
    pub token: u64,
    /// What to do.
    pub op: DevOp,
    /// First sector on the device.
    pub sector: u64,
    /// Sectors (read, write, discard; 0 for a flush).
    pub nr_sectors: u64,
    /// Memory for reads and writes, in disk order; their lengths add up to `nr_sectors`.
    pub segs: Vec<IovaSeg>,
}

/// A finished request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The request's token.
    pub token: u64,
    /// Whether it succeeded.
    pub ok: bool,
}

/// Why the device refused a request or failed as a whole.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// No room for another request; try again after completions.
    #[error("Device queue is full")]
    Busy,
    /// The request is malformed (lengths that do not add up, a range off the device).
    #[error("Malformed device request: {0}")]
    Malformed(&'static str),
    /// A device register or I/O Space access failed.
    #[error("Device access failed: {0}")]
    Access(String),
    /// The device needs a reset (it reported a fault).
    #[error("Device needs a reset")]
    NeedsReset,
    /// Waiting for the device failed.
    #[error("Waiting for the device failed")]
    Wait(#[source] std::io::Error),
}

/// A block device driven by IOVA segments.
pub trait BlockDevice: Send {
    /// Size in sectors.
    fn capacity(&self) -> u64;
    /// Whether writes and discards are refused.
    fn read_only(&self) -> bool;
    /// Most segments one request may carry.
    fn max_segments(&self) -> usize;
    /// Most requests in flight at once.
    fn queue_depth(&self) -> usize;
    /// Requests submitted and not yet returned by [`BlockDevice::poll`].
    fn in_flight(&self) -> usize;
    /// Start a request. An `Err` means the request was not accepted (no completion follows).
    fn submit(&mut self, req: DevRequest) -> Result<(), DeviceError>;
    /// Append finished requests to `out`.
    fn poll(&mut self, out: &mut Vec<Completion>) -> Result<(), DeviceError>;
    /// Block until a completion may be ready or `timeout` passes.
    fn wait(&mut self, timeout: Duration) -> Result<(), DeviceError>;
}

/// Check the common shape of a request: data lengths match the sector count, the range is on
/// the device, and flushes carry nothing.
pub fn check_request(req: &DevRequest, capacity: u64) -> Result<(), DeviceError> {
    let end = req
        .sector
        .checked_add(req.nr_sectors)
        .ok_or(DeviceError::Malformed("sector range overflows"))?;
    if end > capacity {
        return Err(DeviceError::Malformed(
            "sector range past the end of the device",
        ));
    }
    let bytes: u64 = req.segs.iter().map(|s| u64::from(s.len)).sum();
    let ok = match req.op {
        DevOp::Read | DevOp::Write => {
            req.nr_sectors > 0
                && bytes == req.nr_sectors * SECTOR_SIZE
                && req.segs.iter().all(|s| u64::from(s.len) % SECTOR_SIZE == 0)
        }
        DevOp::Flush => req.nr_sectors == 0 && req.segs.is_empty(),
        DevOp::Discard => req.segs.is_empty(),
    };
    if ok {
        Ok(())
    } else {
        Err(DeviceError::Malformed(
            "data segments do not match the sector count",
        ))
    }
}

/// A raw image file as a block device, every data byte moved through the IOMMU.
pub struct FileDevice {
    file: File,
    dma: IommuDevice,
    sectors: u64,
    read_only: bool,
    done: VecDeque<Completion>,
    buf: Vec<u8>,
}

impl FileDevice {
    /// The device over `file` (its size, rounded down to whole sectors, is the capacity),
    /// doing DMA through `dma`.
    pub fn new(file: File, dma: IommuDevice, read_only: bool) -> std::io::Result<Self> {
        let sectors = file.metadata()?.len() / SECTOR_SIZE;
        Ok(Self {
            file,
            dma,
            sectors,
            read_only,
            done: VecDeque::new(),
            buf: vec![0; 4096],
        })
    }

    fn execute(&mut self, req: &DevRequest) -> bool {
        let mut at = req.sector * SECTOR_SIZE;
        match req.op {
            DevOp::Read => {
                for s in &req.segs {
                    let buf = &mut self.buf[..s.len as usize];
                    if self.file.read_exact_at(buf, at).is_err()
                        || self.dma.dma_write(s.iova, buf).is_err()
                    {
                        return false;
                    }
                    at += u64::from(s.len);
                }
                true
            }
            DevOp::Write => {
                for s in &req.segs {
                    let buf = &mut self.buf[..s.len as usize];
                    if self.dma.dma_read(s.iova, buf).is_err()
                        || self.file.write_all_at(buf, at).is_err()
                    {
                        return false;
                    }
                    at += u64::from(s.len);
                }
                true
            }
            DevOp::Flush => self.file.sync_data().is_ok(),
            DevOp::Discard => {
                let zero = [0u8; 4096];
                let mut left = req.nr_sectors * SECTOR_SIZE;
                while left > 0 {
                    let n = left.min(zero.len() as u64);
                    // n <= 4096, so the cast cannot truncate.
                    #[allow(clippy::cast_possible_truncation)]
                    if self.file.write_all_at(&zero[..n as usize], at).is_err() {
                        return false;
                    }
                    at += n;
                    left -= n;
                }
                true
            }
        }
    }
}

impl BlockDevice for FileDevice {
    fn capacity(&self) -> u64 {
        self.sectors
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn max_segments(&self) -> usize {
        256
    }
    fn queue_depth(&self) -> usize {
        128
    }
    fn in_flight(&self) -> usize {
        self.done.len()
    }
    fn submit(&mut self, req: DevRequest) -> Result<(), DeviceError> {
        check_request(&req, self.sectors)?;
        if req.segs.iter().any(|s| s.len as usize > self.buf.len()) {
            return Err(DeviceError::Malformed("segment longer than a page"));
        }
        if self.done.len() >= self.queue_depth() {
            return Err(DeviceError::Busy);
        }
        let ok =
            !(self.read_only && req.op.modifies() && req.op != DevOp::Flush) && self.execute(&req);
        self.done.push_back(Completion {
            token: req.token,
            ok,
        });
        Ok(())
    }
    fn poll(&mut self, out: &mut Vec<Completion>) -> Result<(), DeviceError> {
        out.extend(self.done.drain(..));
        Ok(())
    }
    fn wait(&mut self, _timeout: Duration) -> Result<(), DeviceError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iospace::iommu::{DmaPage, Iommu, IommuEntry};
    use std::sync::{Arc, Mutex};

    struct Page(Mutex<Vec<u8>>);
    impl DmaPage for Page {
        fn read(&self, o: usize, b: &mut [u8]) {
            b.copy_from_slice(&self.0.lock().unwrap()[o..o + b.len()]);
        }
        fn write(&self, o: usize, d: &[u8]) {
            self.0.lock().unwrap()[o..o + d.len()].copy_from_slice(d);
        }
    }

    #[test]
    fn file_device_moves_data_only_through_the_iommu() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(64 * 512).unwrap();
        let iommu = Iommu::new(4);
        let mut dev = FileDevice::new(f.try_clone().unwrap(), iommu.device(), false).unwrap();
        assert_eq!(dev.capacity(), 64);
        let page = Arc::new(Page(Mutex::new(vec![7u8; 4096])));
        let entry = |w| IommuEntry {
            domain: 1,
            frame: 9,
            writable: w,
            page: page.clone(),
        };
        let ro = iommu.map(entry(false)).unwrap();
        let req = |token, op, iova| DevRequest {
            token,
            op,
            sector: 8,
            nr_sectors: 2,
            segs: vec![IovaSeg { iova, len: 1024 }],
        };
        dev.submit(req(1, DevOp::Write, ro + 512)).unwrap();
        // A read into a read-only pin faults in the IOMMU: the request fails.
        dev.submit(req(2, DevOp::Read, ro)).unwrap();
        // Unpinned memory faults too.
        dev.submit(req(3, DevOp::Write, ro + 4096 * 3)).unwrap();
        let mut out = Vec::new();
        dev.poll(&mut out).unwrap();
        let oks: Vec<bool> = out.iter().map(|c| c.ok).collect();
        assert_eq!(oks, [true, false, false]);
        let mut disk = vec![0u8; 1024];
        f.read_exact_at(&mut disk, 8 * 512).unwrap();
        assert!(disk.iter().all(|b| *b == 7));
        let bad = DevRequest {
            nr_sectors: 3,
            ..req(4, DevOp::Write, ro)
        };
        assert!(matches!(dev.submit(bad), Err(DeviceError::Malformed(_))));
        let off_end = DevRequest {
            sector: 63,
            ..req(5, DevOp::Write, ro)
        };
        assert!(matches!(
            dev.submit(off_end),
            Err(DeviceError::Malformed(_))
        ));
        dev.submit(DevRequest {
            token: 6,
            op: DevOp::Discard,
            sector: 8,
            nr_sectors: 1,
            segs: vec![],
        })
        .unwrap();
        f.read_exact_at(&mut disk, 8 * 512).unwrap();
        assert!(disk[..512].iter().all(|b| *b == 0) && disk[512] == 7);
    }
}
