//! The NIC path in one process: the virtio-net driver (over `LocalIo`, the in-process I/O
//! Space) → the emulated virtio-net-pci device → DMA through the IOMMU → a UDP wire, whose
//! far end is a plain socket in the test. Frames must cross byte for byte both ways.
#![allow(clippy::cast_possible_truncation)] // small test numbers

use devchan::platform::Platform;
use hypervisor::domain::DomainConfig;
use hypervisor::local::LocalPlatform;
use hypervisor::system::System;
use idd_net::device::{NetDevError, NetDevice, NetEvent, RxBuffer, TxSeg};
use idd_net::virtio::{DriverFrames, VirtioNetDriver, NET_HDR_LEN};
use iospace::emu::virtio_net::{NetConfig, VirtioNet};
use iospace::emu::virtio_pci::VirtioPci;
use iospace::emu::wire::UdpWire;
use iospace::emu::PciBus;
use iospace::iommu::Iommu;
use iospace::link::LocalIo;
use iospace::space::IoSpace;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x10, 0x01];
const FRAMES: DriverFrames = DriverFrames {
    rx_ring: 20,
    tx_ring: 21,
    hdr: 22,
};

struct Rig {
    idd: Arc<LocalPlatform>,
    iommu: Arc<Iommu>,
    dev: Arc<VirtioPci<VirtioNet>>,
    space: Arc<IoSpace>,
    far: UdpSocket,
    wire: SocketAddr,
}

fn rig() -> Rig {
    let far = UdpSocket::bind("127.0.0.1:0").unwrap();
    far.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let wire = UdpWire::bind(
        "127.0.0.1:0".parse().unwrap(),
        Some(far.local_addr().unwrap()),
    )
    .unwrap();
    let wire_addr = wire.local_addr().unwrap();
    let net = VirtioNet::new(NetConfig::new(MAC, Arc::new(wire))).unwrap();
    let iommu = Iommu::new(256);
    let dev = Arc::new(VirtioPci::new(Arc::new(net), iommu.device(), 11).unwrap());
    let bus = PciBus::new();
    let bdf = bus.plug(5, dev.clone()).unwrap();
    let space = Arc::new(IoSpace::new(bdf, dev.clone()).unwrap());
    let sys = System::new();
    let d = sys
        .create_domain(DomainConfig {
            name: "idd-net".into(),
            nr_frames: 128,
            iommu: Some(iommu.clone()),
        })
        .unwrap();
    let idd = Arc::new(LocalPlatform::new(sys, d).unwrap());
    Rig {
        idd,
        iommu,
        dev,
        space,
        far,
        wire: wire_addr,
    }
}

impl Rig {
    fn driver(&self) -> VirtioNetDriver<LocalPlatform, LocalIo> {
        VirtioNetDriver::probe(self.idd.clone(), LocalIo::new(self.space.clone()), FRAMES).unwrap()
    }
    /// Pin one of the IDD's own frames for the device (what netback does with a guest grant).
    fn pin(&self, frame: u64, writable: bool) -> u64 {
        let p = &*self.idd;
        let g = p.grant_access(p.domid(), frame, !writable).unwrap();
        p.pin_grant(p.domid(), g, writable).unwrap()
    }
    fn rx_buffer(&self, frame: u64) -> RxBuffer {
        RxBuffer {
            frame,
            iova: self.pin(frame, true),
        }
    }
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x77];
    f.extend_from_slice(&MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend((0..len - 14).map(|i| (i as u8).wrapping_mul(13) ^ seed));
    f
}

/// Poll (and wait) until `want` events arrived.
fn events(drv: &mut impl NetDevice, want: usize) -> Vec<NetEvent> {
    let mut out = Vec::new();
    let end = Instant::now() + Duration::from_secs(10);
    while out.len() < want && Instant::now() < end {
        drv.poll(&mut out).unwrap();
        if out.len() < want {
            drv.wait(Duration::from_millis(20)).unwrap();
        }
    }
    assert_eq!(out.len(), want, "events: {out:?}");
    out
}

fn recv_far(r: &Rig) -> Vec<u8> {
    let mut b = vec![0u8; 65536];
    let (n, from) = r.far.recv_from(&mut b).unwrap();
    assert_eq!(from, r.wire);
    b.truncate(n);
    b
}

#[test]
fn transmitted_frames_reach_the_wire_byte_exact() {
    let r = rig();
    let mut drv = r.driver();
    assert_eq!(drv.mac(), MAC);
    assert_eq!(drv.max_frame(), 1518);
    // Three pinned pages for the rings and header, nothing else.
    assert_eq!(r.iommu.len(), 3);
    // A frame in two segments, the first ending a page, the second starting the next.
    let f = frame(1514, 1);
    r.idd.write_local(40, 4096 - 500, &f[..500]).unwrap();
    r.idd.write_local(41, 0, &f[500..]).unwrap();
    let (a, b) = (r.pin(40, false), r.pin(41, false));
    let segs = [
        TxSeg {
            iova: a + 4096 - 500,
            len: 500,
        },
        TxSeg { iova: b, len: 1014 },
    ];
    drv.transmit(7, &segs).unwrap();
    assert_eq!(
        events(&mut drv, 1),
        vec![NetEvent::TxDone { token: 7, ok: true }]
    );
    assert_eq!(recv_far(&r), f);
    // Many small frames, more than the queue holds, recycling descriptors.
    let mut sent = 0u64;
    let mut done = 0usize;
    let mut out = Vec::new();
    let page = r.pin(42, false);
    while sent < 300 {
        let g = frame(60 + (sent as usize % 40), sent as u8);
        r.idd.write_local(42, 0, &g).unwrap();
        let seg = [TxSeg {
            iova: page,
            len: g.len() as u32,
        }];
        match drv.transmit(100 + sent, &seg) {
            Ok(()) => {
                // The device copies the frame before completing; wait so the page is reused safely.
                while done <= sent as usize {
                    drv.poll(&mut out).unwrap();
                    done = out.len();
                    if done <= sent as usize {
                        drv.wait(Duration::from_millis(20)).unwrap();
                    }
                }
                assert_eq!(recv_far(&r), g);
                sent += 1;
            }
            Err(NetDevError::Full) => drv.wait(Duration::from_millis(20)).unwrap(),
            Err(e) => panic!("{e}"),
        }
    }
    assert!(out.iter().enumerate().all(|(i, e)| *e
        == NetEvent::TxDone {
            token: 100 + i as u64,
            ok: true
        }));
    let s = r.dev.device().stats();
    assert_eq!(s.tx_frames, 301);
    assert_eq!(drv.tx_in_flight(), 0);
    // Malformed requests are refused before the device sees them.
    for bad in [
        &[][..],
        &[TxSeg { iova: a, len: 10 }],
        &[TxSeg { iova: a, len: 0 }],
    ] {
        assert!(matches!(
            drv.transmit(1, bad),
            Err(NetDevError::Malformed(_))
        ));
    }
    let many = vec![TxSeg { iova: a, len: 64 }; 19];
    assert!(matches!(
        drv.transmit(1, &many),
        Err(NetDevError::Malformed(_))
    ));
}

#[test]
fn frames_from_the_wire_arrive_in_posted_buffers_and_drops_are_counted() {
    let r = rig();
    let mut drv = r.driver();
    // Nothing posted: the frame is dropped and counted.
    r.far.send_to(&frame(64, 9), r.wire).unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    while r.dev.device().stats().rx_no_buffer < 1 && Instant::now() < end {
        std::thread::yield_now();
    }
    assert_eq!(r.dev.device().stats().rx_no_buffer, 1);
    let bufs: Vec<RxBuffer> = (50..54).map(|f| r.rx_buffer(f)).collect();
    for b in &bufs {
        drv.post_rx(*b).unwrap();
    }
    assert!(matches!(
        drv.post_rx(bufs[0]),
        Err(NetDevError::Malformed(_))
    ));
    assert_eq!((drv.rx_posted(), drv.rx_capacity()), (4, 128));
    drv.poll(&mut Vec::new()).unwrap(); // rings the receive doorbell
    let sent: Vec<Vec<u8>> = (0..4)
        .map(|i| frame([60, 1514, 1000, 14][i], i as u8))
        .collect();
    for f in &sent {
        r.far.send_to(f, r.wire).unwrap();
    }
    let got = events(&mut drv, 4);
    for (e, f) in got.iter().zip(&sent) {
        let NetEvent::Rx { buf, offset, len } = *e else {
            panic!("{e:?}")
        };
        assert_eq!(usize::from(offset), NET_HDR_LEN);
        assert_eq!(usize::from(len), f.len());
        let mut b = vec![0u8; usize::from(len)];
        r.idd
            .read_local(buf.frame, usize::from(offset), &mut b)
            .unwrap();
        assert_eq!(&b, f);
        let mut h = [0u8; 12];
        r.idd.read_local(buf.frame, 0, &mut h).unwrap();
        assert_eq!(
            h,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
            "virtio_net_hdr_v1, num_buffers 1"
        );
    }
    assert_eq!(drv.rx_posted(), 0);
    // All buffers used: the next frame is dropped again, the counter moves.
    r.far.send_to(&frame(64, 10), r.wire).unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    while r.dev.device().stats().rx_no_buffer < 2 && Instant::now() < end {
        std::thread::yield_now();
    }
    let s = r.dev.device().stats();
    assert_eq!((s.rx_frames, s.rx_no_buffer), (4, 2));
    assert_eq!(s.rx_bytes, sent.iter().map(|f| f.len() as u64).sum::<u64>());
}

#[test]
fn a_restarted_driver_releases_stale_pins_and_works() {
    let r = rig();
    let mut drv = r.driver();
    let buf = r.rx_buffer(60);
    drv.post_rx(buf).unwrap();
    drv.poll(&mut Vec::new()).unwrap();
    // The process dies: no Drop runs, its pins stay, the device keeps its queues.
    std::mem::forget(drv);
    let pinned_before = r.iommu.len();
    let mut drv = r.driver();
    assert_eq!(
        r.iommu.len(),
        pinned_before,
        "the old three pins released, three new ones"
    );
    // The buffer posted before is forgotten by the reset: a frame is dropped, not written.
    r.idd.write_local(60, 0, &[0xee; 64]).unwrap();
    r.far.send_to(&frame(64, 1), r.wire).unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    while r.dev.device().stats().rx_no_buffer < 1 && Instant::now() < end {
        std::thread::yield_now();
    }
    let mut b = [0u8; 64];
    r.idd.read_local(60, 0, &mut b).unwrap();
    assert_eq!(b, [0xee; 64]);
    // Both directions work through the new driver.
    drv.post_rx(buf).unwrap();
    drv.poll(&mut Vec::new()).unwrap();
    let f = frame(200, 3);
    r.far.send_to(&f, r.wire).unwrap();
    let got = events(&mut drv, 1);
    assert!(matches!(got[0], NetEvent::Rx { len: 200, .. }));
    r.idd.write_local(61, 0, &f).unwrap();
    drv.transmit(
        1,
        &[TxSeg {
            iova: r.pin(61, false),
            len: 200,
        }],
    )
    .unwrap();
    assert_eq!(
        events(&mut drv, 1),
        vec![NetEvent::TxDone { token: 1, ok: true }]
    );
    assert_eq!(recv_far(&r), f);
    // A clean drop resets the device and unpins the driver's three frames.
    let before = r.iommu.len();
    drop(drv);
    assert_eq!(r.iommu.len(), before - 3);
}

#[test]
fn a_device_fault_fails_the_driver() {
    let r = rig();
    let mut drv = r.driver();
    // A receive buffer whose IOVA nothing maps: the device faults on the next frame.
    drv.post_rx(RxBuffer {
        frame: 70,
        iova: 0xdead_0000,
    })
    .unwrap();
    drv.poll(&mut Vec::new()).unwrap();
    r.far.send_to(&frame(64, 1), r.wire).unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    let err = loop {
        let mut out = Vec::new();
        if let Err(e) = drv
            .poll(&mut out)
            .and_then(|()| drv.wait(Duration::from_millis(20)))
        {
            break e;
        }
        assert!(Instant::now() < end, "the driver never noticed");
    };
    assert!(matches!(err, NetDevError::Failed(_)), "{err}");
    assert_eq!(r.dev.device().stats().failures, 1);
    // Failed stays failed; a new probe (the restarted IDD) brings the device back.
    assert!(matches!(
        drv.post_rx(r.rx_buffer(71)),
        Err(NetDevError::Failed(_))
    ));
    drop(drv);
    let mut drv = r.driver();
    drv.post_rx(r.rx_buffer(72)).unwrap();
    drv.poll(&mut Vec::new()).unwrap();
    r.far.send_to(&frame(64, 2), r.wire).unwrap();
    assert!(matches!(
        events(&mut drv, 1)[0],
        NetEvent::Rx { len: 64, .. }
    ));
}

#[test]
fn the_driver_works_over_the_remote_link_too() {
    // The IDD process reaches its I/O Space in domain 0 through a socket (`RemoteIo`).
    let r = rig();
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let srv = r.space.clone();
    let server = std::thread::spawn(move || iospace::link::serve(&srv, b));
    let io = iospace::link::RemoteIo::new(a).unwrap();
    let mut drv = VirtioNetDriver::probe(r.idd.clone(), io, FRAMES).unwrap();
    assert_eq!(drv.mac(), MAC);
    drv.post_rx(r.rx_buffer(80)).unwrap();
    drv.poll(&mut Vec::new()).unwrap();
    let f = frame(1514, 4);
    r.far.send_to(&f, r.wire).unwrap();
    let NetEvent::Rx { buf, offset, len } = events(&mut drv, 1)[0] else {
        panic!("no frame")
    };
    let mut got = vec![0u8; usize::from(len)];
    r.idd
        .read_local(buf.frame, usize::from(offset), &mut got)
        .unwrap();
    assert_eq!(got, f);
    r.idd.write_local(81, 0, &f).unwrap();
    drv.transmit(
        5,
        &[TxSeg {
            iova: r.pin(81, false),
            len: 1514,
        }],
    )
    .unwrap();
    assert_eq!(
        events(&mut drv, 1),
        vec![NetEvent::TxDone { token: 5, ok: true }]
    );
    assert_eq!(recv_far(&r), f);
    drop(drv);
    server.join().unwrap().unwrap();
}

#[test]
fn a_burst_of_transmits_arrives_complete_and_in_order() {
    // Back to back, without waiting: the device drains while it asks for no doorbells, and
    // the driver skips them; nothing may be stranded on the ring.
    let r = rig();
    let mut drv = r.driver();
    let pages: Vec<u64> = (90..94).map(|f| r.pin(f, false)).collect();
    // 128 small datagrams stay well within the far socket's receive buffer.
    let n = 4 * 32;
    let mut sent = Vec::new();
    let mut out = Vec::new();
    let mut token = 0u64;
    while token < n {
        let (page, slot) = ((token / 32) as usize, (token % 32) as usize);
        let f = frame(64 + slot, token as u8);
        r.idd.write_local(90 + page as u64, slot * 128, &f).unwrap();
        let seg = [TxSeg {
            iova: pages[page] + (slot * 128) as u64,
            len: f.len() as u32,
        }];
        match drv.transmit(token, &seg) {
            Ok(()) => {
                sent.push(f);
                token += 1;
            }
            Err(NetDevError::Full) => {
                drv.poll(&mut out).unwrap();
                drv.wait(Duration::from_millis(5)).unwrap();
            }
            Err(e) => panic!("{e}"),
        }
    }
    let rest = n as usize - out.len();
    out.extend(events(&mut drv, rest));
    let tokens: Vec<u64> = out
        .iter()
        .map(|e| match e {
            NetEvent::TxDone { token, ok: true } => *token,
            e => panic!("{e:?}"),
        })
        .collect();
    assert_eq!(tokens, (0..n).collect::<Vec<_>>());
    for f in &sent {
        assert_eq!(&recv_far(&r), f);
    }
}
