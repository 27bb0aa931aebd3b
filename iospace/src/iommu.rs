//! Software IOMMU: what a device may reach by DMA.
//!
//! Each device that a driver domain drives has one [`Iommu`]: a table from I/O virtual
//! addresses (IOVA, page-granular) to `(domain, frame, writable)` plus the page itself. Entries
//! are added only by the hypervisor when the driver domain pins a grant (`pin_grant`) and
//! removed when it unpins, when the hypervisor revokes the pin, or when a domain dies. The
//! driver domain never touches the table: it only receives the IOVA and writes it into a
//! device descriptor.
//!
//! Device models get an [`IommuDevice`] view, which can only translate and do DMA. Every DMA
//! goes through [`IommuDevice::dma_read`]/[`IommuDevice::dma_write`] under the table's read
//! lock, so once `unmap` returns no DMA can reach the page any more. An access to an unmapped
//! IOVA, a write to a read-only entry, or a range that wraps is a fault: it is counted and
//! returned as an error, and no memory is touched.
//!
//! IOVAs start at [`IOVA_BASE`] (so 0 is never valid) and are recycled through a free list.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Bytes per IOMMU page.
pub const PAGE_SIZE: usize = 4096;
/// The first IOVA handed out.
pub const IOVA_BASE: u64 = 1 << 32;

/// Why an IOMMU operation failed.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum IommuError {
    /// No entry translates this IOVA.
    #[error("IOMMU fault: IOVA {0:#x} is not mapped")]
    Unmapped(u64),
    /// The entry is read-only and the device tried to write.
    #[error("IOMMU fault: IOVA {0:#x} is read-only")]
    ReadOnly(u64),
    /// The access runs off the end of a page (translate) or wraps the address space.
    #[error("IOMMU fault: {len} bytes at IOVA {iova:#x} cross a page")]
    CrossesPage {
        /// Start of the access.
        iova: u64,
        /// Its length.
        len: usize,
    },
    /// All IOVAs of this IOMMU are in use.
    #[error("IOMMU address space full")]
    Full,
    /// `unmap` of an IOVA that is not the start of an entry.
    #[error("No IOMMU entry at {0:#x}")]
    NoEntry(u64),
}

/// Offset of `addr` within its page (always below `PAGE_SIZE`, so the cast cannot truncate).
#[allow(clippy::cast_possible_truncation)]
fn page_offset(addr: u64) -> usize {
    (addr % PAGE_SIZE as u64) as usize
}

/// Result of IOMMU operations.
pub type Result<T> = std::result::Result<T, IommuError>;

/// A page that DMA can reach: the hypervisor's handle on a domain's frame. Offsets and lengths
/// passed in are always within the page.
pub trait DmaPage: Send + Sync {
    /// Copy `buf.len()` bytes at `offset` of the page into `buf`.
    fn read(&self, offset: usize, buf: &mut [u8]);
    /// Copy `data` into the page at `offset`.
    fn write(&self, offset: usize, data: &[u8]);
}

/// An IOMMU entry.
#[derive(Clone)]
pub struct IommuEntry {
    /// The domain that owns the page.
    pub domain: u16,
    /// Its frame in that domain.
    pub frame: u64,
    /// Whether the device may write it.
    pub writable: bool,
    /// The page.
    pub page: Arc<dyn DmaPage>,
}

impl std::fmt::Debug for IommuEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IommuEntry")
            .field("domain", &self.domain)
            .field("frame", &self.frame)
            .field("writable", &self.writable)
            .finish_non_exhaustive()
    }
}

/// Where an IOVA leads (without the page itself).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// The domain that owns the page.
    pub domain: u16,
    /// Its frame.
    pub frame: u64,
    /// Byte offset within the page.
    pub offset: usize,
    /// Whether the entry is writable.
    pub writable: bool,
}

struct Table {
    /// IOVA page number → entry.
    entries: BTreeMap<u64, IommuEntry>,
    /// Freed IOVA page numbers, reused first.
    free: Vec<u64>,
    /// Next never-used IOVA page number.
    next: u64,
    /// One past the last IOVA page number.
    end: u64,
}

/// A device's IOMMU (held by the hypervisor, which alone maps and unmaps).
pub struct Iommu {
    table: RwLock<Table>,
    faults: AtomicU64,
}

impl Iommu {
    /// An IOMMU with room for `pages` simultaneous entries.
    pub fn new(pages: u64) -> Arc<Self> {
        let first = IOVA_BASE / PAGE_SIZE as u64;
        Arc::new(Self {
            table: RwLock::new(Table {
                entries: BTreeMap::new(),
                free: Vec::new(),
                next: first,
                end: first.saturating_add(pages),
            }),
            faults: AtomicU64::new(0),
        })
    }

    fn read(&self) -> RwLockReadGuard<'_, Table> {
        self.table.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Add an entry; returns its page-aligned IOVA.
    pub fn map(&self, entry: IommuEntry) -> Result<u64> {
        let mut t = self.write();
        let pfn = match t.free.pop() {
            Some(p) => p,
            None if t.next < t.end => {
                t.next += 1;
                t.next - 1
            }
            None => return Err(IommuError::Full),
        };
        t.entries.insert(pfn, entry);
        Ok(pfn * PAGE_SIZE as u64)
    }

    /// Remove the entry at `iova` (page-aligned, as `map` returned it); returns it. When this
    /// returns, no DMA can reach the page through this IOMMU.
    pub fn unmap(&self, iova: u64) -> Result<IommuEntry> {
        if iova % PAGE_SIZE as u64 != 0 {
            return Err(IommuError::NoEntry(iova));
        }
        let pfn = iova / PAGE_SIZE as u64;
        let mut t = self.write();
        let e = t.entries.remove(&pfn).ok_or(IommuError::NoEntry(iova))?;
        t.free.push(pfn);
        Ok(e)
    }

    /// Remove every entry for pages of `domain`; returns their IOVAs.
    pub fn unmap_domain(&self, domain: u16) -> Vec<u64> {
        let mut t = self.write();
        let gone: Vec<u64> = t
            .entries
            .iter()
            .filter(|(_, e)| e.domain == domain)
            .map(|(p, _)| *p)
            .collect();
        for p in &gone {
            t.entries.remove(p);
            t.free.push(*p);
        }
        gone.into_iter().map(|p| p * PAGE_SIZE as u64).collect()
    }

    /// Entries in the table.
    pub fn len(&self) -> usize {
        self.read().entries.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The entry at page-aligned `iova`, if any.
    pub fn entry(&self, iova: u64) -> Option<IommuEntry> {
        self.read().entries.get(&(iova / PAGE_SIZE as u64)).cloned()
    }

    /// The view device models use.
    pub fn device(self: &Arc<Self>) -> IommuDevice {
        IommuDevice {
            iommu: self.clone(),
        }
    }

    /// Faults counted so far.
    pub fn faults(&self) -> u64 {
        self.faults.load(Ordering::Relaxed)
    }

    fn fault<T>(&self, e: IommuError) -> Result<T> {
        self.faults.fetch_add(1, Ordering::Relaxed);
        Err(e)
    }

    /// Split `iova..iova+len` into per-page pieces `(page number, offset, length)`.
    fn pieces(iova: u64, len: usize) -> Option<Vec<(u64, usize, usize)>> {
        let end = iova.checked_add(len as u64)?;
        let mut out = Vec::new();
        let mut at = iova;
        while at < end {
            let pfn = at / PAGE_SIZE as u64;
            let off = page_offset(at);
            let n = (PAGE_SIZE - off).min(usize::try_from(end - at).ok()?);
            out.push((pfn, off, n));
            at += n as u64;
        }
        Some(out)
    }

    /// Check every page of an access under the lock; returns the entries in order.
    fn check<'t>(
        &self,
        t: &'t Table,
        iova: u64,
        len: usize,
        write: bool,
    ) -> Result<Vec<(&'t IommuEntry, usize, usize)>> {
        let Some(pieces) = Self::pieces(iova, len) else {
            return self.fault(IommuError::CrossesPage { iova, len });
        };
        let mut out = Vec::with_capacity(pieces.len());
        for (pfn, off, n) in pieces {
            let at = pfn * PAGE_SIZE as u64 + off as u64;
            match t.entries.get(&pfn) {
                None => return self.fault(IommuError::Unmapped(at)),
                Some(e) if write && !e.writable => return self.fault(IommuError::ReadOnly(at)),
                Some(e) => out.push((e, off, n)),
            }
        }
        Ok(out)
    }
}

/// A device model's view of its IOMMU: translate and DMA only.
#[derive(Clone)]
pub struct IommuDevice {
    iommu: Arc<Iommu>,
}

impl IommuDevice {
    /// Translate `len` bytes at `iova` (within one page) for a read or a write.
    pub fn translate(&self, iova: u64, len: usize, write: bool) -> Result<Translation> {
        let t = self.iommu.read();
        let off = page_offset(iova);
        if len == 0 || off + len > PAGE_SIZE {
            return self.iommu.fault(IommuError::CrossesPage { iova, len });
        }
        let (e, offset, _) = self.iommu.check(&t, iova, len, write)?[0];
        Ok(Translation {
            domain: e.domain,
            frame: e.frame,
            offset,
            writable: e.writable,
        })
    }

    /// DMA read of `buf.len()` bytes at `iova` (may span pages). Every page is checked before
    /// any byte moves: a fault reads nothing.
    pub fn dma_read(&self, iova: u64, buf: &mut [u8]) -> Result<()> {
        let t = self.iommu.read();
        let mut at = 0;
        for (e, off, n) in self.iommu.check(&t, iova, buf.len(), false)? {
            e.page.read(off, &mut buf[at..at + n]);
            at += n;
        }
        Ok(())
    }

    /// DMA write of `data` at `iova` (may span pages). Every page is checked before any byte
    /// moves: a fault writes nothing.
    pub fn dma_write(&self, iova: u64, data: &[u8]) -> Result<()> {
        let t = self.iommu.read();
        let mut at = 0;
        for (e, off, n) in self.iommu.check(&t, iova, data.len(), true)? {
            e.page.write(off, &data[at..at + n]);
            at += n;
        }
        Ok(())
    }

    /// Faults counted so far.
    pub fn faults(&self) -> u64 {
        self.iommu.faults()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    struct Mem(Mutex<Vec<u8>>);

    impl DmaPage for Mem {
        fn read(&self, offset: usize, buf: &mut [u8]) {
            buf.copy_from_slice(&self.0.lock().unwrap()[offset..offset + buf.len()]);
        }
        fn write(&self, offset: usize, data: &[u8]) {
            self.0.lock().unwrap()[offset..offset + data.len()].copy_from_slice(data);
        }
    }

    fn page() -> Arc<Mem> {
        Arc::new(Mem(Mutex::new(vec![0; PAGE_SIZE])))
    }

    fn entry(p: &Arc<Mem>, frame: u64, writable: bool) -> IommuEntry {
        IommuEntry {
            domain: 3,
            frame,
            writable,
            page: p.clone(),
        }
    }

    #[test]
    fn map_translate_dma_unmap() {
        let io = Iommu::new(16);
        let dev = io.device();
        let p = page();
        let iova = io.map(entry(&p, 9, true)).unwrap();
        assert!(iova >= IOVA_BASE && iova % PAGE_SIZE as u64 == 0);
        let t = dev.translate(iova + 100, 8, true).unwrap();
        assert_eq!(
            t,
            Translation {
                domain: 3,
                frame: 9,
                offset: 100,
                writable: true
            }
        );
        dev.dma_write(iova + 4094, b"ab").unwrap();
        let mut b = [0; 2];
        dev.dma_read(iova + 4094, &mut b).unwrap();
        assert_eq!(&b, b"ab");
        io.unmap(iova).unwrap();
        assert_eq!(dev.dma_read(iova, &mut b), Err(IommuError::Unmapped(iova)));
        assert_eq!(dev.faults(), 1);
        assert_eq!(io.unmap(iova).unwrap_err(), IommuError::NoEntry(iova));
    }

    #[test]
    fn faults_touch_no_memory() {
        let io = Iommu::new(16);
        let dev = io.device();
        let (a, b) = (page(), page());
        let ia = io.map(entry(&a, 1, true)).unwrap();
        let ib = io.map(entry(&b, 2, false)).unwrap();
        // A write spanning the writable and read-only page: nothing is written at all.
        let span = if ib == ia + PAGE_SIZE as u64 {
            ia + 4000
        } else {
            unreachable!()
        };
        assert_eq!(
            dev.dma_write(span, &[1; 200]),
            Err(IommuError::ReadOnly(ib))
        );
        assert!(a.0.lock().unwrap().iter().all(|x| *x == 0));
        // Reading across both works.
        let mut buf = [9u8; 200];
        dev.dma_read(span, &mut buf).unwrap();
        assert_eq!(buf, [0; 200]);
        assert_eq!(
            dev.translate(ia + 4000, 200, false).unwrap_err(),
            IommuError::CrossesPage {
                iova: ia + 4000,
                len: 200
            }
        );
        assert_eq!(
            dev.dma_read(u64::MAX - 1, &mut buf).unwrap_err(),
            IommuError::CrossesPage {
                iova: u64::MAX - 1,
                len: 200
            }
        );
        assert_eq!(
            dev.translate(0, 1, false).unwrap_err(),
            IommuError::Unmapped(0)
        );
        assert_eq!(dev.faults(), 4);
    }

    #[test]
    fn iovas_are_recycled_and_bounded() {
        let io = Iommu::new(2);
        let p = page();
        let a = io.map(entry(&p, 1, false)).unwrap();
        let _b = io.map(entry(&p, 2, false)).unwrap();
        assert_eq!(io.map(entry(&p, 3, false)).unwrap_err(), IommuError::Full);
        io.unmap(a).unwrap();
        assert_eq!(io.map(entry(&p, 3, false)).unwrap(), a);
        assert_eq!(io.unmap(a + 1).unwrap_err(), IommuError::NoEntry(a + 1));
        assert_eq!(io.unmap_domain(3).len(), 2);
        assert!(io.is_empty());
    }

    #[test]
    fn no_dma_lands_after_unmap_returns() {
        let io = Iommu::new(4);
        let dev = io.device();
        let p = page();
        let iova = io.map(entry(&p, 1, true)).unwrap();
        let writes = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut v = 1u8;
                while dev.dma_write(iova, &[v; 64]).is_ok() {
                    writes.fetch_add(1, Ordering::Relaxed);
                    v = v.wrapping_add(1).max(1);
                }
            });
            while writes.load(Ordering::Relaxed) < 100 {
                std::thread::yield_now();
            }
            io.unmap(iova).unwrap();
            let snap = p.0.lock().unwrap().clone();
            std::thread::sleep(std::time::Duration::from_millis(20));
            assert_eq!(*p.0.lock().unwrap(), snap, "a DMA write landed after unmap");
        });
        assert!(dev.faults() >= 1);
    }

    proptest::proptest! {
        /// Random map/unmap/DMA sequences: a DMA succeeds exactly when every page it touches
        /// is mapped (and writable for writes), and reads back what was last written.
        #[test]
        fn dma_matches_model(ops in proptest::collection::vec((0u8..4, 0usize..6, 0usize..8192, 1usize..5000), 1..60)) {
            let io = Iommu::new(6);
            let dev = io.device();
            let pages: Vec<_> = (0..6).map(|_| page()).collect();
            let mut mapped: BTreeMap<u64, (usize, bool)> = BTreeMap::new();
            let mut shadow = vec![vec![0u8; PAGE_SIZE]; 6];
            for (kind, idx, off, len) in ops {
                match kind {
                    0 => if let Ok(iova) = io.map(entry(&pages[idx], idx as u64, idx % 2 == 0)) {
                        proptest::prop_assert!(!mapped.contains_key(&iova));
                        mapped.insert(iova, (idx, idx % 2 == 0));
                    },
                    1 => if let Some(&iova) = mapped.keys().nth(idx % mapped.len().max(1)) {
                        io.unmap(iova).unwrap();
                        mapped.remove(&iova);
                    },
                    _ => {
                        let write = kind == 3;
                        let start = IOVA_BASE + off as u64;
                        let pieces = Iommu::pieces(start, len).unwrap();
                        let ok = pieces.iter().all(|(pfn, _, _)| mapped.get(&(pfn * PAGE_SIZE as u64)).is_some_and(|m| !write || m.1));
                        let data: Vec<u8> = (0..len).map(|i| u8::try_from((i ^ idx) % 251).unwrap()).collect();
                        if write {
                            let r = dev.dma_write(start, &data);
                            proptest::prop_assert_eq!(r.is_ok(), ok);
                            if ok {
                                let mut at = 0;
                                for (pfn, o, n) in pieces {
                                    let pi = mapped[&(pfn * PAGE_SIZE as u64)].0;
                                    shadow[pi][o..o + n].copy_from_slice(&data[at..at + n]);
                                    at += n;
                                }
                            }
                        } else {
                            let mut buf = vec![0u8; len];
                            let r = dev.dma_read(start, &mut buf);
                            proptest::prop_assert_eq!(r.is_ok(), ok);
                            if ok {
                                let mut at = 0;
                                for (pfn, o, n) in pieces {
                                    let pi = mapped[&(pfn * PAGE_SIZE as u64)].0;
                                    proptest::prop_assert_eq!(&buf[at..at + n], &shadow[pi][o..o + n]);
                                    at += n;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
