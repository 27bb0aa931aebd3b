//! Device memory as `vm-memory` sees it, translated through the IOMMU.
//!
//! `virtio-queue` reads descriptors and rings through `vm_memory::GuestMemory`. With
//! `VIRTIO_F_ACCESS_PLATFORM` every address the driver writes into a ring is an IOVA, so
//! [`IommuMemory`] presents the whole 64-bit IOVA space as one region whose every access is
//! an [`IommuDevice::dma_read`]/[`IommuDevice::dma_write`]: there is no host pointer and no
//! cached translation, so once the hypervisor unmaps a page no access can reach it, and an
//! unmapped or read-only IOVA is a `GuestMemoryError`, never memory. Each fault is also
//! counted here, because `virtio-queue` turns some errors into "no more descriptors"; the
//! device compares the count before and after a queue operation to tell the two apart.
//!
//! Ordering: `load`/`store` (used for the ring indices) copy the value with one naturally
//! aligned access in `DmaPage` (vm-memory's volatile copy uses the widest aligned width), and
//! put a fence of the requested ordering on the correct side of it.

use crate::iommu::IommuDevice;
use std::io::{Read, Write};
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::Arc;
use vm_memory::{
    AtomicAccess, Bytes, GuestAddress, GuestMemory, GuestMemoryError, GuestMemoryRegion,
    GuestUsize, MemoryRegionAddress,
};

/// Largest single copy through `read_from`/`write_to` (bounded so a guest length cannot make
/// the device allocate without limit).
pub const MAX_COPY: usize = 1 << 20;

/// The IOVA space as one region.
#[derive(Clone)]
pub struct IommuRegion {
    dev: IommuDevice,
    faults: Arc<AtomicU64>,
}

/// The IOVA space as guest memory.
#[derive(Clone)]
pub struct IommuMemory {
    region: IommuRegion,
}

impl IommuMemory {
    /// Memory seen through `dev`.
    pub fn new(dev: IommuDevice) -> Self {
        Self {
            region: IommuRegion {
                dev,
                faults: Arc::new(AtomicU64::new(0)),
            },
        }
    }

    /// Faults seen through this memory so far.
    pub fn faults(&self) -> u64 {
        self.region.faults.load(Ordering::Relaxed)
    }

    /// The IOMMU view.
    pub fn device(&self) -> &IommuDevice {
        &self.region.dev
    }
}

impl IommuRegion {
    fn fault(&self, addr: MemoryRegionAddress) -> GuestMemoryError {
        self.faults.fetch_add(1, Ordering::Relaxed);
        GuestMemoryError::InvalidGuestAddress(GuestAddress(addr.0))
    }

    fn dma_read(&self, addr: MemoryRegionAddress, buf: &mut [u8]) -> Result<(), GuestMemoryError> {
        self.dev.dma_read(addr.0, buf).map_err(|_| self.fault(addr))
    }

    fn dma_write(&self, addr: MemoryRegionAddress, data: &[u8]) -> Result<(), GuestMemoryError> {
        self.dev
            .dma_write(addr.0, data)
            .map_err(|_| self.fault(addr))
    }
}

/// An 8-byte-aligned scratch buffer, big enough for any `AtomicAccess` value.
#[repr(C, align(8))]
struct Scratch([u8; 8]);

impl Bytes<MemoryRegionAddress> for IommuRegion {
    type E = GuestMemoryError;

    fn write(&self, buf: &[u8], addr: MemoryRegionAddress) -> Result<usize, Self::E> {
        self.dma_write(addr, buf).map(|()| buf.len())
    }

    fn read(&self, buf: &mut [u8], addr: MemoryRegionAddress) -> Result<usize, Self::E> {
        self.dma_read(addr, buf).map(|()| buf.len())
    }

    fn write_slice(&self, buf: &[u8], addr: MemoryRegionAddress) -> Result<(), Self::E> {
        self.dma_write(addr, buf)
    }

    fn read_slice(&self, buf: &mut [u8], addr: MemoryRegionAddress) -> Result<(), Self::E> {
        self.dma_read(addr, buf)
    }

    fn read_from<F: Read>(
        &self,
        addr: MemoryRegionAddress,
        src: &mut F,
        count: usize,
    ) -> Result<usize, Self::E> {
        let mut buf = vec![0u8; count.min(MAX_COPY)];
        let n = src.read(&mut buf).map_err(GuestMemoryError::IOError)?;
        self.dma_write(addr, &buf[..n]).map(|()| n)
    }

    fn read_exact_from<F: Read>(
        &self,
        addr: MemoryRegionAddress,
        src: &mut F,
        count: usize,
    ) -> Result<(), Self::E> {
        if count > MAX_COPY {
            return Err(GuestMemoryError::PartialBuffer {
                expected: count,
                completed: 0,
            });
        }
        let mut buf = vec![0u8; count];
        src.read_exact(&mut buf)
            .map_err(GuestMemoryError::IOError)?;
        self.dma_write(addr, &buf)
    }

    fn write_to<F: Write>(
        &self,
        addr: MemoryRegionAddress,
        dst: &mut F,
        count: usize,
    ) -> Result<usize, Self::E> {
        let mut buf = vec![0u8; count.min(MAX_COPY)];
        self.dma_read(addr, &mut buf)?;
        dst.write(&buf).map_err(GuestMemoryError::IOError)
    }

    fn write_all_to<F: Write>(
        &self,
        addr: MemoryRegionAddress,
        dst: &mut F,
        count: usize,
    ) -> Result<(), Self::E> {
        if count > MAX_COPY {
            return Err(GuestMemoryError::PartialBuffer {
                expected: count,
                completed: 0,
            });
        }
        let mut buf = vec![0u8; count];
        self.dma_read(addr, &mut buf)?;
        dst.write_all(&buf).map_err(GuestMemoryError::IOError)
    }

    fn store<T: AtomicAccess>(
        &self,
        val: T,
        addr: MemoryRegionAddress,
        order: Ordering,
    ) -> Result<(), Self::E> {
        // Release (or stronger): everything written before (used elements) is visible before
        // the index that publishes it.
        if order != Ordering::Relaxed {
            fence(if order == Ordering::SeqCst {
                Ordering::SeqCst
            } else {
                Ordering::Release
            });
        }
        self.dma_write(addr, val.as_slice())
    }

    fn load<T: AtomicAccess>(
        &self,
        addr: MemoryRegionAddress,
        order: Ordering,
    ) -> Result<T, Self::E> {
        let n = std::mem::size_of::<T>();
        let mut s = Scratch([0; 8]);
        let buf =
            s.0.get_mut(..n)
                .ok_or(GuestMemoryError::InvalidBackendAddress)?;
        self.dma_read(addr, buf)?;
        // Acquire (or stronger): ring entries published before the index are read after it.
        if order != Ordering::Relaxed {
            fence(Ordering::Acquire);
        }
        T::from_slice(&s.0[..n])
            .copied()
            .ok_or(GuestMemoryError::InvalidBackendAddress)
    }
}

impl GuestMemoryRegion for IommuRegion {
    type B = ();

    fn len(&self) -> GuestUsize {
        // The whole IOVA space but its last byte (so `last_addr` cannot overflow).
        u64::MAX
    }

    fn start_addr(&self) -> GuestAddress {
        GuestAddress(0)
    }

    fn bitmap(&self) -> &Self::B {
        &()
    }
}

impl GuestMemory for IommuMemory {
    type R = IommuRegion;

    fn num_regions(&self) -> usize {
        1
    }

    fn find_region(&self, addr: GuestAddress) -> Option<&IommuRegion> {
        (addr.0 < u64::MAX).then_some(&self.region)
    }

    fn iter(&self) -> impl Iterator<Item = &IommuRegion> {
        std::iter::once(&self.region)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iommu::{DmaPage, Iommu, IommuEntry, PAGE_SIZE};
    use std::sync::Mutex;

    pub(crate) struct Page(pub Mutex<Vec<u8>>);
    impl DmaPage for Page {
        fn read(&self, offset: usize, buf: &mut [u8]) {
            buf.copy_from_slice(&self.0.lock().unwrap()[offset..offset + buf.len()]);
        }
        fn write(&self, offset: usize, data: &[u8]) {
            self.0.lock().unwrap()[offset..offset + data.len()].copy_from_slice(data);
        }
    }

    #[test]
    fn reads_writes_and_faults_through_iommu() {
        let io = Iommu::new(4);
        let page = Arc::new(Page(Mutex::new(vec![0; PAGE_SIZE])));
        let iova = io
            .map(IommuEntry {
                domain: 1,
                frame: 7,
                writable: true,
                page: page.clone(),
            })
            .unwrap();
        let mem = IommuMemory::new(io.device());
        mem.write_obj(0x1234u16, GuestAddress(iova + 2)).unwrap();
        assert_eq!(mem.read_obj::<u16>(GuestAddress(iova + 2)).unwrap(), 0x1234);
        let v: u16 = mem.load(GuestAddress(iova + 2), Ordering::Acquire).unwrap();
        assert_eq!(v, 0x1234);
        mem.store(0xdead_beefu32, GuestAddress(iova + 8), Ordering::Release)
            .unwrap();
        assert_eq!(
            &page.0.lock().unwrap()[8..12],
            &0xdead_beefu32.to_le_bytes()
        );
        assert_eq!(mem.faults(), 0);
        assert!(mem.read_obj::<u64>(GuestAddress(iova - 8)).is_err());
        assert!(mem
            .load::<u16>(GuestAddress(0x10), Ordering::Acquire)
            .is_err());
        assert_eq!(mem.faults(), 2);
        io.unmap(iova).unwrap();
        assert!(mem.read_obj::<u16>(GuestAddress(iova)).is_err());
        assert_eq!(mem.faults(), 3);
        assert!(mem.address_in_range(GuestAddress(iova)));
    }
}
