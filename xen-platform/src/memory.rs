//! The backend's "own memory": frames of a file that outlives the backend process.
//!
//! The platform trait names a domain's memory by frame (`read_local`/`write_local`, the local
//! side of a grant copy). A Xen backend in dom0 is a process, not a domain, and its domain's
//! real frames are the dom0 kernel's; what idd-blk keeps there (its in-flight journal, a
//! scratch page) must survive the process so a restarted one can replay the journal. So the
//! frames are pages of a file on tmpfs (e.g. `/run/idd/xvda.mem`), created by the first process
//! and kept by the supervisor's filesystem; every process maps the whole file shared, and a
//! store made before a crash is what the next process reads (the page cache is the memory).
//!
//! Frame `f` is bytes `f * 4096 .. (f + 1) * 4096` of the file. Accesses are volatile copies
//! (another process of the same backend may be the previous writer; nothing else writes).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::ptr::NonNull;
use vm_memory::volatile_memory::VolatileSlice;

/// Bytes per frame.
pub const PAGE_SIZE: usize = 4096;

/// Why the memory could not be set up or accessed.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Opening, sizing or mapping the file failed.
    #[error("Backend memory file {path}")]
    File {
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The file is smaller than wanted and could not be grown, or is absurdly large.
    #[error("Backend memory of {0} frames is not possible")]
    Size(u64),
    /// An access outside the memory or crossing a page.
    #[error("Frame {frame} offset {offset} length {len} is outside the backend memory")]
    OutOfRange {
        /// Frame.
        frame: u64,
        /// Offset.
        offset: usize,
        /// Length.
        len: usize,
    },
}

/// The mapped memory file.
#[derive(Debug)]
pub struct LocalMemory {
    _file: File,
    base: NonNull<u8>,
    frames: u64,
}

// SAFETY: the mapping is owned by this value and accessed only through volatile copies at
// checked offsets; it can be used from any thread.
unsafe impl Send for LocalMemory {}
// SAFETY: as above.
unsafe impl Sync for LocalMemory {}

impl LocalMemory {
    /// Open (creating it if needed) the memory file at `path` with at least `frames` frames.
    /// An existing file keeps its content: that is what a restarted process resumes from.
    pub fn open(path: &Path, frames: u64) -> Result<Self, MemoryError> {
        let ferr = |source| MemoryError::File {
            path: path.display().to_string(),
            source,
        };
        let bytes = frames
            .checked_mul(PAGE_SIZE as u64)
            .filter(|b| frames > 0 && *b <= 1 << 30)
            .ok_or(MemoryError::Size(frames))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(ferr)?;
        if file.metadata().map_err(ferr)?.len() < bytes {
            file.set_len(bytes).map_err(ferr)?;
        }
        let len = usize::try_from(bytes).map_err(|_| MemoryError::Size(frames))?;
        // SAFETY: a fresh shared mapping of the file's first `len` bytes (the file has at
        // least that many); it aliases no Rust object.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(ferr(io::Error::last_os_error()));
        }
        let base = NonNull::new(p.cast::<u8>()).ok_or(MemoryError::Size(frames))?;
        Ok(Self {
            _file: file,
            base,
            frames,
        })
    }

    /// Number of frames.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Pointer to `len` bytes at `frame`/`offset`, checked to lie within one frame.
    pub fn ptr(&self, frame: u64, offset: usize, len: usize) -> Result<*mut u8, MemoryError> {
        let oob = MemoryError::OutOfRange { frame, offset, len };
        if frame >= self.frames || offset.checked_add(len).is_none_or(|e| e > PAGE_SIZE) {
            return Err(oob);
        }
        let at = usize::try_from(frame).map_err(|_| MemoryError::Size(frame))? * PAGE_SIZE + offset;
        // SAFETY: `at + len` is within the mapping (frame < frames, offset + len <= a page).
        Ok(unsafe { self.base.as_ptr().add(at) })
    }

    /// Copy out of our memory.
    pub fn read(&self, frame: u64, offset: usize, buf: &mut [u8]) -> Result<(), MemoryError> {
        let p = self.ptr(frame, offset, buf.len())?;
        // SAFETY: `ptr` checked the range lies in our mapping, which outlives this call.
        let s = unsafe { VolatileSlice::new(p, buf.len()) };
        s.copy_to(buf);
        Ok(())
    }

    /// Copy into our memory.
    pub fn write(&self, frame: u64, offset: usize, data: &[u8]) -> Result<(), MemoryError> {
        let p = self.ptr(frame, offset, data.len())?;
        // SAFETY: as in `read`.
        let s = unsafe { VolatileSlice::new(p, data.len()) };
        s.copy_from(data);
        Ok(())
    }
}

impl Drop for LocalMemory {
    fn drop(&mut self) {
        // frames * PAGE_SIZE was checked to fit in `open`.
        let len = usize::try_from(self.frames).unwrap_or(0) * PAGE_SIZE;
        // SAFETY: the mapping made in `open`, unmapped only here.
        unsafe { libc::munmap(self.base.as_ptr().cast(), len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_survives_reopening_and_ranges_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        {
            let m = LocalMemory::open(&path, 4).unwrap();
            m.write(3, 4090, b"abcdef").unwrap();
            assert!(m.write(3, 4091, b"abcdef").is_err());
            assert!(m.write(4, 0, b"a").is_err());
            assert!(m.ptr(0, usize::MAX, 2).is_err());
        }
        let m = LocalMemory::open(&path, 4).unwrap();
        let mut b = [0u8; 6];
        m.read(3, 4090, &mut b).unwrap();
        assert_eq!(&b, b"abcdef");
        assert!(LocalMemory::open(&path, 0).is_err());
        assert!(LocalMemory::open(&path, u64::MAX).is_err());
    }
}
