//! Guest-side frontends (netfront, blkfront) that survive a driver-domain restart, and adapters
//! (TAP, NBD) that let real programs use them.
//!
//! Planned in issues 3 and 4; nothing here yet.
