//! Arbitrary bytes as a policy file: never panics, every diagnostic renders.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| policy::fuzzing::parse(data));
