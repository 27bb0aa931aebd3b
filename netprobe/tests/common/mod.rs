//! A wire peer for the integration tests: an echo host on a UDP socket (what a guest behind
//! an emulated NIC looks like from the wire's far side), built on the crate's own frames.

#![allow(dead_code)]

use netprobe::frame::{self, Endpoint, Mac, Payload};
use netprobe::wire::{Transport, UdpTransport};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The echo host's address.
pub fn peer_ep() -> Endpoint {
    Endpoint {
        mac: Mac([2, 0, 0, 0, 0, 2]),
        ip: Ipv4Addr::new(192, 0, 2, 2),
    }
}

/// The probe's address.
pub fn probe_ep() -> Endpoint {
    Endpoint {
        mac: Mac([2, 0, 0, 0, 0, 1]),
        ip: Ipv4Addr::new(192, 0, 2, 1),
    }
}

/// An echo host answering ARP, ICMP echo and UDP echo on a UDP wire. After `drop_after`
/// answered probes it stops answering for `drop_for` (the "driver restart"), counting what it
/// drops.
pub struct EchoPeer {
    /// Its wire address (the probe's `udp:...->ADDR`).
    pub addr: SocketAddr,
    /// Probes it dropped.
    pub dropped: Arc<AtomicU64>,
    /// Probes it answered.
    pub answered: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoPeer {
    /// Starts the peer.
    pub fn spawn(drop_after: Option<u64>, drop_for: Duration) -> EchoPeer {
        let wire = UdpTransport::bind("127.0.0.1:0".parse().unwrap(), None).unwrap();
        let addr = wire.local_addr().unwrap();
        let dropped = Arc::new(AtomicU64::new(0));
        let answered = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (d, a, s) = (dropped.clone(), answered.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            let mut drop_until: Option<Instant> = None;
            while !s.load(Ordering::Relaxed) {
                let Some(n) = wire
                    .recv(&mut buf, Some(Duration::from_millis(20)))
                    .unwrap()
                else {
                    continue;
                };
                let f = &buf[..n];
                let is_probe = !matches!(frame::parse(f).map(|p| p.payload), Ok(Payload::Arp(_)));
                if is_probe {
                    if drop_after.is_some_and(|k| a.load(Ordering::Relaxed) == k)
                        && drop_until.is_none()
                    {
                        drop_until = Some(Instant::now() + drop_for);
                    }
                    if drop_until.is_some_and(|u| Instant::now() < u) {
                        d.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                }
                if let Some(answer) = frame::echo_answer(peer_ep(), f) {
                    wire.send(&answer).unwrap();
                    if is_probe {
                        a.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        EchoPeer {
            addr,
            dropped,
            answered,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for EchoPeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
