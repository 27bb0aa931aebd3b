//! The wire's far side: tools that talk to an emulated NIC from outside.
//!
//! * [`frame`]: Ethernet/ARP/IPv4/ICMP/UDP frames built and parsed with `etherparse`.
//! * [`wire`]: the [`wire::Transport`] the tools send and receive frames through: a UDP
//!   socket speaking one Ethernet frame per datagram with the device's UDP wire, or an
//!   `AF_PACKET` socket on a TAP interface (root).
//! * [`sched`]: equally spaced send times from a monotonic clock.
//! * [`probe`]: equally spaced ICMP echo (or UDP echo) probes, reply inter-arrival times and
//!   outage detection, as in the seed paper's recovery experiment.
//! * [`plot`]: the inter-arrival plot (the seed paper's Figure 6) as SVG.
//! * [`traffic`]: `flood` (a traffic generator) and `count` (a receiver that counts frames).
//!
//! The `netprobe` binary puts a CLI on all of it.

pub mod frame;
pub mod plot;
pub mod probe;
pub mod sched;
pub mod traffic;
pub mod wire;
