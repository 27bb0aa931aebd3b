//! Arbitrary bytes as a XenStore client's message stream (see `devchan::xenstore::fuzzing`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    devchan::xenstore::fuzzing::xenstore_msg(data);
});
