//! Grant mapping and grant copy through `/dev/xen/gntdev`.
//!
//! A mapping is two steps (see [`crate::sys`]): `IOCTL_GNTDEV_MAP_GRANT_REF` reserves an offset
//! for one `(domid, gref)`, and `mmap` of the device at that offset performs the grant map
//! (`GNTTABOP_map_grant_ref`; `PROT_WRITE` absent = read-only). [`GntMapping`] undoes both
//! when dropped: `munmap` (the grant unmap) and `IOCTL_GNTDEV_UNMAP_GRANT_REF`. The kernel
//! also undoes every mapping when the device file is closed, so a killed backend process
//! leaves no mapping behind, and a restarted one maps again.
//!
//! Grant copy (`IOCTL_GNTDEV_GRANT_COPY`) copies between a peer's granted page and our own
//! memory without mapping anything; the kernel returns one `GNTST_*` status per segment.
//!
//! The mapped page is the peer's memory and changes under us at any time: [`GntMapping`] only
//! hands out its address, and readers go through volatile copies.

use crate::sys::{
    GntCopyForeign, GntCopySide, GntdevGrantCopy, GntdevGrantCopySegment, GntdevGrantRef,
    GntdevMapGrantRef, GntdevUnmapGrantRef, GNTCOPY_DEST_GREF, GNTCOPY_SOURCE_GREF,
    IOCTL_GNTDEV_GRANT_COPY, IOCTL_GNTDEV_MAP_GRANT_REF, IOCTL_GNTDEV_UNMAP_GRANT_REF,
};
use devchan::grant::{DomId, GrantRef};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Arc;

/// Bytes per page.
pub const PAGE_SIZE: usize = 4096;

/// Why a gntdev operation failed.
#[derive(Debug, thiserror::Error)]
pub enum GntdevError {
    /// The device could not be opened.
    #[error("Opening {path}")]
    Open {
        /// The device path.
        path: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// An ioctl or mmap failed.
    #[error("{what} of grant {gref} from domain {domid}")]
    Map {
        /// Which step.
        what: &'static str,
        /// The granting domain.
        domid: DomId,
        /// The grant.
        gref: GrantRef,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The grant-copy ioctl failed as a whole.
    #[error("Grant copy of {0} segments")]
    Copy(usize, #[source] io::Error),
}

/// An open `/dev/xen/gntdev`.
#[derive(Debug)]
pub struct Gntdev {
    file: Arc<File>,
}

/// Where a side of a copy is.
#[derive(Clone, Copy, Debug)]
pub enum CopySide {
    /// A peer's granted page.
    Grant {
        /// Granting domain.
        domid: DomId,
        /// Its grant.
        gref: GrantRef,
        /// Byte offset.
        offset: u16,
    },
    /// Our memory (a pointer into a mapping we own, valid for the copy's length).
    Local(*mut u8),
}

/// One copy for [`Gntdev::copy`].
#[derive(Clone, Copy, Debug)]
pub struct CopySeg {
    /// Source.
    pub src: CopySide,
    /// Destination.
    pub dst: CopySide,
    /// Bytes (within one page on both sides).
    pub len: u16,
}

impl Gntdev {
    /// Open the device at `path` (normally `/dev/xen/gntdev`).
    pub fn open(path: &Path) -> Result<Self, GntdevError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| GntdevError::Open {
                path: path.display().to_string(),
                source,
            })?;
        Ok(Self {
            file: Arc::new(file),
        })
    }

    /// Map `gref` of `domid` (read-only unless `writable`).
    pub fn map(
        &self,
        domid: DomId,
        gref: GrantRef,
        writable: bool,
    ) -> Result<GntMapping, GntdevError> {
        let err = |what, source| GntdevError::Map {
            what,
            domid,
            gref,
            source,
        };
        let mut req = GntdevMapGrantRef {
            count: 1,
            refs: [GntdevGrantRef {
                domid: u32::from(domid),
                r#ref: gref,
            }],
            ..Default::default()
        };
        // SAFETY: the request number matches the struct's size (checked against the header);
        // the kernel reads and writes only that struct, which lives across the call.
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), IOCTL_GNTDEV_MAP_GRANT_REF, &mut req) };
        if r != 0 {
            return Err(err(
                "IOCTL_GNTDEV_MAP_GRANT_REF",
                io::Error::last_os_error(),
            ));
        }
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        let Ok(offset) = libc::off_t::try_from(req.index) else {
            self.release(req.index);
            return Err(err("offset", io::Error::from(io::ErrorKind::InvalidData)));
        };
        // SAFETY: a fresh shared mapping of one page of the device at the offset the kernel
        // reserved for this grant; it aliases no Rust object.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE_SIZE,
                prot,
                libc::MAP_SHARED,
                self.file.as_raw_fd(),
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            let e = io::Error::last_os_error();
            self.release(req.index);
            return Err(err("mmap", e));
        }
        let Some(ptr) = NonNull::new(p.cast::<u8>()) else {
            self.release(req.index);
            return Err(err("mmap", io::Error::from(io::ErrorKind::InvalidData)));
        };
        Ok(GntMapping {
            file: self.file.clone(),
            ptr,
            index: req.index,
            domid,
            gref,
            writable,
        })
    }

    fn release(&self, index: u64) {
        let mut req = GntdevUnmapGrantRef {
            index,
            count: 1,
            pad: 0,
        };
        // SAFETY: as in `map`: the struct matches the request number and outlives the call.
        let r = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                IOCTL_GNTDEV_UNMAP_GRANT_REF,
                &mut req,
            )
        };
        if r != 0 {
            tracing::warn!(index, error = %io::Error::last_os_error(), "gntdev: releasing an index failed");
        }
    }

    /// Run `segs` as one `GNTTABOP_copy` batch; one `GNTST_*` status per segment.
    ///
    /// A [`CopySide::Local`] pointer must be valid for `len` bytes (the caller's own memory).
    pub fn copy(&self, segs: &[CopySeg]) -> Result<Vec<i16>, GntdevError> {
        let side = |s: CopySide, flag: u16| match s {
            CopySide::Grant {
                domid,
                gref,
                offset,
            } => (
                GntCopySide {
                    foreign: GntCopyForeign {
                        r#ref: gref,
                        offset,
                        domid,
                    },
                },
                flag,
            ),
            CopySide::Local(p) => (GntCopySide { virt: p.cast() }, 0),
        };
        let mut raw: Vec<GntdevGrantCopySegment> = segs
            .iter()
            .map(|s| {
                let (source, f1) = side(s.src, GNTCOPY_SOURCE_GREF);
                let (dest, f2) = side(s.dst, GNTCOPY_DEST_GREF);
                GntdevGrantCopySegment {
                    source,
                    dest,
                    len: s.len,
                    flags: f1 | f2,
                    status: 0,
                }
            })
            .collect();
        if raw.is_empty() {
            return Ok(Vec::new());
        }
        let mut req = GntdevGrantCopy {
            count: libc::c_uint::try_from(raw.len()).map_err(|_| {
                GntdevError::Copy(raw.len(), io::Error::from(io::ErrorKind::InvalidInput))
            })?,
            segments: raw.as_mut_ptr(),
        };
        // SAFETY: `req` points at `raw`, which lives across the call; local sides point into
        // memory the caller owns for the copy's length (this method's contract).
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), IOCTL_GNTDEV_GRANT_COPY, &mut req) };
        if r != 0 {
            return Err(GntdevError::Copy(segs.len(), io::Error::last_os_error()));
        }
        Ok(raw.iter().map(|s| s.status).collect())
    }
}

/// A peer's page mapped through gntdev; unmapped on drop.
#[derive(Debug)]
pub struct GntMapping {
    file: Arc<File>,
    ptr: NonNull<u8>,
    index: u64,
    domid: DomId,
    gref: GrantRef,
    writable: bool,
}

// SAFETY: the mapping is plain shared memory owned by this handle; every access goes through
// raw pointers with volatile copies, so moving or sharing the handle between threads is fine.
unsafe impl Send for GntMapping {}
// SAFETY: as above.
unsafe impl Sync for GntMapping {}

impl GntMapping {
    /// Start of the page.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    /// The granting domain.
    pub fn domid(&self) -> DomId {
        self.domid
    }
    /// The grant.
    pub fn gref(&self) -> GrantRef {
        self.gref
    }
    /// Whether it is mapped writable.
    pub fn writable(&self) -> bool {
        self.writable
    }
}

impl Drop for GntMapping {
    fn drop(&mut self) {
        // SAFETY: `ptr` is the one-page mapping made in `Gntdev::map`, unmapped only here.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), PAGE_SIZE) };
        Gntdev {
            file: self.file.clone(),
        }
        .release(self.index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_a_missing_device_is_a_clear_error() {
        let e = Gntdev::open(Path::new("/nonexistent/gntdev")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/gntdev"));
    }

    #[test]
    fn on_xen_a_bad_grant_fails_cleanly() {
        let Ok(g) = Gntdev::open(Path::new("/dev/xen/gntdev")) else {
            eprintln!("SKIP: no /dev/xen/gntdev (not a Xen domain)");
            return;
        };
        // Domain 0x7ff0 (DOMID_FIRST_RESERVED) cannot grant anything.
        assert!(g.map(0x7ff0, 1, false).is_err());
        let mut buf = [0u8; 8];
        let st = g
            .copy(&[CopySeg {
                src: CopySide::Grant {
                    domid: 0x7ff0,
                    gref: 1,
                    offset: 0,
                },
                dst: CopySide::Local(buf.as_mut_ptr()),
                len: 8,
            }])
            .unwrap();
        assert!(st[0] < 0, "{st:?}");
    }
}
