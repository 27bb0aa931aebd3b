//! libFuzzer target: the body is `devchan::fuzzing::ring_entries`, which `cargo test` also runs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| devchan::fuzzing::ring_entries(data));
