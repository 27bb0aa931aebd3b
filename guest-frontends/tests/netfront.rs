//! netfront against a hand-written backend that drives the rings directly, both in-process on
//! `LocalPlatform` domains of one `System`, connected through the real XenStore daemon (over
//! its socket). The test plays the manager's part (it writes both XenStore directories and
//! moves the backend's `state`), and the backend's (it maps the rings, reads transmits with
//! devchan's validating parser, grant-copies or transfers received frames).
//!
//! Covered: the handshake keys, multi-slot transmit byte for byte, copy and exchange receive
//! (single- and multi-slot), hostile responses refused (unknown or duplicate id, data past the
//! page, unknown status, unrequested extra info, a runaway producer index), and reconnects
//! (backend `Closing`→`Closed`→`InitWait`, and `backend`/`backend-id` rewritten to a new
//! domain) with fresh rings, reposted buffers and unanswered transmits sent again.
#![allow(clippy::cast_possible_truncation, missing_docs)]

mod netfront_support;

use std::time::Duration;

use devchan::grant::PAGE_SIZE;
use devchan::netif::{NetifRxResponse, NetifStatus, NetifTxResponse, NETRXF_EXTRA_INFO};
use devchan::platform::SharedPage;
use guest_frontends::netfront::RxMode;
use netfront_support::*;

#[test]
fn handshake_writes_linux_netfront_keys_and_posts_buffers() {
    let mut w = World::new();
    let mut b = w.new_backend(false);
    let mut f = w.connect(&mut b, RxMode::Copy);
    until(&mut f, "backend connected", |f| f.is_connected());
    let fd = w.front_dir();
    for (k, v) in [
        ("request-rx-copy", "1"),
        ("feature-rx-notify", "1"),
        ("feature-sg", "1"),
        ("state", "4"),
    ] {
        assert_eq!(w.r(&format!("{fd}/{k}")).as_deref(), Some(v), "{k}");
    }
    assert_eq!(f.mac(), MAC);
    assert_eq!(f.rx_mode(), RxMode::Copy);
    assert_eq!(f.rx_posted(), RX_BUFFERS);
    assert_eq!(b.rings().pull_rx(), RX_BUFFERS);
    assert_eq!(f.stats().connects, 1);
    // Dropping the frontend closes the device.
    drop(f);
    assert_eq!(w.r(&format!("{fd}/state")).as_deref(), Some("6"));
}

#[test]
fn transmit_multi_slot_frames_byte_exact() {
    let mut w = World::new();
    let mut b = w.new_backend(false);
    let mut f = w.connect(&mut b, RxMode::Copy);
    until(&mut f, "backend connected", |f| f.is_connected());
    let sizes = [60usize, 4096, 4097, 9000, 1514, 65535];
    for (i, n) in sizes.iter().enumerate() {
        f.send(&frame(*n, i as u8)).unwrap();
    }
    assert!(f.send(&[0; 13]).is_err() && f.send(&vec![0; 65536]).is_err());
    let mut got = Vec::new();
    until(&mut f, "all transmits on the ring", |_| {
        got.extend(b.rings().take_all_tx());
        got.len() == sizes.len()
    });
    let mut multi = 0;
    for (i, ((p, data), n)) in got.iter().zip(sizes).enumerate() {
        assert_eq!(usize::from(p.size), n);
        let slots = p.fragments.len();
        let min = n.div_ceil(PAGE_SIZE);
        assert!(slots == min || slots == min + 1, "slots of frame {i}");
        multi += usize::from(slots > 1);
        assert!(p.extras.is_empty());
        assert_eq!(*data, frame(n, i as u8), "bytes of frame {i}");
    }
    assert!(multi >= 4, "packets crossing pages take several slots");
    // Answer out of order: the last packet first, one with an error.
    let r = b.rings();
    r.answer_tx(&got[5].0, NetifStatus::Okay);
    r.answer_tx(&got[1].0, NetifStatus::Dropped);
    for (p, _) in got.iter().take(5).filter(|(p, _)| p != &got[1].0) {
        r.answer_tx(p, NetifStatus::Okay);
    }
    until(&mut f, "all answered", |f| f.tx_pending() == 0);
    let st = f.stats();
    assert_eq!((st.tx_packets, st.tx_errors), (5, 1));
    assert_eq!(st.tx_bytes, (sizes.iter().sum::<usize>() - 4096) as u64);
    assert_eq!(f.quarantined(), 0, "every grant ended");
}

#[test]
fn receive_by_copy_single_and_multi_slot() {
    let mut w = World::new();
    let mut b = w.new_backend(false);
    let mut f = w.connect(&mut b, RxMode::Copy);
    until(&mut f, "backend connected", |f| f.is_connected());
    let frames = [
        (frame(60, 1), 0u16),
        (frame(1514, 2), 100),
        (frame(9000, 3), 2),
    ];
    for (data, off) in &frames {
        b.rings().deliver_copy(data, *off);
    }
    for (data, _) in &frames {
        assert!(f.wait(Duration::from_secs(20)).unwrap());
        assert_eq!(f.recv().unwrap(), *data);
    }
    // Every buffer came back to the ring.
    until(&mut f, "buffers reposted", |f| f.rx_posted() == RX_BUFFERS);
    assert_eq!(b.rings().pull_rx(), RX_BUFFERS);
    let st = f.stats();
    assert_eq!((st.rx_packets, st.rx_errors, st.protocol_errors), (3, 0, 0));
    // A failed response drops its packet only.
    let id = b.rings().peek_id();
    b.rings().raw_rx_response(NetifRxResponse {
        id,
        offset: 0,
        flags: 0,
        status: -1,
    });
    b.rings().deliver_copy(&frame(100, 4), 0);
    assert!(f.wait(Duration::from_secs(20)).unwrap());
    assert_eq!(f.recv().unwrap(), frame(100, 4));
    assert_eq!((f.stats().rx_errors, f.stats().protocol_errors), (1, 0));
}

#[test]
fn receive_by_page_exchange() {
    let mut w = World::new();
    let mut b = w.new_backend(true);
    let mut f = w.connect(&mut b, RxMode::Exchange);
    until(&mut f, "backend connected", |f| f.is_connected());
    assert_eq!(f.rx_mode(), RxMode::Exchange);
    assert_eq!(
        w.r(&format!("{}/request-rx-copy", w.front_dir()))
            .as_deref(),
        Some("0")
    );
    for i in 0..(RX_BUFFERS as u8 * 2) {
        let data = frame(60 + usize::from(i) * 50, i);
        b.rings()
            .deliver_exchange(&data, u16::from(i) * 8, 20 + u64::from(i % 4));
        assert!(f.wait(Duration::from_secs(20)).unwrap());
        assert_eq!(f.recv().unwrap(), data, "frame {i}");
    }
    assert_eq!(f.stats().rx_packets, RX_BUFFERS as u64 * 2);
    assert_eq!(f.quarantined(), 0);
}

#[test]
fn exchange_falls_back_to_copy_without_rx_flip() {
    let mut w = World::new();
    let mut b = w.new_backend(false);
    let mut f = w.connect(&mut b, RxMode::Exchange);
    assert_eq!(f.rx_mode(), RxMode::Copy);
    until(&mut f, "backend connected", |f| f.is_connected());
    b.rings().deliver_copy(&frame(70, 9), 0);
    assert!(f.wait(Duration::from_secs(20)).unwrap());
    assert_eq!(f.recv().unwrap(), frame(70, 9));
}

/// How a hostile backend answers.
#[derive(Clone, Copy, Debug)]
enum Lie {
    RxUnknownId,
    RxDuplicateId,
    RxPastPage,
    RxBadStatus,
    RxBadFlags,
    RxExtraInfo,
    RxOverflow,
    TxUnknownId,
    TxBadStatus,
}

#[test]
fn hostile_responses_are_refused() {
    for lie in [
        Lie::RxUnknownId,
        Lie::RxDuplicateId,
        Lie::RxPastPage,
        Lie::RxBadStatus,
        Lie::RxBadFlags,
        Lie::RxExtraInfo,
        Lie::RxOverflow,
        Lie::TxUnknownId,
        Lie::TxBadStatus,
    ] {
        let mut w = World::new();
        let mut b = w.new_backend(false);
        let mut f = w.connect(&mut b, RxMode::Copy);
        until(&mut f, "backend connected", |f| f.is_connected());
        let r = b.rings();
        let rsp = |id, offset, flags, status| NetifRxResponse {
            id,
            offset,
            flags,
            status,
        };
        match lie {
            Lie::RxUnknownId => r.raw_rx_response(rsp(200, 0, 0, 60)),
            Lie::RxDuplicateId => {
                let id = r.peek_id();
                r.deliver_copy(&frame(60, 1), 0);
                r.raw_rx_response(rsp(id, 0, 0, 60));
            }
            Lie::RxPastPage => {
                let id = r.peek_id();
                r.raw_rx_response(rsp(id, 4000, 0, 200));
            }
            Lie::RxBadStatus => {
                let id = r.peek_id();
                r.raw_rx_response(rsp(id, 0, 0, -9));
            }
            Lie::RxBadFlags => {
                let id = r.peek_id();
                r.raw_rx_response(rsp(id, 0, 0x4000, 60));
            }
            Lie::RxExtraInfo => {
                let id = r.peek_id();
                r.raw_rx_response(rsp(id, 0, NETRXF_EXTRA_INFO, 60));
            }
            Lie::RxOverflow => {
                // rsp_prod (offset 8 of the shared header) far ahead of any request.
                // SAFETY: offset 8 is the aligned rsp_prod word inside the live mapping; the
                // frontend reads it atomically; this is what a hostile peer's store looks like.
                unsafe {
                    r._rx_map
                        .as_ptr()
                        .add(8)
                        .cast::<u32>()
                        .write_volatile(1 << 20);
                }
                r.notify();
            }
            Lie::TxUnknownId => {
                f.send(&frame(60, 1)).unwrap();
                r.take_tx().unwrap();
                r.raw_tx_response(NetifTxResponse { id: 99, status: 0 });
            }
            Lie::TxBadStatus => {
                f.send(&frame(60, 1)).unwrap();
                let (p, _) = r.take_tx().unwrap();
                r.raw_tx_response(NetifTxResponse {
                    id: p.fragments[0].id,
                    status: 5,
                });
            }
        }
        until(&mut f, "the lie noticed", |f| f.stats().protocol_errors > 0);
        let st = f.stats();
        assert_eq!(st.protocol_errors, 1, "{lie:?}");
        assert!(!f.is_connected(), "{lie:?}: connection dropped");
        // Only the one honest frame of the duplicate case was delivered.
        let honest = usize::from(matches!(lie, Lie::RxDuplicateId));
        let mut n = 0;
        while f.recv().is_some() {
            n += 1;
        }
        assert_eq!(n, honest, "{lie:?}");
        // The frontend told the manager (Closing, then Closed once the backend follows).
        let state = w.r(&format!("{}/state", w.front_dir())).unwrap();
        assert!(state == "5" || state == "6", "{lie:?}: state {state}");
    }
}

/// The backend side of a reconnect: `Closing`, `Closed`, then `InitWait` again.
fn close_and_reopen(w: &mut World, b: &mut Backend, f: &mut Front) {
    let bd = b.dir.clone();
    let fd = w.front_dir();
    w.w(&format!("{bd}/state"), "5");
    until(f, "frontend closed", |f| {
        !f.is_connected() && w.r(&format!("{fd}/state")).as_deref() == Some("6")
    });
    b.rings = None;
    w.w(&format!("{bd}/state"), "6");
    f.poll(Duration::from_millis(50)).unwrap();
    w.w(&format!("{bd}/state"), "2");
}

#[test]
fn reconnect_after_backend_close_reposts_and_resends() {
    let mut w = World::new();
    let mut b = w.new_backend(false);
    let mut f = w.connect(&mut b, RxMode::Copy);
    until(&mut f, "backend connected", |f| f.is_connected());
    let fd = w.front_dir();
    let old_refs = (
        w.r(&format!("{fd}/tx-ring-ref")),
        w.r(&format!("{fd}/rx-ring-ref")),
    );
    // Three transmits: the backend answers the first, takes the second without answering,
    // and never sees the third before it closes.
    for i in 0..2u8 {
        f.send(&frame(5000, i)).unwrap();
    }
    let mut got = Vec::new();
    until(&mut f, "two on the ring", |_| {
        got.extend(b.rings().take_all_tx());
        got.len() == 2
    });
    b.rings().answer_tx(&got[0].0, NetifStatus::Okay);
    until(&mut f, "first answered", |f| f.stats().tx_packets == 1);
    f.send(&frame(60, 2)).unwrap();
    b.rings().pull_rx();
    close_and_reopen(&mut w, &mut b, &mut f);
    // The frontend comes back with fresh rings, the backend attaches again.
    w.attach(&mut b, Some(&mut f));
    until(&mut f, "reconnected", |f| f.is_connected());
    let new_refs = (
        w.r(&format!("{fd}/tx-ring-ref")),
        w.r(&format!("{fd}/rx-ring-ref")),
    );
    assert_ne!(old_refs, new_refs, "fresh rings");
    assert_eq!(b.rings().pull_rx(), RX_BUFFERS, "buffers reposted");
    let mut again = Vec::new();
    until(&mut f, "unanswered transmits resent", |_| {
        again.extend(b.rings().take_all_tx());
        again.len() == 2
    });
    assert_eq!(again[0].1, frame(5000, 1), "the unanswered one first");
    assert_eq!(again[1].1, frame(60, 2));
    for (p, _) in &again {
        b.rings().answer_tx(p, NetifStatus::Okay);
    }
    until(&mut f, "all answered", |f| f.tx_pending() == 0);
    b.rings().deliver_copy(&frame(80, 7), 0);
    assert!(f.wait(Duration::from_secs(20)).unwrap());
    assert_eq!(f.recv().unwrap(), frame(80, 7));
    let st = f.stats();
    assert_eq!((st.connects, st.disconnects, st.tx_packets), (2, 1, 3));
    assert_eq!(
        st.resent, 2,
        "the taken-unanswered one and the queued-behind one"
    );
}

#[test]
fn reconnect_to_a_new_backend_domain() {
    let mut w = World::new();
    let mut b = w.new_backend(false);
    let mut f = w.connect(&mut b, RxMode::Copy);
    until(&mut f, "backend connected", |f| f.is_connected());
    f.send(&frame(3000, 1)).unwrap();
    until(&mut f, "on the ring", |_| b.rings().pull_rx() > 0);
    // The old backend domain dies without answering; the manager names a new one.
    let old = b.idd;
    drop(b);
    w.sys.destroy_domain(old).unwrap();
    let mut b2 = w.new_backend(false);
    until(&mut f, "frontend restarted", |f| {
        f.backend_domain() == Some(b2.idd) && !f.is_connected()
    });
    w.attach(&mut b2, Some(&mut f));
    until(&mut f, "reconnected", |f| f.is_connected());
    assert_eq!(b2.rings().pull_rx(), RX_BUFFERS);
    let mut got = Vec::new();
    until(&mut f, "resent to the new backend", |_| {
        got.extend(b2.rings().take_all_tx());
        !got.is_empty()
    });
    assert_eq!(got[0].1, frame(3000, 1));
    b2.rings().answer_tx(&got[0].0, NetifStatus::Okay);
    until(&mut f, "answered", |f| f.tx_pending() == 0);
    b2.rings().deliver_copy(&frame(90, 3), 10);
    assert!(f.wait(Duration::from_secs(20)).unwrap());
    assert_eq!(f.recv().unwrap(), frame(90, 3));
    assert_eq!(f.stats().connects, 2);
}

#[test]
fn exchange_mode_survives_a_reconnect() {
    let mut w = World::new();
    let mut b = w.new_backend(true);
    let mut f = w.connect(&mut b, RxMode::Exchange);
    until(&mut f, "backend connected", |f| f.is_connected());
    b.rings().deliver_exchange(&frame(100, 1), 0, 20);
    assert!(f.wait(Duration::from_secs(20)).unwrap());
    assert_eq!(f.recv().unwrap(), frame(100, 1));
    close_and_reopen(&mut w, &mut b, &mut f);
    w.attach(&mut b, Some(&mut f));
    until(&mut f, "reconnected", |f| f.is_connected());
    assert_eq!(f.rx_mode(), RxMode::Exchange);
    assert_eq!(
        b.rings().pull_rx(),
        RX_BUFFERS,
        "fresh accept-transfer grants posted"
    );
    for i in 0..3u8 {
        b.rings()
            .deliver_exchange(&frame(200, i), 64, 21 + u64::from(i));
        assert!(f.wait(Duration::from_secs(20)).unwrap());
        assert_eq!(f.recv().unwrap(), frame(200, i));
    }
    assert_eq!(f.quarantined(), 0, "old grants all withdrawn");
}

#[test]
fn after_a_protocol_error_the_frontend_reconnects_when_the_backend_cycles() {
    let mut w = World::new();
    let mut b = w.new_backend(false);
    let mut f = w.connect(&mut b, RxMode::Copy);
    until(&mut f, "backend connected", |f| f.is_connected());
    f.send(&frame(700, 1)).unwrap();
    until(&mut f, "on the ring", |_| b.rings().pull_rx() > 0);
    let id = b.rings().peek_id();
    b.rings().raw_rx_response(NetifRxResponse {
        id,
        offset: 4095,
        flags: 0,
        status: 2,
    });
    until(&mut f, "refused", |f| f.stats().protocol_errors == 1);
    // The manager hears the frontend close, resets the backend, and offers it again.
    let fd = w.front_dir();
    let bd = b.dir.clone();
    assert_eq!(w.r(&format!("{fd}/state")).as_deref(), Some("5"));
    w.w(&format!("{bd}/state"), "6");
    until(&mut f, "frontend closed", |_| {
        w.r(&format!("{fd}/state")).as_deref() == Some("1")
    });
    b.rings = None;
    w.w(&format!("{bd}/state"), "2");
    w.attach(&mut b, Some(&mut f));
    until(&mut f, "reconnected", |f| f.is_connected());
    // The transmit the broken backend held is sent to the fresh rings.
    let mut got = Vec::new();
    until(&mut f, "resent", |_| {
        got.extend(b.rings().take_all_tx());
        !got.is_empty()
    });
    assert_eq!(got[0].1, frame(700, 1));
    b.rings().deliver_copy(&frame(64, 2), 0);
    assert!(f.wait(Duration::from_secs(20)).unwrap());
    assert_eq!(f.recv().unwrap(), frame(64, 2));
    assert_eq!(f.stats().connects, 2);
}
