//! The body of the `netfront_rx` fuzz target (`guest-frontends/fuzz`), also run by the unit
//! tests over random inputs: a real [`NetFront`] on [`LocalPlatform`] domains, connected to a
//! backend that does whatever the input says on the real rings.
//!
//! The input is a sequence of operations: a receive or transmit response with arbitrary
//! fields (after consuming a request, as the ring requires), an honest receive or transmit
//! answer, a wild response producer index, a frame sent by the guest, a round of the
//! frontend's engine. Whatever happens, the frontend must not panic, must deliver only frames
//! within `MIN_FRAME..=MAX_FRAME`, and must never deliver a frame the backend did not
//! complete.

use std::collections::HashMap;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devchan::fuzzing::Input;
use devchan::netif::{
    read_tx_packet, NetifRxBackRing, NetifRxResponse, NetifStatus, NetifTxBackRing, NetifTxResponse,
};
use devchan::platform::{CopyPtr, GrantCopyOp, Platform, SharedPage};
use devchan::ring::BackRing;
use hypervisor::domain::DomainConfig;
use hypervisor::local::{LocalMapping, LocalPlatform};
use hypervisor::system::System;

use super::{FrontStore, NetFront, NetFrontConfig, RxMode, StoreError, MAX_FRAME, MIN_FRAME};

/// An in-memory store whose backend follows the frontend to `Connected`.
#[derive(Clone, Default)]
struct Store(Arc<Mutex<HashMap<String, Vec<u8>>>>);

impl FrontStore for Store {
    fn read(&mut self, path: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let m = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if path == "/b/state" && m.get("/f/state").map(Vec::as_slice) == Some(b"4") {
            return Ok(Some(b"4".to_vec()));
        }
        Ok(m.get(path).cloned())
    }
    fn write(&mut self, path: &str, value: &[u8]) -> Result<(), StoreError> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(path.to_owned(), value.to_vec());
        Ok(())
    }
}

struct Back {
    plat: LocalPlatform,
    guest: u16,
    tx: NetifTxBackRing,
    rx: NetifRxBackRing,
    tx_map: LocalMapping,
    rx_map: LocalMapping,
    port: u32,
}

impl Back {
    fn notify(&self) {
        let _ = self.plat.evtchn_notify(self.port);
    }
}

fn num(store: &Store, key: &str) -> Option<u32> {
    let v = store.0.lock().ok()?.get(key)?.clone();
    String::from_utf8(v).ok()?.parse().ok()
}

/// Run one input (see the module docs); returns the frames delivered (0 if the setup failed).
pub fn netfront_rx(data: &[u8]) -> usize {
    let mut input = Input(data);
    let sys = System::new();
    let cfg = |n: &str| DomainConfig {
        name: n.into(),
        nr_frames: 48,
        iommu: None,
    };
    let (Ok(g), Ok(b)) = (
        sys.create_domain(cfg("guest")),
        sys.create_domain(cfg("idd")),
    ) else {
        return 0;
    };
    let (Ok(gp), Ok(bp)) = (
        LocalPlatform::new(sys.clone(), g),
        LocalPlatform::new(sys.clone(), b),
    ) else {
        return 0;
    };
    let store = Store::default();
    let mut s = store.clone();
    for (k, v) in [
        ("/f/backend", "/b".to_owned()),
        ("/f/backend-id", b.to_string()),
        ("/f/mac", "02:00:00:00:00:01".to_owned()),
        ("/b/feature-rx-copy", "1".to_owned()),
        ("/b/state", "2".to_owned()),
    ] {
        let _ = s.write(k, v.as_bytes());
    }
    let mut fc = NetFrontConfig::new(g, 0, 7..48);
    fc.front_dir = "/f".into();
    fc.rx_mode = RxMode::Copy;
    fc.rx_buffers = 8;
    fc.poll_interval = Duration::from_millis(1);
    fc.connect_timeout = Some(Duration::from_secs(5));
    let Ok(mut f) = NetFront::connect(Arc::new(gp), store.clone(), fc) else {
        return 0;
    };
    let (Some(txr), Some(rxr), Some(port)) = (
        num(&store, "/f/tx-ring-ref"),
        num(&store, "/f/rx-ring-ref"),
        num(&store, "/f/event-channel"),
    ) else {
        return 0;
    };
    let (Ok(tx_map), Ok(rx_map)) = (bp.map_grant(g, txr, false), bp.map_grant(g, rxr, false))
    else {
        return 0;
    };
    let (Some(tb), Some(rb)) = (NonNull::new(tx_map.as_ptr()), NonNull::new(rx_map.as_ptr()))
    else {
        return 0;
    };
    // SAFETY: live 4 KiB mappings stored in the same struct as the rings and dropped after
    // them (the struct is dropped as a whole at the end of this function, rings unused then);
    // accessed only through these rings and the deliberate header writes below.
    let rings = unsafe { (BackRing::attach(tb, 4096), BackRing::attach(rb, 4096)) };
    let (Ok(tx), Ok(rx)) = rings else {
        return 0;
    };
    let Ok(port) = bp.evtchn_bind_interdomain(g, port) else {
        return 0;
    };
    let mut back = Back {
        plat: bp,
        guest: g,
        tx,
        rx,
        tx_map,
        rx_map,
        port,
    };
    let mut completed = 0usize;
    let mut delivered = 0usize;
    let mut steps = 0;
    while !input.is_empty() && steps < 64 {
        steps += 1;
        match input.u8() % 8 {
            0 => {
                let rsp = NetifRxResponse {
                    id: input.u16() % 300,
                    offset: input.u16() % 4200,
                    flags: input.u16() % 64,
                    status: i16::from_ne_bytes(input.u16().to_ne_bytes()),
                };
                if matches!(back.rx.get_request(), Ok(Some(_)))
                    && back.rx.put_response(&rsp).is_ok()
                {
                    back.rx.push_responses();
                    back.notify();
                    completed += 1;
                }
            }
            1 => {
                let rsp = NetifTxResponse {
                    id: input.u16() % 300,
                    status: i16::from(input.u8() as i8),
                };
                if matches!(back.tx.get_request(), Ok(Some(_)))
                    && back.tx.put_response(&rsp).is_ok()
                {
                    back.tx.push_responses();
                    back.notify();
                }
            }
            2 => {
                // An honest one-slot delivery by grant copy.
                let len = 14 + usize::from(input.u16()) % 1500;
                if let Ok(Some(req)) = back.rx.get_request() {
                    let _ = back.plat.write_local(8, 0, &vec![0xab; len]);
                    let ok = back
                        .plat
                        .grant_copy(&[GrantCopyOp {
                            src: CopyPtr::Local {
                                frame: 8,
                                offset: 0,
                            },
                            dst: CopyPtr::Grant {
                                domid: back.guest,
                                gref: req.gref,
                                offset: 0,
                            },
                            len: u16::try_from(len).unwrap_or(0),
                        }])
                        .is_ok_and(|s| s == [0]);
                    let status = if ok {
                        i16::try_from(len).unwrap_or(-1)
                    } else {
                        -1
                    };
                    let r = NetifRxResponse {
                        id: req.id,
                        offset: 0,
                        flags: 0,
                        status,
                    };
                    if back.rx.put_response(&r).is_ok() {
                        back.rx.push_responses();
                        back.notify();
                        completed += 1;
                    }
                }
            }
            3 => {
                // Honest transmit answers.
                let tx = &mut back.tx;
                while let Ok(Some(p)) = read_tx_packet(|| tx.get_request(), 18) {
                    for r in p.responses(NetifStatus::Okay) {
                        let _ = tx.put_response(&r);
                    }
                }
                back.tx.push_responses();
                back.notify();
            }
            4 => {
                // A wild response producer index on one of the rings (offset 8 of the header).
                let v = input.u32();
                let page = if input.u8() % 2 == 0 {
                    &back.tx_map
                } else {
                    &back.rx_map
                };
                // SAFETY: offset 8 is the aligned rsp_prod word inside the live mapping; the
                // frontend reads it atomically; this is what a hostile peer's store looks like.
                unsafe { page.as_ptr().add(8).cast::<u32>().write_volatile(v) };
                back.notify();
            }
            5 => {
                let len = usize::from(input.u16()) % 10_000;
                let _ = f.send(&vec![0x11; len]);
            }
            _ => {
                let _ = f.poll(Duration::ZERO);
            }
        }
        while let Some(frame) = f.recv() {
            assert!((MIN_FRAME..=MAX_FRAME).contains(&frame.len()));
            delivered += 1;
        }
    }
    let _ = f.poll(Duration::ZERO);
    while let Some(frame) = f.recv() {
        assert!((MIN_FRAME..=MAX_FRAME).contains(&frame.len()));
        delivered += 1;
    }
    assert!(
        delivered <= completed,
        "{delivered} frames from {completed} responses"
    );
    delivered
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn hostile_backends_never_break_netfront(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = netfront_rx(&data);
        }
    }

    #[test]
    fn honest_deliveries_arrive() {
        // 2 = deliver (len 14 + 50), then a poll.
        assert_eq!(netfront_rx(&[2, 50, 0, 7, 2, 60, 0, 7]), 2);
    }
}
