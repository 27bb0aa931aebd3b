//! A device channel between two in-process domains: the frontend grants a ring page and a data
//! page, the backend maps the ring, binds an event channel and serves requests on its own
//! thread, reading request data by grant copy. Every response is checked.

use devchan::grant::status;
use devchan::platform::{CopyPtr, GrantCopyOp, Platform, PlatformError, SharedPage};
use devchan::ring::{BackRing, FrontRing};
use hypervisor::domain::DomainConfig;
use hypervisor::local::LocalPlatform;
use hypervisor::system::System;
use std::ptr::NonNull;
use std::time::Duration;

const DATA_FRAME: u64 = 10;
const WAIT: Option<Duration> = Some(Duration::from_secs(10));

/// The backend's answer to request `n`, given the data word the frontend put at slot `n % 512`.
fn answer(n: u64, data: u64) -> u64 {
    n.wrapping_mul(3) ^ data
}

fn data_word(i: u64) -> u64 {
    i.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn run_channel(requests: u64) {
    let sys = System::new();
    let mk = |n: &str| {
        sys.create_domain(DomainConfig {
            name: n.into(),
            nr_frames: 32,
            iommu: None,
        })
        .unwrap()
    };
    let (fa, ba) = (mk("front"), mk("back"));
    let front = LocalPlatform::new(sys.clone(), fa).unwrap();
    let back = LocalPlatform::new(sys.clone(), ba).unwrap();

    // Frontend: ring page, data page, event channel; grants and port go to the backend (over
    // XenStore in real life).
    let ring_page = front.alloc_shared_page().unwrap();
    // SAFETY: a 4 KiB page-aligned shared page kept alive by `ring_page` until the end of this
    // function; only ring objects access it here, the backend maps it through a grant.
    let mut fring = unsafe {
        FrontRing::<u64, u64>::init(NonNull::new(ring_page.as_ptr()).unwrap(), 4096).unwrap()
    };
    let ring_ref = front.grant_access(ba, ring_page.frame(), false).unwrap();
    for i in 0..512u64 {
        front
            .write_local(
                DATA_FRAME,
                usize::try_from(i * 8).unwrap(),
                &data_word(i).to_le_bytes(),
            )
            .unwrap();
    }
    let data_ref = front.grant_access(ba, DATA_FRAME, true).unwrap();
    let fport = front.evtchn_alloc_unbound(ba).unwrap();

    std::thread::scope(|s| {
        let backend = s.spawn(|| {
            let mapping = back.map_grant(fa, ring_ref, false).unwrap();
            // SAFETY: the mapping is a live 4 KiB page until `mapping` drops at the end of
            // this closure, after the ring's last use.
            let mut bring = unsafe {
                BackRing::<u64, u64>::attach(NonNull::new(mapping.as_ptr()).unwrap(), 4096).unwrap()
            };
            let bport = back.evtchn_bind_interdomain(fa, fport).unwrap();
            let mut served = 0u64;
            while served < requests {
                while let Some(n) = bring.get_request().unwrap() {
                    // Read the request's data word from the frontend by grant copy.
                    let slot = (n % 512) * 8;
                    let op = GrantCopyOp {
                        src: CopyPtr::Grant {
                            domid: fa,
                            gref: data_ref,
                            offset: u16::try_from(slot).unwrap(),
                        },
                        dst: CopyPtr::Local {
                            frame: DATA_FRAME,
                            offset: 0,
                        },
                        len: 8,
                    };
                    assert_eq!(back.grant_copy(&[op]).unwrap(), vec![status::OKAY]);
                    let mut w = [0u8; 8];
                    back.read_local(DATA_FRAME, 0, &mut w).unwrap();
                    bring
                        .put_response(&answer(n, u64::from_le_bytes(w)))
                        .unwrap();
                    served += 1;
                }
                if bring.push_responses() {
                    back.evtchn_notify(bport).unwrap();
                }
                if served < requests && !bring.final_check_for_requests().unwrap() {
                    for p in back.evtchn_wait(WAIT).expect("backend woken") {
                        back.evtchn_unmask(p).unwrap();
                    }
                }
            }
            drop(mapping);
            served
        });

        let mut next = 0u64;
        let mut done = 0u64;
        let mut fport_ready = false;
        while done < requests {
            while next < requests && !fring.is_full() {
                fring.put_request(&next).unwrap();
                next += 1;
            }
            if fring.push_requests() {
                // The backend may not have bound yet: sends on an unbound port fail, and the
                // bind marks its port pending anyway, so nothing is lost.
                match front.evtchn_notify(fport) {
                    Ok(()) => fport_ready = true,
                    Err(PlatformError::BadPort(_)) if !fport_ready => {}
                    Err(e) => panic!("notify: {e}"),
                }
            }
            loop {
                while let Some(r) = fring.get_response().unwrap() {
                    // Responses come in order here: response k answers request k.
                    assert_eq!(r, answer(done, data_word(done % 512)), "response {done}");
                    done += 1;
                }
                if !fring.final_check_for_responses().unwrap() {
                    break;
                }
            }
            if done < next {
                for p in front.evtchn_wait(WAIT).expect("frontend woken") {
                    assert_eq!(p, fport);
                    front.evtchn_unmask(p).unwrap();
                }
            }
        }
        assert_eq!(backend.join().unwrap(), requests);
    });
    // The backend unmapped: both grants can be withdrawn.
    front.end_access(ring_ref).unwrap();
    front.end_access(data_ref).unwrap();
}

#[test]
fn twenty_thousand_requests_with_verified_responses() {
    run_channel(20_000);
}

#[test]
fn ring_grant_cannot_be_withdrawn_while_mapped() {
    let sys = System::new();
    let mk = |n: &str| {
        sys.create_domain(DomainConfig {
            name: n.into(),
            nr_frames: 16,
            iommu: None,
        })
        .unwrap()
    };
    let (fa, ba) = (mk("front"), mk("back"));
    let front = LocalPlatform::new(sys.clone(), fa).unwrap();
    let back = LocalPlatform::new(sys.clone(), ba).unwrap();
    let page = front.alloc_shared_page().unwrap();
    let g = front.grant_access(ba, page.frame(), false).unwrap();
    let m = back.map_grant(fa, g, false).unwrap();
    assert_eq!(front.end_access(g), Err(PlatformError::GrantInUse(g)));
    // A backend that dies releases its mapping with its domain.
    sys.destroy_domain(ba).unwrap();
    front.end_access(g).unwrap();
    drop(m);
}
