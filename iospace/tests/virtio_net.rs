//! The virtio-net model driven through its I/O Space by the shared driver-side transport
//! (`iospace::driver`), over the remote link an IDD uses (`RemoteIo` ↔ `serve`), with a UDP
//! wire whose far end is a socket in the test.

use iospace::driver::{Buf, DriverError, QueueMemory, SplitQueue, Transport};
use iospace::emu::virtio_net::{NetConfig, VirtioNet};
use iospace::emu::virtio_pci::VirtioPci;
use iospace::emu::wire::UdpWire;
use iospace::emu::PciBus;
use iospace::iommu::{DmaPage, Iommu, IommuEntry};
use iospace::link::{serve, RemoteIo};
use iospace::space::IoSpace;
use std::net::UdpSocket;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use virtio_bindings::virtio_config::{VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_net::{VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU};

struct Page(Mutex<Vec<u8>>);
impl DmaPage for Page {
    fn read(&self, offset: usize, buf: &mut [u8]) {
        buf.copy_from_slice(&self.0.lock().unwrap()[offset..offset + buf.len()]);
    }
    fn write(&self, offset: usize, data: &[u8]) {
        self.0.lock().unwrap()[offset..offset + data.len()].copy_from_slice(data);
    }
}
impl QueueMemory for Page {
    fn read(&self, offset: usize, buf: &mut [u8]) -> Result<(), DriverError> {
        DmaPage::read(self, offset, buf);
        Ok(())
    }
    fn write(&self, offset: usize, data: &[u8]) -> Result<(), DriverError> {
        DmaPage::write(self, offset, data);
        Ok(())
    }
}

const MAC: [u8; 6] = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
const REQUIRED: [u32; 3] = [
    VIRTIO_F_VERSION_1,
    VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_NET_F_MAC,
];

/// Wait until `q` has a used chain, and check its MSI-X vector fired for it.
fn wait_used(t: &Transport<RemoteIo>, q: &mut SplitQueue, page: &Page, vector: u16) -> (u16, u32) {
    let end = Instant::now() + Duration::from_secs(10);
    let mut fired = 0u32;
    while Instant::now() < end {
        if let Some(u) = q.pop_used(page).unwrap() {
            // The device signals right after publishing the element.
            if fired & 1 << vector == 0 {
                fired |= t.wait_irq(Duration::from_secs(5)).unwrap();
            }
            assert_ne!(fired & 1 << vector, 0, "the queue's vector fired");
            return u;
        }
        fired |= t.wait_irq(Duration::from_millis(20)).unwrap();
    }
    panic!("nothing used");
}

#[test]
fn shared_transport_brings_up_virtio_net_over_the_remote_link() {
    let far = UdpSocket::bind("127.0.0.1:0").unwrap();
    far.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let wire = UdpWire::bind(
        "127.0.0.1:0".parse().unwrap(),
        Some(far.local_addr().unwrap()),
    )
    .unwrap();
    let wire_addr = wire.local_addr().unwrap();
    let net = VirtioNet::new(NetConfig::new(MAC, Arc::new(wire))).unwrap();
    let iommu = Iommu::new(16);
    let dev = Arc::new(VirtioPci::new(Arc::new(net), iommu.device(), 9).unwrap());
    let bus = PciBus::new();
    let bdf = bus.plug(6, dev.clone()).unwrap();
    let space = Arc::new(IoSpace::new(bdf, dev.clone()).unwrap());
    let (a, b) = UnixStream::pair().unwrap();
    let srv = space.clone();
    let server = std::thread::spawn(move || serve(&srv, b));
    let pages: Vec<Arc<Page>> = (0..4)
        .map(|_| Arc::new(Page(Mutex::new(vec![0; 4096]))))
        .collect();
    let iovas: Vec<u64> = pages
        .iter()
        .enumerate()
        .map(|(i, p)| {
            iommu
                .map(IommuEntry {
                    domain: 1,
                    frame: i as u64,
                    writable: true,
                    page: p.clone(),
                })
                .unwrap()
        })
        .collect();

    let t = Transport::open(RemoteIo::new(a).unwrap(), 3).unwrap();
    // A feature the device lacks is refused before FEATURES_OK.
    assert!(matches!(
        t.negotiate(&[VIRTIO_NET_F_CTRL_VQ], 0, 2),
        Err(DriverError::MissingFeature(VIRTIO_NET_F_CTRL_VQ))
    ));
    let f = t.negotiate(&REQUIRED, 1 << VIRTIO_NET_F_MTU, 2).unwrap();
    assert_ne!(f & 1 << VIRTIO_NET_F_MTU, 0);
    assert!(matches!(t.queue_size(2, 64), Err(DriverError::NoQueue(2))));
    let mut rx = SplitQueue::new(t.queue_size(0, 64).unwrap(), iovas[0]).unwrap();
    let mut tx = SplitQueue::new(t.queue_size(1, 100).unwrap(), iovas[1]).unwrap();
    assert_eq!((rx.size(), tx.size()), (64, 64));
    t.setup_queue(0, &mut rx, 0).unwrap();
    t.setup_queue(1, &mut tx, 1).unwrap();
    t.driver_ok().unwrap();
    assert!(!t.needs_reset().unwrap());
    let mut mac = [0u8; 8];
    t.read_config(0, &mut mac).unwrap();
    assert_eq!(&mac[..6], &MAC);

    // Transmit: zero header + a frame in page 2.
    let frame: Vec<u8> = (0..90u8).collect();
    DmaPage::write(&*pages[2], 100, &frame);
    let head = tx
        .push(
            &*pages[1],
            &[
                Buf {
                    addr: iovas[3],
                    len: 12,
                    device_writes: false,
                },
                Buf {
                    addr: iovas[2] + 100,
                    len: 90,
                    device_writes: false,
                },
            ],
        )
        .unwrap();
    t.notify(&tx).unwrap();
    assert_eq!(wait_used(&t, &mut tx, &pages[1], 1), (head, 0));
    let mut got = [0u8; 2048];
    let n = far.recv(&mut got).unwrap();
    assert_eq!(&got[..n], &frame[..]);

    // Receive into a posted page.
    let head = rx
        .push(
            &*pages[0],
            &[Buf {
                addr: iovas[2],
                len: 4096,
                device_writes: true,
            }],
        )
        .unwrap();
    t.notify(&rx).unwrap();
    far.send_to(&frame[..64], wire_addr).unwrap();
    assert_eq!(wait_used(&t, &mut rx, &pages[0], 0), (head, 12 + 64));
    let mut b = [0u8; 64];
    DmaPage::read(&*pages[2], 12, &mut b);
    assert_eq!(&b[..], &frame[..64]);

    // Reset: the device forgets the queues.
    t.reset().unwrap();
    assert_eq!(t.status().unwrap(), 0);
    drop(t);
    server.join().unwrap().unwrap();
}
