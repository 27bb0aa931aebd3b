//! libFuzzer target: the body is `iospace::fuzzing::config_ops`, which `cargo test` also runs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| iospace::fuzzing::config_ops(data));
