//! Event channels, 2-level ABI (`xen/include/public/event_channel.h`, `xen.h`).
//!
//! # Wire layout (x86-64)
//!
//! The event state of a domain lives in its `shared_info` page:
//!
//! | offset | field | meaning |
//! |---|---|---|
//! | 0 | `vcpu_info[32]`, 64 bytes each ([`VcpuInfo`]) | per-vCPU upcall flag and selector; only vCPU 0 is used here |
//! | 2048 | `evtchn_pending[64]` (u64) | bit *p* set: port *p* is pending |
//! | 2560 | `evtchn_mask[64]` (u64) | bit *p* set: port *p* is masked (no upcall) |
//!
//! In `vcpu_info[0]`: `evtchn_upcall_pending` (byte 0) says "look at the selector";
//! `evtchn_pending_sel` (u64 at 8) has bit *w* set when word *w* of `evtchn_pending` may hold
//! pending, unmasked ports. 64 words of 64 bits give [`EVTCHN_2L_NR_CHANNELS`] = 4096 ports.
//!
//! # Protocol
//!
//! Raising (the hypervisor, [`EventPage::set_pending`]): set the pending bit; only if it went
//! 0→1 and the port is unmasked, set the selector bit; only if that went 0→1, set
//! `evtchn_upcall_pending`; only if *that* went 0→1, deliver an upcall (signal the eventfd). So
//! a notification fires only when a channel first becomes pending while unmasked, and at most
//! one upcall is outstanding however many ports are raised.
//!
//! Scanning (the domain, [`EventPage::take_pending`]): clear `evtchn_upcall_pending`, swap the
//! selector with 0, and for each selected word take the pending ∧ ¬masked bits, clearing them.
//! Because the upcall flag is cleared *before* the selector is read, a port raised during the
//! scan either is seen by this scan or sets the upcall flag 0→1 again and delivers a new upcall:
//! no wake-up is lost.
//!
//! Unmasking ([`EventPage::unmask`]): clear the mask bit, then re-check pending; if pending,
//! raise the selector and upcall flag as above, so an event that arrived while masked is
//! delivered once unmasked.
//!
//! Every access is a sequentially consistent atomic: the raiser's "set pending, then read mask"
//! and the unmasker's "clear mask, then read pending" are a store-load pair on each side, which
//! needs `SeqCst` so that at least one of them sees the other (otherwise both could miss and the
//! event would stay pending without an upcall).

use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, AtomicU8, Ordering::SeqCst};

pub use crate::platform::Port;

/// `sizeof(xen_ulong_t)` on x86-64, in bits.
const BITS: u32 = 64;
/// `EVTCHN_2L_NR_CHANNELS`: ports of the 2-level ABI on x86-64.
pub const EVTCHN_2L_NR_CHANNELS: u32 = BITS * BITS;
/// `XEN_LEGACY_MAX_VCPUS` on x86.
pub const XEN_LEGACY_MAX_VCPUS: usize = 32;

/// `struct vcpu_time_info` (32 bytes); kept for the layout only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VcpuTimeInfo {
    /// Update counter (odd while updating).
    pub version: u32,
    /// Padding.
    pub pad0: u32,
    /// TSC at last update.
    pub tsc_timestamp: u64,
    /// Nanoseconds since boot at last update.
    pub system_time: u64,
    /// TSC to nanoseconds multiplier.
    pub tsc_to_system_mul: u32,
    /// TSC shift.
    pub tsc_shift: i8,
    /// `XEN_PVCLOCK_*` flags.
    pub flags: u8,
    /// Padding.
    pub pad1: [u8; 2],
}

/// `struct arch_vcpu_info` on x86-64 (16 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ArchVcpuInfo {
    /// Faulting address of a PV guest's last page fault.
    pub cr2: u64,
    /// Padding to 64 bytes of `vcpu_info`.
    pub pad: u64,
}

/// `struct vcpu_info` (64 bytes on x86). In shared memory: accessed through [`EventPage`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VcpuInfo {
    /// Non-zero: an upcall is pending; scan the selector.
    pub evtchn_upcall_pending: u8,
    /// PV upcall mask (`pad0` when `XEN_HAVE_PV_UPCALL_MASK` is unset); unused here.
    pub evtchn_upcall_mask: u8,
    /// Selector: bit *w* set when `evtchn_pending[w]` may hold pending, unmasked ports.
    pub evtchn_pending_sel: u64,
    /// Architecture-specific state.
    pub arch: ArchVcpuInfo,
    /// Time information.
    pub time: VcpuTimeInfo,
}

const _: () = assert!(core::mem::size_of::<VcpuTimeInfo>() == 32);
const _: () = assert!(core::mem::size_of::<ArchVcpuInfo>() == 16);
const _: () = assert!(core::mem::size_of::<VcpuInfo>() == 64);

/// Byte offset of `vcpu_info[0].evtchn_upcall_pending` in `shared_info`.
pub const UPCALL_PENDING_OFFSET: usize = core::mem::offset_of!(VcpuInfo, evtchn_upcall_pending);
/// Byte offset of `vcpu_info[0].evtchn_pending_sel` in `shared_info`.
pub const PENDING_SEL_OFFSET: usize = core::mem::offset_of!(VcpuInfo, evtchn_pending_sel);
/// `offsetof(struct shared_info, evtchn_pending)` on x86-64.
pub const EVTCHN_PENDING_OFFSET: usize = XEN_LEGACY_MAX_VCPUS * core::mem::size_of::<VcpuInfo>();
/// `offsetof(struct shared_info, evtchn_mask)` on x86-64.
pub const EVTCHN_MASK_OFFSET: usize = EVTCHN_PENDING_OFFSET + (BITS as usize) * 8;
/// `offsetof(struct shared_info, wc_version)`: end of the event-channel state.
pub const WC_VERSION_OFFSET: usize = EVTCHN_MASK_OFFSET + (BITS as usize) * 8;

/// `sizeof(struct shared_info)` on x86-64: the event state, the wall clock (4 × u32) and
/// `arch_shared_info` (6 × u64). It fits in the page.
pub const SHARED_INFO_SIZE: usize = WC_VERSION_OFFSET + 4 * 4 + 6 * 8;

const _: () = assert!(EVTCHN_PENDING_OFFSET == 2048 && EVTCHN_MASK_OFFSET == 2560);
const _: () = assert!(SHARED_INFO_SIZE <= 4096);
const _: () = assert!(WC_VERSION_OFFSET <= 4096);

/// A view of the event-channel state in a `shared_info` page shared with another party.
///
/// Holds a raw pointer, not a reference: the page is written concurrently by the hypervisor
/// and the domain, so every access goes through an atomic. Ports at or above
/// [`EVTCHN_2L_NR_CHANNELS`] are ignored (no bit is touched, `false` is returned).
///
/// Deliberately neither `Clone` nor `Copy`: a borrowed view cannot outlive its owner.
#[derive(Debug)]
pub struct EventPage {
    base: NonNull<u8>,
}

// SAFETY: the page is only accessed through atomics, which are safe to use from any thread;
// `EventPage::new`'s contract keeps the page mapped for the view's lifetime.
unsafe impl Send for EventPage {}
// SAFETY: as above: all shared accesses are atomic.
unsafe impl Sync for EventPage {}

impl EventPage {
    /// A view of the `shared_info` page at `page`.
    ///
    /// # Safety
    ///
    /// `page` must be 8-byte aligned, point to 4096 bytes that stay mapped (readable and
    /// writable) for as long as this view or any copy of it is used, and be accessed by others
    /// only through atomic operations at the offsets documented in this module (or not at all).
    pub unsafe fn new(page: NonNull<u8>) -> Self {
        debug_assert_eq!(page.as_ptr() as usize % 8, 0);
        Self { base: page }
    }

    fn word(&self, offset: usize) -> &AtomicU64 {
        debug_assert!(offset % 8 == 0 && offset + 8 <= 4096);
        // SAFETY: `offset` is one of this module's constants plus a word index below 64, so
        // it is 8-aligned and in the page (checked in debug); `new`'s contract keeps the page
        // mapped and only accessed atomically, so an `AtomicU64` reference to it is valid.
        unsafe { &*self.base.as_ptr().add(offset).cast::<AtomicU64>() }
    }

    fn upcall_flag(&self) -> &AtomicU8 {
        // SAFETY: byte 0 of the page, mapped per `new`'s contract and accessed atomically.
        unsafe {
            &*self
                .base
                .as_ptr()
                .add(UPCALL_PENDING_OFFSET)
                .cast::<AtomicU8>()
        }
    }

    fn selector(&self) -> &AtomicU64 {
        self.word(PENDING_SEL_OFFSET)
    }

    fn pending_word(&self, w: u32) -> &AtomicU64 {
        self.word(EVTCHN_PENDING_OFFSET + w as usize * 8)
    }

    fn mask_word(&self, w: u32) -> &AtomicU64 {
        self.word(EVTCHN_MASK_OFFSET + w as usize * 8)
    }

    fn split(port: Port) -> Option<(u32, u64)> {
        (port < EVTCHN_2L_NR_CHANNELS).then(|| (port / BITS, 1u64 << (port % BITS)))
    }

    /// Set the selector bit of word `w` and the upcall flag; true if an upcall must be
    /// delivered (both went 0→1).
    fn raise(&self, w: u32) -> bool {
        let sel = 1u64 << w;
        self.selector().fetch_or(sel, SeqCst) & sel == 0 && self.upcall_flag().swap(1, SeqCst) == 0
    }

    /// Mark `port` pending. True if the caller must deliver an upcall: the port went
    /// 0→1 pending while unmasked, and the selector bit and upcall flag went 0→1.
    pub fn set_pending(&self, port: Port) -> bool {
        let Some((w, bit)) = Self::split(port) else {
            return false;
        };
        if self.pending_word(w).fetch_or(bit, SeqCst) & bit != 0 {
            return false;
        }
        if self.mask_word(w).load(SeqCst) & bit != 0 {
            return false;
        }
        self.raise(w)
    }

    /// Clear `port`'s pending bit.
    pub fn clear_pending(&self, port: Port) {
        if let Some((w, bit)) = Self::split(port) {
            self.pending_word(w).fetch_and(!bit, SeqCst);
        }
    }

    /// Whether `port` is pending.
    pub fn is_pending(&self, port: Port) -> bool {
        Self::split(port).is_some_and(|(w, bit)| self.pending_word(w).load(SeqCst) & bit != 0)
    }

    /// Mask `port`: raising it sets it pending but delivers no upcall.
    pub fn mask(&self, port: Port) {
        if let Some((w, bit)) = Self::split(port) {
            self.mask_word(w).fetch_or(bit, SeqCst);
        }
    }

    /// Whether `port` is masked.
    pub fn is_masked(&self, port: Port) -> bool {
        Self::split(port).is_some_and(|(w, bit)| self.mask_word(w).load(SeqCst) & bit != 0)
    }

    /// Unmask `port` and re-check pending: true if it was pending and an upcall must be
    /// delivered (selector bit and upcall flag went 0→1).
    pub fn unmask(&self, port: Port) -> bool {
        let Some((w, bit)) = Self::split(port) else {
            return false;
        };
        if self.mask_word(w).fetch_and(!bit, SeqCst) & bit == 0 {
            // Was not masked: nothing held back by the mask.
            return false;
        }
        if self.pending_word(w).load(SeqCst) & bit == 0 {
            return false;
        }
        self.raise(w)
    }

    /// Whether the upcall flag is set.
    pub fn upcall_pending(&self) -> bool {
        self.upcall_flag().load(SeqCst) != 0
    }

    /// The domain's scan: clear the upcall flag, take the selector, and return the pending,
    /// unmasked ports of the selected words in ascending order, clearing their pending bits.
    pub fn take_pending(&self) -> Vec<Port> {
        self.scan(false)
    }

    /// As [`EventPage::take_pending`], but also mask each port returned (Linux's mask-and-ack):
    /// the caller unmasks it after handling it.
    pub fn take_pending_masked(&self) -> Vec<Port> {
        self.scan(true)
    }

    fn scan(&self, mask: bool) -> Vec<Port> {
        let mut out = Vec::new();
        // Clear the flag before reading the selector: a raise after this point either sets a
        // selector bit we are about to read, or finds the flag clear and delivers an upcall.
        self.upcall_flag().store(0, SeqCst);
        let mut sel = self.selector().swap(0, SeqCst);
        while sel != 0 {
            let w = sel.trailing_zeros();
            sel &= sel - 1;
            let ready = self.pending_word(w).load(SeqCst) & !self.mask_word(w).load(SeqCst);
            let mut bits = ready;
            while bits != 0 {
                let b = bits.trailing_zeros();
                bits &= bits - 1;
                let bit = 1u64 << b;
                if mask {
                    self.mask_word(w).fetch_or(bit, SeqCst);
                }
                // Only report ports whose bit we actually cleared (a concurrent clear wins).
                if self.pending_word(w).fetch_and(!bit, SeqCst) & bit != 0 {
                    out.push(w * BITS + b);
                }
            }
        }
        out
    }
}

/// What this module claims about Xen's `xen.h` and `event_channel.h` (x86-64).
pub fn abi_checks() -> Vec<crate::abi::AbiCheck> {
    use crate::abi::AbiCheck;
    let mut v = crate::abi_layout!(
        "struct vcpu_info",
        VcpuInfo {
            evtchn_upcall_pending,
            evtchn_pending_sel,
            arch,
            time
        }
    );
    v.extend(crate::abi_layout!(
        "struct arch_vcpu_info",
        ArchVcpuInfo { cr2, pad }
    ));
    v.extend(crate::abi_layout!(
        "struct vcpu_time_info",
        VcpuTimeInfo {
            version,
            tsc_timestamp,
            system_time,
            tsc_to_system_mul,
            tsc_shift,
            flags
        }
    ));
    v.push(AbiCheck::new(
        "offsetof(struct shared_info, evtchn_pending)",
        EVTCHN_PENDING_OFFSET,
    ));
    v.push(AbiCheck::new(
        "offsetof(struct shared_info, evtchn_mask)",
        EVTCHN_MASK_OFFSET,
    ));
    v.push(AbiCheck::new(
        "offsetof(struct shared_info, wc_version)",
        WC_VERSION_OFFSET,
    ));
    v.push(AbiCheck::new(
        "sizeof(struct shared_info)",
        SHARED_INFO_SIZE,
    ));
    v.push(AbiCheck::new(
        "offsetof(struct shared_info, vcpu_info[0].evtchn_pending_sel)",
        PENDING_SEL_OFFSET,
    ));
    v.push(AbiCheck::new(
        "sizeof(((struct shared_info *)0)->evtchn_pending)",
        BITS * 8,
    ));
    v.push(AbiCheck::new("XEN_LEGACY_MAX_VCPUS", XEN_LEGACY_MAX_VCPUS));
    v.push(AbiCheck::new(
        "EVTCHN_2L_NR_CHANNELS",
        EVTCHN_2L_NR_CHANNELS,
    ));
    v.push(AbiCheck::new(
        "sizeof(evtchn_port_t)",
        core::mem::size_of::<Port>(),
    ));
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    /// A zeroed, 8-aligned page for tests.
    struct Page(Box<[AtomicU64; 512]>);

    impl Page {
        fn new() -> Self {
            Page(Box::new([const { AtomicU64::new(0) }; 512]))
        }
        fn view(&self) -> EventPage {
            let p = NonNull::new(self.0.as_ptr() as *mut u8).unwrap();
            // SAFETY: the box is 4096 bytes of atomics, 8-aligned, alive while the test uses
            // the view, and only accessed atomically.
            unsafe { EventPage::new(p) }
        }
    }

    #[test]
    fn first_raise_delivers_second_does_not() {
        let p = Page::new();
        let e = p.view();
        assert!(e.set_pending(5));
        assert!(!e.set_pending(5));
        assert!(!e.set_pending(6), "upcall already outstanding");
        assert!(e.upcall_pending());
        assert_eq!(e.take_pending(), vec![5, 6]);
        assert!(!e.upcall_pending());
        assert!(e.set_pending(5));
    }

    #[test]
    fn masked_port_is_held_until_unmask() {
        let p = Page::new();
        let e = p.view();
        e.mask(100);
        assert!(!e.set_pending(100));
        assert!(e.is_pending(100));
        assert!(e.take_pending().is_empty());
        assert!(e.unmask(100));
        assert_eq!(e.take_pending(), vec![100]);
        assert!(!e.unmask(100), "not masked any more");
    }

    #[test]
    fn out_of_range_ports_touch_nothing() {
        let p = Page::new();
        let e = p.view();
        assert!(!e.set_pending(EVTCHN_2L_NR_CHANNELS));
        assert!(!e.set_pending(u32::MAX));
        e.mask(u32::MAX);
        assert!(!e.unmask(u32::MAX));
        assert!(!e.is_pending(u32::MAX));
        assert!(p.0.iter().all(|w| w.load(SeqCst) == 0));
    }

    #[test]
    fn wire_positions() {
        let p = Page::new();
        let e = p.view();
        e.set_pending(64 * 3 + 2);
        assert_eq!(p.0[EVTCHN_PENDING_OFFSET / 8 + 3].load(SeqCst), 1 << 2);
        assert_eq!(p.0[PENDING_SEL_OFFSET / 8].load(SeqCst), 1 << 3);
        assert_eq!(p.0[0].load(SeqCst) & 0xff, 1);
        e.mask(4095);
        assert_eq!(p.0[EVTCHN_MASK_OFFSET / 8 + 63].load(SeqCst), 1 << 63);
    }

    #[test]
    fn take_pending_masked_masks() {
        let p = Page::new();
        let e = p.view();
        e.set_pending(9);
        assert_eq!(e.take_pending_masked(), vec![9]);
        assert!(e.is_masked(9) && !e.is_pending(9));
        assert!(!e.set_pending(9));
        assert!(e.unmask(9));
    }

    #[test]
    fn concurrent_raises_are_all_delivered() {
        let p = Page::new();
        let e = p.view();
        let kicks = AtomicU64::new(0);
        let seen = std::sync::Mutex::new(BTreeSet::new());
        std::thread::scope(|s| {
            s.spawn(|| {
                for port in 1..2000u32 {
                    if e.set_pending(port) {
                        kicks.fetch_add(1, SeqCst);
                    }
                }
            });
            s.spawn(|| {
                let mut got = 0;
                while got < 1999 {
                    if kicks.load(SeqCst) > 0 {
                        kicks.fetch_sub(1, SeqCst);
                        let ports = e.take_pending();
                        got += ports.len();
                        seen.lock().unwrap().extend(ports);
                    } else {
                        std::thread::yield_now();
                    }
                }
            });
        });
        assert_eq!(seen.into_inner().unwrap(), (1..2000).collect());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Send(Port),
        Mask(Port),
        Unmask(Port),
        Scan,
    }

    fn op() -> impl Strategy<Value = Op> {
        // Few ports so that the same port is hit often; two of them share a word, one is in
        // the last word, one is out of range.
        let port = prop::sample::select(vec![0u32, 1, 63, 64, 4095, 4096]);
        prop_oneof![
            3 => port.clone().prop_map(Op::Send),
            1 => port.clone().prop_map(Op::Mask),
            1 => port.prop_map(Op::Unmask),
            2 => Just(Op::Scan),
        ]
    }

    proptest! {
        #[test]
        fn matches_model(ops in prop::collection::vec(op(), 1..200)) {
            let p = Page::new();
            let e = p.view();
            let mut pending = BTreeSet::new();
            let mut masked = BTreeSet::new();
            let mut kicks = 0u32; // upcalls delivered and not yet consumed
            for op in ops {
                match op {
                    Op::Send(port) => {
                        if e.set_pending(port) { kicks += 1; }
                        if port < EVTCHN_2L_NR_CHANNELS { pending.insert(port); }
                    }
                    Op::Mask(port) => {
                        e.mask(port);
                        if port < EVTCHN_2L_NR_CHANNELS { masked.insert(port); }
                    }
                    Op::Unmask(port) => {
                        if e.unmask(port) { kicks += 1; }
                        masked.remove(&port);
                    }
                    Op::Scan => {
                        // The domain only scans after an upcall.
                        if kicks > 0 {
                            kicks = 0;
                            let got: BTreeSet<Port> = e.take_pending().into_iter().collect();
                            let want: BTreeSet<Port> = pending.difference(&masked).copied().collect();
                            prop_assert_eq!(&got, &want, "no spurious delivery, none missed");
                            for q in &got { pending.remove(q); }
                        }
                    }
                }
                // No lost wake-up: a pending, unmasked port always has an upcall outstanding.
                if pending.iter().any(|q| !masked.contains(q)) {
                    prop_assert!(kicks > 0, "pending unmasked port without upcall");
                }
                // At most one upcall outstanding between scans.
                prop_assert!(kicks <= 1);
                for q in [0u32, 1, 63, 64, 4095] {
                    prop_assert_eq!(e.is_pending(q), pending.contains(&q));
                    prop_assert_eq!(e.is_masked(q), masked.contains(&q));
                }
            }
        }
    }
}
