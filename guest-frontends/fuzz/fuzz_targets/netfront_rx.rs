//! A real netfront against a backend that answers with whatever the input says: arbitrary
//! receive and transmit responses, wild producer indexes, honest deliveries in between.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = guest_frontends::netfront::fuzz::netfront_rx(data);
});
