//! libFuzzer target: the body is `iospace::fuzzing::virtio_ops`, which `cargo test` also runs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| iospace::fuzzing::virtio_ops(data));
