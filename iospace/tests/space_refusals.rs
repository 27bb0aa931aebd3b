//! The I/O Space of a virtio-blk-pci device refuses and counts everything outside it, and the
//! manager's hook hears of each refusal; the device is untouched.

use iospace::emu::virtio_blk::{BlkConfig, VirtioBlk};
use iospace::emu::virtio_pci::{VirtioPci, MSIX_BAR, VIRTIO_BAR, VIRTIO_BAR_SIZE};
use iospace::emu::{PciBus, PciDevice, StubDevice};
use iospace::iommu::Iommu;
use iospace::pci::bar::bar_offset;
use iospace::pci::{command, Bdf, COMMAND};
use iospace::space::{IoSpace, Irq, SpaceError};
use std::sync::{Arc, Mutex};

#[test]
fn virtio_blk_space_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let blk = VirtioBlk::new(&BlkConfig {
        path: dir.path().join("d.img"),
        size: 1 << 16,
        read_only: true,
        serial: String::new(),
        workers: 1,
    });
    // Read-only and missing: the image cannot be created.
    assert!(blk.is_err());
    let blk = VirtioBlk::new(&BlkConfig {
        path: dir.path().join("d.img"),
        size: 1 << 16,
        read_only: false,
        serial: String::new(),
        workers: 1,
    })
    .unwrap();
    let iommu = Iommu::new(4);
    let dev = Arc::new(VirtioPci::new(Arc::new(blk), iommu.device(), 9).unwrap());
    let bus = PciBus::new();
    let other = Arc::new(StubDevice::new(StubDevice::example_config()));
    let other_bdf = bus.plug(1, other).unwrap();
    let bdf = bus.plug(2, dev.clone()).unwrap();
    let space = IoSpace::new(bdf, dev.clone()).unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let l = log.clone();
    space.on_violation(Box::new(move |e| l.lock().unwrap().push(e.to_string())));

    let bars: Vec<u32> = (0..6).map(|i| dev.config_read(bar_offset(i))).collect();
    let v = space.info().bar(VIRTIO_BAR).unwrap().address;
    let m = space.info().bar(MSIX_BAR).unwrap().address;
    assert_eq!(space.irqs().msix_vectors, 2);
    assert_eq!(space.irqs().line, Some(9));

    let refusals: Vec<Result<(), SpaceError>> = vec![
        space.config_read(other_bdf, 0, 4).map(drop),
        space.config_write(bdf, bar_offset(VIRTIO_BAR), &0x1000_0000u32.to_le_bytes()),
        space.config_write(bdf, bar_offset(VIRTIO_BAR + 1), &1u32.to_le_bytes()),
        space.config_write(bdf, COMMAND, &command::IO_SPACE.to_le_bytes()),
        space.mmio_read(v + VIRTIO_BAR_SIZE, &mut [0; 4]),
        space.mmio_write(v + VIRTIO_BAR_SIZE - 2, &[0; 4]),
        space.mmio_write(m - 4, &[0; 4]),
        space.mmio_read(v, &mut [0; 16]),
        space.port_read(0xcf8, &mut [0; 4]),
        space.bind_irq(Irq::MsiX(2), None),
        space.bind_irq(Irq::Line(10), None),
        space.config_write(bdf, 0x3d, &[2]),
    ];
    assert!(refusals.iter().all(Result::is_err), "{refusals:?}");
    assert_eq!(space.violations(), 12);
    assert_eq!(log.lock().unwrap().len(), 12);
    let after: Vec<u32> = (0..6).map(|i| dev.config_read(bar_offset(i))).collect();
    assert_eq!(bars, after);
    assert_eq!(Bdf::new(0, 32, 0), None);
}
