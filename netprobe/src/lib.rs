//! The wire's far side: tools that talk to an emulated NIC from outside, for the recovery
//! experiment and the network benchmark.
//!
//! * [`frame`]: Ethernet/ARP/IPv4/ICMP/UDP frames built and parsed with `etherparse`, and the
//!   answers of an echo host (ARP, ICMP echo, UDP echo) for test peers.
//! * [`wire`]: the [`wire::Transport`] the tools send and receive frames through: a UDP
//!   socket speaking one Ethernet frame per datagram with the device's UDP wire, or an
//!   `AF_PACKET` socket on a TAP interface (root).
//! * [`sched`]: equally spaced send times from a monotonic clock.
//! * [`probe`]: equally spaced ICMP echo (or UDP echo) probes, reply inter-arrival times and
//!   outage detection, as in the seed paper's recovery experiment; a [`probe::ProbeHandle`]
//!   marks crashes from another thread.
//! * [`plot`]: the inter-arrival plot (the seed paper's Figure 6) as SVG.
//! * [`traffic`]: `flood` (a traffic generator) and `count` (a receiver that counts frames).
//!
//! The `netprobe` binary puts a CLI on all of it (see its docs).
//!
//! # Example
//!
//! Probe an echo host on a UDP wire (here a thread; in the experiment, a guest behind an
//! emulated NIC whose wire is the host's UDP socket), mark an event, and plot:
//!
//! ```
//! use netprobe::frame::{echo_answer, Endpoint, Mac};
//! use netprobe::probe::{Probe, ProbeConfig};
//! use netprobe::wire::{Transport, UdpTransport, WireSpec};
//! use std::sync::atomic::AtomicBool;
//! use std::time::Duration;
//!
//! let guest = Endpoint { mac: Mac([2, 0, 0, 0, 0, 2]), ip: "192.0.2.2".parse().unwrap() };
//! let me = Endpoint { mac: Mac([2, 0, 0, 0, 0, 1]), ip: "192.0.2.1".parse().unwrap() };
//!
//! // The echo host: answers whatever it should, for a second.
//! let host = UdpTransport::bind("127.0.0.1:0".parse().unwrap(), None).unwrap();
//! let host_addr = host.local_addr().unwrap();
//! std::thread::spawn(move || {
//!     let mut buf = [0u8; 2048];
//!     while let Ok(Some(n)) = host.recv(&mut buf, Some(Duration::from_secs(1))) {
//!         if let Some(answer) = echo_answer(guest, &buf[..n]) {
//!             host.send(&answer).unwrap();
//!         }
//!     }
//! });
//!
//! let mut cfg = ProbeConfig::new(me, guest.ip); // ICMP, 200/s, target MAC by ARP
//! cfg.count = Some(40);
//! let spec = WireSpec::Udp { bind: "127.0.0.1:0".parse().unwrap(), peer: Some(host_addr) };
//! let probe = Probe::open(cfg, &spec).unwrap();
//! probe.handle().mark("start");
//! let report = probe.run(&AtomicBool::new(false)).unwrap();
//! assert_eq!(report.lost, 0);
//! let svg = netprobe::plot::render_svg(&report).unwrap();
//! assert!(svg.contains("<polyline"));
//! ```

pub mod frame;
pub mod plot;
pub mod probe;
pub mod sched;
pub mod traffic;
pub mod wire;
