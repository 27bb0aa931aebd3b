//! Control-socket messages of two hostile domains: parsing, the socket path and execution
//! against a `System` (body: `hypervisor::fuzzing::control_messages`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    hypervisor::fuzzing::control_messages(data);
});
