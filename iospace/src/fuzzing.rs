//! Fuzz bodies (shared by `iospace/fuzz` targets and the unit tests below).
//!
//! [`config_ops`] decodes its input into a sequence of config-space operations by a driver
//! domain through an [`IoSpace`] virtualized view (7 bytes each: `op, offset, width, value
//! le32`) and checks after every one that the I/O Space kept its promises: the device's BARs
//! never move, the manager's command policy bits never change, a refused write leaves the
//! device's config space untouched, and every refusal is counted exactly once.
//!
//! [`virtio_ops`] drives a virtio-blk-pci device through its I/O Space the way a hostile
//! driver domain could (12 bytes each: `op, a: le16, b: u8, value: le64`): register writes and
//! reads in both BARs, config writes, arbitrary bytes in its pinned pages (descriptors, rings,
//! headers), a shortcut that brings a queue up, notifications, and unmap/remap of pages while
//! requests are in flight. It must never panic, in the caller or in the device's workers.

use crate::emu::virtio_blk::{BlkConfig, VirtioBlk};
use crate::emu::virtio_pci::{common, VirtioPci, MSIX_BAR, VIRTIO_BAR};
use crate::emu::{PciBus, PciDevice, StubDevice};
use crate::iommu::{DmaPage, Iommu, IommuEntry, PAGE_SIZE};
use crate::pci::bar::bar_offset;
use crate::pci::{Bdf, COMMAND, CONFIG_SPACE_SIZE};
use crate::space::{IoSpace, COMMAND_POLICY_BITS};
use std::sync::Arc;
use std::sync::Mutex;

fn snapshot(dev: &dyn PciDevice) -> Vec<u32> {
    (0..CONFIG_SPACE_SIZE / 4)
        .map(|i| dev.config_read(u16::try_from(i * 4).unwrap_or(0)))
        .collect()
}

/// Run the operations encoded in `data`; panics if an invariant breaks.
pub fn config_ops(data: &[u8]) {
    let bus = PciBus::new();
    let dev = Arc::new(StubDevice::new(StubDevice::example_config()));
    let Ok(bdf) = bus.plug(1, dev.clone()) else {
        return;
    };
    let Ok(space) = IoSpace::new(bdf, dev.clone()) else {
        return;
    };
    let bars: Vec<u32> = IoSpace::bar_offsets().map(|o| dev.config_read(o)).collect();
    let policy = dev.config_read(COMMAND) & u32::from(COMMAND_POLICY_BITS);
    let mut refused = 0u64;
    for op in data.chunks_exact(7) {
        let offset = u16::from(op[1]);
        let width = [1usize, 2, 4, 3][usize::from(op[2] & 3)];
        let value = [op[3], op[4], op[5], op[6]];
        let target = if op[0] & 0x80 != 0 {
            Bdf::new(0, op[0] & 0x1f, 0).unwrap_or(bdf)
        } else {
            bdf
        };
        let before = snapshot(dev.as_ref());
        let ok = match op[0] & 3 {
            0 | 1 => space.config_read(target, offset, width).is_ok(),
            2 => space.config_write(target, offset, &value[..width]).is_ok(),
            _ => {
                // BAR-sizing shaped writes: all ones, then a read, on a BAR offset.
                let bar = bar_offset(usize::from(offset % 6));
                let w = space.config_write(target, bar, &[0xff; 4]).is_ok();
                let r = space.config_read(target, bar, 4).is_ok();
                refused += u64::from(!w) + u64::from(!r);
                w && r
            }
        };
        if op[0] & 3 != 3 && !ok {
            refused += 1;
            assert_eq!(
                before,
                snapshot(dev.as_ref()),
                "a refused access changed the device"
            );
        }
        let now: Vec<u32> = IoSpace::bar_offsets().map(|o| dev.config_read(o)).collect();
        assert_eq!(now, bars, "a BAR moved");
        let cmd = dev.config_read(COMMAND) & u32::from(COMMAND_POLICY_BITS);
        assert_eq!(cmd, policy, "the command policy changed");
        assert_eq!(space.violations(), refused, "violations miscounted");
    }
}

struct FuzzPage(Mutex<Vec<u8>>);

impl DmaPage for FuzzPage {
    fn read(&self, offset: usize, buf: &mut [u8]) {
        let p = crate::emu::lock(&self.0);
        if let Some(src) = p.get(offset..offset + buf.len()) {
            buf.copy_from_slice(src);
        }
    }
    fn write(&self, offset: usize, data: &[u8]) {
        let mut p = crate::emu::lock(&self.0);
        if let Some(dst) = p.get_mut(offset..offset + data.len()) {
            dst.copy_from_slice(data);
        }
    }
}

/// Run the virtio-blk operations encoded in `data`; panics only on a bug.
pub fn virtio_ops(data: &[u8]) {
    run_virtio_ops(data, |_| {});
}

/// The body of [`virtio_ops`]; `before_reset` sees the ring page before the final reset.
fn run_virtio_ops(data: &[u8], before_reset: impl FnOnce(&FuzzPage)) {
    let path = std::env::temp_dir().join(format!(
        "iospace-fuzz-{}-{:?}.img",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_file(&path);
    let Ok(blk) = VirtioBlk::new(&BlkConfig {
        path: path.clone(),
        size: 64 << 10,
        read_only: false,
        serial: "fuzz".into(),
        workers: 2,
    }) else {
        return;
    };
    let iommu = Iommu::new(8);
    let Ok(dev) = VirtioPci::new(Arc::new(blk), iommu.device(), 5) else {
        return;
    };
    let dev = Arc::new(dev);
    let bus = PciBus::new();
    let Ok(bdf) = bus.plug(2, dev.clone()) else {
        return;
    };
    let Ok(space) = IoSpace::new(bdf, dev.clone()) else {
        return;
    };
    let pages: Vec<Arc<FuzzPage>> = (0..4)
        .map(|_| Arc::new(FuzzPage(Mutex::new(vec![0; PAGE_SIZE]))))
        .collect();
    let entry = |i: usize| IommuEntry {
        domain: 1,
        frame: i as u64,
        writable: i != 3,
        page: pages[i].clone(),
    };
    let mut iovas: Vec<Option<u64>> = (0..4).map(|i| iommu.map(entry(i)).ok()).collect();
    let bar = |i| space.info().bar(i).map_or(0, |b| b.address);
    let (vbar, mbar) = (bar(VIRTIO_BAR), bar(MSIX_BAR));
    let common_w = |off: u64, v: &[u8]| {
        let _ = space.mmio_write(vbar + off, v);
    };
    for op in data.chunks_exact(12) {
        let a = u64::from(u16::from_le_bytes([op[1], op[2]]));
        let width = [1usize, 2, 4, 8][usize::from(op[3] & 3)];
        let mut v = [0u8; 8];
        v.copy_from_slice(&op[4..12]);
        let value = u64::from_le_bytes(v);
        match op[0] % 8 {
            0 => common_w(a % 0x4000, &v[..width]),
            1 => {
                let _ = space.mmio_read(vbar + a % 0x4000, &mut v[..width]);
            }
            2 => {
                let _ = space.mmio_write(mbar + a % 0x1000, &v[..width]);
            }
            3 => {
                let w = width.min(4);
                let _ = space.config_write(bdf, u16::try_from(a % 256).unwrap_or(0), &v[..w]);
            }
            4 => {
                let i = usize::from(op[3] >> 2) % 4;
                let off = usize::try_from(a).unwrap_or(0) % (PAGE_SIZE - 8);
                pages[i].write(off, &v);
            }
            5 => {
                // Bring queue 0 up on page 0 (rings at 0, 1024, 2048) with size from `value`.
                let ring = iovas[0].unwrap_or(0);
                common_w(common::DEVICE_STATUS, &[0]);
                common_w(common::DEVICE_STATUS, &[3]);
                common_w(common::DRIVER_FEATURE_SELECT, &1u32.to_le_bytes());
                common_w(common::DRIVER_FEATURE, &3u32.to_le_bytes());
                common_w(common::DEVICE_STATUS, &[11]);
                common_w(
                    common::QUEUE_SIZE,
                    &u16::try_from(value & 0x1ff).unwrap_or(8).to_le_bytes(),
                );
                common_w(common::QUEUE_DESC, &ring.to_le_bytes());
                common_w(common::QUEUE_DRIVER, &(ring + 1024).to_le_bytes());
                common_w(common::QUEUE_DEVICE, &(ring + 2048).to_le_bytes());
                common_w(common::QUEUE_ENABLE, &1u16.to_le_bytes());
                common_w(common::DEVICE_STATUS, &[15]);
            }
            6 => common_w(0x3000, &0u16.to_le_bytes()),
            _ => {
                let i = usize::from(op[3] >> 2) % 4;
                match iovas[i].take() {
                    Some(iova) => {
                        let _ = iommu.unmap(iova);
                    }
                    None => iovas[i] = iommu.map(entry(i)).ok(),
                }
            }
        }
    }
    before_reset(&pages[0]);
    // A reset waits for the workers; then nothing may be in flight.
    common_w(common::DEVICE_STATUS, &[0]);
    drop(space);
    drop(dev);
    let _ = std::fs::remove_file(&path);
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #[test]
        fn config_ops_hold_invariants(data in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
            config_ops(&data);
        }
    }

    #[test]
    fn virtio_ops_on_pseudo_random_inputs() {
        // Seeded with a working sequence (queue up, a zero-length IN request, notify), checked
        // to complete, then mutated.
        let iova = crate::iommu::IOVA_BASE;
        let mut base = vec![5u8, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0];
        for (off, val) in [
            (0u16, iova + 4096),
            (8, 16 | 1 << 32 | 1 << 48),
            (16, iova + 4096 + 512),
            (24, 1 | 2 << 32),
            (1024, 1 << 16),
        ] {
            let mut op = vec![4u8];
            op.extend_from_slice(&off.to_le_bytes());
            op.push(0);
            op.extend_from_slice(&val.to_le_bytes());
            base.extend_from_slice(&op);
        }
        base.extend_from_slice(&[6; 12]);
        run_virtio_ops(&base, |ring| {
            let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
            let mut used = [0u8; 2];
            while std::time::Instant::now() < end {
                ring.read(2048 + 2, &mut used);
                if used == [1, 0] {
                    break;
                }
                std::thread::yield_now();
            }
            assert_eq!(used, [1, 0], "the seed request did not complete");
        });
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for round in 0..64usize {
            let mut d = base.clone();
            for _ in 0..(round % 8 + 1) * 12 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let b = x.to_le_bytes();
                if b[1] & 1 == 0 {
                    let i = usize::from(b[2]) % d.len();
                    d[i] = b[0];
                } else {
                    d.push(b[0]);
                }
            }
            virtio_ops(&d);
        }
    }

    #[test]
    fn config_ops_on_pseudo_random_inputs() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..200usize {
            let data: Vec<u8> = (0..len * 7)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x.to_le_bytes()[0]
                })
                .collect();
            config_ops(&data);
        }
    }
}
