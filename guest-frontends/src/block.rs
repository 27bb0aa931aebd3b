//! [`BlockDevice`]: what the NBD adapter exports. Implemented by blkfront (through a mutex) and
//! by a plain file ([`FileDevice`], for tests and baselines).
//!
//! Offsets and lengths are in bytes. A device with a block size larger than 1 (blkfront:
//! 512-byte sectors) handles unaligned requests itself by read-modify-write, so callers never
//! see the alignment.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;

use devchan::blkif::SECTOR_SIZE;
use devchan::platform::Platform;

use crate::blkfront::shadow::Token;
use crate::blkfront::{BlkError, BlkFront, FrontStore};
use std::time::{Duration, Instant};

/// Why a block operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    /// The range is outside the device.
    #[error("Range {offset}+{len} is outside a device of {size} bytes")]
    OutOfRange {
        /// Start.
        offset: u64,
        /// Length.
        len: u64,
        /// Device size.
        size: u64,
    },
    /// The device is read-only.
    #[error("Device is read-only")]
    ReadOnly,
    /// The device does not support the operation.
    #[error("Operation not supported")]
    NotSupported,
    /// The device failed.
    #[error("I/O error")]
    Io(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Result of device operations.
pub type DevResult<T> = Result<T, DevError>;

/// A byte-addressed block device shared by several users.
pub trait BlockDevice: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Writes are refused.
    fn read_only(&self) -> bool {
        false
    }
    /// [`Self::flush`] does something.
    fn can_flush(&self) -> bool {
        false
    }
    /// [`Self::trim`] does something.
    fn can_trim(&self) -> bool {
        false
    }
    /// Read `buf.len()` bytes at `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> DevResult<()>;
    /// Write `data` at `offset`.
    fn write_at(&self, offset: u64, data: &[u8]) -> DevResult<()>;
    /// Make completed writes durable.
    fn flush(&self) -> DevResult<()> {
        Ok(())
    }
    /// Discard a range (its content becomes unspecified).
    fn trim(&self, _offset: u64, _len: u64) -> DevResult<()> {
        Err(DevError::NotSupported)
    }
    /// Write zeroes over a range.
    fn write_zeroes(&self, offset: u64, len: u64) -> DevResult<()> {
        check(self.size(), offset, len)?;
        let zeros = vec![0u8; 256 * 1024];
        let mut done = 0u64;
        while done < len {
            let n = usize::try_from(len - done).map_or(zeros.len(), |n| n.min(zeros.len()));
            self.write_at(offset + done, &zeros[..n])?;
            done += n as u64;
        }
        Ok(())
    }
}

/// Check `offset..offset+len` against a device of `size` bytes.
pub fn check(size: u64, offset: u64, len: u64) -> DevResult<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(DevError::OutOfRange { offset, len, size }),
    }
}

/// A raw image file as a device.
pub struct FileDevice {
    file: File,
    size: u64,
    read_only: bool,
}

impl FileDevice {
    /// Open `path` (read-write unless `read_only`); the device is the file's current size.
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            file,
            size,
            read_only,
        })
    }
}

fn io(e: std::io::Error) -> DevError {
    DevError::Io(Box::new(e))
}

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn can_flush(&self) -> bool {
        true
    }
    fn can_trim(&self) -> bool {
        !self.read_only
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> DevResult<()> {
        check(self.size, offset, buf.len() as u64)?;
        self.file.read_exact_at(buf, offset).map_err(io)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> DevResult<()> {
        if self.read_only {
            return Err(DevError::ReadOnly);
        }
        check(self.size, offset, data.len() as u64)?;
        self.file.write_all_at(data, offset).map_err(io)
    }
    fn flush(&self) -> DevResult<()> {
        self.file.sync_data().map_err(io)
    }
    fn trim(&self, offset: u64, len: u64) -> DevResult<()> {
        if self.read_only {
            return Err(DevError::ReadOnly);
        }
        check(self.size, offset, len)?;
        use rustix::fs::{fallocate, FallocateFlags};
        fallocate(
            &self.file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        )
        .map_err(|e| io(e.into()))
    }
}

fn blk(e: BlkError) -> DevError {
    match e {
        BlkError::ReadOnly => DevError::ReadOnly,
        BlkError::NotSupported => DevError::NotSupported,
        other => DevError::Io(Box::new(other)),
    }
}

const SECTOR: u64 = SECTOR_SIZE as u64;

/// A length or offset derived from an in-memory buffer's size, as a usize.
fn us(x: u64) -> DevResult<usize> {
    usize::try_from(x).map_err(|_| DevError::OutOfRange {
        offset: x,
        len: 0,
        size: 0,
    })
}

/// Run one operation on a shared frontend: submit it under the lock, then take turns driving
/// the ring (each turn holds the lock for at most one event wait) until its result is there.
/// Several threads' requests are on the ring together, so the queue depth is the number of
/// users (NBD connections), not 1.
fn run_op<P: Platform, S: FrontStore>(
    m: &Mutex<BlkFront<P, S>>,
    submit: impl FnOnce(&mut BlkFront<P, S>) -> Result<Token, BlkError>,
) -> DevResult<Vec<u8>> {
    let lock = || m.lock().unwrap_or_else(|p| p.into_inner());
    let (token, timeout) = {
        let mut f = lock();
        (submit(&mut f).map_err(blk)?, f.config().io_timeout)
    };
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let mut f = lock();
        if let Some(r) = f.take(token) {
            return r.map_err(blk);
        }
        if !f.is_pending(token) {
            return Err(blk(BlkError::UnknownToken(token)));
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            f.cancel(token);
            return Err(blk(BlkError::TimedOut));
        }
        f.poll(Duration::ZERO).map_err(blk)?;
        drop(f);
        std::thread::yield_now();
    }
}

impl<P: Platform, S: FrontStore> BlockDevice for Mutex<BlkFront<P, S>> {
    fn size(&self) -> u64 {
        self.lock().unwrap_or_else(|p| p.into_inner()).capacity()
    }
    fn read_only(&self) -> bool {
        let f = self.lock().unwrap_or_else(|p| p.into_inner());
        f.backend_info().is_some_and(|i| i.read_only())
    }
    fn can_flush(&self) -> bool {
        true
    }
    fn can_trim(&self) -> bool {
        let f = self.lock().unwrap_or_else(|p| p.into_inner());
        f.backend_info().is_some_and(|i| i.discard)
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> DevResult<()> {
        check(self.size(), offset, buf.len() as u64)?;
        let start = offset / SECTOR * SECTOR;
        let end = (offset + buf.len() as u64).div_ceil(SECTOR) * SECTOR;
        let len = us(end - start)?;
        let data = run_op(self, |f| f.submit_read(start / SECTOR, len))?;
        let skip = us(offset - start)?;
        buf.copy_from_slice(&data[skip..skip + buf.len()]);
        Ok(())
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> DevResult<()> {
        check(self.size(), offset, data.len() as u64)?;
        let start = offset / SECTOR * SECTOR;
        let end = (offset + data.len() as u64).div_ceil(SECTOR) * SECTOR;
        if start == offset && end == offset + data.len() as u64 {
            return run_op(self, |f| f.submit_write(offset / SECTOR, data.to_vec())).map(drop);
        }
        // Read-modify-write the partial sectors, all under the lock so that no other user's
        // write to the same sectors can land between the read and the write.
        let mut f = self.lock().unwrap_or_else(|p| p.into_inner());
        let mut tmp = vec![0u8; us(end - start)?];
        f.read(start / SECTOR, &mut tmp).map_err(blk)?;
        let skip = us(offset - start)?;
        tmp[skip..skip + data.len()].copy_from_slice(data);
        f.write(start / SECTOR, &tmp).map_err(blk)
    }
    fn flush(&self) -> DevResult<()> {
        run_op(self, BlkFront::submit_flush).map(drop)
    }
    fn trim(&self, offset: u64, len: u64) -> DevResult<()> {
        check(self.size(), offset, len)?;
        // Only whole sectors inside the range may be discarded.
        let start = offset.div_ceil(SECTOR);
        let end = (offset + len) / SECTOR;
        if end <= start {
            return Ok(());
        }
        run_op(self, |f| f.submit_discard(start, end - start, false)).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_device_bounds_and_data() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, vec![0u8; 8192]).unwrap();
        let d = FileDevice::open(&p, false).unwrap();
        assert_eq!(d.size(), 8192);
        d.write_at(100, b"hello").unwrap();
        let mut b = [0u8; 5];
        d.read_at(100, &mut b).unwrap();
        assert_eq!(&b, b"hello");
        assert!(matches!(
            d.read_at(8190, &mut b),
            Err(DevError::OutOfRange { .. })
        ));
        assert!(d.write_at(u64::MAX, b"x").is_err());
        d.write_zeroes(100, 5).unwrap();
        d.read_at(100, &mut b).unwrap();
        assert_eq!(b, [0; 5]);
        d.trim(0, 4096).unwrap();
        let ro = FileDevice::open(&p, true).unwrap();
        assert!(matches!(ro.write_at(0, b"x"), Err(DevError::ReadOnly)));
    }
}
