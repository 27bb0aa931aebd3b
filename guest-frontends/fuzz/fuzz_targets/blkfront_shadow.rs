//! Operation sequences (submit, issue, answer with any id, lose the ring) on blkfront's shadow
//! table.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    guest_frontends::fuzzing::shadow_ops(data);
});
