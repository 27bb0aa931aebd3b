//! Config-space parsing: property tests over arbitrary and generated config spaces, BAR
//! sizing round trips, malicious capability lists, and the real sysfs of this machine.

use iospace::emu::{ConfigSpace, DeviceConfig, StubDevice};
use iospace::pci::bar::{size_bars, Bar, BarKind};
use iospace::pci::caps::{self, Capability, MAX_CAPS};
use iospace::pci::{sysfs, ConfigDump, DeviceInfo, Header, PciError};
use iospace::space::Tables;
use proptest::prelude::*;
use std::path::Path;

fn ids() -> Header {
    Header {
        vendor_id: 0x1234,
        device_id: 0x11,
        command: 0,
        status: 0,
        revision: 2,
        prog_if: 0,
        subclass: 0,
        class: 3,
        header_type: 0,
        subsystem_vendor_id: 0,
        subsystem_id: 0,
        cap_pointer: 0,
        interrupt_line: 0,
        interrupt_pin: 0,
    }
}

/// BAR layouts: per slot, nothing, I/O, 32-bit or 64-bit memory, with a size exponent.
fn bar_layout() -> impl Strategy<Value = Vec<Bar>> {
    proptest::collection::vec((0u8..4, 0u32..28, any::<bool>()), 6).prop_map(|slots| {
        let mut bars = Vec::new();
        let mut i = 0;
        while i < 6 {
            let (kind, exp, pf) = slots[i];
            match kind {
                1 => bars.push(Bar {
                    index: i,
                    kind: BarKind::Io,
                    prefetchable: false,
                    address: 0,
                    size: 1 << (2 + exp % 7),
                }),
                2 => bars.push(Bar {
                    index: i,
                    kind: BarKind::Mem32,
                    prefetchable: pf,
                    address: 0,
                    size: 1 << (4 + exp),
                }),
                3 if i < 5 => {
                    bars.push(Bar {
                        index: i,
                        kind: BarKind::Mem64,
                        prefetchable: pf,
                        address: 0,
                        size: 1 << (4 + exp + 8),
                    });
                    i += 1;
                }
                _ => {}
            }
            i += 1;
        }
        bars
    })
}

proptest! {
    /// Any 256 bytes: parsing never panics, and a successful walk is bounded and duplicate-free.
    #[test]
    fn arbitrary_config_never_panics(bytes in proptest::collection::vec(any::<u8>(), 64..300)) {
        let d = ConfigDump::new(&bytes).unwrap();
        let _ = Header::parse(&d);
        if let Ok(caps) = caps::walk(&d) {
            prop_assert!(caps.len() <= MAX_CAPS);
            let mut offs: Vec<u8> = caps.iter().map(Capability::offset).collect();
            offs.sort_unstable();
            offs.dedup();
            prop_assert_eq!(offs.len(), caps.len());
            prop_assert!(caps.iter().all(|c| c.offset() >= 0x40 && usize::from(c.offset()) + usize::from(c.len()) <= 256));
        }
    }

    /// Sizing by the write-ones protocol recovers every BAR the device implements, and leaves
    /// every register as it was.
    #[test]
    fn bar_sizing_round_trip(bars in bar_layout()) {
        let dev = StubDevice::new(ConfigSpace::new(&ids(), &bars));
        let mut cfg = DeviceConfig(&dev);
        let before: Vec<u32> = (0..16).map(|i| iospace::emu::PciDevice::config_read(&dev, i * 4)).collect();
        let sized = size_bars(&mut cfg).unwrap();
        let after: Vec<u32> = (0..16).map(|i| iospace::emu::PciDevice::config_read(&dev, i * 4)).collect();
        prop_assert_eq!(before, after);
        let want: Vec<(usize, BarKind, bool, u64)> = bars.iter().map(|b| (b.index, b.kind, b.prefetchable, b.size.max(if b.kind == BarKind::Io { 4 } else { 16 }))).collect();
        let got: Vec<(usize, BarKind, bool, u64)> = sized.iter().map(|b| (b.index, b.kind, b.prefetchable, b.size)).collect();
        prop_assert_eq!(got, want);
    }

    /// Random capability links: the walk always terminates, with an error or a list.
    #[test]
    fn random_capability_links_terminate(links in proptest::collection::vec((any::<u8>(), any::<u8>()), 1..48)) {
        let mut b = vec![0u8; 256];
        b[6] = 0x10;
        b[0x34] = links[0].1;
        for (i, (id, next)) in links.iter().enumerate() {
            let at = 0x40 + i * 4;
            if at + 1 < 256 {
                b[at] = *id;
                b[at + 1] = *next;
            }
        }
        let _ = caps::walk(&ConfigDump::new(&b).unwrap());
    }
}

#[test]
fn malicious_loops_are_refused() {
    // A ring of 48 capabilities pointing round and round.
    let mut b = vec![0u8; 256];
    b[6] = 0x10;
    b[0x34] = 0x40;
    for at in (0x40..0x100).step_by(4) {
        b[at] = caps::CAP_ID_PM;
        b[at + 1] = if at == 0xfc {
            0x40
        } else {
            u8::try_from(at + 4).unwrap()
        };
    }
    assert_eq!(
        caps::walk(&ConfigDump::new(&b).unwrap()),
        Err(PciError::CapLoop(0x40))
    );
    // A capability pointing into the header.
    b[0xfd] = 0x04;
    assert_eq!(
        caps::walk(&ConfigDump::new(&b).unwrap()),
        Err(PciError::CapPointer(0x04))
    );
}

#[test]
fn probe_of_emulated_device() {
    let dev = StubDevice::new(StubDevice::example_config());
    let info = DeviceInfo::probe(&mut DeviceConfig(&dev)).unwrap();
    assert_eq!(
        info.header.display_name(),
        "Intel Corporation 82540EM Gigabit Ethernet Controller"
    );
    assert_eq!(
        info.bars.iter().map(|b| b.size).collect::<Vec<_>>(),
        vec![0x2_0000, 0x40, 0x4000]
    );
    assert!(matches!(info.capabilities[..], [Capability::MsiX(_)]));
}

#[test]
fn this_machines_sysfs() {
    let root = Path::new("/sys");
    let all = sysfs::enumerate(root);
    if all.is_empty() {
        eprintln!("SKIPPED: no PCI devices under /sys/bus/pci/devices");
        return;
    }
    let mut parsed = 0;
    for (path, r) in &all {
        match r {
            Ok(d) => {
                parsed += 1;
                eprintln!(
                    "{} {} [{:02x}{:02x}] bars={} caps={}",
                    d.address,
                    d.header.display_name(),
                    d.header.class,
                    d.header.subclass,
                    d.bars.len(),
                    d.capabilities.len()
                );
                assert!(d.bars.iter().all(|b| b.size.is_power_of_two()));
                // The I/O Space tables follow from what sysfs says.
                let info = DeviceInfo {
                    header: d.header,
                    bars: d.bars.clone(),
                    capabilities: d.capabilities.clone(),
                };
                let t = Tables::from_info(&info);
                for b in &d.bars {
                    match b.kind {
                        BarKind::Io => {
                            assert!(t.ports.allowed(u16::try_from(b.address).unwrap(), 1))
                        }
                        _ => assert!(t.mmio.allowed(b.address, b.size)),
                    }
                }
                let msix = d.capabilities.iter().find_map(|c| match c {
                    Capability::MsiX(m) => Some(m.table_size),
                    _ => None,
                });
                assert_eq!(t.irqs.msix_vectors, msix.unwrap_or(0));
            }
            // Bridges (type 1) are expected; anything else is reported.
            Err(PciError::UnsupportedHeader(_)) => eprintln!("{}: bridge, skipped", path.display()),
            Err(e) => panic!("{}: {e}", path.display()),
        }
    }
    assert!(parsed > 0, "no endpoint parsed");
}
