//! libFuzzer target: the body is `iospace::emu::virtio_net::fuzz_device` (a hostile driver
//! and a hostile wire against the virtio-net model), which `cargo test` also runs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    iospace::emu::virtio_net::fuzz_device(data);
});
