#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    scaleout_lb::codec::fuzzing::chunked_round_trip(data);
});
