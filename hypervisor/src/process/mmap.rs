//! Memory mappings of a domain process: its RAM and pages mapped from one-page memfds
//! ([`Mmap`]), and the registry of where each of its shareable frames is mapped
//! ([`PageRegistry`]), so that a frame a transfer swapped can be mapped again in place.

use devchan::platform::Frame;
use rustix::mm::{MapFlags, ProtFlags};
use std::collections::HashMap;
use std::os::fd::AsFd;
use std::ptr::NonNull;
use std::sync::Mutex;

const PAGE: usize = crate::memory::layout::PAGE_SIZE;

/// A private or shared mapping owned by this process; unmapped on drop.
pub(super) struct Mmap {
    pub(super) ptr: NonNull<u8>,
    pub(super) len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; all accesses to it through the
// platform are atomic or volatile, so it can move and be shared across threads.
unsafe impl Send for Mmap {}
// SAFETY: as above.
unsafe impl Sync for Mmap {}

impl Mmap {
    pub(super) fn map(fd: impl AsFd, len: usize, writable: bool) -> std::io::Result<Self> {
        let prot = if writable {
            ProtFlags::READ | ProtFlags::WRITE
        } else {
            ProtFlags::READ
        };
        // SAFETY: a fresh shared mapping of `fd` at a kernel-chosen address: it aliases no Rust
        // object. The memory is shared with other processes, which this module accounts for by
        // accessing it only atomically or volatilely.
        let p =
            unsafe { rustix::mm::mmap(std::ptr::null_mut(), len, prot, MapFlags::SHARED, fd, 0) }?;
        let ptr = NonNull::new(p.cast()).ok_or_else(|| std::io::Error::other("mmap at 0"))?;
        Ok(Self { ptr, len })
    }

    /// Replace this mapping, at the same address, with a shared mapping of `fd`: accesses
    /// through pointers into it see the new file from then on.
    ///
    /// # Safety
    ///
    /// The caller keeps the mapping alive (not unmapped concurrently) for the call.
    pub(super) unsafe fn replace(&self, fd: impl AsFd) -> std::io::Result<()> {
        // SAFETY: MAP_FIXED over exactly our own live mapping (the caller keeps it mapped),
        // so nothing else is replaced; the page is only accessed volatilely or atomically, so
        // no Rust reference sees its contents change.
        let p = unsafe {
            rustix::mm::mmap(
                self.ptr.as_ptr().cast(),
                self.len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED | MapFlags::FIXED,
                fd,
                0,
            )
        }?;
        if p.cast() == self.ptr.as_ptr() {
            Ok(())
        } else {
            Err(std::io::Error::other("MAP_FIXED moved the mapping"))
        }
    }

    pub(super) fn page(&self, frame: u64) -> Option<*mut u8> {
        let off = usize::try_from(frame).ok()?.checked_mul(PAGE)?;
        // SAFETY: `off + PAGE <= len` is checked first, so the pointer stays in the mapping.
        (off.checked_add(PAGE)? <= self.len).then(|| unsafe { self.ptr.as_ptr().add(off) })
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned. Nothing uses the memory after
        // this value goes: pages and mappings hand out raw pointers only for their own
        // lifetime, and the platform's views are dropped before its `ram` (field order).
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Where this process maps each of its shareable frames, so that a frame whose page a
/// transfer swapped can be mapped again in place. Lock order: this before the control socket.
#[derive(Default)]
pub(super) struct PageRegistry(Mutex<HashMap<Frame, Vec<usize>>>);

impl PageRegistry {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Frame, Vec<usize>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn add(&self, frame: Frame, map: &Mmap) {
        self.lock()
            .entry(frame)
            .or_default()
            .push(map.ptr.as_ptr() as usize);
    }

    pub(super) fn forget(&self, frame: Frame, map: &Mmap) {
        let mut reg = self.lock();
        if let Some(v) = reg.get_mut(&frame) {
            v.retain(|&a| a != map.ptr.as_ptr() as usize);
            if v.is_empty() {
                reg.remove(&frame);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mmap_page_bounds() {
        let fd = rustix::fs::memfd_create("t", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, 2 * PAGE as u64).unwrap();
        let m = Mmap::map(&fd, 2 * PAGE, true).unwrap();
        assert!(m.page(0).is_some() && m.page(1).is_some());
        assert!(m.page(2).is_none() && m.page(u64::MAX).is_none());
    }

    #[test]
    fn replace_swaps_the_file_behind_the_same_address() {
        let fd = |b: u8| {
            let f = rustix::fs::memfd_create("t", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
            rustix::fs::ftruncate(&f, PAGE as u64).unwrap();
            rustix::io::pwrite(&f, &[b], 0).unwrap();
            f
        };
        let (a, b) = (fd(1), fd(2));
        let m = Mmap::map(&a, PAGE, true).unwrap();
        let reg = PageRegistry::default();
        reg.add(9, &m);
        // SAFETY: byte 0 of our own live mapping.
        assert_eq!(unsafe { m.ptr.as_ptr().read_volatile() }, 1);
        // SAFETY: `m` stays mapped for the call.
        unsafe { m.replace(&b) }.unwrap();
        // SAFETY: as above.
        assert_eq!(unsafe { m.ptr.as_ptr().read_volatile() }, 2);
        assert_eq!(reg.lock().get(&9).map(Vec::len), Some(1));
        reg.forget(9, &m);
        assert!(reg.lock().is_empty());
    }
}
