//! The device manager: policy to domains, PCI enumeration, IDD supervision and recovery, the
//! management API and the `iddctl` CLI.
//!
//! Planned in issues 3 and 5; nothing here yet.
