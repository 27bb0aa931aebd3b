//! The block isolated driver domain: a virtio-blk driver behind an I/O Space, and blkback
//! serving Xen's `blkif` protocol over device channels.
//!
//! Planned in issue 3 (the block path); nothing here yet.
