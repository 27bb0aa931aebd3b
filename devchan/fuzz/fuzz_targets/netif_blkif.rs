//! libFuzzer target: the body is `devchan::fuzzing::netif_blkif`, which `cargo test` also runs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| devchan::fuzzing::netif_blkif(data));
