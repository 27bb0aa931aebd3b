//! Domain memory: one memfd of RAM per domain plus one-page memfds for shareable pages.
//!
//! # Layout (frames of 4 KiB, [`layout`])
//!
//! | frame | what |
//! |---|---|
//! | 0 | `shared_info` (event-channel bitmaps, vCPU-0 `vcpu_info`) |
//! | 1..=4 | grant table v1 (4 pages, 2048 entries; refs 0..8 reserved as in Xen) |
//! | 5 | hypercall page (owned by the process layer) |
//! | 6 | XenStore ring (`xenstore_domain_interface`) |
//! | 7.. | free RAM |
//! | `nr_frames + i` | the i-th shareable page from `alloc_shared_page`, its own memfd |
//!
//! RAM is mapped here through `vm-memory` (`GuestMemoryMmap` over the memfd) and by the
//! domain's own process. Every memfd is sealed against shrinking and growing before anyone else
//! sees it, so a domain cannot truncate its memory under the hypervisor (which would turn a
//! hypervisor access into `SIGBUS`).
//!
//! A shareable page is its own memfd so that handing it to a mapper exposes nothing else of the
//! granter's memory. Read-only mappers get a read-only file description of it
//! ([`SharedPageMem::reopen`]), so they cannot map it writable.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::{Arc, RwLock};
use vm_memory::mmap::MmapRegion;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemory, GuestMemoryMmap, VolatileMemory, VolatileSlice,
};

/// Frame numbers and sizes of a process domain's memory.
pub mod layout {
    /// Bytes per frame.
    pub const PAGE_SIZE: usize = 4096;
    /// `shared_info`: event-channel bitmaps and `vcpu_info[0]`.
    pub const SHARED_INFO_FRAME: u64 = 0;
    /// First grant-table frame.
    pub const GRANT_TABLE_FRAME: u64 = 1;
    /// Grant-table frames.
    pub const GRANT_TABLE_FRAMES: u64 = 4;
    /// Grant entries (v1, 8 bytes each) in the grant-table frames.
    pub const NR_GRANT_ENTRIES: u32 = 2048;
    const _: () = assert!(NR_GRANT_ENTRIES as u64 * 8 == GRANT_TABLE_FRAMES * PAGE_SIZE as u64);
    /// The hypercall page (batched operations + doorbell, owned by the process layer).
    pub const HYPERCALL_FRAME: u64 = 5;
    /// The XenStore ring page.
    pub const XENSTORE_FRAME: u64 = 6;
    /// First frame of free RAM; frames below it are the platform's and cannot be granted.
    pub const FIRST_FREE_FRAME: u64 = 7;
    /// Smallest domain: the fixed frames plus one free frame.
    pub const MIN_FRAMES: u64 = FIRST_FREE_FRAME + 1;
    /// Largest domain RAM accepted (1 GiB).
    pub const MAX_FRAMES: u64 = 1 << 18;
    /// Most shareable pages a domain may allocate.
    pub const MAX_SHARED_PAGES: usize = 4096;
}

use layout::PAGE_SIZE;

/// Why domain memory could not be set up or used.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// `nr_frames` outside `MIN_FRAMES..=MAX_FRAMES`.
    #[error("Bad memory size of {0} frames")]
    BadSize(u64),
    /// memfd creation, sizing or sealing failed.
    #[error("Creating a memfd")]
    Memfd(#[source] std::io::Error),
    /// Mapping the memfd failed.
    #[error("Mapping domain memory")]
    Map(String),
    /// A frame/offset/length outside the domain's memory.
    #[error("Access outside domain memory: frame {frame}, offset {offset}, length {len}")]
    OutOfRange {
        /// The frame.
        frame: u64,
        /// Byte offset in it.
        offset: usize,
        /// Length of the access.
        len: usize,
    },
    /// The domain already has `MAX_SHARED_PAGES` shareable pages.
    #[error("Too many shareable pages")]
    TooManySharedPages,
}

/// Result of memory operations.
pub type Result<T> = std::result::Result<T, MemoryError>;

/// Create a memfd of `size` bytes, sealed against shrinking, growing and further sealing.
pub fn sealed_memfd(name: &str, size: u64) -> Result<File> {
    let cname = std::ffi::CString::new(name.replace('\0', "_")).map_err(|e| {
        MemoryError::Memfd(std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
    })?;
    // SAFETY: `cname` is a valid NUL-terminated string; memfd_create has no other inputs.
    let fd =
        unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(MemoryError::Memfd)?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on an fd we own, with an integer argument.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    Ok(file)
}

/// Check that `offset..offset+len` lies within one page.
fn check_in_page(frame: u64, offset: usize, len: usize) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= PAGE_SIZE => Ok(()),
        _ => Err(MemoryError::OutOfRange { frame, offset, len }),
    }
}

/// One shareable page: a one-page memfd and the hypervisor's mapping of it.
pub struct SharedPageMem {
    file: File,
    map: MmapRegion,
}

impl SharedPageMem {
    /// A new zeroed page.
    pub fn new(name: &str) -> Result<Self> {
        let file = sealed_memfd(name, PAGE_SIZE as u64)?;
        let fo = FileOffset::new(file.try_clone().map_err(MemoryError::Memfd)?, 0);
        let map =
            MmapRegion::from_file(fo, PAGE_SIZE).map_err(|e| MemoryError::Map(e.to_string()))?;
        Ok(Self { file, map })
    }

    /// The page's memfd (read-write).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// A new file description of the page: read-only if `readonly` (opened through
    /// `/proc/self/fd`, so `mmap(PROT_WRITE, MAP_SHARED)` on it fails), else a duplicate.
    pub fn reopen(&self, readonly: bool) -> std::io::Result<File> {
        if readonly {
            let path = format!("/proc/self/fd/{}", self.file.as_raw_fd());
            std::fs::OpenOptions::new().read(true).open(path)
        } else {
            self.file.try_clone()
        }
    }

    /// Start of the page in this process. Valid while `self` lives.
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.as_ptr()
    }

    /// `len` bytes at `offset` as a volatile slice.
    pub fn slice(&self, offset: usize, len: usize) -> Result<VolatileSlice<'_, ()>> {
        check_in_page(0, offset, len)?;
        self.map
            .get_slice(offset, len)
            .map_err(|_| MemoryError::OutOfRange {
                frame: 0,
                offset,
                len,
            })
    }
}

/// A domain's memory: RAM (one memfd) and its shareable pages.
pub struct DomainMemory {
    ram_file: File,
    ram: GuestMemoryMmap,
    nr_frames: u64,
    shared: RwLock<Vec<Arc<SharedPageMem>>>,
}

impl DomainMemory {
    /// Zeroed memory of `nr_frames` frames.
    pub fn new(name: &str, nr_frames: u64) -> Result<Self> {
        if !(layout::MIN_FRAMES..=layout::MAX_FRAMES).contains(&nr_frames) {
            return Err(MemoryError::BadSize(nr_frames));
        }
        let size = nr_frames * PAGE_SIZE as u64;
        let ram_file = sealed_memfd(name, size)?;
        let fo = FileOffset::new(ram_file.try_clone().map_err(MemoryError::Memfd)?, 0);
        let len = usize::try_from(size).map_err(|_| MemoryError::BadSize(nr_frames))?;
        let ram = GuestMemoryMmap::from_ranges_with_files([(GuestAddress(0), len, Some(fo))])
            .map_err(|e| MemoryError::Map(e.to_string()))?;
        Ok(Self {
            ram_file,
            ram,
            nr_frames,
            shared: RwLock::new(Vec::new()),
        })
    }

    /// Frames of RAM.
    pub fn nr_frames(&self) -> u64 {
        self.nr_frames
    }

    /// The RAM memfd (handed to the domain's process).
    pub fn ram_file(&self) -> &File {
        &self.ram_file
    }

    /// The RAM as `vm-memory` guest memory.
    pub fn ram(&self) -> &GuestMemoryMmap {
        &self.ram
    }

    /// Host address of RAM `frame`, valid while `self` lives.
    pub fn ram_frame_ptr(&self, frame: u64) -> Result<*mut u8> {
        if frame >= self.nr_frames {
            return Err(MemoryError::OutOfRange {
                frame,
                offset: 0,
                len: PAGE_SIZE,
            });
        }
        self.ram
            .get_host_address(GuestAddress(frame * PAGE_SIZE as u64))
            .map_err(|_| MemoryError::OutOfRange {
                frame,
                offset: 0,
                len: PAGE_SIZE,
            })
    }

    /// Allocate a zeroed shareable page; returns its frame number (`nr_frames + i`).
    pub fn alloc_shared(&self, name: &str) -> Result<(u64, Arc<SharedPageMem>)> {
        let page = Arc::new(SharedPageMem::new(name)?);
        let mut shared = self.shared.write().unwrap_or_else(|p| p.into_inner());
        if shared.len() >= layout::MAX_SHARED_PAGES {
            return Err(MemoryError::TooManySharedPages);
        }
        shared.push(page.clone());
        Ok((self.nr_frames + shared.len() as u64 - 1, page))
    }

    /// The shareable page at `frame`, if `frame` names one.
    pub fn shared_page(&self, frame: u64) -> Option<Arc<SharedPageMem>> {
        let idx = usize::try_from(frame.checked_sub(self.nr_frames)?).ok()?;
        let shared = self.shared.read().unwrap_or_else(|p| p.into_inner());
        shared.get(idx).cloned()
    }

    /// Swap shareable page `fa` of `a` with shareable page `fb` of `b`, only if nobody but the
    /// two page tables holds either page (no mapping handle, pin or copy in this process).
    /// Returns whether the swap happened.
    pub fn swap_shared(a: &DomainMemory, fa: u64, b: &DomainMemory, fb: u64) -> bool {
        let idx = |m: &DomainMemory, f: u64| {
            f.checked_sub(m.nr_frames)
                .and_then(|i| usize::try_from(i).ok())
        };
        let (Some(ia), Some(ib)) = (idx(a, fa), idx(b, fb)) else {
            return false;
        };
        let lone = |p: &Arc<SharedPageMem>| Arc::strong_count(p) == 1;
        if std::ptr::eq(a, b) {
            let mut t = a.shared.write().unwrap_or_else(|p| p.into_inner());
            let ok = ia != ib && t.get(ia).is_some_and(lone) && t.get(ib).is_some_and(lone);
            if ok {
                t.swap(ia, ib);
            }
            return ok;
        }
        // Both tables locked (in address order, so two swaps cannot deadlock) while the
        // counts are checked: `shared_page` clones under the read lock, so no new holder can
        // appear between the check and the swap.
        let (first, second) = if (a as *const DomainMemory) < (b as *const DomainMemory) {
            (a, b)
        } else {
            (b, a)
        };
        let mut t1 = first.shared.write().unwrap_or_else(|p| p.into_inner());
        let mut t2 = second.shared.write().unwrap_or_else(|p| p.into_inner());
        let (ta, tb) = if std::ptr::eq(first, a) {
            (&mut *t1, &mut *t2)
        } else {
            (&mut *t2, &mut *t1)
        };
        match (ta.get_mut(ia), tb.get_mut(ib)) {
            (Some(pa), Some(pb)) if lone(pa) && lone(pb) => {
                std::mem::swap(pa, pb);
                true
            }
            _ => false,
        }
    }

    /// Resolve `frame` (RAM or shareable) to a page handle that keeps it alive.
    pub fn page(self: &Arc<Self>, frame: u64) -> Result<PageRef> {
        if frame < self.nr_frames {
            Ok(PageRef::Ram {
                mem: self.clone(),
                frame,
            })
        } else {
            self.shared_page(frame)
                .map(PageRef::Shared)
                .ok_or(MemoryError::OutOfRange {
                    frame,
                    offset: 0,
                    len: PAGE_SIZE,
                })
        }
    }

    /// Read `buf.len()` bytes at `frame`/`offset` (not crossing the page).
    pub fn read(self: &Arc<Self>, frame: u64, offset: usize, buf: &mut [u8]) -> Result<()> {
        self.page(frame)?.slice(offset, buf.len())?.copy_to(buf);
        Ok(())
    }

    /// Write `data` at `frame`/`offset` (not crossing the page).
    pub fn write(self: &Arc<Self>, frame: u64, offset: usize, data: &[u8]) -> Result<()> {
        self.page(frame)?.slice(offset, data.len())?.copy_from(data);
        Ok(())
    }
}

/// A page of a domain's memory, kept alive while the handle lives.
#[derive(Clone)]
pub enum PageRef {
    /// A RAM frame.
    Ram {
        /// The memory it is in.
        mem: Arc<DomainMemory>,
        /// The frame.
        frame: u64,
    },
    /// A shareable page.
    Shared(Arc<SharedPageMem>),
}

impl PageRef {
    /// `len` bytes at `offset` of the page, as a volatile slice (the page is shared with an
    /// untrusted domain, so it is never read through references).
    pub fn slice(&self, offset: usize, len: usize) -> Result<VolatileSlice<'_, ()>> {
        match self {
            PageRef::Ram { mem, frame } => {
                check_in_page(*frame, offset, len)?;
                let addr = GuestAddress(frame * PAGE_SIZE as u64 + offset as u64);
                mem.ram
                    .get_slice(addr, len)
                    .map_err(|_| MemoryError::OutOfRange {
                        frame: *frame,
                        offset,
                        len,
                    })
            }
            PageRef::Shared(p) => p.slice(offset, len),
        }
    }

    /// Whether this is a shareable page.
    pub fn is_shared(&self) -> bool {
        matches!(self, PageRef::Shared(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_read_write_and_bounds() {
        let m = Arc::new(DomainMemory::new("t", layout::MIN_FRAMES).unwrap());
        m.write(7, 4090, b"abcdef").unwrap();
        let mut b = [0u8; 6];
        m.read(7, 4090, &mut b).unwrap();
        assert_eq!(&b, b"abcdef");
        assert!(m.write(7, 4091, b"abcdef").is_err());
        assert!(m.read(8, 0, &mut b).is_err());
        assert!(m.read(7, usize::MAX, &mut b).is_err());
    }

    #[test]
    fn sizes_are_checked() {
        assert!(matches!(
            DomainMemory::new("t", 1),
            Err(MemoryError::BadSize(1))
        ));
        assert!(DomainMemory::new("t", layout::MAX_FRAMES + 1).is_err());
    }

    #[test]
    fn memfd_cannot_be_truncated() {
        let m = DomainMemory::new("t", layout::MIN_FRAMES).unwrap();
        assert!(m.ram_file().set_len(0).is_err());
        assert!(m.ram_file().set_len(1 << 30).is_err());
    }

    #[test]
    fn shared_pages_are_separate_and_readonly_reopen_is_readonly() {
        let m = Arc::new(DomainMemory::new("t", layout::MIN_FRAMES).unwrap());
        let (f, p) = m.alloc_shared("s").unwrap();
        assert_eq!(f, layout::MIN_FRAMES);
        m.write(f, 0, b"hi").unwrap();
        let ro = p.reopen(true).unwrap();
        let mut b = [0u8; 2];
        std::os::unix::fs::FileExt::read_at(&ro, &mut b, 0).unwrap();
        assert_eq!(&b, b"hi");
        assert!(std::os::unix::fs::FileExt::write_at(&ro, b"x", 0).is_err());
        assert!(m.page(f + 1).is_err());
    }
}
