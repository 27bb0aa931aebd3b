//! flood → count straight over a UDP socket pair (the benchmark's baseline path).

use netprobe::frame::{Endpoint, Mac};
use netprobe::traffic::{count, flood, CountConfig, FloodConfig, DISCARD_PORT};
use netprobe::wire::{Transport, UdpTransport};
use std::net::Ipv4Addr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

fn ep(last: u8) -> Endpoint {
    Endpoint {
        mac: Mac([2, 0, 0, 0, 0, last]),
        ip: Ipv4Addr::new(192, 0, 2, last),
    }
}

#[test]
fn count_sees_every_frame_of_a_modest_flood() {
    for size in [64usize, 1500] {
        let rx = Arc::new(UdpTransport::bind("127.0.0.1:0".parse().unwrap(), None).unwrap());
        let tx = UdpTransport::bind(
            "127.0.0.1:0".parse().unwrap(),
            Some(rx.local_addr().unwrap()),
        )
        .unwrap();
        let counter = {
            let rx = rx.clone();
            std::thread::spawn(move || {
                let cfg = CountConfig {
                    frames: Some(1000),
                    idle: Some(Duration::from_secs(5)),
                    duration: Some(Duration::from_secs(60)),
                    dst: Some(ep(2).mac),
                };
                count(&cfg, &*rx, &AtomicBool::new(false)).unwrap()
            })
        };
        let cfg = FloodConfig {
            source: ep(1),
            target: ep(2),
            src_port: 4000,
            dst_port: DISCARD_PORT,
            frame_len: size,
            rate: Some(5000.0),
            duration: Duration::from_secs(60),
            count: Some(1000),
        };
        let sent = flood(&cfg, &tx, &AtomicBool::new(false)).unwrap();
        let got = counter.join().unwrap();
        assert_eq!((sent.frames, sent.send_errors), (1000, 0));
        assert_eq!(sent.bytes, 1000 * size as u64);
        assert_eq!(got.frames, 1000, "size {size}: {got:?}");
        assert_eq!(got.bytes, 1000 * size as u64);
        assert_eq!((got.tagged, got.tag_missing, got.filtered), (1000, 0, 0));
        assert!(got.pps > 0.0 && got.mbps > 0.0);
        // Nothing else arrives.
        let mut buf = [0u8; 2048];
        assert_eq!(
            rx.recv(&mut buf, Some(Duration::from_millis(50))).unwrap(),
            None
        );
    }
}
