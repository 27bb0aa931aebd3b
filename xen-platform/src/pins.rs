//! The pin cache behind `XenPlatform::pin_grant`: guest grants mapped for the in-process
//! device's DMA, entered in a software IOMMU, reference-counted, and kept mapped while the
//! frontend uses persistent grants.
//!
//! One entry per `(domain, gref)`, with one IOVA for its lifetime:
//!
//! * *pin*: a cached entry that allows the access (writable, or a read-only pin) gets one more
//!   reference and the same IOVA. Otherwise the grant is mapped (by the caller's mapper) and
//!   entered in the IOMMU; when the cache is full, the least recently used entry with no pins
//!   is unmapped first, and if every entry is pinned the pin fails ([`PlatformError::Exhausted`]).
//! * *unpin*: one reference less; at zero the entry stays mapped when persistent, and is
//!   unmapped at once when not (a frontend without persistent grants revokes its grant after
//!   the response and must find it unmapped).
//!
//! Removing an entry from the IOMMU drops the last reference to its page, which unmaps it; once
//! `Iommu::unmap` returned, no DMA can reach the page (the IOMMU's guarantee).

use devchan::grant::{status, DomId, GrantRef};
use devchan::platform::{PlatformError, Result};
use iospace::iommu::{DmaPage, Iommu, IommuEntry};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Debug)]
struct Pin {
    iova: u64,
    refs: u32,
    writable: bool,
    last_use: u64,
}

#[derive(Debug, Default)]
struct Pins {
    by_grant: HashMap<(DomId, GrantRef), Pin>,
    by_iova: HashMap<u64, (DomId, GrantRef)>,
    clock: u64,
}

/// Counters of the pin cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PinStats {
    /// Grants currently mapped for DMA.
    pub mapped: usize,
    /// Of those, pinned now.
    pub pinned: usize,
}

/// A page the mapper made: the DMA page and whether it is mapped writable.
pub type Mapped = (Arc<dyn DmaPage>, bool);

/// The cache (see the module docs).
pub struct PinCache {
    iommu: Arc<Iommu>,
    pins: Mutex<Pins>,
    max: usize,
}

impl std::fmt::Debug for PinCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinCache")
            .field("stats", &self.stats())
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

impl PinCache {
    /// A cache keeping at most `max` grants mapped, over `iommu`.
    pub fn new(iommu: Arc<Iommu>, max: usize) -> Self {
        Self {
            iommu,
            pins: Mutex::new(Pins::default()),
            max: max.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Pins> {
        self.pins.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn remove(&self, pins: &mut Pins, key: (DomId, GrantRef)) {
        if let Some(p) = pins.by_grant.remove(&key) {
            pins.by_iova.remove(&p.iova);
            let _ = self.iommu.unmap(p.iova);
        }
    }

    /// Pin `gref` of `peer`; `map(writable)` maps it when it is not cached (it is asked for a
    /// writable mapping when `writable`, and may return a read-only one otherwise).
    pub fn pin(
        &self,
        peer: DomId,
        gref: GrantRef,
        writable: bool,
        map: impl FnOnce(bool) -> Result<Mapped>,
    ) -> Result<u64> {
        let mut pins = self.lock();
        pins.clock += 1;
        let now = pins.clock;
        let key = (peer, gref);
        if let Some(p) = pins.by_grant.get_mut(&key) {
            if p.writable || !writable {
                p.refs += 1;
                p.last_use = now;
                return Ok(p.iova);
            }
            if p.refs > 0 {
                return Err(PlatformError::Grant(status::PERMISSION_DENIED));
            }
            // Mapped read-only, idle, now wanted writable: map it again.
            self.remove(&mut pins, key);
        }
        if pins.by_grant.len() >= self.max {
            let victim = pins
                .by_grant
                .iter()
                .filter(|(_, p)| p.refs == 0)
                .min_by_key(|(_, p)| p.last_use)
                .map(|(k, _)| *k)
                .ok_or(PlatformError::Exhausted("grant mappings for DMA"))?;
            self.remove(&mut pins, victim);
        }
        let (page, mapped_writable) = map(writable)?;
        if writable && !mapped_writable {
            return Err(PlatformError::Grant(status::PERMISSION_DENIED));
        }
        let iova = self
            .iommu
            .map(IommuEntry {
                domain: peer,
                frame: u64::from(gref),
                writable: mapped_writable,
                page,
            })
            .map_err(|_| PlatformError::Exhausted("IOVAs"))?;
        pins.by_grant.insert(
            key,
            Pin {
                iova,
                refs: 1,
                writable: mapped_writable,
                last_use: now,
            },
        );
        pins.by_iova.insert(iova, key);
        Ok(iova)
    }

    /// Drop one pin of `iova`; unmap the grant when it is no longer pinned and `persistent`
    /// is off.
    pub fn unpin(&self, iova: u64, persistent: bool) -> Result<()> {
        let mut pins = self.lock();
        let key = *pins
            .by_iova
            .get(&iova)
            .ok_or(PlatformError::Grant(status::BAD_DEV_ADDR))?;
        let Some(p) = pins.by_grant.get_mut(&key).filter(|p| p.refs > 0) else {
            return Err(PlatformError::Grant(status::BAD_DEV_ADDR));
        };
        p.refs -= 1;
        if p.refs == 0 && !persistent {
            self.remove(&mut pins, key);
        }
        Ok(())
    }

    /// Whether `gref` of `peer` is pinned now.
    pub fn is_pinned(&self, peer: DomId, gref: GrantRef) -> bool {
        self.lock()
            .by_grant
            .get(&(peer, gref))
            .is_some_and(|p| p.refs > 0)
    }

    /// Unmap `gref` of `peer` if it is cached and not pinned; false if it is pinned.
    pub fn forget(&self, peer: DomId, gref: GrantRef) -> bool {
        let mut pins = self.lock();
        match pins.by_grant.get(&(peer, gref)) {
            Some(p) if p.refs > 0 => false,
            Some(_) => {
                self.remove(&mut pins, (peer, gref));
                true
            }
            None => true,
        }
    }

    /// Unmap every grant that is not pinned.
    pub fn drop_idle(&self) {
        let mut pins = self.lock();
        let idle: Vec<(DomId, GrantRef)> = pins
            .by_grant
            .iter()
            .filter(|(_, p)| p.refs == 0)
            .map(|(k, _)| *k)
            .collect();
        for k in idle {
            self.remove(&mut pins, k);
        }
    }

    /// Counters.
    pub fn stats(&self) -> PinStats {
        let pins = self.lock();
        PinStats {
            mapped: pins.by_grant.len(),
            pinned: pins.by_grant.values().filter(|p| p.refs > 0).count(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A page that counts how many of its kind are alive (mapped).
    struct Page(Arc<AtomicUsize>, Mutex<[u8; 4096]>);
    impl Page {
        fn alive(live: &Arc<AtomicUsize>) -> Arc<dyn DmaPage> {
            live.fetch_add(1, Ordering::SeqCst);
            Arc::new(Self(live.clone(), Mutex::new([0; 4096])))
        }
    }
    impl Drop for Page {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    impl DmaPage for Page {
        fn read(&self, o: usize, b: &mut [u8]) {
            b.copy_from_slice(&self.1.lock().unwrap()[o..o + b.len()]);
        }
        fn write(&self, o: usize, d: &[u8]) {
            self.1.lock().unwrap()[o..o + d.len()].copy_from_slice(d);
        }
    }

    fn cache(max: usize) -> (PinCache, Arc<Iommu>, Arc<AtomicUsize>) {
        let iommu = Iommu::new(64);
        (
            PinCache::new(iommu.clone(), max),
            iommu,
            Arc::new(AtomicUsize::new(0)),
        )
    }

    #[test]
    fn persistent_pins_reuse_one_mapping_and_iova() {
        let (c, iommu, live) = cache(4);
        let mut maps = 0;
        let mut pin = |w| {
            c.pin(1, 8, w, |_| {
                maps += 1;
                Ok((Page::alive(&live), true))
            })
        };
        let a = pin(true).unwrap();
        let b = pin(false).unwrap();
        assert_eq!(a, b);
        c.unpin(a, true).unwrap();
        c.unpin(a, true).unwrap();
        assert!(c.unpin(a, true).is_err(), "one unpin too many");
        assert_eq!((maps, live.load(Ordering::SeqCst)), (1, 1));
        assert_eq!(
            c.stats(),
            PinStats {
                mapped: 1,
                pinned: 0
            }
        );
        // DMA still reaches the idle persistent entry.
        iommu.device().dma_write(a + 8, b"x").unwrap();
        c.drop_idle();
        assert_eq!(live.load(Ordering::SeqCst), 0);
        assert!(iommu.device().dma_write(a, b"x").is_err());
    }

    #[test]
    fn without_persistence_the_last_unpin_unmaps() {
        let (c, _, live) = cache(4);
        let a = c
            .pin(1, 8, false, |_| Ok((Page::alive(&live), false)))
            .unwrap();
        // A read-only mapping cannot serve a writable pin while pinned.
        let e = c.pin(1, 8, true, |_| Ok((Page::alive(&live), true)));
        assert_eq!(e, Err(PlatformError::Grant(status::PERMISSION_DENIED)));
        c.unpin(a, false).unwrap();
        assert_eq!(live.load(Ordering::SeqCst), 0);
        assert!(c.unpin(a, false).is_err());
    }

    #[test]
    fn a_full_cache_evicts_the_least_recently_used_idle_grant() {
        let (c, _, live) = cache(2);
        let maps = AtomicUsize::new(0);
        let m = |_| {
            maps.fetch_add(1, Ordering::SeqCst);
            Ok((Page::alive(&live), true))
        };
        let a = c.pin(1, 1, true, m).unwrap();
        let b = c.pin(1, 2, true, m).unwrap();
        // Both pinned: no room.
        assert_eq!(
            c.pin(1, 3, true, m),
            Err(PlatformError::Exhausted("grant mappings for DMA"))
        );
        c.unpin(b, true).unwrap();
        c.unpin(a, true).unwrap();
        // Grant 1 is cached (no new mapping); grant 3 evicts grant 2, the least recently used.
        assert_eq!(c.pin(1, 1, true, m).unwrap(), a);
        assert_eq!(maps.load(Ordering::SeqCst), 2);
        let d = c.pin(1, 3, true, m).unwrap();
        assert_eq!(maps.load(Ordering::SeqCst), 3);
        assert_eq!(
            c.stats(),
            PinStats {
                mapped: 2,
                pinned: 2
            }
        );
        assert_eq!(live.load(Ordering::SeqCst), 2);
        c.unpin(d, true).unwrap();
        // Grant 2 must be mapped again (evicting grant 3, the only idle one).
        c.pin(1, 2, true, m).unwrap();
        assert_eq!(maps.load(Ordering::SeqCst), 4);
        // A failing mapper leaves nothing behind.
        let e = c.pin(2, 9, true, |_| {
            Err(PlatformError::Grant(status::BAD_GNTREF))
        });
        assert!(e.is_err());
        assert_eq!(c.stats().mapped, live.load(Ordering::SeqCst));
    }

    proptest! {
        /// Any sequence of pins and unpins keeps the books: every live mapping is in the
        /// cache, pinned counts match, nothing beyond `max` stays mapped.
        #[test]
        fn books_balance(ops in proptest::collection::vec((0u32..6, any::<bool>(), any::<bool>()), 0..80)) {
            let (c, _, live) = cache(3);
            let mut held: Vec<u64> = Vec::new();
            for (gref, writable, unpin) in ops {
                if unpin {
                    if let Some(iova) = held.pop() {
                        prop_assert!(c.unpin(iova, gref % 2 == 0).is_ok());
                    }
                } else if let Ok(iova) = c.pin(1, gref, writable, |w| Ok((Page::alive(&live), w || gref % 3 != 0))) {
                    held.push(iova);
                }
                let s = c.stats();
                prop_assert_eq!(s.mapped, live.load(Ordering::SeqCst));
                prop_assert!(s.mapped <= 3);
                prop_assert!(s.pinned <= held.len());
            }
        }
    }
}
