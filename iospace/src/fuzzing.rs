//! Fuzz bodies (shared by `iospace/fuzz` targets and the unit tests below).
//!
//! [`config_ops`] decodes its input into a sequence of config-space operations by a driver
//! domain through an [`IoSpace`] virtualized view (7 bytes each: `op, offset, width, value
//! le32`) and checks after every one that the I/O Space kept its promises: the device's BARs
//! never move, the manager's command policy bits never change, a refused write leaves the
//! device's config space untouched, and every refusal is counted exactly once.

use crate::emu::{PciBus, PciDevice, StubDevice};
use crate::pci::{Bdf, COMMAND, CONFIG_SPACE_SIZE};
use crate::space::{IoSpace, COMMAND_POLICY_BITS};
use std::sync::Arc;

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
                let bar = 0x10 + (offset % 6) * 4;
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
