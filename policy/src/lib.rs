//! The TOML policy schema for per-guest device access, with validation that reports line and
//! column.
//!
//! Planned in issue 5; nothing here yet.
