//! Hypercall-page batches of two hostile domains, decoded and executed against a `System`
//! (body: `hypervisor::fuzzing::hypercall_batches`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    hypervisor::fuzzing::hypercall_batches(data);
});
