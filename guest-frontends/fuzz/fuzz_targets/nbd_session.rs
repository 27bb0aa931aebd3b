//! Everything an NBD client can send, against the server over an in-memory export.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    guest_frontends::fuzzing::nbd_session(data);
});
