//! The body of the `netback_rings` fuzz target: a hostile guest against a whole netback.
//!
//! The input is decoded into a sequence of operations by a guest whose two ring pages and
//! data pages are real (the in-process platform): transmit requests with arbitrary flags,
//! sizes, offsets and grant references (valid or not), raw stores anywhere in the transmit
//! ring page (indexes included), receive requests, frames arriving from the wire, device
//! completions held or released, and netback polls. netback must never panic, and once
//! the device has completed everything, no transmit may be left in flight and no pin held
//! beyond netback's own pages (checked after the run). `fuzz/fuzz_targets/netback_rings.rs`
//! calls [`netback_rings`]; the unit test below runs it over random inputs.

use crate::filter::Mac;
use crate::mem::{MemNic, MemWire};
use crate::netback::{BackendConfig, ChannelConfig, ChannelStats, Netback};
use devchan::fuzzing::Input;
use devchan::grant::PAGE_SIZE;
use devchan::netif::{NetifRxFrontRing, NetifRxRequest, NetifTxFrontRing, NetifTxRequest};
use devchan::platform::{Platform, SharedPage};
use hypervisor::domain::DomainConfig;
use hypervisor::local::LocalPlatform;
use hypervisor::system::System;
use iospace::iommu::Iommu;
use std::ptr::NonNull;
use std::sync::Arc;

const GUEST_MAC: Mac = Mac([2, 0, 0, 0, 0, 1]);
const DATA_PAGES: u64 = 8;

/// Run one input (see the module docs).
pub fn netback_rings(data: &[u8]) {
    let _ = run(data);
}

/// The run; the channel's counters at the end (`None`: the setup was refused).
fn run(data: &[u8]) -> Option<ChannelStats> {
    let mut input = Input(data);
    let sys = System::new();
    let iommu = Iommu::new(256);
    let Ok(idd) = sys.create_domain(DomainConfig {
        name: "idd".into(),
        nr_frames: 40,
        iommu: Some(iommu.clone()),
    }) else {
        return None;
    };
    let Ok(g) = sys.create_domain(DomainConfig {
        name: "guest".into(),
        nr_frames: 7 + DATA_PAGES,
        iommu: None,
    }) else {
        return None;
    };
    let (Ok(idd), Ok(guest)) = (
        LocalPlatform::new(sys.clone(), idd),
        LocalPlatform::new(sys, g),
    ) else {
        return None;
    };
    let idd = Arc::new(idd);
    let back = idd.domid();
    let (Ok(txp), Ok(rxp)) = (guest.alloc_shared_page(), guest.alloc_shared_page()) else {
        return None;
    };
    let grant = |f| guest.grant_access(back, f, false).unwrap_or(0);
    let (tx_ref, rx_ref) = (grant(txp.frame()), grant(rxp.frame()));
    let grefs: Vec<u32> = (0..DATA_PAGES).map(|i| grant(7 + i)).collect();
    let (Some(tb), Some(rb)) = (NonNull::new(txp.as_ptr()), NonNull::new(rxp.as_ptr())) else {
        return None;
    };
    // SAFETY: both pages are live 4 KiB shared pages held until the end of this function,
    // after the rings are dropped; in this process they are accessed only through the rings
    // (the hostile stores go through the platform's copy into the page, as a peer's would).
    let rings = unsafe {
        (
            NetifTxFrontRing::init(tb, PAGE_SIZE),
            NetifRxFrontRing::init(rb, PAGE_SIZE),
        )
    };
    let (Ok(mut tx), Ok(mut rx)) = rings else {
        return None;
    };
    let Ok(port) = guest.evtchn_alloc_unbound(back) else {
        return None;
    };
    let wire = MemWire::default();
    let nic = MemNic::new(iommu.device(), wire.clone(), [2, 0, 0, 0, 0, 0xee]).with_rx_capacity(8);
    let Ok(mut nb) = Netback::new(
        idd.clone(),
        nic,
        BackendConfig {
            record_frame: 7,
            header_frames: vec![9],
            rx_frames: (10..24).collect(),
            batch: 4,
        },
    ) else {
        return None;
    };
    let pool_pins = iommu.len();
    let cfg = ChannelConfig {
        guest: guest.domid(),
        tx_ring_ref: tx_ref,
        rx_ring_ref: rx_ref,
        remote_port: port,
        mac: GUEST_MAC,
        rx_copy: input.u8() & 1 == 0,
        credit: None,
        nets: crate::filter::parse_nets("10.0.0.0/8").unwrap_or_default(),
        journal_frame: 30,
    };
    if nb.attach(cfg).is_err() {
        return None;
    }
    let mut ops = 0;
    while !input.is_empty() && ops < 512 {
        ops += 1;
        match input.u8() % 8 {
            0 => {
                let mut r: NetifTxRequest = input.msg();
                if r.gref & 0x100 == 0 {
                    r.gref = grefs[r.gref as usize % grefs.len()];
                }
                let _ = tx.put_request(&r);
            }
            1 => {
                if tx.push_requests() {
                    let _ = guest.evtchn_notify(port);
                }
            }
            2 => {
                let off = usize::from(input.u16()) % (PAGE_SIZE - 4);
                let _ = guest.write_local(txp.frame(), off, &input.bytes(4));
            }
            3 => {
                let id = input.u16();
                let pick = input.u8();
                let gref = if pick & 0x80 == 0 {
                    grefs[usize::from(pick) % grefs.len()]
                } else {
                    input.u32()
                };
                let _ = rx.put_request(&NetifRxRequest { id, pad: 0, gref });
                rx.push_requests();
            }
            4 => {
                let len = usize::from(input.u16()) % 1600;
                let mut f = input.bytes(len);
                if len >= 6 && input.u8() & 1 == 0 {
                    f[..6].copy_from_slice(&GUEST_MAC.0);
                }
                wire.inject(&iommu.device(), &f);
            }
            5 => wire.hold_tx(input.u8() & 1 == 0),
            6 => {
                while let Ok(Some(_)) = tx.get_response() {}
                while let Ok(Some(_)) = rx.get_response() {}
            }
            _ => {
                let _ = nb.poll();
            }
        }
    }
    // Drain: everything completes, nothing stays pinned.
    wire.hold_tx(false);
    for _ in 0..4 {
        if nb.poll().is_err() {
            return None;
        }
    }
    let waiting = nb.in_flight();
    assert_eq!(waiting, 0, "transmits left in flight");
    assert_eq!(iommu.len(), pool_pins, "pins leaked");
    nb.stats(0)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn hostile_guests_never_break_netback(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            super::netback_rings(&data);
        }
    }

    #[test]
    fn a_well_formed_transmit_goes_out() {
        // attach (copy mode), put a 60-byte request on page 0, push, poll.
        let mut d = vec![0u8];
        d.push(0);
        let mut req = [0u8; 12];
        req[10] = 60; // size
        d.extend_from_slice(&req);
        d.extend_from_slice(&[1, 7, 7]);
        let s = super::run(&d).unwrap();
        // Its source MAC is zero: read, checked, dropped as spoofed, answered.
        assert_eq!((s.spoof, s.tx, s.errors), (1, 0, 0));
    }
}
