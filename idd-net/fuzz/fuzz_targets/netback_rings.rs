//! libFuzzer target: the body is `idd_net::fuzzing::netback_rings`, which `cargo test` also
//! runs: a hostile guest's ring operations against a whole netback.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| idd_net::fuzzing::netback_rings(data));
