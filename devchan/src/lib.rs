//! Xen-ABI device-channel primitives, usable by both ends of a channel.
//!
//! A *device channel* is what a guest and a driver domain share: a descriptor ring in a page the
//! guest grants (`ring`), an event channel to notify across (`evtchn`), and the grant references
//! that name the guest's data pages (`grant`). The messages on the rings are Xen's `netif` and
//! `blkif`; the channel is set up through XenStore (`xenstore`) following the XenBus state
//! machine (`xenbus`). Every layout here is Xen's, cross-checked against Xen's public headers by
//! `tests/xen_headers.rs`.
//!
//! This crate does no I/O and starts no threads. The operations that need a hypervisor (mapping a
//! grant, copying through one, sending an event) are the [`platform::Platform`] trait, which the
//! process-domain hypervisor, an in-process test platform and the Xen platform implement.

pub mod abi;
pub mod grant;
pub mod platform;
pub mod evtchn;
pub mod ring;
pub mod netif;
pub mod blkif;
pub mod fuzzing;
pub mod xenstore;
pub mod xenbus;
