//! The NIC path onto a real host interface: the virtio-net driver → the emulated device →
//! a TAP wire; the host side is an `AF_PACKET` socket on that interface. Needs root (and
//! `/dev/net/tun`); prints `SKIP:` otherwise.
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // small test numbers, checked lengths

use devchan::platform::Platform;
use hypervisor::domain::DomainConfig;
use hypervisor::local::LocalPlatform;
use hypervisor::system::System;
use idd_net::device::{NetDevice, NetEvent, RxBuffer, TxSeg};
use idd_net::virtio::{DriverFrames, VirtioNetDriver};
use iospace::emu::virtio_net::{NetConfig, VirtioNet};
use iospace::emu::virtio_pci::VirtioPci;
use iospace::emu::wire::{self, WireConfig};
use iospace::emu::PciBus;
use iospace::iommu::Iommu;
use iospace::link::LocalIo;
use iospace::space::IoSpace;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x20, 0x01];
/// A local experimental EtherType, so the host's own chatter (IPv6 router solicitations) is
/// told apart.
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];

/// An `AF_PACKET` socket bound to `ifname`, with a 5 s receive timeout.
fn packet_socket(ifname: &str) -> OwnedFd {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2); the result is checked and owned below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
    assert!(fd >= 0, "{}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(ifname).unwrap();
    // SAFETY: `name` is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert_ne!(index, 0);
    // SAFETY: all-zero is a valid `sockaddr_ll`.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = index as i32;
    // SAFETY: `sll` is a `sockaddr_ll` of the length passed.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::addr_of!(sll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    let tv = libc::timeval {
        tv_sec: 5,
        tv_usec: 0,
    };
    // SAFETY: SO_RCVTIMEO takes a `timeval` of the length passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::addr_of!(tv).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    assert_eq!(rc, 0);
    fd
}

#[test]
fn frames_cross_a_tap_interface_both_ways() {
    if !is_root() || !std::path::Path::new("/dev/net/tun").exists() {
        println!("SKIP: the TAP wire needs root and /dev/net/tun");
        return;
    }
    let ifname = format!("vnd{}", std::process::id() % 100_000);
    let wire = wire::open(&WireConfig::Tap {
        ifname: ifname.clone(),
    })
    .unwrap();
    let net = VirtioNet::new(NetConfig::new(MAC, wire)).unwrap();
    let iommu = Iommu::new(64);
    let dev = Arc::new(VirtioPci::new(Arc::new(net), iommu.device(), 11).unwrap());
    let bus = PciBus::new();
    let bdf = bus.plug(5, dev.clone()).unwrap();
    let space = Arc::new(IoSpace::new(bdf, dev.clone()).unwrap());
    let sys = System::new();
    let d = sys
        .create_domain(DomainConfig {
            name: "idd-net".into(),
            nr_frames: 64,
            iommu: Some(iommu.clone()),
        })
        .unwrap();
    let p = Arc::new(LocalPlatform::new(sys, d).unwrap());
    let frames = DriverFrames {
        rx_ring: 20,
        tx_ring: 21,
        hdr: 22,
    };
    let mut drv = VirtioNetDriver::probe(p.clone(), LocalIo::new(space), frames).unwrap();
    let pin = |frame: u64, writable: bool| {
        let g = p.grant_access(p.domid(), frame, !writable).unwrap();
        p.pin_grant(p.domid(), g, writable).unwrap()
    };
    let pkt = packet_socket(&ifname);

    // Driver → TAP → host.
    let mut f = vec![0x02, 0, 0, 0, 0, 0x99];
    f.extend_from_slice(&MAC);
    f.extend_from_slice(&ETHERTYPE);
    f.extend((0..500u32).map(|i| (i * 7) as u8));
    p.write_local(30, 0, &f).unwrap();
    drv.transmit(
        1,
        &[TxSeg {
            iova: pin(30, false),
            len: f.len() as u32,
        }],
    )
    .unwrap();
    let mut buf = [0u8; 2048];
    let seen = (0..100).any(|_| {
        // SAFETY: `buf` is writable for its length.
        let n = unsafe { libc::recv(pkt.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        n > 0 && buf[..n as usize] == f[..]
    });
    assert!(seen, "the transmitted frame did not reach the host");

    // Host → TAP → driver (other frames the host sends meanwhile are skipped).
    for frame in 40..48 {
        drv.post_rx(RxBuffer {
            frame,
            iova: pin(frame, true),
        })
        .unwrap();
    }
    f[..6].copy_from_slice(&MAC);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    // SAFETY: `f` is readable for its length.
    let n = unsafe { libc::send(pkt.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) };
    assert_eq!(n as usize, f.len());
    let end = Instant::now() + Duration::from_secs(10);
    let mut found = false;
    let mut out = Vec::new();
    while !found && Instant::now() < end {
        drv.poll(&mut out).unwrap();
        for e in out.drain(..) {
            if let NetEvent::Rx { buf, offset, len } = e {
                let mut got = vec![0u8; usize::from(len)];
                p.read_local(buf.frame, usize::from(offset), &mut got)
                    .unwrap();
                found |= got == f;
                drv.post_rx(buf).unwrap();
            }
        }
        drv.wait(Duration::from_millis(20)).unwrap();
    }
    assert!(found, "the host's frame did not reach the driver");
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
