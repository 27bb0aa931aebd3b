//! Bytes decoded into XenStore operations by several domains, with invariant checks (see
//! `devchan::xenstore::fuzzing`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    devchan::xenstore::fuzzing::xenstore_ops(data);
});
