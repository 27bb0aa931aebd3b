//! The network isolated driver domain: a virtio-net driver behind an I/O Space, and netback
//! serving Xen's `netif` protocol over device channels.
//!
//! Planned in issue 4 (the network path); nothing here yet.
