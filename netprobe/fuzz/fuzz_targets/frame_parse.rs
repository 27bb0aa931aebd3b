//! libFuzzer target: a frame from the wire through `netprobe::frame::parse` and the echo
//! host's answer (what every tool does with every frame it receives).
#![no_main]

use libfuzzer_sys::fuzz_target;
use netprobe::frame::{self, Endpoint, Mac};

fuzz_target!(|data: &[u8]| {
    let _ = frame::parse(data);
    let me = Endpoint { mac: Mac([2, 0, 0, 0, 0, 2]), ip: std::net::Ipv4Addr::new(192, 0, 2, 2) };
    if let Some(answer) = frame::echo_answer(me, data) {
        // What we answer must itself parse.
        assert!(frame::parse(&answer).is_ok());
    }
});
